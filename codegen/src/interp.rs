//! A CPU interpreter of the kernel IR: runs a kernel exactly as written, workgroup by
//! workgroup, all threads of a workgroup in lockstep (SIMT with per-thread activity masks), so
//! the numerics of a template can be tested on a machine without a GPU and independently of
//! either printer.
//!
//! It also checks what GPUs do not: an out-of-bounds load or store, a barrier reached by only
//! part of a workgroup (non-uniform control flow), a read of an unknown name — each is an error
//! naming the kernel. f16/bf16 buffers are held as f32 and rounded on every store.

use std::collections::HashMap;

use crate::kir::{BinOp, Builtin, Elem, Expr, Kernel, Stmt, SubgroupOp, UnOp};
use crate::CodegenError;

/// A host buffer bound to a kernel parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum HostBuf {
    /// f32 (also f16/bf16 storage, rounded on store).
    F32(Vec<f32>),
    /// u32.
    U32(Vec<u32>),
    /// i32.
    I32(Vec<i32>),
}

impl HostBuf {
    /// The f32 contents.
    pub fn f32(&self) -> &[f32] {
        match self {
            HostBuf::F32(v) => v,
            _ => panic!("not an f32 buffer"),
        }
    }

    fn len(&self) -> usize {
        match self {
            HostBuf::F32(v) => v.len(),
            HostBuf::U32(v) => v.len(),
            HostBuf::I32(v) => v.len(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Val {
    F(f32),
    U(u32),
    I(i32),
    B(bool),
    /// An [`Elem::F32x4`] vector.
    V([f32; 4]),
}

impl Val {
    fn f(self) -> f32 {
        match self {
            Val::F(v) => v,
            Val::U(v) => v as f32,
            Val::I(v) => v as f32,
            Val::B(b) => b as u8 as f32,
            Val::V(v) => v[0],
        }
    }
    fn v(self) -> [f32; 4] {
        match self {
            Val::V(v) => v,
            other => [other.f(); 4],
        }
    }
    fn u(self) -> u32 {
        match self {
            Val::F(v) => v as u32,
            Val::U(v) => v,
            Val::I(v) => v as u32,
            Val::B(b) => b as u32,
            Val::V(v) => v[0] as u32,
        }
    }
    fn b(self) -> bool {
        match self {
            Val::B(b) => b,
            Val::F(v) => v != 0.0,
            Val::U(v) => v != 0,
            Val::I(v) => v != 0,
            Val::V(v) => v[0] != 0.0,
        }
    }
}

fn round_to(e: Elem, v: f32) -> f32 {
    match e {
        Elem::F16 => f16_round(v),
        Elem::BF16 => {
            if !v.is_finite() {
                return v;
            }
            let b = v.to_bits();
            f32::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1))) & 0xffff_0000)
        }
        _ => v,
    }
}

/// Rounds to the nearest f16 value (ties to even), saturating to ±inf beyond 65504.
fn f16_round(v: f32) -> f32 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let a = v.abs();
    if a >= 65520.0 {
        return f32::INFINITY.copysign(v);
    }
    // Spacing of f16 values around `a`: 2^(e-10) for normals, 2^-24 for subnormals.
    let e = a.log2().floor().max(-14.0);
    let ulp = (e - 10.0).exp2();
    let q = a / ulp;
    let r = q.round();
    let r = if (q - q.floor() - 0.5).abs() < f32::EPSILON && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    (r * ulp).copysign(v)
}

struct Wg<'a> {
    k: &'a Kernel,
    bufs: &'a mut [HostBuf],
    buf_index: HashMap<&'a str, usize>,
    uniforms: HashMap<&'a str, u32>,
    shared: HashMap<String, Vec<Val>>,
    locals: Vec<HashMap<String, Val>>,
    arrays: Vec<HashMap<String, Vec<Val>>>,
    lid: Vec<[u32; 3]>,
    wid: [u32; 3],
    grid: [u32; 3],
    subgroup: usize,
}

impl Wg<'_> {
    fn err(&self, msg: String) -> CodegenError {
        CodegenError::Kernel {
            kernel: self.k.name.clone(),
            msg,
        }
    }

    fn eval(&self, e: &Expr, mask: &[bool]) -> Result<Vec<Val>, CodegenError> {
        let n = mask.len();
        let per =
            |f: &dyn Fn(usize) -> Result<Val, CodegenError>| -> Result<Vec<Val>, CodegenError> {
                (0..n)
                    .map(|t| if mask[t] { f(t) } else { Ok(Val::U(0)) })
                    .collect()
            };
        match e {
            Expr::F32(v) => Ok(vec![Val::F(*v); n]),
            Expr::U32(v) => Ok(vec![Val::U(*v); n]),
            Expr::I32(v) => Ok(vec![Val::I(*v); n]),
            Expr::Bool(v) => Ok(vec![Val::B(*v); n]),
            Expr::Uniform(u) => {
                let v = *self
                    .uniforms
                    .get(u.as_str())
                    .ok_or_else(|| self.err(format!("unknown uniform `{u}`")))?;
                Ok(vec![Val::U(v); n])
            }
            Expr::Var(v) => per(&|t| {
                self.locals[t]
                    .get(v)
                    .copied()
                    .ok_or_else(|| self.err(format!("unknown local `{v}`")))
            }),
            Expr::Builtin(b) => per(&|t| {
                let (kind, a) = match b {
                    Builtin::LocalId(a) => (0, *a),
                    Builtin::WorkgroupId(a) => (1, *a),
                    Builtin::NumWorkgroups(a) => (2, *a),
                    Builtin::GlobalId(a) => (3, *a),
                };
                let a = a.min(2) as usize;
                Ok(Val::U(match kind {
                    0 => self.lid[t][a],
                    1 => self.wid[a],
                    2 => self.grid[a],
                    _ => self.wid[a] * self.k.workgroup[a] + self.lid[t][a],
                }))
            }),
            Expr::Load(b, i) => {
                let idx = self.eval(i, mask)?;
                let bi = *self
                    .buf_index
                    .get(b.as_str())
                    .ok_or_else(|| self.err(format!("unknown buffer `{b}`")))?;
                per(&|t| {
                    let i = idx[t].u() as usize;
                    let buf = &self.bufs[bi];
                    if i >= buf.len() {
                        return Err(
                            self.err(format!("load {b}[{i}] out of bounds (len {})", buf.len()))
                        );
                    }
                    Ok(match buf {
                        HostBuf::F32(v) => Val::F(v[i]),
                        HostBuf::U32(v) => Val::U(v[i]),
                        HostBuf::I32(v) => Val::I(v[i]),
                    })
                })
            }
            Expr::LoadShared(s, i) => {
                let idx = self.eval(i, mask)?;
                let arr = self
                    .shared
                    .get(s)
                    .ok_or_else(|| self.err(format!("unknown shared `{s}`")))?;
                per(&|t| {
                    let i = idx[t].u() as usize;
                    arr.get(i).copied().ok_or_else(|| {
                        self.err(format!("shared {s}[{i}] out of bounds (len {})", arr.len()))
                    })
                })
            }
            Expr::LoadLocal(a, i) => {
                let idx = self.eval(i, mask)?;
                per(&|t| {
                    let arr = self.arrays[t]
                        .get(a)
                        .ok_or_else(|| self.err(format!("unknown local array `{a}`")))?;
                    let i = idx[t].u() as usize;
                    arr.get(i).copied().ok_or_else(|| {
                        self.err(format!("local {a}[{i}] out of bounds (len {})", arr.len()))
                    })
                })
            }
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.eval(a, mask)?, self.eval(b, mask)?);
                per(&|t| Ok(bin(*op, x[t], y[t])))
            }
            Expr::Un(op, a) => {
                let x = self.eval(a, mask)?;
                per(&|t| Ok(un(*op, x[t])))
            }
            Expr::Select(c, a, b) => {
                let (c, x, y) = (
                    self.eval(c, mask)?,
                    self.eval(a, mask)?,
                    self.eval(b, mask)?,
                );
                per(&|t| Ok(if c[t].b() { x[t] } else { y[t] }))
            }
            Expr::Fma(a, b, c) => {
                let (x, y, z) = (
                    self.eval(a, mask)?,
                    self.eval(b, mask)?,
                    self.eval(c, mask)?,
                );
                per(&|t| {
                    Ok(match (x[t], y[t], z[t]) {
                        (Val::F(a), Val::F(b), Val::F(c)) => Val::F(a.mul_add(b, c)),
                        (a, b, c) => {
                            let (a, b, c) = (a.v(), b.v(), c.v());
                            Val::V(std::array::from_fn(|i| a[i].mul_add(b[i], c[i])))
                        }
                    })
                })
            }
            Expr::Cast(Elem::F32x4, a) => {
                if let Expr::Load(b, i) = &**a {
                    let idx = self.eval(i, mask)?;
                    let bi = *self
                        .buf_index
                        .get(b.as_str())
                        .ok_or_else(|| self.err(format!("unknown buffer `{b}`")))?;
                    return per(&|t| {
                        let i = idx[t].u() as usize;
                        let buf = &self.bufs[bi];
                        if !i.is_multiple_of(4) {
                            return Err(
                                self.err(format!("vector load {b}[{i}] is not aligned to 4"))
                            );
                        }
                        if i + 4 > buf.len() {
                            return Err(self.err(format!(
                                "vector load {b}[{i}..{}] out of bounds (len {})",
                                i + 4,
                                buf.len()
                            )));
                        }
                        Ok(Val::V(match buf {
                            HostBuf::F32(v) => [v[i], v[i + 1], v[i + 2], v[i + 3]],
                            HostBuf::U32(v) => {
                                [v[i], v[i + 1], v[i + 2], v[i + 3]].map(|x| x as f32)
                            }
                            HostBuf::I32(v) => {
                                [v[i], v[i + 1], v[i + 2], v[i + 3]].map(|x| x as f32)
                            }
                        }))
                    });
                }
                if crate::kir::loads_anything(a)
                    && !matches!(
                        self.eval(a, mask)?.iter().zip(mask).find(|(_, &m)| m),
                        Some((Val::V(_), _))
                    )
                {
                    return Err(self.err(
                        "a vector cast of an expression that loads is neither a vector load nor \
                         a broadcast (was a vector load rewritten?)"
                            .into(),
                    ));
                }
                let x = self.eval(a, mask)?;
                per(&|t| Ok(Val::V(x[t].v())))
            }
            Expr::Cast(to, a) => {
                let x = self.eval(a, mask)?;
                per(&|t| {
                    Ok(match to {
                        Elem::F32 => Val::F(x[t].f()),
                        Elem::F16 | Elem::BF16 => Val::F(round_to(*to, x[t].f())),
                        Elem::U32 => Val::U(x[t].u()),
                        Elem::I32 => Val::I(match x[t] {
                            Val::F(v) => v as i32,
                            other => other.u() as i32,
                        }),
                        Elem::Bool => Val::B(x[t].b()),
                        Elem::F32x4 => Val::V(x[t].v()),
                    })
                })
            }
            Expr::Subgroup(SubgroupOp::Broadcast(l), a) => {
                let x = self.eval(a, mask)?;
                let l = usize::from(*l);
                let mut out = x.clone();
                for start in (0..n).step_by(8) {
                    let src = start + l;
                    if src >= n || !mask[src] {
                        return Err(CodegenError::Kernel {
                            kernel: self.k.name.clone(),
                            msg: format!("subgroup broadcast from lane {l}, which is inactive"),
                        });
                    }
                    let end = (start + 8).min(n);
                    out[start..end].fill(x[src]);
                }
                Ok(out)
            }
            Expr::Subgroup(op, a) => {
                let x = self.eval(a, mask)?;
                let mut out = vec![Val::F(0.0); n];
                for start in (0..n).step_by(self.subgroup) {
                    let lanes = start..(start + self.subgroup).min(n);
                    let vals = lanes.clone().filter(|&t| mask[t]).map(|t| x[t].f());
                    let r = match op {
                        SubgroupOp::Sum => vals.sum::<f32>(),
                        SubgroupOp::Max => vals.fold(f32::NEG_INFINITY, f32::max),
                        SubgroupOp::Broadcast(_) => unreachable!("evaluated above"),
                    };
                    for t in lanes {
                        out[t] = Val::F(r);
                    }
                }
                Ok(out)
            }
        }
    }

    fn exec(&mut self, body: &[Stmt], mask: &[bool]) -> Result<(), CodegenError> {
        for s in body {
            if !mask.iter().any(|&m| m) {
                return Ok(());
            }
            match s {
                Stmt::Let(n, e, v) | Stmt::Var(n, e, v) => {
                    let vals = self.eval(v, mask)?;
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            let v = match e {
                                Elem::F32 | Elem::F16 | Elem::BF16 => {
                                    Val::F(round_to(*e, vals[t].f()))
                                }
                                Elem::U32 => Val::U(vals[t].u()),
                                Elem::I32 => Val::I(vals[t].u() as i32),
                                Elem::Bool => Val::B(vals[t].b()),
                                Elem::F32x4 => Val::V(vals[t].v()),
                            };
                            self.locals[t].insert(n.clone(), v);
                        }
                    }
                }
                Stmt::LocalArray(n, e, len) => {
                    let zero = match e {
                        Elem::U32 => Val::U(0),
                        Elem::I32 => Val::I(0),
                        Elem::Bool => Val::B(false),
                        Elem::F32x4 => Val::V([0.0; 4]),
                        _ => Val::F(0.0),
                    };
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            self.arrays[t].insert(n.clone(), vec![zero; *len as usize]);
                        }
                    }
                }
                Stmt::Assign(n, v) => {
                    let vals = self.eval(v, mask)?;
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            let slot =
                                self.locals[t]
                                    .get_mut(n)
                                    .ok_or_else(|| CodegenError::Kernel {
                                        kernel: self.k.name.clone(),
                                        msg: format!("assignment to unknown local `{n}`"),
                                    })?;
                            *slot = match *slot {
                                Val::F(_) => Val::F(vals[t].f()),
                                Val::U(_) => Val::U(vals[t].u()),
                                Val::I(_) => Val::I(vals[t].u() as i32),
                                Val::B(_) => Val::B(vals[t].b()),
                                Val::V(_) => Val::V(vals[t].v()),
                            };
                        }
                    }
                }
                Stmt::StoreLocal(a, i, v) => {
                    let (idx, vals) = (self.eval(i, mask)?, self.eval(v, mask)?);
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            let i = idx[t].u() as usize;
                            let name = self.k.name.clone();
                            let arr =
                                self.arrays[t]
                                    .get_mut(a)
                                    .ok_or_else(|| CodegenError::Kernel {
                                        kernel: name.clone(),
                                        msg: format!("unknown local array `{a}`"),
                                    })?;
                            let len = arr.len();
                            *arr.get_mut(i).ok_or_else(|| CodegenError::Kernel {
                                kernel: name,
                                msg: format!("local {a}[{i}] out of bounds (len {len})"),
                            })? = vals[t];
                        }
                    }
                }
                Stmt::Store(b, i, v) => {
                    let (idx, vals) = (self.eval(i, mask)?, self.eval(v, mask)?);
                    let bi = *self
                        .buf_index
                        .get(b.as_str())
                        .ok_or_else(|| self.err(format!("unknown buffer `{b}`")))?;
                    let elem = self.k.buffers[bi].elem;
                    for (t, &m) in mask.iter().enumerate() {
                        if !m {
                            continue;
                        }
                        let i = idx[t].u() as usize;
                        let len = self.bufs[bi].len();
                        if i >= len {
                            return Err(
                                self.err(format!("store {b}[{i}] out of bounds (len {len})"))
                            );
                        }
                        match &mut self.bufs[bi] {
                            HostBuf::F32(v) => v[i] = round_to(elem, vals[t].f()),
                            HostBuf::U32(v) => v[i] = vals[t].u(),
                            HostBuf::I32(v) => v[i] = vals[t].u() as i32,
                        }
                    }
                }
                Stmt::StoreShared(a, i, v) => {
                    let (idx, vals) = (self.eval(i, mask)?, self.eval(v, mask)?);
                    let elem = self.k.shared.iter().find(|s| &s.name == a).map(|s| s.elem);
                    let name = self.k.name.clone();
                    let arr = self.shared.get_mut(a).ok_or_else(|| CodegenError::Kernel {
                        kernel: name.clone(),
                        msg: format!("unknown shared `{a}`"),
                    })?;
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            let i = idx[t].u() as usize;
                            let len = arr.len();
                            let v = match (elem, vals[t]) {
                                (Some(e @ (Elem::F32 | Elem::F16 | Elem::BF16)), v) => {
                                    Val::F(round_to(e, v.f()))
                                }
                                (_, v) => v,
                            };
                            *arr.get_mut(i).ok_or_else(|| CodegenError::Kernel {
                                kernel: name.clone(),
                                msg: format!("shared {a}[{i}] out of bounds (len {len})"),
                            })? = v;
                        }
                    }
                }
                Stmt::If(c, a, b) => {
                    let cv = self.eval(c, mask)?;
                    let then: Vec<bool> = (0..mask.len()).map(|t| mask[t] && cv[t].b()).collect();
                    let els: Vec<bool> = (0..mask.len()).map(|t| mask[t] && !cv[t].b()).collect();
                    self.exec(a, &then)?;
                    self.exec(b, &els)?;
                }
                Stmt::For {
                    var,
                    start,
                    end,
                    step,
                    body,
                } => {
                    let init = self.eval(start, mask)?;
                    for (t, &m) in mask.iter().enumerate() {
                        if m {
                            self.locals[t].insert(var.clone(), Val::U(init[t].u()));
                        }
                    }
                    let mut live = mask.to_vec();
                    loop {
                        let bound = self.eval(end, &live)?;
                        for t in 0..live.len() {
                            if live[t] && self.locals[t][var].u() >= bound[t].u() {
                                live[t] = false;
                            }
                        }
                        if !live.iter().any(|&l| l) {
                            break;
                        }
                        self.exec(body, &live)?;
                        let inc = self.eval(step, &live)?;
                        for t in 0..live.len() {
                            if live[t] {
                                let v = self.locals[t][var].u();
                                self.locals[t]
                                    .insert(var.clone(), Val::U(v.wrapping_add(inc[t].u())));
                            }
                        }
                    }
                }
                Stmt::Barrier => {
                    if mask.iter().any(|&m| !m) {
                        return Err(
                            self.err("barrier reached by only part of the workgroup".into())
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

fn bin(op: BinOp, x: Val, y: Val) -> Val {
    use Val::*;
    match (x, y) {
        (V(a), V(b)) => match op {
            // In the order the CUDA printer spells it.
            BinOp::Dot => F(((a[0] * b[0] + a[1] * b[1]) + a[2] * b[2]) + a[3] * b[3]),
            _ => {
                let l = |i: usize| match bin(op, F(a[i]), F(b[i])) {
                    F(v) => v,
                    other => other.f(),
                };
                V([l(0), l(1), l(2), l(3)])
            }
        },
        (F(a), F(b)) => match op {
            BinOp::Add => F(a + b),
            BinOp::Sub => F(a - b),
            BinOp::Mul => F(a * b),
            BinOp::Div => F(a / b),
            BinOp::Rem => F(a % b),
            BinOp::Min => F(a.min(b)),
            BinOp::Max => F(a.max(b)),
            BinOp::Lt => B(a < b),
            BinOp::Le => B(a <= b),
            BinOp::Gt => B(a > b),
            BinOp::Ge => B(a >= b),
            BinOp::Eq => B(a == b),
            BinOp::Ne => B(a != b),
            BinOp::And | BinOp::Or | BinOp::Dot => B(false),
        },
        (B(a), B(b)) => match op {
            BinOp::And => B(a && b),
            BinOp::Or => B(a || b),
            BinOp::Eq => B(a == b),
            BinOp::Ne => B(a != b),
            _ => B(false),
        },
        (I(a), I(b)) => match op {
            BinOp::Add => I(a.wrapping_add(b)),
            BinOp::Sub => I(a.wrapping_sub(b)),
            BinOp::Mul => I(a.wrapping_mul(b)),
            BinOp::Div => I(if b == 0 { 0 } else { a / b }),
            BinOp::Rem => I(if b == 0 { 0 } else { a % b }),
            BinOp::Min => I(a.min(b)),
            BinOp::Max => I(a.max(b)),
            BinOp::Lt => B(a < b),
            BinOp::Le => B(a <= b),
            BinOp::Gt => B(a > b),
            BinOp::Ge => B(a >= b),
            BinOp::Eq => B(a == b),
            BinOp::Ne => B(a != b),
            BinOp::And | BinOp::Or | BinOp::Dot => B(false),
        },
        (a, b) => {
            let (a, b) = (a.u(), b.u());
            match op {
                BinOp::Add => U(a.wrapping_add(b)),
                BinOp::Sub => U(a.wrapping_sub(b)),
                BinOp::Mul => U(a.wrapping_mul(b)),
                BinOp::Div => U(a.checked_div(b).unwrap_or(0)),
                BinOp::Rem => U(a.checked_rem(b).unwrap_or(0)),
                BinOp::Min => U(a.min(b)),
                BinOp::Max => U(a.max(b)),
                BinOp::Lt => B(a < b),
                BinOp::Le => B(a <= b),
                BinOp::Gt => B(a > b),
                BinOp::Ge => B(a >= b),
                BinOp::Eq => B(a == b),
                BinOp::Ne => B(a != b),
                BinOp::And => B(a != 0 && b != 0),
                BinOp::Or => B(a != 0 || b != 0),
                BinOp::Dot => U(0),
            }
        }
    }
}

fn un(op: UnOp, x: Val) -> Val {
    match (op, x) {
        (UnOp::Lane(i), v) => Val::F(v.v()[(i as usize).min(3)]),
        (op, Val::V(a)) => Val::V(a.map(|x| un(op, Val::F(x)).f())),
        (UnOp::Not, v) => Val::B(!v.b()),
        (UnOp::Neg, Val::I(v)) => Val::I(-v),
        (UnOp::Abs, Val::I(v)) => Val::I(v.abs()),
        (op, v) => {
            let a = v.f();
            Val::F(match op {
                UnOp::Neg => -a,
                UnOp::Exp => a.exp(),
                UnOp::Log => a.ln(),
                UnOp::Sqrt => a.sqrt(),
                UnOp::Rsqrt => 1.0 / a.sqrt(),
                UnOp::Tanh => a.tanh(),
                UnOp::Erf => libm::erff(a),
                UnOp::Abs => a.abs(),
                UnOp::Recip => 1.0 / a,
                UnOp::Sigmoid => 1.0 / (1.0 + (-a).exp()),
                UnOp::Sin => a.sin(),
                UnOp::Cos => a.cos(),
                UnOp::Not | UnOp::Lane(_) => unreachable!(),
            })
        }
    }
}

/// Runs `k` over `grid` workgroups with `bufs` bound in parameter order and `uniforms` in
/// `k.uniforms` order; subgroups are `subgroup_size` consecutive threads.
pub fn run(
    k: &Kernel,
    grid: [u32; 3],
    bufs: &mut [HostBuf],
    uniforms: &[u32],
    subgroup_size: u32,
) -> Result<(), CodegenError> {
    let err = |msg: String| CodegenError::Kernel {
        kernel: k.name.clone(),
        msg,
    };
    if bufs.len() != k.buffers.len() || uniforms.len() != k.uniforms.len() {
        return Err(err(format!(
            "expects {} buffers and {} uniforms, got {} and {}",
            k.buffers.len(),
            k.uniforms.len(),
            bufs.len(),
            uniforms.len()
        )));
    }
    let [wx, wy, wz] = k.workgroup;
    let lid: Vec<[u32; 3]> = (0..wz)
        .flat_map(|z| (0..wy).flat_map(move |y| (0..wx).map(move |x| [x, y, z])))
        .collect();
    let n = lid.len();
    let buf_index = k
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| (b.name.as_str(), i))
        .collect();
    let uniforms = k
        .uniforms
        .iter()
        .map(String::as_str)
        .zip(uniforms.iter().copied())
        .collect();
    let mut wg = Wg {
        k,
        bufs,
        buf_index,
        uniforms,
        shared: HashMap::new(),
        locals: vec![],
        arrays: vec![],
        lid,
        wid: [0; 3],
        grid,
        subgroup: subgroup_size.max(1) as usize,
    };
    for gz in 0..grid[2] {
        for gy in 0..grid[1] {
            for gx in 0..grid[0] {
                wg.wid = [gx, gy, gz];
                wg.locals = vec![HashMap::new(); n];
                wg.arrays = vec![HashMap::new(); n];
                wg.shared = k
                    .shared
                    .iter()
                    .map(|s| {
                        let zero = match s.elem {
                            Elem::U32 => Val::U(0),
                            Elem::I32 => Val::I(0),
                            _ => Val::F(0.0),
                        };
                        (s.name.clone(), vec![zero; s.len as usize])
                    })
                    .collect();
                wg.exec(&k.body, &vec![true; n])?;
            }
        }
    }
    Ok(())
}
