//! Helpers shared by the runtime's integration tests.

/// `n` deterministic pseudo-random values in `[-scale, scale)` from `seed` (an LCG; the high
/// 24 bits of each state), so a failing case reproduces exactly.
pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A chain through every collective of the device path, for `world` ranks: `y = 2x`, this
/// rank's columns of it (`shard`), `t = · + 1`, `sum = all_reduce(t)` (in place, while `t` is
/// read again), `gathered = all_gather(t, axis 1)`, `scattered = reduce_scatter(3·gathered,
/// axis 1)`, `once = all_reduce(root_only(scattered − sum))`; x is `[2, 4, 6]`.
#[allow(dead_code)] // not every test crate that includes this module uses it
pub fn dist_chain(world: usize) -> transfuse_ir::Graph {
    use transfuse_ir::{shape, BinaryOp, DType, DistOp, Graph, NodeId, Op, Scalar};
    let mut g = Graph::new();
    let x = g
        .add(
            Op::Input {
                name: "x".into(),
                shape: shape([2usize, 4, 6]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap();
    let k = |g: &mut Graph, v: f64| {
        g.add(
            Op::Constant {
                value: Scalar(v),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap()
    };
    let bin = |g: &mut Graph, op, a: NodeId, b: NodeId| g.add(Op::Binary(op), &[a, b]).unwrap();
    let dist = |g: &mut Graph, d, a: NodeId| g.add(Op::Dist(d), &[a]).unwrap();
    let two = k(&mut g, 2.0);
    let y = bin(&mut g, BinaryOp::Mul, x, two);
    // This rank's columns of y: the values differ per rank from here on.
    let s = dist(&mut g, DistOp::Shard { axis: 1, world }, y);
    let one = k(&mut g, 1.0);
    let t = bin(&mut g, BinaryOp::Add, s, one);
    let sum = dist(&mut g, DistOp::AllReduce, t);
    // t is read again after the in-place all-reduce of it.
    let gathered = dist(&mut g, DistOp::AllGather { axis: 1, world }, t);
    let three = k(&mut g, 3.0);
    let u = bin(&mut g, BinaryOp::Mul, gathered, three);
    let rs = dist(&mut g, DistOp::ReduceScatter { axis: 1, world }, u);
    let v = bin(&mut g, BinaryOp::Sub, rs, sum);
    let root = dist(&mut g, DistOp::RootOnly, v);
    let once = dist(&mut g, DistOp::AllReduce, root);
    g.set_output("sum", sum);
    g.set_output("gathered", gathered);
    g.set_output("scattered", rs);
    g.set_output("once", once);
    g
}
