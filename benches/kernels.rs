//! Kernel benches on the CPU backend and on wgpu (when an adapter exists): attention fused vs
//! unfused (the graphs `transfuse bench attention` runs), softmax, layer norm and matmul.
//!
//! `cargo bench --bench kernels`. Device times exclude transfers: inputs are uploaded once and
//! each sample is the launches of one forward up to a device sync (`Loaded::time_forward`).
//! For sweeps with an f64 check and peers' lines, use `transfuse bench attention`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use transfuse::attention_bench::{self as ab, AttnConfig, MaskKind, Point, Variant};
use transfuse::codegen::kir::Elem;
use transfuse::ir::{Builder, DType, Dim, Graph, Tensor};
use transfuse::runtime::{Backend, CpuBackend, TensorMap};

fn backends() -> Vec<Box<dyn Backend>> {
    let mut v: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new())];
    match transfuse::runtime::WgpuBackend::new() {
        Ok(b) => v.push(Box::new(b)),
        Err(e) => eprintln!("kernels bench: no wgpu adapter ({e}); cpu only"),
    }
    v
}

/// Times `graph` on `backend` with criterion, inputs resident.
fn bench_graph(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    backend: &dyn Backend,
    graph: &Graph,
    inputs: &TensorMap,
) {
    let mut loaded = backend.load(graph, &Default::default()).unwrap();
    loaded.run(inputs, &[]).unwrap();
    g.bench_function(id, |b| {
        b.iter_custom(|n| {
            let t = loaded.time_forward(inputs, n as usize).unwrap();
            Duration::from_secs_f64(t.seconds.iter().sum())
        })
    });
}

fn attention(c: &mut Criterion) {
    for backend in backends() {
        let name = backend.name().to_string();
        let mut g = c.benchmark_group(format!("attention_causal_h12_d64/{name}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(500));
        let seqs: &[usize] = if name == "cpu" {
            &[128, 256, 512]
        } else {
            &[64, 128]
        };
        let cfg = AttnConfig {
            batch: 1,
            heads: 12,
            kv_heads: 12,
            head_dim: 64,
            mask: MaskKind::Causal,
            window: 0,
            lengths: vec![],
            dtype: Elem::F32,
        };
        let base = ab::graph(&cfg).unwrap();
        for &s in seqs {
            let p = Point::Prefill(s);
            let inputs = ab::inputs(&cfg, p);
            g.throughput(Throughput::Elements(cfg.flops(p) as u64));
            for v in [Variant::Fused, Variant::Unfused] {
                let graph = ab::variant_graph(&base, v).unwrap();
                bench_graph(
                    &mut g,
                    BenchmarkId::new(v.name(), s),
                    backend.as_ref(),
                    &graph,
                    &inputs,
                );
            }
        }
        g.finish();
    }
}

/// Deterministic values in [-1, 1).
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = ab::SplitMix::new(seed);
    (0..n).map(|_| r.next_f32()).collect()
}

/// `[rows, n]` → op(x) graphs, optimized (fused softmax / layer norm / matmul).
fn row_graph(n: usize, which: &str) -> (Graph, TensorMap) {
    let rows = Dim::sym("rows");
    let mut b = Builder::new();
    let x = b.input("x", vec![rows, n.into()], DType::F32).unwrap();
    let mut inputs = TensorMap::new();
    let y = match which {
        "softmax" => b.softmax(x).unwrap(),
        "layer_norm" => {
            let gamma = b.input("gamma", vec![n.into()], DType::F32).unwrap();
            let beta = b.input("beta", vec![n.into()], DType::F32).unwrap();
            inputs.insert("gamma".into(), Tensor::f32(vec![n], rand(n, 2)));
            inputs.insert("beta".into(), Tensor::f32(vec![n], rand(n, 3)));
            b.layer_norm(x, gamma, beta, 1e-5).unwrap()
        }
        _ => {
            let w = b.input("w", vec![n.into(), n.into()], DType::F32).unwrap();
            inputs.insert("w".into(), Tensor::f32(vec![n, n], rand(n * n, 4)));
            b.matmul(x, w).unwrap()
        }
    };
    b.output("y", y);
    let g = transfuse::passes::optimize(&b.finish(), &Default::default())
        .unwrap()
        .0;
    (g, inputs)
}

fn rows_ops(c: &mut Criterion) {
    for backend in backends() {
        let name = backend.name().to_string();
        for which in ["softmax", "layer_norm", "matmul"] {
            let mut g = c.benchmark_group(format!("{which}/{name}"));
            g.sample_size(10).warm_up_time(Duration::from_millis(500));
            let (rows, n) = if which == "matmul" {
                (256, 384)
            } else {
                (1024, 768)
            };
            let (graph, mut inputs) = row_graph(n, which);
            inputs.insert("x".into(), Tensor::f32(vec![rows, n], rand(rows * n, 1)));
            bench_graph(
                &mut g,
                BenchmarkId::new(format!("{rows}x{n}"), ""),
                backend.as_ref(),
                &graph,
                &inputs,
            );
            g.finish();
        }
    }
}

criterion_group!(benches, attention, rows_ops);
criterion_main!(benches);
