//! The BERT encoder graph, generic over [`BertConfig`]; weight names follow the checkpoint.
//!
//! Inputs: `input_ids`, `token_type_ids`, `attention_mask`, all i64 `[batch, seq]`.
//! Outputs: `last_hidden_state` `[batch, seq, hidden]`, `pooler_output` `[batch, hidden]` when
//! the checkpoint has a pooler, and `embeddings` `[batch, hidden]` when a [`Pooling`] head is
//! asked for. Token, segment and learned position embeddings are summed; layers are post-norm
//! with an erf GELU (or the configured activation); padded keys get `finfo(f32).min` added to
//! their scores, as in Hugging Face.

use transfuse_ir::{BResult, Builder, DType, Dim, Graph, NodeId, ReduceOp, UnaryOp, WeightLayout};

use crate::config::{Activation, BertConfig};
use crate::error::ModelError;

/// A sentence-embedding head on top of the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The hidden state of the first token (`[CLS]`).
    Cls,
    /// Mean over valid (unpadded) tokens: the sentence-transformers default.
    Mean,
    /// Max over valid tokens.
    Max,
}

impl Pooling {
    /// Parses `cls`, `mean` or `max`.
    pub fn from_name(s: &str) -> Option<Pooling> {
        match s {
            "cls" => Some(Pooling::Cls),
            "mean" => Some(Pooling::Mean),
            "max" => Some(Pooling::Max),
            _ => None,
        }
    }
}

/// What to put on top of the encoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BertHeads {
    /// Emit `pooler_output` (needs `pooler.dense.*` weights).
    pub pooler: bool,
    /// Emit `embeddings` pooled this way.
    pub pooling: Option<Pooling>,
    /// L2-normalise `embeddings`.
    pub normalize: bool,
}

/// Applies the configured feed-forward activation.
pub(crate) fn activation(b: &mut Builder, x: NodeId, act: Activation) -> BResult {
    match act {
        Activation::GeluErf => b.gelu_erf(x),
        Activation::GeluTanh => b.gelu_tanh(x),
        Activation::Relu => b.unary(UnaryOp::Relu, x),
    }
}

/// A weight declared with a known shape.
fn w(b: &mut Builder, name: &str, shape: &[usize]) -> BResult {
    b.weight(name, shape.iter().map(|&n| Dim::known(n)).collect())
}

fn dense(b: &mut Builder, x: NodeId, prefix: &str, out: usize, inp: usize) -> BResult {
    let wt = w(b, &format!("{prefix}.weight"), &[out, inp])?;
    let bias = w(b, &format!("{prefix}.bias"), &[out])?;
    b.linear(x, wt, Some(bias), WeightLayout::OutIn)
}

fn layer_norm(b: &mut Builder, x: NodeId, prefix: &str, width: usize, eps: f64) -> BResult {
    let g = w(b, &format!("{prefix}.weight"), &[width])?;
    let beta = w(b, &format!("{prefix}.bias"), &[width])?;
    b.layer_norm(x, g, beta, eps)
}

/// `(1 - mask) · finfo(f32).min` as an additive mask; `mask` is i64 `[batch, seq]`.
pub(crate) fn additive_padding_mask(b: &mut Builder, mask: NodeId) -> BResult {
    let m = b.cast(mask, DType::F32)?;
    let one = b.scalar(1.0)?;
    let inv = b.sub(one, m)?;
    b.mul_scalar(inv, f32::MIN as f64)
}

/// Builds the BERT graph for `cfg` with the given heads.
pub fn build_graph(cfg: &BertConfig, heads: BertHeads) -> Result<Graph, ModelError> {
    Ok(build(cfg, heads)?)
}

fn build(cfg: &BertConfig, heads: BertHeads) -> Result<Graph, transfuse_ir::IrError> {
    let h = cfg.hidden_size;
    let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
    let mut b = Builder::new();
    let bs = vec![batch.clone(), seq.clone()];
    let ids = b.input("input_ids", bs.clone(), DType::I64)?;
    let types = b.input("token_type_ids", bs.clone(), DType::I64)?;
    let mask = b.input("attention_mask", bs, DType::I64)?;

    let word = w(
        &mut b,
        "embeddings.word_embeddings.weight",
        &[cfg.vocab_size, h],
    )?;
    let pos = w(
        &mut b,
        "embeddings.position_embeddings.weight",
        &[cfg.max_position_embeddings, h],
    )?;
    let typ = w(
        &mut b,
        "embeddings.token_type_embeddings.weight",
        &[cfg.type_vocab_size, h],
    )?;
    let we = b.gather(word, ids)?;
    let te = b.gather(typ, types)?;
    let positions = b.iota(0.into(), seq.clone())?;
    let pe = b.gather(pos, positions)?;
    let x = b.add(we, te)?;
    let x = b.add(x, pe)?;
    let mut x = layer_norm(&mut b, x, "embeddings.LayerNorm", h, cfg.layer_norm_eps)?;

    let add_mask = additive_padding_mask(&mut b, mask)?;
    let add_mask = b.reshape(
        add_mask,
        vec![batch.clone(), 1.into(), 1.into(), seq.clone()],
    )?;

    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        let q = dense(&mut b, x, &format!("{p}.attention.self.query"), h, h)?;
        let k = dense(&mut b, x, &format!("{p}.attention.self.key"), h, h)?;
        let v = dense(&mut b, x, &format!("{p}.attention.self.value"), h, h)?;
        let q = b.split_heads(q, cfg.num_attention_heads)?;
        let k = b.split_heads(k, cfg.num_attention_heads)?;
        let v = b.split_heads(v, cfg.num_attention_heads)?;
        let a = b.attention(q, k, v, Some(add_mask))?;
        let a = b.merge_heads(a)?;
        let a = dense(&mut b, a, &format!("{p}.attention.output.dense"), h, h)?;
        let a = b.add(a, x)?;
        x = layer_norm(
            &mut b,
            a,
            &format!("{p}.attention.output.LayerNorm"),
            h,
            cfg.layer_norm_eps,
        )?;
        let f = dense(
            &mut b,
            x,
            &format!("{p}.intermediate.dense"),
            cfg.intermediate_size,
            h,
        )?;
        let f = activation(&mut b, f, cfg.hidden_act)?;
        let f = dense(
            &mut b,
            f,
            &format!("{p}.output.dense"),
            h,
            cfg.intermediate_size,
        )?;
        let f = b.add(f, x)?;
        x = layer_norm(
            &mut b,
            f,
            &format!("{p}.output.LayerNorm"),
            h,
            cfg.layer_norm_eps,
        )?;
    }
    b.output("last_hidden_state", x);

    let cls = |b: &mut Builder| -> BResult {
        let first = b.slice(x, 1, 0.into(), 1.into())?;
        b.reshape(first, vec![batch.clone(), h.into()])
    };
    if heads.pooler {
        let first = cls(&mut b)?;
        let p = dense(&mut b, first, "pooler.dense", h, h)?;
        let p = b.unary(UnaryOp::Tanh, p)?;
        b.output("pooler_output", p);
    }
    if let Some(pooling) = heads.pooling {
        let m = b.cast(mask, DType::F32)?;
        let m3 = b.reshape(m, vec![batch.clone(), seq.clone(), 1.into()])?;
        let mut e = match pooling {
            Pooling::Cls => cls(&mut b)?,
            Pooling::Mean => {
                let masked = b.mul(x, m3)?;
                let sum = b.reduce(ReduceOp::Sum, masked, &[1], false)?;
                let count = b.reduce(ReduceOp::Sum, m3, &[1], false)?;
                let eps = b.scalar(1e-9)?;
                let count = b.binary(transfuse_ir::BinaryOp::Max, count, eps)?;
                b.div(sum, count)?
            }
            Pooling::Max => {
                // Padded tokens are pushed to -1e9 so they never win the max.
                let one = b.scalar(1.0)?;
                let inv = b.sub(one, m3)?;
                let push = b.mul_scalar(inv, -1e9)?;
                let shifted = b.add(x, push)?;
                b.reduce(ReduceOp::Max, shifted, &[1], false)?
            }
        };
        if heads.normalize {
            let sq = b.mul(e, e)?;
            let ss = b.reduce(ReduceOp::Sum, sq, &[1], true)?;
            let norm = b.unary(UnaryOp::Sqrt, ss)?;
            let eps = b.scalar(1e-12)?;
            let norm = b.binary(transfuse_ir::BinaryOp::Max, norm, eps)?;
            e = b.div(e, norm)?;
        }
        b.output("embeddings", e);
    }
    Ok(b.finish())
}
