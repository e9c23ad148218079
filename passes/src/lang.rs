//! The e-graph language: an IR op plus its children, with two normal forms that make rules
//! rank-independent: `row_sum` / `row_max` / `row_mean` (a reduction over the last axis with
//! keepdim) and `transpose` (a permute swapping the last two axes).
//!
//! Patterns name ops by their IR names (`exp`, `matmul`, `where`, …); `softmax` in a pattern
//! means the plain fused softmax (scale 1, no mask), the first stage of softmax fusion.

use std::fmt;

use egg::{FromOp, Id, Language};
use transfuse_ir::{BinaryOp, CmpOp, Op, ReduceOp, Scalar, UnaryOp};

/// An e-node operator.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EOp {
    /// Any IR op, attributes included.
    Ir(Op),
    /// Reduction over the last axis, keepdim.
    Row(ReduceOp),
    /// Swap of the last two axes.
    Transpose,
    /// The root: its children are the graph's outputs, in order.
    Outputs,
}

impl EOp {
    /// Printable name.
    pub fn name(&self) -> String {
        match self {
            EOp::Ir(op) => op.name(),
            EOp::Row(r) => format!("row_{}", r.name()),
            EOp::Transpose => "transpose".into(),
            EOp::Outputs => "outputs".into(),
        }
    }
}

/// An e-node: operator and children.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TNode {
    /// The operator.
    pub op: EOp,
    /// Children e-classes.
    pub children: Vec<Id>,
}

impl TNode {
    /// An e-node.
    pub fn new(op: EOp, children: Vec<Id>) -> TNode {
        TNode { op, children }
    }

    /// The IR op, if this is one.
    pub fn ir(&self) -> Option<&Op> {
        match &self.op {
            EOp::Ir(op) => Some(op),
            _ => None,
        }
    }
}

impl Language for TNode {
    type Discriminant = EOp;

    fn discriminant(&self) -> EOp {
        self.op.clone()
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for TNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            EOp::Ir(op) if !op.attrs().is_empty() => write!(f, "{}{{{}}}", op.name(), op.attrs()),
            op => write!(f, "{}", op.name()),
        }
    }
}

/// A pattern op name that is not part of the language.
#[derive(Debug)]
pub struct UnknownOp(pub String);

impl FromOp for TNode {
    type Error = UnknownOp;

    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        let eop = if let Some(u) = UnaryOp::from_name(op) {
            EOp::Ir(Op::Unary(u))
        } else if let Some(b) = BinaryOp::from_name(op) {
            EOp::Ir(Op::Binary(b))
        } else if let Some(c) = CmpOp::from_name(op) {
            EOp::Ir(Op::Compare(c))
        } else if let Some(r) = op.strip_prefix("row_").and_then(ReduceOp::from_name) {
            EOp::Row(r)
        } else {
            match op {
                "where" => EOp::Ir(Op::Where),
                "matmul" => EOp::Ir(Op::MatMul),
                "gather" => EOp::Ir(Op::Gather),
                "transpose" => EOp::Transpose,
                "softmax" => EOp::Ir(Op::Softmax { scale: Scalar(1.0) }),
                _ => return Err(UnknownOp(op.to_string())),
            }
        };
        Ok(TNode::new(eop, children))
    }
}
