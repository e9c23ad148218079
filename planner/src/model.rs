//! The model as the planner sees it: a stack of identical Transformer layers plus embeddings and
//! an output layer, read from a Hugging Face `config.json` (GPT-2, BERT, LLaMA, Mistral, Qwen2)
//! or from a generic GPT-3-style description (`n_layer`, `hidden`, `heads`, `vocab`, `seq`).
//!
//! Only sizes matter here: parameter counts, matmul flops and stored activations follow from
//! `layers`, `hidden`, the head counts, `intermediate`, `vocab` and the MLP kind. Refuses a config
//! whose sizes are missing, zero or inconsistent (hidden not divisible by heads, kv heads not
//! dividing heads), naming the file and the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::PlanError;

/// The sizes of a Transformer, enough to count parameters, flops and activation bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelDesc {
    /// A display name (the config's `_name_or_path`, else the family).
    pub name: String,
    /// `gpt2`, `bert`, `llama`, `mistral`, `qwen2` or `gpt` (the generic GPT-3-style form).
    pub family: String,
    /// Transformer layers `L`.
    pub layers: u64,
    /// Hidden size `h`.
    pub hidden: u64,
    /// Attention (query) heads `a`.
    pub heads: u64,
    /// Key/value heads (equal to `heads` without grouped-query attention).
    pub kv_heads: u64,
    /// Size of one head.
    pub head_dim: u64,
    /// MLP inner size (`4h` for GPT-2 without `n_inner`).
    pub intermediate: u64,
    /// Vocabulary size `V`.
    pub vocab: u64,
    /// The longest sequence the position table or the config allows.
    pub max_positions: u64,
    /// Learned absolute position embeddings (GPT-2, BERT, GPT-3); rotary models have none.
    pub learned_positions: bool,
    /// Token-type embeddings (BERT).
    pub type_vocab: u64,
    /// Gated MLP (SwiGLU: gate, up, down), as LLaMA, Mistral and Qwen2.
    pub gated_mlp: bool,
    /// Biases on the linear layers (GPT-2, BERT, GPT-3); Qwen2 has them on q/k/v only.
    pub linear_bias: bool,
    /// Bias on the q/k/v projections only (Qwen2).
    pub qkv_bias: bool,
    /// LayerNorm (weight and bias) rather than RMSNorm (weight only).
    pub layer_norm: bool,
    /// Dropout in training (GPT-2, BERT, GPT-3); its masks are stored activations.
    pub dropout: bool,
    /// Output embedding tied to the input embedding.
    pub tied_embeddings: bool,
    /// A causal decoder with a language-model head (and, in inference, a KV cache); `false` for
    /// BERT-style encoders.
    pub decoder: bool,
}

impl ModelDesc {
    /// The generic GPT-3-style model of Brown et al. 2020 / Narayanan et al. 2021: MLP `4h`,
    /// learned positions, LayerNorm, biases, dropout, tied embeddings.
    pub fn gpt(name: &str, layers: u64, hidden: u64, heads: u64, vocab: u64, seq: u64) -> Self {
        ModelDesc {
            name: name.to_string(),
            family: "gpt".into(),
            layers,
            hidden,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            intermediate: 4 * hidden,
            vocab,
            max_positions: seq,
            learned_positions: true,
            type_vocab: 0,
            gated_mlp: false,
            linear_bias: true,
            qkv_bias: true,
            layer_norm: true,
            dropout: true,
            tied_embeddings: true,
            decoder: true,
        }
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, PlanError> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a config file (Hugging Face or the generic GPT-3-style form).
    pub fn from_file(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::Config {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::from_json(&text).map_err(|msg| PlanError::Config {
            path: path.display().to_string(),
            msg,
        })
    }

    /// Parses config JSON; the error names the field.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(m) = v else {
            return Err("not a JSON object".into());
        };
        let ty = m.get("model_type").and_then(Value::as_str).unwrap_or("");
        let name = m
            .get("_name_or_path")
            .or_else(|| m.get("name"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let d = match ty {
            "gpt2" => gpt2(&m)?,
            "bert" => bert(&m)?,
            "llama" | "mistral" | "qwen2" => llama_like(&m, ty)?,
            "gpt" | "" if m.contains_key("n_layer") && m.contains_key("hidden") => generic(&m)?,
            "" => {
                return Err("no `model_type` (expected gpt2, bert, llama, mistral, qwen2, or gpt with n_layer, hidden, heads, vocab, seq)".into())
            }
            other => {
                return Err(format!(
                    "unsupported model_type `{other}` (expected gpt2, bert, llama, mistral, qwen2 or gpt)"
                ))
            }
        };
        let d = ModelDesc {
            name: name.unwrap_or_else(|| d.family.clone()),
            ..d
        };
        d.check()?;
        Ok(d)
    }

    fn check(&self) -> Result<(), String> {
        if self.head_dim * self.heads != self.hidden && !self.gated_mlp {
            return Err(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden, self.heads
            ));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "{} key/value heads do not divide {} attention heads",
                self.kv_heads, self.heads
            ));
        }
        Ok(())
    }

    /// Width of the query projection (`heads · head_dim`).
    pub fn q_dim(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// Width of the key (and of the value) projection (`kv_heads · head_dim`).
    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// Parameters of the matmuls of one layer (the weights that cost `2·tokens` flops each).
    pub fn layer_matmul_params(&self) -> u64 {
        let h = self.hidden;
        let attn = h * (self.q_dim() + 2 * self.kv_dim()) + self.q_dim() * h;
        let mlp = if self.gated_mlp { 3 } else { 2 } * h * self.intermediate;
        attn + mlp
    }

    /// All parameters of one layer: matmuls, biases, norms.
    pub fn layer_params(&self) -> u64 {
        let h = self.hidden;
        let mut p = self.layer_matmul_params();
        if self.linear_bias {
            // q, k, v, attention output; MLP in (and gate when gated), MLP out.
            p += self.q_dim() + 2 * self.kv_dim() + h;
            p += if self.gated_mlp { 2 } else { 1 } * self.intermediate + h;
        } else if self.qkv_bias {
            p += self.q_dim() + 2 * self.kv_dim();
        }
        p += 2 * self.norm_params();
        p
    }

    fn norm_params(&self) -> u64 {
        if self.layer_norm {
            2 * self.hidden
        } else {
            self.hidden
        }
    }

    /// Input embeddings: tokens, learned positions, token types (and BERT's embedding norm).
    pub fn embedding_params(&self) -> u64 {
        let h = self.hidden;
        let mut p = self.vocab * h + self.type_vocab * h;
        if self.learned_positions {
            p += self.max_positions * h;
        }
        if self.family == "bert" {
            p += self.norm_params();
        }
        p
    }

    /// The final norm and, when not tied, the output embedding (`V·h`).
    pub fn head_params(&self) -> u64 {
        let final_norm = if self.family == "bert" {
            0
        } else {
            self.norm_params()
        };
        let lm = if self.decoder && !self.tied_embeddings {
            self.vocab * self.hidden
        } else {
            0
        };
        final_norm + lm
    }

    /// Every parameter of the model.
    pub fn params(&self) -> u64 {
        self.layers * self.layer_params() + self.embedding_params() + self.head_params()
    }

    /// Forward flops of one layer for `b` sequences of `s` tokens: `2·tokens` per matmul
    /// parameter plus the attention scores and their product with the values (`4·b·s²·q_dim`,
    /// counted in full as Narayanan et al. 2021 eq. 3 counts them, causal or not).
    pub fn layer_forward_flops(&self, b: u64, s: u64) -> f64 {
        let tokens = (b * s) as f64;
        2.0 * tokens * self.layer_matmul_params() as f64 + self.attention_core_flops(b, s)
    }

    /// The attention core of one layer (`QKᵀ` and `PV`): `4·b·s²·q_dim` flops.
    pub fn attention_core_flops(&self, b: u64, s: u64) -> f64 {
        4.0 * b as f64 * (s as f64).powi(2) * self.q_dim() as f64
    }

    /// Forward flops of the output layer (`2·b·s·h·V`); zero for encoders.
    pub fn logits_forward_flops(&self, b: u64, s: u64) -> f64 {
        if self.decoder {
            2.0 * (b * s) as f64 * (self.hidden * self.vocab) as f64
        } else {
            0.0
        }
    }
}

fn get_u64(m: &Map<String, Value>, key: &str) -> Result<u64, String> {
    match m.get(key) {
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{key}` must be a whole number ≥ 1, got {v}")),
        None => Err(format!("missing `{key}`")),
    }
}

fn opt_u64(m: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => get_u64(m, key).map(Some),
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str, default: bool) -> bool {
    m.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn gpt2(m: &Map<String, Value>) -> Result<ModelDesc, String> {
    let (l, h, a) = (
        get_u64(m, "n_layer")?,
        get_u64(m, "n_embd")?,
        get_u64(m, "n_head")?,
    );
    let mut d = ModelDesc::gpt(
        "gpt2",
        l,
        h,
        a,
        get_u64(m, "vocab_size")?,
        get_u64(m, "n_positions")?,
    );
    d.family = "gpt2".into();
    d.intermediate = opt_u64(m, "n_inner")?.unwrap_or(4 * h);
    d.tied_embeddings = opt_bool(m, "tie_word_embeddings", true);
    Ok(d)
}

fn bert(m: &Map<String, Value>) -> Result<ModelDesc, String> {
    let (l, h, a) = (
        get_u64(m, "num_hidden_layers")?,
        get_u64(m, "hidden_size")?,
        get_u64(m, "num_attention_heads")?,
    );
    let mut d = ModelDesc::gpt(
        "bert",
        l,
        h,
        a,
        get_u64(m, "vocab_size")?,
        get_u64(m, "max_position_embeddings")?,
    );
    d.family = "bert".into();
    d.intermediate = get_u64(m, "intermediate_size")?;
    d.type_vocab = opt_u64(m, "type_vocab_size")?.unwrap_or(2);
    d.decoder = false;
    Ok(d)
}

fn llama_like(m: &Map<String, Value>, ty: &str) -> Result<ModelDesc, String> {
    let (l, h, a) = (
        get_u64(m, "num_hidden_layers")?,
        get_u64(m, "hidden_size")?,
        get_u64(m, "num_attention_heads")?,
    );
    let kv = opt_u64(m, "num_key_value_heads")?.unwrap_or(a);
    let head_dim = match opt_u64(m, "head_dim")? {
        Some(d) => d,
        None if h % a == 0 => h / a,
        None => return Err(format!("hidden size {h} is not divisible by {a} heads")),
    };
    Ok(ModelDesc {
        name: ty.to_string(),
        family: ty.to_string(),
        layers: l,
        hidden: h,
        heads: a,
        kv_heads: kv,
        head_dim,
        intermediate: get_u64(m, "intermediate_size")?,
        vocab: get_u64(m, "vocab_size")?,
        max_positions: get_u64(m, "max_position_embeddings")?,
        learned_positions: false,
        type_vocab: 0,
        gated_mlp: true,
        linear_bias: opt_bool(m, "mlp_bias", false),
        qkv_bias: ty == "qwen2" || opt_bool(m, "attention_bias", false),
        layer_norm: false,
        dropout: false,
        tied_embeddings: opt_bool(m, "tie_word_embeddings", false),
        decoder: true,
    })
}

fn generic(m: &Map<String, Value>) -> Result<ModelDesc, String> {
    let d = ModelDesc::gpt(
        "gpt",
        get_u64(m, "n_layer")?,
        get_u64(m, "hidden")?,
        get_u64(m, "heads")?,
        get_u64(m, "vocab")?,
        get_u64(m, "seq")?,
    );
    if !d.hidden.is_multiple_of(d.heads) {
        return Err(format!(
            "hidden size {} is not divisible by {} heads",
            d.hidden, d.heads
        ));
    }
    Ok(d)
}
