//! LoRA merge: `x @ W + s·((x @ A) @ B)` becomes `x @ (W + s·(A @ B))` when `W`, `A`, `B` are
//! weight-only, so the adapter costs nothing per call (`W + s·AB` is a weight-only expression,
//! folded once when the weights are known).
//!
//! Matched at the `add`, in either order; `s` is a scalar constant on either side of the `mul`
//! (algebra moves it right, and pulls it out of `(s·x) @ A` or `(x @ A)·s @ B`), or absent
//! (s = 1). The base projection is a plain `matmul` or an epilogue-free
//! `fused_matmul{act=identity [bias]}` (the bias stays: `x @ W' + b`); a bias added after the
//! adapter is absorbed by gemm's `matmul-bias` on the merged matmul, and activations and
//! residuals wrap the merged projection the usual way.
//!
//! Merging bakes one adapter into the weights; a server that swaps adapters per request keeps
//! them apart with `Options { merge_lora: false, .. }`, which leaves this family out.

use egg::Id;
use transfuse_ir::{Act, BinaryOp, Op};

use super::{node_rule, nodes_where, Plan, Rule};
use crate::analysis::{konst, node_type, shape_of, EG};
use crate::lang::{EOp, TNode};

/// The LoRA family.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        node_rule("lora-merge", lora_merge),
    ]
}

fn is(op: Op) -> impl Fn(&EOp) -> bool {
    move |e| e == &EOp::Ir(op.clone())
}

fn weight_matrix(eg: &EG, id: Id) -> bool {
    eg[id].data.weight_only && shape_of(eg, id).len() == 2
}

/// The `(s, y)` with `id = y·s` (s a scalar constant, either side) or `id = y` (s = 1).
fn scaled(eg: &EG, id: Id) -> Vec<(f64, Id)> {
    let mut out = vec![(1.0, id)];
    for m in nodes_where(eg, id, is(Op::Binary(BinaryOp::Mul))) {
        for (y, c) in [
            (m.children[0], m.children[1]),
            (m.children[1], m.children[0]),
        ] {
            if let (Some(s), true) = (konst(eg, c), shape_of(eg, c).is_empty()) {
                out.push((s, y));
            }
        }
    }
    out
}

/// The adapters `s·((x @ A) @ B)` in class `id`: (s, x, A, B).
fn adapters(eg: &EG, id: Id) -> Vec<(f64, Id, Id, Id)> {
    let mut out = vec![];
    for (s, y) in scaled(eg, id) {
        for mb in nodes_where(eg, y, is(Op::MatMul)) {
            let (h, b) = (mb.children[0], mb.children[1]);
            if !weight_matrix(eg, b) {
                continue;
            }
            for ma in nodes_where(eg, h, is(Op::MatMul)) {
                let (x, a) = (ma.children[0], ma.children[1]);
                if weight_matrix(eg, a) && !eg[x].data.weight_only {
                    out.push((s, eg.find(x), a, b));
                }
            }
        }
    }
    out
}

fn lora_merge(eg: &EG, n: &TNode) -> Option<Plan> {
    if n.ir() != Some(&Op::Binary(BinaryOp::Add)) {
        return None;
    }
    let want = node_type(eg, n)?.0;
    for (base, lora) in [
        (n.children[0], n.children[1]),
        (n.children[1], n.children[0]),
    ] {
        if eg[lora].data.weight_only {
            continue;
        }
        let adapters = adapters(eg, lora);
        if adapters.is_empty() {
            continue;
        }
        for m in &eg[base].nodes {
            let op = match m.ir() {
                Some(Op::MatMul) => Op::MatMul,
                Some(
                    op @ Op::FusedMatMul {
                        act: Act::Identity,
                        residual: false,
                        ..
                    },
                ) => op.clone(),
                _ => continue,
            };
            let (x, w) = (eg.find(m.children[0]), m.children[1]);
            if !weight_matrix(eg, w) {
                continue;
            }
            for &(s, ax, a, b) in &adapters {
                if ax != x {
                    continue;
                }
                let ab = Plan::ir(Op::MatMul, vec![Plan::Class(a), Plan::Class(b)]);
                let delta = if s == 1.0 {
                    ab
                } else {
                    Plan::ir(Op::Binary(BinaryOp::Mul), vec![ab, Plan::scalar(s)])
                };
                let merged = Plan::ir(Op::Binary(BinaryOp::Add), vec![Plan::Class(w), delta]);
                // The merged weight must keep W's shape (A @ B is [K, N] like W).
                let (ka, nb) = (shape_of(eg, a), shape_of(eg, b));
                if shape_of(eg, w) != [ka[0].clone(), nb[1].clone()] || ka[1] != nb[0] {
                    continue;
                }
                let mut kids = vec![Plan::Class(x), merged];
                kids.extend(m.children[2..].iter().map(|c| Plan::Class(*c)));
                let base_ty = node_type(eg, &TNode::new(EOp::Ir(op.clone()), m.children.clone()));
                if base_ty.is_some_and(|(out, _)| out == want) {
                    return Some(Plan::ir(op, kids));
                }
            }
        }
    }
    None
}
