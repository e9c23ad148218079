//! Random well-typed graphs from fuzz input, for the `optimize` and `plan_json` targets.
//!
//! A graph has 1–3 f32 inputs `x{i}` of shape `[b, r, c]` (`b` symbolic, bound to 1 or 2;
//! `r` in 1..=5, `c` in 1..=8) and up to 14 ops drawn from what the optimizer's rules look for:
//! unary functions, broadcasting binaries, scalar scales and shifts, softmax (plain, scaled,
//! with a `finfo.min` mask from a comparison), `q·kᵀ → softmax → ·v` chains and the builder's
//! attention, layer/RMS norm, matmuls with weights and bias, GELU/SiLU, row reductions,
//! concat + slice and expand. Domains are kept safe (`log(1 + x²)`, `a / (1 + b²)`); input and
//! weight values lie in [-2, 2] (no NaN or inf is ever fed in).

use std::collections::BTreeMap;
use std::sync::Arc;

use arbitrary::{Result, Unstructured};
use transfuse::ir::{
    BResult, Bindings, Builder, CmpOp, DType, Dim, Graph, NodeId, ReduceOp, Shape, Tensor, UnaryOp,
    Weights,
};
use transfuse::runtime::TensorMap;

/// A generated graph with what runs it.
pub struct Case {
    pub graph: Graph,
    pub weights: Weights,
    pub inputs: TensorMap,
    pub bindings: Bindings,
}

/// The shape classes a node can have: `[b, r, c]`, `[b, r, 1]`, `[b, r, r]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Full,
    Row,
    Square,
}

struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    b: Builder,
    nodes: Vec<(NodeId, Class)>,
    weights: Weights,
    r: usize,
    c: usize,
}

fn value(u: &mut Unstructured, range: f32) -> Result<f32> {
    let x: u16 = u.arbitrary()?;
    Ok((x as f32 / u16::MAX as f32 * 2.0 - 1.0) * range)
}

impl Gen<'_, '_> {
    fn pick(&mut self, class: Option<Class>) -> Result<Option<(NodeId, Class)>> {
        let cands: Vec<(NodeId, Class)> = self
            .nodes
            .iter()
            .copied()
            .filter(|(_, k)| class.is_none_or(|c| c == *k))
            .collect();
        if cands.is_empty() {
            return Ok(None);
        }
        Ok(Some(*self.u.choose(&cands)?))
    }

    fn weight(&mut self, shape: Vec<usize>) -> Result<NodeId> {
        let name = format!("w{}", self.weights.len());
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(n);
        for _ in 0..n {
            data.push(value(self.u, 1.0)?);
        }
        self.weights
            .insert(name.clone(), Arc::new(Tensor::f32(shape.clone(), data)));
        let shape: Shape = shape.into_iter().map(Dim::from).collect();
        Ok(self.b.weight(&name, shape).expect("weight"))
    }

    fn push(&mut self, r: BResult, class: Class) {
        let id = r.expect("the generator builds well-typed graphs only");
        self.nodes.push((id, class));
    }

    /// `x + 1`, `x²+1`: a positive operand for log, rsqrt, division.
    fn positive(&mut self, x: NodeId) -> NodeId {
        let sq = self.b.mul(x, x).expect("square");
        self.b.add_scalar(sq, 1.0).expect("shift")
    }

    fn step(&mut self) -> Result<()> {
        let Some((x, kx)) = self.pick(None)? else {
            return Ok(());
        };
        match self.u.int_in_range(0u8..=17)? {
            0 => {
                let op = *self.u.choose(&[
                    UnaryOp::Neg,
                    UnaryOp::Exp,
                    UnaryOp::Tanh,
                    UnaryOp::Erf,
                    UnaryOp::Relu,
                    UnaryOp::Sigmoid,
                    UnaryOp::Abs,
                    UnaryOp::Sin,
                    UnaryOp::Cos,
                ])?;
                let y = self.b.unary(op, x);
                self.push(y, kx);
            }
            1 => {
                let op = *self.u.choose(&[
                    UnaryOp::Log,
                    UnaryOp::Sqrt,
                    UnaryOp::Rsqrt,
                    UnaryOp::Recip,
                ])?;
                let p = self.positive(x);
                let y = self.b.unary(op, p);
                self.push(y, kx);
            }
            2 => {
                // A binary with a node of the same class, or a row vector broadcast.
                let other = if self.u.arbitrary()? { Some(kx) } else { None };
                let Some((y, ky)) = self.pick(other)? else {
                    return Ok(());
                };
                let ok = kx == ky || ky == Class::Row && kx != Class::Row;
                if !ok {
                    return Ok(());
                }
                let r = match self.u.int_in_range(0u8..=3)? {
                    0 => self.b.add(x, y),
                    1 => self.b.sub(x, y),
                    2 => self.b.mul(x, y),
                    _ => {
                        let p = self.positive(y);
                        self.b.div(x, p)
                    }
                };
                self.push(r, kx);
            }
            3 => {
                let c = *self.u.choose(&[-2.0, -1.0, 0.0, 0.125, 0.5, 1.0, 3.0])?;
                let r = if self.u.arbitrary()? {
                    self.b.mul_scalar(x, c)
                } else {
                    self.b.add_scalar(x, c)
                };
                self.push(r, kx);
            }
            4 => {
                let s = if self.u.arbitrary()? {
                    self.b.mul_scalar(x, 0.35).expect("scale")
                } else {
                    x
                };
                let y = self.b.softmax(s);
                self.push(y, kx);
            }
            5 if kx == Class::Full => {
                let g = self.weight(vec![self.c])?;
                let y = if self.u.arbitrary()? {
                    let be = self.weight(vec![self.c])?;
                    self.b.layer_norm(x, g, be, 1e-5)
                } else {
                    self.b.rms_norm(x, g, 1e-6)
                };
                self.push(y, kx);
            }
            6 if kx == Class::Full => {
                let w = self.weight(vec![self.c, self.c])?;
                let mut y = self.b.matmul(x, w).expect("matmul");
                if self.u.arbitrary()? {
                    let bias = self.weight(vec![self.c])?;
                    y = self.b.add(y, bias).expect("bias");
                }
                let y = match self.u.int_in_range(0u8..=3)? {
                    0 => self.b.gelu_erf(y),
                    1 => self.b.gelu_tanh(y),
                    2 => self.b.unary(UnaryOp::Relu, y),
                    _ => Ok(y),
                };
                self.push(y, kx);
            }
            7 if kx == Class::Full => {
                // Scores q·kᵀ, optionally scaled and masked, softmax, then ·v.
                let Some((k, _)) = self.pick(Some(Class::Full))? else {
                    return Ok(());
                };
                let kt = self.b.transpose_last(k).expect("kᵀ");
                let mut s = self.b.matmul(x, kt).expect("q·kᵀ");
                if self.u.arbitrary()? {
                    s = self
                        .b
                        .mul_scalar(s, 1.0 / (self.c as f64).sqrt())
                        .expect("scale");
                }
                if self.u.arbitrary()? {
                    s = self.mask(s)?;
                }
                let p = self.b.softmax(s).expect("softmax");
                self.nodes.push((p, Class::Square));
                if self.u.arbitrary()? {
                    let Some((v, _)) = self.pick(Some(Class::Full))? else {
                        return Ok(());
                    };
                    let y = self.b.matmul(p, v);
                    self.push(y, Class::Full);
                }
            }
            8 if kx == Class::Full => {
                // The builder's attention on [b, 1, r, c].
                let (Some((k, _)), Some((v, _))) =
                    (self.pick(Some(Class::Full))?, self.pick(Some(Class::Full))?)
                else {
                    return Ok(());
                };
                let four = |g: &mut Self, t: NodeId| {
                    g.b.reshape(t, vec![Dim::sym("b"), 1.into(), g.r.into(), g.c.into()])
                        .expect("reshape to heads")
                };
                let (q4, k4, v4) = (four(self, x), four(self, k), four(self, v));
                let mask = if self.u.arbitrary()? {
                    let m = self.key_mask()?;
                    Some(m)
                } else {
                    None
                };
                let a = self.b.attention(q4, k4, v4, mask).expect("attention");
                let y = self
                    .b
                    .reshape(a, vec![Dim::sym("b"), self.r.into(), self.c.into()]);
                self.push(y, Class::Full);
            }
            9 => {
                let op = *self
                    .u
                    .choose(&[ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean])?;
                let y = self.b.reduce(op, x, &[2], true);
                self.push(y, Class::Row);
            }
            10 => {
                let y = match self.u.int_in_range(0u8..=2)? {
                    0 => self.b.gelu_erf(x),
                    1 => self.b.gelu_tanh(x),
                    _ => self.b.silu(x),
                };
                self.push(y, kx);
            }
            11 => {
                // where(x > y, x, y) with y of the same class.
                let Some((y, _)) = self.pick(Some(kx))? else {
                    return Ok(());
                };
                let cmp = *self.u.choose(&[CmpOp::Lt, CmpOp::Gt, CmpOp::Le])?;
                let m = self.b.compare(cmp, x, y).expect("compare");
                let r = self.b.select(m, x, y);
                self.push(r, kx);
            }
            12 if kx == Class::Full => {
                let Some((y, _)) = self.pick(Some(Class::Full))? else {
                    return Ok(());
                };
                let cat = self.b.concat(&[x, y], 2).expect("concat");
                let (s, e) = if self.u.arbitrary()? {
                    (0, self.c)
                } else {
                    (self.c, 2 * self.c)
                };
                let r = self.b.slice(cat, 2, s.into(), e.into());
                self.push(r, Class::Full);
            }
            13 if kx == Class::Row => {
                let r = self
                    .b
                    .expand(x, vec![Dim::sym("b"), self.r.into(), self.c.into()]);
                self.push(r, Class::Full);
            }
            14 if kx == Class::Square => {
                let r = self.b.transpose_last(x);
                self.push(r, Class::Square);
            }
            15 if kx == Class::Square => {
                let s = self.mask(x)?;
                let r = self.b.softmax(s);
                self.push(r, Class::Square);
            }
            16 if kx == Class::Full => {
                // Softmax spelled out, max-subtracted.
                let m = self.b.reduce(ReduceOp::Max, x, &[2], true).expect("max");
                let d = self.b.sub(x, m).expect("sub");
                let e = self.b.unary(UnaryOp::Exp, d).expect("exp");
                let s = self.b.reduce(ReduceOp::Sum, e, &[2], true).expect("sum");
                let r = self.b.div(e, s);
                self.push(r, Class::Full);
            }
            _ => {}
        }
        Ok(())
    }

    /// `s + where(key_ok, 0, finfo.min)` for scores `s [b, r, r]`, with `key_ok` a comparison
    /// of the first input's row sums against a threshold (so whole rows may be masked).
    fn mask(&mut self, s: NodeId) -> Result<NodeId> {
        let m = self.key_mask()?;
        let m = self
            .b
            .reshape(m, vec![Dim::sym("b"), 1.into(), self.r.into()])
            .expect("mask rows");
        Ok(self.b.add(s, m).expect("masked"))
    }

    /// HF's extended mask `[b, 1, 1, r]`: 0 where a key is seen, `finfo(f32).min` where not.
    fn key_mask(&mut self) -> Result<NodeId> {
        let x0 = self.nodes[0].0;
        let sums = self
            .b
            .reduce(ReduceOp::Sum, x0, &[2], false)
            .expect("row sums"); // [b, r]
        let t = self
            .b
            .scalar(value(self.u, 3.0)? as f64)
            .expect("threshold");
        let seen = self.b.compare(CmpOp::Gt, sums, t).expect("compare");
        let zero = self.b.scalar(0.0).expect("0");
        let min = self.b.scalar(f32::MIN as f64).expect("min");
        let m = self.b.select(seen, zero, min).expect("select");
        let m = self
            .b
            .reshape(m, vec![Dim::sym("b"), 1.into(), 1.into(), self.r.into()])
            .expect("extended");
        Ok(m)
    }
}

/// A random well-typed graph, its weights, inputs and dims, from `u`.
pub fn case(u: &mut Unstructured) -> Result<Case> {
    let r = u.int_in_range(1usize..=5)?;
    let c = u.int_in_range(1usize..=8)?;
    let batch = u.int_in_range(1usize..=2)?;
    let n_inputs = u.int_in_range(1usize..=3)?;
    let mut g = Gen {
        u,
        b: Builder::new(),
        nodes: vec![],
        weights: Weights::new(),
        r,
        c,
    };
    let mut inputs = TensorMap::new();
    for i in 0..n_inputs {
        let name = format!("x{i}");
        let id =
            g.b.input(&name, vec![Dim::sym("b"), r.into(), c.into()], DType::F32)
                .expect("input");
        g.nodes.push((id, Class::Full));
        let mut data = Vec::with_capacity(batch * r * c);
        for _ in 0..batch * r * c {
            data.push(value(g.u, 2.0)?);
        }
        inputs.insert(name, Tensor::f32(vec![batch, r, c], data));
    }
    let steps = g.u.int_in_range(1u8..=14)?;
    for _ in 0..steps {
        g.step()?;
    }
    let last = g.nodes.last().expect("an input").0;
    g.b.output("out", last);
    if g.u.arbitrary()? {
        if let Some((aux, _)) = g.pick(None)? {
            g.b.output("aux", aux);
        }
    }
    let mut bindings = BTreeMap::new();
    bindings.insert("b".to_string(), batch);
    Ok(Case {
        graph: g.b.finish(),
        weights: g.weights,
        inputs,
        bindings,
    })
}

/// Elements of `got` that differ from finite elements of `want` by more than
/// `tol · (1 + |want|)`: `(output, index, want, got)`.
pub fn mismatches(want: &TensorMap, got: &TensorMap, tol: f32) -> Vec<(String, usize, f32, f32)> {
    let mut bad = vec![];
    for (name, w) in want {
        let g = got
            .get(name)
            .unwrap_or_else(|| panic!("output `{name}` missing after optimizing"));
        assert_eq!(w.shape, g.shape, "output `{name}`: shape");
        let (Some(w), Some(g)) = (w.as_f32(), g.as_f32()) else {
            panic!("output `{name}`: not f32");
        };
        for (i, (&a, &b)) in w.iter().zip(g).enumerate() {
            if a.is_finite() && !((a - b).abs() <= tol * (1.0 + a.abs())) {
                bad.push((name.clone(), i, a, b));
            }
        }
    }
    bad
}
