//! Times the CPU backend's heavy ops through `Backend::run`: the fused matmul at MiniLM's
//! shapes (with bias + GELU epilogue), plain matmuls including one-row products, and causal
//! attention b1 h12 d64 (the `torch_attention.py` peer's case).
//!
//! `cargo run --release -p transfuse-runtime --example cpu_kernels [-- --reference] [filter]`.
//! Threads: `RAYON_NUM_THREADS`. Median (and min) of the timed runs, in ms and GFLOP/s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use transfuse_ir::{shape, Act, DType, Graph, Op, Scalar, Tensor, Weights};
use transfuse_runtime::{Backend, CpuBackend, TensorMap};

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

fn input(g: &mut Graph, name: &str, s: &[usize]) -> transfuse_ir::NodeId {
    g.add(
        Op::Input {
            name: name.into(),
            shape: shape(s.iter().copied()),
            dtype: DType::F32,
        },
        &[],
    )
    .unwrap()
}

fn weight(g: &mut Graph, w: &mut Weights, name: &str, s: &[usize]) -> transfuse_ir::NodeId {
    let n = s.iter().product();
    w.insert(
        name.into(),
        Arc::new(Tensor::f32(s.to_vec(), rand_vec(n, 7))),
    );
    g.add(
        Op::Weight {
            name: name.into(),
            shape: shape(s.iter().copied()),
        },
        &[],
    )
    .unwrap()
}

struct Case {
    name: String,
    g: Graph,
    w: Weights,
    inputs: TensorMap,
    flops: f64,
}

fn linear(m: usize, k: usize, n: usize, act: Act, bias: bool) -> Case {
    let mut g = Graph::new();
    let mut w = HashMap::new();
    let x = input(&mut g, "x", &[m, k]);
    let wt = weight(&mut g, &mut w, "w", &[k, n]);
    let mut args = vec![x, wt];
    if bias {
        args.push(weight(&mut g, &mut w, "b", &[n]));
    }
    let y = g
        .add(
            Op::FusedMatMul {
                act,
                bias,
                residual: false,
            },
            &args,
        )
        .unwrap();
    g.set_output("y", y);
    let inputs = HashMap::from([("x".into(), Tensor::f32(vec![m, k], rand_vec(m * k, 1)))]);
    Case {
        name: format!(
            "linear {m}x{k}·{k}x{n} {act:?}{}",
            if bias { "+bias" } else { "" }
        ),
        g,
        w,
        inputs,
        flops: 2.0 * (m * k * n) as f64,
    }
}

fn attention(h: usize, s: usize, d: usize) -> Case {
    let mut g = Graph::new();
    let sh = [1, h, s, d];
    let (q, k, v) = (
        input(&mut g, "q", &sh),
        input(&mut g, "k", &sh),
        input(&mut g, "v", &sh),
    );
    let y = g
        .add(
            Op::Attention {
                scale: Scalar(1.0 / (d as f64).sqrt()),
                causal: true,
                window: None,
            },
            &[q, k, v],
        )
        .unwrap();
    g.set_output("y", y);
    let n = h * s * d;
    let inputs = HashMap::from([
        ("q".into(), Tensor::f32(sh.to_vec(), rand_vec(n, 1))),
        ("k".into(), Tensor::f32(sh.to_vec(), rand_vec(n, 2))),
        ("v".into(), Tensor::f32(sh.to_vec(), rand_vec(n, 3))),
    ]);
    Case {
        name: format!("causal attention b1 h{h} s{s} d{d}"),
        g,
        w: HashMap::new(),
        inputs,
        flops: (2 * 2 * h * s * s * d / 2) as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reference = args.iter().any(|a| a == "--reference");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let cpu = if reference {
        CpuBackend::reference()
    } else {
        CpuBackend::new()
    };
    println!("{}", cpu.description());
    let cases = vec![
        linear(4096, 384, 1152, Act::Identity, true),
        linear(4096, 384, 1536, Act::GeluErf, true),
        linear(4096, 1536, 384, Act::Identity, true),
        linear(4096, 384, 384, Act::Identity, true),
        linear(128, 384, 1536, Act::GeluErf, true),
        linear(1, 384, 1536, Act::Identity, false),
        linear(1, 768, 50257, Act::Identity, false),
        attention(12, 1024, 64),
        attention(12, 2048, 64),
    ];
    for c in cases {
        if filter
            .as_ref()
            .is_some_and(|f| !c.name.contains(f.as_str()))
        {
            continue;
        }
        let _ = cpu.run(&c.g, &c.w, &c.inputs).unwrap();
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                let _ = cpu.run(&c.g, &c.w, &c.inputs).unwrap();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = t[t.len() / 2];
        println!(
            "{:<45} median {:9.3} ms  min {:9.3} ms  {:7.1} GFLOP/s",
            c.name,
            med,
            t[0],
            c.flops / med / 1e6
        );
    }
}
