//! Parity with PyTorch/transformers on the reference fixtures (tests/fixtures/README.md), on the
//! CPU backend. Tolerance: 1e-4 absolute (an independent float64 re-implementation reproduced
//! the fixtures to 4e-6, so 1e-4 leaves room for f32 accumulation order only).

mod common;

use common::{assert_close_masked, fixture, minilm_dir, outputs_of, rows};
use transfuse::models::{Model, Pooling};
use transfuse::{Batch, Sampling, Session};

const TOL: f32 = 1e-4;

#[test]
fn tiny_gpt2_logits_match_transformers() {
    let session = Session::cpu(Model::load(&fixture("tiny_gpt2/model")).unwrap());
    let refs = outputs_of("tiny_gpt2");
    let ids = rows(&refs["input_ids"]);
    let out = session.forward(&Batch::new(ids.clone())).unwrap();
    assert_close_masked(&out["logits"], &refs["logits"], None, TOL, "logits");

    let mask = rows(&refs["attention_mask_padded"]);
    let padded = Batch {
        input_ids: ids,
        attention_mask: Some(mask.clone()),
        token_type_ids: None,
    };
    let out = session.forward(&padded).unwrap();
    assert_close_masked(
        &out["logits"],
        &refs["logits_padded"],
        Some(&mask),
        TOL,
        "logits_padded",
    );
}

#[test]
fn tiny_gpt2_greedy_decoding_with_kv_cache_is_exact() {
    let session = Session::cpu(Model::load(&fixture("tiny_gpt2/model")).unwrap());
    let refs = outputs_of("tiny_gpt2");
    let want = rows(&refs["greedy_ids"]).remove(0);
    let prompt = rows(&refs["input_ids"]).remove(0);
    let got = session
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn tiny_bert_matches_transformers() {
    let session = Session::cpu(Model::load(&fixture("tiny_bert/model")).unwrap());
    let refs = outputs_of("tiny_bert");
    let mask = rows(&refs["attention_mask"]);
    let batch = Batch {
        input_ids: rows(&refs["input_ids"]),
        attention_mask: Some(mask.clone()),
        token_type_ids: Some(rows(&refs["token_type_ids"])),
    };
    let out = session.forward(&batch).unwrap();
    assert_close_masked(
        &out["last_hidden_state"],
        &refs["last_hidden_state"],
        Some(&mask),
        TOL,
        "last_hidden_state",
    );
    assert_close_masked(
        &out["pooler_output"],
        &refs["pooler_output"],
        None,
        TOL,
        "pooler_output",
    );
}

#[test]
fn minilm_matches_transformers_and_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let model = Model::load_with(&dir, Some(Pooling::Mean), true).unwrap();
    let session = Session::cpu(model);
    let refs = outputs_of("minilm");
    let mask = rows(&refs["attention_mask"]);
    let batch = Batch {
        input_ids: rows(&refs["input_ids"]),
        attention_mask: Some(mask.clone()),
        token_type_ids: Some(rows(&refs["token_type_ids"])),
    };
    let out = session.forward(&batch).unwrap();
    assert_close_masked(
        &out["last_hidden_state"],
        &refs["last_hidden_state"],
        Some(&mask),
        TOL,
        "last_hidden_state",
    );
    assert_close_masked(
        &out["pooler_output"],
        &refs["pooler_output"],
        None,
        TOL,
        "pooler_output",
    );
    assert_close_masked(
        &out["embeddings"],
        &refs["mean_pooled_l2norm"],
        None,
        1e-5,
        "embeddings",
    );

    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/inputs.json")).unwrap())
            .unwrap();
    let sentences: Vec<&str> = inputs["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let emb = session.embed(&sentences).unwrap();
    assert_close_masked(&emb, &refs["mean_pooled_l2norm"], None, 1e-5, "embed()");
}
