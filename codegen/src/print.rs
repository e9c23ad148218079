//! The statement walk both printers share: the structure of a kernel body (blocks, scopes,
//! indentation, which names are declared where) is printed once; each printer supplies only
//! its spelling of expressions and of the few statements whose syntax differs.

use std::fmt::Write;

use crate::kir::{Elem, Expr, Stmt};
use crate::types::{declare_stmt, Scope};
use crate::CodegenError;

/// Where a store goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mem {
    /// A local array.
    Local,
    /// A storage buffer.
    Global,
    /// A workgroup-shared array.
    Shared,
}

/// A target's spelling.
pub(crate) trait Syntax {
    /// An expression.
    fn expr(&self, s: &Scope, e: &Expr) -> Result<String, CodegenError>;
    /// `let`/`var` declaration of `n: e = v` (one line, no indentation).
    fn decl(&self, mutable: bool, n: &str, e: Elem, v: &str) -> Result<String, CodegenError>;
    /// A zero-initialised local array (one or more lines).
    fn local_array(&self, n: &str, e: Elem, len: u32) -> Result<Vec<String>, CodegenError>;
    /// `arr[i] = v;`.
    fn store(&self, mem: Mem, arr: &str, i: &str, v: &str) -> String;
    /// The header of a `u32` counting loop, ending in `{`.
    fn for_header(&self, var: &str, start: &str, end: &str, step: &str) -> String;
    /// The workgroup barrier statement.
    fn barrier(&self) -> &'static str;
}

/// Prints `body` at `depth`, keeping `s` up to date with declarations.
pub(crate) fn stmts<S: Syntax>(
    syn: &S,
    out: &mut String,
    s: &mut Scope,
    body: &[Stmt],
    depth: usize,
) -> Result<(), CodegenError> {
    let pad = "    ".repeat(depth);
    for st in body {
        match st {
            Stmt::Let(n, e, v) | Stmt::Var(n, e, v) => {
                let v = syn.expr(s, v)?;
                let line = syn.decl(matches!(st, Stmt::Var(..)), n, *e, &v)?;
                let _ = writeln!(out, "{pad}{line}");
            }
            Stmt::LocalArray(n, e, len) => {
                for line in syn.local_array(n, *e, *len)? {
                    let _ = writeln!(out, "{pad}{line}");
                }
            }
            Stmt::Assign(n, v) => {
                let v = syn.expr(s, v)?;
                let _ = writeln!(out, "{pad}{n} = {v};");
            }
            Stmt::StoreLocal(a, i, v) | Stmt::Store(a, i, v) | Stmt::StoreShared(a, i, v) => {
                let mem = match st {
                    Stmt::StoreLocal(..) => Mem::Local,
                    Stmt::Store(..) => Mem::Global,
                    _ => Mem::Shared,
                };
                let (i, v) = (syn.expr(s, i)?, syn.expr(s, v)?);
                let _ = writeln!(out, "{pad}{}", syn.store(mem, a, &i, &v));
            }
            Stmt::If(c, a, b) => {
                let c = syn.expr(s, c)?;
                let _ = writeln!(out, "{pad}if ({c}) {{");
                stmts(syn, out, &mut s.clone(), a, depth + 1)?;
                if !b.is_empty() {
                    let _ = writeln!(out, "{pad}}} else {{");
                    stmts(syn, out, &mut s.clone(), b, depth + 1)?;
                }
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                let (a, b, c) = (syn.expr(s, start)?, syn.expr(s, end)?, syn.expr(s, step)?);
                let _ = writeln!(out, "{pad}{}", syn.for_header(var, &a, &b, &c));
                let mut inner = s.clone();
                inner.declare(var, Elem::U32);
                stmts(syn, out, &mut inner, body, depth + 1)?;
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::Barrier => {
                let _ = writeln!(out, "{pad}{}", syn.barrier());
            }
        }
        declare_stmt(s, st);
    }
    Ok(())
}
