//! The fast CPU mode's views and arena against the reference mode (`CpuBackend::reference()`,
//! which copies at every permute / slice / expand / reshape).
//!
//! Chains of permutes, slices, expands and reshapes feed every kind of consumer: the ones that
//! read strides (matmul, the fused matmul's operands, bias and residual, elementwise binaries)
//! and the ones that get the view copied out (unary, layer norm, softmax, attention, outputs),
//! at the odd sizes 1, 3, 50, 129 and 783 and at magnitudes ×1 and ×100.
//!
//! Tolerances, per element:
//! - consumers without a GEMM: exact (a view reads the very elements the copy holds, and the
//!   arithmetic after it is the same), except after a layer norm (its fast mode sums the row
//!   statistics in vector lanes): `1e-5·(1 + |ref|)`, the fused-vs-decomposition bound;
//! - matmul and the fused matmul (identity or relu, with bias and residual):
//!   `|fast - ref| <= 3·k·ε·B + 1e-6·(1 + |ref|)` with ε = 2⁻²⁴ and `B` the same graph run by
//!   the reference on the inputs' absolute values (Σ_p |a_ip·b_pj| + |bias| + |residual|: every
//!   view op commutes with `abs`), the bound of `cpu_fast_vs_reference.rs`;
//! - attention after views: `1e-5·(max|v| + |ref|)`, as in `cpu_fast_vs_reference.rs`.
//!
//! The arena: a loaded program's second and third forwards at the same dims take every
//! intermediate buffer from the arena; the only buffers they allocate are those handed out as
//! outputs (counted by `CpuProgram::arena_stats`).

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_ir::{
    shape, Act, BinaryOp, DType, Dim, Graph, NodeId, Op, Scalar, Tensor, UnaryOp, Weights,
};
use transfuse_runtime::{Backend, CpuBackend, Loaded, TensorMap};

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

    fn input(&mut self, name: &str, s: &[usize], scale: f32) -> NodeId {
        self.seed += 1;
        let data = rand_vec(s.iter().product(), self.seed, scale);
        self.inputs
            .insert(name.into(), Tensor::f32(s.to_vec(), data));
        self.g
            .add(
                Op::Input {
                    name: name.into(),
                    shape: shape(s.iter().copied()),
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap()
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

    fn op(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.g.add(op, args).unwrap()
    }

    fn permute(&mut self, x: NodeId, perm: &[usize]) -> NodeId {
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize) -> NodeId {
        self.op(
            Op::Slice {
                axis,
                start: Dim::from(start),
                end: Dim::from(end),
            },
            &[x],
        )
    }

    fn reshape(&mut self, x: NodeId, s: &[usize]) -> NodeId {
        self.op(
            Op::Reshape {
                shape: shape(s.iter().copied()),
            },
            &[x],
        )
    }

    fn expand(&mut self, x: NodeId, s: &[usize]) -> NodeId {
        self.op(
            Op::Expand {
                shape: shape(s.iter().copied()),
            },
            &[x],
        )
    }

    /// Output `y` on (fast, reference, reference on |inputs| and |weights|).
    fn run(mut self, y: NodeId) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        self.g.set_output("y", y);
        let go = |cpu: CpuBackend, w: &Weights, i: &TensorMap| {
            let out = cpu.run(&self.g, w, i).unwrap();
            out["y"].as_f32().unwrap().to_vec()
        };
        let abs = |t: &Tensor| {
            Tensor::f32(
                t.shape.clone(),
                t.as_f32().unwrap().iter().map(|v| v.abs()).collect(),
            )
        };
        let aw: Weights = self
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(abs(v))))
            .collect();
        let ai: TensorMap = self
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), abs(v)))
            .collect();
        let fast = go(CpuBackend::new(), &self.weights, &self.inputs);
        let reference = go(CpuBackend::reference(), &self.weights, &self.inputs);
        let bound = go(CpuBackend::reference(), &aw, &ai);
        (fast, reference, bound)
    }
}

fn check_exact(label: &str, fast: &[f32], reference: &[f32]) {
    assert_eq!(fast.len(), reference.len(), "{label}: length");
    for (i, (f, r)) in fast.iter().zip(reference).enumerate() {
        assert!(
            f.to_bits() == r.to_bits() || (f.is_nan() && r.is_nan()),
            "{label}: element {i}: fast {f}, reference {r}"
        );
    }
}

fn check_gemm(label: &str, fast: &[f32], reference: &[f32], bound: &[f32], k: usize) {
    assert_eq!(fast.len(), reference.len(), "{label}: length");
    let eps = f32::EPSILON as f64 / 2.0;
    for (i, ((&f, &r), &b)) in fast.iter().zip(reference).zip(bound).enumerate() {
        assert!(f.is_finite(), "{label}: element {i} = {f}");
        let diff = (f as f64 - r as f64).abs();
        let tol = 3.0 * k as f64 * eps * b as f64 + 1e-6 * (1.0 + (r as f64).abs());
        assert!(
            diff <= tol,
            "{label}: element {i}: fast {f}, reference {r}, tol {tol:e}"
        );
    }
}

const SIZES: [usize; 4] = [1, 3, 50, 129];

#[test]
fn matmul_reads_permuted_sliced_and_expanded_operands() {
    for (si, &m) in SIZES.iter().enumerate() {
        for &k in &[3usize, 50, 129] {
            for &n in &[1usize, 50] {
                for mag in [1.0f32, 100.0] {
                    let seed = si as u64 * 1000 + k as u64 * 10 + n as u64;
                    // a: [2, 3, k, m] permuted to [2, m, 3, k] then the middle axis sliced to
                    // one (a strided row run), reshaped to [2, m, k] ... and multiplied by
                    // b: [n, k] permuted to [k, n] (a transposed weight).
                    let mut c = Case::new(seed);
                    let a = c.input("a", &[2, 3, k, m], mag);
                    let a = c.permute(a, &[0, 3, 1, 2]);
                    let a = c.slice(a, 2, 1, 2);
                    let a = c.reshape(a, &[2, m, k]);
                    let b = c.weight("b", &[n, k], mag);
                    let b = c.permute(b, &[1, 0]);
                    let y = c.op(Op::MatMul, &[a, b]);
                    let (f, r, bd) = c.run(y);
                    check_gemm(
                        &format!("matmul perm/slice {m}×{k}×{n} ×{mag}"),
                        &f,
                        &r,
                        &bd,
                        k,
                    );

                    // A batched product with the k operand transposed per batch and broadcast
                    // over a batch axis by expand: q [3, m, k] · kᵀ, k [1, n, k] → [3, k, n].
                    let mut c = Case::new(seed + 1);
                    let q = c.input("q", &[3, m, k], mag);
                    let kk = c.input("k", &[1, n, k], mag);
                    let kt = c.permute(kk, &[0, 2, 1]);
                    let kt = c.expand(kt, &[3, k, n]);
                    let y = c.op(Op::MatMul, &[q, kt]);
                    let (f, r, bd) = c.run(y);
                    check_gemm(&format!("matmul expand {m}×{k}×{n} ×{mag}"), &f, &r, &bd, k);
                }
            }
        }
    }
    // One large odd case: 783 rows read transposed.
    let mut c = Case::new(7);
    let a = c.input("a", &[129, 783], 1.0);
    let a = c.permute(a, &[1, 0]);
    let b = c.weight("b", &[129, 50], 1.0);
    let y = c.op(Op::MatMul, &[a, b]);
    let (f, r, bd) = c.run(y);
    check_gemm("matmul 783×129ᵀ·129×50", &f, &r, &bd, 129);
}

#[test]
fn fused_matmul_reads_views_for_every_operand() {
    for (si, &m) in SIZES.iter().chain(&[783]).enumerate() {
        // (50, 783): wide enough that the fast GEMM splits the product by column blocks (odd
        // last block), each block's epilogue reading its own columns of the views.
        for &(k, n) in &[(3usize, 50usize), (50, 129), (129, 3), (50, 783)] {
            if m == 783 && k != 3 || n == 783 && m < 50 {
                continue;
            }
            for act in [Act::Identity, Act::Relu] {
                for mag in [1.0f32, 100.0] {
                    // x: the middle third of a [1, m, 3k] fused-QKV-style output (slice of the
                    // last axis), the weight transposed, the bias a slice of a longer vector
                    // and the residual a permuted [n, m] expanded over the batch.
                    let mut c = Case::new(5000 + si as u64 * 100 + k as u64);
                    let x = c.input("x", &[1, m, 3 * k], mag);
                    let x = c.slice(x, 2, k, 2 * k);
                    let w = c.weight("w", &[n, k], 1.0);
                    let w = c.permute(w, &[1, 0]);
                    let b = c.weight("bias", &[n + 2], mag);
                    let b = c.slice(b, 0, 1, n + 1);
                    let res = c.input("res", &[n, m], mag);
                    let res = c.permute(res, &[1, 0]);
                    let res = c.expand(res, &[1, m, n]);
                    let y = c.op(
                        Op::FusedMatMul {
                            act,
                            bias: true,
                            residual: true,
                        },
                        &[x, w, b, res],
                    );
                    let (f, r, bd) = c.run(y);
                    check_gemm(
                        &format!("fused_matmul {act:?} {m}×{k}×{n} ×{mag}"),
                        &f,
                        &r,
                        &bd,
                        k,
                    );
                }
            }
        }
    }
}

#[test]
fn elementwise_and_copying_consumers_see_the_same_elements() {
    for (si, &n) in SIZES.iter().chain(&[783]).enumerate() {
        for mag in [1.0f32, 100.0] {
            let seed = 9000 + si as u64 * 10;
            // permute → slice → binary with an expanded operand → reshape → unary → layer
            // norm → softmax: every view kind before every consumer kind.
            let mut c = Case::new(seed);
            let x = c.input("x", &[3, n, 5], mag);
            let xp = c.permute(x, &[2, 0, 1]); // [5, 3, n]
            let xs = c.slice(xp, 0, 1, 4); // [3, 3, n]
            let row = c.input("row", &[1, n], mag);
            let row = c.expand(row, &[3, 3, n]);
            let s = c.op(Op::Binary(BinaryOp::Mul), &[xs, row]);
            let s2 = c.op(Op::Binary(BinaryOp::Sub), &[s, xs]);
            let r = c.reshape(s2, &[9, n]);
            let t = c.op(Op::Unary(UnaryOp::Tanh), &[r]);
            let g = c.weight("g", &[n], 1.0);
            let b = c.weight("b", &[n], 1.0);
            let ln = c.op(Op::LayerNorm { eps: Scalar(1e-5) }, &[t, g, b]);
            let tp = c.permute(ln, &[1, 0]); // [n, 9]: strided into a binary
            let tt = c.slice(ln, 0, 0, 1); // [1, n] broadcast over the permuted one's columns
            let tt = c.permute(tt, &[1, 0]); // [n, 1]
            let y = c.op(Op::Binary(BinaryOp::Add), &[tp, tt]);
            let (f, rr, _) = c.run(y);
            // The fast layer norm sums its statistics in lanes: within 1e-5·(1 + |ref|).
            for (i, (x, y)) in f.iter().zip(&rr).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "chain n={n} ×{mag}: element {i}: fast {x}, reference {y}"
                );
            }

            // A view as the graph's output, and a reshape of a permuted view (a copy).
            let mut c = Case::new(seed + 1);
            let x = c.input("x", &[2, n, 3], mag);
            let xp = c.permute(x, &[0, 2, 1]);
            let xr = c.reshape(xp, &[6 * n]);
            let xs = c.slice(xr, 0, 1, 6 * n);
            let (f, rr, _) = c.run(xs);
            check_exact(&format!("view output n={n} ×{mag}"), &f, &rr);
        }
    }
}

#[test]
fn attention_after_head_split_views() {
    // The BERT layout: a fused QKV [1, s, 3·h·d], sliced, split into heads, permuted.
    for &s in &[1usize, 3, 50, 129] {
        for mag in [1.0f32, 100.0] {
            let (h, d) = (2, 7);
            let mut c = Case::new(s as u64);
            let qkv = c.input("qkv", &[1, s, 3 * h * d], 1.0);
            let mut heads = vec![];
            for part in 0..3 {
                let x = c.slice(qkv, 2, part * h * d, (part + 1) * h * d);
                let x = c.reshape(x, &[1, s, h, d]);
                heads.push(c.permute(x, &[0, 2, 1, 3]));
            }
            // Scale v's magnitude through an elementwise op on the view.
            let k = c.input("kmag", &[1], mag);
            let v = c.op(Op::Binary(BinaryOp::Mul), &[heads[2], k]);
            let a = c.op(
                Op::Attention {
                    scale: Scalar(0.25),
                    causal: s > 3,
                    window: None,
                },
                &[heads[0], heads[1], v],
            );
            let a = c.permute(a, &[0, 2, 1, 3]);
            let a = c.reshape(a, &[1, s, h * d]);
            let (f, r, _) = c.run(a);
            let vmax = f.iter().chain(&r).fold(0f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in f.iter().zip(&r).enumerate() {
                let tol = 1e-5 * (vmax.max(mag) + y.abs());
                assert!(
                    (x - y).abs() <= tol,
                    "attention s={s} ×{mag}: {i}: {x} vs {y}"
                );
            }
        }
    }
}

/// A BERT-layer-shaped graph: fused QKV, head split views, attention, merge, output
/// projection with residual, layer norm, GELU MLP.
fn layer(s: usize) -> Case {
    let (h, d) = (2, 8);
    let e = h * d;
    let mut c = Case::new(77);
    let x = c.input("x", &[1, s, e], 1.0);
    let wqkv = c.weight("wqkv", &[e, 3 * e], 0.3);
    let bqkv = c.weight("bqkv", &[3 * e], 0.1);
    let qkv = c.op(
        Op::FusedMatMul {
            act: Act::Identity,
            bias: true,
            residual: false,
        },
        &[x, wqkv, bqkv],
    );
    let mut heads = vec![];
    for part in 0..3 {
        let t = c.slice(qkv, 2, part * e, (part + 1) * e);
        let t = c.reshape(t, &[1, s, h, d]);
        heads.push(c.permute(t, &[0, 2, 1, 3]));
    }
    let a = c.op(
        Op::Attention {
            scale: Scalar(0.35),
            causal: false,
            window: None,
        },
        &heads,
    );
    let a = c.permute(a, &[0, 2, 1, 3]);
    let a = c.reshape(a, &[1, s, e]);
    let wo = c.weight("wo", &[e, e], 0.3);
    let o = c.op(
        Op::FusedMatMul {
            act: Act::Identity,
            bias: false,
            residual: true,
        },
        &[a, wo, x],
    );
    let g = c.weight("g", &[e], 1.0);
    let b = c.weight("b", &[e], 0.1);
    let ln = c.op(Op::LayerNorm { eps: Scalar(1e-5) }, &[o, g, b]);
    let w1 = c.weight("w1", &[e, 4 * e], 0.3);
    let y = c.op(
        Op::FusedMatMul {
            act: Act::GeluErf,
            bias: false,
            residual: false,
        },
        &[ln, w1],
    );
    c.g.set_output("y", y);
    c.g.set_output("ln", ln);
    c
}

#[test]
fn a_second_forward_at_the_same_dims_allocates_only_its_outputs() {
    for s in [3usize, 50] {
        let c = layer(s);
        let mut fast = CpuBackend::new().program(&c.g, &c.weights);
        let outputs = c.g.outputs().len();
        let first = fast.run(&c.inputs, &[]).unwrap();
        let after_first = fast.arena_stats();
        // Every node but the layout ops and the weights/inputs makes a buffer the first time.
        assert!(
            after_first.fresh > outputs,
            "s={s}: the first forward made {after_first:?}"
        );
        let mut last = after_first;
        for round in 2..=4 {
            let out = fast.run(&c.inputs, &[]).unwrap();
            let st = fast.arena_stats();
            let fresh = st.fresh - last.fresh;
            assert!(
                fresh <= outputs,
                "s={s}, forward {round}: {fresh} fresh buffers (only the {outputs} outputs may be new)"
            );
            assert!(st.reused > last.reused, "s={s}: nothing reused");
            for (name, t) in &first {
                assert_eq!(&out[name], t, "s={s}: forward {round} differs in `{name}`");
            }
            last = st;
        }
        // The reference mode has no arena.
        let mut reference = CpuBackend::reference().program(&c.g, &c.weights);
        reference.run(&c.inputs, &[]).unwrap();
        assert_eq!(reference.arena_stats(), Default::default());
    }
}
