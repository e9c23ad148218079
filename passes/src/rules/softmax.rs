//! Softmax fusion, in two stages. First the primitive spellings (`exp(x − max x) / Σ exp`, with
//! or without the max subtraction, `× recip(Σ)` via algebra) become a plain `softmax` (scale 1,
//! no mask). Then a scale (`×c`; `÷c`, `÷√d`, `×rsqrt(d)` reach here as `×c` through constant
//! folding) and an additive mask (`+m`; masks applied with `where(cond, x, −big)` are first
//! turned into `x + where(cond, 0, −big)`) are absorbed into the fused op.
//!
//! A mask is absorbed only if it broadcasts into the scores; a where-mask only if its fill is
//! at most −1e30 (−inf, `finfo(f32).min`), where `x + fill` and `fill` are the same after
//! softmax.

use egg::{Id, Subst};
use transfuse_ir::{Op, Scalar};

use super::{rw, rw_build, var, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::lang::TNode;

/// The softmax family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rw("softmax-stable",  "(div (exp (sub ?x (row_max ?x))) (row_sum (exp (sub ?x (row_max ?x)))))", "(softmax ?x)"),
        rw("softmax-naive",   "(div (exp ?x) (row_sum (exp ?x)))",   "(softmax ?x)"),
        rw("softmax-shift",   "(softmax (sub ?x (row_max ?x)))",      "(softmax ?x)"),
        rw_build("softmax-where-mask",     "(softmax (where ?c ?x ?n))",        |eg, s| where_to_add(eg, s, false)),
        rw_build("softmax-where-mask-neg", "(softmax (where ?c ?n ?x))",        |eg, s| where_to_add(eg, s, true)),
        rw_build("softmax-scale",          "(softmax (mul ?x ?k))",             |eg, s| fuse(eg, s, Some("?k"), None)),
        rw_build("softmax-mask",           "(softmax (add ?x ?m))",             |eg, s| fuse(eg, s, None, Some("?m"))),
        rw_build("softmax-mask-first",     "(softmax (add ?m ?x))",             |eg, s| fuse(eg, s, None, Some("?m"))),
        rw_build("softmax-scale-mask",     "(softmax (add (mul ?x ?k) ?m))",    |eg, s| fuse(eg, s, Some("?k"), Some("?m"))),
        rw_build("softmax-mask-scale",     "(softmax (add ?m (mul ?x ?k)))",    |eg, s| fuse(eg, s, Some("?k"), Some("?m"))),
    ]
}

/// The fill value that makes `where` a mask.
pub const MASK_FILL_MAX: f64 = -1e30;

fn where_to_add(eg: &mut EG, s: &Subst, fill_first: bool) -> Option<Id> {
    let fill = s[var("?n")];
    if !konst(eg, fill).is_some_and(|v| v <= MASK_FILL_MAX) {
        return None;
    }
    let zero = Plan::scalar(0.0);
    let (a, b) = if fill_first {
        (Plan::Class(fill), zero)
    } else {
        (zero, Plan::Class(fill))
    };
    let mask = Plan::ir(Op::Where, vec![Plan::Class(s[var("?c")]), a, b]);
    let sum = Plan::ir(
        Op::Binary(transfuse_ir::BinaryOp::Add),
        vec![Plan::Class(s[var("?x")]), mask],
    );
    Some(Plan::ir(Op::Softmax { scale: Scalar(1.0) }, vec![sum]).add(eg))
}

fn fuse(eg: &mut EG, s: &Subst, scale: Option<&str>, mask: Option<&str>) -> Option<Id> {
    let x = s[var("?x")];
    let scale = match scale {
        Some(k) => {
            let k = s[var(k)];
            if !shape_of(eg, k).is_empty() {
                return None;
            }
            konst(eg, k)?
        }
        None => 1.0,
    };
    let mut kids = vec![x];
    if let Some(m) = mask {
        kids.push(s[var(m)]);
    }
    let node = TNode::new(
        crate::lang::EOp::Ir(Op::Softmax {
            scale: Scalar(scale),
        }),
        kids,
    );
    // The scores must keep their shape: the mask broadcasts into them, never the reverse.
    let (out, _) = node_type(eg, &node)?;
    if out != shape_of(eg, x) || konst(eg, x).is_some() {
        return None;
    }
    Some(eg.add(node))
}
