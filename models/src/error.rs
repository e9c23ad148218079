//! The one error type of model loading: every variant that concerns a file names it.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model folder (config, weights, tokenizer) or
/// turning user input into model inputs.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read (missing, unreadable, not mappable).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON, lacks a field, or holds a value of the wrong type or
    /// out of range.
    #[error("{}: malformed config: {msg}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// `config.json` names a model family this crate does not build.
    #[error("{}: unknown model_type `{model_type}` (supported: bert, gpt2, llama, mistral, qwen2)", path.display())]
    UnknownModelType {
        /// The config file.
        path: PathBuf,
        /// The `model_type` it holds.
        model_type: String,
    },
    /// `config.json` asks for a rotary-embedding scaling (`rope_type`) this crate does not build
    /// (e.g. `dynamic`, `yarn`).
    #[error("{}: unsupported rope_type `{rope_type}` (supported: {supported})", path.display())]
    UnsupportedRope {
        /// The config file.
        path: PathBuf,
        /// The `rope_type` (or legacy `type`) it holds.
        rope_type: String,
        /// The kinds that are supported.
        supported: &'static str,
    },
    /// A weights file is not a well-formed safetensors file (truncated, corrupt header, ...).
    #[error("{}: invalid safetensors: {msg}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A weight the model needs is not in the file (under any accepted prefix).
    #[error("{}: missing weight `{name}`", path.display())]
    MissingWeight {
        /// The weights file.
        path: PathBuf,
        /// The canonical (unprefixed) name of the weight.
        name: String,
    },
    /// A weight has a shape other than the config implies.
    #[error("{}: weight `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    WeightShape {
        /// The weights file.
        path: PathBuf,
        /// The canonical name of the weight.
        name: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A weight is stored in a dtype that is not converted to f32 (only F32, F16, BF16 are).
    #[error("{}: weight `{name}` has unsupported dtype {dtype}", path.display())]
    WeightDtype {
        /// The weights file.
        path: PathBuf,
        /// The canonical name of the weight.
        name: String,
        /// The safetensors dtype, e.g. `I64`.
        dtype: String,
    },
    /// `tokenizer.json` could not be parsed, or encoding/decoding failed.
    #[error("{}: tokenizer: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// User input that does not fit the model (e.g. a token id outside the vocabulary).
    #[error("invalid input: {0}")]
    Input(String),
    /// Graph construction failed.
    #[error(transparent)]
    Ir(#[from] transfuse_ir::IrError),
}
