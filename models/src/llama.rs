//! The LLaMA-family decoder graph (`model_type` llama, mistral, qwen2), one builder generic over
//! [`LlamaConfig`]: the three differ only in fields of the config (biases, windows, RoPE
//! scaling, head counts), never in code paths chosen by family.
//!
//! Inputs and outputs as GPT-2's ([`crate::gpt2`]): `input_ids` i64 `[batch, seq]`,
//! `attention_mask` i64 `[batch, past+seq]`, per layer `past_key_{i}` / `past_value_{i}` f32
//! `[batch, kv_heads, past, head_dim]` → `logits` `[batch, seq, vocab]` and `present_key_{i}` /
//! `present_value_{i}` `[batch, kv_heads, past+seq, head_dim]`. The cache holds the key/value
//! heads after RoPE and before `repeat_kv`, as transformers' does.
//!
//! Each layer: RMSNorm → q/k/v projections → rotary embedding on q and k (positions
//! `past..past+seq`) → append to the cache → `repeat_kv` when there are fewer key/value heads
//! than query heads → causal (optionally sliding-window) attention with the padding mask →
//! o projection → residual; RMSNorm → `down(silu(gate(x)) · up(x))` → residual. A final RMSNorm
//! and the LM head (`lm_head`, or `embed_tokens` transposed when tied).
//!
//! The spellings are fixed because the optimizer's rules match them (see ARCHITECTURE.md):
//! - RMSNorm `x · rsqrt(mean(x·x) + ε) · γ` ([`Builder::rms_norm`]);
//! - RoPE `x·cos + rotate_half(x)·sin` with `rotate_half(x) = concat(−x[d/2..], x[..d/2])`;
//!   `cos`/`sin` are `[seq, head_dim]`, computed once per graph by [`rope_tables`] from the
//!   positions and the inverse frequencies;
//! - `repeat_kv`: `[b, g, s, d]` → reshape `[b, g, 1, s, d]` → expand `[b, g, h/g, s, d]` →
//!   reshape `[b, h, s, d]`;
//! - masks as GPT-2's iota comparisons, the window as `kpos + W > qpos` inside the causal
//!   `where`, the padding as `(1 − m)·f32::MIN` added;
//! - MLP `silu(t) = t · sigmoid(t)`, gate and up as separate matmuls.
//!
//! **The inverse frequencies** enter the graph as the weight [`INV_FREQ`] (`[head_dim/2]` f32),
//! which no checkpoint holds: [`synthesized_weights`] computes it on the host from the config
//! (scaled for `linear` / `llama3`) with transformers' own f32 arithmetic, and
//! [`crate::Model::load`] adds it to the checkpoint's weights. It is a weight rather than a
//! constant because the IR's constants are scalars; being weight-only, anything the optimizer
//! derives from it alone is folded once at load.

use transfuse_ir::{
    BResult, Builder, CmpOp, DType, Dim, Graph, NodeId, Tensor, UnaryOp, WeightLayout, Weights,
};

use crate::bert::additive_padding_mask;
use crate::config::{LlamaConfig, RopeConfig, RopeScaling};
use crate::error::ModelError;
pub use crate::gpt2::{past_key, past_value, present_key, present_value};

/// Name of the synthesized weight holding RoPE's inverse frequencies `[head_dim / 2]`.
pub const INV_FREQ: &str = "rope.inv_freq";

fn w(b: &mut Builder, name: &str, shape: &[usize]) -> BResult {
    b.weight(name, shape.iter().map(|&n| Dim::known(n)).collect())
}

/// `nn.Linear` (`[out, in]`), with `prefix.bias` when `bias`.
fn linear(b: &mut Builder, x: NodeId, prefix: &str, out: usize, inp: usize, bias: bool) -> BResult {
    let wt = w(b, &format!("{prefix}.weight"), &[out, inp])?;
    let bias = match bias {
        true => Some(w(b, &format!("{prefix}.bias"), &[out])?),
        false => None,
    };
    b.linear(x, wt, bias, WeightLayout::OutIn)
}

fn rms_norm(b: &mut Builder, x: NodeId, prefix: &str, width: usize, eps: f64) -> BResult {
    let g = w(b, &format!("{prefix}.weight"), &[width])?;
    b.rms_norm(x, g, eps)
}

/// RoPE's inverse frequencies for `head_dim`, as transformers computes them (in f32:
/// `1 / θ^(2i/d)`, then the scaling of `rope.scaling`).
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let theta = rope.theta as f32;
    // transformers: `1.0 / (base ** (arange(0, dim, 2).float() / dim))`, where `scalar / t` is
    // `t.reciprocal() * scalar`.
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let (low_wl, high_wl) = (
                (old / low_freq_factor) as f32,
                (old / high_freq_factor) as f32,
            );
            let (factor, old) = (factor as f32, old as f32);
            let (lo, span) = (
                low_freq_factor as f32,
                (high_freq_factor - low_freq_factor) as f32,
            );
            base.into_iter()
                .map(|f| {
                    let wavelen = (1.0 / f) * (2.0 * std::f64::consts::PI) as f32;
                    if wavelen > low_wl {
                        f / factor
                    } else if wavelen < high_wl {
                        f
                    } else {
                        let smooth = ((1.0 / wavelen) * old - lo) / span;
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// The weights the graph declares that no checkpoint holds: [`INV_FREQ`].
pub fn synthesized_weights(cfg: &LlamaConfig) -> Weights {
    let f = inv_freq(&cfg.rope, cfg.head_dim);
    let mut w = Weights::new();
    w.insert(
        INV_FREQ.to_string(),
        std::sync::Arc::new(Tensor::f32(vec![f.len()], f)),
    );
    w
}

/// RoPE's `(cos, sin)` tables, each `[seq, head_dim]`, for positions `past..past+seq`:
/// `freqs = f32(iota) [seq, 1] · inv_freq [1, head_dim/2]`, `emb = concat(freqs, freqs)`.
/// `inv_freq` is a `[head_dim/2]` node (the [`INV_FREQ`] weight in model graphs).
pub fn rope_tables(
    b: &mut Builder,
    inv_freq: NodeId,
    past: Dim,
    seq: Dim,
) -> Result<(NodeId, NodeId), transfuse_ir::IrError> {
    let half = b.shape(inv_freq)[0].clone();
    let pos = b.iota(past, seq.clone())?;
    let pos = b.cast(pos, DType::F32)?;
    let pos = b.reshape(pos, vec![seq, 1.into()])?;
    let inv = b.reshape(inv_freq, vec![1.into(), half])?;
    let freqs = b.mul(pos, inv)?;
    let emb = b.concat(&[freqs, freqs], 1)?;
    Ok((b.unary(UnaryOp::Cos, emb)?, b.unary(UnaryOp::Sin, emb)?))
}

/// `x·cos + rotate_half(x)·sin` on the last axis of `x` `[b, heads, seq, head_dim]`.
pub fn apply_rope(b: &mut Builder, x: NodeId, cos: NodeId, sin: NodeId) -> BResult {
    let axis = b.rank(x) - 1;
    let d = b.shape(x)[axis].as_known().unwrap_or(0);
    let lo = b.slice(x, axis, 0.into(), (d / 2).into())?;
    let hi = b.slice(x, axis, (d / 2).into(), d.into())?;
    let neg = b.unary(UnaryOp::Neg, hi)?;
    let rot = b.concat(&[neg, lo], axis)?;
    let a = b.mul(x, cos)?;
    let r = b.mul(rot, sin)?;
    b.add(a, r)
}

/// transformers' `repeat_kv`: `[b, kv, s, d]` → `[b, kv·group, s, d]`, each key/value head
/// repeated for `group` consecutive query heads.
pub fn repeat_kv(b: &mut Builder, x: NodeId, group: usize) -> BResult {
    if group == 1 {
        return Ok(x);
    }
    let s = b.shape(x).clone();
    let (kv, d) = (s[1].as_known().unwrap_or(0), s[3].clone());
    let x = b.reshape(
        x,
        vec![
            s[0].clone(),
            s[1].clone(),
            1.into(),
            s[2].clone(),
            d.clone(),
        ],
    )?;
    let x = b.expand(
        x,
        vec![
            s[0].clone(),
            s[1].clone(),
            group.into(),
            s[2].clone(),
            d.clone(),
        ],
    )?;
    b.reshape(x, vec![s[0].clone(), (kv * group).into(), s[2].clone(), d])
}

/// Builds the decoder graph for `cfg`.
pub fn build_graph(cfg: &LlamaConfig) -> Result<Graph, ModelError> {
    Ok(build(cfg)?)
}

fn build(cfg: &LlamaConfig) -> Result<Graph, transfuse_ir::IrError> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (batch, seq, past) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let total = past.plus(&seq);
    let eps = cfg.rms_norm_eps;
    let mut b = Builder::new();
    let ids = b.input("input_ids", vec![batch.clone(), seq.clone()], DType::I64)?;
    let mask = b.input(
        "attention_mask",
        vec![batch.clone(), total.clone()],
        DType::I64,
    )?;

    let embed = w(&mut b, "model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let mut x = b.gather(embed, ids)?;

    let inv = w(&mut b, INV_FREQ, &[hd / 2])?;
    let (cos, sin) = rope_tables(&mut b, inv, past.clone(), seq.clone())?;

    // Query at position past+i may see key j iff j <= past+i (and, in a window W, j + W >
    // past+i) and key j is not padding.
    let qpos = b.iota(past.clone(), seq.clone())?;
    let qpos = b.reshape(qpos, vec![seq.clone(), 1.into()])?;
    let kpos = b.iota(0.into(), total.clone())?;
    let causal = b.compare(CmpOp::Le, kpos, qpos)?;
    let pad = additive_padding_mask(&mut b, mask)?;
    let pad = b.reshape(pad, vec![batch.clone(), 1.into(), 1.into(), total.clone()])?;
    let fill = b.scalar(f32::MIN as f64)?;
    let mut masks: Vec<(Option<usize>, NodeId)> = vec![];
    let mut mask_for = |b: &mut Builder, window: Option<usize>| -> BResult {
        if let Some(&(_, m)) = masks.iter().find(|(w, _)| *w == window) {
            return Ok(m);
        }
        let keep = match window {
            None => pad,
            Some(wnd) => {
                let wc = b.scalar_i64(wnd as i64)?;
                let shifted = b.add(kpos, wc)?;
                let inside = b.compare(CmpOp::Gt, shifted, qpos)?;
                b.select(inside, pad, fill)?
            }
        };
        let m = b.select(causal, keep, fill)?;
        masks.push((window, m));
        Ok(m)
    };

    let cache_shape = vec![batch.clone(), kvh.into(), past.clone(), hd.into()];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let a = rms_norm(&mut b, x, &format!("{p}.input_layernorm"), h, eps)?;
        let at = format!("{p}.self_attn");
        let q = linear(
            &mut b,
            a,
            &format!("{at}.q_proj"),
            heads * hd,
            h,
            cfg.qkv_bias,
        )?;
        let k = linear(
            &mut b,
            a,
            &format!("{at}.k_proj"),
            kvh * hd,
            h,
            cfg.qkv_bias,
        )?;
        let v = linear(
            &mut b,
            a,
            &format!("{at}.v_proj"),
            kvh * hd,
            h,
            cfg.qkv_bias,
        )?;
        let q = b.split_heads(q, heads)?;
        let k = b.split_heads(k, kvh)?;
        let v = b.split_heads(v, kvh)?;
        let q = apply_rope(&mut b, q, cos, sin)?;
        let k = apply_rope(&mut b, k, cos, sin)?;
        let pk = b.input(&past_key(i), cache_shape.clone(), DType::F32)?;
        let pv = b.input(&past_value(i), cache_shape.clone(), DType::F32)?;
        let k = b.concat(&[pk, k], 2)?;
        let v = b.concat(&[pv, v], 2)?;
        b.output(&present_key(i), k);
        b.output(&present_value(i), v);
        let k = repeat_kv(&mut b, k, cfg.group_size())?;
        let v = repeat_kv(&mut b, v, cfg.group_size())?;
        let m = mask_for(&mut b, cfg.sliding_window.get(i).copied().flatten())?;
        let o = b.attention(q, k, v, Some(m))?;
        let o = b.merge_heads(o)?;
        let o = linear(
            &mut b,
            o,
            &format!("{at}.o_proj"),
            h,
            heads * hd,
            cfg.o_bias,
        )?;
        x = b.add(x, o)?;

        let a = rms_norm(&mut b, x, &format!("{p}.post_attention_layernorm"), h, eps)?;
        let mp = format!("{p}.mlp");
        let inter = cfg.intermediate_size;
        let gate = linear(
            &mut b,
            a,
            &format!("{mp}.gate_proj"),
            inter,
            h,
            cfg.mlp_bias,
        )?;
        let up = linear(&mut b, a, &format!("{mp}.up_proj"), inter, h, cfg.mlp_bias)?;
        let act = b.silu(gate)?;
        let gated = b.mul(act, up)?;
        let down = linear(
            &mut b,
            gated,
            &format!("{mp}.down_proj"),
            h,
            inter,
            cfg.mlp_bias,
        )?;
        x = b.add(x, down)?;
    }
    let x = rms_norm(&mut b, x, "model.norm", h, eps)?;
    let head = match cfg.tie_word_embeddings {
        true => embed,
        false => w(&mut b, "lm_head.weight", &[cfg.vocab_size, h])?,
    };
    let logits = b.linear(x, head, None, WeightLayout::OutIn)?;
    b.output("logits", logits);
    Ok(b.finish())
}
