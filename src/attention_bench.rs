//! The fused-attention benchmark behind `transfuse bench attention`.
//!
//! Every case starts from the builder graph a model uses — `b.attention(q, k, v, mask)` with the
//! mask spelled in primitives (iota comparisons for causal and sliding-window masks, an additive
//! `(1 − m)·finfo.min` padding mask) — and runs it in up to three [`Variant`]s: *fused* (the
//! optimizer's output, one attention kernel), *unfused* (the optimizer without its attention
//! rule family: QKᵀ matmul, fused scale+mask+softmax, PV matmul, as PyTorch eager runs it) and
//! *primitive* (no optimizer). Each (case, variant) is checked once against an f64 reference
//! computed on the host (a sample of rows at large sizes): a wrong result is reported as an
//! error, never as a time; a backend that refuses a case (a buffer over its binding limit, …)
//! gives a `refused` result and the other cases go on.
//!
//! Shapes: `q [b, heads, seq, d]`, `k, v [b, kv_heads, kv, d]` with symbolic `seq` and `kv`
//! (the key length), so one graph serves prefill (`kv = seq`) and decode (`seq = 1`,
//! `kv = past + 1`: the new row's own key and value are in the cache), and device plans carry
//! their decode variants exactly as a model's do. Inputs come from splitmix64 (seed 42, values
//! in [-1, 1)), Q then K then V, as the peers in `shared/peers` draw them.
//!
//! Flops count `4·b·heads·d` per visible (query, key) pair, with a causal prefill counted as
//! half the score matrix (FlashAttention's convention, and the peers'), a sliding window as its
//! band; bytes count Q, K, V and O once.

use std::time::Instant;

use crate::codegen::kir::Elem;
use crate::ir::{CmpOp, DType, Dim, Graph, Tensor};
use crate::runtime::{Backend, TensorMap};
use crate::{passes, Error};

/// Which keys a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Query `i` (at position `kv − seq + i`) sees keys `j ≤ kv − seq + i`.
    Causal,
    /// Per-row valid key lengths: key `j` of row `b` is visible iff `j < lengths[b]`.
    Padding,
    /// Hugging Face's causal sliding window: key `j` visible from position `p` iff
    /// `p − W < j ≤ p`.
    Window,
    /// Every key visible.
    None,
}

impl MaskKind {
    /// Parses `causal`, `padding`, `window` or `none`.
    pub fn from_name(s: &str) -> Option<MaskKind> {
        Some(match s {
            "causal" => MaskKind::Causal,
            "padding" => MaskKind::Padding,
            "window" => MaskKind::Window,
            "none" => MaskKind::None,
            _ => return None,
        })
    }

    /// The name used in case names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MaskKind::Causal => "causal",
            MaskKind::Padding => "padding",
            MaskKind::Window => "window",
            MaskKind::None => "none",
        }
    }
}

/// What the optimizer may do to the attention graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Every rule family: one attention kernel.
    Fused,
    /// Every family but `attention`: matmul, fused softmax (scale + mask), matmul.
    Unfused,
    /// No optimizer: the primitive graph as built.
    Primitive,
}

impl Variant {
    /// Parses `fused`, `unfused` or `primitive`.
    pub fn from_name(s: &str) -> Option<Variant> {
        Some(match s {
            "fused" => Variant::Fused,
            "unfused" => Variant::Unfused,
            "primitive" => Variant::Primitive,
            _ => return None,
        })
    }

    /// The variant's name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Fused => "fused",
            Variant::Unfused => "unfused",
            Variant::Primitive => "primitive",
        }
    }
}

/// One point of a sweep: a prefill of `seq` rows, or one decode row after `past` cached keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// `seq` query rows against `seq` keys.
    Prefill(usize),
    /// One query row against `past + 1` keys (the cache and the new row's own key).
    Decode(usize),
}

impl Point {
    /// Query rows and key length.
    pub fn dims(self) -> (usize, usize) {
        match self {
            Point::Prefill(s) => (s, s),
            Point::Decode(p) => (1, p + 1),
        }
    }
}

/// The problem being benchmarked (everything but the sequence length).
#[derive(Clone, Debug, PartialEq)]
pub struct AttnConfig {
    /// Sequences per batch.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`, MQA when 1); divides `heads`.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// The mask.
    pub mask: MaskKind,
    /// Window length for [`MaskKind::Window`].
    pub window: usize,
    /// Valid key lengths per batch row for [`MaskKind::Padding`] (one value applies to every
    /// row; empty: three quarters of the keys, rounded up).
    pub lengths: Vec<usize>,
    /// Storage type on the device.
    pub dtype: Elem,
}

/// Head dims the benchmark accepts.
pub const HEAD_DIMS: &[usize] = &[32, 64, 128];

impl AttnConfig {
    /// Checks the configuration against the points it will run; the error names the flag.
    pub fn validate(&self, points: &[Point]) -> Result<(), Error> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.batch == 0 {
            return usage("--batch must be at least 1".into());
        }
        if self.heads == 0 {
            return usage("--heads must be at least 1".into());
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return usage(format!(
                "--kv-heads {} must divide --heads {}",
                self.kv_heads, self.heads
            ));
        }
        if !HEAD_DIMS.contains(&self.head_dim) {
            return usage(format!(
                "--head-dim {} is not supported (expected 32, 64 or 128)",
                self.head_dim
            ));
        }
        if self.mask == MaskKind::Window && self.window == 0 {
            return usage("--window must be at least 1".into());
        }
        if points.is_empty() {
            return usage("--seq (or --past with --decode) needs at least one value".into());
        }
        for p in points {
            if let Point::Prefill(0) = p {
                return usage("--seq values must be at least 1".into());
            }
        }
        if self.mask == MaskKind::Padding {
            if !(self.lengths.is_empty()
                || self.lengths.len() == 1
                || self.lengths.len() == self.batch)
            {
                return usage(format!(
                    "--lengths has {} values; give one, or one per batch row ({})",
                    self.lengths.len(),
                    self.batch
                ));
            }
            for p in points {
                let (_, kv) = p.dims();
                if let Some(&l) = self.lengths.iter().find(|&&l| l > kv) {
                    let what = match p {
                        Point::Prefill(s) => format!("--seq {s}"),
                        Point::Decode(past) => format!("--past {past} (+1 new key)"),
                    };
                    return usage(format!("--lengths {l} is longer than {what}"));
                }
            }
        }
        Ok(())
    }

    /// Valid key lengths per batch row at key length `kv`.
    pub fn row_lengths(&self, kv: usize) -> Vec<usize> {
        match self.lengths.as_slice() {
            [] => vec![kv - kv / 4; self.batch],
            [l] => vec![*l; self.batch],
            ls => ls.to_vec(),
        }
    }

    /// The case name, e.g. `causal_attn_b1_h12_s1024_d64_f32` or
    /// `decode_attn_b1_h12_kv4_p37_d64_f16`.
    pub fn case_name(&self, p: Point) -> String {
        let kv = if self.kv_heads != self.heads {
            format!("_kv{}", self.kv_heads)
        } else {
            String::new()
        };
        let dt = elem_name(self.dtype);
        match p {
            Point::Prefill(s) => {
                let w = if self.mask == MaskKind::Window {
                    format!("_w{}", self.window)
                } else {
                    String::new()
                };
                format!(
                    "{}_attn_b{}_h{}{kv}{w}_s{s}_d{}_{dt}",
                    self.mask.name(),
                    self.batch,
                    self.heads,
                    self.head_dim
                )
            }
            Point::Decode(past) => format!(
                "decode_attn_b{}_h{}{kv}_p{past}_d{}_{dt}",
                self.batch, self.heads, self.head_dim
            ),
        }
    }

    /// Is key `j` visible from query row `i` of batch row `b` at this point?
    fn visible(&self, b: usize, i: usize, j: usize, sq: usize, kv: usize, lens: &[usize]) -> bool {
        let pos = kv - sq + i;
        match self.mask {
            MaskKind::None => true,
            MaskKind::Padding => j < lens[b],
            MaskKind::Causal => j <= pos,
            MaskKind::Window => j <= pos && j + self.window > pos,
        }
    }

    /// Visible (query, key) pairs per (batch, head), counted as the flop convention says.
    pub fn pairs(&self, p: Point) -> f64 {
        let (sq, kv) = p.dims();
        match (self.mask, p) {
            (MaskKind::Causal, Point::Prefill(_)) => (sq * kv) as f64 / 2.0,
            (MaskKind::Window, _) | (MaskKind::Causal, Point::Decode(_)) => (0..sq)
                .map(|i| {
                    let pos = kv - sq + i;
                    let lo = match self.mask {
                        MaskKind::Window => (pos + 1).saturating_sub(self.window),
                        _ => 0,
                    };
                    (pos + 1 - lo) as f64
                })
                .sum(),
            _ => (sq * kv) as f64,
        }
    }

    /// Flops of one forward at `p`.
    pub fn flops(&self, p: Point) -> f64 {
        4.0 * (self.batch * self.heads * self.head_dim) as f64 * self.pairs(p)
    }

    /// Bytes of Q, K, V and O at `p`.
    pub fn bytes(&self, p: Point) -> f64 {
        let (sq, kv) = p.dims();
        let e = crate::codegen::kir::elem_bytes(self.dtype) as usize;
        let q = self.batch * self.heads * sq * self.head_dim;
        let k = self.batch * self.kv_heads * kv * self.head_dim;
        (e * (2 * q + 2 * k)) as f64
    }
}

/// `f32`, `f16` or `bf16`.
pub fn elem_name(e: Elem) -> &'static str {
    match e {
        Elem::F16 => "f16",
        Elem::BF16 => "bf16",
        _ => "f32",
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn elem_from_name(s: &str) -> Option<Elem> {
    Some(match s {
        "f32" => Elem::F32,
        "f16" => Elem::F16,
        "bf16" => Elem::BF16,
        _ => return None,
    })
}

/// The builder graph of one attention: inputs `q`, `k`, `v` (and `attention_mask` i64
/// `[b, kv]` for padding), output `out` `[b, heads, seq, d]`.
pub fn graph(cfg: &AttnConfig) -> Result<Graph, Error> {
    let build = || -> Result<Graph, crate::ir::IrError> {
        let (seq, kv) = (Dim::sym("seq"), Dim::sym("kv"));
        let (b, h, g, d) = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim);
        let mut bl = crate::ir::Builder::new();
        let q = bl.input(
            "q",
            vec![b.into(), h.into(), seq.clone(), d.into()],
            DType::F32,
        )?;
        let kv_shape = vec![b.into(), g.into(), kv.clone(), d.into()];
        let mut k = bl.input("k", kv_shape.clone(), DType::F32)?;
        let mut v = bl.input("v", kv_shape, DType::F32)?;
        if g != h {
            // GQA as transformers spells it (`repeat_kv`, the LLaMA builder's own helper): each
            // k/v head serves h/g query heads.
            k = crate::models::llama::repeat_kv(&mut bl, k, h / g)?;
            v = crate::models::llama::repeat_kv(&mut bl, v, h / g)?;
        }
        let min = f32::MIN as f64;
        let mask = match cfg.mask {
            MaskKind::None => None,
            MaskKind::Padding => {
                let m = bl.input("attention_mask", vec![b.into(), kv.clone()], DType::I64)?;
                let m = bl.cast(m, DType::F32)?;
                let one = bl.scalar(1.0)?;
                let inv = bl.sub(one, m)?;
                let add = bl.mul_scalar(inv, min)?;
                Some(bl.reshape(add, vec![b.into(), 1.into(), 1.into(), kv.clone()])?)
            }
            MaskKind::Causal | MaskKind::Window => {
                // As GPT-2 spells it: query positions kv-seq.., keys 0..kv.
                let qpos = bl.iota(kv.minus(&seq), seq.clone())?;
                let qpos = bl.reshape(qpos, vec![seq.clone(), 1.into()])?;
                let kpos = bl.iota(0.into(), kv.clone())?;
                let causal = bl.compare(CmpOp::Le, kpos, qpos)?;
                let fill = bl.scalar(min)?;
                let zero = bl.scalar(0.0)?;
                let keep = if cfg.mask == MaskKind::Window {
                    // and j > pos − W, i.e. j + W > pos
                    let w = bl.scalar_i64(cfg.window as i64)?;
                    let kw = bl.add(kpos, w)?;
                    let inside = bl.compare(CmpOp::Gt, kw, qpos)?;
                    bl.select(inside, zero, fill)?
                } else {
                    zero
                };
                Some(bl.select(causal, keep, fill)?)
            }
        };
        let o = bl.attention(q, k, v, mask)?;
        bl.output("out", o);
        Ok(bl.finish())
    };
    Ok(build().map_err(crate::runtime::RuntimeError::from)?)
}

/// The graph `variant` runs (optimizer options from the environment, as sessions use).
pub fn variant_graph(g: &Graph, variant: Variant) -> Result<Graph, Error> {
    let mut opts = passes::Options::from_env()?;
    match variant {
        Variant::Primitive => return Ok(g.clone()),
        Variant::Unfused => opts.families.retain(|f| f != "attention"),
        Variant::Fused => {}
    }
    Ok(passes::optimize(g, &opts)?.0)
}

/// Why the fused variant of `cfg` cannot be what it claims, if it is not one attention op
/// with the mask of `cfg` folded in.
pub fn fused_unsupported(cfg: &AttnConfig, fused: &Graph) -> Option<String> {
    let counts = fused.op_counts();
    let n = counts.get("attention").copied().unwrap_or(0);
    if cfg.kv_heads != cfg.heads {
        // GQA/MQA: the fused op must read the key/value heads directly (`repeat_kv` absorbed).
        let kv_read = fused.nodes().any(|(_, node)| {
            matches!(node.op, crate::ir::Op::Attention { .. })
                && fused.node(node.inputs[1]).shape.get(1) == Some(&cfg.kv_heads.into())
        });
        if !kv_read {
            return Some("GQA/MQA: the optimizer left repeat_kv outside the attention op".into());
        }
    }
    if n != 1 {
        return Some(format!(
            "the optimizer made {n} attention ops of this spelling, not 1"
        ));
    }
    if cfg.mask == MaskKind::Window {
        let window = fused.nodes().any(|(_, node)| {
            matches!(
                node.op,
                crate::ir::Op::Attention {
                    window: Some(_),
                    ..
                }
            )
        });
        if !window {
            return Some(
                "sliding window: no rule recognises a window mask spelled in primitives yet \
                 (the LLaMA issue adds it); the fused op would carry it as an additive mask"
                    .into(),
            );
        }
    }
    None
}

/// splitmix64 values in [-1, 1), as the peers draw them.
pub struct SplitMix(u64);

impl SplitMix {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    /// The next value in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
}

/// Host inputs of one point.
pub fn inputs(cfg: &AttnConfig, p: Point) -> TensorMap {
    let (sq, kv) = p.dims();
    let (b, h, g, d) = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim);
    let mut rng = SplitMix::new(42);
    let mut draw = |n: usize| (0..n).map(|_| rng.next_f32()).collect::<Vec<f32>>();
    let mut m = TensorMap::new();
    m.insert(
        "q".into(),
        Tensor::f32(vec![b, h, sq, d], draw(b * h * sq * d)),
    );
    m.insert(
        "k".into(),
        Tensor::f32(vec![b, g, kv, d], draw(b * g * kv * d)),
    );
    m.insert(
        "v".into(),
        Tensor::f32(vec![b, g, kv, d], draw(b * g * kv * d)),
    );
    if cfg.mask == MaskKind::Padding {
        let lens = cfg.row_lengths(kv);
        let mask = (0..b)
            .flat_map(|r| {
                let len = lens[r];
                (0..kv).map(move |j| i64::from(j < len))
            })
            .collect();
        m.insert("attention_mask".into(), Tensor::i64(vec![b, kv], mask));
    }
    m
}

/// Rounds `x` to what storage `e` holds (what the device sees after the upload).
fn round_to(x: f32, e: Elem) -> f64 {
    match e {
        Elem::F16 => half::f16::from_f32(x).to_f64(),
        Elem::BF16 => half::bf16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

/// Largest |out − reference| over the checked rows (all rows when the problem is small, an
/// even sample of at least 64 rows — the last included — otherwise), the reference computed
/// in f64 from the inputs as the device stores them. A non-finite output is `inf`.
pub fn max_abs_diff(cfg: &AttnConfig, p: Point, inp: &TensorMap, out: &Tensor) -> f64 {
    let (sq, kv) = p.dims();
    let (b, h, g, d) = (cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim);
    let get = |n: &str| -> Vec<f64> {
        inp[n]
            .as_f32()
            .expect("f32 input")
            .iter()
            .map(|&x| round_to(x, cfg.dtype))
            .collect()
    };
    let (q, k, v) = (get("q"), get("k"), get("v"));
    let o = out.as_f32().expect("f32 output");
    let lens = cfg.row_lengths(kv);
    let rows = b * h * sq;
    let budget = 60_000_000usize;
    let step = (rows * kv * d / budget)
        .max(1)
        .min(rows.div_ceil(64).max(1));
    let scale = 1.0 / (d as f64).sqrt();
    let mut worst = 0.0f64;
    let mut check = |r: usize| {
        let (bi, hi, i) = (r / (h * sq), (r / sq) % h, r % sq);
        let gi = hi / (h / g);
        let qrow = &q[r * d..(r + 1) * d];
        let kbase = (bi * g + gi) * kv * d;
        let scores: Vec<f64> = (0..kv)
            .map(|j| {
                let kr = &k[kbase + j * d..kbase + (j + 1) * d];
                let s: f64 = qrow.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() * scale;
                if cfg.visible(bi, i, j, sq, kv, &lens) {
                    s
                } else {
                    // What an additive finfo.min mask does in f64: a fully masked row is uniform.
                    s + f32::MIN as f64
                }
            })
            .collect();
        let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        for c in 0..d {
            let want: f64 = (0..kv).map(|j| e[j] * v[kbase + j * d + c]).sum::<f64>() / sum;
            let got = o[r * d + c] as f64;
            let diff = if got.is_finite() {
                (got - want).abs()
            } else {
                f64::INFINITY
            };
            worst = worst.max(diff);
        }
    };
    let mut r = 0;
    while r < rows {
        check(r);
        r += step;
    }
    if !(rows - 1).is_multiple_of(step) {
        check(rows - 1);
    }
    worst
}

/// Tolerance of the f64 check for storage `e`. f32: 1e-4 absolute (outputs are convex
/// combinations of values in [-1, 1); measured errors are ~1e-7). f16: 1e-2 — its unit
/// roundoff is 2⁻¹¹ ≈ 4.9e-4, and the unfused path stores the scaled scores (|s| up to √d ≈ 11
/// at d = 128) and the probabilities in f16, so a logit carries up to ~5e-3 absolute error
/// before the exp. bf16: 8e-2, the same reasoning with its 2⁻⁸ ≈ 3.9e-3 unit roundoff.
pub fn tolerance(e: Elem) -> f64 {
    match e {
        Elem::F16 => 1e-2,
        Elem::BF16 => 8e-2,
        _ => 1e-4,
    }
}

/// The outcome of one (case, variant).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Timed and checked.
    Timed(Timed),
    /// The backend refused the case (kept going).
    Refused(String),
    /// This variant cannot be built for this case yet.
    Unsupported(String),
    /// The result was wrong (no time is reported).
    Wrong {
        /// The largest difference to the reference.
        max_abs_diff: f64,
        /// The tolerance it broke.
        tolerance: f64,
    },
}

/// Figures of a timed case.
#[derive(Clone, Debug, PartialEq)]
pub struct Timed {
    /// Median, min and max of the timed runs, in ms.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// Load (optimize, lower, compile kernels) plus the first run, in ms.
    pub first_call_ms: f64,
    /// TFLOP/s at the median (the flop convention of the module docs).
    pub tflops: f64,
    /// Effective GB/s (Q, K, V, O once).
    pub gbps: f64,
    /// Against the f64 reference.
    pub max_abs_diff: f64,
    /// The clock used.
    pub clock: &'static str,
}

/// One line of results.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseResult {
    /// `transfuse-cpu`, `transfuse-wgpu`, `transfuse-cuda`.
    pub system: String,
    /// The variant.
    pub variant: Variant,
    /// The case name.
    pub case: String,
    /// The point (for plots).
    pub point: Point,
    /// What happened.
    pub outcome: Outcome,
}

/// Runs one (case, variant) on `backend`.
pub fn run_case(
    backend: &dyn Backend,
    cfg: &AttnConfig,
    p: Point,
    variant: Variant,
    warmup: usize,
    iters: usize,
) -> Result<Outcome, Error> {
    let t0 = Instant::now();
    let g = graph(cfg)?;
    let vg = variant_graph(&g, variant)?;
    if variant == Variant::Fused {
        if let Some(why) = fused_unsupported(cfg, &vg) {
            return Ok(Outcome::Unsupported(why));
        }
    }
    let inp = inputs(cfg, p);
    // One line whatever the device said (wgpu's validation errors span several).
    let refused = |e: crate::runtime::RuntimeError| {
        let why = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Outcome::Refused(why))
    };
    let mut loaded = match backend.load_as(&vg, &Default::default(), cfg.dtype) {
        Ok(l) => l,
        Err(e) => return refused(e),
    };
    let out = match loaded.run(&inp, &[]) {
        Ok(o) => o,
        Err(e) => return refused(e),
    };
    let first_call_ms = t0.elapsed().as_secs_f64() * 1e3;
    let diff = max_abs_diff(cfg, p, &inp, &out["out"]);
    let tol = tolerance(cfg.dtype);
    if diff.is_nan() || diff > tol {
        return Ok(Outcome::Wrong {
            max_abs_diff: diff,
            tolerance: tol,
        });
    }
    if warmup > 0 {
        if let Err(e) = loaded.time_forward(&inp, warmup) {
            return refused(e);
        }
    }
    let timing = match loaded.time_forward(&inp, iters) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    let mut ms: Vec<f64> = timing.seconds.iter().map(|s| s * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median_ms = ms[ms.len() / 2];
    Ok(Outcome::Timed(Timed {
        median_ms,
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        runs: ms.len(),
        first_call_ms,
        tflops: cfg.flops(p) / (median_ms * 1e-3) / 1e12,
        gbps: cfg.bytes(p) / (median_ms * 1e-3) / 1e9,
        max_abs_diff: diff,
        clock: timing.clock,
    }))
}

/// Dense peak TFLOP/s of known devices for `dtype`: the tensor-core peak for f16/bf16, the
/// non-tensor FP32 peak for f32 (dense, no sparsity). Matched on the device description.
pub fn peak_tflops(description: &str, dtype: Elem) -> Option<f64> {
    let tensor = matches!(dtype, Elem::F16 | Elem::BF16);
    // (name, FP32 non-tensor, FP16/BF16 dense tensor core)
    let table: &[(&str, f64, f64)] = &[
        // NVIDIA H200 datasheet (SXM): FP32 67 TFLOPS, BF16/FP16 Tensor Core 1,979 TFLOPS with
        // sparsity, i.e. 989.5 dense.
        ("H200", 67.0, 989.5),
        // NVIDIA H100 datasheet (SXM5): FP32 67 TFLOPS, FP16/BF16 Tensor 1,979 sparse = 989.5
        // dense. (PCIe/NVL parts are lower: matched as SXM here, an upper bound.)
        ("H100", 67.0, 989.5),
        // NVIDIA A100 datasheet: FP32 19.5 TFLOPS, FP16/BF16 Tensor Core 312 TFLOPS dense.
        ("A100", 19.5, 312.0),
    ];
    table
        .iter()
        .find(|(n, _, _)| description.contains(n))
        .map(|&(_, f32_peak, tc)| if tensor { tc } else { f32_peak })
}

impl CaseResult {
    /// The `--json` line: `system`, `variant`, `case`, then the figures (or `refused`,
    /// `unsupported`, `error`), as the peers in `shared/peers` print theirs.
    pub fn json(&self, fused_over: Option<f64>, peak: Option<f64>) -> serde_json::Value {
        let mut j = serde_json::json!({
            "system": self.system,
            "variant": self.variant.name(),
            "case": self.case,
        });
        let m = j.as_object_mut().expect("an object");
        match &self.outcome {
            Outcome::Timed(t) => {
                let figures = serde_json::json!({
                    "median_ms": t.median_ms,
                    "min_ms": t.min_ms,
                    "max_ms": t.max_ms,
                    "runs": t.runs,
                    "first_call_ms": t.first_call_ms,
                    "tflops": t.tflops,
                    "gbps": t.gbps,
                    "max_abs_diff": t.max_abs_diff,
                    "clock": t.clock,
                    "speedup_vs_unfused": fused_over,
                    "pct_of_peak": peak.map(|p| 100.0 * t.tflops / p),
                });
                m.extend(figures.as_object().expect("an object").clone());
            }
            Outcome::Refused(why) => {
                m.insert("refused".into(), why.clone().into());
            }
            Outcome::Unsupported(why) => {
                m.insert("unsupported".into(), why.clone().into());
            }
            Outcome::Wrong {
                max_abs_diff,
                tolerance,
            } => {
                m.insert(
                    "error".into(),
                    format!("result differs from the f64 reference by {max_abs_diff:e} (tolerance {tolerance:e})")
                        .into(),
                );
                m.insert("max_abs_diff".into(), (*max_abs_diff).into());
            }
        }
        j
    }

    /// The median of a timed result.
    pub fn median_ms(&self) -> Option<f64> {
        match &self.outcome {
            Outcome::Timed(t) => Some(t.median_ms),
            _ => None,
        }
    }
}

/// For each result, the unfused median over this result's median (fused and primitive rows
/// of a case whose unfused variant was timed).
pub fn speedups(results: &[CaseResult]) -> Vec<Option<f64>> {
    results
        .iter()
        .map(|r| {
            let me = r.median_ms()?;
            if r.variant == Variant::Unfused {
                return None;
            }
            let base = results
                .iter()
                .find(|o| o.case == r.case && o.variant == Variant::Unfused)?
                .median_ms()?;
            Some(base / me)
        })
        .collect()
}

/// CSV header of [`csv_line`].
pub const CSV_HEADER: &str = "system,variant,case,median_ms,min_ms,max_ms,runs,first_call_ms,tflops,gbps,max_abs_diff,clock,speedup_vs_unfused,pct_of_peak,status";

/// One CSV line (empty fields where a figure does not apply; `status` is `ok`, `refused`,
/// `unsupported` or `error`).
pub fn csv_line(r: &CaseResult, speedup: Option<f64>, peak: Option<f64>) -> String {
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
    let head = format!("{},{},{}", r.system, r.variant.name(), r.case);
    match &r.outcome {
        Outcome::Timed(t) => format!(
            "{head},{},{},{},{},{},{},{},{},{},{},{},ok",
            t.median_ms,
            t.min_ms,
            t.max_ms,
            t.runs,
            t.first_call_ms,
            t.tflops,
            t.gbps,
            t.max_abs_diff,
            t.clock,
            opt(speedup),
            opt(peak.map(|p| 100.0 * t.tflops / p)),
        ),
        Outcome::Refused(_) => format!("{head},,,,,,,,,,,,,refused"),
        Outcome::Unsupported(_) => format!("{head},,,,,,,,,,,,,unsupported"),
        Outcome::Wrong { max_abs_diff, .. } => {
            format!("{head},,,,,,,,,{max_abs_diff},,,,error")
        }
    }
}

/// One row of the table for people.
pub fn table_line(r: &CaseResult, speedup: Option<f64>, peak: Option<f64>) -> String {
    let lead = format!("{:<44} {:<9}", r.case, r.variant.name());
    match &r.outcome {
        Outcome::Timed(t) => format!(
            "{lead} {:>10.3} {:>10.3} {:>10.3} {:>9.2} {:>8.2} {:>8} {:>7} {:>9.1e} {:>10.1}",
            t.median_ms,
            t.min_ms,
            t.max_ms,
            t.tflops * 1e3,
            t.gbps,
            speedup.map_or("—".into(), |s| format!("{s:.2}×")),
            peak.map_or("—".into(), |p| format!("{:.1}", 100.0 * t.tflops / p)),
            t.max_abs_diff,
            t.first_call_ms,
        ),
        Outcome::Refused(why) => format!("{lead} refused: {why}"),
        Outcome::Unsupported(why) => format!("{lead} unsupported: {why}"),
        Outcome::Wrong {
            max_abs_diff,
            tolerance,
        } => format!(
            "{lead} error: result differs from the f64 reference by {max_abs_diff:.2e} (tolerance {tolerance:.0e}); no time reported"
        ),
    }
}

/// Header of [`table_line`].
pub fn table_header() -> String {
    format!(
        "{:<44} {:<9} {:>10} {:>10} {:>10} {:>9} {:>8} {:>8} {:>7} {:>9} {:>10}",
        "case",
        "variant",
        "median ms",
        "min ms",
        "max ms",
        "GFLOP/s",
        "GB/s",
        "vs unf.",
        "% peak",
        "max diff",
        "first ms"
    )
}

/// Draws the results as an SVG chart at `path`: TFLOP/s against sequence length, one line
/// per variant (FlashAttention's benchmark plot), or for decode sweeps ms per step against
/// the cache length. Only timed results are drawn. SVG needs no fonts on the machine (text is
/// left to the viewer); other extensions are a usage error.
pub fn plot(path: &std::path::Path, title: &str, results: &[CaseResult]) -> Result<(), Error> {
    use plotters::prelude::*;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case("svg") {
        return Err(Error::Usage(format!(
            "--plot {}: only .svg is supported (it needs no system fonts)",
            path.display()
        )));
    }
    let decode = results.iter().any(|r| matches!(r.point, Point::Decode(_)));
    // (series name, points (x, y))
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![];
    for r in results {
        let Outcome::Timed(t) = &r.outcome else {
            continue;
        };
        let x = match r.point {
            Point::Prefill(s) => s as f64,
            Point::Decode(p) => p as f64,
        };
        let y = if decode { t.median_ms } else { t.tflops * 1e3 };
        let name = format!("{} {}", r.system, r.variant.name());
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push((x, y)),
            None => series.push((name, vec![(x, y)])),
        }
    }
    if series.is_empty() {
        return Err(Error::Usage(format!(
            "--plot {}: no timed results to draw",
            path.display()
        )));
    }
    let draw_err = |e: String| Error::Usage(format!("--plot {}: {e}", path.display()));
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(0.0f64, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
    let (x_lo, x_hi) = (xmin.max(1.0) / 1.5, xmax.max(1.0) * 1.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..ymax * 1.15)
        .map_err(|e| draw_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(if decode {
            "past (cached keys)"
        } else {
            "sequence length"
        })
        .y_desc(if decode { "ms per step" } else { "GFLOP/s" })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| draw_err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    root.present().map_err(|e| draw_err(e.to_string()))?;
    Ok(())
}
