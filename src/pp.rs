//! Pipeline parallelism in a [`Session`]: the optimized graph cut into `P` stages balanced by
//! the cost model (`transfuse_passes::pipeline`), one thread per stage passing activations
//! through the in-process communicator's `send`/`recv` ([`crate::runtime::pp`]), `M`
//! micro-batches flowing through the stages, each stage on its own backend instance (a wgpu
//! stage: its own wgpu device) or, with `--tp T`, a tensor-parallel group of `T` CPU ranks
//! (P×T ranks in all).

use std::collections::HashMap;
use std::sync::Arc;

use crate::ir::{Bindings, Graph};
use crate::models::Model;
use crate::passes::pipeline::{cut, Pipeline};
use crate::passes::shard::shard;
use crate::runtime::comm::{Collective, Communicator, InProcessComm, InProcessGroup};
use crate::runtime::pp::{PpLoaded, PpStage};
use crate::runtime::tp::TpLoaded;
use crate::runtime::{Backend, CpuBackend, Loaded};
use crate::tp::{collective_timeout, load_rank, megatron_spec};
use crate::{Error, Session};

/// What a pipeline-parallel session adds to a [`Session`].
pub struct PpState {
    /// The stages.
    pub stages: usize,
    /// The micro-batches a call is split into.
    pub micro_batches: usize,
    /// The tensor-parallel degree of each stage (1: one device per stage).
    pub tp: usize,
    /// The cut (stage graphs before sharding and weight folding).
    pub pipeline: Pipeline,
    comms: Vec<Arc<InProcessComm>>,
}

impl PpState {
    /// The sends and receives each stage ran since the last call.
    pub fn take_logs(&self) -> Vec<Vec<Collective>> {
        self.comms.iter().map(|c| c.take_log()).collect()
    }
}

/// Makes one stage's backend (called once per stage: a wgpu stage gets its own device).
pub type BackendFactory<'a> = &'a dyn Fn() -> Result<Box<dyn Backend>, Error>;

/// The `batch` axis of every input and output of `g` that has one.
fn batch_axes(g: &Graph) -> HashMap<String, usize> {
    let mut axes = HashMap::new();
    let has = |s: &[crate::ir::Dim]| s.iter().position(|d| d.as_sym() == Some("batch"));
    for (name, shape, _) in g.inputs() {
        if let Some(a) = has(shape) {
            axes.insert(name.to_string(), a);
        }
    }
    for (name, id) in g.outputs() {
        if let Some(a) = has(&g.node(*id).shape) {
            axes.insert(name.clone(), a);
        }
    }
    axes
}

/// Checks `--pp`, `--micro-batches` and `--tp` against the model before anything loads.
pub fn check_degrees(model: &Model, pp: usize, micro_batches: usize) -> Result<(), Error> {
    let layers = crate::passes::pipeline::layer_count(&model.graph);
    if pp == 0 || pp > layers {
        return Err(Error::Usage(format!(
            "--pp {pp}: {} has {layers} layers (1 ≤ --pp ≤ layers)",
            model.dir.display()
        )));
    }
    if micro_batches == 0 {
        return Err(Error::Usage("--micro-batches must be ≥ 1".into()));
    }
    Ok(())
}

impl Session {
    /// `pp` stages of `model`'s optimized graph, each on a backend from `backend` (`tp == 1`,
    /// `model` loaded with its weights) or a group of `tp` ranks (each a backend from
    /// `backend`) sharded with the Megatron layout (`tp > 1`, `model` loaded with [`Model::load_without_weights`]: each rank reads
    /// its slices); calls split into `micro_batches` micro-batches.
    pub fn pp_with(
        model: Model,
        pp: usize,
        micro_batches: usize,
        tp: usize,
        backend: BackendFactory<'_>,
        opts: &crate::passes::Options,
    ) -> Result<Session, Error> {
        check_degrees(&model, pp, micro_batches)?;
        if tp == 0 {
            return Err(Error::Usage("--tp must be ≥ 1".into()));
        }
        let first = backend()?;
        let mut o = opts.clone();
        if o.profile == crate::passes::Profile::gpu() {
            if let Some(p) = crate::passes::Profile::by_name(first.cost_profile()) {
                o.profile = p;
            }
        }
        let (g, report) = crate::passes::optimize(&model.graph, &o)?;
        let pipeline = cut(&g, pp, &o.profile).map_err(|e| Error::Usage(e.to_string()))?;
        let comms = InProcessGroup::ranks(pp, collective_timeout());
        let mut stages = Vec::with_capacity(pp);
        let mut first = Some(first);
        for st in &pipeline.stages {
            let loaded: Box<dyn Loaded> = if tp == 1 {
                let b = match first.take() {
                    Some(b) => b,
                    None => backend()?,
                };
                let (graph, w) = crate::runtime::fold_weights(&st.graph, &model.weights)?;
                b.load(&graph, &w)?
            } else {
                let spec = megatron_spec(&model.config, tp)?;
                let sharded = shard(&st.graph, &spec)?;
                let group = InProcessGroup::ranks(tp, collective_timeout());
                let mut ranks: Vec<Box<dyn Loaded>> = Vec::with_capacity(tp);
                for (r, comm) in group.iter().enumerate() {
                    let (w, _) = load_rank(&model, &sharded, r)?;
                    let (graph, w) = crate::runtime::fold_weights(&sharded.graph, &w)?;
                    let b = match first.take() {
                        Some(b) => b,
                        None => backend()?,
                    };
                    ranks.push(match b.name() {
                        "cpu" => CpuBackend::new().with_comm(comm.clone()).load(&graph, &w)?,
                        // A device rank: collectives on the host between its segments.
                        _ => Box::new(crate::runtime::tp::HostCollectives::load(
                            b.as_ref(),
                            &graph,
                            &w,
                            comm.clone(),
                        )?),
                    });
                }
                Box::new(TpLoaded::new(ranks, group))
            };
            stages.push(PpStage {
                loaded,
                recv: st.recv.clone(),
                send: st.send.clone(),
            });
        }
        let axes = batch_axes(&g);
        let program = PpLoaded::new(stages, comms.clone(), micro_batches, axes);
        let backend_box: Box<dyn Backend> = match first {
            Some(b) => b,
            None => backend()?,
        };
        let weights = if tp == 1 {
            model.weights.clone()
        } else {
            crate::ir::Weights::new()
        };
        let mut s = Session::from_parts(
            model,
            g,
            Some(report),
            weights,
            backend_box,
            Box::new(program),
            None,
        );
        s.pp = Some(PpState {
            stages: pp,
            micro_batches,
            tp,
            pipeline,
            comms,
        });
        Ok(s)
    }
}

/// `compile --pp P --report`: each stage's layers, estimated cost and share, its op table and
/// the bytes it sends to the next stage per forward at `bindings`; as text and as JSON.
pub fn pp_report(p: &Pipeline, bindings: &Bindings) -> Result<(String, serde_json::Value), Error> {
    use std::fmt::Write;
    let total: f64 = p.stages.iter().map(|s| s.cost).sum();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\npipeline parallel: {} stages over {} layers (balanced by the cost model):",
        p.stages.len(),
        p.layers
    );
    let mut rows = Vec::new();
    for (i, s) in p.stages.iter().enumerate() {
        let bytes = match i + 1 < p.stages.len() {
            true => p
                .send_bytes(i, bindings)
                .map_err(crate::passes::PassError::from)?,
            false => 0,
        };
        let ops = s.graph.op_counts();
        let kernels: usize = ops
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "input" | "weight" | "constant"))
            .map(|(_, v)| v)
            .sum();
        let _ = writeln!(
            t,
            "  stage {i}: layers {}..{}  est {:.3} ms ({:.0}%)  {} ops  sends {} values, {} B",
            s.layers.start,
            s.layers.end,
            s.cost * 1e3,
            100.0 * s.cost / total.max(f64::MIN_POSITIVE),
            kernels,
            s.send.len(),
            bytes
        );
        rows.push(serde_json::json!({
            "stage": i,
            "layers": [s.layers.start, s.layers.end],
            "cost_s": s.cost,
            "ops": ops,
            "sends": s.send,
            "send_bytes": bytes,
        }));
    }
    let json = serde_json::json!({
        "stages": rows,
        "layers": p.layers,
    });
    Ok((t, json))
}

/// A stage backend by name: `cpu` (the CPU backend), or `wgpu` with its own device per call
/// (lavapipe gives several logical devices from one adapter), so each stage has a device of
/// its own instead of the process's shared one.
pub fn stage_backend(name: &str) -> Result<Box<dyn Backend>, Error> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend::new())),
        "wgpu" => {
            let dev = crate::runtime::webgpu::WgpuDevice::new()?;
            Ok(Box::new(crate::runtime::DeviceBackend::on(Arc::new(dev))))
        }
        other => Err(Error::Usage(format!(
            "--pp stages run on cpu or wgpu backends; --backend {other} stages are not implemented"
        ))),
    }
}
