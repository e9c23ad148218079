//! Configs read into sizes, parameter counts against the published ones, inference memory, and
//! the planner's refusals.

use transfuse_planner::{plan, Device, Mode, ModelDesc, PlanError, Request};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// GPT-2 small as on the Hugging Face hub (`gpt2`): 124,439,808 parameters (tied embeddings).
#[test]
fn gpt2_small_parameters() {
    let cfg = r#"{"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
                  "n_inner": null, "vocab_size": 50257, "n_positions": 1024}"#;
    let m = ModelDesc::from_json(cfg).unwrap();
    assert_eq!(m.params(), 124_439_808);
    assert_eq!(m.intermediate, 3072);
    assert!(m.decoder && m.tied_embeddings && !m.gated_mlp);
}

/// BERT-base (`bert-base-uncased`): 109,482,240 parameters with the pooler, which the planner
/// does not count (it plans the encoder): 109,482,240 − (768² + 768).
#[test]
fn bert_base_parameters() {
    let cfg = r#"{"model_type": "bert", "num_hidden_layers": 12, "hidden_size": 768,
                  "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
                  "max_position_embeddings": 512, "type_vocab_size": 2}"#;
    let m = ModelDesc::from_json(cfg).unwrap();
    assert_eq!(m.params(), 109_482_240 - (768 * 768 + 768));
    assert!(!m.decoder);
}

fn llama2_7b() -> &'static str {
    r#"{"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": false}"#
}

/// Llama 2 7B: 6,738,415,616 parameters (gated MLP, RMSNorm, untied output embedding).
#[test]
fn llama2_7b_parameters_and_kv_cache() {
    let m = ModelDesc::from_json(llama2_7b()).unwrap();
    assert_eq!(m.params(), 6_738_415_616);
    // KV cache: 2 (K, V) × 2 bytes × 32 layers × 4096 per token = 0.5 MiB per token, so 4096
    // tokens are 2 GiB on one device.
    let mut req = Request::inference(m, Device::by_name("h100-80gb").unwrap(), 1);
    req.mode = Mode::Inference {
        kv_cache_tokens: Some(4096),
    };
    req.seq = Some(4096);
    let p = plan(&req).unwrap();
    let l = p.best().unwrap();
    assert_eq!(l.memory.kv_cache_gib, 2.0);
    assert!(close(
        l.memory.weights_gib * GIB,
        2.0 * 6_738_415_616.0,
        1e-12
    ));
    assert!(l.decode_ms_per_token.is_some());
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

/// Mistral 7B (grouped-query attention, 8 key/value heads): 7,241,732,096 parameters; its KV
/// cache is a quarter of a 32-head cache, and with t = 16 > 8 heads the KV heads are replicated
/// (each rank keeps one) rather than refused.
#[test]
fn mistral_gqa() {
    let cfg = r#"{"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "vocab_size": 32000, "max_position_embeddings": 32768,
                  "tie_word_embeddings": false}"#;
    let m = ModelDesc::from_json(cfg).unwrap();
    assert_eq!(m.params(), 7_241_732_096);
    assert_eq!(m.kv_dim(), 1024);
    let kv = |t: u64| {
        let mut req = Request::inference(m.clone(), Device::by_name("h100-80gb").unwrap(), t);
        req.tp = Some(t);
        req.seq = Some(4096);
        req.mode = Mode::Inference {
            kv_cache_tokens: Some(4096),
        };
        plan(&req).unwrap().best().unwrap().memory.kv_cache_gib
    };
    assert_eq!(kv(1), 0.5);
    assert_eq!(kv(8), 0.5 / 8.0);
    assert_eq!(kv(16), 0.5 / 8.0);
}

/// Qwen2 (bias on q/k/v only, tied embeddings in the small models): Qwen2-0.5B has
/// 494,032,768 parameters.
#[test]
fn qwen2_half_b() {
    let cfg = r#"{"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896,
                  "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                  "vocab_size": 151936, "max_position_embeddings": 32768,
                  "tie_word_embeddings": true}"#;
    let m = ModelDesc::from_json(cfg).unwrap();
    assert_eq!(m.params(), 494_032_768);
}

/// The generic GPT-3-style form and the fixture folders.
#[test]
fn generic_and_fixture_configs() {
    let m = ModelDesc::from_json(
        r#"{"model_type": "gpt", "n_layer": 96, "hidden": 12288, "heads": 96, "vocab": 51200, "seq": 2048}"#,
    )
    .unwrap();
    assert_eq!(m, ModelDesc::gpt("gpt", 96, 12288, 96, 51200, 2048));
    // Without model_type, the generic keys are enough.
    assert!(ModelDesc::from_json(
        r#"{"n_layer": 2, "hidden": 64, "heads": 4, "vocab": 10, "seq": 8}"#
    )
    .is_ok());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
    let g = ModelDesc::from_dir(&std::path::Path::new(dir).join("tiny_gpt2/model")).unwrap();
    assert_eq!(
        (g.family.as_str(), g.layers, g.hidden, g.heads),
        ("gpt2", 2, 64, 4)
    );
    let b = ModelDesc::from_dir(&std::path::Path::new(dir).join("tiny_bert/model")).unwrap();
    assert_eq!(
        (b.family.as_str(), b.intermediate, b.decoder),
        ("bert", 256, false)
    );
}

#[test]
fn bad_configs_name_the_field() {
    let err = |text: &str| ModelDesc::from_json(text).unwrap_err();
    assert!(err(r#"{"model_type": "gpt2", "n_layer": 2, "n_head": 4}"#).contains("`n_embd`"));
    assert!(err(r#"{"model_type": "t5"}"#).contains("`t5`"));
    assert!(err(
        r#"{"model_type": "gpt", "n_layer": 0, "hidden": 8, "heads": 2, "vocab": 1, "seq": 1}"#
    )
    .contains("`n_layer`"));
    assert!(err(
        r#"{"model_type": "gpt", "n_layer": 1, "hidden": 10, "heads": 3, "vocab": 1, "seq": 1}"#
    )
    .contains("not divisible by 3 heads"));
    assert!(err(r#"{"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 4,
        "num_key_value_heads": 3, "intermediate_size": 8, "vocab_size": 8, "max_position_embeddings": 8}"#)
        .contains("key/value heads"));
    assert!(err("[1]").contains("object"));
    assert!(err("{").contains("JSON"));
    let missing =
        ModelDesc::from_file(std::path::Path::new("/nonexistent/config.json")).unwrap_err();
    assert!(missing
        .to_string()
        .starts_with("/nonexistent/config.json: "));
}

fn gpt3_req(gpus: u64) -> Request {
    let mut r = Request::training(
        ModelDesc::gpt("gpt3-175b", 96, 12288, 96, 51200, 2048),
        Device::by_name("a100-80gb").unwrap(),
        gpus,
    );
    r.global_batch = Some(1536);
    r
}

#[test]
fn refusals() {
    let usage = |r: &Request| match plan(r) {
        Err(e @ (PlanError::Usage(_) | PlanError::NoLayout(_))) => e.to_string(),
        other => panic!("{other:?}"),
    };
    let mut r = gpt3_req(1000);
    r.tp = Some(8);
    r.pp = Some(16);
    assert_eq!(
        usage(&r),
        "--gpus 1000 is not divisible by --tp 8 × --pp 16 = 128"
    );
    let mut r = gpt3_req(1024);
    r.tp = Some(8);
    r.pp = Some(16);
    r.dp = Some(4);
    assert!(usage(&r).contains("--dp 4"));
    let mut r = gpt3_req(1024);
    r.tp = Some(8);
    r.pp = Some(1);
    assert_eq!(
        usage(&r),
        "gpt3-175b on 1024 × a100-80gb: layout t=8, p=1, d=128 does not work: needs 92.9 GiB per device, has 80"
    );
    let r = gpt3_req(8);
    let msg = usage(&r);
    assert!(
        msg.contains("does not fit on 8 × a100-80gb in any of"),
        "{msg}"
    );
    let mut r = gpt3_req(1024);
    r.seq = Some(4096);
    assert!(usage(&r).contains("exceeds the model's 2048 positions"));
    let mut r = gpt3_req(1024);
    r.micro_batch = Some(5);
    assert!(usage(&r).contains("--micro-batch-size 5"));
    let mut r = gpt3_req(1024);
    r.tp = Some(64);
    assert!(usage(&r).contains("t=64 does not divide the 96 attention heads"));
    assert!(matches!(
        Device::by_name("v100"),
        Err(PlanError::UnknownGpu(_))
    ));
}

/// Inference on BERT has no KV cache; a bigger batch fills the pipeline (smaller bubble).
#[test]
fn inference_plans() {
    let bert = ModelDesc::from_json(
        r#"{"model_type": "bert", "num_hidden_layers": 24, "hidden_size": 1024,
            "num_attention_heads": 16, "intermediate_size": 4096, "vocab_size": 30522,
            "max_position_embeddings": 512}"#,
    )
    .unwrap();
    let mut r = Request::inference(bert, Device::by_name("a100-40gb").unwrap(), 4);
    r.pp = Some(4);
    r.global_batch = Some(64);
    let p = plan(&r).unwrap();
    let l = p.best().unwrap();
    assert_eq!(l.memory.kv_cache_gib, 0.0);
    assert_eq!(l.micro_batches, 64);
    assert_eq!(l.bubble_fraction, 3.0 / 64.0);
    assert!(l.decode_ms_per_token.is_none());
    assert!(l.mfu > 0.0 && l.mfu < 1.0);
}
