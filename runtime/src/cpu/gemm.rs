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

use super::kernels::{broadcast_strides, for_rows};

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
    let batches: usize = out_batch.iter().product();
    let mut c = vec![0f32; batches * m * n];
    if m == 0 || n == 0 || batches == 0 {
        return c;
    }
    let threads = rayon::current_num_threads();
    let b_broadcast = b_batch.iter().all(|&d| d == 1);
    if b_broadcast && a_batch == out_batch {
        // One weight for every batch: fold the batch into rows.
        let rows = batches * m;
        // One threaded faer call over all rows, then the epilogue in one parallel pass: a
        // per-block loop of single-threaded calls (epilogue on the hot block) measured up to
        // 20 % slower at MiniLM's shapes, faer re-packing the weight for every block.
        let par = par_for(rows * k * n);
        gemm_strided(a, (k, 1), b, (n, 1), &mut c, rows, k, n, false, par);
        if let Some(f) = epi {
            for_rows(&mut c, n, f);
        }
        return c;
    }
    let sa = broadcast_strides(a_batch, out_batch);
    let sb = broadcast_strides(b_batch, out_batch);
    let ob = out_batch.to_vec();
    let operands = |bi: usize| {
        let (mut rem, mut oa, mut obb) = (bi, 0, 0);
        for ax in (0..ob.len()).rev() {
            let i = rem % ob[ax];
            rem /= ob[ax];
            oa += i * sa[ax];
            obb += i * sb[ax];
        }
        (
            &a[oa * m * k..(oa + 1) * m * k],
            &b[obb * k * n..(obb + 1) * k * n],
        )
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
            gemm_seq(x, y, cc, m, k, n);
            finish(bi, cc);
        });
    } else {
        // Few large products: one after another, each threaded by faer.
        for (bi, cc) in c.chunks_mut(m * n).enumerate() {
            let (x, y) = operands(bi);
            let par = par_for(m * k * n);
            gemm_strided(x, (k, 1), y, (n, 1), cc, m, k, n, false, par);
            if let Some(f) = epi {
                for_rows(cc, n, |r, row| f(bi * m + r, row));
            }
        }
    }
    c
}
