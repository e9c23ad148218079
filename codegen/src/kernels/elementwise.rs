//! Generated kernels for clusters of elementwise / broadcast ops, row reductions and embedding
//! gathers.
//!
//! **Clusters ([`cluster`]).** An [`EwExpr`] tree over the inputs (each input's value at the
//! output element, converted to f32 when stored as a float), f32 constants, [`UnOp`]/[`BinOp`]
//! (comparisons give bool), select and casts, evaluated once per output element and stored as
//! the output type. Broadcasting is done with strides: the output `[d0, …, d{r-1}]` is
//! contiguous, each input `i` of rank `ri ≤ r` is aligned with the trailing `ri` output axes and
//! read at `Σ coord[a]·s{i}_{a}` — its strides are uniforms (0 along a broadcast axis), as are
//! the sizes `d{a}`; so one kernel serves every sequence length and every broadcast pattern.
//! Expressions are type-checked at generation (arithmetic on equal types, `%` on integers only,
//! math intrinsics on f32, select on bool) and refused with [`CodegenError::Kernel`] otherwise.
//!
//! Launch: rank ≥ 2 splits the outermost axis onto grid y (`d0 ≤ 65535`) and the rest
//! `d1·…·d{r-1}` onto x, each thread handling `items` elements `threads` apart; rank 1 uses x
//! only; rank 0 one thread. Grid `[⌈inner/(threads·items)⌉, d0, 1]`.
//!
//! **Row reductions ([`reduce_rows`]).** `reduce(expr(inputs))` over the last axis of a rank-`r`
//! index space `[d0, …, d{r-1}]` (same stride uniforms as clusters, so the prologue may
//! broadcast, e.g. `Σ exp(x − rowmax)`), one workgroup per row: strided partial reductions, a
//! shared-memory tree, thread 0 stores `out[row]` (rows contiguous). Sum, Max (identity −∞),
//! Mean (Σ / d{r-1}). Grid `[d{r-2}, d0·…·d{r-3}, 1]`, each ≤ 65535.
//!
//! **Gathers ([`gather_rows`]).** Embedding lookup `out[i, :] = table[ids[i], :]`; ids U32 or
//! I32, uniforms `n, width, vocab`; an id outside `0..vocab` writes zeros (the runtime validates
//! ids before launching; the check keeps a bad id from reading out of bounds). Grid
//! `[⌈width/threads⌉, n, 1]` (`n ≤ 65535` per launch).
//!
//! Limits: storage types F32/F16/BF16/U32/I32 (no Bool buffers; BF16 is CUDA only); `threads`
//! within the target's [`Limits`] (powers of two for reductions); kernel names must be
//! identifiers.

use std::ops;

use transfuse_ir::ReduceOp;

use super::matmul::elem_name;
use super::{check_limits, Factor, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// An input of a generated kernel: its storage type and rank (aligned with the trailing output
/// axes; a rank-0 input is a scalar read at index 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EwInput {
    /// Storage type.
    pub elem: Elem,
    /// Rank (≤ the output rank).
    pub rank: usize,
}

impl EwInput {
    /// An input of type `elem` and rank `rank`.
    pub fn new(elem: Elem, rank: usize) -> EwInput {
        EwInput { elem, rank }
    }
}

/// An elementwise expression over the inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum EwExpr {
    /// Input `i` at the current element (f32 if stored as a float type, else its integer type).
    Input(usize),
    /// An f32 constant.
    Const(f32),
    /// Unary op or intrinsic.
    Un(UnOp, Box<EwExpr>),
    /// Binary op; comparisons give bool.
    Bin(BinOp, Box<EwExpr>, Box<EwExpr>),
    /// `cond ? a : b`.
    Select(Box<EwExpr>, Box<EwExpr>, Box<EwExpr>),
    /// Conversion to F32, U32, I32 or Bool.
    Cast(Elem, Box<EwExpr>),
}

impl EwExpr {
    /// Input `i`.
    pub fn input(i: usize) -> EwExpr {
        EwExpr::Input(i)
    }

    /// An f32 constant.
    pub fn c(v: f32) -> EwExpr {
        EwExpr::Const(v)
    }

    /// `op(self)`.
    pub fn un(self, op: UnOp) -> EwExpr {
        EwExpr::Un(op, Box::new(self))
    }

    /// `self op o`.
    pub fn bin(self, op: BinOp, o: EwExpr) -> EwExpr {
        EwExpr::Bin(op, Box::new(self), Box::new(o))
    }

    /// `cond ? a : b`.
    pub fn select(cond: EwExpr, a: EwExpr, b: EwExpr) -> EwExpr {
        EwExpr::Select(Box::new(cond), Box::new(a), Box::new(b))
    }

    /// Converted to `e`.
    pub fn cast(self, e: Elem) -> EwExpr {
        EwExpr::Cast(e, Box::new(self))
    }

    /// Exact GELU `x·0.5·(erf(x/√2) + 1)`, spelled like the CPU reference.
    pub fn gelu_erf(self) -> EwExpr {
        let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2 as f32;
        (self.clone() * EwExpr::c(0.5))
            * ((self * EwExpr::c(inv_sqrt2)).un(UnOp::Erf) + EwExpr::c(1.0))
    }

    fn uses(&self, i: usize) -> bool {
        match self {
            EwExpr::Input(j) => *j == i,
            EwExpr::Const(_) => false,
            EwExpr::Un(_, a) | EwExpr::Cast(_, a) => a.uses(i),
            EwExpr::Bin(_, a, b) => a.uses(i) || b.uses(i),
            EwExpr::Select(c, a, b) => c.uses(i) || a.uses(i) || b.uses(i),
        }
    }

    /// The kernel IR expression and its type, reading input `i` from the local `x{i}`.
    fn lower(&self, inputs: &[EwInput]) -> Result<(Expr, Elem), String> {
        Ok(match self {
            EwExpr::Input(i) => {
                let inp = inputs
                    .get(*i)
                    .ok_or_else(|| format!("input {i} of {} does not exist", inputs.len()))?;
                (var(&format!("x{i}")), value_type(inp.elem))
            }
            EwExpr::Const(v) => (f(*v), Elem::F32),
            EwExpr::Un(op, a) => {
                let (x, t) = a.lower(inputs)?;
                let ok = match op {
                    UnOp::Not => t == Elem::Bool,
                    UnOp::Neg => t == Elem::F32 || t == Elem::I32,
                    _ => t == Elem::F32,
                };
                if !ok {
                    return Err(format!("{op:?} of a {t:?} value"));
                }
                (x.apply(*op), t)
            }
            EwExpr::Bin(op, a, b) => {
                let ((x, ta), (y, tb)) = (a.lower(inputs)?, b.lower(inputs)?);
                if ta != tb {
                    return Err(format!("{op:?} of {ta:?} and {tb:?} (cast one of them)"));
                }
                let t = match op {
                    BinOp::And | BinOp::Or if ta == Elem::Bool => Elem::Bool,
                    BinOp::And | BinOp::Or => return Err(format!("{op:?} of {ta:?} values")),
                    _ if ta == Elem::Bool => return Err(format!("{op:?} of bool values")),
                    BinOp::Rem if ta == Elem::F32 => {
                        return Err("% of f32 values (integers only)".into())
                    }
                    BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
                        Elem::Bool
                    }
                    _ => ta,
                };
                (x.apply2(*op, y), t)
            }
            EwExpr::Select(c, a, b) => {
                let ((cx, tc), (x, ta), (y, tb)) =
                    (c.lower(inputs)?, a.lower(inputs)?, b.lower(inputs)?);
                if tc != Elem::Bool {
                    return Err(format!("select on a {tc:?} condition"));
                }
                if ta != tb {
                    return Err(format!("select between {ta:?} and {tb:?}"));
                }
                (select(cx, x, y), ta)
            }
            EwExpr::Cast(to, a) => {
                let (x, _) = a.lower(inputs)?;
                if !matches!(to, Elem::F32 | Elem::U32 | Elem::I32 | Elem::Bool) {
                    return Err(format!(
                        "cast to {to:?} (values are f32/u32/i32/bool; storage types are set by the output)"
                    ));
                }
                (x.cast(*to), *to)
            }
        })
    }
}

macro_rules! ew_arith {
    ($tr:ident, $m:ident, $op:ident) => {
        impl ops::$tr for EwExpr {
            type Output = EwExpr;
            fn $m(self, o: EwExpr) -> EwExpr {
                self.bin(BinOp::$op, o)
            }
        }
    };
}
ew_arith!(Add, add, Add);
ew_arith!(Sub, sub, Sub);
ew_arith!(Mul, mul, Mul);
ew_arith!(Div, div, Div);

impl ops::Neg for EwExpr {
    type Output = EwExpr;
    fn neg(self) -> EwExpr {
        self.un(UnOp::Neg)
    }
}

/// The type an input's value has in expressions.
fn value_type(e: Elem) -> Elem {
    match e {
        Elem::F16 | Elem::BF16 => Elem::F32,
        e => e,
    }
}

fn err(kernel: &str, msg: impl Into<String>) -> CodegenError {
    CodegenError::Kernel {
        kernel: kernel.to_string(),
        msg: msg.into(),
    }
}

fn check_name(name: &str) -> Result<(), CodegenError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(name, "kernel names must be ASCII identifiers"))
    }
}

fn check_storage(kernel: &str, what: &str, e: Elem) -> Result<(), CodegenError> {
    if e == Elem::Bool {
        return Err(err(
            kernel,
            format!("{what}: Bool is not a storage type (use U32)"),
        ));
    }
    Ok(())
}

fn check_inputs(kernel: &str, rank: usize, inputs: &[EwInput]) -> Result<(), CodegenError> {
    for (i, inp) in inputs.iter().enumerate() {
        check_storage(kernel, &format!("input {i}"), inp.elem)?;
        if inp.rank > rank {
            return Err(err(
                kernel,
                format!("input {i} has rank {} > {rank}", inp.rank),
            ));
        }
    }
    Ok(())
}

/// Uniforms `d0..d{rank-1}` then each input's strides `s{i}_{axis}` for its aligned axes.
fn uniforms(rank: usize, inputs: &[EwInput]) -> Vec<String> {
    let mut v: Vec<String> = (0..rank).map(|a| format!("d{a}")).collect();
    for (i, inp) in inputs.iter().enumerate() {
        for a in rank - inp.rank..rank {
            v.push(format!("s{i}_{a}"));
        }
    }
    v
}

fn in_buffers(inputs: &[EwInput], out: Elem) -> Vec<Buffer> {
    let mut v: Vec<Buffer> = inputs
        .iter()
        .enumerate()
        .map(|(i, inp)| Buffer {
            name: format!("in{i}"),
            elem: inp.elem,
            access: Access::Read,
        })
        .collect();
    v.push(Buffer {
        name: "out".into(),
        elem: out,
        access: Access::ReadWrite,
    });
    v
}

/// `Σ_{axes in range} coord(a)·s{i}_{a}` for input `i`; `coord(a)` gives axis `a`'s coordinate.
fn offset(
    i: usize,
    inp: &EwInput,
    rank: usize,
    axes: std::ops::Range<usize>,
    coord: &dyn Fn(usize) -> Expr,
) -> Expr {
    let mut off: Option<Expr> = None;
    for a in axes.start.max(rank - inp.rank)..axes.end {
        let term = coord(a) * uni(&format!("s{i}_{a}"));
        off = Some(match off {
            None => term,
            Some(o) => o + term,
        });
    }
    off.unwrap_or(u(0))
}

/// Loads of the used inputs into `x{i}` (f32 for float storage).
fn load_inputs(expr: &EwExpr, inputs: &[EwInput], off: &dyn Fn(usize) -> Expr) -> Vec<Stmt> {
    let mut v = vec![];
    for (i, inp) in inputs.iter().enumerate() {
        if expr.uses(i) {
            let t = value_type(inp.elem);
            v.push(let_(
                &format!("x{i}"),
                t,
                load(&format!("in{i}"), off(i)).cast(t),
            ));
        }
    }
    v
}

/// Converts a value of type `t` for storage as `out` (bool through f32 to float types).
fn store_value(x: Expr, t: Elem, out: Elem) -> Expr {
    if t == Elem::Bool && matches!(out, Elem::F16 | Elem::BF16) {
        x.cast(Elem::F32).cast(out)
    } else {
        x.cast(out)
    }
}

/// Tunables of [`cluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EwTunables {
    /// Threads per workgroup.
    pub threads: u32,
    /// Elements per thread (`threads` apart).
    pub items: u32,
}

impl EwTunables {
    /// 256 threads (or the target's most), one element each.
    pub fn default_for(limits: &Limits) -> EwTunables {
        EwTunables {
            threads: limits.max_threads.min(256),
            items: 1,
        }
    }

    /// Threads in {64, 128, 256, 512, 1024} × items in {1, 2, 4, 8}, within `limits`.
    pub fn space(limits: &Limits) -> Vec<EwTunables> {
        let mut v = vec![];
        for threads in [64, 128, 256, 512, 1024] {
            for items in [1, 2, 4, 8] {
                let t = EwTunables { threads, items };
                if t.validate("cluster", limits).is_ok() {
                    v.push(t);
                }
            }
        }
        v
    }

    /// Errors (naming `kernel`) unless valid under `limits`.
    pub fn validate(&self, kernel: &str, limits: &Limits) -> Result<(), CodegenError> {
        if self.threads == 0 || self.threads > limits.max_threads {
            return Err(err(
                kernel,
                format!(
                    "{} threads: must be 1 to the target's {}",
                    self.threads, limits.max_threads
                ),
            ));
        }
        if self.items == 0 || self.items > 16 {
            return Err(err(
                kernel,
                format!("{} items per thread: must be 1 to 16", self.items),
            ));
        }
        Ok(())
    }

    pub(crate) fn describe(&self, limits: &Limits) -> Vec<Tunable> {
        let space = Self::space(limits);
        vec![
            Tunable::axis("threads", self.threads, &space, |t| t.threads),
            Tunable::axis("items", self.items, &space, |t| t.items),
        ]
    }
}

/// Tunables of [`reduce_rows`] and [`gather_rows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowTunables {
    /// Threads per workgroup (a power of two for reductions).
    pub threads: u32,
}

impl RowTunables {
    /// 256 threads (or the target's most power of two).
    pub fn default_for(limits: &Limits) -> RowTunables {
        let t = limits.max_threads.clamp(1, 256);
        RowTunables {
            threads: 1 << (31 - t.leading_zeros()),
        }
    }

    /// Threads in {32, 64, 128, 256, 512, 1024} within `limits`.
    pub fn space(limits: &Limits) -> Vec<RowTunables> {
        [32, 64, 128, 256, 512, 1024]
            .into_iter()
            .map(|threads| RowTunables { threads })
            .filter(|t| t.validate("rows", limits).is_ok())
            .collect()
    }

    /// Errors (naming `kernel`) unless valid under `limits` (power of two, shared memory of
    /// `4·threads` bytes for reductions).
    pub fn validate(&self, kernel: &str, limits: &Limits) -> Result<(), CodegenError> {
        let t = self.threads;
        if !t.is_power_of_two() || t > limits.max_threads || 4 * t > limits.max_shared_bytes {
            return Err(err(
                kernel,
                format!(
                    "{t} threads: must be a power of two within the target's {} threads and {} shared bytes",
                    limits.max_threads, limits.max_shared_bytes
                ),
            ));
        }
        Ok(())
    }

    fn describe(&self, limits: &Limits) -> Vec<Tunable> {
        vec![Tunable::axis(
            "threads",
            self.threads,
            &Self::space(limits),
            |t| t.threads,
        )]
    }
}

/// A kernel computing `out = expr(inputs)` elementwise over an output of rank `out_rank`
/// (see the module docs for buffers, uniforms and launch).
pub fn cluster(
    name: &str,
    out_rank: usize,
    inputs: &[EwInput],
    expr: &EwExpr,
    out_elem: Elem,
    t: &EwTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    check_name(name)?;
    t.validate(name, limits)?;
    check_inputs(name, out_rank, inputs)?;
    check_storage(name, "output", out_elem)?;
    let (value, vt) = expr.lower(inputs).map_err(|m| err(name, m))?;
    let r = out_rank;
    let (threads, items) = (t.threads, t.items);

    // `inner`: elements handled along grid x; the outermost axis (rank ≥ 2) is grid y.
    let inner_axes = if r >= 2 { 1..r } else { 0..r };
    let inner = inner_axes
        .clone()
        .map(|a| uni(&format!("d{a}")))
        .reduce(|a, b| a * b)
        .unwrap_or(u(1));
    let mut body = vec![
        let_("inner", Elem::U32, inner),
        let_(
            "base",
            Elem::U32,
            workgroup_id(0) * u(threads * items) + local_id(0),
        ),
    ];
    if r >= 2 {
        body.push(let_("row", Elem::U32, workgroup_id(1)));
    }
    for j in 0..items {
        let lin = format!("lin{j}");
        let mut st = vec![];
        // Coordinates: c{a} for the inner axes, from the fastest; the last one needs no `%`.
        let mut q = lin.clone();
        for a in inner_axes.clone().rev() {
            let c = format!("c{a}");
            if a == inner_axes.start {
                st.push(let_(&c, Elem::U32, var(&q)));
            } else {
                st.push(let_(&c, Elem::U32, var(&q) % uni(&format!("d{a}"))));
                let nq = format!("q{a}");
                st.push(let_(&nq, Elem::U32, var(&q) / uni(&format!("d{a}"))));
                q = nq;
            }
        }
        let coord = |a: usize| {
            if r >= 2 && a == 0 {
                var("row")
            } else {
                var(&format!("c{a}"))
            }
        };
        st.extend(load_inputs(expr, inputs, &|i| {
            offset(i, &inputs[i], r, 0..r, &coord)
        }));
        st.push(let_("v", vt, value.clone()));
        let oi = if r >= 2 {
            var("row") * var("inner") + var(&lin)
        } else {
            var(&lin)
        };
        st.push(store("out", oi, store_value(var("v"), vt, out_elem)));
        let at = if j == 0 {
            var("base")
        } else {
            var("base") + u(j * threads)
        };
        body.push(let_(&lin, Elem::U32, at));
        body.push(if_(var(&lin).lt(var("inner")), st));
    }

    let x_factors = inner_axes
        .map(|a| Factor::Uniform(format!("d{a}")))
        .collect();
    let kernel = Kernel {
        name: name.to_string(),
        buffers: in_buffers(inputs, out_elem),
        uniforms: uniforms(r, inputs),
        workgroup: [threads, 1, 1],
        shared: vec![],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim {
                factors: x_factors,
                per_group: threads * items,
            },
            if r >= 2 {
                GridDim::of("d0", 1)
            } else {
                GridDim::one()
            },
            GridDim::one(),
        ],
        tunables: t.describe(limits),
    })
}

/// A kernel computing `out[row] = reduce_{c < d{rank-1}} expr(inputs)[row, c]` over an index
/// space of rank `rank ≥ 1`, one workgroup per row (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn reduce_rows(
    name: &str,
    op: ReduceOp,
    rank: usize,
    inputs: &[EwInput],
    expr: &EwExpr,
    out_elem: Elem,
    t: &RowTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    check_name(name)?;
    t.validate(name, limits)?;
    if rank == 0 {
        return Err(err(name, "a row reduction needs rank ≥ 1"));
    }
    check_inputs(name, rank, inputs)?;
    check_storage(name, "output", out_elem)?;
    let (value, vt) = expr.lower(inputs).map_err(|m| err(name, m))?;
    if vt != Elem::F32 {
        return Err(err(
            name,
            format!("reduces f32 values, the prologue gives {vt:?}"),
        ));
    }
    let threads = t.threads;
    let last = rank - 1;
    let mut body = vec![let_("tid", Elem::U32, local_id(0))];
    // Row coordinates c0..c{rank-2}: c{rank-2} = wid.x, the rest from wid.y.
    if rank >= 2 {
        body.push(let_(&format!("c{}", rank - 2), Elem::U32, workgroup_id(0)));
    }
    if rank >= 3 {
        let mut q = "q".to_string();
        body.push(let_(&q, Elem::U32, workgroup_id(1)));
        for a in (0..rank - 2).rev() {
            let c = format!("c{a}");
            if a == 0 {
                body.push(let_(&c, Elem::U32, var(&q)));
            } else {
                body.push(let_(&c, Elem::U32, var(&q) % uni(&format!("d{a}"))));
                let nq = format!("q{a}");
                body.push(let_(&nq, Elem::U32, var(&q) / uni(&format!("d{a}"))));
                q = nq;
            }
        }
    }
    let row = match rank {
        1 => u(0),
        2 => workgroup_id(0),
        _ => workgroup_id(1) * uni(&format!("d{}", rank - 2)) + workgroup_id(0),
    };
    body.push(let_("orow", Elem::U32, row));
    for (i, inp) in inputs.iter().enumerate() {
        if expr.uses(i) {
            body.push(let_(
                &format!("rb{i}"),
                Elem::U32,
                offset(i, inp, rank, 0..last, &|a| var(&format!("c{a}"))),
            ));
        }
    }
    let combine = |a: Expr, b: Expr| match op {
        ReduceOp::Max => a.max(b),
        ReduceOp::Sum | ReduceOp::Mean => a + b,
    };
    let identity = match op {
        ReduceOp::Max => f(f32::NEG_INFINITY),
        ReduceOp::Sum | ReduceOp::Mean => f(0.0),
    };
    let mut lbody = load_inputs(expr, inputs, &|i| {
        let col = offset(i, &inputs[i], rank, last..rank, &|_| var("col"));
        var(&format!("rb{i}")) + col
    });
    lbody.push(assign("accv", combine(var("accv"), value)));
    body.push(var_("accv", Elem::F32, identity));
    let d_last = uni(&format!("d{last}"));
    body.push(for_step(
        "col",
        var("tid"),
        d_last.clone(),
        u(threads),
        lbody,
    ));
    body.push(store_shared("red", var("tid"), var("accv")));
    body.push(Stmt::Barrier);
    let mut s = threads / 2;
    while s > 0 {
        body.push(if_(
            var("tid").lt(u(s)),
            vec![store_shared(
                "red",
                var("tid"),
                combine(
                    load_shared("red", var("tid")),
                    load_shared("red", var("tid") + u(s)),
                ),
            )],
        ));
        body.push(Stmt::Barrier);
        s /= 2;
    }
    let mut result = load_shared("red", u(0));
    if op == ReduceOp::Mean {
        result = result / d_last.cast(Elem::F32);
    }
    body.push(if_(
        var("tid").eq_(u(0)),
        vec![store("out", var("orow"), result.cast(out_elem))],
    ));

    let grid = match rank {
        1 => [GridDim::one(), GridDim::one(), GridDim::one()],
        2 => [GridDim::of("d0", 1), GridDim::one(), GridDim::one()],
        _ => [
            GridDim::of(&format!("d{}", rank - 2), 1),
            GridDim {
                factors: (0..rank - 2)
                    .map(|a| Factor::Uniform(format!("d{a}")))
                    .collect(),
                per_group: 1,
            },
            GridDim::one(),
        ],
    };
    let kernel = Kernel {
        name: name.to_string(),
        buffers: in_buffers(inputs, out_elem),
        uniforms: uniforms(rank, inputs),
        workgroup: [threads, 1, 1],
        shared: vec![Shared {
            name: "red".into(),
            elem: Elem::F32,
            len: threads,
        }],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid,
        tunables: t.describe(limits),
    })
}

/// The embedding lookup `out[i, :] = table[ids[i], :]` (zeros for an id outside `0..vocab`).
/// Buffers `ids, table, out`; uniforms `n, width, vocab`.
pub fn gather_rows(
    name: &str,
    ids: Elem,
    table: Elem,
    out: Elem,
    t: &RowTunables,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    check_name(name)?;
    t.validate(name, limits)?;
    if !matches!(ids, Elem::U32 | Elem::I32) {
        return Err(err(name, format!("ids must be U32 or I32, not {ids:?}")));
    }
    for (what, e) in [("table", table), ("output", out)] {
        if !matches!(e, Elem::F32 | Elem::F16 | Elem::BF16) {
            return Err(err(
                name,
                format!("{what} must be F32, F16 or BF16, not {e:?}"),
            ));
        }
    }
    let valid = if ids == Elem::I32 {
        var("id")
            .ge(Expr::I32(0))
            .and(var("id").cast(Elem::U32).lt(uni("vocab")))
    } else {
        var("id").lt(uni("vocab"))
    };
    let body = vec![
        let_("row", Elem::U32, workgroup_id(1)),
        let_("col", Elem::U32, global_id(0)),
        if_(
            var("col").lt(uni("width")),
            vec![
                let_("id", ids, load("ids", var("row"))),
                var_("v", Elem::F32, f(0.0)),
                if_(
                    valid,
                    vec![assign(
                        "v",
                        load(
                            "table",
                            var("id").cast(Elem::U32) * uni("width") + var("col"),
                        )
                        .cast(Elem::F32),
                    )],
                ),
                store(
                    "out",
                    var("row") * uni("width") + var("col"),
                    var("v").cast(out),
                ),
            ],
        ),
    ];
    let buf = |name: &str, elem, access| Buffer {
        name: name.into(),
        elem,
        access,
    };
    let kernel = Kernel {
        name: name.to_string(),
        buffers: vec![
            buf("ids", ids, Access::Read),
            buf("table", table, Access::Read),
            buf("out", out, Access::ReadWrite),
        ],
        uniforms: vec!["n".into(), "width".into(), "vocab".into()],
        workgroup: [t.threads, 1, 1],
        shared: vec![],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("width", t.threads),
            GridDim::of("n", 1),
            GridDim::one(),
        ],
        tunables: t.describe(limits),
    })
}

/// The catalog's GELU (erf) cluster: `gelu_erf(x)` over a rank-2 output, storage `elem`.
pub fn gelu_erf_cluster(elem: Elem, limits: &Limits) -> Result<Generated, CodegenError> {
    cluster(
        &format!("ew_gelu_erf_{}", elem_name(elem)),
        2,
        &[EwInput::new(elem, 2)],
        &EwExpr::input(0).gelu_erf(),
        elem,
        &EwTunables::default_for(limits),
        limits,
    )
}

/// Representative kernels: GELU chains (f32, f16), the additive attention mask
/// `(1 − f32(mask))·f32::MIN` from an i32 `[B, S]` mask to `[B, 1, 1, S]`, a broadcast bias add
/// (f32, bf16), SwiGLU `silu(a)·b` (f16), `where(cond, a, scalar)`, row reductions (sum, max,
/// mean of squares, Σ exp(x − rowmax) with a broadcast input), gathers (u32/f32, i32/f16) — all
/// at the WebGPU defaults.
pub fn catalog() -> Vec<Generated> {
    let l = Limits::webgpu();
    let ew = EwTunables::default_for(&l);
    let rt = RowTunables::default_for(&l);
    let x = EwExpr::input;
    let mut v = vec![
        gelu_erf_cluster(Elem::F32, &l),
        gelu_erf_cluster(Elem::F16, &l),
        cluster(
            "ew_attn_mask_i32_f32",
            4,
            &[EwInput::new(Elem::I32, 4)],
            &((EwExpr::c(1.0) - x(0).cast(Elem::F32)) * EwExpr::c(f32::MIN)),
            Elem::F32,
            &ew,
            &l,
        ),
        cluster(
            "ew_add_bias_f32",
            3,
            &[EwInput::new(Elem::F32, 3), EwInput::new(Elem::F32, 1)],
            &(x(0) + x(1)),
            Elem::F32,
            &ew,
            &l,
        ),
        cluster(
            "ew_add_bias_bf16",
            3,
            &[EwInput::new(Elem::BF16, 3), EwInput::new(Elem::BF16, 1)],
            &(x(0) + x(1)),
            Elem::BF16,
            &ew,
            &l,
        ),
        cluster(
            "ew_swiglu_f16",
            2,
            &[EwInput::new(Elem::F16, 2), EwInput::new(Elem::F16, 2)],
            &(x(0) * x(0).un(UnOp::Sigmoid) * x(1)),
            Elem::F16,
            &EwTunables {
                threads: 128,
                items: 4,
            },
            &l,
        ),
        cluster(
            "ew_where_f32",
            3,
            &[
                EwInput::new(Elem::U32, 2),
                EwInput::new(Elem::F32, 3),
                EwInput::new(Elem::F32, 0),
            ],
            &EwExpr::select(x(0).cast(Elem::Bool), x(1), x(2)),
            Elem::F32,
            &ew,
            &l,
        ),
        cluster(
            "ew_causal_cmp_u32",
            2,
            &[EwInput::new(Elem::F32, 2), EwInput::new(Elem::F32, 2)],
            &x(0).bin(BinOp::Le, x(1)),
            Elem::U32,
            &ew,
            &l,
        ),
    ];
    let red = |name: &str, op, rank, inputs: &[EwInput], e: &EwExpr| {
        reduce_rows(name, op, rank, inputs, e, Elem::F32, &rt, &l)
    };
    v.extend([
        red(
            "reduce_rows_sum_f32",
            ReduceOp::Sum,
            2,
            &[EwInput::new(Elem::F32, 2)],
            &x(0),
        ),
        red(
            "reduce_rows_max_f32",
            ReduceOp::Max,
            3,
            &[EwInput::new(Elem::F32, 3)],
            &x(0),
        ),
        red(
            "reduce_rows_mean_sq_f16",
            ReduceOp::Mean,
            2,
            &[EwInput::new(Elem::F16, 2)],
            &(x(0) * x(0)),
        ),
        red(
            "reduce_rows_sum_exp_f32",
            ReduceOp::Sum,
            4,
            &[EwInput::new(Elem::F32, 4), EwInput::new(Elem::F32, 4)],
            &(x(0) - x(1)).un(UnOp::Exp),
        ),
        gather_rows(
            "gather_rows_u32_f32",
            Elem::U32,
            Elem::F32,
            Elem::F32,
            &rt,
            &l,
        ),
        gather_rows(
            "gather_rows_i32_f16",
            Elem::I32,
            Elem::F16,
            Elem::F16,
            &rt,
            &l,
        ),
    ]);
    v.into_iter()
        .map(|g| g.expect("catalog elementwise kernel"))
        .collect()
}
