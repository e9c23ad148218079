//! Lowering: an optimized [`Graph`](transfuse_ir::Graph) → a launch [`Plan`]: the kernels in launch order, the
//! buffers with their sizes as polynomials of the symbolic dims, and for each kernel its
//! bindings, how to compute each uniform and the grid from the dims bound at run time
//! ([`Plan::launch_args`]), its tunables and estimated bytes/flops. A runtime executes a plan
//! without looking at the graph again ([`crate::exec::run_plan_interpreted`] does it on the
//! kernel-IR interpreter).
//!
//! # Partitioning
//!
//! Nodes are visited in topological order and each becomes one of:
//!
//! - **a buffer**: inputs and weights (i64 → i32 storage, bool → u32, f32 → the plan's
//!   element type), and every kernel output;
//! - **a view** of a buffer ([`View`]: offset and strides as polynomials): reshape, permute,
//!   expand and slice never move data. Kernels read views directly: clusters, reductions and
//!   concatenations through their stride uniforms, templates written for contiguous operands
//!   (matmul, attention, norms) through a *load remap* that turns the template's logical index
//!   into the view's physical one ([`rewrite::remap_loads`]). So split/merge-heads permutes,
//!   QKV slices and `[b,1,1,s]` masks cost nothing. A reshape no strides express (merging
//!   permuted axes, e.g. merge-heads) keeps the row-major order of the view it reshapes: remap
//!   readers read that view, anything else copies it first;
//! - **inlined**: an elementwise op (unary, binary, compare, where, cast) used once by another
//!   elementwise op or a reduction becomes part of its consumer's expression; scalar constants
//!   become literals; a gather is read in place by its consumer (the id picks the table row in
//!   the load remap; ids are clamped into the table, the runtime validates them) and an iota
//!   is computed in place (`start + index`);
//! - **a kernel**: clusters of elementwise ops (`kernels::elementwise::cluster`), last-axis
//!   reductions of any single axis through a permuted view (`reduce_rows`), matmul and fused
//!   matmul (`kernels::matmul::matmul`; a weight-side `permute [1,0]` is read as transposed
//!   B), attention (`kernels::attention::flash`, additive mask through its stride uniforms;
//!   the split-KV kernels `kernels::decode::split` + `kernels::decode::combine` when the
//!   query length is the constant 1; when it is symbolic, the partial kernel as the flash
//!   kernel's decode [`Variant`] and the combine as the next kernel, launched only then; the
//!   combine only when the keys are split more than once — one split's partial kernel writes
//!   the output itself),
//!   softmax, layer/RMS/group/instance/batch norm (`kernels::norm`; constant γ = 1, β = 0 →
//!   no affine buffers), and the lowering's own concat (several same-shaped concatenations
//!   whose operands are ready share one launch) and iota kernels ([`copy`]);
//! - **placed**: a concat whose parts are views of an emitted matmul's output and ready
//!   tensors is written by that matmul: its epilogue also stores the placed parts, extra
//!   z-workgroups copy the others ([`place`]);
//! - **a cache**: a graph output `concat(past, new)` whose `past` is a graph input read by
//!   nothing else (GPT-2's and the LLaMA family's `present = concat(past, new K/V)`) is one
//!   buffer with [`CACHE_CAP`] rows along the axis ([`PlanCache`]); only the new rows are
//!   written, in place (placed into the matmul that makes them, or by a copy kernel).
//!
//! Kernels whose nodes depend on weights and constants only (merged QKV weights, transposes)
//! form the **prepare** phase, run once after the weights are uploaded; the rest is the
//! **forward** phase, in launch order. Uniforms whose value is a known constant are folded into
//! the kernel as literals (the kernel is then renamed `<template>_<hash>`, equal code ⇒ equal
//! name), so only symbolic sizes remain uniforms.
//!
//! Anything else is [`CodegenError::Unsupported`](crate::CodegenError::Unsupported) naming the op and node (reductions over
//! several axes, symbolic attention head dims, matmuls with more than two batch dims and a
//! batched `b`, masks of attention with more than two batch dims, integer reductions and pows).
//!
//! # Modules
//!
//! - `plan`: the schema ([`Plan`], [`PlanKernel`], [`PlanBuffer`], [`UniformExpr`], …) and its
//!   run-time arithmetic ([`Plan::launch_args`], [`Plan::use_decode`]); `json`: plan.json.
//! - `buffers`: [`BufId`], the typed buffer id (an index into [`Plan::buffers`]), and the table
//!   that owns each buffer's name: while lowering, views, bindings and producers hold ids, and
//!   the kernels' bindings get their names once, when the plan is finished.
//! - `partition`: the driver (node by node, outputs, launch order) and what a node has become.
//! - `cluster`: elementwise expressions, gathers and iota, the cluster/reduction/iota kernels.
//! - `kernel`: the kernel builder (bindings, uniforms or literals, load remaps of views).
//! - `ops`: per-op template binding: matmul, attention, softmax, norms, concat.
//! - [`view`] (strided views), [`poly`] (sizes as polynomials), [`rewrite`] (kernel-IR
//!   rewrites), [`place`] (concat placement into a matmul), [`copy`] (concat and iota kernels).
//!
//! # Running a plan
//!
//! Allocate every [`Plan::buffers`] entry (`len()` elements of `elem` at the bound dims; a
//! zero-length buffer, e.g. an empty KV cache, still needs a binding: WebGPU cannot bind 0
//! bytes, so allocate at least 4), upload inputs (i64 as i32, bool as u32) and weights, fill
//! `Const` buffers, run the prepare kernels once, then per call the forward kernels in order
//! with [`Plan::launch_args`]; read the outputs. An attention kernel whose query length is
//! symbolic carries a decode variant ([`PlanKernel::decode`], a [`Variant`]: for
//! KV-cache decoding steps, the split-KV partial kernel, followed by its combine) with its own bindings, uniforms and grid:
//! when [`Plan::use_decode`] is true at the bound dims (the query length is 1), launch it
//! instead, with [`Plan::launch_args_for`]`(k, true, …)`. Both compute the same attention (up
//! to rounding), for any query length; the variant is the faster one for a single row.
//! `transfuse compile --emit` writes its source next to the main kernel's
//! ([`Plan::decode_file_name`]) and plan.json names it.
//!
//! A plan with [`Plan::caches`] also needs [`CACHE_CAP`] bound (≥ each cache output's rows);
//! a cache's input and output share its buffer, laid out with that many rows (host tensors
//! convert with [`PlanCache::pad`] / [`PlanCache::compact`]); a kernel with
//! [`PlanKernel::only_when`] or [`PlanKernel::only_split`] is launched only when
//! [`Plan::launched_at`] says so (the combine of a split-KV decode: when the query length is 1,
//! and when the keys are split more than once).
//!
//! Grid-stride kernels (norms, concat, placed copies) accept a clamped grid. WebGPU guarantees
//! 8 storage buffers per kernel: placement respects it; a cluster of more than 7 inputs (none
//! in BERT or GPT-2) needs an adapter with more.

mod buffers;
mod cluster;
pub mod copy;
mod json;
mod kernel;
mod ops;
mod partition;
pub mod place;
mod plan;
pub mod poly;
pub mod rewrite;
pub mod tuning;
pub mod view;

pub use buffers::BufId;
pub use partition::{lower, lower_tuned};
pub use plan::{
    Alias, BufferKind, LowerOptions, Phase, Plan, PlanBuffer, PlanCache, PlanIo, PlanKernel,
    Target, UniformExpr, Variant, CACHE_CAP,
};
pub use poly::Poly;
pub use view::View;
