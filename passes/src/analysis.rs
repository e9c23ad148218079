//! E-class analysis: type (shape with symbolic dims, dtype), scalar constant value, and whether
//! the class depends on weights and constants only.
//!
//! Types come from the IR's own inference (`transfuse_ir::infer`), so a rule can never make a
//! class that the IR would reject without the analysis noticing: such nodes get no type and the
//! extractor never picks them. Scalar constants fold through unary and binary ops, and a class
//! with a known value gets a `const` node, so `÷√64` and `×0.125` look the same to the rules.

use egg::{Analysis, DidMerge, EGraph, Id};
use transfuse_ir::{infer, BinaryOp, DType, Dim, Op, Scalar, Shape, UnaryOp};

use crate::lang::{EOp, TNode};

/// What the analysis knows about an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Data {
    /// Shape and dtype; `None` when a rule built something ill-typed.
    pub ty: Option<(Shape, DType)>,
    /// The value, for scalar constants (shape `[]`).
    pub konst: Option<f64>,
    /// True when the class depends on weights and constants only (no graph input).
    pub weight_only: bool,
}

/// The analysis.
#[derive(Default)]
pub struct TAnalysis;

/// The e-graph the optimizer works on.
pub type EG = EGraph<TNode, TAnalysis>;

/// Shape and dtype of an e-node given its children's classes.
pub fn node_type(eg: &EG, n: &TNode) -> Option<(Shape, DType)> {
    let kids: Option<Vec<&(Shape, DType)>> =
        n.children.iter().map(|c| eg[*c].data.ty.as_ref()).collect();
    let kids = kids?;
    match &n.op {
        EOp::Outputs => Some((vec![], DType::F32)),
        EOp::Row(r) => {
            let (s, d) = kids.first()?;
            let axis = s.len().checked_sub(1)?;
            let op = Op::Reduce {
                op: *r,
                axes: vec![axis],
                keepdim: true,
            };
            infer(&op, &[(s, *d)]).ok()
        }
        EOp::Transpose => {
            let (s, d) = kids.first()?;
            if s.len() < 2 || kids.len() != 1 {
                return None;
            }
            let mut out = s.clone();
            let r = out.len();
            out.swap(r - 1, r - 2);
            Some((out, *d))
        }
        EOp::Ir(op) => {
            let args: Vec<(&Shape, DType)> = kids.iter().map(|(s, d)| (s, *d)).collect();
            infer(op, &args).ok()
        }
    }
}

fn fold_unary(u: UnaryOp, a: f64) -> Option<f64> {
    Some(match u {
        UnaryOp::Neg => -a,
        UnaryOp::Exp => a.exp(),
        UnaryOp::Log => a.ln(),
        UnaryOp::Sqrt => a.sqrt(),
        UnaryOp::Rsqrt => 1.0 / a.sqrt(),
        UnaryOp::Recip => 1.0 / a,
        UnaryOp::Abs => a.abs(),
        UnaryOp::Tanh => a.tanh(),
        _ => return None,
    })
}

fn fold_binary(b: BinaryOp, x: f64, y: f64) -> Option<f64> {
    Some(match b {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Max => x.max(y),
        BinaryOp::Min => x.min(y),
        BinaryOp::Pow => x.powf(y),
    })
}

impl Analysis<TNode> for TAnalysis {
    type Data = Data;

    fn make(eg: &mut EG, n: &TNode, _id: Id) -> Data {
        let ty = node_type(eg, n);
        let k = |i: usize| eg[n.children[i]].data.konst;
        let is_f32_scalar = matches!(&ty, Some((s, DType::F32)) if s.is_empty());
        let konst = match &n.op {
            EOp::Ir(Op::Constant {
                value,
                dtype: DType::F32,
            }) => Some(value.0),
            EOp::Ir(Op::Unary(u)) if is_f32_scalar => k(0).and_then(|a| fold_unary(*u, a)),
            EOp::Ir(Op::Binary(b)) if is_f32_scalar => match (k(0), k(1)) {
                (Some(x), Some(y)) => fold_binary(*b, x, y),
                _ => None,
            },
            _ => None,
        }
        .filter(|v| v.is_finite() || v.is_infinite());
        let weight_only = match &n.op {
            EOp::Ir(Op::Weight { .. } | Op::Constant { .. }) => true,
            EOp::Ir(Op::Input { .. } | Op::Iota { .. }) | EOp::Outputs => false,
            _ => n.children.iter().all(|c| eg[*c].data.weight_only),
        };
        Data {
            ty,
            konst,
            weight_only,
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let mut changed_a = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty.clone();
            changed_a = true;
        }
        if a.konst.is_none() && b.konst.is_some() {
            a.konst = b.konst;
            changed_a = true;
        }
        if !a.weight_only && b.weight_only {
            a.weight_only = true;
            changed_a = true;
        }
        let changed_b = (b.ty.is_none() && a.ty.is_some())
            || (b.konst.is_none() && a.konst.is_some())
            || (!b.weight_only && a.weight_only);
        DidMerge(changed_a, changed_b)
    }

    fn modify(eg: &mut EG, id: Id) {
        let d = &eg[id].data;
        if let (Some(v), Some((s, DType::F32))) = (d.konst, &d.ty) {
            if s.is_empty() {
                let c = TNode::new(
                    EOp::Ir(Op::Constant {
                        value: Scalar(v),
                        dtype: DType::F32,
                    }),
                    vec![],
                );
                let cid = eg.add(c);
                eg.union(id, cid);
            }
        }
    }
}

/// The scalar f32 constant value of a class, if any.
pub fn konst(eg: &EG, id: Id) -> Option<f64> {
    eg[id].data.konst
}

/// The shape of a class (empty when untyped).
pub fn shape_of(eg: &EG, id: Id) -> Shape {
    eg[id]
        .data
        .ty
        .as_ref()
        .map(|t| t.0.clone())
        .unwrap_or_default()
}

/// True when the class's shape has only size-1 axes except possibly the last (a per-feature
/// vector such as a norm's gamma, or a scalar).
pub fn is_last_axis_vector(eg: &EG, id: Id) -> bool {
    let s = shape_of(eg, id);
    eg[id].data.ty.is_some() && s.iter().rev().skip(1).all(|d| d.is(1))
}

/// The dim `d` of a class (from the end when `from_end`).
pub fn dim_of(eg: &EG, id: Id, axis_from_end: usize) -> Option<Dim> {
    let s = shape_of(eg, id);
    s.len().checked_sub(axis_from_end + 1).map(|i| s[i].clone())
}
