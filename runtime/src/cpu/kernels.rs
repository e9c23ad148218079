//! CPU kernels over contiguous row-major buffers, the reference implementations (plain loops;
//! large loops split across rayon's pool by rows). The fast paths are in `gemm` and `flash`.

use rayon::prelude::*;

/// Work below this many elements runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Contiguous strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i];
    }
    s
}

/// Strides that read a tensor of `shape` broadcast to `out` (size-1 and missing axes → 0).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < lead || shape[i - lead] == 1 {
                0
            } else {
                own[i - lead]
            }
        })
        .collect()
}

/// Offset of the first element of output row `row` (all axes but the last) under `strides`.
pub fn row_offset(row: usize, out: &[usize], strides: &[usize]) -> usize {
    let mut rem = row;
    let mut off = 0;
    for ax in (0..out.len().saturating_sub(1)).rev() {
        let n = out[ax];
        off += (rem % n) * strides[ax];
        rem /= n;
    }
    off
}

/// Runs `f(row_index, row_slice)` over the rows of `out` (rows = last axis), in parallel when large.
pub fn for_rows<T: Send>(out: &mut [T], inner: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if inner == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PAR_MIN {
        let rows_per_chunk = (PAR_MIN / inner).max(1);
        out.par_chunks_mut(rows_per_chunk * inner)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (r, row) in chunk.chunks_mut(inner).enumerate() {
                    f(c * rows_per_chunk + r, row);
                }
            });
    } else {
        for (r, row) in out.chunks_mut(inner).enumerate() {
            f(r, row);
        }
    }
}

/// Copies `src` read through `strides` (starting at `offset`) into a new contiguous `out` shape.
pub fn strided_copy<T: Copy + Send + Sync + Default>(
    src: &[T],
    offset: usize,
    strides: &[usize],
    out: &[usize],
) -> Vec<T> {
    let n: usize = out.iter().product();
    let mut dst = vec![T::default(); n];
    if out.is_empty() {
        if n == 1 {
            dst[0] = src[offset];
        }
        return dst;
    }
    let inner = out[out.len() - 1];
    let st = strides[strides.len() - 1];
    for_rows(&mut dst, inner, |r, row| {
        let base = offset + row_offset(r, out, strides);
        if st == 1 {
            row.copy_from_slice(&src[base..base + inner]);
        } else {
            for (j, v) in row.iter_mut().enumerate() {
                *v = src[base + j * st];
            }
        }
    });
    dst
}

/// Elementwise `f(a, b)` with numpy broadcasting to `out`.
pub fn map2<A, B, O>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> O + Sync,
) -> Vec<O>
where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Send + Default,
{
    let n: usize = out.iter().product();
    let mut dst = vec![O::default(); n];
    if ash == out && bsh == out {
        let body = |(o, (x, y)): (&mut O, (&A, &B))| *o = f(*x, *y);
        if n >= PAR_MIN {
            dst.par_iter_mut()
                .zip(a.par_iter().zip(b.par_iter()))
                .for_each(body);
        } else {
            dst.iter_mut().zip(a.iter().zip(b.iter())).for_each(body);
        }
        return dst;
    }
    if out.is_empty() {
        if n == 1 {
            dst[0] = f(a[0], b[0]);
        }
        return dst;
    }
    let sa = broadcast_strides(ash, out);
    let sb = broadcast_strides(bsh, out);
    let inner = out[out.len() - 1];
    let (ia, ib) = (sa[sa.len() - 1], sb[sb.len() - 1]);
    for_rows(&mut dst, inner, |r, row| {
        let oa = row_offset(r, out, &sa);
        let ob = row_offset(r, out, &sb);
        for (j, v) in row.iter_mut().enumerate() {
            *v = f(a[oa + j * ia], b[ob + j * ib]);
        }
    });
    dst
}

/// Elementwise `f(a[i], b[i])` into `dst[i]` for slices of one length, in parallel when large.
pub fn map2_same<A, B, O>(a: &[A], b: &[B], dst: &mut [O], f: impl Fn(A, B) -> O + Sync)
where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Send,
{
    let body = |(o, (x, y)): (&mut O, (&A, &B))| *o = f(*x, *y);
    if dst.len() >= PAR_MIN {
        dst.par_iter_mut()
            .zip(a.par_iter().zip(b.par_iter()))
            .for_each(body);
    } else {
        dst.iter_mut().zip(a.iter().zip(b.iter())).for_each(body);
    }
}

/// Elementwise `f(a, b)` into `dst` (of shape `out`), `a` and `b` read at their offsets
/// through per-axis strides already broadcast to `out` (0 on repeated axes): the fast mode's
/// binary ops on views.
#[allow(clippy::too_many_arguments)]
pub fn map2_strided<A, B, O>(
    a: &[A],
    oa: usize,
    sa: &[usize],
    b: &[B],
    ob: usize,
    sb: &[usize],
    out: &[usize],
    dst: &mut [O],
    f: impl Fn(A, B) -> O + Sync,
) where
    A: Copy + Sync,
    B: Copy + Sync,
    O: Copy + Send,
{
    if dst.is_empty() {
        return;
    }
    if out.is_empty() {
        dst[0] = f(a[oa], b[ob]);
        return;
    }
    let n = dst.len();
    let dense = strides(out);
    if sa == dense && sb == dense {
        map2_same(&a[oa..oa + n], &b[ob..ob + n], dst, f);
        return;
    }
    let inner = out[out.len() - 1];
    let (ia, ib) = (sa[sa.len() - 1], sb[sb.len() - 1]);
    for_rows(dst, inner, |r, row| {
        let ra = oa + row_offset(r, out, sa);
        let rb = ob + row_offset(r, out, sb);
        match (ia, ib) {
            (1, 1) => {
                for ((v, &x), &y) in row
                    .iter_mut()
                    .zip(&a[ra..ra + inner])
                    .zip(&b[rb..rb + inner])
                {
                    *v = f(x, y);
                }
            }
            (1, 0) => {
                let y = b[rb];
                for (v, &x) in row.iter_mut().zip(&a[ra..ra + inner]) {
                    *v = f(x, y);
                }
            }
            _ => {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = f(a[ra + j * ia], b[rb + j * ib]);
                }
            }
        }
    });
}

/// Elementwise `f(x)`.
pub fn map1<A: Copy + Sync, O: Send>(a: &[A], f: impl Fn(A) -> O + Sync + Send) -> Vec<O> {
    if a.len() >= PAR_MIN {
        a.par_iter().map(|&x| f(x)).collect()
    } else {
        a.iter().map(|&x| f(x)).collect()
    }
}

/// Reduction over `axes` (sorted) of a tensor of `shape`, combining with `f` from `init`.
/// Returns the reduced values in the keepdim layout (reduced axes of size 1).
pub fn reduce<T: Copy + Send + Sync>(
    x: &[T],
    shape: &[usize],
    axes: &[usize],
    init: T,
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let kept: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &n)| if axes.contains(&i) { 1 } else { n })
        .collect();
    let n_out: usize = kept.iter().product();
    let rank = shape.len();
    // Fast path: only the last axis is reduced; one output per contiguous row.
    if axes == [rank - 1] {
        let inner = shape[rank - 1];
        let mut out = vec![init; n_out];
        let body = |(o, row): (&mut T, &[T])| *o = row.iter().fold(init, |acc, &v| f(acc, v));
        if x.len() >= PAR_MIN && inner > 0 {
            out.par_iter_mut().zip(x.par_chunks(inner)).for_each(body);
        } else if inner > 0 {
            out.iter_mut().zip(x.chunks(inner)).for_each(body);
        }
        return out;
    }
    let mut out = vec![init; n_out];
    let ostr = broadcast_strides(&kept, shape);
    let ostr: Vec<usize> = ostr
        .iter()
        .enumerate()
        .map(|(i, &s)| if axes.contains(&i) { 0 } else { s })
        .collect();
    let mut idx = vec![0usize; rank];
    let mut off = 0usize;
    for &v in x {
        out[off] = f(out[off], v);
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            off += ostr[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            off -= ostr[ax] * idx[ax];
            idx[ax] = 0;
        }
    }
    out
}

/// Batched matmul `[batch.., m, k] × [batch.., k, n]` on contiguous inputs whose batch dims
/// broadcast to `out_batch`.
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
) -> Vec<f32> {
    let batches: usize = out_batch.iter().product();
    let mut c = vec![0f32; batches * m * n];
    if m == 0 || n == 0 || batches == 0 {
        return c;
    }
    let b_broadcast = b_batch.iter().all(|&d| d == 1);
    if b_broadcast && a_batch == out_batch {
        // One weight for every batch: fold the batch into rows and split rows across threads.
        let rows = batches * m;
        let chunk = (rows / (rayon::current_num_threads() * 4)).clamp(16, 256);
        c.par_chunks_mut(chunk * n).enumerate().for_each(|(i, cc)| {
            let r0 = i * chunk;
            let rr = cc.len() / n;
            gemm(&a[r0 * k..(r0 + rr) * k], b, cc, rr, k, n);
        });
        return c;
    }
    let sa = broadcast_strides(a_batch, out_batch);
    let sb = broadcast_strides(b_batch, out_batch);
    let ob = out_batch.to_vec();
    c.par_chunks_mut(m * n).enumerate().for_each(|(bi, cc)| {
        let (mut rem, mut oa, mut obb) = (bi, 0, 0);
        for ax in (0..ob.len()).rev() {
            let i = rem % ob[ax];
            rem /= ob[ax];
            oa += i * sa[ax];
            obb += i * sb[ax];
        }
        gemm(
            &a[oa * m * k..(oa + 1) * m * k],
            &b[obb * k * n..(obb + 1) * k * n],
            cc,
            m,
            k,
            n,
        );
    });
    c
}

/// `c = a × b` for contiguous row-major `a` [m, k], `b` [k, n], `c` [m, n].
pub fn gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    gemm_strided(a, (k, 1), b, (n, 1), c, m, k, n);
}

/// Asserts that `a` [m, k] and `b` [k, n] read through their (row, column) strides stay in
/// bounds and that `c` holds [m, n]: the precondition of both strided GEMMs (the reference
/// here and `cpu::gemm::gemm_strided`).
pub(crate) fn check_strided(
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &[f32],
    (m, k, n): (usize, usize, usize),
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(a.len() >= last(m, k, rsa, csa) && b.len() >= last(k, n, rsb, csb));
    assert!(c.len() >= m * n);
}

/// `c = a × b` for `a` [m, k] and `b` [k, n] read through (row, column) strides, into
/// contiguous row-major `c` [m, n]. Each element's arithmetic depends only on `k`, not on the
/// strides or on `m`, `n`: `a × bᵀ` with `b` read transposed equals `a × (bᵀ copied)` bit for bit.
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
) {
    check_strided(a, (rsa, csa), b, (rsb, csb), c, (m, k, n));
    if m == 0 || n == 0 {
        return;
    }
    // Plain loops: every element is `Σ_p a[i,p]·b[p,j]` summed from 0 in order of `p`, by
    // whichever loop order reads `b` contiguously; both orders round identically.
    for (i, row) in c[..m * n].chunks_mut(n).enumerate() {
        let ai = i * rsa;
        if csb == 1 {
            row.fill(0.0);
            for p in 0..k {
                let x = a[ai + p * csa];
                let bp = &b[p * rsb..p * rsb + n];
                for (o, &y) in row.iter_mut().zip(bp) {
                    *o += x * y;
                }
            }
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                let mut acc = 0f32;
                for p in 0..k {
                    acc += a[ai + p * csa] * b[p * rsb + j * csb];
                }
                *o = acc;
            }
        }
    }
}
