//! Every fused op on the CPU backend against its primitive decomposition (`decompose`) on the
//! same backend: softmax, attention, the norms and the matmul epilogues, over sizes 1, 3, 50,
//! 129 and 783 where they apply, scalar and vector affine operands, symbolic batch dims, large
//! magnitudes and fully masked attention rows.
//!
//! Tolerance: `|fused - decomposed| <= 1e-5 · (1 + |decomposed|)` per element (1e-5 absolute
//! plus 1e-5 relative). The fused kernels repeat the decomposition's f32 operations in the
//! same order, so the measured differences are far below it.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_ir::{
    decompose, shape, to_text, Act, Builder, DType, Dim, Graph, NodeId, Op, Scalar, Tensor, Weights,
};
use transfuse_runtime::{Backend, CpuBackend, TensorMap};

mod common;
use common::rand_vec;

/// Per-element tolerance, absolute and relative: `|a - b| <= TOL · (1 + |b|)`.
const TOL: f32 = 1e-5;

const SIZES: [usize; 5] = [1, 3, 50, 129, 783];

fn known(s: &[usize]) -> Vec<Dim> {
    shape(s.iter().copied())
}

/// `s` with its leading axis the symbol `batch`.
fn sym_batch(s: &[usize]) -> Vec<Dim> {
    let mut d = known(s);
    d[0] = Dim::sym("batch");
    d
}

/// A graph under construction with the values of its inputs and weights.
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

    fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        self.seed
    }

    /// An f32 input declared with `dims`, holding `data` of concrete `shape`.
    fn input_data(&mut self, name: &str, dims: Vec<Dim>, s: &[usize], data: Vec<f32>) -> NodeId {
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

    /// A random f32 input in [-scale, scale).
    fn input(&mut self, name: &str, dims: Vec<Dim>, s: &[usize], scale: f32) -> NodeId {
        let n = s.iter().product();
        let data = rand_vec(n, self.next_seed(), scale);
        self.input_data(name, dims, s, data)
    }

    /// A weight holding `data`.
    fn weight(&mut self, name: &str, s: &[usize], data: Vec<f32>) -> NodeId {
        let id = self
            .g
            .add(
                Op::Weight {
                    name: name.into(),
                    shape: known(s),
                },
                &[],
            )
            .unwrap();
        self.weights
            .insert(name.into(), Arc::new(Tensor::f32(s.to_vec(), data)));
        id
    }

    /// A random weight in `[center - 1, center + 1)`.
    fn weight_rand(&mut self, name: &str, s: &[usize], center: f32) -> NodeId {
        let n = s.iter().product();
        let data = rand_vec(n, self.next_seed(), 1.0)
            .into_iter()
            .map(|v| v + center)
            .collect();
        self.weight(name, s, data)
    }

    fn fused(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        assert!(op.is_fused());
        self.g.add(op, args).unwrap()
    }

    /// Runs the graph (output `y`) and its decomposition; asserts agreement within [`TOL`] and
    /// returns (fused output, max absolute difference).
    fn check(mut self, label: &str, y: NodeId) -> (Vec<f32>, f32) {
        self.g.set_output("y", y);
        let cpu = CpuBackend::new();
        let fused = cpu
            .run(&self.g, &self.weights, &self.inputs)
            .unwrap_or_else(|e| panic!("{label}: fused run: {e}"));
        let d = decompose(&self.g).unwrap_or_else(|e| panic!("{label}: decompose: {e}"));
        assert!(
            d.nodes().all(|(_, n)| !n.op.is_fused()),
            "{label}: fused op left after decompose"
        );
        assert_eq!(
            d.node(d.outputs()[0].1).shape,
            self.g.node(y).shape,
            "{label}: output shape"
        );
        let dec = cpu
            .run(&d, &self.weights, &self.inputs)
            .unwrap_or_else(|e| panic!("{label}: decomposed run: {e}"));
        let (f, w) = (&fused["y"], &dec["y"]);
        assert_eq!(f.shape, w.shape, "{label}: shape");
        let (f, w) = (f.as_f32().unwrap(), w.as_f32().unwrap());
        let mut max = 0f32;
        for (i, (a, b)) in f.iter().zip(w).enumerate() {
            assert!(
                a.is_finite() && b.is_finite(),
                "{label}: element {i} not finite: fused {a}, decomposed {b}"
            );
            let diff = (a - b).abs();
            assert!(
                diff <= TOL * (1.0 + b.abs()),
                "{label}: element {i}: fused {a}, decomposed {b}"
            );
            max = max.max(diff);
        }
        (f.to_vec(), max)
    }
}

fn report(test: &str, max: f32) {
    eprintln!("{test}: max |fused - decomposed| = {max:e}");
}

#[test]
fn softmax_matches_decomposition() {
    let mut worst = 0f32;
    for (si, &n) in SIZES.iter().enumerate() {
        for scale in [1.0, 0.125] {
            for mask in ["none", "full", "keys"] {
                for mag in [1.0, 1e3] {
                    let mut c = Case::new(si as u64 * 100);
                    let s = [2, 3, n];
                    let x = c.input("x", sym_batch(&s), &s, 4.0 * mag);
                    let mut args = vec![x];
                    match mask {
                        "full" => args.push(c.input("m", sym_batch(&s), &s, 3.0)),
                        "keys" => {
                            // Padding-style [n]: every third key masked with f32::MIN.
                            let m = (0..n)
                                .map(|j| if j % 3 == 2 { f32::MIN } else { 0.0 })
                                .collect();
                            args.push(c.input_data("m", known(&[n]), &[n], m));
                        }
                        _ => {}
                    }
                    let y = c.fused(
                        Op::Softmax {
                            scale: Scalar(scale),
                        },
                        &args,
                    );
                    let label = format!("softmax n={n} scale={scale} mask={mask} mag={mag}");
                    let (out, diff) = c.check(&label, y);
                    for row in out.chunks(n) {
                        let sum: f32 = row.iter().sum();
                        assert!((sum - 1.0).abs() < 1e-4, "{label}: row sums to {sum}");
                    }
                    worst = worst.max(diff);
                }
            }
        }
    }
    report("softmax", worst);
}

#[test]
fn softmax_fully_masked_rows_are_uniform() {
    for &n in &SIZES {
        let mut c = Case::new(7);
        let s = [4, n];
        let x = c.input("x", known(&s), &s, 1e3);
        // Rows 0 and 2 fully masked, row 1 half masked, row 3 open.
        let m: Vec<f32> = (0..4 * n)
            .map(|i| match i / n {
                0 | 2 => f32::MIN,
                1 if i % 2 == 0 => f32::MIN,
                _ => 0.0,
            })
            .collect();
        let m = c.input_data("m", known(&s), &s, m);
        let y = c.fused(Op::Softmax { scale: Scalar(0.5) }, &[x, m]);
        let (out, diff) = c.check(&format!("softmax fully masked n={n}"), y);
        for &v in out[..n].iter().chain(&out[2 * n..3 * n]) {
            assert!((v - 1.0 / n as f32).abs() <= 1e-6, "{v} vs 1/{n}");
        }
        report(&format!("softmax fully masked n={n}"), diff);
    }
}

/// One attention configuration.
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
    /// "none", "full" ([b, h, sq, sk] random), "pad" ([b, 1, 1, sk] with masked keys),
    /// "dead" ([b, 1, sq, sk] with fully masked rows).
    mask: &'static str,
    /// Multiplies q: 1e3 gives scores in the thousands.
    mag: f32,
    /// Scale 1/√d when true, 1 otherwise.
    inv_sqrt_d: bool,
    /// Key/value heads (a divisor of `h`: grouped-query attention below `h`).
    kvh: usize,
}

impl Attn {
    fn new(b: usize, h: usize, sq: usize, sk: usize, d: usize) -> Attn {
        Attn {
            b,
            h,
            sq,
            sk,
            d,
            dv: d,
            causal: false,
            window: None,
            mask: "none",
            mag: 1.0,
            inv_sqrt_d: true,
            kvh: h,
        }
    }

    fn kv_heads(self, kvh: usize) -> Attn {
        Attn { kvh, ..self }
    }

    fn causal(self, window: Option<usize>) -> Attn {
        Attn {
            causal: true,
            window,
            ..self
        }
    }

    fn mask(self, mask: &'static str) -> Attn {
        Attn { mask, ..self }
    }

    /// Runs the case; returns (fused output, max difference).
    fn run(self, seed: u64) -> (Vec<f32>, f32) {
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
        let q = c.input("q", sym_batch(&[b, h, sq, d]), &[b, h, sq, d], self.mag);
        let kvh = self.kvh;
        let k = c.input("k", sym_batch(&[b, kvh, sk, d]), &[b, kvh, sk, d], 1.0);
        let v = c.input("v", sym_batch(&[b, kvh, sk, dv]), &[b, kvh, sk, dv], 2.0);
        let mut args = vec![q, k, v];
        match self.mask {
            "none" => {}
            "full" => args.push(c.input("m", sym_batch(&[b, h, sq, sk]), &[b, h, sq, sk], 2.0)),
            "pad" => {
                let m = (0..b * sk)
                    .map(|i| if (i % sk) % 4 == 3 { f32::MIN } else { 0.0 })
                    .collect();
                args.push(c.input_data("m", sym_batch(&[b, 1, 1, sk]), &[b, 1, 1, sk], m));
            }
            "dead" => {
                // Query rows 0 and every fifth fully masked; the rest see every key.
                let m = (0..b * sq * sk)
                    .map(|i| {
                        if (i / sk % sq) % 5 == 0 {
                            f32::MIN
                        } else {
                            0.0
                        }
                    })
                    .collect();
                args.push(c.input_data("m", sym_batch(&[b, 1, sq, sk]), &[b, 1, sq, sk], m));
            }
            other => panic!("unknown mask {other}"),
        }
        let scale = if self.inv_sqrt_d {
            1.0 / (d as f64).sqrt()
        } else {
            1.0
        };
        let y = c.fused(
            Op::Attention {
                scale: Scalar(scale),
                causal: self.causal,
                window: self.window,
            },
            &args,
        );
        let data = |n: &str| c.inputs.get(n).map(|t| t.as_f32().unwrap().to_vec());
        let (qd, kd, vd, md) = (data("q"), data("k"), data("v"), data("m"));
        let (out, diff) = c.check(&format!("{self:?}"), y);
        if self.mag == 1.0 && sq * sk <= 50 * 129 {
            let want = self.naive(
                &qd.unwrap(),
                &kd.unwrap(),
                &vd.unwrap(),
                md.as_deref(),
                scale,
            );
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{self:?}: element {i}: fused {g}, naive {w}"
                );
            }
        }
        (out, diff)
    }

    /// An independent f64 reference written from the spec: query `i` sits at position
    /// `i + sk - sq`; a key is excluded by `causal` if `j > position`, by `window` if
    /// `j <= position - window`, and by the mask if it is `f32::MIN`; a query with every key
    /// excluded averages v uniformly.
    fn naive(&self, q: &[f32], k: &[f32], v: &[f32], m: Option<&[f32]>, scale: f64) -> Vec<f64> {
        let Attn {
            b,
            h,
            sq,
            sk,
            d,
            dv,
            ..
        } = *self;
        let mut out = vec![0f64; b * h * sq * dv];
        for bi in 0..b {
            for hi in 0..h {
                let bh = bi * h + hi;
                // Grouped-query attention: query head `hi` reads key/value head `hi / group`.
                let kv = bi * self.kvh + hi / (h / self.kvh);
                for i in 0..sq {
                    let pos = i as i64 + sk as i64 - sq as i64;
                    let mut scores = vec![None; sk];
                    for (j, sc) in scores.iter_mut().enumerate() {
                        let jj = j as i64;
                        if (self.causal && jj > pos)
                            || self.window.is_some_and(|w| jj <= pos - w as i64)
                        {
                            continue;
                        }
                        let mv = match self.mask {
                            "none" => 0.0,
                            "full" => m.unwrap()[(bh * sq + i) * sk + j],
                            "pad" => m.unwrap()[bi * sk + j],
                            "dead" => m.unwrap()[(bi * sq + i) * sk + j],
                            other => panic!("unknown mask {other}"),
                        };
                        if mv == f32::MIN {
                            continue;
                        }
                        let dot: f64 = (0..d)
                            .map(|p| {
                                q[(bh * sq + i) * d + p] as f64 * k[(kv * sk + j) * d + p] as f64
                            })
                            .sum();
                        *sc = Some(dot * scale + mv as f64);
                    }
                    let weights: Vec<f64> = if scores.iter().all(Option::is_none) {
                        vec![1.0 / sk as f64; sk]
                    } else {
                        let max = scores.iter().flatten().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores
                            .iter()
                            .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                            .collect();
                        let sum: f64 = e.iter().sum();
                        e.iter().map(|x| x / sum).collect()
                    };
                    for c in 0..dv {
                        out[(bh * sq + i) * dv + c] = (0..sk)
                            .map(|j| weights[j] * v[(kv * sk + j) * dv + c] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }
}

#[test]
fn attention_matches_decomposition() {
    let mut cases = vec![];
    // Head dims 32/64/128 and odd ones; sq = sk and sq != sk.
    for (i, &(sq, sk)) in [(1, 1), (3, 3), (50, 50), (3, 129), (129, 50)]
        .iter()
        .enumerate()
    {
        for d in [32, 64, 128, 7, 33] {
            let a = Attn::new(1 + i % 2, 2, sq, sk, d);
            cases.push(a);
            cases.push(a.mask("full"));
            cases.push(a.mask("pad"));
        }
    }
    let mut odd = Attn::new(2, 3, 50, 129, 33);
    odd.dv = 17;
    cases.push(odd);
    cases.push(
        Attn {
            inv_sqrt_d: false,
            ..odd
        }
        .mask("full"),
    );
    // Large scores.
    cases.push(Attn {
        mag: 1e3,
        ..Attn::new(2, 2, 50, 50, 64).mask("full")
    });
    cases.push(Attn {
        mag: 1e3,
        ..Attn::new(1, 2, 129, 129, 32).causal(None)
    });
    // Long sequence, one head.
    cases.push(Attn::new(1, 1, 783, 783, 64).causal(None));
    cases.push(Attn::new(1, 1, 3, 783, 128).mask("pad"));
    // Grouped-query (6 query heads over 2 or 3 key/value heads) and multi-query attention.
    for (kvh, sq, sk, d) in [
        (2, 50, 50, 33),
        (3, 3, 129, 64),
        (1, 129, 50, 7),
        (1, 1, 783, 32),
    ] {
        let a = Attn::new(2, 6, sq, sk, d).kv_heads(kvh);
        cases.push(a);
        cases.push(a.mask("full"));
        cases.push(a.causal(Some(4)).mask("pad"));
        cases.push(a.causal(None).mask("dead"));
    }
    let mut worst = 0f32;
    for (i, a) in cases.into_iter().enumerate() {
        worst = worst.max(a.run(i as u64).1);
    }
    report("attention", worst);
}

#[test]
fn causal_and_windowed_attention_match_decomposition() {
    let mut cases = vec![];
    // Prefill (sq = sk), decode (sq = 1 against sk = 50), chunked prefill (sq < sk) and
    // sq > sk (the first sq - sk queries see no key at all).
    for &(sq, sk) in &[
        (1, 1),
        (3, 3),
        (50, 50),
        (1, 50),
        (3, 129),
        (129, 129),
        (5, 3),
    ] {
        for d in [32, 64, 128, 7] {
            for window in [None, Some(1), Some(4), Some(100)] {
                let a = Attn::new(2, 2, sq, sk, d).causal(window);
                cases.push(a);
                if d == 64 {
                    cases.push(a.mask("pad"));
                    cases.push(a.mask("full"));
                }
            }
        }
        // A window without `causal` bounds keys from below only.
        cases.push(Attn {
            window: Some(2),
            ..Attn::new(1, 2, sq, sk, 32)
        });
    }
    cases.push(Attn::new(1, 1, 783, 783, 32).causal(Some(129)));
    let mut worst = 0f32;
    for (i, a) in cases.into_iter().enumerate() {
        worst = worst.max(a.run(1000 + i as u64).1);
    }
    report("causal/window attention", worst);
}

#[test]
fn fully_masked_attention_rows_are_finite_uniform_averages() {
    let mut worst = 0f32;
    for (i, &(sq, sk, d)) in [(1, 1, 32), (3, 50, 64), (50, 129, 7), (129, 3, 128)]
        .iter()
        .enumerate()
    {
        for a in [
            Attn::new(2, 2, sq, sk, d).mask("dead"),
            Attn::new(2, 2, sq, sk, d).mask("dead").causal(Some(2)),
            Attn {
                mag: 1e3,
                ..Attn::new(2, 2, sq, sk, d).mask("dead")
            },
            // A zero window hides every key from every query.
            Attn::new(2, 2, sq, sk, d).causal(Some(0)),
        ] {
            let seed = 2000 + i as u64;
            let (out, diff) = a.run(seed);
            worst = worst.max(diff);
            // Row i of batch-head bh is fully masked: the output is the mean of v over keys.
            let v = {
                let mut c = Case::new(seed);
                let _q = c.next_seed();
                let _k = c.next_seed();
                rand_vec(2 * 2 * sk * d, c.next_seed(), 2.0)
            };
            let all_dead = a.window == Some(0);
            for bh in 0..4 {
                for r in 0..sq {
                    if !(all_dead || r % 5 == 0) {
                        continue;
                    }
                    for col in 0..d {
                        let mean =
                            (0..sk).map(|j| v[(bh * sk + j) * d + col]).sum::<f32>() / sk as f32;
                        let got = out[(bh * sq + r) * d + col];
                        assert!(
                            (got - mean).abs() <= 1e-5 * (1.0 + mean.abs()),
                            "{a:?}: row {r} col {col}: {got} vs mean {mean}"
                        );
                    }
                }
            }
        }
    }
    report("fully masked attention", worst);
}

#[test]
fn attention_over_a_symbolic_kv_cache() {
    // q [batch, 2, seq, 32] against k, v = concat(past, new) [batch, 2, past+seq, 32].
    let mut worst = 0f32;
    for &(past, seq) in &[(0, 5), (49, 1), (7, 3)] {
        for window in [None, Some(4)] {
            let mut c = Case::new(3000);
            let (b, h, d) = (2, 2, 32);
            let sym = |t: &str| vec![Dim::sym("batch"), h.into(), Dim::sym(t), d.into()];
            let q = c.input("q", sym("seq"), &[b, h, seq, d], 1.0);
            let pk = c.input("pk", sym("past"), &[b, h, past, d], 1.0);
            let pv = c.input("pv", sym("past"), &[b, h, past, d], 1.0);
            let nk = c.input("nk", sym("seq"), &[b, h, seq, d], 1.0);
            let nv = c.input("nv", sym("seq"), &[b, h, seq, d], 1.0);
            let k = c.g.add(Op::Concat { axis: 2 }, &[pk, nk]).unwrap();
            let v = c.g.add(Op::Concat { axis: 2 }, &[pv, nv]).unwrap();
            let y = c.fused(
                Op::Attention {
                    scale: Scalar(1.0 / (d as f64).sqrt()),
                    causal: true,
                    window,
                },
                &[q, k, v],
            );
            let d = decompose(&c.g).unwrap();
            assert!(to_text(&d).contains("iota{start=past len=seq}"));
            let (_, diff) = c.check(&format!("kv cache past={past} seq={seq} {window:?}"), y);
            worst = worst.max(diff);
        }
    }
    report("symbolic kv cache attention", worst);
}

#[test]
fn layer_and_rms_norm_match_decomposition() {
    let mut worst = 0f32;
    for (si, &n) in SIZES.iter().enumerate() {
        for affine in ["vector", "scalar"] {
            for (mag, offset) in [(1.0, 0.0), (1e3, 100.0)] {
                let s = [2, 3, n];
                let aff: &[usize] = if affine == "vector" { &[n] } else { &[] };
                let data: Vec<f32> = rand_vec(6 * n, si as u64, mag)
                    .into_iter()
                    .map(|v| v + offset)
                    .collect();
                let label = format!("n={n} affine={affine} mag={mag}");

                let mut c = Case::new(si as u64);
                let x = c.input_data("x", sym_batch(&s), &s, data.clone());
                let g = c.weight_rand("g", aff, 1.0);
                let b = c.weight_rand("b", aff, 0.0);
                let y = c.fused(Op::LayerNorm { eps: Scalar(1e-5) }, &[x, g, b]);
                worst = worst.max(c.check(&format!("layer_norm {label}"), y).1);

                let mut c = Case::new(si as u64);
                let x = c.input_data("x", sym_batch(&s), &s, data);
                let g = c.weight_rand("g", aff, 1.0);
                let y = c.fused(Op::RmsNorm { eps: Scalar(1e-6) }, &[x, g]);
                worst = worst.max(c.check(&format!("rms_norm {label}"), y).1);
            }
        }
    }
    report("layer/rms norm", worst);
}

#[test]
fn group_and_instance_norm_match_decomposition() {
    let mut worst = 0f32;
    let c_ = 6;
    for (si, spatial) in [vec![1usize], vec![3], vec![50], vec![3, 50], vec![129]]
        .into_iter()
        .enumerate()
    {
        let mut s = vec![2, c_];
        s.extend(&spatial);
        let mut per_channel = vec![c_];
        per_channel.extend(spatial.iter().map(|_| 1));
        for affine in ["channel", "scalar"] {
            let aff: &[usize] = if affine == "channel" {
                &per_channel
            } else {
                &[]
            };
            for groups in [1, 2, c_] {
                let mut c = Case::new(10 + si as u64);
                let x = c.input("x", sym_batch(&s), &s, 3.0);
                let g = c.weight_rand("g", aff, 1.0);
                let b = c.weight_rand("b", aff, 0.0);
                let y = c.fused(
                    Op::GroupNorm {
                        groups,
                        eps: Scalar(1e-5),
                    },
                    &[x, g, b],
                );
                let label = format!("group_norm {s:?} groups={groups} affine={affine}");
                worst = worst.max(c.check(&label, y).1);
            }
            let mut c = Case::new(20 + si as u64);
            let x = c.input("x", sym_batch(&s), &s, 3.0);
            let g = c.weight_rand("g", aff, 1.0);
            let b = c.weight_rand("b", aff, 0.0);
            let y = c.fused(Op::InstanceNorm { eps: Scalar(1e-5) }, &[x, g, b]);
            let label = format!("instance_norm {s:?} affine={affine}");
            worst = worst.max(c.check(&label, y).1);
        }
    }
    // Rank-2 instance norm: no spatial axis, each (n, c) normalises a single element.
    let mut c = Case::new(30);
    let x = c.input("x", sym_batch(&[3, 5]), &[3, 5], 3.0);
    let g = c.weight_rand("g", &[5], 1.0);
    let b = c.weight_rand("b", &[5], 0.0);
    let y = c.fused(Op::InstanceNorm { eps: Scalar(1e-5) }, &[x, g, b]);
    worst = worst.max(c.check("instance_norm rank 2", y).1);
    report("group/instance norm", worst);
}

#[test]
fn batch_norm_matches_decomposition() {
    let mut worst = 0f32;
    for (si, s) in [vec![2usize, 3], vec![2, 3, 50], vec![2, 4, 3, 129]]
        .into_iter()
        .enumerate()
    {
        let mut per_channel = vec![s[1]];
        per_channel.extend(s[2..].iter().map(|_| 1));
        for aff in [per_channel.as_slice(), &[]] {
            let mut c = Case::new(40 + si as u64);
            let x = c.input("x", sym_batch(&s), &s, 3.0);
            let sc = c.weight_rand("scale", aff, 1.0);
            let sh = c.weight_rand("shift", aff, 0.0);
            let y = c.fused(Op::BatchNorm, &[x, sc, sh]);
            worst = worst.max(c.check(&format!("batch_norm {s:?} {aff:?}"), y).1);
        }
    }
    report("batch norm", worst);
}

#[test]
fn fused_matmul_matches_decomposition_for_every_epilogue() {
    let mut worst = 0f32;
    // (batch, m, k, n, batched weight)
    let shapes = [
        (1, 1, 1, 1, false),
        (2, 3, 50, 129, false),
        (2, 129, 33, 3, true),
        (1, 50, 783, 50, false),
        (2, 1, 129, 783, false),
    ];
    for (si, &(bt, m, k, n, batched)) in shapes.iter().enumerate() {
        for &act in Act::ALL {
            for bias in [false, true] {
                for residual in [false, true] {
                    let mut c = Case::new(50 + si as u64);
                    // A batched weight fixes the batch, so x's batch is symbolic only
                    // against a shared weight.
                    let xdims = if batched {
                        known(&[bt, m, k])
                    } else {
                        sym_batch(&[bt, m, k])
                    };
                    let x = c.input("x", xdims, &[bt, m, k], 1.0);
                    let w = if batched {
                        c.weight_rand("w", &[bt, k, n], 0.0)
                    } else {
                        c.weight_rand("w", &[k, n], 0.0)
                    };
                    let mut args = vec![x, w];
                    if bias {
                        args.push(c.weight_rand("bias", &[n], 0.0));
                    }
                    if residual {
                        // Full-shape residual on odd shapes, broadcast [m, n] on even ones.
                        let r = if si % 2 == 1 {
                            let dims = if batched {
                                known(&[bt, m, n])
                            } else {
                                sym_batch(&[bt, m, n])
                            };
                            c.input("r", dims, &[bt, m, n], 1.0)
                        } else {
                            c.input("r", known(&[m, n]), &[m, n], 1.0)
                        };
                        args.push(r);
                    }
                    let y = c.fused(
                        Op::FusedMatMul {
                            act,
                            bias,
                            residual,
                        },
                        &args,
                    );
                    let label = format!(
                        "fused_matmul [{bt},{m},{k}]x[{k},{n}] act={} bias={bias} \
                         residual={residual}",
                        act.name()
                    );
                    worst = worst.max(c.check(&label, y).1);
                }
            }
        }
    }
    report("fused matmul", worst);
}

#[test]
fn decomposing_a_primitive_graph_keeps_its_text_form() {
    // A GPT-style block from the builder's helpers: only primitives.
    let mut b = Builder::new();
    let (bt, seq) = (Dim::sym("batch"), Dim::sym("seq"));
    let x = b
        .input("x", vec![bt.clone(), seq.clone(), 8.into()], DType::F32)
        .unwrap();
    let g = b.weight("ln.g", shape([8usize])).unwrap();
    let be = b.weight("ln.b", shape([8usize])).unwrap();
    let w = b.weight("w", shape([8usize, 24])).unwrap();
    let h = b.layer_norm(x, g, be, 1e-5).unwrap();
    let qkv = b
        .linear(h, w, None, transfuse_ir::WeightLayout::InOut)
        .unwrap();
    let q = b.slice(qkv, 2, 0.into(), 8.into()).unwrap();
    let k = b.slice(qkv, 2, 8.into(), 16.into()).unwrap();
    let v = b.slice(qkv, 2, 16.into(), 24.into()).unwrap();
    let (q, k, v) = (
        b.split_heads(q, 2).unwrap(),
        b.split_heads(k, 2).unwrap(),
        b.split_heads(v, 2).unwrap(),
    );
    let qpos = b.iota(0.into(), seq.clone()).unwrap();
    let qpos = b.reshape(qpos, vec![seq.clone(), 1.into()]).unwrap();
    let kpos = b.iota(0.into(), seq.clone()).unwrap();
    let causal = b.compare(transfuse_ir::CmpOp::Le, kpos, qpos).unwrap();
    let zero = b.scalar(0.0).unwrap();
    let min = b.scalar(f32::MIN as f64).unwrap();
    let mask = b.select(causal, zero, min).unwrap();
    let o = b.attention(q, k, v, Some(mask)).unwrap();
    let o = b.merge_heads(o).unwrap();
    let o = b.gelu_tanh(o).unwrap();
    let o = b.silu(o).unwrap();
    let o = b.rms_norm(o, g, 1e-6).unwrap();
    b.output("o", o);
    b.output("qkv", qkv);
    let g = b.finish();
    assert!(g.nodes().all(|(_, n)| !n.op.is_fused()));
    let d = decompose(&g).unwrap();
    assert_eq!(to_text(&d), to_text(&g));
    assert_eq!(d.outputs(), g.outputs());
}

/// Rotary embedding at odd row counts and head dims (2, 6, 50, 130, 784: every even neighbour
/// of the odd sizes), cos/sin as `[seq, d]` tables broadcast over batch and heads, as full
/// tensors, and at large magnitudes.
#[test]
fn rope_matches_decomposition() {
    let mut worst = 0f32;
    for (si, &d) in [2usize, 6, 50, 130, 784].iter().enumerate() {
        for seq in [1, 3, 129] {
            for (tables, mag) in [("seq", 1.0), ("full", 1.0), ("seq", 1e3)] {
                let s = [2, 3, seq, d];
                let t: Vec<usize> = if tables == "seq" {
                    vec![seq, d]
                } else {
                    s.to_vec()
                };
                let td = if tables == "seq" {
                    known(&t)
                } else {
                    sym_batch(&t)
                };
                let mut c = Case::new(si as u64 * 7 + seq as u64);
                let x = c.input("x", sym_batch(&s), &s, mag);
                let cos = c.input("cos", td.clone(), &t, 1.0);
                let sin = c.input("sin", td, &t, 1.0);
                let y = c.fused(Op::Rope, &[x, cos, sin]);
                let label = format!("rope d={d} seq={seq} tables={tables} mag={mag}");
                worst = worst.max(c.check(&label, y).1);
            }
        }
    }
    report("rope", worst);
}

#[test]
fn rope_refuses_an_odd_rotary_dim() {
    let mut c = Case::new(1);
    let x = c.input("x", known(&[2, 7]), &[2, 7], 1.0);
    let e = c.g.add(Op::Rope, &[x, x, x]).unwrap_err().to_string();
    assert!(e.contains("rope") && e.contains("even"), "{e}");
}

/// The gated matmul (SwiGLU and the other activations) at odd sizes, with a shared and a
/// batched weight pair.
#[test]
fn gated_matmul_matches_decomposition() {
    let mut worst = 0f32;
    let shapes = [
        (1, 1, 1, 1, false),
        (2, 3, 50, 129, false),
        (2, 129, 33, 3, true),
        (1, 50, 783, 50, false),
        (2, 1, 129, 783, false),
    ];
    for (si, &(bt, m, k, n, batched)) in shapes.iter().enumerate() {
        for &act in Act::ALL {
            let mut c = Case::new(90 + si as u64);
            let xdims = if batched {
                known(&[bt, m, k])
            } else {
                sym_batch(&[bt, m, k])
            };
            let x = c.input("x", xdims, &[bt, m, k], 1.0);
            let ws: &[usize] = if batched { &[bt, k, n] } else { &[k, n] };
            let wg = c.weight_rand("wg", ws, 0.0);
            let wu = c.weight_rand("wu", ws, 0.0);
            let y = c.fused(Op::GatedMatMul { act }, &[x, wg, wu]);
            let label = format!("gated_matmul [{bt},{m},{k}]x[{k},{n}] act={}", act.name());
            worst = worst.max(c.check(&label, y).1);
        }
    }
    report("gated matmul", worst);
}
