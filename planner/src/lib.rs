//! `transfuse plan`: a PTD-P planner. For a model and `G` GPUs it evaluates every layout of
//! tensor (`t`), pipeline (`p`) and data (`d`) parallelism with `t·p·d = G`, and for each the
//! memory per device, the communication per step, the 1F1B pipeline bubble, an estimated step
//! time and MFU; it ranks the layouts that fit and says why the others do not.
//!
//! Anchors: Narayanan et al. 2021 (Megatron-LM, PTD-P: the 1F1B bubble `(p−1)/m` with
//! `m = B/(b·d)`, tensor parallelism within a node, the flop count of eq. 3), Korthikanti et al.
//! 2022 (activation memory per layer `sbh(34 + 5as/h)` and its tensor-parallel, sequence-parallel
//! and recomputation variants), Rajbhandari et al. 2020 (ZeRO: 16 bytes per parameter for
//! mixed-precision Adam, sharded by stage).
//!
//! Modules: [`model`] (sizes from a `config.json`), [`device`] (the datasheet table),
//! [`comm`] (the collective cost model, shared with tensor parallelism), [`memory`]
//! (model states and activations), [`pipeline`] (micro-batches and bubble), [`plan`] (layouts,
//! time model, ranking).
//!
//! What it does not model: interleaved schedules, overlap of communication with compute,
//! FlashAttention (selective recomputation stores what it would), the CUDA context, NCCL
//! buffers and fragmentation (budget a few GiB), expert parallelism, context parallelism.
//!
//! ```
//! use transfuse_planner::{plan, Device, ModelDesc, Request};
//!
//! // GPT-3 175B (Brown et al. 2020) on 1024 A100 80GB, Megatron's defaults.
//! let gpt3 = ModelDesc::gpt("gpt3-175b", 96, 12288, 96, 51200, 2048);
//! let mut req = Request::training(gpt3, Device::by_name("a100-80gb").unwrap(), 1024);
//! req.global_batch = Some(1536);
//! let p = plan(&req).unwrap();
//! let best = p.best().unwrap();
//! assert_eq!(best.tp * best.pp * best.dp, 1024);
//! assert!(best.memory.total_gib <= 80.0);
//! // Tensor parallelism alone leaves 1/8 of the weights and gradients on each device.
//! let tp_only = p.layout(8, 1, 128).unwrap();
//! assert!(!tp_only.feasible);
//! assert_eq!(tp_only.reason.as_deref(), Some("needs 92.9 GiB per device, has 80"));
//! ```
#![warn(missing_docs)]

pub mod comm;
pub mod device;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod plan;

pub use device::Device;
pub use memory::Recompute;
pub use model::ModelDesc;
pub use plan::{plan, Layout, Mode, Plan, Request};

/// Why no plan: a bad request or config, an unknown GPU, or no layout that works.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A config file that cannot be read or lacks a size.
    #[error("{path}: {msg}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A GPU not in the table.
    #[error("unknown GPU `{0}` (known: h100-80gb, h200-141gb, a100-80gb, a100-40gb; or give --mem, --tflops, --hbm-bw, --intra-bw, --inter-bw)")]
    UnknownGpu(String),
    /// Flags that contradict each other or are out of range.
    #[error("{0}")]
    Usage(String),
    /// No layout fits or is well formed.
    #[error("{0}")]
    NoLayout(String),
}

/// The plan as a table for people: the resolved inputs, then one row per layout.
pub fn render_text(p: &Plan) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &p.model;
    let _ = writeln!(
        out,
        "{} ({}): {} layers, hidden {}, {} heads ({} kv), MLP {}, vocab {}, {} parameters",
        m.name,
        m.family,
        m.layers,
        m.hidden,
        m.heads,
        m.kv_heads,
        m.intermediate,
        m.vocab,
        match m.params as f64 {
            x if x >= 1e9 => format!("{:.2} B", x / 1e9),
            x => format!("{:.2} M", x / 1e6),
        }
    );
    let d = &p.device;
    let _ = writeln!(
        out,
        "{} × {}: {} GiB, {} TFLOP/s dense (GEMMs at {:.0}%), HBM {} GB/s, links {} GB/s in a node of {} / {} GB/s between nodes",
        p.gpus,
        d.name,
        plan::fmt_gib(d.memory_gib),
        d.peak_tflops,
        d.gemm_efficiency * 100.0,
        d.hbm_gbs,
        d.intra_node_gbs,
        d.gpus_per_node,
        d.inter_node_gbs
    );
    let opts = match (&p.recompute, p.zero, p.sequence_parallel) {
        (Some(r), Some(z), Some(sp)) => format!(
            "training, recompute {r}, ZeRO {z}, sequence parallel {}",
            if sp { "on" } else { "off" }
        ),
        _ => match p.kv_cache_tokens {
            Some(n) => format!("inference, KV cache of {n} tokens per replica"),
            None => "inference, KV cache of every sequence at full length".to_string(),
        },
    };
    let _ = writeln!(
        out,
        "{opts}; seq {}, global batch {}, micro-batch {}",
        p.seq, p.global_batch, p.micro_batch_size
    );
    let _ = writeln!(
        out,
        "\n{:>4} {:>4} {:>4} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8}  {:>7} {:>9} {:>6} {:>6}  note",
        "rank",
        "tp",
        "pp",
        "dp",
        "m",
        "mem GiB",
        "weights",
        "optim",
        "activ",
        "bubble",
        "step s",
        "MFU",
        "HFU"
    );
    for l in &p.layouts {
        let rank = l.rank.map_or("-".to_string(), |r| r.to_string());
        let note = match (&l.reason, l.communication.tp_within_node) {
            (Some(r), _) => r.clone(),
            (None, false) => "tensor parallelism crosses nodes".to_string(),
            _ => String::new(),
        };
        let num = |x: f64, prec: usize| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.prec$}")
            }
        };
        let pct = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{:.1}%", 100.0 * x)
            }
        };
        let _ = writeln!(
            out,
            "{:>4} {:>4} {:>4} {:>5} {:>6} {:>8} {:>8} {:>8} {:>8}  {:>7} {:>9} {:>6} {:>6}  {}",
            rank,
            l.tp,
            l.pp,
            l.dp,
            l.micro_batches,
            num(l.memory.total_gib, 1),
            num(l.memory.weights_gib, 1),
            num(l.memory.optimizer_gib, 1),
            num(l.memory.activations_gib, 1),
            pct(l.bubble_fraction),
            num(l.time.step_s, 3),
            pct(l.mfu),
            pct(l.hfu),
            note
        );
    }
    out
}
