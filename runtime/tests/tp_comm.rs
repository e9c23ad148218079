//! The in-process communicator and the multi-rank runner: collectives' results, the world of
//! one, a failing rank ending every rank with its error, a rank that never arrives timing out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use transfuse_ir::{shape, DType, DistOp, Graph, Op, Tensor, Weights};
use transfuse_runtime::comm::{CollectiveKind, Communicator, InProcessComm, InProcessGroup};
use transfuse_runtime::tp::TpLoaded;
use transfuse_runtime::{Backend, CpuBackend, KernelTime, Loaded, RuntimeError, TensorMap};

/// `x` → `all_reduce(x)` and `all_gather(x, axis 1)` and `shard(x, axis 1)`.
fn dist_graph(world: usize) -> Graph {
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
    let r = g.add(Op::Dist(DistOp::AllReduce), &[x]).unwrap();
    let ga = g
        .add(Op::Dist(DistOp::AllGather { axis: 1, world }), &[x])
        .unwrap();
    g.set_output("sum", r);
    g.set_output("gathered", ga);
    if 4 % world == 0 {
        let s = g
            .add(Op::Dist(DistOp::Shard { axis: 1, world }), &[x])
            .unwrap();
        g.set_output("shard", s);
    }
    g
}

fn ranks(g: &Graph, comms: &[Arc<InProcessComm>]) -> Vec<Box<dyn Loaded>> {
    comms
        .iter()
        .map(|c| {
            CpuBackend::new()
                .with_comm(c.clone())
                .load(g, &Weights::new())
                .unwrap()
        })
        .collect()
}

/// Every rank gets the same input here, so the results are known in closed form.
#[test]
fn collectives_on_two_cpu_ranks() {
    let g = dist_graph(2);
    let comms = InProcessGroup::ranks(2, Duration::from_secs(10));
    let mut tp = TpLoaded::new(ranks(&g, &comms), comms);
    let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let inputs: TensorMap = HashMap::from([("x".into(), Tensor::f32(vec![2, 4], x.clone()))]);
    let out = tp.run(&inputs, &[]).unwrap();
    let sum: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
    assert_eq!(out["sum"].as_f32().unwrap(), sum.as_slice());
    assert_eq!(out["gathered"].shape, vec![2, 8]);
    let gathered = out["gathered"].as_f32().unwrap();
    assert_eq!(&gathered[..8], &[0., 1., 2., 3., 0., 1., 2., 3.]);
    assert_eq!(&gathered[8..], &[4., 5., 6., 7., 4., 5., 6., 7.]);
    // Rank 0's chunk of the columns.
    assert_eq!(out["shard"].as_f32().unwrap(), &[0., 1., 4., 5.]);
    let logs = tp.take_logs();
    assert_eq!(logs.len(), 2);
    for log in logs {
        let kinds: Vec<_> = log.iter().map(|c| (c.kind, c.elems)).collect();
        assert_eq!(
            kinds,
            vec![
                (CollectiveKind::AllReduce, 8),
                (CollectiveKind::AllGather, 8)
            ]
        );
    }
}

/// `root_only`: the operand on rank 0, zeros elsewhere, so an all-reduce of it adds it once
/// (how a row-parallel matmul's bias and residual go before its all-reduce); a world of one is
/// the identity.
#[test]
fn root_only_is_the_operand_on_rank_0_and_zeros_elsewhere() {
    let mut g = Graph::new();
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                shape: shape([2usize, 2]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    let r = g.add(Op::Dist(DistOp::RootOnly), &[x]).unwrap();
    let sum = g.add(Op::Dist(DistOp::AllReduce), &[r]).unwrap();
    let each = g
        .add(Op::Dist(DistOp::AllGather { axis: 1, world: 3 }), &[r])
        .unwrap();
    g.set_output("sum", sum);
    g.set_output("each", each);
    let comms = InProcessGroup::ranks(3, Duration::from_secs(10));
    let mut tp = TpLoaded::new(ranks(&g, &comms), comms);
    let xs = Tensor::f32(vec![2, 2], vec![1.5, -2.0, 3.0, 1e30]);
    let out = tp
        .run(&HashMap::from([("x".into(), xs.clone())]), &[])
        .unwrap();
    assert_eq!(out["sum"], xs);
    assert_eq!(
        out["each"].as_f32().unwrap(),
        &[1.5, -2.0, 0., 0., 0., 0., 3.0, 1e30, 0., 0., 0., 0.]
    );
    let mut one = Graph::new();
    let x = one
        .add(
            Op::Input {
                name: "x".into(),
                shape: shape([2usize, 2]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    let r = one.add(Op::Dist(DistOp::RootOnly), &[x]).unwrap();
    one.set_output("y", r);
    let out = CpuBackend::new()
        .run(
            &one,
            &Weights::new(),
            &HashMap::from([("x".into(), xs.clone())]),
        )
        .unwrap();
    assert_eq!(out["y"], xs);
}

#[test]
fn all_reduce_sums_distinct_contributions_in_rank_order() {
    let comms = InProcessGroup::ranks(3, Duration::from_secs(10));
    let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut v = vec![c.rank() as f32 + 1.0, 10.0 * c.rank() as f32];
                    c.all_reduce_sum(&mut v).unwrap();
                    // A second round right after, so a fast rank overtakes a slow one.
                    c.all_reduce_sum(&mut v).unwrap();
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for v in sums {
        assert_eq!(v, vec![18.0, 90.0]);
    }
}

#[test]
fn single_rank_backend_runs_collectives_as_identity() {
    let g = dist_graph(1);
    let x = Tensor::f32(vec![2, 4], (0..8).map(|i| i as f32).collect());
    let out = CpuBackend::new()
        .run(
            &g,
            &Weights::new(),
            &HashMap::from([("x".into(), x.clone())]),
        )
        .unwrap();
    for name in ["sum", "gathered", "shard"] {
        assert_eq!(out[name], x, "{name}");
    }
    // A graph sharded for 2 ranks on a backend without a group: a typed error, no panic.
    let g2 = dist_graph(2);
    let err = CpuBackend::new()
        .run(&g2, &Weights::new(), &HashMap::from([("x".into(), x)]))
        .unwrap_err();
    assert!(err.to_string().contains("sharded for 2 ranks"), "{err}");
}

/// A rank that fails before its first collective.
struct Failing;

impl Loaded for Failing {
    fn run(&mut self, _: &TensorMap, _: &[(String, String)]) -> Result<TensorMap, RuntimeError> {
        Err(RuntimeError::MissingInput("injected-failure".into()))
    }
    fn clear_carry(&mut self) {}
    fn profile(&mut self, _: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        Err(RuntimeError::MissingInput("injected-failure".into()))
    }
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_error() {
    let g = dist_graph(4);
    // A long timeout: the others must be released by the abort, not by the clock.
    let comms = InProcessGroup::ranks(4, Duration::from_secs(600));
    let mut rs = ranks(&g, &comms);
    rs[2] = Box::new(Failing);
    let probe = comms[0].clone();
    let mut tp = TpLoaded::new(rs, comms);
    let inputs: TensorMap = HashMap::from([("x".into(), Tensor::f32(vec![2, 4], vec![1.0; 8]))]);
    let err = tp.run(&inputs, &[]).unwrap_err();
    assert!(err.to_string().contains("injected-failure"), "{err}");
    // The group was poisoned with rank 2's error, then reset for the next call.
    assert!(probe.poisoned().is_none());
    let err = tp.run(&inputs, &[]).unwrap_err();
    assert!(err.to_string().contains("injected-failure"), "{err}");
}

#[test]
fn a_rank_that_never_arrives_times_out() {
    let comms = InProcessGroup::ranks(2, Duration::from_millis(200));
    let mut v = vec![1.0f32];
    let err = comms[0].all_reduce_sum(&mut v).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("timed out") && msg.contains("[1]"), "{msg}");
    // Poisoned: rank 1 arriving late gets the same error at once.
    let err = comms[1].all_reduce_sum(&mut v).unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
}

/// Rank 1 fails inside its graph (a weight it lacks) while rank 0 already waits in the
/// all-reduce that follows: rank 0 is released by the abort and the call returns rank 1's error.
#[test]
fn a_rank_failing_mid_graph_releases_the_others() {
    let mut g = Graph::new();
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                shape: shape([2usize]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    let w = g
        .add(
            Op::Weight {
                name: "w".into(),
                shape: shape([2usize]),
            },
            &[],
        )
        .unwrap();
    let y = g
        .add(Op::Binary(transfuse_ir::BinaryOp::Mul), &[x, w])
        .unwrap();
    let r = g.add(Op::Dist(DistOp::AllReduce), &[y]).unwrap();
    g.set_output("y", r);
    let comms = InProcessGroup::ranks(2, Duration::from_secs(600));
    let good: Weights = HashMap::from([(
        "w".to_string(),
        Arc::new(Tensor::f32(vec![2], vec![1.0, 2.0])),
    )]);
    let ranks: Vec<Box<dyn Loaded>> = vec![
        CpuBackend::new()
            .with_comm(comms[0].clone())
            .load(&g, &good)
            .unwrap(),
        CpuBackend::new()
            .with_comm(comms[1].clone())
            .load(&g, &Weights::new())
            .unwrap(),
    ];
    let mut tp = TpLoaded::new(ranks, comms);
    let inputs: TensorMap = HashMap::from([("x".into(), Tensor::f32(vec![2], vec![1.0, 1.0]))]);
    let err = tp.run(&inputs, &[]).unwrap_err();
    assert!(
        matches!(err, RuntimeError::MissingWeight(ref n) if n == "w"),
        "{err}"
    );
}

/// `w` (a per-rank weight of shape `[2, 4]`) → `reduce_scatter(w, axis 1)`, and a ring of
/// point-to-point messages: each rank sends `w` to the next rank and receives the previous
/// rank's.
fn p2p_graph(rank: usize, world: usize) -> Graph {
    let mut g = Graph::new();
    let w = g
        .add(
            Op::Weight {
                name: "w".into(),
                shape: shape([2usize, 4]),
            },
            &[],
        )
        .unwrap();
    let rs = g
        .add(Op::Dist(DistOp::ReduceScatter { axis: 1, world }), &[w])
        .unwrap();
    let sent = g
        .add(
            Op::Dist(DistOp::Send {
                peer: (rank + 1) % world,
            }),
            &[w],
        )
        .unwrap();
    let got = g
        .add(
            Op::Dist(DistOp::Recv {
                peer: (rank + world - 1) % world,
            }),
            &[w],
        )
        .unwrap();
    g.set_output("scattered", rs);
    g.set_output("sent", sent);
    g.set_output("received", got);
    g
}

fn rank_weight(rank: usize) -> Tensor {
    Tensor::f32(vec![2, 4], (0..8).map(|i| (10 * rank + i) as f32).collect())
}

#[test]
fn reduce_scatter_and_send_recv_on_cpu_ranks() {
    let world = 2;
    let comms = InProcessGroup::ranks(world, Duration::from_secs(10));
    let ranks: Vec<Box<dyn Loaded>> = comms
        .iter()
        .enumerate()
        .map(|(r, c)| {
            let w: Weights = HashMap::from([("w".to_string(), Arc::new(rank_weight(r)))]);
            CpuBackend::new()
                .with_comm(c.clone())
                .load(&p2p_graph(r, world), &w)
                .unwrap()
        })
        .collect();
    let mut tp = TpLoaded::new(ranks, comms);
    let out = tp.run(&TensorMap::new(), &[]).unwrap();
    // Rank 0 keeps columns 0..2 of the sum w₀ + w₁ (w₁ = w₀ + 10).
    assert_eq!(out["scattered"].shape, vec![2, 2]);
    assert_eq!(out["scattered"].as_f32().unwrap(), &[10., 12., 18., 20.]);
    assert_eq!(out["sent"], rank_weight(0));
    assert_eq!(out["received"], rank_weight(1));
    let logs = tp.take_logs();
    let kinds: Vec<_> = logs[0].iter().map(|c| (c.kind, c.elems)).collect();
    assert_eq!(
        kinds,
        vec![
            (CollectiveKind::ReduceScatter, 8),
            (CollectiveKind::Send, 8),
            (CollectiveKind::Recv, 8)
        ]
    );
}

#[test]
fn reduce_scatter_keeps_each_ranks_chunk() {
    let comms = InProcessGroup::ranks(3, Duration::from_secs(10));
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let v: Vec<f32> = (0..6).map(|i| (i + c.rank()) as f32).collect();
                    c.reduce_scatter_sum(&v).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Σ_r (i + r) = 3i + 3.
    assert_eq!(parts, vec![vec![3., 6.], vec![9., 12.], vec![15., 18.]]);
    // A length the world does not divide: an error naming the collective, no panic.
    let comms = InProcessGroup::ranks(2, Duration::from_secs(10));
    let err = comms[0].reduce_scatter_sum(&[1.0; 3]).unwrap_err();
    assert!(err.to_string().contains("reduce_scatter"), "{err}");
}

#[test]
fn recv_times_out_and_abort_releases_it() {
    let comms = InProcessGroup::ranks(2, Duration::from_millis(200));
    let err = comms[1].recv(0).unwrap_err().to_string();
    assert!(err.contains("timed out") && err.contains("rank 0"), "{err}");
    // Poisoned by the timeout: a later send fails at once.
    let err = comms[0]
        .send(1, Tensor::f32(vec![1], vec![1.0]))
        .unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    // An abort releases a waiting receiver before its (long) timeout.
    let comms = InProcessGroup::ranks(2, Duration::from_secs(600));
    std::thread::scope(|s| {
        let c1 = comms[1].clone();
        let h = s.spawn(move || c1.recv(0));
        std::thread::sleep(Duration::from_millis(50));
        comms[0].abort("stage 0 failed: injected");
        let err = h.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
    });
    // Messages arrive in order; a rank cannot address itself or a rank outside the group.
    let comms = InProcessGroup::ranks(2, Duration::from_secs(10));
    for i in 0..3 {
        comms[0]
            .send(1, Tensor::f32(vec![1], vec![i as f32]))
            .unwrap();
    }
    for i in 0..3 {
        assert_eq!(comms[1].recv(0).unwrap().as_f32().unwrap(), &[i as f32]);
    }
    assert!(comms[0].send(0, Tensor::f32(vec![], vec![0.0])).is_err());
    assert!(comms[0].recv(5).is_err());
}
