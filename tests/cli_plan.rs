//! `transfuse plan` end to end: the JSON contract (stable field names), the table, and every bad
//! input as one `error:` line with exit code 2.

mod common;

use common::cli::*;
use common::fixture;
use serde_json::Value;

const GPT3: &str = r#"{"model_type": "gpt", "name": "gpt3-175b", "n_layer": 96, "hidden": 12288, "heads": 96, "vocab": 51200, "seq": 2048}"#;

fn plan(tmp: &TempDir, extra: &[&str]) -> std::process::Output {
    let cfg = tmp.write("gpt3.json", GPT3);
    let mut args = vec!["plan".to_string(), "--config".into(), s(&cfg)];
    args.extend(extra.iter().map(|a| a.to_string()));
    transfuse(args)
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The field names of `plan --json` are a contract: scripts read them.
#[test]
fn plan_json_contract() {
    let tmp = TempDir::new("plan_json_contract");
    let out = plan(
        &tmp,
        &[
            "--gpus",
            "1024",
            "--gpu",
            "a100-80gb",
            "--global-batch",
            "1536",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(&assert_ok(&out)).expect("stdout is JSON");
    assert_eq!(
        keys(&v),
        sorted(&[
            "model",
            "device",
            "mode",
            "gpus",
            "seq",
            "global_batch",
            "micro_batch_size",
            "recompute",
            "zero",
            "sequence_parallel",
            "kv_cache_tokens",
            "layouts",
        ])
    );
    assert_eq!(
        keys(&v["model"]),
        sorted(&[
            "name",
            "family",
            "layers",
            "hidden",
            "heads",
            "kv_heads",
            "intermediate",
            "vocab",
            "params"
        ])
    );
    assert_eq!(
        keys(&v["device"]),
        sorted(&[
            "name",
            "memory_gib",
            "peak_tflops",
            "hbm_gbs",
            "intra_node_gbs",
            "inter_node_gbs",
            "gpus_per_node",
            "gemm_efficiency",
        ])
    );
    assert_eq!(v["mode"], "training");
    assert_eq!(v["gpus"], 1024);
    assert_eq!(v["recompute"], "selective");
    assert_eq!(v["zero"], 1);
    assert_eq!(v["model"]["params"], 174_615_846_912u64);
    let layouts = v["layouts"].as_array().unwrap();
    assert!(!layouts.is_empty());
    for l in layouts {
        assert_eq!(
            keys(l),
            sorted(&[
                "rank",
                "tp",
                "pp",
                "dp",
                "micro_batches",
                "feasible",
                "reason",
                "memory",
                "communication",
                "bubble_fraction",
                "time",
                "mfu",
                "hfu",
                "tflops_per_gpu",
                "tokens_per_second",
                "decode_ms_per_token",
            ])
        );
        assert_eq!(
            keys(&l["memory"]),
            sorted(&[
                "weights_gib",
                "gradients_gib",
                "optimizer_gib",
                "activations_gib",
                "kv_cache_gib",
                "total_gib",
                "capacity_gib",
            ])
        );
        assert_eq!(
            keys(&l["communication"]),
            sorted(&[
                "tp_bytes",
                "pp_bytes",
                "dp_bytes",
                "tp_within_node",
                "dp_within_node",
                "pp_within_node"
            ])
        );
        assert_eq!(
            keys(&l["time"]),
            sorted(&[
                "compute_s",
                "tp_s",
                "pp_s",
                "bubble_s",
                "dp_s",
                "optimizer_s",
                "step_s"
            ])
        );
        let (t, p, d) = (
            l["tp"].as_u64().unwrap(),
            l["pp"].as_u64().unwrap(),
            l["dp"].as_u64().unwrap(),
        );
        assert_eq!(t * p * d, 1024);
        // Feasible layouts are ranked and have no reason; the others have one and no rank.
        assert_eq!(l["feasible"].as_bool().unwrap(), l["rank"].is_u64());
        assert_eq!(l["feasible"].as_bool().unwrap(), l["reason"].is_null());
    }
    assert_eq!(layouts[0]["rank"], 1);
    let no = layouts
        .iter()
        .find(|l| (l["tp"].as_u64(), l["pp"].as_u64()) == (Some(8), Some(1)))
        .unwrap();
    assert_eq!(no["reason"], "needs 92.9 GiB per device, has 80");
}

#[test]
fn plan_table_and_one_layout() {
    let tmp = TempDir::new("plan_table_and_one_layout");
    let out = plan(
        &tmp,
        &[
            "--gpus",
            "1024",
            "--global-batch",
            "1536",
            "--tp",
            "8",
            "--pp",
            "16",
        ],
    );
    let text = assert_ok(&out);
    assert!(
        text.starts_with("gpt3-175b (gpt): 96 layers, hidden 12288"),
        "{text}"
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("1 "))
        .collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(
        rows[0].split_whitespace().take(4).eq(["1", "8", "16", "8"]),
        "{text}"
    );
    // The whole enumeration explains the infeasible layouts in the table.
    let all = assert_ok(&plan(&tmp, &["--gpus", "1024", "--global-batch", "1536"]));
    assert!(all.contains("needs 92.9 GiB per device, has 80"), "{all}");
    assert!(
        all.contains("t=64 does not divide the 96 attention heads"),
        "{all}"
    );
}

#[test]
fn plan_fixture_folders_and_inference() {
    let out = transfuse([
        "plan".as_ref(),
        "--model".as_ref(),
        fixture(GPT2).as_os_str(),
        "--gpus".as_ref(),
        "2".as_ref(),
        "--inference".as_ref(),
        "--kv-cache-tokens".as_ref(),
        "256".as_ref(),
        "--json".as_ref(),
    ]);
    let v: Value = serde_json::from_str(&assert_ok(&out)).unwrap();
    assert_eq!(v["mode"], "inference");
    assert_eq!(v["kv_cache_tokens"], 256);
    assert!(v["recompute"].is_null());
    let best = &v["layouts"][0];
    assert!(best["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    assert!(best["memory"]["kv_cache_gib"].as_f64().unwrap() > 0.0);
    let out = transfuse([
        "plan".as_ref(),
        "--model".as_ref(),
        fixture(BERT).as_os_str(),
        "--gpus".as_ref(),
        "1".as_ref(),
        "--gpu".as_ref(),
        "h200-141gb".as_ref(),
    ]);
    assert!(assert_ok(&out).contains("bert (bert)"));
}

#[test]
fn plan_custom_device() {
    let tmp = TempDir::new("plan_custom_device");
    let dev = [
        "--mem",
        "80",
        "--tflops",
        "312",
        "--hbm-bw",
        "2039",
        "--intra-bw",
        "300",
        "--inter-bw",
        "25",
        "--gpus-per-node",
        "8",
    ];
    let mut args = vec![
        "--gpus",
        "1024",
        "--global-batch",
        "1536",
        "--tp",
        "8",
        "--pp",
        "16",
        "--json",
    ];
    args.extend(dev);
    let custom: Value = serde_json::from_str(&assert_ok(&plan(&tmp, &args))).unwrap();
    let table: Value = serde_json::from_str(&assert_ok(&plan(
        &tmp,
        &[
            "--gpus",
            "1024",
            "--global-batch",
            "1536",
            "--tp",
            "8",
            "--pp",
            "16",
            "--json",
            "--gpu",
            "a100-80gb",
        ],
    )))
    .unwrap();
    assert_eq!(custom["device"]["name"], "custom");
    assert_eq!(custom["layouts"], table["layouts"]);
    // Overriding one figure of a table entry.
    let small: Value = serde_json::from_str(&assert_ok(&plan(
        &tmp,
        &[
            "--gpus",
            "1024",
            "--global-batch",
            "1536",
            "--json",
            "--gpu",
            "a100-80gb",
            "--mem",
            "16",
        ],
    )))
    .unwrap();
    assert_eq!(small["device"]["memory_gib"], 16.0);
}

#[test]
fn plan_bad_inputs() {
    let tmp = TempDir::new("plan_bad_inputs");
    // G not divisible by t·p.
    assert_error(
        &plan(&tmp, &["--gpus", "1000", "--tp", "8", "--pp", "16"]),
        &["--gpus 1000", "--tp 8 × --pp 16 = 128"],
    );
    // Too big for any layout.
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--gpu", "a100-40gb"]),
        &[
            "gpt3-175b does not fit on 8 × a100-40gb",
            "GiB per device, has 40",
        ],
    );
    // The one layout asked for does not fit.
    assert_error(
        &plan(
            &tmp,
            &[
                "--gpus",
                "1024",
                "--global-batch",
                "1536",
                "--tp",
                "8",
                "--pp",
                "1",
            ],
        ),
        &["t=8, p=1, d=128", "needs 92.9 GiB per device, has 80"],
    );
    // Unknown GPU.
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--gpu", "v100"]),
        &["`v100`", "a100-80gb"],
    );
    // A custom device with figures missing.
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--mem", "80"]),
        &["--tflops", "--hbm-bw"],
    );
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--inference", "--zero", "2"]),
        &["--zero"],
    );
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--recompute", "some"]),
        &["`some`"],
    );
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--zero", "4"]),
        &["--zero", "4"],
    );
    assert_error(&plan(&tmp, &["--gpus", "0"]), &["--gpus"]);
    assert_error(
        &plan(&tmp, &["--gpus", "1024", "--seq", "4096"]),
        &["--seq 4096", "2048"],
    );
    assert_error(
        &plan(&tmp, &["--gpus", "8", "--kv-cache-tokens", "9"]),
        &["--inference"],
    );
    assert_error(
        &plan(
            &tmp,
            &["--gpus", "8", "--gpu", "a100-80gb", "--tflops", "-1"],
        ),
        &["--tflops"],
    );
    // A config that names the missing field and the file.
    let bad = tmp.write("bad.json", r#"{"model_type": "gpt2", "n_layer": 2}"#);
    assert_error(
        &transfuse(["plan", "--config", &s(&bad), "--gpus", "1"]),
        &[&s(&bad), "`n_embd`"],
    );
    let missing = tmp.join("nope");
    assert_error(
        &transfuse(["plan", "--model", &s(&missing), "--gpus", "1"]),
        &[&s(&missing.join("config.json"))],
    );
}
