//! Normalisation fusion: layer, RMS, group, instance and (inference) batch norm.
//!
//! Layer norm is recognised in its canonical spelling `(x − μ)·rsqrt(E[(x − μ)²] + ε)`; algebra
//! brings `÷√`, `1/√`, `(x−μ)²` via `pow`, and `ε + var` to it, and `var-expand` rewrites
//! `E[x²] − μ²` to `E[(x − μ)²]`. The plain norm is made with γ = 1, β = 0; `norm-affine-*`
//! then absorbs a following `× γ` and `+ β` into any norm whose γ is still 1 (β still 0), so
//! every norm gets its affine terms the same way. Group norm is a layer norm between two
//! reshapes `[N, C, ..] → [N, G, ..] → [N, C, ..]` (G = C: instance norm); instance norm also
//! as a mean over the spatial axes. Batch norm at inference is `(x − mean)·rsqrt(var + ε)`
//! with weight-only statistics: it becomes `x·scale + shift` with scale and shift as
//! weight-only expressions (folded once, when weights are known).

use egg::{Id, Subst};
use transfuse_ir::{BinaryOp, Op, ReduceOp, Scalar, UnaryOp};

use super::{node_rule, nodes_where, rw, rw_build, var, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::lang::{EOp, TNode};

const CENTERED: &str = "(sub ?x (row_mean ?x))";

fn ln_body(inv_first: bool) -> String {
    let var = format!("(row_mean (mul {CENTERED} {CENTERED}))");
    let inv = format!("(rsqrt (add {var} ?eps))");
    if inv_first {
        format!("(mul {inv} {CENTERED})")
    } else {
        format!("(mul {CENTERED} {inv})")
    }
}

fn rms_body(inv_first: bool) -> String {
    let inv = "(rsqrt (add (row_mean (mul ?x ?x)) ?eps))";
    if inv_first {
        format!("(mul {inv} ?x)")
    } else {
        format!("(mul ?x {inv})")
    }
}

/// The norm family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rw("var-expand", "(sub (row_mean (mul ?x ?x)) (mul (row_mean ?x) (row_mean ?x)))",
            &format!("(row_mean (mul {CENTERED} {CENTERED}))")),
        rw_build("layer-norm",          &ln_body(false), |eg, s| plain(eg, s, Norm::Layer)),
        rw_build("layer-norm-inv-first", &ln_body(true), |eg, s| plain(eg, s, Norm::Layer)),
        rw_build("rms-norm",            &rms_body(false), |eg, s| plain(eg, s, Norm::Rms)),
        rw_build("rms-norm-inv-first",  &rms_body(true),  |eg, s| plain(eg, s, Norm::Rms)),
        rw_build("batch-norm",          "(mul (sub ?x ?mean) (rsqrt (add ?var ?eps)))", batch_norm),
        node_rule("group-norm-reshape",  group_norm),
        node_rule("instance-norm-spatial", instance_norm),
        node_rule("norm-affine-scale",   affine_scale),
        node_rule("norm-affine-shift",   affine_shift),
    ]
}

#[derive(Clone, Copy)]
enum Norm {
    Layer,
    Rms,
}

fn eps_of(eg: &EG, s: &Subst) -> Option<f64> {
    let e = s[var("?eps")];
    if !shape_of(eg, e).is_empty() {
        return None;
    }
    konst(eg, e).filter(|v| *v >= 0.0)
}

fn plain(eg: &mut EG, s: &Subst, kind: Norm) -> Option<Id> {
    let eps = Scalar(eps_of(eg, s)?);
    let x = Plan::Class(s[var("?x")]);
    let p = match kind {
        Norm::Layer => Plan::ir(
            Op::LayerNorm { eps },
            vec![x, Plan::scalar(1.0), Plan::scalar(0.0)],
        ),
        Norm::Rms => Plan::ir(Op::RmsNorm { eps }, vec![x, Plan::scalar(1.0)]),
    };
    Some(p.add(eg))
}

fn batch_norm(eg: &mut EG, s: &Subst) -> Option<Id> {
    let eps = eps_of(eg, s)?;
    let (x, mean, var_) = (s[var("?x")], s[var("?mean")], s[var("?var")]);
    let stat_ok = |id: Id| eg[id].data.weight_only && konst(eg, id).is_none();
    if !stat_ok(mean) || !stat_ok(var_) || eg[x].data.weight_only || shape_of(eg, x).len() < 2 {
        return None;
    }
    let bin = |b, x, y| Plan::ir(Op::Binary(b), vec![x, y]);
    let inv = Plan::ir(
        Op::Unary(UnaryOp::Rsqrt),
        vec![bin(BinaryOp::Add, Plan::Class(var_), Plan::scalar(eps))],
    );
    let shift = bin(
        BinaryOp::Sub,
        Plan::scalar(0.0),
        bin(BinaryOp::Mul, Plan::Class(mean), inv.clone()),
    );
    let node = Plan::ir(Op::BatchNorm, vec![Plan::Class(x), inv, shift]);
    Some(node.add(eg))
}

fn is_const(eg: &EG, id: Id, v: f64) -> bool {
    konst(eg, id) == Some(v) && shape_of(eg, id).is_empty()
}

/// `reshape[N, C, ..](layer_norm(reshape[N, G, M](x), 1, 0))` → group norm (instance norm if G = C).
fn group_norm(eg: &EG, n: &TNode) -> Option<Plan> {
    let Some(Op::Reshape { shape: back }) = n.ir() else {
        return None;
    };
    for ln in nodes_where(eg, n.children[0], |op| {
        matches!(op, EOp::Ir(Op::LayerNorm { .. }))
    }) {
        let Some(Op::LayerNorm { eps }) = ln.ir() else {
            continue;
        };
        if !is_const(eg, ln.children[1], 1.0) || !is_const(eg, ln.children[2], 0.0) {
            continue;
        }
        for r in nodes_where(eg, ln.children[0], |op| {
            matches!(op, EOp::Ir(Op::Reshape { .. }))
        }) {
            let x = r.children[0];
            let (xs, grouped) = (shape_of(eg, x), shape_of(eg, ln.children[0]));
            if &xs != back || xs.len() < 3 || grouped.len() != 3 || grouped[0] != xs[0] {
                continue;
            }
            let (Some(c), Some(g)) = (xs[1].as_known(), grouped[1].as_known()) else {
                continue;
            };
            if g == 0 || c % g != 0 {
                continue;
            }
            let op = if g == c {
                Op::InstanceNorm { eps: *eps }
            } else {
                Op::GroupNorm {
                    groups: g,
                    eps: *eps,
                }
            };
            return Some(Plan::ir(
                op,
                vec![Plan::Class(x), Plan::scalar(1.0), Plan::scalar(0.0)],
            ));
        }
    }
    None
}

/// True if `id` holds `reduce_mean{axes=[2..rank) keepdim}(of)`.
fn spatial_mean_of(eg: &EG, id: Id, of: Id) -> bool {
    eg[id].nodes.iter().any(|n| match n.ir() {
        Some(Op::Reduce {
            op: ReduceOp::Mean,
            axes,
            keepdim: true,
        }) => {
            let rank = shape_of(eg, n.children[0]).len();
            eg.find(n.children[0]) == eg.find(of)
                && rank >= 3
                && *axes == (2..rank).collect::<Vec<_>>()
        }
        _ => false,
    })
}

/// `(x − mean_s(x))·rsqrt(mean_s((x − mean_s x)²) + ε)` over the spatial axes → instance norm.
fn instance_norm(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Mul)) {
        return None;
    }
    for (a, b) in [
        (n.children[0], n.children[1]),
        (n.children[1], n.children[0]),
    ] {
        for sub in nodes_where(eg, a, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Sub))) {
            let x = sub.children[0];
            if !spatial_mean_of(eg, sub.children[1], x) {
                continue;
            }
            for rs in nodes_where(eg, b, |op| op == &EOp::Ir(Op::Unary(UnaryOp::Rsqrt))) {
                for add in nodes_where(eg, rs.children[0], |op| {
                    op == &EOp::Ir(Op::Binary(BinaryOp::Add))
                }) {
                    let Some(eps) = konst(eg, add.children[1]) else {
                        continue;
                    };
                    let var_class = add.children[0];
                    let squares = eg[var_class].nodes.iter().filter_map(|vn| match vn.ir() {
                        Some(Op::Reduce {
                            op: ReduceOp::Mean, ..
                        }) => Some(vn.children[0]),
                        _ => None,
                    });
                    for sq in squares.collect::<Vec<_>>() {
                        let is_square =
                            nodes_where(eg, sq, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Mul)))
                                .any(|m| {
                                    eg.find(m.children[0]) == eg.find(a)
                                        && eg.find(m.children[1]) == eg.find(a)
                                });
                        if is_square && spatial_mean_of(eg, var_class, sq) {
                            let op = Op::InstanceNorm { eps: Scalar(eps) };
                            let kids = vec![Plan::Class(x), Plan::scalar(1.0), Plan::scalar(0.0)];
                            return Some(Plan::ir(op, kids));
                        }
                    }
                }
            }
        }
    }
    None
}

fn is_norm(op: &EOp) -> bool {
    matches!(
        op,
        EOp::Ir(
            Op::LayerNorm { .. }
                | Op::RmsNorm { .. }
                | Op::GroupNorm { .. }
                | Op::InstanceNorm { .. }
                | Op::BatchNorm
        )
    )
}

/// `norm(x, 1 [, β=0]) × γ` → `norm(x, γ [, 0])`; batch norm: `bn(x, s, t) × γ` → `bn(x, sγ, tγ)`.
fn affine_scale(eg: &EG, n: &TNode) -> Option<Plan> {
    affine(eg, n, BinaryOp::Mul)
}

/// `norm(x, γ, 0) + β` → `norm(x, γ, β)`; batch norm: `bn(x, s, t) + β` → `bn(x, s, t + β)`.
fn affine_shift(eg: &EG, n: &TNode) -> Option<Plan> {
    affine(eg, n, BinaryOp::Add)
}

fn affine(eg: &EG, n: &TNode, bin: BinaryOp) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(bin)) {
        return None;
    }
    for (a, p) in [
        (n.children[0], n.children[1]),
        (n.children[1], n.children[0]),
    ] {
        if !eg[p].data.weight_only {
            continue;
        }
        for norm in nodes_where(eg, a, is_norm) {
            let op = norm.ir().expect("is_norm").clone();
            let mut kids: Vec<Plan> = norm.children.iter().map(|c| Plan::Class(*c)).collect();
            let k = |i: usize| norm.children[i];
            let slot = match (&op, bin) {
                (Op::BatchNorm, BinaryOp::Mul) => {
                    kids[1] = Plan::ir(
                        Op::Binary(BinaryOp::Mul),
                        vec![Plan::Class(k(1)), Plan::Class(p)],
                    );
                    kids[2] = Plan::ir(
                        Op::Binary(BinaryOp::Mul),
                        vec![Plan::Class(k(2)), Plan::Class(p)],
                    );
                    None
                }
                (Op::BatchNorm, _) => {
                    kids[2] = Plan::ir(
                        Op::Binary(BinaryOp::Add),
                        vec![Plan::Class(k(2)), Plan::Class(p)],
                    );
                    None
                }
                (Op::RmsNorm { .. }, BinaryOp::Mul) if is_const(eg, k(1), 1.0) => Some(1),
                (_, BinaryOp::Mul)
                    if kids.len() == 3 && is_const(eg, k(1), 1.0) && is_const(eg, k(2), 0.0) =>
                {
                    Some(1)
                }
                (Op::RmsNorm { .. }, _) => continue,
                (_, _) if kids.len() == 3 && is_const(eg, k(2), 0.0) => Some(2),
                _ => continue,
            };
            if let Some(i) = slot {
                kids[i] = Plan::Class(p);
            }
            // Layer/RMS norm parameters are per feature (the last axis): a γ/β that varies along
            // another axis (a per-channel affine after an instance norm spelled as a layer norm
            // over `[N, C, L]`) stays a separate elementwise op.
            let per_feature = |c: Id| {
                eg[c].data.ty.as_ref().is_some_and(|(shape, _)| {
                    let r = shape.len();
                    shape
                        .iter()
                        .enumerate()
                        .all(|(i, d)| i + 1 == r || d.as_known() == Some(1))
                })
            };
            if matches!(op, Op::LayerNorm { .. } | Op::RmsNorm { .. })
                && slot.is_some()
                && !per_feature(p)
            {
                continue;
            }
            // The affine term must broadcast into x without changing its shape.
            let probe: Vec<Id> = norm
                .children
                .iter()
                .enumerate()
                .map(|(i, c)| if Some(i) == slot { p } else { *c })
                .collect();
            if slot.is_some() && node_type(eg, &TNode::new(EOp::Ir(op.clone()), probe)).is_none() {
                continue;
            }
            return Some(Plan::ir(op, kids));
        }
    }
    None
}
