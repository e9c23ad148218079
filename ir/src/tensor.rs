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
