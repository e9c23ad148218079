//! Flash attention on the CPU (the fast mode's `Op::Attention`).
//!
//! Work items are (batch·head, block of [`BQ`] queries), spread over rayon's pool. Each walks
//! the keys in blocks of [`BK`]: `S = Q Kᵀ` for the block (faer, single-threaded, K read
//! transposed in place), scale and mask, then the online softmax (running row max `m` and sum
//! `l`, the output rescaled by `e^(m_old - m_new)`) with a SIMD `exp`, and `O += P V` (faer).
//! Key blocks that the causal or window mask hides from every query of the block are never
//! touched, and no score tile larger than `BQ × BK` exists.
//!
//! On a CPU with AVX-512F (detected at run time, [`simd::has_avx512`]) the same walk runs in
//! `wide`: K packed once per call and key/value head into `[d][64]` blocks, the score tile and
//! `O = O·corr + P V` by 4-row register-blocked microkernels (no GEMM call per tile), a score
//! row's scale, mask, max, `exp` and sum in registers, the corrections 16 rows at a time, and on
//! the causal diagonal the key columns a 4-row group cannot see neither scored nor multiplied.
//! Elsewhere the portable loop above (faer per tile, AVX2 or baseline row loops) runs.
//!
//! Semantics are the reference's (`fused::attention`): a hidden key contributes nothing unless
//! every key of a row is hidden or masked to about `f32::MIN`, in which case the reference
//! averages `v` uniformly; such rows (max score below [`DEAD`]) are recomputed exactly as
//! the reference does.

use rayon::prelude::*;
use transfuse_ir::Tensor;

use faer::Par;

use super::arena;
use super::fused::{Head, Heads, Mask, MaskView};
use super::gemm::{gemm_strided, Operand};
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
    let wide = heads.sq >= WIDE_MIN_ROWS;
    run_heads(&heads, how, out, wide)
}

/// [`attention`] over views: q, k and v read through their strides (the heads of a merged
/// QKV projection, permuted and sliced, without a copy); each operand's last axis must be
/// unit-stride. The output rows are laid out as the caller asks: with
/// `heads_last = Some(h)` for an output `[.., b, h, sq, dv]`, the buffer is `[.., b, sq, h,
/// dv]` (head `h` of a row next to the others, as the usual `permute(0, 2, 1, 3)` and reshape
/// to `[b, sq, h·dv]` after attention want it: that permute and reshape then copy nothing).
pub(crate) fn attention_views(
    q: Operand,
    k: Operand,
    v: Operand,
    mask: Option<&Tensor>,
    how: Mask,
    out: &[usize],
    heads_last: Option<usize>,
) -> Vec<f32> {
    let heads = Heads::strided(q, k, v, mask);
    let wide = heads.sq >= WIDE_MIN_ROWS;
    run_heads_into(&heads, how, out, wide, heads_last)
}

/// Query rows from which the AVX-512 kernel runs: it packs all of K first (one pass over it),
/// which a decode step (one query row) would pay as much for as for the attention itself.
const WIDE_MIN_ROWS: usize = 16;

/// [`attention`] with the kernel chosen by the caller: the AVX-512 microkernels when `wide`
/// (and the CPU has them), the portable faer-tiled loop otherwise (tests run both).
#[cfg(test)]
pub(crate) fn attention_at(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    how: Mask,
    out: &[usize],
    wide: bool,
) -> Vec<f32> {
    run_heads(&Heads::new(q, k, v, mask), how, out, wide)
}

/// The attention of every batch·head of `heads` into a new `out`-shaped buffer: the AVX-512
/// kernel when `wide` and the CPU has AVX-512F, else the portable loop.
fn run_heads(heads: &Heads, how: Mask, out: &[usize], wide: bool) -> Vec<f32> {
    run_heads_into(heads, how, out, wide, None)
}

/// [`run_heads`] into the row layout `heads_last` names (see [`attention_views`]).
fn run_heads_into(
    heads: &Heads,
    how: Mask,
    out: &[usize],
    wide: bool,
    heads_last: Option<usize>,
) -> Vec<f32> {
    let (sk, dv) = (heads.sk, heads.dv);
    // From the arena (not zeroed): both kernels write every output element.
    let mut dst = arena::buffer(out.iter().product());
    if dst.is_empty() || sk == 0 {
        dst.fill(0.0);
        return dst;
    }
    let rows = Rows {
        sq: heads.sq,
        dv,
        heads_last,
    };
    #[cfg(target_arch = "x86_64")]
    if wide && simd::has_avx512() {
        wide::attention(heads, how, &mut dst, rows);
        return dst;
    }
    let _ = wide;
    rows.for_blocks(&mut dst, |bi, ci, oc| {
        oc.with_contiguous(|oc| Block::new(heads, bi, how).run(ci * BQ, oc))
    });
    dst
}

/// Where the output rows of each batch·head go: `sq` rows of `dv` per head, heads one after
/// another (`heads_last = None`), or with `heads_last = Some(h)` the rows of the `h` heads of
/// a batch interleaved (`[b, sq, h, dv]` for an output `[b, h, sq, dv]`).
#[derive(Clone, Copy)]
struct Rows {
    sq: usize,
    dv: usize,
    heads_last: Option<usize>,
}

/// The output buffer shared by the work items of a heads-last layout, each writing its own
/// rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the work items holding it write disjoint rows of the buffer it points into.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that a closure captures the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The output rows of one work item: `rows` rows of `dv` floats, `stride` apart from `ptr`,
/// which no other work item writes (made only by [`Rows::for_blocks`]).
pub(super) struct Dst {
    ptr: *mut f32,
    stride: usize,
    rows: usize,
    dv: usize,
}

impl Dst {
    /// Output rows.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Row `ii` (`< rows`).
    pub(super) fn row(&mut self, ii: usize) -> &mut [f32] {
        assert!(ii < self.rows);
        // SAFETY: `for_blocks` made `ptr` with `rows` rows of `dv` at `stride` inside the
        // output, written by this work item only; `&mut self` keeps one row borrowed at a time.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(ii * self.stride), self.dv) }
    }

    /// Runs `f` on the rows as one contiguous `rows × dv` slice: in place when they are
    /// contiguous, else in a scratch copied to them after.
    fn with_contiguous(mut self, f: impl FnOnce(&mut [f32])) {
        let n = self.rows * self.dv;
        if self.stride == self.dv {
            // SAFETY: contiguous rows: `rows × dv` floats from `ptr`, this work item's only.
            f(unsafe { std::slice::from_raw_parts_mut(self.ptr, n) });
            return;
        }
        let mut tmp = vec![0f32; n];
        f(&mut tmp);
        for (ii, r) in tmp.chunks_exact(self.dv).enumerate() {
            self.row(ii).copy_from_slice(r);
        }
    }
}

impl Rows {
    /// Runs `f(batch_head, query_block, rows)` for every block of [`BQ`] query rows of every
    /// batch·head in parallel, `rows` (`min(BQ, left)` rows) at this layout's place in `dst`.
    fn for_blocks(self, dst: &mut [f32], f: impl Fn(usize, usize, Dst) + Sync) {
        let (sq, dv) = (self.sq, self.dv);
        let Some(h) = self.heads_last.filter(|&h| h > 1) else {
            dst.par_chunks_mut(sq * dv)
                .enumerate()
                .for_each(|(bi, ob)| {
                    ob.par_chunks_mut(BQ * dv).enumerate().for_each(|(ci, oc)| {
                        let rows = oc.len() / dv;
                        let ptr = oc.as_mut_ptr();
                        f(
                            bi,
                            ci,
                            Dst {
                                ptr,
                                stride: dv,
                                rows,
                                dv,
                            },
                        )
                    })
                });
            return;
        };
        let (nb, bh) = (sq.div_ceil(BQ), dst.len() / (sq * dv));
        assert!(bh.is_multiple_of(h) && dst.len() == bh * sq * dv);
        let out = OutPtr(dst.as_mut_ptr());
        (0..bh * nb).into_par_iter().for_each(|w| {
            let (bi, ci) = (w / nb, w % nb);
            let (i0, rows) = (ci * BQ, BQ.min(sq - ci * BQ));
            let at = (bi / h) * sq * h * dv + i0 * h * dv + (bi % h) * dv;
            // SAFETY: row `i0 + ii` of head `bi` sits at `at + ii·h·dv`, below `bh·sq·dv`
            // (the assert, `bi / h < bh / h`, `i0 + ii < sq`, `bi % h < h`); no other work
            // item has that (head, row).
            let ptr = unsafe { out.get().add(at) };
            f(
                bi,
                ci,
                Dst {
                    ptr,
                    stride: h * dv,
                    rows,
                    dv,
                },
            )
        });
    }
}

/// One batch·head's operands.
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// Row strides of q, k, v (`d`, `d`, `dv` when dense).
    qs: usize,
    ks: usize,
    vs: usize,
    mask: Option<MaskView<'a>>,
    how: Mask,
    sk: usize,
    d: usize,
    dv: usize,
    offset: i64,
}

impl<'a> Block<'a> {
    fn new(heads: &Heads<'a>, bi: usize, how: Mask) -> Block<'a> {
        let Head {
            q,
            k,
            v,
            qs,
            ks,
            vs,
            mask,
        } = heads.head(bi);
        Block {
            q,
            k,
            v,
            qs,
            ks,
            vs,
            mask,
            how,
            sk: heads.sk,
            d: heads.d,
            dv: heads.dv,
            offset: heads.offset,
        }
    }

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
                &self.q[i0 * self.qs..],
                (self.qs, 1),
                &self.k[j0 * self.ks..],
                (1, self.ks),
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
                &self.v[j0 * self.vs..],
                (self.vs, 1),
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
        let qi = &self.q[i * self.qs..i * self.qs + d];
        let (vlo, vhi) = self.visible(i);
        let positional = self.how.causal || self.how.window.is_some();
        let mut p: Vec<f32> = (0..sk)
            .map(|j| {
                let kj = &self.k[j * self.ks..j * self.ks + d];
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
            for (x, &y) in o.iter_mut().zip(&self.v[j * self.vs..j * self.vs + dv]) {
                *x += w * y;
            }
        }
    }
}

/// The AVX-512 form of [`Block::run`]: the score tile `S = Q Kᵀ` and `O = O·corr + P V` by
/// register-blocked microkernels (4 query rows × 64 keys, 4 rows × 64 value columns: 16
/// accumulators each) instead of a GEMM call per 64 × 64 tile, and the scale, mask, row max,
/// `exp` and row sum of a score row in registers in one pass. K is packed once per call and
/// key/value head as `[d][64]` blocks (one key-lane vector per `d` step; GQA heads share the
/// packed copy), V is read in place (copied only to pad an odd value width to 16 lanes).
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Block, Dst, Heads, Mask, Rows, BQ, DEAD};
    use crate::cpu::simd::avx512::exp;

    /// Keys per packed block: a score row is four 16-lane registers.
    const KB: usize = 64;
    /// Query rows per microkernel call.
    const R: usize = 4;
    // The running max/sum/rescale arrays are processed 16 rows at a time.
    const _: () = assert!(BQ.is_multiple_of(16));

    pub(super) fn attention(heads: &Heads, how: Mask, dst: &mut [f32], rows: Rows) {
        let (sq, sk, d, dv) = (heads.sq, heads.sk, heads.d, heads.dv);
        let bh = dst.len() / (sq * dv);
        let nkb = sk.div_ceil(KB);
        let dvp = dv.next_multiple_of(16);
        let packed: Vec<(Vec<f32>, Option<Vec<f32>>)> = (0..bh / heads.group)
            .into_par_iter()
            .map(|h| {
                let hd = heads.head(h * heads.group);
                let mut kp = vec![0f32; nkb * d * KB];
                for j in 0..sk {
                    let kj = &hd.k[j * hd.ks..j * hd.ks + d];
                    let blk = &mut kp[j / KB * d * KB + j % KB..];
                    for (t, &x) in kj.iter().enumerate() {
                        blk[t * KB] = x;
                    }
                }
                let vp = (dvp != dv).then(|| {
                    let mut vp = vec![0f32; sk * dvp];
                    for (j, dst) in vp.chunks_exact_mut(dvp).enumerate() {
                        dst[..dv].copy_from_slice(&hd.v[j * hd.vs..j * hd.vs + dv]);
                    }
                    vp
                });
                (kp, vp)
            })
            .collect();
        rows.for_blocks(dst, |bi, ci, oc| {
            let blk = Block::new(heads, bi, how);
            let (kp, vp) = &packed[bi / heads.group];
            // V padded to dvp columns (row stride dvp), else read in place.
            let (vp, vst) = match vp {
                Some(p) => (&p[..], dvp),
                None => (blk.v, blk.vs),
            };
            // SAFETY: the caller checked AVX-512F.
            unsafe { run(&blk, kp, vp, vst, dvp, ci * BQ, oc) }
        });
    }

    /// Output rows `i0 ..` of one batch·head into `oc` (`rows <= BQ` rows of dv); value
    /// row `j` is `vp[j·vst..][..dvp]`.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(
        blk: &Block,
        kp: &[f32],
        vp: &[f32],
        vst: usize,
        dvp: usize,
        i0: usize,
        mut oc: Dst,
    ) {
        let (d, sk) = (blk.d, blk.sk);
        let rows = oc.rows();
        let (lo, _) = blk.visible(i0);
        let (_, hi) = blk.visible(i0 + rows - 1);
        let mut s = vec![0f32; BQ * KB];
        let mut o = vec![0f32; rows * dvp];
        let mut mx = [f32::NEG_INFINITY; BQ];
        let mut l = [0f32; BQ];
        let mut corr = [1f32; BQ];
        let mut mnew = [f32::NEG_INFINITY; BQ];
        let mut sums = [0f32; BQ];
        let mut gathered = [0f32; KB];
        let blocks = if lo < hi {
            lo / KB..hi.div_ceil(KB)
        } else {
            0..0
        };
        for b in blocks {
            let j0 = b * KB;
            let bk = KB.min(sk - j0);
            // Keys of this block that each group of R rows sees at most (the last row's upper
            // bound: it grows with the row): on the causal diagonal the columns past it are
            // neither scored nor multiplied.
            let mut lim = [0usize; BQ / R];
            for (g, lg) in lim.iter_mut().enumerate().take(rows.div_ceil(R)) {
                let last = i0 + (g * R + R).min(rows) - 1;
                *lg = blk.visible(last).1.clamp(j0, j0 + bk) - j0;
            }
            // SAFETY: q holds rows `i0 .. i0 + rows` of d floats (stride qs), kp block b holds
            // d × KB.
            unsafe {
                scores(
                    &blk.q[i0 * blk.qs..],
                    blk.qs,
                    d,
                    rows,
                    &kp[b * d * KB..],
                    &mut s,
                    &lim,
                )
            };
            for ii in 0..rows {
                let i = i0 + ii;
                let (vlo, vhi) = blk.visible(i);
                let a = vlo.clamp(j0, j0 + bk) - j0;
                let e = (vhi.clamp(j0, j0 + bk) - j0).max(a);
                let mrow = blk.mask.map(|m| {
                    let base = m.base + i * m.row + j0 * m.col;
                    if m.col == 1 {
                        m.data[base..base + bk].as_ptr()
                    } else {
                        for (j, g) in gathered[..bk].iter_mut().enumerate() {
                            *g = m.data[base + j * m.col];
                        }
                        gathered.as_ptr()
                    }
                });
                let row = &mut s[ii * KB..(ii + 1) * KB];
                // SAFETY: the row has KB floats; the mask row bk, loaded under lanes `< e <= bk`.
                let (m_new, sum) = unsafe { softmax_row(row, a, e, blk.how.scale, mrow, mx[ii]) };
                mnew[ii] = m_new;
                sums[ii] = sum;
            }
            // The running sums and output rescaled by e^(m_old - m_new), 16 rows at a time:
            // 1 where the max is unchanged, 0 where it was -inf (nothing seen yet), and 0
            // (-inf - -inf is NaN, which the exp maps to 0) where nothing is visible so far,
            // where l and o are still 0.
            for c in (0..rows).step_by(16) {
                // SAFETY: the arrays hold BQ = 64 floats, a multiple of 16.
                unsafe {
                    let (m0, m1) = (_mm512_loadu_ps(&mx[c]), _mm512_loadu_ps(&mnew[c]));
                    let cr = exp(_mm512_sub_ps(m0, m1));
                    _mm512_storeu_ps(&mut corr[c], cr);
                    let lv = _mm512_fmadd_ps(_mm512_loadu_ps(&l[c]), cr, _mm512_loadu_ps(&sums[c]));
                    _mm512_storeu_ps(&mut l[c], lv);
                    _mm512_storeu_ps(&mut mx[c], m1);
                }
            }
            // SAFETY: vp holds sk rows of dvp floats (stride vst), o rows × dvp.
            unsafe { pv(&s, rows, &vp[j0 * vst..], vst, dvp, bk, &mut o, &corr, &lim) };
        }
        for ii in 0..rows {
            let out = oc.row(ii);
            if mx[ii] < DEAD {
                blk.reference_row(i0 + ii, out);
            } else {
                for (y, &x) in out.iter_mut().zip(&o[ii * dvp..]) {
                    *y = x / l[ii];
                }
            }
        }
    }

    /// `s[r][c] = Σ_t q[r][t] · k[t][c]` for the `rows` query rows (stride qs) and one packed
    /// key block (`[d][KB]`), for the columns below `lim[g]` (rounded up to 16) in group `g`
    /// of R rows; the rest of a row is left as it was (the softmax masks it).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores(
        q: &[f32],
        qs: usize,
        d: usize,
        rows: usize,
        k: &[f32],
        s: &mut [f32],
        lim: &[usize; BQ / R],
    ) {
        assert!(rows >= 1 && qs >= d && q.len() >= (rows - 1) * qs + d);
        assert!(k.len() >= d * KB && s.len() >= rows * KB);
        let (q, k, s) = (q.as_ptr(), k.as_ptr(), s.as_mut_ptr());
        macro_rules! cols {
            ($n:literal, $nc:expr, $r:expr) => {
                match $nc {
                    1 => score_rows::<$n, 1>(q.add($r * qs), qs, d, k, s.add($r * KB)),
                    2 => score_rows::<$n, 2>(q.add($r * qs), qs, d, k, s.add($r * KB)),
                    3 => score_rows::<$n, 3>(q.add($r * qs), qs, d, k, s.add($r * KB)),
                    4 => score_rows::<$n, 4>(q.add($r * qs), qs, d, k, s.add($r * KB)),
                    _ => {}
                }
            };
        }
        // SAFETY: the assert bounds every row and column these read and write.
        unsafe {
            for (g, &lg) in lim.iter().enumerate().take(rows.div_ceil(R)) {
                let (r, nc) = (g * R, lg.div_ceil(16));
                match (rows - r).min(R) {
                    4 => cols!(4, nc, r),
                    3 => cols!(3, nc, r),
                    2 => cols!(2, nc, r),
                    _ => cols!(1, nc, r),
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn score_rows<const N: usize, const NC: usize>(
        q: *const f32,
        qs: usize,
        d: usize,
        k: *const f32,
        s: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NC]; N];
        // SAFETY: `scores` bounds q (N rows of d, stride qs), k (d × KB) and s (N × KB).
        unsafe {
            outer_acc(&mut acc, q, qs, k, KB, d);
            store_rows(&acc, s, KB);
        }
    }

    /// One score row in place: `x·scale + mask` on keys `[a, e)` (the rest `-inf`), the new
    /// running max `max(m_old, max x)`, then `p = e^(x - max)`; returns (max, `Σ p`). A row
    /// with nothing visible is left all 0 with max `-inf`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_row(
        row: &mut [f32],
        a: usize,
        e: usize,
        scale: f32,
        mask: Option<*const f32>,
        m_old: f32,
    ) -> (f32, f32) {
        assert!(row.len() == KB && a <= e && e <= KB);
        let below = |n: usize| if n >= 64 { !0u64 } else { (1u64 << n) - 1 };
        let live = below(e) & !below(a);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let sc = _mm512_set1_ps(scale);
        let p = row.as_mut_ptr();
        let mut x = [ninf; 4];
        let mut best = ninf;
        // SAFETY: row has KB floats; the mask is read only under lanes `< e` (its length).
        unsafe {
            for (c, xc) in x.iter_mut().enumerate() {
                let k = (live >> (16 * c)) as __mmask16;
                let mut v = _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * c)), sc);
                if let Some(m) = mask {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m.add(16 * c)));
                }
                *xc = _mm512_mask_mov_ps(ninf, k, v);
                best = _mm512_max_ps(best, *xc);
            }
            let m_new = _mm512_reduce_max_ps(best).max(m_old);
            if m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                return (m_new, 0.0);
            }
            let mb = _mm512_set1_ps(m_new);
            let mut sum = _mm512_setzero_ps();
            for (c, &xc) in x.iter().enumerate() {
                let e = exp(_mm512_sub_ps(xc, mb));
                _mm512_storeu_ps(p.add(16 * c), e);
                sum = _mm512_add_ps(sum, e);
            }
            (m_new, _mm512_reduce_add_ps(sum))
        }
    }

    /// `o[r] = o[r]·corr[r] + Σ_{j < lim[g]} p[r][j] · v[j]` for the `rows` rows (`g` = the
    /// row's group of R; p: stride KB; v: dvp columns, stride vst; o: stride dvp, a multiple of
    /// 16; `lim <= bk`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv(
        p: &[f32],
        rows: usize,
        v: &[f32],
        vst: usize,
        dvp: usize,
        bk: usize,
        o: &mut [f32],
        corr: &[f32; BQ],
        lim: &[usize; BQ / R],
    ) {
        assert!(p.len() >= rows * KB && bk <= KB && o.len() >= rows * dvp);
        assert!(dvp.is_multiple_of(16) && lim.iter().all(|&x| x <= bk));
        assert!(bk >= 1 && vst >= dvp && v.len() >= (bk - 1) * vst + dvp);
        let (pp, vv, op) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        // SAFETY: the asserts bound every element the tiles reach.
        unsafe {
            for (g, &nj) in lim.iter().enumerate().take(rows.div_ceil(R)) {
                let r = g * R;
                let n = (rows - r).min(R);
                let (pr, or, cr) = (pp.add(r * KB), op.add(r * dvp), corr.as_ptr().add(r));
                let mut c0 = 0;
                while c0 < dvp {
                    let nv = ((dvp - c0) / 16).min(4);
                    let (vc, oc) = (vv.add(c0), or.add(c0));
                    match (n, nv) {
                        (4, 4) => pv_tile::<4, 4>(pr, vc, vst, dvp, nj, oc, cr),
                        (4, 3) => pv_tile::<4, 3>(pr, vc, vst, dvp, nj, oc, cr),
                        (4, 2) => pv_tile::<4, 2>(pr, vc, vst, dvp, nj, oc, cr),
                        (4, _) => pv_tile::<4, 1>(pr, vc, vst, dvp, nj, oc, cr),
                        (3, _) => pv_tile::<3, 1>(pr, vc, vst, dvp, nj, oc, cr),
                        (2, _) => pv_tile::<2, 1>(pr, vc, vst, dvp, nj, oc, cr),
                        _ => pv_tile::<1, 1>(pr, vc, vst, dvp, nj, oc, cr),
                    }
                    c0 += if n == 4 { nv * 16 } else { 16 };
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_tile<const N: usize, const NV: usize>(
        p: *const f32,
        v: *const f32,
        vst: usize,
        dvp: usize,
        bk: usize,
        o: *mut f32,
        corr: *const f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; N];
        // SAFETY: `pv` bounds p (N rows of KB), v (bk rows of dvp, stride vst), o (N rows of
        // dvp).
        unsafe {
            for (r, ar) in acc.iter_mut().enumerate() {
                let cr = _mm512_set1_ps(*corr.add(r));
                for (c, a) in ar.iter_mut().enumerate() {
                    *a = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * dvp + c * 16)), cr);
                }
            }
            outer_acc(&mut acc, p, KB, v, vst, bk);
            store_rows(&acc, o, dvp);
        }
    }

    /// `acc[r][c] += a[r·ars + t] · b[t·bst + 16c ..][..16]` for `t` in `0..steps`: the
    /// register-blocked outer-product loop of both the score tile (q against k) and the P·V
    /// tile (p against v).
    ///
    /// # Safety
    /// `a` holds `N` rows of `steps` at stride `ars`, `b` `steps` rows of `16·C` at stride `bst`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn outer_acc<const N: usize, const C: usize>(
        acc: &mut [[__m512; C]; N],
        a: *const f32,
        ars: usize,
        b: *const f32,
        bst: usize,
        steps: usize,
    ) {
        // SAFETY: the caller bounds every element read (see above).
        unsafe {
            for t in 0..steps {
                let bt = b.add(t * bst);
                let mut bv = [_mm512_setzero_ps(); C];
                for (c, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(bt.add(c * 16));
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * ars + t));
                    for (x, &bc) in ar.iter_mut().zip(&bv) {
                        *x = _mm512_fmadd_ps(av, bc, *x);
                    }
                }
            }
        }
    }

    /// Stores `acc` as `N` rows of `16·C` at stride `st` from `out`.
    ///
    /// # Safety
    /// `out` holds those rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rows<const N: usize, const C: usize>(
        acc: &[[__m512; C]; N],
        out: *mut f32,
        st: usize,
    ) {
        // SAFETY: the caller bounds the rows.
        unsafe {
            for (r, ar) in acc.iter().enumerate() {
                for (c, &x) in ar.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * st + c * 16), x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Both kernels reading q/k/v through strides (heads sliced from wider rows, permuted:
    /// `[b, s, width]` with head `h` at columns `lo + h·d ..`) against the reference on dense
    /// copies, within `1e-5·(max|v| + |ref|)` as below; odd sizes, GQA, ×100 values.
    #[test]
    fn both_kernels_read_strided_heads() {
        // (h, kvh, sq, sk, d, dv, causal, magnitude)
        let cases = [
            (2, 2, 1, 1, 64, 64, false, 1f32),
            (2, 2, 3, 50, 7, 7, true, 1.0),
            (4, 2, 50, 3, 64, 80, false, 1.0),
            (2, 2, 129, 129, 64, 64, true, 1.0),
            (4, 1, 129, 783, 33, 17, true, 1.0),
            (2, 2, 129, 129, 64, 64, true, 100.0),
            (6, 3, 65, 129, 64, 64, false, 100.0),
        ];
        for (ci, &(h, kvh, sq, sk, d, dv, causal, mag)) in cases.iter().enumerate() {
            let b = 2;
            let seed = 900 + 4 * ci as u64;
            // Wide rows: q at column 5 of [b, sq, 5 + h·d + 1], k at 0 of [b, sk, kvh·d + 3],
            // v at 2 of [b, sk, 2 + kvh·dv].
            let (qw, kw, vw) = (5 + h * d + 1, kvh * d + 3, 2 + kvh * dv);
            let qd = rand(b * sq * qw, seed, mag.sqrt().min(10.0));
            let kd = rand(b * sk * kw, seed + 1, 1.0);
            let vd = rand(b * sk * vw, seed + 2, mag);
            let dense = |src: &[f32], s: usize, w: usize, lo: usize, n: usize, e: usize| {
                let mut out = vec![0f32; b * n * s * e];
                for bi in 0..b {
                    for hi in 0..n {
                        for i in 0..s {
                            for t in 0..e {
                                out[((bi * n + hi) * s + i) * e + t] =
                                    src[(bi * s + i) * w + lo + hi * e + t];
                            }
                        }
                    }
                }
                Tensor::f32(vec![b, n, s, e], out)
            };
            let (q, k, v) = (
                dense(&qd, sq, qw, 5, h, d),
                dense(&kd, sk, kw, 0, kvh, d),
                dense(&vd, sk, vw, 2, kvh, dv),
            );
            let vmax = v
                .as_f32()
                .unwrap()
                .iter()
                .fold(0f32, |a, &x| a.max(x.abs()));
            let how = Mask {
                scale: 1.0 / (d as f32).sqrt(),
                causal,
                window: None,
            };
            let out = [b, h, sq, dv];
            let reference = super::super::fused::attention(&q, &k, &v, None, how, &out);
            let st = |s: usize, w: usize, e: usize| vec![s * w, e, w, 1];
            let (sqs, sks, svs) = (st(sq, qw, d), st(sk, kw, d), st(sk, vw, dv));
            let (qs, ks, vs) = ([b, h, sq, d], [b, kvh, sk, d], [b, kvh, sk, dv]);
            fn op<'a>(
                d: &'a [f32],
                offset: usize,
                shape: &'a [usize],
                st: &'a [usize],
            ) -> Operand<'a> {
                Operand {
                    data: d,
                    offset,
                    shape,
                    strides: st,
                }
            }
            for wide in [false, true] {
                let heads = Heads::strided(
                    op(&qd, 5, &qs, &sqs),
                    op(&kd, 0, &ks, &sks),
                    op(&vd, 2, &vs, &svs),
                    None,
                );
                let got = run_heads(&heads, how, &out, wide);
                for (i, (&f, &r)) in got.iter().zip(&reference).enumerate() {
                    let tol = 1e-5 * (vmax + r.abs());
                    assert!(
                        f.is_finite() && (f - r).abs() <= tol,
                        "case {:?} wide={wide}: element {i}: got {f}, reference {r}",
                        cases[ci]
                    );
                }
                // The heads-last layout: element [bi, hi, i, t] of the output at [bi, i, hi, t].
                let hl = run_heads_into(&heads, how, &out, wide, Some(h));
                assert_eq!(hl.len(), reference.len());
                for (i, &r) in reference.iter().enumerate() {
                    let (t, i_) = (i % dv, i / dv);
                    let (row, bh) = (i_ % sq, i_ / sq);
                    let (bi, hi) = (bh / h, bh % h);
                    let f = hl[((bi * sq + row) * h + hi) * dv + t];
                    let tol = 1e-5 * (vmax + r.abs());
                    assert!(
                        f.is_finite() && (f - r).abs() <= tol,
                        "case {:?} wide={wide} heads-last: element {i}: got {f}, reference {r}",
                        cases[ci]
                    );
                }
            }
        }
    }

    /// Both kernels (the AVX-512 one where the CPU has it, and the portable one) against the
    /// reference `fused::attention`, within the fast-vs-reference test's tolerance
    /// `1e-5·(max|v| + |ref|)`. Covers what `tests/cpu_fast_vs_reference.rs` cannot reach
    /// through the graph: the portable kernel on an AVX-512 machine and a mask broadcast over
    /// keys (column stride 0, the gathered-mask path).
    #[test]
    fn both_kernels_match_the_reference() {
        // (h, kvh, sq, sk, d, dv, causal, window, mask, magnitude)
        let mut cases = vec![];
        for &(sq, sk) in &[
            (1, 1),
            (3, 50),
            (50, 3),
            (129, 129),
            (1, 783),
            (65, 783),
            (129, 50),
        ] {
            for &(causal, window) in &[
                (false, None),
                (true, None),
                (true, Some(5)),
                (false, Some(3)),
            ] {
                for mask in ["none", "pad", "keys", "rows"] {
                    cases.push((2, 2, sq, sk, 64, 64, causal, window, mask, 1f32));
                }
            }
        }
        for &(d, dv) in &[(7, 7), (33, 17), (128, 128), (64, 80)] {
            cases.push((6, 2, 129, 129, d, dv, true, None, "pad", 1.0));
            cases.push((6, 3, 50, 783, d, dv, false, None, "rows", 1.0));
            cases.push((6, 1, 1, 129, d, dv, true, Some(4), "keys", 1.0));
        }
        for causal in [false, true] {
            cases.push((2, 2, 129, 129, 64, 64, causal, None, "none", 100.0));
            cases.push((2, 1, 50, 783, 64, 64, causal, None, "pad", 100.0));
        }
        let mut worst = [0f32; 2];
        for (ci, &(h, kvh, sq, sk, d, dv, causal, window, mask, mag)) in cases.iter().enumerate() {
            let seed = 77 + 4 * ci as u64;
            let q = Tensor::f32(
                vec![1, h, sq, d],
                rand(h * sq * d, seed, mag.sqrt().min(10.0)),
            );
            let k = Tensor::f32(vec![1, kvh, sk, d], rand(kvh * sk * d, seed + 1, 1.0));
            let vdata = rand(kvh * sk * dv, seed + 2, mag);
            let vmax = vdata.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let v = Tensor::f32(vec![1, kvh, sk, dv], vdata);
            let m = match mask {
                "none" => None,
                // Every fourth key hidden by f32::MIN (padding), shared by heads and rows.
                "pad" => Some(Tensor::f32(
                    vec![1, 1, 1, sk],
                    (0..sk)
                        .map(|j| if j % 4 == 3 { f32::MIN } else { 0.0 })
                        .collect(),
                )),
                // One value per (head, query) broadcast over keys; every third row dead.
                "keys" => Some(Tensor::f32(
                    vec![1, h, sq, 1],
                    (0..h * sq)
                        .map(|i| if i % 3 == 1 { f32::MIN } else { i as f32 * 0.1 })
                        .collect(),
                )),
                // A full random mask shared by heads, with dead rows every fifth query.
                _ => Some(Tensor::f32(
                    vec![1, 1, sq, sk],
                    rand(sq * sk, seed + 3, 2.0)
                        .into_iter()
                        .enumerate()
                        .map(|(i, x)| if i / sk % 5 == 0 { f32::MIN } else { x })
                        .collect(),
                )),
            };
            let how = Mask {
                scale: 1.0 / (d as f32).sqrt(),
                causal,
                window,
            };
            let out = [1, h, sq, dv];
            let reference = super::super::fused::attention(&q, &k, &v, m.as_ref(), how, &out);
            for (w, wide) in [false, true].into_iter().enumerate() {
                let got = attention_at(&q, &k, &v, m.as_ref(), how, &out, wide);
                for (i, (&f, &r)) in got.iter().zip(&reference).enumerate() {
                    let diff = (f - r).abs();
                    let tol = 1e-5 * (vmax + r.abs());
                    assert!(
                        f.is_finite() && diff <= tol,
                        "case {:?} wide={wide}: element {i}: got {f}, reference {r}",
                        cases[ci]
                    );
                    worst[w] = worst[w].max(diff / tol);
                }
            }
        }
        eprintln!(
            "worst |got - ref| / tol: portable {:.3e}, avx-512 {:.3e} (avx-512 present: {})",
            worst[0],
            worst[1],
            simd::has_avx512()
        );
    }
}
