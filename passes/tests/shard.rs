//! The sharding pass on small graphs: the SPMD graph it emits (snapshots), the fallback that
//! gathers, and its errors. Numerics of whole sharded models are in the root `tests/tp.rs`.

use expect_test::expect;
use transfuse_ir::{to_text, Builder, DType, Dim, DistOp, Graph, Op, UnaryOp};
use transfuse_passes::shard::{shard, Layout, ShardError, ShardSpec, WeightSlice};

fn spec(degree: usize, weights: &[(&str, Layout)]) -> ShardSpec {
    ShardSpec {
        degree,
        weights: weights
            .iter()
            .map(|(n, l)| (n.to_string(), l.clone()))
            .collect(),
        ..ShardSpec::default()
    }
}

/// `relu(x @ w1 + b1) @ w2 + b2`, the MLP of a block.
fn mlp() -> Graph {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 8.into()], DType::F32)
        .unwrap();
    let w1 = b.weight("w1", vec![8.into(), 16.into()]).unwrap();
    let b1 = b.weight("b1", vec![16.into()]).unwrap();
    let w2 = b.weight("w2", vec![16.into(), 8.into()]).unwrap();
    let b2 = b.weight("b2", vec![8.into()]).unwrap();
    let h = b.matmul(x, w1).unwrap();
    let h = b.add(h, b1).unwrap();
    let h = b.unary(UnaryOp::Relu, h).unwrap();
    let y = b.matmul(h, w2).unwrap();
    let y = b.add(y, b2).unwrap();
    b.output("y", y);
    b.finish()
}

#[test]
fn column_then_row_parallel_mlp_has_one_all_reduce() {
    let s = shard(
        &mlp(),
        &spec(
            2,
            &[
                ("w1", Layout::split(1)),
                ("b1", Layout::split(0)),
                ("w2", Layout::split(0)),
            ],
        ),
    )
    .unwrap();
    expect![[r#"
        %0 = input{"x"}() : f32[n, 8]
        %1 = weight{"w1"}() : f32[8, 8]
        %2 = weight{"b1"}() : f32[8]
        %3 = weight{"w2"}() : f32[8, 8]
        %4 = weight{"b2"}() : f32[8]
        %5 = matmul(%0, %1) : f32[n, 8]
        %6 = add(%5, %2) : f32[n, 8]
        %7 = relu(%6) : f32[n, 8]
        %8 = matmul(%7, %3) : f32[n, 8]
        %9 = all_reduce(%8) : f32[n, 8]
        %10 = add(%9, %4) : f32[n, 8]
        out "y" = %10
    "#]]
    .assert_eq(&to_text(&s.graph));
}

/// Megatron-SP on a pre-LN MLP block `x + W2·relu(W1·LN(x))` at degree 2: the row-parallel
/// matmul's partial sums padded to `2·c` rows (`c` = the `tp_seq_chunk` input's length), then
/// reduce-scattered along the sequence; the residual added on the rank's rows (`shard` of the
/// padded input); the final norm on those rows, then one all-gather and a slice back to `seq`.
#[test]
fn sequence_parallel_block() {
    let mut b = Builder::new();
    let x = b
        .input(
            "x",
            vec![Dim::sym("b"), Dim::sym("seq"), 8.into()],
            DType::F32,
        )
        .unwrap();
    let g = b.weight("g", vec![8.into()]).unwrap();
    let be = b.weight("be", vec![8.into()]).unwrap();
    let w1 = b.weight("w1", vec![8.into(), 16.into()]).unwrap();
    let w2 = b.weight("w2", vec![16.into(), 8.into()]).unwrap();
    let a = b.layer_norm(x, g, be, 1e-5).unwrap();
    let h = b.matmul(a, w1).unwrap();
    let h = b.unary(UnaryOp::Relu, h).unwrap();
    let d = b.matmul(h, w2).unwrap();
    let y = b.add(x, d).unwrap();
    let y = b.layer_norm(y, g, be, 1e-5).unwrap();
    b.output("y", y);
    let (g, _) =
        transfuse_passes::optimize(&b.finish(), &transfuse_passes::Options::default()).unwrap();
    let mut sp = spec(2, &[("w1", Layout::split(1)), ("w2", Layout::split(0))]);
    sp.sequence_parallel = true;
    let s = shard(&g, &sp).unwrap();
    let c = s
        .seq_chunk
        .clone()
        .expect("a symbolic sequence needs the chunk input");
    assert_eq!(
        (c.input.as_str(), c.axis, c.world, c.chunk(5)),
        ("x", 1, 2, 3)
    );
    expect![[r#"
        %0 = weight{"be"}() : f32[8]
        %1 = weight{"g"}() : f32[8]
        %2 = weight{"w2"}() : f32[8, 8]
        %3 = weight{"w1"}() : f32[8, 8]
        %4 = input{"x"}() : f32[b, seq, 8]
        %5 = layer_norm{eps=1e-5}(%4, %1, %0) : f32[b, seq, 8]
        %6 = fused_matmul{act=relu}(%5, %3) : f32[b, seq, 8]
        %7 = input{"tp_seq_chunk"}() : i64[tp_seq_chunk]
        %8 = matmul(%6, %2) : f32[b, seq, 8]
        %9 = iota{start=0 len=1}() : i64[1]
        %10 = cast{f32}(%9) : f32[1]
        %11 = expand{[b, -seq+2*tp_seq_chunk, 8]}(%10) : f32[b, -seq+2*tp_seq_chunk, 8]
        %12 = concat{axis=1}(%8, %11) : f32[b, 2*tp_seq_chunk, 8]
        %13 = reduce_scatter{axis=1 world=2}(%12) : f32[b, tp_seq_chunk, 8]
        %14 = iota{start=0 len=1}() : i64[1]
        %15 = cast{f32}(%14) : f32[1]
        %16 = expand{[b, -seq+2*tp_seq_chunk, 8]}(%15) : f32[b, -seq+2*tp_seq_chunk, 8]
        %17 = concat{axis=1}(%4, %16) : f32[b, 2*tp_seq_chunk, 8]
        %18 = shard{axis=1 world=2}(%17) : f32[b, tp_seq_chunk, 8]
        %19 = add(%18, %13) : f32[b, tp_seq_chunk, 8]
        %20 = layer_norm{eps=1e-5}(%19, %1, %0) : f32[b, tp_seq_chunk, 8]
        %21 = all_gather{axis=1 world=2}(%20) : f32[b, 2*tp_seq_chunk, 8]
        %22 = slice{axis=1 0..seq}(%21) : f32[b, seq, 8]
        out "y" = %22
    "#]]
    .assert_eq(&to_text(&s.graph));
}

/// A split the rules cannot keep (a softmax over the split axis) is gathered first.
#[test]
fn an_op_that_cannot_keep_the_split_runs_replicated() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 8.into()], DType::F32)
        .unwrap();
    let w = b.weight("w", vec![8.into(), 6.into()]).unwrap();
    let h = b.matmul(x, w).unwrap();
    let y = b
        .reduce(transfuse_ir::ReduceOp::Max, h, &[1], true)
        .unwrap();
    b.output("y", y);
    let s = shard(&b.finish(), &spec(3, &[("w", Layout::split(1))])).unwrap();
    let ops = s.graph.op_counts();
    assert_eq!(ops["all_gather"], 1);
    let gathered = s
        .graph
        .nodes()
        .find(|(_, n)| matches!(n.op, Op::Dist(DistOp::AllGather { axis: 1, world: 3 })))
        .unwrap();
    assert_eq!(gathered.1.shape, vec![Dim::sym("n"), Dim::known(6)]);
}

#[test]
fn merged_blocks_and_padded_axes() {
    // A [8, 3·4] merged weight in 3 blocks at degree 2: rank 1 reads columns 2..4, 6..8, 10..12.
    let mut b = Builder::new();
    let x = b.input("x", vec![2.into(), 8.into()], DType::F32).unwrap();
    let w = b.weight("qkv", vec![8.into(), 12.into()]).unwrap();
    let y = b.matmul(x, w).unwrap();
    let k = b.slice(y, 1, 4.into(), 8.into()).unwrap();
    b.output("k", k);
    let layout = Layout::Split {
        axis: 1,
        segments: 3,
        padded: None,
    };
    let s = shard(&b.finish(), &spec(2, &[("qkv", layout)])).unwrap();
    let ws = &s.weights["qkv"];
    assert_eq!(
        ws.ranges(12, 1, 2),
        Some((vec![(2, 4), (6, 8), (10, 12)], 12))
    );
    // The slice of block 1 is local columns 2..4, then gathered for the output.
    let text = to_text(&s.graph);
    assert!(text.contains("slice{axis=1 2..4}"), "{text}");
    assert!(text.contains("all_gather{axis=1 world=2}"), "{text}");
    // A vocabulary of 10 padded to 12 at degree 4: rank 3 reads rows 9..12 (two of them past
    // the tensor, read as zeros).
    let padded = WeightSlice {
        source: "wte".into(),
        layout: Layout::Split {
            axis: 0,
            segments: 1,
            padded: Some(12),
        },
    };
    assert_eq!(padded.ranges(10, 3, 4), Some((vec![(9, 12)], 12)));
}

#[test]
fn errors_name_the_tensor_and_dims() {
    let err = shard(
        &mlp(),
        &spec(3, &[("w1", Layout::split(1)), ("b1", Layout::split(0))]),
    )
    .unwrap_err();
    assert!(matches!(err, ShardError::NotDivisible { .. }));
    assert_eq!(
        err.to_string(),
        "--tp 3: w1 [8, 16]: axis 1 (16) is not divisible by 3"
    );
    // Heads that do not divide: 4 heads of 6 split 8 ways (the width 24 divides, the heads not).
    let mut b = Builder::new();
    let x = b.input("x", vec![2.into(), 24.into()], DType::F32).unwrap();
    let w = b.weight("wq", vec![24.into(), 48.into()]).unwrap();
    let q = b.matmul(x, w).unwrap();
    let q = b.reshape(q, vec![2.into(), 4.into(), 12.into()]).unwrap();
    b.output("q", q);
    let err = shard(&b.finish(), &spec(8, &[("wq", Layout::split(1))])).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("reshape %3") && msg.contains("[2, 4, 12]") && msg.contains("(4, heads)"),
        "{msg}"
    );
    // A graph that already holds collectives.
    let mut g = mlp();
    let y = g.outputs()[0].1;
    let r = g.add(Op::Dist(DistOp::AllReduce), &[y]).unwrap();
    g.set_output("r", r);
    assert!(matches!(
        shard(&g, &spec(2, &[])),
        Err(ShardError::Unsupported(_))
    ));
}
