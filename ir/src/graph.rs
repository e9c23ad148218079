//! The tensor graph: a DAG of typed nodes on petgraph, with shape/dtype inference at insertion.
//!
//! Nodes are only ever appended, and an operand must already exist, so node order is a
//! topological order. Every node carries its inferred shape and dtype; an op whose operands do
//! not fit returns [`IrError::Shape`] naming the op and the node, and the graph is unchanged.

use petgraph::graph::{DiGraph, NodeIndex};

use crate::dim::{shape_string, Dim, Shape};
use crate::op::{DType, DistOp, Op, UnaryOp};
use crate::IrError;

/// A node handle: index into its graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The node's position in topological order.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// One node: its op, operands, inferred shape and dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Operands, in order.
    pub inputs: Vec<NodeId>,
    /// Inferred shape.
    pub shape: Shape,
    /// Inferred dtype.
    pub dtype: DType,
}

/// A tensor graph with named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    g: DiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Appends a node after checking arity, dtypes and shapes.
    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, IrError> {
        if let Some(bad) = inputs.iter().find(|i| i.index() >= self.g.node_count()) {
            return Err(IrError::UnknownNode(bad.0));
        }
        let operands: Vec<(&Shape, DType)> = inputs
            .iter()
            .map(|&i| {
                let n = self.node(i);
                (&n.shape, n.dtype)
            })
            .collect();
        let (shape, dtype) = infer(&op, &operands).map_err(|msg| IrError::Shape {
            op: op.name(),
            node: self.g.node_count() as u32,
            msg,
        })?;
        let idx = self.g.add_node(Node {
            op,
            inputs: inputs.to_vec(),
            shape,
            dtype,
        });
        for (k, &i) in inputs.iter().enumerate() {
            self.g.add_edge(NodeIndex::new(i.index()), idx, k as u32);
        }
        Ok(NodeId(idx.index() as u32))
    }

    /// Marks `node` as the output called `name` (names are unique; re-marking replaces).
    pub fn set_output(&mut self, name: &str, node: NodeId) {
        match self.outputs.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = node,
            None => self.outputs.push((name.to_string(), node)),
        }
    }

    /// Named outputs in the order they were set.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The node behind a handle.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[NodeIndex::new(id.index())]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    /// True if the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// All nodes in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.g
            .node_indices()
            .map(move |i| (NodeId(i.index() as u32), &self.g[i]))
    }

    /// The underlying petgraph graph (edge weight = operand position).
    pub fn petgraph(&self) -> &DiGraph<Node, u32> {
        &self.g
    }

    /// The graph's inputs as `(name, shape, dtype)`.
    pub fn inputs(&self) -> Vec<(&str, &Shape, DType)> {
        self.nodes()
            .filter_map(|(_, n)| match &n.op {
                Op::Input { name, shape, dtype } => Some((name.as_str(), shape, *dtype)),
                _ => None,
            })
            .collect()
    }

    /// The graph's weights as `(name, shape)`.
    pub fn weights(&self) -> Vec<(&str, &Shape)> {
        self.nodes()
            .filter_map(|(_, n)| match &n.op {
                Op::Weight { name, shape } => Some((name.as_str(), shape)),
                _ => None,
            })
            .collect()
    }

    /// How many nodes use each node (outputs count as a use).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.len()];
        for (_, n) in self.nodes() {
            for i in &n.inputs {
                uses[i.index()] += 1;
            }
        }
        for (_, o) in &self.outputs {
            uses[o.index()] += 1;
        }
        uses
    }

    /// Op name → count, for reports.
    pub fn op_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for (_, n) in self.nodes() {
            *m.entry(n.op.name()).or_insert(0) += 1;
        }
        m
    }
}

/// Broadcasts two shapes numpy-style (aligned right, size-1 axes stretch).
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len()).checked_sub(rank).map(|j| &a[j]);
        let db = (i + b.len()).checked_sub(rank).map(|j| &b[j]);
        out.push(match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if x.is(1) => y.clone(),
            (Some(x), Some(y)) if y.is(1) => x.clone(),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "shapes {} and {} do not broadcast",
                    shape_string(a),
                    shape_string(b)
                ))
            }
            (None, None) => unreachable!(),
        });
    }
    Ok(out)
}

/// Splits a shape into (product of known dims, sorted symbolic dims) for size comparisons.
fn size_signature(shape: &[Dim]) -> (usize, Vec<Dim>) {
    let mut known = 1usize;
    let mut syms = Vec::new();
    for d in shape {
        match d.as_known() {
            Some(n) => known = known.saturating_mul(n),
            None => syms.push(d.clone()),
        }
    }
    syms.sort();
    (known, syms)
}

/// The one dtype all operands share, else an error naming `what`.
pub(crate) fn same_dtype(what: &str, xs: &[(&Shape, DType)]) -> Result<DType, String> {
    let d = xs[0].1;
    if xs.iter().all(|x| x.1 == d) {
        Ok(d)
    } else {
        let ds: Vec<&str> = xs.iter().map(|x| x.1.name()).collect();
        Err(format!(
            "{what} needs operands of one dtype, got {}",
            ds.join(", ")
        ))
    }
}

/// Each operand must broadcast into `target` without growing it.
pub(crate) fn expect_broadcast_into(xs: &[(&Shape, DType)], target: &[Dim]) -> Result<(), String> {
    for (s, _) in xs {
        if broadcast_shapes(s, target)? != target {
            return Err(format!(
                "{} does not broadcast into {}",
                shape_string(s),
                shape_string(target)
            ));
        }
    }
    Ok(())
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

/// Infers the shape and dtype of `op` applied to operands of the given shapes and dtypes.
pub fn infer(op: &Op, xs: &[(&Shape, DType)]) -> Result<(Shape, DType), String> {
    if let Some(n) = op.arity() {
        if xs.len() != n {
            return Err(format!("expects {n} operands, got {}", xs.len()));
        }
    } else if xs.is_empty() {
        return Err("expects at least one operand".into());
    }
    let same_dtype = |what: &str| same_dtype(what, xs);
    match op {
        Op::Input { dtype, .. } | Op::Constant { dtype, .. } | Op::Cast { dtype }
            if matches!(dtype, DType::F16 | DType::BF16) =>
        {
            Err(format!(
                "graph tensors are f32, i64 or bool, not {dtype}: f16/bf16 are host tensor and \
                 device storage types (lower with that storage instead)"
            ))
        }
        Op::Input { shape, dtype, .. } => Ok((shape.clone(), *dtype)),
        Op::Weight { shape, .. } => Ok((shape.clone(), DType::F32)),
        Op::Constant { dtype, .. } => Ok((vec![], *dtype)),
        Op::Iota { len, .. } => Ok((vec![len.clone()], DType::I64)),
        Op::Unary(u) => {
            let (s, d) = xs[0];
            let ok = match u {
                UnaryOp::Neg | UnaryOp::Abs => d != DType::Bool,
                UnaryOp::Not => d == DType::Bool,
                _ => d == DType::F32,
            };
            if !ok {
                return Err(format!("{} does not take {d}", u.name()));
            }
            Ok((s.clone(), d))
        }
        Op::Binary(b) => {
            let d = same_dtype(b.name())?;
            if d == DType::Bool {
                return Err(format!("{} does not take bool", b.name()));
            }
            Ok((broadcast_shapes(xs[0].0, xs[1].0)?, d))
        }
        Op::Compare(_) => {
            same_dtype("comparison")?;
            Ok((broadcast_shapes(xs[0].0, xs[1].0)?, DType::Bool))
        }
        Op::Where => {
            if xs[0].1 != DType::Bool {
                return Err(format!("condition must be bool, got {}", xs[0].1));
            }
            if xs[1].1 != xs[2].1 {
                return Err(format!(
                    "branches differ in dtype: {} vs {}",
                    xs[1].1, xs[2].1
                ));
            }
            let s = broadcast_shapes(xs[0].0, xs[1].0)?;
            Ok((broadcast_shapes(&s, xs[2].0)?, xs[1].1))
        }
        Op::Reduce { axes, keepdim, .. } => {
            let (s, d) = xs[0];
            if d == DType::Bool {
                return Err("cannot reduce bool".into());
            }
            if axes.is_empty() || axes.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!(
                    "axes {axes:?} must be non-empty, sorted and unique"
                ));
            }
            for &a in axes {
                check_axis(a, s.len())?;
            }
            let out = s
                .iter()
                .enumerate()
                .filter_map(|(i, dim)| match (axes.contains(&i), keepdim) {
                    (false, _) => Some(dim.clone()),
                    (true, true) => Some(Dim::known(1)),
                    (true, false) => None,
                })
                .collect();
            Ok((out, d))
        }
        Op::MatMul => {
            let d = same_dtype("matmul")?;
            if d != DType::F32 {
                return Err(format!("matmul takes f32, got {d}"));
            }
            let (a, b) = (xs[0].0, xs[1].0);
            if a.len() < 2 || b.len() < 2 {
                return Err(format!(
                    "operands need rank ≥ 2, got {} and {}",
                    shape_string(a),
                    shape_string(b)
                ));
            }
            let (m, ka) = (&a[a.len() - 2], &a[a.len() - 1]);
            let (kb, n) = (&b[b.len() - 2], &b[b.len() - 1]);
            if ka != kb {
                return Err(format!(
                    "inner dims differ: {} × {}",
                    shape_string(a),
                    shape_string(b)
                ));
            }
            let mut out = broadcast_shapes(&a[..a.len() - 2], &b[..b.len() - 2])?;
            out.push(m.clone());
            out.push(n.clone());
            Ok((out, d))
        }
        Op::Reshape { shape } => {
            let (s, d) = xs[0];
            if size_signature(s) != size_signature(shape) {
                return Err(format!(
                    "cannot reshape {} into {}",
                    shape_string(s),
                    shape_string(shape)
                ));
            }
            Ok((shape.clone(), d))
        }
        Op::Permute { perm } => {
            let (s, d) = xs[0];
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..s.len()).collect::<Vec<_>>() {
                return Err(format!("{perm:?} is not a permutation of rank {}", s.len()));
            }
            Ok((perm.iter().map(|&p| s[p].clone()).collect(), d))
        }
        Op::Expand { shape } => {
            let (s, d) = xs[0];
            let b = broadcast_shapes(s, shape)?;
            if &b != shape {
                return Err(format!(
                    "cannot expand {} to {}",
                    shape_string(s),
                    shape_string(shape)
                ));
            }
            Ok((b, d))
        }
        Op::Slice { axis, start, end } => {
            let (s, d) = xs[0];
            check_axis(*axis, s.len())?;
            let mut out = s.clone();
            out[*axis] = end.minus(start);
            if let (Some(e), Some(n)) = (end.as_known(), s[*axis].as_known()) {
                if e > n {
                    return Err(format!("end {e} beyond axis length {n}"));
                }
            }
            if out[*axis].symbols().next().is_none() && out[*axis].as_known().is_none() {
                return Err(format!("slice {start}..{end} has negative length"));
            }
            Ok((out, d))
        }
        Op::Concat { axis } => {
            let d = same_dtype("concat")?;
            let first = xs[0].0;
            check_axis(*axis, first.len())?;
            let mut total = Dim::known(0);
            for (s, _) in xs {
                if s.len() != first.len()
                    || s.iter()
                        .zip(first)
                        .enumerate()
                        .any(|(i, (a, b))| i != *axis && a != b)
                {
                    return Err(format!(
                        "shapes {} and {} differ off axis {axis}",
                        shape_string(first),
                        shape_string(s)
                    ));
                }
                total = total.plus(&s[*axis]);
            }
            let mut out = first.clone();
            out[*axis] = total;
            Ok((out, d))
        }
        Op::Gather => {
            let (table, td) = xs[0];
            let (ids, idd) = xs[1];
            if idd != DType::I64 {
                return Err(format!("ids must be i64, got {idd}"));
            }
            if table.is_empty() {
                return Err("table must have rank ≥ 1".into());
            }
            let mut out = ids.clone();
            out.extend(table[1..].iter().cloned());
            Ok((out, td))
        }
        Op::Cast { dtype } => Ok((xs[0].0.clone(), *dtype)),
        Op::Dist(d) => {
            let (s, dt) = xs[0];
            match *d {
                DistOp::AllReduce => {
                    if dt == DType::Bool {
                        return Err("cannot sum bool".into());
                    }
                    Ok((s.clone(), dt))
                }
                DistOp::Send { .. } | DistOp::Recv { .. } | DistOp::RootOnly => Ok((s.clone(), dt)),
                DistOp::AllGather { axis, world }
                | DistOp::Shard { axis, world }
                | DistOp::ReduceScatter { axis, world } => {
                    if matches!(d, DistOp::ReduceScatter { .. }) && dt == DType::Bool {
                        return Err("cannot sum bool".into());
                    }
                    check_axis(axis, s.len())?;
                    if world == 0 {
                        return Err("world must be ≥ 1".into());
                    }
                    let mut out = s.clone();
                    // Symbolic lengths too, when linear: a sequence padded to `world·c`
                    // splits into `c` per rank (sequence parallelism) and gathers back.
                    out[axis] = match d {
                        DistOp::AllGather { .. } => s[axis].scale(world),
                        _ => s[axis].div_exact(world).ok_or_else(|| {
                            format!(
                                "axis {axis} ({}) must be a length divisible by world {world}",
                                s[axis]
                            )
                        })?,
                    };
                    Ok((out, dt))
                }
            }
        }
        fused => (crate::fused::def(fused)
            .expect("every op is primitive or fused")
            .infer)(op, xs),
    }
}
