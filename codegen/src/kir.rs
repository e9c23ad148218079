//! The kernel IR: one typed description of a compute kernel, printed as CUDA C
//! ([`crate::cuda`]) and as WGSL ([`crate::wgsl`]). What a kernel computes is decided here,
//! once; a printer only spells it.
//!
//! A kernel has storage buffers (read-only or read-write, each with an element type), `u32`
//! uniforms (symbolic dims and sizes arrive this way, so one kernel serves every sequence
//! length), a workgroup size, workgroup-shared arrays, and a body of statements over typed
//! expressions. Values are computed in f32 (or u32/i32 for indices); f16/bf16 exist as storage
//! types, converted with explicit casts.

use std::ops;

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// 16-bit float (WGSL `f16` with `enable f16;`, CUDA `__half`).
    F16,
    /// bfloat16 (CUDA only).
    BF16,
    /// 32-bit unsigned integer (indices, sizes).
    U32,
    /// 32-bit signed integer.
    I32,
    /// Boolean (locals only).
    Bool,
    /// Four f32 lanes (locals and local arrays only; see the module docs).
    F32x4,
}

/// How a kernel uses a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and written.
    ReadWrite,
}

/// A storage buffer parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// Parameter name.
    pub name: String,
    /// Element type.
    pub elem: Elem,
    /// Access mode.
    pub access: Access,
}

/// A workgroup-shared array.
#[derive(Clone, Debug, PartialEq)]
pub struct Shared {
    /// Name.
    pub name: String,
    /// Element type.
    pub elem: Elem,
    /// Length in elements.
    pub len: u32,
}

/// Thread-position builtins, per axis 0..3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// Index of the thread in its workgroup (`threadIdx`, `local_invocation_id`).
    LocalId(u8),
    /// Index of the workgroup (`blockIdx`, `workgroup_id`).
    WorkgroupId(u8),
    /// Number of workgroups (`gridDim`, `num_workgroups`).
    NumWorkgroups(u8),
    /// Global thread index (`blockIdx·blockDim + threadIdx`, `global_invocation_id`).
    GlobalId(u8),
}

/// Binary operators (arithmetic on equal types; comparisons give bool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// +
    Add,
    /// -
    Sub,
    /// *
    Mul,
    /// /
    Div,
    /// % (integers)
    Rem,
    /// min
    Min,
    /// max
    Max,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
    /// ==
    Eq,
    /// !=
    Ne,
    /// logical and
    And,
    /// logical or
    Or,
    /// Dot product of two [`Elem::F32x4`] vectors (f32).
    Dot,
}

/// Unary operators and math intrinsics (f32 unless noted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    /// -x
    Neg,
    /// logical not
    Not,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// tanh x
    Tanh,
    /// erf x (WGSL has none: printed as a rational approximation, |error| < 1.5e-7)
    Erf,
    /// |x|
    Abs,
    /// 1/x
    Recip,
    /// 1/(1+e^-x)
    Sigmoid,
    /// sin x
    Sin,
    /// cos x
    Cos,
    /// Lane 0..4 of an [`Elem::F32x4`] vector (f32).
    Lane(u8),
}

/// Reductions across a subgroup (warp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubgroupOp {
    /// Σ
    Sum,
    /// max
    Max,
    /// The value of lane `0..8` of the invocation's group of 8 consecutive lanes (f32 or
    /// f32x4; the type of the operand). Used only by workgroups of exactly 8 invocations on
    /// targets whose subgroups hold at least 8 lanes (llvmpipe: 8), so the group is the
    /// workgroup; CUDA shuffles within 8-lane segments of the warp.
    Broadcast(u8),
}

/// Expressions.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// f32 literal (non-finite and extreme values are printed exactly).
    F32(f32),
    /// u32 literal.
    U32(u32),
    /// i32 literal.
    I32(i32),
    /// bool literal.
    Bool(bool),
    /// A local (`Let`/`Var`/loop variable).
    Var(String),
    /// A `u32` uniform.
    Uniform(String),
    /// A thread-position builtin (u32).
    Builtin(Builtin),
    /// `buffer[index]`.
    Load(String, Box<Expr>),
    /// `shared[index]`.
    LoadShared(String, Box<Expr>),
    /// `local_array[index]`.
    LoadLocal(String, Box<Expr>),
    /// Binary operation.
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// Unary operation.
    Un(UnOp, Box<Expr>),
    /// `cond ? a : b`.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Conversion to another element type.
    Cast(Elem, Box<Expr>),
    /// Reduction of an f32 across the subgroup; every lane gets the result.
    Subgroup(SubgroupOp, Box<Expr>),
    /// The fused multiply-add `a·b + c` with one rounding (f32 or f32x4, all three of one
    /// type): WGSL `fma`, CUDA `fmaf`.
    Fma(Box<Expr>, Box<Expr>, Box<Expr>),
}

/// Statements.
#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// An immutable local.
    Let(String, Elem, Expr),
    /// A mutable local.
    Var(String, Elem, Expr),
    /// A local array of `len` elements (registers), zero-initialised.
    LocalArray(String, Elem, u32),
    /// `name = value`.
    Assign(String, Expr),
    /// `local_array[index] = value`.
    StoreLocal(String, Expr, Expr),
    /// `buffer[index] = value`.
    Store(String, Expr, Expr),
    /// `shared[index] = value`.
    StoreShared(String, Expr, Expr),
    /// `if cond { then } else { otherwise }`.
    If(Expr, Vec<Stmt>, Vec<Stmt>),
    /// `for var in start..end step step` (u32).
    For {
        /// Loop variable.
        var: String,
        /// First value.
        start: Expr,
        /// Exclusive bound.
        end: Expr,
        /// Increment.
        step: Expr,
        /// Body.
        body: Vec<Stmt>,
    },
    /// Workgroup barrier (shared-memory fence). Only in uniform control flow.
    Barrier,
}

/// A compute kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// Entry-point name.
    pub name: String,
    /// Storage buffers, in binding / argument order.
    pub buffers: Vec<Buffer>,
    /// `u32` uniforms, after the buffers.
    pub uniforms: Vec<String>,
    /// Threads per workgroup.
    pub workgroup: [u32; 3],
    /// Workgroup-shared arrays.
    pub shared: Vec<Shared>,
    /// The body, run by every thread.
    pub body: Vec<Stmt>,
}

impl Kernel {
    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        self.workgroup.iter().product()
    }

    /// Bytes of workgroup-shared memory.
    pub fn shared_bytes(&self) -> u32 {
        self.shared.iter().map(|s| s.len * elem_bytes(s.elem)).sum()
    }

    /// Element types the kernel stores or shares (to decide `enable f16;`, CUDA includes).
    pub fn uses(&self, e: Elem) -> bool {
        self.buffers.iter().any(|b| b.elem == e)
            || self.shared.iter().any(|s| s.elem == e)
            || stmts_use(
                &self.body,
                &|x| matches!(x, Expr::Cast(t, _) if *t == e),
                &|s| matches!(s, Stmt::Let(_, t, _) | Stmt::Var(_, t, _) | Stmt::LocalArray(_, t, _) if *t == e),
            )
    }

    /// True if any expression satisfies `f`.
    pub fn any_expr(&self, f: &dyn Fn(&Expr) -> bool) -> bool {
        stmts_use(&self.body, f, &|_| false)
    }
}

/// Size of an element in bytes.
pub fn elem_bytes(e: Elem) -> u32 {
    match e {
        Elem::F32 | Elem::U32 | Elem::I32 => 4,
        Elem::F16 | Elem::BF16 => 2,
        Elem::Bool => 4,
        Elem::F32x4 => 16,
    }
}

fn expr_uses(x: &Expr, f: &dyn Fn(&Expr) -> bool) -> bool {
    if f(x) {
        return true;
    }
    match x {
        Expr::Load(_, i) | Expr::LoadShared(_, i) | Expr::LoadLocal(_, i) => expr_uses(i, f),
        Expr::Bin(_, a, b) => expr_uses(a, f) || expr_uses(b, f),
        Expr::Un(_, a) | Expr::Cast(_, a) | Expr::Subgroup(_, a) => expr_uses(a, f),
        Expr::Select(c, a, b) | Expr::Fma(c, a, b) => {
            expr_uses(c, f) || expr_uses(a, f) || expr_uses(b, f)
        }
        _ => false,
    }
}

fn stmts_use(body: &[Stmt], f: &dyn Fn(&Expr) -> bool, g: &dyn Fn(&Stmt) -> bool) -> bool {
    body.iter().any(|s| {
        g(s) || match s {
            Stmt::Let(_, _, e) | Stmt::Var(_, _, e) | Stmt::Assign(_, e) => expr_uses(e, f),
            Stmt::LocalArray(..) | Stmt::Barrier => false,
            Stmt::StoreLocal(_, i, v) | Stmt::Store(_, i, v) | Stmt::StoreShared(_, i, v) => {
                expr_uses(i, f) || expr_uses(v, f)
            }
            Stmt::If(c, a, b) => expr_uses(c, f) || stmts_use(a, f, g) || stmts_use(b, f, g),
            Stmt::For {
                start,
                end,
                step,
                body,
                ..
            } => {
                expr_uses(start, f)
                    || expr_uses(end, f)
                    || expr_uses(step, f)
                    || stmts_use(body, f, g)
            }
        }
    })
}

// ---- Construction helpers: kernels read like the math they compute. ----

/// A local variable.
pub fn var(name: &str) -> Expr {
    Expr::Var(name.to_string())
}

/// A uniform.
pub fn uni(name: &str) -> Expr {
    Expr::Uniform(name.to_string())
}

/// An f32 literal.
pub fn f(v: f32) -> Expr {
    Expr::F32(v)
}

/// A u32 literal.
pub fn u(v: u32) -> Expr {
    Expr::U32(v)
}

/// `buffer[index]`.
pub fn load(buf: &str, index: Expr) -> Expr {
    Expr::Load(buf.to_string(), Box::new(index))
}

/// `shared[index]`.
pub fn load_shared(arr: &str, index: Expr) -> Expr {
    Expr::LoadShared(arr.to_string(), Box::new(index))
}

/// `local[index]`.
pub fn load_local(arr: &str, index: Expr) -> Expr {
    Expr::LoadLocal(arr.to_string(), Box::new(index))
}

/// The vector load `buffer[index..index + 4]` as f32 lanes (`index` a multiple of 4).
pub fn load4(buf: &str, index: Expr) -> Expr {
    load(buf, index).cast(Elem::F32x4)
}

/// The value of `x` (f32 or f32x4) in lane `lane` of the 8-lane group (see
/// [`SubgroupOp::Broadcast`]).
pub fn bcast8(x: Expr, lane: u8) -> Expr {
    Expr::Subgroup(SubgroupOp::Broadcast(lane), Box::new(x))
}

/// A scalar broadcast to four f32 lanes.
pub fn splat4(x: Expr) -> Expr {
    x.cast(Elem::F32x4)
}

/// Names of the buffers read by a vector load (their WGSL arrays are of vectors).
pub fn vector_buffers(k: &Kernel) -> Vec<String> {
    let mut out: Vec<String> = k
        .buffers
        .iter()
        .filter(|b| {
            k.any_expr(&|e| matches!(e, Expr::Cast(Elem::F32x4, x) if matches!(&**x, Expr::Load(n, _) if *n == b.name)))
        })
        .map(|b| b.name.clone())
        .collect();
    out.dedup();
    out
}

/// True when `e` is a vector load (`Cast(F32x4, Load(..))`).
pub fn is_load4(e: &Expr) -> bool {
    matches!(e, Expr::Cast(Elem::F32x4, x) if matches!(**x, Expr::Load(..)))
}

/// True when `e` reads a buffer, shared or local array anywhere.
pub fn loads_anything(e: &Expr) -> bool {
    expr_uses(e, &|x| {
        matches!(
            x,
            Expr::Load(..) | Expr::LoadShared(..) | Expr::LoadLocal(..)
        )
    })
}

/// `a·b + c`, fused (one rounding; see [`Expr::Fma`]).
pub fn fma(a: Expr, b: Expr, c: Expr) -> Expr {
    Expr::Fma(Box::new(a), Box::new(b), Box::new(c))
}

/// `cond ? a : b`.
pub fn select(cond: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(cond), Box::new(a), Box::new(b))
}

/// Thread index in the workgroup along `axis`.
pub fn local_id(axis: u8) -> Expr {
    Expr::Builtin(Builtin::LocalId(axis))
}

/// Workgroup index along `axis`.
pub fn workgroup_id(axis: u8) -> Expr {
    Expr::Builtin(Builtin::WorkgroupId(axis))
}

/// Global thread index along `axis`.
pub fn global_id(axis: u8) -> Expr {
    Expr::Builtin(Builtin::GlobalId(axis))
}

/// Number of workgroups along `axis`.
pub fn num_workgroups(axis: u8) -> Expr {
    Expr::Builtin(Builtin::NumWorkgroups(axis))
}

/// `let name: elem = value`.
pub fn let_(name: &str, elem: Elem, value: Expr) -> Stmt {
    Stmt::Let(name.to_string(), elem, value)
}

/// `var name: elem = value`.
pub fn var_(name: &str, elem: Elem, value: Expr) -> Stmt {
    Stmt::Var(name.to_string(), elem, value)
}

/// `name = value`.
pub fn assign(name: &str, value: Expr) -> Stmt {
    Stmt::Assign(name.to_string(), value)
}

/// `buffer[index] = value`.
pub fn store(buf: &str, index: Expr, value: Expr) -> Stmt {
    Stmt::Store(buf.to_string(), index, value)
}

/// `shared[index] = value`.
pub fn store_shared(arr: &str, index: Expr, value: Expr) -> Stmt {
    Stmt::StoreShared(arr.to_string(), index, value)
}

/// `if cond { then }`.
pub fn if_(cond: Expr, then: Vec<Stmt>) -> Stmt {
    Stmt::If(cond, then, vec![])
}

/// `for v in start..end` (step 1).
pub fn for_(v: &str, start: Expr, end: Expr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        var: v.to_string(),
        start,
        end,
        step: u(1),
        body,
    }
}

/// `for v in (start..end).step_by(step)`.
pub fn for_step(v: &str, start: Expr, end: Expr, step: Expr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        var: v.to_string(),
        start,
        end,
        step,
        body,
    }
}

impl Expr {
    fn bin(self, op: BinOp, o: Expr) -> Expr {
        Expr::Bin(op, Box::new(self), Box::new(o))
    }

    fn un(self, op: UnOp) -> Expr {
        Expr::Un(op, Box::new(self))
    }

    /// `min(self, o)`.
    pub fn min(self, o: Expr) -> Expr {
        self.bin(BinOp::Min, o)
    }
    /// `max(self, o)`.
    pub fn max(self, o: Expr) -> Expr {
        self.bin(BinOp::Max, o)
    }
    /// `self < o`.
    pub fn lt(self, o: Expr) -> Expr {
        self.bin(BinOp::Lt, o)
    }
    /// `self <= o`.
    pub fn le(self, o: Expr) -> Expr {
        self.bin(BinOp::Le, o)
    }
    /// `self > o`.
    pub fn gt(self, o: Expr) -> Expr {
        self.bin(BinOp::Gt, o)
    }
    /// `self >= o`.
    pub fn ge(self, o: Expr) -> Expr {
        self.bin(BinOp::Ge, o)
    }
    /// `self == o`.
    pub fn eq_(self, o: Expr) -> Expr {
        self.bin(BinOp::Eq, o)
    }
    /// `self != o`.
    pub fn ne_(self, o: Expr) -> Expr {
        self.bin(BinOp::Ne, o)
    }
    /// `self && o`.
    pub fn and(self, o: Expr) -> Expr {
        self.bin(BinOp::And, o)
    }
    /// `self || o`.
    pub fn or(self, o: Expr) -> Expr {
        self.bin(BinOp::Or, o)
    }
    /// `e^self`.
    pub fn exp(self) -> Expr {
        self.un(UnOp::Exp)
    }
    /// `ln self`.
    pub fn log(self) -> Expr {
        self.un(UnOp::Log)
    }
    /// `√self`.
    pub fn sqrt(self) -> Expr {
        self.un(UnOp::Sqrt)
    }
    /// `1/√self`.
    pub fn rsqrt(self) -> Expr {
        self.un(UnOp::Rsqrt)
    }
    /// `tanh self`.
    pub fn tanh(self) -> Expr {
        self.un(UnOp::Tanh)
    }
    /// `erf self`.
    pub fn erf(self) -> Expr {
        self.un(UnOp::Erf)
    }
    /// `sigmoid self`.
    pub fn sigmoid(self) -> Expr {
        self.un(UnOp::Sigmoid)
    }
    /// `|self|`.
    pub fn abs(self) -> Expr {
        self.un(UnOp::Abs)
    }
    /// `1/self`.
    pub fn recip(self) -> Expr {
        self.un(UnOp::Recip)
    }
    /// Converted to `e`.
    pub fn cast(self, e: Elem) -> Expr {
        Expr::Cast(e, Box::new(self))
    }
    /// Unary op by value.
    pub fn apply(self, op: UnOp) -> Expr {
        self.un(op)
    }
    /// Dot product of two vectors.
    pub fn dot(self, o: Expr) -> Expr {
        self.bin(BinOp::Dot, o)
    }
    /// Lane `i` of a vector.
    pub fn lane(self, i: u8) -> Expr {
        self.un(UnOp::Lane(i))
    }
    /// Binary op by value.
    pub fn apply2(self, op: BinOp, o: Expr) -> Expr {
        self.bin(op, o)
    }
}

macro_rules! arith {
    ($tr:ident, $m:ident, $op:ident) => {
        impl ops::$tr for Expr {
            type Output = Expr;
            fn $m(self, o: Expr) -> Expr {
                self.bin(BinOp::$op, o)
            }
        }
    };
}
arith!(Add, add, Add);
arith!(Sub, sub, Sub);
arith!(Mul, mul, Mul);
arith!(Div, div, Div);
arith!(Rem, rem, Rem);

impl ops::Not for Expr {
    type Output = Expr;
    fn not(self) -> Expr {
        self.un(UnOp::Not)
    }
}

impl ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        self.un(UnOp::Neg)
    }
}
