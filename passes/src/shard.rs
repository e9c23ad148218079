//! Tensor-parallel sharding: an optimized graph and a [`ShardSpec`] → one SPMD graph that every
//! rank of a group of `degree` runs on its own weight slices (Megatron-LM's layout).
//!
//! The spec says how each weight is laid out across ranks (split along an axis, in
//! `segments` equal blocks each split `degree` ways, so a merged QKV weight gives every rank
//! its heads' q, k and v columns; or replicated) and which inputs (a KV cache) are split by
//! heads. The pass walks the graph once in node order and propagates a *sharding state* per
//! tensor: replicated, or split along one axis as a list of segments (each split or
//! replicated: LLaMA's merged QKV with replicated key/value heads is `[q split | k | v]`).
//! Per op:
//! - elementwise ops, casts, permutes, expands, gathers from a replicated table, norms and
//!   softmax over an unsplit last axis, and attention split on a batch (head) axis keep the
//!   split (attribute dims that mention the split axis become `1/degree`);
//! - a reshape moves the split to the output axis that starts at the same element offset, when
//!   that axis divides (`[b, s, h/N] ↔ [b, s, H/N, d]`);
//! - a slice aligned to segments and a concat along the split axis select / join segments;
//! - a matmul of a replicated activation by a column-split weight gives a column-split
//!   output; a matmul whose contraction axis is split the same way on both sides gives
//!   partial sums: the pass emits the bare matmul, an `all_reduce`, then the bias and the
//!   residual of a fused matmul, each added once after the reduce (exact: Megatron's order);
//!   with [`ShardSpec::epilogue_before_reduce`] the fused matmul keeps them in its epilogue,
//!   read through `root_only` (rank 0's operand, zeros elsewhere), and its output is reduced
//!   ([`for_rank`] resolves `root_only` per rank before loading);
//! - a gather from a table split by rows (the vocabulary) is Megatron's vocab-parallel
//!   embedding: local lookup of the rank's ids, other rows zeroed, one `all_reduce`;
//! - anything else (an operand split where the op cannot keep it) is gathered back to
//!   replicated first and runs replicated: correct, and visible as extra collectives
//!   ([`comm_cost`]).
//!
//! Outputs are replicated (`all_gather`, then the vocabulary padding sliced off) unless the
//! spec names them rank-local (the KV cache, which stays sharded by heads between steps).
//!
//! Errors: [`ShardError::NotDivisible`] names the weight or reshape whose dims the degree does
//! not divide; [`ShardError::Unsupported`] a graph that already holds collectives.

use std::collections::{BTreeMap, BTreeSet};

use transfuse_ir::{shape_string, Dim, DistOp, Graph, IrError, NodeId, Op, Shape};

/// How one tensor (weight or input) is laid out across the ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every rank holds all of it.
    Replicated,
    /// Split along `axis`: the axis is `segments` equal blocks, each split `degree` ways, rank
    /// `r` holding the `r`-th part of every block. `padded` (vocabularies, MLP widths) pads the
    /// axis with zero rows to this length first, a multiple of `segments · degree`.
    Split {
        /// The split axis.
        axis: usize,
        /// Equal blocks along the axis (3 for a merged QKV, else 1).
        segments: usize,
        /// The padded axis length, when padded.
        padded: Option<usize>,
    },
}

impl Layout {
    /// Split along `axis` in one block.
    pub fn split(axis: usize) -> Layout {
        Layout::Split {
            axis,
            segments: 1,
            padded: None,
        }
    }
}

/// What the sharding pass needs to know of a model.
#[derive(Clone, Debug, Default)]
pub struct ShardSpec {
    /// Ranks in the group.
    pub degree: usize,
    /// Layouts of weights, by name; weights not named are replicated.
    pub weights: BTreeMap<String, Layout>,
    /// Layouts of graph inputs (the KV cache); inputs not named are replicated.
    pub inputs: BTreeMap<String, Layout>,
    /// Outputs left as each rank computes them (a KV cache split by heads).
    pub rank_local_outputs: BTreeSet<String>,
    /// Megatron-SP (Korthikanti et al.): every row-parallel site's `all_reduce` becomes a
    /// `reduce_scatter` along the sequence axis, the bias and residual adds and the norms run
    /// on the rank's `⌈seq/N⌉` rows, and an `all_gather` restores the full sequence before the
    /// next op that needs it (see [`SeqChunk`] for the padding).
    pub sequence_parallel: bool,
    /// The bias and the residual of a row-parallel fused matmul added before its `all_reduce`,
    /// in the matmul's epilogue, on rank 0 only (`all_reduce(x·W + [rank 0: b + r])`, each
    /// operand through [`DistOp::RootOnly`]): the sum is the same terms in another order
    /// (exact up to rounding, no term scaled), and the separate elementwise pass over the
    /// all-reduced stream disappears. Sites that sequence parallelism takes stay as it makes
    /// them.
    pub epilogue_before_reduce: bool,
}

/// The name of the graph input (and of its one symbolic dim) that a sequence-parallel graph
/// reads its per-rank sequence chunk `c = ⌈seq/N⌉` from: the sequence is padded to `N·c` rows
/// (zeros; the pad rows are never read by a real row) so that any length splits.
pub const SEQ_CHUNK: &str = "tp_seq_chunk";

/// How the runner supplies [`SEQ_CHUNK`]: an `i64` tensor of shape `[⌈len/world⌉]` (values
/// unused), where `len` is axis `axis` of the input `input`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqChunk {
    /// The graph input whose axis is the sequence length.
    pub input: String,
    /// That axis.
    pub axis: usize,
    /// The degree.
    pub world: usize,
}

impl SeqChunk {
    /// The chunk length for a sequence of `len`.
    pub fn chunk(&self, len: usize) -> usize {
        len.div_ceil(self.world)
    }
}

/// How a rank reads one weight of the sharded graph from the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSlice {
    /// The checkpoint tensor.
    pub source: String,
    /// Its layout.
    pub layout: Layout,
}

impl WeightSlice {
    /// The `[start, end)` ranges of the split axis (in the padded axis) that `rank` of `degree`
    /// holds, in order, and the padded axis length; `None` for a replicated weight.
    pub fn ranges(
        &self,
        full: usize,
        rank: usize,
        degree: usize,
    ) -> Option<(Vec<(usize, usize)>, usize)> {
        let Layout::Split {
            segments, padded, ..
        } = self.layout
        else {
            return None;
        };
        let padded = padded.unwrap_or(full);
        let seg = padded / segments;
        let part = seg / degree;
        Some((
            (0..segments)
                .map(|b| (b * seg + rank * part, b * seg + (rank + 1) * part))
                .collect(),
            padded,
        ))
    }
}

/// The sharded graph and how each of its weights is read.
#[derive(Clone, Debug)]
pub struct Sharded {
    /// The SPMD graph every rank runs.
    pub graph: Graph,
    /// Every weight of `graph`, by its name.
    pub weights: BTreeMap<String, WeightSlice>,
    /// The degree.
    pub degree: usize,
    /// Set when the graph is sequence-parallel: the extra input it needs.
    pub seq_chunk: Option<SeqChunk>,
    /// Per source node: its node in `graph` and its sharding state (what [`crate::place`]
    /// merges two layouts by).
    pub(crate) states: Vec<(NodeId, St)>,
}

/// Why a graph cannot be sharded.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The degree does not divide a dimension that must be split.
    #[error("--tp {degree}: {tensor} {dims}: {why}")]
    NotDivisible {
        /// The weight, input or node.
        tensor: String,
        /// Its shape, printed.
        dims: String,
        /// The degree.
        degree: usize,
        /// Which dim does not divide.
        why: String,
    },
    /// Something the pass does not shard.
    #[error("sharding: {0}")]
    Unsupported(String),
    /// A node the pass built failed the IR's inference (a bug of the pass).
    #[error("sharding built an invalid graph: {0}")]
    Ir(#[from] IrError),
}

/// One segment of a split axis: its full length and whether it is split across ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    /// Full (padded) length.
    len: usize,
    split: bool,
    /// The unpadded length (≤ `len`).
    valid: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum St {
    Rep,
    Seg {
        axis: usize,
        segs: Vec<Seg>,
    },
    /// Split along the sequence axis `axis`: the sequence padded to `N·c` rows
    /// ([`SEQ_CHUNK`]), rank `r` holding rows `[r·c, (r+1)·c)`; pad rows hold anything (they are
    /// row-local garbage that every way back to replicated slices off).
    Seq {
        axis: usize,
    },
}

fn seg_state(axis: usize, segs: Vec<Seg>) -> St {
    if segs.iter().any(|s| s.split) {
        St::Seg { axis, segs }
    } else {
        St::Rep
    }
}

struct Pass<'a> {
    src: &'a Graph,
    spec: &'a ShardSpec,
    n: usize,
    g: Graph,
    map: Vec<Option<(NodeId, St)>>,
    weights: BTreeMap<String, WeightSlice>,
    /// Sequence parallelism: the sequence length (the first site's) and the chunk input.
    seq: Option<(Dim, Dim)>,
    seq_chunk: Option<SeqChunk>,
    /// `Seq` values already gathered back (one `all_gather` however many readers).
    gathered: BTreeMap<NodeId, NodeId>,
}

/// Shards `g` for `spec.degree` ranks (see the module docs).
pub fn shard(g: &Graph, spec: &ShardSpec) -> Result<Sharded, ShardError> {
    if spec.degree == 0 {
        return Err(ShardError::Unsupported("the degree must be ≥ 1".into()));
    }
    let mut p = Pass {
        src: g,
        spec,
        n: spec.degree,
        g: Graph::new(),
        map: vec![None; g.len()],
        weights: BTreeMap::new(),
        seq: None,
        seq_chunk: None,
        gathered: BTreeMap::new(),
    };
    for (id, _) in g.nodes() {
        let r = p.node(id)?;
        p.map[id.index()] = Some(r);
    }
    for (name, id) in g.outputs() {
        let (nid, st) = p.map[id.index()].clone().expect("outputs are nodes");
        let out = if spec.rank_local_outputs.contains(name) {
            nid
        } else {
            p.replicate(nid, &st)?
        };
        p.g.set_output(name, out);
    }
    Ok(Sharded {
        graph: p.g,
        weights: p.weights,
        degree: spec.degree,
        seq_chunk: p.seq_chunk,
        states: p.map.into_iter().map(|m| m.expect("every node")).collect(),
    })
}

impl Pass<'_> {
    fn local(&self, s: &Seg) -> usize {
        if s.split {
            s.len / self.n
        } else {
            s.len
        }
    }

    fn shape(&self, id: NodeId) -> Shape {
        self.g.node(id).shape.clone()
    }

    fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, ShardError> {
        Ok(self.g.add(op, inputs)?)
    }

    /// The operand `i` of `user`, as sharded.
    fn operand(&mut self, user: NodeId, i: usize) -> Result<(NodeId, St), ShardError> {
        let src = self.src.node(user).inputs[i];
        Ok(self.map[src.index()]
            .clone()
            .expect("operands precede users"))
    }

    /// A weight node `name` reading `source` with `layout`.
    fn weight(
        &mut self,
        name: &str,
        source: &str,
        full: &Shape,
        layout: Layout,
    ) -> Result<(NodeId, St), ShardError> {
        let (shape, st) = self.layout_shape(name, full, &layout)?;
        let id = self.add(
            Op::Weight {
                name: name.to_string(),
                shape,
            },
            &[],
        )?;
        self.weights.insert(
            name.to_string(),
            WeightSlice {
                source: source.to_string(),
                layout,
            },
        );
        Ok((id, st))
    }

    fn layout_shape(
        &self,
        name: &str,
        full: &Shape,
        layout: &Layout,
    ) -> Result<(Shape, St), ShardError> {
        let Layout::Split {
            axis,
            segments,
            padded,
        } = *layout
        else {
            return Ok((full.clone(), St::Rep));
        };
        let err = |why: String| ShardError::NotDivisible {
            tensor: name.to_string(),
            dims: shape_string(full),
            degree: self.n,
            why,
        };
        let len = full
            .get(axis)
            .and_then(Dim::as_known)
            .ok_or_else(|| err(format!("axis {axis} is not a known length")))?;
        let plen = padded.unwrap_or(len);
        if plen < len || segments == 0 || !plen.is_multiple_of(segments) {
            return Err(err(format!(
                "axis {axis} ({plen}) is not {segments} equal blocks"
            )));
        }
        let seg = plen / segments;
        if !seg.is_multiple_of(self.n) {
            return Err(err(if segments > 1 {
                format!(
                    "axis {axis} = {segments} blocks of {seg}, and {seg} is not divisible by {}",
                    self.n
                )
            } else {
                format!("axis {axis} ({seg}) is not divisible by {}", self.n)
            }));
        }
        let mut shape = full.clone();
        shape[axis] = Dim::known(plen / self.n);
        let segs = (0..segments)
            .map(|b| Seg {
                len: seg,
                split: true,
                valid: (len.saturating_sub(b * seg)).min(seg),
            })
            .collect();
        Ok((shape, St::Seg { axis, segs }))
    }

    /// `id` in state `st` made replicated: each split segment gathered, padding dropped.
    fn replicate(&mut self, id: NodeId, st: &St) -> Result<NodeId, ShardError> {
        if let St::Seq { axis } = *st {
            return self.unseq(id, axis);
        }
        let St::Seg { axis, segs } = st else {
            return Ok(id);
        };
        let axis = *axis;
        let mut parts = Vec::new();
        let mut off = 0;
        for s in segs {
            let l = self.local(s);
            let mut part = if segs.len() == 1 {
                id
            } else {
                self.add(
                    Op::Slice {
                        axis,
                        start: Dim::known(off),
                        end: Dim::known(off + l),
                    },
                    &[id],
                )?
            };
            off += l;
            if s.split {
                part = self.add(
                    Op::Dist(DistOp::AllGather {
                        axis,
                        world: self.n,
                    }),
                    &[part],
                )?;
            }
            if s.valid < s.len {
                part = self.add(
                    Op::Slice {
                        axis,
                        start: Dim::known(0),
                        end: Dim::known(s.valid),
                    },
                    &[part],
                )?;
            }
            parts.push(part);
        }
        if parts.len() == 1 {
            Ok(parts[0])
        } else {
            self.add(Op::Concat { axis }, &parts)
        }
    }

    /// The sequence chunk `c` when `len` is a sequence-parallel site's sequence length: the
    /// first site fixes the length (and adds the [`SEQ_CHUNK`] input when it is symbolic); a
    /// site of another length, or a symbolic length no graph input holds, is not one.
    fn seq_site(&mut self, len: &Dim) -> Result<Option<Dim>, ShardError> {
        if !self.spec.sequence_parallel || self.n == 1 {
            return Ok(None);
        }
        if let Some((l, c)) = &self.seq {
            return Ok((l == len).then(|| c.clone()));
        }
        let chunk = match len.as_known() {
            Some(l) => Dim::known(l.div_ceil(self.n)),
            None => {
                let found = self.src.inputs().into_iter().find_map(|(name, shape, _)| {
                    shape
                        .iter()
                        .position(|d| d == len)
                        .map(|a| (name.to_string(), a))
                });
                let Some((input, axis)) = found else {
                    return Ok(None);
                };
                self.add(
                    Op::Input {
                        name: SEQ_CHUNK.into(),
                        shape: vec![Dim::sym(SEQ_CHUNK)],
                        dtype: transfuse_ir::DType::I64,
                    },
                    &[],
                )?;
                self.seq_chunk = Some(SeqChunk {
                    input,
                    axis,
                    world: self.n,
                });
                Dim::sym(SEQ_CHUNK)
            }
        };
        self.seq = Some((len.clone(), chunk.clone()));
        Ok(Some(chunk))
    }

    /// `x` (the sequence along `axis`) padded with zero rows to `N·c`.
    fn pad_seq(&mut self, x: NodeId, axis: usize) -> Result<NodeId, ShardError> {
        let (len, c) = self.seq.clone().expect("a sequence-parallel site");
        let padded = c.scale(self.n);
        if padded == len {
            return Ok(x);
        }
        let mut zs = self.shape(x);
        zs[axis] = padded.minus(&len);
        // A zero from an `iota`, not a constant: a constant expanded to a shape with symbolic
        // dims would be folded at load, before those dims are bound.
        let zero = self.add(
            Op::Iota {
                start: Dim::known(0),
                len: Dim::known(1),
            },
            &[],
        )?;
        let dtype = self.g.node(x).dtype;
        let zero = self.add(Op::Cast { dtype }, &[zero])?;
        let z = self.add(Op::Expand { shape: zs }, &[zero])?;
        self.add(Op::Concat { axis }, &[x, z])
    }

    /// A replicated `x` with the full sequence along `axis`: this rank's rows of it.
    fn seq_rows(&mut self, x: NodeId, axis: usize) -> Result<NodeId, ShardError> {
        let p = self.pad_seq(x, axis)?;
        self.add(
            Op::Dist(DistOp::Shard {
                axis,
                world: self.n,
            }),
            &[p],
        )
    }

    /// A `Seq` value made replicated: gathered, the padding sliced off (once per value).
    fn unseq(&mut self, x: NodeId, axis: usize) -> Result<NodeId, ShardError> {
        if let Some(&r) = self.gathered.get(&x) {
            return Ok(r);
        }
        let (len, c) = self.seq.clone().expect("a Seq value has a site");
        let g = self.add(
            Op::Dist(DistOp::AllGather {
                axis,
                world: self.n,
            }),
            &[x],
        )?;
        let r = if c.scale(self.n) == len {
            g
        } else {
            self.add(
                Op::Slice {
                    axis,
                    start: Dim::known(0),
                    end: len,
                },
                &[g],
            )?
        };
        self.gathered.insert(x, r);
        Ok(r)
    }

    /// The operands with every `Seq` one gathered back to replicated.
    fn unseq_all(&mut self, ops: Vec<(NodeId, St)>) -> Result<Vec<(NodeId, St)>, ShardError> {
        ops.into_iter()
            .map(|(id, st)| match st {
                St::Seq { axis } => Ok((self.unseq(id, axis)?, St::Rep)),
                st => Ok((id, st)),
            })
            .collect()
    }

    /// How a replicated operand of rank `ro` joins a `Seq` value of rank `r` split on `axis`:
    /// `Some(false)` as it is (it broadcasts along the sequence), `Some(true)` by taking this
    /// rank's rows (it has the full sequence, f32), `None` when it cannot.
    fn seq_operand(&self, id: NodeId, axis: usize, r: usize) -> Option<bool> {
        let s = self.shape(id);
        let ro = s.len();
        if axis + ro < r || s[axis + ro - r].is(1) {
            return Some(false);
        }
        let (len, _) = self.seq.as_ref()?;
        (s[axis + ro - r] == *len && self.g.node(id).dtype == transfuse_ir::DType::F32)
            .then_some(true)
    }

    /// `op` over `ops` (`Seq` on the output axis `axis`, or replicated) as a `Seq` value;
    /// `None` (nothing emitted) when an operand cannot join.
    fn seq_op(
        &mut self,
        op: Op,
        ops: &[(NodeId, St)],
        axis: usize,
        r: usize,
    ) -> Result<Option<(NodeId, St)>, ShardError> {
        let mut plan = Vec::new();
        for (id, st) in ops {
            plan.push(match st {
                St::Seq { axis: a } if a + r == axis + self.shape(*id).len() => false,
                St::Rep => match self.seq_operand(*id, axis, r) {
                    Some(take) => take,
                    None => return Ok(None),
                },
                _ => return Ok(None),
            });
        }
        let mut ids = Vec::new();
        for ((id, _), take) in ops.iter().zip(plan) {
            ids.push(if take {
                let ro = self.shape(*id).len();
                self.seq_rows(*id, axis + ro - r)?
            } else {
                *id
            });
        }
        Ok(Some((self.add(op, &ids)?, St::Seq { axis })))
    }

    /// Elementwise `user` with a `Seq` operand: stays `Seq` when the others can join.
    fn seq_elementwise(
        &mut self,
        user: NodeId,
        ops: &[(NodeId, St)],
    ) -> Result<Option<(NodeId, St)>, ShardError> {
        let r = self.src.node(user).shape.len();
        let Some(axis) = ops.iter().find_map(|(id, st)| match st {
            St::Seq { axis } => Some(axis + r - self.shape(*id).len()),
            _ => None,
        }) else {
            return Ok(None);
        };
        let op = self.src.node(user).op.clone();
        self.seq_op(op, ops, axis, r)
    }

    /// Runs `user`'s op on replicated operands (the fallback).
    fn replicated(
        &mut self,
        user: NodeId,
        ops: &[(NodeId, St)],
    ) -> Result<(NodeId, St), ShardError> {
        let mut ids = Vec::new();
        for (id, st) in ops {
            ids.push(self.replicate(*id, st)?);
        }
        let op = self.src.node(user).op.clone();
        Ok((self.add(op, &ids)?, St::Rep))
    }

    /// Aligns broadcasting operands (right-aligned against an output of rank `rank`) to one
    /// split; `None` when they cannot share one.
    fn align(
        &mut self,
        ops: &[(NodeId, St)],
        rank: usize,
    ) -> Result<Option<(Vec<NodeId>, St)>, ShardError> {
        let mut target: Option<(usize, Vec<Seg>)> = None;
        for (id, st) in ops {
            if let St::Seg { axis, segs } = st {
                let oa = axis + rank - self.shape(*id).len();
                match &target {
                    None => target = Some((oa, segs.clone())),
                    Some((a, s)) if *a == oa && s == segs => {}
                    Some(_) => return Ok(None),
                }
            }
        }
        let Some((oa, segs)) = target else {
            return Ok(Some((ops.iter().map(|o| o.0).collect(), St::Rep)));
        };
        let mut ids = Vec::new();
        for (id, st) in ops {
            let r = self.shape(*id).len();
            match st {
                St::Seg { .. } => ids.push(*id),
                // Gathered before (`unseq_all`); never aligned with a head split.
                St::Seq { .. } => return Ok(None),
                St::Rep if oa + r < rank || self.shape(*id)[oa + r - rank].is(1) => ids.push(*id),
                St::Rep => {
                    // A replicated operand of full length: this rank's part of it.
                    let single = segs.len() == 1 && segs[0].valid == segs[0].len;
                    if !single {
                        return Ok(None);
                    }
                    ids.push(self.add(
                        Op::Dist(DistOp::Shard {
                            axis: oa + r - rank,
                            world: self.n,
                        }),
                        &[*id],
                    )?);
                }
            }
        }
        Ok(Some((ids, St::Seg { axis: oa, segs })))
    }

    fn elementwise(
        &mut self,
        user: NodeId,
        ops: &[(NodeId, St)],
    ) -> Result<(NodeId, St), ShardError> {
        let rank = self.src.node(user).shape.len();
        match self.align(ops, rank)? {
            Some((ids, st)) => {
                let op = self.src.node(user).op.clone();
                Ok((self.add(op, &ids)?, st))
            }
            None => self.replicated(user, ops),
        }
    }

    fn node(&mut self, id: NodeId) -> Result<(NodeId, St), ShardError> {
        let node = self.src.node(id);
        let ops: Vec<(NodeId, St)> = (0..node.inputs.len())
            .map(|i| self.operand(id, i))
            .collect::<Result<_, _>>()?;
        // Only elementwise ops, norms and row-parallel matmuls take a sequence-split operand.
        let keeps_seq = matches!(
            node.op,
            Op::Unary(_)
                | Op::Cast { .. }
                | Op::Binary(_)
                | Op::Compare(_)
                | Op::Where
                | Op::LayerNorm { .. }
                | Op::RmsNorm { .. }
                | Op::MatMul
                | Op::FusedMatMul { .. }
        );
        let ops = match keeps_seq {
            true => ops,
            false => self.unseq_all(ops)?,
        };
        let split_at = |i: usize| match &ops[i].1 {
            St::Seg { axis, segs } => Some((*axis, segs.clone())),
            St::Rep | St::Seq { .. } => None,
        };
        let any_split = ops.iter().any(|o| o.1 != St::Rep);
        match &node.op {
            Op::Dist(_) => Err(ShardError::Unsupported(format!(
                "node %{} is already a collective",
                id.index()
            ))),
            Op::Weight { name, shape } => {
                let layout = self
                    .spec
                    .weights
                    .get(name)
                    .cloned()
                    .unwrap_or(Layout::Replicated);
                self.weight(name, name, shape, layout)
            }
            Op::Input { name, shape, dtype } => {
                let layout = self
                    .spec
                    .inputs
                    .get(name)
                    .cloned()
                    .unwrap_or(Layout::Replicated);
                let (shape, st) = self.layout_shape(name, shape, &layout)?;
                let nid = self.add(
                    Op::Input {
                        name: name.clone(),
                        shape,
                        dtype: *dtype,
                    },
                    &[],
                )?;
                Ok((nid, st))
            }
            _ if !any_split => {
                let op = node.op.clone();
                let ids: Vec<NodeId> = ops.iter().map(|o| o.0).collect();
                Ok((self.add(op, &ids)?, St::Rep))
            }
            Op::Unary(_) | Op::Cast { .. } => {
                let op = node.op.clone();
                Ok((self.add(op, &[ops[0].0])?, ops[0].1.clone()))
            }
            Op::Binary(_) | Op::Compare(_) | Op::Where => {
                if let Some(r) = self.seq_elementwise(id, &ops)? {
                    return Ok(r);
                }
                let ops = self.unseq_all(ops)?;
                self.elementwise(id, &ops)
            }
            Op::Permute { perm } => {
                let (axis, segs) = split_at(0).expect("split");
                let na = perm.iter().position(|&p| p == axis).expect("a permutation");
                let nid = self.add(node.op.clone(), &[ops[0].0])?;
                Ok((nid, St::Seg { axis: na, segs }))
            }
            Op::Expand { shape } => {
                let (axis, segs) = split_at(0).expect("split");
                let na = axis + shape.len() - self.shape(ops[0].0).len();
                let mut s = shape.clone();
                s[na] = self.shape(ops[0].0)[axis].clone();
                let nid = self.add(Op::Expand { shape: s }, &[ops[0].0])?;
                Ok((nid, St::Seg { axis: na, segs }))
            }
            Op::Reshape { shape } => match self.reshape(id, ops[0].0, &ops[0].1, shape)? {
                Some(r) => Ok(r),
                None => self.replicated(id, &ops),
            },
            Op::Slice { axis, start, end } => {
                let (sa, segs) = split_at(0).expect("split");
                if *axis != sa {
                    let nid = self.add(node.op.clone(), &[ops[0].0])?;
                    return Ok((nid, ops[0].1.clone()));
                }
                let (Some(s0), Some(e0)) = (start.as_known(), end.as_known()) else {
                    return self.replicated(id, &ops);
                };
                let mut full = 0;
                let mut local = 0;
                let (mut i0, mut i1, mut l0, mut l1) = (None, None, 0, 0);
                for (i, s) in segs.iter().enumerate() {
                    if full == s0 {
                        i0 = Some(i);
                        l0 = local;
                    }
                    full += s.len;
                    local += self.local(s);
                    if full == e0 {
                        i1 = Some(i + 1);
                        l1 = local;
                    }
                }
                match (i0, i1) {
                    (Some(a), Some(b)) if a < b => {
                        let nid = self.add(
                            Op::Slice {
                                axis: sa,
                                start: Dim::known(l0),
                                end: Dim::known(l1),
                            },
                            &[ops[0].0],
                        )?;
                        Ok((nid, seg_state(sa, segs[a..b].to_vec())))
                    }
                    _ => self.replicated(id, &ops),
                }
            }
            Op::Concat { axis } => {
                let along = ops.iter().all(|(oid, st)| match st {
                    St::Seg { axis: a, .. } => a == axis,
                    St::Seq { .. } => false,
                    St::Rep => self.shape(*oid)[*axis].as_known().is_some(),
                });
                if !along {
                    return self.elementwise(id, &ops);
                }
                let mut segs = Vec::new();
                for (oid, st) in &ops {
                    match st {
                        St::Seg { segs: s, .. } => segs.extend(s.iter().cloned()),
                        St::Seq { .. } => return self.replicated(id, &ops),
                        St::Rep => {
                            let len = self.shape(*oid)[*axis].as_known().expect("checked");
                            segs.push(Seg {
                                len,
                                split: false,
                                valid: len,
                            })
                        }
                    }
                }
                let ids: Vec<NodeId> = ops.iter().map(|o| o.0).collect();
                let nid = self.add(node.op.clone(), &ids)?;
                Ok((nid, seg_state(*axis, segs)))
            }
            Op::Gather => match (&ops[0].1, &ops[1].1) {
                (St::Seg { axis, segs }, St::Rep) if *axis >= 1 => {
                    let na = axis - 1 + self.shape(ops[1].0).len();
                    let segs = segs.clone();
                    let nid = self.add(Op::Gather, &[ops[0].0, ops[1].0])?;
                    Ok((nid, St::Seg { axis: na, segs }))
                }
                (St::Seg { axis: 0, segs }, St::Rep) if segs.len() == 1 => {
                    let rows = self.local(&segs[0]);
                    self.vocab_parallel_gather(ops[0].0, ops[1].0, rows)
                }
                _ => self.replicated(id, &ops),
            },
            Op::Reduce { axes, keepdim, .. } => {
                let (axis, segs) = split_at(0).expect("split");
                if axes.contains(&axis) {
                    return self.replicated(id, &ops);
                }
                let na = if *keepdim {
                    axis
                } else {
                    axis - axes.iter().filter(|&&a| a < axis).count()
                };
                let nid = self.add(node.op.clone(), &[ops[0].0])?;
                Ok((nid, St::Seg { axis: na, segs }))
            }
            Op::Softmax { .. } | Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let last = node.shape.len() - 1;
                if let St::Seq { axis } = ops[0].1 {
                    // A norm over the last axis is row-local: it runs on the rank's rows.
                    let r = node.shape.len();
                    if axis != last {
                        if let Some(out) = self.seq_op(node.op.clone(), &ops, axis, r)? {
                            return Ok(out);
                        }
                    }
                }
                let ops = self.unseq_all(ops)?;
                let params_rep = ops[1..].iter().all(|o| o.1 == St::Rep);
                match &ops[0].1 {
                    St::Seg { axis, .. }
                        if *axis != last
                            && (params_rep || matches!(node.op, Op::Softmax { .. })) =>
                    {
                        self.elementwise(id, &ops)
                    }
                    _ => self.replicated(id, &ops),
                }
            }
            Op::Attention { .. } => {
                let r = node.shape.len();
                let batch_split = ops[..3].iter().all(|(_, st)| match st {
                    St::Seg { axis, .. } => *axis + 2 < r,
                    St::Rep => true,
                    St::Seq { .. } => false,
                });
                if !batch_split {
                    return self.replicated(id, &ops);
                }
                let (q_src, k_src) = (node.inputs[0], node.inputs[1]);
                let group = transfuse_ir::kv_group(
                    &self.src.node(q_src).shape,
                    &self.src.node(k_src).shape,
                );
                match (group, &ops[0].1) {
                    (Some(g), St::Seg { axis, segs }) if g > 1 && *axis + 3 == r && whole(segs) => {
                        self.gqa_attention(id, &ops, g)
                    }
                    // q, k, v share their batch axes: align them as one broadcast over q's
                    // rank, the mask over the scores' rank (the same rank).
                    _ => self.elementwise(id, &ops),
                }
            }
            // rope(x, cos, sin): elementwise over x's heads; the tables [s, d] are replicated.
            Op::Rope => match &ops[0].1 {
                St::Seg { axis, .. } if *axis + 1 < node.shape.len() => self.elementwise(id, &ops),
                _ => self.replicated(id, &ops),
            },
            Op::GatedMatMul { .. } => self.gated_matmul(id, &ops),
            Op::MatMul | Op::FusedMatMul { .. } => self.matmul(id, &ops),
            _ => self.replicated(id, &ops),
        }
    }

    /// Megatron's vocab-parallel embedding: each rank looks up the ids in its `rows` of the
    /// table, zeroes the rows of ids it does not hold, and an `all_reduce` sums the ranks'
    /// lookups (exact: every id is non-zero on one rank only).
    fn vocab_parallel_gather(
        &mut self,
        table: NodeId,
        ids: NodeId,
        rows: usize,
    ) -> Result<(NodeId, St), ShardError> {
        use transfuse_ir::{BinaryOp, CmpOp, DType, Scalar};
        let konst = |p: &mut Self, v: f64, dtype| {
            p.add(
                Op::Constant {
                    value: Scalar(v),
                    dtype,
                },
                &[],
            )
        };
        // This rank's first row: element 0 of its shard of [0, rows·N).
        let all = self.add(
            Op::Iota {
                start: Dim::known(0),
                len: Dim::known(rows * self.n),
            },
            &[],
        )?;
        let mine = self.add(
            Op::Dist(DistOp::Shard {
                axis: 0,
                world: self.n,
            }),
            &[all],
        )?;
        let first = self.add(
            Op::Slice {
                axis: 0,
                start: Dim::known(0),
                end: Dim::known(1),
            },
            &[mine],
        )?;
        let local = self.add(Op::Binary(BinaryOp::Sub), &[ids, first])?;
        let zero = konst(self, 0.0, DType::I64)?;
        let end = konst(self, rows as f64, DType::I64)?;
        let ge = self.add(Op::Compare(CmpOp::Ge), &[local, zero])?;
        let lt = self.add(Op::Compare(CmpOp::Lt), &[local, end])?;
        let held = self.add(Op::Where, &[ge, lt, ge])?;
        let safe = self.add(Op::Where, &[held, local, zero])?;
        let rows_out = self.add(Op::Gather, &[table, safe])?;
        let mut s = self.shape(ids);
        s.push(Dim::known(1));
        let held = self.add(Op::Reshape { shape: s }, &[held])?;
        let fzero = konst(self, 0.0, DType::F32)?;
        let masked = self.add(Op::Where, &[held, rows_out, fzero])?;
        // Sequence-parallel: reduce-scatter along the sequence instead (Megatron-SP).
        let r = self.shape(masked).len();
        if r >= 2 && self.seq_site(&self.shape(masked)[r - 2])?.is_some() {
            let axis = r - 2;
            let p = self.pad_seq(masked, axis)?;
            let y = self.add(
                Op::Dist(DistOp::ReduceScatter {
                    axis,
                    world: self.n,
                }),
                &[p],
            )?;
            return Ok((y, St::Seq { axis }));
        }
        let sum = self.add(Op::Dist(DistOp::AllReduce), &[masked])?;
        Ok((sum, St::Rep))
    }

    fn reshape(
        &mut self,
        id: NodeId,
        x: NodeId,
        st: &St,
        target: &Shape,
    ) -> Result<Option<(NodeId, St)>, ShardError> {
        let St::Seg { axis, segs } = st else {
            unreachable!("called on split operands")
        };
        if segs.len() != 1 || segs[0].valid != segs[0].len {
            return Ok(None);
        }
        let src = &self.src.node(self.src.node(id).inputs[0]).shape;
        let sig = |dims: &[Dim]| {
            let mut k = 1usize;
            let mut syms: Vec<Dim> = Vec::new();
            for d in dims {
                match d.as_known() {
                    Some(v) => k *= v,
                    None => syms.push(d.clone()),
                }
            }
            syms.sort();
            (k, syms)
        };
        let want = sig(&src[..*axis]);
        let Some(j) = (0..target.len())
            .find(|&j| sig(&target[..j]) == want && target[j].as_known().is_some_and(|v| v > 1))
        else {
            return Ok(None);
        };
        let tj = target[j].as_known().expect("known");
        if !tj.is_multiple_of(self.n) {
            return Err(ShardError::NotDivisible {
                tensor: format!("reshape %{} (from {})", id.index(), shape_string(src)),
                dims: shape_string(target),
                degree: self.n,
                why: format!("axis {j} ({tj}, heads) is not divisible by {}", self.n),
            });
        }
        let mut s = target.clone();
        s[j] = Dim::known(tj / self.n);
        let nid = self.add(Op::Reshape { shape: s }, &[x])?;
        Ok(Some((
            nid,
            St::Seg {
                axis: j,
                segs: vec![Seg {
                    len: tj,
                    split: true,
                    valid: tj,
                }],
            },
        )))
    }

    /// Operand `o` broadcasting into an output of rank `r` in state `out`: as it is, or this
    /// rank's part of it when replicated at full length; `None` when it cannot follow.
    fn fit(&mut self, o: &(NodeId, St), out: &St, r: usize) -> Result<Option<NodeId>, ShardError> {
        let ro = self.shape(o.0).len();
        let want = out_as(out, r, ro);
        if o.1 == want {
            return Ok(Some(o.0));
        }
        if o.1 != St::Rep {
            return Ok(None);
        }
        let St::Seg { axis, segs } = &want else {
            return Ok(Some(o.0));
        };
        if self.shape(o.0)[*axis].is(1) {
            return Ok(Some(o.0));
        }
        if segs.len() == 1 && segs[0].valid == segs[0].len {
            let a = *axis;
            return Ok(Some(self.add(
                Op::Dist(DistOp::Shard {
                    axis: a,
                    world: self.n,
                }),
                &[o.0],
            )?));
        }
        Ok(None)
    }

    /// Grouped-query attention with q split by heads (`g` query heads per key/value head).
    /// K/V split by their heads keep the group (rank `r`'s query heads
    /// `[rH/N, (r+1)H/N)` read exactly its key/value heads `[rK/N, (r+1)K/N)`); replicated K/V
    /// (a degree that does not divide the key/value heads, as TP 3 on 2 heads) are repeated
    /// to the query heads and this rank's part taken, so its group is 1.
    fn gqa_attention(
        &mut self,
        id: NodeId,
        ops: &[(NodeId, St)],
        g: usize,
    ) -> Result<(NodeId, St), ShardError> {
        let r = self.src.node(id).shape.len();
        let mut kv = Vec::new();
        for o in &ops[1..3] {
            match &o.1 {
                St::Seg { axis, segs } if *axis + 3 == r && whole(segs) => kv.push(o.0),
                St::Rep => {
                    let full = self.repeat_kv(o.0, g)?;
                    kv.push(self.add(
                        Op::Dist(DistOp::Shard {
                            axis: r - 3,
                            world: self.n,
                        }),
                        &[full],
                    )?);
                }
                St::Seg { .. } | St::Seq { .. } => return self.replicated(id, ops),
            }
        }
        // q and the mask aligned as one broadcast over the output (the scores' rank).
        let mut qm = vec![ops[0].clone()];
        qm.extend(ops[3..].iter().cloned());
        let Some((ids, st)) = self.align(&qm, r)? else {
            return self.replicated(id, ops);
        };
        let mut all = vec![ids[0], kv[0], kv[1]];
        all.extend(&ids[1..]);
        let op = self.src.node(id).op.clone();
        Ok((self.add(op, &all)?, st))
    }

    /// transformers' `repeat_kv` on a replicated `x [.., kvh, s, d]`: `[.., kvh·g, s, d]`.
    fn repeat_kv(&mut self, x: NodeId, g: usize) -> Result<NodeId, ShardError> {
        let s = self.shape(x);
        let r = s.len();
        let kvh = s[r - 3]
            .as_known()
            .ok_or_else(|| ShardError::Unsupported("key/value heads of unknown count".into()))?;
        let mut one = s[..r - 2].to_vec();
        one.push(Dim::known(1));
        one.extend(s[r - 2..].iter().cloned());
        let y = self.add(Op::Reshape { shape: one.clone() }, &[x])?;
        one[r - 2] = Dim::known(g);
        let y = self.add(Op::Expand { shape: one }, &[y])?;
        let mut out = s.clone();
        out[r - 3] = Dim::known(kvh * g);
        self.add(Op::Reshape { shape: out }, &[y])
    }

    /// `gated_matmul(x, Wg, Wu)`: column-parallel when x is replicated and both weights are
    /// split the same way along their output axis (each rank its part of the MLP width);
    /// anything else runs replicated.
    fn gated_matmul(
        &mut self,
        id: NodeId,
        ops: &[(NodeId, St)],
    ) -> Result<(NodeId, St), ShardError> {
        let r = self.src.node(id).shape.len();
        let rb = self.shape(ops[1].0).len();
        match (&ops[0].1, &ops[1].1, &ops[2].1) {
            (St::Rep, St::Seg { axis: a, segs: sa }, St::Seg { axis: b, segs: sb })
                if *a == rb - 1 && *b == rb - 1 && sa == sb && ops.len() == 3 =>
            {
                let op = self.src.node(id).op.clone();
                let out = St::Seg {
                    axis: r - 1,
                    segs: sa.clone(),
                };
                Ok((self.add(op, &[ops[0].0, ops[1].0, ops[2].0])?, out))
            }
            _ => self.replicated(id, ops),
        }
    }

    fn matmul(&mut self, id: NodeId, ops: &[(NodeId, St)]) -> Result<(NodeId, St), ShardError> {
        let node = self.src.node(id);
        let (act, bias, residual) = match node.op {
            Op::FusedMatMul {
                act,
                bias,
                residual,
            } => (act, bias, residual),
            _ => (transfuse_ir::Act::Identity, false, false),
        };
        let (ra, rb) = (self.shape(ops[0].0).len(), self.shape(ops[1].0).len());
        let r = node.shape.len();
        if let Some(out) = self.seq_row_parallel(id, ops, act)? {
            return Ok(out);
        }
        let ops = &self.unseq_all(ops.to_vec())?[..];
        match (&ops[0].1, &ops[1].1) {
            // Column-parallel: a replicated activation times a column-split weight.
            (St::Rep, St::Seg { axis, segs }) if *axis == rb - 1 => {
                let out = St::Seg {
                    axis: r - 1,
                    segs: segs.clone(),
                };
                // The epilogue operands (bias, residual) must follow the output's split.
                let mut ids = vec![ops[0].0, ops[1].0];
                for o in &ops[2..] {
                    match self.fit(o, &out, r)? {
                        Some(v) => ids.push(v),
                        None => return self.replicated(id, ops),
                    }
                }
                Ok((self.add(node.op.clone(), &ids)?, out))
            }
            // Row-parallel: the contraction axis split the same way on both sides.
            (St::Seg { axis: a, segs: sa }, St::Seg { axis: b, segs: sb })
                if *a == ra - 1 && *b == rb - 2 && sa == sb =>
            {
                let epi_rep = ops[2..].iter().all(|o| o.1 == St::Rep);
                if !epi_rep || act != transfuse_ir::Act::Identity {
                    return self.replicated(id, ops);
                }
                if self.spec.epilogue_before_reduce && (bias || residual) && self.n > 1 {
                    // The epilogue terms on rank 0 only, summed into the partials by the
                    // reduce.
                    let mut ids = vec![ops[0].0, ops[1].0];
                    for o in &ops[2..] {
                        ids.push(self.add(Op::Dist(DistOp::RootOnly), &[o.0])?);
                    }
                    let y = self.add(node.op.clone(), &ids)?;
                    let y = self.add(Op::Dist(DistOp::AllReduce), &[y])?;
                    return Ok((y, St::Rep));
                }
                let mut y = self.add(Op::MatMul, &[ops[0].0, ops[1].0])?;
                y = self.add(Op::Dist(DistOp::AllReduce), &[y])?;
                let mut k = 2;
                if bias {
                    y = self.add(Op::Binary(transfuse_ir::BinaryOp::Add), &[y, ops[k].0])?;
                    k += 1;
                }
                if residual {
                    y = self.add(Op::Binary(transfuse_ir::BinaryOp::Add), &[y, ops[k].0])?;
                }
                Ok((y, St::Rep))
            }
            // Split on a batch axis (heads): an elementwise map over the batch.
            _ => {
                let batch = ops[..2].iter().enumerate().all(|(i, o)| match &o.1 {
                    St::Seg { axis, .. } => *axis + 2 < [ra, rb][i],
                    St::Rep => true,
                    St::Seq { .. } => false,
                });
                if batch {
                    self.elementwise(id, ops)
                } else {
                    self.replicated(id, ops)
                }
            }
        }
    }
}

impl Pass<'_> {
    /// A row-parallel matmul as a Megatron-SP site: the partial sums padded and
    /// reduce-scattered along the sequence (axis `r − 2`), then the bias and the residual
    /// added on the rank's rows. `None` (nothing emitted) when sequence parallelism is off or
    /// the node is not such a site.
    fn seq_row_parallel(
        &mut self,
        id: NodeId,
        ops: &[(NodeId, St)],
        act: transfuse_ir::Act,
    ) -> Result<Option<(NodeId, St)>, ShardError> {
        let node = self.src.node(id);
        let r = node.shape.len();
        let (ra, rb) = (self.shape(ops[0].0).len(), self.shape(ops[1].0).len());
        let row = match (&ops[0].1, &ops[1].1) {
            (St::Seg { axis: a, segs: sa }, St::Seg { axis: b, segs: sb }) => {
                *a == ra - 1 && *b == rb - 2 && sa == sb
            }
            _ => false,
        };
        if !row || act != transfuse_ir::Act::Identity || r < 3 || !self.spec.sequence_parallel {
            return Ok(None);
        }
        let axis = r - 2;
        let len = node.shape[axis].clone();
        if self.seq.as_ref().is_some_and(|(l, _)| *l != len) {
            return Ok(None);
        }
        // Every epilogue operand must join the rows (checked before anything is emitted).
        let seq_known = self.seq.is_some();
        if seq_known {
            for (oid, st) in &ops[2..] {
                let ok = match st {
                    St::Seq { axis: a } => a + r == axis + self.shape(*oid).len(),
                    St::Rep => self.seq_operand(*oid, axis, r).is_some(),
                    St::Seg { .. } => false,
                };
                if !ok {
                    return Ok(None);
                }
            }
        } else if ops[2..].iter().any(|o| o.1 != St::Rep) {
            return Ok(None);
        }
        if self.seq_site(&len)?.is_none() {
            return Ok(None);
        }
        let y = self.add(Op::MatMul, &[ops[0].0, ops[1].0])?;
        let p = self.pad_seq(y, axis)?;
        let mut y = self.add(
            Op::Dist(DistOp::ReduceScatter {
                axis,
                world: self.n,
            }),
            &[p],
        )?;
        for o in &ops[2..] {
            let add = Op::Binary(transfuse_ir::BinaryOp::Add);
            let Some((v, _)) = self.seq_op(add, &[(y, St::Seq { axis }), o.clone()], axis, r)?
            else {
                return Err(ShardError::Unsupported(format!(
                    "node %{}: an epilogue operand cannot join the sequence split",
                    id.index()
                )));
            };
            y = v;
        }
        Ok(Some((y, St::Seq { axis })))
    }
}

/// One split segment covering the whole axis (no padding): a plain contiguous split.
fn whole(segs: &[Seg]) -> bool {
    segs.len() == 1 && segs[0].split && segs[0].valid == segs[0].len
}

/// The state `out` (of rank `r`) as seen by an operand of rank `ro` broadcasting into it.
fn out_as(out: &St, r: usize, ro: usize) -> St {
    match out {
        St::Seg { axis, segs } if axis + ro >= r => St::Seg {
            axis: axis + ro - r,
            segs: segs.clone(),
        },
        _ => St::Rep,
    }
}

/// Bytes the collectives of a sharded graph move per forward, at concrete `bindings`.
///
/// `payload` counts each collective's result once (b·s·h·4 for an all-reduce of the hidden
/// state, the gathered logits for the LM head, a reduce-scatter's full input); `per_rank_ring`
/// what each rank sends over a ring: 2(N−1)/N of the payload for an all-reduce, (N−1)/N for an
/// all-gather or a reduce-scatter; a `send` moves its whole operand over the link. Computed by
/// `transfuse_planner::comm`, the one collective cost model (the planner prices the same
/// collectives with it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommCost {
    /// All-reduce payload bytes.
    pub all_reduce_bytes: u64,
    /// All-gather result bytes.
    pub all_gather_bytes: u64,
    /// Number of all-reduces.
    pub all_reduces: usize,
    /// Number of all-gathers.
    pub all_gathers: usize,
    /// Reduce-scatter input bytes (the full operand, `world` × each rank's result).
    pub reduce_scatter_bytes: u64,
    /// Number of reduce-scatters.
    pub reduce_scatters: usize,
    /// Point-to-point bytes sent (`send`; the matching `recv` moves nothing more).
    pub send_bytes: u64,
    /// Number of sends.
    pub sends: usize,
    /// Bytes each rank sends on a ring (all-reduce, all-gather, reduce-scatter).
    pub per_rank_ring: f64,
    /// Bytes this rank sends point to point (the whole message, over one link).
    pub per_rank_p2p: f64,
}

/// The [`CommCost`] of `g` at `bindings` for `degree` ranks.
pub fn comm_cost(
    g: &Graph,
    bindings: &transfuse_ir::Bindings,
    degree: usize,
) -> Result<CommCost, IrError> {
    let mut c = CommCost::default();
    let n = degree as u64;
    for (_, node) in g.nodes() {
        let Op::Dist(d) = &node.op else { continue };
        let elems: usize = transfuse_ir::eval_shape(&node.shape, bindings)?
            .iter()
            .product();
        let bytes = 4 * elems as u64;
        match d {
            DistOp::AllReduce => {
                c.all_reduces += 1;
                c.all_reduce_bytes += bytes;
                c.per_rank_ring += transfuse_planner::comm::all_reduce_bytes(n, bytes as f64);
            }
            DistOp::AllGather { .. } => {
                c.all_gathers += 1;
                c.all_gather_bytes += bytes;
                c.per_rank_ring += transfuse_planner::comm::all_gather_bytes(n, bytes as f64);
            }
            DistOp::ReduceScatter { .. } => {
                c.reduce_scatters += 1;
                c.reduce_scatter_bytes += bytes * n;
                c.per_rank_ring +=
                    transfuse_planner::comm::reduce_scatter_bytes(n, (bytes * n) as f64);
            }
            DistOp::Send { .. } => {
                c.sends += 1;
                c.send_bytes += bytes;
                c.per_rank_p2p += bytes as f64;
            }
            DistOp::Shard { .. } | DistOp::Recv { .. } | DistOp::RootOnly => {}
        }
    }
    Ok(c)
}

/// The SPMD graph `g` specialised to `rank`: every [`DistOp::RootOnly`] resolved. On rank 0 it
/// is its operand; on the others it is zero, so a fused matmul's bias or residual it feeds is
/// dropped from the epilogue (a fused matmul left with neither, and no activation, is a bare
/// matmul) and any other reader gets zeros of its shape. The rest of the graph is copied as it
/// is, so every rank still runs the same collectives in the same order.
pub fn for_rank(g: &Graph, rank: usize) -> Result<Graph, ShardError> {
    use transfuse_ir::Act;
    if !g.nodes().any(|(_, n)| n.op == Op::Dist(DistOp::RootOnly)) {
        return Ok(g.clone());
    }
    let mut out = Graph::new();
    // Per source node: its node in `out`, or `None` for a root-only zero.
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(g.len());
    let mut zeros: BTreeMap<usize, NodeId> = BTreeMap::new();
    for (id, node) in g.nodes() {
        let op = &node.op;
        if *op == Op::Dist(DistOp::RootOnly) {
            let x = map[node.inputs[0].index()];
            map.push(if rank == 0 { x } else { None });
            continue;
        }
        let mut zero_of = |out: &mut Graph, src: NodeId| -> Result<NodeId, ShardError> {
            if let Some(&z) = zeros.get(&src.index()) {
                return Ok(z);
            }
            let z = zeros_like(out, g.node(src))?;
            zeros.insert(src.index(), z);
            Ok(z)
        };
        let nid = match op {
            Op::FusedMatMul {
                act,
                bias,
                residual,
            } if node.inputs.iter().any(|x| map[x.index()].is_none()) => {
                let (mut bias, mut residual) = (*bias, *residual);
                let mut ins = vec![];
                for (k, x) in node.inputs.iter().enumerate() {
                    match map[x.index()] {
                        Some(v) => ins.push(v),
                        None if k >= 2 => {
                            // Operand 2 is the bias when there is one, the residual last.
                            if k == 2 && bias {
                                bias = false;
                            } else {
                                residual = false;
                            }
                        }
                        None => ins.push(zero_of(&mut out, *x)?),
                    }
                }
                let op = if !bias && !residual && *act == Act::Identity {
                    Op::MatMul
                } else {
                    Op::FusedMatMul {
                        act: *act,
                        bias,
                        residual,
                    }
                };
                out.add(op, &ins)?
            }
            _ => {
                let mut ins = Vec::with_capacity(node.inputs.len());
                for x in &node.inputs {
                    ins.push(match map[x.index()] {
                        Some(v) => v,
                        None => zero_of(&mut out, *x)?,
                    });
                }
                out.add(op.clone(), &ins)?
            }
        };
        debug_assert_eq!(map.len(), id.index());
        map.push(Some(nid));
    }
    for (name, id) in g.outputs() {
        let v = match map[id.index()] {
            Some(v) => v,
            None => zeros_like(&mut out, g.node(*id))?,
        };
        out.set_output(name, v);
    }
    Ok(out)
}

/// Zeros of `n`'s shape and type (from an `iota`, not a constant: weight folding would fold a
/// constant expanded to symbolic dims before they are bound).
fn zeros_like(out: &mut Graph, n: &transfuse_ir::Node) -> Result<NodeId, ShardError> {
    let zero = out.add(
        Op::Iota {
            start: Dim::known(0),
            len: Dim::known(1),
        },
        &[],
    )?;
    let zero = out.add(Op::Cast { dtype: n.dtype }, &[zero])?;
    Ok(out.add(
        Op::Expand {
            shape: n.shape.clone(),
        },
        &[zero],
    )?)
}

/// `g` with each residual add that follows a matmul taken into the matmul's epilogue:
/// `add(x @ w [+ b], r)` → `fused_matmul{residual}(x, w [, b], r)` when the matmul (plain, or
/// fused with no activation and no residual) is read by that add only, and `r` is an f32
/// activation of the output's shape. The optimizer's `matmul-residual` rule does this only for
/// a matmul that already has an epilogue (a bias), so LLaMA's bias-free output and down
/// projections still end in a separate add; a row-parallel site needs the residual in its
/// node to choose where it goes ([`ShardSpec::epilogue_before_reduce`]). Exact: the same
/// additions, the sum's operands swapped.
pub fn absorb_residuals(g: &Graph) -> Result<Graph, ShardError> {
    use transfuse_ir::{Act, BinaryOp, DType};
    let mut uses = vec![0usize; g.len()];
    for (_, n) in g.nodes() {
        for x in &n.inputs {
            uses[x.index()] += 1;
        }
    }
    for (_, id) in g.outputs() {
        uses[id.index()] += 1;
    }
    let epilogue_free = |n: &transfuse_ir::Node| match n.op {
        Op::MatMul => Some(false),
        Op::FusedMatMul {
            act: Act::Identity,
            bias,
            residual: false,
        } => Some(bias),
        _ => None,
    };
    // Per add: (the matmul it absorbs, its residual operand).
    let mut absorbs: BTreeMap<usize, (NodeId, NodeId)> = BTreeMap::new();
    let mut absorbed = BTreeSet::new();
    for (id, n) in g.nodes() {
        if n.op != Op::Binary(BinaryOp::Add) || n.dtype != DType::F32 {
            continue;
        }
        for (m, r) in [(n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])] {
            let (mn, rn) = (g.node(m), g.node(r));
            if epilogue_free(mn).is_some()
                && uses[m.index()] == 1
                && m != r
                && mn.shape == n.shape
                && rn.shape == n.shape
                && rn.dtype == DType::F32
                && !matches!(rn.op, Op::Weight { .. } | Op::Constant { .. })
            {
                absorbs.insert(id.index(), (m, r));
                absorbed.insert(m.index());
                break;
            }
        }
    }
    if absorbs.is_empty() {
        return Ok(g.clone());
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; g.len()];
    for (id, n) in g.nodes() {
        if absorbed.contains(&id.index()) {
            continue;
        }
        let nid = match absorbs.get(&id.index()) {
            Some(&(m, r)) => {
                let mn = g.node(m);
                let bias = epilogue_free(mn).expect("checked");
                let mut ins: Vec<NodeId> = mn
                    .inputs
                    .iter()
                    .map(|x| map[x.index()].expect("operands precede users"))
                    .collect();
                ins.push(map[r.index()].expect("operands precede users"));
                out.add(
                    Op::FusedMatMul {
                        act: Act::Identity,
                        bias,
                        residual: true,
                    },
                    &ins,
                )?
            }
            None => {
                let ins: Vec<NodeId> = n
                    .inputs
                    .iter()
                    .map(|x| map[x.index()].expect("operands precede users"))
                    .collect();
                out.add(n.op.clone(), &ins)?
            }
        };
        map[id.index()] = Some(nid);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, map[id.index()].expect("outputs are nodes"));
    }
    Ok(out)
}
