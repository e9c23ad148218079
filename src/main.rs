//! The `transfuse` command line. Errors are one line on stderr and exit code 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

mod bench;
mod plan;
mod tune_cli;
use transfuse::ir::{to_dot, to_text, Tensor};
use transfuse::models::{build_graph, load_config, BertHeads, Model, Pooling};
use transfuse::{write_safetensors, Batch, Error, Sampling, Session};

#[derive(Parser)]
#[command(
    name = "transfuse",
    version,
    about = "A compiler for Transformer models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a model runs.
#[derive(Args)]
struct Exec {
    /// Backend: cpu, wgpu, cuda, or auto (CUDA when a device exists, else the best wgpu
    /// adapter, else cpu).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Run the primitive graph as built, without the optimizer's fusions.
    #[arg(long)]
    no_optimize: bool,
    /// Tensor parallelism: run N ranks (threads of this process; CPU backends, or with
    /// `--backend wgpu` each its own wgpu device), each on its own slices of the weights.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// How `--tp` shards the model: auto (each placement chosen by the cost model),
    /// megatron (one all-reduce per row-parallel site, bias and residual after it),
    /// megatron-fused (bias and residual before it, in the matmul's epilogue on rank 0) or
    /// megatron-sp (sequence-parallel norms: reduce-scatter and all-gather around them).
    #[arg(long, default_value = "auto")]
    tp_layout: String,
    /// With `--tp N --backend cuda`: the job spans K processes (nodes), N/K ranks on each, one
    /// GPU per rank, collectives over NCCL. `--nnodes 1` runs NCCL even at `--tp 1`.
    #[arg(long)]
    nnodes: Option<usize>,
    /// With `--nnodes K`: this process's node, 0..K (default 0).
    #[arg(long)]
    node_rank: Option<usize>,
    /// With `--nnodes K`: a file on a filesystem every node shares; node 0 writes the NCCL id
    /// there (the file must not exist; it is removed once every rank has joined), the others
    /// wait for it (at most TRANSFUSE_TP_TIMEOUT seconds). Without it, set NCCL_COMM_ID=host:port
    /// on every node.
    #[arg(long)]
    rendezvous: Option<PathBuf>,
    /// Pipeline parallelism: cut the layers into P stages balanced by the cost model, one
    /// thread per stage (each its own backend: a wgpu stage its own device), activations passed
    /// through the in-process communicator; combines with `--tp` (P×T ranks).
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Under `--pp`: split the batch into M micro-batches that flow through the stages (M must
    /// divide the batch; decoding runs one).
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Print the device (adapter) chosen and, after running, its memory plan and how many
    /// kernels took their tunables from the tuning cache.
    #[arg(long, short)]
    verbose: bool,
    /// Ignore the tuning cache: every kernel runs its default tunables.
    #[arg(long)]
    no_cache: bool,
    /// Storage type of float tensors on the device: f32, f16 or bf16 (weights converted once
    /// at load, kernels accumulate in f32). The CPU backend runs f32 only; WebGPU has no bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a model on a batch of token ids and write its outputs as safetensors.
    Run {
        /// Hugging Face folder (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// JSON with `input_ids` and optional `attention_mask`, `token_type_ids` ([batch][seq]).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (`logits`, or `last_hidden_state` [+ `pooler_output`]).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        exec: Exec,
    },
    /// Generate tokens with a decoder model (greedy by default) using a KV cache.
    Generate {
        /// Hugging Face folder of a GPT-2 model.
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs tokenizer.json in the folder).
        #[arg(
            long,
            conflicts_with = "prompt_ids",
            required_unless_present = "prompt_ids"
        )]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Option<Vec<i64>>,
        /// How many tokens to generate.
        #[arg(long)]
        max_new_tokens: usize,
        /// Sample with this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f32>,
        /// With sampling: keep only the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// With sampling: random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print `{"ids": [...], "text": ...}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        exec: Exec,
    },
    /// Sentence embeddings with a BERT-family encoder.
    Embed {
        /// Hugging Face folder with tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// A text to embed (repeatable).
        #[arg(long = "text", required = true)]
        texts: Vec<String>,
        /// Pooling: mean (default), cls or max.
        #[arg(long, default_value = "mean")]
        pooling: String,
        /// Skip the L2 normalisation.
        #[arg(long)]
        no_normalize: bool,
        /// Print the embeddings as JSON.
        #[arg(long, conflicts_with = "out")]
        json: bool,
        /// Write `embeddings` [n, hidden] as safetensors.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        exec: Exec,
    },
    /// Optimize a model's graph and report the fusions (config.json alone is enough).
    Compile {
        /// Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// Print the before/after op table and saturation statistics.
        #[arg(long)]
        report: bool,
        /// Print one JSON object (ops_before, ops_after, egraph, seconds, ...).
        #[arg(long)]
        json: bool,
        /// Write the input graph as Graphviz DOT.
        #[arg(long)]
        dot_before: Option<PathBuf>,
        /// Write the optimized graph as Graphviz DOT.
        #[arg(long)]
        dot_after: Option<PathBuf>,
        /// Cost-model target: gpu (default), cpu or cpu-adapter (a Vulkan CPU adapter such as
        /// lavapipe).
        #[arg(long, default_value = "gpu")]
        profile: String,
        /// E-graph node limit (a whole number ≥ 1).
        #[arg(long, allow_hyphen_values = true)]
        node_limit: Option<String>,
        /// E-graph iteration limit (a whole number ≥ 1).
        #[arg(long, allow_hyphen_values = true)]
        iter_limit: Option<String>,
        /// E-graph time limit in seconds (> 0).
        #[arg(long, allow_hyphen_values = true)]
        time_limit: Option<String>,
        /// Lower the optimized graph to kernels for this target: cuda or wgsl.
        #[arg(long)]
        target: Option<String>,
        /// Write one self-contained source per kernel (`NN_entry.cu` / `.wgsl`) and `plan.json`
        /// to this folder.
        #[arg(long)]
        emit: Option<PathBuf>,
        /// Storage type of float tensors in the kernels: f32 (default), f16 or bf16 (cuda only).
        #[arg(long)]
        dtype: Option<String>,
        /// Limits the wgsl kernels are lowered for: webgpu (default: WebGPU's guaranteed
        /// minimums, fixed default tunables) or device (the wgpu adapter this process would
        /// run on: its limits and kind, shape-aware defaults at the bucket of --dims, as `run`
        /// lowers them; the tuning cache is not read).
        #[arg(long)]
        limits: Option<String>,
        /// Dims at which the report and plan.json evaluate bytes and flops, e.g.
        /// `batch=1,seq=128,past=0` (the defaults; other symbols default to 1).
        #[arg(long, value_delimiter = ',')]
        dims: Vec<String>,
        /// Also shard the optimized graph for N tensor-parallel ranks and report the layout
        /// chosen (and the cost of each alternative), the per-rank ops, the collectives and the
        /// bytes they move per token.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// How `--tp` shards the model: auto, megatron, megatron-fused or megatron-sp (as for
        /// `run`).
        #[arg(long, default_value = "auto")]
        tp_layout: String,
        /// Also cut the optimized graph into P pipeline stages balanced by the cost model and
        /// report each stage's layers, estimated cost and the bytes it sends to the next.
        #[arg(long, default_value_t = 1)]
        pp: usize,
    },
    /// Benchmark a model on a backend: forward time, per-kernel times, memory plan, decoding.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Plan tensor × pipeline × data parallelism (PTD-P): memory, communication, bubble, step
    /// time and MFU of every layout (config.json alone is enough).
    Plan(plan::PlanArgs),
    /// Tune a model's kernels on a device and store the winners in the device's tuning cache
    /// (which run, generate, embed and bench read), or list (`--show`) or empty (`--clear`) it.
    Tune(tune_cli::TuneArgs),
    /// Print a model's IR (config.json alone is enough).
    Graph {
        /// Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// Also write Graphviz DOT here.
        #[arg(long)]
        dot: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time attention as a model spells it: fused (one attention kernel) against unfused
    /// (matmul, fused softmax, matmul) and primitive, every case checked against an f64
    /// reference first.
    Attention(bench::AttentionArgs),
    /// Time a model from a Hugging Face folder.
    Model {
        /// Hugging Face folder.
        #[arg(long)]
        model: PathBuf,
        /// Sequences per batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed forward runs (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Decoders: also time generating this many tokens after a `seq`-token prompt.
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        exec: Exec,
    },
}

/// Loads `dir` for `exec`: without weights under `--tp` (each rank reads its slices).
fn load_model(
    dir: &std::path::Path,
    pooling: Option<Pooling>,
    normalize: bool,
    exec: &Exec,
) -> Result<Model, Error> {
    // Device storage f16/bf16: the weights are read in that type (an f16 checkpoint is never
    // widened); a backend that cannot store it is refused in `session_why`.
    let float = transfuse::host_float(transfuse::parse_storage(&exec.dtype)?);
    Ok(match exec.tp > 1 || exec.nccl_flags() {
        true => Model::load_without_weights(dir, pooling, normalize)?,
        false => Model::load_as(dir, pooling, normalize, float)?,
    })
}

impl Exec {
    /// True when a multi-process NCCL flag is given.
    fn nccl_flags(&self) -> bool {
        self.nnodes.is_some() || self.node_rank.is_some() || self.rendezvous.is_some()
    }

    /// The NCCL job `--backend cuda` with `--tp N` (N > 1) or the multi-process flags asks
    /// for; `None` for every other session. Bad combinations are usage errors naming the flag.
    fn nccl_job(&self) -> Result<Option<transfuse::tp::NcclJob>, Error> {
        use transfuse::tp::NcclJob;
        let usage = |m: String| Err(Error::Usage(m));
        if !self.nccl_flags() {
            let pp = self.pp > 1 || self.micro_batches > 1;
            return Ok((self.backend == "cuda" && self.tp > 1 && !pp).then(NcclJob::single));
        }
        let nnodes = self.nnodes.unwrap_or(1);
        if nnodes == 0 {
            return usage("--nnodes must be ≥ 1".into());
        }
        let node_rank = self.node_rank.unwrap_or(0);
        if node_rank >= nnodes {
            return usage(format!(
                "--node-rank {node_rank}: must be below --nnodes {nnodes} (nodes are 0..{nnodes})"
            ));
        }
        if self.backend != "cuda" {
            return usage(format!(
                "--nnodes/--node-rank/--rendezvous: ranks in other processes are reached over \
                 NCCL; they need --backend cuda, not `{}`",
                self.backend
            ));
        }
        if !self.tp.is_multiple_of(nnodes) {
            return usage(format!(
                "--nnodes {nnodes}: does not divide --tp {} (every node runs --tp / --nnodes \
                 ranks)",
                self.tp
            ));
        }
        if self.pp > 1 || self.micro_batches > 1 {
            return usage("--nnodes: --pp stages run in one process; drop --pp".into());
        }
        let comm_id = std::env::var_os("NCCL_COMM_ID").is_some_and(|v| !v.is_empty());
        if nnodes > 1 && self.rendezvous.is_none() && !comm_id {
            return usage(format!(
                "--nnodes {nnodes}: needs --rendezvous FILE (on a filesystem every node shares) \
                 or NCCL_COMM_ID=host:port on every node"
            ));
        }
        if let Some(f) = &self.rendezvous {
            let dir = match f.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return usage(format!(
                    "--rendezvous {}: no such folder {}",
                    f.display(),
                    dir.display()
                ));
            }
            if node_rank == 0 && f.exists() {
                return usage(format!(
                    "--rendezvous {}: exists (an id from an earlier run?): node 0 writes a new \
                 one; remove it or name a new file",
                    f.display()
                ));
            }
        }
        Ok(Some(NcclJob {
            nnodes,
            node_rank,
            rendezvous: self.rendezvous.clone(),
        }))
    }
}

/// The CUDA ranks of `--tp N --backend cuda` (or the multi-process flags), over NCCL.
fn nccl_session(
    model: Model,
    exec: &Exec,
    job: &transfuse::tp::NcclJob,
) -> Result<(Session, String), Error> {
    let layout = parse_tp_layout(&exec.tp_layout)?;
    if exec.no_optimize {
        return Err(Error::Usage(
            "--tp shards the optimized graph; drop --no-optimize".into(),
        ));
    }
    if exec.no_cache {
        transfuse::runtime::tune::set_cache_enabled(false);
    }
    let mut opts = transfuse::passes::Options::from_env()?;
    opts.tp_layout = layout;
    let s = Session::cuda_tp(model, exec.tp, job, &opts)?;
    if exec.verbose {
        if let Some(t) = &s.tp {
            for (i, st) in t.stats.iter().enumerate() {
                eprintln!(
                    "rank {} (cuda device {i}): read {} B, resident {} B ({} B sharded + {} B replicated)",
                    t.first_rank + i,
                    st.bytes_read,
                    st.resident(),
                    st.sharded_resident,
                    st.replicated_resident
                );
            }
        }
    }
    let nodes = match job.nnodes {
        1 => String::new(),
        k => format!(", node {} of {k}", job.node_rank),
    };
    Ok((
        s,
        format!(
            "{} CUDA ranks over NCCL, one device each (--tp {}{nodes})",
            exec.tp / job.nnodes,
            exec.tp
        ),
    ))
}

/// `--tp-layout NAME`.
fn parse_tp_layout(name: &str) -> Result<transfuse::passes::place::TpLayout, Error> {
    transfuse::passes::place::TpLayout::by_name(name).ok_or_else(|| {
        Error::Usage(format!(
            "unknown --tp-layout `{name}` (expected {})",
            transfuse::passes::place::TpLayout::NAMES.join(", ")
        ))
    })
}

/// The tensor-parallel session of `--tp N` (N > 1).
fn tp_session(model: Model, exec: &Exec) -> Result<(Session, String), Error> {
    let layout = parse_tp_layout(&exec.tp_layout)?;
    if !matches!(exec.backend.as_str(), "cpu" | "auto" | "wgpu") {
        return Err(Error::Usage(format!(
            "--tp runs CPU, wgpu or cuda ranks; --backend {} ranks are not implemented",
            exec.backend
        )));
    }
    if exec.no_optimize {
        return Err(Error::Usage(
            "--tp shards the optimized graph; drop --no-optimize".into(),
        ));
    }
    let mut opts = transfuse::passes::Options::from_env()?;
    opts.tp_layout = layout;
    let wgpu = exec.backend == "wgpu";
    let s = match wgpu {
        true => Session::wgpu_tp(model, exec.tp, &opts)?,
        false => Session::tp_with(model, exec.tp, transfuse::runtime::CpuBackend::new(), &opts)?,
    };
    if exec.verbose {
        if let Some(t) = &s.tp {
            for (r, st) in t.stats.iter().enumerate() {
                eprintln!(
                    "rank {r}: read {} B, resident {} B ({} B sharded + {} B replicated)",
                    st.bytes_read,
                    st.resident(),
                    st.sharded_resident,
                    st.replicated_resident
                );
            }
        }
    }
    let kind = match wgpu {
        true => "wgpu ranks, each its own device,",
        false => "CPU ranks",
    };
    Ok((s, format!("{} {kind} (--tp {})", exec.tp, exec.tp)))
}

/// The pipeline-parallel session of `--pp P` (P > 1, or `--micro-batches` > 1).
fn pp_session(model: Model, exec: &Exec) -> Result<(Session, String), Error> {
    if exec.no_optimize {
        return Err(Error::Usage(
            "--pp cuts the optimized graph; drop --no-optimize".into(),
        ));
    }
    let layout = parse_tp_layout(&exec.tp_layout)?;
    if exec.tp > 1
        && matches!(
            layout,
            transfuse::passes::place::TpLayout::MegatronSp
                | transfuse::passes::place::TpLayout::MegatronFused
        )
    {
        return Err(Error::Usage(format!(
            "--tp-layout {}: a pipeline's tensor-parallel stages use the megatron layout",
            layout.name()
        )));
    }
    let backend = match exec.backend.as_str() {
        "auto" => "cpu",
        b => b,
    };
    transfuse::pp::stage_backend(backend)?;
    if exec.no_cache {
        transfuse::runtime::tune::set_cache_enabled(false);
    }
    let opts = transfuse::passes::Options::from_env()?;
    let s = Session::pp_with(
        model,
        exec.pp,
        exec.micro_batches,
        exec.tp,
        &|| transfuse::pp::stage_backend(backend),
        &opts,
    )?;
    if exec.verbose {
        if let Some(p) = &s.pp {
            for (i, st) in p.pipeline.stages.iter().enumerate() {
                eprintln!(
                    "stage {i}: layers {}..{}, est {:.3} ms",
                    st.layers.start,
                    st.layers.end,
                    st.cost * 1e3
                );
            }
        }
    }
    let ranks = match exec.tp {
        1 => format!("{backend} stages"),
        t => format!("stages of {t} {backend} ranks"),
    };
    Ok((
        s,
        format!(
            "{} {ranks} (--pp {}, --micro-batches {})",
            exec.pp, exec.pp, exec.micro_batches
        ),
    ))
}

/// The session for `model` on the backend `exec` names; returns why that backend was chosen.
fn session_why(model: Model, exec: &Exec) -> Result<(Session, String), Error> {
    init_tracing(exec.verbose);
    if exec.tp == 0 {
        return Err(Error::Usage("--tp must be ≥ 1".into()));
    }
    let storage = transfuse::parse_storage(&exec.dtype)?;
    if exec.pp == 0 {
        return Err(Error::Usage("--pp must be ≥ 1".into()));
    }
    if exec.micro_batches == 0 {
        return Err(Error::Usage("--micro-batches must be ≥ 1".into()));
    }
    let nccl = exec.nccl_job()?;
    if (exec.tp > 1 || exec.pp > 1 || exec.micro_batches > 1 || nccl.is_some())
        && storage != transfuse::codegen::kir::Elem::F32
    {
        return Err(Error::Usage(format!(
            "--dtype {}: --tp and --pp ranks run f32 only",
            exec.dtype
        )));
    }
    if let Some(job) = &nccl {
        return nccl_session(model, exec, job);
    }
    if exec.pp > 1 || exec.micro_batches > 1 {
        return pp_session(model, exec);
    }
    if exec.tp > 1 {
        return tp_session(model, exec);
    }
    let opts = match exec.no_optimize {
        true => None,
        false => Some(transfuse::passes::Options::from_env()?),
    };
    let choice = match exec.backend.as_str() {
        "cpu" | "wgpu" | "cuda" | "auto" => transfuse::runtime::backend_by_name(&exec.backend)?,
        other => {
            return Err(Error::Usage(format!(
                "unknown backend `{other}` (expected cpu, wgpu, cuda or auto)"
            )))
        }
    };
    if exec.verbose {
        eprintln!("device: {}", choice.backend.description());
    }
    if exec.no_cache {
        transfuse::runtime::tune::set_cache_enabled(false);
    }
    let s = Session::with_storage(model, choice.backend, opts.as_ref(), storage)?;
    Ok((s, choice.reason))
}

/// After a successful command: which backend ran and why (always for `auto`, which may have
/// fallen back), and with `--verbose` the memory plan of the last run. Errors stay one line.
fn report_backend(s: &Session, reason: &str, exec: &Exec) {
    if exec.backend == "auto" || exec.verbose {
        eprintln!("backend: {} ({reason})", s.backend_name());
    }
    if let (true, Some(m)) = (exec.verbose, s.memory()) {
        eprintln!(
            "memory: resident {} B ({} storage), inputs/outputs {} B, temporaries {} B planned vs {} B one buffer per tensor (live peak {} B)",
            m.persistent, exec.dtype, m.io, m.temps_planned, m.temps_naive, m.temps_live_peak
        );
    }
    if let (true, Some(t)) = (exec.verbose, s.tuning()) {
        eprintln!(
            "tuning: {} of {} template kernels from the tuning cache ({})",
            t.from_cache, t.sites, t.cache
        );
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Run {
            model,
            inputs,
            out,
            exec,
        } => {
            let batch = Batch::from_json_file(&inputs)?;
            let (s, reason) = session_why(load_model(&model, None, false, &exec)?, &exec)?;
            let t0 = Instant::now();
            let outputs = s.forward(&batch)?;
            let elapsed = t0.elapsed();
            let mut named: Vec<(&str, &Tensor)> =
                outputs.iter().map(|(k, v)| (k.as_str(), v)).collect();
            named.sort_by_key(|(k, _)| *k);
            write_safetensors(&out, &named)?;
            let summary: Vec<String> = named
                .iter()
                .map(|(k, t)| format!("{k} {:?}", t.shape))
                .collect();
            let fused = s
                .report
                .as_ref()
                .map_or("unoptimized".to_string(), transfuse::fusion_summary);
            eprintln!(
                "ran {} ({}, {fused}) on {} in {:.1} ms: {} -> {}",
                model.display(),
                s.model.config.model_type(),
                s.backend_name(),
                elapsed.as_secs_f64() * 1e3,
                summary.join(", "),
                out.display()
            );
            report_backend(&s, &reason, &exec);
        }
        Cmd::Generate {
            model,
            prompt,
            prompt_ids,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            json,
            exec,
        } => {
            let (s, reason) = session_why(load_model(&model, None, false, &exec)?, &exec)?;
            let tok = s.model.tokenizer.as_ref();
            let ids = match (prompt, prompt_ids) {
                (Some(text), _) => tok
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "{} has no tokenizer.json; pass --prompt-ids",
                            model.display()
                        ))
                    })?
                    .encode(&text, true)?,
                (None, Some(ids)) => ids,
                (None, None) => return Err(Error::Usage("give --prompt or --prompt-ids".into())),
            };
            let sampling = match temperature {
                Some(t) if t <= 0.0 || !t.is_finite() => {
                    return Err(Error::Usage(format!("--temperature must be > 0, got {t}")))
                }
                Some(temperature) => Sampling::Sample {
                    temperature,
                    top_k,
                    seed,
                },
                None => Sampling::Greedy,
            };
            let t0 = Instant::now();
            let all = s.generate(&ids, max_new_tokens, sampling)?;
            let secs = t0.elapsed().as_secs_f64();
            let text = match tok {
                Some(t) => Some(t.decode(&all)?),
                None => None,
            };
            if json {
                println!("{}", serde_json::json!({ "ids": all, "text": text }));
            } else {
                match &text {
                    Some(t) => println!("{t}"),
                    None => println!(
                        "{}",
                        all.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
                    ),
                }
            }
            eprintln!(
                "generated {max_new_tokens} tokens on {} in {:.1} ms ({:.1} tokens/s)",
                s.backend_name(),
                secs * 1e3,
                max_new_tokens as f64 / secs.max(1e-9)
            );
            report_backend(&s, &reason, &exec);
        }
        Cmd::Embed {
            model,
            texts,
            pooling,
            no_normalize,
            json,
            out,
            exec,
        } => {
            let pooling = Pooling::from_name(&pooling).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown pooling `{pooling}` (expected mean, cls or max)"
                ))
            })?;
            let (s, reason) = session_why(
                load_model(&model, Some(pooling), !no_normalize, &exec)?,
                &exec,
            )?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let emb = s.embed(&refs)?;
            if let Some(path) = out {
                write_safetensors(&path, &[("embeddings", &emb)])?;
                eprintln!("wrote embeddings {:?} to {}", emb.shape, path.display());
            } else {
                let v = emb.as_f32().expect("embeddings are f32");
                let rows: Vec<&[f32]> = v.chunks(emb.shape[1]).collect();
                if json {
                    println!("{}", serde_json::json!({ "embeddings": rows }));
                } else {
                    for (t, r) in texts.iter().zip(rows) {
                        let head: Vec<String> =
                            r.iter().take(4).map(|x| format!("{x:.4}")).collect();
                        println!("{t:?}: [{}, …] ({} dims)", head.join(", "), r.len());
                    }
                }
            }
            report_backend(&s, &reason, &exec);
        }
        Cmd::Compile {
            model,
            report,
            json,
            dot_before,
            dot_after,
            profile,
            node_limit,
            iter_limit,
            time_limit,
            target,
            emit,
            dtype,
            limits,
            dims,
            tp,
            tp_layout,
            pp,
        } => {
            let cfg = load_config(&model)?;
            let heads = BertHeads {
                pooler: true,
                ..BertHeads::default()
            };
            let g = build_graph(&cfg, heads)?;
            // Under --tp alone, --dims sets where the collectives' bytes are evaluated.
            let tp_only = (tp > 1 || pp > 1) && target.is_none();
            let cg = codegen_args(
                &g,
                target.as_deref(),
                dtype.as_deref(),
                limits.as_deref(),
                if tp_only { &[] } else { &dims },
                emit.as_deref(),
            )?;
            if tp == 0 {
                return Err(Error::Usage("--tp must be ≥ 1".into()));
            }
            let mut opts = transfuse::passes::Options::from_env()?;
            opts.profile = transfuse::passes::Profile::by_name(&profile).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown profile `{profile}` (expected gpu, cpu or cpu-adapter)"
                ))
            })?;
            if let Some(n) = node_limit {
                opts.node_limit = transfuse::passes::parse_count("--node-limit", &n)?;
            }
            if let Some(n) = iter_limit {
                opts.iter_limit = transfuse::passes::parse_count("--iter-limit", &n)?;
            }
            if let Some(t) = time_limit {
                opts.time_limit = transfuse::passes::parse_seconds("--time-limit", &t)?;
            }
            let (opt, r) = transfuse::passes::optimize(&g, &opts)?;
            if let Some(p) = dot_before {
                write_file(&p, &to_dot(&g))?;
            }
            if let Some(p) = dot_after {
                write_file(&p, &to_dot(&opt))?;
            }
            let tp_report = match tp > 1 {
                true => {
                    let spec = transfuse::tp::megatron_spec(&cfg, tp)?;
                    let b = parse_dims(&g, &dims)?;
                    // The placements are priced at the dims the report is evaluated at.
                    let mut p = opts.profile.clone();
                    p.dims.extend(b.iter().map(|(k, v)| (k.clone(), *v)));
                    let placed = transfuse::passes::place::place(
                        &opt,
                        &spec,
                        parse_tp_layout(&tp_layout)?,
                        &p,
                    )?;
                    Some(transfuse::tp::tp_report(&placed, &b)?)
                }
                false => None,
            };
            if pp == 0 {
                return Err(Error::Usage("--pp must be ≥ 1".into()));
            }
            let pp_report = match pp > 1 {
                true => {
                    let p = transfuse::passes::pipeline::cut(&opt, pp, &opts.profile)
                        .map_err(|e| Error::Usage(e.to_string()))?;
                    let b = parse_dims(&g, &dims)?;
                    Some(transfuse::pp::pp_report(&p, &b)?)
                }
                false => None,
            };
            if json {
                let mut v = transfuse::report_json(&r);
                if let Some((_, tv)) = &tp_report {
                    v["tp"] = tv.clone();
                }
                if let Some((_, pv)) = &pp_report {
                    v["pp"] = pv.clone();
                }
                println!("{v}");
            } else {
                if report {
                    print!("{}", transfuse::report_table(&r));
                    if let Some((text, _)) = &tp_report {
                        print!("{text}");
                    }
                    if let Some((text, _)) = &pp_report {
                        print!("{text}");
                    }
                }
                eprintln!(
                    "compiled {} ({}): {} → {} nodes, {} in {:.1} ms",
                    model.display(),
                    cfg.model_type(),
                    g.len(),
                    opt.len(),
                    transfuse::fusion_summary(&r),
                    r.seconds * 1e3
                );
            }
            if let Some(args) = &cg {
                codegen(&opt, args, emit.as_deref(), report && !json)?;
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Model {
                    model,
                    batch,
                    seq,
                    iters,
                    warmup,
                    decode_tokens,
                    json,
                    exec,
                },
        } => {
            let (s, reason) = session_why(load_model(&model, None, false, &exec)?, &exec)?;
            let args = bench::BenchArgs {
                batch,
                seq,
                iters,
                warmup,
                decode_tokens,
                json,
                dtype: exec.dtype.clone(),
            };
            bench::bench_model(&s, &reason, &args)?;
        }
        Cmd::Bench {
            what: BenchCmd::Attention(args),
        } => bench::bench_attention(&args)?,
        Cmd::Plan(args) => plan::run(&args)?,
        Cmd::Tune(args) => {
            init_tracing(args.verbose);
            tune_cli::run(&args)?
        }
        Cmd::Graph { model, dot } => {
            let cfg = load_config(&model)?;
            let heads = BertHeads {
                pooler: true,
                ..BertHeads::default()
            };
            let g = build_graph(&cfg, heads)?;
            print!("{}", to_text(&g));
            if let Some(path) = dot {
                write_file(&path, &to_dot(&g))?;
                eprintln!("wrote {}", path.display());
            }
            let counts: Vec<String> = g
                .op_counts()
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            eprintln!("{} nodes: {}", g.len(), counts.join(", "));
        }
    }
    Ok(())
}

/// The `compile` codegen options, checked before anything runs.
struct CodegenArgs {
    target: transfuse::codegen::lower::Target,
    elem: transfuse::codegen::kir::Elem,
    dtype: String,
    bindings: transfuse::ir::Bindings,
    /// `--limits device`: the adapter's limits (lowered with shape-aware defaults).
    device_limits: Option<transfuse::codegen::kernels::Limits>,
}

fn codegen_args(
    g: &transfuse::ir::Graph,
    target: Option<&str>,
    dtype: Option<&str>,
    limits: Option<&str>,
    dims: &[String],
    emit: Option<&Path>,
) -> Result<Option<CodegenArgs>, Error> {
    use transfuse::codegen::kir::Elem;
    use transfuse::codegen::lower::Target;
    let Some(target) = target else {
        if emit.is_some() || dtype.is_some() || limits.is_some() || !dims.is_empty() {
            return Err(Error::Usage(
                "--emit, --dtype, --limits and --dims need --target cuda or --target wgsl".into(),
            ));
        }
        return Ok(None);
    };
    let target = Target::from_name(target).ok_or_else(|| {
        Error::Usage(format!("unknown target `{target}` (expected cuda or wgsl)"))
    })?;
    let device_limits = match (limits, target) {
        (None | Some("webgpu"), _) => None,
        (Some("device"), Target::Wgsl) => {
            use transfuse::runtime::device::Device;
            let dev = transfuse::runtime::webgpu::shared()?;
            Some(dev.info().limits)
        }
        (Some("device"), _) => {
            return Err(Error::Usage(
                "--limits device needs --target wgsl (it reads the wgpu adapter's limits)".into(),
            ))
        }
        (Some(other), _) => {
            return Err(Error::Usage(format!(
                "unknown --limits `{other}` (expected webgpu or device)"
            )))
        }
    };
    let elem = match dtype.unwrap_or("f32") {
        "f32" => Elem::F32,
        "f16" => Elem::F16,
        "bf16" => Elem::BF16,
        other => {
            return Err(Error::Usage(format!(
                "unknown dtype `{other}` (expected f32, f16 or bf16)"
            )))
        }
    };
    if target == Target::Wgsl && elem == Elem::BF16 {
        return Err(Error::Usage(
            "--dtype bf16 needs --target cuda: WGSL has no bf16 type (use f16 or f32)".into(),
        ));
    }
    let bindings = parse_dims(g, dims)?;
    if let Some(dir) = emit {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.into(),
            source,
        })?;
    }
    Ok(Some(CodegenArgs {
        target,
        elem,
        dtype: dtype.unwrap_or("f32").to_string(),
        bindings,
        device_limits,
    }))
}

/// `compile --target`: lowers `g`, writes the sources and plan.json, prints the kernel table.
fn codegen(
    g: &transfuse::ir::Graph,
    args: &CodegenArgs,
    emit: Option<&Path>,
    report: bool,
) -> Result<(), Error> {
    use transfuse::codegen::lower::{lower, lower_tuned, tuning::Tuning, LowerOptions};
    use transfuse::codegen::lower::{Phase, Target};
    let (target, bindings, dtype_name) = (args.target, &args.bindings, args.dtype.as_str());
    let plan = match args.device_limits {
        // What the runtime lowers: the adapter's limits, shape-aware defaults at the bucket.
        Some(limits) => {
            let mut opts = LowerOptions::new(target, args.elem);
            opts.limits = limits;
            let mut t = Tuning::at(transfuse::runtime::tune::bucket_dims(bindings), None);
            t.fixed_defaults = transfuse::runtime::tune::fixed_defaults();
            lower_tuned(g, &opts, &t)?
        }
        None => lower(g, &LowerOptions::new(target, args.elem))?,
    };
    if let Some(dir) = emit {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.into(),
            source,
        })?;
        for (i, k) in plan.kernels.iter().enumerate() {
            let src = target.print(&k.gen.kernel)?;
            write_file(&dir.join(plan.file_name(i)), &src)?;
            if let (Some(v), Some(file)) = (&k.decode, plan.decode_file_name(i)) {
                write_file(&dir.join(file), &target.print(&v.gen.kernel)?)?;
            }
        }
        let json = serde_json::to_string_pretty(&plan.to_json(Some(bindings)))
            .expect("plan JSON serialises");
        write_file(&dir.join("plan.json"), &(json + "\n"))?;
        let variants = plan.kernels.iter().filter(|k| k.decode.is_some()).count();
        eprintln!(
            "wrote {} kernel sources ({variants} decode variants) and plan.json to {}",
            plan.kernels.len() + variants,
            dir.display()
        );
    }
    let with_cap = plan.cache_dims(bindings);
    let at = |p: &transfuse::codegen::lower::Poly| p.eval(&with_cap).unwrap_or(0);
    let dims_text: Vec<String> = bindings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if report {
        // Registers and spills from ptxas, when NVRTC is there.
        let sass = match (target, transfuse::runtime::nvrtc::available()) {
            (Target::Cuda, Ok(())) => Ok(()),
            (Target::Cuda, Err(e)) => Err(format!("registers/spills: NVRTC unavailable ({e})")),
            _ => Err(String::new()),
        };
        let mut resources: std::collections::HashMap<String, String> = Default::default();
        println!(
            "\nkernels ({} {dtype_name}; bytes and flops at {}):",
            target.name(),
            dims_text.join(" ")
        );
        let cuda = target == Target::Cuda;
        println!(
            "{:>4}  {:<8} {:<44} {:>11} {:>11}{}",
            "#",
            "phase",
            "entry",
            "bytes",
            "flops",
            if cuda { "   regs  spills" } else { "" }
        );
        for (i, k) in plan.kernels.iter().enumerate() {
            let mut res = String::new();
            if cuda && sass.is_ok() {
                let entry = k.entry().to_string();
                res = resources
                    .entry(entry.clone())
                    .or_insert_with(|| {
                        let src = target.print(&k.gen.kernel).unwrap_or_default();
                        match transfuse::runtime::nvrtc::compile_sass(&src, &entry, "sm_90") {
                            Ok(info) => match info.kernel(&entry) {
                                Some(r) => format!(
                                    "{:>7} {:>7}",
                                    r.registers,
                                    r.spill_stores_bytes + r.spill_loads_bytes
                                ),
                                None => format!("{:>7} {:>7}", "?", "?"),
                            },
                            Err(_) => format!("{:>7} {:>7}", "-", "-"),
                        }
                    })
                    .clone();
            }
            println!(
                "{i:>4}  {:<8} {:<44} {:>11} {:>11}{}{}",
                match k.phase {
                    Phase::Prepare => "prepare",
                    Phase::Forward => "forward",
                },
                k.entry(),
                human(at(&k.bytes), "B"),
                human(at(&k.flops), ""),
                if res.is_empty() { "" } else { " " },
                res
            );
        }
        if let Err(msg) = &sass {
            if !msg.is_empty() {
                println!("({msg})");
            }
        }
        let (planned, bound) = (at(&plan.forward_bytes()), at(&plan.lower_bound_bytes()));
        println!(
            "planned global-memory traffic of one forward: {} (lower bound, weights + inputs + outputs once: {}; {:.2}×)",
            human(planned, "B"),
            human(bound, "B"),
            planned as f64 / (bound.max(1)) as f64
        );
    }
    let forward = plan.forward().count();
    eprintln!(
        "lowered to {} kernels for {} {dtype_name} ({} prepare, {forward} per forward): {} planned per forward at {}",
        plan.kernels.len(),
        target.name(),
        plan.kernels.len() - forward,
        human(at(&plan.forward_bytes()), "B"),
        dims_text.join(" ")
    );
    Ok(())
}

/// `batch=1,seq=128,past=0`-style dims for every symbol of `g`'s inputs (defaults for the rest).
fn parse_dims(
    g: &transfuse::ir::Graph,
    given: &[String],
) -> Result<transfuse::ir::Bindings, Error> {
    dims_over_defaults(&graph_symbols(g), given.iter().map(String::as_str))
}

/// The symbolic dims of `g`'s inputs, sorted and unique.
fn graph_symbols(g: &transfuse::ir::Graph) -> Vec<String> {
    let mut syms: Vec<String> = g
        .inputs()
        .iter()
        .flat_map(|(_, shape, _)| {
            shape
                .iter()
                .flat_map(|d| d.symbols().map(String::from))
                .collect::<Vec<_>>()
        })
        .collect();
    syms.sort();
    syms.dedup();
    syms
}

/// `name=value` items over the defaults (seq 128, past 0, others 1) for the dims `syms`; a
/// malformed item or a dim the model lacks is a usage error naming `--dims`.
fn dims_over_defaults<'a>(
    syms: &[String],
    items: impl Iterator<Item = &'a str>,
) -> Result<transfuse::ir::Bindings, Error> {
    let mut b = transfuse::ir::Bindings::new();
    for s in syms {
        let v = match s.as_str() {
            "seq" => 128,
            "past" => 0,
            _ => 1,
        };
        b.insert(s.clone(), v);
    }
    for d in items {
        let (k, v) = d
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--dims: `{d}` is not name=value")))?;
        let v: usize = v
            .trim()
            .parse()
            .map_err(|_| Error::Usage(format!("--dims: `{d}`: the value must be a size")))?;
        if !syms.iter().any(|s| s == k.trim()) {
            return Err(Error::Usage(format!(
                "--dims: the model has no dim `{}` (its dims: {})",
                k.trim(),
                syms.join(", ")
            )));
        }
        b.insert(k.trim().to_string(), v);
    }
    Ok(b)
}

/// `12.3 MB`-style (decimal units).
fn human(x: i64, unit: &str) -> String {
    let v = x as f64;
    let (d, p) = if v >= 1e12 {
        (1e12, "T")
    } else if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "k")
    } else {
        return format!("{x} {unit}").trim_end().to_string();
    };
    format!("{:.2} {p}{unit}", v / d)
}

/// `-v`: the runtime's tuning details (tracing, debug level) on stderr; otherwise warnings.
fn init_tracing(verbose: bool) {
    let level = if verbose {
        "transfuse_runtime=debug"
    } else {
        "warn"
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
