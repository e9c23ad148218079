//! Vectorised row primitives for the fast CPU paths, with the instruction set chosen at run
//! time: each loop is written once as plain lane-parallel Rust (`#[inline(always)]`) and
//! compiled again inside `#[target_feature(enable = "avx2,fma")]` wrappers, picked by
//! `is_x86_feature_detected!` on first use. Other targets (and x86 without AVX2) run the same
//! loop compiled for the baseline (SSE2 on x86-64, NEON on aarch64). Never `target-cpu=native`.

use std::sync::OnceLock;

use transfuse_ir::Act;

/// Lanes of the partial accumulators: 8 f32 = one AVX register (two SSE/NEON registers).
const LANES: usize = 8;

/// Inputs below this give 0 (`exp` underflows to a subnormal or zero there).
const EXP_LO: f32 = -87.336_55;
/// Inputs above this are clamped (2^128 would overflow the exponent bits).
const EXP_HI: f32 = 88.376_26;

/// `e^x` to about 2 ulp (Cephes' `expf` polynomial); `-inf` and anything below
/// [`EXP_LO`] give exactly 0. Branch-free so that it vectorises.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5·2^23 trick (no `round` call, exact for |v| < 2^22).
    const MAGIC: f32 = 12_582_912.0;
    // Not `clamp`: max/min map to vector instructions and let -inf through to the select.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(EXP_LO).min(EXP_HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // `n` as an integer from `t`'s mantissa (exact: `t` = MAGIC + n with n integral), not
    // `n as i32`, whose saturating conversion is not vectorised.
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = y * scale;
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn exp_shift_sum_body(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_approx(*v - m);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - m);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        best = if v > best { v } else { best };
    }
    best
}

#[inline(always)]
fn scale_body(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// `erf(x)` to within 5e-7 absolute (Abramowitz & Stegun 7.1.26, 1.5e-7, plus f32 rounding): used where
/// it is added to 1, as in GELU, so the absolute error is what counts.
#[inline(always)]
fn erf_approx(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_72;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp_approx(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// `tanh(x)` as `1 - 2 / (e^(2x) + 1)`, odd-symmetric; about 1e-7 absolute.
#[inline(always)]
fn tanh_approx(x: f32) -> f32 {
    let a = x.abs();
    let y = 1.0 - 2.0 / (exp_approx(2.0 * a) + 1.0);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// `x[j] = f(x[j])` in fixed groups of `N` (one register: 8 for AVX2, 16 for AVX-512), so
/// that the loop body (inlined `f`) is vectorised as one group per register rather than left
/// to the loop vectoriser.
#[inline(always)]
fn map_lanes<const N: usize>(x: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut chunks = x.chunks_exact_mut(N);
    for c in &mut chunks {
        let mut g = [0f32; N];
        g.copy_from_slice(c);
        for v in &mut g {
            *v = f(*v);
        }
        c.copy_from_slice(&g);
    }
    for v in chunks.into_remainder() {
        *v = f(*v);
    }
}

#[inline(always)]
fn act_body(kind: Act, x: &mut [f32]) {
    act_body_n::<LANES>(kind, x)
}

/// The activations with the lanes grouped by `N`; the same f32 operations per element
/// whatever `N` (no contraction into FMA), so every width gives the same bits.
#[inline(always)]
fn act_body_n<const N: usize>(kind: Act, x: &mut [f32]) {
    const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const CUBIC: f32 = 0.044_715;
    const SQRT_2_PI: f32 = 0.797_884_6;
    match kind {
        Act::Identity => {}
        Act::GeluErf => map_lanes::<N>(x, |y| (y * 0.5) * (erf_approx(y * INV_SQRT2) + 1.0)),
        Act::GeluTanh => map_lanes::<N>(x, |y| {
            let inner = y + ((y * y) * y) * CUBIC;
            (y * 0.5) * (tanh_approx(inner * SQRT_2_PI) + 1.0)
        }),
        Act::Relu => {
            for v in x {
                *v = if *v > 0.0 { *v } else { 0.0 };
            }
        }
        Act::Silu => map_lanes::<N>(x, |y| y / (1.0 + exp_approx(-y))),
    }
}

#[inline(always)]
fn add_body(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[inline(always)]
fn sum_body(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Layer norm of one row: `out = (x - μ)·(1/√(σ² + eps))·g + b`, μ and σ² = E[(x - μ)²] summed
/// in lanes.
#[inline(always)]
fn layer_norm_body(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let inv_n = 1.0 / x.len() as f32;
    let mu = sum_body(x) * inv_n;
    let mut acc = [0f32; LANES];
    let mut oc = out.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (o, xs) in (&mut oc).zip(&mut xc) {
        for ((a, o), &v) in acc.iter_mut().zip(o.iter_mut()).zip(xs) {
            *o = v - mu;
            *a += *o * *o;
        }
    }
    let mut tail = 0f32;
    for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = v - mu;
        tail += *o * *o;
    }
    let var = (acc.iter().sum::<f32>() + tail) * inv_n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((o, &gg), &bb) in out.iter_mut().zip(g).zip(b) {
        *o = *o * inv * gg + bb;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
        Level::Baseline
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shift_sum(x: &mut [f32], m: f32) -> f32 {
        super::exp_shift_sum_body(x, m)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        super::max_body(x)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale(x: &mut [f32], s: f32) {
        super::scale_body(x, s)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn act(kind: transfuse_ir::Act, x: &mut [f32]) {
        super::act_body(kind, x)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add(x: &mut [f32], y: &[f32]) {
        super::add_body(x, y)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn layer_norm(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        super::layer_norm_body(x, g, b, eps, out)
    }
}

/// The activations 16 lanes at a time (GELU's `erf`/`exp` polynomials are the epilogue's
/// cost at MiniLM's FFN shapes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn wide_act(kind: Act, x: &mut [f32]) {
    act_body_n::<16>(kind, x)
}

/// Whether this CPU runs AVX-512F (the flash attention's microkernels; detected once).
pub fn has_avx512() -> bool {
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return true;
        }
        false
    })
}

/// 16-lane AVX-512 forms of the primitives above, for kernels that keep their rows in
/// registers (the flash attention). Callers check [`has_avx512`] first.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_HI, EXP_LO};

    /// `e^x` per lane: the polynomial of the scalar `exp_approx` (about 2 ulp) with the
    /// reduction fused (`fnmadd`) and `2^n` applied by `scalef`; lanes below `EXP_LO`
    /// (`-inf` included) give exactly 0, lanes above `EXP_HI` are clamped there.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp(x: __m512) -> __m512 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let lo = _mm512_set1_ps(EXP_LO);
        let xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(EXP_HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let y = _mm512_scalef_ps(y, n);
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo), y)
    }
}

/// The instruction-set levels this machine runs these loops at (for reports).
pub fn level_name() -> &'static str {
    match level() {
        Level::Baseline => "baseline",
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => "avx2+fma",
    }
}

/// `x[j] = e^(x[j] - m)` in place; returns `Σ x[j]` (summed in lanes).
pub fn exp_shift_sum(x: &mut [f32], m: f32) -> f32 {
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::exp_shift_sum(x, m) },
        Level::Baseline => exp_shift_sum_body(x, m),
    }
}

/// The largest element (`-inf` for an empty slice or all `-inf`); NaNs are skipped.
pub fn max(x: &[f32]) -> f32 {
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::max(x) },
        Level::Baseline => max_body(x),
    }
}

/// `x[j] *= s` in place.
pub fn scale(x: &mut [f32], s: f32) {
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::scale(x, s) },
        Level::Baseline => scale_body(x, s),
    }
}

/// The activation in place, vectorised (GELU's `erf`/`tanh` and SiLU's `exp` approximated to
/// within 5e-7 absolute).
pub fn act(kind: Act, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F was detected on this CPU.
        return unsafe { wide_act(kind, x) };
    }
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::act(kind, x) },
        Level::Baseline => act_body(kind, x),
    }
}

/// `x[j] += y[j]`.
pub fn add(x: &mut [f32], y: &[f32]) {
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::add(x, y) },
        Level::Baseline => add_body(x, y),
    }
}

/// Layer norm of one row into `out` (`x`, `g`, `b`, `out` of one length), the statistics
/// summed in lanes.
pub fn layer_norm(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    assert!(g.len() == x.len() && b.len() == x.len() && out.len() == x.len());
    match level() {
        // SAFETY: the features were detected on this CPU.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::layer_norm(x, g, b, eps, out) },
        Level::Baseline => layer_norm_body(x, g, b, eps, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_of_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    /// The AVX-512 `exp` against f64 over its whole finite range, the underflow region (0,
    /// where the true value is below 2^-126), very negative inputs, `-inf` and 0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_is_within_2_ulp_of_std() {
        use std::arch::x86_64::*;
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let exp16 = |x: &[f32; 16]| -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F was detected above.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), avx512::exp(_mm512_loadu_ps(x.as_ptr()))) };
            out
        };
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.000_023);
            for (&xi, g) in xs.iter().zip(exp16(&xs)) {
                let want = (xi as f64).exp();
                worst = worst.max((g as f64 - want).abs() / want);
            }
            x += 0.000_37 * 16.0;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        let special = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1e30,
            -1000.0,
            -104.0,
            -88.0,
            -87.5,
            -0.0,
            0.0,
            1e-30,
            -1e-30,
            1.0,
            -1.0,
            88.0,
            20.0,
            -20.0,
        ];
        let got = exp16(&special);
        for (&xi, g) in special.iter().zip(got) {
            let want = (xi as f64).exp();
            if xi < EXP_LO {
                // Underflow: exactly 0 where the true value is a subnormal or less.
                assert_eq!(g, 0.0, "exp({xi})");
                assert!(want < 1.2e-38, "exp({xi})");
            } else {
                assert!(
                    (g as f64 - want).abs() <= 2.5e-7 * want,
                    "exp({xi}) = {g}, want {want}"
                );
            }
        }
        assert_eq!(got[7], 1.0);
        assert_eq!(got[8], 1.0);
    }

    #[test]
    fn erf_and_tanh_are_within_5e7_absolute() {
        let mut x = -9.0f32;
        while x < 9.0 {
            let e = erf_approx(x) as f64 - libm::erf(x as f64);
            let t = tanh_approx(x) as f64 - (x as f64).tanh();
            assert!(
                e.abs() < 5e-7 && t.abs() < 5e-7,
                "x={x}: erf {e:e}, tanh {t:e}"
            );
            x += 0.000_71;
        }
    }

    #[test]
    fn dispatched_loops_match_plain_ones() {
        for n in [0, 1, 3, 8, 50, 129, 783] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7)
                .collect();
            let want_max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&v), want_max);
            let mut e = v.clone();
            let s = exp_shift_sum(&mut e, want_max);
            let want: Vec<f64> = v.iter().map(|&x| ((x - want_max) as f64).exp()).collect();
            for (g, w) in e.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 3e-7 * w, "{g} vs {w}");
            }
            let ws: f64 = want.iter().sum();
            assert!((s as f64 - ws).abs() <= 1e-6 * (1.0 + ws));
        }
    }
}
