//! The CLI on each backend: `--backend wgpu|cuda|auto`, `--verbose`, the clean one-line error
//! when a backend is unavailable, and `transfuse bench model`.

mod common;

use common::cli::{assert_error, assert_ok, s, stderr_of, transfuse, TempDir, BERT, GPT2};
use common::{assert_close_masked, fixture, outputs_of, required};
use transfuse::models::load_all_safetensors;

/// True when the wgpu tests can run (an adapter exists); panics when required and absent.
fn have_wgpu() -> bool {
    common::wgpu_backend().is_some()
}

fn run_gpt2(tmp: &TempDir, backend: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run".to_string(),
        "--model".into(),
        s(&fixture(GPT2)),
        "--inputs".into(),
        s(&fixture("tiny_gpt2/inputs.json")),
        "--out".into(),
        s(&tmp.join("out.safetensors")),
        "--backend".into(),
        backend.into(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    transfuse(args)
}

#[test]
fn run_on_wgpu_matches_reference_and_says_which_device() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("run_on_wgpu");
    let out = run_gpt2(&tmp, "wgpu", &["--verbose"]);
    assert_ok(&out);
    let err = stderr_of(&out);
    assert!(err.contains("device: "), "{err}");
    assert!(err.contains("backend: wgpu"), "{err}");
    assert!(err.contains("memory: "), "{err}");
    let got = load_all_safetensors(&tmp.join("out.safetensors")).unwrap();
    let want = outputs_of("tiny_gpt2");
    assert_close_masked(&got["logits"], &want["logits"], None, 1e-3, "logits");
}

#[test]
fn auto_says_which_backend_ran() {
    let tmp = TempDir::new("auto_says_which");
    let out = run_gpt2(&tmp, "auto", &[]);
    assert_ok(&out);
    let err = stderr_of(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("backend: "))
        .unwrap_or_else(|| panic!("no backend line:\n{err}"));
    assert!(line.contains("auto"), "{line}");
    let cuda = transfuse::runtime::CudaBackend::new().is_ok();
    let want = if cuda {
        "backend: cuda"
    } else if have_wgpu() {
        "backend: wgpu"
    } else {
        "backend: cpu"
    };
    assert!(line.starts_with(want), "{line}");
    if !cuda {
        assert!(line.contains("cuda unavailable"), "{line}");
    }
}

#[test]
fn cuda_without_a_driver_is_one_clean_error() {
    if transfuse::runtime::cuda::driver_present() {
        eprintln!("skipping: a CUDA driver is present");
        return;
    }
    assert!(
        !required("cuda"),
        "TRANSFUSE_REQUIRE names cuda but no driver is present"
    );
    let tmp = TempDir::new("cuda_without_driver");
    let out = run_gpt2(&tmp, "cuda", &[]);
    assert_error(&out, &["cuda", "driver"]);
    assert!(!tmp.join("out.safetensors").exists());
}

/// `bench model --json` on a backend: every field is there and consistent.
fn bench_json(model: &str, backend: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench".to_string(),
        "model".into(),
        "--model".into(),
        s(&fixture(model)),
        "--backend".into(),
        backend.into(),
        "--seq".into(),
        "8".into(),
        "--batch".into(),
        "2".into(),
        "--iters".into(),
        "2".into(),
        "--warmup".into(),
        "0".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let stdout = assert_ok(&transfuse(args));
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(j["backend"], backend);
    assert!(j["forward_ms_median"].as_f64().unwrap() > 0.0);
    let kernels = j["kernels"].as_array().unwrap();
    assert!(!kernels.is_empty());
    let launches: u64 = kernels
        .iter()
        .map(|k| k["launches"].as_u64().unwrap())
        .sum();
    assert!(launches >= kernels.len() as u64);
    j
}

#[test]
fn bench_model_on_cpu_and_wgpu() {
    let j = bench_json(GPT2, "cpu", &["--decode-tokens", "3"]);
    assert!(j["memory"].is_null(), "the CPU backend has no memory plan");
    assert_eq!(j["decode"]["tokens"], 3);
    let j = bench_json(BERT, "cpu", &[]);
    assert!(j["decode"].is_null(), "encoders do not decode");
    if !have_wgpu() {
        return;
    }
    let j = bench_json(GPT2, "wgpu", &["--decode-tokens", "3"]);
    let m = &j["memory"];
    let (naive, planned, peak) = (
        m["temps_naive_bytes"].as_u64().unwrap(),
        m["temps_planned_bytes"].as_u64().unwrap(),
        m["temps_live_peak_bytes"].as_u64().unwrap(),
    );
    assert!(peak <= planned && planned < naive, "{m}");
    // The fused plan: GPT-2's attention kernels are among the timed kernels.
    let names: Vec<&str> = j["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kernel"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("attention")),
        "{names:?}"
    );
    assert!(j["decode"]["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_rejects_bad_sizes() {
    let out = transfuse([
        "bench",
        "model",
        "--model",
        &s(&fixture(GPT2)),
        "--backend",
        "cpu",
        "--seq",
        "100000",
    ]);
    assert_error(&out, &["--seq", "positions"]);
    let out = transfuse([
        "bench",
        "model",
        "--model",
        &s(&fixture(GPT2)),
        "--backend",
        "cpu",
        "--iters",
        "0",
    ]);
    assert_error(&out, &["--iters"]);
}

/// `WGPU_BACKEND` names an API this machine has no adapter for (Metal on Linux, Vulkan on a
/// Mac): asking for wgpu is one clean error; `auto` falls back to the CPU and says why.
#[test]
fn no_wgpu_adapter_is_one_clean_error_and_auto_falls_back() {
    let api = if cfg!(target_os = "macos") {
        "vulkan"
    } else {
        "metal"
    };
    let tmp = TempDir::new("no_wgpu_adapter");
    let run = |backend: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_transfuse"))
            .args(["run", "--model", &s(&fixture(GPT2)), "--inputs"])
            .arg(fixture("tiny_gpt2/inputs.json"))
            .arg("--out")
            .arg(tmp.join("out.safetensors"))
            .args(["--backend", backend])
            .env("WGPU_BACKEND", api)
            .env("TRANSFUSE_CACHE_DIR", common::cli::test_cache_dir())
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    };
    assert_error(&run("wgpu"), &["wgpu", "no adapter"]);
    assert!(!tmp.join("out.safetensors").exists());
    if transfuse::runtime::cuda::driver_present() {
        return; // auto would pick CUDA
    }
    let out = run("auto");
    assert_ok(&out);
    let err = stderr_of(&out);
    assert!(
        err.contains("backend: cpu (auto:") && err.contains("wgpu unavailable"),
        "{err}"
    );
    assert!(tmp.join("out.safetensors").exists());
}
