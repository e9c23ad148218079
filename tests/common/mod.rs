//! Helpers shared by the integration tests: fixture paths, reference tensors, comparisons and
//! the skip-unless-required rule for optional resources.
#![allow(dead_code)]

pub mod cli;

use std::collections::HashMap;
use std::path::PathBuf;

use transfuse::ir::Tensor;
use transfuse::models::load_all_safetensors;

/// Path of a file or folder under tests/fixtures, or under `$TRANSFUSE_FIXTURES_DIR` when set
/// (a test binary carried to another machine, where the source tree it was built from, baked in
/// as `CARGO_MANIFEST_DIR`, is absent: scripts/gpu-pack.sh).
pub fn fixture(rel: &str) -> PathBuf {
    match std::env::var_os("TRANSFUSE_FIXTURES_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join(rel),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel),
    }
}

/// The reference tensors of a fixture folder (`outputs.safetensors`).
pub fn outputs_of(name: &str) -> HashMap<String, Tensor> {
    load_all_safetensors(&fixture(&format!("{name}/outputs.safetensors"))).unwrap()
}

/// A rank-2 i64 tensor as rows.
pub fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    let v = t.as_i64().expect("i64 tensor");
    v.chunks(t.shape[1]).map(<[i64]>::to_vec).collect()
}

/// True when `TRANSFUSE_REQUIRE` (comma-separated) names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|x| x.trim() == what))
        .unwrap_or(false)
}

/// The MiniLM folder from `TRANSFUSE_MINILM_DIR` (set by scripts/test.sh after fetching it);
/// `None` (with a message) when absent, a failure when `TRANSFUSE_REQUIRE` names `minilm`.
pub fn minilm_dir() -> Option<PathBuf> {
    match std::env::var_os("TRANSFUSE_MINILM_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None if required("minilm") => {
            panic!("TRANSFUSE_REQUIRE names minilm but TRANSFUSE_MINILM_DIR is not set (run scripts/fetch-minilm.sh)")
        }
        None => {
            eprintln!("skipping: TRANSFUSE_MINILM_DIR not set (run scripts/fetch-minilm.sh)");
            None
        }
    }
}

/// Asserts `got` ≈ `want` within `tol` absolute; with a `[batch][seq]` mask, only positions
/// whose mask is 1 are compared (outputs at padded positions are meaningless).
pub fn assert_close_masked(
    got: &Tensor,
    want: &Tensor,
    mask: Option<&[Vec<i64>]>,
    tol: f32,
    what: &str,
) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    let inner: usize = if want.shape.len() > 2 {
        want.shape[2..].iter().product()
    } else {
        1
    };
    let mut worst = 0f32;
    let mut compared = 0usize;
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        if let Some(m) = mask {
            let pos = i / inner;
            let seq = want.shape[1];
            if m[pos / seq][pos % seq] == 0 {
                continue;
            }
        }
        compared += 1;
        let d = (a - b).abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {a}, want {b} (|diff| {d} > {tol})"
        );
        worst = worst.max(d);
    }
    assert!(compared > 0, "{what}: nothing compared");
    eprintln!("{what}: max |diff| {worst:.2e} over {compared} values (tol {tol:.0e})");
}

/// Asserts `a` ≈ `b` within `tol` relative to the reference, `|a − b| ≤ tol·(1 + |b|)` per
/// element; with a `[batch][seq]` mask and a `[batch, seq, hidden]` output, only positions whose
/// mask is 1 are compared (outputs at padded positions are meaningless).
pub fn assert_close_rel(what: &str, a: &Tensor, b: &Tensor, mask: Option<&[Vec<i64>]>, tol: f32) {
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    let (x, y) = (a.as_f32().unwrap(), b.as_f32().unwrap());
    let h = *a.shape.last().unwrap();
    let keep = |i: usize| match mask {
        Some(m) if a.shape.len() == 3 => {
            let row = i / h;
            m[row / m[0].len()][row % m[0].len()] == 1
        }
        _ => true,
    };
    let worst = x
        .iter()
        .zip(y)
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, (p, q))| (p - q).abs() / (1.0 + q.abs()))
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: worst relative difference {worst:e} > {tol:e}"
    );
}

/// Points this process's tuning cache at a temporary folder (once) and returns it: tests never
/// read or write the user's cache.
pub fn isolate_tuning_cache() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("transfuse-test-cache-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        transfuse::runtime::tune::set_cache_dir(Some(d.clone()));
        d
    })
    .clone()
}

/// The wgpu backend, or `None` (with a message) when no adapter is found; a failure when
/// `TRANSFUSE_REQUIRE` names `wgpu`.
pub fn wgpu_backend() -> Option<transfuse::runtime::WgpuBackend> {
    isolate_tuning_cache();
    match transfuse::runtime::WgpuBackend::new() {
        Ok(b) => {
            eprintln!(
                "wgpu adapter: {}",
                transfuse::runtime::Backend::description(&b)
            );
            Some(b)
        }
        Err(e) if required("wgpu") => panic!("TRANSFUSE_REQUIRE names wgpu but: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// The CUDA backend, or `None` (with a message) when there is no driver or device; a failure
/// when `TRANSFUSE_REQUIRE` names `cuda`.
pub fn cuda_backend() -> Option<transfuse::runtime::CudaBackend> {
    isolate_tuning_cache();
    match transfuse::runtime::CudaBackend::new() {
        Ok(b) => Some(b),
        Err(e) if required("cuda") => panic!("TRANSFUSE_REQUIRE names cuda but: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// An encoder fixture's reference batch (`input_ids`, `attention_mask`, `token_type_ids` of its
/// outputs.safetensors) and its mask as rows.
pub fn encoder_batch(refs: &HashMap<String, Tensor>) -> (transfuse::Batch, Vec<Vec<i64>>) {
    let mask = rows(&refs["attention_mask"]);
    let batch = transfuse::Batch {
        input_ids: rows(&refs["input_ids"]),
        attention_mask: Some(mask.clone()),
        token_type_ids: Some(rows(&refs["token_type_ids"])),
    };
    (batch, mask)
}

/// The sentences of the MiniLM fixture (`minilm/inputs.json`).
pub fn minilm_sentences() -> Vec<String> {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/inputs.json")).unwrap())
            .unwrap();
    inputs["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}
