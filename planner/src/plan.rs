//! Layouts: every `(t, p, d)` with `t·p·d = G` (or the one asked for), each with its memory per
//! device, communication per step, bubble, estimated step time and MFU; ranked, the infeasible
//! ones with the reason.
//!
//! The time model is a roofline per micro-batch and stage, nothing overlapped (as Megatron-LM
//! 2021 ran): GEMMs at the device's sustained tensor throughput, the traffic of stored
//! activations at HBM bandwidth, tensor-parallel collectives on NVLink when the group fits in
//! a node (on the network otherwise), pipeline sends and data-parallel gradient reductions on the
//! links their groups span. The step is `(m + p − 1)` micro-batch slots of the slowest stage,
//! then the gradient reduction and the optimizer step.

use serde::Serialize;

use crate::comm::{self, Link};
use crate::device::{Device, GIB};
use crate::memory::{self, LayerShape, Recompute, ZeroStage};
use crate::model::ModelDesc;
use crate::pipeline;
use crate::PlanError;

/// Assumed per-step latency of a collective within a node (an assumption, not a datasheet
/// figure; it matters only for small messages such as decode steps).
pub const INTRA_LATENCY_S: f64 = 3e-6;
/// Assumed per-step latency between nodes.
pub const INTER_LATENCY_S: f64 = 8e-6;

/// Training or inference, with their options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Mixed-precision Adam, 1F1B pipeline schedule.
    Training {
        /// Activation recomputation.
        recompute: Recompute,
        /// ZeRO stage over the data-parallel group.
        zero: ZeroStage,
        /// Sequence parallelism with tensor parallelism (Korthikanti et al. 2022).
        sequence_parallel: bool,
    },
    /// Forward passes (a prefill of the batch) and one-token decode steps.
    Inference {
        /// Tokens held in the KV cache per model replica (default: every sequence of the
        /// replica at full length).
        kv_cache_tokens: Option<u64>,
    },
}

/// What to plan.
#[derive(Clone, Debug)]
pub struct Request {
    /// The model.
    pub model: ModelDesc,
    /// The device.
    pub device: Device,
    /// GPUs in all, `G`.
    pub gpus: u64,
    /// Tensor-parallel size, or every divisor.
    pub tp: Option<u64>,
    /// Pipeline-parallel size, or every divisor.
    pub pp: Option<u64>,
    /// Data-parallel size, or `G / (t·p)`.
    pub dp: Option<u64>,
    /// Sequence length (default: the model's positions, at most 4096).
    pub seq: Option<u64>,
    /// Sequences per step, `B` (default 512 training, 1 inference).
    pub global_batch: Option<u64>,
    /// Sequences per micro-batch, `b` (default 1).
    pub micro_batch: Option<u64>,
    /// Training or inference.
    pub mode: Mode,
}

impl Request {
    /// An inference request: a batch of one, the KV cache of every sequence at full length.
    pub fn inference(model: ModelDesc, device: Device, gpus: u64) -> Request {
        Request {
            mode: Mode::Inference {
                kv_cache_tokens: None,
            },
            ..Request::training(model, device, gpus)
        }
    }

    /// A training request with Megatron's defaults: selective recomputation, sequence
    /// parallelism, ZeRO 1 (the distributed optimizer).
    pub fn training(model: ModelDesc, device: Device, gpus: u64) -> Request {
        Request {
            model,
            device,
            gpus,
            tp: None,
            pp: None,
            dp: None,
            seq: None,
            global_batch: None,
            micro_batch: None,
            mode: Mode::Training {
                recompute: Recompute::Selective,
                zero: 1,
                sequence_parallel: true,
            },
        }
    }
}

/// Memory per device in GiB, on the pipeline stage that needs the most.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Memory {
    /// 16-bit weights.
    pub weights_gib: f64,
    /// 16-bit gradients (training).
    pub gradients_gib: f64,
    /// fp32 master weights, momentum and variance (training).
    pub optimizer_gib: f64,
    /// Stored activations (training: the micro-batches in flight; inference: one layer live).
    pub activations_gib: f64,
    /// KV cache (inference, decoders).
    pub kv_cache_gib: f64,
    /// The sum.
    pub total_gib: f64,
    /// The device's memory.
    pub capacity_gib: f64,
}

/// Communication per step and device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Communication {
    /// Bytes a rank sends in tensor-parallel collectives.
    pub tp_bytes: f64,
    /// Bytes a rank sends to the next or previous pipeline stage.
    pub pp_bytes: f64,
    /// Bytes a rank sends in data-parallel gradient (and ZeRO parameter) collectives.
    pub dp_bytes: f64,
    /// Whether the tensor-parallel group is within one node (NVLink).
    pub tp_within_node: bool,
    /// Whether the data-parallel group is within one node.
    pub dp_within_node: bool,
    /// Whether the pipeline stages are within one node.
    pub pp_within_node: bool,
}

/// Where the estimated step time goes, seconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Time {
    /// GEMMs and activation traffic of the `m` micro-batches on the slowest stage.
    pub compute_s: f64,
    /// Tensor-parallel collectives of the `m` micro-batches.
    pub tp_s: f64,
    /// Pipeline sends of the `m` micro-batches.
    pub pp_s: f64,
    /// The pipeline bubble: `(p − 1)` micro-batch slots.
    pub bubble_s: f64,
    /// Data-parallel gradient reduction (and ZeRO-3 parameter gathers).
    pub dp_s: f64,
    /// The optimizer step (HBM-bound).
    pub optimizer_s: f64,
    /// The step: the sum of the above.
    pub step_s: f64,
}

/// One `(t, p, d)` layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layout {
    /// 1 for the best feasible layout, …; `None` when infeasible.
    pub rank: Option<usize>,
    /// Tensor-parallel size `t`.
    pub tp: u64,
    /// Pipeline-parallel size `p`.
    pub pp: u64,
    /// Data-parallel size `d`.
    pub dp: u64,
    /// Micro-batches per step, `m = B/(b·d)` (0 when `B` does not divide).
    pub micro_batches: u64,
    /// Whether it fits and is well formed.
    pub feasible: bool,
    /// Why not, when infeasible.
    pub reason: Option<String>,
    /// Memory per device.
    pub memory: Memory,
    /// Communication per step and device.
    pub communication: Communication,
    /// The 1F1B bubble, `(p − 1)/m` of the ideal time.
    pub bubble_fraction: f64,
    /// The estimated step time and its parts.
    pub time: Time,
    /// Model flops (no recomputation) per second over the devices' dense peak.
    pub mfu: f64,
    /// Executed flops (with recomputation) per second over the dense peak; Narayanan et al.
    /// 2021 report this (their eq. 3 counts the recomputed forward pass).
    pub hfu: f64,
    /// Executed teraFLOP/s per GPU (the unit of Narayanan et al. 2021, Tables 1 and 2).
    pub tflops_per_gpu: f64,
    /// Tokens per second through the whole machine.
    pub tokens_per_second: f64,
    /// Inference: milliseconds per decode step (one token for every sequence of a replica).
    pub decode_ms_per_token: Option<f64>,
}

/// The answer: the inputs as resolved and every layout, ranked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The model.
    pub model: ModelSummary,
    /// The device.
    pub device: Device,
    /// `training` or `inference`.
    pub mode: String,
    /// GPUs in all.
    pub gpus: u64,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Sequences per micro-batch.
    pub micro_batch_size: u64,
    /// Training: `none`, `selective` or `full`.
    pub recompute: Option<String>,
    /// Training: the ZeRO stage.
    pub zero: Option<u8>,
    /// Training: sequence parallelism with tensor parallelism.
    pub sequence_parallel: Option<bool>,
    /// Inference: tokens in the KV cache per replica.
    pub kv_cache_tokens: Option<u64>,
    /// Feasible layouts first, best first; then the infeasible ones.
    pub layouts: Vec<Layout>,
}

/// The model's sizes as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    /// Display name.
    pub name: String,
    /// Config family.
    pub family: String,
    /// Layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// MLP inner size.
    pub intermediate: u64,
    /// Vocabulary.
    pub vocab: u64,
    /// Parameters.
    pub params: u64,
}

impl Plan {
    /// The feasible layouts, best first.
    pub fn feasible(&self) -> impl Iterator<Item = &Layout> {
        self.layouts.iter().filter(|l| l.feasible)
    }

    /// The best feasible layout.
    pub fn best(&self) -> Option<&Layout> {
        self.feasible().next()
    }

    /// The layout `(t, p, d)`, if it was evaluated.
    pub fn layout(&self, tp: u64, pp: u64, dp: u64) -> Option<&Layout> {
        self.layouts
            .iter()
            .find(|l| (l.tp, l.pp, l.dp) == (tp, pp, dp))
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / GIB
}

/// Formats GiB as the reasons print them: whole numbers when whole, else one decimal.
pub fn fmt_gib(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{}", x.round())
    } else {
        format!("{x:.1}")
    }
}

/// Plans `req`: every layout evaluated and ranked.
///
/// Errors: a bad request (sizes of zero, `G` not divisible by the given `t·p`, `t·p·d ≠ G`, a
/// sequence longer than the position table, a global batch not divisible by the micro-batch
/// size), an asked-for layout that does not fit or is malformed, or no feasible layout at all.
pub fn plan(req: &Request) -> Result<Plan, PlanError> {
    req.device.check()?;
    let g = req.gpus;
    if g == 0 {
        return Err(PlanError::Usage("--gpus must be ≥ 1".into()));
    }
    for (flag, v) in [("--tp", req.tp), ("--pp", req.pp), ("--dp", req.dp)] {
        if v == Some(0) {
            return Err(PlanError::Usage(format!("{flag} must be ≥ 1")));
        }
    }
    let tp_pp = req.tp.unwrap_or(1) * req.pp.unwrap_or(1);
    if !g.is_multiple_of(tp_pp) {
        return Err(PlanError::Usage(format!(
            "--gpus {g} is not divisible by {}{}",
            match (req.tp, req.pp) {
                (Some(t), Some(p)) => format!("--tp {t} × --pp {p} = "),
                _ => String::new(),
            },
            match (req.tp, req.pp) {
                (Some(t), None) => format!("--tp {t}"),
                (None, Some(p)) => format!("--pp {p}"),
                _ => format!("{tp_pp}"),
            }
        )));
    }
    if let Some(d) = req.dp {
        if !g.is_multiple_of(tp_pp * d) || (req.tp.is_some() && req.pp.is_some() && tp_pp * d != g)
        {
            return Err(PlanError::Usage(format!(
                "--gpus {g} ≠ t·p·d with {}--dp {d}",
                [("--tp", req.tp), ("--pp", req.pp)]
                    .iter()
                    .filter_map(|(f, v)| v.map(|v| format!("{f} {v} ")))
                    .collect::<String>()
            )));
        }
    }
    let m = &req.model;
    let seq = req.seq.unwrap_or(m.max_positions.min(4096));
    if seq == 0 {
        return Err(PlanError::Usage("--seq must be ≥ 1".into()));
    }
    if m.learned_positions && seq > m.max_positions {
        return Err(PlanError::Usage(format!(
            "--seq {seq} exceeds the model's {} positions",
            m.max_positions
        )));
    }
    let training = matches!(req.mode, Mode::Training { .. });
    let b = req.micro_batch.unwrap_or(1);
    let big_b = req.global_batch.unwrap_or(if training { 512 } else { 1 });
    if b == 0 || big_b == 0 {
        return Err(PlanError::Usage(
            "--global-batch and --micro-batch-size must be ≥ 1".into(),
        ));
    }
    if !big_b.is_multiple_of(b) {
        return Err(PlanError::Usage(format!(
            "--global-batch {big_b} is not a multiple of --micro-batch-size {b}"
        )));
    }
    if let Mode::Training { zero, .. } = req.mode {
        if zero > 3 {
            return Err(PlanError::Usage(format!(
                "--zero must be 0, 1, 2 or 3, got {zero}"
            )));
        }
    }

    let mut layouts = Vec::new();
    for t in divisors(g) {
        if req.tp.is_some_and(|x| x != t) {
            continue;
        }
        for p in divisors(g / t) {
            if req.pp.is_some_and(|x| x != p) {
                continue;
            }
            let d = g / (t * p);
            if req.dp.is_some_and(|x| x != d) {
                continue;
            }
            layouts.push(evaluate(req, seq, big_b, b, t, p, d));
        }
    }
    // Feasible by step time (fewer model-parallel GPUs on ties); infeasible by memory needed,
    // the malformed ones last.
    layouts.sort_by(|x, y| {
        let key = |l: &Layout| {
            (
                !l.feasible,
                l.memory.total_gib.is_nan(),
                if l.feasible {
                    l.time.step_s
                } else {
                    l.memory.total_gib
                },
                l.tp * l.pp,
            )
        };
        let (a, c) = (key(x), key(y));
        a.0.cmp(&c.0)
            .then(a.1.cmp(&c.1))
            .then(a.2.total_cmp(&c.2))
            .then(a.3.cmp(&c.3))
    });
    let mut rank = 0;
    for l in layouts.iter_mut().filter(|l| l.feasible) {
        rank += 1;
        l.rank = Some(rank);
    }
    let (recompute, zero, sequence_parallel, kv_cache_tokens) = match req.mode {
        Mode::Training {
            recompute,
            zero,
            sequence_parallel,
        } => (
            Some(recompute.name().to_string()),
            Some(zero),
            Some(sequence_parallel),
            None,
        ),
        Mode::Inference { kv_cache_tokens } => (None, None, None, kv_cache_tokens),
    };
    let plan = Plan {
        model: ModelSummary {
            name: m.name.clone(),
            family: m.family.clone(),
            layers: m.layers,
            hidden: m.hidden,
            heads: m.heads,
            kv_heads: m.kv_heads,
            intermediate: m.intermediate,
            vocab: m.vocab,
            params: m.params(),
        },
        device: req.device.clone(),
        mode: if training { "training" } else { "inference" }.into(),
        gpus: g,
        seq,
        global_batch: big_b,
        micro_batch_size: b,
        recompute,
        zero,
        sequence_parallel,
        kv_cache_tokens,
        layouts,
    };
    if plan.best().is_none() {
        return Err(no_layout(&plan, req));
    }
    Ok(plan)
}

fn no_layout(plan: &Plan, req: &Request) -> PlanError {
    let one = req.tp.is_some() && req.pp.is_some();
    // The layout needing the least memory among the well-formed ones explains best.
    let best = plan
        .layouts
        .iter()
        .filter(|l| !l.memory.total_gib.is_nan())
        .min_by(|a, b| a.memory.total_gib.total_cmp(&b.memory.total_gib))
        .or(plan.layouts.first());
    let Some(l) = best else {
        return PlanError::NoLayout(format!("no layout of {} GPUs to evaluate", plan.gpus));
    };
    let what = format!("t={}, p={}, d={}", l.tp, l.pp, l.dp);
    let reason = l.reason.clone().unwrap_or_default();
    if one || plan.layouts.len() == 1 {
        PlanError::NoLayout(format!(
            "{} on {} × {}: layout {what} does not work: {reason}",
            plan.model.name, plan.gpus, plan.device.name
        ))
    } else {
        PlanError::NoLayout(format!(
            "{} does not fit on {} × {} in any of {} layouts; the closest, {what}, {reason}",
            plan.model.name,
            plan.gpus,
            plan.device.name,
            plan.layouts.len()
        ))
    }
}

fn divisors(n: u64) -> Vec<u64> {
    (1..=n).filter(|k| n.is_multiple_of(*k)).collect()
}

fn layer_shape(m: &ModelDesc) -> LayerShape {
    LayerShape {
        hidden: m.hidden as f64,
        heads: m.heads as f64,
        q_dim: m.q_dim() as f64,
        kv_dim: m.kv_dim() as f64,
        intermediate: m.intermediate as f64,
        gated: m.gated_mlp,
        dropout: m.dropout,
    }
}

/// Why `(t, p)` cannot split this model, if it cannot.
fn malformed(m: &ModelDesc, t: u64, p: u64) -> Option<String> {
    if !m.heads.is_multiple_of(t) {
        return Some(format!(
            "t={t} does not divide the {} attention heads",
            m.heads
        ));
    }
    if !m.kv_heads.is_multiple_of(t) && !t.is_multiple_of(m.kv_heads) {
        return Some(format!(
            "t={t} neither divides nor is a multiple of the {} key/value heads",
            m.kv_heads
        ));
    }
    if p > m.layers {
        return Some(format!("p={p} is more stages than the {} layers", m.layers));
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn evaluate(req: &Request, s: u64, big_b: u64, b: u64, t: u64, p: u64, d: u64) -> Layout {
    let m = &req.model;
    let dev = &req.device;
    let k = dev.gpus_per_node;
    let micro = pipeline::micro_batches(big_b, b, d);
    let mb = micro.unwrap_or(0);
    let tp_within = comm::within_node(1, t, k);
    let dp_within = comm::within_node(t, d, k);
    let pp_within = comm::within_node(t * d, p, k);
    let link = |within: bool| {
        if within {
            Link::new(dev.intra_node_gbs, INTRA_LATENCY_S)
        } else {
            Link::new(dev.inter_node_gbs, INTER_LATENCY_S)
        }
    };
    let (tp_link, dp_link, pp_link) = (link(tp_within), link(dp_within), link(pp_within));
    let (tf, pf, df) = (t as f64, p as f64, d as f64);
    let (bf, sf) = (b as f64, s as f64);
    let h = m.hidden as f64;
    let lps = m.layers.div_ceil(p) as f64;
    let shape = layer_shape(m);
    let peak = dev.peak_tflops * 1e12;
    let gemm_rate = peak * dev.gemm_efficiency;
    let hbm = dev.hbm_gbs * 1e9;

    // Parameters per device on the first and the last stage (embeddings are split over the
    // tensor-parallel group, as Megatron's vocabulary-parallel embedding; with p > 1 the last
    // stage holds its own copy of tied output embeddings, as Megatron does).
    let layer_p = m.layer_params() as f64;
    let embed = m.embedding_params() as f64;
    let head = m.head_params() as f64
        + if p > 1 && m.decoder && m.tied_embeddings {
            (m.vocab * m.hidden) as f64
        } else {
            0.0
        };
    let (first_p, last_p) = if p == 1 {
        let all = (lps * layer_p + embed + head) / tf;
        (all, all)
    } else {
        ((lps * layer_p + embed) / tf, (lps * layer_p + head) / tf)
    };

    // One micro-batch's activation message between layers / stages: b·s·h 16-bit values.
    let msg = 2.0 * bf * sf * h;
    let mut comm_out = Communication {
        tp_bytes: 0.0,
        pp_bytes: 0.0,
        dp_bytes: 0.0,
        tp_within_node: tp_within,
        dp_within_node: dp_within,
        pp_within_node: pp_within,
    };
    let capacity = dev.memory_gib;
    let nan_layout = |reason: String, comm_out: Communication| Layout {
        rank: None,
        tp: t,
        pp: p,
        dp: d,
        micro_batches: mb,
        feasible: false,
        reason: Some(reason),
        memory: Memory {
            weights_gib: f64::NAN,
            gradients_gib: f64::NAN,
            optimizer_gib: f64::NAN,
            activations_gib: f64::NAN,
            kv_cache_gib: f64::NAN,
            total_gib: f64::NAN,
            capacity_gib: capacity,
        },
        communication: comm_out,
        bubble_fraction: f64::NAN,
        time: Time {
            compute_s: f64::NAN,
            tp_s: f64::NAN,
            pp_s: f64::NAN,
            bubble_s: f64::NAN,
            dp_s: f64::NAN,
            optimizer_s: f64::NAN,
            step_s: f64::NAN,
        },
        mfu: f64::NAN,
        hfu: f64::NAN,
        tflops_per_gpu: f64::NAN,
        tokens_per_second: f64::NAN,
        decode_ms_per_token: None,
    };
    if let Some(why) = malformed(m, t, p) {
        return nan_layout(why, comm_out);
    }
    if micro.is_none() {
        return nan_layout(
            format!(
                "the global batch {big_b} is not a whole number of micro-batches of b·d = {b}·{d} sequences"
            ),
            comm_out,
        );
    }
    let (bubble_frac, memory, time, model_flops, hw_flops, decode) = match req.mode {
        Mode::Training {
            recompute,
            zero,
            sequence_parallel,
        } => {
            let sp = sequence_parallel && t > 1;
            let act_layer = memory::layer_activation_bytes(&shape, bf, sf, tf, sp, recompute);
            let in_flight = memory::in_flight_micro_batches(p, mb) as f64;
            // Logits in bf16 and their fp32 softmax for the loss, one micro-batch on the last
            // stage (this model's estimate; not in Korthikanti et al.).
            let logits = if m.decoder {
                6.0 * bf * sf * m.vocab as f64 / tf
            } else {
                0.0
            };
            let stage_mem = |params: f64, acts: f64| {
                let (w, gr, o) = memory::model_state_bytes(params, zero, df);
                (w, gr, o, acts)
            };
            let first = stage_mem(first_p, lps * in_flight * act_layer);
            let last = stage_mem(last_p, lps * act_layer + logits);
            let sum = |x: &(f64, f64, f64, f64)| x.0 + x.1 + x.2 + x.3;
            let worst = if sum(&first) >= sum(&last) {
                first
            } else {
                last
            };
            let mem = Memory {
                weights_gib: gib(worst.0),
                gradients_gib: gib(worst.1),
                optimizer_gib: gib(worst.2),
                activations_gib: gib(worst.3),
                kv_cache_gib: 0.0,
                total_gib: gib(sum(&worst)),
                capacity_gib: capacity,
            };

            // One layer, one micro-batch: forward, backward (twice the forward), recomputation.
            let fwd = m.layer_forward_flops(b, s) / tf;
            let core = m.attention_core_flops(b, s) / tf;
            let re = match recompute {
                Recompute::None => 0.0,
                Recompute::Selective => core,
                Recompute::Full => fwd,
            };
            let layer_flops = 3.0 * fwd + re;
            // Stored activations are written in the forward pass and read in the backward
            // one; recomputed ones are written again.
            let stored_all =
                memory::layer_activation_bytes(&shape, bf, sf, tf, sp, Recompute::None);
            let stored_core = stored_all
                - memory::layer_activation_bytes(&shape, bf, sf, tf, sp, Recompute::Selective);
            let traffic = 2.0 * stored_all
                + match recompute {
                    Recompute::None => 0.0,
                    Recompute::Selective => stored_core,
                    Recompute::Full => stored_all,
                };
            let layer_compute = layer_flops / gemm_rate + traffic / hbm;
            // Tensor parallelism: two all-reduces (or all-gather + reduce-scatter pairs with
            // sequence parallelism, the same bytes) forward, two backward, two more when the
            // whole layer is recomputed.
            let collectives = if recompute == Recompute::Full {
                6.0
            } else {
                4.0
            };
            let layer_tp = collectives * comm::all_reduce_time(t, msg, tp_link);
            let logits_compute = 3.0 * m.logits_forward_flops(b, s) / tf / gemm_rate;
            // Pipeline: the activation forward and its gradient backward, split over the t
            // ranks (Megatron's scatter/gather across the tensor-parallel group).
            let p2p = if p > 1 {
                2.0 * comm::send_time(msg / tf, pp_link)
            } else {
                0.0
            };
            let first_stage = lps * layer_compute + if p == 1 { logits_compute } else { 0.0 };
            let last_stage = lps * layer_compute + logits_compute;
            let slot_compute = first_stage.max(last_stage);
            let slot_tp = lps * layer_tp;
            let slot = slot_compute + slot_tp + p2p;
            let mf = mb as f64;
            comm_out.tp_bytes = mf * lps * collectives * comm::all_reduce_bytes(t, msg);
            comm_out.pp_bytes = if p > 1 { mf * 2.0 * msg / tf } else { 0.0 };

            // Data parallelism: gradients once per step (all-reduce; ZeRO 1/2 reduce-scatter
            // the gradients and all-gather the weights, the same bytes); ZeRO 3 gathers the
            // weights forward and backward and reduce-scatters the gradients per micro-batch.
            let local_p = first_p.max(last_p);
            let grad_bytes = memory::GRADIENT_BYTES * local_p;
            let weight_bytes = memory::WEIGHT_BYTES * local_p;
            let (dp_bytes, dp_s) = if zero < 3 {
                (
                    comm::all_reduce_bytes(d, grad_bytes),
                    comm::all_reduce_time(d, grad_bytes, dp_link),
                )
            } else {
                (
                    mf * (2.0 * comm::all_gather_bytes(d, weight_bytes)
                        + comm::reduce_scatter_bytes(d, grad_bytes)),
                    mf * (2.0 * comm::all_gather_time(d, weight_bytes, dp_link)
                        + comm::reduce_scatter_time(d, grad_bytes, dp_link)),
                )
            };
            comm_out.dp_bytes = dp_bytes;
            // The optimizer reads and writes the states it holds.
            let (w, gr, o) = memory::model_state_bytes(local_p, zero, df);
            let optimizer_s = 2.0 * (w + gr + o) / hbm;
            let time = Time {
                compute_s: mf * slot_compute,
                tp_s: mf * slot_tp,
                pp_s: mf * p2p,
                bubble_s: (pf - 1.0) * slot,
                dp_s,
                optimizer_s,
                step_s: (mf + pf - 1.0) * slot + dp_s + optimizer_s,
            };
            let seqs = big_b as f64;
            let layers = m.layers as f64;
            let model_flops = seqs
                * (3.0 * layers * m.layer_forward_flops(1, s) + 3.0 * m.logits_forward_flops(1, s));
            let re_one = match recompute {
                Recompute::None => 0.0,
                Recompute::Selective => m.attention_core_flops(1, s),
                Recompute::Full => m.layer_forward_flops(1, s),
            };
            let hw_flops = model_flops + seqs * layers * re_one;
            (
                pipeline::bubble_fraction(p, mb),
                mem,
                time,
                model_flops,
                hw_flops,
                None,
            )
        }
        Mode::Inference { kv_cache_tokens } => {
            let replica_seqs = big_b / d;
            let kv_tokens = kv_cache_tokens.unwrap_or(replica_seqs * s) as f64;
            let kv_rank = m.kv_heads.div_ceil(t) as f64 * m.head_dim as f64;
            let kv_layer = if m.decoder {
                2.0 * 2.0 * kv_rank * kv_tokens
            } else {
                0.0
            };
            // Live activations of one layer for one micro-batch: the residual stream and the
            // larger of the attention phase (q, k, v and the materialised scores) and the MLP
            // phase (its inner tensors).
            let sb = bf * sf;
            let attn_live = 2.0 * sb * (m.q_dim() as f64 + 2.0 * kv_rank) / tf
                + 2.0 * (m.heads as f64 / tf) * bf * sf * sf;
            let mlp_live =
                2.0 * sb * m.intermediate as f64 * if m.gated_mlp { 3.0 } else { 2.0 } / tf;
            let live = 2.0 * sb * h + attn_live.max(mlp_live);
            let logits_live = if m.decoder {
                4.0 * bf * m.vocab as f64 / tf
            } else {
                0.0
            };
            let weights = memory::WEIGHT_BYTES * first_p.max(last_p);
            let kv = lps * kv_layer;
            let acts = live + logits_live;
            let mem = Memory {
                weights_gib: gib(weights),
                gradients_gib: 0.0,
                optimizer_gib: 0.0,
                activations_gib: gib(acts),
                kv_cache_gib: gib(kv),
                total_gib: gib(weights + kv + acts),
                capacity_gib: capacity,
            };
            // Prefill of one micro-batch through one layer: GEMMs or the weight reads, whichever
            // is slower, plus the activation writes; two all-reduces.
            let layer_weights = memory::WEIGHT_BYTES * layer_p / tf;
            let fwd = m.layer_forward_flops(b, s) / tf;
            let stored = memory::layer_activation_bytes(&shape, bf, sf, tf, false, Recompute::None);
            let layer_compute = (fwd / gemm_rate).max(layer_weights / hbm) + stored / hbm;
            let layer_tp = 2.0 * comm::all_reduce_time(t, msg, tp_link);
            let logits = m.logits_forward_flops(b, s) / tf / gemm_rate;
            let p2p = if p > 1 {
                comm::send_time(msg / tf, pp_link)
            } else {
                0.0
            };
            let slot_compute = lps * layer_compute + logits;
            let slot_tp = lps * layer_tp;
            let slot = slot_compute + slot_tp + p2p;
            let mf = mb as f64;
            comm_out.tp_bytes = mf * lps * 2.0 * comm::all_reduce_bytes(t, msg);
            comm_out.pp_bytes = if p > 1 { mf * msg / tf } else { 0.0 };
            let time = Time {
                compute_s: mf * slot_compute,
                tp_s: mf * slot_tp,
                pp_s: mf * p2p,
                bubble_s: (pf - 1.0) * slot,
                dp_s: 0.0,
                optimizer_s: 0.0,
                step_s: (mf + pf - 1.0) * slot,
            };
            let model_flops = big_b as f64
                * (m.layers as f64 * m.layer_forward_flops(1, s) + m.logits_forward_flops(1, s));
            // One decode step for every sequence of a replica: per layer the weights and the
            // cache are read once, the matmuls run on one row per sequence.
            let decode = m.decoder.then(|| {
                let r = replica_seqs as f64;
                let flops = 2.0 * r * m.layer_matmul_params() as f64 / tf;
                let per_layer = (flops / gemm_rate).max((layer_weights + kv_layer) / hbm)
                    + 2.0 * comm::all_reduce_time(t, 2.0 * r * h, tp_link);
                let head = (2.0 * r * (m.hidden * m.vocab) as f64 / tf / gemm_rate)
                    .max(memory::WEIGHT_BYTES * (m.hidden * m.vocab) as f64 / tf / hbm);
                let hop = if p > 1 {
                    comm::send_time(2.0 * r * h / tf, pp_link)
                } else {
                    0.0
                };
                1e3 * (pf * (lps * per_layer + hop) + head)
            });
            (
                pipeline::bubble_fraction(p, mb),
                mem,
                time,
                model_flops,
                model_flops,
                decode,
            )
        }
    };
    let gf = req.gpus as f64;
    let step = time.step_s;
    let feasible = memory.total_gib <= capacity;
    let reason = (!feasible).then(|| {
        format!(
            "needs {} GiB per device, has {}",
            fmt_gib(memory.total_gib),
            fmt_gib(capacity)
        )
    });
    Layout {
        rank: None,
        tp: t,
        pp: p,
        dp: d,
        micro_batches: mb,
        feasible,
        reason,
        memory,
        communication: comm_out,
        bubble_fraction: bubble_frac,
        mfu: model_flops / (step * gf * peak),
        hfu: hw_flops / (step * gf * peak),
        tflops_per_gpu: hw_flops / step / gf / 1e12,
        tokens_per_second: (big_b * s) as f64 / step,
        time,
        decode_ms_per_token: decode,
    }
}
