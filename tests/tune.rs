//! `transfuse tune` and the tuning cache end to end on wgpu (lavapipe in CI): repeat tunes
//! measure nothing, bad files are moved aside and rebuilt, newer files are left alone, two
//! processes lose nothing, a config whose output differs is rejected, and a populated cache
//! keeps the fixtures' outputs. Every test uses its own cache folder (`TRANSFUSE_CACHE_DIR`).
//! Skipped without a wgpu adapter unless `TRANSFUSE_REQUIRE` names wgpu.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::cli::{assert_ok, s, stderr_of, transfuse_env, TempDir, BERT, GPT2};
use common::{fixture, outputs_of};
use transfuse::models::load_all_safetensors;

fn have_wgpu() -> bool {
    common::wgpu_backend().is_some()
}

/// `transfuse tune` of fixture `model` at `dims` with cache folder `cache`, a small budget.
fn tune(cache: &Path, model: &str, dims: &str, extra: &[(&str, &str)]) -> Output {
    let mut envs = vec![("TRANSFUSE_CACHE_DIR", cache.to_str().unwrap())];
    envs.extend_from_slice(extra);
    transfuse_env(
        [
            "tune",
            "--model",
            &s(&fixture(model)),
            "--backend",
            "wgpu",
            "--dims",
            dims,
            "--budget",
            "120",
            "--kernel-budget",
            "0.1",
        ],
        &envs,
    )
}

/// `measurements: N, cache hits: H/T` of a tune's stderr.
fn counts(out: &Output) -> (usize, usize, usize) {
    let err = stderr_of(out);
    let line = err
        .lines()
        .find(|l| l.starts_with("measurements: "))
        .unwrap_or_else(|| panic!("no summary line in:\n{err}"));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|x| !x.is_empty())
        .filter_map(|x| x.parse().ok())
        .collect();
    (nums[0], nums[1], nums[2])
}

/// The one cache file in `dir`.
fn cache_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one cache file in {}: {files:?}",
        dir.display()
    );
    files[0].clone()
}

fn entries(file: &Path) -> usize {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
        .expect("the cache file is valid JSON");
    assert_eq!(v["schema"], 1);
    v["entries"].as_object().expect("entries").len()
}

#[test]
fn a_second_tune_measures_nothing() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("tune_twice");
    let first = tune(&tmp.0, BERT, "batch=2,seq=16", &[]);
    assert_ok(&first);
    let (m, hits, total) = counts(&first);
    assert!(m > 0 && total > 0, "{}", stderr_of(&first));
    assert_eq!(hits, 0);
    let second = tune(&tmp.0, BERT, "batch=2,seq=16", &[]);
    assert_ok(&second);
    assert_eq!(counts(&second), (0, total, total), "{}", stderr_of(&second));
    // Another shape in the same bucket (seq 9..16) is a hit too.
    let third = tune(&tmp.0, BERT, "batch=2,seq=13", &[]);
    assert_eq!(counts(&third), (0, total, total), "{}", stderr_of(&third));
    // --show lists them with their speedups; --clear empties the file.
    let show = transfuse_env(
        ["tune", "--show", "--backend", "wgpu"],
        &[("TRANSFUSE_CACHE_DIR", tmp.0.to_str().unwrap())],
    );
    assert_ok(&show);
    let listed = String::from_utf8_lossy(&show.stdout);
    assert_eq!(listed.lines().filter(|l| l.contains('×')).count(), total);
    let clear = transfuse_env(
        ["tune", "--clear", "--backend", "wgpu"],
        &[("TRANSFUSE_CACHE_DIR", tmp.0.to_str().unwrap())],
    );
    assert_ok(&clear);
    assert_eq!(entries(&cache_file(&tmp.0)), 0);
}

#[test]
fn a_corrupt_or_older_cache_is_moved_aside_and_rebuilt() {
    if !have_wgpu() {
        return;
    }
    for (what, text) in [
        ("corrupt", "{ this is not json".to_string()),
        (
            "older",
            r#"{"schema": 0, "device": "x", "entries": {}}"#.to_string(),
        ),
    ] {
        let tmp = TempDir::new(&format!("tune_{what}"));
        assert_ok(&tune(&tmp.0, BERT, "batch=2,seq=16", &[]));
        let file = cache_file(&tmp.0);
        let n = entries(&file);
        std::fs::write(&file, &text).unwrap();
        let out = tune(&tmp.0, BERT, "batch=2,seq=16", &[]);
        assert_ok(&out);
        let err = stderr_of(&out);
        assert_eq!(
            err.matches("warning: tuning cache").count(),
            1,
            "{what}: one warning:\n{err}"
        );
        assert!(err.contains("moved to"), "{what}: {err}");
        let aside: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".bad-"))
            .collect();
        assert_eq!(aside.len(), 1, "{what}: moved aside");
        assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), text);
        assert_eq!(entries(&file), n, "{what}: rebuilt");
        assert!(counts(&out).0 > 0, "{what}: re-tuned");
    }
}

#[test]
fn a_newer_cache_is_left_untouched() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("tune_newer");
    assert_ok(&tune(&tmp.0, BERT, "batch=2,seq=16", &[]));
    let file = cache_file(&tmp.0);
    let text = r#"{"schema": 99, "device": "x", "entries": {}, "future": true}"#;
    std::fs::write(&file, text).unwrap();
    let out = tune(&tmp.0, BERT, "batch=2,seq=16", &[]);
    assert_ok(&out);
    assert!(stderr_of(&out).contains("newer"), "{}", stderr_of(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    // Runs read it without complaint.
    let run = transfuse_env(
        [
            "run",
            "--model",
            &s(&fixture(BERT)),
            "--inputs",
            &s(&fixture("tiny_bert/inputs.json")),
            "--out",
            &s(&tmp.join("o.safetensors")),
            "--backend",
            "wgpu",
        ],
        &[("TRANSFUSE_CACHE_DIR", tmp.0.to_str().unwrap())],
    );
    assert_ok(&run);
}

#[test]
fn two_tuners_on_one_file_lose_nothing() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("tune_two");
    let dir = tmp.0.clone();
    let a = {
        let d = dir.clone();
        std::thread::spawn(move || tune(&d, BERT, "batch=2,seq=16", &[]))
    };
    let b = {
        let d = dir.clone();
        std::thread::spawn(move || tune(&d, GPT2, "batch=1,seq=8,past=0", &[]))
    };
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_ok(&a);
    assert_ok(&b);
    let total = entries(&cache_file(&dir));
    // Both models' entries are there: re-tuning either measures nothing.
    for (m, d) in [(BERT, "batch=2,seq=16"), (GPT2, "batch=1,seq=8,past=0")] {
        let again = tune(&dir, m, d, &[]);
        assert_eq!(counts(&again).0, 0, "{m}: {}", stderr_of(&again));
    }
    assert!(total >= counts(&a).2.max(counts(&b).2));
}

#[test]
fn a_config_whose_output_differs_is_rejected() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("tune_reject");
    let out = tune(
        &tmp.0,
        BERT,
        "batch=2,seq=16",
        &[("TRANSFUSE_TUNE_INJECT_MISMATCH", "1")],
    );
    assert_ok(&out);
    let err = stderr_of(&out);
    assert!(
        err.contains("rejected tile_m=")
            || err.contains("rejected threads=")
            || err.contains("rejected block_q="),
        "{err}"
    );
    assert!(err.contains("output differs from the default's"), "{err}");
    // The rejected points are not the stored winners.
    let file = cache_file(&tmp.0);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut checked = 0;
    for line in err
        .lines()
        .filter(|l| l.trim_start().starts_with("rejected "))
    {
        let rest = &line.trim_start()["rejected ".len()..];
        let (point, rest) = rest.split_once(" [").unwrap();
        let key = rest.split_once("]:").unwrap().0;
        let e = &v["entries"][key];
        let mut got: Vec<String> = e["tunables"]
            .as_object()
            .unwrap_or_else(|| panic!("an entry for {key}"))
            .iter()
            .map(|(k, x)| format!("{k}={x}"))
            .collect();
        got.sort_unstable();
        let mut want: Vec<&str> = point.split(',').collect();
        want.sort_unstable();
        assert_ne!(got, want, "{key}: the rejected point was stored");
        checked += 1;
    }
    assert!(checked > 0, "{err}");
}

#[test]
fn fixtures_match_with_a_populated_cache() {
    if !have_wgpu() {
        return;
    }
    let tmp = TempDir::new("tune_parity");
    // The fixture inputs are batch 2 × 16 tokens.
    assert_ok(&tune(&tmp.0, BERT, "batch=2,seq=16", &[]));
    let out = tmp.join("o.safetensors");
    let run = transfuse_env(
        [
            "run",
            "--model",
            &s(&fixture(BERT)),
            "--inputs",
            &s(&fixture("tiny_bert/inputs.json")),
            "--out",
            &s(&out),
            "--backend",
            "wgpu",
            "-v",
        ],
        &[("TRANSFUSE_CACHE_DIR", tmp.0.to_str().unwrap())],
    );
    assert_ok(&run);
    let err = stderr_of(&run);
    let line = err
        .lines()
        .find(|l| l.starts_with("tuning: "))
        .unwrap_or_else(|| panic!("-v names the cache use:\n{err}"));
    let from_cache: usize = line["tuning: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(from_cache > 0, "{line}");
    let got = load_all_safetensors(&out).unwrap();
    let want = outputs_of("tiny_bert");
    for name in ["last_hidden_state", "pooler_output"] {
        let g = got[name].as_f32().unwrap();
        let w = want[name].as_f32().unwrap();
        assert_eq!(g.len(), w.len());
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // The device tolerance of tests/gpu_parity.rs.
        assert!(worst <= 1e-3, "{name}: max |diff| {worst}");
    }
    // --no-cache runs the defaults and says so.
    let plain = transfuse_env(
        [
            "run",
            "--model",
            &s(&fixture(BERT)),
            "--inputs",
            &s(&fixture("tiny_bert/inputs.json")),
            "--out",
            &s(&out),
            "--backend",
            "wgpu",
            "-v",
            "--no-cache",
        ],
        &[("TRANSFUSE_CACHE_DIR", tmp.0.to_str().unwrap())],
    );
    assert_ok(&plain);
    assert!(
        stderr_of(&plain).contains("tuning: 0 of"),
        "{}",
        stderr_of(&plain)
    );
}

#[test]
fn bad_tune_arguments_are_usage_errors() {
    let tmp = TempDir::new("tune_bad");
    let dir = tmp.0.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["tune", "--backend", "cpu", "--model", "x"],
            &["--backend cpu"],
        ),
        (vec!["tune", "--backend", "nope"], &["nope"]),
        (
            vec![
                "tune",
                "--backend",
                "wgpu",
                "--budget",
                "-3",
                "--model",
                "x",
            ],
            &["--budget"],
        ),
        (
            vec!["tune", "--backend", "wgpu", "--dtype", "f8", "--model", "x"],
            &["--dtype"],
        ),
    ];
    for (args, culprits) in cases {
        let out = transfuse_env(&args, &[("TRANSFUSE_CACHE_DIR", dir.as_str())]);
        common::cli::assert_error(&out, culprits);
    }
    if have_wgpu() {
        let bert = s(&fixture(BERT));
        let out = transfuse_env(
            [
                "tune",
                "--backend",
                "wgpu",
                "--model",
                &bert,
                "--dims",
                "nodim=3",
            ],
            &[("TRANSFUSE_CACHE_DIR", dir.as_str())],
        );
        common::cli::assert_error(&out, &["--dims", "nodim"]);
    }
}
