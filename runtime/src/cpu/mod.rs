//! The CPU backend: executes any graph op by op in f32 (i64 for ids and positions, bool for
//! comparisons). It is the executable specification every other backend is checked against.
//!
//! Two modes share everything but the heavy ops. [`CpuBackend::reference`] is plain,
//! obviously correct loops (`kernels`, `fused`): matmul as an in-order sum, attention a block
//! of full score rows at a time; it is the oracle the fast paths are tested against.
//! [`CpuBackend::new`] (the default) runs matmuls and the fused matmul through `faer`'s packed,
//! threaded GEMM with the epilogue applied per block of rows (`gemm`), and attention as a
//! flash kernel (`flash`: query × key blocks, online softmax, masked-out key blocks skipped,
//! SIMD `exp` chosen at run time). Both use rayon's global pool (`RAYON_NUM_THREADS`).
//!
//! Intermediate tensors die after their last use, so peak memory follows liveness. The fast
//! mode also passes layout ops on as strided views (`view`) and takes its f32 buffers from an
//! arena reused by liveness and kept across a loaded program's runs (`arena`); the reference
//! mode copies at every layout op and allocates every buffer.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_ir::{
    eval_shape, BinaryOp, Bindings, CmpOp, DType, Data, DistOp, Graph, Node, NodeId, Op, ReduceOp,
    Tensor, UnaryOp, Weights,
};

use std::time::Instant;

use crate::comm::{Communicator, SingleRank};
use crate::{bind_inputs, Backend, KernelTime, Loaded, RuntimeError, TensorMap};

pub mod arena;
pub mod flash;
pub mod fused;
pub mod gemm;
pub mod kernels;
pub mod simd;
pub mod view;

pub use arena::{Arena, ArenaStats};
use kernels::{broadcast_strides, map1, map2, map2_strided, matmul, reduce, strided_copy, strides};
use view::Val;

/// The CPU backend (see the module docs for its two modes).
#[derive(Clone)]
pub struct CpuBackend {
    fast: bool,
    /// The rank's group for the collectives of a sharded graph; `None` runs them as a world
    /// of one.
    comm: Option<Arc<dyn Communicator>>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("fast", &self.fast)
            .field("rank", &self.comm.as_ref().map(|c| (c.rank(), c.world())))
            .finish()
    }
}

impl Default for CpuBackend {
    /// The fast mode, as [`CpuBackend::new`].
    fn default() -> CpuBackend {
        CpuBackend {
            fast: true,
            comm: None,
        }
    }
}

impl CpuBackend {
    /// The fast CPU backend (faer GEMM, flash attention) on rayon's global pool.
    pub fn new() -> CpuBackend {
        CpuBackend {
            fast: true,
            comm: None,
        }
    }

    /// The reference implementation: plain loops for every op, the oracle of the fast paths.
    pub fn reference() -> CpuBackend {
        CpuBackend {
            fast: false,
            comm: None,
        }
    }

    /// This backend as one rank of a tensor-parallel group: collectives go through `comm`.
    pub fn with_comm(mut self, comm: Arc<dyn Communicator>) -> CpuBackend {
        self.comm = Some(comm);
        self
    }

    /// Whether this is the fast mode.
    pub fn is_fast(&self) -> bool {
        self.fast
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn cost_profile(&self) -> &'static str {
        "cpu"
    }

    fn description(&self) -> String {
        format!(
            "cpu ({}, {} rayon threads)",
            if self.fast {
                "faer GEMM, flash attention"
            } else {
                "reference loops"
            },
            rayon::current_num_threads()
        )
    }

    fn load(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Loaded>, RuntimeError> {
        Ok(Box::new(self.program(graph, weights)))
    }

    fn run(
        &self,
        graph: &Graph,
        weights: &Weights,
        inputs: &TensorMap,
    ) -> Result<TensorMap, RuntimeError> {
        run_graph(
            graph,
            weights,
            inputs,
            None,
            self.fast,
            self.comm.as_deref(),
            None,
        )
    }
}

impl CpuBackend {
    /// The loaded program as a concrete type (the tensor-parallel runner moves ranks to
    /// threads; tests read its arena's counters).
    pub fn program(&self, graph: &Graph, weights: &Weights) -> CpuProgram {
        CpuProgram {
            graph: graph.clone(),
            weights: weights.clone(),
            carried: HashMap::new(),
            fast: self.fast,
            comm: self.comm.clone(),
            arena: Arena::default(),
        }
    }
}

/// A graph on the CPU backend; carried tensors stay host tensors. In the fast mode its
/// intermediates come from an arena kept across runs.
pub struct CpuProgram {
    graph: Graph,
    weights: Weights,
    carried: TensorMap,
    fast: bool,
    comm: Option<Arc<dyn Communicator>>,
    arena: Arena,
}

impl CpuProgram {
    /// The arena's counters so far (all zero in the reference mode, which has none).
    pub fn arena_stats(&self) -> ArenaStats {
        self.arena.stats()
    }
}

impl Loaded for CpuProgram {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        // The caller's inputs are read in place (no copy of the map: a deep clone of every
        // input tensor per run). Carried values (a KV cache) are moved in next to clones of the
        // inputs, which then win over them, and moved back after the run.
        let mut all = std::mem::take(&mut self.carried);
        let merged = !all.is_empty();
        let mut shadowed = vec![];
        if merged {
            for (k, v) in inputs {
                if let Some(old) = all.insert(k.clone(), v.clone()) {
                    shadowed.push((k.clone(), old));
                }
            }
        }
        let result = run_graph(
            &self.graph,
            &self.weights,
            if merged { &all } else { inputs },
            None,
            self.fast,
            self.comm.as_deref(),
            Some(&mut self.arena),
        );
        for (k, v) in all {
            if !inputs.contains_key(&k) {
                self.carried.insert(k, v);
            }
        }
        self.carried.extend(shadowed);
        let mut out = result?;
        for (o, i) in carry {
            if let Some(t) = out.remove(o) {
                self.carried.insert(i.clone(), t);
            }
        }
        Ok(out)
    }

    fn clear_carry(&mut self) {
        self.carried.clear();
    }

    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let mut times = vec![];
        run_graph(
            &self.graph,
            &self.weights,
            inputs,
            Some(&mut times),
            self.fast,
            self.comm.as_deref(),
            Some(&mut self.arena),
        )?;
        Ok(times)
    }
}

/// Runs `graph` node by node; with `times`, records each computing node's time. The fast
/// mode runs with `arena` installed (a temporary one without) and passes views between nodes.
fn run_graph(
    graph: &Graph,
    weights: &Weights,
    inputs: &TensorMap,
    times: Option<&mut Vec<KernelTime>>,
    fast: bool,
    comm: Option<&dyn Communicator>,
    arena: Option<&mut Arena>,
) -> Result<TensorMap, RuntimeError> {
    let mut own = Arena::default();
    let arena = arena.unwrap_or(&mut own);
    let job = move || {
        if fast {
            arena.install(|| run_nodes(graph, weights, inputs, times, fast, comm))
        } else {
            run_nodes(graph, weights, inputs, times, fast, comm)
        }
    };
    // Called from outside rayon's pool, every parallel loop of every op would be injected into
    // the pool and the caller put to sleep until it finished: a wake-up and a sleep per op
    // (most of a small decode step's time). So the whole run moves onto a pool thread once.
    // Not for a rank of a group (`comm`): its collectives block until the other ranks
    // arrive, and ranks on pool threads could take every thread of the pool and wait forever.
    if comm.is_none() && rayon::current_thread_index().is_none() {
        rayon::scope(|_| job())
    } else {
        job()
    }
}

fn run_nodes(
    graph: &Graph,
    weights: &Weights,
    inputs: &TensorMap,
    mut times: Option<&mut Vec<KernelTime>>,
    fast: bool,
    comm: Option<&dyn Communicator>,
) -> Result<TensorMap, RuntimeError> {
    let bindings = bind_inputs(graph, inputs)?;
    let mut remaining = graph.use_counts();
    let mut values: Vec<Option<Val>> = vec![None; graph.len()];
    let heads_last = if fast {
        heads_last_attention(graph)
    } else {
        Vec::new()
    };
    for (id, node) in graph.nodes() {
        // An operand at its last use is moved, not shared, so a reshape can take its buffer
        // and a dead buffer goes back to the arena.
        let args: Vec<Val> = node
            .inputs
            .iter()
            .map(|i| {
                let slot = &mut values[i.index()];
                if remaining[i.index()] == 1 {
                    slot.take()
                } else {
                    slot.clone()
                }
                .expect("operand computed before use")
            })
            .collect();
        let t0 = Instant::now();
        let out = if fast {
            let hl = heads_last.get(id.index()).copied().unwrap_or(false);
            eval_fast(id, node, args, &bindings, weights, inputs, comm, hl)?
        } else {
            let mut args: Vec<Arc<Tensor>> = args.into_iter().map(Val::tensor).collect();
            let out = match &node.op {
                Op::Dist(d) => dist(id, node, *d, &args[0], &bindings, comm)?,
                _ => eval_node(id, node, &mut args, &bindings, weights, inputs, fast)?,
            };
            Val::Dense(out)
        };
        if let Some(times) = times.as_deref_mut() {
            if !node.inputs.is_empty() {
                times.push(KernelTime {
                    name: node.op.name(),
                    ops: vec![node.op.name()],
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
        }
        values[id.index()] = Some(out);
        for i in &node.inputs {
            remaining[i.index()] -= 1;
            if remaining[i.index()] == 0 {
                if let Some(v) = values[i.index()].take() {
                    v.recycle();
                }
            }
        }
    }
    let mut outs = HashMap::new();
    for (name, id) in graph.outputs() {
        // The last output naming a node takes its buffer; any other copies it.
        let last = !graph.outputs()[..]
            .iter()
            .skip_while(|(n, _)| n != name)
            .skip(1)
            .any(|(_, o)| o == id);
        let slot = &mut values[id.index()];
        let t = if last { slot.take() } else { slot.clone() }
            .expect("outputs stay live")
            .tensor();
        outs.insert(
            name.clone(),
            Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone()),
        );
    }
    Ok(outs)
}

/// `dst.copy_from_slice(src)`, split over the pool when large (one thread copies at about half
/// the memory bandwidth both cores reach).
fn copy_par(src: &[f32], dst: &mut [f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    if src.len() <= CHUNK {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Whether attention can read this q/k/v through its strides: a unit-stride last axis (the
/// kernels' vector loads) and rows at least that long apart.
fn attention_view(v: &Val) -> bool {
    let (sh, (_, _, st)) = (v.shape(), v.parts());
    let r = sh.len();
    r >= 2 && (sh[r - 1] <= 1 || st[r - 1] == 1) && st[r - 2] >= sh[r - 1]
}

/// One node of the fast mode: views for the layout ops, strided reads where the consumer
/// takes them, else the operands made dense and the shared op-by-op implementation.
/// Per node: whether it is a 4-d attention whose every consumer is `permute(0, 2, 1, 3)` and
/// which is no graph output. Its output is then computed as `[b, s, h, d]` and handed on as a
/// `[b, h, s, d]` view of that buffer, so the permute (and the reshape to `[b, s, h·d]` that
/// usually follows) reads it in place instead of copying it.
fn heads_last_attention(graph: &Graph) -> Vec<bool> {
    let mut ok: Vec<bool> = graph
        .nodes()
        .map(|(_, n)| matches!(n.op, Op::Attention { .. }) && n.shape.len() == 4)
        .collect();
    for (_, n) in graph.nodes() {
        let permutes = matches!(&n.op, Op::Permute { perm } if perm[..] == [0, 2, 1, 3]);
        if !permutes {
            for i in &n.inputs {
                ok[i.index()] = false;
            }
        }
    }
    for (_, id) in graph.outputs() {
        ok[id.index()] = false;
    }
    ok
}

#[allow(clippy::too_many_arguments)]
fn eval_fast(
    id: NodeId,
    node: &Node,
    args: Vec<Val>,
    bindings: &Bindings,
    weights: &Weights,
    inputs: &TensorMap,
    comm: Option<&dyn Communicator>,
    heads_last: bool,
) -> Result<Val, RuntimeError> {
    let out_shape = || eval_shape(&node.shape, bindings);
    let f32_view = |v: &Val| matches!(v.base().data, Data::F32(_));
    match &node.op {
        Op::Input { name, .. } => {
            // An f32 input is copied into an arena buffer (the caller keeps its own).
            if let Data::F32(v) = &inputs[name].data {
                let mut buf = arena::buffer(v.len());
                copy_par(v, &mut buf);
                return Ok(Val::Dense(Arc::new(Tensor {
                    shape: inputs[name].shape.clone(),
                    data: Data::F32(buf),
                })));
            }
        }
        Op::Permute { perm } => return Ok(args[0].permute(perm)),
        Op::Expand { .. } => return Ok(args[0].expand(&out_shape()?)),
        Op::Slice { axis, start, .. } => {
            let out_shape = out_shape()?;
            let st = start.eval(bindings)?;
            let len = out_shape[*axis];
            let have = args[0].shape()[*axis];
            if st + len > have {
                return Err(op_err(
                    id,
                    node,
                    format!("slice {st}..{} beyond axis length {have}", st + len),
                ));
            }
            return Ok(args[0].slice(*axis, st, len));
        }
        Op::Reshape { .. } => {
            let out_shape = out_shape()?;
            let x = args.into_iter().next().expect("reshape has an operand");
            return Ok(match x.reshape(&out_shape) {
                Some(v) => v,
                None => Val::Dense(x.tensor())
                    .reshape(&out_shape)
                    .expect("a dense tensor reshapes in place"),
            });
        }
        Op::Binary(b) if args.iter().all(f32_view) || args.iter().all(|v| !f32_view(v)) => {
            let out_shape = out_shape()?;
            let (x, y) = (&args[0], &args[1]);
            if let (Val::Dense(xt), Val::Dense(yt)) = (x, y) {
                if let (Data::F32(a), Data::F32(c)) = (&xt.data, &yt.data) {
                    if xt.shape == out_shape && yt.shape == out_shape {
                        // Same-shape dense operands: one zipped pass, no stride bookkeeping.
                        let mut dst = arena::buffer(a.len());
                        kernels::map2_same(a, c, &mut dst, binary_f32(*b));
                        recycle_all(args);
                        return Ok(Val::Dense(Arc::new(Tensor::f32(out_shape, dst))));
                    }
                }
            }
            let ((xb, xo, xs), (yb, yo, ys)) = (x.parts(), y.parts());
            let (sx, sy) = (
                view::broadcast_to(x.shape(), &xs, &out_shape),
                view::broadcast_to(y.shape(), &ys, &out_shape),
            );
            let n = out_shape.iter().product();
            let data = match (&xb.data, &yb.data) {
                (Data::F32(a), Data::F32(c)) => {
                    let mut dst = arena::buffer(n);
                    map2_strided(a, xo, &sx, c, yo, &sy, &out_shape, &mut dst, binary_f32(*b));
                    Data::F32(dst)
                }
                (Data::I64(a), Data::I64(c)) => {
                    let mut dst = vec![0; n];
                    map2_strided(a, xo, &sx, c, yo, &sy, &out_shape, &mut dst, binary_i64(*b));
                    Data::I64(dst)
                }
                _ => return Err(op_err(id, node, "operands must both be f32 or i64")),
            };
            recycle_all(args);
            return Ok(Val::Dense(Arc::new(Tensor {
                shape: out_shape,
                data,
            })));
        }
        Op::Attention {
            scale,
            causal,
            window,
        } if args.iter().all(f32_view) && args[..3].iter().all(attention_view) => {
            // q/k/v read through their strides (the heads of a merged QKV projection are
            // permuted slices of it); only a mask view is made dense.
            let out_shape = out_shape()?;
            let mut args = args;
            let mask = (args.len() > 3).then(|| args.remove(3).tensor());
            let parts: Vec<_> = args.iter().map(Val::parts).collect();
            let op = |i: usize| gemm::Operand {
                data: parts[i].0.as_f32().expect("checked f32"),
                offset: parts[i].1,
                shape: args[i].shape(),
                strides: &parts[i].2,
            };
            let how = fused::Mask {
                scale: scale.0 as f32,
                causal: *causal,
                window: *window,
            };
            let hl = (heads_last && out_shape.len() == 4).then(|| out_shape[1]);
            let o =
                flash::attention_views(op(0), op(1), op(2), mask.as_deref(), how, &out_shape, hl);
            drop(parts);
            recycle_all(args);
            if let Some(m) = mask {
                Val::Dense(m).recycle();
            }
            if let Some(h) = hl {
                let (b, sq, dv) = (out_shape[0], out_shape[2], out_shape[3]);
                return Ok(Val::View(view::View {
                    base: Arc::new(Tensor::f32(vec![b, sq, h, dv], o)),
                    offset: 0,
                    shape: out_shape,
                    strides: vec![sq * h * dv, dv, h * dv, 1],
                }));
            }
            return Ok(Val::Dense(Arc::new(Tensor::f32(out_shape, o))));
        }
        Op::MatMul if args.iter().all(f32_view) => {
            let out_shape = out_shape()?;
            let (ab, ao, sa) = args[0].parts();
            let (bb, bo, sb) = args[1].parts();
            let c = gemm::matmul_strided(
                gemm::Operand {
                    data: ab.as_f32().expect("checked f32"),
                    offset: ao,
                    shape: args[0].shape(),
                    strides: &sa,
                },
                gemm::Operand {
                    data: bb.as_f32().expect("checked f32"),
                    offset: bo,
                    shape: args[1].shape(),
                    strides: &sb,
                },
                &out_shape[..out_shape.len() - 2],
                None,
            );
            recycle_all(args);
            return Ok(Val::Dense(Arc::new(Tensor::f32(out_shape, c))));
        }
        Op::FusedMatMul {
            act,
            bias,
            residual,
        } if args.iter().all(f32_view) => {
            let out_shape = out_shape()?;
            let mut rest = args[2..].iter();
            let bias = bias.then(|| rest.next()).flatten();
            let residual = residual.then(|| rest.next()).flatten();
            let c = fused::fused_matmul_views(&args[0], &args[1], *act, bias, residual, &out_shape);
            recycle_all(args);
            return Ok(Val::Dense(Arc::new(Tensor::f32(out_shape, c))));
        }
        _ => {}
    }
    let mut args: Vec<Arc<Tensor>> = args.into_iter().map(Val::tensor).collect();
    let out = match &node.op {
        Op::Dist(d) => dist(id, node, *d, &args[0], bindings, comm)?,
        _ => eval_node(id, node, &mut args, bindings, weights, inputs, true)?,
    };
    recycle_all(args.into_iter().map(Val::Dense).collect());
    Ok(Val::Dense(out))
}

/// Hands back the buffers of operands whose last use this was.
fn recycle_all(args: Vec<Val>) {
    for a in args {
        a.recycle();
    }
}

/// A collective or rank-local op: through `comm`, or as a world of one without it.
fn dist(
    id: NodeId,
    node: &Node,
    d: DistOp,
    x: &Tensor,
    bindings: &Bindings,
    comm: Option<&dyn Communicator>,
) -> Result<Arc<Tensor>, RuntimeError> {
    let out_shape = eval_shape(&node.shape, bindings)?;
    let single = SingleRank;
    let comm = comm.unwrap_or(&single);
    if let DistOp::Send { peer } | DistOp::Recv { peer } = d {
        if peer >= comm.world() || peer == comm.rank() {
            return Err(op_err(
                id,
                node,
                format!(
                    "rank {} cannot exchange with rank {peer} in a group of {}",
                    comm.rank(),
                    comm.world()
                ),
            ));
        }
        if let DistOp::Send { .. } = d {
            comm.send(peer, x.clone())?;
            return Ok(Arc::new(x.clone()));
        }
        let t = comm.recv(peer)?;
        if t.shape != out_shape || t.dtype() != x.dtype() {
            return Err(op_err(
                id,
                node,
                format!(
                    "received {:?} {} from rank {peer}, expected {out_shape:?} {}",
                    t.shape,
                    t.dtype(),
                    x.dtype()
                ),
            ));
        }
        return Ok(Arc::new(t));
    }
    if let DistOp::RootOnly = d {
        if comm.rank() == 0 {
            return Ok(Arc::new(x.clone()));
        }
        let n = x.len();
        let data = match x.dtype() {
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::I64 => Data::I64(vec![0; n]),
            DType::Bool => Data::Bool(vec![false; n]),
            DType::F16 => Data::F16(vec![half::f16::ZERO; n]),
            DType::BF16 => Data::BF16(vec![half::bf16::ZERO; n]),
        };
        return Ok(Arc::new(Tensor {
            shape: x.shape.clone(),
            data,
        }));
    }
    let world = match d {
        DistOp::AllReduce | DistOp::Send { .. } | DistOp::Recv { .. } | DistOp::RootOnly => {
            comm.world()
        }
        DistOp::AllGather { world, .. }
        | DistOp::Shard { world, .. }
        | DistOp::ReduceScatter { world, .. } => world,
    };
    if world != comm.world() {
        return Err(op_err(
            id,
            node,
            format!(
                "the graph was sharded for {world} ranks, the group has {}",
                comm.world()
            ),
        ));
    }
    if let DistOp::Shard { axis, .. } = d {
        let s = strides(&x.shape);
        let chunk = out_shape[axis];
        let data = copy_data(&x.data, comm.rank() * chunk * s[axis], &s, &out_shape);
        return Ok(Arc::new(Tensor {
            shape: out_shape,
            data,
        }));
    }
    let data = x
        .as_f32()
        .ok_or_else(|| op_err(id, node, "collectives take f32"))?;
    let out = match d {
        DistOp::AllReduce => {
            let mut v = data.to_vec();
            comm.all_reduce_sum(&mut v)?;
            v
        }
        DistOp::AllGather { axis, .. } => {
            let parts = comm.all_gather(data)?;
            if parts.iter().any(|p| p.len() != data.len()) {
                return Err(op_err(
                    id,
                    node,
                    "ranks gathered operands of different sizes",
                ));
            }
            let outer: usize = x.shape[..axis].iter().product();
            let inner = data.len() / outer.max(1);
            let mut v = Vec::with_capacity(data.len() * world);
            for o in 0..outer {
                for p in &parts {
                    v.extend_from_slice(&p[o * inner..(o + 1) * inner]);
                }
            }
            v
        }
        DistOp::ReduceScatter { axis, .. } => {
            // Rank r's chunk along `axis` made contiguous, in rank order, so the
            // communicator's flat chunks are the ranks' slices.
            let outer: usize = x.shape[..axis].iter().product();
            let len = x.shape[axis];
            let inner: usize = x.shape[axis + 1..].iter().product();
            let chunk = len / world * inner;
            let mut v = Vec::with_capacity(data.len());
            for r in 0..world {
                for o in 0..outer {
                    let at = o * len * inner + r * chunk;
                    v.extend_from_slice(&data[at..at + chunk]);
                }
            }
            comm.reduce_scatter_sum(&v)?
        }
        DistOp::Shard { .. } | DistOp::Send { .. } | DistOp::Recv { .. } | DistOp::RootOnly => {
            unreachable!("returned above")
        }
    };
    Ok(Arc::new(Tensor::f32(out_shape, out)))
}

fn op_err(id: NodeId, node: &Node, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Op {
        op: node.op.name(),
        node: id.0,
        msg: msg.into(),
    }
}

fn eval_node(
    id: NodeId,
    node: &Node,
    args: &mut Vec<Arc<Tensor>>,
    bindings: &Bindings,
    weights: &Weights,
    inputs: &TensorMap,
    fast: bool,
) -> Result<Arc<Tensor>, RuntimeError> {
    let out_shape = eval_shape(&node.shape, bindings)?;
    let t = |data: Data| {
        Ok(Arc::new(Tensor {
            shape: out_shape.clone(),
            data,
        }))
    };
    match &node.op {
        Op::Input { name, .. } => Ok(Arc::new(inputs[name].clone())),
        Op::Weight { name, .. } => {
            let w = weights
                .get(name)
                .ok_or_else(|| RuntimeError::MissingWeight(name.clone()))?;
            if w.shape != out_shape {
                return Err(RuntimeError::WeightShape {
                    name: name.clone(),
                    expected: out_shape,
                    found: w.shape.clone(),
                });
            }
            // f16/bf16 weights (a device-bound checkpoint) run widened: this is the f32
            // reference.
            Ok(match w.widened() {
                std::borrow::Cow::Borrowed(_) => w.clone(),
                std::borrow::Cow::Owned(f) => Arc::new(f),
            })
        }
        Op::Constant { value, .. } => t(scalar_data(value.0, node)),
        Op::Iota { start, .. } => {
            let s = start.eval(bindings)? as i64;
            t(Data::I64((0..out_shape[0] as i64).map(|i| s + i).collect()))
        }
        Op::Unary(u) => t(unary(*u, &args[0].data).ok_or_else(|| op_err(id, node, "bad dtype"))?),
        Op::Binary(b) => {
            let (x, y) = (&args[0], &args[1]);
            let data = match (&x.data, &y.data) {
                (Data::F32(a), Data::F32(c)) => {
                    Data::F32(map2(a, &x.shape, c, &y.shape, &out_shape, binary_f32(*b)))
                }
                (Data::I64(a), Data::I64(c)) => {
                    Data::I64(map2(a, &x.shape, c, &y.shape, &out_shape, binary_i64(*b)))
                }
                _ => return Err(op_err(id, node, "operands must both be f32 or i64")),
            };
            t(data)
        }
        Op::Compare(c) => {
            let (x, y) = (&args[0], &args[1]);
            let data = match (&x.data, &y.data) {
                (Data::F32(a), Data::F32(b)) => map2(a, &x.shape, b, &y.shape, &out_shape, cmp(*c)),
                (Data::I64(a), Data::I64(b)) => map2(a, &x.shape, b, &y.shape, &out_shape, cmp(*c)),
                (Data::Bool(a), Data::Bool(b)) => {
                    map2(a, &x.shape, b, &y.shape, &out_shape, cmp(*c))
                }
                _ => return Err(op_err(id, node, "operands differ in dtype")),
            };
            t(Data::Bool(data))
        }
        Op::Where => {
            let cond = expand(&args[0], &out_shape);
            let a = expand(&args[1], &out_shape);
            let b = expand(&args[2], &out_shape);
            let Data::Bool(c) = cond else {
                return Err(op_err(id, node, "condition must be bool"));
            };
            let data = match (a, b) {
                (Data::F32(a), Data::F32(b)) => Data::F32(select(&c, a, b)),
                (Data::I64(a), Data::I64(b)) => Data::I64(select(&c, a, b)),
                (Data::Bool(a), Data::Bool(b)) => Data::Bool(select(&c, a, b)),
                _ => return Err(op_err(id, node, "branches differ in dtype")),
            };
            t(data)
        }
        Op::Reduce { op, axes, .. } => {
            let x = &args[0];
            let count: usize = axes.iter().map(|&a| x.shape[a]).product();
            let data = match &x.data {
                Data::F32(v) => {
                    let r = match op {
                        ReduceOp::Sum | ReduceOp::Mean => {
                            reduce(v, &x.shape, axes, 0.0f32, |a, b| a + b)
                        }
                        ReduceOp::Max => reduce(v, &x.shape, axes, f32::NEG_INFINITY, f32::max),
                    };
                    if *op == ReduceOp::Mean {
                        let inv = 1.0 / count as f32;
                        Data::F32(r.into_iter().map(|s| s * inv).collect())
                    } else {
                        Data::F32(r)
                    }
                }
                Data::I64(v) => Data::I64(match op {
                    ReduceOp::Sum => reduce(v, &x.shape, axes, 0i64, |a, b| a + b),
                    ReduceOp::Max => reduce(v, &x.shape, axes, i64::MIN, i64::max),
                    ReduceOp::Mean => reduce(v, &x.shape, axes, 0i64, |a, b| a + b)
                        .into_iter()
                        .map(|s| s / count.max(1) as i64)
                        .collect(),
                }),
                Data::Bool(_) => return Err(op_err(id, node, "cannot reduce bool")),
                Data::F16(_) | Data::BF16(_) => {
                    return Err(op_err(id, node, "f16/bf16 tensors run widened to f32"))
                }
            };
            t(data)
        }
        Op::MatMul => {
            let (a, b) = (&args[0], &args[1]);
            let (Some(av), Some(bv)) = (a.as_f32(), b.as_f32()) else {
                return Err(op_err(id, node, "matmul takes f32"));
            };
            let (ra, rb) = (a.shape.len(), b.shape.len());
            let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
            let out_batch = &out_shape[..out_shape.len() - 2];
            let pad = |s: &[usize]| {
                let mut v = vec![1; out_batch.len() - s.len()];
                v.extend_from_slice(s);
                v
            };
            let (pa, pb) = (pad(&a.shape[..ra - 2]), pad(&b.shape[..rb - 2]));
            let c = if fast {
                gemm::matmul(av, &pa, bv, &pb, out_batch, m, k, n, None)
            } else {
                matmul(av, &pa, bv, &pb, out_batch, m, k, n)
            };
            t(Data::F32(c))
        }
        Op::Reshape { .. } => {
            let x = args.pop().expect("reshape has an operand");
            // The operand's buffer when this was its last use, else a copy.
            let data = Arc::try_unwrap(x).map_or_else(|x| x.data.clone(), |t| t.data);
            Ok(Arc::new(Tensor {
                shape: out_shape,
                data,
            }))
        }
        Op::Permute { perm } => {
            let x = &args[0];
            let s = strides(&x.shape);
            let ps: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
            t(copy_data(&x.data, 0, &ps, &out_shape))
        }
        Op::Expand { .. } => t(expand(&args[0], &out_shape)),
        Op::Slice { axis, start, .. } => {
            let x = &args[0];
            let st = start.eval(bindings)?;
            if st + out_shape[*axis] > x.shape[*axis] {
                return Err(op_err(
                    id,
                    node,
                    format!(
                        "slice {st}..{} beyond axis length {}",
                        st + out_shape[*axis],
                        x.shape[*axis]
                    ),
                ));
            }
            let s = strides(&x.shape);
            t(copy_data(&x.data, st * s[*axis], &s, &out_shape))
        }
        Op::Concat { axis } => t(concat(args, *axis, &out_shape)
            .ok_or_else(|| op_err(id, node, "operands differ in dtype"))?),
        Op::Gather => {
            let (table, ids) = (&args[0], &args[1]);
            let ids = ids
                .as_i64()
                .ok_or_else(|| op_err(id, node, "ids must be i64"))?;
            let rows = table.shape[0];
            let width: usize = table.shape[1..].iter().product();
            if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= rows) {
                return Err(RuntimeError::IndexOutOfRange {
                    node: id.0,
                    index: bad,
                    size: rows,
                });
            }
            let data = match &table.data {
                Data::F32(v) => Data::F32(gather(v, ids, width)),
                Data::I64(v) => Data::I64(gather(v, ids, width)),
                Data::Bool(v) => Data::Bool(gather(v, ids, width)),
                Data::F16(v) => Data::F16(gather(v, ids, width)),
                Data::BF16(v) => Data::BF16(gather(v, ids, width)),
            };
            t(data)
        }
        Op::Cast { dtype } => t(cast(&args[0].data, *dtype)),
        op => {
            debug_assert!(op.is_fused());
            let data =
                fused::eval(op, args, &out_shape, fast).map_err(|msg| op_err(id, node, msg))?;
            t(Data::F32(data))
        }
    }
}

fn scalar_data(value: f64, node: &Node) -> Data {
    match node.dtype {
        // Graph tensors are never f16/bf16 (inference refuses them).
        transfuse_ir::DType::F32 | transfuse_ir::DType::F16 | transfuse_ir::DType::BF16 => {
            Data::F32(vec![value as f32])
        }
        transfuse_ir::DType::I64 => Data::I64(vec![value as i64]),
        transfuse_ir::DType::Bool => Data::Bool(vec![value != 0.0]),
    }
}

fn unary(u: UnaryOp, x: &Data) -> Option<Data> {
    Some(match (u, x) {
        (UnaryOp::Neg, Data::I64(v)) => Data::I64(map1(v, |a: i64| -a)),
        (UnaryOp::Abs, Data::I64(v)) => Data::I64(map1(v, |a: i64| a.abs())),
        (UnaryOp::Not, Data::Bool(v)) => Data::Bool(map1(v, |a: bool| !a)),
        (_, Data::F32(v)) => {
            let f: fn(f32) -> f32 = match u {
                UnaryOp::Neg => |a| -a,
                UnaryOp::Exp => f32::exp,
                UnaryOp::Log => f32::ln,
                UnaryOp::Sqrt => f32::sqrt,
                UnaryOp::Rsqrt => |a| 1.0 / a.sqrt(),
                UnaryOp::Tanh => f32::tanh,
                UnaryOp::Erf => libm::erff,
                UnaryOp::Recip => |a| 1.0 / a,
                UnaryOp::Relu => |a| a.max(0.0),
                UnaryOp::Sigmoid => |a| 1.0 / (1.0 + (-a).exp()),
                UnaryOp::Abs => f32::abs,
                UnaryOp::Sin => f32::sin,
                UnaryOp::Cos => f32::cos,
                UnaryOp::Not => return None,
            };
            Data::F32(map1(v, f))
        }
        _ => return None,
    })
}

fn binary_f32(b: BinaryOp) -> fn(f32, f32) -> f32 {
    match b {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
        BinaryOp::Max => f32::max,
        BinaryOp::Min => f32::min,
        BinaryOp::Pow => f32::powf,
    }
}

fn binary_i64(b: BinaryOp) -> fn(i64, i64) -> i64 {
    match b {
        BinaryOp::Add => |x, y| x.wrapping_add(y),
        BinaryOp::Sub => |x, y| x.wrapping_sub(y),
        BinaryOp::Mul => |x, y| x.wrapping_mul(y),
        BinaryOp::Div => |x, y| if y == 0 { 0 } else { x.wrapping_div(y) },
        BinaryOp::Max => i64::max,
        BinaryOp::Min => i64::min,
        BinaryOp::Pow => |x, y| {
            if y < 0 {
                0
            } else {
                x.wrapping_pow(y.min(u32::MAX as i64) as u32)
            }
        },
    }
}

fn cmp<T: PartialOrd>(c: CmpOp) -> impl Fn(T, T) -> bool + Sync {
    move |a, b| match c {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }
}

fn copy_data(d: &Data, offset: usize, strides: &[usize], out: &[usize]) -> Data {
    match d {
        Data::F32(v) => Data::F32(strided_copy(v, offset, strides, out)),
        Data::I64(v) => Data::I64(strided_copy(v, offset, strides, out)),
        Data::Bool(v) => Data::Bool(strided_copy(v, offset, strides, out)),
        Data::F16(v) => Data::F16(strided_copy(v, offset, strides, out)),
        Data::BF16(v) => Data::BF16(strided_copy(v, offset, strides, out)),
    }
}

fn expand(x: &Tensor, out: &[usize]) -> Data {
    if x.shape == out {
        return x.data.clone();
    }
    copy_data(&x.data, 0, &broadcast_strides(&x.shape, out), out)
}

fn select<T: Copy>(c: &[bool], a: Vec<T>, b: Vec<T>) -> Vec<T> {
    c.iter()
        .zip(a.into_iter().zip(b))
        .map(|(&c, (a, b))| if c { a } else { b })
        .collect()
}

fn concat(args: &[Arc<Tensor>], axis: usize, out: &[usize]) -> Option<Data> {
    fn go<T: Copy>(parts: &[(&[T], usize)], outer: usize) -> Vec<T> {
        let mut v = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
        for o in 0..outer {
            for (data, inner) in parts {
                v.extend_from_slice(&data[o * inner..(o + 1) * inner]);
            }
        }
        v
    }
    let outer: usize = out[..axis].iter().product();
    let inner = |t: &Tensor| t.shape[axis..].iter().product::<usize>();
    macro_rules! cat {
        ($variant:ident, $get:ident) => {{
            let parts: Option<Vec<(&[_], usize)>> = args
                .iter()
                .map(|t| t.$get().map(|d| (d, inner(t))))
                .collect();
            Data::$variant(go(&parts?, outer))
        }};
    }
    Some(match args[0].data {
        Data::F32(_) => cat!(F32, as_f32),
        Data::I64(_) => cat!(I64, as_i64),
        Data::Bool(_) => cat!(Bool, as_bool),
        Data::F16(_) | Data::BF16(_) => return None,
    })
}

fn gather<T: Copy>(table: &[T], ids: &[i64], width: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(ids.len() * width);
    for &i in ids {
        let i = i as usize;
        v.extend_from_slice(&table[i * width..(i + 1) * width]);
    }
    v
}

fn cast(d: &Data, to: transfuse_ir::DType) -> Data {
    use transfuse_ir::DType;
    match (d, to) {
        // Graph tensors are never f16/bf16 (inference refuses them); weights that are run
        // widened.
        (_, DType::F16 | DType::BF16) => cast(d, DType::F32),
        (Data::F16(v), _) => cast(&Data::F32(v.iter().map(|x| x.to_f32()).collect()), to),
        (Data::BF16(v), _) => cast(&Data::F32(v.iter().map(|x| x.to_f32()).collect()), to),
        (Data::F32(v), DType::F32) => Data::F32(v.clone()),
        (Data::F32(v), DType::I64) => Data::I64(v.iter().map(|&x| x as i64).collect()),
        (Data::F32(v), DType::Bool) => Data::Bool(v.iter().map(|&x| x != 0.0).collect()),
        (Data::I64(v), DType::F32) => Data::F32(v.iter().map(|&x| x as f32).collect()),
        (Data::I64(v), DType::I64) => Data::I64(v.clone()),
        (Data::I64(v), DType::Bool) => Data::Bool(v.iter().map(|&x| x != 0).collect()),
        (Data::Bool(v), DType::F32) => Data::F32(v.iter().map(|&x| x as u8 as f32).collect()),
        (Data::Bool(v), DType::I64) => Data::I64(v.iter().map(|&x| x as i64).collect()),
        (Data::Bool(v), DType::Bool) => Data::Bool(v.clone()),
    }
}
