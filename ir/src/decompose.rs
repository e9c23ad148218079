//! Fused ops back to primitives: the decomposition every fused op is held equal to.
//!
//! [`decompose`] rewrites a graph so that every fused op (see [`Op::is_fused`]) becomes the
//! primitive spelling the [`Builder`]'s composite helpers emit (`softmax`, `layer_norm`,
//! `rms_norm`, `group_norm`, `instance_norm`, `gelu_*`, `silu`), and causal / sliding-window
//! masks are built from `iota` comparisons exactly as the GPT-2 graph builds its causal mask.
//! Primitive nodes, inputs, weights and outputs are copied as they are, in order.

use std::collections::HashMap;

use crate::builder::{BResult, Builder};
use crate::dim::Dim;
use crate::graph::{Graph, NodeId};
use crate::op::{Act, CmpOp, Op, UnaryOp};
use crate::IrError;

/// An equivalent graph with every fused op replaced by its primitive decomposition.
///
/// - `softmax{scale}(x [, mask])` → `softmax(x·scale [+ mask])` (no `mul` when `scale == 1`).
/// - `attention{scale, causal, window}(q, k, v [, mask])` →
///   `matmul(softmax(matmul(q, kᵀ)·scale [+ m]), v)` where, with `causal` or `window`,
///   `m = where(allowed, mask or 0, f32::MIN)` and `allowed[i, j]` is `j <= i + sk - sq`
///   (causal) and `j > i + sk - sq - window` (window). Without `causal`, a `window` bounds only
///   from below. No `mul` when `scale == 1`.
/// - `layer_norm`, `rms_norm`, `group_norm`, `instance_norm`: the [`Builder`] helpers of the
///   same names (group norm needs `C` and the spatial dims known, else [`IrError::Shape`]).
/// - `batch_norm(x, scale, shift)` → `x·scale + shift`.
/// - `fused_matmul{act, bias, residual}(x, w [, b] [, r])` → `act(x @ w [+ b]) [+ r]`.
pub fn decompose(g: &Graph) -> Result<Graph, IrError> {
    let mut b = Builder::new();
    let mut map: HashMap<NodeId, NodeId> = HashMap::with_capacity(g.len());
    for (id, node) in g.nodes() {
        let args: Vec<NodeId> = node.inputs.iter().map(|i| map[i]).collect();
        let new = if node.op.is_fused() {
            expand(&mut b, &node.op, &args).map_err(|e| match e {
                IrError::Shape { op, msg, .. } => IrError::Shape {
                    op: node.op.name(),
                    node: id.0,
                    msg: format!("decomposing via `{op}`: {msg}"),
                },
                e => e,
            })?
        } else {
            b.op(node.op.clone(), &args)?
        };
        map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        b.output(name, map[id]);
    }
    Ok(b.finish())
}

/// The primitive spelling of one fused op on already-mapped operands.
fn expand(b: &mut Builder, op: &Op, args: &[NodeId]) -> BResult {
    match op {
        Op::Softmax { scale } => {
            let mut s = args[0];
            if scale.0 != 1.0 {
                s = b.mul_scalar(s, scale.0)?;
            }
            if let Some(&m) = args.get(1) {
                s = b.add(s, m)?;
            }
            b.softmax(s)
        }
        Op::Attention {
            scale,
            causal,
            window,
        } => {
            let (q, k, v) = (args[0], args[1], args[2]);
            let user_mask = args.get(3).copied();
            let mask = if *causal || window.is_some() {
                let r = b.rank(q);
                let sq = b.shape(q)[r - 2].clone();
                let sk = b.shape(k)[r - 2].clone();
                let allowed = allowed_keys(b, &sq, &sk, *causal, *window)?;
                let keep = match user_mask {
                    Some(m) => m,
                    None => b.scalar(0.0)?,
                };
                let masked = b.scalar(f32::MIN as f64)?;
                Some(b.select(allowed, keep, masked)?)
            } else {
                user_mask
            };
            let kt = b.transpose_last(k)?;
            let mut s = b.matmul(q, kt)?;
            if scale.0 != 1.0 {
                s = b.mul_scalar(s, scale.0)?;
            }
            if let Some(m) = mask {
                s = b.add(s, m)?;
            }
            let p = b.softmax(s)?;
            b.matmul(p, v)
        }
        Op::LayerNorm { eps } => b.layer_norm(args[0], args[1], args[2], eps.0),
        Op::RmsNorm { eps } => b.rms_norm(args[0], args[1], eps.0),
        Op::GroupNorm { groups, eps } => b.group_norm(args[0], args[1], args[2], *groups, eps.0),
        Op::InstanceNorm { eps } => b.instance_norm(args[0], args[1], args[2], eps.0),
        Op::BatchNorm => {
            let y = b.mul(args[0], args[1])?;
            b.add(y, args[2])
        }
        Op::FusedMatMul {
            act,
            bias,
            residual,
        } => {
            let mut y = b.matmul(args[0], args[1])?;
            let mut rest = args[2..].iter().copied();
            if *bias {
                let bias = rest.next().expect("arity checked by infer");
                y = b.add(y, bias)?;
            }
            y = match act {
                Act::Identity => y,
                Act::GeluErf => b.gelu_erf(y)?,
                Act::GeluTanh => b.gelu_tanh(y)?,
                Act::Relu => b.unary(UnaryOp::Relu, y)?,
                Act::Silu => b.silu(y)?,
            };
            if *residual {
                let r = rest.next().expect("arity checked by infer");
                y = b.add(y, r)?;
            }
            Ok(y)
        }
        other => unreachable!("`{}` is not a fused op", other.name()),
    }
}

/// Which keys each query may see, as bool `[sq, sk]`: query `i` sits at absolute position
/// `i + sk - sq`; `causal` admits keys `j <= position`, `window` keys `j > position - window`.
///
/// Spelled like the GPT-2 graph: `iota(sk - sq, sq)` as `[sq, 1]` against `iota(0, sk)`. When
/// `sk - sq` is a negative constant both sides are shifted by `sq - sk` instead, so no iota
/// starts below zero.
fn allowed_keys(
    b: &mut Builder,
    sq: &Dim,
    sk: &Dim,
    causal: bool,
    window: Option<usize>,
) -> BResult {
    let offset = sk.minus(sq);
    let negative = offset.symbols().next().is_none() && offset.as_known().is_none();
    let (qstart, kstart) = if negative {
        (Dim::known(0), sq.minus(sk))
    } else {
        (offset, Dim::known(0))
    };
    let qpos = b.iota(qstart, sq.clone())?;
    let qpos = b.reshape(qpos, vec![sq.clone(), 1.into()])?;
    let kpos = b.iota(kstart, sk.clone())?;
    let causal_ok = if causal {
        Some(b.compare(CmpOp::Le, kpos, qpos)?)
    } else {
        None
    };
    let window_ok = match window {
        Some(w) => {
            let w = b.scalar_i64(w as i64)?;
            let lo = b.sub(qpos, w)?;
            Some(b.compare(CmpOp::Gt, kpos, lo)?)
        }
        None => None,
    };
    match (causal_ok, window_ok) {
        // `where(c, w, c)` is `c and w` without a bool constant.
        (Some(c), Some(w)) => b.select(c, w, c),
        (Some(x), None) | (None, Some(x)) => Ok(x),
        (None, None) => unreachable!("called only with causal or window"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::shape;
    use crate::op::{DType, Scalar};
    use crate::print::to_text;

    #[test]
    fn primitive_graphs_come_back_unchanged() {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("batch"), 4.into()], DType::F32)
            .unwrap();
        let g = b.weight("g", shape([4usize])).unwrap();
        let beta = b.weight("b", shape([4usize])).unwrap();
        let y = b.layer_norm(x, g, beta, 1e-5).unwrap();
        let z = b.gelu_tanh(y).unwrap();
        b.output("z", z);
        b.output("y", y);
        let graph = b.finish();
        assert_eq!(to_text(&decompose(&graph).unwrap()), to_text(&graph));
    }

    #[test]
    fn fused_ops_leave_no_fused_node() {
        let mut g = Graph::new();
        let (bt, s, p) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
        let inp = |g: &mut Graph, name: &str, sh: Vec<Dim>| {
            g.add(
                Op::Input {
                    name: name.into(),
                    shape: sh,
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap()
        };
        let q = inp(&mut g, "q", vec![bt.clone(), 2.into(), s.clone(), 8.into()]);
        let k = inp(
            &mut g,
            "k",
            vec![bt.clone(), 2.into(), p.plus(&s), 8.into()],
        );
        let a = g
            .add(
                Op::Attention {
                    scale: Scalar(0.5),
                    causal: true,
                    window: Some(3),
                },
                &[q, k, k],
            )
            .unwrap();
        let x = inp(&mut g, "x", vec![bt.clone(), 4.into(), 6.into()]);
        let gamma = inp(&mut g, "gamma", shape([4usize, 1]));
        let gn = g
            .add(
                Op::GroupNorm {
                    groups: 2,
                    eps: Scalar(1e-5),
                },
                &[x, gamma, gamma],
            )
            .unwrap();
        g.set_output("a", a);
        g.set_output("gn", gn);
        let d = decompose(&g).unwrap();
        assert!(d.nodes().all(|(_, n)| !n.op.is_fused()));
        let text = to_text(&d);
        assert!(text.contains("iota{start=past len=seq}"), "{text}");
        assert!(text.contains("reshape{[batch, 2, 12]}"), "{text}");
        assert_eq!(d.outputs().len(), 2);
        let a_out = d.node(d.outputs()[0].1);
        assert_eq!(a_out.shape, g.node(a).shape);
    }

    #[test]
    fn group_norm_with_symbolic_channels_is_a_shape_error() {
        let mut g = Graph::new();
        let x = g
            .add(
                Op::Input {
                    name: "x".into(),
                    shape: vec![2.into(), 4.into(), Dim::sym("len")],
                    dtype: DType::F32,
                },
                &[],
            )
            .unwrap();
        let n = g
            .add(
                Op::GroupNorm {
                    groups: 2,
                    eps: Scalar(1e-5),
                },
                &[x, x, x],
            )
            .unwrap();
        g.set_output("y", n);
        let e = decompose(&g).unwrap_err();
        assert!(
            matches!(&e, IrError::Shape { op, node: 1, .. } if op == "group_norm"),
            "{e}"
        );
    }
}
