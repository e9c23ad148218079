//! # transfuse-runtime
//!
//! Runs graphs. The [`Backend`] trait is what every backend implements; [`CpuBackend`] is the
//! executable specification of every op, the reference that GPU backends are checked against.
//! Symbolic dims (`batch`, `seq`, `past`) are bound from the inputs on each call
//! ([`bind_inputs`]), so one graph serves every batch size and sequence length without
//! recompilation.
//!
//! ```
//! use std::collections::HashMap;
//! use transfuse_ir::{Builder, DType, Dim, Tensor};
//! use transfuse_runtime::{Backend, CpuBackend};
//!
//! let mut b = Builder::new();
//! let x = b.input("x", vec![Dim::sym("n"), 2.into()], DType::F32).unwrap();
//! let y = b.softmax(x).unwrap();
//! b.output("y", y);
//! let g = b.finish();
//!
//! let inputs = HashMap::from([("x".to_string(), Tensor::f32(vec![1, 2], vec![0.0, 0.0]))]);
//! let out = CpuBackend::new().run(&g, &HashMap::new(), &inputs).unwrap();
//! assert_eq!(out["y"].as_f32().unwrap(), &[0.5, 0.5]);
//! ```
#![warn(missing_docs)]

use std::collections::HashMap;

use transfuse_ir::{Bindings, DType, Graph, IrError, Tensor, Weights};

pub mod cpu;
pub mod fold;
pub mod nvrtc;

pub use cpu::CpuBackend;
pub use fold::fold_weights;

/// Named host tensors (graph inputs or outputs).
pub type TensorMap = HashMap<String, Tensor>;

/// Errors of running a graph. Each names the input, weight or node it is about.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RuntimeError {
    /// A graph input was not supplied.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// An input has the wrong dtype.
    #[error("input `{name}` has dtype {found}, expected {expected}")]
    InputDtype {
        /// Input name.
        name: String,
        /// Declared dtype.
        expected: DType,
        /// Supplied dtype.
        found: DType,
    },
    /// An input's shape does not fit its declaration (or binds a symbol two ways).
    #[error("input `{name}` has shape {found:?}, expected {expected}: {why}")]
    InputShape {
        /// Input name.
        name: String,
        /// Declared shape, printed.
        expected: String,
        /// Supplied shape.
        found: Vec<usize>,
        /// What does not fit.
        why: String,
    },
    /// A weight the graph needs was not supplied.
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    /// A weight has the wrong shape.
    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    WeightShape {
        /// Weight name.
        name: String,
        /// Declared shape.
        expected: Vec<usize>,
        /// Supplied shape.
        found: Vec<usize>,
    },
    /// A gather index is out of range.
    #[error("op `gather` (node %{node}): index {index} out of range for table of {size} rows")]
    IndexOutOfRange {
        /// The gather node.
        node: u32,
        /// The offending index.
        index: i64,
        /// The table's row count.
        size: usize,
    },
    /// A node could not be executed (unsupported dtype combination and the like).
    #[error("op `{op}` (node %{node}): {msg}")]
    Op {
        /// Op name.
        op: String,
        /// Node id.
        node: u32,
        /// What went wrong.
        msg: String,
    },
    /// A shape expression could not be evaluated.
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// A backend that runs whole graphs.
pub trait Backend {
    /// A short name (`cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &str;

    /// Runs `graph` with `weights` on `inputs`, returning its named outputs.
    fn run(
        &self,
        graph: &Graph,
        weights: &Weights,
        inputs: &TensorMap,
    ) -> Result<TensorMap, RuntimeError>;
}

/// Binds the graph's symbolic dims from the supplied inputs and checks their dtypes and shapes.
///
/// A dim that is a bare symbol binds it (two inputs binding it differently is an error); every
/// other dim is evaluated afterwards and must match.
pub fn bind_inputs(graph: &Graph, inputs: &TensorMap) -> Result<Bindings, RuntimeError> {
    let mut b = Bindings::new();
    let declared = graph.inputs();
    let shape_err = |name: &str, shape: &[transfuse_ir::Dim], found: &[usize], why: String| {
        RuntimeError::InputShape {
            name: name.to_string(),
            expected: transfuse_ir::shape_string(shape),
            found: found.to_vec(),
            why,
        }
    };
    for &(name, shape, dtype) in &declared {
        let t = inputs
            .get(name)
            .ok_or_else(|| RuntimeError::MissingInput(name.to_string()))?;
        if t.dtype() != dtype {
            return Err(RuntimeError::InputDtype {
                name: name.to_string(),
                expected: dtype,
                found: t.dtype(),
            });
        }
        if t.shape.len() != shape.len() {
            return Err(shape_err(name, shape, &t.shape, "rank differs".into()));
        }
        for (d, &n) in shape.iter().zip(&t.shape) {
            if let Some(s) = d.as_sym() {
                match b.get(s) {
                    Some(&prev) if prev != n => {
                        return Err(shape_err(
                            name,
                            shape,
                            &t.shape,
                            format!("`{s}` is {n} here but {prev} in another input"),
                        ))
                    }
                    _ => {
                        b.insert(s.to_string(), n);
                    }
                }
            }
        }
    }
    for &(name, shape, _) in &declared {
        let t = &inputs[name];
        for (d, &n) in shape.iter().zip(&t.shape) {
            let want = d
                .eval(&b)
                .map_err(|e| shape_err(name, shape, &t.shape, e.to_string()))?;
            if want != n {
                return Err(shape_err(
                    name,
                    shape,
                    &t.shape,
                    format!("dim `{d}` is {want}, got {n}"),
                ));
            }
        }
    }
    Ok(b)
}
