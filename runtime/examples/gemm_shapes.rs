//! Times the fast GEMM entry point (`cpu::gemm::matmul_strided`) at MiniLM's exact shapes, the
//! weight read as the model reads it (`nn.Linear`'s `[n, k]` transposed: a column-major view),
//! with and without its bias (+ GELU) epilogue, next to a bare `faer` call on the same operands:
//! the gap between the two is what our call path costs. The `torch_gemm.py`-style peer is
//! `F.linear(x, w, b)` at the same shapes.
//!
//! `cargo run --release -p transfuse-runtime --example gemm_shapes [-- filter]`.
//! Threads: `RAYON_NUM_THREADS`. Median (and min) of `RUNS` timed runs (default 10).

use std::time::Instant;

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};
use transfuse_ir::Act;
use transfuse_runtime::cpu::gemm::{matmul_strided, Epilogue, Operand};
use transfuse_runtime::cpu::simd;

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

fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[t.len() / 2], t[0])
}

fn main() {
    let filter = std::env::args().nth(1);
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let threads = rayon::current_num_threads();
    println!("threads {threads}, simd {}", simd::level_name());
    let shapes = [
        (4096, 384, 1152, Act::Identity),
        (4096, 384, 384, Act::Identity),
        (4096, 384, 1536, Act::GeluErf),
        (4096, 1536, 384, Act::Identity),
        (128, 384, 1152, Act::Identity),
        (128, 384, 384, Act::Identity),
        (128, 384, 1536, Act::GeluErf),
        (128, 1536, 384, Act::Identity),
    ];
    let mut x = rand_vec(1 << 20, 9);
    let (med, _) = time(runs, || simd::act(Act::GeluErf, &mut x));
    println!(
        "GELU (erf) of 2^20 f32 on one thread: {:.2} ns/element",
        med * 1e6 / (1 << 20) as f64
    );
    for (m, k, n, act) in shapes {
        let name = format!("{m}x{k}·{k}x{n} {act:?}");
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let a = rand_vec(m * k, 1);
        let w = rand_vec(n * k, 2); // [n, k], read transposed
        let bias = rand_vec(n, 3);
        let flops = 2.0 * (m * k * n) as f64;
        let (sa, sw) = ([k, 1], [1, k]);
        let (shape_a, shape_w) = ([m, k], [k, n]);
        let op_a = Operand {
            data: &a,
            offset: 0,
            shape: &shape_a,
            strides: &sa,
        };
        let op_w = Operand {
            data: &w,
            offset: 0,
            shape: &shape_w,
            strides: &sw,
        };
        let epi = |_r: usize, j0: usize, row: &mut [f32]| {
            simd::add(row, &bias[j0..j0 + row.len()]);
            simd::act(act, row);
        };
        let report = |what: &str, (med, min): (f64, f64)| {
            println!(
                "{name:<28} {what:<22} median {med:8.3} ms  min {min:8.3} ms  {:6.1} GFLOP/s",
                flops / med / 1e6
            );
        };
        report(
            "ours, product only",
            time(runs, || {
                let c = matmul_strided(op_a, op_w, &[], None);
                std::hint::black_box(&c);
            }),
        );
        let e: Epilogue = &epi;
        report(
            "ours, with epilogue",
            time(runs, || {
                let c = matmul_strided(op_a, op_w, &[], Some(e));
                std::hint::black_box(&c);
            }),
        );
        // Candidate call paths, bare faer + the same epilogue.
        let par = if threads == 1 {
            Par::Seq
        } else {
            Par::rayon(threads)
        };
        let mut c = vec![0f32; m * n];
        report(
            "v2 bias-in-C Accum::Add",
            time(runs, || {
                for row in c.chunks_mut(n) {
                    row.copy_from_slice(&bias);
                }
                let av = MatRef::from_row_major_slice(&a, m, k);
                let bv = MatRef::from_column_major_slice(&w, k, n);
                let cv = MatMut::from_row_major_slice_mut(&mut c, m, n);
                faer_matmul(cv, Accum::Add, av, bv, 1.0f32, par);
                if act != Act::Identity {
                    transfuse_runtime::cpu::kernels::for_rows(&mut c, n, |_, r| simd::act(act, r));
                }
                std::hint::black_box(&c);
            }),
        );
        for rb in [32usize, 64, 128, 256] {
            use rayon::prelude::*;
            report(
                &format!("v3 rows/{rb} seq+epi"),
                time(runs, || {
                    c.par_chunks_mut(rb * n).enumerate().for_each(|(i, cc)| {
                        let rows = cc.len() / n;
                        let av = MatRef::from_row_major_slice(
                            &a[i * rb * k..(i * rb + rows) * k],
                            rows,
                            k,
                        );
                        let bv = MatRef::from_column_major_slice(&w, k, n);
                        let cv = MatMut::from_row_major_slice_mut(cc, rows, n);
                        faer_matmul(cv, Accum::Replace, av, bv, 1.0f32, Par::Seq);
                        for row in cc.chunks_mut(n) {
                            simd::add(row, &bias);
                            simd::act(act, row);
                        }
                    });
                    std::hint::black_box(&c);
                }),
            );
        }
        for cb in [128usize, 256, 384] {
            use rayon::prelude::*;
            if cb >= n {
                continue;
            }
            // Column blocks: each task one [m, cb] slab of a column-blocked output.
            let mut cs = vec![0f32; m * n];
            report(
                &format!("v4 cols/{cb} seq"),
                time(runs, || {
                    cs.par_chunks_mut(m * cb).enumerate().for_each(|(j, cc)| {
                        let cols = cc.len() / m;
                        let av = MatRef::from_row_major_slice(&a, m, k);
                        let bv = MatRef::from_column_major_slice(
                            &w[j * cb * k..(j * cb + cols) * k],
                            k,
                            cols,
                        );
                        let cv = MatMut::from_row_major_slice_mut(cc, m, cols);
                        faer_matmul(cv, Accum::Replace, av, bv, 1.0f32, Par::Seq);
                    });
                    std::hint::black_box(&cs);
                }),
            );
        }
        let par = if threads == 1 {
            Par::Seq
        } else {
            Par::rayon(threads)
        };
        for (what, wt) in [("faer, w col-major", false), ("faer, w row-major", true)] {
            let wr: Vec<f32> = if wt {
                (0..k * n).map(|i| w[(i % n) * k + i / n]).collect()
            } else {
                Vec::new()
            };
            report(
                what,
                time(runs, || {
                    let av = MatRef::from_row_major_slice(&a, m, k);
                    let bv = if wt {
                        MatRef::from_row_major_slice(&wr, k, n)
                    } else {
                        MatRef::from_column_major_slice(&w, k, n)
                    };
                    let cv = MatMut::from_row_major_slice_mut(&mut c, m, n);
                    faer_matmul(cv, Accum::Replace, av, bv, 1.0f32, par);
                    std::hint::black_box(&c);
                }),
            );
        }
    }
}
