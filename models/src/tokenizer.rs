//! Hugging Face tokenizers (`tokenizer.json`): WordPiece for BERT, byte-level BPE for GPT-2,
//! SentencePiece-style BPE with byte fallback for the LLaMA family.
//!
//! Encoding behaves like a plain `transformers` tokenizer call: the padding and truncation
//! stored in `tokenizer.json` are switched off (some files, e.g. all-MiniLM-L6-v2's, pad every
//! input to a fixed 128), and [`Tokenizer::encode_batch_padded`] pads to the longest input of
//! the batch instead, with the file's pad id.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::ModelError;

/// A tokenizer loaded from a `tokenizer.json` file.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pad_id: u32,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    ///
    /// The pad id is the one of the file's padding config if it has one, else the id of
    /// `[PAD]` if the vocabulary has it, else 0.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_str(&text).map_err(|e| ModelError::Tokenizer {
                path: path.to_owned(),
                msg: e.to_string(),
            })?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_owned(),
                msg: e.to_string(),
            })?;
        Ok(Tokenizer {
            inner,
            path: path.to_owned(),
            pad_id,
        })
    }

    /// The ids of `text`; with `add_special_tokens` the model's template (e.g. BERT's
    /// `[CLS] … [SEP]`, LLaMA's leading `<s>`) is applied. GPT-2's template adds nothing.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Encodes `texts` with special tokens and right-pads them with the pad id to the longest;
    /// returns `(ids, attention_mask)`, both `texts.len()` rows of equal length, the mask 1 on
    /// real tokens and 0 on padding.
    #[allow(clippy::type_complexity)]
    pub fn encode_batch_padded(
        &self,
        texts: &[&str],
    ) -> Result<(Vec<Vec<i64>>, Vec<Vec<i64>>), ModelError> {
        let mut ids = texts
            .iter()
            .map(|t| self.encode(t, true))
            .collect::<Result<Vec<_>, _>>()?;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut masks = Vec::with_capacity(ids.len());
        for row in &mut ids {
            let mut mask = vec![1i64; row.len()];
            mask.resize(longest, 0);
            row.resize(longest, i64::from(self.pad_id));
            masks.push(mask);
        }
        Ok((ids, masks))
    }

    /// The text of `ids`, skipping special tokens. An id outside the vocabulary is a
    /// [`ModelError::Input`].
    pub fn decode(&self, ids: &[i64]) -> Result<String, ModelError> {
        let ids = ids
            .iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&id| self.inner.id_to_token(id).is_some())
                    .ok_or_else(|| {
                        ModelError::Input(format!(
                            "token id {id} is not in the vocabulary of {}",
                            self.path.display()
                        ))
                    })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        self.inner.decode(&ids, true).map_err(|e| self.err(e))
    }

    /// Number of ids, added tokens included (30522 for BERT-base uncased, 50257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id [`encode_batch_padded`](Self::encode_batch_padded) pads with.
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// The id of a token (e.g. `<|endoftext|>`, `[SEP]`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    fn err(&self, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}
