//! Parity with PyTorch/transformers on the reference fixtures (tests/fixtures/README.md), on the
//! CPU backend, both for the optimized graph (fused attention, norms, epilogues) and for the
//! primitive graph as built. Tolerance: 1e-4 absolute (an independent float64
//! re-implementation reproduced the fixtures to 4e-6, so 1e-4 leaves room for f32
//! accumulation order only); sentence embeddings 1e-5.

mod common;

use common::{
    assert_close_masked, encoder_batch, fixture, minilm_dir, minilm_sentences, outputs_of, rows,
};
use transfuse::models::{Model, Pooling};
use transfuse::{Batch, Sampling, Session};

const TOL: f32 = 1e-4;

/// The model on the CPU backend, optimized or as built.
fn session(model: Model, optimize: bool) -> Session {
    eprintln!("optimize: {optimize}");
    if optimize {
        let s = Session::cpu(model).unwrap();
        let fused = s.report.as_ref().unwrap();
        assert!(
            fused.ops_after.contains_key("attention"),
            "{:?}",
            fused.ops_after
        );
        s
    } else {
        Session::cpu_unoptimized(model)
    }
}

#[test]
fn tiny_gpt2_logits_match_transformers() {
    let refs = outputs_of("tiny_gpt2");
    let ids = rows(&refs["input_ids"]);
    let mask = rows(&refs["attention_mask_padded"]);
    for optimize in [true, false] {
        let s = session(Model::load(&fixture("tiny_gpt2/model")).unwrap(), optimize);
        let out = s.forward(&Batch::new(ids.clone())).unwrap();
        assert_close_masked(&out["logits"], &refs["logits"], None, TOL, "logits");

        let padded = Batch {
            input_ids: ids.clone(),
            attention_mask: Some(mask.clone()),
            token_type_ids: None,
        };
        let out = s.forward(&padded).unwrap();
        let want = &refs["logits_padded"];
        assert_close_masked(&out["logits"], want, Some(&mask), TOL, "logits_padded");
    }
}

#[test]
fn tiny_gpt2_greedy_decoding_with_kv_cache_is_exact() {
    let refs = outputs_of("tiny_gpt2");
    let want = rows(&refs["greedy_ids"]).remove(0);
    let prompt = rows(&refs["input_ids"]).remove(0);
    for optimize in [true, false] {
        let s = session(Model::load(&fixture("tiny_gpt2/model")).unwrap(), optimize);
        let got = s
            .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
            .unwrap();
        assert_eq!(got, want, "optimize: {optimize}");
    }
}

#[test]
fn tiny_bert_matches_transformers() {
    let refs = outputs_of("tiny_bert");
    let (batch, mask) = encoder_batch(&refs);
    for optimize in [true, false] {
        let s = session(Model::load(&fixture("tiny_bert/model")).unwrap(), optimize);
        let out = s.forward(&batch).unwrap();
        let want = &refs["last_hidden_state"];
        assert_close_masked(
            &out["last_hidden_state"],
            want,
            Some(&mask),
            TOL,
            "last_hidden_state",
        );
        let want = &refs["pooler_output"];
        assert_close_masked(&out["pooler_output"], want, None, TOL, "pooler_output");
    }
}

#[test]
fn minilm_matches_transformers_and_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let refs = outputs_of("minilm");
    let (batch, mask) = encoder_batch(&refs);
    let sentences = minilm_sentences();
    let sentences: Vec<&str> = sentences.iter().map(String::as_str).collect();
    for optimize in [true, false] {
        let model = Model::load_with(&dir, Some(Pooling::Mean), true).unwrap();
        let s = session(model, optimize);
        let out = s.forward(&batch).unwrap();
        let want = &refs["last_hidden_state"];
        assert_close_masked(
            &out["last_hidden_state"],
            want,
            Some(&mask),
            TOL,
            "last_hidden_state",
        );
        let want = &refs["pooler_output"];
        assert_close_masked(&out["pooler_output"], want, None, TOL, "pooler_output");
        let want = &refs["mean_pooled_l2norm"];
        assert_close_masked(&out["embeddings"], want, None, 1e-5, "embeddings");
        let emb = s.embed(&sentences).unwrap();
        assert_close_masked(&emb, want, None, 1e-5, "embed()");
    }
}
