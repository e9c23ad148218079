//! The fast GEMM: `faer`'s packed microkernels (AVX2 / AVX-512 / NEON chosen at run time) on
//! rayon's global pool, so there is one thread pool: a GEMM that faer threads is never called
//! from inside another rayon loop, and the row-block loop below calls faer single-threaded.
//! The thread count is rayon's (`RAYON_NUM_THREADS`).
//!
//! A product of many rows is split across threads by column blocks of the output here, each
//! block one single-threaded faer call followed at once by the epilogue (bias, activation,
//! residual; vectorised) on that block: measured (`examples/gemm_shapes.rs`, MiniLM's shapes,
//! 2 threads) 15–30 % faster than one faer call threaded by faer plus a separate epilogue
//! pass, and each block packs only its own columns of the weight (no packing repeated per
//! block, unlike blocks of rows). A product of few rows (decode, the LM head) is split across
//! columns by faer itself.

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::kernels::{for_rows, strides};

/// Multiply-adds below which a product runs on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// What runs on each output row segment after the product: `f(row_index, first_column,
/// segment)`, the segment `row[first_column..first_column + segment.len()]`.
pub type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// Rows from which a threaded product is split by column blocks here rather than by faer.
const SPLIT_MIN_ROWS: usize = 16;

/// Rows from which a product takes one column block per thread instead of two.
const ONE_BLOCK_MIN_ROWS: usize = 1024;

/// The columns of one block: a multiple of 96 (the AVX-512 microkernel's height in faer's
/// transposed problem) giving about two blocks per thread, or one for products of at least
/// [`ONE_BLOCK_MIN_ROWS`] rows, where every extra block packs all of `a` once more and the
/// blocks are long enough to balance the threads anyway (measured idle, 2 threads, 4
/// alternating rounds: MiniLM 32 × 128 424.8–446.6 ms with one block per thread against
/// 438.9–454.9 with two; at 1 × 128 two per thread stayed faster, 15.0 against 15.4 ms).
fn col_block(n: usize, m: usize, threads: usize) -> usize {
    let per_thread = if m >= ONE_BLOCK_MIN_ROWS { 1 } else { 2 };
    let per = n.div_ceil(per_thread * threads);
    per.div_ceil(96).max(1) * 96
}

/// A pointer to the output shared by the column-block tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks holding it write disjoint column ranges of the buffer it points into.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that a closure captures the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `c = a × b` (+ `epi` on every row segment, rows numbered from `row0`) for `a` [m, k] and
/// `b` [k, n] read through (row, column) strides, into contiguous row-major `c` [m, n]: on the
/// calling thread when small, else by column blocks in parallel, each block a
/// single-threaded product then its epilogue while the block is in cache.
#[allow(clippy::too_many_arguments)]
fn gemm_epilogue(
    a: &[f32],
    sa: (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (m, k, n): (usize, usize, usize),
    row0: usize,
    epi: Option<Epilogue>,
) {
    let threads = rayon::current_num_threads();
    let finish = |c: &mut [f32]| {
        if let Some(f) = epi {
            for (r, row) in c.chunks_mut(n).enumerate() {
                f(row0 + r, 0, row);
            }
        }
    };
    if threads == 1 || m * k * n < PAR_MIN_FLOPS {
        gemm_strided(a, sa, b, (rsb, csb), c, m, k, n, false, Par::Seq);
        finish(c);
        return;
    }
    if m < SPLIT_MIN_ROWS || n < 2 * 96 {
        gemm_strided(a, sa, b, (rsb, csb), c, m, k, n, false, par_for(m * k * n));
        if let Some(f) = epi {
            for_rows(c, n, |r, row| f(row0 + r, 0, row));
        }
        return;
    }
    super::kernels::check_strided(a, sa, b, (rsb, csb), c, (m, k, n));
    let cb = col_block(n, m, threads);
    let out = OutPtr(c.as_mut_ptr());
    (0..n.div_ceil(cb)).into_par_iter().for_each(|j| {
        let (j0, w) = (j * cb, cb.min(n - j * cb));
        // SAFETY: `check_strided` bounds every element of `a` and `b` these views reach (a
        // column block of `b` is inside `b`), and block `j` writes only columns
        // `j0..j0 + w` of each row of `c`, which no other task touches.
        unsafe {
            let av = MatRef::from_raw_parts(a.as_ptr(), m, k, sa.0 as isize, sa.1 as isize);
            let bv =
                MatRef::from_raw_parts(b.as_ptr().add(j0 * csb), k, w, rsb as isize, csb as isize);
            let cv = MatMut::from_raw_parts_mut(out.get().add(j0), m, w, n as isize, 1);
            faer_matmul(cv, Accum::Replace, av, bv, 1.0f32, Par::Seq);
            if let Some(f) = epi {
                for r in 0..m {
                    let seg = std::slice::from_raw_parts_mut(out.get().add(r * n + j0), w);
                    f(row0 + r, j0, seg);
                }
            }
        }
    });
}

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
            gemm_epilogue(ad, (rs, csa), bd, (rsb, csb), &mut c, (rows, k, n), 0, epi);
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
    if batches >= 2 * threads || m * k * n < PAR_MIN_FLOPS {
        // Many products: one per work item, each single-threaded.
        c.par_chunks_mut(m * n).enumerate().for_each(|(bi, cc)| {
            let (x, y) = operands(bi);
            gemm_strided(x, (rsa, csa), y, (rsb, csb), cc, m, k, n, false, Par::Seq);
            if let Some(f) = epi {
                for (r, row) in cc.chunks_mut(n).enumerate() {
                    f(bi * m + r, 0, row);
                }
            }
        });
    } else {
        // Few large products: one after another, each split across the threads.
        for (bi, cc) in c.chunks_mut(m * n).enumerate() {
            let (x, y) = operands(bi);
            gemm_epilogue(x, (rsa, csa), y, (rsb, csb), cc, (m, k, n), bi * m, epi);
        }
    }
    c
}
