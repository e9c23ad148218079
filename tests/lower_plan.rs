//! Whole-model lowering (`codegen::lower`): the tiny GPT-2 and BERT fixtures, optimized, lowered
//! to launch plans and executed kernel by kernel on the kernel-IR interpreter, agree with the
//! CPU backend on the same optimized graph; every kernel of the plans prints WGSL that naga
//! validates (f32, f16) and CUDA C that NVRTC compiles (f32, f16, bf16; skipped without NVRTC
//! unless `TRANSFUSE_REQUIRE` names `nvrtc`), the attention kernels' decode variants included
//! (one-token KV-cache steps run through them); kernel counts per GPT-2 block and BERT layer.

mod common;

use std::collections::HashMap;
use transfuse::codegen::exec::{host_buf, run_plan_interpreted, tensor};
use transfuse::codegen::interp::HostBuf;
use transfuse::codegen::kir::{Elem, Kernel};
use transfuse::codegen::lower::{lower, LowerOptions, Phase, Plan, Target};
use transfuse::ir::{Bindings, Graph, Tensor, Weights};
use transfuse::models::config::ModelConfig;
use transfuse::models::{build_graph, BertHeads, Model};
use transfuse::runtime::{bind_inputs, nvrtc, Backend, CpuBackend, TensorMap};

fn optimized(g: &Graph) -> Graph {
    transfuse::passes::optimize(g, &transfuse::passes::Options::default())
        .expect("optimize")
        .0
}

fn model(name: &str) -> (Model, Graph) {
    let m = Model::load(&common::fixture(&format!("{name}/model"))).expect("fixture loads");
    let g = optimized(&m.graph);
    (m, g)
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn gpt2_inputs(m: &Model, batch: usize, seq: usize, past: usize) -> TensorMap {
    let ModelConfig::Gpt2(c) = &m.config else {
        panic!("gpt2")
    };
    let mut t = TensorMap::new();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 37 + 11) % c.vocab_size) as i64)
        .collect();
    t.insert("input_ids".into(), Tensor::i64(vec![batch, seq], ids));
    let total = past + seq;
    let mut mask = vec![1i64; batch * total];
    if batch > 1 && total > 1 {
        mask[total] = 0; // second row: first position is padding
    }
    t.insert(
        "attention_mask".into(),
        Tensor::i64(vec![batch, total], mask),
    );
    let (h, d) = (c.n_head, c.n_embd / c.n_head);
    for i in 0..c.n_layer {
        for (k, name) in [
            transfuse::models::gpt2::past_key(i),
            transfuse::models::gpt2::past_value(i),
        ]
        .into_iter()
        .enumerate()
        {
            let n = batch * h * past * d;
            t.insert(
                name,
                Tensor::f32(vec![batch, h, past, d], noise(n, (i * 2 + k) as u64 + 7)),
            );
        }
    }
    t
}

fn bert_inputs(batch: usize, seq: usize) -> TensorMap {
    let mut t = TensorMap::new();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 53 + 5) % 1000) as i64)
        .collect();
    t.insert("input_ids".into(), Tensor::i64(vec![batch, seq], ids));
    let tt: Vec<i64> = (0..batch * seq).map(|i| ((i / 3) % 2) as i64).collect();
    t.insert("token_type_ids".into(), Tensor::i64(vec![batch, seq], tt));
    let mut mask = vec![1i64; batch * seq];
    if batch > 1 {
        mask[2 * seq - 1] = 0; // second row: last position is padding
    }
    t.insert("attention_mask".into(), Tensor::i64(vec![batch, seq], mask));
    t
}

fn host_weights(w: &Weights, plan: &Plan) -> HashMap<String, HostBuf> {
    plan.weights
        .iter()
        .map(|io| (io.name.clone(), host_buf(&w[&io.name]).unwrap()))
        .collect()
}

/// Lowers `g` (f32, WebGPU limits: the interpreter's cost grows with the workgroup size), runs
/// it on the interpreter and compares every output with the CPU backend. Returns the worst
/// absolute difference.
fn parity(g: &Graph, weights: &Weights, inputs: &TensorMap, what: &str) -> f32 {
    parity_with(
        g,
        weights,
        inputs,
        what,
        &LowerOptions::new(Target::Wgsl, Elem::F32),
        1e-4,
    )
}

fn parity_with(
    g: &Graph,
    weights: &Weights,
    inputs: &TensorMap,
    what: &str,
    opts: &LowerOptions,
    tol: f32,
) -> f32 {
    let plan = lower(g, opts).expect("lowers");
    let want = CpuBackend::new().run(g, weights, inputs).expect("cpu runs");
    let bindings: Bindings = bind_inputs(g, inputs).expect("binds");
    let host_in: HashMap<String, HostBuf> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), host_buf(v).unwrap()))
        .collect();
    let got = run_plan_interpreted(&plan, &host_in, &host_weights(weights, &plan), &bindings)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut worst = 0f32;
    for o in &plan.outputs {
        let w = &want[&o.name];
        let t = tensor(&got[&o.name], w.shape.clone(), o.dtype);
        assert_eq!(t.shape, w.shape, "{what}: {}", o.name);
        let (a, b) = (t.as_f32().unwrap(), w.as_f32().unwrap());
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{what}: {} {:?} max |diff| {d:.2e}", o.name, w.shape);
        assert!(d <= tol, "{what}: {} differs by {d}", o.name);
        worst = worst.max(d);
    }
    worst
}

/// Every kernel of the plan: each launch's main kernel, then its decode variant if any.
fn all_kernels(plan: &Plan) -> impl Iterator<Item = &Kernel> {
    plan.kernels.iter().flat_map(|k| {
        std::iter::once(&k.gen.kernel).chain(k.decode.as_deref().map(|v| &v.gen.kernel))
    })
}

/// Indices of the attention kernels.
fn attention_kernels(plan: &Plan) -> Vec<usize> {
    (0..plan.kernels.len())
        .filter(|&i| plan.kernels[i].ops.iter().any(|o| o == "attention"))
        // Not the split-KV decode's combine kernels (launched after their attention kernel).
        .filter(|&i| plan.kernels[i].only_when.is_none())
        .collect()
}

fn summary(plan: &Plan) -> String {
    let mut s = String::new();
    for (i, k) in plan.kernels.iter().enumerate() {
        s.push_str(&format!(
            "{i:3} {:<8} {:<48} {:?}\n",
            if k.phase == Phase::Prepare {
                "prepare"
            } else {
                "forward"
            },
            k.entry(),
            k.ops
        ));
    }
    s
}

#[test]
fn gpt2_plan_matches_the_cpu_backend_prefill_and_with_a_cache() {
    let (m, g) = model("tiny_gpt2");
    let plan = lower(&g, &LowerOptions::new(Target::Wgsl, Elem::F32)).unwrap();
    eprintln!("{}", summary(&plan));
    // The K/V cache concats are placed into the QKV matmuls (no launch of their own).
    assert!(plan.kernels.iter().all(|k| k.ops[0] != "concat"));
    let qkv: Vec<_> = plan
        .kernels
        .iter()
        .filter(|k| k.ops == ["fused_matmul", "concat", "concat"])
        .collect();
    assert_eq!(qkv.len(), 2, "{}", summary(&plan));
    // Each block's attention carries a decode variant (seq is symbolic), taken for one token.
    let att = attention_kernels(&plan);
    assert_eq!(att.len(), 2, "{}", summary(&plan));
    // The K/V caches are one buffer each of `kv_cap` rows, which the runtime binds.
    let dims = |b, s, p| {
        let mut d = bind_inputs(&g, &gpt2_inputs(&m, b, s, p)).unwrap();
        d.insert(transfuse::codegen::lower::CACHE_CAP.into(), s + p);
        d
    };
    assert_eq!(plan.caches.len(), 4, "{}", summary(&plan));
    // Each matmul (rows = batch·seq, symbolic) carries a GEMV variant, taken for one row only;
    // the QKV matmuls' variants carry the same K/V cache placement as their main kernels.
    let mut gemvs = 0;
    for (i, k) in plan.kernels.iter().enumerate() {
        if k.ops[0].ends_with("matmul") {
            let v = k.decode.as_deref().expect("a GEMV variant");
            assert!(
                v.gen.kernel.name.starts_with("gemv_f32"),
                "{}",
                v.gen.kernel.name
            );
            assert_eq!(v.bindings, k.bindings, "{}", k.entry());
            assert!(plan.use_decode(i, &dims(1, 1, 6)).unwrap());
            assert!(!plan.use_decode(i, &dims(1, 5, 0)).unwrap());
            assert!(!plan.use_decode(i, &dims(2, 1, 4)).unwrap());
            assert!(!plan.use_decode(i, &dims(2, 5, 0)).unwrap());
            let (ua, grid) = plan.launch_args_for(i, true, &dims(1, 1, 6)).unwrap();
            let (um, mgrid) = plan.launch_args_for(i, false, &dims(1, 1, 6)).unwrap();
            assert_eq!(ua, um, "{}: same uniforms", k.entry());
            assert_eq!(
                grid[2],
                mgrid[2],
                "{}: same batch and copy z-slices",
                k.entry()
            );
            gemvs += 1;
            continue;
        }
        if !att.contains(&i) {
            assert!(k.decode.is_none(), "{}", k.entry());
            continue;
        }
        // The split-KV decode: its partial kernel as the variant, the combine next.
        let d = k.decode_entry().expect("a decode variant");
        assert!(d.starts_with("attention_split_f32_d16_causal_mask_"), "{d}");
        let c = &plan.kernels[i + 1];
        assert!(
            c.entry()
                .starts_with("attention_combine_f32_d16_causal_mask_"),
            "{}",
            c.entry()
        );
        // Launched for one query row whose keys are split more than once (GPU splits have at
        // least 64 keys: 7 keys are one split, which the partial kernel finishes itself).
        assert!(plan.launched_at(i + 1, &dims(1, 1, 127)).unwrap());
        assert!(!plan.launched_at(i + 1, &dims(1, 1, 6)).unwrap());
        assert!(!plan.launched_at(i + 1, &dims(2, 5, 0)).unwrap());
        assert!(plan.use_decode(i, &dims(1, 1, 6)).unwrap());
        assert!(plan.use_decode(i, &dims(2, 1, 4)).unwrap());
        assert!(!plan.use_decode(i, &dims(2, 5, 0)).unwrap());
        assert!(!plan.use_decode(i, &dims(2, 3, 4)).unwrap());
        assert_eq!(
            plan.launch_args_for(i, true, &dims(2, 1, 4)).unwrap().1[0],
            1
        );
    }
    // Four per block (QKV, attention projection, MLP up and down) and the LM head.
    assert_eq!(gemvs, 2 * 4 + 1, "{}", summary(&plan));
    let w1 = parity(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 2, 5, 0),
        "gpt2 b2 s5 past0",
    );
    let w2 = parity(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 2, 3, 4),
        "gpt2 b2 s3 past4",
    );
    let w3 = parity(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 1, 1, 6),
        "gpt2 b1 s1 past6",
    );
    // A decode step of two rows, the second with its first position padded (masked).
    let w4 = parity(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 2, 1, 4),
        "gpt2 b2 s1 past4",
    );
    eprintln!("gpt2 worst |diff|: {:.2e}", w1.max(w2).max(w3).max(w4));
}

#[test]
fn cuda_sized_and_f16_plans_run_on_the_interpreter_too() {
    // The CUDA limits pick other tunables (128×128 matmul tiles, 256-thread rows).
    let (m, g) = model("tiny_gpt2");
    let cuda = LowerOptions::new(Target::Cuda, Elem::F32);
    parity_with(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 1, 3, 2),
        "gpt2 cuda-sized",
        &cuda,
        1e-4,
    );
    parity_with(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 1, 1, 2),
        "gpt2 cuda-sized decode step",
        &cuda,
        1e-4,
    );
    // f16 storage: every stored activation rounded to f16 (inputs and weights stay exact f32
    // values here, so this measures the plan's own rounding).
    let f16 = LowerOptions::new(Target::Wgsl, Elem::F16);
    let d = parity_with(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 1, 3, 2),
        "gpt2 f16",
        &f16,
        2e-2,
    );
    let d1 = parity_with(
        &g,
        &m.weights,
        &gpt2_inputs(&m, 1, 1, 3),
        "gpt2 f16 decode step",
        &f16,
        2e-2,
    );
    let (b, bg) = model("tiny_bert");
    let e = parity_with(&bg, &b.weights, &bert_inputs(1, 4), "bert f16", &f16, 2e-2);
    eprintln!(
        "f16 plans: worst |diff| gpt2 {:.2e}, bert {e:.2e}",
        d.max(d1)
    );
}

#[test]
fn bert_plan_matches_the_cpu_backend() {
    let (m, g) = model("tiny_bert");
    let plan = lower(&g, &LowerOptions::new(Target::Wgsl, Elem::F32)).unwrap();
    eprintln!("{}", summary(&plan));
    let w1 = parity(&g, &m.weights, &bert_inputs(2, 5), "bert b2 s5");
    let w2 = parity(&g, &m.weights, &bert_inputs(1, 7), "bert b1 s7");
    eprintln!("bert worst |diff|: {:.2e}", w1.max(w2));
}

#[test]
fn unoptimized_graphs_lower_too_and_match() {
    // The builder's primitives: decomposed softmax/norms (row reductions with elementwise
    // prologues), batched 4-D matmuls, the causal mask from iota comparisons and `where`.
    let (m, _) = model("tiny_gpt2");
    let plan = lower(&m.graph, &LowerOptions::new(Target::Wgsl, Elem::F32)).unwrap();
    eprintln!("unoptimized GPT-2: {} kernels", plan.kernels.len());
    parity(
        &m.graph,
        &m.weights,
        &gpt2_inputs(&m, 2, 3, 2),
        "unoptimized gpt2",
    );
    let (b, _) = model("tiny_bert");
    let plan = lower(&b.graph, &LowerOptions::new(Target::Wgsl, Elem::F32)).unwrap();
    eprintln!("unoptimized BERT: {} kernels", plan.kernels.len());
    parity(&b.graph, &b.weights, &bert_inputs(2, 4), "unoptimized bert");
}

/// Parses and validates a WGSL module with naga (subgroups and f16 enabled), as in
/// `codegen/tests/common`; panics with naga's message and the source.
fn validate_wgsl(src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("WGSL parse error:\n{}\n{src}", e.emit_to_string(src)));
    let caps = naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SHADER_FLOAT16;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("WGSL validation error:\n{}\n{src}", e.emit_to_string(src)));
}

fn nvrtc_or_skip() -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) if common::required("nvrtc") => panic!("TRANSFUSE_REQUIRE names nvrtc: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// The optimized graphs of both fixtures' configs with `layers` layers (config.json only).
fn graphs(layers: usize) -> Vec<(&'static str, Graph)> {
    let mut out = vec![];
    for name in ["tiny_gpt2", "tiny_bert"] {
        let mut cfg =
            transfuse::models::load_config(&common::fixture(&format!("{name}/model"))).unwrap();
        match &mut cfg {
            ModelConfig::Gpt2(c) => c.n_layer = layers,
            ModelConfig::Bert(c) => c.num_hidden_layers = layers,
            ModelConfig::Llama(c) => {
                c.num_hidden_layers = layers;
                c.sliding_window.resize(layers, None);
            }
        }
        let heads = BertHeads {
            pooler: true,
            ..BertHeads::default()
        };
        out.push((name, optimized(&build_graph(&cfg, heads).unwrap())));
    }
    out
}

/// The optimized graph of a BERT-base config (hidden 768, 12 heads, vocab 30522), 12 layers.
fn bert_base() -> Graph {
    let cfg = transfuse::models::BertConfig {
        vocab_size: 30522,
        hidden_size: 768,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        intermediate_size: 3072,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        hidden_act: transfuse::models::Activation::GeluErf,
        layer_norm_eps: 1e-12,
    };
    let heads = BertHeads {
        pooler: true,
        ..BertHeads::default()
    };
    optimized(&build_graph(&ModelConfig::Bert(cfg), heads).unwrap())
}

#[test]
fn every_kernel_of_both_plans_is_valid_wgsl_in_f32_and_f16() {
    let mut all = graphs(2);
    all.push(("bert_base", bert_base()));
    for (name, g) in all {
        for elem in [Elem::F32, Elem::F16] {
            let plan = lower(&g, &LowerOptions::new(Target::Wgsl, elem)).unwrap();
            assert!(attention_kernels(&plan)
                .iter()
                .all(|&i| plan.kernels[i].decode.is_some()));
            let mut seen = std::collections::HashSet::new();
            for k in all_kernels(&plan) {
                if seen.insert(k.name.clone()) {
                    let src = Target::Wgsl.print(k).unwrap();
                    validate_wgsl(&src);
                }
            }
            // The split-KV decode: partial kernels (decode variants) and their combines.
            assert!(seen.iter().any(|n| n.starts_with("attention_split_")));
            assert!(seen.iter().any(|n| n.starts_with("attention_combine_")));
            assert!(seen.iter().any(|n| n.starts_with("gemv_")));
            eprintln!(
                "{name} {elem:?}: {} distinct WGSL kernels valid",
                seen.len()
            );
        }
    }
}

#[test]
fn bf16_plans_are_cuda_only() {
    let (_, g) = &graphs(1)[0];
    let e = lower(g, &LowerOptions::new(Target::Wgsl, Elem::BF16)).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
    assert!(lower(g, &LowerOptions::new(Target::Cuda, Elem::BF16)).is_ok());
}

#[test]
fn every_kernel_of_both_plans_compiles_with_nvrtc_in_f32_f16_bf16() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut table = vec![];
    let mut all = graphs(2);
    all.push(("bert_base", bert_base()));
    for (name, g) in all {
        for elem in [Elem::F32, Elem::F16, Elem::BF16] {
            let plan = lower(&g, &LowerOptions::new(Target::Cuda, elem)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for k in all_kernels(&plan) {
                if !seen.insert(k.name.clone()) {
                    continue;
                }
                let entry = k.name.as_str();
                let src = Target::Cuda.print(k).unwrap();
                if src.contains("#include") && nvrtc::cuda_include_dir().is_none() {
                    assert!(
                        !common::required("nvrtc"),
                        "{entry}: CUDA headers missing (TRANSFUSE_CUDA_INCLUDE)"
                    );
                    eprintln!("skipping {entry}: no CUDA headers");
                    continue;
                }
                // f32 for both PTX targets; every dtype to sm_90 SASS with zero spills.
                let archs: &[&str] = if elem == Elem::F32 {
                    &["compute_80", "compute_90"]
                } else {
                    &["compute_80"]
                };
                for arch in archs {
                    if let Err(e) = nvrtc::compile_ptx(&src, entry, arch, &[]) {
                        panic!("{name} {elem:?} {entry} for {arch}: {e}\n{src}");
                    }
                }
                let sass = nvrtc::compile_sass(&src, entry, "sm_90")
                    .unwrap_or_else(|e| panic!("{name} {elem:?} {entry} for sm_90: {e}"));
                let r = sass.kernel(entry).expect("ptxas reports every kernel");
                assert_eq!(
                    (r.spill_stores_bytes, r.spill_loads_bytes),
                    (0, 0),
                    "{name} {elem:?} {entry} spills at default tunables"
                );
            }
            // The split-KV decode: partial kernels (decode variants) and their combines.
            assert!(seen.iter().any(|n| n.starts_with("attention_split_")));
            assert!(seen.iter().any(|n| n.starts_with("attention_combine_")));
            assert!(seen.iter().any(|n| n.starts_with("gemv_")));
            table.push(format!(
                "{name} {elem:?}: {} distinct kernels compile (decode variants included)",
                seen.len()
            ));
        }
    }
    eprintln!("{}", table.join("\n"));
}

/// Forward kernels of a plan of the `layers`-layer model.
fn forward_kernels(name: &str, layers: usize) -> usize {
    let (_, g) = graphs(layers)
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap();
    let plan = lower(&g, &LowerOptions::new(Target::Cuda, Elem::F32)).unwrap();
    // Launched at prefill: not the split-KV decode's combines (a decode step adds one per
    // attention).
    plan.forward().filter(|k| k.only_when.is_none()).count()
}

#[test]
fn kernels_per_gpt2_block_and_per_bert_layer() {
    let g2 = forward_kernels("tiny_gpt2", 2);
    let g3 = forward_kernels("tiny_gpt2", 3);
    let b2 = forward_kernels("tiny_bert", 2);
    let b3 = forward_kernels("tiny_bert", 3);
    let (per_block, per_layer) = (g3 - g2, b3 - b2);
    eprintln!(
        "GPT-2: {per_block} kernels per block ({} outside the blocks); BERT: {per_layer} per layer ({} outside)",
        g2 - 2 * per_block,
        b2 - 2 * per_layer
    );
    // ln_1, QKV matmul (which also writes the new K/V rows into the present_key/value cache
    // buffers in place: no concat launch, no copy of the past), attention, projection +
    // residual, ln_2, MLP up + GELU, MLP down + residual.
    assert!(per_block <= 7);
    assert_eq!(per_block, 7);
    // QKV matmul, attention, projection + residual, ln, MLP up + GELU, MLP down + residual, ln.
    assert!(per_layer <= 8);
    assert_eq!(per_layer, 7);
}
