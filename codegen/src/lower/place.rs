//! Concat placement: a concatenation whose parts are views of a matmul's output and ready
//! tensors (GPT-2's `present = concat(past, new K/V)`) costs no launch of its own.
//!
//! - Each part that is a slice/reshape/permute chain of the output `X` of an already emitted
//!   matmul kernel `K` is *placed*: every store of `K`'s epilogue also stores the value at its
//!   position in the concatenation (the element's coordinates in `X`, mapped forward through the
//!   chain, shifted along the concat axis). `X` is still written whole, for its other readers.
//! - Each other part must be ready before `K` runs (an input, a weight, or an earlier kernel's
//!   output); it is *copied* by extra workgroups of `K`: the grid gains one z-slice per copied
//!   part, and the workgroups of that slice copy it with a grid-stride loop while the others
//!   run the matmul unchanged (the branch depends only on the workgroup id, so barriers stay in
//!   uniform control flow).
//!
//! Refused (the concat gets its own kernel) when no part comes from a matmul, another part is
//! not ready, the concat is not f32 or weight-only, or the WebGPU limit of 8 storage buffers
//! per kernel would be exceeded.

use transfuse_ir::{DType, Dim, NodeId, Op};

use super::buffers::BufId;
use super::partition::{Lower, Val};
use super::{BufferKind, Poly, Target, UniformExpr, View};
use crate::kernels::{Factor, Generated, GridDim};
use crate::kir::*;

/// What placement needs to know of an emitted matmul kernel.
pub(super) struct MatMulInfo {
    /// The node whose output the kernel stores (`out`, contiguous).
    pub node: NodeId,
    /// Batch workgroups along z (`batch0·batch1`).
    pub batch: Poly,
    /// Name stem (the kernel is renamed `<base>_<hash>` after each change).
    pub base: String,
    /// Name stem of its decode (GEMV) variant, if it has one.
    pub decode_base: String,
    /// Copy jobs (extra z-slices) added so far.
    pub jobs: usize,
}

/// Statements being assembled, with literals or uniforms of one kernel for the sizes.
struct Patch<'k> {
    gen: &'k mut Generated,
    uniforms: &'k mut Vec<UniformExpr>,
    tag: String,
    n: usize,
    stmts: Vec<Stmt>,
}

impl Patch<'_> {
    fn value(&mut self, p: &Poly) -> Expr {
        if let Some(c) = p.as_const().and_then(|c| u32::try_from(c).ok()) {
            return u(c);
        }
        if let Some(i) = self
            .uniforms
            .iter()
            .position(|u| *u == UniformExpr::Poly(p.clone()))
        {
            return uni(&self.gen.kernel.uniforms[i]);
        }
        let name = format!("{}_u{}", self.tag, self.gen.kernel.uniforms.len());
        self.gen.kernel.uniforms.push(name.clone());
        self.uniforms.push(UniformExpr::Poly(p.clone()));
        uni(&name)
    }

    fn bind(&mut self, e: Expr) -> Expr {
        if matches!(e, Expr::Var(_) | Expr::U32(_) | Expr::Uniform(_)) {
            return e;
        }
        let name = format!("{}_{}", self.tag, self.n);
        self.n += 1;
        self.stmts.push(let_(&name, Elem::U32, e));
        var(&name)
    }

    /// Row-major coordinates of linear index `l` in `shape`.
    fn delinearize(&mut self, l: Expr, shape: &[Dim]) -> Vec<Expr> {
        let l = self.bind(l);
        let r = shape.len();
        let mut inner = vec![Poly::one(); r];
        for a in (0..r.saturating_sub(1)).rev() {
            inner[a] = inner[a + 1].mul(&Poly::dim(&shape[a + 1]));
        }
        (0..r)
            .map(|a| {
                let mut e = l.clone();
                if !inner[a].is(1) {
                    e = e / self.value(&inner[a]);
                }
                if a > 0 {
                    e = e % self.value(&Poly::dim(&shape[a]));
                }
                self.bind(e)
            })
            .collect()
    }

    /// Row-major linear index of `coords` in `shape`.
    fn linearize(&mut self, coords: &[Expr], shape: &[Dim]) -> Expr {
        let mut acc: Option<Expr> = None;
        let mut inner = Poly::one();
        for a in (0..shape.len()).rev() {
            let t = if inner.is(1) {
                coords[a].clone()
            } else {
                coords[a].clone() * self.value(&inner)
            };
            acc = Some(match acc {
                None => t,
                Some(x) => t + x,
            });
            inner = inner.mul(&Poly::dim(&shape[a]));
        }
        let e = acc.unwrap_or(u(0));
        self.bind(e)
    }
}

/// One placement, applied to a matmul kernel and to its decode variant alike.
struct Site<'s> {
    g: &'s transfuse_ir::Graph,
    axis: usize,
    /// The concat's parts.
    inputs: &'s [NodeId],
    /// The concat's shape.
    shape: &'s [Dim],
    /// The matmul output's shape.
    xshape: &'s [Dim],
    placed: &'s [(usize, Vec<NodeId>)],
    copied: &'s [(usize, View)],
    /// Start of each part along `axis`.
    begs: &'s [Poly],
    /// The concat's buffer.
    dst_buf: BufId,
    /// The concat as a strided view of `dst_buf` (a cache written in place), else dense.
    dst: Option<&'s View>,
    elem: Elem,
    batch: &'s Poly,
    jobs0: usize,
}

impl Site<'_> {
    /// Rewrites one kernel (its code, grid, bindings and uniforms) and renames it
    /// `<base>_<hash>`; returns the bytes the placement adds.
    fn rewrite(
        &self,
        gen: &mut Generated,
        bindings: &mut Vec<BufId>,
        uniforms: &mut Vec<UniformExpr>,
        base: &str,
    ) -> Poly {
        let elem = self.elem;
        let eb = i64::from(elem_bytes(elem));
        let slot = gen.kernel.buffers.len();
        let dst = format!("place{slot}");
        gen.kernel.buffers.push(Buffer {
            name: dst.clone(),
            elem,
            access: Access::ReadWrite,
        });
        bindings.push(self.dst_buf);
        let mut patch = Patch {
            gen,
            uniforms,
            tag: format!("tf_pl{slot}"),
            n: 0,
            stmts: vec![],
        };
        // The placement: from the stored element's index in X to its index in the concat.
        let mut mapping = vec![];
        let mut bytes = Poly::zero();
        for (p, chain) in self.placed {
            patch.stmts.clear();
            let mut cur_shape = self.xshape.to_vec();
            let mut coords = patch.delinearize(var("tf_po"), &cur_shape);
            let mut cond: Option<Expr> = None;
            for &c in chain {
                let node = self.g.node(c);
                match &node.op {
                    Op::Slice {
                        axis: a,
                        start,
                        end,
                    } => {
                        let (s, e) = (Poly::dim(start), Poly::dim(end));
                        let mut cnd = coords[*a].clone().lt(patch.value(&e));
                        if !s.is_zero() {
                            cnd = coords[*a].clone().ge(patch.value(&s)).and(cnd);
                            let sv = patch.value(&s);
                            coords[*a] = patch.bind(coords[*a].clone() - sv);
                        }
                        cond = Some(match cond {
                            None => cnd,
                            Some(x) => x.and(cnd),
                        });
                    }
                    Op::Reshape { shape: to } => {
                        let l = patch.linearize(&coords, &cur_shape);
                        coords = patch.delinearize(l, to);
                    }
                    Op::Permute { perm } => {
                        coords = perm.iter().map(|&q| coords[q].clone()).collect();
                    }
                    _ => unreachable!("chains hold views only"),
                }
                cur_shape = node.shape.clone();
            }
            if !self.begs[*p].is_zero() {
                let bv = patch.value(&self.begs[*p]);
                coords[self.axis] = patch.bind(coords[self.axis].clone() + bv);
            }
            let di = match self.dst {
                Some(v) => {
                    let mut di = patch.value(&v.offset);
                    for (a, st) in v.strides.iter().enumerate() {
                        if !st.is_zero() {
                            let sv = patch.value(st);
                            di = di + coords[a].clone() * sv;
                        }
                    }
                    patch.bind(di)
                }
                None => patch.linearize(&coords, self.shape),
            };
            let st = store(&dst, di, var("tf_pv"));
            let mut block = std::mem::take(&mut patch.stmts);
            block.push(match cond {
                Some(c) => if_(c, vec![st]),
                None => st,
            });
            mapping.push(Stmt::If(Expr::Bool(true), block, vec![]));
            bytes = bytes.add(&Poly::product(&self.g.node(self.inputs[*p]).shape).scale(eb));
        }
        // Copy jobs: one z-slice each.
        let threads = patch.gen.kernel.threads();
        let mut wraps: Vec<(Expr, Vec<Stmt>)> = vec![];
        let mut z = self.batch.add(&Poly::konst(self.jobs0 as i64));
        for (j, (p, v)) in self.copied.iter().enumerate() {
            let src = format!("psrc{slot}_{j}");
            patch.gen.kernel.buffers.push(Buffer {
                name: src.clone(),
                elem,
                access: Access::Read,
            });
            bindings.push(v.buf);
            patch.stmts.clear();
            let pshape = self.g.node(self.inputs[*p]).shape.clone();
            let total = patch.value(&Poly::product(&pshape));
            let e = format!("tf_pe{slot}_{j}");
            let mut coords = patch.delinearize(var(&e), &pshape);
            let mut si = patch.value(&v.offset);
            for (a, st) in v.strides.iter().enumerate() {
                if !st.is_zero() {
                    si = si + coords[a].clone() * patch.value(st);
                }
            }
            if !self.begs[*p].is_zero() {
                coords[self.axis] = coords[self.axis].clone() + patch.value(&self.begs[*p]);
            }
            let di = patch.linearize(&coords, self.shape);
            let mut body = std::mem::take(&mut patch.stmts);
            body.push(store(&dst, di, load(&src, si)));
            let zb = patch.value(&z);
            wraps.push((
                zb,
                vec![
                    let_(
                        "tf_cw",
                        Elem::U32,
                        workgroup_id(1) * num_workgroups(0) + workgroup_id(0),
                    ),
                    for_step(
                        &e,
                        var("tf_cw") * u(threads) + local_id(0),
                        total,
                        num_workgroups(0) * num_workgroups(1) * u(threads),
                        body,
                    ),
                ],
            ));
            bytes = bytes.add(&Poly::product(&pshape).scale(2 * eb));
            z = z.add(&Poly::one());
        }
        let k = &mut patch.gen.kernel;
        let body = std::mem::take(&mut k.body);
        // Each store of `out` also stores into the concat; a store an earlier placement
        // already rewrote (index and value in locals) just gains this mapping.
        let (pv_name, po_name) = (format!("tf_pv{slot}"), format!("tf_po{slot}"));
        let mut body = super::rewrite::expand_stores(body, "out", &mut |i, val| {
            let (pre, po, pv) = match (&i, &val) {
                (Expr::Var(a), Expr::Var(b)) => (vec![], a.clone(), b.clone()),
                _ => (
                    vec![let_(&pv_name, elem, val), let_(&po_name, Elem::U32, i)],
                    po_name.clone(),
                    pv_name.clone(),
                ),
            };
            let fresh = !pre.is_empty();
            let mut s = pre;
            s.push(store("out", var(&po), var(&pv)));
            s.extend(super::rewrite::map_exprs(
                mapping.clone(),
                &mut |e| match e {
                    Expr::Var(ref n) if n == "tf_po" => var(&po),
                    Expr::Var(ref n) if n == "tf_pv" => var(&pv),
                    e => e,
                },
            ));
            if fresh {
                vec![Stmt::If(Expr::Bool(true), s, vec![])]
            } else {
                s
            }
        });
        for (zb, job) in wraps {
            body = vec![Stmt::If(workgroup_id(2).lt(zb), body, job)];
        }
        k.body = body;
        let jobs = self.jobs0 + self.copied.len();
        if !self.copied.is_empty() {
            let gz = self.batch.add(&Poly::konst(jobs as i64));
            patch.gen.grid[2] = match gz.as_const().and_then(|c| u32::try_from(c).ok()) {
                Some(c) => GridDim {
                    factors: vec![Factor::Const(c)],
                    per_group: 1,
                },
                None => {
                    let e = patch.value(&gz);
                    let Expr::Uniform(name) = e else {
                        unreachable!("symbolic")
                    };
                    GridDim::of(&name, 1)
                }
            };
        }
        let k = &mut patch.gen.kernel;
        k.name = String::new();
        let h = super::kernel::fnv(&format!("{k:?}"));
        k.name = format!("{base}_{h:08x}");
        bytes
    }
}

impl Lower<'_> {
    /// The matmul kernel whose output `part` is a slice/reshape/permute chain of, and the
    /// chain (from the matmul's output node outwards).
    fn chain_to_matmul(&self, part: NodeId) -> Option<(usize, Vec<NodeId>)> {
        let g = self.g;
        let mut chain = vec![];
        let mut cur = part;
        loop {
            if let Some((&k, _)) = self.matmuls.iter().find(|(_, m)| m.node == cur) {
                chain.reverse();
                return Some((k, chain));
            }
            match g.node(cur).op {
                Op::Slice { .. } | Op::Reshape { .. } | Op::Permute { .. } => {
                    chain.push(cur);
                    cur = g.node(cur).inputs[0];
                }
                _ => return None,
            }
        }
    }

    fn ready_before(&self, buf: BufId, k: usize) -> bool {
        match self.buffers.get(buf).kind {
            BufferKind::Input | BufferKind::Weight | BufferKind::Derived => true,
            BufferKind::Const(_) => true,
            _ => self.producer.get(&buf).is_some_and(|&p| p < k),
        }
    }

    /// Places concat `id` into a matmul kernel (see the module docs); false if it cannot.
    /// With `in_place` (a cache: the concat as a view of the cache buffer, whose first part
    /// is already there), only the other parts are written, through that view's strides.
    pub(super) fn place_concat(
        &mut self,
        id: NodeId,
        axis: usize,
        in_place: Option<&View>,
    ) -> Result<bool, crate::CodegenError> {
        let g = self.g;
        let n = g.node(id);
        if n.dtype != DType::F32 || self.weight_only[id.index()] {
            return Ok(false);
        }
        let mut ki: Option<usize> = None;
        let mut placed: Vec<(usize, Vec<NodeId>)> = vec![];
        let mut copied: Vec<(usize, View)> = vec![];
        for (p, &part) in n.inputs.iter().enumerate() {
            if p == 0 && in_place.is_some() {
                continue;
            }
            if let Some((k, chain)) = self.chain_to_matmul(part) {
                if ki.is_none() || ki == Some(k) {
                    ki = Some(k);
                    placed.push((p, chain));
                    continue;
                }
            }
            match self.try_view(part) {
                Some(v) => copied.push((p, v)),
                None => return Ok(false),
            }
        }
        let Some(ki) = ki else {
            return Ok(false);
        };
        if copied.iter().any(|(_, v)| !self.ready_before(v.buf, ki)) {
            return Ok(false);
        }
        // The main kernel and its decode variant (if any) are rewritten alike.
        let pk = &self.kernels[ki];
        for gen in std::iter::once(&pk.gen).chain(pk.decode.as_deref().map(|v| &v.gen)) {
            let k = &gen.kernel;
            if k.workgroup[1] != 1 || k.workgroup[2] != 1 {
                return Ok(false);
            }
            let after = k.buffers.len() + 1 + copied.len();
            if self.o.target == Target::Wgsl && after > 8 {
                return Ok(false);
            }
        }
        let shape = n.shape.clone();
        let elem = self.elem_of(DType::F32);
        let begs: Vec<Poly> = n
            .inputs
            .iter()
            .scan(Poly::zero(), |acc, i| {
                let b = acc.clone();
                *acc = acc.add(&Poly::dim(&g.node(*i).shape[axis]));
                Some(b)
            })
            .collect();
        let out = match in_place {
            Some(v) => v.clone(),
            None => self.out_buffer(id),
        };
        let info = self.matmuls.get(&ki).expect("a matmul kernel");
        let (x, batch, jobs0) = (info.node, info.batch.clone(), info.jobs);
        let (base, decode_base) = (info.base.clone(), info.decode_base.clone());
        let site = Site {
            g,
            axis,
            inputs: &n.inputs,
            shape: &shape,
            xshape: &g.node(x).shape,
            placed: &placed,
            copied: &copied,
            begs: &begs,
            dst_buf: out.buf,
            dst: in_place,
            elem,
            batch: &batch,
            jobs0,
        };
        let kernel = &mut self.kernels[ki];
        let bytes = site.rewrite(
            &mut kernel.gen,
            &mut kernel.buffer_ids,
            &mut kernel.uniforms,
            &base,
        );
        if let Some(v) = kernel.decode.as_deref_mut() {
            site.rewrite(&mut v.gen, &mut v.buffer_ids, &mut v.uniforms, &decode_base);
        }
        let jobs = jobs0 + copied.len();
        kernel.nodes.push(id);
        kernel.ops.push("concat".into());
        kernel.bytes = kernel.bytes.add(&bytes);
        self.matmuls.get_mut(&ki).expect("matmul").jobs = jobs;
        self.producer.insert(out.buf, ki);
        self.vals[id.index()] = Some(Val::View(out));
        self.done[id.index()] = true;
        Ok(true)
    }
}
