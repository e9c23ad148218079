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

/// A parsed `config.json` of a supported model family.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    /// `model_type: "bert"`.
    Bert(BertConfig),
    /// `model_type: "gpt2"`.
    Gpt2(Gpt2Config),
}

impl ModelConfig {
    /// The Hugging Face `model_type` string: `"bert"` or `"gpt2"`.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Bert(_) => "bert",
            ModelConfig::Gpt2(_) => "gpt2",
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
