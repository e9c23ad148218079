//! The `transfuse` binary end to end: every bad input is one `error: ` line on stderr naming the
//! culprit, with exit code 2 and no panic; the good paths reproduce the reference fixtures.

mod common;

use common::cli::*;
use std::ffi::OsStr;
use std::process::Output;

use std::path::{Path, PathBuf};

use common::{assert_close_masked, fixture, minilm_dir, outputs_of, rows};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use transfuse::ir::Tensor;
use transfuse::models::load_all_safetensors;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `run` on `model` with the fixture `inputs`, writing into `tmp`.
fn run_model(tmp: &TempDir, model: &Path, inputs: &Path) -> Output {
    transfuse([
        "run".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--inputs".as_ref(),
        inputs.as_os_str(),
        "--out".as_ref(),
        tmp.join("out.safetensors").as_os_str(),
    ])
}

/// Rewrites a safetensors file: `edit(name, shape)` returns `None` to drop the tensor, or the
/// shape to store it under (same bytes, so the element count must not change).
fn rewrite_safetensors(path: &Path, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(shape) = edit(&name, view.shape()) {
            let v = TensorView::new(view.dtype(), shape, view.data()).unwrap();
            kept.push((name, v));
        }
    }
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// Writes an inputs file with these `input_ids`.
fn inputs_with_ids(tmp: &TempDir, ids: &[Vec<i64>]) -> PathBuf {
    tmp.write(
        "inputs.json",
        serde_json::json!({ "input_ids": ids }).to_string(),
    )
}

/// The fixture config of `model` (e.g. `tiny_gpt2/model`) as JSON, for editing.
fn fixture_config(model: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixture(&format!("{model}/config.json"))).unwrap();
    match serde_json::from_str(&text).unwrap() {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("config.json is an object"),
    }
}

// ---------------------------------------------------------------------------------------------
// Bad model folders
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_config_json() {
    let tmp = TempDir::new("missing_config_json");
    let model = tmp.join("model");
    std::fs::create_dir(&model).unwrap();
    let out = run_model(&tmp, &model, &fixture("tiny_gpt2/inputs.json"));
    assert_error(&out, &[&s(&model.join("config.json"))]);
}

#[test]
fn malformed_config_json() {
    let tmp = TempDir::new("malformed_config_json");
    let model = tmp.copy_model(GPT2, "model");
    let config = tmp.write(
        "model/config.json",
        "{\"model_type\": \"gpt2\", \"n_embd\": 64,",
    );
    let out = run_model(&tmp, &model, &fixture("tiny_gpt2/inputs.json"));
    assert_error(&out, &[&s(&config), "invalid JSON"]);
}

#[test]
fn unknown_model_type() {
    let tmp = TempDir::new("unknown_model_type");
    let model = tmp.copy_model(GPT2, "model");
    let mut cfg = fixture_config(GPT2);
    cfg.insert("model_type".into(), "llama-9".into());
    let config = tmp.write(
        "model/config.json",
        serde_json::Value::Object(cfg).to_string(),
    );
    let out = run_model(&tmp, &model, &fixture("tiny_gpt2/inputs.json"));
    assert_error(&out, &[&s(&config), "llama-9"]);
}

#[test]
fn config_missing_a_required_field() {
    let tmp = TempDir::new("config_missing_a_required_field");
    let model = tmp.copy_model(GPT2, "model");
    let mut cfg = fixture_config(GPT2);
    cfg.remove("n_head").unwrap();
    let config = tmp.write(
        "model/config.json",
        serde_json::Value::Object(cfg).to_string(),
    );
    let out = run_model(&tmp, &model, &fixture("tiny_gpt2/inputs.json"));
    assert_error(&out, &[&s(&config), "n_head"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = TempDir::new("truncated_safetensors");
    let model = tmp.copy_model(BERT, "model");
    let weights = model.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = run_model(&tmp, &model, &fixture("tiny_bert/inputs.json"));
    assert_error(&out, &[&s(&weights), "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let tmp = TempDir::new("corrupt_safetensors_header");
    let model = tmp.copy_model(BERT, "model");
    let weights = model.join("model.safetensors");
    // Keep the 8-byte header length, replace the JSON header it announces with garbage.
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (i, b) in bytes[8..8 + n].iter_mut().enumerate() {
        *b = [0xff, b'#', 0x00, b'{'][i % 4];
    }
    std::fs::write(&weights, bytes).unwrap();
    let out = run_model(&tmp, &model, &fixture("tiny_bert/inputs.json"));
    assert_error(&out, &[&s(&weights)]);
}

#[test]
fn weight_of_the_wrong_shape() {
    let tmp = TempDir::new("weight_of_the_wrong_shape");
    let model = tmp.copy_model(BERT, "model");
    let weights = model.join("model.safetensors");
    let name = "encoder.layer.0.attention.self.query.weight";
    rewrite_safetensors(&weights, |n, shape| {
        Some(if n == name {
            assert_eq!(shape, [64, 64]);
            vec![32, 128]
        } else {
            shape.to_vec()
        })
    });
    let out = run_model(&tmp, &model, &fixture("tiny_bert/inputs.json"));
    assert_error(&out, &[&s(&weights), name, "[32, 128]", "[64, 64]"]);
}

#[test]
fn missing_weight() {
    let tmp = TempDir::new("missing_weight");
    let model = tmp.copy_model(BERT, "model");
    let weights = model.join("model.safetensors");
    let name = "encoder.layer.1.output.dense.weight";
    rewrite_safetensors(&weights, |n, shape| (n != name).then(|| shape.to_vec()));
    let out = run_model(&tmp, &model, &fixture("tiny_bert/inputs.json"));
    assert_error(&out, &[&s(&weights), name]);
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn token_id_out_of_vocabulary() {
    let tmp = TempDir::new("token_id_out_of_vocabulary");
    let inputs = inputs_with_ids(&tmp, &[vec![1, 2, 3, 4], vec![5, 6, 7, 1000]]);
    let out = run_model(&tmp, &fixture(GPT2), &inputs);
    assert_error(&out, &["input_ids[1][3]", "1000"]);
}

#[test]
fn sequence_longer_than_the_position_table() {
    let tmp = TempDir::new("sequence_longer_than_the_position_table");
    let inputs = inputs_with_ids(&tmp, &[(0..129).collect()]);
    let out = run_model(&tmp, &fixture(GPT2), &inputs);
    assert_error(&out, &["129", "128"]);
}

#[test]
fn ragged_input_rows() {
    let tmp = TempDir::new("ragged_input_rows");
    let inputs = inputs_with_ids(&tmp, &[vec![1, 2, 3, 4], vec![5, 6, 7]]);
    let out = run_model(&tmp, &fixture(GPT2), &inputs);
    assert_error(&out, &[&s(&inputs), "input_ids", "row 1"]);
}

#[test]
fn inputs_not_json() {
    let tmp = TempDir::new("inputs_not_json");
    let inputs = tmp.write("inputs.json", "input_ids = [[1, 2, 3]]\n");
    let out = run_model(&tmp, &fixture(GPT2), &inputs);
    assert_error(&out, &[&s(&inputs), "JSON"]);
}

// ---------------------------------------------------------------------------------------------
// Bad requests
// ---------------------------------------------------------------------------------------------

#[test]
fn generate_text_prompt_without_tokenizer() {
    let model = fixture(GPT2);
    let out = transfuse([
        "generate".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--prompt".as_ref(),
        "text".as_ref(),
        "--max-new-tokens".as_ref(),
        "4".as_ref(),
    ]);
    assert_error(&out, &[&s(&model), "tokenizer.json", "--prompt-ids"]);
}

#[test]
fn generate_with_an_encoder() {
    let model = fixture(BERT);
    let out = transfuse([
        "generate".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--prompt-ids".as_ref(),
        "1,2,3".as_ref(),
        "--max-new-tokens".as_ref(),
        "4".as_ref(),
    ]);
    assert_error(&out, &[&s(&model), "bert"]);
}

#[test]
fn unknown_backend() {
    let tmp = TempDir::new("unknown_backend");
    let out = transfuse([
        "run".as_ref(),
        "--model".as_ref(),
        fixture(GPT2).as_os_str(),
        "--inputs".as_ref(),
        fixture("tiny_gpt2/inputs.json").as_os_str(),
        "--out".as_ref(),
        tmp.join("out.safetensors").as_os_str(),
        "--backend".as_ref(),
        "foo".as_ref(),
    ]);
    assert_error(&out, &["backend", "`foo`"]);
    assert!(!tmp.join("out.safetensors").exists());
}

#[test]
fn embed_unknown_pooling() {
    let out = transfuse([
        "embed".as_ref(),
        "--model".as_ref(),
        fixture(BERT).as_os_str(),
        "--text".as_ref(),
        "hello".as_ref(),
        "--pooling".as_ref(),
        "bogus".as_ref(),
    ]);
    assert_error(&out, &["pooling", "`bogus`"]);
}

// ---------------------------------------------------------------------------------------------
// Good paths
// ---------------------------------------------------------------------------------------------

#[test]
fn run_tiny_gpt2_matches_reference_logits() {
    let tmp = TempDir::new("run_tiny_gpt2_matches_reference_logits");
    let out = run_model(&tmp, &fixture(GPT2), &fixture("tiny_gpt2/inputs.json"));
    assert_ok(&out);
    let got = load_all_safetensors(&tmp.join("out.safetensors")).unwrap();
    let want = outputs_of("tiny_gpt2");
    assert_close_masked(&got["logits"], &want["logits"], None, 1e-4, "logits");
}

#[test]
fn generate_greedy_json_matches_reference_ids() {
    let refs = outputs_of("tiny_gpt2");
    let prompt = rows(&refs["input_ids"]).remove(0);
    let want = rows(&refs["greedy_ids"]).remove(0);
    assert_eq!(want.len(), prompt.len() + 8);
    let prompt_arg: Vec<String> = prompt.iter().map(i64::to_string).collect();
    let out = transfuse([
        "generate".as_ref(),
        "--model".as_ref(),
        fixture(GPT2).as_os_str(),
        "--prompt-ids".as_ref(),
        prompt_arg.join(",").as_ref(),
        "--max-new-tokens".as_ref(),
        "8".as_ref(),
        "--json".as_ref(),
    ]);
    let stdout = assert_ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    let got: Vec<i64> = v["ids"]
        .as_array()
        .expect("`ids` array")
        .iter()
        .map(|x| x.as_i64().expect("integer id"))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn graph_from_config_alone_writes_dot() {
    let tmp = TempDir::new("graph_from_config_alone_writes_dot");
    let model = tmp.join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(
        fixture("tiny_bert/model/config.json"),
        model.join("config.json"),
    )
    .unwrap();
    let dot = tmp.join("graph.dot");
    let out = transfuse([
        "graph".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--dot".as_ref(),
        dot.as_os_str(),
    ]);
    let stdout = assert_ok(&out);
    assert!(!stdout.trim().is_empty(), "graph printed no IR");
    let text = std::fs::read_to_string(&dot).unwrap();
    assert!(
        text.starts_with("digraph"),
        "DOT starts with {:?}",
        &text[..text.len().min(40)]
    );
}

#[test]
fn embed_minilm_json_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/inputs.json")).unwrap())
            .unwrap();
    let sentences: Vec<&str> = inputs["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(sentences.len(), 3);
    let mut args: Vec<&OsStr> = vec!["embed".as_ref(), "--model".as_ref(), dir.as_os_str()];
    for t in &sentences {
        args.push("--text".as_ref());
        args.push(t.as_ref());
    }
    args.push("--json".as_ref());
    let stdout = assert_ok(&transfuse(args));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    let emb: Vec<Vec<f32>> = v["embeddings"]
        .as_array()
        .expect("`embeddings` array")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect();
    let want = &outputs_of("minilm")["mean_pooled_l2norm"];
    let got = Tensor::f32(vec![emb.len(), emb[0].len()], emb.concat());
    assert_close_masked(&got, want, None, 1e-5, "embeddings");
}

#[test]
fn embed_with_a_decoder() {
    let model = fixture(GPT2);
    let out = transfuse([
        "embed".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        "hi".as_ref(),
    ]);
    assert_error(&out, &[&s(&model), "gpt2", "encoder"]);
}

#[test]
fn attention_mask_values_must_be_binary() {
    let tmp = TempDir::new("attention_mask_values_must_be_binary");
    let inputs = tmp.write(
        "inputs.json",
        r#"{"input_ids": [[1, 2, 3]], "attention_mask": [[1, 2, 1]]}"#,
    );
    let out = run_model(&tmp, &fixture(GPT2), &inputs);
    assert_error(&out, &["attention_mask[0][1]", "2"]);
}

#[test]
fn token_type_out_of_range() {
    let tmp = TempDir::new("token_type_out_of_range");
    let inputs = tmp.write(
        "inputs.json",
        r#"{"input_ids": [[1, 2, 3]], "token_type_ids": [[0, 1, 2]]}"#,
    );
    let out = run_model(&tmp, &fixture(BERT), &inputs);
    assert_error(&out, &["token_type_ids[0][2]", "2 token types"]);
}

/// A folder holding only the config.json of a fixture model.
fn config_only(tmp: &TempDir, model: &str) -> PathBuf {
    let dir = tmp.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture(&format!("{model}/config.json")),
        dir.join("config.json"),
    )
    .unwrap();
    dir
}

#[test]
fn compile_json_from_config_alone() {
    let tmp = TempDir::new("compile_json_from_config_alone");
    let model = config_only(&tmp, GPT2);
    let (before, after) = (tmp.join("before.dot"), tmp.join("after.dot"));
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--json".as_ref(),
        "--dot-before".as_ref(),
        before.as_os_str(),
        "--dot-after".as_ref(),
        after.as_os_str(),
    ]);
    let stdout = assert_ok(&out);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(v["ops_after"]["attention"], 2, "{v}");
    assert_eq!(v["ops_after"]["layer_norm"], 5, "{v}");
    assert!(v["ops_after"].get("exp").is_none(), "{v}");
    assert_eq!(v["ops_before"]["exp"], 2, "{v}");
    for key in ["nodes", "classes", "iterations", "stop_reason", "seconds"] {
        assert!(v["egraph"].get(key).is_some(), "egraph.{key} missing: {v}");
    }
    assert_eq!(v["egraph"]["stop_reason"], "saturated");
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    let (b, a) = (
        std::fs::read_to_string(before).unwrap(),
        std::fs::read_to_string(after).unwrap(),
    );
    assert!(b.starts_with("digraph") && a.starts_with("digraph"));
    assert!(a.contains(" attention ") && !b.contains(" attention "));
}

#[test]
fn compile_report_and_limits() {
    let tmp = TempDir::new("compile_report_and_limits");
    let model = config_only(&tmp, BERT);
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--report".as_ref(),
    ]);
    let stdout = assert_ok(&out);
    assert!(
        stdout.contains("attention") && stdout.contains("stopped: saturated"),
        "{stdout}"
    );
    // A one-iteration limit is reported as such, and the result is still a valid graph.
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--json".as_ref(),
        "--iter-limit".as_ref(),
        "1".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&out)).unwrap();
    assert_eq!(v["egraph"]["stop_reason"], "iteration_limit", "{v}");
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--profile".as_ref(),
        "tpu".as_ref(),
    ]);
    assert_error(&out, &["profile", "tpu"]);
}

#[test]
fn run_without_optimizer_matches_reference_too() {
    let tmp = TempDir::new("run_without_optimizer_matches_reference_too");
    let out_file = tmp.join("out.safetensors");
    let out = transfuse([
        "run".as_ref(),
        "--model".as_ref(),
        fixture(GPT2).as_os_str(),
        "--inputs".as_ref(),
        fixture("tiny_gpt2/inputs.json").as_os_str(),
        "--out".as_ref(),
        out_file.as_os_str(),
        "--no-optimize".as_ref(),
    ]);
    assert_ok(&out);
    assert!(
        stderr_of(&out).contains("unoptimized"),
        "{}",
        stderr_of(&out)
    );
    let got = transfuse::models::load_all_safetensors(&out_file).unwrap();
    let want = common::outputs_of("tiny_gpt2");
    common::assert_close_masked(&got["logits"], &want["logits"], None, 1e-4, "logits");
}

/// Values no limit accepts: negative, NaN, too large for a `Duration` or a `usize`, not a
/// number, empty.
const BAD_LIMITS: [&str; 6] = ["-1", "NaN", "1e20", "99999999999999999999999", "abc", ""];

#[test]
fn bad_limit_flags_are_usage_errors() {
    let tmp = TempDir::new("bad_limit_flags_are_usage_errors");
    let model = config_only(&tmp, BERT);
    for flag in ["--time-limit", "--node-limit", "--iter-limit"] {
        for bad in BAD_LIMITS.iter().chain(&["0", "inf"]) {
            let out = transfuse([
                "compile".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                flag.as_ref(),
                bad.as_ref(),
            ]);
            assert_error(&out, &[flag]);
        }
    }
    // Fractions of a second are fine; counts must be whole.
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--time-limit".as_ref(),
        "2.5".as_ref(),
        "--node-limit".as_ref(),
        "100000".as_ref(),
    ]);
    assert_ok(&out);
    let out = transfuse([
        "compile".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--iter-limit".as_ref(),
        "2.5".as_ref(),
    ]);
    assert_error(&out, &["--iter-limit", "2.5"]);
}

#[test]
fn bad_limit_environment_is_a_usage_error() {
    let tmp = TempDir::new("bad_limit_environment_is_a_usage_error");
    let model = config_only(&tmp, BERT);
    for var in [
        "TRANSFUSE_EGRAPH_SECONDS",
        "TRANSFUSE_EGRAPH_NODES",
        "TRANSFUSE_EGRAPH_ITERS",
    ] {
        for bad in BAD_LIMITS {
            let out = transfuse_env(
                ["compile".as_ref(), "--model".as_ref(), model.as_os_str()],
                &[(var, bad)],
            );
            assert_error(&out, &[var]);
        }
    }
    // The sessions of run/generate/embed/bench read the same variables.
    let out = transfuse_env(
        [
            "run".as_ref(),
            "--model".as_ref(),
            fixture(GPT2).as_os_str(),
            "--inputs".as_ref(),
            fixture("tiny_gpt2/inputs.json").as_os_str(),
            "--out".as_ref(),
            tmp.join("out.safetensors").as_os_str(),
            "--backend".as_ref(),
            "cpu".as_ref(),
        ],
        &[("TRANSFUSE_EGRAPH_SECONDS", "-1")],
    );
    assert_error(&out, &["TRANSFUSE_EGRAPH_SECONDS", "-1"]);
    assert!(!tmp.join("out.safetensors").exists());
    // A valid value still works.
    let out = transfuse_env(
        ["compile".as_ref(), "--model".as_ref(), model.as_os_str()],
        &[("TRANSFUSE_EGRAPH_SECONDS", "5")],
    );
    assert_ok(&out);
}

/// `TRANSFUSE_EGRAPH_WITHOUT` drops rule families (how a model is compared with and without a
/// fusion): without `attention` GPT-2 keeps its softmax and no attention op; an unknown family
/// is a usage error naming it.
#[test]
fn egraph_without_drops_families_and_refuses_unknown_ones() {
    let json = |envs: &[(&str, &str)]| -> serde_json::Value {
        let out = transfuse_env(
            [
                "compile".as_ref(),
                "--model".as_ref(),
                fixture(GPT2).as_os_str(),
                "--json".as_ref(),
            ],
            envs,
        );
        serde_json::from_str(&assert_ok(&out)).unwrap()
    };
    let with = json(&[]);
    let without = json(&[("TRANSFUSE_EGRAPH_WITHOUT", "attention")]);
    assert!(
        with["ops_after"]["attention"].as_u64().unwrap() > 0,
        "{with}"
    );
    assert!(without["ops_after"].get("attention").is_none(), "{without}");
    assert!(
        without["ops_after"]["softmax"].as_u64().unwrap() > 0,
        "{without}"
    );
    let out = transfuse_env(
        [
            "compile".as_ref(),
            "--model".as_ref(),
            fixture(GPT2).as_os_str(),
        ],
        &[("TRANSFUSE_EGRAPH_WITHOUT", "attention,flash")],
    );
    assert_error(&out, &["TRANSFUSE_EGRAPH_WITHOUT", "flash"]);
}
