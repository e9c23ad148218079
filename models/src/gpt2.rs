//! The GPT-2 decoder graph with its KV cache as graph inputs and outputs, generic over
//! [`Gpt2Config`]; weight names follow the checkpoint without the `transformer.` prefix.
//!
//! Inputs: `input_ids` i64 `[batch, seq]`, `attention_mask` i64 `[batch, past+seq]` (1 = attend),
//! and per layer `past_key_{i}` / `past_value_{i}` f32 `[batch, heads, past, head_dim]` (`past`
//! may be 0). Outputs: `logits` `[batch, seq, vocab]` and `present_key_{i}` /
//! `present_value_{i}` `[batch, heads, past+seq, head_dim]`. One graph serves the prefill
//! (`past = 0`) and every decoding step (`seq = 1`): the symbolic dims are bound per call.
//!
//! Pre-norm blocks, tanh GELU, scale 1/√head_dim, a causal mask built from position
//! comparisons combined with the padding mask by `where` (no `min + min` overflow), positions
//! `past..past+seq`, and the LM head tied to `wte`.

use transfuse_ir::{BResult, Builder, CmpOp, DType, Dim, Graph, NodeId, WeightLayout};

use crate::bert::{activation, additive_padding_mask};
use crate::config::Gpt2Config;
use crate::error::ModelError;

fn w(b: &mut Builder, name: &str, shape: &[usize]) -> BResult {
    b.weight(name, shape.iter().map(|&n| Dim::known(n)).collect())
}

/// GPT-2's `Conv1D`: weight `[in, out]`.
fn conv1d(b: &mut Builder, x: NodeId, prefix: &str, inp: usize, out: usize) -> BResult {
    let wt = w(b, &format!("{prefix}.weight"), &[inp, out])?;
    let bias = w(b, &format!("{prefix}.bias"), &[out])?;
    b.linear(x, wt, Some(bias), WeightLayout::InOut)
}

fn layer_norm(b: &mut Builder, x: NodeId, prefix: &str, width: usize, eps: f64) -> BResult {
    let g = w(b, &format!("{prefix}.weight"), &[width])?;
    let beta = w(b, &format!("{prefix}.bias"), &[width])?;
    b.layer_norm(x, g, beta, eps)
}

/// Name of layer `i`'s cached keys as a graph input.
pub fn past_key(i: usize) -> String {
    format!("past_key_{i}")
}

/// Name of layer `i`'s cached values as a graph input.
pub fn past_value(i: usize) -> String {
    format!("past_value_{i}")
}

/// Name of layer `i`'s updated keys as a graph output.
pub fn present_key(i: usize) -> String {
    format!("present_key_{i}")
}

/// Name of layer `i`'s updated values as a graph output.
pub fn present_value(i: usize) -> String {
    format!("present_value_{i}")
}

/// Builds the GPT-2 graph for `cfg`.
pub fn build_graph(cfg: &Gpt2Config) -> Result<Graph, ModelError> {
    Ok(build(cfg)?)
}

fn build(cfg: &Gpt2Config) -> Result<Graph, transfuse_ir::IrError> {
    let h = cfg.n_embd;
    let hd = cfg.head_dim();
    let (batch, seq, past) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let total = past.plus(&seq);
    let mut b = Builder::new();
    let ids = b.input("input_ids", vec![batch.clone(), seq.clone()], DType::I64)?;
    let mask = b.input(
        "attention_mask",
        vec![batch.clone(), total.clone()],
        DType::I64,
    )?;

    let wte = w(&mut b, "wte.weight", &[cfg.vocab_size, h])?;
    let wpe = w(&mut b, "wpe.weight", &[cfg.n_positions, h])?;
    let te = b.gather(wte, ids)?;
    let positions = b.iota(past.clone(), seq.clone())?;
    let pe = b.gather(wpe, positions)?;
    let mut x = b.add(te, pe)?;

    // Query at position past+i may see key j iff j <= past+i and key j is not padding.
    let qpos = b.iota(past.clone(), seq.clone())?;
    let qpos = b.reshape(qpos, vec![seq.clone(), 1.into()])?;
    let kpos = b.iota(0.into(), total.clone())?;
    let causal = b.compare(CmpOp::Le, kpos, qpos)?;
    let pad = additive_padding_mask(&mut b, mask)?;
    let pad = b.reshape(pad, vec![batch.clone(), 1.into(), 1.into(), total.clone()])?;
    let masked = b.scalar(f32::MIN as f64)?;
    let add_mask = b.select(causal, pad, masked)?;

    let cache_shape = vec![batch.clone(), cfg.n_head.into(), past.clone(), hd.into()];
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        let a = layer_norm(&mut b, x, &format!("{p}.ln_1"), h, cfg.layer_norm_epsilon)?;
        let qkv = conv1d(&mut b, a, &format!("{p}.attn.c_attn"), h, 3 * h)?;
        let q = b.slice(qkv, 2, 0.into(), h.into())?;
        let k = b.slice(qkv, 2, h.into(), (2 * h).into())?;
        let v = b.slice(qkv, 2, (2 * h).into(), (3 * h).into())?;
        let q = b.split_heads(q, cfg.n_head)?;
        let k = b.split_heads(k, cfg.n_head)?;
        let v = b.split_heads(v, cfg.n_head)?;
        let pk = b.input(&past_key(i), cache_shape.clone(), DType::F32)?;
        let pv = b.input(&past_value(i), cache_shape.clone(), DType::F32)?;
        let k = b.concat(&[pk, k], 2)?;
        let v = b.concat(&[pv, v], 2)?;
        b.output(&present_key(i), k);
        b.output(&present_value(i), v);
        let o = b.attention(q, k, v, Some(add_mask))?;
        let o = b.merge_heads(o)?;
        let o = conv1d(&mut b, o, &format!("{p}.attn.c_proj"), h, h)?;
        x = b.add(x, o)?;
        let m = layer_norm(&mut b, x, &format!("{p}.ln_2"), h, cfg.layer_norm_epsilon)?;
        let m = conv1d(&mut b, m, &format!("{p}.mlp.c_fc"), h, cfg.n_inner)?;
        let m = activation(&mut b, m, cfg.activation)?;
        let m = conv1d(&mut b, m, &format!("{p}.mlp.c_proj"), cfg.n_inner, h)?;
        x = b.add(x, m)?;
    }
    let x = layer_norm(&mut b, x, "ln_f", h, cfg.layer_norm_epsilon)?;
    let logits = b.linear(x, wte, None, WeightLayout::OutIn)?;
    b.output("logits", logits);
    Ok(b.finish())
}
