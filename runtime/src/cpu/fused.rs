//! CPU implementations of the fused ops (see `transfuse_ir::Op`'s fused variants).
//!
//! Each kernel performs the same f32 operations, in the same order, as the op's primitive
//! decomposition (`transfuse_ir::decompose`) run on this backend: `x·scale` then `+ mask`,
//! row max, `exp(x - max)`, a sequential sum, a division; means as a sequential sum times
//! `1/n`, variance as `E[(x - μ)²]`, `rsqrt` as `1/√`. Matmuls go through the same sgemm, so
//! the fused ops agree with their decompositions to the last bit or close to it.
//!
//! Attention computes one `[rows, sk]` block of scores per (batch, head, block of at most
//! [`ATTN_ROWS`] queries) at a time and never holds the whole `[.., sq, sk]` score tensor.
//!
//! With `fast`, attention is `flash::attention` and the fused matmul `gemm::matmul` with the
//! epilogue applied per block of rows; the same epilogue arithmetic as here.

use std::sync::Arc;

use rayon::prelude::*;
use transfuse_ir::{Act, Op, Tensor};

use super::gemm::Operand;
use super::kernels::{
    broadcast_strides, for_rows, gemm, gemm_strided, matmul, row_offset, strides,
};
use super::simd;
use super::view::{self, Val};
use super::{arena, flash, gemm as fast_gemm};

/// Queries per attention work item: one score block is `ATTN_ROWS × sk` floats.
pub const ATTN_ROWS: usize = 64;

/// Elements below which the per-block statistics of group/instance norm run serially.
const PAR_MIN: usize = 1 << 15;

/// Evaluates a fused op on f32 operands into a buffer of `out_shape`.
pub fn eval(
    op: &Op,
    args: &[Arc<Tensor>],
    out_shape: &[usize],
    fast: bool,
) -> Result<Vec<f32>, String> {
    if args.iter().any(|a| a.as_f32().is_none()) {
        return Err("operands must be f32".into());
    }
    let x = || f32s(&args[0]);
    let arg = |i: usize| Bcast::new(&args[i], out_shape);
    Ok(match op {
        Op::Softmax { scale } => (if fast { softmax_fast } else { softmax })(
            x(),
            args.get(1).map(|_| arg(1)),
            scale.0 as f32,
            out_shape,
        ),
        Op::Attention {
            scale,
            causal,
            window,
        } => (if fast { flash::attention } else { attention })(
            &args[0],
            &args[1],
            &args[2],
            args.get(3).map(|m| &**m),
            Mask {
                scale: scale.0 as f32,
                causal: *causal,
                window: *window,
            },
            out_shape,
        ),
        Op::LayerNorm { eps } if fast => {
            layer_norm_fast(x(), &arg(1), &arg(2), eps.0 as f32, out_shape)
        }
        Op::LayerNorm { eps } => layer_norm(x(), &arg(1), &arg(2), eps.0 as f32, out_shape),
        Op::RmsNorm { eps } => rms_norm(x(), &arg(1), eps.0 as f32, out_shape),
        Op::GroupNorm { groups, eps } => {
            let (c, rest) = channels_and_rest(out_shape);
            if *groups == 0 || c % groups != 0 {
                return Err(format!("{groups} groups do not divide {c} channels"));
            }
            let block = c / groups * rest;
            grouped_norm(x(), &arg(1), &arg(2), eps.0 as f32, block, out_shape)
        }
        Op::InstanceNorm { eps } => {
            let (_, rest) = channels_and_rest(out_shape);
            grouped_norm(x(), &arg(1), &arg(2), eps.0 as f32, rest, out_shape)
        }
        Op::BatchNorm => batch_norm(x(), &arg(1), &arg(2), out_shape),
        Op::Rope => rope(x(), &arg(1), &arg(2), out_shape),
        Op::GatedMatMul { act } => {
            // The gate with its activation, the up projection, their product: the
            // decomposition's steps (each matmul the mode's own GEMM), one buffer reused.
            let mut y = fused_matmul(&args[0], &args[1], *act, None, None, out_shape, fast);
            let up = fused_matmul(
                &args[0],
                &args[2],
                Act::Identity,
                None,
                None,
                out_shape,
                fast,
            );
            y.par_iter_mut().zip(&up).for_each(|(g, u)| *g *= u);
            arena::give(up);
            y
        }
        Op::FusedMatMul {
            act,
            bias,
            residual,
        } => {
            let mut rest = args[2..].iter();
            let bias = bias.then(|| rest.next()).flatten();
            let residual = residual.then(|| rest.next()).flatten();
            fused_matmul(
                &args[0],
                &args[1],
                *act,
                bias.map(|b| Bcast::new(b, out_shape)),
                residual.map(|r| Bcast::new(r, out_shape)),
                out_shape,
                fast,
            )
        }
        other => return Err(format!("`{}` is not a fused op", other.name())),
    })
}

fn f32s(t: &Tensor) -> &[f32] {
    t.as_f32().expect("checked f32 in eval")
}

/// An operand read broadcast to the output shape, a row (last axis) at a time.
struct Bcast<'a> {
    data: &'a [f32],
    /// Where the operand starts in `data` (a view's offset).
    offset: usize,
    strides: Vec<usize>,
    /// Stride along the last axis (0 when broadcast).
    step: usize,
}

impl<'a> Bcast<'a> {
    fn new(t: &'a Tensor, out: &[usize]) -> Bcast<'a> {
        let strides = broadcast_strides(&t.shape, out);
        let step = strides.last().copied().unwrap_or(0);
        Bcast {
            data: f32s(t),
            offset: 0,
            strides,
            step,
        }
    }

    /// A fast-mode value (a view's offset and strides) read broadcast to `out`.
    fn val(v: &'a Val, out: &[usize]) -> Bcast<'a> {
        let (base, offset, strides) = v.parts();
        let strides = view::broadcast_to(v.shape(), &strides, out);
        let step = strides.last().copied().unwrap_or(0);
        Bcast {
            data: f32s(base),
            offset,
            strides,
            step,
        }
    }

    /// Offset of the first element of output row `r`.
    fn row(&self, r: usize, out: &[usize]) -> usize {
        self.offset + row_offset(r, out, &self.strides)
    }

    #[inline]
    fn at(&self, base: usize, j: usize) -> f32 {
        self.data[base + j * self.step]
    }
}

/// `exp(x - max) / Σ exp(x - max)` in place, summing left to right.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let sum = row.iter().fold(0.0f32, |a, &v| a + v);
    for v in row.iter_mut() {
        *v /= sum;
    }
}

fn softmax(x: &[f32], mask: Option<Bcast>, scale: f32, out: &[usize]) -> Vec<f32> {
    let inner = out[out.len() - 1];
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, inner, |r, row| {
        let xr = &x[r * inner..(r + 1) * inner];
        if scale != 1.0 {
            for (o, &v) in row.iter_mut().zip(xr) {
                *o = v * scale;
            }
        } else {
            row.copy_from_slice(xr);
        }
        if let Some(m) = &mask {
            let base = m.row(r, out);
            for (j, o) in row.iter_mut().enumerate() {
                *o += m.at(base, j);
            }
        }
        softmax_row(row);
    });
    dst
}

/// [`softmax`] with the vectorised max and exp of `simd` and one reciprocal per row: the
/// scalar `expf` takes glibc's slow underflow path (errno) on every `finfo.min`-masked score,
/// which made the unfused attention's softmax 8× slower than its two matmuls at seq 1024.
fn softmax_fast(x: &[f32], mask: Option<Bcast>, scale: f32, out: &[usize]) -> Vec<f32> {
    let inner = out[out.len() - 1];
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, inner, |r, row| {
        row.copy_from_slice(&x[r * inner..(r + 1) * inner]);
        if scale != 1.0 {
            simd::scale(row, scale);
        }
        if let Some(m) = &mask {
            let base = m.row(r, out);
            for (j, o) in row.iter_mut().enumerate() {
                *o += m.at(base, j);
            }
        }
        let max = simd::max(row);
        let sum = simd::exp_shift_sum(row, max);
        simd::scale(row, 1.0 / sum);
    });
    dst
}

/// Attention's score transform: scale, then the causal / window mask.
#[derive(Clone, Copy)]
pub(crate) struct Mask {
    pub(crate) scale: f32,
    pub(crate) causal: bool,
    pub(crate) window: Option<usize>,
}

/// One attention call's operands split per batch·head: what the reference below and the
/// flash kernel (`flash.rs`) share — the shapes, the grouped-query head mapping and the mask's
/// broadcast strides.
pub(crate) struct Heads<'a> {
    pub(crate) sq: usize,
    pub(crate) sk: usize,
    pub(crate) d: usize,
    pub(crate) dv: usize,
    /// Query `i` sits at absolute position `i + offset` (`sk - sq`).
    pub(crate) offset: i64,
    batch: Vec<usize>,
    q: Strided<'a>,
    k: Strided<'a>,
    v: Strided<'a>,
    /// Query heads per key/value head (grouped-query attention; 1 otherwise).
    pub(crate) group: usize,
    mask: Option<(&'a [f32], Vec<usize>)>,
}

/// One of q/k/v read through strides: element `[b.., i, t]` at
/// `offset + Σ b·batch_strides + i·row`, the last axis unit-stride.
struct Strided<'a> {
    data: &'a [f32],
    offset: usize,
    batch: Vec<usize>,
    strides: Vec<usize>,
    row: usize,
}

impl<'a> Strided<'a> {
    fn new(data: &'a [f32], o: &Operand) -> Strided<'a> {
        let r = o.shape.len();
        assert!(
            o.shape[r - 1] <= 1 || o.strides[r - 1] == 1,
            "attention operands are read with a unit-stride last axis"
        );
        Strided {
            data,
            offset: o.offset,
            batch: o.shape[..r - 2].to_vec(),
            strides: o.strides[..r - 2].to_vec(),
            row: o.strides[r - 2],
        }
    }

    /// Batch item `bi` (row-major over the batch axes): from its first element on.
    fn at(&self, bi: usize) -> &'a [f32] {
        let (mut rem, mut off) = (bi, self.offset);
        for ax in (0..self.batch.len()).rev() {
            off += (rem % self.batch[ax]) * self.strides[ax];
            rem /= self.batch[ax];
        }
        &self.data[off..]
    }
}

/// One batch·head's operands: query row `i` at `q[i·qs..][..d]`, key `j` at `k[j·ks..][..d]`,
/// value `j` at `v[j·vs..][..dv]`.
pub(crate) struct Head<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) qs: usize,
    pub(crate) ks: usize,
    pub(crate) vs: usize,
    pub(crate) mask: Option<MaskView<'a>>,
}

/// The additive mask of one batch·head, read through its broadcast strides.
#[derive(Clone, Copy)]
pub(crate) struct MaskView<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) base: usize,
    pub(crate) row: usize,
    pub(crate) col: usize,
}

impl MaskView<'_> {
    /// The mask at query `i`, key `j`.
    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.base + i * self.row + j * self.col]
    }
}

impl<'a> Heads<'a> {
    /// `q [.., sq, d]`, `k [.., sk, d]`, `v [.., sk, dv]` (k/v with fewer heads than q:
    /// grouped-query attention) and an additive mask broadcasting to `[.., sq, sk]`.
    pub(crate) fn new(
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        mask: Option<&'a Tensor>,
    ) -> Heads<'a> {
        let st = [strides(&q.shape), strides(&k.shape), strides(&v.shape)];
        let op = |t: &'a Tensor, s: &[usize]| {
            Strided::new(
                f32s(t),
                &Operand {
                    data: f32s(t),
                    offset: 0,
                    shape: &t.shape,
                    strides: s,
                },
            )
        };
        let shapes = [&q.shape[..], &k.shape, &v.shape];
        Heads::build([op(q, &st[0]), op(k, &st[1]), op(v, &st[2])], shapes, mask)
    }

    /// [`Heads::new`] over views: each operand read through its strides (a permuted or sliced
    /// q/k/v, such as the heads of a merged QKV projection, without a copy); the last axis of
    /// each must be unit-stride.
    pub(crate) fn strided(
        q: Operand<'a>,
        k: Operand<'a>,
        v: Operand<'a>,
        mask: Option<&'a Tensor>,
    ) -> Heads<'a> {
        Heads::build(
            [
                Strided::new(q.data, &q),
                Strided::new(k.data, &k),
                Strided::new(v.data, &v),
            ],
            [q.shape, k.shape, v.shape],
            mask,
        )
    }

    fn build(
        [qs, ks, vs]: [Strided<'a>; 3],
        [q, k, v]: [&[usize]; 3],
        mask: Option<&'a Tensor>,
    ) -> Heads<'a> {
        let r = q.len();
        let (sq, d) = (q[r - 2], q[r - 1]);
        let sk = k[r - 2];
        let batch = q[..r - 2].to_vec();
        let mut scores_shape = batch.to_vec();
        scores_shape.extend([sq, sk]);
        let qb: usize = batch.iter().product();
        let kb: usize = k[..r - 2].iter().product();
        Heads {
            sq,
            sk,
            d,
            dv: v[r - 1],
            offset: sk as i64 - sq as i64,
            batch,
            q: qs,
            k: ks,
            v: vs,
            group: (qb / kb.max(1)).max(1),
            mask: mask.map(|m| (f32s(m), broadcast_strides(&m.shape, &scores_shape))),
        }
    }

    /// The operands of batch·head `bi`.
    pub(crate) fn head(&self, bi: usize) -> Head<'a> {
        // Grouped-query attention: batch-head `bi` reads key/value head `bi / group`.
        let kvi = bi / self.group;
        let r = self.batch.len() + 2;
        Head {
            q: self.q.at(bi),
            k: self.k.at(kvi),
            v: self.v.at(kvi),
            qs: self.q.row,
            ks: self.k.row,
            vs: self.v.row,
            mask: self.mask.as_ref().map(|(m, st)| {
                let (mut rem, mut off) = (bi, 0);
                for ax in (0..self.batch.len()).rev() {
                    off += (rem % self.batch[ax]) * st[ax];
                    rem /= self.batch[ax];
                }
                MaskView {
                    data: m,
                    base: off,
                    row: st[r - 2],
                    col: st[r - 1],
                }
            }),
        }
    }
}

pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    how: Mask,
    out: &[usize],
) -> Vec<f32> {
    let heads = Heads::new(q, k, v, mask);
    let (sq, sk, d, dv, offset) = (heads.sq, heads.sk, heads.d, heads.dv, heads.offset);
    let mut dst = vec![0f32; out.iter().product()];
    if dst.is_empty() || sk == 0 {
        return dst;
    }
    let positional = how.causal || how.window.is_some();
    dst.par_chunks_mut(sq * dv)
        .enumerate()
        .for_each(|(bi, ob)| {
            let Head {
                q: qb,
                k: kb,
                v: vb,
                mask: hm,
                ..
            } = heads.head(bi);
            // Heads over dense tensors: each head's rows are contiguous (`qs == d`, ...).
            let (qb, kb, vb) = (&qb[..sq * d], &kb[..sk * d], &vb[..sk * dv]);
            ob.par_chunks_mut(ATTN_ROWS * dv)
                .enumerate()
                .for_each(|(ci, oc)| {
                    let i0 = ci * ATTN_ROWS;
                    let rows = oc.len() / dv;
                    let mut tile = vec![0f32; rows * sk];
                    // S = Q Kᵀ with K read transposed in place.
                    gemm_strided(&qb[i0 * d..], (d, 1), kb, (1, d), &mut tile, rows, d, sk);
                    for (ii, row) in tile.chunks_mut(sk).enumerate() {
                        let i = i0 + ii;
                        let pos = i as i64 + offset;
                        for (j, s) in row.iter_mut().enumerate() {
                            let mut x = if how.scale != 1.0 { *s * how.scale } else { *s };
                            let m = hm.map(|m| m.at(i, j));
                            if positional {
                                let j = j as i64;
                                let seen = (!how.causal || j <= pos)
                                    && how.window.is_none_or(|w| j > pos - w as i64);
                                x += if seen { m.unwrap_or(0.0) } else { f32::MIN };
                            } else if let Some(m) = m {
                                x += m;
                            }
                            *s = x;
                        }
                        softmax_row(row);
                    }
                    gemm(&tile, vb, oc, rows, sk, dv);
                });
        });
    dst
}

fn layer_norm(x: &[f32], g: &Bcast, b: &Bcast, eps: f32, out: &[usize]) -> Vec<f32> {
    let n = out[out.len() - 1];
    let inv_n = 1.0 / n as f32;
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, n, |r, row| {
        let xr = &x[r * n..(r + 1) * n];
        let mu = xr.iter().fold(0.0f32, |a, &v| a + v) * inv_n;
        for (o, &v) in row.iter_mut().zip(xr) {
            *o = v - mu;
        }
        let var = row.iter().fold(0.0f32, |a, &c| a + c * c) * inv_n;
        let inv = 1.0 / (var + eps).sqrt();
        let (gb, bb) = (g.row(r, out), b.row(r, out));
        for (j, o) in row.iter_mut().enumerate() {
            *o = *o * inv * g.at(gb, j) + b.at(bb, j);
        }
    });
    dst
}

/// [`layer_norm`] with the row statistics summed in vector lanes (`simd::layer_norm`) where
/// gamma and beta are contiguous rows; the plain loop otherwise.
fn layer_norm_fast(x: &[f32], g: &Bcast, b: &Bcast, eps: f32, out: &[usize]) -> Vec<f32> {
    if g.step != 1 || b.step != 1 {
        return layer_norm(x, g, b, eps, out);
    }
    let n = out[out.len() - 1];
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, n, |r, row| {
        let (gb, bb) = (g.row(r, out), b.row(r, out));
        simd::layer_norm(
            &x[r * n..(r + 1) * n],
            &g.data[gb..gb + n],
            &b.data[bb..bb + n],
            eps,
            row,
        );
    });
    dst
}

fn rms_norm(x: &[f32], g: &Bcast, eps: f32, out: &[usize]) -> Vec<f32> {
    let n = out[out.len() - 1];
    let inv_n = 1.0 / n as f32;
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, n, |r, row| {
        let xr = &x[r * n..(r + 1) * n];
        let ms = xr.iter().fold(0.0f32, |a, &v| a + v * v) * inv_n;
        let inv = 1.0 / (ms + eps).sqrt();
        let gb = g.row(r, out);
        for (j, (o, &v)) in row.iter_mut().zip(xr).enumerate() {
            *o = v * inv * g.at(gb, j);
        }
    });
    dst
}

/// `x·cos + rotate_half(x)·sin` per row of the last axis (`d` even, checked by inference),
/// `rotate_half(x)[j]` being `−x[j + d/2]` for `j < d/2` and `x[j − d/2]` after: the
/// decomposition's multiplies and add, in its order (one pass, nothing materialised). Both CPU
/// modes use it.
fn rope(x: &[f32], cos: &Bcast, sin: &Bcast, out: &[usize]) -> Vec<f32> {
    let d = out[out.len() - 1];
    let h = d / 2;
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, d, |r, row| {
        let xr = &x[r * d..(r + 1) * d];
        let (cb, sb) = (cos.row(r, out), sin.row(r, out));
        for (j, o) in row.iter_mut().enumerate() {
            let rot = if j < h { -xr[j + h] } else { xr[j - h] };
            *o = xr[j] * cos.at(cb, j) + rot * sin.at(sb, j);
        }
    });
    dst
}

/// `(C, Π spatial)` of `[N, C, spatial..]` (spatial product 1 for rank 2).
fn channels_and_rest(out: &[usize]) -> (usize, usize) {
    (out[1], out[2..].iter().product())
}

/// Normalises each contiguous `block` of `x` (a channel group or a channel of `[N, C, ..]`)
/// to zero mean and unit variance, then applies the broadcast affine.
fn grouped_norm(
    x: &[f32],
    g: &Bcast,
    b: &Bcast,
    eps: f32,
    block: usize,
    out: &[usize],
) -> Vec<f32> {
    let mut dst = arena::buffer(x.len());
    if dst.is_empty() || block == 0 {
        return dst;
    }
    let inv_n = 1.0 / block as f32;
    let stats = |blk: &[f32]| {
        let mu = blk.iter().fold(0.0f32, |a, &v| a + v) * inv_n;
        let var = blk.iter().fold(0.0f32, |a, &v| {
            let c = v - mu;
            a + c * c
        }) * inv_n;
        (mu, 1.0 / (var + eps).sqrt())
    };
    let stats: Vec<(f32, f32)> = if x.len() >= PAR_MIN {
        x.par_chunks(block).map(stats).collect()
    } else {
        x.chunks(block).map(stats).collect()
    };
    let inner = out[out.len() - 1];
    for_rows(&mut dst, inner, |r, row| {
        let (gb, bb) = (g.row(r, out), b.row(r, out));
        let start = r * inner;
        for (j, o) in row.iter_mut().enumerate() {
            let (mu, inv) = stats[(start + j) / block];
            *o = (x[start + j] - mu) * inv * g.at(gb, j) + b.at(bb, j);
        }
    });
    dst
}

fn batch_norm(x: &[f32], scale: &Bcast, shift: &Bcast, out: &[usize]) -> Vec<f32> {
    let inner = out[out.len() - 1];
    let mut dst = arena::buffer(x.len());
    for_rows(&mut dst, inner, |r, row| {
        let (sb, tb) = (scale.row(r, out), shift.row(r, out));
        let xr = &x[r * inner..(r + 1) * inner];
        for (j, (o, &v)) in row.iter_mut().zip(xr).enumerate() {
            *o = v * scale.at(sb, j) + shift.at(tb, j);
        }
    });
    dst
}

/// The f32 constants of the activations, rounded exactly as the decomposition's constants.
struct ActConsts {
    inv_sqrt2: f32,
    cubic: f32,
    sqrt_2_pi: f32,
}

impl ActConsts {
    fn new() -> ActConsts {
        ActConsts {
            inv_sqrt2: std::f64::consts::FRAC_1_SQRT_2 as f32,
            cubic: 0.044715f64 as f32,
            sqrt_2_pi: (2.0 / std::f64::consts::PI).sqrt() as f32,
        }
    }

    /// `act(y)`, spelled operation for operation like the builder's helpers.
    #[inline]
    fn apply(&self, act: Act, y: f32) -> f32 {
        match act {
            Act::Identity => y,
            Act::GeluErf => {
                let e = libm::erff(y * self.inv_sqrt2);
                (y * 0.5) * (e + 1.0)
            }
            Act::GeluTanh => {
                let x3 = (y * y) * y;
                let inner = y + x3 * self.cubic;
                let t = (inner * self.sqrt_2_pi).tanh();
                (y * 0.5) * (t + 1.0)
            }
            Act::Relu => y.max(0.0),
            Act::Silu => y * (1.0 / (1.0 + (-y).exp())),
        }
    }
}

fn fused_matmul(
    a: &Tensor,
    w: &Tensor,
    act: Act,
    bias: Option<Bcast>,
    residual: Option<Bcast>,
    out: &[usize],
    fast: bool,
) -> Vec<f32> {
    let (ra, rb) = (a.shape.len(), w.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], w.shape[rb - 1]);
    let out_batch = &out[..out.len() - 2];
    let pad = |s: &[usize]| {
        let mut v = vec![1; out_batch.len() - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (pa, pw) = (pad(&a.shape[..ra - 2]), pad(&w.shape[..rb - 2]));
    let consts = ActConsts::new();
    let plain = bias.is_none() && residual.is_none() && act == Act::Identity;
    let epilogue = |r: usize, row: &mut [f32]| {
        let bb = bias.as_ref().map(|b| (b, b.row(r, out)));
        let rr = residual.as_ref().map(|x| (x, x.row(r, out)));
        for (j, o) in row.iter_mut().enumerate() {
            let mut y = *o;
            if let Some((b, base)) = bb {
                y += b.at(base, j);
            }
            y = consts.apply(act, y);
            if let Some((x, base)) = rr {
                y += x.at(base, j);
            }
            *o = y;
        }
    };
    if fast {
        let sa = super::kernels::strides(&a.shape);
        let sw = super::kernels::strides(&w.shape);
        return fused_matmul_fast(
            fast_gemm::Operand {
                data: f32s(a),
                offset: 0,
                shape: &a.shape,
                strides: &sa,
            },
            fast_gemm::Operand {
                data: f32s(w),
                offset: 0,
                shape: &w.shape,
                strides: &sw,
            },
            act,
            bias,
            residual,
            out,
        );
    }
    let mut c = matmul(f32s(a), &pa, f32s(w), &pw, out_batch, m, k, n);
    if !plain {
        for_rows(&mut c, n, epilogue);
    }
    c
}

/// The fast mode's fused matmul on views: `a` and `w` read through their strides by the GEMM,
/// bias and residual through theirs by the epilogue; nothing is copied first.
pub(crate) fn fused_matmul_views(
    a: &Val,
    w: &Val,
    act: Act,
    bias: Option<&Val>,
    residual: Option<&Val>,
    out: &[usize],
) -> Vec<f32> {
    let ((ab, ao, sa), (wb, wo, sw)) = (a.parts(), w.parts());
    fused_matmul_fast(
        fast_gemm::Operand {
            data: f32s(ab),
            offset: ao,
            shape: a.shape(),
            strides: &sa,
        },
        fast_gemm::Operand {
            data: f32s(wb),
            offset: wo,
            shape: w.shape(),
            strides: &sw,
        },
        act,
        bias.map(|b| Bcast::val(b, out)),
        residual.map(|r| Bcast::val(r, out)),
        out,
    )
}

/// The fused matmul's steps, the epilogue a row at a time and vectorised.
fn fused_matmul_fast(
    a: fast_gemm::Operand,
    w: fast_gemm::Operand,
    act: Act,
    bias: Option<Bcast>,
    residual: Option<Bcast>,
    out: &[usize],
) -> Vec<f32> {
    let out_batch = &out[..out.len() - 2];
    let plain = bias.is_none() && residual.is_none() && act == Act::Identity;
    let add = |x: &Bcast, r: usize, j0: usize, row: &mut [f32]| {
        let base = x.row(r, out) + j0 * x.step;
        if x.step == 1 {
            simd::add(row, &x.data[base..base + row.len()]);
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                *o += x.at(base, j);
            }
        }
    };
    let vectorised = |r: usize, j0: usize, row: &mut [f32]| {
        if let Some(b) = &bias {
            add(b, r, j0, row);
        }
        simd::act(act, row);
        if let Some(x) = &residual {
            add(x, r, j0, row);
        }
    };
    let epi: Option<fast_gemm::Epilogue> = if plain { None } else { Some(&vectorised) };
    fast_gemm::matmul_strided(a, w, out_batch, epi)
}
