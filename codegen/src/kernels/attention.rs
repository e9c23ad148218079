//! Fused attention, `out = softmax(q kᵀ·scale [+ mask] [causal] [window]) v`, without ever
//! materialising the `[sq, sk]` score matrix: the semantics of `transfuse_ir::Op::Attention`
//! (`runtime/src/cpu/fused.rs` is the reference). Storage is f32, f16 or bf16 (q, k, v, mask and
//! out share it); every computation is f32.
//!
//! # Operands, uniforms, grid
//!
//! Buffers, in order: `q [bh, sq, d]`, `k [bh/g, sk, d]`, `v [bh/g, sk, dv]`, `[mask]`,
//! `out [bh, sq, dv]`, all contiguous, the batch dimensions flattened into `bh` (batch·heads);
//! `g` is [`AttentionCfg::group`], the query heads per key/value head (grouped-query and
//! multi-query attention: batch-head `bh` reads k/v batch-head `bh / g`, never a copy per
//! query head; `_g{g}` in the kernel name).
//! Uniforms: `bh, heads, sq, sk` and, with a mask, `mask_sb, mask_sh, mask_sq, mask_sk`: the
//! additive mask's element strides along batch, head, query and key (0 along broadcast axes);
//! score `(bh, i, j)` reads `mask[(bh / heads)·mask_sb + (bh % heads)·mask_sh + i·mask_sq +
//! j·mask_sk]`. `scale`, `causal`, `window`, head dims and storage type are compile-time
//! constants and make the kernel name (`attention_f16_d64_causal_mask`,
//! `attention_split_f32_d128_w256`, `_dv{dv}` when `dv ≠ d`, `_s{bits}` when the scale is not
//! `1/√d`); the tunables do not.
//!
//! # Masking (exactly the reference's)
//!
//! Query `i` sits at position `pos = i + sk − sq`. A key `j` is *seen* when (causal) `j ≤ pos`
//! and (window `w`) `j > pos − w`. The score is `x = (q·k)·scale`, then `x + mask` when seen and
//! `x + f32::MIN` when not (never `−inf`): a row where everything is masked has all scores equal
//! to `f32::MIN` and gives the uniform average of `v` over all `sk` keys, finite, like the CPU
//! kernel. The running max starts at `f32::MIN` (not `−inf`), so every rescale factor
//! `exp(m_old − m_new)` is finite: no `inf − inf` anywhere.
//! One deliberate difference: `−inf` mask values (also an `f32::MIN` mask stored as f16, where
//! it saturates to `−inf`) on every key a row sees give the mean of `v` over all keys here; the
//! reference gives NaN (or, with some keys hidden by position, the mean over those).
//!
//! # Prefill ([`flash`]): one workgroup per (block of `block_q` queries, `bh`)
//!
//! Grid `(ceil(sq / block_q), bh, 1)`. The query tile is read once into shared memory; key/value
//! tiles of `block_k` keys then stream through one shared region (the K tile, rows padded to
//! `d + 1` against bank conflicts, is overwritten by the V tile once the scores are done). Per
//! tile, four phases separated by barriers:
//!
//! 1. load the K tile;
//! 2. scores: the `block_q × block_k` dot products, spread over all threads, masked as above,
//!    into a shared score tile;
//! 3. online softmax, one thread per query row: tile max, new running max `m'`,
//!    `α = exp(m − m')`, probabilities `p = exp(s − m')` written over the scores, running sum
//!    `l = l·α + Σp`; meanwhile every thread loads the V tile;
//! 4. accumulate: `threads / block_q` threads per row, each owning `ceil(dv / (threads /
//!    block_q))` output columns in registers: `acc = acc·α + Σ p·v`.
//!
//! At the end `out = acc / l`. Key tiles that the causal/window mask hides from every row of the
//! block are skipped: this is exact, since a masked key contributes `exp(f32::MIN − m) = 0` to
//! any row that sees a key. A row that sees none (running max still `f32::MIN` at the end:
//! `sq > sk` with causal, causal with window 0, or a mask of `f32::MIN` over every seen key)
//! instead takes the mean of `v` over all `sk` keys, read directly: what the reference gives.
//!
//! # Prefill on CPU adapters: the register design (`rows > 0`)
//!
//! On llvmpipe every load from storage or shared memory is a loop over the 8 SIMD lanes, so
//! what counts is loads per multiply-add (`notes/wgsl-on-lavapipe.md`); the tiled design above
//! does 1–2 scalar loads per FMA there. When [`Limits::kind`] is [`DeviceKind::Cpu`] (and both
//! head dims are multiples of 4) the default is instead: a workgroup of `threads` (8, one
//! llvmpipe subgroup) invocations, each holding `rows` query rows — row `q0 + r·threads + tid`
//! — in registers: q as `d/4` vectors, the running max and sum, `dv/4` accumulator vectors.
//! Per tile of `block_k` keys (the same causal/window tile range as above, so fully hidden
//! tiles are skipped), each K vector is loaded once (a vec4 load straight from storage) and
//! dotted with every row's q; each row's online softmax then rescales its accumulators once;
//! each V vector is loaded once and added into every row. No shared memory, no barriers: all
//! indices are constants after unrolling over rows × tile keys × head-dim vectors, so the
//! values stay in registers (llvmpipe turns dynamically indexed local arrays into memory). Keys
//! past `sk` read the last key and weigh 0; rows past `sq` read the last row and store
//! nothing; a row that saw no key takes the mean of `v`, as above. Bounds on the unrolling
//! (compile time): `rows ≤ 16`, `block_k ≤ 8`, `rows·(d + dv)/4 ≤ 512` vectors; defaults
//! `rows = clamp(512 / max(d, dv), 1, 8)`, `block_k = 2` (at d = 64 on lavapipe 2 keys compiled cold in ~6 s against 17 s for 4, and ran as fast).
//!
//! # Decode
//!
//! A query length of 1 (one new token against a KV cache) runs the split-KV kernels of
//! [`super::decode`] (flash-decoding: the keys split across workgroups, partial softmax per
//! split, then a combine), which reuse this module's masking, score and column helpers.
//!
//! # Tunables
//!
//! [`AttentionTunables`]: `block_q`, `block_k`, `threads`, `rows` (0: the tiled design; in
//! the register design `block_q = threads · rows`). Prefill defaults on GPUs are the largest tiles
//! up to 32 × 32 that fit the target's shared memory, with 256 threads (f32 under WebGPU's
//! 16 KiB: 32 × 32 for d = 32, 32 × 16 for d = 64, 16 × 8 for d = 128; under CUDA's 48 KiB
//! 32 × 32 up to d = 128). The search spaces
//! list, per tunable, the values that build with the others at their defaults.
//!
//! # Limits and refusals
//!
//! Barriers only sit in uniform control flow: loop bounds with barriers inside come from
//! uniforms, workgroup ids and constants; per-thread conditions guard only loads, stores and
//! barrier-free loops. Refused with [`CodegenError::Kernel`] naming the kernel: a storage type
//! other than f32/f16/bf16, head dims outside `1..=256`, a non-finite scale, zero tunables,
//! prefill `threads` not a multiple of `block_q` or with more threads per row than `dv`
//! columns, more than 16 accumulator registers per thread, and anything
//! over the target's threads or shared memory ([`Limits`]). bf16 kernels print only as CUDA.
//! Indices are u32 (tensors below 2³² elements); the grid is at most 65 535 along x and y on
//! WebGPU, so `bh` and `ceil(sq / block_q)` must stay below that there.

use super::{check_limits, DeviceKind, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// The score of a masked key is `x + MASKED`: finite, like the reference.
pub(super) const MASKED: f32 = f32::MIN;
/// Largest head dims accepted.
const MAX_HEAD_DIM: u32 = 256;
/// Most accumulator registers (output columns) per thread.
pub(super) const MAX_COLS: u32 = 16;
/// Query / key tile sizes worth trying.
const BLOCKS: [u32; 7] = [2, 4, 8, 16, 32, 64, 128];
/// Decode key tiles worth trying.
pub(super) const DECODE_BLOCKS: [u32; 6] = [32, 64, 128, 256, 512, 1024];
/// Thread counts worth trying.
pub(super) const THREADS: [u32; 6] = [32, 64, 128, 256, 512, 1024];
/// Register design: invocations per workgroup (llvmpipe's subgroup is 8), key tile.
const LANES_THREADS: u32 = 8;
const LANES_BLOCK_K: u32 = 2;
/// Register design: thread counts and rows per invocation worth trying (0: tiled design).
const LANES_THREADS_SPACE: [u32; 4] = [4, 8, 16, 32];
const ROWS: [u32; 6] = [0, 1, 2, 4, 8, 16];
/// Register design: most rows per invocation, keys per tile, and vector registers per
/// invocation (`rows · (d + dv) / 4`): the kernel is unrolled over all three, so these bound
/// its size (llvmpipe's cold compile of a fully unrolled kernel takes seconds).
const MAX_ROWS: u32 = 16;
const MAX_LANES_BLOCK_K: u32 = 8;
const MAX_VEC_REGS: u32 = 512;

/// What an attention kernel computes (fixed at compile time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionCfg {
    /// Storage type of q, k, v, mask and out: F32, F16 or BF16.
    pub elem: Elem,
    /// Head dim of q and k (`d`).
    pub head_dim: u32,
    /// Head dim of v and out.
    pub dv: u32,
    /// Multiplies `q·k` before the mask is added.
    pub scale: f32,
    /// Query `i` sees keys `j <= i + sk - sq` only.
    pub causal: bool,
    /// And (with or without `causal`) keys `j > i + sk - sq - window` only.
    pub window: Option<u32>,
    /// An additive mask buffer is read (strides as uniforms).
    pub mask: bool,
    /// Query heads per key/value head (grouped-query attention; 1: one each): batch-head
    /// `bh` reads k/v rows of batch-head `bh / group`, whose buffers hold `bh / group` heads.
    pub group: u32,
}

impl AttentionCfg {
    /// The kernel name for this configuration (`decode`: the `attention_decode_…` stem that
    /// [`super::decode`]'s split and combine kernels rename).
    pub fn kernel_name(&self, decode: bool) -> String {
        let mut n = format!(
            "attention_{}{}_d{}",
            if decode { "decode_" } else { "" },
            elem_name(self.elem),
            self.head_dim
        );
        if self.dv != self.head_dim {
            n.push_str(&format!("_dv{}", self.dv));
        }
        if self.causal {
            n.push_str("_causal");
        }
        if let Some(w) = self.window {
            n.push_str(&format!("_w{w}"));
        }
        if self.mask {
            n.push_str("_mask");
        }
        if self.group > 1 {
            n.push_str(&format!("_g{}", self.group));
        }
        if self.scale.to_bits() != default_scale(self.head_dim).to_bits() {
            n.push_str(&format!("_s{:08x}", self.scale.to_bits()));
        }
        n
    }

    /// Causal or windowed: some keys are hidden by position.
    fn positional(&self) -> bool {
        self.causal || self.window.is_some()
    }
}

/// `1/√d`, the usual scale (rounded from f64, as the graph's scalars are).
pub fn default_scale(head_dim: u32) -> f32 {
    (1.0 / f64::from(head_dim).sqrt()) as f32
}

/// The tunables of the attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionTunables {
    /// Queries per workgroup (prefill); 1 for decode.
    pub block_q: u32,
    /// Keys per shared-memory tile.
    pub block_k: u32,
    /// Threads per workgroup.
    pub threads: u32,
    /// Prefill design: 0 is the tiled shared-memory design; `n > 0` the register design, each
    /// invocation holding `n` query rows (`block_q = threads · n`). Decode: always 0.
    pub rows: u32,
}

impl AttentionTunables {
    /// The prefill default under `limits`: the largest tiles (up to 32 × 32) that fit the
    /// shared memory, with 256 threads (or fewer, keeping `threads / block_q <= dv`).
    ///
    /// On a CPU adapter ([`DeviceKind::Cpu`]) the register design instead, when the head dims
    /// allow vector loads: one 8-invocation workgroup (llvmpipe's subgroup), `rows` query rows
    /// per invocation (8 up to d = 64, then fewer, keeping the unrolled kernel's size and
    /// llvmpipe's cold compile time modest), 2-key tiles.
    pub fn default_for(cfg: &AttentionCfg, limits: &Limits) -> Self {
        if limits.kind == DeviceKind::Cpu {
            let rows = (512 / cfg.head_dim.max(cfg.dv)).clamp(1, 8);
            let t = AttentionTunables {
                block_q: LANES_THREADS * rows,
                block_k: LANES_BLOCK_K,
                threads: LANES_THREADS,
                rows,
            };
            if build_flash(cfg, &t, limits).is_ok() {
                return t;
            }
        }
        const PAIRS: [(u32, u32); 12] = [
            (32, 32),
            (32, 16),
            (16, 32),
            (16, 16),
            (16, 8),
            (8, 16),
            (8, 8),
            (8, 4),
            (4, 4),
            (2, 4),
            (1, 4),
            (1, 1),
        ];
        for (block_q, block_k) in PAIRS {
            for threads in [256, 128, 64, 32] {
                let t = AttentionTunables {
                    block_q,
                    block_k,
                    threads,
                    rows: 0,
                };
                if build_flash(cfg, &t, limits).is_ok() {
                    return t;
                }
            }
        }
        AttentionTunables {
            block_q: 1,
            block_k: 1,
            threads: 32,
            rows: 0,
        }
    }

    /// The prefill search space under `limits`: for each tunable, the values worth trying that
    /// are valid with the others at their defaults (always including the default).
    pub fn space(cfg: &AttentionCfg, limits: &Limits) -> Vec<Tunable> {
        let t = Self::default_for(cfg, limits);
        t.tunables(&|x| build_flash(cfg, x, limits).is_ok(), &BLOCKS, &BLOCKS)
    }

    /// `self` with tunable `name` set to `v`; in the register design `block_q` follows
    /// `threads · rows`. `None` for an unknown name.
    pub fn with(&self, name: &str, v: u32) -> Option<Self> {
        let mut x = *self;
        match name {
            "block_q" => x.block_q = v,
            "block_k" => x.block_k = v,
            "threads" => {
                x.threads = v;
                if x.rows > 0 {
                    x.block_q = v * x.rows;
                }
            }
            "rows" => {
                x.rows = v;
                if v > 0 {
                    x.block_q = x.threads * v;
                }
            }
            _ => return None,
        }
        Some(x)
    }

    /// Each tunable with the candidate values valid while the others keep `self`'s values.
    fn tunables(
        &self,
        valid: &dyn Fn(&AttentionTunables) -> bool,
        qs: &[u32],
        ks: &[u32],
    ) -> Vec<Tunable> {
        let one = |name: &'static str, value: u32, cands: &[u32]| {
            let set = |x| self.with(name, x).expect("known tunable");
            let mut space: Vec<u32> = cands.iter().copied().filter(|&x| valid(&set(x))).collect();
            if !space.contains(&value) {
                space.push(value);
                space.sort_unstable();
            }
            Tunable { name, value, space }
        };
        let threads: &[u32] = if self.rows > 0 {
            &LANES_THREADS_SPACE
        } else {
            &THREADS
        };
        vec![
            one("block_q", self.block_q, qs),
            one("block_k", self.block_k, ks),
            one("threads", self.threads, threads),
            one("rows", self.rows, &ROWS),
        ]
    }
}

pub(super) fn elem_name(e: Elem) -> &'static str {
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

pub(super) fn kernel_err(name: &str, msg: String) -> CodegenError {
    CodegenError::Kernel {
        kernel: name.to_string(),
        msg,
    }
}

/// Checks the configuration and the tunables that every kernel shares.
pub(super) fn check_common(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    name: &str,
) -> Result<(), CodegenError> {
    if !matches!(cfg.elem, Elem::F32 | Elem::F16 | Elem::BF16) {
        return Err(kernel_err(
            name,
            format!(
                "storage type {} is not f32, f16 or bf16",
                elem_name(cfg.elem)
            ),
        ));
    }
    for (what, v) in [("head_dim", cfg.head_dim), ("dv", cfg.dv)] {
        if v == 0 || v > MAX_HEAD_DIM {
            return Err(kernel_err(
                name,
                format!("{what} = {v} is outside 1..={MAX_HEAD_DIM}"),
            ));
        }
    }
    if !cfg.scale.is_finite() {
        return Err(kernel_err(
            name,
            format!("scale {} is not finite", cfg.scale),
        ));
    }
    for (what, v) in [
        ("block_q", t.block_q),
        ("block_k", t.block_k),
        ("threads", t.threads),
    ] {
        if v == 0 {
            return Err(kernel_err(name, format!("{what} = 0")));
        }
    }
    Ok(())
}

/// The buffers: q, k, v, [mask], out.
fn buffers(cfg: &AttentionCfg) -> Vec<Buffer> {
    let b = |name: &str, access| Buffer {
        name: name.into(),
        elem: cfg.elem,
        access,
    };
    let mut v = vec![
        b("q", Access::Read),
        b("k", Access::Read),
        b("v", Access::Read),
    ];
    if cfg.mask {
        v.push(b("mask", Access::Read));
    }
    v.push(b("out", Access::ReadWrite));
    v
}

fn uniforms(cfg: &AttentionCfg) -> Vec<String> {
    let mut u = vec!["bh", "heads", "sq", "sk"];
    if cfg.mask {
        u.extend(["mask_sb", "mask_sh", "mask_sq", "mask_sk"]);
    }
    u.into_iter().map(String::from).collect()
}

pub(super) fn shared(name: &str, elem: Elem, len: u32) -> Shared {
    Shared {
        name: name.into(),
        elem,
        len,
    }
}

/// The key/value batch-head of workgroup `bhi`: `bhi / group` (grouped-query attention).
pub(super) fn kv_head(cfg: &AttentionCfg) -> Expr {
    if cfg.group > 1 {
        var("bhi") / u(cfg.group)
    } else {
        var("bhi")
    }
}

/// `let`s common to both kernels: the head (`bhi`), row bases of q/out (`qrow`) and k/v
/// (`krow`), and the mask's base offset (`mbase`).
fn prologue(cfg: &AttentionCfg) -> Vec<Stmt> {
    let mut s = vec![
        let_("tid", Elem::U32, local_id(0)),
        let_("bhi", Elem::U32, workgroup_id(1)),
        let_("qrow", Elem::U32, var("bhi") * uni("sq")),
        let_("krow", Elem::U32, kv_head(cfg) * uni("sk")),
    ];
    if cfg.mask {
        s.push(let_(
            "mbase",
            Elem::U32,
            var("bhi") / uni("heads") * uni("mask_sb") + var("bhi") % uni("heads") * uni("mask_sh"),
        ));
    }
    s
}

/// The range of key tiles `[kt_lo, kt_hi)` that a block of `rows` queries starting at query
/// `q0` must visit: tiles hidden from every row by causality or the window are skipped (see the
/// module docs for why this is exact). Uniform across the workgroup.
pub(super) fn tile_range(cfg: &AttentionCfg, q0: Expr, rows: u32, bk: u32) -> Vec<Stmt> {
    let mut s = vec![];
    // Keys [kstart, kend) may be seen by some row of the block.
    let kend = if cfg.causal {
        // The last row sees keys j <= q0 + rows - 1 + sk - sq.
        let last = q0.clone() + u(rows) + uni("sk");
        select(
            last.clone().gt(uni("sq")),
            (last - uni("sq")).min(uni("sk")),
            u(0),
        )
    } else {
        uni("sk")
    };
    s.push(let_("kend", Elem::U32, kend));
    let kstart = match cfg.window {
        // The first row sees keys j > q0 + sk - sq - w.
        Some(w) => {
            let first = q0 + uni("sk") + u(1);
            select(
                first.clone().gt(uni("sq") + u(w)),
                first - uni("sq") - u(w),
                u(0),
            )
        }
        None => u(0),
    };
    let kt_lo = if cfg.window.is_some() {
        kstart / u(bk)
    } else {
        u(0)
    };
    s.push(let_("kt_lo", Elem::U32, kt_lo));
    s.push(let_("kt_hi", Elem::U32, (var("kend") + u(bk - 1)) / u(bk)));
    s
}

/// Statements defining `score` (f32) from `dot` for query `i` and key `j` (u32 expressions);
/// the mask is read only where `guard` holds (`i < sq`, `j < sk` must hold when it is `None`).
pub(super) fn score(cfg: &AttentionCfg, i: Expr, j: Expr, guard: Option<Expr>) -> Vec<Stmt> {
    score_named(cfg, i, j, guard, "dot", "")
}

/// [`score`] from the f32 local `dot`, its locals suffixed with `sfx` (`x{sfx}`, `mv{sfx}`,
/// `score{sfx}`), for unrolled code.
fn score_named(
    cfg: &AttentionCfg,
    i: Expr,
    j: Expr,
    guard: Option<Expr>,
    dot: &str,
    sfx: &str,
) -> Vec<Stmt> {
    let (xn, mvn, scn) = (format!("x{sfx}"), format!("mv{sfx}"), format!("score{sfx}"));
    let mut s = vec![let_(&xn, Elem::F32, var(dot) * f(cfg.scale))];
    let mut added = var(&xn);
    if cfg.mask {
        let load_mask = load(
            "mask",
            var("mbase") + i.clone() * uni("mask_sq") + j.clone() * uni("mask_sk"),
        )
        .cast(Elem::F32);
        match guard {
            Some(g) => {
                s.push(var_(&mvn, Elem::F32, f(0.0)));
                s.push(if_(g, vec![assign(&mvn, load_mask)]));
            }
            None => s.push(let_(&mvn, Elem::F32, load_mask)),
        }
        added = var(&xn) + var(&mvn);
    }
    let value = if cfg.positional() {
        // Positions in u32 without negatives: j <= i + sk - sq  ⇔  j + sq <= i + sk, and
        // j > i + sk - sq - w  ⇔  j + sq + w > i + sk.
        let causal = cfg
            .causal
            .then(|| (j.clone() + uni("sq")).le(i.clone() + uni("sk")));
        let window = cfg.window.map(|w| (j + uni("sq") + u(w)).gt(i + uni("sk")));
        let seen = match (causal, window) {
            (Some(a), Some(b)) => a.and(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => unreachable!("positional"),
        };
        select(seen, added, var(&xn) + f(MASKED))
    } else {
        added
    };
    s.push(let_(&scn, Elem::F32, value));
    s
}

/// For a row that saw no key: the mean of `v` over all `sk` keys, stored to `out[orow, col]`.
fn mean_of_v(cfg: &AttentionCfg, orow: Expr, col: Expr) -> Vec<Stmt> {
    vec![
        var_("tot", Elem::F32, f(0.0)),
        for_(
            "j",
            u(0),
            uni("sk"),
            vec![assign(
                "tot",
                var("tot")
                    + load("v", (var("krow") + var("j")) * u(cfg.dv) + col.clone()).cast(Elem::F32),
            )],
        ),
        store(
            "out",
            orow * u(cfg.dv) + col,
            (var("tot") / uni("sk").cast(Elem::F32).max(f(1.0))).cast(cfg.elem),
        ),
    ]
}

/// `body` for each of this thread's output columns `col = first + stride·ii`, `ii < cpt`,
/// guarded by `col < dv` when the columns do not divide evenly.
pub(super) fn for_cols(
    cfg: &AttentionCfg,
    first: &str,
    stride: u32,
    cpt: u32,
    body: Vec<Stmt>,
) -> Stmt {
    let mut inner = vec![let_("col", Elem::U32, var(first) + var("ii") * u(stride))];
    if stride * cpt != cfg.dv {
        inner.push(if_(var("col").lt(u(cfg.dv)), body));
    } else {
        inner.extend(body);
    }
    for_("ii", u(0), u(cpt), inner)
}

/// Flash-style prefill attention (see the module docs).
pub fn flash(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let kernel = build_flash(cfg, t, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("sq", t.block_q),
            GridDim::of("bh", 1),
            GridDim::one(),
        ],
        tunables: t.tunables(&|x| build_flash(cfg, x, limits).is_ok(), &BLOCKS, &BLOCKS),
    })
}

fn build_flash(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    limits: &Limits,
) -> Result<Kernel, CodegenError> {
    if t.rows > 0 {
        return build_lanes(cfg, t, limits);
    }
    let name = cfg.kernel_name(false);
    check_common(cfg, t, &name)?;
    let (bq, bk, nt, d, dv) = (t.block_q, t.block_k, t.threads, cfg.head_dim, cfg.dv);
    if nt % bq != 0 {
        return Err(kernel_err(
            &name,
            format!("threads = {nt} is not a multiple of block_q = {bq}"),
        ));
    }
    // Threads per query row in the accumulate phase, and columns per thread.
    let g = nt / bq;
    if g > dv {
        return Err(kernel_err(
            &name,
            format!("threads / block_q = {g} exceeds dv = {dv} (idle threads)"),
        ));
    }
    let cpt = dv.div_ceil(g);
    if cpt > MAX_COLS {
        return Err(kernel_err(
            &name,
            format!("{cpt} accumulator columns per thread exceed {MAX_COLS}: use more threads"),
        ));
    }
    let e = cfg.elem;
    let kstride = d + 1; // padded K rows: conflict-free reads in the score phase
    let sstride = bk + 1; // padded score rows: conflict-free reads in the softmax phase
    let kv_len = bk * kstride.max(dv);
    let zero = || f(0.0).cast(e);

    let mut body = prologue(cfg);
    body.extend([
        let_("q0", Elem::U32, workgroup_id(0) * u(bq)),
        let_("row", Elem::U32, var("tid") / u(g)),
        let_("cg", Elem::U32, var("tid") % u(g)),
        var_("m_run", Elem::F32, f(MASKED)),
        var_("l_run", Elem::F32, f(0.0)),
        Stmt::LocalArray("acc".into(), Elem::F32, cpt),
        // The query tile (zeros past sq).
        for_step(
            "idx",
            var("tid"),
            u(bq * d),
            u(nt),
            vec![
                let_("i", Elem::U32, var("q0") + var("idx") / u(d)),
                Stmt::If(
                    var("i").lt(uni("sq")),
                    vec![store_shared(
                        "qs",
                        var("idx"),
                        load("q", (var("qrow") + var("i")) * u(d) + var("idx") % u(d)),
                    )],
                    vec![store_shared("qs", var("idx"), zero())],
                ),
            ],
        ),
    ]);
    body.extend(tile_range(cfg, var("q0"), bq, bk));

    let mut tile = vec![
        let_("k0", Elem::U32, var("kt") * u(bk)),
        let_("nvalid", Elem::U32, u(bk).min(uni("sk") - var("k0"))),
        // 1. K tile (zeros past sk).
        for_step(
            "idx",
            var("tid"),
            u(bk * d),
            u(nt),
            vec![
                let_("c", Elem::U32, var("idx") / u(d)),
                let_("kk", Elem::U32, var("idx") % u(d)),
                let_("j", Elem::U32, var("k0") + var("c")),
                Stmt::If(
                    var("j").lt(uni("sk")),
                    vec![store_shared(
                        "kv",
                        var("c") * u(kstride) + var("kk"),
                        load("k", (var("krow") + var("j")) * u(d) + var("kk")),
                    )],
                    vec![store_shared(
                        "kv",
                        var("c") * u(kstride) + var("kk"),
                        zero(),
                    )],
                ),
            ],
        ),
        Stmt::Barrier,
    ];
    // 2. Scores.
    let mut sc = vec![
        let_("r", Elem::U32, var("e") / u(bk)),
        let_("c", Elem::U32, var("e") % u(bk)),
        var_("dot", Elem::F32, f(0.0)),
        for_(
            "kk",
            u(0),
            u(d),
            vec![assign(
                "dot",
                var("dot")
                    + load_shared("qs", var("r") * u(d) + var("kk")).cast(Elem::F32)
                        * load_shared("kv", var("c") * u(kstride) + var("kk")).cast(Elem::F32),
            )],
        ),
        let_("i", Elem::U32, var("q0") + var("r")),
        let_("j", Elem::U32, var("k0") + var("c")),
    ];
    sc.extend(score(
        cfg,
        var("i"),
        var("j"),
        Some(var("i").lt(uni("sq")).and(var("j").lt(uni("sk")))),
    ));
    sc.push(store_shared(
        "sc",
        var("r") * u(sstride) + var("c"),
        var("score"),
    ));
    tile.push(for_step("e", var("tid"), u(bq * bk), u(nt), sc));
    tile.push(Stmt::Barrier);
    // 3. Online softmax (one thread per row) and the V tile (everyone).
    let srow = || var("tid") * u(sstride) + var("c");
    tile.push(if_(
        var("tid").lt(u(bq)),
        vec![
            var_("mt", Elem::F32, f(MASKED)),
            for_(
                "c",
                u(0),
                var("nvalid"),
                vec![assign("mt", var("mt").max(load_shared("sc", srow())))],
            ),
            let_("mn", Elem::F32, var("m_run").max(var("mt"))),
            let_("a", Elem::F32, (var("m_run") - var("mn")).exp()),
            assign("l_run", var("l_run") * var("a")),
            for_(
                "c",
                u(0),
                var("nvalid"),
                vec![
                    let_(
                        "p",
                        Elem::F32,
                        (load_shared("sc", srow()) - var("mn")).exp(),
                    ),
                    store_shared("sc", srow(), var("p")),
                    assign("l_run", var("l_run") + var("p")),
                ],
            ),
            store_shared("alpha", var("tid"), var("a")),
            assign("m_run", var("mn")),
        ],
    ));
    tile.push(for_step(
        "idx",
        var("tid"),
        u(bk * dv),
        u(nt),
        vec![
            let_("j", Elem::U32, var("k0") + var("idx") / u(dv)),
            Stmt::If(
                var("j").lt(uni("sk")),
                vec![store_shared(
                    "kv",
                    var("idx"),
                    load("v", (var("krow") + var("j")) * u(dv) + var("idx") % u(dv)),
                )],
                vec![store_shared("kv", var("idx"), zero())],
            ),
        ],
    ));
    tile.push(Stmt::Barrier);
    // 4. Accumulate.
    tile.push(let_("a", Elem::F32, load_shared("alpha", var("row"))));
    tile.push(for_(
        "ii",
        u(0),
        u(cpt),
        vec![Stmt::StoreLocal(
            "acc".into(),
            var("ii"),
            load_local("acc", var("ii")) * var("a"),
        )],
    ));
    tile.push(for_(
        "c",
        u(0),
        var("nvalid"),
        vec![
            let_(
                "p",
                Elem::F32,
                load_shared("sc", var("row") * u(sstride) + var("c")),
            ),
            for_cols(
                cfg,
                "cg",
                g,
                cpt,
                vec![Stmt::StoreLocal(
                    "acc".into(),
                    var("ii"),
                    load_local("acc", var("ii"))
                        + var("p")
                            * load_shared("kv", var("c") * u(dv) + var("col")).cast(Elem::F32),
                )],
            ),
        ],
    ));
    tile.push(Stmt::Barrier);
    body.push(for_("kt", var("kt_lo"), var("kt_hi"), tile));

    // Finish: per-row statistics to every thread of the row, then out = acc / l.
    body.push(if_(
        var("tid").lt(u(bq)),
        vec![
            store_shared("ms", var("tid"), var("m_run")),
            store_shared("ls", var("tid"), var("l_run")),
        ],
    ));
    body.push(Stmt::Barrier);
    body.push(let_("oi", Elem::U32, var("q0") + var("row")));
    body.push(if_(
        var("oi").lt(uni("sq")),
        vec![
            let_("orow", Elem::U32, var("qrow") + var("oi")),
            let_("lr", Elem::F32, load_shared("ls", var("row"))),
            Stmt::If(
                load_shared("ms", var("row")).eq_(f(MASKED)),
                vec![for_cols(
                    cfg,
                    "cg",
                    g,
                    cpt,
                    mean_of_v(cfg, var("orow"), var("col")),
                )],
                vec![for_cols(
                    cfg,
                    "cg",
                    g,
                    cpt,
                    vec![store(
                        "out",
                        var("orow") * u(dv) + var("col"),
                        (load_local("acc", var("ii")) / var("lr")).cast(e),
                    )],
                )],
            ),
        ],
    ));

    let kernel = Kernel {
        name,
        buffers: buffers(cfg),
        uniforms: uniforms(cfg),
        workgroup: [nt, 1, 1],
        shared: vec![
            shared("qs", e, bq * d),
            shared("kv", e, kv_len),
            shared("sc", Elem::F32, bq * sstride),
            shared("alpha", Elem::F32, bq),
            shared("ms", Elem::F32, bq),
            shared("ls", Elem::F32, bq),
        ],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(kernel)
}

/// The register design of prefill for CPU adapters (see the module docs): `threads`
/// invocations, each holding `rows` query rows (q, running max and sum, output accumulators)
/// in vector registers; K and V read with vector loads straight from storage; no shared memory
/// and no barriers. Unrolled over rows, keys of a tile and head-dim vectors; the key tiles are
/// a loop.
fn build_lanes(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    limits: &Limits,
) -> Result<Kernel, CodegenError> {
    let name = cfg.kernel_name(false);
    check_common(cfg, t, &name)?;
    let (nt, rows, bk, d, dv) = (t.threads, t.rows, t.block_k, cfg.head_dim, cfg.dv);
    if d % 4 != 0 || dv % 4 != 0 {
        return Err(kernel_err(
            &name,
            format!(
                "register design: head dims {d} and {dv} must be multiples of 4 (vector loads)"
            ),
        ));
    }
    if t.block_q != nt * rows {
        return Err(kernel_err(
            &name,
            format!(
                "register design: block_q = {} is not threads · rows = {}",
                t.block_q,
                nt * rows
            ),
        ));
    }
    if rows > MAX_ROWS || bk > MAX_LANES_BLOCK_K {
        return Err(kernel_err(
            &name,
            format!(
                "register design: rows = {rows} (at most {MAX_ROWS}) or block_k = {bk} (at most \
                 {MAX_LANES_BLOCK_K}) unrolls too far"
            ),
        ));
    }
    let (d4, dv4) = (d / 4, dv / 4);
    if rows * (d4 + dv4) > MAX_VEC_REGS {
        return Err(kernel_err(
            &name,
            format!(
                "register design: {} vector registers per invocation exceed {MAX_VEC_REGS}",
                rows * (d4 + dv4)
            ),
        ));
    }
    let e = cfg.elem;
    let n = |base: &str, r: u32| format!("{base}{r}");
    let n2 = |base: &str, a: u32, b: u32| format!("{base}{a}_{b}");
    let qv = |r: u32, x: u32| format!("q{r}_{x}");
    let av = |r: u32, x: u32| format!("acc{r}_{x}");

    let mut body = prologue(cfg);
    body.push(let_("q0", Elem::U32, workgroup_id(0) * u(t.block_q)));
    for r in 0..rows {
        // Row r·threads + tid of the block; rows past sq read the last row (finite) and store
        // nothing.
        body.push(let_(
            &n("i", r),
            Elem::U32,
            var("q0") + u(r * nt) + var("tid"),
        ));
        body.push(let_(
            &n("qb", r),
            Elem::U32,
            (var("qrow") + var(&n("i", r)).min(uni("sq") - u(1))) * u(d),
        ));
        for x in 0..d4 {
            body.push(let_(
                &qv(r, x),
                Elem::F32x4,
                load4("q", var(&n("qb", r)) + u(4 * x)),
            ));
        }
        body.push(var_(&n("m", r), Elem::F32, f(MASKED)));
        body.push(var_(&n("l", r), Elem::F32, f(0.0)));
        for x in 0..dv4 {
            body.push(var_(&av(r, x), Elem::F32x4, splat4(f(0.0))));
        }
    }
    body.extend(tile_range(cfg, var("q0"), t.block_q, bk));

    let mut tile = vec![let_("k0", Elem::U32, var("kt") * u(bk))];
    // Broadcast K/V (8 invocations, subgroups of ≥ 8 lanes, whole groups of 8 vectors per
    // tile): every lane reads distinct vectors of the tile — lane `tid` the vectors
    // `8·g + tid` in key-major order — and the others take them by subgroup broadcast, so a
    // tile costs `bk·d/32` vector loads per lane instead of `bk·d/4` (on llvmpipe each load is
    // a loop over the 8 lanes, a broadcast from a constant lane a shuffle).
    let shared_kv =
        nt == 8 && limits.subgroup_min >= 8 && (bk * d4) % 8 == 0 && (bk * dv4) % 8 == 0;
    // Vector `x` of key `c` of the tile, as `load4` or from the lane that read it.
    let group_loads = |tile: &mut Vec<Stmt>, buf: &str, width: u32| {
        for g in 0..bk * width / 8 {
            let fv = format!("{buf}f{g}");
            tile.push(let_(&fv, Elem::U32, u(8 * g) + var("tid")));
            tile.push(let_(
                &format!("{buf}g{g}"),
                Elem::F32x4,
                load4(
                    buf,
                    (var("krow") + (var("k0") + var(&fv) / u(width)).min(uni("sk") - u(1)))
                        * u(4 * width)
                        + (var(&fv) % u(width)) * u(4),
                ),
            ));
        }
    };
    let vector = |buf: &str, width: u32, c: u32, x: u32| -> Expr {
        let fl = c * width + x;
        bcast8(var(&format!("{buf}g{}", fl / 8)), (fl % 8) as u8)
    };
    if shared_kv {
        group_loads(&mut tile, "k", d4);
    }
    for c in 0..bk {
        let j = var("k0") + u(c);
        tile.push(let_(&n("j", c), Elem::U32, j));
        tile.push(let_(&n("ok", c), Elem::Bool, var(&n("j", c)).lt(uni("sk"))));
        // Keys past sk read the last key (finite) and get no weight.
        tile.push(let_(
            &n("kr", c),
            Elem::U32,
            var("krow") + var(&n("j", c)).min(uni("sk") - u(1)),
        ));
    }
    // Scores: one vector of K at a time, against every row's q.
    for c in 0..bk {
        for r in 0..rows {
            tile.push(var_(&n2("dot", r, c), Elem::F32, f(0.0)));
        }
        for x in 0..d4 {
            let kx = n2("k", c, x);
            tile.push(let_(
                &kx,
                Elem::F32x4,
                if shared_kv {
                    vector("k", d4, c, x)
                } else {
                    load4("k", var(&n("kr", c)) * u(d) + u(4 * x))
                },
            ));
            for r in 0..rows {
                let dn = n2("dot", r, c);
                tile.push(assign(&dn, var(&dn) + var(&qv(r, x)).dot(var(&kx))));
            }
        }
        for r in 0..rows {
            let (i, j) = (var(&n("i", r)), var(&n("j", c)));
            let guard = i.clone().lt(uni("sq")).and(var(&n("ok", c)));
            tile.extend(score_named(
                cfg,
                i,
                j,
                Some(guard),
                &n2("dot", r, c),
                &format!("{r}_{c}"),
            ));
        }
    }
    // Online softmax per row: the tile's max, rescale, probabilities (0 past sk).
    for r in 0..rows {
        let sc = |c: u32| select(var(&n("ok", c)), var(&n2("score", r, c)), f(MASKED));
        let mut mt = sc(0);
        for c in 1..bk {
            mt = mt.max(sc(c));
        }
        let (m, l, mn, a) = (n("m", r), n("l", r), n("mn", r), n("a", r));
        tile.push(let_(&mn, Elem::F32, var(&m).max(mt)));
        tile.push(let_(&a, Elem::F32, (var(&m) - var(&mn)).exp()));
        let mut lsum = var(&l) * var(&a);
        for c in 0..bk {
            let p = n2("p", r, c);
            tile.push(let_(
                &p,
                Elem::F32,
                select(
                    var(&n("ok", c)),
                    (var(&n2("score", r, c)) - var(&mn)).exp(),
                    f(0.0),
                ),
            ));
            lsum = lsum + var(&p);
        }
        tile.push(assign(&l, lsum));
        tile.push(assign(&m, var(&mn)));
        for x in 0..dv4 {
            tile.push(assign(&av(r, x), var(&av(r, x)) * splat4(var(&a))));
        }
    }
    // acc += p · v: one vector of V at a time, into every row.
    if shared_kv {
        group_loads(&mut tile, "v", dv4);
    }
    for c in 0..bk {
        for x in 0..dv4 {
            let vx = n2("v", c, x);
            tile.push(let_(
                &vx,
                Elem::F32x4,
                if shared_kv {
                    vector("v", dv4, c, x)
                } else {
                    load4("v", var(&n("kr", c)) * u(dv) + u(4 * x))
                },
            ));
            for r in 0..rows {
                tile.push(assign(
                    &av(r, x),
                    var(&av(r, x)) + splat4(var(&n2("p", r, c))) * var(&vx),
                ));
            }
        }
    }
    body.push(for_("kt", var("kt_lo"), var("kt_hi"), tile));

    // out = acc / l, or the mean of v for a row that saw no key.
    for r in 0..rows {
        let mut stores = vec![];
        for x in 0..dv4 {
            let o = n2("o", r, x);
            stores.push(let_(
                &o,
                Elem::F32x4,
                var(&av(r, x)) / splat4(var(&n("l", r))),
            ));
            for lane in 0..4u8 {
                stores.push(store(
                    "out",
                    var("orow") * u(dv) + u(4 * x + u32::from(lane)),
                    var(&o).lane(lane).cast(e),
                ));
            }
        }
        body.push(if_(
            var(&n("i", r)).lt(uni("sq")),
            vec![
                let_("orow", Elem::U32, var("qrow") + var(&n("i", r))),
                Stmt::If(
                    var(&n("m", r)).eq_(f(MASKED)),
                    vec![for_(
                        "col",
                        u(0),
                        u(dv),
                        mean_of_v(cfg, var("orow"), var("col")),
                    )],
                    stores,
                ),
            ],
        ));
    }

    let kernel = Kernel {
        name,
        buffers: buffers(cfg),
        uniforms: uniforms(cfg),
        workgroup: [nt, 1, 1],
        shared: vec![],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(kernel)
}

/// Representative configurations (validated by naga and NVRTC in the tests): prefill over
/// f32/f16/bf16 × head dims 32/64/128 × {plain, mask, causal, causal + mask, window}, with
/// grouped-query attention (decode's kernels: [`super::decode::catalog`]). f32/f16 kernels
/// use the WebGPU defaults (so they fit every target), bf16 the CUDA ones.
pub fn catalog() -> Vec<Generated> {
    let cfg = |elem, d: u32, dv: u32, causal, window, mask| AttentionCfg {
        elem,
        head_dim: d,
        dv,
        scale: default_scale(d),
        causal,
        window,
        mask,
        group: 1,
    };
    let limits = |e: Elem| {
        if e == Elem::BF16 {
            Limits::cuda()
        } else {
            Limits::webgpu()
        }
    };
    let prefill = [
        cfg(Elem::F32, 32, 32, false, None, false),
        cfg(Elem::F32, 64, 64, false, None, true),
        cfg(Elem::F32, 64, 64, true, None, true),
        cfg(Elem::F32, 128, 128, true, None, false),
        cfg(Elem::F32, 64, 64, true, Some(128), false),
        cfg(Elem::F32, 32, 64, false, Some(16), true),
        cfg(Elem::F16, 64, 64, false, None, false),
        cfg(Elem::F16, 32, 32, false, None, true),
        cfg(Elem::F16, 64, 64, true, None, false),
        cfg(Elem::F16, 128, 128, true, None, true),
        cfg(Elem::F16, 128, 128, true, Some(256), true),
        cfg(Elem::BF16, 128, 128, false, None, false),
        cfg(Elem::BF16, 64, 64, false, None, true),
        cfg(Elem::BF16, 32, 32, true, None, false),
        cfg(Elem::BF16, 64, 64, true, None, true),
        cfg(Elem::BF16, 128, 128, true, Some(64), false),
        AttentionCfg {
            group: 4,
            ..cfg(Elem::F32, 64, 64, true, None, false)
        },
        AttentionCfg {
            group: 8,
            ..cfg(Elem::BF16, 128, 128, true, Some(64), true)
        },
    ];
    let mut out = vec![];
    for c in &prefill {
        let l = limits(c.elem);
        let t = AttentionTunables::default_for(c, &l);
        out.push(flash(c, &t, &l).expect("catalog config builds"));
    }
    // The register design (chosen on CPU adapters), with one row per invocation: its CUDA
    // must compile without spills (the NVRTC test), which the CPU default's 8 rows of q and
    // accumulators (1024 floats) cannot; its WGSL is run on lavapipe by the runtime tests.
    for c in [
        cfg(Elem::F32, 64, 64, true, None, false),
        cfg(Elem::F16, 64, 64, true, Some(32), true),
        cfg(Elem::BF16, 64, 64, true, None, false),
    ] {
        // Subgroups of 8 lanes or more (llvmpipe's 8): K/V shared by broadcast.
        let l = limits(c.elem).with_kind(DeviceKind::Cpu);
        let l = Limits {
            subgroup_min: l.subgroup_min.max(8),
            ..l
        };
        let t = AttentionTunables::default_for(&c, &l)
            .with("rows", 1)
            .expect("known tunable");
        out.push(flash(&c, &t, &l).expect("catalog config builds"));
    }
    out
}
