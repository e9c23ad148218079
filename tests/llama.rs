//! The LLaMA family (LLaMA, Mistral, Qwen2) from Hugging Face folders: parity with
//! transformers on the fixtures (tests/fixtures/README.md) on the CPU and on wgpu, the
//! tokenizer, RoPE tables against values computed outside the project, other shapes from a
//! config alone (optimized against unoptimized), a LLaMA-3-8B-shaped config compiled, and the
//! CLI's errors.
//!
//! Tolerances as tests/parity.rs (1e-4 on the CPU) and tests/gpu_parity.rs (1e-3 on device
//! backends); greedy tokens exact.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::cli::{assert_error, assert_ok, transfuse, TempDir};
use common::{assert_close_masked, fixture, outputs_of, rows};
use transfuse::ir::{Builder, DType, Dim, Tensor};
use transfuse::models::{
    checkpoint_weights, llama, load_config, parse_config, LlamaConfig, Model, ModelConfig,
    ModelError, RopeConfig, RopeScaling,
};
use transfuse::runtime::{Backend, CpuBackend};
use transfuse::{Batch, Sampling, Session};

const CPU_TOL: f32 = 1e-4;
const DEVICE_TOL: f32 = 1e-3;
const FIXTURES: [&str; 4] = [
    "tiny_llama",
    "tiny_llama_linear",
    "tiny_mistral",
    "tiny_qwen2",
];

fn model(name: &str) -> Model {
    Model::load(&fixture(&format!("{name}/model"))).unwrap()
}

/// The fixture's prompt for greedy decoding (`inputs.json`).
fn prompt_of(name: &str) -> Vec<i64> {
    let text = std::fs::read_to_string(fixture(&format!("{name}/inputs.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompt"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn check_logits(name: &str, s: &Session, tol: f32) {
    let refs = outputs_of(name);
    let ids = rows(&refs["input_ids"]);
    let mask = rows(&refs["attention_mask_padded"]);
    let out = s.forward(&Batch::new(ids.clone())).unwrap();
    assert_close_masked(
        &out["logits"],
        &refs["logits"],
        None,
        tol,
        &format!("{name} logits"),
    );
    let padded = Batch {
        input_ids: ids,
        attention_mask: Some(mask.clone()),
        token_type_ids: None,
    };
    let out = s.forward(&padded).unwrap();
    let want = &refs["logits_padded"];
    assert_close_masked(
        &out["logits"],
        want,
        Some(&mask),
        tol,
        &format!("{name} logits_padded"),
    );
}

fn check_greedy(name: &str, s: &Session) {
    let refs = outputs_of(name);
    let want = rows(&refs["greedy_ids"]).remove(0);
    let prompt = prompt_of(name);
    assert_eq!(&want[..prompt.len()], &prompt[..]);
    let got = s
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want, "{name}: greedy ids");
    // Twice: the carried cache of the first call must not leak into the second.
    let again = s
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(again, want, "{name}: greedy ids, second call");
}

#[test]
fn fixtures_logits_match_transformers_on_cpu() {
    for name in FIXTURES {
        for optimize in [true, false] {
            eprintln!("{name}, optimize: {optimize}");
            let s = if optimize {
                let s = Session::cpu(model(name)).unwrap();
                eprintln!(
                    "  {}",
                    transfuse::fusion_summary(s.report.as_ref().unwrap())
                );
                s
            } else {
                Session::cpu_unoptimized(model(name))
            };
            check_logits(name, &s, CPU_TOL);
        }
    }
}

#[test]
fn fixtures_greedy_decoding_with_kv_cache_is_exact_on_cpu() {
    for name in FIXTURES {
        check_greedy(name, &Session::cpu(model(name)).unwrap());
        check_greedy(name, &Session::cpu_unoptimized(model(name)));
    }
}

/// Mistral's window (8) is shorter than the fixture's 20 tokens; the optimizer must turn the
/// mask into `attention{window=8}` (the window rule of passes/src/rules/attention.rs fires on
/// the builder's spelling), and every RMSNorm must fuse.
#[test]
fn fusions_found_on_the_family() {
    let s = Session::cpu(model("tiny_mistral")).unwrap();
    let text = transfuse::ir::to_text(&s.graph);
    assert!(text.contains("window=8"), "no windowed attention:\n{text}");
    for name in FIXTURES {
        let s = Session::cpu(model(name)).unwrap();
        let after = &s.report.as_ref().unwrap().ops_after;
        let layers = match &s.model.config {
            ModelConfig::Llama(c) => c.num_hidden_layers,
            _ => unreachable!(),
        };
        assert_eq!(
            after.get("rms_norm"),
            Some(&(2 * layers + 1)),
            "{name}: {after:?}"
        );
        assert!(!after.contains_key("rsqrt"), "{name}: {after:?}");
    }
}

#[test]
fn tiny_llama_tokenizer_ids_and_text_are_exact() {
    let text = std::fs::read_to_string(fixture("tiny_llama/tokenizer_expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m = model("tiny_llama");
    let tok = m.tokenizer.as_ref().expect("tiny_llama has tokenizer.json");
    let sentences = v["sentences"].as_array().unwrap();
    for (i, sentence) in sentences.iter().enumerate() {
        let sentence = sentence.as_str().unwrap();
        let want: Vec<i64> = v["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let ids = tok.encode(sentence, true).unwrap();
        assert_eq!(ids, want, "ids of {sentence:?}");
        assert_eq!(ids[0], 1, "`<s>` first");
        assert_eq!(tok.decode(&ids).unwrap(), v["decoded"][i].as_str().unwrap());
    }
}

#[test]
fn generate_prompt_prints_decoded_text() {
    let dir = fixture("tiny_llama/model");
    let out = transfuse([
        "generate".as_ref(),
        "--model".as_ref(),
        dir.as_os_str(),
        "--prompt".as_ref(),
        "keys and values".as_ref(),
        "--max-new-tokens".as_ref(),
        "4".as_ref(),
        "--json".as_ref(),
    ]);
    let stdout = assert_ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<i64> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    // `<s>` then the sentence's ids (tokenizer_expected.json), then 4 new tokens.
    assert_eq!(
        &ids[..10],
        &[1, 423, 293, 296, 269, 282, 310, 354, 273, 287]
    );
    assert_eq!(ids.len(), 14);
    let tok = model("tiny_llama").tokenizer.unwrap();
    let text = v["text"].as_str().unwrap();
    assert_eq!(text, tok.decode(&ids).unwrap());
    assert!(text.starts_with("keys and values"), "{text:?}");
}

/// Runs the RoPE tables of [`llama::rope_tables`] with inverse frequencies from
/// [`llama::inv_freq`] for positions `past..past+seq`; returns `(cos, sin)` `[seq, head_dim]`.
fn rope_run(rope: &RopeConfig, head_dim: usize, past: usize, seq: usize) -> (Vec<f32>, Vec<f32>) {
    let mut b = Builder::new();
    // `past` is bound through a dummy input of shape [past].
    let _anchor = b
        .input(
            "anchor",
            vec![Dim::sym("past"), Dim::sym("seq")],
            DType::F32,
        )
        .unwrap();
    let inv = b.weight("inv", vec![(head_dim / 2).into()]).unwrap();
    let (cos, sin) = llama::rope_tables(&mut b, inv, Dim::sym("past"), Dim::sym("seq")).unwrap();
    b.output("cos", cos);
    b.output("sin", sin);
    let g = b.finish();
    let f = llama::inv_freq(rope, head_dim);
    let mut weights = HashMap::new();
    weights.insert("inv".to_string(), Arc::new(Tensor::f32(vec![f.len()], f)));
    let mut loaded = CpuBackend::new().load(&g, &weights).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert(
        "anchor".to_string(),
        Tensor::f32(vec![past, seq], vec![0.0; past * seq]),
    );
    let out = loaded.run(&inputs, &[]).unwrap();
    let get = |k: &str| out[k].as_f32().unwrap().to_vec();
    (get("cos"), get("sin"))
}

/// `[position][column]` of a cos or sin table.
type Table = [[f32; 8]; 3];

/// cos/sin of RoPE at positions 7, 8, 9 for head_dim 16 (the first 8 columns; the other 8
/// repeat them), produced outside the project with transformers 5.24.0 / torch 2.15.0:
/// `LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
/// max_position_embeddings=128, rope_parameters=R))(zeros(1, 3, 16), arange(7, 10)[None])`,
/// with R = `{"rope_type": "default", "rope_theta": 10000}`, `{"rope_type": "linear",
/// "rope_theta": 20000, "factor": 4}` and `{"rope_type": "llama3", "rope_theta": 500000,
/// "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
/// "original_max_position_embeddings": 64}` (its bands: column 0 kept, column 1 interpolated,
/// the rest divided by 8).
/// Printed with `%.7e`, as pasted (hence more digits than an f32 holds).
#[rustfmt::skip]
#[allow(clippy::excessive_precision)]
const ROPE_REFERENCE: [(&str, Table, Table); 3] = [
    ("default",
     [[7.5390226e-01, -5.9943748e-01, 7.6484221e-01, 9.7559988e-01, 9.9755102e-01, 9.9975502e-01, 9.9997550e-01, 9.9999756e-01],
      [-1.4550003e-01, -8.1863242e-01, 6.9670671e-01, 9.6817029e-01, 9.9680167e-01, 9.9968004e-01, 9.9996799e-01, 9.9999678e-01],
      [-9.1113025e-01, -9.5664418e-01, 6.2160993e-01, 9.5977265e-01, 9.9595273e-01, 9.9959505e-01, 9.9995953e-01, 9.9999595e-01]],
     [[6.5698659e-01, 8.0042160e-01, 6.4421767e-01, 2.1955611e-01, 6.9942847e-02, 2.2134136e-02, 6.9999429e-03, 2.2135926e-03],
      [9.8935825e-01, 5.7431781e-01, 7.1735609e-01, 2.5029236e-01, 7.9914689e-02, 2.5295524e-02, 7.9999147e-03, 2.5298195e-03],
      [4.1211849e-01, 2.9125923e-01, 7.8332692e-01, 2.8077835e-01, 8.9878544e-02, 2.8456658e-02, 8.9998795e-03, 2.8460461e-03]]),
    ("linear",
     [[-1.7824605e-01, 8.7397742e-01, 9.8919195e-01, 9.9908966e-01, 9.9992347e-01, 9.9999356e-01, 9.9999946e-01, 9.9999994e-01],
      [-4.1614684e-01, 8.3648223e-01, 9.8589116e-01, 9.9881101e-01, 9.9989998e-01, 9.9999160e-01, 9.9999928e-01, 9.9999994e-01],
      [-6.2817365e-01, 7.9459274e-01, 9.8215467e-01, 9.9849528e-01, 9.9987346e-01, 9.9998939e-01, 9.9999911e-01, 9.9999994e-01]],
     [[9.8398596e-01, 4.8596656e-01, 1.4662634e-01, 4.2659916e-02, 1.2374054e-02, 3.5883381e-03, 1.0405560e-03, 3.0174275e-04],
      [9.0929741e-01, 5.4799408e-01, 1.6738760e-01, 4.8749659e-02, 1.4141665e-02, 4.1009551e-03, 1.1892068e-03, 3.4484884e-04],
      [7.7807319e-01, 6.0714281e-01, 1.8807490e-01, 5.4837592e-02, 1.5909232e-02, 4.6135713e-03, 1.3378576e-03, 3.8795493e-04]]),
    ("llama3",
     [[7.5390226e-01, 8.4946752e-01, 9.9945867e-01, 9.9997962e-01, 9.9999923e-01, 1.0000000e+00, 1.0000000e+00, 1.0000000e+00],
      [-1.4550003e-01, 8.0493873e-01, 9.9929297e-01, 9.9997342e-01, 9.9999899e-01, 9.9999994e-01, 1.0000000e+00, 1.0000000e+00],
      [-9.1113025e-01, 7.5533766e-01, 9.9910522e-01, 9.9996632e-01, 9.9999875e-01, 9.9999994e-01, 1.0000000e+00, 1.0000000e+00]],
     [[6.5698659e-01, 5.2764094e-01, 3.2899339e-02, 6.3810386e-03, 1.2374364e-03, 2.3996716e-04, 4.6535089e-05, 9.0242120e-06],
      [9.8935825e-01, 5.9335792e-01, 3.7597168e-02, 7.2926003e-03, 1.4142130e-03, 2.7424819e-04, 5.3182957e-05, 1.0313385e-05],
      [4.1211849e-01, 6.5533584e-01, 4.2294163e-02, 8.2041556e-03, 1.5909894e-03, 3.0852921e-04, 5.9830825e-05, 1.1602559e-05]]),
];

#[test]
fn rope_tables_match_an_independent_reference() {
    let kinds = [
        RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Default,
        },
        RopeConfig {
            theta: 20000.0,
            scaling: RopeScaling::Linear { factor: 4.0 },
        },
        RopeConfig {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
        },
    ];
    for (rope, (kind, cos_ref, sin_ref)) in kinds.iter().zip(ROPE_REFERENCE) {
        let (cos, sin) = rope_run(rope, 16, 7, 3);
        let mut worst = 0f32;
        for p in 0..3 {
            for j in 0..16 {
                let (c, s) = (cos[p * 16 + j], sin[p * 16 + j]);
                let (cr, sr) = (cos_ref[p][j % 8], sin_ref[p][j % 8]);
                worst = worst.max((c - cr).abs()).max((s - sr).abs());
                assert!(
                    (c - cr).abs() <= 1e-6 && (s - sr).abs() <= 1e-6,
                    "{kind} position {} column {j}: cos {c} vs {cr}, sin {s} vs {sr}",
                    7 + p
                );
            }
        }
        eprintln!("{kind}: max |diff| {worst:.1e}");
    }
}

/// A small deterministic generator for test weights (SplitMix64 → roughly N(0, σ) by summing
/// uniforms).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self, sigma: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        s * sigma * (3.0f32).sqrt()
    }
}

/// Writes `config` and random weights for every tensor the graph reads from a checkpoint into
/// `dir`; norm scales near 1, the rest N(0, 0.2) as the fixtures' weights.
fn write_random_model(dir: &std::path::Path, config: &serde_json::Value, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = load_config(dir).unwrap();
    let graph = transfuse::models::build_graph(&cfg, Default::default()).unwrap();
    let mut rng = Rng(seed);
    let tensors: Vec<(String, Tensor)> = checkpoint_weights(&cfg, &graph)
        .unwrap()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let data = (0..n)
                .map(|_| match norm {
                    true => 1.0 + rng.normal(0.1),
                    false => rng.normal(0.2),
                })
                .collect();
            (name, Tensor::f32(shape, data))
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    transfuse::write_safetensors(&dir.join("model.safetensors"), &refs).unwrap();
}

/// Shapes the fixtures do not have, from a config alone: 3 layers, MQA, head_dim ≠
/// hidden/heads, all LLaMA biases, llama3 RoPE, a tied head; and a Mistral with a window of 3
/// and 2 key/value heads; a Qwen2 with a window on its last layer only. The optimized graph
/// must match the unoptimized one on the CPU, for a full forward with padding and for greedy
/// decoding with the KV cache, and one decoding step must reproduce the full forward's logits.
#[test]
fn other_shapes_from_config_alone_optimized_matches_unoptimized() {
    let tmp = TempDir::new("llama_other_shapes");
    let configs = [
        serde_json::json!({
            "model_type": "llama", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 10, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true,
            "rope_theta": 50000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        }),
        serde_json::json!({
            "model_type": "mistral", "vocab_size": 61, "hidden_size": 36, "intermediate_size": 52,
            "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "sliding_window": 3, "rope_theta": 10000.0
        }),
        serde_json::json!({
            "model_type": "qwen2", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 40,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "sliding_window": 4, "use_sliding_window": true,
            "max_window_layers": 2, "rope_theta": 1000000.0
        }),
    ];
    for (i, config) in configs.iter().enumerate() {
        let dir = tmp.join(&format!("m{i}"));
        write_random_model(&dir, config, 1 + i as u64);
        let m = Model::load(&dir).unwrap();
        let ModelConfig::Llama(c) = &m.config else {
            panic!()
        };
        eprintln!("{}: windows {:?}", c.family.model_type(), c.sliding_window);
        let vocab = c.vocab_size as i64;
        let fused = Session::cpu(m).unwrap();
        eprintln!(
            "  {}",
            transfuse::fusion_summary(fused.report.as_ref().unwrap())
        );
        let plain = Session::cpu_unoptimized(Model::load(&dir).unwrap());
        let ids: Vec<Vec<i64>> = (0..2)
            .map(|r| (0..11).map(|j| (r * 31 + j * 7 + 3) % vocab).collect())
            .collect();
        let mask = vec![vec![1; 11], [vec![1; 7], vec![0; 4]].concat()];
        let batch = Batch {
            input_ids: ids.clone(),
            attention_mask: Some(mask.clone()),
            token_type_ids: None,
        };
        let want = plain.forward(&batch).unwrap();
        let got = fused.forward(&batch).unwrap();
        assert_close_masked(
            &got["logits"],
            &want["logits"],
            Some(&mask),
            CPU_TOL,
            "logits",
        );
        let greedy_plain = plain.generate(&ids[0][..4], 6, Sampling::Greedy).unwrap();
        let greedy_fused = fused.generate(&ids[0][..4], 6, Sampling::Greedy).unwrap();
        assert_eq!(greedy_fused, greedy_plain);
        // Decoding the greedy sequence step by step reproduces the full forward's argmax.
        let full = plain
            .forward(&Batch::new(vec![greedy_plain.clone()]))
            .unwrap();
        let logits = full["logits"].as_f32().unwrap();
        let v = c_vocab(&fused);
        for (t, &next) in greedy_plain.iter().enumerate().skip(4) {
            let row = &logits[(t - 1) * v..t * v];
            let best = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)));
            assert_eq!(best, Some(next as usize), "step {t}");
        }
    }
}

fn c_vocab(s: &Session) -> usize {
    s.model.vocab_size()
}

#[test]
fn config_forms_and_kinds() {
    let path = std::path::Path::new("some/config.json");
    let base = || {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2
        })
    };
    let parse = |v: &serde_json::Value| match parse_config(path, &v.to_string()) {
        Ok(ModelConfig::Llama(c)) => Ok(c),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    };
    let c: LlamaConfig = parse(&base()).unwrap();
    assert_eq!((c.head_dim, c.num_key_value_heads), (8, 2));
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert_eq!(c.rope.theta, 10000.0);
    assert_eq!(c.sliding_window, vec![None]);
    // 4.x: `rope_scaling: null`, legacy `type`.
    let mut v = base();
    v["rope_scaling"] = serde_json::Value::Null;
    v["rope_theta"] = 5.0.into();
    assert_eq!(parse(&v).unwrap().rope.theta, 5.0);
    v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    assert_eq!(
        parse(&v).unwrap().rope.scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    // 5.x wins over top-level.
    v["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 7.0});
    let c = parse(&v).unwrap();
    assert_eq!((c.rope.theta, c.rope.scaling), (7.0, RopeScaling::Default));
    for kind in ["dynamic", "yarn", "longrope"] {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": kind, "factor": 2.0});
        let e = parse(&v).unwrap_err();
        assert!(
            matches!(&e, ModelError::UnsupportedRope { rope_type, .. } if rope_type == kind),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("`{kind}`")), "{e}");
    }
    let mut v = base();
    v["num_key_value_heads"] = 3.into();
    v["num_attention_heads"] = 4.into();
    let e = parse(&v).unwrap_err().to_string();
    assert!(
        e.contains("num_key_value_heads") && e.contains("does not divide"),
        "{e}"
    );
    // Mistral's window may be null; Qwen2 slides from max_window_layers on.
    let mut v = base();
    v["model_type"] = "mistral".into();
    v["sliding_window"] = serde_json::Value::Null;
    assert_eq!(parse(&v).unwrap().sliding_window, vec![None]);
    v["sliding_window"] = 5.into();
    assert_eq!(parse(&v).unwrap().sliding_window, vec![Some(5)]);
    let mut v = base();
    v["model_type"] = "qwen2".into();
    v["num_hidden_layers"] = 3.into();
    v["sliding_window"] = 5.into();
    v["max_window_layers"] = 1.into();
    assert_eq!(parse(&v).unwrap().sliding_window, vec![None; 3]);
    v["use_sliding_window"] = true.into();
    assert_eq!(
        parse(&v).unwrap().sliding_window,
        vec![None, Some(5), Some(5)]
    );
    let c = parse(&v).unwrap();
    assert!(c.qkv_bias && !c.o_bias && !c.mlp_bias);
}

/// A LLaMA-3-8B-shaped config.json alone compiles; prints the fused-op counts and the time.
#[test]
fn llama3_8b_shaped_config_compiles() {
    let tmp = TempDir::new("llama3_8b");
    let dir = tmp.join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "rope_theta": 500000.0
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        dir.as_os_str(),
        "--json".as_ref(),
    ]);
    let stdout = assert_ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    eprintln!(
        "compile: {:.2} s, e-graph {}, ops after {}",
        v["seconds"].as_f64().unwrap(),
        v["egraph"],
        v["ops_after"]
    );
    assert_eq!(v["ops_after"]["rms_norm"], 65, "{v}");
    // One GQA attention per layer reading the 8 kv heads directly: no `repeat_kv` (expand)
    // left; rope on q and k of every layer; SwiGLU as one gated matmul per layer.
    assert_eq!(v["ops_after"]["attention"], 32, "{v}");
    assert_eq!(v["ops_after"]["rope"], 64, "{v}");
    assert_eq!(v["ops_after"]["gated_matmul"], 32, "{v}");
    for gone in ["expand", "neg", "sigmoid"] {
        assert!(v["ops_after"].get(gone).is_none(), "{gone} left: {v}");
    }
    assert_eq!(v["ops_before"]["matmul"].as_u64().unwrap() % 32, 1, "{v}");
}

fn bad_model(
    tmp: &TempDir,
    rel: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let dir = tmp.copy_model("tiny_qwen2/model", rel);
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

#[test]
fn cli_errors_exit_2_with_one_line() {
    let tmp = TempDir::new("llama_cli_errors");
    let inputs = fixture("tiny_qwen2/inputs.json");
    let run = |dir: &std::path::Path| {
        let out = tmp.join("out.safetensors");
        transfuse([
            "run".as_ref(),
            "--model".as_ref(),
            dir.as_os_str(),
            "--inputs".as_ref(),
            inputs.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
    };
    let dir = bad_model(&tmp, "yarn", |v| {
        v["rope_parameters"] =
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
    });
    assert_error(
        &run(&dir),
        &["config.json", "rope_type `yarn`", "default, linear, llama3"],
    );
    let dir = bad_model(&tmp, "dynamic", |v| {
        v.as_object_mut().unwrap().remove("rope_parameters");
        v["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0});
    });
    assert_error(&run(&dir), &["rope_type `dynamic`"]);
    let dir = bad_model(&tmp, "heads", |v| v["num_key_value_heads"] = 3.into());
    assert_error(
        &run(&dir),
        &[
            "config.json",
            "num_key_value_heads",
            "num_attention_heads",
            "does not divide",
        ],
    );
    // Qwen2 promises q/k/v biases: a checkpoint without them is refused by name.
    let dir = tmp.join("nobias");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture("tiny_qwen2/model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let all =
        transfuse::models::load_all_safetensors(&fixture("tiny_qwen2/model/model.safetensors"))
            .unwrap();
    let kept: Vec<(&str, &Tensor)> = all
        .iter()
        .filter(|(n, _)| n.as_str() != "model.layers.1.self_attn.k_proj.bias")
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    transfuse::write_safetensors(&dir.join("model.safetensors"), &kept).unwrap();
    assert_error(
        &run(&dir),
        &[
            "model.safetensors",
            "missing weight `model.layers.1.self_attn.k_proj.bias`",
        ],
    );
}

/// Makes a fresh handle on the backend under test (device backends share one device per
/// process, so this is cheap).
type MakeBackend<'a> = &'a dyn Fn() -> Box<dyn Backend>;

fn device_logits(backend: MakeBackend<'_>) {
    for name in FIXTURES {
        let s = Session::new(model(name), backend()).unwrap();
        eprintln!("{name} on {}", s.backend_description());
        check_logits(name, &s, DEVICE_TOL);
    }
}

fn device_greedy(backend: MakeBackend<'_>) {
    for name in FIXTURES {
        let s = Session::new(model(name), backend()).unwrap();
        check_greedy(name, &s);
    }
}

/// One test per (backend, case), as tests/gpu_parity.rs.
macro_rules! per_backend {
    ($($case:ident),*) => {
        mod wgpu {
            $(
                #[test]
                fn $case() {
                    if crate::common::wgpu_backend().is_some() {
                        super::$case(&|| Box::new(crate::common::wgpu_backend().unwrap()));
                    }
                }
            )*
        }
        mod cuda {
            $(
                #[test]
                fn $case() {
                    if crate::common::cuda_backend().is_some() {
                        super::$case(&|| Box::new(crate::common::cuda_backend().unwrap()));
                    }
                }
            )*
        }
    };
}

per_backend!(device_logits, device_greedy);
