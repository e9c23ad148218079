//! # transfuse
//!
//! A compiler for Transformer models. This facade ties the crates together: load a Hugging Face
//! folder ([`models`]), get its tensor graph ([`ir`]), run it on a backend ([`runtime`]) through
//! a [`Session`] that first optimizes it ([`passes`]: fused attention, norms, epilogues):
//! `forward` for a batch, `generate` for greedy/sampled decoding with a KV cache,
//! `embed` for sentence embeddings.
//!
//! ```
//! use transfuse::{Batch, Session};
//! use transfuse::models::Model;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_gpt2/model");
//! let session = Session::cpu(Model::load(dir.as_ref()).unwrap()).unwrap();
//! assert_eq!(session.graph.op_counts()["attention"], 2); // fused by the optimizer
//! let out = session.forward(&Batch::new(vec![vec![1, 2, 3]])).unwrap();
//! assert_eq!(out["logits"].shape, vec![1, 3, 1000]);
//! let ids = session.generate(&[1, 2, 3], 4, transfuse::Sampling::Greedy).unwrap();
//! assert_eq!(ids.len(), 7);
//! ```
#![warn(missing_docs)]

pub mod attention_bench;
pub mod pp;
pub mod sp;
pub mod tp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use transfuse_codegen as codegen;
pub use transfuse_ir as ir;
pub use transfuse_models as models;
pub use transfuse_passes as passes;
pub use transfuse_runtime as runtime;

use ir::Tensor;
use models::config::ModelConfig;
use models::{gpt2, Model, ModelError};
use std::sync::Mutex;

use runtime::{Backend, CpuBackend, Loaded, RuntimeError, TensorMap};

/// Everything that can go wrong in a session or the CLI; each variant names its culprit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or validating a model or its inputs.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Running a graph.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Optimizing a graph.
    #[error(transparent)]
    Pass(#[from] passes::PassError),
    /// Lowering a graph to kernels.
    #[error(transparent)]
    Codegen(#[from] codegen::CodegenError),
    /// A malformed inputs file.
    #[error("{}: {msg}", path.display())]
    Inputs {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A request the model or options cannot serve.
    #[error("{0}")]
    Usage(String),
    /// Sharding a graph for tensor parallelism (`--tp`).
    #[error(transparent)]
    Shard(#[from] passes::shard::ShardError),
}

/// A batch of token ids with optional masks, rows of equal length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// `[batch][seq]` token ids.
    pub input_ids: Vec<Vec<i64>>,
    /// `[batch][seq]`, 1 = real token, 0 = padding; all ones when absent.
    pub attention_mask: Option<Vec<Vec<i64>>>,
    /// `[batch][seq]` segment ids (BERT); zeros when absent.
    pub token_type_ids: Option<Vec<Vec<i64>>>,
}

impl Batch {
    /// A batch of ids without masks.
    pub fn new(input_ids: Vec<Vec<i64>>) -> Batch {
        Batch {
            input_ids,
            attention_mask: None,
            token_type_ids: None,
        }
    }

    /// Reads `{"input_ids": [[..]], "attention_mask"?: [[..]], "token_type_ids"?: [[..]]}`.
    pub fn from_json_file(path: &Path) -> Result<Batch, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Batch::from_json_str(&text).map_err(|msg| Error::Inputs {
            path: path.into(),
            msg,
        })
    }

    /// Parses the JSON form; the error says which field and row is wrong.
    pub fn from_json_str(text: &str) -> Result<Batch, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let matrix = |key: &str| -> Result<Option<Vec<Vec<i64>>>, String> {
            let Some(m) = obj.get(key) else {
                return Ok(None);
            };
            let rows = m
                .as_array()
                .ok_or_else(|| format!("`{key}` must be an array of rows"))?;
            let mut out = Vec::with_capacity(rows.len());
            for (r, row) in rows.iter().enumerate() {
                let row = row
                    .as_array()
                    .ok_or_else(|| format!("`{key}[{r}]` must be an array of integers"))?;
                let ints: Option<Vec<i64>> = row.iter().map(|x| x.as_i64()).collect();
                out.push(ints.ok_or_else(|| format!("`{key}[{r}]` must hold integers only"))?);
            }
            Ok(Some(out))
        };
        let batch = Batch {
            input_ids: matrix("input_ids")?.ok_or("missing `input_ids`")?,
            attention_mask: matrix("attention_mask")?,
            token_type_ids: matrix("token_type_ids")?,
        };
        batch.validate()?;
        Ok(batch)
    }

    /// Checks the batch is non-empty and rectangular and the masks match the ids.
    pub fn validate(&self) -> Result<(), String> {
        let ids = &self.input_ids;
        if ids.is_empty() || ids[0].is_empty() {
            return Err("`input_ids` is empty".into());
        }
        let seq = ids[0].len();
        if let Some((r, row)) = ids.iter().enumerate().find(|(_, r)| r.len() != seq) {
            return Err(format!(
                "`input_ids` is ragged: row {r} has {} tokens, row 0 has {seq}",
                row.len()
            ));
        }
        for (key, m) in [
            ("attention_mask", &self.attention_mask),
            ("token_type_ids", &self.token_type_ids),
        ] {
            if let Some(m) = m {
                if m.len() != ids.len() {
                    return Err(format!(
                        "`{key}` has {} rows, `input_ids` has {}",
                        m.len(),
                        ids.len()
                    ));
                }
                if let Some((r, row)) = m.iter().enumerate().find(|(_, r)| r.len() != seq) {
                    return Err(format!(
                        "`{key}` row {r} has {} entries, expected {seq}",
                        row.len()
                    ));
                }
            }
        }
        Ok(())
    }

    fn dims(&self) -> (usize, usize) {
        (self.input_ids.len(), self.input_ids[0].len())
    }
}

fn matrix_tensor(m: &[Vec<i64>]) -> Tensor {
    let cols = m.first().map_or(0, Vec::len);
    Tensor::i64(vec![m.len(), cols], m.concat())
}

/// One step of [`Session::generate_steps`].
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Host wall time, reading the logits back included.
    pub seconds: f64,
    /// Device bytes the step wrote (`None` on the CPU backend).
    pub written: Option<runtime::BytesWritten>,
}

/// How `generate` picks the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Sample from softmax(logits / temperature) restricted to the `top_k` most likely tokens
    /// (0 = no restriction), with a seeded generator (runs are reproducible).
    Sample {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Keep only this many candidates (0 = all).
        top_k: usize,
        /// Random seed.
        seed: u64,
    },
}

/// The `--dtype` name of a float storage type (`f32`, `f16`, `bf16`).
pub fn storage_name(e: codegen::kir::Elem) -> &'static str {
    match e {
        codegen::kir::Elem::F16 => "f16",
        codegen::kir::Elem::BF16 => "bf16",
        _ => "f32",
    }
}

/// The float storage type `--dtype` names: `f32`, `f16` or `bf16`; anything else is a usage
/// error naming the flag.
pub fn parse_storage(name: &str) -> Result<codegen::kir::Elem, Error> {
    match name {
        "f32" => Ok(codegen::kir::Elem::F32),
        "f16" => Ok(codegen::kir::Elem::F16),
        "bf16" => Ok(codegen::kir::Elem::BF16),
        other => Err(Error::Usage(format!(
            "--dtype `{other}` is unknown (expected f32, f16 or bf16)"
        ))),
    }
}

/// The host float type weights are loaded as for device storage `storage`
/// ([`models::Model::load_as`]): f16/bf16 storage keeps them in that type, anything else f32.
pub fn host_float(storage: codegen::kir::Elem) -> ir::DType {
    match storage {
        codegen::kir::Elem::F16 => ir::DType::F16,
        codegen::kir::Elem::BF16 => ir::DType::BF16,
        _ => ir::DType::F32,
    }
}

/// A usage error unless `backend` can store float tensors as `storage`.
pub fn check_storage(backend: &dyn Backend, storage: codegen::kir::Elem) -> Result<(), Error> {
    let can = backend.storage_types();
    if can.contains(&storage) {
        return Ok(());
    }
    let why = match (backend.name(), storage) {
        ("cpu", _) => " (the CPU backend is the f32 reference)",
        ("wgpu", codegen::kir::Elem::BF16) => " (WGSL has no bf16 type)",
        ("wgpu", _) => " (the adapter lacks the shader-f16 feature)",
        _ => "",
    };
    let can: Vec<&str> = can.into_iter().map(storage_name).collect();
    Err(Error::Usage(format!(
        "--dtype {}: the {} backend ({}) runs {} only{why}",
        storage_name(storage),
        backend.name(),
        backend.description(),
        can.join(", ")
    )))
}

/// A model bound to a backend.
pub struct Session {
    /// The model (its `graph` is the primitive graph as built).
    pub model: Model,
    /// The graph that runs: the optimizer's output, or the model's graph unoptimized.
    pub graph: ir::Graph,
    /// What the optimizer did (`None` when it did not run).
    pub report: Option<passes::Report>,
    /// The weights `graph` reads: the model's, plus the weight-only sub-expressions of the
    /// optimized graph (merged QKV, transposes, folded norms) computed once at load.
    pub weights: ir::Weights,
    backend: Box<dyn Backend>,
    /// The graph loaded on the backend (kernels compiled, weights resident).
    program: Mutex<Box<dyn Loaded>>,
    /// Tensor parallelism: the ranks' load statistics and communicators (`None`: one device).
    /// With it, `graph` and `weights` are rank 0's.
    pub tp: Option<tp::TpState>,
    /// Pipeline parallelism: the stage cut and the stages' communicators (`None`: one stage).
    pub pp: Option<pp::PpState>,
}

impl Session {
    /// A session on any backend running the optimized graph (default optimizer options).
    pub fn new(model: Model, backend: Box<dyn Backend>) -> Result<Session, Error> {
        Session::with_options(model, backend, Some(&passes::Options::default()))
    }

    /// A session that optimizes with `opts`, or runs the primitive graph when `None`. Options
    /// with the default `gpu` cost profile get the backend's own instead
    /// ([`Backend::cost_profile`]: `cpu` for the CPU backend, `cpu-adapter` for wgpu on a CPU
    /// adapter); any other profile is kept.
    pub fn with_options(
        model: Model,
        backend: Box<dyn Backend>,
        opts: Option<&passes::Options>,
    ) -> Result<Session, Error> {
        Session::with_storage(model, backend, opts, codegen::kir::Elem::F32)
    }

    /// [`Session::with_options`] with the float tensors stored on the device as `storage`
    /// (`F16`/`BF16`: weights converted once at load, activations in that type, kernels
    /// accumulating in f32; inputs and outputs stay f32 on the host). A backend that does not
    /// list `storage` in [`Backend::storage_types`] (the CPU backend, the f32 reference; bf16
    /// on WebGPU, which has no bf16 type) is a usage error naming the backend and the type.
    pub fn with_storage(
        model: Model,
        backend: Box<dyn Backend>,
        opts: Option<&passes::Options>,
        storage: codegen::kir::Elem,
    ) -> Result<Session, Error> {
        check_storage(backend.as_ref(), storage)?;
        let (graph, weights, report) = Session::graph_for(&model, opts, backend.cost_profile())?;
        let program = Mutex::new(backend.load_as(&graph, &weights, storage)?);
        Ok(Session {
            model,
            graph,
            report,
            weights,
            backend,
            program,
            tp: None,
            pp: None,
        })
    }

    /// The graph a session runs: optimized with `opts` (and its weight-only subgraphs folded),
    /// or as built without; its weights and the optimizer's report. `transfuse tune` tunes
    /// this graph, so its kernels are the ones a session looks up in the tuning cache.
    /// `profile` is the backend's cost profile ([`Backend::cost_profile`]), used when `opts`
    /// carry the default `gpu` one.
    pub fn graph_for(
        model: &Model,
        opts: Option<&passes::Options>,
        profile: &str,
    ) -> Result<(ir::Graph, ir::Weights, Option<passes::Report>), Error> {
        let (graph, report) = match opts {
            Some(o) => {
                let mut o = o.clone();
                if o.profile == passes::Profile::gpu() {
                    if let Some(p) = passes::Profile::by_name(profile) {
                        o.profile = p;
                    }
                }
                let (g, r) = passes::optimize(&model.graph, &o)?;
                (g, Some(r))
            }
            None => (model.graph.clone(), None),
        };
        let (graph, weights) = match report {
            Some(_) => runtime::fold_weights(&graph, &model.weights)?,
            None => (graph, model.weights.clone()),
        };
        Ok((graph, weights, report))
    }

    /// Where the last run's kernel tunables came from (device backends).
    pub fn tuning(&self) -> Option<runtime::TuningUse> {
        self.lock().tuning()
    }

    pub(crate) fn from_parts(
        model: Model,
        graph: ir::Graph,
        report: Option<passes::Report>,
        weights: ir::Weights,
        backend: Box<dyn Backend>,
        program: Box<dyn Loaded>,
        tp: Option<tp::TpState>,
    ) -> Session {
        Session {
            model,
            graph,
            report,
            weights,
            backend,
            program: Mutex::new(program),
            tp,
            pp: None,
        }
    }

    /// A session on the CPU reference backend running the optimized graph.
    pub fn cpu(model: Model) -> Result<Session, Error> {
        Session::new(model, Box::new(CpuBackend::new()))
    }

    /// A session on the CPU reference backend running the primitive graph as built.
    pub fn cpu_unoptimized(model: Model) -> Session {
        Session::with_options(model, Box::new(CpuBackend::new()), None)
            .expect("no optimizer, no error")
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// The device the backend runs on, for people.
    pub fn backend_description(&self) -> String {
        self.backend.description()
    }

    /// Device memory of the last run (GPU backends): resident, I/O, temporaries planned by
    /// liveness against one buffer per tensor.
    pub fn memory(&self) -> Option<runtime::MemoryReport> {
        self.lock().memory()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Loaded>> {
        // A panic while running leaves nothing half-updated that a later call relies on.
        self.program.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, inputs: &TensorMap, carry: &[(String, String)]) -> Result<TensorMap, Error> {
        Ok(self.lock().run(inputs, carry)?)
    }

    /// An empty KV cache (`past` = 0) for a decoder; nothing for an encoder.
    fn empty_cache_inputs(&self, batch: usize, inputs: &mut TensorMap) {
        if let Some(c) = self.model.config.cache_shape() {
            // Under tensor parallelism each rank's cache holds its key/value heads.
            let degree = match (&self.tp, &self.pp) {
                (Some(t), _) => t.degree,
                (None, Some(p)) => p.tp,
                (None, None) => 1,
            };
            let kv_heads = match degree > 1 {
                true => tp::local_kv_heads(&self.model.config, degree).unwrap_or(c.kv_heads),
                false => c.kv_heads,
            };
            for i in 0..c.layers {
                for name in [gpt2::past_key(i), gpt2::past_value(i)] {
                    inputs.insert(
                        name,
                        Tensor::f32(vec![batch, kv_heads, 0, c.head_dim], vec![]),
                    );
                }
            }
        }
    }

    /// The graph inputs for `batch`, validated (ids, masks, token types; an empty KV cache
    /// for decoders).
    fn batch_inputs(&self, batch: &Batch) -> Result<TensorMap, Error> {
        batch.validate().map_err(Error::Usage)?;
        self.model.check_ids(&batch.input_ids, 0)?;
        let (b, s) = batch.dims();
        let ones = || vec![vec![1i64; s]; b];
        let bad_mask = batch
            .attention_mask
            .iter()
            .flatten()
            .enumerate()
            .find_map(|(r, row)| {
                row.iter()
                    .position(|&m| m != 0 && m != 1)
                    .map(|c| (r, c, row[c]))
            });
        if let Some((r, c, m)) = bad_mask {
            return Err(ModelError::Input(format!(
                "attention_mask[{r}][{c}] = {m}; expected 0 or 1"
            ))
            .into());
        }
        let mut inputs: TensorMap = HashMap::new();
        inputs.insert("input_ids".into(), matrix_tensor(&batch.input_ids));
        inputs.insert(
            "attention_mask".into(),
            matrix_tensor(batch.attention_mask.as_ref().unwrap_or(&ones())),
        );
        match &self.model.config {
            ModelConfig::Bert(c) => {
                let types = batch
                    .token_type_ids
                    .clone()
                    .unwrap_or_else(|| vec![vec![0; s]; b]);
                let bad = types.iter().enumerate().find_map(|(r, row)| {
                    row.iter()
                        .position(|&t| t < 0 || t as usize >= c.type_vocab_size)
                        .map(|col| (r, col, row[col]))
                });
                if let Some((r, col, t)) = bad {
                    return Err(ModelError::Input(format!(
                        "token_type_ids[{r}][{col}] = {t} is out of range for {} token types",
                        c.type_vocab_size
                    ))
                    .into());
                }
                inputs.insert("token_type_ids".into(), matrix_tensor(&types));
            }
            ModelConfig::Gpt2(_) | ModelConfig::Llama(_) => self.empty_cache_inputs(b, &mut inputs),
        }
        Ok(inputs)
    }

    /// Runs the model on a batch. Decoders give `logits`; encoders `last_hidden_state` (and
    /// `pooler_output` / `embeddings` when the model has them).
    pub fn forward(&self, batch: &Batch) -> Result<TensorMap, Error> {
        let inputs = self.batch_inputs(batch)?;
        let mut out = self.run(&inputs, &[])?;
        out.retain(|k, _| !k.starts_with("present_"));
        Ok(out)
    }

    /// Runs `batch` once timing each kernel (each launch synchronised; on the CPU backend, each
    /// op).
    pub fn profile(&self, batch: &Batch) -> Result<Vec<runtime::KernelTime>, Error> {
        let inputs = self.batch_inputs(batch)?;
        Ok(self.lock().profile(&inputs)?)
    }

    /// Times `iters` forward runs of `batch` as [`Loaded::time_forward`] does: on device
    /// backends inputs uploaded once and each run timed by the device's timestamps where it has
    /// them (`clock` `"device"`), else from its first launch to a device sync (`"host-sync"`);
    /// on the CPU whole runs (`"host"`).
    pub fn time_forward(&self, batch: &Batch, iters: usize) -> Result<runtime::Timing, Error> {
        let inputs = self.batch_inputs(batch)?;
        Ok(self.lock().time_forward(&inputs, iters)?)
    }

    /// Decodes `max_new` tokens after `prompt` (a decoder model), reusing the KV cache: one
    /// prefill over the prompt, then one single-token step per new token. Returns prompt + new ids.
    pub fn generate(
        &self,
        prompt: &[i64],
        max_new: usize,
        sampling: Sampling,
    ) -> Result<Vec<i64>, Error> {
        Ok(self.generate_timed(prompt, max_new, sampling)?.0)
    }

    /// [`Session::generate`], also returning the host wall time of each step in seconds:
    /// the first is the prefill (time to first token), the others one token each. Each step
    /// includes reading its logits back, as decoding must.
    pub fn generate_timed(
        &self,
        prompt: &[i64],
        max_new: usize,
        sampling: Sampling,
    ) -> Result<(Vec<i64>, Vec<f64>), Error> {
        let (ids, steps) = self.generate_steps(prompt, max_new, sampling)?;
        Ok((ids, steps.into_iter().map(|s| s.seconds).collect()))
    }

    /// [`Session::generate`], also returning per step (the prefill first) its host wall time
    /// and the device bytes it wrote ([`runtime::Loaded::bytes_written`]; `None` on the CPU
    /// backend).
    pub fn generate_steps(
        &self,
        prompt: &[i64],
        max_new: usize,
        sampling: Sampling,
    ) -> Result<(Vec<i64>, Vec<Step>), Error> {
        let Some(cache) = self.model.config.cache_shape() else {
            return Err(Error::Usage(format!(
                "generate needs a decoder model; {} is a `{}` encoder",
                self.model.dir.display(),
                self.model.config.model_type()
            )));
        };
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt is empty".into()));
        }
        self.model.check_ids(&[prompt.to_vec()], 0)?;
        let positions = self.model.max_positions();
        if prompt.len() + max_new > positions {
            return Err(ModelError::Input(format!(
                "prompt of {} tokens + {max_new} new tokens exceeds the model's {positions} positions",
                prompt.len(),
            ))
            .into());
        }
        let mut rng = SplitMix(match sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        });
        let mut ids = prompt.to_vec();
        let mut inputs: TensorMap = HashMap::new();
        self.empty_cache_inputs(1, &mut inputs);
        // The cache stays on the backend's device between steps: each `present_*` output
        // becomes the next step's `past_*` input.
        let carry: Vec<(String, String)> = (0..cache.layers)
            .flat_map(|i| {
                [
                    (gpt2::present_key(i), gpt2::past_key(i)),
                    (gpt2::present_value(i), gpt2::past_value(i)),
                ]
            })
            .collect();
        let mut program = self.lock();
        program.clear_carry();
        let mut step: Vec<i64> = prompt.to_vec();
        let mut times = Vec::with_capacity(max_new);
        for _ in 0..max_new {
            let t0 = std::time::Instant::now();
            inputs.insert(
                "input_ids".into(),
                Tensor::i64(vec![1, step.len()], step.clone()),
            );
            inputs.insert(
                "attention_mask".into(),
                Tensor::i64(vec![1, ids.len()], vec![1; ids.len()]),
            );
            let mut out = program.run(&inputs, &carry)?;
            // From now on the carried cache is the input.
            inputs.retain(|k, _| !k.starts_with("past_"));
            let logits = out.remove("logits").expect("decoder graphs output logits");
            let v = logits.shape[2];
            let data = logits.as_f32().expect("logits are f32");
            let last = &data[data.len() - v..];
            let next = pick(last, sampling, &mut rng);
            ids.push(next);
            step = vec![next];
            times.push(Step {
                seconds: t0.elapsed().as_secs_f64(),
                written: program.bytes_written(),
            });
        }
        program.clear_carry();
        Ok((ids, times))
    }

    /// Sentence embeddings of `texts` (a BERT model loaded with a pooling head), `[n, hidden]`.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor, Error> {
        if self.model.config.cache_shape().is_some() {
            return Err(Error::Usage(format!(
                "embed needs a BERT-family encoder; {} is a `{}` decoder",
                self.model.dir.display(),
                self.model.config.model_type()
            )));
        }
        if !self.graph.outputs().iter().any(|(n, _)| n == "embeddings") {
            return Err(Error::Usage(
                "the model was loaded without a pooling head".into(),
            ));
        }
        let tok = self.model.tokenizer.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "{} has no tokenizer.json",
                self.model.dir.display()
            ))
        })?;
        if texts.is_empty() {
            return Err(Error::Usage("no text to embed".into()));
        }
        let (input_ids, mask) = tok.encode_batch_padded(texts)?;
        let batch = Batch {
            input_ids,
            attention_mask: Some(mask),
            token_type_ids: None,
        };
        let mut out = self.forward(&batch)?;
        Ok(out.remove("embeddings").expect("checked above"))
    }
}

/// A small seeded generator (SplitMix64); sampling only needs reproducible uniform floats.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

fn pick(logits: &[f32], sampling: Sampling, rng: &mut SplitMix) -> i64 {
    match sampling {
        Sampling::Greedy => argmax(logits) as i64,
        Sampling::Sample {
            temperature, top_k, ..
        } => {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            if top_k > 0 {
                order.truncate(top_k);
            }
            let t = temperature.max(1e-6);
            let m = logits[order[0]];
            let weights: Vec<f32> = order.iter().map(|&i| ((logits[i] - m) / t).exp()).collect();
            let total: f32 = weights.iter().sum();
            let mut r = rng.next_f32() * total;
            for (k, w) in weights.iter().enumerate() {
                if r < *w {
                    return order[k] as i64;
                }
                r -= w;
            }
            order[order.len() - 1] as i64
        }
    }
}

/// Writes named tensors (f32, f16, bf16, i64, bool) as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<(), Error> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, raw) = match &t.data {
                ir::Data::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                ir::Data::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                ir::Data::Bool(v) => (Dtype::BOOL, v.iter().map(|&x| x as u8).collect()),
                ir::Data::F16(v) => (Dtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                ir::Data::BF16(v) => (
                    Dtype::BF16,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            };
            (name.to_string(), dtype, t.shape.clone(), raw)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("sizes match"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Io {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// The fused ops a report's graph contains, e.g. `attention ×2, layer_norm ×5`.
pub fn fusion_summary(r: &passes::Report) -> String {
    let fused: Vec<String> = r
        .ops_after
        .iter()
        .filter(|(k, _)| FUSED_NAMES.contains(&k.as_str()))
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect();
    if fused.is_empty() {
        "no fusion".into()
    } else {
        fused.join(", ")
    }
}

/// Printable names of the fused ops.
pub const FUSED_NAMES: &[&str] = &[
    "attention",
    "softmax",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "batch_norm",
    "fused_matmul",
    "gated_matmul",
    "rope",
];

/// The optimizer report as one JSON object (the `transfuse compile --json` contract).
pub fn report_json(r: &passes::Report) -> serde_json::Value {
    serde_json::json!({
        "ops_before": r.ops_before,
        "ops_after": r.ops_after,
        "egraph": {
            "nodes": r.egraph.nodes,
            "classes": r.egraph.classes,
            "iterations": r.egraph.iterations,
            "stop_reason": r.egraph.stop_reason,
            "seconds": r.egraph.seconds,
        },
        "rules_applied": r.rules_applied,
        "cost_before": r.cost_before,
        "cost_after": r.cost_after,
        "seconds": r.seconds,
    })
}

/// The optimizer report as a table: op counts before and after, then saturation statistics.
pub fn report_table(r: &passes::Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{:<16} {:>8} {:>8}", "op", "before", "after");
    let names: std::collections::BTreeSet<&String> =
        r.ops_before.keys().chain(r.ops_after.keys()).collect();
    for n in names {
        let (b, a) = (
            r.ops_before.get(n).unwrap_or(&0),
            r.ops_after.get(n).unwrap_or(&0),
        );
        let _ = writeln!(s, "{n:<16} {b:>8} {a:>8}");
    }
    let e = &r.egraph;
    let _ = writeln!(
        s,
        "e-graph: {} nodes, {} classes, {} iterations, stopped: {}, {:.1} ms",
        e.nodes,
        e.classes,
        e.iterations,
        e.stop_reason,
        e.seconds * 1e3
    );
    let _ = writeln!(
        s,
        "estimated cost: {:.3e} s → {:.3e} s ({:.1}× less)",
        r.cost_before,
        r.cost_after,
        r.cost_before / r.cost_after.max(1e-30)
    );
    s
}
