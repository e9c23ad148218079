//! The pipeline cut: stages balanced by the cost model, one value crossing each boundary,
//! each stage with only its layers' weights, bad degrees named; and the shape rules of the
//! point-to-point and reduce-scatter collectives.

use transfuse_ir::{shape, DType, Dim, DistOp, Graph, Op};
use transfuse_passes::pipeline::{cut, PipelineError};
use transfuse_passes::Profile;

/// `x [batch, 64]` through 4 layers of matmuls; layer 0 has `heavy` matmuls, the others one.
fn layered(heavy: usize) -> Graph {
    let mut g = Graph::new();
    let mut x = g
        .add(
            Op::Input {
                name: "x".into(),
                shape: vec![Dim::sym("batch"), Dim::known(64)],
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    for l in 0..4 {
        let k = if l == 0 { heavy } else { 1 };
        for j in 0..k {
            let w = g
                .add(
                    Op::Weight {
                        name: format!("layers.{l}.w{j}"),
                        shape: shape([64usize, 64]),
                    },
                    &[],
                )
                .unwrap();
            x = g.add(Op::MatMul, &[x, w]).unwrap();
        }
    }
    g.set_output("y", x);
    g
}

fn weights(g: &Graph) -> Vec<String> {
    g.weights().iter().map(|(n, _)| n.to_string()).collect()
}

#[test]
fn stages_are_balanced_by_cost() {
    let p = cut(&layered(3), 2, &Profile::cpu()).unwrap();
    assert_eq!(p.layers, 4);
    // Layer 0 costs 3 of 6 units: it alone is the first stage.
    let ranges: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(ranges, vec![0..1, 1..4]);
    assert!((p.stages[0].cost - p.stages[1].cost).abs() < 1e-12 * p.stages[0].cost.max(1.0));
    // With equal layers the cut is in the middle.
    let p = cut(&layered(1), 2, &Profile::cpu()).unwrap();
    let ranges: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(ranges, vec![0..2, 2..4]);
    // One activation crosses; each stage reads only its layers' weights.
    assert_eq!(p.stages[0].send.len(), 1);
    assert_eq!(p.stages[1].recv, p.stages[0].send);
    assert_eq!(weights(&p.stages[0].graph).len(), 2);
    assert!(weights(&p.stages[1].graph)
        .iter()
        .all(|w| w.starts_with("layers.2.") || w.starts_with("layers.3.")));
    assert_eq!(p.stages[1].graph.outputs()[0].0, "y");
    let b = transfuse_ir::Bindings::from([("batch".to_string(), 2)]);
    assert_eq!(p.send_bytes(0, &b).unwrap(), 2 * 64 * 4);
}

#[test]
fn more_stages_than_layers_is_an_error_naming_the_flag() {
    let err = cut(&layered(1), 5, &Profile::cpu()).unwrap_err();
    assert!(matches!(
        err,
        PipelineError::Degree {
            stages: 5,
            layers: 4
        }
    ));
    assert!(err.to_string().contains("--pp 5"), "{err}");
    assert!(cut(&layered(1), 0, &Profile::cpu()).is_err());
}

#[test]
fn reduce_scatter_send_recv_shapes() {
    let mut g = Graph::new();
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                shape: shape([2usize, 4]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    let rs = g
        .add(Op::Dist(DistOp::ReduceScatter { axis: 1, world: 2 }), &[x])
        .unwrap();
    assert_eq!(g.node(rs).shape, shape([2usize, 2]));
    assert!(g
        .add(Op::Dist(DistOp::ReduceScatter { axis: 1, world: 3 }), &[x])
        .is_err());
    for op in [DistOp::Send { peer: 1 }, DistOp::Recv { peer: 0 }] {
        let y = g.add(Op::Dist(op), &[x]).unwrap();
        assert_eq!(g.node(y).shape, shape([2usize, 4]));
        assert_eq!(g.node(y).op.name(), op.name());
        g.set_output(op.name(), y);
    }
    g.set_output("rs", rs);
    // Cost: the reduce-scatter's ring moves (N−1)/N of its 32-byte input per rank; the send
    // its whole 32-byte operand over the link; the recv nothing more.
    let c = transfuse_passes::shard::comm_cost(&g, &Default::default(), 2).unwrap();
    assert_eq!((c.reduce_scatters, c.reduce_scatter_bytes), (1, 32));
    assert_eq!((c.sends, c.send_bytes), (1, 32));
    assert!((c.per_rank_ring - 16.0).abs() < 1e-9);
    assert!((c.per_rank_p2p - 32.0).abs() < 1e-9);
}
