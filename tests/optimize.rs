//! The optimizer on whole models: every attention block becomes one `attention` and every layer
//! norm one `layer_norm` for BERT and GPT-2 of any size, no primitive softmax survives, outputs
//! agree with the unoptimized graph, and a one-layer GPT-2's optimized IR is snapshotted.

use std::collections::HashMap;
use std::sync::Arc;

use expect_test::expect;
use transfuse::ir::{eval_shape, to_text, Bindings, Graph, Tensor, Weights};
use transfuse::models::{bert, gpt2, Activation, BertConfig, BertHeads, Gpt2Config};
use transfuse::passes::{optimize, Options, Report};
use transfuse::runtime::{Backend, CpuBackend, TensorMap};

fn bert_cfg(layers: usize, hidden: usize, heads: usize, act: Activation) -> BertConfig {
    BertConfig {
        vocab_size: 97,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 3 * hidden,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        hidden_act: act,
        layer_norm_eps: 1e-12,
    }
}

fn gpt2_cfg(layers: usize, hidden: usize, heads: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size: 101,
        n_embd: hidden,
        n_layer: layers,
        n_head: heads,
        n_positions: 64,
        n_inner: 4 * hidden,
        activation: Activation::GeluTanh,
        layer_norm_epsilon: 1e-5,
    }
}

/// Asserts the fusion counts every model must reach.
fn check_counts(r: &Report, layers: usize, norms: usize, what: &str) {
    let after = &r.ops_after;
    assert_eq!(after.get("attention"), Some(&layers), "{what}: {after:?}");
    assert_eq!(after.get("layer_norm"), Some(&norms), "{what}: {after:?}");
    for gone in [
        "exp",
        "reduce_max",
        "reduce_sum",
        "reduce_mean",
        "rsqrt",
        "div",
        "erf",
        "tanh",
    ] {
        if gone == "tanh" && after.contains_key("tanh") && what.starts_with("bert") {
            continue; // BERT's pooler ends in a tanh that is not an epilogue activation
        }
        assert!(
            !after.contains_key(gone),
            "{what}: primitive `{gone}` left: {after:?}"
        );
    }
    assert_eq!(r.egraph.stop_reason, "saturated", "{what}");
}

#[test]
fn every_attention_and_layer_norm_fuses_at_any_size() {
    for (layers, hidden, heads) in [(1, 8, 1), (2, 64, 4), (3, 48, 6), (12, 768, 12)] {
        let cfg = bert_cfg(layers, hidden, heads, Activation::GeluErf);
        let g = bert::build_graph(
            &cfg,
            BertHeads {
                pooler: true,
                ..Default::default()
            },
        )
        .unwrap();
        let (_, r) = optimize(&g, &Options::default()).unwrap();
        check_counts(
            &r,
            layers,
            2 * layers + 1,
            &format!("bert {layers}x{hidden}"),
        );
        assert_eq!(
            r.ops_after.get("fused_matmul"),
            Some(&(4 * layers + 1)),
            "{:?}",
            r.ops_after
        );

        let g = gpt2::build_graph(&gpt2_cfg(layers, hidden, heads)).unwrap();
        let (opt, r) = optimize(&g, &Options::default()).unwrap();
        check_counts(
            &r,
            layers,
            2 * layers + 1,
            &format!("gpt2 {layers}x{hidden}"),
        );
        let causal = opt
            .nodes()
            .filter(|(_, n)| matches!(n.op, transfuse::ir::Op::Attention { causal: true, .. }))
            .count();
        assert_eq!(causal, layers, "GPT-2's iota mask becomes the causal flag");
    }
}

/// Deterministic weights in [-0.3, 0.3) for every weight a graph declares.
fn random_weights(g: &Graph, seed: u64) -> Weights {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
    };
    g.weights()
        .into_iter()
        .map(|(name, shape)| {
            let shape = eval_shape(shape, &Bindings::new()).unwrap();
            let n = shape.iter().product();
            (
                name.to_string(),
                Arc::new(Tensor::f32(shape, (0..n).map(|_| next()).collect())),
            )
        })
        .collect()
}

fn assert_same(g: &Graph, w: &Weights, inputs: &TensorMap, what: &str) {
    let (opt, _) = optimize(g, &Options::default()).unwrap();
    let cpu = CpuBackend::new();
    let a = cpu.run(g, w, inputs).unwrap();
    let b = cpu.run(&opt, w, inputs).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let (x, y) = (ta.as_f32().unwrap(), b[name].as_f32().unwrap());
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs() / (1.0 + p.abs()))
            .fold(0.0, f32::max);
        // 1e-5 relative: the fused CPU kernels repeat the decomposition's f32 operations.
        assert!(worst <= 1e-5, "{what}: `{name}` differs by {worst}");
    }
}

fn ids(b: usize, s: usize, vocab: i64) -> Vec<i64> {
    (0..b * s).map(|i| (i as i64 * 37 + 11) % vocab).collect()
}

#[test]
fn optimized_models_agree_with_the_primitive_graph() {
    for (layers, hidden, heads, act) in [
        (1, 16, 2, Activation::Relu),
        (2, 24, 3, Activation::GeluErf),
        (3, 32, 4, Activation::GeluTanh),
    ] {
        let cfg = bert_cfg(layers, hidden, heads, act);
        let heads_cfg = BertHeads {
            pooler: true,
            pooling: Some(transfuse::models::Pooling::Mean),
            normalize: true,
        };
        let g = bert::build_graph(&cfg, heads_cfg).unwrap();
        let w = random_weights(&g, layers as u64);
        let (b, s) = (3, 7);
        let mut mask = vec![1i64; b * s];
        mask[s + 4..2 * s].iter_mut().for_each(|m| *m = 0); // row 1 padded
        mask[2 * s..3 * s].iter_mut().for_each(|m| *m = 0); // row 2 fully masked
        let inputs: TensorMap = HashMap::from([
            ("input_ids".into(), Tensor::i64(vec![b, s], ids(b, s, 97))),
            (
                "token_type_ids".into(),
                Tensor::i64(vec![b, s], (0..b * s).map(|i| (i % 2) as i64).collect()),
            ),
            ("attention_mask".into(), Tensor::i64(vec![b, s], mask)),
        ]);
        assert_same(&g, &w, &inputs, &format!("bert {layers}x{hidden}"));

        let cfg = gpt2_cfg(layers, hidden, heads);
        let g = gpt2::build_graph(&cfg).unwrap();
        let w = random_weights(&g, 100 + layers as u64);
        let (b, s, past) = (2, 5, 3);
        let mut inputs: TensorMap = HashMap::from([
            ("input_ids".into(), Tensor::i64(vec![b, s], ids(b, s, 101))),
            (
                "attention_mask".into(),
                Tensor::i64(vec![b, past + s], vec![1; b * (past + s)]),
            ),
        ]);
        let hd = hidden / heads;
        for i in 0..layers {
            for name in [gpt2::past_key(i), gpt2::past_value(i)] {
                let n = b * heads * past * hd;
                let v = (0..n).map(|j| ((j * 7 % 13) as f32 - 6.0) * 0.05).collect();
                inputs.insert(name, Tensor::f32(vec![b, heads, past, hd], v));
            }
        }
        assert_same(
            &g,
            &w,
            &inputs,
            &format!("gpt2 {layers}x{hidden} with a KV cache"),
        );
    }
}

#[test]
fn one_layer_gpt2_optimized_ir_snapshot() {
    let g = gpt2::build_graph(&gpt2_cfg(1, 8, 2)).unwrap();
    let (opt, _) = optimize(&g, &Options::default()).unwrap();
    expect![[r#"
        %0 = weight{"wte.weight"}() : f32[101, 8]
        %1 = permute{[1, 0]}(%0) : f32[8, 101]
        %2 = weight{"ln_f.bias"}() : f32[8]
        %3 = weight{"ln_f.weight"}() : f32[8]
        %4 = iota{start=past len=seq}() : i64[seq]
        %5 = weight{"wpe.weight"}() : f32[64, 8]
        %6 = gather(%5, %4) : f32[seq, 8]
        %7 = input{"input_ids"}() : i64[batch, seq]
        %8 = gather(%0, %7) : f32[batch, seq, 8]
        %9 = add(%8, %6) : f32[batch, seq, 8]
        %10 = weight{"h.0.attn.c_proj.bias"}() : f32[8]
        %11 = weight{"h.0.attn.c_proj.weight"}() : f32[8, 8]
        %12 = const{-3.4028234663852886e38}() : f32[]
        %13 = input{"attention_mask"}() : i64[batch, past+seq]
        %14 = cast{f32}(%13) : f32[batch, past+seq]
        %15 = const{1e0}() : f32[]
        %16 = sub(%15, %14) : f32[batch, past+seq]
        %17 = mul(%16, %12) : f32[batch, past+seq]
        %18 = reshape{[batch, 1, 1, past+seq]}(%17) : f32[batch, 1, 1, past+seq]
        %19 = weight{"h.0.attn.c_attn.bias"}() : f32[24]
        %20 = weight{"h.0.attn.c_attn.weight"}() : f32[8, 24]
        %21 = weight{"h.0.ln_1.bias"}() : f32[8]
        %22 = weight{"h.0.ln_1.weight"}() : f32[8]
        %23 = layer_norm{eps=1e-5}(%9, %22, %21) : f32[batch, seq, 8]
        %24 = fused_matmul{act=identity bias}(%23, %20, %19) : f32[batch, seq, 24]
        %25 = slice{axis=2 16..24}(%24) : f32[batch, seq, 8]
        %26 = reshape{[batch, seq, 2, 4]}(%25) : f32[batch, seq, 2, 4]
        %27 = permute{[0, 2, 1, 3]}(%26) : f32[batch, 2, seq, 4]
        %28 = input{"past_value_0"}() : f32[batch, 2, past, 4]
        %29 = concat{axis=2}(%28, %27) : f32[batch, 2, past+seq, 4]
        %30 = slice{axis=2 8..16}(%24) : f32[batch, seq, 8]
        %31 = reshape{[batch, seq, 2, 4]}(%30) : f32[batch, seq, 2, 4]
        %32 = permute{[0, 2, 1, 3]}(%31) : f32[batch, 2, seq, 4]
        %33 = input{"past_key_0"}() : f32[batch, 2, past, 4]
        %34 = concat{axis=2}(%33, %32) : f32[batch, 2, past+seq, 4]
        %35 = slice{axis=2 0..8}(%24) : f32[batch, seq, 8]
        %36 = reshape{[batch, seq, 2, 4]}(%35) : f32[batch, seq, 2, 4]
        %37 = permute{[0, 2, 1, 3]}(%36) : f32[batch, 2, seq, 4]
        %38 = attention{scale=5e-1 causal}(%37, %34, %29, %18) : f32[batch, 2, seq, 4]
        %39 = permute{[0, 2, 1, 3]}(%38) : f32[batch, seq, 2, 4]
        %40 = reshape{[batch, seq, 8]}(%39) : f32[batch, seq, 8]
        %41 = fused_matmul{act=identity bias residual}(%40, %11, %10, %9) : f32[batch, seq, 8]
        %42 = weight{"h.0.mlp.c_proj.bias"}() : f32[8]
        %43 = weight{"h.0.mlp.c_proj.weight"}() : f32[32, 8]
        %44 = weight{"h.0.mlp.c_fc.bias"}() : f32[32]
        %45 = weight{"h.0.mlp.c_fc.weight"}() : f32[8, 32]
        %46 = weight{"h.0.ln_2.bias"}() : f32[8]
        %47 = weight{"h.0.ln_2.weight"}() : f32[8]
        %48 = layer_norm{eps=1e-5}(%41, %47, %46) : f32[batch, seq, 8]
        %49 = fused_matmul{act=gelu_tanh bias}(%48, %45, %44) : f32[batch, seq, 32]
        %50 = fused_matmul{act=identity bias residual}(%49, %43, %42, %41) : f32[batch, seq, 8]
        %51 = layer_norm{eps=1e-5}(%50, %3, %2) : f32[batch, seq, 8]
        %52 = matmul(%51, %1) : f32[batch, seq, 101]
        out "present_key_0" = %34
        out "present_value_0" = %29
        out "logits" = %52
    "#]]
    .assert_eq(&to_text(&opt));
}
