//! Row-wise softmax and the normalisations: `softmax(x·scale [+ mask])`, layer norm, RMS norm
//! (each optionally fused with a residual add), group norm, instance norm, and inference batch
//! norm. The semantics are those of the fused ops of `transfuse_ir::Op` (`runtime/src/cpu/fused.rs`
//! is the reference); storage is f32, f16 or bf16, every computation is f32.
//!
//! # Algorithm
//!
//! One workgroup handles one row (softmax, layer/RMS norm: the last axis; group/instance norm: the
//! contiguous block of one `(n, group)` / `(n, channel)` of `x [N, C, spatial]`). Workgroups walk
//! the rows in a grid-stride loop (`row = workgroup_id.x; row < rows; row += num_workgroups.x`), so
//! a launcher may clamp the grid (WebGPU allows 65 535 workgroups per dimension) and every row is
//! still done; the planned grid is one workgroup per row.
//!
//! Thread `t` of `T = threads` owns columns `t, t + T, t + 2T, …` (coalesced). The first
//! `T·per_thread` columns of the row are read once, into a per-thread register array of
//! `per_thread` values (the loops over it are unrolled here, so the indices are constants); any
//! columns beyond are streamed from memory again in each pass (three passes for softmax and
//! layer norm, two for RMS norm), so a row of any length works, just more slowly past
//! `T·per_thread`. The passes are:
//!
//! - softmax: `s = x·scale + mask`, row max `m`; `e = exp(s − m)`, row sum `Σ`; `y = e · (1/Σ)`.
//! - layer norm: `μ = Σx / n`; `σ² = Σ(x − μ)² / n`; `y = (x − μ)·rsqrt(σ² + eps)·γ + β`.
//! - RMS norm: `ms = Σx² / n`; `y = x·rsqrt(ms + eps)·γ`.
//! - group / instance norm: layer norm over the block, `γ`, `β` per channel.
//!
//! Row reductions (max, sum) go through workgroup shared memory: each thread stores its partial,
//! then a tree of `log2 T` halving steps, each followed by a barrier, then everyone reads slot 0
//! and a final barrier protects the slots before their next use. With the `subgroup` tunable at
//! 32 the partials are first reduced across 32-lane subgroups (warp shuffles on CUDA, WGSL
//! `subgroupAdd`/`subgroupMax`), one value per subgroup goes through shared memory, and a second
//! subgroup reduction combines them: two barriers per reduction instead of `log2 T + 2`.
//!
//! Barriers only ever sit in uniform control flow: loop bounds are uniforms, workgroup ids or
//! constants, and per-thread conditions (`column < cols`, `thread < stride`) guard only loads,
//! stores and shared-memory updates.
//!
//! **Row design (`subgroup = 1`, CPU adapters).** Softmax and layer/RMS norm without a
//! residual also have a design for llvmpipe, where every load is a loop over the SIMD lanes
//! and a 256-thread tree reduction costs many barriers and shared-memory loads per row: one
//! row per invocation (`threads` rows per workgroup, row `wg·threads + tid`, grid-stride), the
//! row read as vec4 loads in each pass (the sums kept as vec4 and added across lanes at the
//! end), no shared memory, no barriers; stores (and a softmax mask, gamma, beta) stay scalar.
//! It needs `cols % 4 == 0` and rows starting on multiples of 4 elements: the lowering
//! chooses it by [`Limits::kind`] only then.
//!
//! Batch norm (`y = x·scale[c] + shift[c]`, `c = (i / spatial) % channels`) is elementwise: a
//! grid-stride loop over the elements with `ceil(n / (threads·per_thread))` workgroups planned.
//!
//! # Masks
//!
//! The softmax mask is additive (`score + mask`, exactly like the CPU kernel: an `f32::MIN` mask
//! keeps scores finite, so a fully masked row gives uniform probabilities; a `-inf` mask on a
//! whole row gives NaN, as on the CPU). With f16/bf16 storage, where `f32::MIN` rounds to
//! `-inf`, a mask value is read as `max(mask, f32::MIN)` (what the attention kernel does with
//! `-inf`), so HF's `finfo(f32).min` padding still gives the CPU's uniform rows rather than NaN.
//! It is stored with the kernel's element type and read
//! broadcast through uniforms: element `(row, j)` of the scores reads
//! `mask[term0(row) + term1(row) + j·mask_col_stride]` with
//! `termK(row) = ((row / mask_divK) % mask_modK) · mask_strideK`. Two terms cover every mask
//! whose non-broadcast row dimensions form at most two runs, e.g. `[b,1,1,s]`, `[b,1,s,s]`,
//! `[1,1,s,s]`, `[1,h,1,s]`, `[b,h,s,s]` over scores `[b,h,s,s]`; [`mask_uniforms`] computes
//! them from the shapes (or says the mask needs materialising first).
//!
//! # Uniforms and buffers (in order)
//!
//! - softmax: `x, [mask], y`; `rows, cols, [mask_div0, mask_mod0, mask_stride0, mask_div1,
//!   mask_mod1, mask_stride1, mask_col_stride]`.
//! - layer norm: `x, [res], [gamma, beta], y, [sum]`; `rows, cols`. RMS norm: the same without
//!   `beta`. With `residual`, the normalised value is `x + res` (rounded to the storage type),
//!   also written to `sum` for the next residual add of a pre-norm stream.
//! - group norm: `x, [gamma, beta], y`; `blocks (= N·groups), groups, channels_per_group,
//!   spatial`. Instance norm: `blocks (= N·C), channels, spatial`.
//! - batch norm: `x, scale, shift, y`; `n, channels, spatial`.
//!
//! `gamma`/`beta` ([`Affine`]) are absent, one scalar, or one value per feature (the last axis;
//! per channel for group/instance norm). `scale` and `eps` are compile-time constants, so they
//! are part of the kernel name (as f32 bit patterns), like the element type and the tunables.
//!
//! # Limits and refusals
//!
//! Tunables ([`Tune`]): `threads` a power of two from 32 to the target's `max_threads`;
//! `per_thread` 1..=16; `subgroup` 0 (shared-memory tree) or 32 (assumes 32-lane subgroups made
//! of consecutive threads: always true on CUDA; on WebGPU only where the adapter's subgroup
//! size is exactly 32), 0 only for batch norm. Shared memory is `4·threads` bytes (128 with
//! subgroups), within every target's limits. Refused with [`CodegenError::Kernel`] naming the
//! kernel: other tunable values, a storage type other than f32/f16/bf16, a non-finite `scale`,
//! a negative or non-finite `eps`. bf16 kernels print only as CUDA (WGSL has no bf16).
//! Indices are u32: tensors of more than 2³² − 1 elements need splitting by the caller.

use super::{check_limits, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// Thread counts worth trying (filtered by the target's limits).
const THREADS: [u32; 6] = [32, 64, 128, 256, 512, 1024];
/// Register-cached values per thread worth trying.
const PER_THREAD: [u32; 4] = [1, 2, 4, 8];
/// Largest accepted `per_thread`.
const MAX_PER_THREAD: u32 = 16;
/// The subgroup width the `subgroup` tunable assumes.
const WARP: u32 = 32;
/// `subgroup` value selecting the row design: one row per invocation (CPU adapters).
pub const ROWS: u32 = 1;
/// Invocations per workgroup worth trying in the row design.
const ROW_THREADS: [u32; 4] = [8, 16, 32, 64];

/// Which scale/shift parameters a normalisation applies after normalising.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Affine {
    /// None (`γ = 1`, `β = 0`): no parameter buffers.
    None,
    /// One value each (`gamma[0]`, `beta[0]`).
    Scalar,
    /// One value per feature (`[cols]`; per channel `[C]` for group/instance norm).
    Vector,
}

/// Softmax over the last axis of `x [rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxCfg {
    /// Storage type of `x`, `mask` and `y`.
    pub elem: Elem,
    /// Multiplies `x` before the mask is added (1.0: no multiply).
    pub scale: f32,
    /// Whether an additive mask is read (see the module docs for its broadcasting).
    pub mask: bool,
}

/// Which row normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// `(x − μ) / √(σ² + eps) · γ + β`.
    Layer,
    /// `x / √(E[x²] + eps) · γ` (no `β`).
    Rms,
}

/// Layer or RMS norm over the last axis of `x [rows, cols]`, optionally of `x + res`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormCfg {
    /// Storage type of every buffer.
    pub elem: Elem,
    /// Layer or RMS.
    pub kind: NormKind,
    /// Added to the variance (mean square) before the square root.
    pub eps: f32,
    /// `gamma` (and for layer norm `beta`).
    pub affine: Affine,
    /// Normalise `x + res` and also write that sum to `sum`.
    pub residual: bool,
}

/// Group norm (or instance norm: one group per channel) over `x [N, C, spatial]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormCfg {
    /// Storage type of every buffer.
    pub elem: Elem,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Per-channel (`Vector`) or scalar `gamma`, `beta`, or none.
    pub affine: Affine,
    /// Instance norm: groups = channels (uniforms `blocks, channels, spatial`).
    pub instance: bool,
}

/// Inference batch norm `x · scale[c] + shift[c]` over `x [N, C, spatial]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormCfg {
    /// Storage type of `x`, `scale`, `shift`, `y`.
    pub elem: Elem,
}

/// What [`Tune`] needs to know of a configuration.
pub trait NormConfig {
    /// Storage element type.
    fn elem(&self) -> Elem;
    /// True when the kernel reduces across a workgroup (everything but batch norm).
    fn reduces(&self) -> bool {
        true
    }
    /// Generates the kernel for `tune` on a target with `limits`.
    fn generate(&self, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError>;
    /// True when the row design ([`ROWS`]: one row per invocation, vec4 loads) exists for it.
    fn has_rows_design(&self) -> bool {
        false
    }
}

impl NormConfig for SoftmaxCfg {
    fn elem(&self) -> Elem {
        self.elem
    }
    fn generate(&self, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
        softmax(self, tune, limits)
    }
    fn has_rows_design(&self) -> bool {
        true
    }
}

impl NormConfig for NormCfg {
    fn elem(&self) -> Elem {
        self.elem
    }
    fn generate(&self, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
        norm(self, tune, limits)
    }
    fn has_rows_design(&self) -> bool {
        !self.residual
    }
}

impl NormConfig for GroupNormCfg {
    fn elem(&self) -> Elem {
        self.elem
    }
    fn generate(&self, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
        group_norm(self, tune, limits)
    }
}

impl NormConfig for BatchNormCfg {
    fn elem(&self) -> Elem {
        self.elem
    }
    fn reduces(&self) -> bool {
        false
    }
    fn generate(&self, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
        batch_norm(self, tune, limits)
    }
}

/// The tunables of every kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tune {
    /// Threads per workgroup (a power of two, 32..=max_threads).
    pub threads: u32,
    /// Values per thread held in registers (row kernels: `threads·per_thread` columns are read
    /// once; batch norm: elements per thread, sizing the grid). 1..=16.
    pub per_thread: u32,
    /// 0: shared-memory tree reductions; 32: subgroup reductions assuming 32-lane subgroups;
    /// [`ROWS`] (1): the row design — one row per invocation, `threads` (8..=64) rows per
    /// workgroup, vec4 loads, no shared memory (softmax, layer/RMS norm without residual;
    /// `per_thread` 1; the caller guarantees `cols % 4 == 0` and rows starting on a multiple of
    /// 4 elements).
    pub subgroup: u32,
}

impl Tune {
    /// The default: 256 threads (or the target's most, if fewer), 4 values per thread (rows of
    /// up to 1024 columns are read once), shared-memory reductions (portable to any subgroup
    /// size).
    pub fn default_for(cfg: &dyn NormConfig, limits: &Limits) -> Tune {
        let _ = cfg;
        let threads = THREADS
            .iter()
            .copied()
            .filter(|&t| t <= limits.max_threads.min(256))
            .max()
            .unwrap_or(THREADS[0]);
        Tune {
            threads,
            per_thread: 4,
            subgroup: 0,
        }
    }

    /// The default for rows of `cols` columns: 4 values per thread and just enough threads to
    /// read a row once (32 at least, the fixed default's at most), so short rows do not leave
    /// most of a 256-thread workgroup idle through every reduction step.
    pub fn for_problem(cfg: &dyn NormConfig, limits: &Limits, cols: u64) -> Tune {
        let mut t = Self::default_for(cfg, limits);
        let need = cols
            .div_ceil(u64::from(t.per_thread))
            .max(1)
            .next_power_of_two();
        t.threads = need.clamp(u64::from(THREADS[0]), u64::from(t.threads)) as u32;
        if t.check(cfg, limits).is_none() {
            t
        } else {
            Self::default_for(cfg, limits)
        }
    }

    /// The row design with `threads` rows per workgroup.
    pub fn rows(threads: u32) -> Tune {
        Tune {
            threads,
            per_thread: 1,
            subgroup: ROWS,
        }
    }

    /// The row design's points: 8, 16, 32 or 64 rows per workgroup (none when `cfg` has no
    /// row design).
    pub fn rows_space(cfg: &dyn NormConfig, limits: &Limits) -> Vec<Tune> {
        ROW_THREADS
            .iter()
            .map(|&t| Tune::rows(t))
            .filter(|t| t.check(cfg, limits).is_none())
            .collect()
    }

    /// Every valid combination of the values worth trying under `limits` (the row design not
    /// included: see [`Self::rows_space`]).
    pub fn space(cfg: &dyn NormConfig, limits: &Limits) -> Vec<Tune> {
        let subgroups: &[u32] = if cfg.reduces() { &[0, WARP] } else { &[0] };
        let mut out = vec![];
        for &threads in &THREADS {
            for &per_thread in &PER_THREAD {
                for &subgroup in subgroups {
                    let t = Tune {
                        threads,
                        per_thread,
                        subgroup,
                    };
                    if t.check(cfg, limits).is_none() {
                        out.push(t);
                    }
                }
            }
        }
        out
    }

    /// Why `self` is invalid for `cfg` under `limits`, if it is.
    fn check(&self, cfg: &dyn NormConfig, limits: &Limits) -> Option<String> {
        if self.subgroup == ROWS {
            if !cfg.has_rows_design() {
                return Some("this kernel has no row design (subgroup = 1)".into());
            }
            if !ROW_THREADS.contains(&self.threads) || self.threads > limits.max_threads {
                return Some(format!(
                    "the row design takes 8, 16, 32 or 64 threads within the target's {}, not {}",
                    limits.max_threads, self.threads
                ));
            }
            if self.per_thread != 1 {
                return Some(format!(
                    "the row design takes per_thread = 1, not {}",
                    self.per_thread
                ));
            }
            return None;
        }
        if !self.threads.is_power_of_two() || self.threads < 32 {
            return Some(format!(
                "threads = {} is not a power of two of at least 32",
                self.threads
            ));
        }
        if self.threads > limits.max_threads {
            return Some(format!(
                "threads = {} exceeds the target's {}",
                self.threads, limits.max_threads
            ));
        }
        if self.per_thread == 0 || self.per_thread > MAX_PER_THREAD {
            return Some(format!(
                "per_thread = {} is outside 1..={MAX_PER_THREAD}",
                self.per_thread
            ));
        }
        match (self.subgroup, cfg.reduces()) {
            (0, _) | (WARP, true) => {}
            (s, true) => return Some(format!("subgroup = {s} is neither 0, {ROWS} nor {WARP}")),
            (s, false) => return Some(format!("subgroup = {s}: this kernel does not reduce")),
        }
        if cfg.reduces() && shared_len(self) * 4 > limits.max_shared_bytes {
            return Some(format!(
                "{} bytes of shared memory exceed the target's {}",
                shared_len(self) * 4,
                limits.max_shared_bytes
            ));
        }
        None
    }

    /// As [`Tunable`]s, with each one's valid values under `limits` (the others held).
    fn tunables(&self, cfg: &dyn NormConfig, limits: &Limits) -> Vec<Tunable> {
        if self.subgroup == ROWS {
            let space = Self::rows_space(cfg, limits);
            return vec![
                Tunable::axis("threads", self.threads, &space, |t| t.threads),
                Tunable::axis("per_thread", 1, &space, |t| t.per_thread),
                Tunable::axis("subgroup", ROWS, &space, |t| t.subgroup),
            ];
        }
        let valid = |t: Tune| t.check(cfg, limits).is_none();
        let mut v = vec![
            Tunable {
                name: "threads",
                value: self.threads,
                space: THREADS
                    .iter()
                    .copied()
                    .filter(|&x| {
                        valid(Tune {
                            threads: x,
                            ..*self
                        })
                    })
                    .collect(),
            },
            Tunable {
                name: "per_thread",
                value: self.per_thread,
                space: PER_THREAD
                    .iter()
                    .copied()
                    .filter(|&x| {
                        valid(Tune {
                            per_thread: x,
                            ..*self
                        })
                    })
                    .collect(),
            },
        ];
        if cfg.reduces() {
            v.push(Tunable {
                name: "subgroup",
                value: self.subgroup,
                space: [0, WARP]
                    .into_iter()
                    .filter(|&x| {
                        valid(Tune {
                            subgroup: x,
                            ..*self
                        })
                    })
                    .collect(),
            });
        }
        for t in &mut v {
            if !t.space.contains(&t.value) {
                t.space.push(t.value);
                t.space.sort_unstable();
            }
        }
        v
    }
}

/// Length of the shared reduction array.
fn shared_len(t: &Tune) -> u32 {
    if t.subgroup == WARP {
        WARP
    } else {
        t.threads
    }
}

fn elem_name(e: Elem) -> &'static str {
    match e {
        Elem::F32 => "f32",
        Elem::F16 => "f16",
        Elem::BF16 => "bf16",
        Elem::U32 => "u32",
        Elem::I32 => "i32",
        Elem::Bool => "bool",
        Elem::F32x4 => "f32x4",
    }
}

fn kernel_err(name: &str, msg: String) -> CodegenError {
    CodegenError::Kernel {
        kernel: name.to_string(),
        msg,
    }
}

/// The kernel name: stem, element type, tunables; validates the tunables and the element type.
fn named(
    stem: &str,
    cfg: &dyn NormConfig,
    tune: &Tune,
    limits: &Limits,
) -> Result<String, CodegenError> {
    let sg = match tune.subgroup {
        WARP => "_sg32",
        ROWS => "_rows",
        _ => "",
    };
    let name = format!(
        "{stem}_{}_t{}x{}{sg}",
        elem_name(cfg.elem()),
        tune.threads,
        tune.per_thread
    );
    if !matches!(cfg.elem(), Elem::F32 | Elem::F16 | Elem::BF16) {
        return Err(kernel_err(
            &name,
            format!(
                "storage type {} is not f32, f16 or bf16",
                elem_name(cfg.elem())
            ),
        ));
    }
    if let Some(msg) = tune.check(cfg, limits) {
        return Err(kernel_err(&name, msg));
    }
    Ok(name)
}

fn check_eps(name: &str, eps: f32) -> Result<(), CodegenError> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(kernel_err(
            name,
            format!("eps = {eps} is not finite and non-negative"),
        ))
    }
}

fn buf(name: &str, elem: Elem, access: Access) -> Buffer {
    Buffer {
        name: name.into(),
        elem,
        access,
    }
}

fn finish(
    kernel: Kernel,
    grid: GridDim,
    cfg: &dyn NormConfig,
    tune: &Tune,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [grid, GridDim::one(), GridDim::one()],
        tunables: tune.tunables(cfg, limits),
    })
}

/// `buffer[index]` converted to f32.
fn ld(b: &str, index: Expr) -> Expr {
    load(b, index).cast(Elem::F32)
}

fn tid() -> Expr {
    var("tid")
}

/// `op(a, b)` of a reduction.
fn combine(op: SubgroupOp, a: Expr, b: Expr) -> Expr {
    match op {
        SubgroupOp::Sum => a + b,
        SubgroupOp::Max => a.max(b),
        SubgroupOp::Broadcast(_) => unreachable!("not a reduction"),
    }
}

fn identity(op: SubgroupOp) -> f32 {
    match op {
        SubgroupOp::Sum => 0.0,
        SubgroupOp::Max => f32::NEG_INFINITY,
        SubgroupOp::Broadcast(_) => unreachable!("not a reduction"),
    }
}

/// Reduces each thread's `input` across the workgroup into `let out` (the same in every
/// thread). Must run in uniform control flow; leaves the shared slots free for reuse.
fn reduce(t: &Tune, op: SubgroupOp, input: &str, out: &str) -> Vec<Stmt> {
    if t.subgroup == WARP {
        let w = format!("{out}_warp");
        let p = format!("{out}_part");
        let lane = tid() % u(WARP);
        vec![
            let_(&w, Elem::F32, Expr::Subgroup(op, Box::new(var(input)))),
            if_(
                lane.clone().eq_(u(0)),
                vec![store_shared("red", tid() / u(WARP), var(&w))],
            ),
            Stmt::Barrier,
            let_(
                &p,
                Elem::F32,
                select(
                    lane.clone().lt(u(t.threads / WARP)),
                    load_shared("red", lane),
                    f(identity(op)),
                ),
            ),
            let_(out, Elem::F32, Expr::Subgroup(op, Box::new(var(&p)))),
            Stmt::Barrier,
        ]
    } else {
        let mut v = vec![store_shared("red", tid(), var(input)), Stmt::Barrier];
        let mut stride = t.threads / 2;
        while stride > 0 {
            v.push(if_(
                tid().lt(u(stride)),
                vec![store_shared(
                    "red",
                    tid(),
                    combine(
                        op,
                        load_shared("red", tid()),
                        load_shared("red", tid() + u(stride)),
                    ),
                )],
            ));
            v.push(Stmt::Barrier);
            stride /= 2;
        }
        v.push(let_(out, Elem::F32, load_shared("red", u(0))));
        v.push(Stmt::Barrier);
        v
    }
}

/// Visits this thread's columns `j < len` of a row: the first `threads·per_thread` columns are
/// cached in `regs[k]` (column `tid + k·threads`, unrolled), the rest are streamed by a
/// `threads`-strided loop. `cached(k, j)` and `streamed(j)` give the statements for one column.
fn sweep(
    t: &Tune,
    len: &Expr,
    cached: impl Fn(u32, Expr) -> Vec<Stmt>,
    streamed: impl Fn(Expr) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let mut v = vec![];
    for k in 0..t.per_thread {
        let j = if k == 0 {
            tid()
        } else {
            tid() + u(k * t.threads)
        };
        v.push(if_(j.clone().lt(len.clone()), cached(k, j)));
    }
    v.push(for_step(
        "j",
        u(t.threads * t.per_thread) + tid(),
        len.clone(),
        u(t.threads),
        streamed(var("j")),
    ));
    v
}

fn reg(k: u32) -> Expr {
    load_local("regs", u(k))
}

fn set_reg(k: u32, v: Expr) -> Stmt {
    Stmt::StoreLocal("regs".into(), u(k), v)
}

/// `acc = acc + v` / `acc = max(acc, v)`.
fn accumulate(op: SubgroupOp, acc: &str, v: Expr) -> Stmt {
    assign(acc, combine(op, var(acc), v))
}

/// The common prologue of the row kernels and the grid-stride loop over rows.
fn row_loop(t: &Tune, rows: &str, prologue: Vec<Stmt>, body: Vec<Stmt>) -> Vec<Stmt> {
    let mut v = vec![
        let_("tid", Elem::U32, local_id(0)),
        Stmt::LocalArray("regs".into(), Elem::F32, t.per_thread),
    ];
    v.extend(prologue);
    v.push(for_step(
        "row",
        workgroup_id(0),
        uni(rows),
        num_workgroups(0),
        body,
    ));
    v
}

fn red_shared(t: &Tune) -> Vec<Shared> {
    vec![Shared {
        name: "red".into(),
        elem: Elem::F32,
        len: shared_len(t),
    }]
}

/// The softmax mask uniforms, in kernel order.
pub const MASK_UNIFORMS: [&str; 7] = [
    "mask_div0",
    "mask_mod0",
    "mask_stride0",
    "mask_div1",
    "mask_mod1",
    "mask_stride1",
    "mask_col_stride",
];

/// Values of [`MASK_UNIFORMS`] for a contiguous additive `mask` broadcast to `scores` (the
/// softmax input; its last axis is the softmax axis), or `None` when the mask does not broadcast
/// to `scores`, its non-broadcast row dimensions form more than two runs, or a value exceeds
/// u32: then broadcast the mask into a contiguous tensor first.
pub fn mask_uniforms(scores: &[usize], mask: &[usize]) -> Option<[u32; 7]> {
    let r = scores.len();
    if r == 0 || mask.len() > r {
        return None;
    }
    // The mask right-aligned to the scores' rank, and its contiguous strides (0 when broadcast).
    let mut m = vec![1usize; r - mask.len()];
    m.extend_from_slice(mask);
    let mut strides = vec![0usize; r];
    let mut acc = 1usize;
    for d in (0..r).rev() {
        if m[d] != scores[d] && m[d] != 1 {
            return None;
        }
        strides[d] = if m[d] == 1 { 0 } else { acc };
        acc = acc.checked_mul(m[d])?;
    }
    let col_stride = strides[r - 1];
    // Runs of row dimensions (innermost first) with a stride, merged while contiguous:
    // (div = rows per step of the run's innermost dim, mod = run extent, stride).
    let mut runs: Vec<(usize, usize, usize)> = vec![];
    let mut place = 1usize; // rows per step of dimension d
    let mut prev_in_run = false;
    for d in (0..r - 1).rev() {
        let size = scores[d];
        if size != 1 {
            if strides[d] == 0 {
                prev_in_run = false;
            } else {
                match runs.last_mut() {
                    Some((_, ext, st)) if prev_in_run && strides[d] == *st * *ext => {
                        *ext = ext.checked_mul(size)?;
                    }
                    _ => runs.push((place, size, strides[d])),
                }
                prev_in_run = true;
            }
        }
        place = place.checked_mul(size)?;
    }
    if runs.len() > 2 {
        return None;
    }
    runs.resize(2, (1, 1, 0));
    let c = |x: usize| u32::try_from(x).ok();
    Some([
        c(runs[0].0)?,
        c(runs[0].1)?,
        c(runs[0].2)?,
        c(runs[1].0)?,
        c(runs[1].1)?,
        c(runs[1].2)?,
        c(col_stride)?,
    ])
}

/// The softmax kernel's name (both designs), refusing a scale that is not finite.
fn softmax_name(cfg: &SoftmaxCfg, tune: &Tune, limits: &Limits) -> Result<String, CodegenError> {
    let mut stem = "softmax".to_string();
    if cfg.mask {
        stem.push_str("_mask");
    }
    if cfg.scale != 1.0 {
        stem.push_str(&format!("_s{:08x}", cfg.scale.to_bits()));
    }
    let name = named(&stem, cfg, tune, limits)?;
    if !cfg.scale.is_finite() {
        return Err(kernel_err(
            &name,
            format!("scale = {} is not finite", cfg.scale),
        ));
    }
    Ok(name)
}

/// `softmax(x·scale [+ mask])` over the last axis, one workgroup per row.
pub fn softmax(cfg: &SoftmaxCfg, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
    if tune.subgroup == ROWS {
        return softmax_rows(cfg, tune, limits);
    }
    let name = softmax_name(cfg, tune, limits)?;
    let e = cfg.elem;
    let cols = uni("cols");
    let (scale, mask) = (cfg.scale, cfg.mask);
    let score = move |j: Expr| -> Expr {
        let x = ld("x", var("base") + j.clone());
        let x = if scale != 1.0 { x * f(scale) } else { x };
        if mask {
            let m = ld("mask", var("mbase") + j * uni("mask_col_stride"));
            // f16/bf16 round HF's `finfo(f32).min` fill to -inf: read it back as f32::MIN, as
            // the attention kernel does, so a fully masked row stays finite (uniform).
            let m = if e == Elem::F32 {
                m
            } else {
                m.max(f(f32::MIN))
            };
            x + m
        } else {
            x
        }
    };
    let mut body = vec![let_("base", Elem::U32, var("row") * cols.clone())];
    if mask {
        let term = |k: u32| {
            ((var("row") / uni(&format!("mask_div{k}"))) % uni(&format!("mask_mod{k}")))
                * uni(&format!("mask_stride{k}"))
        };
        body.push(let_("mbase", Elem::U32, term(0) + term(1)));
    }
    // Pass 1: scores into registers, row max.
    body.push(var_("mx", Elem::F32, f(f32::NEG_INFINITY)));
    body.extend(sweep(
        tune,
        &cols,
        |k, j| {
            vec![
                set_reg(k, score(j)),
                accumulate(SubgroupOp::Max, "mx", reg(k)),
            ]
        },
        |j| vec![accumulate(SubgroupOp::Max, "mx", score(j))],
    ));
    body.extend(reduce(tune, SubgroupOp::Max, "mx", "m"));
    // Pass 2: exponentials, row sum.
    body.push(var_("sm", Elem::F32, f(0.0)));
    body.extend(sweep(
        tune,
        &cols,
        |k, _| {
            vec![
                set_reg(k, (reg(k) - var("m")).exp()),
                accumulate(SubgroupOp::Sum, "sm", reg(k)),
            ]
        },
        |j| {
            vec![accumulate(
                SubgroupOp::Sum,
                "sm",
                (score(j) - var("m")).exp(),
            )]
        },
    ));
    body.extend(reduce(tune, SubgroupOp::Sum, "sm", "total"));
    body.push(let_("inv", Elem::F32, f(1.0) / var("total")));
    // Pass 3: normalise and store.
    body.extend(sweep(
        tune,
        &cols,
        |k, j| vec![store("y", var("base") + j, (reg(k) * var("inv")).cast(e))],
        |j| {
            vec![store(
                "y",
                var("base") + j.clone(),
                ((score(j) - var("m")).exp() * var("inv")).cast(e),
            )]
        },
    ));

    let mut buffers = vec![buf("x", e, Access::Read)];
    let mut uniforms = vec!["rows".to_string(), "cols".to_string()];
    if mask {
        buffers.push(buf("mask", e, Access::Read));
        uniforms.extend(MASK_UNIFORMS.iter().map(|s| s.to_string()));
    }
    buffers.push(buf("y", e, Access::ReadWrite));
    let kernel = Kernel {
        name,
        buffers,
        uniforms,
        workgroup: [tune.threads, 1, 1],
        shared: red_shared(tune),
        body: row_loop(tune, "rows", vec![], body),
    };
    finish(kernel, GridDim::of("rows", 1), cfg, tune, limits)
}

/// Index into `gamma`/`beta` of column `j` of the current row.
type ParamIndex = Box<dyn Fn(Expr) -> Expr>;

/// What distinguishes the row normalisations from each other.
struct RowNorm {
    kind: NormKind,
    elem: Elem,
    eps: f32,
    affine: Affine,
    residual: bool,
    /// Elements per row (a uniform-derived local).
    len: Expr,
    /// Index into `gamma`/`beta` of column `j` (for `Affine::Vector`).
    param: ParamIndex,
}

impl RowNorm {
    /// The row body (inside the row loop; `base` and `len` in scope).
    fn body(&self, t: &Tune) -> Vec<Stmt> {
        let e = self.elem;
        let residual = self.residual;
        // The value normalised at column j: x, or x + res rounded to the storage type (written
        // to `sum` on the first pass, read back from there afterwards).
        let first = move |j: Expr| -> Expr {
            let i = var("base") + j;
            if residual {
                (ld("x", i.clone()) + ld("res", i)).cast(e).cast(Elem::F32)
            } else {
                ld("x", i)
            }
        };
        let again = move |j: Expr| -> Expr {
            let i = var("base") + j;
            if residual {
                ld("sum", i)
            } else {
                ld("x", i)
            }
        };
        let store_sum = move |j: Expr, v: Expr| -> Vec<Stmt> {
            if residual {
                vec![store("sum", var("base") + j, v.cast(e))]
            } else {
                vec![]
            }
        };
        let len = &self.len;
        let mut body = vec![];
        let stat = match self.kind {
            NormKind::Layer => "mean",
            NormKind::Rms => "ms",
        };
        // Pass 1: load into registers; Σx (layer) or Σx² (RMS).
        let square = self.kind == NormKind::Rms;
        let sq = move |v: Expr| if square { v.clone() * v } else { v };
        body.push(var_("acc", Elem::F32, f(0.0)));
        body.extend(sweep(
            t,
            len,
            |k, j| {
                let mut s = vec![set_reg(k, first(j.clone()))];
                s.extend(store_sum(j, reg(k)));
                s.push(accumulate(SubgroupOp::Sum, "acc", sq(reg(k))));
                s
            },
            |j| {
                let mut s = vec![let_("v", Elem::F32, first(j.clone()))];
                s.extend(store_sum(j, var("v")));
                s.push(accumulate(SubgroupOp::Sum, "acc", sq(var("v"))));
                s
            },
        ));
        body.extend(reduce(t, SubgroupOp::Sum, "acc", "acc_all"));
        body.push(let_(stat, Elem::F32, var("acc_all") * var("inv_n")));
        let var_src = match self.kind {
            NormKind::Layer => {
                // Pass 2: Σ(x − μ)².
                body.push(var_("acc2", Elem::F32, f(0.0)));
                let dev = |v: Expr| {
                    let d = v - var("mean");
                    d.clone() * d
                };
                body.extend(sweep(
                    t,
                    len,
                    |k, _| vec![accumulate(SubgroupOp::Sum, "acc2", dev(reg(k)))],
                    |j| vec![accumulate(SubgroupOp::Sum, "acc2", dev(again(j)))],
                ));
                body.extend(reduce(t, SubgroupOp::Sum, "acc2", "acc2_all"));
                var("acc2_all") * var("inv_n")
            }
            NormKind::Rms => var("ms"),
        };
        body.push(let_("rstd", Elem::F32, (var_src + f(self.eps)).rsqrt()));
        // Last pass: normalise, scale, shift, store.
        let kind = self.kind;
        let affine = self.affine;
        let param = &self.param;
        let out = |v: Expr, j: Expr| -> Expr {
            let n = match kind {
                NormKind::Layer => (v - var("mean")) * var("rstd"),
                NormKind::Rms => v * var("rstd"),
            };
            let pi = match affine {
                Affine::Vector => param(j),
                _ => u(0),
            };
            let y = match affine {
                Affine::None => n,
                _ => n * ld("gamma", pi.clone()),
            };
            let y = match (affine, kind) {
                (Affine::None, _) | (_, NormKind::Rms) => y,
                _ => y + ld("beta", pi),
            };
            y.cast(e)
        };
        body.extend(sweep(
            t,
            len,
            |k, j| vec![store("y", var("base") + j.clone(), out(reg(k), j))],
            |j| {
                vec![store(
                    "y",
                    var("base") + j.clone(),
                    out(again(j.clone()), j),
                )]
            },
        ));
        body
    }

    fn buffers(&self) -> Vec<Buffer> {
        let e = self.elem;
        let mut b = vec![buf("x", e, Access::Read)];
        if self.residual {
            b.push(buf("res", e, Access::Read));
        }
        if self.affine != Affine::None {
            b.push(buf("gamma", e, Access::Read));
            if self.kind == NormKind::Layer {
                b.push(buf("beta", e, Access::Read));
            }
        }
        b.push(buf("y", e, Access::ReadWrite));
        if self.residual {
            b.push(buf("sum", e, Access::ReadWrite));
        }
        b
    }
}

fn affine_suffix(a: Affine) -> &'static str {
    match a {
        Affine::None => "_plain",
        Affine::Scalar => "_scalar",
        Affine::Vector => "",
    }
}

/// Layer norm or RMS norm over the last axis (optionally of `x + res`), one workgroup per row.
pub fn norm(cfg: &NormCfg, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
    let stem = format!(
        "{}{}{}_e{:08x}",
        match cfg.kind {
            NormKind::Layer => "layer_norm",
            NormKind::Rms => "rms_norm",
        },
        if cfg.residual { "_add" } else { "" },
        affine_suffix(cfg.affine),
        cfg.eps.to_bits()
    );
    let name = named(&stem, cfg, tune, limits)?;
    check_eps(&name, cfg.eps)?;
    if tune.subgroup == ROWS {
        return norm_rows(cfg, tune, limits, name);
    }
    let rn = RowNorm {
        kind: cfg.kind,
        elem: cfg.elem,
        eps: cfg.eps,
        affine: cfg.affine,
        residual: cfg.residual,
        len: uni("cols"),
        param: Box::new(|j| j),
    };
    let mut body = vec![let_("base", Elem::U32, var("row") * uni("cols"))];
    body.extend(rn.body(tune));
    let prologue = vec![let_(
        "inv_n",
        Elem::F32,
        f(1.0) / uni("cols").cast(Elem::F32),
    )];
    let kernel = Kernel {
        name,
        buffers: rn.buffers(),
        uniforms: vec!["rows".into(), "cols".into()],
        workgroup: [tune.threads, 1, 1],
        shared: red_shared(tune),
        body: row_loop(tune, "rows", prologue, body),
    };
    finish(kernel, GridDim::of("rows", 1), cfg, tune, limits)
}

/// The row design's loop: row `wg·T + tid`, then strided by the whole grid (`T` = threads).
fn rows_loop(t: &Tune, prologue: Vec<Stmt>, body: Vec<Stmt>) -> Vec<Stmt> {
    let mut v = vec![let_("tid", Elem::U32, local_id(0))];
    v.extend(prologue);
    v.push(for_step(
        "row",
        workgroup_id(0) * u(t.threads) + var("tid"),
        uni("rows"),
        num_workgroups(0) * u(t.threads),
        body,
    ));
    v
}

/// Σ of the four lanes of vector local `v`.
fn hsum(v: &str) -> Expr {
    (var(v).lane(0) + var(v).lane(1)) + (var(v).lane(2) + var(v).lane(3))
}

/// A loop over the row's columns `j = 0, 4, …` with `x4` = the vector at `base + j` in scope.
fn row_vectors(x: &dyn Fn(Expr) -> Expr, mut body: Vec<Stmt>) -> Stmt {
    let mut b = vec![let_("x4", Elem::F32x4, x(var("base") + var("j")))];
    b.append(&mut body);
    for_step("j", u(0), uni("cols"), u(4), b)
}

/// Layer or RMS norm, the row design (see [`Tune::subgroup`]).
fn norm_rows(
    cfg: &NormCfg,
    tune: &Tune,
    limits: &Limits,
    name: String,
) -> Result<Generated, CodegenError> {
    let e = cfg.elem;
    let x = |i: Expr| load4("x", i);
    let mut body = vec![
        let_("base", Elem::U32, var("row") * uni("cols")),
        var_("acc", Elem::F32x4, splat4(f(0.0))),
    ];
    let rms = cfg.kind == NormKind::Rms;
    body.push(row_vectors(
        &x,
        vec![assign(
            "acc",
            var("acc")
                + if rms {
                    var("x4") * var("x4")
                } else {
                    var("x4")
                },
        )],
    ));
    let stat = if rms { "ms" } else { "mean" };
    body.push(let_(stat, Elem::F32, hsum("acc") * var("inv_n")));
    let var_src = if rms {
        var("ms")
    } else {
        body.push(var_("acc2", Elem::F32x4, splat4(f(0.0))));
        body.push(row_vectors(
            &x,
            vec![
                let_("d4", Elem::F32x4, var("x4") - splat4(var("mean"))),
                assign("acc2", var("acc2") + var("d4") * var("d4")),
            ],
        ));
        hsum("acc2") * var("inv_n")
    };
    body.push(let_("rstd", Elem::F32, (var_src + f(cfg.eps)).rsqrt()));
    let mut last = vec![];
    for l in 0..4u8 {
        let j = plus4(var("j"), l);
        let v = var("x4").lane(l);
        let n = if rms {
            v * var("rstd")
        } else {
            (v - var("mean")) * var("rstd")
        };
        let y = match cfg.affine {
            Affine::None => n,
            Affine::Scalar => n * ld("gamma", u(0)),
            Affine::Vector => n * ld("gamma", j.clone()),
        };
        let y = match (cfg.affine, rms) {
            (Affine::None, _) | (_, true) => y,
            (Affine::Scalar, false) => y + ld("beta", u(0)),
            (Affine::Vector, false) => y + ld("beta", j.clone()),
        };
        last.push(store("y", var("base") + j, y.cast(e)));
    }
    body.push(row_vectors(&x, last));
    let rn = RowNorm {
        kind: cfg.kind,
        elem: cfg.elem,
        eps: cfg.eps,
        affine: cfg.affine,
        residual: false,
        len: uni("cols"),
        param: Box::new(|j| j),
    };
    let prologue = vec![let_(
        "inv_n",
        Elem::F32,
        f(1.0) / uni("cols").cast(Elem::F32),
    )];
    let kernel = Kernel {
        name,
        buffers: rn.buffers(),
        uniforms: vec!["rows".into(), "cols".into()],
        workgroup: [tune.threads, 1, 1],
        shared: vec![],
        body: rows_loop(tune, prologue, body),
    };
    finish(kernel, GridDim::of("rows", tune.threads), cfg, tune, limits)
}

/// `j + l`, or `j` when `l` is 0.
fn plus4(j: Expr, l: u8) -> Expr {
    if l == 0 {
        j
    } else {
        j + u(u32::from(l))
    }
}

/// Softmax, the row design (see [`Tune::subgroup`]): scores read as vectors (the mask, if any,
/// as scalars through its broadcast uniforms).
fn softmax_rows(cfg: &SoftmaxCfg, tune: &Tune, limits: &Limits) -> Result<Generated, CodegenError> {
    let name = softmax_name(cfg, tune, limits)?;
    let e = cfg.elem;
    let (scale, mask) = (cfg.scale, cfg.mask);
    let x = |i: Expr| load4("x", i);
    let mut body = vec![let_("base", Elem::U32, var("row") * uni("cols"))];
    if mask {
        let term = |k: u32| {
            ((var("row") / uni(&format!("mask_div{k}"))) % uni(&format!("mask_mod{k}")))
                * uni(&format!("mask_stride{k}"))
        };
        body.push(let_("mbase", Elem::U32, term(0) + term(1)));
    }
    // The scores at j..j+4, each lane a scalar (the mask read per lane).
    let lane_score = move |l: u8| -> Expr {
        let xv = var("x4").lane(l);
        let xv = if scale != 1.0 { xv * f(scale) } else { xv };
        if mask {
            let m = ld(
                "mask",
                var("mbase") + plus4(var("j"), l) * uni("mask_col_stride"),
            );
            let m = if e == Elem::F32 {
                m
            } else {
                m.max(f(f32::MIN))
            };
            xv + m
        } else {
            xv
        }
    };
    let lets = move || -> Vec<Stmt> {
        (0..4u8)
            .map(|l| let_(&format!("s{l}"), Elem::F32, lane_score(l)))
            .collect()
    };
    let sv = |l: u8| var(&format!("s{l}"));
    // Pass 1: row max.
    body.push(var_("mx", Elem::F32, f(f32::NEG_INFINITY)));
    let mut p1 = lets();
    p1.push(assign(
        "mx",
        var("mx").max(sv(0).max(sv(1)).max(sv(2).max(sv(3)))),
    ));
    body.push(row_vectors(&x, p1));
    // Pass 2: Σ exp(s − max).
    body.push(var_("sm", Elem::F32, f(0.0)));
    let mut p2 = lets();
    p2.push(assign(
        "sm",
        var("sm")
            + (((sv(0) - var("mx")).exp() + (sv(1) - var("mx")).exp())
                + ((sv(2) - var("mx")).exp() + (sv(3) - var("mx")).exp())),
    ));
    body.push(row_vectors(&x, p2));
    body.push(let_("inv", Elem::F32, f(1.0) / var("sm")));
    // Pass 3: store.
    let mut p3 = lets();
    for l in 0..4u8 {
        p3.push(store(
            "y",
            var("base") + plus4(var("j"), l),
            ((sv(l) - var("mx")).exp() * var("inv")).cast(e),
        ));
    }
    body.push(row_vectors(&x, p3));
    let mut buffers = vec![buf("x", e, Access::Read)];
    let mut uniforms = vec!["rows".to_string(), "cols".to_string()];
    if mask {
        buffers.push(buf("mask", e, Access::Read));
        uniforms.extend(MASK_UNIFORMS.iter().map(|s| s.to_string()));
    }
    buffers.push(buf("y", e, Access::ReadWrite));
    let kernel = Kernel {
        name,
        buffers,
        uniforms,
        workgroup: [tune.threads, 1, 1],
        shared: vec![],
        body: rows_loop(tune, vec![], body),
    };
    finish(kernel, GridDim::of("rows", tune.threads), cfg, tune, limits)
}

/// Group norm (or instance norm) over `x [N, C, spatial]`, one workgroup per `(n, group)`.
pub fn group_norm(
    cfg: &GroupNormCfg,
    tune: &Tune,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let stem = format!(
        "{}{}_e{:08x}",
        if cfg.instance {
            "instance_norm"
        } else {
            "group_norm"
        },
        affine_suffix(cfg.affine),
        cfg.eps.to_bits()
    );
    let name = named(&stem, cfg, tune, limits)?;
    check_eps(&name, cfg.eps)?;
    let (uniforms, prologue, param): (Vec<&str>, Vec<Stmt>, ParamIndex) = if cfg.instance {
        (
            vec!["blocks", "channels", "spatial"],
            vec![let_("len", Elem::U32, uni("spatial"))],
            Box::new(|_| var("row") % uni("channels")),
        )
    } else {
        (
            vec!["blocks", "groups", "channels_per_group", "spatial"],
            vec![let_(
                "len",
                Elem::U32,
                uni("channels_per_group") * uni("spatial"),
            )],
            Box::new(|j| {
                (var("row") % uni("groups")) * uni("channels_per_group") + j / uni("spatial")
            }),
        )
    };
    let mut prologue = prologue;
    prologue.push(let_(
        "inv_n",
        Elem::F32,
        f(1.0) / var("len").cast(Elem::F32),
    ));
    let rn = RowNorm {
        kind: NormKind::Layer,
        elem: cfg.elem,
        eps: cfg.eps,
        affine: cfg.affine,
        residual: false,
        len: var("len"),
        param,
    };
    let mut body = vec![let_("base", Elem::U32, var("row") * var("len"))];
    body.extend(rn.body(tune));
    let kernel = Kernel {
        name,
        buffers: rn.buffers(),
        uniforms: uniforms.into_iter().map(String::from).collect(),
        workgroup: [tune.threads, 1, 1],
        shared: red_shared(tune),
        body: row_loop(tune, "blocks", prologue, body),
    };
    finish(kernel, GridDim::of("blocks", 1), cfg, tune, limits)
}

/// Inference batch norm `y = x · scale[c] + shift[c]` over `x [N, C, spatial]` (elementwise).
pub fn batch_norm(
    cfg: &BatchNormCfg,
    tune: &Tune,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let name = named("batch_norm", cfg, tune, limits)?;
    let e = cfg.elem;
    let t = tune.threads;
    let body = vec![
        let_("stride", Elem::U32, num_workgroups(0) * u(t)),
        for_step(
            "i",
            workgroup_id(0) * u(t) + local_id(0),
            uni("n"),
            var("stride"),
            vec![
                let_(
                    "c",
                    Elem::U32,
                    (var("i") / uni("spatial")) % uni("channels"),
                ),
                store(
                    "y",
                    var("i"),
                    (ld("x", var("i")) * ld("scale", var("c")) + ld("shift", var("c"))).cast(e),
                ),
            ],
        ),
    ];
    let kernel = Kernel {
        name,
        buffers: vec![
            buf("x", e, Access::Read),
            buf("scale", e, Access::Read),
            buf("shift", e, Access::Read),
            buf("y", e, Access::ReadWrite),
        ],
        uniforms: vec!["n".into(), "channels".into(), "spatial".into()],
        workgroup: [t, 1, 1],
        shared: vec![],
        body,
    };
    finish(
        kernel,
        GridDim::of("n", t * tune.per_thread),
        cfg,
        tune,
        limits,
    )
}

/// Representative configurations of this family's kernels, for validation tests: each in f32,
/// f16 and bf16 with the WebGPU default tunables, plus subgroup and CUDA-sized variants in f32.
pub fn catalog() -> Vec<Generated> {
    let web = Limits::webgpu();
    let mut out = vec![];
    let mut add = |cfg: &dyn NormConfig, tune: Option<Tune>, limits: &Limits| {
        let tune = tune.unwrap_or_else(|| Tune::default_for(cfg, limits));
        out.push(
            cfg.generate(&tune, limits)
                .expect("catalog configurations are valid"),
        );
    };
    for elem in [Elem::F32, Elem::F16, Elem::BF16] {
        let layer = |affine, residual| NormCfg {
            elem,
            kind: NormKind::Layer,
            eps: 1e-5,
            affine,
            residual,
        };
        add(
            &SoftmaxCfg {
                elem,
                scale: 1.0,
                mask: false,
            },
            None,
            &web,
        );
        add(
            &SoftmaxCfg {
                elem,
                scale: 0.125,
                mask: true,
            },
            None,
            &web,
        );
        add(&layer(Affine::Vector, false), None, &web);
        add(&layer(Affine::Vector, true), None, &web);
        add(
            &NormCfg {
                elem,
                kind: NormKind::Rms,
                eps: 1e-6,
                affine: Affine::Vector,
                residual: false,
            },
            None,
            &web,
        );
        add(
            &GroupNormCfg {
                elem,
                eps: 1e-5,
                affine: Affine::Vector,
                instance: false,
            },
            None,
            &web,
        );
        add(
            &GroupNormCfg {
                elem,
                eps: 1e-5,
                affine: Affine::Vector,
                instance: true,
            },
            None,
            &web,
        );
        add(&BatchNormCfg { elem }, None, &web);
    }
    let sg = Tune {
        threads: 256,
        per_thread: 4,
        subgroup: WARP,
    };
    add(
        &SoftmaxCfg {
            elem: Elem::F32,
            scale: 0.125,
            mask: true,
        },
        Some(sg),
        &web,
    );
    add(
        &NormCfg {
            elem: Elem::F32,
            kind: NormKind::Rms,
            eps: 1e-6,
            affine: Affine::Scalar,
            residual: true,
        },
        Some(sg),
        &web,
    );
    add(
        &NormCfg {
            elem: Elem::F32,
            kind: NormKind::Layer,
            eps: 1e-12,
            affine: Affine::None,
            residual: false,
        },
        Some(Tune {
            threads: 1024,
            per_thread: 4,
            subgroup: 0,
        }),
        &Limits::cuda(),
    );
    out
}
