//! Fused ops back to primitives: the decomposition every fused op is held equal to.
//!
//! [`decompose`] rewrites a graph so that every fused op (see [`Op::is_fused`](crate::Op::is_fused))
//! becomes its primitive spelling, each op's own decomposition in `fused.rs`. Primitive nodes,
//! inputs, weights and outputs are copied as they are, in order.

use std::collections::HashMap;

use crate::builder::Builder;
use crate::graph::{Graph, NodeId};
use crate::IrError;

/// An equivalent graph with every fused op replaced by its primitive decomposition (each
/// op's own, in `fused.rs`: e.g. `attention` → `matmul(softmax(matmul(q, kᵀ)·scale + m), v)`
/// with causal / window masks from `iota` comparisons; `fused_matmul` → `act(x @ w + b) + r`).
/// A decomposition that needs a dim it cannot know (group norm's `C`) is an
/// [`IrError::Shape`] naming the fused op.
pub fn decompose(g: &Graph) -> Result<Graph, IrError> {
    let mut b = Builder::new();
    let mut map: HashMap<NodeId, NodeId> = HashMap::with_capacity(g.len());
    for (id, node) in g.nodes() {
        let args: Vec<NodeId> = node.inputs.iter().map(|i| map[i]).collect();
        let new = if node.op.is_fused() {
            let def = crate::fused::def(&node.op).expect("is_fused");
            (def.decompose)(&mut b, &node.op, &args).map_err(|e| match e {
                IrError::Shape { op, msg, .. } => IrError::Shape {
                    op: node.op.name(),
                    node: id.0,
                    msg: format!("decomposing via `{op}`: {msg}"),
                },
                e => e,
            })?
        } else {
            b.op(node.op.clone(), &args)?
        };
        map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        b.output(name, map[id]);
    }
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::shape;
    use crate::dim::Dim;
    use crate::op::Op;
    use crate::op::{DType, Scalar};
    use crate::print::to_text;

    #[test]
    fn primitive_graphs_come_back_unchanged() {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("batch"), 4.into()], DType::F32)
            .unwrap();
        let g = b.weight("g", shape([4usize])).unwrap();
        let beta = b.weight("b", shape([4usize])).unwrap();
        let y = b.layer_norm(x, g, beta, 1e-5).unwrap();
        let z = b.gelu_tanh(y).unwrap();
        b.output("z", z);
        b.output("y", y);
        let graph = b.finish();
        assert_eq!(to_text(&decompose(&graph).unwrap()), to_text(&graph));
    }

    #[test]
    fn fused_ops_leave_no_fused_node() {
        let mut g = Graph::new();
        let (bt, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
        let inp = |g: &mut Graph, name: &str, sh: Vec<Dim>| {
            g.add(
                Op::Input {
                    name: name.into(),
                    shape: sh,
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap()
        };
        let q = inp(&mut g, "q", vec![bt.clone(), 2.into(), s.clone(), 8.into()]);
        let k = inp(
            &mut g,
            "k",
            vec![bt.clone(), 2.into(), p.plus(&s), 8.into()],
        );
        let a = g
            .add(
                Op::Attention {
                    scale: Scalar(0.5),
                    causal: true,
                    window: Some(3),
                },
                &[q, k, k],
            )
            .unwrap();
        let x = inp(&mut g, "x", vec![bt.clone(), 4.into(), 6.into()]);
        let gamma = inp(&mut g, "gamma", shape([4usize, 1]));
        let gn = g
            .add(
                Op::GroupNorm {
                    groups: 2,
                    eps: Scalar(1e-5),
                },
                &[x, gamma, gamma],
            )
            .unwrap();
        g.set_output("a", a);
        g.set_output("gn", gn);
        let d = decompose(&g).unwrap();
        assert!(d.nodes().all(|(_, n)| !n.op.is_fused()));
        let text = to_text(&d);
        assert!(text.contains("iota{start=past len=seq}"), "{text}");
        assert!(text.contains("reshape{[batch, 2, 12]}"), "{text}");
        assert_eq!(d.outputs().len(), 2);
        let a_out = d.node(d.outputs()[0].1);
        assert_eq!(a_out.shape, g.node(a).shape);
    }

    #[test]
    fn group_norm_with_symbolic_channels_is_a_shape_error() {
        let mut g = Graph::new();
        let x = g
            .add(
                Op::Input {
                    name: "x".into(),
                    shape: vec![2.into(), 4.into(), Dim::sym("len")],
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap();
        let n = g
            .add(
                Op::GroupNorm {
                    groups: 2,
                    eps: Scalar(1e-5),
                },
                &[x, x, x],
            )
            .unwrap();
        g.set_output("y", n);
        let e = decompose(&g).unwrap_err();
        assert!(
            matches!(&e, IrError::Shape { op, node: 1, .. } if op == "group_norm"),
            "{e}"
        );
    }
}
