//! Tensor parallelism in a [`Session`]: the Megatron layout of each model family as a
//! [`ShardSpec`], the sharded load (each rank reads only its slices), and N CPU ranks as threads.
//!
//! Layout (`--tp-layout megatron`; `megatron-fused` and `megatron-sp` move where the bias,
//! residual and norms of each row-parallel site run, `auto` picks by cost): Q/K/V (GPT-2's merged `c_attn` as
//! three blocks, so each rank gets its heads' q, k and v columns) and the MLP up/gate/fc
//! projections column-parallel, attention on the rank's heads, the attention output and MLP
//! down projections row-parallel followed by one `all_reduce` each (bias and residual added once,
//! after it); key/value heads split when the degree divides them, replicated otherwise; the LM
//! head vocab-parallel (vocabulary padded to a multiple of the degree, local logits, one
//! `all_gather`, the padding dropped) and the word embedding vocab-parallel (each rank looks up
//! its rows, masks the others, one `all_reduce`; tied embeddings share the one split table); the MLP width likewise padded with zeros when the degree
//! does not divide it (exact: the down projection's padded rows are zero). A degree that does not
//! divide the attention heads is an error naming the weight. Position and token-type embeddings, norms and the BERT
//! pooler stay replicated.

use std::sync::Arc;
use std::time::Duration;

use crate::ir::{Bindings, Weights};
use crate::models::config::ModelConfig;
use crate::models::{
    checkpoint_prefixes, expected_weights, gpt2, load_safetensors_sliced, synthesized_weights,
    AxisSlice, LoadStats, Model, SliceRequest,
};
use crate::passes::shard::{Layout, ShardError, ShardSpec, Sharded};
use crate::runtime::comm::{Collective, Communicator, InProcessGroup};
use crate::runtime::tp::TpLoaded;
use crate::runtime::{Backend, CpuBackend, Loaded};
use crate::{Error, Session};

/// How long a collective waits for the other ranks before the group gives up
/// (`TRANSFUSE_TP_TIMEOUT` seconds, default 60).
pub fn collective_timeout() -> Duration {
    std::env::var("TRANSFUSE_TP_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60))
}

fn not_divisible(tensor: &str, dims: String, degree: usize, why: String) -> Error {
    Error::Shard(ShardError::NotDivisible {
        tensor: tensor.to_string(),
        dims,
        degree,
        why,
    })
}

/// The Megatron layout of `cfg` for `degree` ranks, every divisibility checked with the
/// tensor it concerns named.
pub fn megatron_spec(cfg: &ModelConfig, degree: usize) -> Result<ShardSpec, Error> {
    if degree == 0 {
        return Err(Error::Usage("--tp must be ≥ 1".into()));
    }
    let mut spec = ShardSpec {
        degree,
        ..ShardSpec::default()
    };
    let heads_check = |tensor: &str, heads: usize, what: &str, shape: String| {
        if !heads.is_multiple_of(degree) {
            Err(not_divisible(
                tensor,
                shape,
                degree,
                format!("{heads} {what} are not divisible by {degree}"),
            ))
        } else {
            Ok(())
        }
    };
    let col = |axis| Layout::split(axis);
    // The MLP width padded to a multiple of the degree with zero rows/columns: exact, since
    // the padded rows of the down projection are zero whatever the activation gives.
    let mlp = |axis, width: usize| {
        let padded = width.div_ceil(degree) * degree;
        Layout::Split {
            axis,
            segments: 1,
            padded: (padded != width).then_some(padded),
        }
    };
    let vocab = cfg.vocab_size();
    let padded = vocab.div_ceil(degree) * degree;
    let head_layout = Layout::Split {
        axis: 0,
        segments: 1,
        padded: (padded != vocab).then_some(padded),
    };
    let mut kv_split = true;
    match cfg {
        ModelConfig::Gpt2(c) => {
            let h = c.n_embd;
            for i in 0..c.n_layer {
                let p = format!("h.{i}");
                let qkv = format!("{p}.attn.c_attn.weight");
                heads_check(&qkv, c.n_head, "heads", format!("[{h}, {}]", 3 * h))?;
                let merged = Layout::Split {
                    axis: 1,
                    segments: 3,
                    padded: None,
                };
                spec.weights.insert(qkv, merged);
                spec.weights.insert(
                    format!("{p}.attn.c_attn.bias"),
                    Layout::Split {
                        axis: 0,
                        segments: 3,
                        padded: None,
                    },
                );
                spec.weights
                    .insert(format!("{p}.attn.c_proj.weight"), col(0));
                let w = c.n_inner;
                spec.weights
                    .insert(format!("{p}.mlp.c_fc.weight"), mlp(1, w));
                spec.weights.insert(format!("{p}.mlp.c_fc.bias"), mlp(0, w));
                spec.weights
                    .insert(format!("{p}.mlp.c_proj.weight"), mlp(0, w));
            }
            // Tied: one vocab-split table serves the embedding and the LM head.
            spec.weights.insert("wte.weight".into(), head_layout);
        }
        ModelConfig::Bert(c) => {
            let h = c.hidden_size;
            for i in 0..c.num_hidden_layers {
                let p = format!("encoder.layer.{i}");
                for qkv in ["query", "key", "value"] {
                    let w = format!("{p}.attention.self.{qkv}.weight");
                    heads_check(&w, c.num_attention_heads, "heads", format!("[{h}, {h}]"))?;
                    spec.weights.insert(w, col(0));
                    spec.weights
                        .insert(format!("{p}.attention.self.{qkv}.bias"), col(0));
                }
                spec.weights
                    .insert(format!("{p}.attention.output.dense.weight"), col(1));
                let w = c.intermediate_size;
                spec.weights
                    .insert(format!("{p}.intermediate.dense.weight"), mlp(0, w));
                spec.weights
                    .insert(format!("{p}.intermediate.dense.bias"), mlp(0, w));
                spec.weights
                    .insert(format!("{p}.output.dense.weight"), mlp(1, w));
            }
            spec.weights
                .insert("embeddings.word_embeddings.weight".into(), head_layout);
        }
        ModelConfig::Llama(c) => {
            let (h, d) = (c.hidden_size, c.head_dim);
            kv_split = c.num_key_value_heads.is_multiple_of(degree);
            for i in 0..c.num_hidden_layers {
                let at = format!("model.layers.{i}.self_attn");
                let q = format!("{at}.q_proj.weight");
                heads_check(
                    &q,
                    c.num_attention_heads,
                    "heads",
                    format!("[{}, {h}]", c.num_attention_heads * d),
                )?;
                spec.weights.insert(q, col(0));
                spec.weights.insert(format!("{at}.q_proj.bias"), col(0));
                if kv_split {
                    for kv in ["k", "v"] {
                        spec.weights
                            .insert(format!("{at}.{kv}_proj.weight"), col(0));
                        spec.weights.insert(format!("{at}.{kv}_proj.bias"), col(0));
                    }
                }
                spec.weights.insert(format!("{at}.o_proj.weight"), col(1));
                let mp = format!("model.layers.{i}.mlp");
                let w = c.intermediate_size;
                for p in ["gate_proj", "up_proj"] {
                    spec.weights.insert(format!("{mp}.{p}.weight"), mlp(0, w));
                    spec.weights.insert(format!("{mp}.{p}.bias"), mlp(0, w));
                }
                spec.weights
                    .insert(format!("{mp}.down_proj.weight"), mlp(1, w));
            }
            spec.weights
                .insert("model.embed_tokens.weight".into(), head_layout.clone());
            if !c.tie_word_embeddings {
                spec.weights.insert("lm_head.weight".into(), head_layout);
            }
        }
    }
    if let Some(cache) = cfg.cache_shape() {
        for i in 0..cache.layers {
            for name in [gpt2::past_key(i), gpt2::past_value(i)] {
                if kv_split {
                    spec.inputs.insert(name, Layout::split(1));
                }
            }
            for name in [gpt2::present_key(i), gpt2::present_value(i)] {
                if kv_split {
                    spec.rank_local_outputs.insert(name);
                }
            }
        }
    }
    Ok(spec)
}

/// The key/value heads each rank holds in its KV cache under [`megatron_spec`].
pub fn local_kv_heads(cfg: &ModelConfig, degree: usize) -> Option<usize> {
    let c = cfg.cache_shape()?;
    Some(if c.kv_heads.is_multiple_of(degree) {
        c.kv_heads / degree
    } else {
        c.kv_heads
    })
}

/// The rank's weights of a sharded graph, read from `model`'s checkpoint: slices of the sharded
/// ones, all of the replicated ones; the synthesized ones (RoPE frequencies) computed.
pub fn load_rank(
    model: &Model,
    sharded: &Sharded,
    rank: usize,
) -> Result<(Weights, LoadStats), Error> {
    let full: std::collections::HashMap<String, Vec<usize>> =
        expected_weights(&model.graph)?.into_iter().collect();
    let synth = synthesized_weights(&model.config);
    let mut requests = Vec::new();
    for (name, _) in sharded.graph.weights() {
        if synth.contains_key(name) {
            continue;
        }
        let ws = &sharded.weights[name];
        let shape = full
            .get(&ws.source)
            .cloned()
            .ok_or_else(|| Error::Usage(format!("sharded weight `{name}` has no source")))?;
        let slice = match ws.layout {
            Layout::Replicated => None,
            Layout::Split { axis, .. } => {
                let (ranges, padded) = ws
                    .ranges(shape[axis], rank, sharded.degree)
                    .expect("split layouts have ranges");
                Some(AxisSlice {
                    axis,
                    ranges,
                    padded,
                })
            }
        };
        requests.push(SliceRequest {
            name: name.to_string(),
            source: ws.source.clone(),
            shape,
            slice,
        });
    }
    let (mut w, stats) = load_safetensors_sliced(
        &model.dir.join("model.safetensors"),
        &requests,
        checkpoint_prefixes(&model.config),
    )?;
    w.extend(synth);
    Ok((w, stats))
}

/// Loads one rank: its communicator, its folded graph and weights.
pub type RankLoader<'a> = dyn Fn(Arc<dyn Communicator>, &crate::ir::Graph, &Weights) -> Result<Box<dyn Loaded>, Error>
    + 'a;

/// What a tensor-parallel session adds to a [`Session`].
pub struct TpState {
    /// The degree.
    pub degree: usize,
    /// Per rank: bytes read from the checkpoint and resident weight bytes.
    pub stats: Vec<LoadStats>,
    /// The sharded graph (before each rank's weight folding).
    pub sharded: Sharded,
    /// The global rank of this process's first rank (`stats[i]` is rank `first_rank + i`;
    /// non-zero only on the later nodes of a multi-node NCCL job).
    pub first_rank: usize,
    /// Which layout `--tp-layout` asked for and what was chosen ([`crate::passes::place`]).
    pub placement: crate::passes::place::Placement,
    comms: Vec<Arc<dyn Communicator>>,
}

impl TpState {
    /// The collectives each rank ran since the last call.
    pub fn take_logs(&self) -> Vec<Vec<Collective>> {
        self.comms.iter().map(|c| c.take_log()).collect()
    }
}

impl Session {
    /// `degree` CPU ranks running `model` (loaded with [`Model::load_without_weights`]; each rank
    /// reads its own slices) sharded with the Megatron layout.
    pub fn cpu_tp(model: Model, degree: usize) -> Result<Session, Error> {
        Session::tp_with(
            model,
            degree,
            CpuBackend::new(),
            &crate::passes::Options::default(),
        )
    }

    /// [`Session::cpu_tp`] with the CPU backend `backend` (fast or reference) and optimizer
    /// options.
    pub fn tp_with(
        model: Model,
        degree: usize,
        backend: CpuBackend,
        opts: &crate::passes::Options,
    ) -> Result<Session, Error> {
        let b = backend.clone();
        Session::tp_ranks(model, degree, Box::new(backend), opts, &|comm, graph, w| {
            Ok(b.clone().with_comm(comm).load(graph, w)?)
        })
    }

    /// `degree` wgpu ranks, each on its own wgpu device (lavapipe gives several logical
    /// devices from one adapter), each a [`crate::runtime::tp::DeviceSegments`]: the values
    /// that cross a collective stay in the device's buffers, and the in-process group runs the
    /// collectives on them (staged through the host: a read-back and an upload per collective).
    pub fn wgpu_tp(
        model: Model,
        degree: usize,
        opts: &crate::passes::Options,
    ) -> Result<Session, Error> {
        use crate::runtime::webgpu::WgpuDevice;
        use crate::runtime::DeviceBackend;
        let first = Arc::new(WgpuDevice::new()?);
        let b0 = DeviceBackend::on(first.clone());
        let mut o = opts.clone();
        if o.profile == crate::passes::Profile::gpu() {
            if let Some(p) = crate::passes::Profile::by_name(b0.cost_profile()) {
                o.profile = p;
            }
        }
        let group = InProcessGroup::ranks(degree, collective_timeout());
        let comms: Vec<Arc<dyn Communicator>> = group
            .iter()
            .map(|c| c.clone() as Arc<dyn Communicator>)
            .collect();
        let first = std::sync::Mutex::new(Some(first));
        Session::tp_ranks_in(
            model,
            degree,
            Box::new(b0),
            &o,
            0,
            comms,
            &|comm, graph, w| {
                let taken = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                let dev = match taken {
                    Some(d) => d,
                    None => Arc::new(WgpuDevice::new()?),
                };
                let dc = group[comm.rank()].clone();
                let l = crate::runtime::tp::DeviceSegments::load(dev, graph, w, dc, comm)?;
                Ok(Box::new(l) as Box<dyn Loaded>)
            },
        )
    }

    /// `degree` ranks of `model` sharded with the Megatron layout, rank `r` loaded by `load`
    /// with its communicator, its folded graph and weights; `backend` is the session's.
    pub fn tp_ranks(
        model: Model,
        degree: usize,
        backend: Box<dyn Backend>,
        opts: &crate::passes::Options,
        load: &RankLoader<'_>,
    ) -> Result<Session, Error> {
        let comms = InProcessGroup::ranks(degree, collective_timeout())
            .into_iter()
            .map(|c| c as Arc<dyn Communicator>)
            .collect();
        Session::tp_ranks_in(model, degree, backend, opts, 0, comms, load)
    }

    /// [`Session::tp_ranks`] over communicators made by the caller: `comms[i]` is global rank
    /// `first + i` of `degree` (all of them in one process; this process's share of a
    /// multi-process NCCL job).
    pub fn tp_ranks_in(
        model: Model,
        degree: usize,
        backend: Box<dyn Backend>,
        opts: &crate::passes::Options,
        first: usize,
        comms: Vec<Arc<dyn Communicator>>,
        load: &RankLoader<'_>,
    ) -> Result<Session, Error> {
        let spec = megatron_spec(&model.config, degree)?;
        let (g, report) = crate::passes::optimize(&model.graph, opts)?;
        let placement = crate::passes::place::place(&g, &spec, opts.tp_layout, &opts.profile)?;
        let sharded = placement.sharded.clone();
        let mut ranks: Vec<Box<dyn Loaded>> = Vec::new();
        let mut stats = Vec::new();
        let mut rank0 = None;
        for (i, comm) in comms.iter().enumerate() {
            let (w, st) = load_rank(&model, &sharded, first + i)?;
            // Rank-dependent epilogue terms resolved before folding (which has no rank).
            let mine = crate::passes::shard::for_rank(&sharded.graph, first + i)?;
            let (graph, w) = crate::runtime::fold_weights(&mine, &w)?;
            ranks.push(load(comm.clone(), &graph, &w)?);
            stats.push(st);
            if i == 0 {
                rank0 = Some((graph, w));
            }
        }
        let (graph, weights) = rank0.expect("degree ≥ 1");
        let mut program: Box<dyn Loaded> = Box::new(TpLoaded::with(ranks, comms.clone()));
        if let Some(c) = &sharded.seq_chunk {
            // Sequence-parallel: the graph reads its chunk length from an extra input.
            program = Box::new(crate::sp::SeqChunkInput::new(program, c.clone()));
        }
        Ok(Session::from_parts(
            model,
            graph,
            Some(report),
            weights,
            backend,
            program,
            Some(TpState {
                degree,
                stats,
                sharded,
                first_rank: first,
                placement,
                comms,
            }),
        ))
    }
}

/// Bindings for the communication count of one forward over `batch × seq` tokens, no cache.
pub fn forward_bindings(batch: usize, seq: usize) -> Bindings {
    Bindings::from([
        ("batch".to_string(), batch),
        ("seq".to_string(), seq),
        ("past".to_string(), 0),
    ])
}

/// `compile --tp N --report`: the layout asked for and chosen (with the estimated cost of each
/// alternative), the per-rank op table of the sharded graph, its collectives and the bytes they
/// move per forward and per token at `bindings`, and the per-rank weight bytes; as text and as
/// JSON.
pub fn tp_report(
    placement: &crate::passes::place::Placement,
    bindings: &Bindings,
) -> Result<(String, serde_json::Value), Error> {
    use std::fmt::Write;
    let sharded = &placement.sharded;
    let n = sharded.degree;
    let g = &sharded.graph;
    let mut bindings = bindings.clone();
    if let Some(c) = &sharded.seq_chunk {
        // The sequence-parallel chunk, from the sequence length at these dims.
        let len = g
            .inputs()
            .into_iter()
            .find(|(name, _, _)| *name == c.input)
            .and_then(|(_, shape, _)| shape.get(c.axis).cloned())
            .ok_or_else(|| Error::Usage(format!("no input `{}`", c.input)))?
            .eval(&bindings)
            .map_err(crate::passes::PassError::from)?;
        bindings.insert(crate::passes::shard::SEQ_CHUNK.into(), c.chunk(len));
    }
    let bindings = &bindings;
    let c =
        crate::passes::shard::comm_cost(g, bindings, n).map_err(crate::passes::PassError::from)?;
    let tokens =
        bindings.get("batch").copied().unwrap_or(1) * bindings.get("seq").copied().unwrap_or(1);
    let tokens = tokens.max(1) as f64;
    let mut weight_bytes = 0u64;
    for (_, shape) in g.weights() {
        let dims = crate::ir::eval_shape(shape, &Bindings::new())
            .map_err(crate::passes::PassError::from)?;
        weight_bytes += 4 * dims.iter().product::<usize>() as u64;
    }
    let ops = g.op_counts();
    let payload = c.all_reduce_bytes + c.all_gather_bytes + c.reduce_scatter_bytes;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\ntensor parallel: {n} ranks, layout {} (--tp-layout {}); {} of {} row-parallel sites sequence-parallel, {} with the bias and residual before the all-reduce",
        placement.chosen,
        placement.asked.name(),
        placement.sp_sites,
        placement.sites,
        placement.fused_sites
    );
    if !placement.costs.is_empty() {
        let _ = writeln!(
            t,
            "  estimated per forward (compute + collectives): {}",
            placement
                .costs
                .iter()
                .map(|(k, v)| format!("{k} {:.2} µs", v * 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(t, "per rank:");
    for (op, k) in &ops {
        let _ = writeln!(t, "  {op:<16} {k:>5}");
    }
    let _ = writeln!(
        t,
        "collectives per forward: {} all_reduce ({} B), {} all_gather ({} B), {} reduce_scatter ({} B); {:.0} B per token; ring: {:.0} B sent per rank ({:.0} per token)",
        c.all_reduces,
        c.all_reduce_bytes,
        c.all_gathers,
        c.all_gather_bytes,
        c.reduce_scatters,
        c.reduce_scatter_bytes,
        payload as f64 / tokens,
        c.per_rank_ring,
        c.per_rank_ring / tokens
    );
    let _ = writeln!(
        t,
        "weights per rank: {weight_bytes} B (f32, before folding)"
    );
    let json = serde_json::json!({
        "degree": n,
        "layout": placement.chosen,
        "layout_asked": placement.asked.name(),
        "layout_costs_s": placement.costs,
        "sites": placement.sites,
        "sp_sites": placement.sp_sites,
        "fused_sites": placement.fused_sites,
        "reduce_scatters": c.reduce_scatters,
        "reduce_scatter_bytes": c.reduce_scatter_bytes,
        "ops_per_rank": ops,
        "all_reduces": c.all_reduces,
        "all_reduce_bytes": c.all_reduce_bytes,
        "all_gathers": c.all_gathers,
        "all_gather_bytes": c.all_gather_bytes,
        "ring_bytes_per_rank": c.per_rank_ring,
        "bytes_per_token": payload as f64 / tokens,
        "weight_bytes_per_rank": weight_bytes,
    });
    Ok((t, json))
}

/// Where this process's CUDA ranks sit in an NCCL job (`--nnodes`, `--node-rank`,
/// `--rendezvous`): `nnodes` processes (nodes) of `degree / nnodes` ranks each, one GPU per
/// rank (device ordinal = local rank).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NcclJob {
    /// Processes in the job (`--nnodes`, 1: this one only).
    pub nnodes: usize,
    /// This process, `0..nnodes` (`--node-rank`).
    pub node_rank: usize,
    /// The file node 0 writes the NCCL id to and the others read (`--rendezvous`); without it,
    /// a job of several nodes takes its id from `NCCL_COMM_ID` (NCCL derives the same id from
    /// it in every process).
    pub rendezvous: Option<std::path::PathBuf>,
}

impl NcclJob {
    /// One process holding every rank.
    pub fn single() -> NcclJob {
        NcclJob {
            nnodes: 1,
            node_rank: 0,
            rendezvous: None,
        }
    }

    /// The NCCL id of the job of `world` ranks: made here (one node, or node 0, which writes it
    /// to the rendezvous file), or read from node 0's file, or derived from `NCCL_COMM_ID`.
    fn unique_id(&self, world: usize) -> Result<crate::runtime::nccl::UniqueId, Error> {
        use crate::runtime::nccl;
        let flag = |f: &std::path::Path, e: String| {
            Error::Usage(format!("--rendezvous {}: {e}", f.display()))
        };
        match (&self.rendezvous, self.node_rank) {
            (Some(f), 0) => {
                let id = nccl::UniqueId::new()?;
                nccl::write_rendezvous(f, &id, world).map_err(|e| flag(f, e))?;
                Ok(id)
            }
            (Some(f), _) => {
                nccl::read_rendezvous(f, world, collective_timeout()).map_err(|e| flag(f, e))
            }
            (None, _) => Ok(nccl::UniqueId::new()?),
        }
    }
}

impl Session {
    /// `degree` CUDA ranks over NCCL: this process runs ranks
    /// `job.node_rank * degree / job.nnodes ..` of them, rank `first + i` on CUDA device `i`,
    /// each a [`crate::runtime::tp::DeviceSegments`] whose collectives run through its
    /// [`crate::runtime::nccl::NcclComm`] on the program's own device buffers (no host copy of
    /// the activations between segments). Errors, never panics, when NCCL
    /// or the driver is missing; a node with fewer devices than ranks is a usage error naming
    /// `--tp`.
    pub fn cuda_tp(
        model: Model,
        degree: usize,
        job: &NcclJob,
        opts: &crate::passes::Options,
    ) -> Result<Session, Error> {
        use crate::runtime::cuda::{self, CudaBackend, CudaDevice};
        use crate::runtime::nccl::{self, NcclComm};
        // NCCL first: without it nothing else matters (and no GPU is needed to say so).
        nccl::available()?;
        if job.nnodes == 0 || !degree.is_multiple_of(job.nnodes) || job.node_rank >= job.nnodes {
            return Err(Error::Usage(format!(
                "--nnodes {} --node-rank {}: --tp {degree} must be a multiple of --nnodes, and \
                 --node-rank below it",
                job.nnodes, job.node_rank
            )));
        }
        // The sharding's own checks (a degree that does not divide the heads) before any
        // device is opened.
        megatron_spec(&model.config, degree)?;
        let local = degree / job.nnodes;
        let first = job.node_rank * local;
        let count = cuda::device_count()?;
        if local > count {
            let per = match job.nnodes {
                1 => String::new(),
                k => format!(" (--nnodes {k}: {local} on each node)"),
            };
            return Err(Error::Usage(format!(
                "--tp {degree}: {local} ranks{per} need one CUDA device each; the driver sees \
                 {count}"
            )));
        }
        let devices: Vec<Arc<CudaDevice>> = (0..local)
            .map(|i| CudaDevice::open(i).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let id = job.unique_id(degree)?;
        let comms = NcclComm::init(devices.clone(), first, degree, &id, collective_timeout());
        if let (Some(f), 0) = (&job.rendezvous, job.node_rank) {
            // Every rank has joined (or the job failed): the id is spent either way.
            let _ = std::fs::remove_file(f);
        }
        let nccl_comms = comms?;
        let comms: Vec<Arc<dyn Communicator>> = nccl_comms
            .iter()
            .map(|c| c.clone() as Arc<dyn Communicator>)
            .collect();
        let b0 = CudaBackend::on(devices[0].clone());
        let mut o = opts.clone();
        if o.profile == crate::passes::Profile::gpu() {
            if let Some(p) = crate::passes::Profile::by_name(b0.cost_profile()) {
                o.profile = p;
            }
        }
        Session::tp_ranks_in(
            model,
            degree,
            Box::new(b0),
            &o,
            first,
            comms,
            &|comm, graph, w| {
                let local = comm.rank() - first;
                let dev = devices[local].clone();
                let dc = nccl_comms[local].clone();
                let l = crate::runtime::tp::DeviceSegments::load(dev, graph, w, dc, comm)?;
                Ok(Box::new(l) as Box<dyn Loaded>)
            },
        )
    }
}
