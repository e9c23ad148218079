//! Weight folding: evaluates once, at load, every sub-expression that depends only on weights
//! and constants (transposed weights, QKV-merged concatenations, LoRA-merged weights,
//! batch-norm scale/shift) and turns it into a new weight, so no call recomputes it.
//!
//! Only the frontier is kept: weight-only nodes that a non-weight-only node (or an output)
//! reads. Folded weights are named `__folded.<node>`; plain weights and scalar constants stay
//! as they are.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_ir::{Graph, NodeId, Op, Weights};

use crate::{Backend, CpuBackend, RuntimeError, TensorMap};

/// The folded graph and its weights (the originals plus the folded ones).
pub fn fold_weights(g: &Graph, weights: &Weights) -> Result<(Graph, Weights), RuntimeError> {
    let mut weight_only = vec![false; g.len()];
    for (id, n) in g.nodes() {
        weight_only[id.index()] = match n.op {
            Op::Weight { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Iota { .. } => false,
            _ => n.inputs.iter().all(|i| weight_only[i.index()]),
        };
    }
    let mut frontier = vec![false; g.len()];
    for (id, n) in g.nodes() {
        if !weight_only[id.index()] {
            for i in &n.inputs {
                frontier[i.index()] |= weight_only[i.index()];
            }
        }
    }
    for (_, o) in g.outputs() {
        frontier[o.index()] |= weight_only[o.index()];
    }
    let to_fold: Vec<NodeId> = g
        .nodes()
        .filter(|(id, n)| {
            frontier[id.index()] && !matches!(n.op, Op::Weight { .. } | Op::Constant { .. })
        })
        .map(|(id, _)| id)
        .collect();
    if to_fold.is_empty() {
        return Ok((g.clone(), weights.clone()));
    }
    // The weight-only part of the graph, with the nodes to fold as outputs.
    let mut sub = Graph::new();
    let mut sub_id: HashMap<NodeId, NodeId> = HashMap::new();
    for (id, n) in g.nodes() {
        if weight_only[id.index()] {
            let ins: Vec<NodeId> = n.inputs.iter().map(|i| sub_id[i]).collect();
            sub_id.insert(id, sub.add(n.op.clone(), &ins)?);
        }
    }
    for id in &to_fold {
        sub.set_output(&format!("__folded.{}", id.0), sub_id[id]);
    }
    let folded = CpuBackend::new().run(&sub, weights, &TensorMap::new())?;
    let mut out_w = weights.clone();
    let mut out = Graph::new();
    let mut new_id: HashMap<NodeId, NodeId> = HashMap::new();
    for (id, n) in g.nodes() {
        if weight_only[id.index()] && !frontier[id.index()] {
            continue;
        }
        let op = if to_fold.contains(&id) {
            let name = format!("__folded.{}", id.0);
            let t = folded[&name].clone();
            out_w.insert(name.clone(), Arc::new(t));
            Op::Weight {
                name,
                shape: n.shape.clone(),
            }
        } else {
            n.op.clone()
        };
        let ins: Vec<NodeId> = if matches!(op, Op::Weight { .. }) {
            vec![]
        } else {
            n.inputs.iter().map(|i| new_id[i]).collect()
        };
        new_id.insert(id, out.add(op, &ins)?);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, new_id[id]);
    }
    Ok((out, out_w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use transfuse_ir::{shape, Builder, DType, Dim, Tensor, WeightLayout};

    #[test]
    fn transposed_and_merged_weights_are_computed_once() {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("n"), 2.into()], DType::F32)
            .unwrap();
        let w = b.weight("w", shape([3usize, 2])).unwrap();
        let w2 = b.weight("w2", shape([3usize, 2])).unwrap();
        let cat = b.concat(&[w, w2], 0).unwrap();
        let y = b.linear(x, cat, None, WeightLayout::OutIn).unwrap();
        b.output("y", y);
        let g = b.finish();
        let weights: Weights = [
            (
                "w".to_string(),
                Arc::new(Tensor::f32(vec![3, 2], vec![1., 2., 3., 4., 5., 6.])),
            ),
            (
                "w2".to_string(),
                Arc::new(Tensor::f32(vec![3, 2], vec![0., 1., 0., 1., 0., 1.])),
            ),
        ]
        .into();
        let (fg, fw) = fold_weights(&g, &weights).unwrap();
        let ops = fg.op_counts();
        assert!(
            !ops.contains_key("permute") && !ops.contains_key("concat"),
            "{ops:?}"
        );
        assert_eq!(ops["weight"], 1);
        let inputs: TensorMap = [("x".to_string(), Tensor::f32(vec![1, 2], vec![1., -1.]))].into();
        let cpu = CpuBackend::new();
        let a = cpu.run(&g, &weights, &inputs).unwrap();
        let b = cpu.run(&fg, &fw, &inputs).unwrap();
        assert_eq!(a["y"], b["y"]);
        assert_eq!(a["y"].as_f32().unwrap(), &[-1., -1., -1., -1., -1., -1.]);
    }
}
