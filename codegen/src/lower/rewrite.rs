//! Rewrites of generated kernels, so a template written for contiguous operands reads views,
//! gathers or computed values, and sizes known when the plan is made become literals.
//!
//! - [`remap_loads`]: every `buf[i]` becomes `f(i)` (any expression: a strided index, a table
//!   row picked by an id, a computed value). In plain statements the index is first bound to a
//!   fresh `let`, so a long remap does not repeat it.
//! - [`fold_uniform`]: a uniform whose value is a constant becomes a literal (and leaves the
//!   kernel's uniforms and its grid).
//! - [`rename_buffer`], [`used_buffers`]: parameter bookkeeping.

use std::collections::HashSet;

use crate::kernels::{Factor, Generated};
use crate::kir::*;

/// Rebuilds `e` bottom-up, applying `f` to every node after its children.
pub fn fold_expr(e: Expr, f: &mut dyn FnMut(Expr) -> Expr) -> Expr {
    let e = match e {
        Expr::Load(b, i) => Expr::Load(b, Box::new(fold_expr(*i, f))),
        Expr::LoadShared(b, i) => Expr::LoadShared(b, Box::new(fold_expr(*i, f))),
        Expr::LoadLocal(b, i) => Expr::LoadLocal(b, Box::new(fold_expr(*i, f))),
        Expr::Bin(op, a, b) => {
            Expr::Bin(op, Box::new(fold_expr(*a, f)), Box::new(fold_expr(*b, f)))
        }
        Expr::Un(op, a) => Expr::Un(op, Box::new(fold_expr(*a, f))),
        Expr::Select(c, a, b) => Expr::Select(
            Box::new(fold_expr(*c, f)),
            Box::new(fold_expr(*a, f)),
            Box::new(fold_expr(*b, f)),
        ),
        Expr::Cast(t, a) => Expr::Cast(t, Box::new(fold_expr(*a, f))),
        Expr::Subgroup(op, a) => Expr::Subgroup(op, Box::new(fold_expr(*a, f))),
        leaf => leaf,
    };
    f(e)
}

/// Applies `f` (bottom-up) to every expression of `body`.
pub fn map_exprs(body: Vec<Stmt>, f: &mut dyn FnMut(Expr) -> Expr) -> Vec<Stmt> {
    body.into_iter()
        .map(|s| match s {
            Stmt::Let(n, t, e) => Stmt::Let(n, t, fold_expr(e, f)),
            Stmt::Var(n, t, e) => Stmt::Var(n, t, fold_expr(e, f)),
            Stmt::Assign(n, e) => Stmt::Assign(n, fold_expr(e, f)),
            Stmt::StoreLocal(a, i, v) => Stmt::StoreLocal(a, fold_expr(i, f), fold_expr(v, f)),
            Stmt::Store(a, i, v) => Stmt::Store(a, fold_expr(i, f), fold_expr(v, f)),
            Stmt::StoreShared(a, i, v) => Stmt::StoreShared(a, fold_expr(i, f), fold_expr(v, f)),
            Stmt::If(c, a, b) => Stmt::If(fold_expr(c, f), map_exprs(a, f), map_exprs(b, f)),
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => Stmt::For {
                var,
                start: fold_expr(start, f),
                end: fold_expr(end, f),
                step: fold_expr(step, f),
                body: map_exprs(body, f),
            },
            s @ (Stmt::LocalArray(..) | Stmt::Barrier) => s,
        })
        .collect()
}

struct Remapper<'a> {
    buf: &'a str,
    f: &'a dyn Fn(Expr) -> Expr,
    tag: String,
    n: usize,
}

impl Remapper<'_> {
    /// Rewrites loads of `buf` in `e`; with `hoist`, each index is bound to a `let` in `pre`.
    fn expr(&mut self, e: Expr, pre: &mut Option<&mut Vec<Stmt>>) -> Expr {
        match e {
            Expr::Load(b, i) if b == self.buf => {
                let i = self.expr(*i, pre);
                let idx = match pre {
                    Some(p) if !matches!(i, Expr::Var(_) | Expr::U32(_)) => {
                        let name = format!("{}{}", self.tag, self.n);
                        self.n += 1;
                        p.push(let_(&name, Elem::U32, i));
                        var(&name)
                    }
                    _ => i,
                };
                (self.f)(idx)
            }
            Expr::Load(b, i) => Expr::Load(b, Box::new(self.expr(*i, pre))),
            Expr::LoadShared(b, i) => Expr::LoadShared(b, Box::new(self.expr(*i, pre))),
            Expr::LoadLocal(b, i) => Expr::LoadLocal(b, Box::new(self.expr(*i, pre))),
            Expr::Bin(op, a, b) => {
                let a = self.expr(*a, pre);
                let b = self.expr(*b, pre);
                Expr::Bin(op, Box::new(a), Box::new(b))
            }
            Expr::Un(op, a) => Expr::Un(op, Box::new(self.expr(*a, pre))),
            Expr::Select(c, a, b) => {
                let c = self.expr(*c, pre);
                let a = self.expr(*a, pre);
                let b = self.expr(*b, pre);
                Expr::Select(Box::new(c), Box::new(a), Box::new(b))
            }
            Expr::Cast(t, a) => Expr::Cast(t, Box::new(self.expr(*a, pre))),
            Expr::Subgroup(op, a) => Expr::Subgroup(op, Box::new(self.expr(*a, pre))),
            leaf => leaf,
        }
    }

    fn stmts(&mut self, body: Vec<Stmt>) -> Vec<Stmt> {
        let mut out = Vec::with_capacity(body.len());
        for s in body {
            let mut pre = vec![];
            let s = {
                let mut h = Some(&mut pre);
                match s {
                    Stmt::Let(n, t, e) => Stmt::Let(n, t, self.expr(e, &mut h)),
                    Stmt::Var(n, t, e) => Stmt::Var(n, t, self.expr(e, &mut h)),
                    Stmt::Assign(n, e) => Stmt::Assign(n, self.expr(e, &mut h)),
                    Stmt::StoreLocal(a, i, v) => {
                        let i = self.expr(i, &mut h);
                        Stmt::StoreLocal(a, i, self.expr(v, &mut h))
                    }
                    Stmt::Store(a, i, v) => {
                        let i = self.expr(i, &mut h);
                        Stmt::Store(a, i, self.expr(v, &mut h))
                    }
                    Stmt::StoreShared(a, i, v) => {
                        let i = self.expr(i, &mut h);
                        Stmt::StoreShared(a, i, self.expr(v, &mut h))
                    }
                    Stmt::If(c, a, b) => {
                        let c = self.expr(c, &mut None);
                        Stmt::If(c, self.stmts(a), self.stmts(b))
                    }
                    Stmt::For {
                        var,
                        start,
                        end,
                        step,
                        body,
                    } => Stmt::For {
                        var,
                        start: self.expr(start, &mut None),
                        end: self.expr(end, &mut None),
                        step: self.expr(step, &mut None),
                        body: self.stmts(body),
                    },
                    s @ (Stmt::LocalArray(..) | Stmt::Barrier) => s,
                }
            };
            out.extend(pre);
            out.push(s);
        }
        out
    }
}

/// Replaces every load `buf[i]` of `k` by `f(i)`.
pub fn remap_loads(k: &mut Kernel, buf: &str, f: &dyn Fn(Expr) -> Expr) {
    let mut r = Remapper {
        buf,
        f,
        tag: format!("rm_{buf}_"),
        n: 0,
    };
    let body = std::mem::take(&mut k.body);
    k.body = r.stmts(body);
}

/// Replaces the uniform `name` by the literal `value` in the kernel and its grid.
pub fn fold_uniform(g: &mut Generated, name: &str, value: u32) {
    let body = std::mem::take(&mut g.kernel.body);
    g.kernel.body = map_exprs(body, &mut |e| match e {
        Expr::Uniform(ref n) if n == name => Expr::U32(value),
        e => e,
    });
    g.kernel.uniforms.retain(|u| u != name);
    for d in &mut g.grid {
        for f in &mut d.factors {
            if matches!(f, Factor::Uniform(u) if u == name) {
                *f = Factor::Const(value);
            }
        }
    }
}

/// Renames a buffer parameter (its loads and stores too).
pub fn rename_buffer(k: &mut Kernel, old: &str, new: &str) {
    for b in &mut k.buffers {
        if b.name == old {
            b.name = new.to_string();
        }
    }
    let body = std::mem::take(&mut k.body);
    let body = map_exprs(body, &mut |e| match e {
        Expr::Load(ref b, ref i) if b == old => Expr::Load(new.to_string(), i.clone()),
        e => e,
    });
    k.body = rename_stores(body, old, new);
}

fn rename_stores(body: Vec<Stmt>, old: &str, new: &str) -> Vec<Stmt> {
    body.into_iter()
        .map(|s| match s {
            Stmt::Store(b, i, v) if b == old => Stmt::Store(new.to_string(), i, v),
            Stmt::If(c, a, b) => {
                Stmt::If(c, rename_stores(a, old, new), rename_stores(b, old, new))
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => Stmt::For {
                var,
                start,
                end,
                step,
                body: rename_stores(body, old, new),
            },
            s => s,
        })
        .collect()
}

/// Names of the buffers the body loads from or stores to.
pub fn used_buffers(k: &Kernel) -> HashSet<String> {
    fn expr(e: &Expr, out: &mut HashSet<String>) {
        match e {
            Expr::Load(b, i) => {
                out.insert(b.clone());
                expr(i, out);
            }
            Expr::LoadShared(_, i) | Expr::LoadLocal(_, i) => expr(i, out),
            Expr::Bin(_, a, b) => {
                expr(a, out);
                expr(b, out);
            }
            Expr::Un(_, a) | Expr::Cast(_, a) | Expr::Subgroup(_, a) => expr(a, out),
            Expr::Select(c, a, b) => {
                expr(c, out);
                expr(a, out);
                expr(b, out);
            }
            _ => {}
        }
    }
    fn stmts(body: &[Stmt], out: &mut HashSet<String>) {
        for s in body {
            match s {
                Stmt::Let(_, _, e) | Stmt::Var(_, _, e) | Stmt::Assign(_, e) => expr(e, out),
                Stmt::StoreLocal(_, i, v) | Stmt::StoreShared(_, i, v) => {
                    expr(i, out);
                    expr(v, out);
                }
                Stmt::Store(b, i, v) => {
                    out.insert(b.clone());
                    expr(i, out);
                    expr(v, out);
                }
                Stmt::If(c, a, b) => {
                    expr(c, out);
                    stmts(a, out);
                    stmts(b, out);
                }
                Stmt::For {
                    start,
                    end,
                    step,
                    body,
                    ..
                } => {
                    expr(start, out);
                    expr(end, out);
                    expr(step, out);
                    stmts(body, out);
                }
                Stmt::LocalArray(..) | Stmt::Barrier => {}
            }
        }
    }
    let mut out = HashSet::new();
    stmts(&k.body, &mut out);
    out
}
