//! Rewrites of generated kernels, so a template written for contiguous operands reads views,
//! gathers or computed values, and sizes known when the plan is made become literals.
//!
//! - [`remap_loads`]: every `buf[i]` becomes `f(i)` (any expression: a strided index, a table
//!   row picked by an id, a computed value). In plain statements the index is first bound to a
//!   fresh `let`, so a long remap does not repeat it.
//! - [`fold_uniform`]: a uniform whose value is a constant becomes a literal (and leaves the
//!   kernel's uniforms and its grid).
//! - [`expand_stores`]: every store to a buffer becomes statements (a placed concat's extra
//!   stores, a split buffer's chunk branches, a rename).
//! - [`split_buffer`]: one parameter becomes several chunk parameters (tensors over a device's
//!   largest binding).
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
        Expr::Fma(a, b, c) => fma(fold_expr(*a, f), fold_expr(*b, f), fold_expr(*c, f)),
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
            Expr::Fma(a, b, c) => {
                let a = self.expr(*a, pre);
                let b = self.expr(*b, pre);
                let c = self.expr(*c, pre);
                fma(a, b, c)
            }
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
    remap_loads_tagged(k, buf, &format!("rm_{buf}_"), f);
}

/// [`remap_loads`] naming the hoisted indices `<tag>0, <tag>1, …` (a second remap of the same
/// buffer needs its own tag).
fn remap_loads_tagged(k: &mut Kernel, buf: &str, tag: &str, f: &dyn Fn(Expr) -> Expr) {
    let mut r = Remapper {
        buf,
        f,
        tag: tag.to_string(),
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
    k.body = expand_stores(body, old, &mut |i, v| {
        vec![Stmt::Store(new.to_string(), i, v)]
    });
}

/// Replaces every `Store(buf, i, v)` by `f(i, v)`.
pub fn expand_stores(
    body: Vec<Stmt>,
    buf: &str,
    f: &mut dyn FnMut(Expr, Expr) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let mut out = vec![];
    for s in body {
        match s {
            Stmt::Store(b, i, v) if b == buf => out.extend(f(i, v)),
            Stmt::If(c, a, b) => out.push(Stmt::If(
                c,
                expand_stores(a, buf, f),
                expand_stores(b, buf, f),
            )),
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => out.push(Stmt::For {
                var,
                start,
                end,
                step,
                body: expand_stores(body, buf, f),
            }),
            s => out.push(s),
        }
    }
    out
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
            Expr::Select(c, a, b) | Expr::Fma(c, a, b) => {
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

/// `select(c, a, b)` as a vector: `select(c, vec(a), vec(b))`, recursively.
fn vector_arms(e: Expr) -> Expr {
    match e {
        Expr::Select(c, a, b) => {
            Expr::Select(c, Box::new(vector_arms(*a)), Box::new(vector_arms(*b)))
        }
        e => e.cast(Elem::F32x4),
    }
}

/// Splits buffer parameter `param` (`len` elements) into parameters `<param>_c0, _c1, …` of
/// `chunk` elements each (the last holds the rest), inserted where `param` was, so a tensor
/// larger than a device's largest binding is bound as several buffers. A load picks its chunk
/// with selects, each chunk's index clamped into that chunk (the loads a select discards stay
/// in bounds); a store branches on the chunk. Returns the new parameter names in order.
pub fn split_buffer(k: &mut Kernel, param: &str, len: u32, chunk: u32) -> Vec<String> {
    assert!(
        chunk > 0 && len > chunk,
        "split_buffer: {len} elements in chunks of {chunk}"
    );
    let parts = len.div_ceil(chunk);
    let names: Vec<String> = (0..parts).map(|c| format!("{param}_c{c}")).collect();
    let Some(pos) = k.buffers.iter().position(|b| b.name == param) else {
        return names;
    };
    let orig = k.buffers.remove(pos);
    for (c, n) in names.iter().enumerate() {
        k.buffers.insert(
            pos + c,
            Buffer {
                name: n.clone(),
                ..orig.clone()
            },
        );
    }
    // Index of element `i` within chunk `c`, clamped into the chunk.
    let local = move |i: &Expr, c: u32| {
        let first = c * chunk;
        let size = chunk.min(len - first);
        let shifted = if c == 0 {
            i.clone()
        } else {
            Expr::Bin(BinOp::Max, Box::new(i.clone()), Box::new(u(first))) - u(first)
        };
        Expr::Bin(BinOp::Min, Box::new(shifted), Box::new(u(size - 1)))
    };
    let loads = names.clone();
    remap_loads_tagged(k, param, &format!("sp_{param}_l"), &|i| {
        let mut e = load(&loads[parts as usize - 1], local(&i, parts - 1));
        for c in (0..parts - 1).rev() {
            let in_chunk = i.clone().lt(u((c + 1) * chunk));
            e = select(in_chunk, load(&loads[c as usize], local(&i, c)), e);
        }
        e
    });
    // A vector load of the split buffer became a vector cast of the chunk select: push the
    // cast into the select's arms, so each arm is a vector load of its chunk again (whole and
    // aligned in the chunk it selects when `chunk % 4 == 0`; the arms a select discards read a
    // clamped, in-bounds vector).
    let body = std::mem::take(&mut k.body);
    k.body = map_exprs(body, &mut |e| match e {
        Expr::Cast(Elem::F32x4, x) if matches!(*x, Expr::Select(..)) => vector_arms(*x),
        e => e,
    });
    let mut fresh = 0usize;
    let body = std::mem::take(&mut k.body);
    k.body = expand_stores(body, param, &mut |i, v| {
        let (iv, vv) = (
            format!("sp_{param}_i{fresh}"),
            format!("sp_{param}_v{fresh}"),
        );
        fresh += 1;
        let last = names.len() - 1;
        let at = |c: usize| var(&iv) - u(c as u32 * chunk);
        let mut tail = vec![store(&names[last], at(last), var(&vv))];
        for c in (0..last).rev() {
            tail = vec![Stmt::If(
                var(&iv).lt(u((c as u32 + 1) * chunk)),
                vec![store(&names[c], at(c), var(&vv))],
                tail,
            )];
        }
        let mut out = vec![let_(&iv, Elem::U32, i), let_(&vv, orig.elem, v)];
        out.extend(tail);
        out
    });
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{self, HostBuf};

    /// `out[i] = src[n - 1 - i] * 2` for i < n: reversed reads cross chunk boundaries.
    fn reverse_double() -> Kernel {
        let i = global_id(0);
        Kernel {
            name: "reverse_double".into(),
            buffers: vec![
                Buffer {
                    name: "src".into(),
                    elem: Elem::F32,
                    access: Access::Read,
                },
                Buffer {
                    name: "out".into(),
                    elem: Elem::F32,
                    access: Access::ReadWrite,
                },
            ],
            uniforms: vec!["n".into()],
            workgroup: [32, 1, 1],
            shared: vec![],
            body: vec![if_(
                i.clone().lt(uni("n")),
                vec![store(
                    "out",
                    i.clone(),
                    load("src", uni("n") - u(1) - i) * f(2.0),
                )],
            )],
        }
    }

    fn chunks(v: &[f32], chunk: usize) -> Vec<HostBuf> {
        v.chunks(chunk).map(|c| HostBuf::F32(c.to_vec())).collect()
    }

    #[test]
    fn split_loads_and_stores_equal_the_whole_buffers() {
        let n = 100u32;
        let src: Vec<f32> = (0..n).map(|x| x as f32).collect();
        let want: Vec<f32> = src.iter().rev().map(|x| x * 2.0).collect();
        let grid = [n.div_ceil(32), 1, 1];
        let mut whole = vec![
            HostBuf::F32(src.clone()),
            HostBuf::F32(vec![0.0; n as usize]),
        ];
        interp::run(&reverse_double(), grid, &mut whole, &[n], 32).unwrap();
        assert_eq!(whole[1].f32(), &want[..]);
        for chunk in [7u32, 33, 64, 99] {
            let mut k = reverse_double();
            let s = split_buffer(&mut k, "src", n, chunk);
            let o = split_buffer(&mut k, "out", n, chunk);
            let names: Vec<&str> = k.buffers.iter().map(|b| b.name.as_str()).collect();
            assert_eq!(
                names,
                s.iter().chain(&o).map(String::as_str).collect::<Vec<_>>()
            );
            let mut bufs = chunks(&src, chunk as usize);
            let outs = chunks(&vec![0.0; n as usize], chunk as usize);
            let parts = outs.len();
            bufs.extend(outs);
            interp::run(&k, grid, &mut bufs, &[n], 32).unwrap();
            let got: Vec<f32> = bufs[bufs.len() - parts..]
                .iter()
                .flat_map(|b| b.f32().to_vec())
                .collect();
            assert_eq!(got, want, "chunk {chunk}");
            // Both printers accept the rewritten kernel.
            crate::wgsl::print(&k).unwrap();
            crate::cuda::print(&k).unwrap();
        }
    }
}
