//! The kernel builder: a template's or generated kernel's [`Generated`] being bound into a
//! plan kernel. Each kernel parameter gets a buffer ([`BufId`]), each uniform an expression of
//! the dims; a view that is not the operand's own layout is read through a load remap
//! ([`Kb::remap`], [`rewrite::remap_loads`]); sizes that are constants become literals.
//! [`Kb::finish`] folds constant uniforms, drops unused parameters and names the kernel after
//! a hash of its code (equal code, equal name).

use std::collections::HashMap;

use transfuse_ir::NodeId;

use super::buffers::BufId;
use super::plan::{plan_err, UniformExpr};
use super::{rewrite, Poly, View};
use crate::kernels::Generated;
use crate::kir::*;
use crate::CodegenError;

/// A kernel being assembled: the generated kernel plus its bindings and uniform values.
pub(super) struct Kb {
    pub(super) gen: Generated,
    pub(super) binds: HashMap<String, BufId>,
    pub(super) uvals: HashMap<String, UniformExpr>,
    pub(super) nodes: Vec<NodeId>,
    pub(super) bytes: Poly,
    pub(super) flops: Poly,
}

impl Kb {
    pub(super) fn new(gen: Generated, nodes: Vec<NodeId>) -> Kb {
        Kb {
            gen,
            binds: HashMap::new(),
            uvals: HashMap::new(),
            nodes,
            bytes: Poly::zero(),
            flops: Poly::zero(),
        }
    }

    pub(super) fn bind(&mut self, param: &str, buf: BufId) {
        self.binds.insert(param.to_string(), buf);
    }

    /// Sets a template uniform.
    pub(super) fn set(&mut self, u: &str, p: Poly) {
        self.uvals.insert(u.to_string(), UniformExpr::Poly(p));
    }

    /// An expression for `p`: a literal when constant, else a new uniform `name`.
    pub(super) fn value(&mut self, name: String, p: &Poly) -> Expr {
        if let Some(c) = p.as_const().and_then(|c| u32::try_from(c).ok()) {
            return u(c);
        }
        if !self.gen.kernel.uniforms.contains(&name) {
            self.gen.kernel.uniforms.push(name.clone());
        }
        self.uvals
            .insert(name.clone(), UniformExpr::Poly(p.clone()));
        uni(&name)
    }

    /// The physical index of logical (row-major) index `L` of view `v`, as a function of `L`.
    pub(super) fn phys(&mut self, tag: &str, v: &View) -> impl Fn(Expr) -> Expr {
        let axes = v.merged_axes();
        let n = axes.len();
        let mut inner = vec![Poly::one(); n];
        for a in (0..n.saturating_sub(1)).rev() {
            inner[a] = inner[a + 1].mul(&axes[a + 1].0);
        }
        let mut terms: Vec<(Option<Expr>, Option<Expr>, Option<Expr>)> = vec![];
        for a in 0..n {
            let (size, stride) = &axes[a];
            if stride.is_zero() {
                continue;
            }
            let div = (!inner[a].is(1)).then(|| self.value(format!("{tag}_n{a}"), &inner[a]));
            let md = (a > 0).then(|| self.value(format!("{tag}_d{a}"), size));
            let st = (!stride.is(1)).then(|| self.value(format!("{tag}_s{a}"), stride));
            terms.push((div, md, st));
        }
        let off = (!v.offset.is_zero()).then(|| self.value(format!("{tag}_o"), &v.offset));
        move |l: Expr| {
            let mut acc: Option<Expr> = None;
            for (div, md, st) in &terms {
                let mut e = l.clone();
                if let Some(d) = div {
                    e = e / d.clone();
                }
                if let Some(m) = md {
                    e = e % m.clone();
                }
                if let Some(s) = st {
                    e = e * s.clone();
                }
                acc = Some(match acc {
                    None => e,
                    Some(a) => a + e,
                });
            }
            match (acc, &off) {
                (None, None) => u(0),
                (None, Some(o)) => o.clone(),
                (Some(a), None) => a,
                (Some(a), Some(o)) => a + o.clone(),
            }
        }
    }

    /// Makes the template read parameter `param` (written for a contiguous operand of
    /// `view.shape`) from `view`.
    pub(super) fn remap(&mut self, param: &str, view: &View) {
        self.bind(param, view.buf);
        if view.is_plain() {
            return;
        }
        let f = self.phys(&format!("v_{param}"), view);
        let p = param.to_string();
        rewrite::remap_loads(&mut self.gen.kernel, param, &|i| load(&p, f(i)));
    }

    /// A read-only buffer parameter the template did not have.
    pub(super) fn add_buffer(&mut self, param: &str, elem: Elem, buf: BufId) {
        self.gen.kernel.buffers.push(Buffer {
            name: param.to_string(),
            elem,
            access: Access::Read,
        });
        self.bind(param, buf);
    }

    /// Finishes the kernel: folds the uniforms whose value is a constant into literals, drops
    /// the parameters no longer read or written, names it `<base>_<hash of its code>`; returns
    /// the bindings and uniform expressions, in parameter and uniform order.
    pub(super) fn finish(
        &mut self,
        base: &str,
    ) -> Result<(Vec<BufId>, Vec<UniformExpr>), CodegenError> {
        let consts: Vec<(String, u32)> = self
            .gen
            .kernel
            .uniforms
            .iter()
            .filter_map(|u| match self.uvals.get(u) {
                Some(UniformExpr::Poly(p)) => p
                    .as_const()
                    .and_then(|c| u32::try_from(c).ok())
                    .map(|c| (u.clone(), c)),
                _ => None,
            })
            .collect();
        for (u, c) in consts {
            rewrite::fold_uniform(&mut self.gen, &u, c);
        }
        let used = rewrite::used_buffers(&self.gen.kernel);
        self.gen.kernel.buffers.retain(|b| used.contains(&b.name));
        let mut bindings = vec![];
        for b in &self.gen.kernel.buffers {
            bindings.push(
                self.binds.get(&b.name).copied().ok_or_else(|| {
                    plan_err(format!("{base}: parameter `{}` is not bound", b.name))
                })?,
            );
        }
        let mut uniforms = vec![];
        for u in &self.gen.kernel.uniforms {
            uniforms.push(
                self.uvals
                    .get(u)
                    .cloned()
                    .ok_or_else(|| plan_err(format!("{base}: uniform `{u}` has no value")))?,
            );
        }
        self.gen.kernel.name = String::new();
        let h = fnv(&format!("{:?}", self.gen.kernel));
        self.gen.kernel.name = format!("{base}_{h:08x}");
        Ok((bindings, uniforms))
    }
}

/// FNV-1a of `s`, folded to 32 bits: the kernel-name hash.
pub(super) fn fnv(s: &str) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h ^ (h >> 32)) as u32
}
