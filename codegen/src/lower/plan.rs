//! The plan schema: what a runtime needs to run a lowered graph ([`Plan`]: buffers, aliases,
//! kernels with their bindings and uniform expressions, inputs, weights, outputs) and the
//! run-time arithmetic on it: buffer sizes and each kernel's uniform values and grid at the
//! bound dims ([`Plan::launch_args`]), and whether a kernel is launched as its decode variant
//! ([`Plan::use_decode`]).

use transfuse_ir::{Bindings, DType, NodeId, Shape};

use super::{BufId, Poly, View};
use crate::kernels::{decode, norm};
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
    /// An appendable cache ([`PlanCache`]): a graph input (the past rows) and a graph output
    /// (past + new rows) in one buffer of [`CACHE_CAP`] rows along the cache axis.
    Cache,
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
            BufferKind::Cache => "cache",
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
    /// Split-KV decode's split of `sk` keys ([`decode::split_uniforms`]): the keys per split
    /// (`nsplit` false) or the split count.
    Split {
        /// The key count.
        sk: Poly,
        /// The device's split bounds.
        shape: decode::SplitShape,
        /// The count rather than the keys per split.
        nsplit: bool,
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
            UniformExpr::Split { sk, shape, nsplit } => write!(
                f,
                "split_{}({sk}; ≤{} × ≥{})",
                if *nsplit { "count" } else { "chunk" },
                shape.max_splits,
                shape.min_chunk
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
    /// Name of the plan buffer bound to each kernel buffer parameter, in parameter order (the
    /// names of `buffer_ids`, given when the plan is finished).
    pub bindings: Vec<String>,
    /// The same buffers by id (index into [`Plan::buffers`]).
    pub buffer_ids: Vec<BufId>,
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
    /// Launched only when this evaluates to 1 (None: always): the combine kernel of a
    /// split-KV decode variant, which runs after its partial kernel (the variant of the
    /// kernel before it) and writes the attention's output. See [`Plan::launched_at`].
    pub only_when: Option<Poly>,
    /// Launched only when this split count ([`UniformExpr::Split`]) exceeds 1 (None: always):
    /// the split-KV combine, which a one-split partial kernel makes unneeded (it writes the
    /// output itself). See [`Plan::launched_at`].
    pub only_split: Option<UniformExpr>,
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
    /// Name of the plan buffer bound to each kernel buffer parameter, in parameter order.
    pub bindings: Vec<String>,
    /// The same buffers by id (index into [`Plan::buffers`]).
    pub buffer_ids: Vec<BufId>,
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

/// The dim symbol of a cache buffer's capacity (rows along its cache axis): bound by the
/// runtime, never by an input's shape (see [`PlanCache`]).
pub const CACHE_CAP: &str = "kv_cap";

/// An appendable KV cache: graph output `output = concat(input, new)` along `axis`, where
/// `input` is a graph input used by nothing else. Both live in one buffer whose shape is the
/// input's with [`CACHE_CAP`] rows along `axis`: the input is its first `len` rows, the output
/// its first `len + new` rows, and the concat writes only the new rows, in place. A runtime
/// binds `kv_cap` (≥ the output's rows) for the call; carrying the output to the input of the
/// next call needs no copy, only a capacity that grows when exceeded. Host tensors of these
/// shapes are laid out densely; [`PlanCache::pad`] / [`PlanCache::compact`] convert.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanCache {
    /// The graph input (past rows).
    pub input: String,
    /// The graph output (past and new rows).
    pub output: String,
    /// The plan buffer holding both.
    pub buffer: String,
    /// The axis rows are appended along.
    pub axis: usize,
}

impl PlanCache {
    /// (outer blocks, inner elements per row) of a dense tensor of `shape` along `axis`.
    fn blocks(&self, shape: &[usize]) -> (usize, usize) {
        let outer = shape[..self.axis].iter().product();
        let inner = shape[self.axis + 1..].iter().product();
        (outer, inner)
    }

    /// Dense bytes of a tensor of `shape` (`eb` bytes per element) → the buffer layout with
    /// `cap` rows along the axis (rows past `shape[axis]` zero).
    pub fn pad(&self, dense: &[u8], shape: &[usize], cap: usize, eb: usize) -> Vec<u8> {
        let (outer, inner) = self.blocks(shape);
        let rows = shape[self.axis];
        let (run, stride) = (rows * inner * eb, cap * inner * eb);
        let mut out = vec![0u8; outer * stride];
        for o in 0..outer {
            out[o * stride..o * stride + run].copy_from_slice(&dense[o * run..(o + 1) * run]);
        }
        out
    }

    /// The buffer layout with `cap` rows → dense bytes of a tensor of `shape`.
    pub fn compact(&self, padded: &[u8], shape: &[usize], cap: usize, eb: usize) -> Vec<u8> {
        let (outer, inner) = self.blocks(shape);
        let rows = shape[self.axis];
        let (run, stride) = (rows * inner * eb, cap * inner * eb);
        let mut out = Vec::with_capacity(outer * run);
        for o in 0..outer {
            out.extend_from_slice(&padded[o * stride..o * stride + run]);
        }
        out
    }

    /// The byte ranges `(offset, bytes)` holding the first `rows` rows of a buffer of `shape`
    /// (`shape[axis]` ignored) with `cap` rows: what a capacity change must copy.
    pub fn row_runs(&self, shape: &[usize], rows: usize, cap: usize, eb: usize) -> Vec<(u64, u64)> {
        let (outer, inner) = self.blocks(shape);
        let stride = (cap * inner * eb) as u64;
        let run = (rows * inner * eb) as u64;
        (0..outer as u64).map(|o| (o * stride, run)).collect()
    }
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
    /// Appendable caches (an input and an output sharing a buffer), see [`PlanCache`].
    pub caches: Vec<PlanCache>,
}

pub(super) fn plan_err(msg: impl Into<String>) -> CodegenError {
    CodegenError::Plan(msg.into())
}

impl Plan {
    /// `b` with [`CACHE_CAP`] bound, when the plan has caches and `b` does not bind it: to the
    /// most rows a cache output has at `b` (no spare capacity), or left out when that cannot
    /// be evaluated.
    pub fn cache_dims(&self, b: &Bindings) -> Bindings {
        let mut out = b.clone();
        if self.caches.is_empty() || b.contains_key(CACHE_CAP) {
            return out;
        }
        let mut cap = None;
        for c in &self.caches {
            let o = self.outputs.iter().find(|o| o.name == c.output);
            if let Some(rows) = o
                .and_then(|o| o.shape.get(c.axis))
                .and_then(|d| Poly::dim(d).eval(b).ok())
            {
                cap = Some(cap.unwrap_or(0).max(rows));
            }
        }
        if let Some(c) = cap.and_then(|c| usize::try_from(c).ok()) {
            out.insert(CACHE_CAP.to_string(), c);
        }
        out
    }

    /// The cache whose input or output is `name`.
    pub fn cache_of(&self, name: &str) -> Option<&PlanCache> {
        self.caches
            .iter()
            .find(|c| c.input == name || c.output == name)
    }

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
                BufferKind::Output | BufferKind::Cache => true,
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

    /// Whether kernel `k` is launched at the dims `b` (false for a split-KV combine kernel
    /// when the query length is not 1 or the keys are not split, see
    /// [`PlanKernel::only_when`] and [`PlanKernel::only_split`]).
    pub fn launched_at(&self, k: usize, b: &Bindings) -> Result<bool, CodegenError> {
        let pk = self.kernel(k)?;
        if let Some(p) = &pk.only_when {
            if p.eval(b)? != 1 {
                return Ok(false);
            }
        }
        match &pk.only_split {
            Some(UniformExpr::Split { sk, shape, .. }) => {
                let n = u64::try_from(sk.eval(b)?).map_err(|_| {
                    plan_err(format!("kernel {k} ({}): negative key count", pk.entry()))
                })?;
                Ok(decode::split_uniforms(n, *shape).1 > 1)
            }
            Some(other) => Err(plan_err(format!(
                "kernel {k} ({}): `{other}` is not a split count",
                pk.entry()
            ))),
            None => Ok(true),
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
                UniformExpr::Split { sk, shape, nsplit } => {
                    let n = u64::try_from(sk.eval(b)?)
                        .map_err(|_| kerr(format!("uniform `{name}`: negative key count")))?;
                    let (chunk, count) = decode::split_uniforms(n, *shape);
                    i64::from(if *nsplit { count } else { chunk })
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
        let ids = match &pk.decode {
            Some(v) if decode => &v.buffer_ids,
            _ => &pk.buffer_ids,
        };
        self.check_indices(&gen.kernel, ids, grid, b)?;
        Ok((vals, grid))
    }

    /// Kernels index with u32: every tensor a kernel binds must have at most `u32::MAX`
    /// elements at the dims `b`, and in a grid-stride kernel (one that reads the workgroup
    /// count) an index plus one stride of the whole `grid` must stay below 2^32 as well (a
    /// launcher that clamps the grid only shortens the stride). Else
    /// [`CodegenError::IndexOverflow`] naming the tensor and the kernel.
    pub fn check_indices(
        &self,
        kernel: &Kernel,
        ids: &[BufId],
        grid: [u32; 3],
        b: &Bindings,
    ) -> Result<(), CodegenError> {
        let threads: u128 =
            grid.iter().map(|&g| u128::from(g)).product::<u128>() * u128::from(kernel.threads());
        let strided = kernel.any_expr(&|e| matches!(e, Expr::Builtin(Builtin::NumWorkgroups(_))));
        let max = if strided {
            (1u128 << 32).saturating_sub(threads)
        } else {
            u128::from(u32::MAX)
        };
        // The largest tensor: a loop runs over at most its elements.
        let mut largest: Option<(i64, &str)> = None;
        for &id in ids {
            let buf = self
                .buffers
                .get(id.index())
                .ok_or_else(|| plan_err(format!("kernel `{}`: no buffer {id:?}", kernel.name)))?;
            let n = buf.len().eval(b)?;
            if largest.is_none_or(|(m, _)| n > m) {
                largest = Some((n, &buf.name));
            }
        }
        match largest {
            Some((n, name)) if u128::try_from(n).unwrap_or(0) > max => {
                Err(index_overflow(name, n, &kernel.name, max, strided))
            }
            _ => Ok(()),
        }
    }
}

/// The error of a tensor of `n` elements that kernel `kernel` cannot index (at most `max`).
pub(super) fn index_overflow(
    tensor: &str,
    n: i64,
    kernel: &str,
    max: u128,
    strided: bool,
) -> CodegenError {
    CodegenError::IndexOverflow {
        tensor: tensor.to_string(),
        elements: n.unsigned_abs(),
        kernel: kernel.to_string(),
        max: u64::try_from(max).unwrap_or(u64::MAX),
        why: if strided {
            "32-bit indices and its grid-stride loop"
        } else {
            "32-bit indices"
        },
    }
}
