//! Matmul epilogues: `act(x @ w + b) + r` becomes one `fused_matmul`.
//!
//! A bias is absorbed when it is weight-only and broadcasts into the product; an activation
//! (exact and tanh GELU in the builder's spellings, ReLU, SiLU as `y·sigmoid(y)`) when its
//! argument is a matmul or an epilogue-free fused matmul; a residual when it has the output's
//! shape and is not weight-only.
//!
//! Projection merge (`merge-projections`): two or more epilogue-free projections of one input
//! `x` — plain `matmul`s or `fused_matmul{act=identity}` with the same bias flag, no residual —
//! whose weights are weight-only `[K, n_i]` (a bias, if any, weight-only `[n_i]`) become one
//! `fused_matmul(x, concat([w₁, w₂, …], axis=1) [, concat([b₁, b₂, …], axis=0)])`, and each
//! projection's class gets `slice(merged, last axis, offset_i..offset_i + n_i)`. This is BERT's
//! q/k/v (`linear(x, transpose(W), b)`: the weight is the weight-only `transpose(W)`) and
//! LLaMA's gate/up: one launch and one read of `x` instead of several. The members are sorted
//! by canonical class id, so every member builds the same merged node and hash-consing shares
//! it. A projection whose bias has another shape (`[1, n]`, a scalar) stays out of the group.
//!
//! Written as a [`NodeRule`](super::NodeRule) rather than an egg `MultiPattern`: a
//! multi-pattern has a fixed number of sub-patterns (one rule per group size), matches every
//! ordered pair or triple of projections of each input (n² or n³ matches, all permutations of
//! one group), and cannot state "rank-1 bias of width n" or the variable-arity concat; the
//! node rule finds the group in one step from `x`'s parents, fires once per member, and the
//! members' identical plans meet in one e-node. A merged node is itself a projection of `x`;
//! it is recognised (some member's class holds a slice of it) and kept out of later groups, so
//! the rule saturates instead of merging merges. A member read only by other members is left
//! out too: after a LoRA merge, `x @ W_q + b` only feeds the class that now also holds
//! `x @ (W_q + s·BA) + b`, and the group to build is the merged projections', not both.

use egg::Id;
use transfuse_ir::{Act, BinaryOp, Dim, Op, UnaryOp};

use super::{node_rule, nodes_where, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::cost::Sizes;
use crate::lang::{EOp, TNode};

/// `fused_matmul`: `2·m·n·k`, the epilogue free (it runs on the accumulator);
/// `gated_matmul`: twice that (two products per output).
pub fn flops(op: &Op, s: &Sizes) -> Option<f64> {
    match op {
        Op::FusedMatMul { .. } => Some(s.matmul_flops()),
        Op::GatedMatMul { .. } => Some(2.0 * s.matmul_flops()),
        _ => None,
    }
}

/// A gated MLP: `act(x @ w_gate) · (x @ w_up)` (either order; `act(x @ w_gate)` already an
/// activation epilogue, from `matmul-activation`) → `gated_matmul{act}(x, w_gate, w_up)`, one
/// kernel reading `x` once. Only without bias or residual on either side (LLaMA's MLP has
/// neither), and not with an identity activation (a product of two projections is no MLP).
fn gated(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Mul)) {
        return None;
    }
    let [a, b] = n.children[..] else {
        return None;
    };
    let same = |p: Id, q: Id| eg.find(p) == eg.find(q);
    for (g, u) in [(a, b), (b, a)] {
        for gn in nodes_where(eg, g, |op| matches!(op, EOp::Ir(Op::FusedMatMul { .. }))) {
            let Some(Op::FusedMatMul {
                act,
                bias: false,
                residual: false,
            }) = gn.ir()
            else {
                continue;
            };
            if *act == Act::Identity {
                continue;
            }
            let (x, wg) = (gn.children[0], gn.children[1]);
            for un in nodes_where(eg, u, |op| op == &EOp::Ir(Op::MatMul)) {
                if !same(un.children[0], x) {
                    continue;
                }
                let op = Op::GatedMatMul { act: *act };
                let kids = vec![x, wg, un.children[1]];
                let node = TNode::new(EOp::Ir(op.clone()), kids.clone());
                if node_type(eg, &node).is_some() {
                    return Some(Plan::ir(op, kids.into_iter().map(Plan::Class).collect()));
                }
            }
        }
    }
    None
}

/// The gemm family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        node_rule("matmul-bias",       bias),
        node_rule("matmul-activation", activation),
        node_rule("matmul-residual",   residual),
        node_rule("merge-projections", merge_projections),
        node_rule("matmul-gated",      gated),
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

/// An epilogue-free projection `x @ w [+ b]`: canonical (x, w, bias).
fn projection(eg: &EG, m: &TNode) -> Option<(Id, Id, Option<Id>)> {
    let bias = match m.ir()? {
        Op::MatMul => false,
        Op::FusedMatMul {
            act: Act::Identity,
            bias,
            residual: false,
        } => *bias,
        _ => return None,
    };
    if m.children.len() != 2 + usize::from(bias) {
        return None;
    }
    let b = bias.then(|| eg.find(m.children[2]));
    Some((eg.find(m.children[0]), eg.find(m.children[1]), b))
}

/// One projection of a merge group.
struct Member {
    class: Id,
    w: Id,
    bias: Option<Id>,
    n: Dim,
}

/// The projections of `x` (with or without bias) that can merge, sorted by class id; merged
/// nodes (a member's class holds a slice of them) are left out.
fn projections_of(eg: &EG, x: Id, with_bias: bool) -> Vec<Member> {
    let xs = shape_of(eg, x);
    let Some(k) = xs.last() else {
        return vec![];
    };
    let mut classes: Vec<Id> = eg[x].parents().map(|p| eg.find(p)).collect();
    classes.sort();
    classes.dedup();
    let mut group = vec![];
    for class in classes {
        let member = eg[class].nodes.iter().find_map(|m| {
            let (mx, w, bias) = projection(eg, m)?;
            let ws = shape_of(eg, w);
            let ok_w = mx == x && eg[w].data.weight_only && ws.len() == 2 && &ws[0] == k;
            let ok_b = bias.is_some() == with_bias
                && bias.is_none_or(|b| eg[b].data.weight_only && shape_of(eg, b) == ws[1..]);
            (ok_w && ok_b).then(|| Member {
                class,
                w,
                bias,
                n: ws[1].clone(),
            })
        });
        group.extend(member);
    }
    let merged: Vec<Id> = group
        .iter()
        .flat_map(|m| nodes_where(eg, m.class, |op| matches!(op, EOp::Ir(Op::Slice { .. }))))
        .map(|s| eg.find(s.children[0]))
        .collect();
    group.retain(|m| !merged.contains(&m.class));
    // A member used only by other members is superseded by them (LoRA: `x @ W + b` feeds only
    // `x @ W + b + s·BAx`, whose class also holds `x @ (W + s·BA) + b`): merging it too would
    // compute a projection nobody reads.
    let members: Vec<Id> = group.iter().map(|m| m.class).collect();
    group.retain(|m| {
        let mut users = eg[m.class].parents().map(|p| eg.find(p)).peekable();
        users.peek().is_none() || !users.all(|p| p != m.class && members.contains(&p))
    });
    group
}

fn merge_projections(eg: &EG, n: &TNode) -> Option<Plan> {
    let (x, _, bias) = projection(eg, n)?;
    if eg[x].data.weight_only {
        return None;
    }
    let me = eg.lookup(n.clone())?;
    let group = projections_of(eg, x, bias.is_some());
    if group.len() < 2 {
        return None;
    }
    let (mut offset, mut mine) = (Dim::known(0), None);
    for m in &group {
        let end = offset.plus(&m.n);
        if m.class == me {
            mine = Some((offset.clone(), end.clone()));
        }
        offset = end;
    }
    let (start, end) = mine?;
    let concat = |axis: usize, kids: Vec<Plan>| Plan::ir(Op::Concat { axis }, kids);
    let mut kids = vec![
        Plan::Class(x),
        concat(1, group.iter().map(|m| Plan::Class(m.w)).collect()),
    ];
    if bias.is_some() {
        kids.push(concat(
            0,
            group
                .iter()
                .filter_map(|m| m.bias)
                .map(Plan::Class)
                .collect(),
        ));
    }
    let merged = Plan::ir(fused(Act::Identity, bias.is_some(), false), kids);
    let axis = shape_of(eg, me).len().checked_sub(1)?;
    Some(Plan::ir(Op::Slice { axis, start, end }, vec![merged]))
}
