//! Minimal, targeted algebra that exposes the fusion patterns.
//!
//! Tensat's lesson: blanket commutativity/associativity explodes the e-graph. These rules only
//! normalise spellings: division by a constant becomes multiplication, `1/√` becomes `rsqrt`,
//! `x²` is `x·x`, scalar constants move to the right of `add`/`mul`, two scalar scales in a row
//! fold into one, scalar scales move out of matmuls and transposes, transposes and reshapes
//! collapse, and a permute is split into a permute and a last-two-axes transpose so attention's
//! `kᵀ` is visible through multi-head reshapes. None of them fires on a constant-only class.

use egg::Subst;
use transfuse_ir::{BinaryOp, Op};

use super::{node_rule, nodes_where, rw, rw_build, var, Plan, Rule};
use crate::analysis::{konst, shape_of, EG};
use crate::lang::{EOp, TNode};

/// The algebra family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        rw("div-sqrt-to-rsqrt",   "(div ?a (sqrt ?b))",           "(mul ?a (rsqrt ?b))"),
        rw("recip-sqrt-to-rsqrt", "(recip (sqrt ?b))",            "(rsqrt ?b)"),
        rw("mul-recip-to-div",    "(mul ?a (recip ?b))",          "(div ?a ?b)"),
        rw("transpose-twice",     "(transpose (transpose ?x))",   "?x"),
        rw_build("div-const-to-mul",    "(div ?x ?c)",            div_const),
        rw_build("pow-const",           "(pow ?x ?c)",            pow_const),
        rw_build("add-const-right",     "(add ?c ?x)",            |eg, s| commute(eg, s, BinaryOp::Add)),
        rw_build("mul-const-right",     "(mul ?c ?x)",            |eg, s| commute(eg, s, BinaryOp::Mul)),
        rw_build("mul-const-fold",      "(mul (mul ?x ?a) ?b)",   fold_scales),
        rw_build("matmul-scale-left",   "(matmul (mul ?a ?c) ?b)", |eg, s| pull_scale(eg, s, "?a", "?b", true)),
        rw_build("matmul-scale-right",  "(matmul ?a (mul ?b ?c))", |eg, s| pull_scale(eg, s, "?a", "?b", false)),
        rw_build("transpose-scale",     "(transpose (mul ?k ?c))", transpose_scale),
        node_rule("permute-split-transpose", permute_split),
        node_rule("reshape-chain",            reshape_chain),
    ]
}

fn scalar_const(eg: &EG, s: &Subst, v: &str) -> Option<f64> {
    let id = s[var(v)];
    shape_of(eg, id).is_empty().then(|| konst(eg, id)).flatten()
}

fn mul(a: Plan, b: Plan) -> Plan {
    Plan::ir(Op::Binary(BinaryOp::Mul), vec![a, b])
}

fn div_const(eg: &mut EG, s: &Subst) -> Option<egg::Id> {
    let c = scalar_const(eg, s, "?c")?;
    if c == 0.0 || konst(eg, s[var("?x")]).is_some() {
        return None;
    }
    Some(mul(Plan::Class(s[var("?x")]), Plan::scalar(1.0 / c)).add(eg))
}

fn pow_const(eg: &mut EG, s: &Subst) -> Option<egg::Id> {
    let c = scalar_const(eg, s, "?c")?;
    let x = Plan::Class(s[var("?x")]);
    let un = |u| Plan::ir(Op::Unary(u), vec![x.clone()]);
    let p = match c {
        2.0 => mul(x.clone(), x.clone()),
        0.5 => un(transfuse_ir::UnaryOp::Sqrt),
        -0.5 => un(transfuse_ir::UnaryOp::Rsqrt),
        -1.0 => un(transfuse_ir::UnaryOp::Recip),
        _ => return None,
    };
    Some(p.add(eg))
}

fn commute(eg: &mut EG, s: &Subst, op: BinaryOp) -> Option<egg::Id> {
    scalar_const(eg, s, "?c")?;
    let x = s[var("?x")];
    if konst(eg, x).is_some() {
        return None;
    }
    Some(
        Plan::ir(
            Op::Binary(op),
            vec![Plan::Class(x), Plan::Class(s[var("?c")])],
        )
        .add(eg),
    )
}

/// `(x·a)·b` → `x·(ab)` for scalar constants `a`, `b` (q and k each scaled by `d^-¼`).
fn fold_scales(eg: &mut EG, s: &Subst) -> Option<egg::Id> {
    let (a, b) = (scalar_const(eg, s, "?a")?, scalar_const(eg, s, "?b")?);
    let x = s[var("?x")];
    if konst(eg, x).is_some() {
        return None;
    }
    Some(mul(Plan::Class(x), Plan::scalar(a * b)).add(eg))
}

fn pull_scale(eg: &mut EG, s: &Subst, a: &str, b: &str, _left: bool) -> Option<egg::Id> {
    scalar_const(eg, s, "?c")?;
    let mm = Plan::ir(
        Op::MatMul,
        vec![Plan::Class(s[var(a)]), Plan::Class(s[var(b)])],
    );
    Some(mul(mm, Plan::Class(s[var("?c")])).add(eg))
}

fn transpose_scale(eg: &mut EG, s: &Subst) -> Option<egg::Id> {
    scalar_const(eg, s, "?c")?;
    let t = Plan::Node(EOp::Transpose, vec![Plan::Class(s[var("?k")])]);
    Some(mul(t, Plan::Class(s[var("?c")])).add(eg))
}

/// `permute{p}(x)` → `transpose(permute{p'}(x))` where `p'` is `p` with its last two entries
/// swapped (just `transpose(x)` when `p'` is the identity).
fn permute_split(_eg: &EG, n: &TNode) -> Option<Plan> {
    let Some(Op::Permute { perm }) = n.ir() else {
        return None;
    };
    let r = perm.len();
    if r < 2 {
        return None;
    }
    let mut p = perm.clone();
    p.swap(r - 1, r - 2);
    let x = Plan::Class(n.children[0]);
    let inner = if p.iter().enumerate().all(|(i, &v)| i == v) {
        x
    } else {
        Plan::ir(Op::Permute { perm: p }, vec![x])
    };
    Some(Plan::Node(EOp::Transpose, vec![inner]))
}

/// `reshape(reshape(x))` → `reshape(x)`; `reshape(x)` to x's own shape → `x`.
fn reshape_chain(eg: &EG, n: &TNode) -> Option<Plan> {
    let Some(Op::Reshape { shape }) = n.ir() else {
        return None;
    };
    let x = n.children[0];
    if &shape_of(eg, x) == shape {
        return Some(Plan::Class(x));
    }
    let inner = nodes_where(eg, x, |op| matches!(op, EOp::Ir(Op::Reshape { .. }))).next()?;
    Some(Plan::ir(
        Op::Reshape {
            shape: shape.clone(),
        },
        vec![Plan::Class(inner.children[0])],
    ))
}
