//! The tensor-parallel runner: N ranks of one sharded graph as N threads of this process.
//!
//! Each rank is a [`Loaded`] graph (the same SPMD graph from `transfuse_passes::shard`, its own
//! weight slices) on its own backend instance, joined by a [`Communicator`] group
//! ([`crate::comm::InProcessGroup`], or [`crate::nccl::NcclComm`] for CUDA ranks). A call runs every rank concurrently on the same inputs
//! and returns rank 0's outputs: the sharded graph gathers or reduces every output that is not
//! rank-local, so all ranks hold the same values. Rank-local outputs (a KV cache sharded by
//! heads) are carried by each rank for its next call.
//!
//! A rank on a device is a [`DeviceSegments`] (wgpu and CUDA ranks: the graph split at its
//! collectives, the values crossing them kept in device buffers, the collectives run on those
//! buffers through [`DeviceComm`]) or a [`HostCollectives`] (any backend: the collectives on the
//! host between segments loaded on it; what a pipeline's device TP stages use).
//!
//! A rank that fails (an error or a panic) aborts the group, so the others leave their
//! collectives with that rank's error instead of waiting; the call returns the failing rank's
//! own error and the group is reset for the next call.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::comm::{Collective, Communicator, DeviceComm};
use crate::device::Device;
use crate::program::{DeviceTensor, Program};
use crate::{KernelTime, Loaded, RuntimeError, TensorMap};
use transfuse_codegen::kir::Elem;
use transfuse_ir::Tensor;

/// N ranks run as one [`Loaded`].
pub struct TpLoaded {
    ranks: Vec<Box<dyn Loaded>>,
    comms: Vec<Arc<dyn Communicator>>,
}

impl TpLoaded {
    /// Rank `r` is `ranks[r]`, whose backend uses `comms[r]`.
    ///
    /// Panics if the two lengths differ (a programming error of the caller).
    pub fn new<C: Communicator + 'static>(
        ranks: Vec<Box<dyn Loaded>>,
        comms: Vec<Arc<C>>,
    ) -> TpLoaded {
        let comms = comms
            .into_iter()
            .map(|c| c as Arc<dyn Communicator>)
            .collect();
        TpLoaded::with(ranks, comms)
    }

    /// [`TpLoaded::new`] with communicators of any kind (an [`crate::nccl::NcclComm`] per
    /// CUDA rank; in a multi-process job, only this process's ranks).
    pub fn with(ranks: Vec<Box<dyn Loaded>>, comms: Vec<Arc<dyn Communicator>>) -> TpLoaded {
        assert_eq!(ranks.len(), comms.len(), "one communicator per rank");
        TpLoaded { ranks, comms }
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// The collectives each rank ran since the last call of this method.
    pub fn take_logs(&self) -> Vec<Vec<Collective>> {
        self.comms.iter().map(|c| c.take_log()).collect()
    }

    /// Runs `f` on every rank at once; the first rank error that is not the group's abort, or
    /// else the first error, is returned.
    fn all<T: Send>(
        &mut self,
        f: impl Fn(&mut dyn Loaded) -> Result<T, RuntimeError> + Sync,
    ) -> Result<T, RuntimeError> {
        let comms = &self.comms;
        let results: Vec<Result<T, RuntimeError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .enumerate()
                .map(|(r, rank)| {
                    let f = &f;
                    s.spawn(move || {
                        let res = catch_unwind(AssertUnwindSafe(|| f(rank.as_mut())))
                            .unwrap_or_else(|p| {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_else(|| "panic".into());
                                Err(RuntimeError::Comm(format!("rank {r} panicked: {msg}")))
                            });
                        if let Err(e) = &res {
                            if !matches!(e, RuntimeError::Comm(_)) || comms[r].poisoned().is_none()
                            {
                                comms[r].abort(&format!("rank {r} failed: {e}"));
                            }
                        }
                        res
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank panics are caught"))
                .collect()
        });
        let failed = results.iter().any(|r| r.is_err());
        if failed {
            for c in &self.comms {
                c.reset();
            }
        }
        let mut first_err = None;
        let mut root_err = None;
        let mut out = None;
        for (r, res) in results.into_iter().enumerate() {
            match res {
                Ok(v) if r == 0 => out = Some(v),
                Ok(_) => {}
                Err(e) => {
                    if root_err.is_none() && !matches!(e, RuntimeError::Comm(_)) {
                        root_err = Some(e);
                    } else if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match root_err.or(first_err) {
            Some(e) => Err(e),
            None => Ok(out.expect("rank 0 succeeded")),
        }
    }
}

impl Loaded for TpLoaded {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        self.all(|rank| rank.run(inputs, carry))
    }

    fn clear_carry(&mut self) {
        for r in &mut self.ranks {
            r.clear_carry();
        }
    }

    /// Rank 0's kernel times (every rank runs, since collectives need them all).
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        self.all(|rank| rank.profile(inputs))
    }
}

/// A sharded graph on a backend that cannot run collectives itself (a wgpu device): the graph
/// split at its [`transfuse_ir::DistOp`] nodes into segments, each loaded on the backend, the
/// collectives run on the host through the rank's communicator between them (on a CPU backend
/// with that communicator). Every value that crosses a collective makes a host round trip
/// (read back, then uploaded by the next segment); a carried output (the rank's KV cache) is
/// kept on the host between calls.
pub struct HostCollectives {
    steps: Vec<Step>,
    comm: Arc<dyn Communicator>,
    weights: transfuse_ir::Weights,
    carried: TensorMap,
}

enum Step {
    /// A segment's program; it outputs `h.<node>` for the values read after it, and the graph
    /// outputs it computes.
    Run(Box<dyn Loaded>),
    /// A collective: its op, the node it computes, its operand.
    Dist {
        op: transfuse_ir::DistOp,
        node: usize,
        operand: Operand,
        /// The graph outputs it is.
        outputs: Vec<String>,
    },
}

enum Operand {
    Value(String),
    Input(String),
    Weight(String),
    /// A constant or iota, evaluated on the host.
    Leaf(transfuse_ir::Op),
}

impl Operand {
    /// The operand on the host, read from `host` (values and inputs) or `weights`; a leaf is
    /// handed on unevaluated (`host_dist` evaluates it).
    fn on_host(
        &self,
        host: &TensorMap,
        weights: &transfuse_ir::Weights,
    ) -> Result<Result<Tensor, transfuse_ir::Op>, RuntimeError> {
        match self {
            Operand::Value(n) | Operand::Input(n) => host
                .get(n)
                .cloned()
                .map(Ok)
                .ok_or_else(|| RuntimeError::MissingInput(n.clone())),
            Operand::Weight(n) => weights
                .get(n)
                .map(|t| Ok(t.as_ref().clone()))
                .ok_or_else(|| RuntimeError::MissingWeight(n.clone())),
            Operand::Leaf(leaf) => Ok(Err(leaf.clone())),
        }
    }
}

fn host_name(i: usize) -> String {
    format!("h.{i}")
}

/// One part of a graph split at its collectives: a segment (a graph of its own whose inputs
/// are the graph's inputs and `h.<node>` values, whose outputs are the `h.<node>` values read
/// after it and the graph outputs it computes), or one collective.
enum Part {
    Segment(transfuse_ir::Graph),
    Dist {
        op: transfuse_ir::DistOp,
        node: usize,
        operand: Operand,
        outputs: Vec<String>,
    },
}

/// `graph` split at its `Op::Dist` nodes, in order.
fn split(graph: &transfuse_ir::Graph) -> Result<Vec<Part>, RuntimeError> {
    use std::collections::HashMap;
    use transfuse_ir::{Graph, NodeId, Op};
    let n = graph.len();
    let node = |i: usize| graph.node(NodeId(i as u32));
    let leaf = |op: &Op| {
        matches!(
            op,
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. }
        )
    };
    let is_dist = |i: usize| matches!(node(i).op, Op::Dist(_));
    // Segment of each node: the number of collectives before it (a collective runs after
    // the segment of its index).
    let mut seg = vec![0usize; n];
    let mut count = 0;
    for (i, s) in seg.iter_mut().enumerate() {
        *s = count;
        if is_dist(i) {
            count += 1;
        }
    }
    // Values read outside the segment that computes them (by a later segment or a
    // collective) are handed on.
    let mut crosses = vec![false; n];
    for (id, nd) in graph.nodes() {
        let c = id.index();
        for x in &nd.inputs {
            let x = x.index();
            if !leaf(&node(x).op) && (is_dist(c) || is_dist(x) || seg[x] != seg[c]) {
                crosses[x] = true;
            }
        }
    }
    let mut out_of: HashMap<usize, Vec<String>> = HashMap::new();
    for (name, id) in graph.outputs() {
        out_of.entry(id.index()).or_default().push(name.clone());
    }
    let mut parts = Vec::new();
    for k in 0..=count {
        let members: Vec<usize> = (0..n)
            .filter(|&i| seg[i] == k && !leaf(&node(i).op) && !is_dist(i))
            .collect();
        if !members.is_empty() {
            let mut g = Graph::new();
            let mut map: HashMap<usize, NodeId> = HashMap::new();
            // Every graph input, so every segment binds the same symbols (`past` comes
            // from the cache inputs' shapes); the host holds them all.
            for (id, nd) in graph.nodes() {
                if let Op::Input { .. } = &nd.op {
                    map.insert(id.index(), g.add(nd.op.clone(), &[])?);
                }
            }
            for &i in &members {
                for x in &node(i).inputs {
                    let x = x.index();
                    if map.contains_key(&x) {
                        continue;
                    }
                    let xn = node(x);
                    let op = match leaf(&xn.op) {
                        true => xn.op.clone(),
                        false => Op::Input {
                            name: host_name(x),
                            shape: xn.shape.clone(),
                            dtype: xn.dtype,
                        },
                    };
                    map.insert(x, g.add(op, &[])?);
                }
                let ins: Vec<NodeId> = node(i).inputs.iter().map(|x| map[&x.index()]).collect();
                map.insert(i, g.add(node(i).op.clone(), &ins)?);
            }
            for &i in &members {
                if crosses[i] {
                    g.set_output(&host_name(i), map[&i]);
                }
                for name in out_of.get(&i).into_iter().flatten() {
                    g.set_output(name, map[&i]);
                }
            }
            parts.push(Part::Segment(g));
        }
        if let Some(d) = (0..n).find(|&i| is_dist(i) && seg[i] == k) {
            let Op::Dist(op) = node(d).op else {
                unreachable!("is_dist")
            };
            let x = node(d).inputs[0].index();
            let operand = match &node(x).op {
                Op::Input { name, .. } => Operand::Input(name.clone()),
                Op::Weight { name, .. } => Operand::Weight(name.clone()),
                op if leaf(op) => Operand::Leaf(op.clone()),
                _ => Operand::Value(host_name(x)),
            };
            parts.push(Part::Dist {
                op,
                node: d,
                operand,
                outputs: out_of.remove(&d).unwrap_or_default(),
            });
        }
    }
    Ok(parts)
}

/// The weights `graph` reads, of `weights`.
fn used_weights(
    graph: &transfuse_ir::Graph,
    weights: &transfuse_ir::Weights,
) -> transfuse_ir::Weights {
    let mut w = weights.clone();
    w.retain(|k, _| graph.weights().iter().any(|(n, _)| n == k));
    w
}

/// Collective `op` of `x` on the host: a one-op graph on the CPU backend with `comm`, at the
/// operand's concrete shape (a leaf operand evaluated there too).
fn host_dist(
    comm: &Arc<dyn Communicator>,
    op: transfuse_ir::DistOp,
    x: Result<Tensor, transfuse_ir::Op>,
) -> Result<Tensor, RuntimeError> {
    use transfuse_ir::{shape, Graph, Op};
    let mut g = Graph::new();
    let mut inputs = TensorMap::new();
    let xi = match x {
        Ok(x) => {
            let xi = g.add(
                Op::Input {
                    name: "x".into(),
                    shape: shape(x.shape.clone()),
                    dtype: x.dtype(),
                },
                &[],
            )?;
            inputs.insert("x".to_string(), x);
            xi
        }
        Err(leaf) => g.add(leaf, &[])?,
    };
    let y = g.add(Op::Dist(op), &[xi])?;
    g.set_output("y", y);
    let cpu = crate::CpuBackend::new().with_comm(comm.clone());
    let mut r = crate::Backend::run(&cpu, &g, &transfuse_ir::Weights::new(), &inputs)?;
    Ok(r.remove("y").expect("the collective's output"))
}

impl HostCollectives {
    /// Splits `graph` at its collectives and loads each segment on `backend` with `weights`.
    pub fn load(
        backend: &dyn crate::Backend,
        graph: &transfuse_ir::Graph,
        weights: &transfuse_ir::Weights,
        comm: Arc<dyn Communicator>,
    ) -> Result<HostCollectives, RuntimeError> {
        let mut steps = Vec::new();
        for part in split(graph)? {
            steps.push(match part {
                Part::Segment(g) => Step::Run(backend.load(&g, weights)?),
                Part::Dist {
                    op,
                    node,
                    operand,
                    outputs,
                } => Step::Dist {
                    op,
                    node,
                    operand,
                    outputs,
                },
            });
        }
        Ok(HostCollectives {
            steps,
            comm,
            weights: used_weights(graph, weights),
            carried: TensorMap::new(),
        })
    }
}

impl HostCollectives {
    /// Runs step `k`: a segment's values go to `env` (or `out` for graph outputs), a
    /// collective's result to both where it is an output.
    fn step(
        &mut self,
        k: usize,
        env: &mut TensorMap,
        out: &mut TensorMap,
    ) -> Result<(), RuntimeError> {
        match &mut self.steps[k] {
            Step::Run(p) => {
                for (k, v) in p.run(env, &[])? {
                    if k.starts_with("h.") {
                        env.insert(k, v);
                    } else {
                        out.insert(k, v);
                    }
                }
            }
            Step::Dist {
                op,
                node,
                operand,
                outputs,
            } => {
                let x = operand.on_host(env, &self.weights)?;
                let t = host_dist(&self.comm, *op, x)?;
                for name in outputs.iter() {
                    out.insert(name.clone(), t.clone());
                }
                env.insert(host_name(*node), t);
            }
        }
        Ok(())
    }
}

impl Loaded for HostCollectives {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        let mut env = inputs.clone();
        for (k, v) in &self.carried {
            env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut out = TensorMap::new();
        for k in 0..self.steps.len() {
            self.step(k, &mut env, &mut out)?;
        }
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

    /// The segments' kernel times (the collectives are not kernels).
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let mut times = Vec::new();
        let mut env = inputs.clone();
        for (k, v) in &self.carried {
            env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut out = TensorMap::new();
        for k in 0..self.steps.len() {
            if let Step::Run(p) = &mut self.steps[k] {
                times.extend(p.profile(&env)?);
            }
            self.step(k, &mut env, &mut out)?;
        }
        Ok(times)
    }
}

/// A sharded graph on one device whose collectives run on the device's buffers: the graph split
/// at its `Op::Dist` nodes (as [`HostCollectives`] splits it), each segment a [`Program`] on
/// the device, every value that crosses a collective left in its device buffer
/// ([`Program::run_keeping`]) and bound in place by the next reader
/// ([`Program::set_device_input`]), each collective run on those buffers through the rank's
/// [`DeviceComm`]: an all-reduce in place, an all-gather or reduce-scatter into a new buffer
/// (reordered on the device with [`crate::device::Device::copy`] when the axis is not the
/// outermost), `shard` and `root_only` as device copies without communication. On a CUDA rank
/// with [`crate::nccl::NcclComm`] no activation leaves the device between the segments.
///
/// The host path stays where it is needed: a collective of a graph input, a weight or a leaf
/// (the vocab-parallel embedding's `shard` of an `iota`), of a non-f32 value, and `send`/
/// `recv` run as [`HostCollectives`] runs them, their results uploaded by the next segment;
/// graph outputs are read back, and a carried output (the rank's KV cache) is kept on the host
/// between calls. A value read by several later steps is copied on the device for all but its
/// last reader, so the in-place all-reduce never overwrites a value another step still reads.
pub struct DeviceSegments<D: Device> {
    dev: Arc<D>,
    steps: Vec<DevStep<D>>,
    comm: Arc<dyn DeviceComm<D>>,
    host_comm: Arc<dyn Communicator>,
    weights: transfuse_ir::Weights,
    carried: TensorMap,
    /// Per `h.<node>` value: the last step that reads it.
    last_read: std::collections::HashMap<String, usize>,
}

enum DevStep<D: Device> {
    Run {
        program: Box<Program<D>>,
        /// Its `h.<node>` inputs and outputs.
        reads: Vec<String>,
        keeps: Vec<String>,
    },
    Dist {
        op: transfuse_ir::DistOp,
        node: usize,
        operand: Operand,
        outputs: Vec<String>,
    },
}

impl<D: Device + 'static> DeviceSegments<D> {
    /// Splits `graph` at its collectives and loads each segment on `dev` (f32 storage) with
    /// `weights`; `comm` is the rank's communicator (`host_comm` the same one as a
    /// [`Communicator`], for the host path).
    pub fn load(
        dev: Arc<D>,
        graph: &transfuse_ir::Graph,
        weights: &transfuse_ir::Weights,
        comm: Arc<dyn DeviceComm<D>>,
        host_comm: Arc<dyn Communicator>,
    ) -> Result<DeviceSegments<D>, RuntimeError> {
        let mut steps = Vec::new();
        let mut last_read = std::collections::HashMap::new();
        for (k, part) in split(graph)?.into_iter().enumerate() {
            steps.push(match part {
                Part::Segment(g) => {
                    let reads: Vec<String> = g
                        .inputs()
                        .iter()
                        .map(|(n, _, _)| n.to_string())
                        .filter(|n| n.starts_with("h."))
                        .collect();
                    for r in &reads {
                        last_read.insert(r.clone(), k);
                    }
                    let keeps = g
                        .outputs()
                        .iter()
                        .map(|(n, _)| n.clone())
                        .filter(|n| n.starts_with("h."))
                        .collect();
                    let program = Program::new(dev.clone(), &g, weights, Elem::F32)?;
                    DevStep::Run {
                        program: Box::new(program),
                        reads,
                        keeps,
                    }
                }
                Part::Dist {
                    op,
                    node,
                    operand,
                    outputs,
                } => {
                    if let Operand::Value(n) = &operand {
                        last_read.insert(n.clone(), k);
                    }
                    DevStep::Dist {
                        op,
                        node,
                        operand,
                        outputs,
                    }
                }
            });
        }
        Ok(DeviceSegments {
            dev,
            steps,
            comm,
            host_comm,
            weights: used_weights(graph, weights),
            carried: TensorMap::new(),
            last_read,
        })
    }

    /// How many of the collectives run on the device (the others take the host path), and
    /// how many there are.
    pub fn device_collectives(&self) -> (usize, usize) {
        let mut on = 0;
        let mut all = 0;
        for s in &self.steps {
            if let DevStep::Dist { op, operand, .. } = s {
                all += 1;
                if device_op(*op) && matches!(operand, Operand::Value(_)) {
                    on += 1;
                }
            }
        }
        (on, all)
    }
}

/// Whether `op` has a device implementation (the point-to-point ops travel as host tensors).
fn device_op(op: transfuse_ir::DistOp) -> bool {
    use transfuse_ir::DistOp;
    !matches!(op, DistOp::Send { .. } | DistOp::Recv { .. })
}

type DevTensor<D> = DeviceTensor<<D as Device>::Buffer>;

impl<D: Device + 'static> DeviceSegments<D> {
    /// Value `name` for step `k`: moved out when `k` is its last reader, else a device copy.
    fn take(
        &self,
        vals: &mut std::collections::HashMap<String, DevTensor<D>>,
        name: &str,
        k: usize,
    ) -> Result<Option<DevTensor<D>>, RuntimeError> {
        if self.last_read.get(name).is_none_or(|&l| l <= k) {
            return Ok(vals.remove(name));
        }
        let Some(t) = vals.get(name) else {
            return Ok(None);
        };
        let bytes = t.bytes();
        let buf = self.dev.alloc(bytes, name)?;
        self.dev.copy(&t.buf, &buf, &[(0, 0, bytes)])?;
        Ok(Some(DeviceTensor {
            buf,
            cap: bytes.max(4),
            shape: t.shape.clone(),
            dtype: t.dtype,
            elem: t.elem,
        }))
    }

    /// A new zeroed device tensor of `shape` (f32).
    fn alloc(&self, shape: Vec<usize>, what: &str) -> Result<DevTensor<D>, RuntimeError> {
        let bytes = 4 * shape.iter().product::<usize>() as u64;
        Ok(DeviceTensor {
            buf: self.dev.alloc(bytes, what)?,
            cap: bytes.max(4),
            shape,
            dtype: transfuse_ir::DType::F32,
            elem: Elem::F32,
        })
    }

    /// Collective `op` on the f32 device tensor `x`.
    fn device_dist(
        &self,
        op: transfuse_ir::DistOp,
        x: DevTensor<D>,
    ) -> Result<DevTensor<D>, RuntimeError> {
        use transfuse_ir::DistOp;
        let (world, rank) = (self.comm.world(), self.comm.rank());
        let dev = self.dev.as_ref();
        let elems = x.elems();
        let what = op.name();
        let bad = |msg: String| RuntimeError::Comm(format!("rank {rank}: {what}: {msg}"));
        // (outer, len, inner) around `axis`.
        let around = |axis: usize| -> Result<(usize, usize, usize), RuntimeError> {
            if axis >= x.shape.len() {
                return Err(bad(format!("axis {axis} of a {:?} tensor", x.shape)));
            }
            Ok((
                x.shape[..axis].iter().product(),
                x.shape[axis],
                x.shape[axis + 1..].iter().product(),
            ))
        };
        let check_world = |w: usize| {
            if w != world {
                return Err(bad(format!(
                    "the graph was sharded for {w} ranks, the group has {world}"
                )));
            }
            Ok(())
        };
        // A split of `axis` into `world` parts (reduce-scatter, shard): (outer, len, inner), the
        // elements of one part per outer index, and one part's shape.
        let split = |axis: usize, w: usize| {
            check_world(w)?;
            let (outer, len, inner) = around(axis)?;
            if !len.is_multiple_of(world) {
                return Err(bad(format!(
                    "axis {axis} ({len}) is not divisible by {world}"
                )));
            }
            let mut shape = x.shape.clone();
            shape[axis] = len / world;
            Ok((outer, len, inner, len / world * inner, shape))
        };
        let b4 = |e: usize| 4 * e as u64;
        match op {
            DistOp::AllReduce => {
                self.comm.all_reduce_device(dev, &x.buf, elems)?;
                Ok(x)
            }
            DistOp::RootOnly => {
                if rank == 0 {
                    Ok(x)
                } else {
                    self.alloc(x.shape.clone(), what)
                }
            }
            DistOp::AllGather { axis, world: w } => {
                check_world(w)?;
                let (outer, len, inner) = around(axis)?;
                let mut shape = x.shape.clone();
                shape[axis] = len * world;
                let gathered = self.alloc(shape.clone(), what)?;
                self.comm
                    .all_gather_device(dev, &x.buf, &gathered.buf, elems)?;
                if outer == 1 {
                    return Ok(gathered);
                }
                // Rank-major [world][outer][len·inner] → [outer][world][len·inner].
                let piece = len * inner;
                let out = self.alloc(shape, what)?;
                let mut runs = Vec::with_capacity(outer * world);
                for o in 0..outer {
                    for r in 0..world {
                        runs.push((
                            b4(r * elems + o * piece),
                            b4((o * world + r) * piece),
                            b4(piece),
                        ));
                    }
                }
                dev.copy(&gathered.buf, &out.buf, &runs)?;
                Ok(out)
            }
            DistOp::ReduceScatter { axis, world: w } => {
                let (outer, len, inner, chunk, shape) = split(axis, w)?;
                let out = self.alloc(shape, what)?;
                if outer == 1 {
                    self.comm
                        .reduce_scatter_device(dev, &x.buf, &out.buf, elems)?;
                    return Ok(out);
                }
                // [outer][world][chunk] → [world][outer][chunk]: each rank's part contiguous.
                let staged = self.alloc(x.shape.clone(), what)?;
                let mut runs = Vec::with_capacity(outer * world);
                for r in 0..world {
                    for o in 0..outer {
                        runs.push((
                            b4(o * len * inner + r * chunk),
                            b4((r * outer + o) * chunk),
                            b4(chunk),
                        ));
                    }
                }
                dev.copy(&x.buf, &staged.buf, &runs)?;
                self.comm
                    .reduce_scatter_device(dev, &staged.buf, &out.buf, elems)?;
                Ok(out)
            }
            DistOp::Shard { axis, world: w } => {
                let (outer, len, inner, chunk, shape) = split(axis, w)?;
                let out = self.alloc(shape, what)?;
                let runs: Vec<_> = (0..outer)
                    .map(|o| (b4(o * len * inner + rank * chunk), b4(o * chunk), b4(chunk)))
                    .collect();
                dev.copy(&x.buf, &out.buf, &runs)?;
                Ok(out)
            }
            DistOp::Send { .. } | DistOp::Recv { .. } => {
                Err(bad("point-to-point ops take the host path".into()))
            }
        }
    }

    /// One call; with `times`, each segment's kernel times too.
    fn call(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
        mut times: Option<&mut Vec<KernelTime>>,
    ) -> Result<TensorMap, RuntimeError> {
        use std::collections::HashMap;
        let mut host = inputs.clone();
        for (k, v) in &self.carried {
            host.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut vals: HashMap<String, DevTensor<D>> = HashMap::new();
        let mut out = TensorMap::new();
        let mut steps = std::mem::take(&mut self.steps);
        let res = (|| -> Result<(), RuntimeError> {
            for (k, step) in steps.iter_mut().enumerate() {
                match step {
                    DevStep::Run {
                        program,
                        reads,
                        keeps,
                    } => {
                        for r in reads.iter() {
                            if let Some(t) = self.take(&mut vals, r, k)? {
                                program.set_device_input(r, t)?;
                            }
                        }
                        if let Some(t) = times.as_deref_mut() {
                            t.extend(program.profile(&host)?);
                        }
                        let (o, kept) = program.run_keeping(&host, keeps)?;
                        out.extend(o);
                        vals.extend(kept);
                    }
                    DevStep::Dist {
                        op,
                        node,
                        operand,
                        outputs,
                    } => {
                        let on_device = match operand {
                            Operand::Value(n) => vals.get(n).is_some_and(|t| {
                                t.dtype == transfuse_ir::DType::F32 && t.elem == Elem::F32
                            }),
                            _ => false,
                        };
                        let name = host_name(*node);
                        if on_device && device_op(*op) {
                            let Operand::Value(n) = operand else {
                                unreachable!("checked")
                            };
                            let x = self.take(&mut vals, n, k)?.expect("checked");
                            let y = self.device_dist(*op, x)?;
                            if !outputs.is_empty() {
                                let t = crate::program::read_device_tensor(self.dev.as_ref(), &y)?;
                                for o in outputs.iter() {
                                    out.insert(o.clone(), t.clone());
                                }
                            }
                            if self.last_read.contains_key(&name) {
                                vals.insert(name, y);
                            }
                            continue;
                        }
                        // A value still on the device is read back; anything else is on the host.
                        let kept = match operand {
                            Operand::Value(n) => self.take(&mut vals, n, k)?,
                            _ => None,
                        };
                        let x = match kept {
                            Some(t) => {
                                Ok(crate::program::read_device_tensor(self.dev.as_ref(), &t)?)
                            }
                            None => operand.on_host(&host, &self.weights)?,
                        };
                        let t = host_dist(&self.host_comm, *op, x)?;
                        for o in outputs.iter() {
                            out.insert(o.clone(), t.clone());
                        }
                        host.insert(name, t);
                    }
                }
            }
            Ok(())
        })();
        self.steps = steps;
        res?;
        for (o, i) in carry {
            if let Some(t) = out.remove(o) {
                self.carried.insert(i.clone(), t);
            }
        }
        Ok(out)
    }
}

impl<D: Device + 'static> Loaded for DeviceSegments<D> {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        self.call(inputs, carry, None)
    }

    fn clear_carry(&mut self) {
        self.carried.clear();
    }

    /// The segments' kernel times (the collectives are not kernels).
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let mut times = Vec::new();
        self.call(inputs, &[], Some(&mut times))?;
        Ok(times)
    }
}
