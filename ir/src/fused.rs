//! Every fused op in one place: its printable name, attribute text, arity, shape/dtype
//! inference and primitive decomposition, as one [`Def`] per op.
//!
//! The op's variant is declared in [`Op`] (so every crate can match on it); everything else
//! the IR knows about it lives here. `Op::name`, `Op::attrs`, `Op::arity`, `Op::is_fused`,
//! [`infer`](crate::infer) and [`decompose`](crate::decompose) all read [`def`]. Adding a
//! fused op: its variant in `op.rs`, one arm in [`def`], and its section below.
//!
//! The decompositions are the spelling the [`Builder`]'s composite helpers emit (`softmax`,
//! `layer_norm`, `rms_norm`, `group_norm`, `instance_norm`, `gelu_*`, `silu`), with causal /
//! sliding-window masks built from `iota` comparisons exactly as the GPT-2 graph builds its
//! causal mask: the reference every implementation of the op is held to.

use crate::builder::{BResult, Builder};
use crate::dim::{shape_string, Dim, Shape};
use crate::graph::{expect_broadcast_into, infer as infer_any, same_dtype, NodeId};
use crate::op::{Act, CmpOp, DType, Op, UnaryOp};

/// Operand shapes and dtypes → the output's, or what is wrong.
type Infer = fn(&Op, &[(&Shape, DType)]) -> Result<(Shape, DType), String>;

/// What the IR knows about one fused op.
pub(crate) struct Def {
    /// The printable name.
    pub name: &'static str,
    /// How many operands it takes (`None`: a variable count, checked by `infer`).
    pub arity: Option<usize>,
    /// Its attributes as they appear in the text form.
    pub attrs: fn(&Op) -> String,
    /// Output shape and dtype from the operands' (arity already checked).
    pub infer: Infer,
    /// Its primitive spelling on already-built operands.
    pub decompose: fn(&mut Builder, &Op, &[NodeId]) -> BResult,
}

/// The definition of a fused op; `None` for primitives.
pub(crate) fn def(op: &Op) -> Option<&'static Def> {
    Some(match op {
        Op::Softmax { .. } => &SOFTMAX,
        Op::Attention { .. } => &ATTENTION,
        Op::LayerNorm { .. } => &LAYER_NORM,
        Op::RmsNorm { .. } => &RMS_NORM,
        Op::GroupNorm { .. } => &GROUP_NORM,
        Op::InstanceNorm { .. } => &INSTANCE_NORM,
        Op::BatchNorm => &BATCH_NORM,
        Op::FusedMatMul { .. } => &FUSED_MATMUL,
        Op::Rope => &ROPE,
        Op::GatedMatMul { .. } => &GATED_MATMUL,
        _ => return None,
    })
}

fn no_attrs(_: &Op) -> String {
    String::new()
}

fn eps_attr(op: &Op) -> String {
    match op {
        Op::LayerNorm { eps } | Op::RmsNorm { eps } | Op::InstanceNorm { eps } => {
            format!("eps={eps}")
        }
        _ => unreachable!("eps_attr of `{}`", op.name()),
    }
}

// ---- softmax --------------------------------------------------------------------------------

/// `softmax(x·scale [+ mask])` over the last axis.
const SOFTMAX: Def = Def {
    name: "softmax",
    arity: None,
    attrs: |op| {
        let Op::Softmax { scale } = op else {
            unreachable!()
        };
        format!("scale={scale}")
    },
    infer: |_, xs| {
        let d = same_dtype("softmax", xs)?;
        if xs.len() > 2 || d != DType::F32 {
            return Err("takes x [, mask], f32".into());
        }
        let x = xs[0].0;
        if x.is_empty() {
            return Err("needs rank ≥ 1".into());
        }
        expect_broadcast_into(&xs[1..], x)?;
        Ok((x.clone(), d))
    },
    // `softmax{scale}(x [, mask])` → `softmax(x·scale [+ mask])` (no `mul` when `scale == 1`).
    decompose: |b, op, args| {
        let Op::Softmax { scale } = op else {
            unreachable!()
        };
        let mut s = args[0];
        if scale.0 != 1.0 {
            s = b.mul_scalar(s, scale.0)?;
        }
        if let Some(&m) = args.get(1) {
            s = b.add(s, m)?;
        }
        b.softmax(s)
    },
};

// ---- attention ------------------------------------------------------------------------------

/// `softmax(q kᵀ·scale [+ mask] [causal] [window]) v`.
const ATTENTION: Def = Def {
    name: "attention",
    arity: None,
    attrs: |op| {
        let Op::Attention {
            scale,
            causal,
            window,
        } = op
        else {
            unreachable!()
        };
        let mut a = format!("scale={scale}");
        if *causal {
            a.push_str(" causal");
        }
        if let Some(w) = window {
            a.push_str(&format!(" window={w}"));
        }
        a
    },
    infer: |_, xs| {
        let d = same_dtype("attention", xs)?;
        if !(3..=4).contains(&xs.len()) || d != DType::F32 {
            return Err("takes q, k, v [, mask], f32".into());
        }
        let (q, k, v) = (xs[0].0, xs[1].0, xs[2].0);
        let r = q.len();
        if r < 2 || k.len() != r || v.len() != r {
            return Err(format!(
                "q, k, v need one rank ≥ 2: {} {} {}",
                shape_string(q),
                shape_string(k),
                shape_string(v)
            ));
        }
        if k[..r - 2] != v[..r - 2] || kv_group(q, k).is_none() {
            return Err(format!(
                "q, k, v differ in batch dims (k/v may have fewer heads, a divisor of q's): \
                 q {} k {} v {}",
                shape_string(q),
                shape_string(k),
                shape_string(v)
            ));
        }
        if q[r - 1] != k[r - 1] || k[r - 2] != v[r - 2] {
            return Err(format!(
                "head dims do not fit: q {} k {} v {}",
                shape_string(q),
                shape_string(k),
                shape_string(v)
            ));
        }
        let mut scores = q[..r - 1].to_vec();
        scores.push(k[r - 2].clone());
        expect_broadcast_into(&xs[3..], &scores)?;
        let mut out = q[..r - 1].to_vec();
        out.push(v[r - 1].clone());
        Ok((out, d))
    },
    // `attention{scale, causal, window}(q, k, v [, mask])` →
    // `matmul(softmax(matmul(q, kᵀ)·scale [+ m]), v)` where, with `causal` or `window`,
    // `m = where(allowed, mask or 0, f32::MIN)` and `allowed[i, j]` is `j <= i + sk - sq`
    // (causal) and `j > i + sk - sq - window` (window). Without `causal`, a `window` bounds only
    // from below. No `mul` when `scale == 1`. Grouped-query attention (k/v with `kvh` heads
    // against q's `h`) first repeats each k/v head `h / kvh` times as transformers' `repeat_kv`
    // does.
    decompose: |b, op, args| {
        let Op::Attention {
            scale,
            causal,
            window,
        } = op
        else {
            unreachable!()
        };
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
        let group = kv_group(b.shape(q), b.shape(k)).expect("inference checked the heads");
        let (k, v) = if group > 1 {
            (repeat_kv(b, k, group)?, repeat_kv(b, v, group)?)
        } else {
            (k, v)
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
    },
};

/// Query heads per key/value head of an attention with operands `q [.., h, sq, d]` and
/// `k [.., kvh, sk, d]`: 1 when the batch dims agree; `h / kvh` when they differ only in the
/// head axis (`r - 3`), both known and `kvh` dividing `h` (grouped-query / multi-query
/// attention: query head `i` reads key/value head `i / group`, and flattened over the batch
/// dims, batch-head `bh` reads `bh / group`); `None` otherwise.
pub fn kv_group(q: &[Dim], k: &[Dim]) -> Option<usize> {
    let r = q.len();
    if k.len() != r || r < 2 {
        return None;
    }
    if q[..r - 2] == k[..r - 2] {
        return Some(1);
    }
    if r < 3 || q[..r - 3] != k[..r - 3] {
        return None;
    }
    let (h, kvh) = (q[r - 3].as_known()?, k[r - 3].as_known()?);
    (kvh > 0 && h.is_multiple_of(kvh)).then(|| h / kvh)
}

/// transformers' `repeat_kv`: `x [b, kvh, s, d]` → reshape `[b, kvh, 1, s, d]` → expand
/// `[b, kvh, g, s, d]` → reshape `[b, kvh·g, s, d]` (any number of leading dims).
fn repeat_kv(b: &mut Builder, x: NodeId, group: usize) -> BResult {
    let s = b.shape(x).clone();
    let r = s.len();
    let kvh = s[r - 3].as_known().expect("kv_group checked the heads");
    let mut one = s[..r - 2].to_vec();
    one.push(1.into());
    one.extend(s[r - 2..].iter().cloned());
    let x = b.reshape(x, one.clone())?;
    one[r - 2] = group.into();
    let x = b.expand(x, one)?;
    let mut out = s.clone();
    out[r - 3] = (kvh * group).into();
    b.reshape(x, out)
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

// ---- norms ----------------------------------------------------------------------------------

/// Shared by every norm: f32 operands, `x` of rank ≥ 1, the rest broadcasting into `x`.
fn norm_infer(op: &Op, xs: &[(&Shape, DType)]) -> Result<(Shape, DType), String> {
    let d = same_dtype(&op.name(), xs)?;
    let x = xs[0].0;
    if d != DType::F32 || x.is_empty() {
        return Err("takes f32 operands and x of rank ≥ 1".into());
    }
    if let Op::GroupNorm { groups, .. } = op {
        let c = x.get(1).and_then(Dim::as_known);
        if x.len() < 3 || *groups == 0 || c.is_none_or(|c| c % groups != 0) {
            return Err(format!(
                "{groups} groups do not divide the channels of {}",
                shape_string(x)
            ));
        }
    }
    if matches!(op, Op::InstanceNorm { .. } | Op::BatchNorm) && x.len() < 2 {
        return Err("x needs [N, C, ..]".into());
    }
    expect_broadcast_into(&xs[1..], x)?;
    Ok((x.clone(), d))
}

/// `(x - E[x]) / √(Var[x] + eps) · gamma + beta` over the last axis: [`Builder::layer_norm`].
const LAYER_NORM: Def = Def {
    name: "layer_norm",
    arity: Some(3),
    attrs: eps_attr,
    infer: norm_infer,
    decompose: |b, op, args| {
        let Op::LayerNorm { eps } = op else {
            unreachable!()
        };
        b.layer_norm(args[0], args[1], args[2], eps.0)
    },
};

/// `x / √(E[x²] + eps) · gamma` over the last axis: [`Builder::rms_norm`].
const RMS_NORM: Def = Def {
    name: "rms_norm",
    arity: Some(2),
    attrs: eps_attr,
    infer: norm_infer,
    decompose: |b, op, args| {
        let Op::RmsNorm { eps } = op else {
            unreachable!()
        };
        b.rms_norm(args[0], args[1], eps.0)
    },
};

/// Layer norm per channel group: [`Builder::group_norm`] (needs `C` and the spatial dims known,
/// else a shape error).
const GROUP_NORM: Def = Def {
    name: "group_norm",
    arity: Some(3),
    attrs: |op| {
        let Op::GroupNorm { groups, eps } = op else {
            unreachable!()
        };
        format!("groups={groups} eps={eps}")
    },
    infer: norm_infer,
    decompose: |b, op, args| {
        let Op::GroupNorm { groups, eps } = op else {
            unreachable!()
        };
        b.group_norm(args[0], args[1], args[2], *groups, eps.0)
    },
};

/// Normalisation over each channel's spatial axes: [`Builder::instance_norm`].
const INSTANCE_NORM: Def = Def {
    name: "instance_norm",
    arity: Some(3),
    attrs: eps_attr,
    infer: norm_infer,
    decompose: |b, op, args| {
        let Op::InstanceNorm { eps } = op else {
            unreachable!()
        };
        b.instance_norm(args[0], args[1], args[2], eps.0)
    },
};

/// `batch_norm(x, scale, shift)` → `x·scale + shift`.
const BATCH_NORM: Def = Def {
    name: "batch_norm",
    arity: Some(3),
    attrs: no_attrs,
    infer: norm_infer,
    decompose: |b, _, args| {
        let y = b.mul(args[0], args[1])?;
        b.add(y, args[2])
    },
};

// ---- matmul epilogues -----------------------------------------------------------------------

/// `fused_matmul{act, bias, residual}(x, w [, b] [, r])` → `act(x @ w [+ b]) [+ r]`.
const FUSED_MATMUL: Def = Def {
    name: "fused_matmul",
    arity: None,
    attrs: |op| {
        let Op::FusedMatMul {
            act,
            bias,
            residual,
        } = op
        else {
            unreachable!()
        };
        let mut a = format!("act={}", act.name());
        if *bias {
            a.push_str(" bias");
        }
        if *residual {
            a.push_str(" residual");
        }
        a
    },
    infer: |op, xs| {
        let Op::FusedMatMul { bias, residual, .. } = op else {
            unreachable!()
        };
        let want = 2 + usize::from(*bias) + usize::from(*residual);
        if xs.len() != want {
            return Err(format!("expects {want} operands, got {}", xs.len()));
        }
        let (out, d) = infer_any(&Op::MatMul, &xs[..2])?;
        expect_broadcast_into(&xs[2..], &out)?;
        Ok((out, d))
    },
    decompose: |b, op, args| {
        let Op::FusedMatMul {
            act,
            bias,
            residual,
        } = op
        else {
            unreachable!()
        };
        let mut y = b.matmul(args[0], args[1])?;
        let mut rest = args[2..].iter().copied();
        if *bias {
            let bias = rest.next().expect("arity checked by infer");
            y = b.add(y, bias)?;
        }
        y = activation(b, *act, y)?;
        if *residual {
            let r = rest.next().expect("arity checked by infer");
            y = b.add(y, r)?;
        }
        Ok(y)
    },
};

/// `act(y)` in the builder's spelling.
fn activation(b: &mut Builder, act: Act, y: NodeId) -> BResult {
    match act {
        Act::Identity => Ok(y),
        Act::GeluErf => b.gelu_erf(y),
        Act::GeluTanh => b.gelu_tanh(y),
        Act::Relu => b.unary(UnaryOp::Relu, y),
        Act::Silu => b.silu(y),
    }
}

/// `gated_matmul{act}(x, wg, wu)` → `act(x @ wg) · (x @ wu)`.
const GATED_MATMUL: Def = Def {
    name: "gated_matmul",
    arity: Some(3),
    attrs: |op| {
        let Op::GatedMatMul { act } = op else {
            unreachable!()
        };
        format!("act={}", act.name())
    },
    infer: |_, xs| {
        if xs[1] != xs[2] {
            return Err(format!(
                "the gate and up weights differ: {} {}",
                shape_string(xs[1].0),
                shape_string(xs[2].0)
            ));
        }
        infer_any(&Op::MatMul, &xs[..2])
    },
    decompose: |b, op, args| {
        let Op::GatedMatMul { act } = op else {
            unreachable!()
        };
        let g = b.matmul(args[0], args[1])?;
        let g = activation(b, *act, g)?;
        let u = b.matmul(args[0], args[2])?;
        b.mul(g, u)
    },
};

// ---- rotary embedding -----------------------------------------------------------------------

/// `rope(x, cos, sin)` → `x·cos + concat(neg(x[.., d/2..d]), x[.., 0..d/2])·sin`, the spelling
/// of transformers' `apply_rotary_pos_emb` (and the one the `rope` rule finds).
const ROPE: Def = Def {
    name: "rope",
    arity: Some(3),
    attrs: no_attrs,
    infer: |_, xs| {
        let d = same_dtype("rope", xs)?;
        let x = xs[0].0;
        let even = x
            .last()
            .and_then(Dim::as_known)
            .is_some_and(|n| n >= 2 && n.is_multiple_of(2));
        if d != DType::F32 || !even {
            return Err(format!(
                "takes f32 x, cos, sin with x's last dim known and even: x {}",
                shape_string(x)
            ));
        }
        expect_broadcast_into(&xs[1..], x)?;
        Ok((x.clone(), d))
    },
    decompose: |b, _, args| {
        let (x, cos, sin) = (args[0], args[1], args[2]);
        let r = b.rank(x);
        let d = b.shape(x)[r - 1]
            .as_known()
            .expect("inference checked the last dim");
        let hi = b.slice(x, r - 1, Dim::known(d / 2), Dim::known(d))?;
        let lo = b.slice(x, r - 1, Dim::known(0), Dim::known(d / 2))?;
        let neg = b.unary(UnaryOp::Neg, hi)?;
        let rot = b.concat(&[neg, lo], r - 1)?;
        let a = b.mul(x, cos)?;
        let c = b.mul(rot, sin)?;
        b.add(a, c)
    },
};
