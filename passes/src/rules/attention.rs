//! Attention fusion: `matmul(softmax{scale}(matmul(q, kᵀ) [, mask]), v)` → `attention`.
//!
//! The scale may sit on the scores, on q or on k (algebra moves it out of the matmul and the
//! transpose), `kᵀ` may be spelled as any permute whose last two axes are swapped (algebra
//! splits it), and multi-head reshapes/permutes around q, k, v stay outside the fused op.
//! A mask of the form `where(kpos <= qpos, m, −big)` built from iotas (a causal mask with the
//! query positions offset by the cache length) becomes the `causal` flag, keeping only `m`;
//! a sliding window nested in it, `where(kpos + W > qpos, m, −big)` on the same iotas
//! (Hugging Face's `i − W < j ≤ i`), becomes `window = W` as well.
//! K/V repeated per query head as transformers' `repeat_kv` spells it (reshape
//! `[b, kvh, 1, s, d]`, expand `[b, kvh, g, s, d]`, reshape `[b, kvh·g, s, d]`) are absorbed:
//! the attention reads the `kvh` heads directly (grouped-query attention).
//! Refuses when q, k, v do not share batch dims (the fused op does not broadcast them) other
//! than through `repeat_kv`.

use transfuse_ir::{BinaryOp, CmpOp, Dim, Op};

use super::{node_rule, nodes_where, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::cost::Sizes;
use crate::lang::{EOp, TNode};
use crate::rules::softmax::MASK_FILL_MAX;

/// The attention family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        node_rule("attention-from-softmax", from_softmax),
        node_rule("attention-causal-iota",  causal_from_iota),
        node_rule("attention-repeat-kv",    absorb_repeat_kv),
    ]
}

/// `attention`: `4·sq·sk·d` per batch and head (the two matmuls).
pub fn flops(op: &Op, s: &Sizes) -> Option<f64> {
    matches!(op, Op::Attention { .. }).then(|| 4.0 * s.numel(&s.kids[0].0) * s.dim_from_end(1, 2))
}

/// Class `id` holds transformers' `repeat_kv` of some `x [.., kvh, s, d]`: reshape to
/// `[.., kvh, 1, s, d]`, expand to `[.., kvh, g, s, d]`, reshape to `[.., kvh·g, s, d]`;
/// returns `(x, g)`.
fn repeat_kv_of(eg: &EG, id: egg::Id) -> Option<(egg::Id, usize)> {
    let out = shape_of(eg, id);
    let r = out.len();
    if r < 3 {
        return None;
    }
    for outer in nodes_where(eg, id, |op| matches!(op, EOp::Ir(Op::Reshape { .. }))) {
        for ex in nodes_where(eg, outer.children[0], |op| {
            matches!(op, EOp::Ir(Op::Expand { .. }))
        }) {
            let big = shape_of(eg, outer.children[0]);
            for inner in nodes_where(eg, ex.children[0], |op| {
                matches!(op, EOp::Ir(Op::Reshape { .. }))
            }) {
                let one = shape_of(eg, ex.children[0]);
                let x = inner.children[0];
                let xs = shape_of(eg, x);
                if xs.len() != r || one.len() != r + 1 || big.len() != r + 1 {
                    continue;
                }
                // [.., kvh, s, d] → [.., kvh, 1, s, d] → [.., kvh, g, s, d] → [.., kvh·g, s, d]
                let (kvh, g) = (xs[r - 3].as_known(), big[r - 2].as_known());
                let (Some(kvh), Some(g)) = (kvh, g) else {
                    continue;
                };
                let lead = &xs[..r - 2];
                let ok = one[..r - 2] == *lead
                    && one[r - 2].is(1)
                    && one[r - 1..] == xs[r - 2..]
                    && big[..r - 2] == *lead
                    && big[r - 1..] == xs[r - 2..]
                    && out[..r - 3] == xs[..r - 3]
                    && out[r - 3].is(kvh * g)
                    && out[r - 2..] == xs[r - 2..];
                if ok && g >= 1 {
                    return Some((x, g));
                }
            }
        }
    }
    None
}

/// `attention(q, repeat_kv(k, g), repeat_kv(v, g) [, mask])` → `attention(q, k, v [, mask])`
/// with k/v read per key/value head (grouped-query attention): the repeated K/V are never
/// materialised. Any flags (causal, window) are kept, so this and `attention-causal-iota`
/// apply in either order.
fn absorb_repeat_kv(eg: &EG, n: &TNode) -> Option<Plan> {
    let op @ Op::Attention { .. } = n.ir()? else {
        return None;
    };
    let (k, g) = repeat_kv_of(eg, n.children[1])?;
    let (v, gv) = repeat_kv_of(eg, n.children[2])?;
    if g != gv || g < 2 {
        return None;
    }
    let mut kids = n.children.clone();
    kids[1] = k;
    kids[2] = v;
    let node = TNode::new(EOp::Ir(op.clone()), kids.clone());
    node_type(eg, &node)?;
    Some(Plan::ir(
        op.clone(),
        kids.into_iter().map(Plan::Class).collect(),
    ))
}

fn from_softmax(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::MatMul) {
        return None;
    }
    let (p, v) = (n.children[0], n.children[1]);
    for sm in nodes_where(eg, p, |op| matches!(op, EOp::Ir(Op::Softmax { .. }))) {
        let Some(Op::Softmax { scale }) = sm.ir() else {
            continue;
        };
        for mm in nodes_where(eg, sm.children[0], |op| op == &EOp::Ir(Op::MatMul)) {
            for t in nodes_where(eg, mm.children[1], |op| op == &EOp::Transpose) {
                let mut kids = vec![mm.children[0], t.children[0], v];
                kids.extend(sm.children.get(1));
                let op = Op::Attention {
                    scale: *scale,
                    causal: false,
                    window: None,
                };
                let node = TNode::new(EOp::Ir(op.clone()), kids.clone());
                if node_type(eg, &node).is_some() {
                    return Some(Plan::ir(op, kids.into_iter().map(Plan::Class).collect()));
                }
            }
        }
    }
    None
}

/// True if class `id` holds `iota(start, len)`, optionally under a reshape; returns (start, len).
fn iota_of(eg: &EG, id: egg::Id, through_reshape: bool) -> Option<(Dim, Dim)> {
    for n in &eg[id].nodes {
        match n.ir() {
            Some(Op::Iota { start, len }) => return Some((start.clone(), len.clone())),
            Some(Op::Reshape { .. }) if through_reshape => {
                if let Some(found) = iota_of(eg, n.children[0], false) {
                    return Some(found);
                }
            }
            _ => {}
        }
    }
    None
}

/// The value of an integer (i64) constant class (the analysis folds f32 constants only).
fn int_const(eg: &EG, id: egg::Id) -> Option<i64> {
    eg[id].nodes.iter().find_map(|n| match n.ir() {
        Some(Op::Constant {
            value,
            dtype: transfuse_ir::DType::I64,
        }) => Some(value.0 as i64),
        _ => None,
    })
}

/// Hugging Face's sliding window under a causal mask: class `keep` holds
/// `where(kpos + W > qpos, m, −big)` (or `qpos < kpos + W`) over the causal condition's own
/// `kpos` and `qpos` classes, with `W ≥ 1` an integer constant; returns `(W, m)`.
fn window_of(eg: &EG, keep: egg::Id, kpos: egg::Id, qpos: egg::Id) -> Option<(usize, egg::Id)> {
    let same = |a: egg::Id, b: egg::Id| eg.find(a) == eg.find(b);
    // `kpos + W` with W a positive integer.
    let shifted = |id: egg::Id| -> Option<usize> {
        nodes_where(eg, id, |op| op == &EOp::Ir(Op::Binary(BinaryOp::Add))).find_map(|a| {
            let [x, y] = a.children[..] else {
                return None;
            };
            let w = [(x, y), (y, x)]
                .into_iter()
                .find_map(|(p, c)| same(p, kpos).then(|| int_const(eg, c)).flatten())?;
            (1..u32::MAX as i64).contains(&w).then_some(w as usize)
        })
    };
    for w in nodes_where(eg, keep, |op| op == &EOp::Ir(Op::Where)) {
        let [cond, inner, fill] = w.children[..] else {
            continue;
        };
        if !konst(eg, fill).is_some_and(|f| f <= MASK_FILL_MAX) {
            continue;
        }
        for c in &eg[cond].nodes {
            let found = match c.ir() {
                Some(Op::Compare(CmpOp::Gt)) if same(c.children[1], qpos) => shifted(c.children[0]),
                Some(Op::Compare(CmpOp::Lt)) if same(c.children[0], qpos) => shifted(c.children[1]),
                _ => None,
            };
            if let Some(window) = found {
                return Some((window, inner));
            }
        }
    }
    None
}

fn causal_from_iota(eg: &EG, n: &TNode) -> Option<Plan> {
    let Some(Op::Attention {
        scale,
        causal: false,
        window: None,
    }) = n.ir()
    else {
        return None;
    };
    let [q, k, v, m] = n.children[..] else {
        return None;
    };
    let (qs, ks) = (shape_of(eg, q), shape_of(eg, k));
    let (sq, sk) = (qs[qs.len() - 2].clone(), ks[ks.len() - 2].clone());
    for w in nodes_where(eg, m, |op| op == &EOp::Ir(Op::Where)) {
        let [cond, keep, fill] = w.children[..] else {
            continue;
        };
        if !konst(eg, fill).is_some_and(|f| f <= MASK_FILL_MAX) {
            continue;
        }
        for c in nodes_where(eg, cond, |op| op == &EOp::Ir(Op::Compare(CmpOp::Le))) {
            let (Some((k0, klen)), Some((qstart, qlen))) = (
                iota_of(eg, c.children[0], false),
                iota_of(eg, c.children[1], true),
            ) else {
                continue;
            };
            // keys 0..sk against queries (sk - sq)..sk laid out as a column [sq, 1].
            let qshape = shape_of(eg, c.children[1]);
            let column = qshape.len() == 2 && qshape[1].is(1);
            if k0.is(0) && klen == sk && qlen == sq && qstart == sk.minus(&sq) && column {
                // A sliding window inside: where(kpos + W > qpos, m, −big) on the same iotas.
                let (window, keep) = match window_of(eg, keep, c.children[0], c.children[1]) {
                    Some((w, inner)) => (Some(w), inner),
                    None => (None, keep),
                };
                let op = Op::Attention {
                    scale: *scale,
                    causal: true,
                    window,
                };
                let mut kids = vec![Plan::Class(q), Plan::Class(k), Plan::Class(v)];
                if konst(eg, keep) != Some(0.0) {
                    kids.push(Plan::Class(keep));
                }
                return Some(Plan::ir(op, kids));
            }
        }
    }
    None
}
