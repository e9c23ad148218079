//! `transfuse plan`: the flags of the PTD-P planner and its printing; the planning itself is
//! `transfuse-planner`.

use std::path::PathBuf;

use clap::Args;
use transfuse::Error;
use transfuse_planner::{plan, Device, Mode, ModelDesc, Recompute, Request};

/// `transfuse plan` flags.
#[derive(Args)]
pub struct PlanArgs {
    /// Hugging Face folder (its config.json is read).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    model: Option<PathBuf>,
    /// A config file: Hugging Face (gpt2, bert, llama, mistral, qwen2) or
    /// `{"model_type": "gpt", "n_layer", "hidden", "heads", "vocab", "seq"}`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// GPUs in all, G.
    #[arg(long)]
    gpus: u64,
    /// GPU from the table: h100-80gb, h200-141gb, a100-80gb, a100-40gb (default a100-80gb unless
    /// every custom figure is given); the flags below override its figures.
    #[arg(long)]
    gpu: Option<String>,
    /// Memory per GPU, GiB.
    #[arg(long, allow_hyphen_values = true)]
    mem: Option<f64>,
    /// Dense 16-bit tensor peak, TFLOP/s.
    #[arg(long, allow_hyphen_values = true)]
    tflops: Option<f64>,
    /// HBM bandwidth, GB/s.
    #[arg(long, allow_hyphen_values = true)]
    hbm_bw: Option<f64>,
    /// GPU-to-GPU bandwidth within a node, per direction, GB/s.
    #[arg(long, allow_hyphen_values = true)]
    intra_bw: Option<f64>,
    /// Network bandwidth per GPU between nodes, per direction, GB/s.
    #[arg(long, allow_hyphen_values = true)]
    inter_bw: Option<f64>,
    /// GPUs per node.
    #[arg(long)]
    gpus_per_node: Option<u64>,
    /// Fraction of the peak that large GEMMs sustain (default 0.75, an assumption).
    #[arg(long, allow_hyphen_values = true)]
    gemm_efficiency: Option<f64>,
    /// Tensor-parallel size (default: every divisor of G).
    #[arg(long)]
    tp: Option<u64>,
    /// Pipeline-parallel size.
    #[arg(long)]
    pp: Option<u64>,
    /// Data-parallel size.
    #[arg(long)]
    dp: Option<u64>,
    /// Sequence length (default: the model's positions, at most 4096).
    #[arg(long)]
    seq: Option<u64>,
    /// Sequences per step, B (default 512 training, 1 inference).
    #[arg(long)]
    global_batch: Option<u64>,
    /// Sequences per micro-batch, b (default 1); m = B / (b·d).
    #[arg(long)]
    micro_batch_size: Option<u64>,
    /// Plan inference (weights, KV cache, one layer's activations).
    #[arg(long, conflicts_with = "training")]
    inference: bool,
    /// Plan training (the default).
    #[arg(long)]
    training: bool,
    /// Inference: tokens in the KV cache per model replica (default: every sequence at full
    /// length).
    #[arg(long)]
    kv_cache_tokens: Option<u64>,
    /// Training: activation recomputation, none, selective (default) or full.
    #[arg(long)]
    recompute: Option<String>,
    /// Training: ZeRO stage 0, 1 (default), 2 or 3.
    #[arg(long)]
    zero: Option<u8>,
    /// Training: no sequence parallelism (it is on with tensor parallelism by default).
    #[arg(long)]
    no_sequence_parallel: bool,
    /// Print one JSON object (the plan, every layout).
    #[arg(long)]
    json: bool,
}

fn device(a: &PlanArgs) -> Result<Device, Error> {
    let custom = [a.mem, a.tflops, a.hbm_bw, a.intra_bw, a.inter_bw];
    let mut d = match (&a.gpu, custom.iter().all(Option::is_some)) {
        (Some(name), _) => Device::by_name(name).map_err(|e| Error::Usage(e.to_string()))?,
        (None, true) => {
            let mut d = Device::by_name("a100-80gb").expect("in the table");
            d.name = "custom".into();
            d
        }
        (None, false) if custom.iter().any(Option::is_some) => {
            let missing: Vec<&str> = ["--mem", "--tflops", "--hbm-bw", "--intra-bw", "--inter-bw"]
                .iter()
                .zip(custom)
                .filter(|(_, v)| v.is_none())
                .map(|(f, _)| *f)
                .collect();
            return Err(Error::Usage(format!(
                "a custom device needs --mem, --tflops, --hbm-bw, --intra-bw and --inter-bw (missing {}), or --gpu NAME",
                missing.join(", ")
            )));
        }
        (None, false) => Device::by_name("a100-80gb").expect("in the table"),
    };
    let set = |x: &mut f64, v: Option<f64>| {
        if let Some(v) = v {
            *x = v;
        }
    };
    set(&mut d.memory_gib, a.mem);
    set(&mut d.peak_tflops, a.tflops);
    set(&mut d.hbm_gbs, a.hbm_bw);
    set(&mut d.intra_node_gbs, a.intra_bw);
    set(&mut d.inter_node_gbs, a.inter_bw);
    set(&mut d.gemm_efficiency, a.gemm_efficiency);
    if let Some(k) = a.gpus_per_node {
        d.gpus_per_node = k;
    }
    Ok(d)
}

/// Runs `transfuse plan`.
pub fn run(a: &PlanArgs) -> Result<(), Error> {
    let usage = |e: transfuse_planner::PlanError| Error::Usage(e.to_string());
    let model = match (&a.model, &a.config) {
        (Some(dir), _) => ModelDesc::from_dir(dir).map_err(usage)?,
        (None, Some(file)) => ModelDesc::from_file(file).map_err(usage)?,
        (None, None) => return Err(Error::Usage("give --model DIR or --config FILE".into())),
    };
    let device = device(a)?;
    let mode = if a.inference {
        for (flag, given) in [
            ("--recompute", a.recompute.is_some()),
            ("--zero", a.zero.is_some()),
            ("--no-sequence-parallel", a.no_sequence_parallel),
        ] {
            if given {
                return Err(Error::Usage(format!(
                    "{flag} is a training option, not --inference"
                )));
            }
        }
        Mode::Inference {
            kv_cache_tokens: a.kv_cache_tokens,
        }
    } else {
        if a.kv_cache_tokens.is_some() {
            return Err(Error::Usage("--kv-cache-tokens needs --inference".into()));
        }
        let name = a.recompute.as_deref().unwrap_or("selective");
        let recompute = Recompute::from_name(name).ok_or_else(|| {
            Error::Usage(format!(
                "unknown --recompute `{name}` (expected none, selective or full)"
            ))
        })?;
        Mode::Training {
            recompute,
            zero: a.zero.unwrap_or(1),
            sequence_parallel: !a.no_sequence_parallel,
        }
    };
    let req = Request {
        model,
        device,
        gpus: a.gpus,
        tp: a.tp,
        pp: a.pp,
        dp: a.dp,
        seq: a.seq,
        global_batch: a.global_batch,
        micro_batch: a.micro_batch_size,
        mode,
    };
    let p = plan(&req).map_err(usage)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&p).expect("the plan serialises")
        );
    } else {
        print!("{}", transfuse_planner::render_text(&p));
    }
    Ok(())
}
