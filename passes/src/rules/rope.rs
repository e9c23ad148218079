//! Rotary position embedding: `x·cos + rotate_half(x)·sin` → `rope(x, cos, sin)`.
//!
//! `rotate_half(x)` is transformers' `concat([−x[.., d/2..d], x[.., 0..d/2]], axis = last)`
//! (`neg` of the upper slice first). The sum, both products and the concat may be spelled in
//! either operand order (`cos·x`, `sin·rotate_half(x)`, `rot·sin + x·cos`); cos and sin are any
//! classes that broadcast to `x` (tables computed in the graph from positions, or inputs).
//! Refuses when the two slices are not of the same `x`, do not split its last axis in halves,
//! or `x`'s last dim is not known.

use egg::Id;
use transfuse_ir::{BinaryOp, Op, UnaryOp};

use super::{node_rule, nodes_where, Plan, Rule};
use crate::analysis::{node_type, shape_of, EG};
use crate::cost::Sizes;
use crate::lang::{EOp, TNode};

/// The rope family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        node_rule("rope-rotate-half", from_rotate_half),
    ]
}

/// `rope`: two multiplies and an add per element.
pub fn flops(op: &Op, s: &Sizes) -> Option<f64> {
    matches!(op, Op::Rope).then(|| 3.0 * s.numel(s.out))
}

/// Class `id` holds `concat([neg(slice(x, last, h..2h)), slice(x, last, 0..h)], last)` with
/// `2h` x's last dim; returns `x`.
fn rotate_half_of(eg: &EG, id: Id) -> Option<Id> {
    let same = |a: Id, b: Id| eg.find(a) == eg.find(b);
    let slice_of = |id: Id, lo: bool| -> Vec<(Id, usize, usize)> {
        nodes_where(eg, id, |op| matches!(op, EOp::Ir(Op::Slice { .. })))
            .filter_map(|n| {
                let Some(Op::Slice { axis, start, end }) = n.ir() else {
                    return None;
                };
                let x = n.children[0];
                let xs = shape_of(eg, x);
                let d = xs.last()?.as_known()?;
                let (s, e) = (start.as_known()?, end.as_known()?);
                let half = d / 2;
                let want = if lo { (0, half) } else { (half, d) };
                (*axis + 1 == xs.len() && d.is_multiple_of(2) && (s, e) == want)
                    .then_some((x, *axis, d))
            })
            .collect()
    };
    for c in nodes_where(eg, id, |op| matches!(op, EOp::Ir(Op::Concat { .. }))) {
        let (Some(Op::Concat { axis }), [neg, lo]) = (c.ir(), &c.children[..]) else {
            continue;
        };
        for n in nodes_where(eg, *neg, |op| op == &EOp::Ir(Op::Unary(UnaryOp::Neg))) {
            for (x, a, _) in slice_of(n.children[0], false) {
                if a != *axis {
                    continue;
                }
                if slice_of(*lo, true).iter().any(|(x2, _, _)| same(*x2, x)) {
                    return Some(x);
                }
            }
        }
    }
    None
}

fn from_rotate_half(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Add)) {
        return None;
    }
    let same = |a: Id, b: Id| eg.find(a) == eg.find(b);
    let is_mul = |op: &EOp| op == &EOp::Ir(Op::Binary(BinaryOp::Mul));
    let [a, b] = n.children[..] else {
        return None;
    };
    for (xcos, rsin) in [(a, b), (b, a)] {
        for m2 in nodes_where(eg, rsin, is_mul) {
            let [p, q] = m2.children[..] else { continue };
            for (rot, sin) in [(p, q), (q, p)] {
                let Some(x) = rotate_half_of(eg, rot) else {
                    continue;
                };
                for m1 in nodes_where(eg, xcos, is_mul) {
                    let [p, q] = m1.children[..] else { continue };
                    for (xx, cos) in [(p, q), (q, p)] {
                        if !same(xx, x) {
                            continue;
                        }
                        let kids = vec![x, cos, sin];
                        let node = TNode::new(EOp::Ir(Op::Rope), kids.clone());
                        if node_type(eg, &node).is_some() {
                            return Some(Plan::ir(
                                Op::Rope,
                                kids.into_iter().map(Plan::Class).collect(),
                            ));
                        }
                    }
                }
            }
        }
    }
    None
}
