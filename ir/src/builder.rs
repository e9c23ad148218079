//! The builder API: primitive ops plus composite helpers that expand into primitives.
//!
//! Composites (`softmax`, `layer_norm`, `gelu_*`, `linear`, attention) emit primitives only:
//! fused ops are the optimizer's job, so every fusion in a compiled model is one the optimizer
//! found, whether the graph came from here, from a user's own code or from an importer.

use crate::dim::{Dim, Shape};
use crate::graph::{Graph, NodeId};
use crate::op::{BinaryOp, CmpOp, DType, Op, ReduceOp, Scalar, UnaryOp};
use crate::IrError;

/// Result of a builder call.
pub type BResult = Result<NodeId, IrError>;

/// How a linear layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`, `y = x Wᵀ + b` (PyTorch `nn.Linear`, BERT).
    OutIn,
    /// `[in, out]`, `y = x W + b` (GPT-2's `Conv1D`).
    InOut,
}

/// Builds a [`Graph`] op by op.
#[derive(Default)]
pub struct Builder {
    graph: Graph,
}

impl Builder {
    /// An empty builder.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The graph built so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Finishes building.
    pub fn finish(self) -> Graph {
        self.graph
    }

    /// Shape of a node.
    pub fn shape(&self, x: NodeId) -> &Shape {
        &self.graph.node(x).shape
    }

    /// Rank of a node.
    pub fn rank(&self, x: NodeId) -> usize {
        self.shape(x).len()
    }

    /// Appends any op.
    pub fn op(&mut self, op: Op, inputs: &[NodeId]) -> BResult {
        self.graph.add(op, inputs)
    }

    /// Marks a named output.
    pub fn output(&mut self, name: &str, x: NodeId) {
        self.graph.set_output(name, x)
    }

    /// A named input.
    pub fn input(&mut self, name: &str, shape: Shape, dtype: DType) -> BResult {
        self.op(
            Op::Input {
                name: name.into(),
                shape,
                dtype,
            },
            &[],
        )
    }

    /// A named f32 weight.
    pub fn weight(&mut self, name: &str, shape: Shape) -> BResult {
        self.op(
            Op::Weight {
                name: name.into(),
                shape,
            },
            &[],
        )
    }

    /// An f32 scalar.
    pub fn scalar(&mut self, value: f64) -> BResult {
        self.op(
            Op::Constant {
                value: Scalar(value),
                dtype: DType::F32,
            },
            &[],
        )
    }

    /// An i64 scalar.
    pub fn scalar_i64(&mut self, value: i64) -> BResult {
        self.op(
            Op::Constant {
                value: Scalar(value as f64),
                dtype: DType::I64,
            },
            &[],
        )
    }

    /// `[start, …, start+len-1]`.
    pub fn iota(&mut self, start: Dim, len: Dim) -> BResult {
        self.op(Op::Iota { start, len }, &[])
    }

    /// Elementwise unary op.
    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> BResult {
        self.op(Op::Unary(u), &[x])
    }

    /// Elementwise binary op.
    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> BResult {
        self.op(Op::Binary(b), &[x, y])
    }

    /// `x + y`.
    pub fn add(&mut self, x: NodeId, y: NodeId) -> BResult {
        self.binary(BinaryOp::Add, x, y)
    }

    /// `x - y`.
    pub fn sub(&mut self, x: NodeId, y: NodeId) -> BResult {
        self.binary(BinaryOp::Sub, x, y)
    }

    /// `x * y`.
    pub fn mul(&mut self, x: NodeId, y: NodeId) -> BResult {
        self.binary(BinaryOp::Mul, x, y)
    }

    /// `x / y`.
    pub fn div(&mut self, x: NodeId, y: NodeId) -> BResult {
        self.binary(BinaryOp::Div, x, y)
    }

    /// `x * c` for an f32 constant `c`.
    pub fn mul_scalar(&mut self, x: NodeId, c: f64) -> BResult {
        let c = self.scalar(c)?;
        self.mul(x, c)
    }

    /// `x + c` for an f32 constant `c`.
    pub fn add_scalar(&mut self, x: NodeId, c: f64) -> BResult {
        let c = self.scalar(c)?;
        self.add(x, c)
    }

    /// Comparison giving bool.
    pub fn compare(&mut self, c: CmpOp, x: NodeId, y: NodeId) -> BResult {
        self.op(Op::Compare(c), &[x, y])
    }

    /// `where(cond, a, b)`.
    pub fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> BResult {
        self.op(Op::Where, &[cond, a, b])
    }

    /// Reduction over `axes`.
    pub fn reduce(&mut self, r: ReduceOp, x: NodeId, axes: &[usize], keepdim: bool) -> BResult {
        self.op(
            Op::Reduce {
                op: r,
                axes: axes.to_vec(),
                keepdim,
            },
            &[x],
        )
    }

    /// Batched matmul.
    pub fn matmul(&mut self, x: NodeId, y: NodeId) -> BResult {
        self.op(Op::MatMul, &[x, y])
    }

    /// Reshape.
    pub fn reshape(&mut self, x: NodeId, shape: Shape) -> BResult {
        self.op(Op::Reshape { shape }, &[x])
    }

    /// Permute axes.
    pub fn permute(&mut self, x: NodeId, perm: &[usize]) -> BResult {
        self.op(
            Op::Permute {
                perm: perm.to_vec(),
            },
            &[x],
        )
    }

    /// Swap the last two axes.
    pub fn transpose_last(&mut self, x: NodeId) -> BResult {
        let r = self.rank(x);
        if r < 2 {
            return Err(IrError::Shape {
                op: "permute".into(),
                node: self.graph.len() as u32,
                msg: format!("transpose needs rank ≥ 2, got {r}"),
            });
        }
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 1, r - 2);
        self.permute(x, &perm)
    }

    /// Broadcast to `shape`.
    pub fn expand(&mut self, x: NodeId, shape: Shape) -> BResult {
        self.op(Op::Expand { shape }, &[x])
    }

    /// `x[.., start..end, ..]` on `axis`.
    pub fn slice(&mut self, x: NodeId, axis: usize, start: Dim, end: Dim) -> BResult {
        self.op(Op::Slice { axis, start, end }, &[x])
    }

    /// Concatenate along `axis`.
    pub fn concat(&mut self, xs: &[NodeId], axis: usize) -> BResult {
        self.op(Op::Concat { axis }, xs)
    }

    /// Embedding lookup.
    pub fn gather(&mut self, table: NodeId, ids: NodeId) -> BResult {
        self.op(Op::Gather, &[table, ids])
    }

    /// Convert dtype.
    pub fn cast(&mut self, x: NodeId, dtype: DType) -> BResult {
        self.op(Op::Cast { dtype }, &[x])
    }

    fn last_axis(&self, x: NodeId) -> usize {
        self.rank(x).saturating_sub(1)
    }

    /// Softmax over the last axis: `exp(x - max x) / Σ exp(x - max x)`.
    pub fn softmax(&mut self, x: NodeId) -> BResult {
        let axis = self.last_axis(x);
        let m = self.reduce(ReduceOp::Max, x, &[axis], true)?;
        let shifted = self.sub(x, m)?;
        let e = self.unary(UnaryOp::Exp, shifted)?;
        let s = self.reduce(ReduceOp::Sum, e, &[axis], true)?;
        self.div(e, s)
    }

    /// Normalisation without affine over `axes` (sorted):
    /// `(x - E[x]) / √(E[(x - E[x])²] + eps)`, the statistics kept with `keepdim`.
    pub fn normalize(&mut self, x: NodeId, axes: &[usize], eps: f64) -> BResult {
        let mu = self.reduce(ReduceOp::Mean, x, axes, true)?;
        let xc = self.sub(x, mu)?;
        let sq = self.mul(xc, xc)?;
        let var = self.reduce(ReduceOp::Mean, sq, axes, true)?;
        let var_eps = self.add_scalar(var, eps)?;
        let inv = self.unary(UnaryOp::Rsqrt, var_eps)?;
        self.mul(xc, inv)
    }

    /// Layer norm over the last axis with affine `gamma`, `beta`:
    /// `(x - E[x]) / √(E[(x - E[x])²] + eps) · γ + β`.
    pub fn layer_norm(&mut self, x: NodeId, gamma: NodeId, beta: NodeId, eps: f64) -> BResult {
        let axis = self.last_axis(x);
        let y = self.normalize(x, &[axis], eps)?;
        let y = self.mul(y, gamma)?;
        self.add(y, beta)
    }

    /// RMS norm over the last axis: `x · rsqrt(E[x²] + eps) · γ`.
    pub fn rms_norm(&mut self, x: NodeId, gamma: NodeId, eps: f64) -> BResult {
        let axis = self.last_axis(x);
        let sq = self.mul(x, x)?;
        let ms = self.reduce(ReduceOp::Mean, sq, &[axis], true)?;
        let ms_eps = self.add_scalar(ms, eps)?;
        let inv = self.unary(UnaryOp::Rsqrt, ms_eps)?;
        let y = self.mul(x, inv)?;
        self.mul(y, gamma)
    }

    /// Group norm of `x [N, C, rest..]` with affine `gamma`, `beta` (broadcast to `x`):
    /// reshape to `[N, groups, (C/groups)·Π rest]`, normalise over the last axis, reshape
    /// back. `C` and the `rest` dims must be known.
    pub fn group_norm(
        &mut self,
        x: NodeId,
        gamma: NodeId,
        beta: NodeId,
        groups: usize,
        eps: f64,
    ) -> BResult {
        let s = self.shape(x).clone();
        let known: Option<Vec<usize>> = s.iter().skip(1).map(Dim::as_known).collect();
        let inner = match known {
            Some(k) if s.len() >= 3 && groups > 0 && k[0] % groups == 0 => {
                k.iter().product::<usize>() / groups
            }
            _ => {
                return Err(IrError::Shape {
                    op: "group_norm".into(),
                    node: self.graph.len() as u32,
                    msg: format!(
                        "{groups} groups need x [N, C, rest..] with C divisible by them and \
                         C, rest known, got {}",
                        crate::dim::shape_string(&s)
                    ),
                })
            }
        };
        let r = self.reshape(x, vec![s[0].clone(), groups.into(), inner.into()])?;
        let y = self.normalize(r, &[2], eps)?;
        let y = self.reshape(y, s)?;
        let y = self.mul(y, gamma)?;
        self.add(y, beta)
    }

    /// Instance norm of `x [N, C, ..]` with affine `gamma`, `beta` (broadcast to `x`):
    /// normalise over axes `2..` of each `(n, c)`; a rank-2 `x` is viewed as `[N, C, 1]`.
    pub fn instance_norm(&mut self, x: NodeId, gamma: NodeId, beta: NodeId, eps: f64) -> BResult {
        let s = self.shape(x).clone();
        let y = match s.len() {
            0 | 1 => {
                return Err(IrError::Shape {
                    op: "instance_norm".into(),
                    node: self.graph.len() as u32,
                    msg: format!("x needs [N, C, ..], got {}", crate::dim::shape_string(&s)),
                })
            }
            2 => {
                let r = self.reshape(x, vec![s[0].clone(), s[1].clone(), 1.into()])?;
                let y = self.normalize(r, &[2], eps)?;
                self.reshape(y, s)?
            }
            n => {
                let axes: Vec<usize> = (2..n).collect();
                self.normalize(x, &axes, eps)?
            }
        };
        let y = self.mul(y, gamma)?;
        self.add(y, beta)
    }

    /// GELU with the exact erf: `0.5·x·(1 + erf(x/√2))`.
    pub fn gelu_erf(&mut self, x: NodeId) -> BResult {
        let scaled = self.mul_scalar(x, std::f64::consts::FRAC_1_SQRT_2)?;
        let e = self.unary(UnaryOp::Erf, scaled)?;
        let one_plus = self.add_scalar(e, 1.0)?;
        let half_x = self.mul_scalar(x, 0.5)?;
        self.mul(half_x, one_plus)
    }

    /// GELU, tanh approximation (GPT-2's `gelu_new`):
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    pub fn gelu_tanh(&mut self, x: NodeId) -> BResult {
        let x2 = self.mul(x, x)?;
        let x3 = self.mul(x2, x)?;
        let cubic = self.mul_scalar(x3, 0.044715)?;
        let inner = self.add(x, cubic)?;
        let scaled = self.mul_scalar(inner, (2.0 / std::f64::consts::PI).sqrt())?;
        let t = self.unary(UnaryOp::Tanh, scaled)?;
        let one_plus = self.add_scalar(t, 1.0)?;
        let half_x = self.mul_scalar(x, 0.5)?;
        self.mul(half_x, one_plus)
    }

    /// SiLU (swish): `x · sigmoid(x)`.
    pub fn silu(&mut self, x: NodeId) -> BResult {
        let s = self.unary(UnaryOp::Sigmoid, x)?;
        self.mul(x, s)
    }

    /// A linear layer `x W (+ b)` with the weight in either layout.
    pub fn linear(
        &mut self,
        x: NodeId,
        w: NodeId,
        b: Option<NodeId>,
        layout: WeightLayout,
    ) -> BResult {
        let w = match layout {
            WeightLayout::InOut => w,
            WeightLayout::OutIn => self.transpose_last(w)?,
        };
        let y = self.matmul(x, w)?;
        match b {
            Some(b) => self.add(y, b),
            None => Ok(y),
        }
    }

    /// `[b, s, heads·d]` → `[b, heads, s, d]`.
    pub fn split_heads(&mut self, x: NodeId, heads: usize) -> BResult {
        let s = self.shape(x).clone();
        let width = s.last().and_then(Dim::as_known).unwrap_or(0);
        if s.len() != 3 || heads == 0 || !width.is_multiple_of(heads) {
            return Err(IrError::Shape {
                op: "split_heads".into(),
                node: self.graph.len() as u32,
                msg: format!(
                    "cannot split {} into {heads} heads",
                    crate::dim::shape_string(&s)
                ),
            });
        }
        let shape = vec![
            s[0].clone(),
            s[1].clone(),
            heads.into(),
            (width / heads).into(),
        ];
        let r = self.reshape(x, shape)?;
        self.permute(r, &[0, 2, 1, 3])
    }

    /// `[b, heads, s, d]` → `[b, s, heads·d]`.
    pub fn merge_heads(&mut self, x: NodeId) -> BResult {
        let s = self.shape(x).clone();
        let p = self.permute(x, &[0, 2, 1, 3])?;
        let width = match (s[1].as_known(), s[3].as_known()) {
            (Some(h), Some(d)) => h * d,
            _ => {
                return Err(IrError::Shape {
                    op: "merge_heads".into(),
                    node: self.graph.len() as u32,
                    msg: "heads and head dim must be known".into(),
                })
            }
        };
        self.reshape(p, vec![s[0].clone(), s[2].clone(), width.into()])
    }

    /// Scaled dot-product attention on split heads: `softmax(q kᵀ / √d + mask) v`.
    ///
    /// `q`: `[b, h, sq, d]`, `k`/`v`: `[b, h, sk, d]`; `mask` is additive and broadcasts to
    /// `[b, h, sq, sk]` (0 where attending, a large negative number where not).
    pub fn attention(&mut self, q: NodeId, k: NodeId, v: NodeId, mask: Option<NodeId>) -> BResult {
        let d = self.shape(q).last().and_then(Dim::as_known).unwrap_or(1);
        let kt = self.transpose_last(k)?;
        let scores = self.matmul(q, kt)?;
        let scaled = self.mul_scalar(scores, 1.0 / (d as f64).sqrt())?;
        let masked = match mask {
            Some(m) => self.add(scaled, m)?,
            None => scaled,
        };
        let p = self.softmax(masked)?;
        self.matmul(p, v)
    }
}
