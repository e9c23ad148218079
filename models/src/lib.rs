//! # transfuse-models
//!
//! BERT, GPT-2 and the LLaMA family (`model_type` llama, mistral, qwen2) from Hugging Face model
//! folders: this crate reads a folder's `config.json` ([`config`]), its `model.safetensors`
//! weights ([`weights`]) and its `tokenizer.json` ([`tokenizer`]), and builds the model's tensor
//! graph in the `transfuse-ir` IR ([`bert`], [`gpt2`], [`llama`]).
//!
//! The decoders (GPT-2 and the LLaMA family) take their KV cache as graph inputs
//! `past_key_{i}` / `past_value_{i}` and return it as `present_key_{i}` / `present_value_{i}`
//! ([`ModelConfig::cache_shape`] gives its shape). LLaMA-family graphs read one weight no
//! checkpoint holds, RoPE's inverse frequencies [`llama::INV_FREQ`], which [`Model::load`]
//! computes from the config ([`synthesized_weights`]).
//!
//! It depends on the IR only — never on the optimisation passes, code generation or the
//! runtime — so a graph and its weights can be produced, inspected and printed without any
//! backend; running them is the runtime's business.
//!
//! ```no_run
//! use std::path::Path;
//! use transfuse_models::{load_config, ModelConfig};
//!
//! let dir = Path::new("tests/fixtures/tiny_gpt2/model");
//! match load_config(dir)? {
//!     ModelConfig::Gpt2(c) => println!("GPT-2 with {} layers", c.n_layer),
//!     ModelConfig::Bert(c) => println!("BERT with {} layers", c.num_hidden_layers),
//!     ModelConfig::Llama(c) => println!("{} with {} layers", c.family.model_type(), c.num_hidden_layers),
//! }
//! # Ok::<(), transfuse_models::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod bert;
pub mod config;
pub mod error;
pub mod gpt2;
pub mod llama;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use bert::{BertHeads, Pooling};
pub use config::{
    load_config, parse_config, Activation, BertConfig, CacheShape, Gpt2Config, LlamaConfig,
    LlamaFamily, ModelConfig, RopeConfig, RopeScaling,
};
pub use error::ModelError;
pub use model::checkpoint_prefixes;
pub use model::{build_graph, checkpoint_weights, expected_weights, synthesized_weights, Model};
pub use tokenizer::Tokenizer;
pub use weights::{
    load_all_safetensors, load_safetensors, load_safetensors_as, load_safetensors_sliced,
    safetensors_names, AxisSlice, LoadStats, SliceRequest,
};
