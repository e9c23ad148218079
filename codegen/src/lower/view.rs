//! Strided views of buffers: what reshape, permute, expand and slice become in a plan. A view
//! is a buffer, an element offset and one (size, stride) per axis, all polynomials in the
//! symbolic dims, so a view op never moves data; kernels read views through their stride
//! uniforms (clusters, reductions, concat) or a load remap (templates with contiguous operands).

use transfuse_ir::{Dim, Shape};

use super::buffers::BufId;
use super::poly::Poly;

/// A strided view of a buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    /// The plan buffer.
    pub buf: BufId,
    /// Logical shape.
    pub shape: Shape,
    /// Element stride per axis (0 along broadcast axes).
    pub strides: Vec<Poly>,
    /// Element offset of the first element.
    pub offset: Poly,
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[Dim]) -> Vec<Poly> {
    let mut st = vec![Poly::one(); shape.len()];
    let mut acc = Poly::one();
    for a in (0..shape.len()).rev() {
        st[a] = acc.clone();
        acc = acc.mul(&Poly::dim(&shape[a]));
    }
    st
}

impl View {
    /// The whole buffer `buf` of shape `shape`, row-major.
    pub fn contiguous(buf: BufId, shape: &[Dim]) -> View {
        View {
            buf,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: Poly::zero(),
        }
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of logical elements.
    pub fn len(&self) -> Poly {
        Poly::product(&self.shape)
    }

    /// Distinct elements read: the product of the sizes along axes with a nonzero stride.
    pub fn footprint(&self) -> Poly {
        let dims: Vec<Dim> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, s)| !s.is_zero() && !d.is(1))
            .map(|(d, _)| d.clone())
            .collect();
        Poly::product(&dims)
    }

    /// True when the view is row-major over its own shape (size-1 axes ignored), any offset.
    pub fn is_dense(&self) -> bool {
        let want = contiguous_strides(&self.shape);
        self.shape
            .iter()
            .zip(self.strides.iter().zip(&want))
            .all(|(d, (s, w))| d.is(1) || s == w)
    }

    /// Dense with offset 0: the buffer's own layout, no remapping needed.
    pub fn is_plain(&self) -> bool {
        self.is_dense() && self.offset.is_zero()
    }

    /// Output axis `i` is axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> View {
        View {
            buf: self.buf,
            shape: perm.iter().map(|&p| self.shape[p].clone()).collect(),
            strides: perm.iter().map(|&p| self.strides[p].clone()).collect(),
            offset: self.offset.clone(),
        }
    }

    /// Broadcast to `shape` (new leading axes and size-1 axes get stride 0); `None` if the
    /// shapes do not broadcast.
    pub fn expand(&self, shape: &[Dim]) -> Option<View> {
        let r = shape.len();
        if self.rank() > r {
            return None;
        }
        let lead = r - self.rank();
        let mut strides = vec![Poly::zero(); r];
        for a in 0..self.rank() {
            let (d, t) = (&self.shape[a], &shape[lead + a]);
            if d == t {
                strides[lead + a] = if d.is(1) {
                    Poly::zero()
                } else {
                    self.strides[a].clone()
                };
            } else if !d.is(1) {
                return None;
            }
        }
        Some(View {
            buf: self.buf,
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        })
    }

    /// Elements `start..end` along `axis`.
    pub fn slice(&self, axis: usize, start: &Dim, end: &Dim) -> View {
        let mut v = self.clone();
        v.offset = v.offset.add(&Poly::dim(start).mul(&self.strides[axis]));
        v.shape[axis] = end.minus(start);
        v
    }

    /// The same elements as `shape` (row-major order), when expressible with strides: axes are
    /// grouped into runs of equal size on both sides; an old run of more than one axis must be
    /// mergeable (each stride the next one times the next size). `None` otherwise.
    pub fn reshape(&self, shape: &[Dim]) -> Option<View> {
        // Size-1 axes carry no data: drop them on the old side, give them stride 0 on the new.
        let old: Vec<(Poly, Poly)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| !d.is(1))
            .map(|(d, s)| (Poly::dim(d), s.clone()))
            .collect();
        let new_idx: Vec<usize> = (0..shape.len()).filter(|&a| !shape[a].is(1)).collect();
        let mut strides = vec![Poly::zero(); shape.len()];
        let (mut i, mut j) = (0usize, 0usize);
        while i < old.len() || j < new_idx.len() {
            if i >= old.len() || j >= new_idx.len() {
                return None;
            }
            // One group: old[i..i2] and new[j..j2] of equal product.
            let (i0, j0) = (i, j);
            let mut po = old[i].0.clone();
            let mut pn = Poly::dim(&shape[new_idx[j]]);
            i += 1;
            j += 1;
            let mut guard = 0;
            while po != pn {
                guard += 1;
                if guard > 64 {
                    return None;
                }
                let advance_old = match (po.as_const(), pn.as_const()) {
                    (Some(a), Some(b)) => a < b,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => return None,
                };
                if advance_old {
                    if i >= old.len() {
                        return None;
                    }
                    po = po.mul(&old[i].0);
                    i += 1;
                } else {
                    if j >= new_idx.len() {
                        return None;
                    }
                    pn = pn.mul(&Poly::dim(&shape[new_idx[j]]));
                    j += 1;
                }
            }
            // The old run must be mergeable.
            for a in i0..i - 1 {
                if old[a].1 != old[a + 1].1.mul(&old[a + 1].0) {
                    return None;
                }
            }
            // New strides from the innermost old stride outwards.
            let mut st = old[i - 1].1.clone();
            for b in (j0..j).rev() {
                let ax = new_idx[b];
                strides[ax] = st.clone();
                st = st.mul(&Poly::dim(&shape[ax]));
            }
        }
        Some(View {
            buf: self.buf,
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        })
    }

    /// Axes after dropping size-1 axes and merging runs that are contiguous in memory
    /// (`stride[a] = stride[a+1]·size[a+1]`): `(size, stride)` pairs, outermost first. Logical
    /// linear index `L` is at `offset + Σ ((L / inner_a) % size_a)·stride_a`.
    pub fn merged_axes(&self) -> Vec<(Poly, Poly)> {
        let mut out: Vec<(Poly, Poly)> = vec![];
        for (d, s) in self.shape.iter().zip(&self.strides) {
            if d.is(1) {
                continue;
            }
            let d = Poly::dim(d);
            if let Some((pd, ps)) = out.last_mut() {
                if *ps == s.mul(&d) {
                    *pd = pd.mul(&d);
                    *ps = s.clone();
                    continue;
                }
            }
            out.push((d, s.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transfuse_ir::shape;

    fn dims(v: &[&str]) -> Shape {
        v.iter()
            .map(|s| match s.parse::<usize>() {
                Ok(n) => Dim::known(n),
                Err(_) => Dim::sym(s),
            })
            .collect()
    }

    #[test]
    fn split_heads_of_a_qkv_slice_is_a_strided_view() {
        let qkv = View::contiguous(BufId(0), &dims(&["batch", "seq", "192"]));
        let k = qkv
            .slice(2, &Dim::known(64), &Dim::known(128))
            .reshape(&dims(&["batch", "seq", "4", "16"]))
            .unwrap()
            .permute(&[0, 2, 1, 3]);
        let st: Vec<String> = k.strides.iter().map(|s| s.to_string()).collect();
        assert_eq!(st, ["192*seq", "16", "192", "1"]);
        assert_eq!(k.offset.to_string(), "64");
        assert!(!k.is_dense());
        // Merging heads back is dense again.
        let o = View::contiguous(BufId(1), &dims(&["batch", "4", "seq", "16"]));
        let m = o.permute(&[0, 2, 1, 3]);
        assert!(m.reshape(&dims(&["batch", "seq", "64"])).is_none());
        let r = o.reshape(&dims(&["batch", "64", "seq"])).is_none();
        assert!(r, "seq is symbolic, 4·seq cannot regroup as 64·seq");
        let mask = View::contiguous(BufId(2), &dims(&["batch", "seq"]));
        let m4 = mask.reshape(&dims(&["batch", "1", "1", "seq"])).unwrap();
        assert!(m4.is_plain());
        let e = m4.expand(&dims(&["batch", "4", "seq", "seq"])).unwrap();
        let st: Vec<String> = e.strides.iter().map(|s| s.to_string()).collect();
        assert_eq!(st, ["seq", "0", "0", "1"]);
        assert_eq!(e.footprint().to_string(), "batch*seq");
        let w = View::contiguous(BufId(3), &shape([3usize, 4]));
        assert!(w.permute(&[1, 0]).permute(&[1, 0]).is_plain());
        assert_eq!(m4.merged_axes().len(), 1);
    }
}
