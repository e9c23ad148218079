//! Device bytes written per decoding step ([`transfuse::runtime::Loaded::bytes_written`],
//! through [`Session::generate_steps`]) on wgpu, for tiny GPT-2 and tiny LLaMA (GQA).
//!
//! What today's executor writes per step is pinned exactly: the host uploads only the step's
//! ids and mask, and the KV cache outputs (`present_*`) are written whole — the past rows
//! copied by the QKV matmul's extra workgroups (concat placement) plus the new row — so a
//! step at cache length `T` writes `layers × 2 × kv_heads × T × head_dim × 4` bytes of KV.
//! The acceptance target of issue 10 item 7 (O(one token) per ordinary step, in-place append
//! into a capacity-strided cache) is not built yet: when it lands, the pinned count below
//! becomes one token per ordinary step (growth steps apart).
//! Greedy tokens are checked exact against the CPU backend on the same run.

mod common;

use common::fixture;
use transfuse::models::Model;
use transfuse::runtime::CpuBackend;
use transfuse::{Sampling, Session, Step};

/// New tokens decoded per run (the prompt is the prefill step).
const NEW: usize = 12;

struct Run {
    prompt: usize,
    /// Bytes of one token's K and V over all layers (f32).
    token_bytes: u64,
    layers: usize,
    steps: Vec<Step>,
}

/// Decodes `NEW` tokens on wgpu (None without an adapter) and checks the tokens against the
/// CPU backend.
fn decode(name: &str) -> Option<Run> {
    let wgpu = common::wgpu_backend()?;
    let dir = fixture(&format!("{name}/model"));
    let prompt: Vec<i64> = vec![3, 14, 15, 9, 2, 6];
    let gpu = Session::new(Model::load(&dir).unwrap(), Box::new(wgpu)).unwrap();
    let (ids, steps) = gpu.generate_steps(&prompt, NEW, Sampling::Greedy).unwrap();
    let cpu = Session::new(Model::load(&dir).unwrap(), Box::new(CpuBackend::new())).unwrap();
    let (want, cpu_steps) = cpu.generate_steps(&prompt, NEW, Sampling::Greedy).unwrap();
    assert_eq!(
        ids, want,
        "{name}: greedy tokens on wgpu vs the CPU backend"
    );
    assert!(cpu_steps.iter().all(|s| s.written.is_none()));
    let c = gpu.model.config.cache_shape().unwrap();
    Some(Run {
        prompt: prompt.len(),
        token_bytes: (c.layers * 2 * c.kv_heads * c.head_dim * 4) as u64,
        layers: c.layers,
        steps,
    })
}

fn kv_bytes(step: &Step, layers: usize) -> u64 {
    let w = step.written.as_ref().expect("wgpu counts bytes written");
    (0..layers)
        .map(|i| w.tensor(&format!("present_key_{i}")) + w.tensor(&format!("present_value_{i}")))
        .sum()
}

fn pins_todays_writes(name: &str) {
    let Some(r) = decode(name) else { return };
    assert_eq!(r.steps.len(), NEW);
    for (s, step) in r.steps.iter().enumerate() {
        let w = step.written.as_ref().unwrap();
        // Cache length after this step: the prompt, then one more per step.
        let t = (r.prompt + s) as u64;
        let kv = kv_bytes(step, r.layers);
        eprintln!(
            "{name} step {s}: T = {t}, KV bytes written {kv} ({:.1} tokens), host {} B, kernels {} B, copies {} B",
            kv as f64 / r.token_bytes as f64,
            w.host,
            w.kernels,
            w.copies
        );
        assert_eq!(kv, t * r.token_bytes, "{name} step {s}: KV bytes written");
        // Uploads: the step's ids and the mask over the whole sequence, as i32; the empty
        // past of the prefill is zero bytes, and carried caches are not uploaded again.
        let step_len = if s == 0 { r.prompt } else { 1 } as u64;
        assert_eq!(w.host, 4 * (step_len + t), "{name} step {s}: host bytes");
        assert_eq!(w.copies, 0);
        assert!(w.kernels >= kv);
        assert_eq!(w.total(), w.host + w.kernels);
    }
}

#[test]
fn gpt2_writes_per_step() {
    pins_todays_writes("tiny_gpt2");
}

#[test]
fn llama_writes_per_step() {
    pins_todays_writes("tiny_llama");
}
