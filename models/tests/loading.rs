//! Loading of configs, safetensors weights and tokenizers, including every error path.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, minilm_dir, TempDir};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use transfuse_ir::Tensor;
use transfuse_models::{
    load_all_safetensors, load_config, load_safetensors, parse_config, Activation, BertConfig,
    Gpt2Config, ModelConfig, ModelError, Tokenizer,
};

const SENTENCES: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog.",
    "Fused kernels make transformers fast!",
    "Hello world",
];

fn tiny_bert_config() -> BertConfig {
    BertConfig {
        vocab_size: 1000,
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 256,
        max_position_embeddings: 128,
        type_vocab_size: 2,
        hidden_act: Activation::GeluErf,
        layer_norm_eps: 1e-12,
    }
}

fn tiny_gpt2_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 1000,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_positions: 128,
        n_inner: 256,
        activation: Activation::GeluTanh,
        layer_norm_epsilon: 1e-5,
    }
}

/// Canonical (unprefixed) GPT-2 weight names and shapes.
fn gpt2_expected(c: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let d = c.n_embd;
    let mut v = vec![
        ("wte.weight".to_string(), vec![c.vocab_size, d]),
        ("wpe.weight".to_string(), vec![c.n_positions, d]),
        ("ln_f.weight".to_string(), vec![d]),
        ("ln_f.bias".to_string(), vec![d]),
    ];
    for i in 0..c.n_layer {
        let p = format!("h.{i}.");
        for (n, s) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, c.n_inner]),
            ("mlp.c_fc.bias", vec![c.n_inner]),
            ("mlp.c_proj.weight", vec![c.n_inner, d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            v.push((format!("{p}{n}"), s));
        }
    }
    v
}

/// Canonical BERT weight names and shapes.
fn bert_expected(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let mut v = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![c.vocab_size, d],
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            vec![c.max_position_embeddings, d],
        ),
        (
            "embeddings.token_type_embeddings.weight".to_string(),
            vec![c.type_vocab_size, d],
        ),
        ("embeddings.LayerNorm.weight".to_string(), vec![d]),
        ("embeddings.LayerNorm.bias".to_string(), vec![d]),
        ("pooler.dense.weight".to_string(), vec![d, d]),
        ("pooler.dense.bias".to_string(), vec![d]),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}.");
        for (n, s) in [
            ("attention.self.query.weight", vec![d, d]),
            ("attention.self.query.bias", vec![d]),
            ("attention.self.key.weight", vec![d, d]),
            ("attention.self.key.bias", vec![d]),
            ("attention.self.value.weight", vec![d, d]),
            ("attention.self.value.bias", vec![d]),
            ("attention.output.dense.weight", vec![d, d]),
            ("attention.output.dense.bias", vec![d]),
            ("attention.output.LayerNorm.weight", vec![d]),
            ("attention.output.LayerNorm.bias", vec![d]),
            ("intermediate.dense.weight", vec![f, d]),
            ("intermediate.dense.bias", vec![f]),
            ("output.dense.weight", vec![d, f]),
            ("output.dense.bias", vec![d]),
            ("output.LayerNorm.weight", vec![d]),
            ("output.LayerNorm.bias", vec![d]),
        ] {
            v.push((format!("{p}{n}"), s));
        }
    }
    v
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn json_ids(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn parse(text: &str) -> Result<ModelConfig, ModelError> {
    parse_config(Path::new("some/config.json"), text)
}

/// The `Config` error message of `text`, asserting that the error names the file.
fn config_error(text: &str) -> String {
    match parse(text) {
        Err(e @ ModelError::Config { .. }) => {
            let s = e.to_string();
            assert!(s.starts_with("some/config.json: malformed config: "), "{s}");
            s
        }
        other => panic!("expected a Config error for {text}, got {other:?}"),
    }
}

fn bert_json(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = read_json(&fixture("tiny_bert/model/config.json"));
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

fn gpt2_json(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = read_json(&fixture("tiny_gpt2/model/config.json"));
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes `(name, dtype, shape, bytes)` tensors into a safetensors buffer.
fn st_bytes(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.to_string(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn one(name: &str, shape: &[usize]) -> Vec<(String, Vec<usize>)> {
    vec![(name.to_string(), shape.to_vec())]
}

// ---------------------------------------------------------------------------------------------
// config.json

#[test]
fn config_tiny_bert_fixture() {
    let c = load_config(&fixture("tiny_bert/model")).unwrap();
    assert_eq!(c, ModelConfig::Bert(tiny_bert_config()));
    assert_eq!(c.model_type(), "bert");
    let ModelConfig::Bert(b) = c else {
        unreachable!()
    };
    assert_eq!(b.head_dim(), 16);
}

#[test]
fn config_tiny_gpt2_fixture() {
    let c = load_config(&fixture("tiny_gpt2/model")).unwrap();
    assert_eq!(c, ModelConfig::Gpt2(tiny_gpt2_config()));
    assert_eq!(c.model_type(), "gpt2");
    let ModelConfig::Gpt2(g) = c else {
        unreachable!()
    };
    assert_eq!(g.head_dim(), 16);
}

#[test]
fn config_defaults_follow_hugging_face() {
    let c = parse(
        r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32, "some_unknown_field": [1, {}]}"#,
    )
    .unwrap();
    assert_eq!(
        c,
        ModelConfig::Bert(BertConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            hidden_act: Activation::GeluErf,
            layer_norm_eps: 1e-12,
        })
    );
    let c = parse(
        r#"{"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2}"#,
    )
    .unwrap();
    assert_eq!(
        c,
        ModelConfig::Gpt2(Gpt2Config {
            vocab_size: 10,
            n_embd: 8,
            n_layer: 1,
            n_head: 2,
            n_positions: 1024,
            n_inner: 32,
            activation: Activation::GeluTanh,
            layer_norm_epsilon: 1e-5,
        })
    );
    let ModelConfig::Gpt2(g) = parse(&gpt2_json(|m| {
        m.insert("n_inner".into(), 100.into());
        m.insert("activation_function".into(), "relu".into());
    }))
    .unwrap() else {
        panic!("not gpt2")
    };
    assert_eq!((g.n_inner, g.activation), (100, Activation::Relu));
}

#[test]
fn activation_names() {
    for (name, act) in [
        ("gelu", Activation::GeluErf),
        ("gelu_new", Activation::GeluTanh),
        ("gelu_pytorch_tanh", Activation::GeluTanh),
        ("gelu_fast", Activation::GeluTanh),
        ("relu", Activation::Relu),
    ] {
        assert_eq!(Activation::from_hf_name(name), Some(act), "{name}");
        let ModelConfig::Bert(b) = parse(&bert_json(|m| {
            m.insert("hidden_act".into(), name.into());
        }))
        .unwrap() else {
            panic!("not bert")
        };
        assert_eq!(b.hidden_act, act);
    }
    let e = config_error(&bert_json(|m| {
        m.insert("hidden_act".into(), "swish".into());
    }));
    assert!(e.contains("`hidden_act`") && e.contains("`swish`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.insert("activation_function".into(), "silu".into());
    }));
    assert!(e.contains("`activation_function`"), "{e}");
}

#[test]
fn config_missing_file_is_io_error_naming_the_path() {
    let dir = TempDir::new("noconfig");
    let e = load_config(dir.path()).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    let expected = dir.path().join("config.json");
    assert!(
        e.to_string().starts_with(&expected.display().to_string()),
        "{e}"
    );
}

#[test]
fn config_malformed_json() {
    let e = config_error(r#"{"model_type": "bert", "#);
    assert!(e.contains("invalid JSON"), "{e}");
    let e = config_error("[1, 2]");
    assert!(e.contains("JSON object"), "{e}");
}

#[test]
fn config_missing_field() {
    let e = config_error(&bert_json(|m| {
        m.remove("hidden_size");
    }));
    assert!(e.ends_with("missing field `hidden_size`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.remove("n_head");
    }));
    assert!(e.ends_with("missing field `n_head`"), "{e}");
    let e = config_error(&bert_json(|m| {
        m.remove("model_type");
    }));
    assert!(e.ends_with("missing field `model_type`"), "{e}");
}

#[test]
fn config_wrong_type_or_range() {
    let e = config_error(&bert_json(|m| {
        m.insert("num_hidden_layers".into(), "two".into());
    }));
    assert!(e.contains("field `num_hidden_layers`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.insert("n_embd".into(), (-64).into());
    }));
    assert!(e.contains("field `n_embd`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.insert("n_layer".into(), 2.5.into());
    }));
    assert!(e.contains("field `n_layer`"), "{e}");
    let e = config_error(&bert_json(|m| {
        m.insert("vocab_size".into(), 0.into());
    }));
    assert!(e.contains("field `vocab_size`: must be positive"), "{e}");
    let e = config_error(&bert_json(|m| {
        m.insert("layer_norm_eps".into(), "small".into());
    }));
    assert!(e.contains("field `layer_norm_eps`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.insert("model_type".into(), 2.into());
    }));
    assert!(e.contains("field `model_type`"), "{e}");
}

#[test]
fn config_unknown_model_type() {
    let text = bert_json(|m| {
        m.insert("model_type".into(), "t5".into());
    });
    let e = parse(&text).unwrap_err();
    assert!(
        matches!(&e, ModelError::UnknownModelType { model_type, .. } if model_type == "t5"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "some/config.json: unknown model_type `t5` (supported: bert, gpt2, llama, mistral, qwen2)"
    );
}

#[test]
fn config_heads_must_divide_hidden() {
    let e = config_error(&bert_json(|m| {
        m.insert("num_attention_heads".into(), 5.into());
    }));
    assert!(
        e.ends_with("field `num_attention_heads` (5) does not divide `hidden_size` (64)"),
        "{e}"
    );
    let e = config_error(&gpt2_json(|m| {
        m.insert("n_head".into(), 3.into());
    }));
    assert!(
        e.ends_with("field `n_head` (3) does not divide `n_embd` (64)"),
        "{e}"
    );
}

#[test]
fn config_unsupported_attention_variants() {
    let e = config_error(&bert_json(|m| {
        m.insert("position_embedding_type".into(), "relative_key".into());
    }));
    assert!(e.contains("`position_embedding_type`"), "{e}");
    let e = config_error(&gpt2_json(|m| {
        m.insert("scale_attn_by_inverse_layer_idx".into(), true.into());
    }));
    assert!(e.contains("`scale_attn_by_inverse_layer_idx`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn assert_safetensors_error(r: Result<impl std::fmt::Debug, ModelError>, path: &Path) -> String {
    match r {
        Err(e @ ModelError::Safetensors { .. }) => {
            let s = e.to_string();
            assert!(
                s.starts_with(&format!("{}: invalid safetensors: ", path.display())),
                "{s}"
            );
            s
        }
        other => panic!("expected a Safetensors error, got {other:?}"),
    }
}

#[test]
fn weights_tiny_bert_load_with_optional_prefix() {
    let expected = bert_expected(&tiny_bert_config());
    let path = fixture("tiny_bert/model/model.safetensors");
    let w = load_safetensors(&path, &expected, &["bert."]).unwrap();
    assert_eq!(w.len(), expected.len());
    for (name, shape) in &expected {
        assert_eq!(&w[name].shape, shape, "{name}");
        assert!(w[name].as_f32().unwrap().iter().all(|x| x.is_finite()));
    }
}

#[test]
fn weights_gpt2_prefix_handling() {
    let c = tiny_gpt2_config();
    let expected = gpt2_expected(&c);
    let path = fixture("tiny_gpt2/model/model.safetensors");
    // The fixture names every tensor `transformer.…`.
    let prefixed = load_safetensors(&path, &expected, &["transformer."]).unwrap();
    assert_eq!(prefixed.len(), expected.len());
    assert_eq!(prefixed["h.0.attn.c_attn.weight"].shape, vec![64, 192]);
    assert_eq!(prefixed["wte.weight"].shape, vec![1000, 64]);

    // Without the prefix allowed, the first canonical name is missing.
    let e = load_safetensors(&path, &expected, &[]).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingWeight { name, .. } if name == "wte.weight"),
        "{e:?}"
    );

    // The Hub's `gpt2` layout: no prefix, plus `attn.bias` buffers (U8 here) and a tied
    // `lm_head.weight`, which are ignored.
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(n, v)| {
            let n = n.strip_prefix("transformer.").unwrap().to_string();
            (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())
        })
        .collect();
    let wte = tensors
        .iter()
        .find(|t| t.0 == "wte.weight")
        .unwrap()
        .clone();
    tensors.push(("lm_head.weight".into(), wte.1, wte.2, wte.3));
    tensors.push((
        "h.0.attn.bias".into(),
        Dtype::U8,
        vec![1, 1, 4, 4],
        vec![1; 16],
    ));
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    let dir = TempDir::new("gpt2-noprefix");
    let bare_path = dir.write("model.safetensors", &st_bytes(&refs));
    let bare = load_safetensors(&bare_path, &expected, &["transformer."]).unwrap();
    assert_eq!(bare, prefixed);
}

#[test]
fn weights_truncated_file() {
    let full = std::fs::read(fixture("tiny_gpt2/model/model.safetensors")).unwrap();
    let dir = TempDir::new("truncated");
    let expected = gpt2_expected(&tiny_gpt2_config());
    for len in [full.len() - 1, full.len() / 2, 100, 9] {
        let path = dir.write("model.safetensors", &full[..len]);
        assert_safetensors_error(load_safetensors(&path, &expected, &["transformer."]), &path);
    }
}

#[test]
fn weights_empty_and_tiny_files() {
    let dir = TempDir::new("tiny-files");
    for (i, bytes) in [&b""[..], b"\x01", b"1234567"].iter().enumerate() {
        let path = dir.write(&format!("f{i}.safetensors"), bytes);
        let s = assert_safetensors_error(load_safetensors(&path, &[], &[]), &path);
        assert!(s.contains("8-byte"), "{s}");
        assert_safetensors_error(load_all_safetensors(&path), &path);
    }
}

#[test]
fn weights_corrupt_header() {
    let dir = TempDir::new("corrupt");
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Header length says 20, header is not JSON.
    let mut b = 20u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"this is not json!!!!");
    cases.push(b);
    // Header length far larger than the file.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    cases.push(b);
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    cases.push(b);
    // Valid JSON, offsets pointing outside the data.
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[0; 8]);
    cases.push(b);
    // Shape and offsets disagree.
    let header = br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[0; 16]);
    cases.push(b);
    for (i, bytes) in cases.iter().enumerate() {
        let path = dir.write(&format!("c{i}.safetensors"), bytes);
        assert_safetensors_error(load_safetensors(&path, &one("w", &[4]), &[]), &path);
    }
}

#[test]
fn weights_missing_file_is_io_error() {
    let path = PathBuf::from("/nonexistent/transfuse/model.safetensors");
    let e = load_safetensors(&path, &[], &[]).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/transfuse/model.safetensors: "),
        "{e}"
    );
}

#[test]
fn weights_missing_wrong_shape_wrong_dtype() {
    let dir = TempDir::new("errors");
    let path = dir.write(
        "model.safetensors",
        &st_bytes(&[
            (
                "a",
                Dtype::F32,
                vec![2, 3],
                le_bytes_f32(&[1., 2., 3., 4., 5., 6.]),
            ),
            (
                "ids",
                Dtype::I64,
                vec![2],
                [7i64, 8].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            ("d", Dtype::F64, vec![1], 1.5f64.to_le_bytes().to_vec()),
        ]),
    );
    let shown = path.display().to_string();

    let e = load_safetensors(&path, &one("b", &[2, 3]), &["bert."]).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingWeight { name, .. } if name == "b"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), format!("{shown}: missing weight `b`"));

    let e = load_safetensors(&path, &one("a", &[3, 2]), &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{shown}: weight `a` has shape [2, 3], expected [3, 2]")
    );

    let e = load_safetensors(&path, &one("ids", &[2]), &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{shown}: weight `ids` has unsupported dtype I64")
    );
    let e = load_safetensors(&path, &one("d", &[1]), &[]).unwrap_err();
    assert!(
        matches!(&e, ModelError::WeightDtype { dtype, .. } if dtype == "F64"),
        "{e:?}"
    );

    // Unexpected tensors (the I64 and F64 ones) are ignored.
    let w = load_safetensors(&path, &one("a", &[2, 3]), &[]).unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(
        *w["a"],
        Tensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.])
    );
}

#[test]
fn weights_f16_and_bf16_become_f32() {
    let vals = [1.0f32, -2.5, 0.0, 65504.0];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    let dir = TempDir::new("half");
    let path = dir.write(
        "model.safetensors",
        &st_bytes(&[
            ("h", Dtype::F16, vec![4], f16),
            ("b", Dtype::BF16, vec![2, 2], bf16),
        ]),
    );
    let w = load_safetensors(&path, &[one("h", &[4]), one("b", &[2, 2])].concat(), &[]).unwrap();
    assert_eq!(w["h"].as_f32().unwrap(), &vals);
    // bf16 has 8 mantissa bits: 65504 rounds to 65536.
    assert_eq!(w["b"].as_f32().unwrap(), &[1.0, -2.5, 0.0, 65536.0]);
}

#[test]
fn load_all_reads_reference_outputs() {
    let all = load_all_safetensors(&fixture("tiny_gpt2/outputs.safetensors")).unwrap();
    let inputs = read_json(&fixture("tiny_gpt2/inputs.json"));
    let ids = &all["input_ids"];
    assert_eq!(ids.shape, vec![2, 16]);
    let flat: Vec<i64> = json_ids(&inputs["input_ids"]).concat();
    assert_eq!(ids.as_i64().unwrap(), flat.as_slice());
    assert_eq!(all["logits"].shape, vec![2, 16, 1000]);
    assert!(all["logits"].as_f32().is_some());
}

// ---------------------------------------------------------------------------------------------
// tokenizers

fn gpt2_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("gpt2_tokenizer/tokenizer.json")).unwrap()
}

#[test]
fn gpt2_tokenizer_matches_reference_ids() {
    let tok = gpt2_tokenizer();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(50256));
    let expected = json_ids(&read_json(&fixture("gpt2_tokenizer/expected_ids.json"))["input_ids"]);
    for (text, ids) in SENTENCES.iter().zip(&expected) {
        // GPT-2's template adds no special tokens, so both flags give the reference ids.
        assert_eq!(&tok.encode(text, false).unwrap(), ids, "{text}");
        assert_eq!(&tok.encode(text, true).unwrap(), ids, "{text}");
    }
}

#[test]
fn gpt2_tokenizer_decode_round_trips() {
    let tok = gpt2_tokenizer();
    for text in SENTENCES
        .iter()
        .chain(&[" leading space", "tabs\tand\nnewlines", "ünïcödé ✓"])
    {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), *text);
    }
    // Special tokens are skipped.
    let mut ids = tok.encode("Hello world", false).unwrap();
    ids.push(50256);
    assert_eq!(tok.decode(&ids).unwrap(), "Hello world");
    // Ids outside the vocabulary are input errors.
    for bad in [-1i64, 50257, i64::MAX] {
        let e = tok.decode(&[15496, bad]).unwrap_err();
        assert!(matches!(e, ModelError::Input(_)), "{e:?}");
        assert!(e.to_string().contains(&bad.to_string()), "{e}");
    }
}

#[test]
fn gpt2_tokenizer_batch_pads_right_with_zero() {
    let tok = gpt2_tokenizer();
    // No padding config and no `[PAD]` token: pad id 0.
    assert_eq!(tok.pad_id(), 0);
    let (ids, mask) = tok.encode_batch_padded(&SENTENCES).unwrap();
    let expected = json_ids(&read_json(&fixture("gpt2_tokenizer/expected_ids.json"))["input_ids"]);
    let longest = expected.iter().map(Vec::len).max().unwrap();
    assert_eq!(longest, 10);
    let (mut want_ids, mut want_mask) = (vec![], vec![]);
    for row in &expected {
        let mut r = row.clone();
        r.resize(longest, 0);
        want_ids.push(r);
        let mut m = vec![1; row.len()];
        m.resize(longest, 0);
        want_mask.push(m);
    }
    assert_eq!(ids, want_ids);
    assert_eq!(mask, want_mask);
    assert_eq!(tok.encode_batch_padded(&[]).unwrap(), (vec![], vec![]));
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = TempDir::new("tokenizer");
    let missing = dir.path().join("tokenizer.json");
    let e = Tokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e:?}");
    let bad = dir.write("bad.json", b"{\"model\": 3}");
    let e = Tokenizer::from_file(&bad).unwrap_err();
    assert!(matches!(e, ModelError::Tokenizer { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: tokenizer: ", bad.display())),
        "{e}"
    );
}

#[test]
fn minilm_tokenizer_matches_reference_batch() {
    let Some(dir) = minilm_dir() else { return };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.pad_id(), 0);
    let inputs = read_json(&fixture("minilm/inputs.json"));
    let sentences: Vec<&str> = inputs["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(sentences, SENTENCES);
    let (ids, mask) = tok.encode_batch_padded(&sentences).unwrap();
    assert_eq!(ids, json_ids(&inputs["input_ids"]));
    assert_eq!(mask, json_ids(&inputs["attention_mask"]));
    // The file's fixed padding to 128 does not leak into single encodes.
    assert_eq!(
        tok.encode("Hello world", true).unwrap(),
        vec![101, 7592, 2088, 102]
    );
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![7592, 2088]);
    assert_eq!(
        tok.decode(&ids[0]).unwrap(),
        "the quick brown fox jumps over the lazy dog."
    );
}

#[test]
fn minilm_config_and_weights() {
    let Some(dir) = minilm_dir() else { return };
    let ModelConfig::Bert(c) = load_config(&dir).unwrap() else {
        panic!("not bert")
    };
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads
        ),
        (30522, 384, 6, 12)
    );
    assert_eq!(
        (c.intermediate_size, c.max_position_embeddings),
        (1536, 512)
    );
    // The file also holds `embeddings.position_ids` (I64), which is not asked for.
    let expected = bert_expected(&c);
    let w = load_safetensors(&dir.join("model.safetensors"), &expected, &["bert."]).unwrap();
    assert_eq!(w.len(), expected.len());
}
