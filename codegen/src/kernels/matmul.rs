//! Matrix multiplication: `out = act(a @ b + bias) + residual`, batched, with the
//! [`transfuse_ir::Op::FusedMatMul`] epilogue fused into the store.
//!
//! **What.** `a [batch.., m, k] × b [batch.., k, n] → out [batch.., m, n]` (or `b [batch.., n, k]`
//! read transposed when [`MatMulConfig::b_transposed`], so `x @ Wᵀ` with a PyTorch-layout
//! `[out, in]` weight needs no copy). Storage is F32, F16 or BF16 (BF16: CUDA only); every
//! product is accumulated in f32. The epilogue adds `bias [n]`, applies the activation exactly
//! as the CPU reference spells it (`runtime/src/cpu/fused.rs`: GeluErf through the erf
//! intrinsic, GeluTanh, Relu, Silu = x·sigmoid(x)) and adds `residual` (same shape and layout
//! as `out`), then converts to the storage type.
//!
//! **Buffers, uniforms, grid.** Buffers `a, b [, bias] [, residual], out` (the op's operand
//! order). Uniforms [`UNIFORMS`]: `m, n, k`; the batch as two levels `batch0 × batch1`
//! (output batch `z = z0·batch1 + z1`, output contiguous) and per-operand batch strides in
//! elements `a_s0, a_s1, b_s0, b_s1` — 0 broadcasts, so a 2-D weight shared by every batch has
//! `b_s0 = b_s1 = 0`, and `[B, 1, m, k] × [1, H, k, n]` is `a_s1 = 0, b_s0 = 0`. Rows within an
//! operand are contiguous (row stride `k`, or `n` for `b` not transposed). Grid
//! `[⌈n/tile_n⌉, ⌈m/tile_m⌉, batch0·batch1]` (each ≤ 65535 on both targets).
//!
//! **Algorithm (tiled, [`matmul`]).** A workgroup owns a `tile_m × tile_n` block of `out`. For
//! each `tile_k` slice of the reduction it stages `a[tile_m × tile_k]` and `b[tile_k × tile_n]`
//! in workgroup-shared memory (as f32, k-major, zero-filled outside `m, n, k`), then each of
//! its `(tile_m/rm)·(tile_n/rn)` threads accumulates an `rm × rn` micro-tile in a local array
//! (register blocking; rows `ty + i·tile_m/rm`, columns `tx + j·tile_n/rn` so neighbouring
//! threads touch neighbouring columns: coalesced stores, conflict-free reads of the b tile).
//! The micro-tile loops are unrolled at generation time (constant local-array indices).
//! The k-loop bound is the uniform `k`, so both barriers sit in uniform control flow; only
//! loads and stores are under per-thread conditions (naga checks uniformity).
//!
//! **Register design for CPU adapters ([`matmul_reg`], `reg = 1`).** On llvmpipe every load
//! from storage or shared memory is a loop over the 8 SIMD lanes (`notes/wgsl-on-lavapipe.md`),
//! so the tiled design's staging and scalar shared-memory reads dominate. Instead each
//! invocation owns an `rm × rn` block of `out` (rows `row0 + i`, columns `col0 + j`; a workgroup
//! of `(tile_m/rm)·(tile_n/rn)` invocations owns `tile_m × tile_n`) and keeps its accumulators
//! in scalar locals; per step of 4 along `k` it reads each of its `a` rows as one vec4 and
//! either each of its `b` rows (`b` transposed: one vec4 along `k` per column, then `rm·rn`
//! dot products) or four `b` rows as vectors of 4 columns (`b` not transposed: vec4
//! accumulators, `rn` a multiple of 4), straight from storage: no shared memory, no barriers,
//! `rm·rn / (rm + rn)` multiply-adds per float loaded. `tile_k` is the number of such steps
//! unrolled per loop iteration (a tail loop takes the rest). The vec4 accumulators of a `b`
//! read by columns are updated by fused multiply-adds ([`Expr::Fma`]); the bias of each
//! column is loaded once per invocation.
//! The broadcast variant (`reg = 2`) takes larger blocks (up to 512 outputs, against 64): its
//! default, 32 × 8 with two steps per iteration, loads 4 + 8 vec4s per 1024 multiply-adds and
//! ran MiniLM's matmuls on llvmpipe at 1.8–2× the GFLOP/s of 8 × 8 blocks (spilled
//! accumulators cost less there than loads, which are loops over the lanes). Rows past `m` and columns past `n`
//! read the last row/column (indices clamped) and store nothing. It needs `k % 4 == 0` (and
//! `n % 4 == 0` for a `b` read by columns) and operands starting on multiples of 4 elements:
//! the lowering chooses it (by [`Limits::kind`]) only then; GPUs keep the tiled design.
//!
//! **Decode GEMV ([`gemv`]).** For few rows (`m = 1` while decoding): each workgroup computes
//! `cols` outputs of one row, its `threads/cols` lanes splitting `k` (lanes contiguous in `k`
//! for a transposed `b`, columns contiguous for a normal one — both coalesced), then a
//! shared-memory tree reduction and the same epilogue. Grid `[⌈n/cols⌉, m, batch0·batch1]`;
//! same buffers and uniforms as [`matmul`], so a runtime can switch between them freely.
//!
//! **Limits and refusals.** Tunables are checked before generation ([`CodegenError::Kernel`]
//! naming the kernel): tiles and micro-tiles nonzero, `tile_m % rm == 0`, `tile_n % rn == 0`,
//! at most 64 accumulators per thread (512 in the broadcast design), tiles ≤ 256, threads and shared bytes
//! (`4·tile_k·(tile_m + tile_n)`) within the target's [`Limits`]; GEMV `threads` and `cols`
//! powers of two with `cols ≤ threads`. Storage types other than F32/F16/BF16 are refused. Sizes
//! need not be multiples of the tiles. Indices are u32: each operand ≤ 2³² elements.

use transfuse_ir::Act;

use super::{check_limits, DeviceKind, Factor, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// The uniforms of [`matmul`] and [`gemv`], in order.
pub const UNIFORMS: [&str; 9] = [
    "m", "n", "k", "batch0", "batch1", "a_s0", "a_s1", "b_s0", "b_s1",
];

/// What a matmul kernel computes (compile-time configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatMulConfig {
    /// Storage type of every buffer (F32, F16 or BF16); accumulation is f32.
    pub elem: Elem,
    /// `b` is stored `[.., n, k]` and read transposed.
    pub b_transposed: bool,
    /// Activation applied after the bias.
    pub act: Act,
    /// Adds `bias [n]`.
    pub bias: bool,
    /// Adds `residual` (shape of `out`) after the activation.
    pub residual: bool,
    /// Gated: a second weight `b2` (the shape and layout of `b`) is accumulated alongside, and
    /// the epilogue stores `act(a @ b [+ bias]) · (a @ b2)` (SwiGLU: `act = silu`).
    pub gate: bool,
}

impl MatMulConfig {
    /// A plain matmul (no epilogue), `b` not transposed.
    pub fn plain(elem: Elem) -> MatMulConfig {
        MatMulConfig {
            elem,
            b_transposed: false,
            act: Act::Identity,
            bias: false,
            residual: false,
            gate: false,
        }
    }

    /// Gated by a second weight `b2` (see [`MatMulConfig::gate`]).
    pub fn gated(self, gate: bool) -> MatMulConfig {
        MatMulConfig { gate, ..self }
    }

    /// With the fused epilogue `act(· + bias) + residual`.
    pub fn epilogue(self, act: Act, bias: bool, residual: bool) -> MatMulConfig {
        MatMulConfig {
            act,
            bias,
            residual,
            ..self
        }
    }

    /// With `b` read transposed (`[.., n, k]`).
    pub fn transposed_b(self, b_transposed: bool) -> MatMulConfig {
        MatMulConfig {
            b_transposed,
            ..self
        }
    }

    /// Kernel name for a variant (`matmul`, `gemv`): `matmul_f16_bt_bias_gelu_erf_res`.
    pub fn name(&self, variant: &str) -> String {
        let mut s = format!("{variant}_{}", elem_name(self.elem));
        if self.b_transposed {
            s.push_str("_bt");
        }
        if self.bias {
            s.push_str("_bias");
        }
        if self.act != Act::Identity {
            s.push('_');
            s.push_str(self.act.name());
        }
        if self.residual {
            s.push_str("_res");
        }
        if self.gate {
            s.push_str("_gated");
        }
        s
    }

    fn check(&self, kernel: &str) -> Result<(), CodegenError> {
        match self.elem {
            Elem::F32 | Elem::F16 | Elem::BF16 => Ok(()),
            e => Err(err(
                kernel,
                format!("storage type {e:?} is not a float type (F32, F16, BF16)"),
            )),
        }
    }
}

/// Short name of a storage type, as used in kernel names.
pub(crate) fn elem_name(e: Elem) -> &'static str {
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

fn err(kernel: &str, msg: String) -> CodegenError {
    CodegenError::Kernel {
        kernel: kernel.to_string(),
        msg,
    }
}

/// Tunables of the tiled [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatMulTunables {
    /// Rows of `out` per workgroup.
    pub tile_m: u32,
    /// Columns of `out` per workgroup.
    pub tile_n: u32,
    /// Reduction slice staged in shared memory per step.
    pub tile_k: u32,
    /// Rows of the per-thread micro-tile.
    pub rm: u32,
    /// Columns of the per-thread micro-tile.
    pub rn: u32,
    /// 0: the tiled shared-memory design ([`matmul`]); 1: the register design for CPU adapters
    /// ([`matmul_reg`]: no shared memory, vec4 loads, `tile_k` vec4 steps unrolled per k
    /// iteration); 2: the register design with `a` shared by subgroup broadcasts (one
    /// 8-invocation workgroup side by side along `n`, each lane loading one `a` row of 8 per
    /// vec4 step and broadcasting it to the others: targets with subgroups of ≥ 8 lanes).
    pub reg: u32,
}

const TILE_MN: [u32; 4] = [16, 32, 64, 128];
const TILE_K: [u32; 3] = [8, 16, 32];
const MICRO: [u32; 4] = [1, 2, 4, 8];
/// Outputs per invocation of the broadcast design (the others: 64).
const MAX_BCAST_OUTPUTS: u32 = 512;

impl MatMulTunables {
    /// Threads per workgroup: `(tile_m/rm)·(tile_n/rn)`.
    pub fn threads(&self) -> u32 {
        (self.tile_m / self.rm.max(1)) * (self.tile_n / self.rn.max(1))
    }

    /// Bytes of shared memory: the f32 tiles of `a` and `b` (none in the register design).
    pub fn shared_bytes(&self) -> u32 {
        if self.reg >= 1 {
            0
        } else {
            4 * self.tile_k * (self.tile_m + self.tile_n)
        }
    }

    /// The register design ([`matmul_reg`]) with `rm × rn` outputs per invocation, `wy × wx`
    /// invocations per workgroup and `unroll` vec4 steps per k iteration.
    pub fn reg(rm: u32, rn: u32, wy: u32, wx: u32, unroll: u32) -> MatMulTunables {
        MatMulTunables {
            tile_m: rm * wy,
            tile_n: rn * wx,
            tile_k: unroll,
            rm,
            rn,
            reg: 1,
        }
    }

    /// The register design's default on a CPU adapter for an `m × n` problem (dims rounded up
    /// to powers of two; `None`: unknown): 8 × 8 outputs per invocation (fewer rows when `m`
    /// is smaller), so each float loaded feeds 4 multiply-adds; one 8-invocation subgroup per
    /// workgroup (the workgroup's tile no wider than the problem), no k unrolling.
    pub fn reg_for_problem(cfg: &MatMulConfig, m: Option<u64>, n: Option<u64>) -> MatMulTunables {
        let _ = cfg;
        let rn = 8;
        let rm = match m {
            Some(m) if m < 8 => m.max(1).next_power_of_two() as u32,
            _ => 8,
        };
        // Eight invocations, as wide along n as the problem allows.
        let cols = n.map_or(u64::MAX, |n| n.div_ceil(u64::from(rn)).max(1));
        let wx = [8u32, 4, 2, 1]
            .into_iter()
            .find(|&w| u64::from(w) <= cols)
            .unwrap_or(1);
        MatMulTunables::reg(rm, rn, 8 / wx, wx, 1)
    }

    /// The broadcast register design (`reg = 2`, [`matmul_reg`]): `rm` rows (a multiple of 8)
    /// × `rn` columns per invocation, 8 invocations side by side along `n`, `unroll` vec4
    /// steps per k iteration.
    pub fn bcast(rm: u32, rn: u32, unroll: u32) -> MatMulTunables {
        MatMulTunables {
            reg: 2,
            ..MatMulTunables::reg(rm, rn, 1, 8, unroll)
        }
    }

    /// The default on a CPU adapter when the operands allow vec4 loads: the broadcast design
    /// with 32 × 8 blocks and two vec4 steps per k iteration (each lane loads 4 vec4s of `a`
    /// and 8 of `b` per 1024 multiply-adds, against 1 + 8 per 256 in 8 × 8 blocks; on
    /// llvmpipe 1.8–2× the 8 × 8 blocks' GFLOP/s at MiniLM's shapes), 8 or 16 rows when `m`
    /// is that small, where the target's subgroups hold 8 lanes or more and the
    /// problem has 8 rows or more (or an unknown count), else [`Self::reg_for_problem`].
    pub fn cpu_for_problem(
        cfg: &MatMulConfig,
        limits: &Limits,
        m: Option<u64>,
        n: Option<u64>,
    ) -> MatMulTunables {
        let rm = m.map_or(32, |m| m.clamp(8, 32).next_power_of_two() as u32);
        let t = MatMulTunables::bcast(rm, 8, 2);
        if limits.subgroup_min >= 8
            && m.is_none_or(|m| m >= 8)
            && n.is_none_or(|n| n >= 64)
            && t.validate("matmul", limits).is_ok()
        {
            return t;
        }
        Self::reg_for_problem(cfg, m, n)
    }

    /// The register design's space: `rm`, `rn` in {1, 2, 4, 8} (`rn` ≥ 4 when `b` is not
    /// transposed) with at most 64 outputs per invocation, 8, 16, 32 or 64 invocations as
    /// `wy × wx`, and 1 or 2 vec4 steps per k iteration; where the target's subgroups allow
    /// it, the broadcast design with `rm` in {8, 16, 32, 64}, `rn` in {1, 2, 4, 8, 16} and at
    /// most 512 outputs per invocation, 1 or 2 steps.
    pub fn reg_space(cfg: &MatMulConfig, limits: &Limits) -> Vec<MatMulTunables> {
        let mut v = vec![];
        for rm in MICRO {
            for rn in MICRO {
                if rm * rn > 64 || (!cfg.b_transposed && rn < 4) {
                    continue;
                }
                for threads in [8u32, 16, 32, 64] {
                    for wx in [1u32, 2, 4, 8, 16, 32, 64] {
                        if wx > threads {
                            continue;
                        }
                        for unroll in [1, 2] {
                            let t = MatMulTunables::reg(rm, rn, threads / wx, wx, unroll);
                            if t.validate("matmul", limits).is_ok() {
                                v.push(t);
                            }
                        }
                    }
                }
            }
        }
        // The broadcast design where the target allows it: 8 to 64 rows, up to 16 columns.
        for rm in [8u32, 16, 32, 64] {
            for rn in [1u32, 2, 4, 8, 16] {
                if rm * rn > MAX_BCAST_OUTPUTS || (!cfg.b_transposed && rn < 4) {
                    continue;
                }
                for unroll in [1, 2] {
                    let t = MatMulTunables::bcast(rm, rn, unroll);
                    if t.validate("matmul", limits).is_ok() {
                        v.push(t);
                    }
                }
            }
        }
        v
    }

    /// The default for a target: 128×128×16 with 8×8 micro-tiles where 1024 threads are
    /// allowed (CUDA), else 64×64×16 with 4×4 (WebGPU); the first valid of a fallback list
    /// on smaller targets. Gated kernels keep two accumulators per output, so on CUDA they
    /// take 128×64 tiles with 8×4 micro-tiles (64 accumulators per thread, as ungated).
    pub fn default_for(cfg: &MatMulConfig, limits: &Limits) -> MatMulTunables {
        let t = |tile_m, tile_n, tile_k, rm, rn| MatMulTunables {
            tile_m,
            tile_n,
            tile_k,
            rm,
            rn,
            reg: 0,
        };
        let mut prefs = vec![];
        if limits.max_threads >= 1024 {
            prefs.push(if cfg.gate {
                t(128, 64, 16, 8, 4)
            } else {
                t(128, 128, 16, 8, 8)
            });
        }
        prefs.extend([
            t(64, 64, 16, 4, 4),
            t(32, 32, 16, 2, 2),
            t(16, 16, 8, 2, 2),
            t(16, 16, 8, 4, 4),
            t(8, 8, 8, 8, 8),
        ]);
        prefs
            .into_iter()
            .find(|p| p.validate("matmul", limits).is_ok())
            .unwrap_or(t(8, 8, 8, 8, 8))
    }

    /// The default for an `m × n × k` problem (the bound dims, rounded up to a power of two):
    /// tiles no larger than the problem, so a small matmul does not pad to 128 × 128. On a
    /// GPU the largest such tile that still gives 8 workgroups; on a CPU adapter (whose
    /// workgroups each run on one core, where every shared-memory load is a loop over the
    /// lanes) 64-thread workgroups with the biggest micro-tile the tile allows, so each
    /// invocation does the most multiply-adds per load. Falls back to [`Self::default_for`].
    pub fn for_problem(
        cfg: &MatMulConfig,
        limits: &Limits,
        m: u64,
        n: u64,
        _k: u64,
    ) -> MatMulTunables {
        let t = |tile_m, tile_n, tile_k, rm, rn| MatMulTunables {
            tile_m,
            tile_n,
            tile_k,
            rm,
            rn,
            reg: 0,
        };
        let cap = |x: u64| x.max(16).next_power_of_two().min(128) as u32;
        let (cm, cn) = (cap(m), cap(n));
        let groups =
            |p: &MatMulTunables| m.div_ceil(u64::from(p.tile_m)) * n.div_ceil(u64::from(p.tile_n));
        let prefs: Vec<MatMulTunables> = if limits.kind == DeviceKind::Cpu {
            vec![
                t(64, 64, 16, 8, 8),
                t(64, 32, 16, 8, 4),
                t(32, 64, 16, 4, 8),
                t(32, 32, 16, 4, 4),
                t(32, 16, 16, 4, 2),
                t(16, 32, 16, 2, 4),
                t(16, 16, 16, 2, 2),
            ]
        } else {
            vec![
                t(128, 128, 16, 8, 8),
                t(64, 64, 16, 4, 4),
                t(64, 32, 16, 4, 2),
                t(32, 64, 16, 2, 4),
                t(32, 32, 16, 2, 2),
                t(32, 16, 16, 2, 1),
                t(16, 32, 16, 1, 2),
                t(16, 16, 16, 1, 1),
            ]
        };
        let fits = |p: &&MatMulTunables| {
            p.tile_m <= cm && p.tile_n <= cn && p.validate("matmul", limits).is_ok()
        };
        let want = if limits.kind == DeviceKind::Cpu { 4 } else { 8 };
        prefs
            .iter()
            .filter(fits)
            .find(|p| groups(p) >= want)
            .or_else(|| prefs.iter().rfind(|p| fits(p)))
            .copied()
            .unwrap_or_else(|| Self::default_for(cfg, limits))
    }

    /// Every valid combination of tiles in {16, 32, 64, 128}, `tile_k` in {8, 16, 32} and
    /// micro-tiles in {1, 2, 4, 8}² with 32 to `max_threads` threads.
    pub fn space(_cfg: &MatMulConfig, limits: &Limits) -> Vec<MatMulTunables> {
        let mut v = vec![];
        for tile_m in TILE_MN {
            for tile_n in TILE_MN {
                for tile_k in TILE_K {
                    for rm in MICRO {
                        for rn in MICRO {
                            let t = MatMulTunables {
                                tile_m,
                                tile_n,
                                tile_k,
                                rm,
                                rn,
                                reg: 0,
                            };
                            if t.threads() >= 32 && t.validate("matmul", limits).is_ok() {
                                v.push(t);
                            }
                        }
                    }
                }
            }
        }
        v
    }

    /// Errors (naming `kernel`) unless these tunables can be generated under `limits`.
    pub fn validate(&self, kernel: &str, limits: &Limits) -> Result<(), CodegenError> {
        let e = |m: String| Err(err(kernel, m));
        let MatMulTunables {
            tile_m,
            tile_n,
            tile_k,
            rm,
            rn,
            reg,
        } = *self;
        if [tile_m, tile_n, tile_k, rm, rn].contains(&0) {
            return e(format!("tunables must be nonzero: {self:?}"));
        }
        if reg > 2 {
            return e(format!(
                "reg must be 0 (tiled), 1 (register design) or 2 (register design with \
                 broadcasts): {self:?}"
            ));
        }
        if reg == 2 {
            if limits.subgroup_min < 8 {
                return e(format!(
                    "the broadcast design needs subgroups of at least 8 lanes (the target \
                     guarantees {}): {self:?}",
                    limits.subgroup_min
                ));
            }
            if rm % 8 != 0 || tile_m != rm || tile_n != 8 * rn {
                return e(format!(
                    "the broadcast design takes one row of 8 invocations along n and a \
                     multiple of 8 rows per invocation: {self:?}"
                ));
            }
        }
        if reg >= 1 && tile_k > 4 {
            return e(format!(
                "the register design unrolls at most 4 vec4 steps per k iteration: {self:?}"
            ));
        }
        if tile_m > 256 || tile_n > 256 || tile_k > 256 {
            return e(format!("tiles larger than 256: {self:?}"));
        }
        if tile_m % rm != 0 || tile_n % rn != 0 {
            return e(format!(
                "micro-tile {rm}×{rn} does not divide the tile {tile_m}×{tile_n}"
            ));
        }
        let most = if reg == 2 { MAX_BCAST_OUTPUTS } else { 64 };
        if rm * rn > most {
            return e(format!(
                "micro-tile {rm}×{rn} exceeds {most} accumulators per thread"
            ));
        }
        if self.threads() > limits.max_threads {
            return e(format!(
                "{} threads exceed the target's {}",
                self.threads(),
                limits.max_threads
            ));
        }
        if self.shared_bytes() > limits.max_shared_bytes {
            return e(format!(
                "{} bytes of shared memory exceed the target's {}",
                self.shared_bytes(),
                limits.max_shared_bytes
            ));
        }
        Ok(())
    }

    fn describe(&self, cfg: &MatMulConfig, limits: &Limits) -> Vec<Tunable> {
        let space = if self.reg >= 1 {
            Self::reg_space(cfg, limits)
        } else {
            Self::space(cfg, limits)
        };
        let axis =
            |name, value, get: fn(&MatMulTunables) -> u32| Tunable::axis(name, value, &space, get);
        vec![
            axis("tile_m", self.tile_m, |t| t.tile_m),
            axis("tile_n", self.tile_n, |t| t.tile_n),
            axis("tile_k", self.tile_k, |t| t.tile_k),
            axis("rm", self.rm, |t| t.rm),
            axis("rn", self.rn, |t| t.rn),
            axis("reg", self.reg, |t| t.reg),
        ]
    }
}

/// `act(y)` for a local `y`, operation for operation as the CPU reference
/// (`runtime/src/cpu/fused.rs`) and the builder's decomposition spell it.
pub fn activation(act: Act, y: Expr) -> Expr {
    let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    let cubic = 0.044715f64 as f32;
    let sqrt_2_pi = (2.0 / std::f64::consts::PI).sqrt() as f32;
    match act {
        Act::Identity => y,
        Act::GeluErf => (y.clone() * f(0.5)) * ((y * f(inv_sqrt2)).erf() + f(1.0)),
        Act::GeluTanh => {
            let x3 = (y.clone() * y.clone()) * y.clone();
            let inner = y.clone() + x3 * f(cubic);
            (y * f(0.5)) * ((inner * f(sqrt_2_pi)).tanh() + f(1.0))
        }
        Act::Relu => y.max(f(0.0)),
        Act::Silu => y.clone() * y.sigmoid(),
    }
}

/// The buffers of a matmul/gemv kernel, in order.
fn buffers(cfg: &MatMulConfig) -> Vec<Buffer> {
    let buf = |name: &str, access| Buffer {
        name: name.into(),
        elem: cfg.elem,
        access,
    };
    let mut v = vec![buf("a", Access::Read), buf("b", Access::Read)];
    if cfg.gate {
        v.push(buf("b2", Access::Read));
    }
    if cfg.bias {
        v.push(buf("bias", Access::Read));
    }
    if cfg.residual {
        v.push(buf("residual", Access::Read));
    }
    v.push(buf("out", Access::ReadWrite));
    v
}

/// Batch offsets: `z`, `a_off`, `b_off`, `o_off` from the workgroup's z index.
fn batch_offsets() -> Vec<Stmt> {
    vec![
        let_("z", Elem::U32, workgroup_id(2)),
        let_("z0", Elem::U32, var("z") / uni("batch1")),
        let_("z1", Elem::U32, var("z") % uni("batch1")),
        let_(
            "a_off",
            Elem::U32,
            var("z0") * uni("a_s0") + var("z1") * uni("a_s1"),
        ),
        let_(
            "b_off",
            Elem::U32,
            var("z0") * uni("b_s0") + var("z1") * uni("b_s1"),
        ),
        let_("o_off", Elem::U32, var("z") * (uni("m") * uni("n"))),
    ]
}

/// The store of one output `acc` at `(row, col)` with the epilogue (gated: times `acc2`, the
/// `b2` product); the caller guards bounds. Locals are suffixed by `sfx` (unique per call in a
/// scope).
fn epilogue(
    cfg: &MatMulConfig,
    acc: Expr,
    acc2: Option<Expr>,
    row: Expr,
    col: Expr,
    sfx: &str,
) -> Vec<Stmt> {
    epilogue_with(cfg, acc, acc2, row, col, sfx, None)
}

/// [`epilogue`] with the bias of the column already loaded (`bias`; `None`: loaded here).
fn epilogue_with(
    cfg: &MatMulConfig,
    acc: Expr,
    acc2: Option<Expr>,
    row: Expr,
    col: Expr,
    sfx: &str,
    bias: Option<Expr>,
) -> Vec<Stmt> {
    let (y, oi) = (format!("y{sfx}"), format!("oi{sfx}"));
    let mut v = vec![let_(
        &oi,
        Elem::U32,
        var("o_off") + row * uni("n") + col.clone(),
    )];
    let mut value = acc;
    if cfg.bias {
        value = value + bias.unwrap_or_else(|| load("bias", col).cast(Elem::F32));
    }
    v.push(let_(&y, Elem::F32, value));
    let mut value = activation(cfg.act, var(&y));
    if let Some(g) = acc2 {
        value = value * g;
    }
    if cfg.residual {
        value = value + load("residual", var(&oi)).cast(Elem::F32);
    }
    v.push(store("out", var(&oi), value.cast(cfg.elem)));
    v
}

/// `e + c`, or `e` when `c` is 0.
fn plus(e: Expr, c: u32) -> Expr {
    if c == 0 {
        e
    } else {
        e + u(c)
    }
}

fn grid_z() -> GridDim {
    GridDim {
        factors: vec![
            Factor::Uniform("batch0".into()),
            Factor::Uniform("batch1".into()),
        ],
        per_group: 1,
    }
}

/// The tiled, register-blocked matmul (see the module docs).
pub fn matmul(
    cfg: &MatMulConfig,
    t: &MatMulTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    if t.reg >= 1 {
        return matmul_reg(cfg, t, limits);
    }
    let name = cfg.name("matmul");
    cfg.check(&name)?;
    t.validate(&name, limits)?;
    let MatMulTunables {
        tile_m: tm,
        tile_n: tn,
        tile_k: tk,
        rm,
        rn,
        ..
    } = *t;
    let (ty_n, tx_n) = (tm / rm, tn / rn);
    let threads = ty_n * tx_n;

    let mut body = vec![
        let_("tid", Elem::U32, local_id(0)),
        let_("tx", Elem::U32, var("tid") % u(tx_n)),
        let_("ty", Elem::U32, var("tid") / u(tx_n)),
        let_("row0", Elem::U32, workgroup_id(1) * u(tm)),
        let_("col0", Elem::U32, workgroup_id(0) * u(tn)),
    ];
    body.extend(batch_offsets());
    body.push(Stmt::LocalArray("acc".into(), Elem::F32, rm * rn));
    if cfg.gate {
        body.push(Stmt::LocalArray("acc2".into(), Elem::F32, rm * rn));
    }

    // Staging of one tile: element `e` of a `rows × cols` (row-major in global memory) block,
    // `tile` names the shared array, `index`/`cond`/`dst` map (r, c) to the global index, the
    // bounds condition and the shared index.
    type Map = dyn Fn(Expr, Expr) -> Expr;
    let stage =
        |tag: &str, rows: u32, cols: u32, tile: &str, index: &Map, cond: &Map, dst: &Map| {
            let total = rows * cols;
            let mut out = vec![];
            for l in 0..total.div_ceil(threads) {
                let (e, r, c, v) = (
                    format!("{tag}e{l}"),
                    format!("{tag}r{l}"),
                    format!("{tag}c{l}"),
                    format!("{tag}v{l}"),
                );
                let mut inner = vec![
                    let_(&r, Elem::U32, var(&e) / u(cols)),
                    let_(&c, Elem::U32, var(&e) % u(cols)),
                    var_(&v, Elem::F32, f(0.0)),
                    if_(
                        cond(var(&r), var(&c)),
                        vec![assign(
                            &v,
                            load(tag, index(var(&r), var(&c))).cast(Elem::F32),
                        )],
                    ),
                    store_shared(tile, dst(var(&r), var(&c)), var(&v)),
                ];
                out.push(let_(&e, Elem::U32, plus(var("tid"), l * threads)));
                if (l + 1) * threads > total {
                    inner = vec![if_(var(&e).lt(u(total)), inner)];
                }
                out.extend(inner);
            }
            out
        };
    let mut kbody = stage(
        "a",
        tm,
        tk,
        "ta",
        &|r, c| var("a_off") + (var("row0") + r) * uni("k") + var("k0") + c,
        &|r, c| {
            (var("row0") + r)
                .lt(uni("m"))
                .and((var("k0") + c).lt(uni("k")))
        },
        &move |r, c| c * u(tm) + r,
    );
    // b (and, gated, b2 with the same layout) into `tb` (`tb2`).
    for (buf, tile) in [("b", "tb"), ("b2", "tb2")] {
        if buf == "b2" && !cfg.gate {
            continue;
        }
        if cfg.b_transposed {
            // b [n, k]: rows are output columns.
            kbody.extend(stage(
                buf,
                tn,
                tk,
                tile,
                &|r, c| var("b_off") + (var("col0") + r) * uni("k") + var("k0") + c,
                &|r, c| {
                    (var("col0") + r)
                        .lt(uni("n"))
                        .and((var("k0") + c).lt(uni("k")))
                },
                &move |r, c| c * u(tn) + r,
            ));
        } else {
            kbody.extend(stage(
                buf,
                tk,
                tn,
                tile,
                &|r, c| var("b_off") + (var("k0") + r) * uni("n") + var("col0") + c,
                &|r, c| {
                    (var("k0") + r)
                        .lt(uni("k"))
                        .and((var("col0") + c).lt(uni("n")))
                },
                &move |r, c| r * u(tn) + c,
            ));
        }
    }
    kbody.push(Stmt::Barrier);
    let mut inner = vec![];
    for i in 0..rm {
        inner.push(let_(
            &format!("fa{i}"),
            Elem::F32,
            load_shared("ta", plus(var("kk") * u(tm) + var("ty"), i * ty_n)),
        ));
    }
    for j in 0..rn {
        inner.push(let_(
            &format!("fb{j}"),
            Elem::F32,
            load_shared("tb", plus(var("kk") * u(tn) + var("tx"), j * tx_n)),
        ));
        if cfg.gate {
            inner.push(let_(
                &format!("fg{j}"),
                Elem::F32,
                load_shared("tb2", plus(var("kk") * u(tn) + var("tx"), j * tx_n)),
            ));
        }
    }
    for i in 0..rm {
        for j in 0..rn {
            let idx = u(i * rn + j);
            inner.push(Stmt::StoreLocal(
                "acc".into(),
                idx.clone(),
                load_local("acc", idx.clone()) + var(&format!("fa{i}")) * var(&format!("fb{j}")),
            ));
            if cfg.gate {
                inner.push(Stmt::StoreLocal(
                    "acc2".into(),
                    idx.clone(),
                    load_local("acc2", idx) + var(&format!("fa{i}")) * var(&format!("fg{j}")),
                ));
            }
        }
    }
    kbody.push(for_("kk", u(0), u(tk), inner));
    kbody.push(Stmt::Barrier);
    body.push(for_step("k0", u(0), uni("k"), u(tk), kbody));

    for i in 0..rm {
        let row = format!("r{i}");
        body.push(let_(
            &row,
            Elem::U32,
            plus(var("row0") + var("ty"), i * ty_n),
        ));
        for j in 0..rn {
            let col = format!("c{i}_{j}");
            let st = epilogue(
                cfg,
                load_local("acc", u(i * rn + j)),
                cfg.gate.then(|| load_local("acc2", u(i * rn + j))),
                var(&row),
                var(&col),
                &format!("{i}_{j}"),
            );
            body.push(let_(
                &col,
                Elem::U32,
                plus(var("col0") + var("tx"), j * tx_n),
            ));
            body.push(if_(var(&row).lt(uni("m")).and(var(&col).lt(uni("n"))), st));
        }
    }

    let kernel = Kernel {
        name: name.clone(),
        buffers: buffers(cfg),
        uniforms: UNIFORMS.iter().map(|s| s.to_string()).collect(),
        workgroup: [threads, 1, 1],
        shared: vec![
            Shared {
                name: "ta".into(),
                elem: Elem::F32,
                len: tm * tk,
            },
            Shared {
                name: "tb".into(),
                elem: Elem::F32,
                len: tk * tn,
            },
        ]
        .into_iter()
        .chain(cfg.gate.then(|| Shared {
            name: "tb2".into(),
            elem: Elem::F32,
            len: tk * tn,
        }))
        .collect(),
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [GridDim::of("n", tn), GridDim::of("m", tm), grid_z()],
        tunables: t.describe(cfg, limits),
    })
}

/// The register design for CPU adapters (see the module docs): each invocation accumulates
/// `rm × rn` outputs in registers, reading `a` rows and `b` as vec4 loads straight from
/// storage (no shared memory, no barriers). The caller guarantees `k % 4 == 0` (and
/// `n % 4 == 0` when `b` is not transposed) and operands whose rows start on a multiple of 4
/// elements: the lowering chooses this design only then.
pub fn matmul_reg(
    cfg: &MatMulConfig,
    t: &MatMulTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let name = cfg.name("matmul");
    cfg.check(&name)?;
    t.validate(&name, limits)?;
    let MatMulTunables {
        tile_m: tm,
        tile_n: tn,
        tile_k: unroll,
        rm,
        rn,
        ..
    } = *t;
    if !cfg.b_transposed && rn % 4 != 0 {
        return Err(err(
            &name,
            format!("the register design reads a non-transposed b as vectors of 4 columns: rn = {rn} is not a multiple of 4"),
        ));
    }
    let (wy, wx) = (tm / rm, tn / rn);
    let threads = wy * wx;
    // The broadcast design walks the row blocks fastest (grid x), so consecutive workgroups
    // (on llvmpipe one thread runs a contiguous range of them) reuse one column strip of `b`
    // from cache; the others walk the column blocks fastest.
    let row_axis = if t.reg == 2 { 0 } else { 1 };
    let gated: &[(&str, &str)] = if cfg.gate {
        &[("b", "acc"), ("b2", "acg")]
    } else {
        &[("b", "acc")]
    };
    let mut body = vec![
        let_("tid", Elem::U32, local_id(0)),
        let_("tx", Elem::U32, var("tid") % u(wx)),
        let_("ty", Elem::U32, var("tid") / u(wx)),
        let_(
            "row0",
            Elem::U32,
            workgroup_id(row_axis) * u(tm) + var("ty") * u(rm),
        ),
        let_(
            "col0",
            Elem::U32,
            workgroup_id(1 - row_axis) * u(tn) + var("tx") * u(rn),
        ),
    ];
    body.extend(batch_offsets());
    // Broadcast design: lane `tx` reads row `row0 + 8·g + tx` for each group g of 8 rows,
    // and row `i` is lane `i % 8`'s vector of group `i / 8`.
    let bcast = t.reg == 2;
    // Rows past `m` (columns past `n`) read the last one and store nothing.
    if bcast {
        for g in 0..rm / 8 {
            body.push(let_(
                &format!("ra{g}"),
                Elem::U32,
                var("a_off")
                    + (plus(var("row0"), 8 * g) + var("tx")).min(uni("m") - u(1)) * uni("k"),
            ));
        }
    } else {
        for i in 0..rm {
            body.push(let_(
                &format!("ra{i}"),
                Elem::U32,
                var("a_off") + plus(var("row0"), i).min(uni("m") - u(1)) * uni("k"),
            ));
        }
    }
    // Per output: the accumulator's name and how to read its value in the epilogue.
    let (nb, acc_elem) = if cfg.b_transposed {
        (rn, Elem::F32)
    } else {
        (rn / 4, Elem::F32x4)
    };
    // Fused multiply-adds where `b` is read by columns: llvmpipe fuses `acc + x·y` itself
    // (measured the same), other drivers need not.
    let mad = |acc: Expr, x: Expr, y: Expr| fma(x, y, acc);
    for j in 0..nb {
        let c = if cfg.b_transposed {
            plus(var("col0"), j).min(uni("n") - u(1))
        } else {
            plus(var("col0"), 4 * j).min(uni("n") - u(4))
        };
        body.push(let_(&format!("cb{j}"), Elem::U32, c));
        if cfg.b_transposed {
            body.push(let_(
                &format!("rb{j}"),
                Elem::U32,
                var("b_off") + var(&format!("cb{j}")) * uni("k"),
            ));
        }
    }
    let zero = if acc_elem == Elem::F32 {
        f(0.0)
    } else {
        splat4(f(0.0))
    };
    for (_, acc) in gated {
        for i in 0..rm {
            for j in 0..nb {
                body.push(var_(&format!("{acc}{i}_{j}"), acc_elem, zero.clone()));
            }
        }
    }
    // One vec4 step of the reduction at `kk + 4·s`.
    let step = |s: u32| -> Vec<Stmt> {
        let mut v = vec![];
        let kq = plus(var("kk"), 4 * s);
        if bcast {
            for g in 0..rm / 8 {
                v.push(let_(
                    &format!("ag{g}_{s}"),
                    Elem::F32x4,
                    load4("a", var(&format!("ra{g}")) + kq.clone()),
                ));
            }
        }
        for i in 0..rm {
            let a = if bcast {
                bcast8(var(&format!("ag{}_{s}", i / 8)), (i % 8) as u8)
            } else {
                load4("a", var(&format!("ra{i}")) + kq.clone())
            };
            v.push(let_(&format!("av{i}_{s}"), Elem::F32x4, a));
        }
        for (buf, acc) in gated {
            if cfg.b_transposed {
                for j in 0..rn {
                    let bv = format!("{buf}v{j}_{s}");
                    v.push(let_(
                        &bv,
                        Elem::F32x4,
                        load4(buf, var(&format!("rb{j}")) + kq.clone()),
                    ));
                    for i in 0..rm {
                        let a = format!("{acc}{i}_{j}");
                        v.push(assign(
                            &a,
                            var(&a) + var(&format!("av{i}_{s}")).dot(var(&bv)),
                        ));
                    }
                }
            } else {
                // Four rows of b (k = kq..kq+4), each as vectors of 4 columns.
                for j in 0..nb {
                    for r in 0..4u32 {
                        v.push(let_(
                            &format!("{buf}v{j}_{r}_{s}"),
                            Elem::F32x4,
                            load4(
                                buf,
                                var("b_off")
                                    + plus(kq.clone(), r) * uni("n")
                                    + var(&format!("cb{j}")),
                            ),
                        ));
                    }
                    for i in 0..rm {
                        let a = format!("{acc}{i}_{j}");
                        let mut sum = var(&a);
                        for r in 0..4u8 {
                            sum = mad(
                                sum,
                                splat4(var(&format!("av{i}_{s}")).lane(r)),
                                var(&format!("{buf}v{j}_{r}_{s}")),
                            );
                        }
                        v.push(assign(&a, sum));
                    }
                }
            }
        }
        v
    };
    let kstep = 4 * unroll;
    body.push(let_("kmain", Elem::U32, uni("k") - uni("k") % u(kstep)));
    body.push(for_step(
        "kk",
        u(0),
        var("kmain"),
        u(kstep),
        (0..unroll).flat_map(step).collect(),
    ));
    if unroll > 1 {
        body.push(for_step("kk", var("kmain"), uni("k"), u(4), step(0)));
    }
    // The epilogue: the bias of each column loaded once (clamped like `b`'s columns), not once
    // per output.
    for c in 0..rn {
        body.push(let_(&format!("c{c}"), Elem::U32, plus(var("col0"), c)));
        if cfg.bias {
            body.push(let_(
                &format!("bs{c}"),
                Elem::F32,
                load("bias", var(&format!("c{c}")).min(uni("n") - u(1))).cast(Elem::F32),
            ));
        }
    }
    for i in 0..rm {
        let row = format!("r{i}");
        body.push(let_(&row, Elem::U32, plus(var("row0"), i)));
        for c in 0..rn {
            // Accumulator `j` holds column `c` (as lane `c % 4` when b is read by columns).
            let get = |a: &str| {
                if cfg.b_transposed {
                    var(&format!("{a}{i}_{c}"))
                } else {
                    var(&format!("{a}{i}_{}", c / 4)).lane((c % 4) as u8)
                }
            };
            let col = format!("c{c}");
            let st = epilogue_with(
                cfg,
                get("acc"),
                cfg.gate.then(|| get("acg")),
                var(&row),
                var(&col),
                &format!("{i}_{c}"),
                cfg.bias.then(|| var(&format!("bs{c}"))),
            );
            body.push(if_(var(&row).lt(uni("m")).and(var(&col).lt(uni("n"))), st));
        }
    }
    let kernel = Kernel {
        name,
        buffers: buffers(cfg),
        uniforms: UNIFORMS.iter().map(|s| s.to_string()).collect(),
        workgroup: [threads, 1, 1],
        shared: vec![],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: if row_axis == 0 {
            [GridDim::of("m", tm), GridDim::of("n", tn), grid_z()]
        } else {
            [GridDim::of("n", tn), GridDim::of("m", tm), grid_z()]
        },
        tunables: t.describe(cfg, limits),
    })
}

/// Tunables of the decode [`gemv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvTunables {
    /// Threads per workgroup (power of two).
    pub threads: u32,
    /// Output columns per workgroup (power of two, ≤ `threads`); `threads/cols` lanes split `k`.
    pub cols: u32,
}

impl GemvTunables {
    /// 256 threads (or the target's most); 8 columns for a transposed `b` (32 lanes along
    /// contiguous `k`), 64 for a normal one (coalesced along `n`).
    pub fn default_for(cfg: &MatMulConfig, limits: &Limits) -> GemvTunables {
        let threads = prev_pow2(limits.max_threads.min(256));
        let cols = if cfg.b_transposed { 8 } else { 64 }.min(threads);
        GemvTunables { threads, cols }
    }

    /// The default for `n` output columns: [`Self::default_for`] with no more columns per
    /// workgroup than the problem has, and 64 threads on a CPU adapter (one workgroup runs on
    /// one core: more, smaller workgroups spread a thin product over the cores).
    pub fn for_problem(cfg: &MatMulConfig, limits: &Limits, n: u64) -> GemvTunables {
        let mut t = Self::default_for(cfg, limits);
        if limits.kind == DeviceKind::Cpu {
            t.threads = t.threads.min(64);
        }
        let n = n.max(1).next_power_of_two().min(u64::from(u32::MAX)) as u32;
        t.cols = t.cols.min(t.threads).min(n.max(1));
        if t.validate("gemv", limits).is_ok() {
            t
        } else {
            Self::default_for(cfg, limits)
        }
    }

    /// Threads in {64, 128, 256, 512, 1024} × columns in {1, 2, …, threads}, within `limits`.
    pub fn space(_cfg: &MatMulConfig, limits: &Limits) -> Vec<GemvTunables> {
        let mut v = vec![];
        for threads in [64, 128, 256, 512, 1024] {
            let mut cols = 1;
            while cols <= threads {
                let t = GemvTunables { threads, cols };
                if t.validate("gemv", limits).is_ok() {
                    v.push(t);
                }
                cols *= 2;
            }
        }
        v
    }

    /// Errors (naming `kernel`) unless these tunables can be generated under `limits`.
    pub fn validate(&self, kernel: &str, limits: &Limits) -> Result<(), CodegenError> {
        let GemvTunables { threads, cols } = *self;
        if !threads.is_power_of_two() || !cols.is_power_of_two() || cols > threads {
            return Err(err(
                kernel,
                format!("threads and cols must be powers of two with cols ≤ threads: {self:?}"),
            ));
        }
        if threads > limits.max_threads || 4 * threads > limits.max_shared_bytes {
            return Err(err(
                kernel,
                format!(
                    "{threads} threads ({} shared bytes) exceed the target's {} ({})",
                    4 * threads,
                    limits.max_threads,
                    limits.max_shared_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn prev_pow2(x: u32) -> u32 {
    if x == 0 {
        1
    } else {
        1 << (31 - x.leading_zeros())
    }
}

/// The decode GEMV: few rows of `a` against `b`, one workgroup per `cols` outputs of a row
/// (see the module docs). Same buffers, uniforms and results as [`matmul`].
pub fn gemv(
    cfg: &MatMulConfig,
    t: &GemvTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let name = cfg.name("gemv");
    cfg.check(&name)?;
    t.validate(&name, limits)?;
    let (threads, cols) = (t.threads, t.cols);
    let lanes = threads / cols;
    // Partner stride between lanes of one column in `red`.
    let (lane_stride, mut body) = if cfg.b_transposed {
        (
            1,
            vec![
                let_("tid", Elem::U32, local_id(0)),
                let_("lk", Elem::U32, var("tid") % u(lanes)),
                let_("c", Elem::U32, var("tid") / u(lanes)),
            ],
        )
    } else {
        (
            cols,
            vec![
                let_("tid", Elem::U32, local_id(0)),
                let_("c", Elem::U32, var("tid") % u(cols)),
                let_("lk", Elem::U32, var("tid") / u(cols)),
            ],
        )
    };
    body.push(let_("col", Elem::U32, workgroup_id(0) * u(cols) + var("c")));
    body.push(let_("row", Elem::U32, workgroup_id(1)));
    body.extend(batch_offsets());
    let b_index = if cfg.b_transposed {
        var("b_off") + var("col") * uni("k") + var("kk")
    } else {
        var("b_off") + var("kk") * uni("n") + var("col")
    };
    body.push(var_("part", Elem::F32, f(0.0)));
    let mut step = vec![
        let_(
            "av",
            Elem::F32,
            load("a", var("a_off") + var("row") * uni("k") + var("kk")).cast(Elem::F32),
        ),
        assign(
            "part",
            var("part") + var("av") * load("b", b_index.clone()).cast(Elem::F32),
        ),
    ];
    // Gated: the `b2` partial sum alongside, reduced in `red2`.
    let reds: &[(&str, &str)] = if cfg.gate {
        body.push(var_("part2", Elem::F32, f(0.0)));
        step.push(assign(
            "part2",
            var("part2") + var("av") * load("b2", b_index).cast(Elem::F32),
        ));
        &[("red", "part"), ("red2", "part2")]
    } else {
        &[("red", "part")]
    };
    body.push(if_(
        var("col").lt(uni("n")),
        vec![for_step("kk", var("lk"), uni("k"), u(lanes), step)],
    ));
    for (red, part) in reds {
        body.push(store_shared(red, var("tid"), var(part)));
    }
    body.push(Stmt::Barrier);
    let mut s = lanes / 2;
    while s > 0 {
        let adds = reds
            .iter()
            .map(|(red, _)| {
                store_shared(
                    red,
                    var("tid"),
                    load_shared(red, var("tid"))
                        + load_shared(red, var("tid") + u(s * lane_stride)),
                )
            })
            .collect();
        body.push(if_(var("lk").lt(u(s)), adds));
        body.push(Stmt::Barrier);
        s /= 2;
    }
    body.push(if_(
        var("lk").eq_(u(0)).and(var("col").lt(uni("n"))),
        epilogue(
            cfg,
            load_shared("red", var("tid")),
            cfg.gate.then(|| load_shared("red2", var("tid"))),
            var("row"),
            var("col"),
            "",
        ),
    ));
    let kernel = Kernel {
        name,
        buffers: buffers(cfg),
        uniforms: UNIFORMS.iter().map(|s| s.to_string()).collect(),
        workgroup: [threads, 1, 1],
        shared: reds
            .iter()
            .map(|(red, _)| Shared {
                name: red.to_string(),
                elem: Elem::F32,
                len: threads,
            })
            .collect(),
        body,
    };
    check_limits(&kernel, limits)?;
    let space = GemvTunables::space(cfg, limits);
    let axis = |name, value, get: fn(&GemvTunables) -> u32| Tunable::axis(name, value, &space, get);
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("n", cols),
            GridDim {
                factors: vec![Factor::Uniform("m".into())],
                per_group: 1,
            },
            grid_z(),
        ],
        tunables: vec![
            axis("threads", threads, |t| t.threads),
            axis("cols", cols, |t| t.cols),
        ],
    })
}

/// Representative configurations of this family's kernels, for validation tests: every
/// epilogue in f32 with `b` normal and transposed, every epilogue in f16 (alternating
/// layouts), three bf16 (CUDA only), a bf16 one at the CUDA default tiling, a batched
/// attention-style `q·kᵀ` (f16, both operands strided per batch, 32×64 tiles) and two decode
/// GEMVs — the rest at the WebGPU defaults.
pub fn catalog() -> Vec<Generated> {
    let limits = Limits::webgpu();
    let epilogues = [
        (Act::Identity, false, false),
        (Act::Identity, true, false),
        (Act::GeluErf, true, false),
        (Act::GeluTanh, true, true),
        (Act::Relu, false, false),
        (Act::Silu, false, false),
    ];
    let mm = |cfg: MatMulConfig| {
        matmul(&cfg, &MatMulTunables::default_for(&cfg, &limits), &limits).expect("catalog matmul")
    };
    let mut v = vec![];
    for (act, bias, res) in epilogues {
        for bt in [false, true] {
            v.push(mm(MatMulConfig::plain(Elem::F32)
                .epilogue(act, bias, res)
                .transposed_b(bt)));
        }
    }
    for (i, (act, bias, res)) in epilogues.into_iter().enumerate() {
        v.push(mm(MatMulConfig::plain(Elem::F16)
            .epilogue(act, bias, res)
            .transposed_b(i % 2 == 1)));
    }
    v.push(mm(MatMulConfig::plain(Elem::BF16).transposed_b(true)));
    v.push(mm(MatMulConfig::plain(Elem::BF16).epilogue(
        Act::GeluTanh,
        true,
        true,
    )));
    v.push(mm(MatMulConfig::plain(Elem::BF16)
        .epilogue(Act::Silu, false, false)
        .transposed_b(true)));
    // The CUDA default tiling (128×128×16, 8×8 micro-tiles: 64 accumulators per thread), so
    // the NVRTC test checks its register use.
    let cfg = MatMulConfig::plain(Elem::BF16)
        .epilogue(Act::Identity, true, false)
        .transposed_b(true);
    let cuda_t = MatMulTunables::default_for(&cfg, &Limits::cuda());
    let mut g = matmul(&cfg, &cuda_t, &Limits::cuda()).expect("catalog matmul (CUDA default)");
    g.kernel.name = format!("{}_128x128x16_8x8", g.kernel.name);
    v.push(g);
    // Attention scores q [B, H, sq, d] · k [B, H, sk, d]ᵀ: batched, b transposed, small tiles.
    let qk = MatMulConfig::plain(Elem::F16).transposed_b(true);
    let qk_t = MatMulTunables {
        tile_m: 32,
        tile_n: 64,
        tile_k: 16,
        rm: 2,
        rn: 4,
        reg: 0,
    };
    let mut g = matmul(&qk, &qk_t, &limits).expect("catalog attention matmul");
    g.kernel.name = "matmul_f16_bt_batched_qk".into();
    v.push(g);
    // Gated (SwiGLU): f32 and f16 at the WebGPU defaults, bf16 at the CUDA default (its
    // register use checked by the NVRTC test), and the GEMV.
    let swiglu = |e| {
        MatMulConfig::plain(e)
            .epilogue(Act::Silu, false, false)
            .gated(true)
    };
    v.push(mm(swiglu(Elem::F32)));
    v.push(mm(swiglu(Elem::F16).transposed_b(true)));
    let cfg = swiglu(Elem::BF16).transposed_b(true);
    let t = MatMulTunables::default_for(&cfg, &Limits::cuda());
    v.push(matmul(&cfg, &t, &Limits::cuda()).expect("catalog gated matmul (CUDA default)"));
    // The register design (CPU adapters; printed for CUDA too, so NVRTC checks it): both
    // layouts, an epilogue, f16 storage, a gate and k unrolling.
    for (cfg, t, tag) in [
        (
            MatMulConfig::plain(Elem::F32)
                .epilogue(Act::GeluErf, true, true)
                .transposed_b(true),
            MatMulTunables::reg(8, 8, 1, 8, 1),
            "reg8x8",
        ),
        (
            MatMulConfig::plain(Elem::F32).epilogue(Act::Identity, true, false),
            MatMulTunables::reg(8, 8, 2, 4, 2),
            "reg8x8u2",
        ),
        (
            MatMulConfig::plain(Elem::F16).epilogue(Act::Relu, false, true),
            MatMulTunables::reg(4, 4, 2, 4, 1),
            "reg4x4",
        ),
        (
            swiglu(Elem::F32),
            MatMulTunables::reg(4, 8, 1, 8, 1),
            "reg4x8",
        ),
        (
            swiglu(Elem::F16).transposed_b(true),
            MatMulTunables::reg(2, 4, 4, 4, 2),
            "reg2x4u2",
        ),
        // The broadcast design (8-lane groups: `__shfl_sync` of width 8 on CUDA).
        (
            MatMulConfig::plain(Elem::F32).epilogue(Act::GeluErf, true, true),
            MatMulTunables::bcast(8, 8, 1),
            "bcast8x8",
        ),
        (
            MatMulConfig::plain(Elem::F16)
                .epilogue(Act::Relu, false, true)
                .transposed_b(true),
            MatMulTunables::bcast(16, 4, 1),
            "bcast16x4",
        ),
        (
            swiglu(Elem::F16).transposed_b(true),
            MatMulTunables::bcast(8, 4, 2),
            "bcast8x4u2",
        ),
    ] {
        let limits = Limits {
            subgroup_min: limits.subgroup_min.max(8),
            ..limits
        };
        let mut g = matmul(&cfg, &t, &limits).expect("catalog register matmul");
        g.kernel.name = format!("{}_{tag}", g.kernel.name);
        v.push(g);
    }
    for cfg in [
        MatMulConfig::plain(Elem::F32)
            .epilogue(Act::GeluErf, true, true)
            .transposed_b(true),
        MatMulConfig::plain(Elem::F16).epilogue(Act::Identity, true, false),
        swiglu(Elem::F32).transposed_b(true),
    ] {
        v.push(
            gemv(&cfg, &GemvTunables::default_for(&cfg, &limits), &limits).expect("catalog gemv"),
        );
    }
    v
}
