//! The optimizer's variant suite: one line per spelling of softmax, attention (grouped-query
//! included), the norms, rotary embeddings, the matmul epilogues (gated MLPs included),
//! projection merges and LoRA merges, in the spirit of egg's
//! `test_fn! { name, rules, start => goal }`.
//!
//! `case!(name, |c| <builder code> => [fused ops], gone <primitives>)` builds the graph with the
//! builder (through [`C`], which declares inputs and weights on first use), optimizes it with
//! the default options and checks:
//!
//! - the goal: the optimized graph's fused ops are exactly the listed multiset (an entry `name`
//!   matches any attributes, `name{attrs}` the attributes exactly, `scale=…` left out), and none
//!   of the `gone` primitives is left; with `matmuls n`, the optimized graph has `n` per-call
//!   matmuls (weight-only ones, such as LoRA's merged `W + s·AB`, are folded once and do not
//!   count);
//! - semantics: the original and the optimized graph run on the CPU backend on the same
//!   deterministic pseudo-random inputs and weights (symbolic `batch` = 2), twice:
//!   - inputs in [-1, 1]: every output element must satisfy `|opt − ref| ≤ 1e-5·(1 + |ref|)`
//!     (relative 1e-5 with an absolute floor of 1e-5) — [`TOL`];
//!   - inputs ×100 (large magnitudes): every output must be finite, in the reference and the
//!     optimized graph, and `max |opt − ref| ≤ 1e-3·(1 + max |ref|)` per output — [`TOL_BIG`],
//!     looser because ×100 on q and k makes logits of ~10⁴ where spellings that round
//!     differently legitimately differ (measured worst: 2e-4, scale on q before the matmul).
//!
//!   Masks are data, never scaled: the finite-fill masks (`finfo(f32).min`, −1e30, HF's
//!   `(1 − attention_mask)·finfo.min` with one batch item all padding) have fully masked rows;
//!   `−inf` masks never do, because a fully `−inf` row is NaN in the reference as in PyTorch.
//!
//! `whole_block` marks a whole decoder block (LLaMA's), held to 10× those tolerances
//! ([`WHOLE_BLOCK`]). `overflow_ok` marks the one spelling whose reference overflows at ×100 (softmax without the
//! max subtraction: `exp(100)` is inf in f32); there the fused result must still be finite.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use transfuse::ir::{
    eval_shape, BResult, Bindings, Builder, CmpOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Tensor,
    UnaryOp, WeightLayout, Weights,
};
use transfuse::passes::{optimize, optimize_with, rules, Options};
use transfuse::runtime::{Backend, CpuBackend, TensorMap};

// ---------------------------------------------------------------------------------------------
// Graph construction: a builder behind a RefCell so calls nest (`c.div(e, c.rsum(e))`).

/// Attention head dim, and its softmax scale.
const D: usize = 24;
const S: f64 = 0.20412414523193154; // 1/√24
/// Sequence length of the fixed-size cases.
const SEQ: usize = 50;
const MIN: f64 = f32::MIN as f64;
const EPS: f64 = 1e-5;

struct C {
    b: RefCell<Builder>,
    memo: RefCell<HashMap<String, NodeId>>,
}

fn batch() -> Dim {
    Dim::sym("batch")
}

fn dims(rest: &[usize]) -> Vec<Dim> {
    std::iter::once(batch())
        .chain(rest.iter().map(|&n| n.into()))
        .collect()
}

impl C {
    fn new() -> C {
        C {
            b: RefCell::new(Builder::new()),
            memo: RefCell::new(HashMap::new()),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Builder) -> BResult) -> NodeId {
        f(&mut self.b.borrow_mut()).unwrap_or_else(|e| panic!("builder: {e}"))
    }

    fn memo(&self, name: &str, f: impl FnOnce(&mut Builder) -> BResult) -> NodeId {
        if let Some(id) = self.memo.borrow().get(name) {
            return *id;
        }
        let id = self.with(f);
        self.memo.borrow_mut().insert(name.to_string(), id);
        id
    }

    fn input(&self, name: &str, shape: Vec<Dim>, dt: DType) -> NodeId {
        self.memo(name, |b| b.input(name, shape, dt))
    }

    fn w(&self, name: &str, shape: &[usize]) -> NodeId {
        let s: Vec<Dim> = shape.iter().map(|&n| n.into()).collect();
        self.memo(name, |b| b.weight(name, s))
    }

    // Inputs. `x`: softmax and norms; `q`/`k`/`v`: split heads; `img`: [N, C, H, W];
    // `h`: [batch, seq, hidden] activations.
    fn x(&self) -> NodeId {
        self.input("x", dims(&[3, SEQ, 129]), DType::F32)
    }
    fn q(&self) -> NodeId {
        self.input("q", dims(&[3, SEQ, D]), DType::F32)
    }
    fn k(&self) -> NodeId {
        self.input("k", dims(&[3, SEQ, D]), DType::F32)
    }
    fn v(&self) -> NodeId {
        self.input("v", dims(&[3, SEQ, D]), DType::F32)
    }
    fn img(&self) -> NodeId {
        self.input("img", dims(&[6, 10, 12]), DType::F32)
    }
    fn h(&self) -> NodeId {
        self.input("h", dims(&[SEQ, 72]), DType::F32)
    }
    fn hin(&self, name: &str) -> NodeId {
        self.input(name, dims(&[SEQ, 72]), DType::F32)
    }
    /// Additive mask, 0 or `finfo(f32).min`, with fully masked rows.
    fn mask_min(&self) -> NodeId {
        self.input("mask_min", dims(&[1, SEQ, SEQ]), DType::F32)
    }
    /// Additive mask, 0 or −inf, never a fully masked row.
    fn mask_inf(&self) -> NodeId {
        self.input("mask_inf", dims(&[1, SEQ, SEQ]), DType::F32)
    }
    /// Bool mask (true = attend), never a fully masked row.
    fn keep(&self) -> NodeId {
        self.input("keep", dims(&[1, SEQ, SEQ]), DType::Bool)
    }
    /// Bool mask (true = attend) with fully masked rows.
    fn keep_full(&self) -> NodeId {
        self.input("keep_full", dims(&[1, SEQ, SEQ]), DType::Bool)
    }
    /// HF `attention_mask` [batch, seq] (1 = token, 0 = padding); item 1 is all padding.
    fn attn_mask(&self) -> NodeId {
        self.input("attention_mask", dims(&[SEQ]), DType::I64)
    }
    /// HF's extended mask `(1 − m)·finfo.min` as [batch, 1, 1, seq].
    fn hf_mask(&self) -> NodeId {
        let m = self.cast(self.attn_mask(), DType::F32);
        let ext = self.mulc(self.sub(self.f(1.0), m), MIN);
        self.reshape(ext, dims(&[1, 1, SEQ]))
    }

    // Primitives.
    fn f(&self, v: f64) -> NodeId {
        self.with(|b| b.scalar(v))
    }
    fn add(&self, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.add(x, y))
    }
    fn sub(&self, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.sub(x, y))
    }
    fn mul(&self, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.mul(x, y))
    }
    fn div(&self, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.div(x, y))
    }
    fn pow(&self, x: NodeId, p: f64) -> NodeId {
        let p = self.f(p);
        self.with(|b| b.binary(transfuse::ir::BinaryOp::Pow, x, p))
    }
    fn mulc(&self, x: NodeId, v: f64) -> NodeId {
        self.with(|b| b.mul_scalar(x, v))
    }
    fn addc(&self, x: NodeId, v: f64) -> NodeId {
        self.with(|b| b.add_scalar(x, v))
    }
    fn un(&self, u: UnaryOp, x: NodeId) -> NodeId {
        self.with(|b| b.unary(u, x))
    }
    fn exp(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Exp, x)
    }
    fn sqrt(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Sqrt, x)
    }
    fn rsqrt(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Rsqrt, x)
    }
    fn recip(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Recip, x)
    }
    fn not(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Not, x)
    }
    fn relu(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Relu, x)
    }
    fn sigmoid(&self, x: NodeId) -> NodeId {
        self.un(UnaryOp::Sigmoid, x)
    }
    fn last(&self, x: NodeId) -> usize {
        self.b.borrow().rank(x) - 1
    }
    fn red(&self, r: ReduceOp, x: NodeId, axes: &[usize]) -> NodeId {
        self.with(|b| b.reduce(r, x, axes, true))
    }
    fn rmax(&self, x: NodeId) -> NodeId {
        self.red(ReduceOp::Max, x, &[self.last(x)])
    }
    fn rsum(&self, x: NodeId) -> NodeId {
        self.red(ReduceOp::Sum, x, &[self.last(x)])
    }
    fn rmean(&self, x: NodeId) -> NodeId {
        self.red(ReduceOp::Mean, x, &[self.last(x)])
    }
    fn matmul(&self, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.matmul(x, y))
    }
    fn tr(&self, x: NodeId) -> NodeId {
        self.with(|b| b.transpose_last(x))
    }
    fn permute(&self, x: NodeId, p: &[usize]) -> NodeId {
        self.with(|b| b.permute(x, p))
    }
    fn reshape(&self, x: NodeId, s: Vec<Dim>) -> NodeId {
        self.with(|b| b.reshape(x, s))
    }
    fn select(&self, c: NodeId, x: NodeId, y: NodeId) -> NodeId {
        self.with(|b| b.select(c, x, y))
    }
    fn concat(&self, xs: &[NodeId], axis: usize) -> NodeId {
        self.with(|b| b.concat(xs, axis))
    }
    fn cast(&self, x: NodeId, d: DType) -> NodeId {
        self.with(|b| b.cast(x, d))
    }

    // Builder composites.
    fn softmax(&self, x: NodeId) -> NodeId {
        self.with(|b| b.softmax(x))
    }
    fn layer_norm(&self, x: NodeId, g: NodeId, be: NodeId) -> NodeId {
        self.with(|b| b.layer_norm(x, g, be, EPS))
    }
    fn normalize(&self, x: NodeId, axes: &[usize]) -> NodeId {
        self.with(|b| b.normalize(x, axes, EPS))
    }
    fn rms_norm(&self, x: NodeId, g: NodeId) -> NodeId {
        self.with(|b| b.rms_norm(x, g, EPS))
    }
    fn group_norm(&self, x: NodeId, g: NodeId, be: NodeId, groups: usize) -> NodeId {
        self.with(|b| b.group_norm(x, g, be, groups, EPS))
    }
    fn instance_norm(&self, x: NodeId, g: NodeId, be: NodeId) -> NodeId {
        self.with(|b| b.instance_norm(x, g, be, EPS))
    }
    fn gelu_erf(&self, x: NodeId) -> NodeId {
        self.with(|b| b.gelu_erf(x))
    }
    fn gelu_tanh(&self, x: NodeId) -> NodeId {
        self.with(|b| b.gelu_tanh(x))
    }
    fn silu(&self, x: NodeId) -> NodeId {
        self.with(|b| b.silu(x))
    }
    fn attention(&self, q: NodeId, k: NodeId, v: NodeId, m: Option<NodeId>) -> NodeId {
        self.with(|b| b.attention(q, k, v, m))
    }
    fn split_heads(&self, x: NodeId) -> NodeId {
        self.with(|b| b.split_heads(x, 3))
    }
    fn merge_heads(&self, x: NodeId) -> NodeId {
        self.with(|b| b.merge_heads(x))
    }
    fn linear(&self, x: NodeId, w: NodeId, bias: Option<NodeId>, l: WeightLayout) -> NodeId {
        self.with(|b| b.linear(x, w, bias, l))
    }

    // Shorthands for the families.
    /// Unscaled scores `q kᵀ`.
    fn qk(&self) -> NodeId {
        self.matmul(self.q(), self.tr(self.k()))
    }
    /// `softmax(q kᵀ·S [+ mask]) v` spelled in primitives on given operands.
    fn pv_with(&self, q: NodeId, k: NodeId, v: NodeId, m: Option<NodeId>) -> NodeId {
        let s = self.mulc(self.matmul(q, self.tr(k)), S);
        let s = m.map_or(s, |m| self.add(s, m));
        self.matmul(self.softmax(s), v)
    }
    /// `softmax(scores) v`.
    fn pv(&self, scores: NodeId) -> NodeId {
        self.matmul(self.softmax(scores), self.v())
    }
    /// Layer-norm pieces over the last axis of `x`: (centered, variance).
    fn centered(&self, x: NodeId) -> (NodeId, NodeId) {
        let xc = self.sub(x, self.rmean(x));
        (xc, self.rmean(self.mul(xc, xc)))
    }
    fn gamma(&self) -> NodeId {
        self.w("gamma", &[129])
    }
    fn beta(&self) -> NodeId {
        self.w("beta", &[129])
    }
    /// `y·γ + β` with the [129] affine of `x`.
    fn affine(&self, y: NodeId) -> NodeId {
        self.add(self.mul(y, self.gamma()), self.beta())
    }
    fn cgamma(&self) -> NodeId {
        self.w("gn.gamma", &[6, 1, 1])
    }
    fn cbeta(&self) -> NodeId {
        self.w("gn.beta", &[6, 1, 1])
    }
    /// `(img − running_mean)·inv·γ + β`, the batch-norm spelling with `inv` given.
    fn bn(&self, inv: impl Fn(NodeId) -> NodeId) -> NodeId {
        let y = inv(self.sub(self.img(), self.w("bn.running_mean", &[6, 1, 1])));
        self.add(
            self.mul(y, self.w("bn.weight", &[6, 1, 1])),
            self.w("bn.bias", &[6, 1, 1]),
        )
    }
    fn running_var(&self) -> NodeId {
        self.w("bn.running_var", &[6, 1, 1])
    }
    /// `h @ W` with W [72, 96].
    fn mm(&self) -> NodeId {
        self.matmul(self.h(), self.w("w", &[72, 96]))
    }
    /// The LoRA adapter `(h @ A) @ B` with A [72, 4], B [4, 96].
    fn lora(&self) -> NodeId {
        let ha = self.matmul(self.h(), self.w("lora_a", &[72, 4]));
        self.matmul(ha, self.w("lora_b", &[4, 96]))
    }
    /// `h @ W + b` with W [72, 96].
    fn mmb(&self) -> NodeId {
        self.add(self.mm(), self.w("bias", &[96]))
    }
    /// `h @ W + b` with W [72, 72] (for residuals).
    fn mmb_sq(&self) -> NodeId {
        self.add(
            self.matmul(self.h(), self.w("w_sq", &[72, 72])),
            self.w("bias_sq", &[72]),
        )
    }
    /// transformers' `repeat_kv`: `x [b, kvh, s, d]` → reshape `[b, kvh, 1, s, d]` → expand
    /// `[b, kvh, g, s, d]` → reshape `[b, kvh·g, s, d]`.
    fn repeat_kv(&self, x: NodeId, g: usize) -> NodeId {
        let s = self.b.borrow().shape(x).clone();
        let (kvh, len, d) = (s[1].as_known().unwrap(), s[2].clone(), s[3].clone());
        let one = vec![batch(), kvh.into(), 1.into(), len.clone(), d.clone()];
        let x = self.reshape(x, one);
        let big = vec![batch(), kvh.into(), g.into(), len.clone(), d.clone()];
        let x = self.with(|b| b.expand(x, big));
        self.reshape(x, vec![batch(), (kvh * g).into(), len, d])
    }
    /// A `[batch, heads, SEQ, D]` input.
    fn heads_in(&self, name: &str, heads: usize) -> NodeId {
        self.input(name, dims(&[heads, SEQ, D]), DType::F32)
    }
    /// HF's sliding-window causal mask `i − w < j ≤ i` over `[SEQ, SEQ]`, filled with `keep`.
    fn window_mask(&self, w: i64, keep: NodeId) -> NodeId {
        let (qpos, kpos) = self.positions(0.into(), SEQ.into());
        let causal = self.with(|b| b.compare(CmpOp::Le, kpos, qpos));
        let w = self.with(|b| b.scalar_i64(w));
        let kw = self.add(kpos, w);
        let inside = self.with(|b| b.compare(CmpOp::Gt, kw, qpos));
        let win = self.select(inside, keep, self.f(MIN));
        self.select(causal, win, self.f(MIN))
    }
    /// transformers' `rotate_half`: `concat([neg(x[.., d/2..]), x[.., ..d/2]], last)`.
    fn rotate_half(&self, x: NodeId) -> NodeId {
        let r = self.last(x);
        let d = self.b.borrow().shape(x)[r].as_known().unwrap();
        let hi = self.with(|b| b.slice(x, r, (d / 2).into(), d.into()));
        let lo = self.with(|b| b.slice(x, r, 0.into(), (d / 2).into()));
        self.concat(&[self.un(UnaryOp::Neg, hi), lo], r)
    }
    /// `x·cos + rotate_half(x)·sin` with `[SEQ, D]` tables.
    fn rope(&self, x: NodeId, cos: NodeId, sin: NodeId) -> NodeId {
        self.add(self.mul(x, cos), self.mul(self.rotate_half(x), sin))
    }
    fn cos_in(&self) -> NodeId {
        self.input("cos", vec![SEQ.into(), D.into()], DType::F32)
    }
    fn sin_in(&self) -> NodeId {
        self.input("sin", vec![SEQ.into(), D.into()], DType::F32)
    }
    /// cos/sin tables as transformers computes them in the graph: positions (an iota) times
    /// `inv_freq` `[D/2]`, duplicated to `[SEQ, D]`, then `cos`/`sin`.
    fn rope_tables(&self) -> (NodeId, NodeId) {
        let pos = self.cast(self.with(|b| b.iota(0.into(), SEQ.into())), DType::F32);
        let pos = self.reshape(pos, vec![SEQ.into(), 1.into()]);
        let inv = self.w("inv_freq", &[1, D / 2]);
        let freqs = self.mul(pos, inv);
        let emb = self.concat(&[freqs, freqs], 1);
        (self.un(UnaryOp::Cos, emb), self.un(UnaryOp::Sin, emb))
    }
    /// The causal condition `kpos <= qpos` from iotas, as GPT-2 builds it ([sq, sk]).
    fn causal_cond(&self, past: Dim, seq: Dim) -> NodeId {
        let (qpos, kpos) = self.positions(past, seq);
        self.with(|b| b.compare(CmpOp::Le, kpos, qpos))
    }
    /// Query positions as a column `[sq, 1]` and key positions `[sk]`, from iotas.
    fn positions(&self, past: Dim, seq: Dim) -> (NodeId, NodeId) {
        let qpos = self.with(|b| b.iota(past.clone(), seq.clone()));
        let qpos = self.reshape(qpos, vec![seq.clone(), 1.into()]);
        let kpos = self.with(|b| b.iota(0.into(), past.plus(&seq)));
        (qpos, kpos)
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic data.

struct Rng(u64);

impl Rng {
    fn for_name(name: &str, salt: u64) -> Rng {
        let mut h = 0xcbf29ce484222325u64 ^ salt;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }
}

const BINDINGS: &[(&str, usize)] = &[("batch", 2), ("seq", 11), ("past", 7)];

/// A mask pattern: `Some(true)` attend, `Some(false)` masked. Column 0 is always attended;
/// with `full_rows`, every row `r ≡ 3 (mod 7)` is masked entirely.
fn mask_bits(n: usize, cols: usize, rng: &mut Rng, full_rows: bool) -> Vec<bool> {
    (0..n)
        .map(|i| {
            let (r, j) = (i / cols, i % cols);
            if full_rows && r % 7 == 3 {
                false
            } else {
                j == 0 || !rng.next().is_multiple_of(3)
            }
        })
        .collect()
}

fn input_data(name: &str, shape: Vec<usize>, dtype: DType, big: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let cols = *shape.last().unwrap_or(&1);
    let mut rng = Rng::for_name(name, 1);
    match (name, dtype) {
        ("mask_min", _) => {
            let bits = mask_bits(n, cols, &mut rng, true);
            Tensor::f32(
                shape,
                bits.iter()
                    .map(|&k| if k { 0.0 } else { f32::MIN })
                    .collect(),
            )
        }
        ("mask_inf", _) => {
            let bits = mask_bits(n, cols, &mut rng, false);
            let v = bits
                .iter()
                .map(|&k| if k { 0.0 } else { f32::NEG_INFINITY });
            Tensor::f32(shape, v.collect())
        }
        ("keep", _) => Tensor::bool(shape, mask_bits(n, cols, &mut rng, false)),
        ("keep_full", _) => Tensor::bool(shape, mask_bits(n, cols, &mut rng, true)),
        ("attention_mask", _) => {
            // Item 0: the last 13 tokens are padding; item 1: all padding (fully masked rows).
            let v = (0..n).map(|i| {
                let (b, j) = (i / cols, i % cols);
                i64::from(b == 0 && j + 13 < cols)
            });
            Tensor::i64(shape, v.collect())
        }
        (_, DType::F32) => {
            let k = if big { 100.0 } else { 1.0 };
            Tensor::f32(shape, (0..n).map(|_| rng.sym() * k).collect())
        }
        _ => panic!("no data rule for input `{name}` ({dtype})"),
    }
}

fn weight_data(name: &str, shape: Vec<usize>) -> Tensor {
    let n = shape.iter().product();
    let mut rng = Rng::for_name(name, 2);
    let v = (0..n).map(|_| {
        if name.contains("var") {
            0.5 + rng.unit()
        } else if name.contains("scale") {
            0.8 + 0.4 * rng.unit()
        } else {
            rng.sym()
        }
    });
    Tensor::f32(shape, v.collect())
}

fn data(g: &Graph, big: bool) -> (Weights, TensorMap) {
    let b: Bindings = BINDINGS.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let inputs = g
        .inputs()
        .into_iter()
        .map(|(name, s, dt)| {
            let shape = eval_shape(s, &b).expect("bound dims");
            (name.to_string(), input_data(name, shape, dt, big))
        })
        .collect();
    let weights = g
        .weights()
        .into_iter()
        .map(|(name, s)| {
            let shape = eval_shape(s, &b).expect("known dims");
            (name.to_string(), Arc::new(weight_data(name, shape)))
        })
        .collect();
    (weights, inputs)
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Unit-scale inputs: `|opt − ref| ≤ TOL·(1 + |ref|)` for every element.
const TOL: f32 = 1e-5;
/// Inputs ×100: `max |opt − ref| ≤ TOL_BIG·(1 + max |ref|)` over each output. ×100 on q and k
/// scales the logits by 10⁴ (to ~10³–10⁴, where one f32 rounding is ~10⁻⁴ absolute), so a
/// spelling that rounds differently from the fused kernel (`÷c` against `×(1/c)`, the scale on
/// q before the matmul instead of on the scores) moves the softmax weights by ~10⁻⁴–10⁻³
/// relative; the unit-scale run is the strict equivalence check, this one is about overflow,
/// NaN and masked rows.
const TOL_BIG: f32 = 1e-3;
/// `whole_block` cases (a whole decoder block: a dozen fused ops and merged projections in
/// sequence, each within the per-family tolerances) are held to 10× [`TOL`] / [`TOL_BIG`]:
/// the rounding differences of each op compound through the residual stream (LLaMA block
/// measured: 2.8e-5 scaled at [-1, 1]).
const WHOLE_BLOCK: f32 = 10.0;

/// Runs both graphs on the same data and compares every output.
fn same_outputs(
    what: &str,
    before: &Graph,
    after: &Graph,
    big: bool,
    ref_may_overflow: bool,
    tol_scale: f32,
) {
    let (w, inputs) = data(before, big);
    let cpu = CpuBackend::new();
    let r = cpu.run(before, &w, &inputs).expect("reference runs");
    let o = cpu.run(after, &w, &inputs).expect("optimized graph runs");
    let run = if big {
        "inputs ×100"
    } else {
        "inputs in [-1, 1]"
    };
    for (name, rt) in &r {
        let ot = &o[name];
        assert_eq!(rt.shape, ot.shape, "{what} ({run}): output `{name}` shape");
        let (rv, ov) = (rt.as_f32().unwrap(), ot.as_f32().unwrap());
        if let Some(i) = ov.iter().position(|v| !v.is_finite()) {
            panic!(
                "{what} ({run}): optimized `{name}`[{i}] = {} (reference {})",
                ov[i], rv[i]
            );
        }
        if let Some(i) = rv.iter().position(|v| !v.is_finite()) {
            assert!(
                ref_may_overflow,
                "{what} ({run}): reference `{name}`[{i}] = {}",
                rv[i]
            );
            eprintln!("{what} ({run}): reference overflows, optimized output finite");
            continue;
        }
        let scale = 1.0 + rv.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (mut worst, mut at) = (0f32, 0);
        for (i, (a, b)) in rv.iter().zip(ov).enumerate() {
            let excess = if big {
                (a - b).abs() / scale
            } else {
                (a - b).abs() / (1.0 + a.abs())
            };
            if excess > worst {
                (worst, at) = (excess, i);
            }
        }
        let tol = tol_scale * if big { TOL_BIG } else { TOL };
        eprintln!("{what} ({run}): `{name}` worst scaled diff {worst:e}");
        assert!(
            worst <= tol,
            "{what} ({run}): `{name}`[{at}] optimized {} vs reference {} (scaled diff {worst:e} > {tol:e})",
            ov[at],
            rv[at]
        );
    }
}

/// `attention{causal}` → ("attention", "causal"): the op's attributes without `scale=…`.
fn signature(op: &Op) -> (String, String) {
    let attrs: Vec<String> = op
        .attrs()
        .split_whitespace()
        .filter(|a| !a.starts_with("scale="))
        .map(str::to_string)
        .collect();
    (op.name(), attrs.join(" "))
}

fn matches(entry: &str, op: &Op) -> bool {
    let (name, attrs) = signature(op);
    match entry.split_once('{') {
        Some((n, rest)) => n == name && rest.trim_end_matches('}') == attrs,
        None => entry == name,
    }
}

/// The `matmul` and `fused_matmul` nodes that run per call (not weight-only: LoRA's `A @ B` in
/// a merged weight is folded once and does not count).
fn per_call_matmuls(g: &Graph) -> usize {
    let mut weight_only = vec![false; g.len()];
    let mut n = 0;
    for (id, node) in g.nodes() {
        weight_only[id.index()] = match node.op {
            Op::Weight { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Iota { .. } => false,
            _ => node.inputs.iter().all(|i| weight_only[i.index()]),
        };
        if !weight_only[id.index()] && matches!(node.op, Op::MatMul | Op::FusedMatMul { .. }) {
            n += 1;
        }
    }
    n
}

fn check(
    case: &str,
    build: fn(&C) -> NodeId,
    goal: &[&str],
    gone: &[&str],
    matmuls: Option<usize>,
    overflow_ok: bool,
    whole_block: bool,
) {
    let c = C::new();
    let y = build(&c);
    let mut b = c.b.into_inner();
    b.output("y", y);
    let g = b.finish();
    let (opt, report) = optimize(&g, &Options::default()).expect("optimizer");
    let text = transfuse::ir::to_text(&opt);
    let why = format!(
        "{case}: optimized graph\n{text}\nstop: {} after {} iterations, rules applied: {:?}",
        report.egraph.stop_reason, report.egraph.iterations, report.rules_applied
    );
    let fused: Vec<&Op> = opt
        .nodes()
        .map(|(_, n)| &n.op)
        .filter(|op| op.is_fused())
        .collect();
    assert_eq!(
        fused.len(),
        goal.len(),
        "fused ops {goal:?} expected; {why}"
    );
    let mut want: BTreeMap<&str, usize> = BTreeMap::new();
    for e in goal {
        *want.entry(e).or_default() += 1;
    }
    for (e, n) in want {
        let found = fused.iter().filter(|op| matches(e, op)).count();
        assert_eq!(found, n, "`{e}` expected {n} times; {why}");
    }
    let counts = opt.op_counts();
    for p in gone {
        assert!(!counts.contains_key(*p), "`{p}` should be gone; {why}");
    }
    if let Some(n) = matmuls {
        assert_eq!(per_call_matmuls(&opt), n, "per-call matmuls; {why}");
    }
    let scale = if whole_block { WHOLE_BLOCK } else { 1.0 };
    same_outputs(case, &g, &opt, false, false, scale);
    same_outputs(case, &g, &opt, true, overflow_ok, scale);
}

/// One case per line: `case!(name, [overflow_ok] |c| graph => [fused ops], gone [primitives]
/// [, matmuls n])`; `matmuls n`: the optimized graph has `n` per-call matmuls
/// ([`per_call_matmuls`]).
macro_rules! case {
    ($name:ident, $($flag:ident)? |$c:ident| $body:expr => [$($f:literal),* $(,)?], gone $gone:expr $(, matmuls $m:expr)?) => {
        #[test]
        fn $name() {
            #[allow(unused_braces)]
            fn build($c: &C) -> NodeId {
                $body
            }
            let overflow_ok = false $(|| stringify!($flag) == "overflow_ok")?;
            let whole_block = false $(|| stringify!($flag) == "whole_block")?;
            let matmuls: Option<usize> = None $(.or(Some($m)))?;
            check(stringify!($name), build, &[$($f),*], &$gone, matmuls, overflow_ok, whole_block);
        }
    };
}

// Primitives each family must remove.
#[rustfmt::skip]
const SM: [&str; 7] = ["exp", "reduce_max", "reduce_sum", "mul", "div", "sub", "recip"];
/// Attention: the softmax, both matmuls, every scale spelling (`mul`, `div`, `sqrt`, `rsqrt`)
/// and the `kᵀ` permute are absorbed.
#[rustfmt::skip]
const ATT: [&str; 10] = ["exp", "reduce_max", "reduce_sum", "softmax", "matmul", "mul", "div", "sqrt", "rsqrt", "permute"];
/// Attention whose graph keeps other work outside the fused op: a mask built in the graph
/// (`(1 − m)·finfo.min` keeps its `mul`), head and layout permutes.
const ATT_CORE: [&str; 5] = ["exp", "reduce_max", "reduce_sum", "softmax", "matmul"];
/// Causal attention: the iota mask is gone too.
#[rustfmt::skip]
const CAUSAL: [&str; 9] = ["exp", "reduce_max", "reduce_sum", "softmax", "matmul", "iota", "le", "where", "div"];
/// Norms: everything elementwise is absorbed, affine included.
#[rustfmt::skip]
const NORM: [&str; 9] = ["reduce_mean", "rsqrt", "sqrt", "recip", "div", "pow", "mul", "sub", "add"];
const GN: [&str; 6] = ["reduce_mean", "rsqrt", "mul", "sub", "add", "reshape"];
/// Batch norm keeps `rsqrt`/`mul`/`sub`/`add` on the [6, 1, 1] statistics (weight-only, folded
/// once when weights are known); nothing else is left, which the exact fused-op goal and the
/// semantic check pin down.
const NONE: [&str; 0] = [];
const MM: [&str; 7] = ["matmul", "add", "mul", "erf", "tanh", "relu", "sigmoid"];

// ---------------------------------------------------------------------------------------------
// Softmax.
case!(softmax_builder, |c| c.softmax(c.x()) => ["softmax"], gone SM);
case!(softmax_no_max, overflow_ok |c| { let e = c.exp(c.x()); c.div(e, c.rsum(e)) } => ["softmax"], gone SM);
case!(softmax_mul_recip, |c| { let x = c.x(); let e = c.exp(c.sub(x, c.rmax(x))); c.mul(e, c.recip(c.rsum(e))) } => ["softmax"], gone SM);
case!(softmax_scaled, |c| c.softmax(c.mulc(c.x(), 0.37)) => ["softmax"], gone SM);

// ---------------------------------------------------------------------------------------------
// Attention: scale spellings.
case!(attention_builder, |c| c.attention(c.q(), c.k(), c.v(), None) => ["attention{}"], gone ATT);
case!(attention_scale_mul, |c| c.pv(c.mulc(c.qk(), S)) => ["attention{}"], gone ATT);
case!(attention_scale_const_first, |c| c.pv(c.mul(c.f(S), c.qk())) => ["attention{}"], gone ATT);
case!(attention_scale_div, |c| c.pv(c.div(c.qk(), c.f((D as f64).sqrt()))) => ["attention{}"], gone ATT);
case!(attention_scale_div_sqrt_d, |c| c.pv(c.div(c.qk(), c.sqrt(c.f(D as f64)))) => ["attention{}"], gone ATT);
case!(attention_scale_mul_rsqrt_d, |c| c.pv(c.mul(c.qk(), c.rsqrt(c.f(D as f64)))) => ["attention{}"], gone ATT);
case!(attention_scale_on_q, |c| c.pv(c.matmul(c.mulc(c.q(), S), c.tr(c.k()))) => ["attention{}"], gone ATT);
case!(attention_scale_on_k, |c| c.pv(c.matmul(c.q(), c.tr(c.mulc(c.k(), S)))) => ["attention{}"], gone ATT);
case!(attention_scale_split_q_k, |c| { let s = S.sqrt(); c.pv(c.matmul(c.mulc(c.q(), s), c.tr(c.mulc(c.k(), s)))) } => ["attention{}"], gone ATT);

// Attention: masks.
case!(attention_mask_hf_finfo_min, |c| c.pv(c.add(c.mulc(c.qk(), S), c.hf_mask())) => ["attention{}"], gone ATT_CORE);
case!(attention_mask_finfo_min_first, |c| c.pv(c.add(c.mask_min(), c.mulc(c.qk(), S))) => ["attention{}"], gone ATT);
case!(attention_mask_neg_inf, |c| c.pv(c.add(c.mulc(c.qk(), S), c.mask_inf())) => ["attention{}"], gone ATT);
case!(attention_mask_builder, |c| c.attention(c.q(), c.k(), c.v(), Some(c.mask_min())) => ["attention{}"], gone ATT);
case!(attention_where_neg_inf, |c| c.pv(c.select(c.keep(), c.mulc(c.qk(), S), c.f(f64::NEG_INFINITY))) => ["attention{}"], gone ATT);
case!(attention_where_finfo_min, |c| c.pv(c.select(c.keep_full(), c.mulc(c.qk(), S), c.f(MIN))) => ["attention{}"], gone ATT);
case!(attention_where_not_fill_first, |c| c.pv(c.select(c.not(c.keep_full()), c.f(-1e30), c.mulc(c.qk(), S))) => ["attention{}"], gone ATT);
case!(attention_causal_iota, |c| { let m = c.select(c.causal_cond(0.into(), SEQ.into()), c.f(0.0), c.f(MIN)); c.attention(c.q(), c.k(), c.v(), Some(m)) } => ["attention{causal}"], gone CAUSAL);
case!(attention_causal_gpt2_padding, |c| { let m = c.select(c.causal_cond(0.into(), SEQ.into()), c.hf_mask(), c.f(MIN)); c.attention(c.q(), c.k(), c.v(), Some(m)) } => ["attention{causal}"], gone CAUSAL);
case!(attention_sliding_window, |c| { let (qpos, kpos) = c.positions(0.into(), SEQ.into()); let causal = c.with(|b| b.compare(CmpOp::Le, kpos, qpos)); let w = c.with(|b| b.scalar_i64(7)); let kw = c.add(kpos, w); let inside = c.with(|b| b.compare(CmpOp::Gt, kw, qpos)); let win = c.select(inside, c.f(0.0), c.f(MIN)); let m = c.select(causal, win, c.f(MIN)); c.attention(c.q(), c.k(), c.v(), Some(m)) } => ["attention{causal window=7}"], gone CAUSAL);
case!(attention_sliding_window_padding, |c| { let (qpos, kpos) = c.positions(0.into(), SEQ.into()); let causal = c.with(|b| b.compare(CmpOp::Le, kpos, qpos)); let w = c.with(|b| b.scalar_i64(5)); let kw = c.add(kpos, w); let inside = c.with(|b| b.compare(CmpOp::Lt, qpos, kw)); let win = c.select(inside, c.hf_mask(), c.f(MIN)); let m = c.select(causal, win, c.f(MIN)); c.attention(c.q(), c.k(), c.v(), Some(m)) } => ["attention{causal window=5}"], gone CAUSAL);
case!(attention_causal_kv_cache, |c| { let (s, p) = (Dim::sym("seq"), Dim::sym("past")); let t = |n: &str, l: Dim| c.input(n, vec![batch(), 3.into(), l, D.into()], DType::F32); let k = c.concat(&[t("past_k", p.clone()), t("k_new", s.clone())], 2); let v = c.concat(&[t("past_v", p.clone()), t("v_new", s.clone())], 2); let m = c.select(c.causal_cond(p.clone(), s.clone()), c.f(0.0), c.f(MIN)); c.attention(t("q_new", s.clone()), k, v, Some(m)) } => ["attention{causal}"], gone CAUSAL);

// Attention: grouped-query (k/v repeated per query head by `repeat_kv`, absorbed: the fused
// op reads k/v at head / group).
/// GQA: the repeat (`expand`) is gone too.
#[rustfmt::skip]
const GQA: [&str; 6] = ["exp", "reduce_max", "reduce_sum", "softmax", "matmul", "expand"];
#[rustfmt::skip]
const GQA_CAUSAL: [&str; 9] = ["exp", "reduce_max", "reduce_sum", "softmax", "matmul", "expand", "iota", "le", "where"];
case!(attention_mqa_repeat_kv, |c| { let [k, v] = ["k1", "v1"].map(|n| c.repeat_kv(c.heads_in(n, 1), 3)); c.attention(c.q(), k, v, None) } => ["attention{}"], gone GQA);
case!(attention_gqa_repeat_kv_masked, |c| { let [k, v] = ["k2", "v2"].map(|n| c.repeat_kv(c.heads_in(n, 2), 3)); c.pv_with(c.heads_in("q6", 6), k, v, Some(c.mask_min())) } => ["attention{}"], gone GQA);
case!(attention_gqa_causal, |c| { let [k, v] = ["k2", "v2"].map(|n| c.repeat_kv(c.heads_in(n, 2), 3)); let m = c.select(c.causal_cond(0.into(), SEQ.into()), c.f(0.0), c.f(MIN)); c.attention(c.heads_in("q6", 6), k, v, Some(m)) } => ["attention{causal}"], gone GQA_CAUSAL);
case!(attention_gqa_sliding_window, |c| { let [k, v] = ["k2", "v2"].map(|n| c.repeat_kv(c.heads_in(n, 2), 3)); let m = c.window_mask(7, c.f(0.0)); c.attention(c.heads_in("q6", 6), k, v, Some(m)) } => ["attention{causal window=7}"], gone GQA_CAUSAL);
case!(attention_gqa_sliding_window_padding, |c| { let [k, v] = ["k2", "v2"].map(|n| c.repeat_kv(c.heads_in(n, 2), 3)); let m = c.window_mask(5, c.hf_mask()); c.pv_with(c.heads_in("q6", 6), k, v, Some(m)) } => ["attention{causal window=5}"], gone GQA_CAUSAL);
case!(attention_gqa_kv_cache, |c| { let (s, p) = (Dim::sym("seq"), Dim::sym("past")); let t = |n: &str, h: usize, l: Dim| c.input(n, vec![batch(), h.into(), l, D.into()], DType::F32); let k = c.repeat_kv(c.concat(&[t("past_k", 2, p.clone()), t("k_new", 2, s.clone())], 2), 2); let v = c.repeat_kv(c.concat(&[t("past_v", 2, p.clone()), t("v_new", 2, s.clone())], 2), 2); let m = c.select(c.causal_cond(p.clone(), s.clone()), c.f(0.0), c.f(MIN)); c.attention(t("q_new", 4, s.clone()), k, v, Some(m)) } => ["attention{causal}"], gone GQA_CAUSAL);
case!(attention_repeat_kv_groups_differ_kept, |c| { let k = c.repeat_kv(c.heads_in("k2", 2), 3); let v = c.repeat_kv(c.heads_in("v3", 3), 2); c.attention(c.heads_in("q6", 6), k, v, None) } => ["attention{}"], gone ATT_CORE);

// ---------------------------------------------------------------------------------------------
// Rotary embedding (transformers' rotate-half form) on q/k [batch, 3, SEQ, D], cos/sin [SEQ, D].
/// The rotation, its products and sum are gone.
const ROPE: [&str; 5] = ["neg", "concat", "slice", "mul", "add"];
case!(rope_hf, |c| c.rope(c.q(), c.cos_in(), c.sin_in()) => ["rope"], gone ROPE);
case!(rope_commuted, |c| { let q = c.q(); c.add(c.mul(c.sin_in(), c.rotate_half(q)), c.mul(c.cos_in(), q)) } => ["rope"], gone ROPE);
case!(rope_tables_in_graph, |c| { let (cos, sin) = c.rope_tables(); c.rope(c.q(), cos, sin) } => ["rope"], gone ["neg", "slice", "add"]);
case!(rope_q_k_then_attention, |c| { let (cos, sin) = (c.cos_in(), c.sin_in()); c.attention(c.rope(c.q(), cos, sin), c.rope(c.k(), cos, sin), c.v(), None) } => ["rope", "rope", "attention{}"], gone ROPE);
case!(rope_gqa_causal_llama, |c| { let (cos, sin) = c.rope_tables(); let [k, v] = ["k2", "v2"].map(|n| c.heads_in(n, 2)); let k = c.repeat_kv(c.rope(k, cos, sin), 3); let v = c.repeat_kv(v, 3); let m = c.select(c.causal_cond(0.into(), SEQ.into()), c.f(0.0), c.f(MIN)); c.attention(c.rope(c.heads_in("q6", 6), cos, sin), k, v, Some(m)) } => ["rope", "rope", "attention{causal}"], gone ["expand", "softmax", "matmul", "neg", "slice", "le", "where"]);
case!(rope_other_tensor_rotated_kept, |c| c.add(c.mul(c.q(), c.cos_in()), c.mul(c.rotate_half(c.k()), c.sin_in())) => [], gone ["exp"]);

// A whole LLaMA decoder block on h [batch, SEQ, 72] (6 query heads of 12, 2 key/value heads):
// RMSNorm, q/k/v projections, rope on q and k, repeat_kv, causal attention, o_proj + residual,
// RMSNorm, SwiGLU MLP, down + residual — spelled as the LLaMA loader spells it. q/k/v merge
// into one projection; o_proj and down_proj stay plain matmuls with their residual add (the
// residual rule starts from a fused matmul, and bias-free projections have none).
case!(llama_block, whole_block |c| {
    let lin = |x, w: &str, o: usize, i: usize| c.linear(x, c.w(w, &[o, i]), None, WeightLayout::OutIn);
    let rms = |x: NodeId, w: &str| { let ms = c.rmean(c.mul(x, x)); c.mul(c.w(w, &[72]), c.mul(x, c.rsqrt(c.addc(ms, EPS)))) };
    let heads = |x, n: usize| c.permute(c.reshape(x, dims(&[SEQ, n, 12])), &[0, 2, 1, 3]);
    let (cos, sin) = (c.input("cos12", vec![SEQ.into(), 12.into()], DType::F32), c.input("sin12", vec![SEQ.into(), 12.into()], DType::F32));
    let h = c.h();
    let x = rms(h, "ln1");
    let q = c.rope(heads(lin(x, "q_proj", 72, 72), 6), cos, sin);
    let k = c.repeat_kv(c.rope(heads(lin(x, "k_proj", 24, 72), 2), cos, sin), 3);
    let v = c.repeat_kv(heads(lin(x, "v_proj", 24, 72), 2), 3);
    let s = c.mulc(c.matmul(q, c.tr(k)), 1.0 / 12f64.sqrt());
    let m = c.select(c.causal_cond(0.into(), SEQ.into()), c.f(0.0), c.f(MIN));
    let a = c.matmul(c.softmax(c.add(s, m)), v);
    let a = c.reshape(c.permute(a, &[0, 2, 1, 3]), dims(&[SEQ, 72]));
    let h = c.add(h, lin(a, "o_proj", 72, 72));
    let x = rms(h, "ln2");
    let mlp = c.mul(c.silu(lin(x, "gate_proj", 40, 72)), lin(x, "up_proj", 40, 72));
    c.add(h, lin(mlp, "down_proj", 72, 40))
} => ["rms_norm", "rms_norm", "rope", "rope", "attention{causal}", "gated_matmul{act=silu}", "fused_matmul{act=identity}"], gone ["expand", "neg", "sigmoid", "rsqrt", "softmax", "iota"], matmuls 3);

// Attention: layouts.
case!(attention_multi_head, |c| { let [q, k, v] = ["hq", "hk", "hv"].map(|n| c.split_heads(c.hin(n))); c.merge_heads(c.attention(q, k, v, Some(c.hf_mask()))) } => ["attention{}"], gone ATT_CORE);
case!(attention_k_pretransposed_hf, |c| { let kt = c.permute(c.input("k_bshd", dims(&[SEQ, 3, D]), DType::F32), &[0, 2, 3, 1]); c.pv(c.div(c.matmul(c.q(), kt), c.f((D as f64).sqrt()))) } => ["attention{}"], gone ATT_CORE);

// ---------------------------------------------------------------------------------------------
// Layer norm (last axis of x, γ/β [129]).
case!(layer_norm_builder, |c| c.layer_norm(c.x(), c.gamma(), c.beta()) => ["layer_norm"], gone NORM);
case!(layer_norm_div_sqrt, |c| { let (xc, var) = c.centered(c.x()); c.affine(c.div(xc, c.sqrt(c.addc(var, EPS)))) } => ["layer_norm"], gone NORM);
case!(layer_norm_recip_sqrt, |c| { let (xc, var) = c.centered(c.x()); c.affine(c.mul(xc, c.recip(c.sqrt(c.addc(var, EPS))))) } => ["layer_norm"], gone NORM);
case!(layer_norm_var_expanded, |c| { let x = c.x(); let mu = c.rmean(x); let var = c.sub(c.rmean(c.mul(x, x)), c.mul(mu, mu)); c.affine(c.mul(c.sub(x, mu), c.rsqrt(c.addc(var, EPS)))) } => ["layer_norm"], gone NORM);
case!(layer_norm_pow, |c| { let x = c.x(); let xc = c.sub(x, c.rmean(x)); let var = c.rmean(c.pow(xc, 2.0)); c.affine(c.div(xc, c.sqrt(c.addc(var, EPS)))) } => ["layer_norm"], gone NORM);
case!(layer_norm_eps_first, |c| { let (xc, var) = c.centered(c.x()); c.affine(c.mul(xc, c.rsqrt(c.add(c.f(EPS), var)))) } => ["layer_norm"], gone NORM);
case!(layer_norm_affine_first, |c| { let (xc, var) = c.centered(c.x()); let y = c.mul(c.rsqrt(c.addc(var, EPS)), xc); c.add(c.beta(), c.mul(c.gamma(), y)) } => ["layer_norm"], gone NORM);
case!(layer_norm_no_affine, |c| c.normalize(c.x(), &[3]) => ["layer_norm"], gone NORM);

// RMS norm.
case!(rms_norm_builder, |c| c.rms_norm(c.x(), c.gamma()) => ["rms_norm"], gone NORM);
case!(rms_norm_no_gamma, |c| { let x = c.x(); c.mul(x, c.rsqrt(c.addc(c.rmean(c.mul(x, x)), EPS))) } => ["rms_norm"], gone NORM);
case!(rms_norm_pow_div_sqrt, |c| { let x = c.x(); let ms = c.rmean(c.pow(x, 2.0)); c.mul(c.gamma(), c.div(x, c.sqrt(c.addc(ms, EPS)))) } => ["rms_norm"], gone NORM);

// LLaMA's RMSNorm: `x·rsqrt(mean(x²) + eps)·weight`, and transformers' `weight·(x·rsqrt(..))`.
case!(rms_norm_llama, |c| { let x = c.x(); c.mul(c.mul(x, c.rsqrt(c.addc(c.rmean(c.mul(x, x)), EPS))), c.gamma()) } => ["rms_norm"], gone NORM);
case!(rms_norm_hf_weight_first, |c| { let x = c.x(); let var = c.rmean(c.pow(x, 2.0)); c.mul(c.gamma(), c.mul(x, c.rsqrt(c.addc(var, EPS)))) } => ["rms_norm"], gone NORM);

// Group / instance / batch norm on img [N, 6, 10, 12] with per-channel [6, 1, 1] affine.
case!(group_norm_builder, |c| c.group_norm(c.img(), c.cgamma(), c.cbeta(), 3) => ["group_norm"], gone GN);
case!(instance_norm_as_group_norm, |c| c.group_norm(c.img(), c.cgamma(), c.cbeta(), 6) => ["instance_norm"], gone GN);
case!(instance_norm_spatial_mean, |c| c.instance_norm(c.img(), c.cgamma(), c.cbeta()) => ["instance_norm"], gone GN);
case!(instance_norm_no_affine, |c| c.normalize(c.img(), &[2, 3]) => ["instance_norm"], gone GN);
case!(batch_norm_inference, |c| c.bn(|xc| c.mul(xc, c.rsqrt(c.addc(c.running_var(), EPS)))) => ["batch_norm"], gone NONE);
case!(batch_norm_div_sqrt, |c| c.bn(|xc| c.div(xc, c.sqrt(c.addc(c.running_var(), EPS)))) => ["batch_norm"], gone NONE);

// ---------------------------------------------------------------------------------------------
// Matmul epilogues on h [batch, 50, 72].
case!(matmul_bias, |c| c.mmb() => ["fused_matmul{act=identity bias}"], gone MM);
case!(matmul_bias_first, |c| c.add(c.w("bias", &[96]), c.mm()) => ["fused_matmul{act=identity bias}"], gone MM);
case!(matmul_linear_out_in, |c| c.linear(c.h(), c.w("w_oi", &[96, 72]), Some(c.w("bias", &[96])), WeightLayout::OutIn) => ["fused_matmul{act=identity bias}"], gone MM);
case!(matmul_gelu_erf, |c| c.gelu_erf(c.mmb()) => ["fused_matmul{act=gelu_erf bias}"], gone MM);
case!(matmul_gelu_tanh, |c| c.gelu_tanh(c.mmb()) => ["fused_matmul{act=gelu_tanh bias}"], gone MM);
case!(matmul_relu, |c| c.relu(c.mmb()) => ["fused_matmul{act=relu bias}"], gone MM);
case!(matmul_silu, |c| c.silu(c.mmb()) => ["fused_matmul{act=silu bias}"], gone MM);
case!(matmul_silu_sigmoid_first, |c| { let y = c.mmb(); c.mul(c.sigmoid(y), y) } => ["fused_matmul{act=silu bias}"], gone MM);
case!(matmul_relu_no_bias, |c| c.relu(c.mm()) => ["fused_matmul{act=relu}"], gone MM);
case!(matmul_residual, |c| c.add(c.mmb_sq(), c.h()) => ["fused_matmul{act=identity bias residual}"], gone MM);
case!(matmul_residual_first, |c| c.add(c.h(), c.mmb_sq()) => ["fused_matmul{act=identity bias residual}"], gone MM);
case!(matmul_gelu_residual, |c| c.add(c.h(), c.gelu_erf(c.mmb_sq())) => ["fused_matmul{act=gelu_erf bias residual}"], gone MM);

// Gated MLP (SwiGLU): `silu(h @ Wg) · (h @ Wu)` → one gated matmul reading h once.
const GLU: [&str; 4] = ["matmul", "mul", "sigmoid", "fused_matmul"];
case!(swiglu_llama, |c| { let g = c.matmul(c.h(), c.w("gate", &[72, 40])); let u = c.matmul(c.h(), c.w("up", &[72, 40])); c.mul(c.mul(g, c.sigmoid(g)), u) } => ["gated_matmul{act=silu}"], gone GLU);
case!(swiglu_up_first_sigmoid_first, |c| { let g = c.matmul(c.h(), c.w("gate", &[72, 40])); let u = c.matmul(c.h(), c.w("up", &[72, 40])); c.mul(u, c.mul(c.sigmoid(g), g)) } => ["gated_matmul{act=silu}"], gone GLU);
case!(swiglu_linear_out_in_then_down, |c| { let lin = |x, w: &str, s: &[usize]| c.linear(x, c.w(w, s), None, WeightLayout::OutIn); let act = c.mul(c.silu(lin(c.h(), "gate_oi", &[40, 72])), lin(c.h(), "up_oi", &[40, 72])); lin(act, "down_oi", &[72, 40]) } => ["gated_matmul{act=silu}"], gone ["mul", "sigmoid", "fused_matmul"], matmuls 1);
case!(geglu_tanh, |c| { let g = c.matmul(c.h(), c.w("gate", &[72, 40])); let u = c.matmul(c.h(), c.w("up", &[72, 40])); c.mul(c.gelu_tanh(g), u) } => ["gated_matmul{act=gelu_tanh}"], gone ["matmul", "tanh", "fused_matmul"]);
case!(swiglu_other_input_kept, |c| { let g = c.matmul(c.h(), c.w("gate", &[72, 40])); let u = c.matmul(c.hin("h2"), c.w("up", &[72, 40])); c.mul(c.silu(g), u) } => ["fused_matmul{act=silu}"], gone ["sigmoid"]);

// ---------------------------------------------------------------------------------------------
// Projection merge on h [batch, 50, 72]: q/k/v-style projections of one input become one
// fused_matmul on concatenated weights, sliced per projection. The projections are outputs
// side by side (`concat`, which no rule touches), so each is compared with its own scale.
/// Every projection's own matmul and bias add are gone.
const PROJ: [&str; 2] = ["matmul", "add"];
case!(merge_qkv_linear_bias, |c| { let [q, k, v] = ["q", "k", "v"].map(|n| c.linear(c.h(), c.w(&format!("{n}.w"), &[40, 72]), Some(c.w(&format!("{n}.b"), &[40])), WeightLayout::OutIn)); c.concat(&[q, k, v], 2) } => ["fused_matmul{act=identity bias}"], gone PROJ);
case!(merge_qkv_widths_differ, |c| { let [q, k, v] = [("q", 24), ("k", 24), ("v", 40)].map(|(n, w)| c.add(c.matmul(c.h(), c.w(&format!("{n}.w"), &[72, w])), c.w(&format!("{n}.b"), &[w]))); c.concat(&[q, k, v], 2) } => ["fused_matmul{act=identity bias}"], gone PROJ);
case!(merge_two_no_bias, |c| { let g = c.matmul(c.h(), c.w("gate", &[72, 40])); let u = c.matmul(c.h(), c.w("up", &[72, 40])); c.concat(&[g, u], 2) } => ["fused_matmul{act=identity}"], gone PROJ);
case!(merge_skips_other_bias_shape, |c| { let q = c.add(c.matmul(c.h(), c.w("q.w", &[72, 40])), c.w("q.b", &[40])); let k = c.add(c.matmul(c.h(), c.w("k.w", &[72, 40])), c.w("k.b", &[40])); let v = c.add(c.matmul(c.h(), c.w("v.w", &[72, 40])), c.w("v.b", &[1, 40])); c.concat(&[q, k, v], 2) } => ["fused_matmul{act=identity bias}", "fused_matmul{act=identity bias}"], gone PROJ);
case!(no_merge_across_inputs, |c| { let [q, k, v] = ["hq", "hk", "hv"].map(|n| c.add(c.matmul(c.hin(n), c.w(&format!("{n}.w"), &[72, 40])), c.w(&format!("{n}.b"), &[40]))); c.concat(&[q, k, v], 2) } => ["fused_matmul{act=identity bias}", "fused_matmul{act=identity bias}", "fused_matmul{act=identity bias}"], gone PROJ);

// ---------------------------------------------------------------------------------------------
// LoRA on h [batch, 50, 72]: W [72, 96], A [72, 4], B [4, 96]; the adapter is merged into the
// weight (`W + s·AB`, weight-only), so one matmul of h is left.
case!(lora_scaled, |c| c.add(c.mm(), c.mulc(c.lora(), 0.5)) => [], gone NONE, matmuls 1);
case!(lora_adapter_first_scale_left, |c| c.add(c.mul(c.f(0.5), c.lora()), c.mm()) => [], gone NONE, matmuls 1);
case!(lora_unscaled, |c| c.add(c.mm(), c.lora()) => [], gone NONE, matmuls 1);
case!(lora_scale_on_input, |c| c.add(c.mm(), c.matmul(c.matmul(c.mulc(c.h(), 0.5), c.w("lora_a", &[72, 4])), c.w("lora_b", &[4, 96]))) => [], gone NONE, matmuls 1);
case!(lora_bias, |c| c.add(c.mmb(), c.mulc(c.lora(), 0.5)) => ["fused_matmul{act=identity bias}"], gone NONE, matmuls 1);
case!(lora_bias_last, |c| c.add(c.add(c.mm(), c.mulc(c.lora(), 0.5)), c.w("bias", &[96])) => ["fused_matmul{act=identity bias}"], gone NONE, matmuls 1);
case!(lora_peft_linear, |c| { let lin = |x, w: &str, s: &[usize], b| c.linear(x, c.w(w, s), b, WeightLayout::OutIn); let base = lin(c.h(), "w_oi", &[96, 72], Some(c.w("bias", &[96]))); let ad = lin(lin(c.h(), "lora_a_oi", &[4, 72], None), "lora_b_oi", &[96, 4], None); c.add(base, c.mulc(ad, 2.0)) } => ["fused_matmul{act=identity bias}"], gone NONE, matmuls 1);
case!(lora_gelu, |c| c.gelu_erf(c.add(c.mmb(), c.mulc(c.lora(), 0.5))) => ["fused_matmul{act=gelu_erf bias}"], gone NONE, matmuls 1);
case!(lora_on_q_v_then_merge_qkv, |c| { let [q, k, v] = [("q", true), ("k", false), ("v", true)].map(|(n, lora)| { let y = c.add(c.matmul(c.h(), c.w(&format!("{n}.w"), &[72, 40])), c.w(&format!("{n}.b"), &[40])); if !lora { return y; } let ad = c.matmul(c.matmul(c.h(), c.w(&format!("{n}.lora_a"), &[72, 4])), c.w(&format!("{n}.lora_b"), &[4, 40])); c.add(y, c.mulc(ad, 2.0)) }); c.concat(&[q, k, v], 2) } => ["fused_matmul{act=identity bias}"], gone NONE, matmuls 1);
case!(lora_other_input_kept, |c| c.add(c.mm(), c.mulc(c.matmul(c.matmul(c.hin("h2"), c.w("lora_a", &[72, 4])), c.w("lora_b", &[4, 96])), 0.5)) => [], gone NONE, matmuls 3);

/// `merge_lora: false` keeps the adapter as its own matmuls (multi-adapter serving); the
/// default merges it. Both are the same function.
#[test]
fn lora_kept_when_merge_lora_is_off() {
    let c = C::new();
    let y = c.add(c.mmb(), c.mulc(c.lora(), 0.5));
    let mut b = c.b.into_inner();
    b.output("y", y);
    let g = b.finish();
    let kept = Options {
        merge_lora: false,
        ..Options::default()
    };
    for (opts, want) in [(kept, 3), (Options::default(), 1)] {
        let (opt, report) = optimize(&g, &opts).expect("optimizer");
        let what = format!("merge_lora={}", opts.merge_lora);
        assert_eq!(
            per_call_matmuls(&opt),
            want,
            "{what}: {}\n{report:?}",
            transfuse::ir::to_text(&opt)
        );
        assert_eq!(
            report.rules_applied.contains_key("lora-merge"),
            opts.merge_lora,
            "{what}: {report:?}"
        );
        same_outputs(&what, &g, &opt, false, false, 1.0);
        same_outputs(&what, &g, &opt, true, false, 1.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded saturation.

/// Blanket commutativity and associativity of `add` and `mul` (Tensat's explosion) plus every
/// family, on a chain of 16 adds then 16 muls (2¹⁶ ways to group each): a 5 000-node limit and a
/// 3 s time limit must stop it, and the graph it returns (regrouped: the weight-only sums and
/// products are cheaper on [64] than on [batch, 64]) must still be the same function.
#[test]
fn explosive_rules_stop_at_a_limit_and_stay_correct() {
    let c = C::new();
    let x = c.input("x", dims(&[64]), DType::F32);
    let mut y = x;
    for i in 0..16 {
        y = c.add(y, c.w(&format!("a{i}"), &[64]));
    }
    for i in 0..16 {
        y = c.mul(y, c.w(&format!("scale{i}"), &[64]));
    }
    y = c.add(y, x);
    let mut b = c.b.into_inner();
    b.output("y", y);
    let g = b.finish();

    let mut rules = vec![
        rules::rw("comm-add", "(add ?a ?b)", "(add ?b ?a)"),
        rules::rw("comm-mul", "(mul ?a ?b)", "(mul ?b ?a)"),
        rules::rw("assoc-add", "(add (add ?a ?b) ?c)", "(add ?a (add ?b ?c))"),
        rules::rw(
            "assoc-add-rev",
            "(add ?a (add ?b ?c))",
            "(add (add ?a ?b) ?c)",
        ),
        rules::rw("assoc-mul", "(mul (mul ?a ?b) ?c)", "(mul ?a (mul ?b ?c))"),
        rules::rw(
            "assoc-mul-rev",
            "(mul ?a (mul ?b ?c))",
            "(mul (mul ?a ?b) ?c)",
        ),
    ];
    rules.extend(rules::all());
    let opts = Options {
        node_limit: 5_000,
        iter_limit: 1_000,
        time_limit: Duration::from_secs(3),
        ..Options::default()
    };
    let (opt, report) = optimize_with(&g, &opts, &rules).expect("optimizer");
    eprintln!(
        "bounded: {:?}, cost {:e} → {:e}",
        report.egraph, report.cost_before, report.cost_after
    );
    let stop = report.egraph.stop_reason.as_str();
    assert!(
        stop == "node_limit" || stop == "time_limit",
        "stop reason {stop}, {report:?}"
    );
    same_outputs("bounded", &g, &opt, false, false, 1.0);
    same_outputs("bounded", &g, &opt, true, false, 1.0);
}
