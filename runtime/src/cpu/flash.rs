//! Flash attention on the CPU (the fast mode's `Op::Attention`).
//!
//! Work items are (batch·head, block of [`BQ`] queries), spread over rayon's pool. Each walks
//! the keys in blocks of [`BK`]: `S = Q Kᵀ` for the block (faer, single-threaded, K read
//! transposed in place), scale and mask, then the online softmax (running row max `m` and sum
//! `l`, the output rescaled by `e^(m_old - m_new)`) with a SIMD `exp`, and `O += P V` (faer).
//! Key blocks that the causal or window mask hides from every query of the block are never
//! touched, and no score tile larger than `BQ × BK` exists.
//!
//! Semantics are the reference's (`fused::attention`): a hidden key contributes nothing unless
//! every key of a row is hidden or masked to about `f32::MIN`, in which case the reference
//! averages `v` uniformly; such rows (max score below [`DEAD`]) are recomputed exactly as
//! the reference does.

use rayon::prelude::*;
use transfuse_ir::Tensor;

use faer::Par;

use super::fused::{Head, Heads, Mask, MaskView};
use super::gemm::gemm_strided;
use super::simd;

/// Queries per work item.
pub const BQ: usize = 64;
/// Keys per inner block.
pub const BK: usize = 64;
/// A row whose best score is below this is fully masked: it takes the reference's path.
const DEAD: f32 = f32::MIN / 2.0;

/// `softmax(q kᵀ·scale + mask) v` over `q [.., sq, d]`, `k [.., sk, d]`, `v [.., sk, dv]`
/// (k/v with fewer heads than q: grouped-query attention).
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
    dst.par_chunks_mut(sq * dv)
        .enumerate()
        .for_each(|(bi, ob)| {
            let Head {
                q: qb,
                k: kb,
                v: vb,
                mask: m,
            } = heads.head(bi);
            let blk = Block {
                q: qb,
                k: kb,
                v: vb,
                mask: m,
                how,
                sk,
                d,
                dv,
                offset,
            };
            ob.par_chunks_mut(BQ * dv)
                .enumerate()
                .for_each(|(ci, oc)| blk.run(ci * BQ, oc));
        });
    dst
}

/// One batch·head's operands.
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: Option<MaskView<'a>>,
    how: Mask,
    sk: usize,
    d: usize,
    dv: usize,
    offset: i64,
}

impl Block<'_> {
    /// Keys `[lo, hi)` that query `i` can see by position (all when neither causal nor windowed).
    fn visible(&self, i: usize) -> (usize, usize) {
        let pos = i as i64 + self.offset;
        let hi = if self.how.causal {
            (pos + 1).clamp(0, self.sk as i64) as usize
        } else {
            self.sk
        };
        let lo = match self.how.window {
            Some(w) => (pos - w as i64 + 1).clamp(0, self.sk as i64) as usize,
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Output rows `i0 ..` of this batch·head into `oc` (`rows × dv`).
    fn run(&self, i0: usize, oc: &mut [f32]) {
        let (d, dv) = (self.d, self.dv);
        let rows = oc.len() / dv;
        // Keys any query of the block sees: the first row's lower bound, the last row's upper.
        let (lo, _) = self.visible(i0);
        let (_, hi) = self.visible(i0 + rows - 1);
        let mut s = vec![0f32; rows * BK];
        let mut mx = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        oc.fill(0.0);
        let mut j0 = lo;
        while j0 < hi {
            let bk = BK.min(hi - j0);
            let s = &mut s[..rows * bk];
            gemm_strided(
                &self.q[i0 * d..],
                (d, 1),
                &self.k[j0 * d..],
                (1, d),
                s,
                rows,
                d,
                bk,
                false,
                Par::Seq,
            );
            for (ii, row) in s.chunks_mut(bk).enumerate() {
                let i = i0 + ii;
                if self.how.scale != 1.0 {
                    simd::scale(row, self.how.scale);
                }
                if let Some(m) = self.mask {
                    let base = m.base + i * m.row + j0 * m.col;
                    if m.col == 1 {
                        for (x, &y) in row.iter_mut().zip(&m.data[base..base + bk]) {
                            *x += y;
                        }
                    } else {
                        for (j, x) in row.iter_mut().enumerate() {
                            *x += m.data[base + j * m.col];
                        }
                    }
                }
                let (vlo, vhi) = self.visible(i);
                let (a, b) = (vlo.clamp(j0, j0 + bk) - j0, vhi.clamp(j0, j0 + bk) - j0);
                row[..a].fill(f32::NEG_INFINITY);
                row[b.max(a)..].fill(f32::NEG_INFINITY);
                let m_new = simd::max(row).max(mx[ii]);
                if m_new == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let sum = simd::exp_shift_sum(row, m_new);
                if mx[ii] != m_new {
                    let corr = if mx[ii] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (mx[ii] - m_new).exp()
                    };
                    l[ii] *= corr;
                    simd::scale(&mut oc[ii * dv..(ii + 1) * dv], corr);
                    mx[ii] = m_new;
                }
                l[ii] += sum;
            }
            // O += P V.
            gemm_strided(
                s,
                (bk, 1),
                &self.v[j0 * dv..],
                (dv, 1),
                oc,
                rows,
                bk,
                dv,
                true,
                Par::Seq,
            );
            j0 += bk;
        }
        for (ii, o) in oc.chunks_mut(dv).enumerate() {
            if mx[ii] < DEAD {
                self.reference_row(i0 + ii, o);
            } else {
                let inv = l[ii];
                for x in o.iter_mut() {
                    *x /= inv;
                }
            }
        }
    }

    /// Query `i` exactly as the reference computes it: every key scored, hidden ones set to
    /// `f32::MIN`, softmax over the whole row (uniform when all are about `f32::MIN`).
    fn reference_row(&self, i: usize, o: &mut [f32]) {
        let (d, dv, sk) = (self.d, self.dv, self.sk);
        let qi = &self.q[i * d..(i + 1) * d];
        let (vlo, vhi) = self.visible(i);
        let positional = self.how.causal || self.how.window.is_some();
        let mut p: Vec<f32> = (0..sk)
            .map(|j| {
                let kj = &self.k[j * d..(j + 1) * d];
                let s = qi.iter().zip(kj).fold(0f32, |a, (x, y)| a + x * y);
                let mut x = if self.how.scale != 1.0 {
                    s * self.how.scale
                } else {
                    s
                };
                let m = self.mask.map(|m| m.at(i, j)).unwrap_or(0.0);
                if positional && !(vlo..vhi).contains(&j) {
                    x += f32::MIN;
                } else {
                    x += m;
                }
                x
            })
            .collect();
        let max = p.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        for x in p.iter_mut() {
            *x = (*x - max).exp();
        }
        let sum = p.iter().fold(0f32, |a, &v| a + v);
        o.fill(0.0);
        for (j, &w) in p.iter().enumerate() {
            let w = w / sum;
            for (x, &y) in o.iter_mut().zip(&self.v[j * dv..(j + 1) * dv]) {
                *x += w * y;
            }
        }
    }
}
