//! Device bytes written per decoding step ([`transfuse::runtime::Loaded::bytes_written`],
//! through [`Session::generate_steps`]) on wgpu, for tiny GPT-2 and tiny LLaMA (GQA): the KV
//! cache is appended in place (issue 10 item 7).
//!
//! Each cache (`past_*` input and `present_*` output) is one device buffer with a capacity of
//! rows (`kv_cap`): the prefill writes its prompt's rows, an ordinary step writes exactly the
//! new token's K and V of every layer (`layers × 2 × kv_heads × head_dim × 4` bytes) and copies
//! nothing; a step whose cache outgrows the capacity moves the rows held so far into a buffer
//! of twice the capacity once (device copies, counted apart), so growth costs amortised O(1)
//! rows per token. The run is long enough to cross two growth steps (capacity 16 → 32 → 64).
//! Greedy tokens are exact against the CPU backend on the same run, and the logits of every
//! step (the cache carried on the device, crossing the growth steps) match the CPU's within
//! the device tolerance (1e-3 absolute, as `tests/gpu_parity.rs`).

mod common;

use std::collections::HashMap;

use common::fixture;
use transfuse::ir::Tensor;
use transfuse::models::{gpt2, Model};
use transfuse::runtime::{Backend, CpuBackend};
use transfuse::{Sampling, Session, Step};

/// New tokens decoded per run (the prompt is the prefill step): 6 + 30 = 36 rows cross the
/// capacities 16 and 32.
const NEW: usize = 30;
/// The prompt.
const PROMPT: [i64; 6] = [3, 14, 15, 9, 2, 6];
/// The executor's first capacity (rows) and growth factor.
const FIRST_CAP: usize = 16;
/// Device logits against the CPU's (absolute).
const TOL: f32 = 1e-3;

struct Run {
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
    let gpu = Session::new(Model::load(&dir).unwrap(), Box::new(wgpu)).unwrap();
    let (ids, steps) = gpu.generate_steps(&PROMPT, NEW, Sampling::Greedy).unwrap();
    let cpu = Session::new(Model::load(&dir).unwrap(), Box::new(CpuBackend::new())).unwrap();
    let (want, cpu_steps) = cpu.generate_steps(&PROMPT, NEW, Sampling::Greedy).unwrap();
    assert_eq!(
        ids, want,
        "{name}: greedy tokens on wgpu vs the CPU backend"
    );
    assert!(cpu_steps.iter().all(|s| s.written.is_none()));
    let c = gpu.model.config.cache_shape().unwrap();
    Some(Run {
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

fn writes_one_token_per_step(name: &str) {
    let Some(r) = decode(name) else { return };
    let prompt = PROMPT.len();
    assert_eq!(r.steps.len(), NEW);
    let mut cap = 0usize;
    let (mut growths, mut copied) = (0, 0u64);
    for (s, step) in r.steps.iter().enumerate() {
        let w = step.written.as_ref().unwrap();
        // Cache length after this step: the prompt, then one more per step.
        let t = prompt + s;
        let kv = kv_bytes(step, r.layers);
        eprintln!(
            "{name} step {s}: T = {t}, KV bytes written {kv} ({:.1} tokens), host {} B, kernels {} B, copies {} B",
            kv as f64 / r.token_bytes as f64,
            w.host,
            w.kernels,
            w.copies
        );
        // The prefill writes the prompt's rows, every later step one token's.
        let new_rows = if s == 0 { prompt } else { 1 } as u64;
        assert_eq!(
            kv,
            new_rows * r.token_bytes,
            "{name} step {s}: KV bytes written"
        );
        // Growth: the first call allocates; a step that outgrows the capacity doubles it and
        // copies the rows held before it (t − 1 of them) once.
        let grows = t > cap;
        let held = (t - new_rows as usize) as u64;
        if s == 0 {
            cap = t.max(FIRST_CAP);
            assert_eq!(w.copies, 0, "{name}: the prefill copies nothing");
        } else if grows {
            assert_eq!(t, cap + 1, "{name} step {s}: grows only once full");
            cap *= 2;
            growths += 1;
            assert_eq!(
                w.copies,
                held * r.token_bytes,
                "{name} step {s}: growth copy"
            );
            copied += w.copies;
        } else {
            assert_eq!(
                w.copies, 0,
                "{name} step {s}: an ordinary step copies nothing"
            );
        }
        // Uploads: the step's ids and the mask over the whole sequence, as i32; the empty
        // past of the prefill is zero bytes, and carried caches are not uploaded again.
        assert_eq!(
            w.host,
            4 * (new_rows + t as u64),
            "{name} step {s}: host bytes"
        );
        assert!(w.kernels >= kv);
        assert_eq!(w.total(), w.host + w.copies + w.kernels);
    }
    assert!(growths >= 2, "{name}: {growths} growth steps (want two)");
    // Amortised: capacities double, so all growth copies together (16 + 32 rows here) stay
    // below two copies of the final cache — O(1) rows per token.
    let last = (prompt + NEW - 1) as u64;
    assert!(
        copied < 2 * last * r.token_bytes,
        "{name}: {copied} bytes copied for {last} rows"
    );
}

#[test]
fn gpt2_writes_one_token_per_step() {
    writes_one_token_per_step("tiny_gpt2");
}

#[test]
fn llama_writes_one_token_per_step() {
    writes_one_token_per_step("tiny_llama");
}

/// Greedy decoding step by step with the cache carried on the device (wgpu) against the CPU
/// backend fed its own presents back: the logits of every step agree, growth steps included.
fn logits_match_cpu(name: &str) {
    let Some(wgpu) = common::wgpu_backend() else {
        return;
    };
    let dir = fixture(&format!("{name}/model"));
    let s = Session::new(Model::load(&dir).unwrap(), Box::new(CpuBackend::new())).unwrap();
    let c = s.model.config.cache_shape().unwrap();
    let mut dev = wgpu.load(&s.graph, &s.weights).unwrap();
    let mut cpu = CpuBackend::new().load(&s.graph, &s.weights).unwrap();
    let carry: Vec<(String, String)> = (0..c.layers)
        .flat_map(|i| {
            [
                (gpt2::present_key(i), gpt2::past_key(i)),
                (gpt2::present_value(i), gpt2::past_value(i)),
            ]
        })
        .collect();
    let mut cache: HashMap<String, Tensor> = HashMap::new();
    for (_, past) in &carry {
        cache.insert(
            past.clone(),
            Tensor::f32(vec![1, c.kv_heads, 0, c.head_dim], vec![]),
        );
    }
    let mut ids = PROMPT.to_vec();
    let mut step = PROMPT.to_vec();
    let mut worst = 0f32;
    for s in 0..NEW {
        let mut inputs = cache.clone();
        inputs.insert(
            "input_ids".into(),
            Tensor::i64(vec![1, step.len()], step.clone()),
        );
        inputs.insert(
            "attention_mask".into(),
            Tensor::i64(vec![1, ids.len()], vec![1; ids.len()]),
        );
        let want = cpu.run(&inputs, &[]).unwrap();
        if s > 0 {
            // The device holds its own cache: only the ids and the mask are supplied.
            inputs.retain(|k, _| !k.starts_with("past_"));
        }
        let got = dev.run(&inputs, &carry).unwrap();
        let (g, w) = (
            got["logits"].as_f32().unwrap(),
            want["logits"].as_f32().unwrap(),
        );
        assert_eq!(g.len(), w.len());
        let d = g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d);
        assert!(
            d <= TOL,
            "{name} step {s} (T = {}): logits differ by {d}",
            ids.len()
        );
        let v = got["logits"].shape[2];
        let last = &w[w.len() - v..];
        let next = (0..v)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap() as i64;
        for (present, past) in &carry {
            cache.insert(past.clone(), want[present].clone());
        }
        ids.push(next);
        step = vec![next];
    }
    eprintln!("{name}: worst logit difference over {NEW} steps {worst:e}");
}

#[test]
fn gpt2_logits_match_cpu_across_growth() {
    logits_match_cpu("tiny_gpt2");
}

#[test]
fn llama_logits_match_cpu_across_growth() {
    logits_match_cpu("tiny_llama");
}

/// A cache read back instead of carried (a forward with a host-supplied past) is the dense
/// tensor: the presents of a one-token step with a supplied past equal the CPU's.
#[test]
fn supplied_past_and_read_back_presents_match_cpu() {
    let Some(wgpu) = common::wgpu_backend() else {
        return;
    };
    let dir = fixture("tiny_gpt2/model");
    let s = Session::new(Model::load(&dir).unwrap(), Box::new(CpuBackend::new())).unwrap();
    let c = s.model.config.cache_shape().unwrap();
    let mut dev = wgpu.load(&s.graph, &s.weights).unwrap();
    let mut cpu = CpuBackend::new().load(&s.graph, &s.weights).unwrap();
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    for i in 0..c.layers {
        for name in [gpt2::past_key(i), gpt2::past_value(i)] {
            inputs.insert(
                name,
                Tensor::f32(vec![1, c.kv_heads, 0, c.head_dim], vec![]),
            );
        }
    }
    inputs.insert(
        "input_ids".into(),
        Tensor::i64(vec![1, 5], PROMPT[..5].to_vec()),
    );
    inputs.insert("attention_mask".into(), Tensor::i64(vec![1, 5], vec![1; 5]));
    let first = cpu.run(&inputs, &[]).unwrap();
    for i in 0..c.layers {
        for (present, past) in [
            (gpt2::present_key(i), gpt2::past_key(i)),
            (gpt2::present_value(i), gpt2::past_value(i)),
        ] {
            inputs.insert(past, first[&present].clone());
        }
    }
    inputs.insert("input_ids".into(), Tensor::i64(vec![1, 1], vec![PROMPT[5]]));
    inputs.insert("attention_mask".into(), Tensor::i64(vec![1, 6], vec![1; 6]));
    let want = cpu.run(&inputs, &[]).unwrap();
    let got = dev.run(&inputs, &[]).unwrap();
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{name}");
        let (g, w) = (g.as_f32().unwrap(), w.as_f32().unwrap());
        let d = g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= TOL, "{name}: differs by {d}");
    }
}
