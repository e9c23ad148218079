//! The fast GEMM: `faer`'s packed microkernels (AVX2 / AVX-512 / NEON chosen at run time) on
//! rayon's global pool, so there is one thread pool: a GEMM that faer threads is never called
//! from inside another rayon loop, and the row-block loop below calls faer single-threaded.
//! The thread count is rayon's (`RAYON_NUM_THREADS`).
//!
//! Epilogues (bias, activation, residual; vectorised) run as one parallel pass over the output
//! right after the product: faer keeps its tiles to itself, and calling it per block of rows
//! to finish each block while hot re-packs the weight per block (measured slower, see
//! `matmul`). A one-row product (decode, the LM head) is split across columns by faer itself.

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::kernels::{for_rows, strides};

/// Multiply-adds below which a product runs on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// What runs on each output row after the product: `f(row_index, row)`.
pub type Epilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// `c = a × b` for `a` [m, k] and `b` [k, n] read through (row, column) strides, into
/// contiguous row-major `c` [m, n], on `par`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    accum: bool,
    par: Par,
) {
    super::kernels::check_strided(a, (rsa, csa), b, (rsb, csb), c, (m, k, n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accum {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above bound every element these views reach.
    let (av, bv) = unsafe {
        (
            MatRef::from_raw_parts(a.as_ptr(), m, k, rsa as isize, csa as isize),
            MatRef::from_raw_parts(b.as_ptr(), k, n, rsb as isize, csb as isize),
        )
    };
    let cv = MatMut::from_row_major_slice_mut(&mut c[..m * n], m, n);
    let accum = if accum { Accum::Add } else { Accum::Replace };
    faer_matmul(cv, accum, av, bv, 1.0f32, par);
}

/// `c = a × b`, contiguous row-major, single-threaded.
pub fn gemm_seq(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    gemm_strided(a, (k, 1), b, (n, 1), c, m, k, n, false, Par::Seq);
}

fn par_for(flops: usize) -> Par {
    if flops < PAR_MIN_FLOPS || rayon::current_num_threads() == 1 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// Batched matmul `[batch.., m, k] × [batch.., k, n]` on contiguous inputs whose batch dims
/// broadcast to `out_batch`, with `epi` applied to every output row (rows numbered across
/// the batch).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    a_batch: &[usize],
    b: &[f32],
    b_batch: &[usize],
    out_batch: &[usize],
    m: usize,
    k: usize,
    n: usize,
    epi: Option<Epilogue>,
) -> Vec<f32> {
    let shape = |batch: &[usize], r: usize, c: usize| {
        let mut s = batch.to_vec();
        s.extend([r, c]);
        s
    };
    let (sa, sb) = (shape(a_batch, m, k), shape(b_batch, k, n));
    let (ta, tb) = (strides(&sa), strides(&sb));
    matmul_strided(
        Operand {
            data: a,
            offset: 0,
            shape: &sa,
            strides: &ta,
        },
        Operand {
            data: b,
            offset: 0,
            shape: &sb,
            strides: &tb,
        },
        out_batch,
        epi,
    )
}

/// A matmul operand `[batch.., rows, cols]` read from `data` at `offset` through per-axis
/// strides (a view: permuted, sliced or broadcast without a copy).
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    /// The buffer read.
    pub data: &'a [f32],
    /// Where element `[0, .., 0]` sits in `data`.
    pub offset: usize,
    /// `[batch.., rows, cols]`.
    pub shape: &'a [usize],
    /// Elements between neighbours along each axis (0 on broadcast axes).
    pub strides: &'a [usize],
}

impl Operand<'_> {
    /// Batch strides broadcast to `out_batch` (0 on repeated axes), and the matrix's (row,
    /// column) strides.
    fn split(&self, out_batch: &[usize]) -> (Vec<usize>, (usize, usize)) {
        let r = self.shape.len();
        let batch = &self.shape[..r - 2];
        let lead = out_batch.len() - batch.len();
        let bs = (0..out_batch.len())
            .map(|i| {
                if i < lead || batch[i - lead] == 1 {
                    0
                } else {
                    self.strides[i - lead]
                }
            })
            .collect();
        (bs, (self.strides[r - 2], self.strides[r - 1]))
    }
}

/// The row stride that reads all `dims` (batch axes then the rows) as one run of evenly
/// strided rows, if there is one.
fn fold_rows(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let mut inner: Option<(usize, usize)> = None; // (stride, rows below) of the run so far
    for i in (0..dims.len()).rev() {
        if dims[i] == 1 {
            continue;
        }
        match inner {
            None => inner = Some((strides[i], dims[i])),
            Some((s, below)) => {
                if strides[i] != s * below {
                    return None;
                }
                inner = Some((s, below * dims[i]));
            }
        }
    }
    Some(inner.map_or(0, |(s, _)| s))
}

/// Batched matmul of two strided operands whose batch dims broadcast to `out_batch`, into a
/// contiguous `[out_batch.., m, n]` buffer from the arena, with `epi` applied to every output
/// row (rows numbered across the batch). faer reads the strides itself (packing what is not
/// unit-stride), so a permuted or sliced operand is never copied first.
pub fn matmul_strided(
    a: Operand,
    b: Operand,
    out_batch: &[usize],
    epi: Option<Epilogue>,
) -> Vec<f32> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batches: usize = out_batch.iter().product();
    let mut c = super::arena::buffer(batches * m * n);
    if m == 0 || n == 0 || batches == 0 {
        return c;
    }
    let threads = rayon::current_num_threads();
    let (sa, (rsa, csa)) = a.split(out_batch);
    let (sb, (rsb, csb)) = b.split(out_batch);
    let (ad, bd) = (&a.data[a.offset..], &b.data[b.offset..]);
    if sb.iter().all(|&s| s == 0) {
        let mut dims = out_batch.to_vec();
        dims.push(m);
        let mut st = sa.clone();
        st.push(rsa);
        if let Some(rs) = fold_rows(&dims, &st) {
            // One weight for every batch: fold the batch into rows.
            let rows = batches * m;
            // One threaded faer call over all rows, then the epilogue in one parallel pass: a
            // per-block loop of single-threaded calls (epilogue on the hot block) measured up
            // to 20 % slower at MiniLM's shapes, faer re-packing the weight for every block.
            let par = par_for(rows * k * n);
            gemm_strided(
                ad,
                (rs, csa),
                bd,
                (rsb, csb),
                &mut c,
                rows,
                k,
                n,
                false,
                par,
            );
            if let Some(f) = epi {
                for_rows(&mut c, n, f);
            }
            return c;
        }
    }
    let ob = out_batch.to_vec();
    let operands = |bi: usize| {
        let (mut rem, mut oa, mut obb) = (bi, 0, 0);
        for ax in (0..ob.len()).rev() {
            let i = rem % ob[ax];
            rem /= ob[ax];
            oa += i * sa[ax];
            obb += i * sb[ax];
        }
        (&ad[oa..], &bd[obb..])
    };
    let finish = |bi: usize, cc: &mut [f32]| {
        if let Some(f) = epi {
            for (r, row) in cc.chunks_mut(n).enumerate() {
                f(bi * m + r, row);
            }
        }
    };
    if batches >= 2 * threads || m * k * n < PAR_MIN_FLOPS {
        // Many products: one per work item, each single-threaded.
        c.par_chunks_mut(m * n).enumerate().for_each(|(bi, cc)| {
            let (x, y) = operands(bi);
            gemm_strided(x, (rsa, csa), y, (rsb, csb), cc, m, k, n, false, Par::Seq);
            finish(bi, cc);
        });
    } else {
        // Few large products: one after another, each threaded by faer.
        for (bi, cc) in c.chunks_mut(m * n).enumerate() {
            let (x, y) = operands(bi);
            let par = par_for(m * k * n);
            gemm_strided(x, (rsa, csa), y, (rsb, csb), cc, m, k, n, false, par);
            if let Some(f) = epi {
                for_rows(cc, n, |r, row| f(bi * m + r, row));
            }
        }
    }
    c
}
