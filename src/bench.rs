//! `transfuse bench model`: times a model's forward pass (and, for decoders, KV-cache decoding)
//! on a backend, with a per-kernel breakdown and the memory planner's numbers.
//!
//! Timings are host wall-clock: the median of `--iters` runs after `--warmup` runs. The
//! per-kernel table comes from one extra run in which every launch is synchronised (so its
//! total exceeds the forward time by the launch-and-wait overhead). Inputs are deterministic
//! pseudo-random ids below the vocabulary size.

use std::time::Instant;

use transfuse::models::ModelConfig;
use transfuse::{Batch, Error, Sampling, Session};

/// What to bench.
pub struct BenchArgs {
    pub batch: usize,
    pub seq: usize,
    pub iters: usize,
    pub warmup: usize,
    pub decode_tokens: usize,
    pub json: bool,
}

fn ids(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<i64>> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab as u64) as i64
                })
                .collect()
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Runs the bench and prints its report (a table, or one JSON object with `--json`).
pub fn bench_model(s: &Session, reason: &str, a: &BenchArgs) -> Result<(), Error> {
    if a.batch == 0 || a.seq == 0 || a.iters == 0 {
        return Err(Error::Usage(
            "--batch, --seq and --iters must be at least 1".into(),
        ));
    }
    let (vocab, positions) = match &s.model.config {
        ModelConfig::Bert(c) => (c.vocab_size, c.max_position_embeddings),
        ModelConfig::Gpt2(c) => (c.vocab_size, c.n_positions),
    };
    if a.seq > positions {
        return Err(Error::Usage(format!(
            "--seq {} exceeds the model's {positions} positions",
            a.seq
        )));
    }
    let batch = Batch::new(ids(a.batch, a.seq, vocab));
    for _ in 0..a.warmup {
        s.forward(&batch)?;
    }
    let mut times = vec![];
    for _ in 0..a.iters {
        let t0 = Instant::now();
        s.forward(&batch)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let fwd = median(times.clone());
    let tokens = (a.batch * a.seq) as f64;
    let profile = s.profile(&batch)?;
    let mut by_kernel: Vec<(String, String, usize, f64)> = vec![];
    for k in &profile {
        match by_kernel.iter_mut().find(|e| e.0 == k.name) {
            Some(e) => {
                e.2 += 1;
                e.3 += k.seconds;
            }
            None => by_kernel.push((k.name.clone(), k.ops.join("+"), 1, k.seconds)),
        }
    }
    by_kernel.sort_by(|x, y| y.3.total_cmp(&x.3));
    let profiled: f64 = by_kernel.iter().map(|e| e.3).sum();
    let memory = s.memory();
    // Decoding: a prompt of `seq` tokens, then `decode_tokens` one-token steps.
    let decode = match (&s.model.config, a.decode_tokens) {
        (ModelConfig::Gpt2(c), n) if n > 0 => {
            let prompt_len = a.seq.min(c.n_positions.saturating_sub(n)).max(1);
            let prompt = ids(1, prompt_len, vocab).remove(0);
            s.generate(&prompt, 1, Sampling::Greedy)?; // warm-up
            let t0 = Instant::now();
            s.generate(&prompt, n, Sampling::Greedy)?;
            Some((prompt_len, n, t0.elapsed().as_secs_f64()))
        }
        _ => None,
    };
    if a.json {
        let kernels: Vec<serde_json::Value> = by_kernel
            .iter()
            .map(|(name, ops, n, secs)| {
                serde_json::json!({"kernel": name, "ops": ops, "launches": n, "ms": secs * 1e3})
            })
            .collect();
        let j = serde_json::json!({
            "model": s.model.dir.display().to_string(),
            "backend": s.backend_name(),
            "device": s.backend_description(),
            "batch": a.batch,
            "seq": a.seq,
            "forward_ms_median": fwd * 1e3,
            "forward_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
            "tokens_per_s": tokens / fwd,
            "kernels": kernels,
            "profiled_total_ms": profiled * 1e3,
            "memory": memory.map(|m| serde_json::json!({
                "persistent_bytes": m.persistent,
                "io_bytes": m.io,
                "temps_naive_bytes": m.temps_naive,
                "temps_planned_bytes": m.temps_planned,
                "temps_live_peak_bytes": m.temps_live_peak,
            })),
            "decode": decode.map(|(p, n, secs)| serde_json::json!({
                "prompt": p, "tokens": n, "ms": secs * 1e3, "tokens_per_s": n as f64 / secs,
            })),
        });
        println!("{j}");
        return Ok(());
    }
    println!(
        "model {} ({}) on {}: {}",
        s.model.dir.display(),
        s.model.config.model_type(),
        s.backend_name(),
        s.backend_description()
    );
    println!("backend choice: {reason}");
    println!(
        "forward batch {} × seq {}: median {:.2} ms of {} runs (min {:.2}, max {:.2}), {:.0} tokens/s",
        a.batch,
        a.seq,
        fwd * 1e3,
        a.iters,
        times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        times.iter().copied().fold(0.0, f64::max) * 1e3,
        tokens / fwd
    );
    println!("per kernel (one run, every launch synchronised):");
    println!(
        "{:>10} {:>6} {:>8}  {:<44} ops",
        "ms", "%", "launches", "kernel"
    );
    for (name, ops, n, secs) in &by_kernel {
        println!(
            "{:>10.3} {:>6.1} {:>8}  {:<44} {}",
            secs * 1e3,
            100.0 * secs / profiled.max(1e-12),
            n,
            name,
            ops
        );
    }
    println!(
        "{:>10.3} {:>6.1} {:>8}  total",
        profiled * 1e3,
        100.0,
        profile.len()
    );
    if let Some(m) = memory {
        println!(
            "memory: resident {:.2} MB, inputs/outputs {:.2} MB, temporaries {:.2} MB planned \
             by liveness vs {:.2} MB one buffer per tensor ({:.1}× less; live peak {:.2} MB)",
            mb(m.persistent),
            mb(m.io),
            mb(m.temps_planned),
            mb(m.temps_naive),
            m.temps_naive as f64 / (m.temps_planned.max(1)) as f64,
            mb(m.temps_live_peak)
        );
    }
    if let Some((p, n, secs)) = decode {
        println!(
            "decode: prompt {p} tokens, then {n} tokens in {:.1} ms ({:.1} tokens/s, KV cache carried between steps)",
            secs * 1e3,
            n as f64 / secs
        );
    }
    Ok(())
}
