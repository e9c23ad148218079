//! Conversion between `ir::Graph` and the e-graph.
//!
//! Into the e-graph: nodes in topological order; reductions over the last axis with keepdim
//! become `row_*` and permutes swapping the last two axes `transpose` (rank-independent forms
//! for the rules); identical nodes merge (common-subexpression elimination for free); a root
//! `outputs` node holds the outputs in order. Out of it: the extracted term, back to IR ops,
//! re-inferred by `Graph::add`, outputs renamed as before.

use std::collections::HashMap;

use egg::{Id, RecExpr};
use transfuse_ir::{Graph, IrError, Op};

use crate::analysis::EG;
use crate::lang::{EOp, TNode};

/// Adds `g` to `eg`; returns the root class.
pub fn to_egraph(g: &Graph, eg: &mut EG) -> Id {
    let ids: Vec<Id> = add_nodes(g, eg).into_iter().map(|(id, _)| id).collect();
    let outs = g.outputs().iter().map(|(_, id)| ids[id.index()]).collect();
    eg.add(TNode::new(EOp::Outputs, outs))
}

/// Adds `g`'s nodes to `eg`: per graph node, in order, its class and its e-node.
pub fn add_nodes(g: &Graph, eg: &mut EG) -> Vec<(Id, TNode)> {
    let mut ids: Vec<(Id, TNode)> = Vec::with_capacity(g.len());
    for (_, n) in g.nodes() {
        let rank = n.shape.len();
        let op = match &n.op {
            Op::Reduce {
                op,
                axes,
                keepdim: true,
            } if rank > 0 && axes[..] == [rank - 1] => EOp::Row(*op),
            Op::Permute { perm }
                if perm.len() >= 2
                    && perm[..perm.len() - 2]
                        .iter()
                        .enumerate()
                        .all(|(i, &p)| i == p)
                    && perm[perm.len() - 2] == perm.len() - 1 =>
            {
                EOp::Transpose
            }
            op => EOp::Ir(op.clone()),
        };
        let kids = n.inputs.iter().map(|i| ids[i.index()].0).collect();
        let t = TNode::new(op, kids);
        ids.push((eg.add(t.clone()), t));
    }
    ids
}

/// Rebuilds an IR graph from an extracted term; output names come from `names`, in order.
pub fn from_recexpr(expr: &RecExpr<TNode>, names: &[String]) -> Result<Graph, IrError> {
    let mut g = Graph::new();
    let mut map: HashMap<usize, transfuse_ir::NodeId> = HashMap::new();
    for (i, n) in expr.as_ref().iter().enumerate() {
        let kids: Vec<_> = n.children.iter().map(|c| map[&usize::from(*c)]).collect();
        let op = match &n.op {
            EOp::Outputs => {
                for (name, id) in names.iter().zip(&kids) {
                    g.set_output(name, *id);
                }
                continue;
            }
            EOp::Row(r) => {
                let rank = g.node(kids[0]).shape.len();
                Op::Reduce {
                    op: *r,
                    axes: vec![rank.saturating_sub(1)],
                    keepdim: true,
                }
            }
            EOp::Transpose => {
                let rank = g.node(kids[0]).shape.len();
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(rank - 1, rank - 2);
                Op::Permute { perm }
            }
            EOp::Ir(op) => op.clone(),
        };
        map.insert(i, g.add(op, &kids)?);
    }
    Ok(g)
}
