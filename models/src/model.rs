//! A model loaded from a Hugging Face folder: config, graph, weights and (optional) tokenizer.

use std::path::{Path, PathBuf};

use transfuse_ir::{eval_shape, Bindings, DType, Graph, Weights};

use crate::bert::{self, BertHeads, Pooling};
use crate::config::{load_config, ModelConfig};
use crate::error::ModelError;
use crate::gpt2;
use crate::llama;
use crate::tokenizer::Tokenizer;
use crate::weights::load_safetensors_as;

/// Prefixes a checkpoint may put before the canonical weight names.
pub fn checkpoint_prefixes(cfg: &ModelConfig) -> &'static [&'static str] {
    prefixes(cfg)
}

fn prefixes(cfg: &ModelConfig) -> &'static [&'static str] {
    match cfg {
        ModelConfig::Bert(_) => &["bert."],
        ModelConfig::Gpt2(_) => &["transformer."],
        ModelConfig::Llama(_) => &[],
    }
}

/// A loaded model.
pub struct Model {
    /// The folder it came from.
    pub dir: PathBuf,
    /// Its hyper-parameters.
    pub config: ModelConfig,
    /// Its forward graph (primitives only).
    pub graph: Graph,
    /// Its weights, by the graph's weight names.
    pub weights: Weights,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer: Option<Tokenizer>,
}

/// Builds the forward graph a config describes. For BERT, `heads` picks the extra outputs.
pub fn build_graph(cfg: &ModelConfig, heads: BertHeads) -> Result<Graph, ModelError> {
    match cfg {
        ModelConfig::Bert(c) => bert::build_graph(c, heads),
        ModelConfig::Gpt2(c) => gpt2::build_graph(c),
        ModelConfig::Llama(c) => llama::build_graph(c),
    }
}

/// The weights of `graph` that no checkpoint holds and the loader computes from the config
/// (the LLaMA family's RoPE inverse frequencies, [`llama::INV_FREQ`]).
pub fn synthesized_weights(cfg: &ModelConfig) -> Weights {
    match cfg {
        ModelConfig::Llama(c) => llama::synthesized_weights(c),
        ModelConfig::Bert(_) | ModelConfig::Gpt2(_) => Weights::new(),
    }
}

/// The `(name, shape)` of every weight `graph` reads from the checkpoint: those it declares
/// minus the [`synthesized_weights`].
pub fn checkpoint_weights(
    cfg: &ModelConfig,
    graph: &Graph,
) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let synth = synthesized_weights(cfg);
    let mut all = expected_weights(graph)?;
    all.retain(|(n, _)| !synth.contains_key(n));
    Ok(all)
}

/// The `(name, shape)` of every weight a graph declares.
pub fn expected_weights(graph: &Graph) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    graph
        .weights()
        .into_iter()
        .map(|(n, s)| Ok((n.to_string(), eval_shape(s, &Bindings::new())?)))
        .collect()
}

impl Model {
    /// Loads `dir` with the default heads (BERT: pooler when the checkpoint has one).
    pub fn load(dir: &Path) -> Result<Model, ModelError> {
        Model::load_with(dir, None, false)
    }

    /// Loads `dir`; for BERT, adds an `embeddings` output pooled by `pooling` (L2-normalised when
    /// `normalize`).
    pub fn load_with(
        dir: &Path,
        pooling: Option<Pooling>,
        normalize: bool,
    ) -> Result<Model, ModelError> {
        Model::load_as(dir, pooling, normalize, DType::F32)
    }

    /// [`Model::load_with`] with the checkpoint's float weights held on the host as `float`
    /// (`F32`, `F16` or `BF16`; [`crate::weights::load_safetensors_as`]): for a device that
    /// stores floats so, an f16 checkpoint stays f16 (never widened) and an f32 one is
    /// rounded once here, halving the host copy. The synthesized weights stay f32. The CPU
    /// backend widens f16/bf16 weights back to f32.
    pub fn load_as(
        dir: &Path,
        pooling: Option<Pooling>,
        normalize: bool,
        float: DType,
    ) -> Result<Model, ModelError> {
        let config = load_config(dir)?;
        let weights_path = dir.join("model.safetensors");
        let mut heads = BertHeads {
            pooler: true,
            pooling,
            normalize,
        };
        let (graph, weights) = loop {
            let graph = build_graph(&config, heads)?;
            let expected = checkpoint_weights(&config, &graph)?;
            match load_safetensors_as(&weights_path, &expected, prefixes(&config), float) {
                Ok(mut w) => {
                    w.extend(synthesized_weights(&config));
                    break (graph, w);
                }
                // Sentence encoders are often saved without the pooler: load without it.
                Err(ModelError::MissingWeight { name, .. })
                    if heads.pooler && name.starts_with("pooler.") =>
                {
                    heads.pooler = false
                }
                Err(e) => return Err(e),
            }
        };
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path)?)
        } else {
            None
        };
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            graph,
            weights,
            tokenizer,
        })
    }

    /// Config, graph and tokenizer of `dir` without reading any weight (`weights` is empty):
    /// for a tensor-parallel load, where each rank reads only its slices. The BERT pooler is
    /// used when the checkpoint lists its weights, as [`Model::load_with`] decides.
    pub fn load_without_weights(
        dir: &Path,
        pooling: Option<Pooling>,
        normalize: bool,
    ) -> Result<Model, ModelError> {
        let config = load_config(dir)?;
        let names = crate::weights::safetensors_names(&dir.join("model.safetensors"))?;
        let has = |n: &str| {
            std::iter::once(n.to_string())
                .chain(prefixes(&config).iter().map(|p| format!("{p}{n}")))
                .any(|k| names.contains(&k))
        };
        let heads = BertHeads {
            pooler: has("pooler.dense.weight"),
            pooling,
            normalize,
        };
        let graph = build_graph(&config, heads)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path)?)
        } else {
            None
        };
        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            graph,
            weights: Weights::new(),
            tokenizer,
        })
    }

    /// Number of token ids the embedding table holds.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size()
    }

    /// Longest sequence the position table allows (including any KV cache).
    pub fn max_positions(&self) -> usize {
        self.config.max_positions()
    }

    /// Checks token ids against the vocabulary and the position table; `offset` is the number
    /// of positions already in a KV cache.
    pub fn check_ids(&self, ids: &[Vec<i64>], offset: usize) -> Result<(), ModelError> {
        for (r, row) in ids.iter().enumerate() {
            if let Some((c, &id)) = row
                .iter()
                .enumerate()
                .find(|(_, &id)| id < 0 || id as usize >= self.vocab_size())
            {
                return Err(ModelError::Input(format!(
                    "input_ids[{r}][{c}] = {id} is out of range for a vocabulary of {}",
                    self.vocab_size()
                )));
            }
            if offset + row.len() > self.max_positions() {
                return Err(ModelError::Input(format!(
                    "sequence of {} tokens exceeds the model's position table of {} positions",
                    offset + row.len(),
                    self.max_positions()
                )));
            }
        }
        Ok(())
    }
}
