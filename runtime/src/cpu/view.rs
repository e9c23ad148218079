//! Views of the fast mode: `permute`, `slice`, `expand` and (where strides allow) `reshape`
//! produce a [`Val::View`] — the operand's buffer read at an offset through per-axis strides —
//! instead of a copy. Consumers that read strides (matmul and the fused matmul's operands,
//! bias and residual; elementwise binaries) take the view as it is; every other consumer gets
//! the view copied out once ([`Val::tensor`]), so a chain of views costs at most one copy.
//! The reference mode never makes views.

use std::sync::Arc;

use transfuse_ir::{Data, Tensor};

use super::arena;
use super::kernels::{for_rows, row_offset, strides as contiguous};

/// A value flowing between the fast mode's nodes.
#[derive(Clone, Debug)]
pub enum Val {
    /// A dense row-major tensor.
    Dense(Arc<Tensor>),
    /// A strided view of a dense tensor.
    View(View),
}

/// `base`'s elements read as `shape` at `offset` with per-axis `strides` (0 on broadcast axes).
#[derive(Clone, Debug)]
pub struct View {
    /// The tensor whose buffer is read.
    pub base: Arc<Tensor>,
    /// Where element `[0, .., 0]` sits in the buffer.
    pub offset: usize,
    /// The view's shape.
    pub shape: Vec<usize>,
    /// Elements between neighbours along each axis (0 on broadcast axes).
    pub strides: Vec<usize>,
}

impl Val {
    /// The shape of the value.
    pub fn shape(&self) -> &[usize] {
        match self {
            Val::Dense(t) => &t.shape,
            Val::View(v) => &v.shape,
        }
    }

    /// The tensor whose buffer the value reads.
    pub fn base(&self) -> &Arc<Tensor> {
        match self {
            Val::Dense(t) => t,
            Val::View(v) => &v.base,
        }
    }

    /// The value as (buffer owner, offset, strides).
    pub fn parts(&self) -> (&Arc<Tensor>, usize, Vec<usize>) {
        match self {
            Val::Dense(t) => (t, 0, contiguous(&t.shape)),
            Val::View(v) => (&v.base, v.offset, v.strides.clone()),
        }
    }

    fn view(&self) -> View {
        match self {
            Val::Dense(t) => View {
                base: t.clone(),
                offset: 0,
                shape: t.shape.clone(),
                strides: contiguous(&t.shape),
            },
            Val::View(v) => v.clone(),
        }
    }

    /// Axes reordered: output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Val {
        let v = self.view();
        Val::View(View {
            shape: perm.iter().map(|&p| v.shape[p]).collect(),
            strides: perm.iter().map(|&p| v.strides[p]).collect(),
            ..v
        })
    }

    /// `len` elements of `axis` from `start` (bounds checked by the caller).
    pub fn slice(&self, axis: usize, start: usize, len: usize) -> Val {
        let mut v = self.view();
        if len > 0 {
            v.offset += start * v.strides[axis];
        }
        v.shape[axis] = len;
        Val::View(v)
    }

    /// Broadcast to `out` (numpy rules: size-1 and missing leading axes repeat).
    pub fn expand(&self, out: &[usize]) -> Val {
        let v = self.view();
        let lead = out.len() - v.shape.len();
        let strides = (0..out.len())
            .map(|i| {
                if i < lead || (v.shape[i - lead] == 1 && out[i] != 1) {
                    0
                } else {
                    v.strides[i - lead]
                }
            })
            .collect();
        Val::View(View {
            shape: out.to_vec(),
            strides,
            ..v
        })
    }

    /// The same elements as `out`: a view when the strides allow it, else `None` (the caller
    /// copies). A dense operand always reshapes in place.
    pub fn reshape(&self, out: &[usize]) -> Option<Val> {
        let v = self.view();
        let strides = reshape_strides(&v.shape, &v.strides, out)?;
        Some(Val::View(View {
            shape: out.to_vec(),
            strides,
            ..v
        }))
    }

    /// The value as a dense tensor: the buffer itself when the view covers it in order (taken
    /// without a copy when nothing else holds it), else one strided copy.
    pub fn tensor(self) -> Arc<Tensor> {
        let v = match self {
            Val::Dense(t) => return t,
            Val::View(v) => v,
        };
        let n: usize = v.shape.iter().product();
        if v.offset == 0 && n == v.base.len() && is_contiguous(&v.shape, &v.strides) {
            let data = Arc::try_unwrap(v.base).map_or_else(|b| b.data.clone(), |t| t.data);
            return Arc::new(Tensor {
                shape: v.shape,
                data,
            });
        }
        let data = match &v.base.data {
            Data::F32(d) => {
                let mut dst = arena::buffer(n);
                copy_into(d, v.offset, &v.strides, &v.shape, &mut dst);
                Data::F32(dst)
            }
            Data::I64(d) => {
                let mut dst = vec![0i64; n];
                copy_into(d, v.offset, &v.strides, &v.shape, &mut dst);
                Data::I64(dst)
            }
            Data::Bool(d) => {
                let mut dst = vec![false; n];
                copy_into(d, v.offset, &v.strides, &v.shape, &mut dst);
                Data::Bool(dst)
            }
            // Host f16/bf16 tensors are widened before they run here; a view of one is
            // copied in its own type all the same.
            Data::F16(d) => {
                let mut dst = vec![half::f16::ZERO; n];
                copy_into(d, v.offset, &v.strides, &v.shape, &mut dst);
                Data::F16(dst)
            }
            Data::BF16(d) => {
                let mut dst = vec![half::bf16::ZERO; n];
                copy_into(d, v.offset, &v.strides, &v.shape, &mut dst);
                Data::BF16(dst)
            }
        };
        // The view was perhaps its buffer's last holder.
        Val::Dense(v.base).recycle();
        Arc::new(Tensor {
            shape: v.shape,
            data,
        })
    }

    /// Hands the value's buffer to the arena when this was the last holder.
    pub fn recycle(self) {
        let base = match self {
            Val::Dense(t) => t,
            Val::View(v) => v.base,
        };
        if let Ok(Tensor {
            data: Data::F32(d), ..
        }) = Arc::try_unwrap(base)
        {
            arena::give(d);
        }
    }
}

/// Whether `strides` are the contiguous row-major strides of `shape` (size-1 axes ignored).
pub fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 && strides[i] != acc {
            return false;
        }
        acc *= shape[i];
    }
    true
}

/// Strides that read a view of `shape`/`strides` as `out` (same element count) without
/// moving elements, or `None` when some merged group of axes is not evenly strided. Axes
/// are matched in runs: each run of input axes that is contiguous with respect to its own
/// innermost stride is split over output axes of the same product.
pub fn reshape_strides(shape: &[usize], strides: &[usize], out: &[usize]) -> Option<Vec<usize>> {
    let n: usize = shape.iter().product();
    if n != out.iter().product::<usize>() {
        return None;
    }
    if n == 0 || shape.is_empty() {
        return Some(contiguous(out));
    }
    let mut new = vec![0usize; out.len()];
    let mut vd = out.len() as isize - 1;
    let mut base_stride = strides[shape.len() - 1];
    let (mut tn, mut vn) = (1usize, 1usize);
    for td in (0..shape.len()).rev() {
        tn *= shape[td];
        let run_ends = td == 0 || (shape[td - 1] != 1 && strides[td - 1] != tn * base_stride);
        if run_ends {
            while vd >= 0 && (vn < tn || out[vd as usize] == 1) {
                new[vd as usize] = vn * base_stride;
                vn *= out[vd as usize];
                vd -= 1;
            }
            if vn != tn {
                return None;
            }
            if td > 0 {
                base_stride = strides[td - 1];
                tn = 1;
                vn = 1;
            }
        }
    }
    (vd == -1).then_some(new)
}

/// Copies `src` read as `out` at `offset` through `strides` into contiguous `dst`.
pub fn copy_into<T: Copy + Send + Sync>(
    src: &[T],
    offset: usize,
    strides: &[usize],
    out: &[usize],
    dst: &mut [T],
) {
    if out.is_empty() {
        if !dst.is_empty() {
            dst[0] = src[offset];
        }
        return;
    }
    let inner = out[out.len() - 1];
    let st = strides[strides.len() - 1];
    for_rows(dst, inner, |r, row| {
        let base = offset + row_offset(r, out, strides);
        if st == 1 {
            row.copy_from_slice(&src[base..base + inner]);
        } else {
            for (j, v) in row.iter_mut().enumerate() {
                *v = src[base + j * st];
            }
        }
    });
}

/// The strides of a value of `shape`/`strides` read broadcast to `out`.
pub fn broadcast_to(shape: &[usize], strides: &[usize], out: &[usize]) -> Vec<usize> {
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < lead || shape[i - lead] == 1 {
                0
            } else {
                strides[i - lead]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_strides_split_merge_and_refuse() {
        // Contiguous: any reshape.
        assert_eq!(
            reshape_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]),
            Some(vec![4, 1])
        );
        // A permuted [3, 2] read of a [2, 3] buffer cannot merge into 6.
        assert_eq!(reshape_strides(&[3, 2], &[1, 3], &[6]), None);
        // A sliced last axis (row stride 12, 4 of 12 columns) splits its columns.
        assert_eq!(
            reshape_strides(&[5, 4], &[12, 1], &[5, 2, 2]),
            Some(vec![12, 2, 1])
        );
        // Size-1 axes are free.
        assert_eq!(
            reshape_strides(&[3, 1, 2], &[2, 99, 1], &[1, 3, 2, 1]),
            Some(vec![6, 2, 1, 1])
        );
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
    }
}
