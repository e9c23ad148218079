//! The pipeline cut: a graph's layers split into `P` contiguous stages balanced by the cost
//! model, each stage its own graph.
//!
//! A node's layer is the highest layer index among the weights it depends on (a weight
//! `h.3.attn.c_attn.weight` is in layer 3: the first dot-separated number of its name, which
//! is how the GPT-2, BERT and LLaMA checkpoints name their blocks); a node that depends on no
//! layered weight (the embedding, the attention-mask arithmetic, the tied LM head's weight
//! transpose) runs in the stage of its first consumer. The layers are split into contiguous
//! ranges minimising the most expensive stage, with each node priced by
//! [`crate::cost::graph_node_costs`] (the optimizer's cost model under the backend's
//! profile).
//!
//! Each stage's graph declares the inputs of the whole graph (ids, masks: the runner hands
//! each stage the same map), of the KV cache only its own layers' (`past_*`: the stage carries
//! its cache from call to call), plus the values it receives from the stage before
//! it (named `pp.<node>`), and outputs the graph outputs it computes plus the values a later
//! stage needs (its own and those it forwards: a value crosses every stage boundary between
//! its producer and its last consumer). Leaves (weights, constants) are not sent: every stage
//! that reads one declares it, so each stage loads only its own layers' weights.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use transfuse_ir::{eval_shape, Bindings, DType, Graph, IrError, NodeId, Op, Shape};

use crate::cost::{graph_node_costs, Profile};

/// Why a graph cannot be cut.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// More stages than layers, or none.
    #[error("--pp {stages}: the model has {layers} layers (1 ≤ --pp ≤ layers)")]
    Degree {
        /// The stages asked for.
        stages: usize,
        /// The layers found.
        layers: usize,
    },
    /// Building a stage graph failed (a bug: the stages are subgraphs of a valid graph).
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// One stage of a cut graph.
#[derive(Clone, Debug)]
pub struct Stage {
    /// The stage's graph.
    pub graph: Graph,
    /// The layers it runs, `first..end`.
    pub layers: std::ops::Range<usize>,
    /// What it receives from the stage before it, in order (inputs of `graph`).
    pub recv: Vec<String>,
    /// What it sends to the stage after it, in order: outputs of `graph`, or values it
    /// received and passes on unchanged (the runner forwards those from its inputs).
    pub send: Vec<String>,
    /// Its estimated seconds per forward under the profile.
    pub cost: f64,
}

/// A graph cut into stages.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// The layers of the whole graph.
    pub layers: usize,
}

impl Pipeline {
    /// Bytes stage `s` sends to stage `s + 1` per forward at `bindings`.
    pub fn send_bytes(&self, s: usize, bindings: &Bindings) -> Result<u64, IrError> {
        let st = &self.stages[s];
        let mut bytes = 0u64;
        for name in &st.send {
            let (_, id) = st
                .graph
                .outputs()
                .iter()
                .find(|(n, _)| n == name)
                .expect("sent values are outputs");
            let node = st.graph.node(*id);
            let elems: usize = eval_shape(&node.shape, bindings)?.iter().product();
            let width = if node.dtype == DType::Bool { 1 } else { 4 };
            bytes += width * elems as u64;
        }
        Ok(bytes)
    }
}

/// The layer index of a weight name: its first dot-separated component that is a number.
pub fn weight_layer(name: &str) -> Option<usize> {
    name.split('.').find_map(|p| p.parse::<usize>().ok())
}

fn is_leaf(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. }
    )
}

/// The number of layers of `g` (1 + the highest weight layer; 0 without layered weights).
pub fn layer_count(g: &Graph) -> usize {
    g.weights()
        .iter()
        .filter_map(|(n, _)| weight_layer(n))
        .max()
        .map_or(0, |l| l + 1)
}

/// Splits `costs` (per layer) into `p` contiguous non-empty ranges minimising the largest sum;
/// ties go to the earliest cut. Returns the end of each range.
fn balance(costs: &[f64], p: usize) -> Vec<usize> {
    let n = costs.len();
    let mut prefix = vec![0.0; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + costs[i];
    }
    // best[k][i]: the least maximum over the first i layers in k stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; p + 1];
    let mut arg = vec![vec![0usize; n + 1]; p + 1];
    best[0][0] = 0.0;
    for k in 1..=p {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] - 1e-15 {
                    best[k][i] = v;
                    arg[k][i] = j;
                }
            }
        }
    }
    let mut ends = vec![0; p];
    let mut i = n;
    for k in (1..=p).rev() {
        ends[k - 1] = i;
        i = arg[k][i];
    }
    ends
}

/// Cuts `g` into `stages` stages balanced under `profile` (see the module docs).
pub fn cut(g: &Graph, stages: usize, profile: &Profile) -> Result<Pipeline, PipelineError> {
    let layers = layer_count(g);
    if stages == 0 || stages > layers.max(1) {
        return Err(PipelineError::Degree { stages, layers });
    }
    let costs = graph_node_costs(g, profile);
    let n = g.len();
    let mut layer: Vec<Option<usize>> = vec![None; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (id, node) in g.nodes() {
        let i = id.index();
        layer[i] = match &node.op {
            Op::Weight { name, .. } => weight_layer(name),
            op if is_leaf(op) => None,
            _ => node.inputs.iter().filter_map(|x| layer[x.index()]).max(),
        };
        for x in &node.inputs {
            consumers[x.index()].push(i);
        }
    }
    let mut layer_costs = vec![0.0; layers.max(1)];
    for (id, node) in g.nodes() {
        if !is_leaf(&node.op) {
            layer_costs[layer[id.index()].unwrap_or(0)] += costs[id.index()];
        }
    }
    let ends = balance(&layer_costs, stages);
    let stage_of_layer = |l: usize| ends.iter().position(|&e| l < e).expect("l < layers");
    // Stages: layered nodes by their layer; the others (reverse order) at their first
    // consumer's stage, or stage 0 without consumers.
    let mut stage = vec![0usize; n];
    for i in (0..n).rev() {
        stage[i] = match layer[i] {
            Some(l) => stage_of_layer(l),
            None => consumers[i].iter().map(|&c| stage[c]).min().unwrap_or(0),
        };
    }
    let node = |i: usize| g.node(NodeId(i as u32));
    // Last stage that reads each non-leaf value.
    let last_use: Vec<usize> = (0..n)
        .map(|i| consumers[i].iter().map(|&c| stage[c]).max().unwrap_or(0))
        .collect();
    let crossing = |s: usize| -> Vec<usize> {
        // Values computed at a stage ≤ s and read after it: they cross the s → s+1 boundary.
        (0..n)
            .filter(|&i| !is_leaf(&node(i).op) && stage[i] <= s && last_use[i] > s)
            .collect()
    };
    let name_of = |i: usize| format!("pp.{i}");
    let mut out = Vec::with_capacity(stages);
    for s in 0..stages {
        let recv: Vec<usize> = if s == 0 { Vec::new() } else { crossing(s - 1) };
        let send: Vec<usize> = if s + 1 == stages {
            Vec::new()
        } else {
            crossing(s)
        };
        let mut sg = Graph::new();
        let mut map: HashMap<usize, NodeId> = HashMap::new();
        // The graph inputs: those the stage reads, and every one that is not a KV cache
        // (`past_*`), so each stage binds `batch`, `seq` and `past` from the same ids and
        // mask; a cache input only where the stage's layers read it (their stage carries it).
        for (id, nd) in g.nodes() {
            if let Op::Input { name, .. } = &nd.op {
                let read_here = consumers[id.index()].iter().any(|&c| stage[c] == s);
                if read_here || !name.starts_with("past_") {
                    map.insert(id.index(), sg.add(nd.op.clone(), &[])?);
                }
            }
        }
        for &i in &recv {
            let nd = node(i);
            let op = Op::Input {
                name: name_of(i),
                shape: nd.shape.clone() as Shape,
                dtype: nd.dtype,
            };
            map.insert(i, sg.add(op, &[])?);
        }
        let mut cost = 0.0;
        // The stage's own nodes and the leaves they read, in order.
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        for (i, &st) in stage.iter().enumerate() {
            if !is_leaf(&node(i).op) && st == s {
                needed.insert(i);
                for x in &node(i).inputs {
                    if is_leaf(&node(x.index()).op) {
                        needed.insert(x.index());
                    }
                }
            }
        }
        for i in needed {
            if map.contains_key(&i) {
                continue;
            }
            let nd = node(i);
            if !is_leaf(&nd.op) {
                cost += costs[i];
            }
            let ins: Vec<NodeId> = nd
                .inputs
                .iter()
                .map(|x| {
                    *map.get(&x.index())
                        .expect("operands come from this stage, a leaf, or a received value")
                })
                .collect();
            map.insert(i, sg.add(nd.op.clone(), &ins)?);
        }
        for (name, id) in g.outputs() {
            if stage[id.index()] == s && !is_leaf(&node(id.index()).op) {
                sg.set_output(name, map[&id.index()]);
            }
        }
        // A value this stage received and passes on unchanged is forwarded by the runner from
        // its inputs: as a graph output it would be an output named after an input, which a
        // device plan cannot have (one buffer per name).
        for &i in send.iter().filter(|i| !recv.contains(i)) {
            sg.set_output(&name_of(i), map[&i]);
        }
        let first = if s == 0 { 0 } else { ends[s - 1] };
        out.push(Stage {
            graph: sg,
            layers: first..ends[s],
            recv: recv.iter().map(|&i| name_of(i)).collect(),
            send: send.iter().map(|&i| name_of(i)).collect(),
            cost,
        });
    }
    Ok(Pipeline {
        stages: out,
        layers,
    })
}

/// Per stage, the count of each op (for `compile --pp N --report`).
pub fn op_counts(p: &Pipeline) -> Vec<BTreeMap<String, usize>> {
    p.stages.iter().map(|s| s.graph.op_counts()).collect()
}
