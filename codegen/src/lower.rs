//! Lowering: an optimized [`Graph`] → a launch [`Plan`]: the kernels in launch order, the
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
//!   `kernels::attention::decode` when the query length is the constant 1, and as the kernel's
//!   decode [`Variant`] when it is symbolic),
//!   softmax, layer/RMS/group/instance/batch norm (`kernels::norm`; constant γ = 1, β = 0 →
//!   no affine buffers), and the lowering's own concat (several same-shaped concatenations
//!   whose operands are ready share one launch) and iota kernels ([`copy`]);
//! - **placed**: a concat whose parts are views of an emitted matmul's output and ready
//!   tensors (GPT-2's `present = concat(past, new K/V)`) is written by that matmul: its
//!   epilogue also stores the new rows, extra z-workgroups copy the past ones ([`place`]).
//!
//! Kernels whose nodes depend on weights and constants only (merged QKV weights, transposes)
//! form the **prepare** phase, run once after the weights are uploaded; the rest is the
//! **forward** phase, in launch order. Uniforms whose value is a known constant are folded into
//! the kernel as literals (the kernel is then renamed `<template>_<hash>`, equal code ⇒ equal
//! name), so only symbolic sizes remain uniforms.
//!
//! Anything else is [`CodegenError::Unsupported`] naming the op and node (reductions over
//! several axes, symbolic attention head dims, matmuls with more than two batch dims and a
//! batched `b`, masks of attention with more than two batch dims, integer reductions and pows).
//!
//! # Running a plan
//!
//! Allocate every [`Plan::buffers`] entry (`len()` elements of `elem` at the bound dims; a
//! zero-length buffer, e.g. an empty KV cache, still needs a binding: WebGPU cannot bind 0
//! bytes, so allocate at least 4), upload inputs (i64 as i32, bool as u32) and weights, fill
//! `Const` buffers, run the prepare kernels once, then per call the forward kernels in order
//! with [`Plan::launch_args`]; read the outputs. An attention kernel whose query length is
//! symbolic carries a decode variant ([`PlanKernel::decode`], a [`Variant`]: the one-workgroup-
//! per-query-row kernel, for KV-cache decoding steps) with its own bindings, uniforms and grid:
//! when [`Plan::use_decode`] is true at the bound dims (the query length is 1), launch it
//! instead, with [`Plan::launch_args_for`]`(k, true, …)`. Both compute the same attention (up
//! to rounding), for any query length; the variant is the faster one for a single row.
//! `transfuse compile --emit` writes its source next to the main kernel's
//! ([`Plan::decode_file_name`]) and plan.json names it.
//!
//! Grid-stride kernels (norms, concat, placed copies) accept a clamped grid. WebGPU guarantees
//! 8 storage buffers per kernel: placement respects it; a cluster of more than 7 inputs (none
//! in BERT or GPT-2) needs an adapter with more.

pub mod copy;
mod json;
pub mod place;
pub mod poly;
pub mod rewrite;
pub mod view;

use std::collections::HashMap;

use transfuse_ir::{
    Act, BinaryOp, Bindings, CmpOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Shape, UnaryOp,
};

pub use poly::Poly;
pub use view::View;

use crate::kernels::attention::{self, AttentionCfg, AttentionTunables};
use crate::kernels::elementwise::{self, EwExpr, EwInput, EwTunables, RowTunables};
use crate::kernels::matmul::{self, GemvTunables, MatMulConfig, MatMulTunables};
use crate::kernels::norm::{self, Affine, NormKind, Tune};
use crate::kernels::{Generated, Limits};
use crate::kir::*;
use crate::CodegenError;

/// Which printer the plan's kernels are meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// CUDA C through NVRTC.
    Cuda,
    /// WGSL (WebGPU).
    Wgsl,
}

impl Target {
    /// `cuda` or `wgsl`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Cuda => "cuda",
            Target::Wgsl => "wgsl",
        }
    }

    /// The target by name.
    pub fn from_name(s: &str) -> Option<Target> {
        match s {
            "cuda" => Some(Target::Cuda),
            "wgsl" => Some(Target::Wgsl),
            _ => None,
        }
    }

    /// Source file extension (`cu`, `wgsl`).
    pub fn ext(self) -> &'static str {
        match self {
            Target::Cuda => "cu",
            Target::Wgsl => "wgsl",
        }
    }

    /// The target's default limits.
    pub fn limits(self) -> Limits {
        match self {
            Target::Cuda => Limits::cuda(),
            Target::Wgsl => Limits::webgpu(),
        }
    }

    /// Prints a kernel for this target.
    pub fn print(self, k: &Kernel) -> Result<String, CodegenError> {
        match self {
            Target::Cuda => crate::cuda::print(k),
            Target::Wgsl => crate::wgsl::print(k),
        }
    }
}

/// What to lower for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowerOptions {
    /// Storage type of float tensors (F32, F16, BF16; BF16 is CUDA only).
    pub elem: Elem,
    /// The target's limits (threads, shared memory), which the tunables respect.
    pub limits: Limits,
    /// The printer.
    pub target: Target,
}

impl LowerOptions {
    /// `target` with its default limits and storage `elem`.
    pub fn new(target: Target, elem: Elem) -> LowerOptions {
        LowerOptions {
            elem,
            limits: target.limits(),
            target,
        }
    }
}

/// What a buffer holds.
#[derive(Clone, Debug, PartialEq)]
pub enum BufferKind {
    /// A graph input, uploaded each call.
    Input,
    /// A weight, uploaded once.
    Weight,
    /// Computed once from weights by the prepare kernels.
    Derived,
    /// A graph output.
    Output,
    /// An intermediate of the forward pass.
    Temp,
    /// Filled with this value once (scalar operands a template needs as a buffer).
    Const(f64),
}

impl BufferKind {
    /// Printable name.
    pub fn name(&self) -> &'static str {
        match self {
            BufferKind::Input => "input",
            BufferKind::Weight => "weight",
            BufferKind::Derived => "derived",
            BufferKind::Output => "output",
            BufferKind::Temp => "temp",
            BufferKind::Const(_) => "const",
        }
    }
}

/// A buffer of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanBuffer {
    /// Name (graph input/weight/output name, `t<node>` for intermediates).
    pub name: String,
    /// Storage type.
    pub elem: Elem,
    /// The graph dtype it holds.
    pub dtype: DType,
    /// Shape (its size is the product).
    pub shape: Shape,
    /// What it holds.
    pub kind: BufferKind,
}

impl PlanBuffer {
    /// Elements.
    pub fn len(&self) -> Poly {
        Poly::product(&self.shape)
    }

    /// Bytes.
    pub fn bytes(&self) -> Poly {
        self.len().scale(i64::from(elem_bytes(self.elem)))
    }
}

/// A view node (reshape/permute/expand/slice) and the buffer region it denotes.
#[derive(Clone, Debug, PartialEq)]
pub struct Alias {
    /// The IR node.
    pub node: NodeId,
    /// Its shape.
    pub shape: Shape,
    /// The strided view it is; for a reshape no strides express (merging permuted axes), the
    /// view whose row-major element order it shares (`strided` false): kernels that read it
    /// through a load remap use that order, others copy it first.
    pub view: View,
    /// False for such a reshape.
    pub strided: bool,
}

/// How a uniform's value is computed from the bound dims.
#[derive(Clone, Debug, PartialEq)]
pub enum UniformExpr {
    /// A polynomial of the dims.
    Poly(Poly),
    /// Entry `index` of [`norm::mask_uniforms`] for these shapes.
    SoftmaxMask {
        /// The softmax input's shape.
        scores: Shape,
        /// The mask's shape (contiguous in the kernel's view).
        mask: Shape,
        /// Which of the seven values.
        index: usize,
    },
}

impl std::fmt::Display for UniformExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UniformExpr::Poly(p) => write!(f, "{p}"),
            UniformExpr::SoftmaxMask {
                scores,
                mask,
                index,
            } => write!(
                f,
                "mask_uniforms({}, {})[{index}]",
                transfuse_ir::shape_string(scores),
                transfuse_ir::shape_string(mask)
            ),
        }
    }
}

/// When a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Once, after the weights are uploaded (weight-only computations).
    Prepare,
    /// Every forward pass.
    Forward,
}

/// One kernel launch of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanKernel {
    /// The kernel, its grid (in terms of its uniforms) and tunables.
    pub gen: Generated,
    /// The IR nodes it computes.
    pub nodes: Vec<NodeId>,
    /// Their op names.
    pub ops: Vec<String>,
    /// Plan buffer bound to each kernel buffer parameter, in parameter order.
    pub bindings: Vec<String>,
    /// How to compute each uniform, in `gen.kernel.uniforms` order.
    pub uniforms: Vec<UniformExpr>,
    /// Prepare (once) or forward.
    pub phase: Phase,
    /// Estimated global-memory bytes moved (each distinct element once).
    pub bytes: Poly,
    /// Estimated floating-point operations.
    pub flops: Poly,
    /// The decode variant of an attention kernel whose query length is symbolic (None for
    /// every other kernel): see [`Plan::use_decode`].
    pub decode: Option<Box<Variant>>,
}

impl PlanKernel {
    /// The entry-point name.
    pub fn entry(&self) -> &str {
        &self.gen.kernel.name
    }

    /// The decode variant's entry-point name, if there is one.
    pub fn decode_entry(&self) -> Option<&str> {
        self.decode.as_deref().map(|v| v.gen.kernel.name.as_str())
    }

    /// What is launched: the decode variant's kernel, bindings and uniform expressions when
    /// `decode` (None without a variant), else the main kernel's.
    pub fn launched(&self, decode: bool) -> Option<(&Generated, &[String], &[UniformExpr])> {
        if decode {
            let v = self.decode.as_deref()?;
            Some((&v.gen, &v.bindings, &v.uniforms))
        } else {
            Some((&self.gen, &self.bindings, &self.uniforms))
        }
    }
}

/// An alternative kernel for the same nodes, launched instead of the main one when `when_one`
/// evaluates to 1 (attention's query length: the decode kernel).
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// The kernel, its grid (in terms of its uniforms) and tunables.
    pub gen: Generated,
    /// Plan buffer bound to each kernel buffer parameter, in parameter order.
    pub bindings: Vec<String>,
    /// How to compute each uniform, in `gen.kernel.uniforms` order.
    pub uniforms: Vec<UniformExpr>,
    /// The variant replaces the main kernel when this evaluates to 1.
    pub when_one: Poly,
}

/// A graph input, weight or output and its buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanIo {
    /// Graph name.
    pub name: String,
    /// Plan buffer.
    pub buffer: String,
    /// Shape.
    pub shape: Shape,
    /// Graph dtype.
    pub dtype: DType,
}

/// A launch plan (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Printer the kernels are for.
    pub target: Target,
    /// Storage type of float tensors.
    pub elem: Elem,
    /// Every buffer.
    pub buffers: Vec<PlanBuffer>,
    /// Views of buffers, by IR node (documentation: kernels already carry their strides).
    pub aliases: Vec<Alias>,
    /// Kernels in launch order: the prepare phase first.
    pub kernels: Vec<PlanKernel>,
    /// Graph inputs.
    pub inputs: Vec<PlanIo>,
    /// Weights the plan reads.
    pub weights: Vec<PlanIo>,
    /// Graph outputs.
    pub outputs: Vec<PlanIo>,
}

fn plan_err(msg: impl Into<String>) -> CodegenError {
    CodegenError::Plan(msg.into())
}

impl Plan {
    /// The buffer called `name`.
    pub fn buffer(&self, name: &str) -> Option<&PlanBuffer> {
        self.buffers.iter().find(|b| b.name == name)
    }

    /// Elements of buffer `name` under `b`.
    pub fn buffer_len(&self, name: &str, b: &Bindings) -> Result<usize, CodegenError> {
        self.buffer(name)
            .ok_or_else(|| plan_err(format!("no buffer `{name}`")))?
            .len()
            .eval_usize(b)
    }

    /// The forward-phase kernels.
    pub fn forward(&self) -> impl Iterator<Item = &PlanKernel> {
        self.kernels.iter().filter(|k| k.phase == Phase::Forward)
    }

    /// Σ estimated bytes of the forward kernels.
    pub fn forward_bytes(&self) -> Poly {
        self.forward().fold(Poly::zero(), |a, k| a.add(&k.bytes))
    }

    /// Σ estimated flops of the forward kernels.
    pub fn forward_flops(&self) -> Poly {
        self.forward().fold(Poly::zero(), |a, k| a.add(&k.flops))
    }

    /// The least global-memory traffic of one forward: every input, weight (or derived weight)
    /// the forward kernels read and every output, once.
    pub fn lower_bound_bytes(&self) -> Poly {
        let mut read: Vec<&str> = self
            .forward()
            .flat_map(|k| k.bindings.iter().map(String::as_str))
            .collect();
        read.sort_unstable();
        read.dedup();
        self.buffers
            .iter()
            .filter(|b| match b.kind {
                BufferKind::Input | BufferKind::Weight | BufferKind::Derived => {
                    read.contains(&b.name.as_str())
                }
                BufferKind::Output => true,
                _ => false,
            })
            .fold(Poly::zero(), |a, b| a.add(&b.bytes()))
    }

    /// Source file name of kernel `i`: `NN_entry.cu` / `.wgsl` (NN zero-padded to the count).
    pub fn file_name(&self, i: usize) -> String {
        self.file_name_of(i, self.kernels[i].entry())
    }

    /// Source file name of kernel `i`'s decode variant, if it has one: `NN_entry.cu` / `.wgsl`
    /// with the variant's entry (same `NN` as the main kernel).
    pub fn decode_file_name(&self, i: usize) -> Option<String> {
        let entry = self.kernels[i].decode_entry()?;
        Some(self.file_name_of(i, entry))
    }

    fn file_name_of(&self, i: usize, entry: &str) -> String {
        let width = self
            .kernels
            .len()
            .saturating_sub(1)
            .to_string()
            .len()
            .max(2);
        format!("{i:0width$}_{entry}.{}", self.target.ext())
    }

    fn kernel(&self, k: usize) -> Result<&PlanKernel, CodegenError> {
        self.kernels
            .get(k)
            .ok_or_else(|| plan_err(format!("no kernel {k}")))
    }

    /// Whether kernel `k` is launched as its decode variant for the dims `b`: it has one and
    /// the variant's `when_one` (the query length) evaluates to 1.
    pub fn use_decode(&self, k: usize, b: &Bindings) -> Result<bool, CodegenError> {
        match &self.kernel(k)?.decode {
            Some(v) => Ok(v.when_one.eval(b)? == 1),
            None => Ok(false),
        }
    }

    /// Uniform values (in kernel order) and grid of kernel `k`'s main kernel for the dims `b`.
    pub fn launch_args(
        &self,
        k: usize,
        b: &Bindings,
    ) -> Result<(Vec<u32>, [u32; 3]), CodegenError> {
        self.launch_args_for(k, false, b)
    }

    /// Uniform values (in kernel order) and grid of kernel `k` for the dims `b`: of its decode
    /// variant when `decode` (an error if it has none), else of the main kernel.
    pub fn launch_args_for(
        &self,
        k: usize,
        decode: bool,
        b: &Bindings,
    ) -> Result<(Vec<u32>, [u32; 3]), CodegenError> {
        let pk = self.kernel(k)?;
        let (gen, _, uniforms) = pk.launched(decode).ok_or_else(|| {
            plan_err(format!("kernel {k} ({}) has no decode variant", pk.entry()))
        })?;
        let kname = &gen.kernel.name;
        let kerr = |msg: String| CodegenError::Kernel {
            kernel: kname.to_string(),
            msg,
        };
        let mut vals = Vec::with_capacity(uniforms.len());
        for (u, name) in uniforms.iter().zip(&gen.kernel.uniforms) {
            let v: i64 = match u {
                UniformExpr::Poly(p) => p.eval(b)?,
                UniformExpr::SoftmaxMask {
                    scores,
                    mask,
                    index,
                } => {
                    let s = transfuse_ir::eval_shape(scores, b)
                        .map_err(|e| kerr(format!("uniform `{name}`: {e}")))?;
                    let m = transfuse_ir::eval_shape(mask, b)
                        .map_err(|e| kerr(format!("uniform `{name}`: {e}")))?;
                    let us = norm::mask_uniforms(&s, &m).ok_or_else(|| {
                        kerr(format!(
                            "mask {m:?} does not broadcast to scores {s:?} in two runs"
                        ))
                    })?;
                    i64::from(us[*index])
                }
            };
            vals.push(
                u32::try_from(v)
                    .map_err(|_| kerr(format!("uniform `{name}` = {v} does not fit u32")))?,
            );
        }
        let names = &gen.kernel.uniforms;
        let lookup = |n: &str| {
            names
                .iter()
                .position(|u| u == n)
                .map(|i| u64::from(vals[i]))
        };
        let mut grid = [0u32; 3];
        for (a, d) in gen.grid.iter().enumerate() {
            let g = d
                .eval(&lookup)
                .ok_or_else(|| kerr(format!("grid axis {a} refers to an unknown uniform")))?;
            grid[a] =
                u32::try_from(g).map_err(|_| kerr(format!("grid axis {a} = {g} exceeds u32")))?;
        }
        Ok((vals, grid))
    }
}

// ---- The lowering -----------------------------------------------------------------------------

/// Where a gathered id comes from.
#[derive(Clone, Debug, PartialEq)]
enum Ids {
    View(View),
    Iota { start: Dim },
}

/// `table[ids]`, read in place.
#[derive(Clone, Debug, PartialEq)]
struct GatherSrc {
    table: View,
    ids: Ids,
    ids_shape: Shape,
    shape: Shape,
}

/// A value an elementwise expression reads.
#[derive(Clone, Debug, PartialEq)]
enum Leaf {
    View(View, DType),
    Gather(Box<GatherSrc>, DType),
    Iota {
        start: Dim,
        len: Dim,
    },
    /// `base` in row-major order, seen with another shape.
    Linear(View, Shape, DType),
}

impl Leaf {
    fn shape(&self) -> Shape {
        match self {
            Leaf::View(v, _) => v.shape.clone(),
            Leaf::Linear(_, s, _) => s.clone(),
            Leaf::Gather(g, _) => g.shape.clone(),
            Leaf::Iota { len, .. } => vec![len.clone()],
        }
    }
}

/// An elementwise expression not yet materialised.
#[derive(Clone, Debug, PartialEq)]
enum Tree {
    Leaf(Leaf),
    Const(f64, DType),
    Un(UnaryOp, Box<Tree>, DType),
    Bin(BinaryOp, Box<Tree>, Box<Tree>, DType),
    Cmp(CmpOp, Box<Tree>, Box<Tree>),
    Where(Box<Tree>, Box<Tree>, Box<Tree>, DType),
    Cast(DType, Box<Tree>),
}

impl Tree {
    fn dtype(&self) -> DType {
        match self {
            Tree::Leaf(Leaf::View(_, d) | Leaf::Gather(_, d) | Leaf::Linear(_, _, d)) => *d,
            Tree::Leaf(Leaf::Iota { .. }) => DType::I64,
            Tree::Const(_, d) | Tree::Un(_, _, d) | Tree::Bin(_, _, _, d) => *d,
            Tree::Where(_, _, _, d) | Tree::Cast(d, _) => *d,
            Tree::Cmp(..) => DType::Bool,
        }
    }

    fn ops(&self) -> i64 {
        match self {
            Tree::Leaf(_) | Tree::Const(..) => 0,
            Tree::Un(_, a, _) | Tree::Cast(_, a) => 1 + a.ops(),
            Tree::Bin(_, a, b, _) | Tree::Cmp(_, a, b) => 1 + a.ops() + b.ops(),
            Tree::Where(c, a, b, _) => 1 + c.ops() + a.ops() + b.ops(),
        }
    }

    fn leaves(&self, out: &mut Vec<Leaf>) {
        match self {
            Tree::Leaf(l) => {
                if !out.contains(l) {
                    out.push(l.clone());
                }
            }
            Tree::Const(..) => {}
            Tree::Un(_, a, _) | Tree::Cast(_, a) => a.leaves(out),
            Tree::Bin(_, a, b, _) | Tree::Cmp(_, a, b) => {
                a.leaves(out);
                b.leaves(out);
            }
            Tree::Where(c, a, b, _) => {
                c.leaves(out);
                a.leaves(out);
                b.leaves(out);
            }
        }
    }

    /// The expression over `leaves` (values: f32, i32 for i64, bool).
    fn ew(&self, leaves: &[Leaf]) -> Result<EwExpr, String> {
        let i32c = |v: f64| EwExpr::c(v as f32).cast(Elem::I32);
        Ok(match self {
            Tree::Leaf(l) => {
                let i = leaves.iter().position(|x| x == l).expect("collected leaf");
                let x = EwExpr::input(i);
                if self.dtype() == DType::Bool {
                    x.cast(Elem::Bool)
                } else {
                    x
                }
            }
            Tree::Const(v, d) => match d {
                DType::F32 => EwExpr::c(*v as f32),
                DType::I64 => i32c(*v),
                DType::Bool => EwExpr::c(if *v != 0.0 { 1.0 } else { 0.0 }).cast(Elem::Bool),
            },
            Tree::Un(op, a, d) => {
                let x = a.ew(leaves)?;
                let un = |o: UnOp| x.clone().un(o);
                match op {
                    UnaryOp::Neg => un(UnOp::Neg),
                    UnaryOp::Exp => un(UnOp::Exp),
                    UnaryOp::Log => un(UnOp::Log),
                    UnaryOp::Sqrt => un(UnOp::Sqrt),
                    UnaryOp::Rsqrt => un(UnOp::Rsqrt),
                    UnaryOp::Tanh => un(UnOp::Tanh),
                    UnaryOp::Erf => un(UnOp::Erf),
                    UnaryOp::Recip => un(UnOp::Recip),
                    UnaryOp::Sigmoid => un(UnOp::Sigmoid),
                    UnaryOp::Sin => un(UnOp::Sin),
                    UnaryOp::Cos => un(UnOp::Cos),
                    UnaryOp::Not => un(UnOp::Not),
                    UnaryOp::Relu => x.bin(BinOp::Max, EwExpr::c(0.0)),
                    UnaryOp::Abs if *d == DType::I64 => {
                        EwExpr::select(x.clone().bin(BinOp::Lt, i32c(0.0)), -x.clone(), x)
                    }
                    UnaryOp::Abs => un(UnOp::Abs),
                }
            }
            Tree::Bin(op, a, b, d) => {
                let (x, y) = (a.ew(leaves)?, b.ew(leaves)?);
                match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Max => x.bin(BinOp::Max, y),
                    BinaryOp::Min => x.bin(BinOp::Min, y),
                    BinaryOp::Pow if *d != DType::F32 => {
                        return Err("integer pow".into());
                    }
                    BinaryOp::Pow => {
                        let c = match **b {
                            Tree::Const(e, _) => Some(e),
                            _ => None,
                        };
                        if c == Some(1.0) {
                            x
                        } else if c == Some(2.0) {
                            x.clone() * x
                        } else if c == Some(0.5) {
                            x.un(UnOp::Sqrt)
                        } else {
                            // x^y = e^(y·ln x): powf up to rounding for x > 0; NaN for x < 0,
                            // where powf gives a value for integer y.
                            (y * x.un(UnOp::Log)).un(UnOp::Exp)
                        }
                    }
                }
            }
            Tree::Cmp(op, a, b) => {
                let (mut x, mut y) = (a.ew(leaves)?, b.ew(leaves)?);
                if a.dtype() == DType::Bool {
                    x = x.cast(Elem::U32);
                    y = y.cast(Elem::U32);
                }
                let o = match op {
                    CmpOp::Eq => BinOp::Eq,
                    CmpOp::Ne => BinOp::Ne,
                    CmpOp::Lt => BinOp::Lt,
                    CmpOp::Le => BinOp::Le,
                    CmpOp::Gt => BinOp::Gt,
                    CmpOp::Ge => BinOp::Ge,
                };
                x.bin(o, y)
            }
            Tree::Where(c, a, b, _) => EwExpr::select(c.ew(leaves)?, a.ew(leaves)?, b.ew(leaves)?),
            Tree::Cast(to, a) => {
                let x = a.ew(leaves)?;
                if a.dtype() == *to {
                    x
                } else {
                    x.cast(match to {
                        DType::F32 => Elem::F32,
                        DType::I64 => Elem::I32,
                        DType::Bool => Elem::Bool,
                    })
                }
            }
        })
    }
}

/// What a node has become.
#[derive(Clone, Debug)]
enum Val {
    View(View),
    /// A reshape no strides express: `base`'s elements in row-major order, with `shape`.
    Linear {
        base: View,
        shape: Shape,
    },
    Scalar(f64, DType),
    Tree(Tree),
    Gather(GatherSrc),
    Iota {
        start: Dim,
        len: Dim,
    },
}

/// A per-channel (or per-feature) parameter of a norm.
enum Param {
    Const(f64),
    /// The logical `[C]` view.
    View(View),
}

/// A kernel being assembled: the generated kernel plus its bindings and uniform values.
struct Kb {
    gen: Generated,
    binds: HashMap<String, String>,
    uvals: HashMap<String, UniformExpr>,
    nodes: Vec<NodeId>,
    bytes: Poly,
    flops: Poly,
}

impl Kb {
    fn new(gen: Generated, nodes: Vec<NodeId>) -> Kb {
        Kb {
            gen,
            binds: HashMap::new(),
            uvals: HashMap::new(),
            nodes,
            bytes: Poly::zero(),
            flops: Poly::zero(),
        }
    }

    fn bind(&mut self, param: &str, buf: &str) {
        self.binds.insert(param.to_string(), buf.to_string());
    }

    /// Sets a template uniform.
    fn set(&mut self, u: &str, p: Poly) {
        self.uvals.insert(u.to_string(), UniformExpr::Poly(p));
    }

    /// An expression for `p`: a literal when constant, else a new uniform `name`.
    fn value(&mut self, name: String, p: &Poly) -> Expr {
        if let Some(c) = p.as_const().and_then(|c| u32::try_from(c).ok()) {
            return u(c);
        }
        if !self.gen.kernel.uniforms.contains(&name) {
            self.gen.kernel.uniforms.push(name.clone());
        }
        self.uvals
            .insert(name.clone(), UniformExpr::Poly(p.clone()));
        uni(&name)
    }

    /// The physical index of logical (row-major) index `L` of view `v`, as a function of `L`.
    fn phys(&mut self, tag: &str, v: &View) -> impl Fn(Expr) -> Expr {
        let axes = v.merged_axes();
        let n = axes.len();
        let mut inner = vec![Poly::one(); n];
        for a in (0..n.saturating_sub(1)).rev() {
            inner[a] = inner[a + 1].mul(&axes[a + 1].0);
        }
        let mut terms: Vec<(Option<Expr>, Option<Expr>, Option<Expr>)> = vec![];
        for a in 0..n {
            let (size, stride) = &axes[a];
            if stride.is_zero() {
                continue;
            }
            let div = (!inner[a].is(1)).then(|| self.value(format!("{tag}_n{a}"), &inner[a]));
            let md = (a > 0).then(|| self.value(format!("{tag}_d{a}"), size));
            let st = (!stride.is(1)).then(|| self.value(format!("{tag}_s{a}"), stride));
            terms.push((div, md, st));
        }
        let off = (!v.offset.is_zero()).then(|| self.value(format!("{tag}_o"), &v.offset));
        move |l: Expr| {
            let mut acc: Option<Expr> = None;
            for (div, md, st) in &terms {
                let mut e = l.clone();
                if let Some(d) = div {
                    e = e / d.clone();
                }
                if let Some(m) = md {
                    e = e % m.clone();
                }
                if let Some(s) = st {
                    e = e * s.clone();
                }
                acc = Some(match acc {
                    None => e,
                    Some(a) => a + e,
                });
            }
            match (acc, &off) {
                (None, None) => u(0),
                (None, Some(o)) => o.clone(),
                (Some(a), None) => a,
                (Some(a), Some(o)) => a + o.clone(),
            }
        }
    }

    /// Makes the template read parameter `param` (written for a contiguous operand of
    /// `view.shape`) from `view`.
    fn remap(&mut self, param: &str, view: &View) {
        self.bind(param, &view.buf);
        if view.is_plain() {
            return;
        }
        let f = self.phys(&format!("v_{param}"), view);
        let p = param.to_string();
        rewrite::remap_loads(&mut self.gen.kernel, param, &|i| load(&p, f(i)));
    }

    /// A read-only buffer parameter the template did not have.
    fn add_buffer(&mut self, param: &str, elem: Elem, buf: &str) {
        self.gen.kernel.buffers.push(Buffer {
            name: param.to_string(),
            elem,
            access: Access::Read,
        });
        self.bind(param, buf);
    }

    /// Finishes the kernel: folds the uniforms whose value is a constant into literals, drops
    /// the parameters no longer read or written, names it `<base>_<hash of its code>`; returns
    /// the bindings and uniform expressions, in parameter and uniform order.
    fn finish(&mut self, base: &str) -> Result<(Vec<String>, Vec<UniformExpr>), CodegenError> {
        let consts: Vec<(String, u32)> = self
            .gen
            .kernel
            .uniforms
            .iter()
            .filter_map(|u| match self.uvals.get(u) {
                Some(UniformExpr::Poly(p)) => p
                    .as_const()
                    .and_then(|c| u32::try_from(c).ok())
                    .map(|c| (u.clone(), c)),
                _ => None,
            })
            .collect();
        for (u, c) in consts {
            rewrite::fold_uniform(&mut self.gen, &u, c);
        }
        let used = rewrite::used_buffers(&self.gen.kernel);
        self.gen.kernel.buffers.retain(|b| used.contains(&b.name));
        let mut bindings = vec![];
        for b in &self.gen.kernel.buffers {
            bindings.push(
                self.binds.get(&b.name).cloned().ok_or_else(|| {
                    plan_err(format!("{base}: parameter `{}` is not bound", b.name))
                })?,
            );
        }
        let mut uniforms = vec![];
        for u in &self.gen.kernel.uniforms {
            uniforms.push(
                self.uvals
                    .get(u)
                    .cloned()
                    .ok_or_else(|| plan_err(format!("{base}: uniform `{u}` has no value")))?,
            );
        }
        self.gen.kernel.name = String::new();
        let h = fnv(&format!("{:?}", self.gen.kernel));
        self.gen.kernel.name = format!("{base}_{h:08x}");
        Ok((bindings, uniforms))
    }
}

fn fnv(s: &str) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h ^ (h >> 32)) as u32
}

fn is_ew(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Cast { .. }
    )
}

/// What [`Lower::matmul_kb`] binds, shared by a matmul's kernel and its GEMV variant.
struct MatMulOperands {
    /// Template uniform values.
    u: Vec<(&'static str, Poly)>,
    /// `a`, read in row-major order.
    a: View,
    /// `b` as the template reads it (transposed when that is its memory order).
    b_logical: View,
    /// Output columns.
    ndim: Dim,
    /// Output shape.
    oshape: Shape,
}

struct Lower<'a> {
    g: &'a Graph,
    o: &'a LowerOptions,
    weight_only: Vec<bool>,
    inline: Vec<bool>,
    vals: Vec<Option<Val>>,
    done: Vec<bool>,
    buffers: Vec<PlanBuffer>,
    kernels: Vec<PlanKernel>,
    aliases: Vec<Alias>,
    /// Buffer → index of the kernel that writes it.
    producer: HashMap<String, usize>,
    /// Matmul kernels (by index) and what [`place`] needs to know of them.
    matmuls: HashMap<usize, place::MatMulInfo>,
}

impl<'a> Lower<'a> {
    fn unsupported(&self, id: NodeId, msg: impl Into<String>) -> CodegenError {
        CodegenError::Unsupported {
            op: self.g.node(id).op.name(),
            node: id.0,
            msg: msg.into(),
        }
    }

    fn elem_of(&self, d: DType) -> Elem {
        match d {
            DType::F32 => self.o.elem,
            DType::I64 => Elem::I32,
            DType::Bool => Elem::U32,
        }
    }

    fn buf_elem(&self, name: &str) -> Elem {
        self.buffers
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.elem)
            .expect("known buffer")
    }

    fn add_buffer(&mut self, name: String, dtype: DType, shape: Shape, kind: BufferKind) -> View {
        let mut name = name;
        if self.buffers.iter().any(|b| b.name == name) {
            let base = name.clone();
            let mut k = 1;
            while self.buffers.iter().any(|b| b.name == name) {
                name = format!("{base}_{k}");
                k += 1;
            }
        }
        let v = View::contiguous(&name, &shape);
        self.buffers.push(PlanBuffer {
            name,
            elem: self.elem_of(dtype),
            dtype,
            shape,
            kind,
        });
        v
    }

    /// The output buffer of node `id`'s kernel.
    fn out_buffer(&mut self, id: NodeId) -> View {
        let n = self.g.node(id);
        let (name, kind) = if self.weight_only[id.index()] {
            (format!("w{}", id.0), BufferKind::Derived)
        } else {
            (format!("t{}", id.0), BufferKind::Temp)
        };
        self.add_buffer(name, n.dtype, n.shape.clone(), kind)
    }

    fn const_buffer(&mut self, id: NodeId, v: f64, dtype: DType) -> View {
        let name = format!("c{}_{}", id.0, self.buffers.len());
        self.add_buffer(name, dtype, vec![], BufferKind::Const(v))
    }

    /// Node `id` as a view of a buffer, materialising it if needed.
    fn view_of(&mut self, id: NodeId) -> Result<View, CodegenError> {
        let val = self.vals[id.index()]
            .clone()
            .expect("operands precede users");
        let shape = self.g.node(id).shape.clone();
        let v = match val {
            Val::View(v) => return Ok(v),
            Val::Scalar(c, d) => {
                let v = self.const_buffer(id, c, d);
                return Ok(v.expand(&shape).expect("scalars broadcast"));
            }
            Val::Tree(t) => self.cluster(vec![id], &t, id)?,
            Val::Gather(gs) => {
                let d = self.g.node(id).dtype;
                self.cluster(vec![id], &Tree::Leaf(Leaf::Gather(Box::new(gs), d)), id)?
            }
            Val::Iota { start, len } => self.iota(id, &start, &len)?,
            Val::Linear { base, shape } => {
                let d = self.g.node(id).dtype;
                self.cluster(vec![id], &Tree::Leaf(Leaf::Linear(base, shape, d)), id)?
            }
        };
        self.vals[id.index()] = Some(Val::View(v.clone()));
        Ok(v)
    }

    /// Node `id` as an expression operand.
    fn tree_of(&self, id: NodeId) -> Tree {
        let d = self.g.node(id).dtype;
        match self.vals[id.index()]
            .clone()
            .expect("operands precede users")
        {
            Val::View(v) => Tree::Leaf(Leaf::View(v, d)),
            Val::Scalar(c, d) => Tree::Const(c, d),
            Val::Tree(t) => t,
            Val::Gather(g) => Tree::Leaf(Leaf::Gather(Box::new(g), d)),
            Val::Iota { start, len } => Tree::Leaf(Leaf::Iota { start, len }),
            Val::Linear { base, shape } => Tree::Leaf(Leaf::Linear(base, shape, d)),
        }
    }

    /// Node `id` for a consumer that reads it through a load remap in row-major order: a view,
    /// or the view a non-strided reshape reorders.
    fn lin_of(&mut self, id: NodeId) -> Result<View, CodegenError> {
        match self.vals[id.index()].clone() {
            Some(Val::Linear { base, .. }) => Ok(base),
            _ => self.view_of(id),
        }
    }

    /// Node `id` as a view if it is one already or a chain of view ops over views (no kernel).
    fn try_view(&self, id: NodeId) -> Option<View> {
        match &self.vals[id.index()] {
            Some(Val::View(v)) => return Some(v.clone()),
            Some(_) => return None,
            None => {}
        }
        let n = self.g.node(id);
        let x = || self.try_view(n.inputs[0]);
        match &n.op {
            Op::Reshape { shape } => x()?.reshape(shape),
            Op::Permute { perm } => Some(x()?.permute(perm)),
            Op::Expand { shape } => x()?.expand(shape),
            Op::Slice { axis, start, end } => Some(x()?.slice(*axis, start, end)),
            _ => None,
        }
    }

    fn push(&mut self, kb: Kb, base: &str) -> Result<(), CodegenError> {
        self.push_with(kb, base, None)
    }

    /// [`Self::push`] with a decode variant (already finished).
    fn push_with(
        &mut self,
        mut kb: Kb,
        base: &str,
        decode: Option<Box<Variant>>,
    ) -> Result<(), CodegenError> {
        let (bindings, uniforms) = kb.finish(base)?;
        let phase = if kb.nodes.iter().all(|n| self.weight_only[n.index()]) {
            Phase::Prepare
        } else {
            Phase::Forward
        };
        let ops = kb.nodes.iter().map(|n| self.g.node(*n).op.name()).collect();
        for (b, buf) in kb.gen.kernel.buffers.iter().zip(&bindings) {
            if b.access == Access::ReadWrite {
                self.producer.insert(buf.clone(), self.kernels.len());
            }
        }
        self.kernels.push(PlanKernel {
            gen: kb.gen,
            nodes: kb.nodes,
            ops,
            bindings,
            uniforms,
            phase,
            bytes: kb.bytes,
            flops: kb.flops,
            decode,
        });
        Ok(())
    }

    // ---- Elementwise clusters and reductions ----

    /// The strides of `leaf` over an index space of shape `shape` (broadcast, then `perm`).
    fn leaf_strides(
        &self,
        leaf: &Leaf,
        shape: &Shape,
        id: NodeId,
    ) -> Result<Vec<Poly>, CodegenError> {
        let v = match leaf {
            Leaf::View(v, _) => v.clone(),
            _ => View::contiguous("", &leaf.shape()),
        };
        v.expand(shape).map(|e| e.strides).ok_or_else(|| {
            self.unsupported(
                id,
                format!(
                    "{} does not broadcast to {}",
                    transfuse_ir::shape_string(&leaf.shape()),
                    transfuse_ir::shape_string(shape)
                ),
            )
        })
    }

    fn leaf_elem(&self, l: &Leaf) -> Elem {
        match l {
            Leaf::View(v, _) => self.buf_elem(&v.buf),
            Leaf::Gather(g, _) => self.buf_elem(&g.table.buf),
            Leaf::Linear(b, _, _) => self.buf_elem(&b.buf),
            Leaf::Iota { .. } => Elem::I32,
        }
    }

    /// Binds leaf `i` (parameter `in{i}`) of a cluster or reduction, with its remap and bytes.
    fn bind_leaf(
        &mut self,
        kb: &mut Kb,
        i: usize,
        leaf: &Leaf,
        id: NodeId,
    ) -> Result<(), CodegenError> {
        let param = format!("in{i}");
        match leaf {
            Leaf::View(v, _) => {
                kb.bind(&param, &v.buf);
                if !v.offset.is_zero() {
                    let off = kb.value(format!("v_{param}_o"), &v.offset);
                    let p = param.clone();
                    rewrite::remap_loads(&mut kb.gen.kernel, &param, &|x| {
                        load(&p, x + off.clone())
                    });
                }
                let eb = i64::from(elem_bytes(self.buf_elem(&v.buf)));
                kb.bytes = kb.bytes.add(&v.footprint().scale(eb));
            }
            Leaf::Iota { start, .. } => {
                let s = kb.value(format!("v_{param}_start"), &Poly::dim(start));
                rewrite::remap_loads(&mut kb.gen.kernel, &param, &|x| s.clone() + x);
            }
            Leaf::Gather(g, _) => self.bind_gather(kb, &param, g, id)?,
            Leaf::Linear(base, _, _) => {
                let eb = i64::from(elem_bytes(self.buf_elem(&base.buf)));
                kb.bytes = kb.bytes.add(&base.footprint().scale(eb));
                kb.remap(&param, base);
            }
        }
        Ok(())
    }

    /// Parameter `param` reads `table[ids]` at the gather's logical index.
    fn bind_gather(
        &mut self,
        kb: &mut Kb,
        param: &str,
        g: &GatherSrc,
        id: NodeId,
    ) -> Result<(), CodegenError> {
        let t = &g.table;
        if t.rank() < 1 {
            return Err(self.unsupported(id, "gather from a rank-0 table"));
        }
        kb.bind(param, &t.buf);
        let rest = View {
            buf: t.buf.clone(),
            shape: t.shape[1..].to_vec(),
            strides: t.strides[1..].to_vec(),
            offset: t.offset.clone(),
        };
        let width = Poly::product(&rest.shape);
        let tag = format!("v_{param}");
        let w = kb.value(format!("{tag}_w"), &width);
        let rs = kb.value(format!("{tag}_rs"), &t.strides[0]);
        let vmax = kb.value(
            format!("{tag}_vmax"),
            &Poly::dim(&t.shape[0]).sub(&Poly::one()),
        );
        let col = kb.phys(&format!("{tag}_c"), &rest);
        let eb = i64::from(elem_bytes(self.buf_elem(&t.buf)));
        let rows = Poly::product(&g.ids_shape);
        kb.bytes = kb.bytes.add(&rows.mul(&width).scale(eb));
        let id_of: Box<dyn Fn(Expr) -> Expr> = match &g.ids {
            Ids::View(iv) => {
                let ip = format!("{param}_ids");
                kb.add_buffer(&ip, Elem::I32, &iv.buf);
                kb.bytes = kb.bytes.add(&iv.footprint().scale(4));
                let f = kb.phys(&format!("{tag}_i"), iv);
                Box::new(move |row| {
                    load(&ip, f(row))
                        .apply2(BinOp::Max, Expr::I32(0))
                        .cast(Elem::U32)
                        .min(vmax.clone())
                })
            }
            Ids::Iota { start } => {
                let s = kb.value(format!("{tag}_start"), &Poly::dim(start));
                Box::new(move |row| (s.clone() + row).min(vmax.clone()))
            }
        };
        let p = param.to_string();
        rewrite::remap_loads(&mut kb.gen.kernel, param, &|l| {
            let row = l.clone() / w.clone();
            let c = l % w.clone();
            load(&p, id_of(row) * rs.clone() + col(c))
        });
        Ok(())
    }

    /// A cluster computing `tree` into the output buffer of `out_node`.
    fn cluster(
        &mut self,
        nodes: Vec<NodeId>,
        tree: &Tree,
        out_node: NodeId,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(out_node);
        let (shape, dtype) = (n.shape.clone(), n.dtype);
        let mut leaves = vec![];
        tree.leaves(&mut leaves);
        let expr = tree
            .ew(&leaves)
            .map_err(|m| self.unsupported(out_node, m))?;
        let r = shape.len();
        let inputs: Vec<EwInput> = leaves
            .iter()
            .map(|l| EwInput::new(self.leaf_elem(l), r))
            .collect();
        let out_elem = self.elem_of(dtype);
        let gen = elementwise::cluster(
            "ew",
            r,
            &inputs,
            &expr,
            out_elem,
            &EwTunables::default_for(&self.o.limits),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, nodes);
        for (a, d) in shape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        for (i, leaf) in leaves.iter().enumerate() {
            let st = self.leaf_strides(leaf, &shape, out_node)?;
            for (a, s) in st.into_iter().enumerate() {
                kb.set(&format!("s{i}_{a}"), s);
            }
            self.bind_leaf(&mut kb, i, leaf, out_node)?;
        }
        let out = self.out_buffer(out_node);
        kb.bind("out", &out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(i64::from(elem_bytes(out_elem))));
        kb.flops = len.scale(tree.ops());
        self.push(kb, "ew")?;
        Ok(out)
    }

    fn reduce(&mut self, id: NodeId, op: ReduceOp, axes: &[usize]) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let x = n.inputs[0];
        let xshape = self.g.node(x).shape.clone();
        let [axis] = axes else {
            return Err(self.unsupported(id, "reductions over several axes are not lowered"));
        };
        let tree = self.tree_of(x);
        if tree.dtype() != DType::F32 {
            return Err(self.unsupported(id, "reductions of integers are not lowered"));
        }
        let r = xshape.len();
        let perm: Vec<usize> = (0..r).filter(|a| a != axis).chain([*axis]).collect();
        let pshape: Shape = perm.iter().map(|&a| xshape[a].clone()).collect();
        let mut leaves = vec![];
        tree.leaves(&mut leaves);
        let expr = tree.ew(&leaves).map_err(|m| self.unsupported(id, m))?;
        let inputs: Vec<EwInput> = leaves
            .iter()
            .map(|l| EwInput::new(self.leaf_elem(l), r))
            .collect();
        let out_elem = self.elem_of(n.dtype);
        let gen = elementwise::reduce_rows(
            "reduce",
            op,
            r,
            &inputs,
            &expr,
            out_elem,
            &RowTunables::default_for(&self.o.limits),
            &self.o.limits,
        )?;
        let mut nodes = vec![id];
        if matches!(self.vals[x.index()], Some(Val::Tree(_))) {
            nodes.insert(0, x);
        }
        let mut kb = Kb::new(gen, nodes);
        for (a, d) in pshape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        for (i, leaf) in leaves.iter().enumerate() {
            let st = self.leaf_strides(leaf, &xshape, id)?;
            for (a, &p) in perm.iter().enumerate() {
                kb.set(&format!("s{i}_{a}"), st[p].clone());
            }
            self.bind_leaf(&mut kb, i, leaf, id)?;
        }
        let out = self.out_buffer(id);
        kb.bind("out", &out.buf);
        let len = Poly::product(&xshape);
        kb.bytes = kb
            .bytes
            .add(&Poly::product(&n.shape).scale(i64::from(elem_bytes(out_elem))));
        kb.flops = len.scale(tree.ops() + 1);
        self.push(kb, &format!("reduce_{}", op.name()))?;
        Ok(out)
    }

    fn iota(&mut self, id: NodeId, start: &Dim, len: &Dim) -> Result<View, CodegenError> {
        let gen = copy::iota("iota", &self.o.limits)?;
        let mut kb = Kb::new(gen, vec![id]);
        kb.set("start", Poly::dim(start));
        kb.set("len", Poly::dim(len));
        let out = self.out_buffer(id);
        kb.bind("out", &out.buf);
        kb.bytes = Poly::dim(len).scale(4);
        self.push(kb, "iota")?;
        Ok(out)
    }

    // ---- Templates ----

    fn matmul(
        &mut self,
        id: NodeId,
        act: Act,
        bias: bool,
        residual: bool,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let oshape = n.shape.clone();
        let g = self.g;
        let ashape = g.node(ins[0]).shape.clone();
        let bshape = g.node(ins[1]).shape.clone();
        let a = self.lin_of(ins[0])?;
        let (b, b_strided) = match self.vals[ins[1].index()].clone() {
            Some(Val::Linear { base, .. }) => (base, false),
            _ => (self.view_of(ins[1])?, true),
        };
        let (ra, rb) = (ashape.len(), bshape.len());
        let kdim = ashape[ra - 1].clone();
        let ndim = bshape[rb - 1].clone();
        let ob = &oshape[..oshape.len() - 2];
        // b read transposed when that is its memory order.
        let mut bperm: Vec<usize> = (0..rb).collect();
        bperm.swap(rb - 2, rb - 1);
        let bt_view = b.permute(&bperm);
        let transposed = b_strided && bt_view.is_dense() && !b.is_dense();
        let (b_logical, b_shape) = if transposed {
            (bt_view, bperm.iter().map(|&p| bshape[p].clone()).collect())
        } else {
            (b.clone(), bshape.clone())
        };
        let mut u: Vec<(&'static str, Poly)> =
            vec![("k", Poly::dim(&kdim)), ("n", Poly::dim(&ndim))];
        if rb == 2 {
            // Every batch dim of a folds into m.
            u.push(("m", Poly::product(&ashape[..ra - 1])));
            for x in ["batch0", "batch1"] {
                u.push((x, Poly::one()));
            }
            for x in ["a_s0", "a_s1", "b_s0", "b_s1"] {
                u.push((x, Poly::zero()));
            }
        } else {
            if ob.len() > 2 {
                return Err(self.unsupported(id, "more than two batch dims with a batched b"));
            }
            u.push(("m", Poly::dim(&ashape[ra - 2])));
            let nb = ob.len();
            let batch = |j: usize| {
                if j + nb >= 2 {
                    Poly::dim(&ob[j + nb - 2])
                } else {
                    Poly::one()
                }
            };
            u.push(("batch0", batch(0)));
            u.push(("batch1", batch(1)));
            // Logical (row-major) batch strides of each operand, 0 where it broadcasts.
            let strides = |shape: &Shape| -> [Poly; 2] {
                let st = view::contiguous_strides(shape);
                let vb = shape.len() - 2;
                let mut out = [Poly::zero(), Poly::zero()];
                for (j, o) in out.iter_mut().enumerate() {
                    // Output batch axis for level j.
                    let Some(oa) = (j + nb).checked_sub(2) else {
                        continue;
                    };
                    let Some(va) = (oa + vb).checked_sub(nb) else {
                        continue;
                    };
                    if oa < nb && va < vb && !shape[va].is(1) {
                        *o = st[va].clone();
                    }
                }
                out
            };
            let [a0, a1] = strides(&ashape);
            let [b0, b1] = strides(&b_shape);
            u.extend([("a_s0", a0), ("a_s1", a1), ("b_s0", b0), ("b_s1", b1)]);
        }
        let cfg = MatMulConfig::plain(self.o.elem)
            .transposed_b(transposed)
            .epilogue(act, bias, residual);
        let limits = &self.o.limits;
        let gemv = || matmul::gemv(&cfg, &GemvTunables::default_for(&cfg, limits), limits);
        // One row (decoding) takes the GEMV; a symbolic row count gets it as a variant.
        let rows = u.iter().find(|(x, _)| *x == "m").expect("m").1.clone();
        let (gen, base, variant) = match rows.as_const() {
            Some(1) => (gemv()?, cfg.name("gemv"), None),
            known => {
                let tiled =
                    matmul::matmul(&cfg, &MatMulTunables::default_for(&cfg, limits), limits)?;
                let variant = if known.is_none() { Some(gemv()?) } else { None };
                (tiled, cfg.name("matmul"), variant)
            }
        };
        let ops = MatMulOperands {
            u,
            a,
            b_logical,
            ndim: ndim.clone(),
            oshape: oshape.clone(),
        };
        let mut kb = self.matmul_kb(id, &cfg, gen, &ops)?;
        let mut dkb = variant
            .map(|gen| self.matmul_kb(id, &cfg, gen, &ops))
            .transpose()?;
        let out = self.out_buffer(id);
        let eb = i64::from(elem_bytes(self.o.elem));
        let olen = Poly::product(&oshape);
        for k in std::iter::once(&mut kb).chain(dkb.as_mut()) {
            k.bind("out", &out.buf);
            k.bytes = k.bytes.add(&b.footprint().scale(eb)).add(&olen.scale(eb));
        }
        let mut m_batch = Poly::one();
        let mut m_batch_only = Poly::one();
        for (name, p) in &ops.u {
            if matches!(*name, "m" | "batch0" | "batch1") {
                m_batch = m_batch.mul(p);
            }
            if matches!(*name, "batch0" | "batch1") {
                m_batch_only = m_batch_only.mul(p);
            }
        }
        kb.flops = m_batch
            .mul(&Poly::dim(&ndim))
            .mul(&Poly::dim(&kdim))
            .scale(2)
            .add(&olen.scale(
                i64::from(bias) + i64::from(residual) + if act == Act::Identity { 0 } else { 8 },
            ));
        let decode = match dkb {
            Some(mut dkb) => {
                let (bindings, uniforms) = dkb.finish(&cfg.name("gemv"))?;
                Some(Box::new(Variant {
                    gen: dkb.gen,
                    bindings,
                    uniforms,
                    when_one: rows,
                }))
            }
            None => None,
        };
        self.matmuls.insert(
            self.kernels.len(),
            place::MatMulInfo {
                node: id,
                batch: m_batch_only,
                base: base.clone(),
                decode_base: cfg.name("gemv"),
                jobs: 0,
            },
        );
        self.push_with(kb, &base, decode)?;
        Ok(out)
    }

    /// The kernel of matmul node `id` from template `gen` (tiled or GEMV: same buffers and
    /// uniforms), everything bound but `out`, with the bytes of `a`, bias and residual.
    fn matmul_kb(
        &mut self,
        id: NodeId,
        cfg: &MatMulConfig,
        gen: Generated,
        ops: &MatMulOperands,
    ) -> Result<Kb, CodegenError> {
        let ins = self.g.node(id).inputs.clone();
        let mut kb = Kb::new(gen, vec![id]);
        for (name, p) in &ops.u {
            kb.set(name, p.clone());
        }
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.remap("a", &ops.a);
        kb.remap("b", &ops.b_logical);
        kb.bytes = ops.a.footprint().scale(eb);
        let mut next = 2;
        if cfg.bias {
            let v = self.view_of(ins[next])?;
            next += 1;
            let lead = v.shape.iter().take_while(|d| d.is(1)).count();
            let stripped = v.reshape(&v.shape[lead..]).expect("dropping size-1 axes");
            let bv = stripped
                .expand(std::slice::from_ref(&ops.ndim))
                .ok_or_else(|| self.unsupported(id, "the bias varies along rows"))?;
            kb.bytes = kb.bytes.add(&bv.footprint().scale(eb));
            kb.remap("bias", &bv);
        }
        if cfg.residual {
            let v = self.view_of(ins[next])?;
            let rv = v
                .expand(&ops.oshape)
                .expect("inference checked the residual");
            kb.bytes = kb.bytes.add(&rv.footprint().scale(eb));
            kb.remap("residual", &rv);
        }
        Ok(kb)
    }

    fn attention(
        &mut self,
        id: NodeId,
        scale: f64,
        causal: bool,
        window: Option<usize>,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let oshape = n.shape.clone();
        let g = self.g;
        let (qs, vs) = (g.node(ins[0]).shape.clone(), g.node(ins[2]).shape.clone());
        let r = qs.len();
        let known = |d: &Dim, what: &str| {
            d.as_known()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.unsupported(id, format!("symbolic {what} {d}")))
        };
        let d = known(&qs[r - 1], "head dim")?;
        let dv = known(&vs[r - 1], "value head dim")?;
        let window = window
            .map(|w| u32::try_from(w).map_err(|_| self.unsupported(id, "window exceeds u32")))
            .transpose()?;
        let cfg = AttentionCfg {
            elem: self.o.elem,
            head_dim: d,
            dv,
            scale: scale as f32,
            causal,
            window,
            mask: ins.len() == 4,
        };
        let limits = &self.o.limits;
        let decode = || {
            attention::decode(
                &cfg,
                &AttentionTunables::decode_default_for(&cfg, limits),
                limits,
            )
        };
        // A query length of 1 takes the decode kernel; a symbolic one gets it as a variant.
        let sq = qs[r - 2].clone();
        let (gen, base, variant) = match sq.as_known() {
            Some(1) => (decode()?, cfg.kernel_name(true), None),
            known => {
                let flash =
                    attention::flash(&cfg, &AttentionTunables::default_for(&cfg, limits), limits)?;
                let variant = if known.is_none() {
                    Some(decode()?)
                } else {
                    None
                };
                (flash, cfg.kernel_name(false), variant)
            }
        };
        let mut kb = self.attention_kb(id, &cfg, gen)?;
        let mut dkb = variant
            .map(|gen| self.attention_kb(id, &cfg, gen))
            .transpose()?;
        let out = self.out_buffer(id);
        let eb = i64::from(elem_bytes(self.o.elem));
        for k in std::iter::once(&mut kb).chain(dkb.as_mut()) {
            k.bind("out", &out.buf);
            k.bytes = k.bytes.add(&Poly::product(&oshape).scale(eb));
        }
        let decode = match dkb {
            Some(mut dkb) => {
                let (bindings, uniforms) = dkb.finish(&cfg.kernel_name(true))?;
                Some(Box::new(Variant {
                    gen: dkb.gen,
                    bindings,
                    uniforms,
                    when_one: Poly::dim(&sq),
                }))
            }
            None => None,
        };
        self.push_with(kb, &base, decode)?;
        Ok(out)
    }

    /// The kernel of attention node `id` from template `gen` (flash or decode: same buffers and
    /// uniforms), everything bound but `out`, with its bytes (but the output's) and flops.
    fn attention_kb(
        &mut self,
        id: NodeId,
        cfg: &AttentionCfg,
        gen: Generated,
    ) -> Result<Kb, CodegenError> {
        let g = self.g;
        let ins = g.node(id).inputs.clone();
        let (qs, ks) = (g.node(ins[0]).shape.clone(), g.node(ins[1]).shape.clone());
        let q = self.lin_of(ins[0])?;
        let k = self.lin_of(ins[1])?;
        let v = self.lin_of(ins[2])?;
        let r = qs.len();
        let mut kb = Kb::new(gen, vec![id]);
        let (sq, sk) = (qs[r - 2].clone(), ks[r - 2].clone());
        let bh = Poly::product(&qs[..r - 2]);
        let heads = if r >= 3 {
            Poly::dim(&qs[r - 3])
        } else {
            Poly::one()
        };
        kb.set("bh", bh.clone());
        kb.set("heads", heads);
        kb.set("sq", Poly::dim(&sq));
        kb.set("sk", Poly::dim(&sk));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = q
            .footprint()
            .add(&k.footprint())
            .add(&v.footprint())
            .scale(eb);
        kb.remap("q", &q);
        kb.remap("k", &k);
        kb.remap("v", &v);
        if cfg.mask {
            let m = self.view_of(ins[3])?;
            let mut scores = qs[..r - 1].to_vec();
            scores.push(sk.clone());
            let e = m.expand(&scores).expect("inference checked the mask");
            let st = &e.strides;
            let (sb, sh) = match r {
                2 => (Poly::zero(), Poly::zero()),
                3 => (st[0].clone(), Poly::zero()),
                4 => (st[0].clone(), st[1].clone()),
                _ => return Err(self.unsupported(id, "a mask with more than two batch dims")),
            };
            kb.set("mask_sb", sb);
            kb.set("mask_sh", sh);
            kb.set("mask_sq", st[r - 2].clone());
            kb.set("mask_sk", st[r - 1].clone());
            kb.bind("mask", &m.buf);
            if !m.offset.is_zero() {
                let off = kb.value("v_mask_o".into(), &m.offset);
                rewrite::remap_loads(&mut kb.gen.kernel, "mask", &|x| {
                    load("mask", x + off.clone())
                });
            }
            kb.bytes = kb.bytes.add(&e.footprint().scale(eb));
        }
        kb.flops = bh
            .mul(&Poly::dim(&sq))
            .mul(&Poly::dim(&sk))
            .scale(2 * i64::from(cfg.head_dim + cfg.dv) + 5);
        Ok(kb)
    }

    /// Operand `p` of a norm over `x_shape` as a per-`axis` parameter.
    fn param(
        &mut self,
        id: NodeId,
        p: NodeId,
        x_shape: &Shape,
        axis: usize,
    ) -> Result<Param, CodegenError> {
        if let Some(Val::Scalar(c, _)) = self.vals[p.index()] {
            return Ok(Param::Const(c));
        }
        let v = self.view_of(p)?;
        let e = v.expand(x_shape).expect("inference checked the parameter");
        if e.strides
            .iter()
            .enumerate()
            .any(|(a, s)| a != axis && !s.is_zero())
        {
            return Err(self.unsupported(
                id,
                format!(
                    "parameter {} varies along more than axis {axis}",
                    transfuse_ir::shape_string(&v.shape)
                ),
            ));
        }
        Ok(Param::View(View {
            buf: e.buf,
            shape: vec![x_shape[axis].clone()],
            strides: vec![e.strides[axis].clone()],
            offset: e.offset,
        }))
    }

    /// Binds a norm parameter buffer `name` (constants get a one-element buffer).
    fn bind_param(&mut self, kb: &mut Kb, id: NodeId, name: &str, p: Param, len: &Dim) {
        let v = match p {
            Param::View(v) => v,
            Param::Const(c) => {
                let b = self.const_buffer(id, c, DType::F32);
                b.expand(std::slice::from_ref(len)).expect("scalar")
            }
        };
        kb.bytes = kb
            .bytes
            .add(&v.footprint().scale(i64::from(elem_bytes(self.o.elem))));
        kb.remap(name, &v);
    }

    fn affine(params: &[&Param], identity: &[f64]) -> Affine {
        let plain = params
            .iter()
            .zip(identity)
            .all(|(p, want)| matches!(p, Param::Const(c) if c == want));
        if plain {
            Affine::None
        } else {
            Affine::Vector
        }
    }

    fn row_norm(&mut self, id: NodeId, kind: NormKind, eps: f64) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let last = shape.len() - 1;
        let mut params = vec![self.param(id, ins[1], &shape, last)?];
        if kind == NormKind::Layer {
            params.push(self.param(id, ins[2], &shape, last)?);
        }
        let affine = Self::affine(&params.iter().collect::<Vec<_>>(), &[1.0, 0.0]);
        let cfg = norm::NormCfg {
            elem: self.o.elem,
            kind,
            eps: eps as f32,
            affine,
            residual: false,
        };
        let gen = norm::norm(
            &cfg,
            &Tune::default_for(&cfg, &self.o.limits),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, vec![id]);
        kb.set("rows", Poly::product(&shape[..last]));
        kb.set("cols", Poly::dim(&shape[last]));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if affine != Affine::None {
            for (name, p) in ["gamma", "beta"].into_iter().zip(params) {
                self.bind_param(&mut kb, id, name, p, &shape[last]);
            }
        }
        let out = self.out_buffer(id);
        kb.bind("y", &out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(8);
        self.push(
            kb,
            match kind {
                NormKind::Layer => "layer_norm",
                NormKind::Rms => "rms_norm",
            },
        )?;
        Ok(out)
    }

    fn softmax(&mut self, id: NodeId, scale: f64) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let cfg = norm::SoftmaxCfg {
            elem: self.o.elem,
            scale: scale as f32,
            mask: ins.len() == 2,
        };
        let gen = norm::softmax(
            &cfg,
            &Tune::default_for(&cfg, &self.o.limits),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, vec![id]);
        let last = shape.len() - 1;
        kb.set("rows", Poly::product(&shape[..last]));
        kb.set("cols", Poly::dim(&shape[last]));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if cfg.mask {
            let m = self.view_of(ins[1])?;
            for (index, u) in norm::MASK_UNIFORMS.iter().enumerate() {
                kb.uvals.insert(
                    u.to_string(),
                    UniformExpr::SoftmaxMask {
                        scores: shape.clone(),
                        mask: m.shape.clone(),
                        index,
                    },
                );
            }
            kb.bytes = kb.bytes.add(&m.footprint().scale(eb));
            kb.remap("mask", &m);
        }
        let out = self.out_buffer(id);
        kb.bind("y", &out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(5);
        self.push(kb, "softmax")?;
        Ok(out)
    }

    fn channel_norm(&mut self, id: NodeId) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let op = n.op.clone();
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let p1 = self.param(id, ins[1], &shape, 1)?;
        let p2 = self.param(id, ins[2], &shape, 1)?;
        let nn = Poly::dim(&shape[0]);
        let c = Poly::dim(&shape[1]);
        let spatial = Poly::product(&shape[2..]);
        let lim = self.o.limits;
        let (gen, uvals, base, names): (Generated, Vec<(&str, Poly)>, &str, [&str; 2]) = match op {
            Op::GroupNorm { eps, .. } | Op::InstanceNorm { eps } => {
                let instance = matches!(op, Op::InstanceNorm { .. });
                let affine = Self::affine(&[&p1, &p2], &[1.0, 0.0]);
                let cfg = norm::GroupNormCfg {
                    elem: self.o.elem,
                    eps: eps.0 as f32,
                    affine,
                    instance,
                };
                let gen = norm::group_norm(&cfg, &Tune::default_for(&cfg, &lim), &lim)?;
                let u = if instance {
                    vec![
                        ("blocks", nn.mul(&c)),
                        ("channels", c.clone()),
                        ("spatial", spatial.clone()),
                    ]
                } else {
                    let groups = groups_of(&op) as i64;
                    let cpg = c
                        .as_const()
                        .map(|c| c / groups)
                        .ok_or_else(|| self.unsupported(id, "symbolic channel count"))?;
                    vec![
                        ("blocks", nn.scale(groups)),
                        ("groups", Poly::konst(groups)),
                        ("channels_per_group", Poly::konst(cpg)),
                        ("spatial", spatial.clone()),
                    ]
                };
                let names = if affine == Affine::None {
                    ["", ""]
                } else {
                    ["gamma", "beta"]
                };
                (
                    gen,
                    u,
                    if instance {
                        "instance_norm"
                    } else {
                        "group_norm"
                    },
                    names,
                )
            }
            Op::BatchNorm => {
                let cfg = norm::BatchNormCfg { elem: self.o.elem };
                let gen = norm::batch_norm(&cfg, &Tune::default_for(&cfg, &lim), &lim)?;
                let u = vec![
                    ("n", Poly::product(&shape)),
                    ("channels", c.clone()),
                    ("spatial", spatial.clone()),
                ];
                (gen, u, "batch_norm", ["scale", "shift"])
            }
            _ => unreachable!("channel norms only"),
        };
        let mut kb = Kb::new(gen, vec![id]);
        for (name, p) in uvals {
            kb.set(name, p);
        }
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if !names[0].is_empty() {
            let cd = shape[1].clone();
            self.bind_param(&mut kb, id, names[0], p1, &cd);
            self.bind_param(&mut kb, id, names[1], p2, &cd);
        }
        let out = self.out_buffer(id);
        kb.bind("y", &out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(8);
        self.push(kb, base)?;
        Ok(out)
    }

    /// A concat, sharing its launch with later same-shaped concats whose operands are ready.
    fn concat(&mut self, id: NodeId, axis: usize) -> Result<(), CodegenError> {
        if self.place_concat(id, axis)? {
            return Ok(());
        }
        let n = self.g.node(id);
        let parts = n.inputs.len();
        let shape = n.shape.clone();
        let lens: Vec<Dim> = n
            .inputs
            .iter()
            .map(|i| self.g.node(*i).shape[axis].clone())
            .collect();
        let mut jobs: Vec<(NodeId, Vec<View>)> = vec![];
        let mut views = vec![];
        for &i in &n.inputs.clone() {
            views.push(self.view_of(i)?);
        }
        jobs.push((id, views));
        let max_jobs = (8 / (parts + 1)).clamp(1, 4);
        for (m, mn) in self.g.nodes().skip(id.index() + 1) {
            if jobs.len() >= max_jobs {
                break;
            }
            let same = matches!(mn.op, Op::Concat { axis: a } if a == axis)
                && mn.shape == shape
                && mn.dtype == n.dtype
                && mn.inputs.len() == parts
                && self.weight_only[m.index()] == self.weight_only[id.index()]
                && !self.done[m.index()]
                && mn
                    .inputs
                    .iter()
                    .zip(&lens)
                    .all(|(i, l)| self.g.node(*i).shape[axis] == *l);
            if !same {
                continue;
            }
            let vs: Option<Vec<View>> = mn.inputs.iter().map(|i| self.try_view(*i)).collect();
            if let Some(vs) = vs {
                jobs.push((m, vs));
            }
        }
        let elem = self.elem_of(n.dtype);
        let gen = copy::concat(
            "concat",
            elem,
            shape.len(),
            axis,
            parts,
            jobs.len(),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, jobs.iter().map(|j| j.0).collect());
        kb.set("total", Poly::product(&shape));
        for (a, d) in shape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        let mut beg = Poly::zero();
        for (p, len) in lens.iter().enumerate() {
            if p > 0 {
                kb.set(&format!("beg{p}"), beg.clone());
            }
            beg = beg.add(&Poly::dim(len));
        }
        let eb = i64::from(elem_bytes(elem));
        let len = Poly::product(&shape);
        for (j, (m, vs)) in jobs.iter().enumerate() {
            for (p, v) in vs.iter().enumerate() {
                for (a, s) in v.strides.iter().enumerate() {
                    kb.set(&format!("s{j}_{p}_{a}"), s.clone());
                }
                kb.set(&format!("o{j}_{p}"), v.offset.clone());
                kb.bind(&format!("in{j}_{p}"), &v.buf);
            }
            let out = self.out_buffer(*m);
            kb.bind(&format!("out{j}"), &out.buf);
            kb.bytes = kb.bytes.add(&len.scale(2 * eb));
            self.vals[m.index()] = Some(Val::View(out));
            self.done[m.index()] = true;
        }
        self.push(kb, "concat")
    }

    fn node(&mut self, id: NodeId) -> Result<(), CodegenError> {
        if self.done[id.index()] {
            return Ok(());
        }
        let n = self.g.node(id);
        let op = n.op.clone();
        let ins = n.inputs.clone();
        let (shape, dtype) = (n.shape.clone(), n.dtype);
        let val = match &op {
            Op::Input { name, .. } => {
                Val::View(self.add_buffer(name.clone(), dtype, shape, BufferKind::Input))
            }
            Op::Weight { name, .. } => {
                Val::View(self.add_buffer(name.clone(), dtype, shape, BufferKind::Weight))
            }
            Op::Constant { value, dtype } => Val::Scalar(value.0, *dtype),
            Op::Iota { start, len } => Val::Iota {
                start: start.clone(),
                len: len.clone(),
            },
            Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => {
                if let Some(Val::Scalar(c, d)) = self.vals[ins[0].index()] {
                    if !matches!(op, Op::Slice { .. }) {
                        self.vals[id.index()] = Some(Val::Scalar(c, d));
                        return Ok(());
                    }
                }
                if let Op::Reshape { shape } = &op {
                    let x = match self.vals[ins[0].index()].clone() {
                        Some(Val::Linear { base, .. }) => base,
                        _ => self.view_of(ins[0])?,
                    };
                    let (val, view, strided) = match x.reshape(shape) {
                        Some(v) => (Val::View(v.clone()), v, true),
                        // Not a strided view: remap readers use `x`'s order, others copy.
                        None => (
                            Val::Linear {
                                base: x.clone(),
                                shape: shape.clone(),
                            },
                            x,
                            false,
                        ),
                    };
                    self.aliases.push(Alias {
                        node: id,
                        shape: shape.clone(),
                        view,
                        strided,
                    });
                    self.vals[id.index()] = Some(val);
                    return Ok(());
                }
                let x = self.view_of(ins[0])?;
                let v = match &op {
                    Op::Permute { perm } => x.permute(perm),
                    Op::Expand { shape } => x.expand(shape).expect("inference checked expand"),
                    Op::Slice { axis, start, end } => x.slice(*axis, start, end),
                    _ => unreachable!(),
                };
                self.aliases.push(Alias {
                    node: id,
                    shape: v.shape.clone(),
                    view: v.clone(),
                    strided: true,
                });
                Val::View(v)
            }
            op if is_ew(op) => {
                let t: Vec<Tree> = ins.iter().map(|i| self.tree_of(*i)).collect();
                let b = |t: &Tree| Box::new(t.clone());
                let tree = match op {
                    Op::Unary(u) => Tree::Un(*u, b(&t[0]), dtype),
                    Op::Binary(o) => Tree::Bin(*o, b(&t[0]), b(&t[1]), dtype),
                    Op::Compare(c) => Tree::Cmp(*c, b(&t[0]), b(&t[1])),
                    Op::Where => Tree::Where(b(&t[0]), b(&t[1]), b(&t[2]), dtype),
                    Op::Cast { dtype } => Tree::Cast(*dtype, b(&t[0])),
                    _ => unreachable!(),
                };
                if self.inline[id.index()] {
                    Val::Tree(tree)
                } else {
                    let mut nodes: Vec<NodeId> = vec![];
                    self.inlined_into(id, &mut nodes);
                    Val::View(self.cluster(nodes, &tree, id)?)
                }
            }
            Op::Gather => {
                let table = self.view_of(ins[0])?;
                let ids = match self.vals[ins[1].index()].clone() {
                    Some(Val::Iota { start, .. }) => Ids::Iota { start },
                    _ => Ids::View(self.view_of(ins[1])?),
                };
                Val::Gather(GatherSrc {
                    table,
                    ids,
                    ids_shape: self.g.node(ins[1]).shape.clone(),
                    shape,
                })
            }
            Op::Reduce { op: r, axes, .. } => Val::View(self.reduce(id, *r, axes)?),
            Op::MatMul => Val::View(self.matmul(id, Act::Identity, false, false)?),
            Op::FusedMatMul {
                act,
                bias,
                residual,
            } => Val::View(self.matmul(id, *act, *bias, *residual)?),
            Op::Attention {
                scale,
                causal,
                window,
            } => Val::View(self.attention(id, scale.0, *causal, *window)?),
            Op::LayerNorm { eps } => Val::View(self.row_norm(id, NormKind::Layer, eps.0)?),
            Op::RmsNorm { eps } => Val::View(self.row_norm(id, NormKind::Rms, eps.0)?),
            Op::Softmax { scale } => Val::View(self.softmax(id, scale.0)?),
            Op::GroupNorm { .. } | Op::InstanceNorm { .. } | Op::BatchNorm => {
                Val::View(self.channel_norm(id)?)
            }
            Op::Concat { axis } => return self.concat(id, *axis),
            op => return Err(self.unsupported(id, format!("no kernel for `{}`", op.name()))),
        };
        self.vals[id.index()] = Some(val);
        Ok(())
    }

    /// `id` and the producers inlined into it (transitively), in node order.
    fn inlined_into(&self, id: NodeId, out: &mut Vec<NodeId>) {
        for i in &self.g.node(id).inputs {
            if self.inline[i.index()] {
                self.inlined_into(*i, out);
            }
        }
        out.push(id);
        out.sort_unstable();
        out.dedup();
    }

    /// Renames buffer `old` to `new` everywhere.
    fn rename(&mut self, old: &str, new: &str) {
        for b in &mut self.buffers {
            if b.name == old {
                b.name = new.to_string();
            }
        }
        for k in &mut self.kernels {
            let variant = k.decode.as_deref_mut().map(|v| &mut v.bindings);
            for b in k.bindings.iter_mut().chain(variant.into_iter().flatten()) {
                if b == old {
                    *b = new.to_string();
                }
            }
        }
        for a in &mut self.aliases {
            if a.view.buf == old {
                a.view.buf = new.to_string();
            }
        }
    }
}

fn groups_of(op: &Op) -> usize {
    match op {
        Op::GroupNorm { groups, .. } => *groups,
        _ => 0,
    }
}

/// Lowers an optimized graph to a launch plan (see the module docs).
pub fn lower(g: &Graph, opts: &LowerOptions) -> Result<Plan, CodegenError> {
    if !matches!(opts.elem, Elem::F32 | Elem::F16 | Elem::BF16) {
        return Err(plan_err(format!(
            "float storage must be f32, f16 or bf16, not {:?}",
            opts.elem
        )));
    }
    if opts.target == Target::Wgsl && opts.elem == Elem::BF16 {
        return Err(plan_err(
            "bf16 storage is CUDA only (WGSL has no bf16 type); use f16 or f32 for wgsl",
        ));
    }
    let len = g.len();
    let uses = g.use_counts();
    let mut users: Vec<Vec<NodeId>> = vec![vec![]; len];
    let mut weight_only = vec![false; len];
    for (id, n) in g.nodes() {
        for i in &n.inputs {
            users[i.index()].push(id);
        }
        weight_only[id.index()] = match n.op {
            Op::Weight { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Iota { .. } => false,
            _ => n.inputs.iter().all(|i| weight_only[i.index()]),
        };
    }
    let mut is_output = vec![false; len];
    for (_, o) in g.outputs() {
        is_output[o.index()] = true;
    }
    let inline = (0..len)
        .map(|i| {
            let n = g.node(NodeId(i as u32));
            is_ew(&n.op) && uses[i] == 1 && !is_output[i] && users[i].len() == 1 && {
                let u = &g.node(users[i][0]).op;
                is_ew(u) || matches!(u, Op::Reduce { .. })
            }
        })
        .collect();
    let mut l = Lower {
        g,
        o: opts,
        weight_only,
        inline,
        vals: vec![None; len],
        done: vec![false; len],
        buffers: vec![],
        kernels: vec![],
        aliases: vec![],
        producer: HashMap::new(),
        matmuls: HashMap::new(),
    };
    // Inputs and weights first, so a concat can take over a later one's operands.
    for (id, n) in g.nodes() {
        if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
            l.node(id)?;
            l.done[id.index()] = true;
        }
    }
    for (id, _) in g.nodes() {
        l.node(id)?;
    }
    // Outputs: a kernel's own buffer is renamed after the output; anything else is copied.
    let mut outputs = vec![];
    for (name, id) in g.outputs() {
        if l.buffers.iter().any(|b| &b.name == name) {
            return Err(plan_err(format!(
                "output `{name}` has the name of another buffer"
            )));
        }
        let v = l.view_of(*id)?;
        let n = g.node(*id);
        let own = l
            .buffers
            .iter()
            .position(|b| b.name == v.buf && b.kind == BufferKind::Temp && b.len() == v.len());
        let buf = match own {
            Some(i) if v.is_plain() => {
                let old = l.buffers[i].name.clone();
                l.rename(&old, name);
                l.buffers[i].kind = BufferKind::Output;
                name.clone()
            }
            _ => {
                let t = Tree::Leaf(Leaf::View(v, n.dtype));
                let out = l.cluster(vec![*id], &t, *id)?;
                // The copy's buffer is the output.
                l.rename(&out.buf, name);
                if let Some(b) = l.buffers.iter_mut().find(|b| &b.name == name) {
                    b.kind = BufferKind::Output;
                }
                name.clone()
            }
        };
        outputs.push(PlanIo {
            name: name.clone(),
            buffer: buf,
            shape: n.shape.clone(),
            dtype: n.dtype,
        });
    }
    let io = |kind: BufferKind| -> Vec<PlanIo> {
        l.buffers
            .iter()
            .filter(|b| b.kind == kind)
            .map(|b| PlanIo {
                name: b.name.clone(),
                buffer: b.name.clone(),
                shape: b.shape.clone(),
                dtype: b.dtype,
            })
            .collect()
    };
    let (inputs, weights) = (io(BufferKind::Input), io(BufferKind::Weight));
    let mut kernels: Vec<PlanKernel> = l
        .kernels
        .iter()
        .filter(|k| k.phase == Phase::Prepare)
        .cloned()
        .collect();
    kernels.extend(
        l.kernels
            .iter()
            .filter(|k| k.phase == Phase::Forward)
            .cloned(),
    );
    Ok(Plan {
        target: opts.target,
        elem: opts.elem,
        buffers: l.buffers,
        aliases: l.aliases,
        kernels,
        inputs,
        weights,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use transfuse_ir::{Builder, Scalar};

    /// One causal, masked attention `[b, 2, sq, 8]` against `[b, 2, sk, 8]` keys.
    fn attention_graph(sq: Dim) -> Graph {
        let mut b = Builder::new();
        let q = b
            .input(
                "q",
                vec![Dim::sym("b"), 2.into(), sq.clone(), 8.into()],
                DType::F32,
            )
            .unwrap();
        let kv = vec![Dim::sym("b"), 2.into(), Dim::sym("t"), 8.into()];
        let k = b.input("k", kv.clone(), DType::F32).unwrap();
        let v = b.input("v", kv, DType::F32).unwrap();
        let m = b
            .input(
                "m",
                vec![Dim::sym("b"), 1.into(), sq, Dim::sym("t")],
                DType::F32,
            )
            .unwrap();
        let o = b
            .op(
                Op::Attention {
                    scale: Scalar(0.25),
                    causal: true,
                    window: None,
                },
                &[q, k, v, m],
            )
            .unwrap();
        b.output("o", o);
        b.finish()
    }

    fn dims(v: &[(&str, usize)]) -> Bindings {
        v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
    }

    fn lowered(sq: Dim) -> Plan {
        lower(
            &attention_graph(sq),
            &LowerOptions::new(Target::Wgsl, Elem::F32),
        )
        .unwrap()
    }

    #[test]
    fn a_symbolic_query_length_gets_a_decode_variant() {
        let plan = lowered(Dim::sym("s"));
        assert_eq!(plan.kernels.len(), 1);
        let k = &plan.kernels[0];
        assert!(k.entry().starts_with("attention_f32_d8_causal_mask_s"));
        let v = k.decode.as_deref().expect("a decode variant");
        assert!(
            v.gen
                .kernel
                .name
                .starts_with("attention_decode_f32_d8_causal_mask_s"),
            "{}",
            v.gen.kernel.name
        );
        assert_eq!(v.when_one, Poly::sym("s"));
        // The same buffers, bound alike; the output renamed after the graph output in both.
        assert_eq!(v.bindings, k.bindings);
        assert!(v.bindings.contains(&"o".to_string()));
        assert_eq!(v.uniforms.len(), v.gen.kernel.uniforms.len());
        let one = dims(&[("b", 3), ("s", 1), ("t", 9)]);
        let five = dims(&[("b", 3), ("s", 5), ("t", 9)]);
        assert!(plan.use_decode(0, &one).unwrap());
        assert!(!plan.use_decode(0, &five).unwrap());
        assert!(plan.use_decode(0, &dims(&[("b", 3)])).is_err());
        assert!(plan.use_decode(1, &one).is_err());
        // The decode grid: one workgroup per (query row, batch·head).
        let (du, dg) = plan.launch_args_for(0, true, &one).unwrap();
        assert_eq!(dg, [1, 6, 1]);
        assert_eq!(du.len(), v.uniforms.len());
        assert_eq!(
            plan.launch_args(0, &five).unwrap(),
            plan.launch_args_for(0, false, &five).unwrap()
        );
        let j = plan.to_json(Some(&one));
        assert_eq!(j["kernels"][0]["decode"], v.gen.kernel.name.as_str());
        assert_eq!(
            j["kernels"][0]["decode_file"],
            format!("00_{}.wgsl", v.gen.kernel.name)
        );
        assert_eq!(j["kernels"][0]["decode_at"], true);
        assert_eq!(plan.to_json(Some(&five))["kernels"][0]["decode_at"], false);
    }

    #[test]
    fn a_query_length_of_one_is_the_decode_kernel_itself_and_other_constants_flash() {
        let plan = lowered(1.into());
        let k = &plan.kernels[0];
        assert!(
            k.entry().starts_with("attention_decode_f32_d8"),
            "{}",
            k.entry()
        );
        assert!(k.decode.is_none());
        let b = dims(&[("b", 2), ("t", 4)]);
        assert!(!plan.use_decode(0, &b).unwrap());
        assert_eq!(plan.launch_args(0, &b).unwrap().1, [1, 4, 1]);
        assert!(plan.launch_args_for(0, true, &b).is_err());
        assert_eq!(
            plan.to_json(None)["kernels"][0]["decode"],
            serde_json::Value::Null
        );
        assert_eq!(plan.decode_file_name(0), None);

        let plan = lowered(4.into());
        let k = &plan.kernels[0];
        assert!(k.entry().starts_with("attention_f32_d8"), "{}", k.entry());
        assert!(k.decode.is_none());
    }
}
