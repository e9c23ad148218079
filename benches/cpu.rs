//! CPU throughput: MiniLM (all-MiniLM-L6-v2) encoding at batch 32 × 128 tokens, and tiny-GPT-2
//! greedy decoding with the KV cache.
//!
//! `cargo bench --bench cpu`. MiniLM's weights come from `TRANSFUSE_MINILM_DIR` or the cache
//! that scripts/fetch-minilm.sh fills; without them that bench is skipped with a message.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use transfuse::models::{Model, Pooling};
use transfuse::{Batch, Sampling, Session};

fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("TRANSFUSE_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cache/transfuse/minilm/model"))
        })?;
    dir.join("model.safetensors").exists().then_some(dir)
}

fn ids(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<i64>> {
    let mut s = 12345u64;
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) as usize % vocab) as i64
                })
                .collect()
        })
        .collect()
}

fn minilm(c: &mut Criterion) {
    let Some(dir) = minilm_dir() else {
        eprintln!("skipping minilm bench: run scripts/fetch-minilm.sh or set TRANSFUSE_MINILM_DIR");
        return;
    };
    let load = || Model::load_with(&dir, Some(Pooling::Mean), true).unwrap();
    let (b, s) = (32, 128);
    let mut g = c.benchmark_group("minilm_cpu");
    g.sample_size(10).measurement_time(Duration::from_secs(40));
    g.throughput(Throughput::Elements((b * s) as u64));
    for (name, session) in [
        ("fused_b32_s128", Session::cpu(load()).unwrap()),
        ("unfused_b32_s128", Session::cpu_unoptimized(load())),
    ] {
        let batch = Batch::new(ids(b, s, session.model.vocab_size()));
        g.bench_function(name, |bench| {
            bench.iter(|| session.forward(&batch).unwrap())
        });
    }
    g.finish();
}

fn gpt2_decode(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_gpt2/model");
    let new = 64;
    let mut g = c.benchmark_group("tiny_gpt2_cpu");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(new as u64));
    for (name, session) in [
        (
            "fused_greedy_64_tokens",
            Session::cpu(Model::load(&dir).unwrap()).unwrap(),
        ),
        (
            "unfused_greedy_64_tokens",
            Session::cpu_unoptimized(Model::load(&dir).unwrap()),
        ),
    ] {
        let prompt = ids(1, 16, session.model.vocab_size()).remove(0);
        g.bench_function(name, |bench| {
            bench.iter(|| session.generate(&prompt, new, Sampling::Greedy).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, minilm, gpt2_decode);
criterion_main!(benches);
