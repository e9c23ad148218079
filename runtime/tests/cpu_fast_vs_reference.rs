//! The fast CPU paths (`CpuBackend::new()`: faer GEMM with epilogues, flash attention) against
//! the reference loops (`CpuBackend::reference()`) on the same graphs, at sizes 1, 3, 50, 129
//! and 783, batched and broadcast operands, one-row products, and magnitudes ×100.
//!
//! Tolerances, per element:
//! - matmul and fused matmul: `|fast - ref| <= 3·k·ε·Σ_p |a_ip·b_pj| + 1e-6·(1 + |ref|)`, with
//!   ε = 2⁻²⁴: twice the textbook bound on a k-term f32 dot product's rounding error (each side
//!   is within `k·ε·Σ|a·b|` of the exact value whatever its summation order), a margin for the
//!   epilogue's rounding, measured far below it;
//! - attention: `|fast - ref| <= 1e-5·(max|v| + |ref|)` — the fused-vs-decomposition tolerance
//!   `1e-5·(1 + |ref|)` with v's scale in place of 1, since an output is a convex combination
//!   of v rows (online softmax and a 2-ulp vectorised `exp` against one pass with `f32::exp`);
//!   v ×100 and q ×10 for large magnitudes: a score's own rounding differs between any two
//!   summation orders (faer's FMA blocks, the reference's in-order sum) by a few ulps, and with
//!   scores in the hundreds (q ×100) that alone moves the softmax by more than 1e-5 whatever the
//!   kernel. Scores in the thousands are covered by fused_vs_decomposition.rs, where the flash
//!   kernel and the decomposition's matmul round the scores alike.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_ir::{shape, Act, DType, Dim, Graph, NodeId, Op, Scalar, Tensor, Weights};
use transfuse_runtime::{Backend, CpuBackend, TensorMap};

mod common;
use common::rand_vec;

struct Case {
    g: Graph,
    inputs: TensorMap,
    weights: Weights,
    seed: u64,
}

impl Case {
    fn new(seed: u64) -> Case {
        Case {
            g: Graph::new(),
            inputs: HashMap::new(),
            weights: HashMap::new(),
            seed,
        }
    }

    fn input_data(&mut self, name: &str, s: &[usize], data: Vec<f32>) -> NodeId {
        let mut dims: Vec<Dim> = shape(s.iter().copied());
        if s.len() > 2 {
            dims[0] = Dim::sym("batch");
        }
        let id = self
            .g
            .add(
                Op::Input {
                    name: name.into(),
                    shape: dims,
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap();
        self.inputs
            .insert(name.into(), Tensor::f32(s.to_vec(), data));
        id
    }

    fn input(&mut self, name: &str, s: &[usize], scale: f32) -> NodeId {
        self.seed += 1;
        let data = rand_vec(s.iter().product(), self.seed, scale);
        self.input_data(name, s, data)
    }

    fn weight(&mut self, name: &str, s: &[usize], scale: f32) -> NodeId {
        self.seed += 1;
        let data = rand_vec(s.iter().product(), self.seed, scale);
        self.weights
            .insert(name.into(), Arc::new(Tensor::f32(s.to_vec(), data)));
        self.g
            .add(
                Op::Weight {
                    name: name.into(),
                    shape: shape(s.iter().copied()),
                },
                &[],
            )
            .unwrap()
    }

    fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self
            .inputs
            .get(name)
            .or_else(|| self.weights.get(name).map(|w| &**w))
            .unwrap();
        (t.shape.clone(), t.as_f32().unwrap().to_vec())
    }

    /// Runs output `y` on both modes: (fast, reference).
    fn run(mut self, y: NodeId) -> (Self, Vec<f32>, Vec<f32>) {
        self.g.set_output("y", y);
        let go = |cpu: CpuBackend| {
            let out = cpu.run(&self.g, &self.weights, &self.inputs).unwrap();
            out["y"].as_f32().unwrap().to_vec()
        };
        let fast = go(CpuBackend::new());
        let reference = go(CpuBackend::reference());
        (self, fast, reference)
    }
}

/// `Σ_p |a_ip·b_pj|` for `a [batch, m, k]` (batch 1 broadcasts) and `b [batch|1, k, n]`.
#[allow(clippy::too_many_arguments)]
fn abs_product(
    a: &[f32],
    b: &[f32],
    batch: usize,
    a_batched: bool,
    b_batched: bool,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut out = vec![0f64; batch * m * n];
    for bi in 0..batch {
        let ao = if a_batched { bi * m * k } else { 0 };
        let bo = if b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            for p in 0..k {
                let x = (a[ao + i * k + p] as f64).abs();
                for j in 0..n {
                    out[(bi * m + i) * n + j] += x * (b[bo + p * n + j] as f64).abs();
                }
            }
        }
    }
    out
}

fn check_gemm(label: &str, fast: &[f32], reference: &[f32], bound: &[f64], k: usize) -> f64 {
    assert_eq!(fast.len(), reference.len(), "{label}: length");
    let eps = f32::EPSILON as f64 / 2.0;
    let mut worst = 0f64;
    for (i, ((&f, &r), &s)) in fast.iter().zip(reference).zip(bound).enumerate() {
        assert!(f.is_finite(), "{label}: element {i} = {f}");
        let diff = (f as f64 - r as f64).abs();
        let tol = 3.0 * k as f64 * eps * s + 1e-6 * (1.0 + (r as f64).abs());
        assert!(
            diff <= tol,
            "{label}: element {i}: fast {f}, reference {r}, tol {tol:e}"
        );
        worst = worst.max(diff / tol);
    }
    worst
}

/// (m, k, n) triples over the odd sizes, bounded so the f64 bound stays cheap.
fn shapes() -> Vec<(usize, usize, usize)> {
    vec![
        (1, 1, 1),
        (3, 3, 3),
        (1, 783, 129),
        (1, 50, 783),
        (3, 129, 50),
        (50, 783, 3),
        (129, 50, 783),
        (783, 129, 50),
        (129, 129, 129),
        (783, 3, 129),
    ]
}

#[test]
fn matmul_fast_matches_reference() {
    let mut worst = 0f64;
    for (si, &(m, k, n)) in shapes().iter().enumerate() {
        for mag in [1.0, 100.0] {
            // Activations [batch, m, k] against a shared weight [k, n] (rows folded), and a
            // batched product [batch, m, k] × [batch, k, n] (one product per batch).
            for batched_b in [false, true] {
                let batch = if m * k * n > 1_000_000 { 1 } else { 3 };
                let mut c = Case::new(si as u64 * 10 + batched_b as u64);
                let a = c.input("a", &[batch, m, k], mag);
                let b = if batched_b {
                    c.input("b", &[batch, k, n], mag)
                } else {
                    c.weight("b", &[k, n], mag)
                };
                let y = c.g.add(Op::MatMul, &[a, b]).unwrap();
                let (c, fast, reference) = c.run(y);
                let (_, av) = c.get("a");
                let (_, bv) = c.get("b");
                let bound = abs_product(&av, &bv, batch, true, batched_b, m, k, n);
                let label = format!("matmul {batch}×{m}×{k}·{k}×{n} batched_b={batched_b} ×{mag}");
                worst = worst.max(check_gemm(&label, &fast, &reference, &bound, k));
            }
        }
    }
    eprintln!("matmul: worst |fast - ref| / tol = {worst:.3e}");
}

#[test]
fn fused_matmul_fast_matches_reference() {
    let mut worst = 0f64;
    let acts = [
        Act::Identity,
        Act::GeluErf,
        Act::GeluTanh,
        Act::Relu,
        Act::Silu,
    ];
    for (si, &(m, k, n)) in shapes().iter().enumerate() {
        for mag in [1.0, 100.0] {
            for (ai, &act) in acts.iter().enumerate() {
                for (bias, residual) in [(false, false), (true, false), (true, true), (false, true)]
                {
                    let mut c = Case::new(1000 + si as u64 * 100 + ai as u64 * 10);
                    let batch = 2;
                    let x = c.input("x", &[batch, m, k], mag);
                    let w = c.weight("w", &[k, n], 1.0);
                    let mut args = vec![x, w];
                    if bias {
                        args.push(c.weight("bias", &[n], mag));
                    }
                    if residual {
                        args.push(c.input("res", &[batch, m, n], mag));
                    }
                    let y =
                        c.g.add(
                            Op::FusedMatMul {
                                act,
                                bias,
                                residual,
                            },
                            &args,
                        )
                        .unwrap();
                    let (c, fast, reference) = c.run(y);
                    let (_, xv) = c.get("x");
                    let (_, wv) = c.get("w");
                    let bound = abs_product(&xv, &wv, batch, true, false, m, k, n);
                    let label = format!(
                        "fused matmul {batch}×{m}×{k}·{k}×{n} {act:?} bias={bias} residual={residual} ×{mag}"
                    );
                    worst = worst.max(check_gemm(&label, &fast, &reference, &bound, k));
                }
            }
        }
    }
    eprintln!("fused matmul: worst |fast - ref| / tol = {worst:.3e}");
}

/// Few large products with their own weights (`[2, m, k] × [2, k, n]`): each product split by
/// column blocks with the epilogue per block, its rows numbered across the batch (the second
/// product's bias and residual rows are the second batch's).
#[test]
fn batched_fused_matmul_by_column_blocks_matches_reference() {
    for &(m, k, n) in &[(129usize, 50usize, 783usize), (783, 129, 200)] {
        for mag in [1.0, 100.0] {
            let mut c = Case::new(7000 + m as u64);
            let batch = 2;
            let x = c.input("x", &[batch, m, k], mag);
            let w = c.input("w", &[batch, k, n], 1.0);
            let bias = c.weight("bias", &[n], mag);
            let res = c.input("res", &[batch, m, n], mag);
            let y =
                c.g.add(
                    Op::FusedMatMul {
                        act: Act::GeluErf,
                        bias: true,
                        residual: true,
                    },
                    &[x, w, bias, res],
                )
                .unwrap();
            let (c, fast, reference) = c.run(y);
            let (_, xv) = c.get("x");
            let (_, wv) = c.get("w");
            let bound = abs_product(&xv, &wv, batch, true, true, m, k, n);
            let label = format!("batched fused matmul {batch}×{m}×{k}·{batch}×{k}×{n} ×{mag}");
            check_gemm(&label, &fast, &reference, &bound, k);
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Attn {
    b: usize,
    h: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    window: Option<usize>,
    /// "none", "full" (random [b, h, sq, sk]), "pad" ([b, 1, 1, sk], every fourth key
    /// f32::MIN), "dead" ([b, 1, sq, sk], every fifth query row all f32::MIN).
    mask: &'static str,
    mag: f32,
    /// Key/value heads (a divisor of `h`: grouped-query attention below `h`; 0: `h`).
    kvh: usize,
    /// q, k and v as views: heads sliced out of wider projections `[b, sq, h·d + 5]`,
    /// `[b, sk, 3 + kvh·d]` and `[b, sk, kvh·dv + 2]`, reshaped and permuted (strided operands
    /// at odd offsets, read in place).
    merged: bool,
    /// The output permuted `(0, 2, 1, 3)` and reshaped to `[b, sq, h·dv]`, as a model does
    /// (the fast mode then writes the attention heads-last and the permute copies nothing).
    heads_out: bool,
}

impl Attn {
    fn new(sq: usize, sk: usize, d: usize) -> Attn {
        Attn {
            b: 2,
            h: 2,
            sq,
            sk,
            d,
            dv: d,
            causal: false,
            window: None,
            mask: "none",
            mag: 1.0,
            kvh: 0,
            merged: false,
            heads_out: false,
        }
    }

    fn run(self, seed: u64) -> f32 {
        let Attn {
            b,
            h,
            sq,
            sk,
            d,
            dv,
            ..
        } = self;
        let mut c = Case::new(seed);
        let kvh = if self.kvh == 0 { h } else { self.kvh };
        let (q, k, v) = if self.merged {
            let qp = c.input("qp", &[b, sq, h * d + 5], self.mag.sqrt().min(10.0));
            let kp = c.input("kp", &[b, sk, 3 + kvh * d], 1.0);
            let vp = c.input("vp", &[b, sk, kvh * dv + 2], self.mag);
            let heads = |c: &mut Case, x: NodeId, s: usize, lo: usize, n: usize, w: usize| {
                let sl =
                    c.g.add(
                        Op::Slice {
                            axis: 2,
                            start: lo.into(),
                            end: (lo + n * w).into(),
                        },
                        &[x],
                    )
                    .unwrap();
                let mut dims: Vec<Dim> = shape([b, s, n, w]);
                dims[0] = Dim::sym("batch");
                let r = c.g.add(Op::Reshape { shape: dims }, &[sl]).unwrap();
                c.g.add(
                    Op::Permute {
                        perm: vec![0, 2, 1, 3],
                    },
                    &[r],
                )
                .unwrap()
            };
            (
                heads(&mut c, qp, sq, 0, h, d),
                heads(&mut c, kp, sk, 3, kvh, d),
                heads(&mut c, vp, sk, 0, kvh, dv),
            )
        } else {
            (
                c.input("q", &[b, h, sq, d], self.mag.sqrt().min(10.0)),
                c.input("k", &[b, kvh, sk, d], 1.0),
                c.input("v", &[b, kvh, sk, dv], self.mag),
            )
        };
        let mut args = vec![q, k, v];
        match self.mask {
            "none" => {}
            "full" => args.push(c.input("m", &[b, h, sq, sk], 2.0)),
            "pad" => {
                let m = (0..b * sk)
                    .map(|i| if i % sk % 4 == 3 { f32::MIN } else { 0.0 })
                    .collect();
                args.push(c.input_data("m", &[b, 1, 1, sk], m));
            }
            "dead" => {
                let m = (0..b * sq * sk)
                    .map(|i| if i / sk % sq % 5 == 0 { f32::MIN } else { 0.0 })
                    .collect();
                args.push(c.input_data("m", &[b, 1, sq, sk], m));
            }
            other => panic!("unknown mask {other}"),
        }
        let y =
            c.g.add(
                Op::Attention {
                    scale: Scalar(1.0 / (d as f64).sqrt()),
                    causal: self.causal,
                    window: self.window,
                },
                &args,
            )
            .unwrap();
        let y = if self.heads_out {
            let p =
                c.g.add(
                    Op::Permute {
                        perm: vec![0, 2, 1, 3],
                    },
                    &[y],
                )
                .unwrap();
            let mut dims: Vec<Dim> = shape([b, sq, h * dv]);
            dims[0] = Dim::sym("batch");
            c.g.add(Op::Reshape { shape: dims }, &[p]).unwrap()
        } else {
            y
        };
        let (c, fast, reference) = c.run(y);
        let vmax = if self.merged {
            // The v columns of the wider rows.
            let (w, vp) = (kvh * dv + 2, c.get("vp").1);
            (0..vp.len())
                .filter(|i| i % w < kvh * dv)
                .fold(0f32, |a, i| a.max(vp[i].abs()))
        } else {
            c.get("v").1.iter().fold(0f32, |a, &x| a.max(x.abs()))
        };
        let mut worst = 0f32;
        for (i, (&f, &r)) in fast.iter().zip(&reference).enumerate() {
            assert!(f.is_finite() && r.is_finite(), "{self:?}: element {i}");
            let diff = (f - r).abs();
            let tol = 1e-5 * (vmax + r.abs());
            assert!(
                diff <= tol,
                "{self:?}: element {i}: fast {f}, reference {r}"
            );
            worst = worst.max(diff / tol);
        }
        worst
    }
}

#[test]
fn flash_attention_matches_reference() {
    let sizes = [1, 3, 50, 129, 783];
    let mut cases = vec![];
    for &sq in &sizes {
        for &sk in &sizes {
            if sq * sk > 129 * 783 {
                continue;
            }
            for d in [7, 64] {
                let a = Attn::new(sq, sk, d);
                cases.push(a);
                cases.push(Attn { causal: true, ..a });
                cases.push(Attn { mask: "pad", ..a });
            }
        }
    }
    for d in [32, 33, 128] {
        for &(sq, sk) in &[(129, 129), (1, 783), (50, 129)] {
            let a = Attn::new(sq, sk, d);
            cases.push(Attn { mask: "full", ..a });
            cases.push(Attn {
                causal: true,
                window: Some(4),
                ..a
            });
            cases.push(Attn {
                causal: true,
                window: Some(100),
                mask: "pad",
                ..a
            });
            cases.push(Attn {
                window: Some(2),
                ..a
            });
            cases.push(Attn { mask: "dead", ..a });
            cases.push(Attn {
                mask: "dead",
                causal: true,
                window: Some(2),
                ..a
            });
            cases.push(Attn {
                causal: true,
                window: Some(0),
                ..a
            });
        }
    }
    // Large magnitudes: v ×100, q ×10 (scores up to about 30 after scaling).
    for &(sq, sk) in &[(50, 50), (129, 129), (3, 783)] {
        for causal in [false, true] {
            cases.push(Attn {
                mag: 100.0,
                causal,
                ..Attn::new(sq, sk, 64)
            });
        }
    }
    // Grouped-query (6 query heads over 2 or 3) and multi-query attention.
    for (kvh, sq, sk, d) in [
        (2, 129, 129, 33),
        (3, 50, 783, 64),
        (1, 129, 50, 7),
        (1, 1, 783, 128),
    ] {
        let a = Attn {
            h: 6,
            kvh,
            ..Attn::new(sq, sk, d)
        };
        cases.push(a);
        cases.push(Attn { mask: "full", ..a });
        cases.push(Attn {
            causal: true,
            window: Some(4),
            mask: "pad",
            ..a
        });
        cases.push(Attn {
            causal: true,
            mask: "dead",
            ..a
        });
    }
    // sq > sk: the first queries see no key; odd value width.
    cases.push(Attn {
        causal: true,
        ..Attn::new(129, 50, 64)
    });
    cases.push(Attn {
        dv: 17,
        mask: "full",
        ..Attn::new(50, 129, 33)
    });
    cases.push(Attn {
        b: 1,
        h: 1,
        causal: true,
        ..Attn::new(783, 783, 64)
    });
    // q/k/v read through strides from merged projections (the fast mode reads the views in
    // place, the reference copies them first), at the odd sizes and ×100, GQA included.
    for &(sq, sk) in &[(1, 1), (3, 50), (50, 3), (129, 129), (1, 783), (129, 783)] {
        for (kvh, d, dv) in [(0, 64, 64), (0, 7, 7), (1, 33, 17), (2, 64, 80)] {
            let a = Attn {
                h: if kvh == 0 { 2 } else { 4 },
                kvh,
                dv,
                merged: true,
                ..Attn::new(sq, sk, d)
            };
            cases.push(a);
            cases.push(Attn { causal: true, ..a });
            cases.push(Attn { mask: "pad", ..a });
            cases.push(Attn {
                mag: 100.0,
                causal: true,
                ..a
            });
            cases.push(Attn {
                heads_out: true,
                mask: "pad",
                ..a
            });
            cases.push(Attn {
                heads_out: true,
                mag: 100.0,
                causal: true,
                ..a
            });
        }
    }
    let mut worst = 0f32;
    for (i, a) in cases.into_iter().enumerate() {
        worst = worst.max(a.run(5000 + i as u64));
    }
    eprintln!("flash attention: worst |fast - ref| / tol = {worst:.3e}");
}

/// The fused softmax (scale + additive mask): the vectorised exp and one reciprocal per row
/// against the scalar reference, at odd row lengths, ×100 logits, `finfo.min` masks (the
/// underflow path) and fully masked rows (uniform weights). Tolerance: 1e-6·(1+|ref|) per
/// element — the vector exp is within a few ulps and a row's sum is reassociated.
#[test]
fn softmax_fast_matches_reference() {
    let mut worst = 0f64;
    for &n in &[1usize, 3, 50, 129, 783] {
        for (scale, mag) in [(1.0f64, 1.0f32), (0.125, 100.0)] {
            for masked in [false, true] {
                let mut c = Case::new(n as u64 * 7 + masked as u64);
                let rows = 5;
                let x = c.input("x", &[2, rows, n], mag);
                let mut kids = vec![x];
                if masked {
                    // Row r of each batch sees its first r·n/4 keys: row 0 is fully masked.
                    let m: Vec<f32> = (0..rows * n)
                        .map(|i| {
                            let (r, j) = (i / n, i % n);
                            if j < r * n / 4 {
                                0.0
                            } else {
                                f32::MIN
                            }
                        })
                        .collect();
                    let mask = c.input_data("m", &[rows, n], m);
                    kids.push(mask);
                }
                let y =
                    c.g.add(
                        Op::Softmax {
                            scale: transfuse_ir::Scalar(scale),
                        },
                        &kids,
                    )
                    .unwrap();
                let (_, fast, reference) = c.run(y);
                for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
                    let err = (f - r).abs() as f64;
                    let tol = 1e-6 * (1.0 + r.abs() as f64);
                    assert!(
                        err <= tol,
                        "n {n} scale {scale} ×{mag} masked {masked}: [{i}] {f} vs {r}"
                    );
                    worst = worst.max(err / tol);
                }
            }
        }
    }
    eprintln!("softmax: worst error {worst:.2} of the tolerance");
}

/// Layer norm: the fast mode sums the row statistics in vector lanes, the reference in order;
/// tolerance `1e-5·(1 + |ref|)` per element (the fused-vs-decomposition bound), with rows
/// offset by 100 at magnitude ×100 so the mean's cancellation is exercised.
#[test]
fn layer_norm_fast_matches_reference() {
    for (si, &n) in [1usize, 3, 50, 129, 783].iter().enumerate() {
        for (mag, offset) in [(1.0f32, 0.0f32), (100.0, 100.0)] {
            for strided_affine in [false, true] {
                let mut c = Case::new(7000 + si as u64);
                let data = rand_vec(3 * 5 * n, si as u64, mag)
                    .into_iter()
                    .map(|v| v + offset)
                    .collect();
                let x = c.input_data("x", &[3, 5, n], data);
                // A [n, 1] weight read broadcast has step 0 along the row only when n is 1;
                // [1, n] rows of a [2, n] weight exercise the plain fallback's strides.
                let (g, b) = if strided_affine {
                    (c.weight("g", &[5, n], 1.0), c.weight("b", &[5, n], 1.0))
                } else {
                    (c.weight("g", &[n], 1.0), c.weight("b", &[n], 1.0))
                };
                let y =
                    c.g.add(Op::LayerNorm { eps: Scalar(1e-5) }, &[x, g, b])
                        .unwrap();
                let (_, fast, reference) = c.run(y);
                for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
                    assert!(
                        (f - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "layer_norm n={n} ×{mag}: element {i}: fast {f}, reference {r}"
                    );
                }
            }
        }
    }
}
