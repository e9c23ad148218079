//! Host tensors: the values that flow into and out of a graph (inputs, weights, outputs).
//!
//! Row-major, contiguous, owned. Backends keep their own device buffers; this type is the
//! common currency between the model loader, the backends and the CLI.

use std::sync::Arc;

use crate::op::DType;

/// The elements of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// f32 elements.
    F32(Vec<f32>),
    /// i64 elements.
    I64(Vec<i64>),
    /// bool elements.
    Bool(Vec<bool>),
    /// f16 elements (host only: weights kept in a checkpoint's precision).
    F16(Vec<half::f16>),
    /// bf16 elements (host only, as [`Data::F16`]).
    BF16(Vec<half::bf16>),
}

/// A dense row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// Elements, `shape.iter().product()` of them.
    pub data: Data,
}

/// Weights by name, shared between graphs and runs without copying.
pub type Weights = std::collections::HashMap<String, Arc<Tensor>>;

impl Tensor {
    /// An f32 tensor; `data.len()` must equal the shape's element count.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor size");
        Tensor {
            shape,
            data: Data::F32(data),
        }
    }

    /// An i64 tensor; `data.len()` must equal the shape's element count.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor size");
        Tensor {
            shape,
            data: Data::I64(data),
        }
    }

    /// A bool tensor; `data.len()` must equal the shape's element count.
    pub fn bool(shape: Vec<usize>, data: Vec<bool>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor size");
        Tensor {
            shape,
            data: Data::Bool(data),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I64(_) => DType::I64,
            Data::Bool(_) => DType::Bool,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
        }
    }

    /// An f16 tensor; `data.len()` must equal the shape's element count.
    pub fn f16(shape: Vec<usize>, data: Vec<half::f16>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor size");
        Tensor {
            shape,
            data: Data::F16(data),
        }
    }

    /// A bf16 tensor; `data.len()` must equal the shape's element count.
    pub fn bf16(shape: Vec<usize>, data: Vec<half::bf16>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor size");
        Tensor {
            shape,
            data: Data::BF16(data),
        }
    }

    /// The float elements widened to f32 (exact: every f16/bf16 value is an f32); `None` for
    /// i64 and bool tensors.
    pub fn floats_f32(&self) -> Option<std::borrow::Cow<'_, [f32]>> {
        use std::borrow::Cow;
        match &self.data {
            Data::F32(v) => Some(Cow::Borrowed(v)),
            Data::F16(v) => Some(Cow::Owned(v.iter().map(|x| x.to_f32()).collect())),
            Data::BF16(v) => Some(Cow::Owned(v.iter().map(|x| x.to_f32()).collect())),
            _ => None,
        }
    }

    /// This tensor with f16/bf16 elements widened to f32 (a copy); other tensors unchanged
    /// (borrowed). What the CPU backend, the f32 reference, does with f16/bf16 weights.
    pub fn widened(&self) -> std::borrow::Cow<'_, Tensor> {
        use std::borrow::Cow;
        match &self.data {
            Data::F16(_) | Data::BF16(_) => Cow::Owned(Tensor::f32(
                self.shape.clone(),
                self.floats_f32().expect("float").into_owned(),
            )),
            _ => Cow::Borrowed(self),
        }
    }

    /// Bytes per element (f32 and i64 as stored on the host: 4 and 8; bool 1).
    pub fn elem_bytes(&self) -> usize {
        match self.data {
            Data::F32(_) => 4,
            Data::I64(_) => 8,
            Data::Bool(_) => 1,
            Data::F16(_) | Data::BF16(_) => 2,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True if the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 elements, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The i64 elements, if this is an i64 tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The bool elements, if this is a bool tensor.
    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }
}
