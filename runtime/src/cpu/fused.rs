//! CPU implementations of the fused ops (see `transfuse_ir::Op`'s fused variants).

use std::sync::Arc;

use transfuse_ir::{Op, Tensor};

/// Evaluates a fused op on f32 operands into a buffer of `out_shape`.
pub fn eval(op: &Op, args: &[Arc<Tensor>], out_shape: &[usize]) -> Result<Vec<f32>, String> {
    let _ = (args, out_shape);
    Err(format!(
        "fused op `{}` has no CPU implementation yet",
        op.name()
    ))
}
