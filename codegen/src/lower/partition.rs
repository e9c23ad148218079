//! The partitioning driver: visits the optimized graph's nodes in topological order and makes
//! each a buffer (inputs, weights, kernel outputs), a view of a buffer (reshape, permute,
//! expand, slice), an inlined expression (a single-use elementwise op feeding an elementwise op
//! or a reduction, scalar constants, gathers, iota) or a kernel ([`super::cluster`],
//! [`super::ops`]); then names each graph output's buffer (the kernel's own when the output is
//! all of it, else a copy) and orders the kernels, prepare phase first. Buffers are [`BufId`]s
//! of one table until the plan is finished, when bindings get their names.

use std::collections::HashMap;

use transfuse_ir::{inlines_into, Act, DType, Dim, Graph, KernelRole, NodeId, Op, Shape};

use super::buffers::{BufId, BufferTable};
use super::cluster::{GatherSrc, Ids, Leaf, Tree};
use super::kernel::Kb;
use super::plan::{index_overflow, *};
use super::tuning::Tuning;
use super::{place, View};
use crate::kir::*;
use crate::CodegenError;

/// What a node has become.
#[derive(Clone, Debug)]
pub(super) enum Val {
    View(View),
    /// A reshape no strides express: `base`'s elements in row-major order, with `shape`.
    Linear {
        base: View,
        shape: Shape,
    },
    Scalar(f64, DType),
    Tree(Tree),
    Gather(GatherSrc),
    Iota {
        start: Dim,
        len: Dim,
    },
}

/// An elementwise op (its [`transfuse_ir::KernelRole`]): inlined or a cluster's root.
pub(super) fn is_ew(op: &Op) -> bool {
    op.kernel_role() == KernelRole::Elementwise
}

pub(super) struct Lower<'a> {
    pub(super) g: &'a Graph,
    pub(super) o: &'a LowerOptions,
    pub(super) weight_only: Vec<bool>,
    pub(super) inline: Vec<bool>,
    pub(super) vals: Vec<Option<Val>>,
    pub(super) done: Vec<bool>,
    pub(super) buffers: BufferTable,
    /// Kernels in emission order (prepare and forward mixed).
    pub(super) kernels: Vec<PlanKernel>,
    pub(super) aliases: Vec<Alias>,
    /// Buffer → index of the kernel that writes it.
    pub(super) producer: HashMap<BufId, usize>,
    /// Matmul kernels (by index) and what [`place`] needs to know of them.
    pub(super) matmuls: HashMap<usize, place::MatMulInfo>,
    /// How template tunables are chosen ([`super::tuning`]).
    pub(super) tuning: &'a Tuning<'a>,
    /// Appendable caches ([`PlanCache`]) by the concat node that is their output: the input
    /// node, the output name and, once the input is lowered, the cache buffer.
    pub(super) caches: HashMap<NodeId, CacheSite>,
}

/// A cache concat found before lowering (see [`find_caches`]).
#[derive(Clone, Debug)]
pub(super) struct CacheSite {
    pub(super) input: NodeId,
    pub(super) output: String,
    pub(super) axis: usize,
    pub(super) buf: Option<BufId>,
}

/// Graph outputs `concat(input, new)` (two parts) whose first part is a graph input read by
/// nothing else, of a float type, output once, its length along the axis symbolic and sharing
/// no symbol with the new part's (`past` against `seq`): each becomes one appendable cache
/// buffer.
fn find_caches(g: &Graph, uses: &[usize]) -> HashMap<NodeId, CacheSite> {
    let mut out = HashMap::new();
    let outs = g.outputs();
    for (name, id) in outs {
        let n = g.node(*id);
        let Op::Concat { axis } = n.op else { continue };
        if n.inputs.len() != 2
            || n.dtype != DType::F32
            || outs.iter().filter(|(_, o)| o == id).count() != 1
        {
            continue;
        }
        let input = n.inputs[0];
        if !matches!(g.node(input).op, Op::Input { .. }) || uses[input.index()] != 1 {
            continue;
        }
        // A cache's past length is its own symbol (`past`), not the new part's (`seq`): a
        // concatenation of two inputs of one length is no cache.
        let (pd, nd) = (&g.node(input).shape[axis], &g.node(n.inputs[1]).shape[axis]);
        if pd.as_known().is_some() || pd.symbols().any(|s| nd.symbols().any(|t| t == s)) {
            continue;
        }
        out.insert(
            *id,
            CacheSite {
                input,
                output: name.clone(),
                axis,
                buf: None,
            },
        );
    }
    out
}

impl<'a> Lower<'a> {
    pub(super) fn unsupported(&self, id: NodeId, msg: impl Into<String>) -> CodegenError {
        CodegenError::Unsupported {
            op: self.g.node(id).op.name(),
            node: id.0,
            msg: msg.into(),
        }
    }

    pub(super) fn elem_of(&self, d: DType) -> Elem {
        match d {
            // Graph tensors are never f16/bf16 (inference refuses them): all floats are stored
            // as the plan's storage type.
            DType::F32 | DType::F16 | DType::BF16 => self.o.elem,
            DType::I64 => Elem::I32,
            DType::Bool => Elem::U32,
        }
    }

    pub(super) fn buf_elem(&self, buf: BufId) -> Elem {
        self.buffers.get(buf).elem
    }

    pub(super) fn add_buffer(
        &mut self,
        name: String,
        dtype: DType,
        shape: Shape,
        kind: BufferKind,
    ) -> View {
        let elem = self.elem_of(dtype);
        let id = self.buffers.add(name, elem, dtype, shape.clone(), kind);
        View::contiguous(id, &shape)
    }

    /// The output buffer of node `id`'s kernel.
    pub(super) fn out_buffer(&mut self, id: NodeId) -> View {
        let n = self.g.node(id);
        let (name, kind) = if self.weight_only[id.index()] {
            (format!("w{}", id.0), BufferKind::Derived)
        } else {
            (format!("t{}", id.0), BufferKind::Temp)
        };
        self.add_buffer(name, n.dtype, n.shape.clone(), kind)
    }

    pub(super) fn const_buffer(&mut self, id: NodeId, v: f64, dtype: DType) -> View {
        let name = format!("c{}_{}", id.0, self.buffers.len());
        self.add_buffer(name, dtype, vec![], BufferKind::Const(v))
    }

    /// Node `id` as a view of a buffer, materialising it if needed.
    pub(super) fn view_of(&mut self, id: NodeId) -> Result<View, CodegenError> {
        let val = self.vals[id.index()]
            .clone()
            .expect("operands precede users");
        let shape = self.g.node(id).shape.clone();
        let v = match val {
            Val::View(v) => return Ok(v),
            Val::Scalar(c, d) => {
                let v = self.const_buffer(id, c, d);
                return Ok(v.expand(&shape).expect("scalars broadcast"));
            }
            Val::Tree(t) => self.cluster(vec![id], &t, id)?,
            Val::Gather(gs) => {
                let d = self.g.node(id).dtype;
                self.cluster(vec![id], &Tree::Leaf(Leaf::Gather(Box::new(gs), d)), id)?
            }
            Val::Iota { start, len } => self.iota(id, &start, &len)?,
            Val::Linear { base, shape } => {
                let d = self.g.node(id).dtype;
                self.cluster(vec![id], &Tree::Leaf(Leaf::Linear(base, shape, d)), id)?
            }
        };
        self.vals[id.index()] = Some(Val::View(v.clone()));
        Ok(v)
    }

    /// Node `id` as an expression operand.
    pub(super) fn tree_of(&self, id: NodeId) -> Tree {
        let d = self.g.node(id).dtype;
        match self.vals[id.index()]
            .clone()
            .expect("operands precede users")
        {
            Val::View(v) => Tree::Leaf(Leaf::View(v, d)),
            Val::Scalar(c, d) => Tree::Const(c, d),
            Val::Tree(t) => t,
            Val::Gather(g) => Tree::Leaf(Leaf::Gather(Box::new(g), d)),
            Val::Iota { start, len } => Tree::Leaf(Leaf::Iota { start, len }),
            Val::Linear { base, shape } => Tree::Leaf(Leaf::Linear(base, shape, d)),
        }
    }

    /// Node `id` for a consumer that reads it through a load remap in row-major order: a view,
    /// or the view a non-strided reshape reorders.
    pub(super) fn lin_of(&mut self, id: NodeId) -> Result<View, CodegenError> {
        match self.vals[id.index()].clone() {
            Some(Val::Linear { base, .. }) => Ok(base),
            _ => self.view_of(id),
        }
    }

    /// Node `id` as a view if it is one already or a chain of view ops over views (no kernel).
    pub(super) fn try_view(&self, id: NodeId) -> Option<View> {
        match &self.vals[id.index()] {
            Some(Val::View(v)) => return Some(v.clone()),
            Some(_) => return None,
            None => {}
        }
        let n = self.g.node(id);
        let x = || self.try_view(n.inputs[0]);
        match &n.op {
            Op::Reshape { shape } => x()?.reshape(shape),
            Op::Permute { perm } => Some(x()?.permute(perm)),
            Op::Expand { shape } => x()?.expand(shape),
            Op::Slice { axis, start, end } => Some(x()?.slice(*axis, start, end)),
            _ => None,
        }
    }

    pub(super) fn push(&mut self, kb: Kb, base: &str) -> Result<(), CodegenError> {
        self.push_with(kb, base, None)
    }

    /// [`Self::push`] with a decode variant (already finished).
    pub(super) fn push_with(
        &mut self,
        mut kb: Kb,
        base: &str,
        decode: Option<Box<Variant>>,
    ) -> Result<(), CodegenError> {
        let (bindings, uniforms) = kb.finish(base)?;
        let phase = if kb.nodes.iter().all(|n| self.weight_only[n.index()]) {
            Phase::Prepare
        } else {
            Phase::Forward
        };
        let ops = kb.nodes.iter().map(|n| self.g.node(*n).op.name()).collect();
        for (b, buf) in kb.gen.kernel.buffers.iter().zip(&bindings) {
            if b.access == Access::ReadWrite {
                self.producer.insert(*buf, self.kernels.len());
            }
        }
        self.kernels.push(PlanKernel {
            gen: kb.gen,
            nodes: kb.nodes,
            ops,
            bindings: vec![],
            buffer_ids: bindings,
            uniforms,
            phase,
            bytes: kb.bytes,
            flops: kb.flops,
            decode,
            only_when: None,
            only_split: None,
        });
        Ok(())
    }
    pub(super) fn node(&mut self, id: NodeId) -> Result<(), CodegenError> {
        if self.done[id.index()] {
            return Ok(());
        }
        let n = self.g.node(id);
        let op = n.op.clone();
        let ins = n.inputs.clone();
        let (shape, dtype) = (n.shape.clone(), n.dtype);
        let val = match &op {
            Op::Input { name, .. } => {
                let cache = self
                    .caches
                    .iter()
                    .find(|(_, c)| c.input == id)
                    .map(|(k, c)| (*k, c.output.clone(), c.axis));
                match cache {
                    // The cache buffer: the input's shape with `kv_cap` rows; the input is its
                    // first rows.
                    Some((concat, output, axis)) => {
                        let mut full = shape.clone();
                        full[axis] = Dim::sym(CACHE_CAP);
                        let v = self.add_buffer(output, dtype, full, BufferKind::Cache);
                        self.caches.get_mut(&concat).expect("found").buf = Some(v.buf);
                        Val::View(v.slice(axis, &Dim::from(0), &shape[axis]))
                    }
                    None => {
                        Val::View(self.add_buffer(name.clone(), dtype, shape, BufferKind::Input))
                    }
                }
            }
            Op::Weight { name, .. } => {
                Val::View(self.add_buffer(name.clone(), dtype, shape, BufferKind::Weight))
            }
            Op::Constant { value, dtype } => Val::Scalar(value.0, *dtype),
            Op::Iota { start, len } => Val::Iota {
                start: start.clone(),
                len: len.clone(),
            },
            Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => {
                if let Some(Val::Scalar(c, d)) = self.vals[ins[0].index()] {
                    if !matches!(op, Op::Slice { .. }) {
                        self.vals[id.index()] = Some(Val::Scalar(c, d));
                        return Ok(());
                    }
                }
                if let Op::Reshape { shape } = &op {
                    let x = match self.vals[ins[0].index()].clone() {
                        Some(Val::Linear { base, .. }) => base,
                        _ => self.view_of(ins[0])?,
                    };
                    let (val, view, strided) = match x.reshape(shape) {
                        Some(v) => (Val::View(v.clone()), v, true),
                        // Not a strided view: remap readers use `x`'s order, others copy.
                        None => (
                            Val::Linear {
                                base: x.clone(),
                                shape: shape.clone(),
                            },
                            x,
                            false,
                        ),
                    };
                    self.aliases.push(Alias {
                        node: id,
                        shape: shape.clone(),
                        view,
                        strided,
                    });
                    self.vals[id.index()] = Some(val);
                    return Ok(());
                }
                let x = self.view_of(ins[0])?;
                let v = match &op {
                    Op::Permute { perm } => x.permute(perm),
                    Op::Expand { shape } => x.expand(shape).expect("inference checked expand"),
                    Op::Slice { axis, start, end } => x.slice(*axis, start, end),
                    _ => unreachable!(),
                };
                self.aliases.push(Alias {
                    node: id,
                    shape: v.shape.clone(),
                    view: v.clone(),
                    strided: true,
                });
                Val::View(v)
            }
            op if is_ew(op) => {
                let t: Vec<Tree> = ins.iter().map(|i| self.tree_of(*i)).collect();
                let b = |t: &Tree| Box::new(t.clone());
                let tree = match op {
                    Op::Unary(u) => Tree::Un(*u, b(&t[0]), dtype),
                    Op::Binary(o) => Tree::Bin(*o, b(&t[0]), b(&t[1]), dtype),
                    Op::Compare(c) => Tree::Cmp(*c, b(&t[0]), b(&t[1])),
                    Op::Where => Tree::Where(b(&t[0]), b(&t[1]), b(&t[2]), dtype),
                    Op::Cast { dtype } => Tree::Cast(*dtype, b(&t[0])),
                    _ => unreachable!(),
                };
                if self.inline[id.index()] {
                    Val::Tree(tree)
                } else {
                    let mut nodes: Vec<NodeId> = vec![];
                    self.inlined_into(id, &mut nodes);
                    Val::View(self.cluster(nodes, &tree, id)?)
                }
            }
            Op::Gather => {
                let table = self.view_of(ins[0])?;
                let ids = match self.vals[ins[1].index()].clone() {
                    Some(Val::Iota { start, .. }) => Ids::Iota { start },
                    _ => Ids::View(self.view_of(ins[1])?),
                };
                Val::Gather(GatherSrc {
                    table,
                    ids,
                    ids_shape: self.g.node(ins[1]).shape.clone(),
                    shape,
                })
            }
            Op::Reduce { op: r, axes, .. } => Val::View(self.reduce(id, *r, axes)?),
            Op::MatMul => Val::View(self.matmul(id, Act::Identity, false, false, false)?),
            op if op.is_fused() => Val::View(self.fused(id, op)?),
            Op::Concat { axis } => return self.concat(id, *axis),
            op => return Err(self.unsupported(id, format!("no kernel for `{}`", op.name()))),
        };
        self.vals[id.index()] = Some(val);
        Ok(())
    }

    /// `id` and the producers inlined into it (transitively), in node order.
    pub(super) fn inlined_into(&self, id: NodeId, out: &mut Vec<NodeId>) {
        for i in &self.g.node(id).inputs {
            if self.inline[i.index()] {
                self.inlined_into(*i, out);
            }
        }
        out.push(id);
        out.sort_unstable();
        out.dedup();
    }
}

/// Lowers an optimized graph to a launch plan (see the module docs).
pub fn lower(g: &Graph, opts: &LowerOptions) -> Result<Plan, CodegenError> {
    lower_tuned(g, opts, &Tuning::default())
}

/// [`lower`] with the template tunables chosen by `tuning` (shape-aware defaults at its dims,
/// its chooser's points); the sites it saw are recorded in it ([`Tuning::sites`]).
pub fn lower_tuned(
    g: &Graph,
    opts: &LowerOptions,
    tuning: &Tuning<'_>,
) -> Result<Plan, CodegenError> {
    if !matches!(opts.elem, Elem::F32 | Elem::F16 | Elem::BF16) {
        return Err(plan_err(format!(
            "float storage must be f32, f16 or bf16, not {:?}",
            opts.elem
        )));
    }
    if opts.target == Target::Wgsl && opts.elem == Elem::BF16 {
        return Err(plan_err(
            "bf16 storage is CUDA only (WGSL has no bf16 type); use f16 or f32 for wgsl",
        ));
    }
    let len = g.len();
    let uses = g.use_counts();
    let mut users: Vec<Vec<NodeId>> = vec![vec![]; len];
    let mut weight_only = vec![false; len];
    for (id, n) in g.nodes() {
        for i in &n.inputs {
            users[i.index()].push(id);
        }
        weight_only[id.index()] = match n.op {
            Op::Weight { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Iota { .. } => false,
            _ => n.inputs.iter().all(|i| weight_only[i.index()]),
        };
    }
    let mut is_output = vec![false; len];
    for (_, o) in g.outputs() {
        is_output[o.index()] = true;
    }
    let inline = (0..len)
        .map(|i| {
            let n = g.node(NodeId(i as u32));
            uses[i] == 1
                && !is_output[i]
                && users[i].len() == 1
                && inlines_into(&n.op, &g.node(users[i][0]).op)
        })
        .collect();
    let mut l = Lower {
        g,
        o: opts,
        weight_only,
        inline,
        vals: vec![None; len],
        done: vec![false; len],
        buffers: BufferTable::default(),
        kernels: vec![],
        aliases: vec![],
        producer: HashMap::new(),
        matmuls: HashMap::new(),
        tuning,
        caches: find_caches(g, &uses),
    };
    // Inputs and weights first, so a concat can take over a later one's operands.
    for (id, n) in g.nodes() {
        if matches!(n.op, Op::Input { .. } | Op::Weight { .. }) {
            l.node(id)?;
            l.done[id.index()] = true;
        }
    }
    for (id, _) in g.nodes() {
        l.node(id)?;
    }
    // Outputs: a kernel's own buffer, when the output is all of it and no other output has
    // taken it, is named after the output; anything else is copied into a buffer of its own.
    let mut outputs = vec![];
    for (name, id) in g.outputs() {
        if let Some(buf) = l.caches.get(id).and_then(|c| c.buf) {
            // Written in place by the concat; the buffer already has the output's name.
            outputs.push(PlanIo {
                name: name.clone(),
                buffer: l.buffers.get(buf).name.clone(),
                shape: g.node(*id).shape.clone(),
                dtype: g.node(*id).dtype,
            });
            continue;
        }
        if l.buffers.find(name).is_some() {
            return Err(plan_err(format!(
                "output `{name}` has the name of another buffer"
            )));
        }
        let v = l.view_of(*id)?;
        let n = g.node(*id);
        let own = l.buffers.get(v.buf);
        let buf = if own.kind == BufferKind::Temp && own.len() == v.len() && v.is_plain() {
            v.buf
        } else {
            let t = Tree::Leaf(Leaf::View(v, n.dtype));
            l.cluster(vec![*id], &t, *id)?.buf
        };
        let b = l.buffers.get_mut(buf);
        b.name = name.clone();
        b.kind = BufferKind::Output;
        outputs.push(PlanIo {
            name: name.clone(),
            buffer: name.clone(),
            shape: n.shape.clone(),
            dtype: n.dtype,
        });
    }
    let io = |kind: BufferKind| -> Vec<PlanIo> {
        l.buffers
            .iter()
            .filter(|b| b.kind == kind)
            .map(|b| PlanIo {
                name: b.name.clone(),
                buffer: b.name.clone(),
                shape: b.shape.clone(),
                dtype: b.dtype,
            })
            .collect()
    };
    let weights = io(BufferKind::Weight);
    // Inputs in buffer order, a cache's input named after the graph input.
    let mut caches: Vec<PlanCache> = vec![];
    let mut inputs = vec![];
    for b in l.buffers.iter() {
        match b.kind {
            BufferKind::Input => inputs.push(PlanIo {
                name: b.name.clone(),
                buffer: b.name.clone(),
                shape: b.shape.clone(),
                dtype: b.dtype,
            }),
            BufferKind::Cache => {
                let c = l
                    .caches
                    .values()
                    .find(|c| c.buf.is_some_and(|x| l.buffers.get(x).name == b.name))
                    .expect("a cache buffer has its site");
                let n = g.node(c.input);
                let Op::Input { name, .. } = &n.op else {
                    unreachable!("cache inputs are inputs")
                };
                inputs.push(PlanIo {
                    name: name.clone(),
                    buffer: b.name.clone(),
                    shape: n.shape.clone(),
                    dtype: n.dtype,
                });
                caches.push(PlanCache {
                    input: name.clone(),
                    output: c.output.clone(),
                    buffer: b.name.clone(),
                    axis: c.axis,
                });
            }
            _ => {}
        }
    }
    // Constant sizes the kernels' 32-bit indices cannot reach fail now, not at the first launch.
    for k in &l.kernels {
        let variant = k.decode.as_deref().map(|v| (&v.gen.kernel, &v.buffer_ids));
        for (kernel, ids) in std::iter::once((&k.gen.kernel, &k.buffer_ids)).chain(variant) {
            for &id in ids {
                let b = l.buffers.get(id);
                if let Some(n) = b.len().as_const().filter(|&n| n > i64::from(u32::MAX)) {
                    let max = u128::from(u32::MAX);
                    return Err(index_overflow(&b.name, n, &kernel.name, max, false));
                }
            }
        }
    }
    // Bindings get their names now that every name is final; the prepare phase goes first.
    let (prepare, forward): (Vec<_>, Vec<_>) = l
        .kernels
        .into_iter()
        .partition(|k| k.phase == Phase::Prepare);
    let kernels = prepare
        .into_iter()
        .chain(forward)
        .map(|mut k| {
            l.buffers.name_bindings(&mut k);
            k
        })
        .collect();
    Ok(Plan {
        target: opts.target,
        elem: opts.elem,
        buffers: l.buffers.into_vec(),
        aliases: l.aliases,
        kernels,
        inputs,
        weights,
        outputs,
        caches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::Poly;
    use transfuse_ir::{Bindings, Builder, Scalar};

    /// One causal, masked attention `[b, 2, sq, 8]` against `[b, 2, sk, 8]` keys.
    fn attention_graph(sq: Dim) -> Graph {
        let mut b = Builder::new();
        let q = b
            .input(
                "q",
                vec![Dim::sym("b"), 2.into(), sq.clone(), 8.into()],
                DType::F32,
            )
            .unwrap();
        let kv = vec![Dim::sym("b"), 2.into(), Dim::sym("t"), 8.into()];
        let k = b.input("k", kv.clone(), DType::F32).unwrap();
        let v = b.input("v", kv, DType::F32).unwrap();
        let m = b
            .input(
                "m",
                vec![Dim::sym("b"), 1.into(), sq, Dim::sym("t")],
                DType::F32,
            )
            .unwrap();
        let o = b
            .op(
                Op::Attention {
                    scale: Scalar(0.25),
                    causal: true,
                    window: None,
                },
                &[q, k, v, m],
            )
            .unwrap();
        b.output("o", o);
        b.finish()
    }

    fn dims(v: &[(&str, usize)]) -> Bindings {
        v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
    }

    fn lowered(sq: Dim) -> Plan {
        lower(
            &attention_graph(sq),
            &LowerOptions::new(Target::Wgsl, Elem::F32),
        )
        .unwrap()
    }

    /// `x [s, k] @ w [k, n]`, lowered at `s = 16` for a GPU or a CPU adapter.
    fn thin_plan(k: usize, n: usize, kind: crate::kernels::DeviceKind) -> Plan {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("s"), k.into()], DType::F32)
            .unwrap();
        let w = b.weight("w", vec![k.into(), n.into()]).unwrap();
        let y = b.matmul(x, w).unwrap();
        b.output("y", y);
        let mut opts = LowerOptions::new(Target::Wgsl, Elem::F32);
        opts.limits = opts.limits.with_kind(kind);
        let t = crate::lower::tuning::Tuning::at(dims(&[("s", 16)]), None);
        lower_tuned(&b.finish(), &opts, &t).unwrap()
    }

    fn tunable(g: &crate::kernels::Generated, name: &str) -> Option<u32> {
        g.tunables.iter().find(|t| t.name == name).map(|t| t.value)
    }

    #[test]
    fn thin_products_take_one_row_register_blocks_on_cpu_adapters_only() {
        use crate::kernels::DeviceKind;
        // A CPU adapter, vec4-aligned k and n: the one-row variant is the register matmul
        // (no shared memory, one row per block), still named as the GEMV variant.
        let plan = thin_plan(64, 48, DeviceKind::Cpu);
        let v = plan.kernels[0]
            .decode
            .as_deref()
            .expect("a one-row variant");
        assert!(
            v.gen.kernel.name.starts_with("gemv_f32_"),
            "{}",
            v.gen.kernel.name
        );
        assert!(v.gen.kernel.shared.is_empty());
        assert_eq!(tunable(&v.gen, "reg"), Some(1));
        assert_eq!(tunable(&v.gen, "rm"), Some(1));
        // k not a multiple of 4: the GEMV (lanes over k, reduced in shared memory).
        let plan = thin_plan(50, 48, DeviceKind::Cpu);
        let v = plan.kernels[0]
            .decode
            .as_deref()
            .expect("a one-row variant");
        assert!(!v.gen.kernel.shared.is_empty());
        assert!(tunable(&v.gen, "threads").is_some());
        // A GPU: the GEMV.
        let plan = thin_plan(64, 48, DeviceKind::Gpu);
        let v = plan.kernels[0]
            .decode
            .as_deref()
            .expect("a one-row variant");
        assert!(!v.gen.kernel.shared.is_empty());
        assert_eq!(tunable(&v.gen, "reg"), None);
    }

    /// `x [h, s, d]` permuted to `[s, h, d]`, merged to `[s, h·d]` (attention's output as the
    /// output projection reads it), `@ w [h·d, n]`, lowered at `s = 16` on a CPU adapter.
    fn merged_heads_plan(h: usize, d: usize, n: usize) -> Plan {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![h.into(), Dim::sym("s"), d.into()], DType::F32)
            .unwrap();
        let p = b.permute(x, &[1, 0, 2]).unwrap();
        let m = b.reshape(p, vec![Dim::sym("s"), (h * d).into()]).unwrap();
        let w = b.weight("w", vec![(h * d).into(), n.into()]).unwrap();
        let y = b.matmul(m, w).unwrap();
        b.output("y", y);
        let mut opts = LowerOptions::new(Target::Wgsl, Elem::F32);
        opts.limits = opts.limits.with_kind(crate::kernels::DeviceKind::Cpu);
        let t = crate::lower::tuning::Tuning::at(dims(&[("s", 16)]), None);
        lower_tuned(&b.finish(), &opts, &t).unwrap()
    }

    #[test]
    fn merged_heads_take_the_register_matmul_when_head_runs_are_whole_vectors() {
        // Runs of d = 8 contiguous elements: vec4 loads stay whole, so the register design.
        let plan = merged_heads_plan(3, 8, 52);
        let k = plan.kernels.last().unwrap();
        assert_eq!(tunable(&k.gen, "reg"), Some(1), "{}", k.entry());
        // With 8-lane subgroups (llvmpipe): the broadcast register design.
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("s"), 64.into()], DType::F32)
            .unwrap();
        let w = b.weight("w", vec![64.into(), 128.into()]).unwrap();
        let y = b.matmul(x, w).unwrap();
        b.output("y", y);
        let mut opts = LowerOptions::new(Target::Wgsl, Elem::F32);
        opts.limits = opts.limits.with_kind(crate::kernels::DeviceKind::Cpu);
        opts.limits.subgroup_min = 8;
        let t = crate::lower::tuning::Tuning::at(dims(&[("s", 16)]), None);
        let p8 = lower_tuned(&b.finish(), &opts, &t).unwrap();
        assert_eq!(tunable(&p8.kernels[0].gen, "reg"), Some(2));
        // Runs of d = 6: a vec4 would straddle two heads, so the tiled design.
        let plan = merged_heads_plan(3, 6, 52);
        let k = plan.kernels.last().unwrap();
        assert_eq!(tunable(&k.gen, "reg"), Some(0), "{}", k.entry());
    }

    #[test]
    fn a_symbolic_query_length_gets_a_decode_variant() {
        let plan = lowered(Dim::sym("s"));
        // The attention and the split-KV decode's combine, launched only for one query row.
        assert_eq!(plan.kernels.len(), 2);
        let k = &plan.kernels[0];
        assert!(k.entry().starts_with("attention_f32_d8_causal_mask_s"));
        let v = k.decode.as_deref().expect("a decode variant");
        assert!(
            v.gen
                .kernel
                .name
                .starts_with("attention_split_f32_d8_causal_mask_s"),
            "{}",
            v.gen.kernel.name
        );
        assert_eq!(v.when_one, Poly::sym("s"));
        // The variant writes the split partials; the combine writes the output.
        let c = &plan.kernels[1];
        assert!(c
            .entry()
            .starts_with("attention_combine_f32_d8_causal_mask_s"));
        assert_eq!(c.only_when, Some(Poly::sym("s")));
        assert!(c.bindings.contains(&"o".to_string()));
        assert!(k.bindings.contains(&"o".to_string()));
        let part = v
            .bindings
            .iter()
            .find(|b| b.ends_with("_split"))
            .expect("partials");
        assert!(c.bindings.contains(part));
        assert_eq!(v.uniforms.len(), v.gen.kernel.uniforms.len());
        let one = dims(&[("b", 3), ("s", 1), ("t", 9)]);
        let five = dims(&[("b", 3), ("s", 5), ("t", 9)]);
        assert!(plan.use_decode(0, &one).unwrap());
        assert!(!plan.use_decode(0, &five).unwrap());
        assert!(plan.use_decode(0, &dims(&[("b", 3)])).is_err());
        assert!(!plan.use_decode(1, &one).unwrap());
        assert!(plan.use_decode(2, &one).is_err());
        // The combine: only for one query row, and only when the keys are split (9 keys are
        // one split on a GPU, whose splits have at least 64 keys: the variant writes `o`).
        let long = dims(&[("b", 3), ("s", 1), ("t", 300)]);
        assert!(!plan.launched_at(1, &one).unwrap());
        assert!(plan.launched_at(1, &long).unwrap());
        assert!(!plan
            .launched_at(1, &dims(&[("b", 3), ("s", 5), ("t", 300)]))
            .unwrap());
        assert!(!plan.launched_at(1, &five).unwrap());
        assert!(matches!(c.only_split, Some(UniformExpr::Split { .. })));
        assert!(v.bindings.contains(&"o".to_string()));
        // The decode grid: one workgroup per (key split, batch·head); 9 keys are one split.
        let (du, dg) = plan.launch_args_for(0, true, &one).unwrap();
        assert_eq!(dg, [1, 6, 1]);
        assert_eq!(du.len(), v.uniforms.len());
        assert_eq!(plan.launch_args(1, &one).unwrap().1, [1, 6, 1]);
        assert_eq!(
            plan.launch_args(0, &five).unwrap(),
            plan.launch_args_for(0, false, &five).unwrap()
        );
        let j = plan.to_json(Some(&one));
        assert_eq!(j["kernels"][0]["decode"], v.gen.kernel.name.as_str());
        assert_eq!(
            j["kernels"][0]["decode_file"],
            format!("00_{}.wgsl", v.gen.kernel.name)
        );
        assert_eq!(j["kernels"][0]["decode_at"], true);
        assert_eq!(plan.to_json(Some(&five))["kernels"][0]["decode_at"], false);
    }

    #[test]
    fn a_query_length_of_one_is_the_split_decode_itself_and_other_constants_flash() {
        let plan = lowered(1.into());
        // The split-KV partial kernel as the main kernel, then its combine, launched only
        // when the keys are split more than once (never for a query-length condition).
        assert_eq!(plan.kernels.len(), 2);
        let k = &plan.kernels[0];
        assert!(
            k.entry().starts_with("attention_split_f32_d8"),
            "{}",
            k.entry()
        );
        assert!(k.decode.is_none());
        let c = &plan.kernels[1];
        assert!(
            c.entry().starts_with("attention_combine_f32_d8"),
            "{}",
            c.entry()
        );
        assert_eq!(c.only_when, None);
        let b = dims(&[("b", 2), ("t", 4)]);
        assert!(!plan.use_decode(0, &b).unwrap());
        assert_eq!(plan.launch_args(0, &b).unwrap().1, [1, 4, 1]);
        assert!(!plan.launched_at(1, &b).unwrap());
        let long = dims(&[("b", 2), ("t", 300)]);
        assert_eq!(plan.launch_args(0, &long).unwrap().1, [4, 4, 1]);
        assert!(plan.launched_at(1, &long).unwrap());
        assert!(plan.launch_args_for(0, true, &b).is_err());
        assert_eq!(
            plan.to_json(None)["kernels"][0]["decode"],
            serde_json::Value::Null
        );
        assert_eq!(plan.decode_file_name(0), None);

        let plan = lowered(4.into());
        let k = &plan.kernels[0];
        assert!(k.entry().starts_with("attention_f32_d8"), "{}", k.entry());
        assert!(k.decode.is_none());
    }
}
