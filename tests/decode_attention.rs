//! The split-KV decode attention on wgpu (and CUDA where present) against the CPU backend at
//! cache lengths 1, 3, 50, 129 and 783 (none a multiple of the split or the key tile): one
//! causal attention over a KV cache spelled as the models spell it (`present = concat(past,
//! new)`, a graph output: an appendable cache in one capacity buffer), a query row per head,
//! grouped-query heads too. The cache is supplied from the host (written into the capacity
//! buffer) and, in a second run, made by a prefill and carried on the device; both read the
//! presents back densely. Within 1e-4·(1 + |cpu|) (the kernel families' f32 tolerance).

mod common;

use std::collections::HashMap;

use transfuse::ir::{Builder, DType, Dim, Graph, Op, Scalar, Tensor};
use transfuse::runtime::{Backend, CpuBackend};

const D: usize = 16;

/// `attention(q, concat(past_k, k), concat(past_v, v))`, causal, `heads` query heads over
/// `heads / group` key/value heads.
fn graph(heads: usize, group: usize) -> Graph {
    let mut b = Builder::new();
    let (past, seq) = (Dim::sym("past"), Dim::sym("seq"));
    let kvh = heads / group;
    let q = b
        .input(
            "q",
            vec![1.into(), heads.into(), seq.clone(), D.into()],
            DType::F32,
        )
        .unwrap();
    let cache = |t: &Dim| vec![1.into(), kvh.into(), t.clone(), D.into()];
    let pk = b.input("past_k", cache(&past), DType::F32).unwrap();
    let pv = b.input("past_v", cache(&past), DType::F32).unwrap();
    let k = b.input("k", cache(&seq), DType::F32).unwrap();
    let v = b.input("v", cache(&seq), DType::F32).unwrap();
    let k = b.concat(&[pk, k], 2).unwrap();
    let v = b.concat(&[pv, v], 2).unwrap();
    let o = b
        .op(
            Op::Attention {
                scale: Scalar(0.25),
                causal: true,
                window: None,
            },
            &[q, k, v],
        )
        .unwrap();
    b.output("out", o);
    b.output("present_k", k);
    b.output("present_v", v);
    b.finish()
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 512) as f32 / 128.0 - 2.0
        })
        .collect()
}

fn inputs(heads: usize, kvh: usize, past: usize, seq: usize, seed: u64) -> HashMap<String, Tensor> {
    let t = |s: u64, h: usize, rows: usize| {
        Tensor::f32(vec![1, h, rows, D], values(seed * 7 + s, h * rows * D))
    };
    HashMap::from([
        ("q".to_string(), t(1, heads, seq)),
        ("past_k".to_string(), t(2, kvh, past)),
        ("past_v".to_string(), t(3, kvh, past)),
        ("k".to_string(), t(4, kvh, seq)),
        ("v".to_string(), t(5, kvh, seq)),
    ])
}

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}");
    let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: element {i}: {a} vs {b}"
        );
    }
}

fn check(dev: &dyn Backend, name: &str) {
    for (heads, group) in [(4, 1), (4, 2)] {
        let g = graph(heads, group);
        let kvh = heads / group;
        let w = HashMap::new();
        let mut cpu = CpuBackend::new().load(&g, &w).unwrap();
        for (n, len) in [1usize, 3, 50, 129, 783].into_iter().enumerate() {
            let what = format!("{name} heads {heads} group {group} length {len}");
            // The past from the host, one new row: the decode kernels.
            let x = inputs(heads, kvh, len - 1, 1, n as u64);
            let want = cpu.run(&x, &[]).unwrap();
            let mut d = dev.load(&g, &w).unwrap();
            let got = d.run(&x, &[]).unwrap();
            for o in ["out", "present_k", "present_v"] {
                close(&format!("{what} (host past): {o}"), &got[o], &want[o]);
            }
            // The same past made by a prefill and carried on the device.
            let mut p = inputs(heads, kvh, 0, len - 1, n as u64);
            for (i, src) in [("k", "past_k"), ("v", "past_v")] {
                p.insert(i.to_string(), x[src].clone());
            }
            let carry = [
                ("present_k".to_string(), "past_k".to_string()),
                ("present_v".to_string(), "past_v".to_string()),
            ];
            if len > 1 {
                d.clear_carry();
                d.run(&p, &carry).unwrap();
                let mut step = x.clone();
                step.remove("past_k");
                step.remove("past_v");
                let got = d.run(&step, &[]).unwrap();
                for o in ["out", "present_k", "present_v"] {
                    close(&format!("{what} (carried past): {o}"), &got[o], &want[o]);
                }
            }
        }
    }
}

#[test]
fn wgpu_split_decode_matches_the_cpu() {
    if let Some(b) = common::wgpu_backend() {
        check(&b, "wgpu");
    }
}

#[test]
fn cuda_split_decode_matches_the_cpu() {
    if let Some(b) = common::cuda_backend() {
        check(&b, "cuda");
    }
}

/// The runs above launch the split-KV kernels: a decode step's plan kernels include the
/// combine.
#[test]
fn the_decode_step_launches_the_split_kernels() {
    let Some(b) = common::wgpu_backend() else {
        return;
    };
    let g = graph(4, 1);
    let w = HashMap::new();
    let mut d = b.load(&g, &w).unwrap();
    let names: Vec<String> = d
        .profile(&inputs(4, 4, 49, 1, 0))
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("attention_split_")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("attention_combine_")),
        "{names:?}"
    );
    let prefill: Vec<String> = d
        .profile(&inputs(4, 4, 0, 5, 0))
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert!(
        !prefill.iter().any(|n| n.contains("combine")),
        "{prefill:?}"
    );
}
