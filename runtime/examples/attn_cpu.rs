//! Times the fast CPU attention (`Op::Attention` through `cpu::fused::eval`, the flash kernel)
//! at b1 h12 d64 f32, causal, the shape of `bench attention`, and prints per case both the wall
//! median and the process CPU time per call (summed over the process's threads from
//! `/proc/self/task/*/schedstat`). CPU time per call barely moves when other processes load the
//! machine, so on a busy machine it is the number to compare (with one thread:
//! `RAYON_NUM_THREADS=1`) against the peer's `time.process_time()` at `torch.set_num_threads(1)`.
//!
//! `cargo run --release -p transfuse-runtime --example attn_cpu [-- 1024,2048]`.
//! Threads: `RAYON_NUM_THREADS`. `RUNS` timed runs (default 10).

use std::sync::Arc;
use std::time::Instant;

use transfuse_ir::{Op, Scalar, Tensor};
use transfuse_runtime::cpu::{fused, simd};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// CPU time of every thread of this process so far, in ms.
fn cpu_ms() -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e6
}

fn main() {
    let seqs: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "1024,2048".into())
        .split(',')
        .map(|s| s.parse().expect("seq lengths, comma-separated"))
        .collect();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let causal = std::env::var("NONCAUSAL").is_err();
    println!(
        "threads {}, simd {}, causal {causal}",
        rayon::current_num_threads(),
        simd::level_name()
    );
    let (h, d) = (12, 64);
    for s in seqs {
        let n = h * s * d;
        let shape = vec![1, h, s, d];
        let t = |seed| Arc::new(Tensor::f32(shape.clone(), rand_vec(n, seed)));
        let args = [t(1), t(2), t(3)];
        let op = Op::Attention {
            scale: Scalar(1.0 / (d as f64).sqrt()),
            causal,
            window: None,
        };
        let call = || fused::eval(&op, &args, &shape, true).unwrap();
        call();
        let mut wall = vec![];
        let c0 = cpu_ms();
        for _ in 0..runs {
            let t0 = Instant::now();
            std::hint::black_box(call());
            wall.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let cpu = (cpu_ms() - c0) / runs as f64;
        wall.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let flop = 4.0 * (h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
        println!(
            "seq {s}: wall median {:.2} ms (min {:.2}), cpu {cpu:.2} ms/call, {:.1} GFLOP/s per cpu-second",
            wall[runs / 2],
            wall[0],
            flop / (cpu * 1e6)
        );
    }
}
