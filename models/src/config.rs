//! Model hyper-parameters read from a Hugging Face `config.json`.
//!
//! Only the fields the graphs need are read; every other field is ignored. Absent optional
//! fields take the defaults of the Hugging Face config classes. Every problem is a
//! [`ModelError::Config`] naming the offending field, or [`ModelError::UnknownModelType`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ModelError;

/// The feed-forward non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// The exact GELU, `x * Φ(x)` with the error function (HF `gelu`).
    GeluErf,
    /// The tanh approximation of GELU (HF `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `max(x, 0)` (HF `relu`).
    Relu,
}

impl Activation {
    /// The activation a Hugging Face name (`hidden_act`, `activation_function`) denotes, if
    /// supported.
    pub fn from_hf_name(name: &str) -> Option<Activation> {
        match name {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// Hyper-parameters of a BERT encoder (`model_type: "bert"`).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Number of word-piece ids.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of learned positions (default 512).
    pub max_position_embeddings: usize,
    /// Number of token types / segments (default 2).
    pub type_vocab_size: usize,
    /// Feed-forward activation (`hidden_act`, default `gelu`, i.e. erf GELU).
    pub hidden_act: Activation,
    /// Layer-norm epsilon (default 1e-12).
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Hyper-parameters of a GPT-2 decoder (`model_type: "gpt2"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Number of BPE ids.
    pub vocab_size: usize,
    /// Model width.
    pub n_embd: usize,
    /// Number of decoder blocks.
    pub n_layer: usize,
    /// Attention heads per block; divides `n_embd`.
    pub n_head: usize,
    /// Number of learned positions (default 1024).
    pub n_positions: usize,
    /// Width of the MLP; `null` or absent in the file means `4 * n_embd`.
    pub n_inner: usize,
    /// MLP activation (`activation_function`, default `gelu_new`, i.e. tanh GELU).
    pub activation: Activation,
    /// Layer-norm epsilon (default 1e-5).
    pub layer_norm_epsilon: f64,
}

impl Gpt2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// Which member of the LLaMA family a [`LlamaConfig`] came from (its `model_type`); the graph
/// depends only on the config's fields, this only names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlamaFamily {
    /// `model_type: "llama"`.
    Llama,
    /// `model_type: "mistral"`.
    Mistral,
    /// `model_type: "qwen2"`.
    Qwen2,
}

impl LlamaFamily {
    /// The Hugging Face `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Mistral => "mistral",
            LlamaFamily::Qwen2 => "qwen2",
        }
    }
}

/// How the rotary embedding's inverse frequencies are scaled (`rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `θ^(−2i/d)` unscaled.
    Default,
    /// `linear`: every inverse frequency divided by `factor` (positions interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated (by wavelength against `original_max_position_embeddings`).
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// `low_freq_factor` (1 in LLaMA 3).
        low_freq_factor: f64,
        /// `high_freq_factor` (4 in LLaMA 3).
        high_freq_factor: f64,
        /// `original_max_position_embeddings` (8192 in LLaMA 3).
        original_max_position_embeddings: usize,
    },
}

/// Rotary embedding parameters, from `rope_parameters` (transformers 5.x) or top-level
/// `rope_theta` + `rope_scaling` (4.x).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base θ (`rope_theta`, default 10000).
    pub theta: f64,
    /// The scaling of the inverse frequencies.
    pub scaling: RopeScaling,
}

/// Hyper-parameters of a LLaMA-family decoder (`model_type` llama, mistral or qwen2): one
/// config type for the three, since their graphs differ only in these fields.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Which `model_type` it was read from.
    pub family: LlamaFamily,
    /// Number of token ids.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (`num_key_value_heads`, default `num_attention_heads`);
    /// divides `num_attention_heads` (GQA; 1 = MQA).
    pub num_key_value_heads: usize,
    /// Width of one head (`head_dim`, default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// The declared context length (`max_position_embeddings`); inputs longer than this are
    /// refused, as with GPT-2's position table.
    pub max_position_embeddings: usize,
    /// RMS-norm epsilon (`rms_norm_eps`, default 1e-6).
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// The LM head is `embed_tokens` transposed (`tie_word_embeddings`, default false).
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (LLaMA `attention_bias`; always for Qwen2).
    pub qkv_bias: bool,
    /// A bias on the output projection (LLaMA `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate, up and down projections (LLaMA `mlp_bias`).
    pub mlp_bias: bool,
    /// Per layer, the sliding window `W` (a query at i sees keys `i − W < j ≤ i`), or `None`
    /// for full causal attention.
    pub sliding_window: Vec<Option<usize>>,
}

impl LlamaConfig {
    /// Query heads per key/value head (1 = plain multi-head attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// A parsed `config.json` of a supported model family.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// `model_type: "bert"`.
    Bert(BertConfig),
    /// `model_type: "gpt2"`.
    Gpt2(Gpt2Config),
    /// `model_type` `llama`, `mistral` or `qwen2`.
    Llama(LlamaConfig),
}

/// The shape of a decoder's KV cache: `past_key_{i}` / `past_value_{i}` for `i < layers`, each
/// `[batch, kv_heads, past, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Number of layers (cache pairs).
    pub layers: usize,
    /// Heads stored per layer (GQA stores the key/value heads, not the query heads).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl ModelConfig {
    /// The Hugging Face `model_type` string: `"bert"`, `"gpt2"`, `"llama"`, `"mistral"` or
    /// `"qwen2"`.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Bert(_) => "bert",
            ModelConfig::Gpt2(_) => "gpt2",
            ModelConfig::Llama(c) => c.family.model_type(),
        }
    }

    /// The KV cache of a decoder; `None` for encoders.
    pub fn cache_shape(&self) -> Option<CacheShape> {
        match self {
            ModelConfig::Bert(_) => None,
            ModelConfig::Gpt2(c) => Some(CacheShape {
                layers: c.n_layer,
                kv_heads: c.n_head,
                head_dim: c.head_dim(),
            }),
            ModelConfig::Llama(c) => Some(CacheShape {
                layers: c.num_hidden_layers,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            }),
        }
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// Longest sequence the model takes (including any KV cache): the position table of
    /// BERT/GPT-2, the declared context of rotary models.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }
}

/// Reads and parses `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    parse_config(&path, &text)
}

/// Parses the text of a `config.json`; `path` is only used in error messages.
pub fn parse_config(path: &Path, text: &str) -> Result<ModelConfig, ModelError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
        path: path.to_owned(),
        msg: format!("invalid JSON: {e}"),
    })?;
    let Value::Object(obj) = &value else {
        return Err(ModelError::Config {
            path: path.to_owned(),
            msg: format!("expected a JSON object, found {}", kind(&value)),
        });
    };
    let f = Fields { path, obj };
    let model_type = match obj.get("model_type") {
        None | Some(Value::Null) => return Err(f.err("missing field `model_type`".into())),
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(f.err(format!(
                "field `model_type`: expected a string, found {}",
                kind(v)
            )))
        }
    };
    match model_type {
        "bert" => parse_bert(&f).map(ModelConfig::Bert),
        "gpt2" => parse_gpt2(&f).map(ModelConfig::Gpt2),
        "llama" => parse_llama(&f, LlamaFamily::Llama).map(ModelConfig::Llama),
        "mistral" => parse_llama(&f, LlamaFamily::Mistral).map(ModelConfig::Llama),
        "qwen2" => parse_llama(&f, LlamaFamily::Qwen2).map(ModelConfig::Llama),
        other => Err(ModelError::UnknownModelType {
            path: path.to_owned(),
            model_type: other.to_owned(),
        }),
    }
}

fn parse_bert(f: &Fields<'_>) -> Result<BertConfig, ModelError> {
    let position_type = f.string_or("position_embedding_type", "absolute")?;
    if position_type != "absolute" {
        return Err(f.err(format!(
            "field `position_embedding_type`: unsupported value `{position_type}` (supported: absolute)"
        )));
    }
    let c = BertConfig {
        vocab_size: f.size("vocab_size", None)?,
        hidden_size: f.size("hidden_size", None)?,
        num_hidden_layers: f.size("num_hidden_layers", None)?,
        num_attention_heads: f.size("num_attention_heads", None)?,
        intermediate_size: f.size("intermediate_size", None)?,
        max_position_embeddings: f.size("max_position_embeddings", Some(512))?,
        type_vocab_size: f.size("type_vocab_size", Some(2))?,
        hidden_act: f.activation("hidden_act", "gelu")?,
        layer_norm_eps: f.eps("layer_norm_eps", 1e-12)?,
    };
    f.divides(
        "num_attention_heads",
        c.num_attention_heads,
        "hidden_size",
        c.hidden_size,
    )?;
    Ok(c)
}

fn parse_gpt2(f: &Fields<'_>) -> Result<Gpt2Config, ModelError> {
    // Variants of GPT-2 attention that the graph does not implement.
    if !f.bool_or("scale_attn_weights", true)? {
        return Err(f.err("field `scale_attn_weights`: only `true` is supported".into()));
    }
    if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
        return Err(
            f.err("field `scale_attn_by_inverse_layer_idx`: only `false` is supported".into())
        );
    }
    let n_embd = f.size("n_embd", None)?;
    let n_inner = match f.obj.get("n_inner") {
        None | Some(Value::Null) => n_embd
            .checked_mul(4)
            .ok_or_else(|| f.err(format!("field `n_embd`: {n_embd} is too large")))?,
        Some(_) => f.size("n_inner", None)?,
    };
    let c = Gpt2Config {
        vocab_size: f.size("vocab_size", None)?,
        n_embd,
        n_layer: f.size("n_layer", None)?,
        n_head: f.size("n_head", None)?,
        n_positions: f.size("n_positions", Some(1024))?,
        n_inner,
        activation: f.activation("activation_function", "gelu_new")?,
        layer_norm_epsilon: f.eps("layer_norm_epsilon", 1e-5)?,
    };
    f.divides("n_head", c.n_head, "n_embd", c.n_embd)?;
    Ok(c)
}

fn parse_llama(f: &Fields<'_>, family: LlamaFamily) -> Result<LlamaConfig, ModelError> {
    let act = f.string_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(f.err(format!(
            "field `hidden_act`: unsupported activation `{act}` for `{}` (supported: silu)",
            family.model_type()
        )));
    }
    let hidden_size = f.size("hidden_size", None)?;
    let heads = f.size("num_attention_heads", None)?;
    let kv_heads = f.size("num_key_value_heads", Some(heads))?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(f.err(format!(
            "field `num_key_value_heads` ({kv_heads}) does not divide `num_attention_heads` ({heads})"
        )));
    }
    let head_dim = match f.get("head_dim") {
        Some(_) => f.size("head_dim", None)?,
        None => {
            f.divides("num_attention_heads", heads, "hidden_size", hidden_size)?;
            hidden_size / heads
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(f.err(format!(
            "head dim {head_dim} is odd; rotary embeddings rotate pairs (i, i + head_dim/2)"
        )));
    }
    let layers = f.size("num_hidden_layers", None)?;
    let max_positions = f.size(
        "max_position_embeddings",
        Some(match family {
            LlamaFamily::Llama => 2048,
            LlamaFamily::Mistral => 4096 * 32,
            LlamaFamily::Qwen2 => 32768,
        }),
    )?;
    let (qkv_bias, o_bias, mlp_bias) = match family {
        LlamaFamily::Llama => {
            let a = f.bool_or("attention_bias", false)?;
            (a, a, f.bool_or("mlp_bias", false)?)
        }
        LlamaFamily::Mistral => (false, false, false),
        LlamaFamily::Qwen2 => (true, false, false),
    };
    Ok(LlamaConfig {
        family,
        vocab_size: f.size("vocab_size", None)?,
        hidden_size,
        intermediate_size: f.size("intermediate_size", None)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: max_positions,
        rms_norm_eps: f.eps("rms_norm_eps", 1e-6)?,
        rope: parse_rope(f, max_positions)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window: sliding_windows(f, family, layers)?,
    })
}

/// The window of each layer. `layer_types` (transformers 5.x: `full_attention` /
/// `sliding_attention`) wins when present; otherwise Mistral slides every layer when
/// `sliding_window` is set, Qwen2 the layers from `max_window_layers` on when
/// `use_sliding_window` is true, LLaMA none.
fn sliding_windows(
    f: &Fields<'_>,
    family: LlamaFamily,
    layers: usize,
) -> Result<Vec<Option<usize>>, ModelError> {
    let window = match f.get("sliding_window") {
        Some(_) => Some(f.size("sliding_window", None)?),
        None => None,
    };
    let slides: Vec<bool> = match (f.get("layer_types"), family) {
        (_, LlamaFamily::Llama) => vec![false; layers],
        (Some(Value::Array(types)), _) => {
            if types.len() != layers {
                return Err(f.err(format!(
                    "field `layer_types`: {} entries for {layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(f.err(format!(
                        "field `layer_types`: unsupported entry {t} \
                         (supported: full_attention, sliding_attention)"
                    ))),
                })
                .collect::<Result<_, _>>()?
        }
        (Some(v), _) => {
            return Err(f.err(format!(
                "field `layer_types`: expected an array, found {}",
                kind(v)
            )))
        }
        (None, LlamaFamily::Mistral) => vec![window.is_some(); layers],
        (None, LlamaFamily::Qwen2) => {
            let on = f.bool_or("use_sliding_window", false)?;
            let from = match f.get("max_window_layers") {
                Some(_) => f.size_or_zero("max_window_layers")?,
                None => 28,
            };
            (0..layers).map(|i| on && i >= from).collect()
        }
    };
    slides
        .into_iter()
        .map(|s| match (s, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => Err(f.err(
                "a layer uses sliding attention but field `sliding_window` is null or missing"
                    .into(),
            )),
        })
        .collect()
}

/// RoPE kinds this crate builds.
const ROPE_KINDS: &str = "default, linear, llama3";

fn parse_rope(f: &Fields<'_>, max_positions: usize) -> Result<RopeConfig, ModelError> {
    // 5.x: `rope_parameters`; 4.x: `rope_scaling` (null for the default) + top-level `rope_theta`.
    let (key, params) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(p)) => ("rope_scaling", Some(p)),
        (None, None) => ("rope_scaling", None),
    };
    let empty = Map::new();
    let params = match params {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(f.err(format!(
                "field `{key}`: expected an object, found {}",
                kind(v)
            )))
        }
    };
    let sub = Fields {
        path: f.path,
        obj: params,
    };
    let pfx = |k: &str| format!("{key}.{k}");
    let num = |k: &str, default: Option<f64>| -> Result<f64, ModelError> {
        match params.get(k).filter(|v| !v.is_null()) {
            None => default.ok_or_else(|| f.err(format!("missing field `{}`", pfx(k)))),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(f.err(format!(
                    "field `{}`: expected a positive number, found {v}",
                    pfx(k)
                ))),
            },
        }
    };
    let kind_name = match (params.get("rope_type"), params.get("type")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s.as_str(),
        (None, None) => "default",
        (Some(v), _) | (_, Some(v)) => {
            return Err(f.err(format!(
                "field `{}`: expected a string, found {}",
                pfx("rope_type"),
                kind(v)
            )))
        }
    };
    let theta = match params.get("rope_theta").filter(|v| !v.is_null()) {
        Some(_) => num("rope_theta", None)?,
        None => f.eps("rope_theta", 10000.0)?,
    };
    let partial = match params.get("partial_rotary_factor").filter(|v| !v.is_null()) {
        Some(_) => num("partial_rotary_factor", None)?,
        None => f.eps("partial_rotary_factor", 1.0)?,
    };
    if partial != 1.0 {
        return Err(f.err(format!(
            "field `partial_rotary_factor`: only 1 is supported, found {partial}"
        )));
    }
    let scaling = match kind_name {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor", None)?,
        },
        "llama3" => {
            let original = match params.get("original_max_position_embeddings") {
                Some(v) if !v.is_null() => sub
                    .size("original_max_position_embeddings", None)
                    .map_err(|_| {
                        f.err(format!(
                            "field `{}`: expected a positive integer, found {v}",
                            pfx("original_max_position_embeddings")
                        ))
                    })?,
                _ => max_positions,
            };
            let (low, high) = (
                num("low_freq_factor", None)?,
                num("high_freq_factor", None)?,
            );
            if high <= low {
                return Err(f.err(format!(
                    "field `{}` ({high}) must exceed `{}` ({low})",
                    pfx("high_freq_factor"),
                    pfx("low_freq_factor")
                )));
            }
            RopeScaling::Llama3 {
                factor: num("factor", None)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(ModelError::UnsupportedRope {
                path: f.path.to_owned(),
                rope_type: other.to_owned(),
                supported: ROPE_KINDS,
            })
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// Typed access to the fields of a config object, with errors naming the field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> ModelError {
        ModelError::Config {
            path: self.path.to_owned(),
            msg,
        }
    }

    /// The field if present and not `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A positive integer; `default` is used when the field is absent (required if `None`).
    fn size(&self, key: &str, default: Option<usize>) -> Result<usize, ModelError> {
        let Some(v) = self.get(key) else {
            return default.ok_or_else(|| self.err(format!("missing field `{key}`")));
        };
        let n = v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.err(format!(
                    "field `{key}`: expected a positive integer, found {v}"
                ))
            })?;
        if n == 0 {
            return Err(self.err(format!("field `{key}`: must be positive, found 0")));
        }
        Ok(n)
    }

    /// A non-negative integer (0 allowed); the field must be present.
    fn size_or_zero(&self, key: &str) -> Result<usize, ModelError> {
        match self.get(key) {
            Some(Value::Number(n)) if n.as_u64().is_some() => {
                usize::try_from(n.as_u64().unwrap_or(0))
                    .map_err(|_| self.err(format!("field `{key}`: {n} is too large")))
            }
            Some(v) => Err(self.err(format!(
                "field `{key}`: expected a non-negative integer, found {v}"
            ))),
            None => Err(self.err(format!("missing field `{key}`"))),
        }
    }

    /// A finite positive number (layer-norm epsilon).
    fn eps(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(self.err(format!(
                "field `{key}`: expected a positive number, found {v}"
            ))),
        }
    }

    fn string_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(format!(
                "field `{key}`: expected a string, found {}",
                kind(v)
            ))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!(
                "field `{key}`: expected a boolean, found {}",
                kind(v)
            ))),
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation, ModelError> {
        let name = self.string_or(key, default)?;
        Activation::from_hf_name(name).ok_or_else(|| {
            self.err(format!(
                "field `{key}`: unsupported activation `{name}` \
                 (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"
            ))
        })
    }

    fn divides(
        &self,
        heads_key: &str,
        heads: usize,
        width_key: &str,
        width: usize,
    ) -> Result<(), ModelError> {
        if !width.is_multiple_of(heads) {
            return Err(self.err(format!(
                "field `{heads_key}` ({heads}) does not divide `{width_key}` ({width})"
            )));
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
