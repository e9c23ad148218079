//! # transfuse-codegen
//!
//! One kernel IR ([`kir`]), two printers that only print ([`cuda`], [`wgsl`]), and the kernel
//! templates for the fused ops and generated elementwise/reduction kernels ([`kernels`]); the
//! lowering of a whole optimized graph to a launch plan ([`lower`]) and a plan executor on the
//! kernel-IR interpreter ([`exec`]).
//! Never touches a device: sources are validated by the tests (naga for WGSL, NVRTC through
//! the runtime for CUDA).
//!
//! ```
//! use transfuse_codegen::kir::*;
//! use transfuse_codegen::{cuda, wgsl};
//!
//! // y[i] = x[i] * 2 for i < n
//! let k = Kernel {
//!     name: "double".into(),
//!     buffers: vec![
//!         Buffer { name: "x".into(), elem: Elem::F32, access: Access::Read },
//!         Buffer { name: "y".into(), elem: Elem::F32, access: Access::ReadWrite },
//!     ],
//!     uniforms: vec!["n".into()],
//!     workgroup: [64, 1, 1],
//!     shared: vec![],
//!     body: vec![
//!         let_("i", Elem::U32, global_id(0)),
//!         if_(var("i").lt(uni("n")), vec![store("y", var("i"), load("x", var("i")) * f(2.0))]),
//!     ],
//! };
//! assert!(cuda::print(&k).unwrap().contains("y[i] = (x[i] * 2.0f);"));
//! assert!(wgsl::print(&k).unwrap().contains("b_y[i] = (b_x[i] * 2.0);"));
//! ```
#![warn(missing_docs)]

pub mod cuda;
pub mod exec;
pub mod interp;
pub mod kernels;
pub mod kir;
pub mod lower;
mod print;
pub mod types;
pub mod wgsl;

/// Errors of code generation; each names the kernel.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CodegenError {
    /// A kernel that a printer cannot express or that refers to unknown names.
    #[error("kernel `{kernel}`: {msg}")]
    Kernel {
        /// Kernel name.
        kernel: String,
        /// What is wrong.
        msg: String,
    },
    /// A plan that cannot be made or run (bad options, unbound dims, missing buffers).
    #[error("plan: {0}")]
    Plan(String),
    /// A tensor too large for the kernels' 32-bit indices at the bound dims (or, with constant
    /// sizes, when lowering).
    #[error(
        "tensor `{tensor}` has {elements} elements at these dims, more than kernel `{kernel}` \
         can index ({why}: at most {max})"
    )]
    IndexOverflow {
        /// The plan buffer (graph input, weight or output name, `t<node>` for intermediates).
        tensor: String,
        /// Its element count.
        elements: u64,
        /// The kernel that binds it.
        kernel: String,
        /// The most elements the kernel can index at this launch.
        max: u64,
        /// What limits it.
        why: &'static str,
    },
    /// An op the lowering has no kernel for.
    #[error("op `{op}` (node %{node}): {msg}")]
    Unsupported {
        /// Op name.
        op: String,
        /// Node id.
        node: u32,
        /// Why.
        msg: String,
    },
}
