//! Expression types, shared by the printers: CUDA needs them to pick `fminf` or a ternary and
//! the right conversion intrinsic; WGSL to reject what it cannot express.

use std::collections::HashMap;

use crate::kir::Elem;
use crate::kir::{BinOp, Expr, Kernel, Stmt, UnOp};
use crate::CodegenError;

/// Types of the names in scope.
#[derive(Clone, Default)]
pub struct Scope {
    locals: HashMap<String, Elem>,
    buffers: HashMap<String, Elem>,
    shared: HashMap<String, Elem>,
}

impl Scope {
    /// The kernel-level scope (buffers and shared arrays).
    pub fn of(k: &Kernel) -> Scope {
        Scope {
            locals: HashMap::new(),
            buffers: k.buffers.iter().map(|b| (b.name.clone(), b.elem)).collect(),
            shared: k.shared.iter().map(|s| (s.name.clone(), s.elem)).collect(),
        }
    }

    /// Declares a local (or local array) of type `e`.
    pub fn declare(&mut self, name: &str, e: Elem) {
        self.locals.insert(name.to_string(), e);
    }

    /// The declared type of a local.
    pub fn local(&self, name: &str) -> Option<Elem> {
        self.locals.get(name).copied()
    }

    /// The type of an expression.
    pub fn ty(&self, k: &str, e: &Expr) -> Result<Elem, CodegenError> {
        let unknown = |what: &str, n: &str| CodegenError::Kernel {
            kernel: k.to_string(),
            msg: format!("unknown {what} `{n}`"),
        };
        Ok(match e {
            Expr::Subgroup(crate::kir::SubgroupOp::Broadcast(_), a) => {
                let t = self.ty(k, a)?;
                if !matches!(t, Elem::F32 | Elem::F32x4) {
                    return Err(CodegenError::Kernel {
                        kernel: k.to_string(),
                        msg: format!("a subgroup broadcast of {t:?} (f32 or f32x4 only)"),
                    });
                }
                t
            }
            Expr::F32(_) | Expr::Subgroup(..) => Elem::F32,
            Expr::U32(_) | Expr::Uniform(_) | Expr::Builtin(_) => Elem::U32,
            Expr::I32(_) => Elem::I32,
            Expr::Bool(_) => Elem::Bool,
            Expr::Var(n) => self.local(n).ok_or_else(|| unknown("local", n))?,
            Expr::Load(b, _) => *self.buffers.get(b).ok_or_else(|| unknown("buffer", b))?,
            Expr::LoadShared(s, _) => *self
                .shared
                .get(s)
                .ok_or_else(|| unknown("shared array", s))?,
            Expr::LoadLocal(a, _) => self.local(a).ok_or_else(|| unknown("local array", a))?,
            Expr::Bin(op, a, _) => match op {
                BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => Elem::Bool,
                BinOp::And | BinOp::Or => Elem::Bool,
                BinOp::Dot => Elem::F32,
                _ => self.ty(k, a)?,
            },
            Expr::Un(UnOp::Not, _) => Elem::Bool,
            Expr::Un(UnOp::Lane(_), _) => Elem::F32,
            Expr::Un(_, a) => self.ty(k, a)?,
            Expr::Select(_, a, _) => self.ty(k, a)?,
            Expr::Fma(a, b, c) => {
                let t = self.ty(k, a)?;
                if !matches!(t, Elem::F32 | Elem::F32x4)
                    || self.ty(k, b)? != t
                    || self.ty(k, c)? != t
                {
                    return Err(CodegenError::Kernel {
                        kernel: k.to_string(),
                        msg: "a fused multiply-add of operands that are not all f32 or all f32x4"
                            .into(),
                    });
                }
                t
            }
            Expr::Cast(t, _) => *t,
        })
    }

    /// Errors unless a cast to [`Elem::F32x4`] of `a` is a vector load or a broadcast of a
    /// scalar that loads nothing (see [`crate::kir`]).
    pub fn check_vector_cast(&self, k: &str, a: &Expr) -> Result<(), CodegenError> {
        if crate::kir::is_load4(&Expr::Cast(Elem::F32x4, Box::new(a.clone()))) {
            return Ok(());
        }
        if crate::kir::loads_anything(a) && self.ty(k, a)? != Elem::F32x4 {
            return Err(CodegenError::Kernel {
                kernel: k.to_string(),
                msg: "a vector cast of an expression that loads is neither a vector load nor a \
                      broadcast (was a vector load rewritten?)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// Walks statements keeping the scope up to date: `f` sees each statement with the scope
/// in force at that point (declarations take effect after their own statement).
pub fn declare_stmt(scope: &mut Scope, s: &Stmt) {
    match s {
        Stmt::Let(n, e, _) | Stmt::Var(n, e, _) | Stmt::LocalArray(n, e, _) => scope.declare(n, *e),
        _ => {}
    }
}

/// Errors unless `name` is one of the kernel's uniforms.
pub fn check_uniform(k: &Kernel, name: &str) -> Result<(), CodegenError> {
    if k.uniforms.iter().any(|u| u == name) {
        Ok(())
    } else {
        Err(CodegenError::Kernel {
            kernel: k.name.clone(),
            msg: format!("unknown uniform `{name}`"),
        })
    }
}
