//! Memory per device: model states under mixed-precision Adam with ZeRO, stored activations by
//! Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
//! and for inference the KV cache and the live activations of one layer.
//!
//! Activations of one layer, in bytes, for `b` sequences of `s` tokens, 16-bit tensors and
//! 1-byte dropout masks, tensor parallelism `t` (Korthikanti et al. 2022, section 4 and Table 2):
//!
//! | | bytes per layer |
//! |---|---|
//! | no parallelism | `sbh(34 + 5as/h)` |
//! | tensor parallel | `sbh(10 + 24/t + 5as/(ht))` |
//! | tensor + sequence parallel | `sbh(34/t + 5as/(ht))` |
//! | tensor parallel + selective recomputation | `sbh(10 + 24/t)` |
//! | tensor + sequence parallel + selective recomputation | `sbh(34/t)` |
//! | full recomputation | `2sbh` (the layer's input; `/t` with sequence parallelism) |
//!
//! [`layer_activation_bytes`] derives these from a per-tensor account, so the same code serves
//! models the paper does not cover (grouped-query attention, gated MLPs, no dropout); for a
//! GPT-3-style layer it reduces exactly to the table (tested).

use serde::Serialize;

/// Activation recomputation (Korthikanti et al. 2022).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Store every activation the backward pass reads.
    None,
    /// Recompute the attention core (`QKᵀ`, softmax, its dropout, `PV`): drops the `5as²b` term.
    Selective,
    /// Store only each layer's input and recompute the layer in the backward pass.
    Full,
}

impl Recompute {
    /// `none`, `selective` or `full`.
    pub fn from_name(s: &str) -> Option<Recompute> {
        match s {
            "none" => Some(Recompute::None),
            "selective" => Some(Recompute::Selective),
            "full" => Some(Recompute::Full),
            _ => None,
        }
    }

    /// The name `from_name` reads.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

/// The sizes an activation account needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerShape {
    /// Hidden size `h`.
    pub hidden: f64,
    /// Attention heads `a`.
    pub heads: f64,
    /// Query width (`a · head_dim`, `h` for GPT).
    pub q_dim: f64,
    /// Key (and value) width.
    pub kv_dim: f64,
    /// MLP inner size (`4h` for GPT).
    pub intermediate: f64,
    /// Gated MLP: gate, up, the activated gate and the product (`8sbf`, against GELU's `4sbf`).
    pub gated: bool,
    /// Dropout masks stored (1 byte per element).
    pub dropout: bool,
}

impl LayerShape {
    /// A GPT-3-style layer: MLP `4h`, multi-head attention, dropout.
    pub fn gpt(hidden: f64, heads: f64) -> LayerShape {
        LayerShape {
            hidden,
            heads,
            q_dim: hidden,
            kv_dim: hidden,
            intermediate: 4.0 * hidden,
            gated: false,
            dropout: true,
        }
    }
}

/// Bytes of activations one layer stores for the backward pass, per device, for `b` sequences
/// of `s` tokens, tensor parallelism `t`, with or without sequence parallelism.
///
/// The account of Korthikanti et al. 2022, section 4.1, tensor by tensor (2 bytes per element,
/// 1 per dropout-mask element):
/// - attention: its input (the LayerNorm output) `2sbh`; Q and K `2sb·q + 2sb·kv`; V `2sb·kv`;
///   softmax output `2as²b`; softmax dropout mask `as²b` and output `2as²b`; the output
///   projection's input `2sb·q`; the residual dropout mask `sbh`;
/// - MLP: its input `2sbh`; the first linear's output(s) and the activation output `4sbf`
///   (`8sbf` gated: gate, up, activated gate, product); the residual dropout mask `sbh`;
/// - two norms: their inputs, `4sbh`.
///
/// With tensor parallelism the projections, the attention core and the MLP inner tensors are
/// split `t` ways; the norms, their outputs and the residual dropout masks (`10sbh` for GPT)
/// are replicated unless sequence parallelism splits them along the sequence.
pub fn layer_activation_bytes(
    shape: &LayerShape,
    b: f64,
    s: f64,
    t: f64,
    sequence_parallel: bool,
    recompute: Recompute,
) -> f64 {
    let sb = s * b;
    let h = shape.hidden;
    let mask = if shape.dropout { 1.0 } else { 0.0 };
    if recompute == Recompute::Full {
        let input = 2.0 * sb * h;
        return if sequence_parallel { input / t } else { input };
    }
    // Replicated under plain tensor parallelism: two norm inputs, two norm outputs (the
    // attention and MLP inputs), two residual dropout masks.
    let replicated = sb * h * (4.0 + 4.0 + 2.0 * mask);
    // Split t ways: Q, K, V, the output projection's input; the MLP's inner tensors.
    let mlp_inner = if shape.gated { 8.0 } else { 4.0 } * sb * shape.intermediate;
    let split = sb * (4.0 * shape.q_dim + 4.0 * shape.kv_dim) + mlp_inner;
    // The attention core: softmax output, and with dropout its mask and output.
    let core = shape.heads * s * s * b * (2.0 + 3.0 * mask);
    let core = if recompute == Recompute::Selective {
        0.0
    } else {
        core
    };
    let replicated = if sequence_parallel {
        replicated / t
    } else {
        replicated
    };
    replicated + (split + core) / t
}

/// ZeRO stage (Rajbhandari et al. 2020): 1 shards the optimizer states over the data-parallel
/// group, 2 also the gradients, 3 also the weights.
pub type ZeroStage = u8;

/// Bytes per parameter of mixed-precision Adam (Rajbhandari et al. 2020, section 3.1): 2 for
/// the fp16/bf16 weights, 2 for their gradients, 12 for the optimizer (fp32 master weights,
/// momentum, variance): 16 in all without ZeRO.
pub const WEIGHT_BYTES: f64 = 2.0;
/// See [`WEIGHT_BYTES`].
pub const GRADIENT_BYTES: f64 = 2.0;
/// See [`WEIGHT_BYTES`].
pub const OPTIMIZER_BYTES: f64 = 12.0;

/// Bytes of model states per device for `params` parameters on the device (after tensor and
/// pipeline parallelism) under ZeRO stage `zero` over `d` data-parallel ranks:
/// `(weights, gradients, optimizer)`.
pub fn model_state_bytes(params: f64, zero: ZeroStage, d: f64) -> (f64, f64, f64) {
    let shard = |stage: ZeroStage| if zero >= stage { d } else { 1.0 };
    (
        WEIGHT_BYTES * params / shard(3),
        GRADIENT_BYTES * params / shard(2),
        OPTIMIZER_BYTES * params / shard(1),
    )
}

/// Micro-batches whose activations the first stage holds at once under 1F1B: `p` (one per
/// stage in flight), or all `m` when there are fewer (Narayanan et al. 2021, section 2.2.1).
pub fn in_flight_micro_batches(p: u64, m: u64) -> u64 {
    p.min(m)
}
