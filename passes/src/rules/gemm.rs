//! Matmul epilogues: `act(x @ w + b) + r` becomes one `fused_matmul`.
//!
//! A bias is absorbed when it is weight-only and broadcasts into the product; an activation
//! (exact and tanh GELU in the builder's spellings, ReLU, SiLU as `y·sigmoid(y)`) when its
//! argument is a matmul or an epilogue-free fused matmul; a residual when it has the output's
//! shape and is not weight-only. Three projections of one input are left as three matmuls
//! (their merge is future work).

use egg::Id;
use transfuse_ir::{Act, BinaryOp, Op, UnaryOp};

use super::{node_rule, nodes_where, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::lang::{EOp, TNode};

/// The gemm family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        node_rule("matmul-bias",       bias),
        node_rule("matmul-activation", activation),
        node_rule("matmul-residual",   residual),
    ]
}

fn fused(act: Act, bias: bool, residual: bool) -> Op {
    Op::FusedMatMul {
        act,
        bias,
        residual,
    }
}

/// The fused node, if it is well-typed and has the shape `want` of the class it joins.
fn checked(eg: &EG, op: Op, kids: Vec<Id>, want: &[transfuse_ir::Dim]) -> Option<Plan> {
    let (out, _) = node_type(eg, &TNode::new(EOp::Ir(op.clone()), kids.clone()))?;
    (out == want).then(|| Plan::ir(op, kids.into_iter().map(Plan::Class).collect()))
}

fn pairs(n: &TNode) -> [(Id, Id); 2] {
    [
        (n.children[0], n.children[1]),
        (n.children[1], n.children[0]),
    ]
}

fn bias(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Add)) {
        return None;
    }
    for (a, b) in pairs(n) {
        if !eg[b].data.weight_only || eg[a].data.weight_only {
            continue;
        }
        for mm in nodes_where(eg, a, |op| op == &EOp::Ir(Op::MatMul)) {
            let kids = vec![mm.children[0], mm.children[1], b];
            let want = node_type(eg, n)?.0;
            if let Some(p) = checked(eg, fused(Act::Identity, true, false), kids, &want) {
                return Some(p);
            }
        }
    }
    None
}

fn is_const(eg: &EG, id: Id, v: f64, tol: f64) -> bool {
    konst(eg, id).is_some_and(|k| (k - v).abs() <= tol)
}

/// Classes `y` with `id = mul(y, c)` (either order), `c` ≈ `v`.
fn scaled_by(eg: &EG, id: Id, v: f64) -> Vec<Id> {
    nodes_where(eg, id, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Mul)))
        .flat_map(|m| pairs(m).into_iter())
        .filter(|(_, c)| is_const(eg, *c, v, 1e-6))
        .map(|(y, _)| eg.find(y))
        .collect()
}

/// The `y` of `add(f(y), 1)` (either order) where `inner` recognises `f(y)`.
fn one_plus(eg: &EG, id: Id, inner: impl Fn(Id) -> Vec<Id>) -> Vec<Id> {
    nodes_where(eg, id, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Add)))
        .flat_map(|a| pairs(a).into_iter())
        .filter(|(_, one)| is_const(eg, *one, 1.0, 0.0))
        .flat_map(|(f, _)| inner(f))
        .collect()
}

fn unary_of(eg: &EG, id: Id, u: UnaryOp) -> Vec<Id> {
    nodes_where(eg, id, move |op| op == &EOp::Ir(Op::Unary(u)))
        .map(|n| n.children[0])
        .collect()
}

/// `erf(y / √2)` → y.
fn erf_arg(eg: &EG, id: Id) -> Vec<Id> {
    unary_of(eg, id, UnaryOp::Erf)
        .into_iter()
        .flat_map(|a| scaled_by(eg, a, std::f64::consts::FRAC_1_SQRT_2))
        .collect()
}

/// `tanh(√(2/π)·(y + 0.044715·y³))` → y.
fn tanh_arg(eg: &EG, id: Id) -> Vec<Id> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let mut ys = vec![];
    for inner in unary_of(eg, id, UnaryOp::Tanh)
        .into_iter()
        .flat_map(|a| scaled_by(eg, a, c))
    {
        for add in nodes_where(eg, inner, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Add))) {
            for (y, cubic) in pairs(add) {
                for y3 in scaled_by(eg, cubic, 0.044715) {
                    let is_cube =
                        nodes_where(eg, y3, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Mul)))
                            .flat_map(|m| pairs(m).into_iter())
                            .any(|(sq, y1)| {
                                eg.find(y1) == eg.find(y)
                                    && nodes_where(eg, sq, |op| {
                                        op == &EOp::Ir(Op::Binary(BinaryOp::Mul))
                                    })
                                    .any(|s| {
                                        eg.find(s.children[0]) == eg.find(y)
                                            && eg.find(s.children[1]) == eg.find(y)
                                    })
                            });
                    if is_cube {
                        ys.push(eg.find(y));
                    }
                }
            }
        }
    }
    ys
}

/// Recognises `act(y)` at node `n`: returns (act, y).
fn recognise_act(eg: &EG, n: &TNode) -> Option<(Act, Id)> {
    match n.ir()? {
        Op::Unary(UnaryOp::Relu) => Some((Act::Relu, n.children[0])),
        Op::Binary(BinaryOp::Mul) => {
            for (a, b) in pairs(n) {
                if unary_of(eg, b, UnaryOp::Sigmoid)
                    .iter()
                    .any(|y| eg.find(*y) == eg.find(a))
                {
                    return Some((Act::Silu, a));
                }
                for y in scaled_by(eg, a, 0.5) {
                    if one_plus(eg, b, |f| erf_arg(eg, f)).contains(&y) {
                        return Some((Act::GeluErf, y));
                    }
                    if one_plus(eg, b, |f| tanh_arg(eg, f)).contains(&y) {
                        return Some((Act::GeluTanh, y));
                    }
                }
            }
            None
        }
        _ => None,
    }
}

fn activation(eg: &EG, n: &TNode) -> Option<Plan> {
    let (act, y) = recognise_act(eg, n)?;
    for m in &eg[y].nodes {
        let (bias, kids) = match m.ir() {
            Some(Op::MatMul) => (false, m.children.clone()),
            Some(Op::FusedMatMul {
                act: Act::Identity,
                bias,
                residual: false,
            }) => (*bias, m.children.clone()),
            _ => continue,
        };
        if let Some(p) = checked(eg, fused(act, bias, false), kids, &shape_of(eg, y)) {
            return Some(p);
        }
    }
    None
}

fn residual(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Add)) {
        return None;
    }
    for (a, r) in pairs(n) {
        if eg[r].data.weight_only || shape_of(eg, r) != shape_of(eg, a) {
            continue;
        }
        for m in &eg[a].nodes {
            let Some(Op::FusedMatMul {
                act,
                bias,
                residual: false,
            }) = m.ir()
            else {
                continue;
            };
            let mut kids = m.children.clone();
            kids.push(r);
            if let Some(p) = checked(eg, fused(*act, *bias, true), kids, &shape_of(eg, a)) {
                return Some(p);
            }
        }
    }
    None
}
