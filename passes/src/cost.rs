//! The cost model: estimated seconds = global-memory bytes / bandwidth + launches × launch cost
//! + flops / throughput, per target profile.
//!
//! The model prices the kernels `codegen::lower` makes, by the classification both read
//! ([`transfuse_ir::KernelRole`], [`transfuse_ir::inlines_into`]): a kernel (matmul, reduction,
//! concat, fused op, or the root of an elementwise cluster) reads its materialised operands and
//! writes its output once; an elementwise op the lowering inlines into its consumer (see
//! [`inlined_classes`] for how that is judged on the e-graph) adds its flops to the consumer's
//! kernel and nothing else. A fused op therefore saves the intermediate tensors it no longer
//! materialises and their launches, and nothing for an elementwise chain that already was one
//! kernel. Views cost nothing (`transpose` included: matmul reads a transposed view in place): `reshape`, and `slice`, which codegen folds into its consumers'
//! indexing (a strided view). Pricing `slice` as a copy kernel would make a merged projection
//! (`gemm`'s `merge-projections`: one matmul on concatenated weights, then one slice per
//! projection) lose to the separate matmuls — BERT-base's q/k/v cost ~26 µs as three kernels,
//! ~17 µs as one, and three copy slices would add ~14 µs — although no copy is ever made.
//! Sizes are evaluated with the profile's values for the symbolic dims (default 128).
//! Extraction is greedy over the e-graph; a class's cost is shared among its parents so that a
//! tensor read by several consumers (a layer's input feeds q, k, v and the residual) is not
//! counted once per path, which would grow exponentially with depth and drown the local
//! differences that decide fusion.

use std::collections::{HashMap, HashSet};

use egg::{CostFunction, Id, Language};
use transfuse_ir::{Bindings, DType, KernelRole, Op, Shape};

use crate::analysis::{node_type, EG};
use crate::lang::{EOp, TNode};
use crate::rules::FAMILIES;

/// A target's rough throughput numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// `gpu`, `cpu` or `cpu-adapter`.
    pub name: String,
    /// Global-memory bandwidth, bytes/s.
    pub bytes_per_s: f64,
    /// Arithmetic throughput, flop/s.
    pub flops_per_s: f64,
    /// Cost of one kernel launch (or loop nest), seconds.
    pub launch_s: f64,
    /// Values assumed for symbolic dims (others: 128).
    pub dims: Bindings,
    /// Bandwidth of the link between tensor-parallel ranks, bytes/s: a collective costs the
    /// ring bytes each rank sends over it ([`transfuse_planner::comm`]).
    pub link_bytes_per_s: f64,
    /// Fixed cost of one collective (launch and synchronisation of the ranks), seconds.
    pub collective_s: f64,
    /// Ranks of the tensor-parallel group the ring bytes are counted for (1: no group).
    pub world: usize,
}

impl Profile {
    /// A GPU-like profile (H100-class bandwidth, a few µs per launch).
    pub fn gpu() -> Profile {
        Profile {
            name: "gpu".into(),
            bytes_per_s: 2.0e12,
            flops_per_s: 5.0e13,
            launch_s: 4.0e-6,
            dims: default_dims(),
            // NVLink-class link; NCCL's small-message latency.
            link_bytes_per_s: 4.5e11,
            collective_s: 1.0e-5,
            world: 1,
        }
    }

    /// A CPU-like profile (two cores).
    pub fn cpu() -> Profile {
        Profile {
            name: "cpu".into(),
            bytes_per_s: 2.0e10,
            flops_per_s: 5.0e10,
            launch_s: 2.0e-7,
            dims: default_dims(),
            // In-process ranks: a copy through shared memory, a condition-variable round.
            link_bytes_per_s: 1.0e10,
            collective_s: 5.0e-6,
            world: 1,
        }
    }

    /// A Vulkan CPU adapter (Mesa's lavapipe/llvmpipe, SwiftShader): a GPU API emulated on
    /// the CPU's cores. Every dispatch goes through the driver's queue and thread pool, so a
    /// launch costs tens of µs, and kernels shaped for a GPU reach a fraction of the cores'
    /// bandwidth and flops. The numbers are this 2-core machine's lavapipe (README
    /// benchmarks, release build): a one-kernel decode step against 37 keys takes 0.39 ms a
    /// call and its four-kernel unfused form 1.88 ms, i.e. ~0.1 ms or more per extra dispatch
    /// with hardly any work (taken as 50 µs: part of it is the host round trip); the best
    /// kernel (the CPU-adapter attention) reaches 26 GFLOP/s, the GPU-shaped matmul and
    /// softmax of the unfused path about 2 GFLOP/s (1036 ms at seq 1024).
    pub fn cpu_adapter() -> Profile {
        Profile {
            name: "cpu-adapter".into(),
            bytes_per_s: 5.0e9,
            flops_per_s: 1.0e10,
            launch_s: 5.0e-5,
            dims: default_dims(),
            // Collectives between wgpu devices go through the host: a read-back and an upload.
            link_bytes_per_s: 5.0e9,
            collective_s: 2.0e-4,
            world: 1,
        }
    }

    /// The profile called `name`: `gpu`, `cpu` or `cpu-adapter`.
    pub fn by_name(name: &str) -> Option<Profile> {
        match name {
            "gpu" => Some(Profile::gpu()),
            "cpu" => Some(Profile::cpu()),
            "cpu-adapter" => Some(Profile::cpu_adapter()),
            _ => None,
        }
    }

    /// The names [`Profile::by_name`] knows.
    pub const NAMES: [&'static str; 3] = ["gpu", "cpu", "cpu-adapter"];

    fn numel(&self, s: &Shape) -> f64 {
        s.iter()
            .map(|d| {
                let mut b = self.dims.clone();
                for sym in d.symbols() {
                    b.entry(sym.to_string()).or_insert(128);
                }
                d.eval(&b).unwrap_or(128) as f64
            })
            .product()
    }
}

fn default_dims() -> Bindings {
    [
        ("batch".to_string(), 1),
        ("seq".to_string(), 128),
        ("past".to_string(), 0),
    ]
    .into()
}

fn elem_bytes(d: DType) -> f64 {
    match d {
        DType::F32 | DType::I64 => 4.0,
        DType::F16 | DType::BF16 => 2.0,
        DType::Bool => 1.0,
    }
}

/// The sizes a family's flop count reads: the node's output and its operands' types, with
/// symbolic dims at the profile's values.
pub struct Sizes<'a> {
    /// The output shape.
    pub out: &'a Shape,
    /// The operands' shapes and dtypes, in order.
    pub kids: &'a [(Shape, DType)],
    profile: &'a Profile,
}

impl Sizes<'_> {
    /// Elements of `s`.
    pub fn numel(&self, s: &Shape) -> f64 {
        self.profile.numel(s)
    }

    /// The size of operand `i`'s axis `axis` from the end (1 when absent).
    pub fn dim_from_end(&self, i: usize, axis: usize) -> f64 {
        let s = self.kids.get(i).map(|k| &k.0);
        s.and_then(|s| s.len().checked_sub(axis).map(|j| &s[j]))
            .map_or(1.0, |d| self.numel(&vec![d.clone()]))
    }

    /// `2·m·n·k` of a matmul whose first operand is `[.., m, k]`.
    pub fn matmul_flops(&self) -> f64 {
        2.0 * self.numel(self.out) * self.dim_from_end(0, 1)
    }

    /// What the model charges any other op: 8 flops per output element.
    pub fn elementwise_flops(&self) -> f64 {
        8.0 * self.numel(self.out)
    }
}

/// What an e-node becomes in the lowered plan: its IR op's [`KernelRole`]; `row_*` is a
/// reduction (a kernel), `transpose` a permute (a view), the root nothing.
pub fn role(n: &TNode) -> KernelRole {
    match &n.op {
        EOp::Ir(op) => op.kernel_role(),
        EOp::Row(_) => KernelRole::Kernel,
        EOp::Transpose => KernelRole::View,
        EOp::Outputs => KernelRole::Leaf,
    }
}

/// Whether an e-node's kernel takes an inlined elementwise prologue ([`Op::takes_prologue`]).
fn takes_prologue(n: &TNode) -> bool {
    match &n.op {
        EOp::Ir(op) => op.takes_prologue(),
        EOp::Row(_) => true,
        EOp::Transpose | EOp::Outputs => false,
    }
}

/// The e-classes whose elementwise e-nodes the lowering would inline into their consumer:
/// the class holds an elementwise e-node, and every e-node anywhere in the e-graph that reads
/// it takes a prologue ([`transfuse_ir::inlines_into`]), reads it once, and lies in one and the
/// same parent class (so whichever of them extraction picks, the class has one use, by an
/// elementwise op or a reduction, and is no graph output: the root's reader is `outputs`).
///
/// The approximation: a greedy extractor does not know the final use counts, so this reads the
/// e-graph's structure instead of the extracted graph. It errs towards materialising: a class
/// that some unpicked alternative also reads (another parent class, a matmul, a fused op) is
/// priced as a cluster root (a kernel), which is what the model charged every elementwise op
/// before. When a class counted as inlined is extracted as a kernel instead (a fused op picked
/// over its elementwise form), that kernel pays its output twice: the write, and the read its
/// consumer did not charge.
pub fn inlined_classes(eg: &EG) -> HashSet<Id> {
    // child class → (parent class, whether the parent takes a prologue, times it reads it)
    let mut readers: HashMap<Id, Vec<(Id, bool, usize)>> = HashMap::new();
    for class in eg.classes() {
        for n in &class.nodes {
            let mut kids: Vec<Id> = n.children.iter().map(|c| eg.find(*c)).collect();
            kids.sort();
            let mut i = 0;
            while i < kids.len() {
                let j = kids[i..].iter().take_while(|k| **k == kids[i]).count();
                readers
                    .entry(kids[i])
                    .or_default()
                    .push((class.id, takes_prologue(n), j));
                i += j;
            }
        }
    }
    eg.classes()
        .filter(|c| {
            c.nodes.iter().any(|n| role(n) == KernelRole::Elementwise)
                && readers.get(&c.id).is_some_and(|r| {
                    r.iter()
                        .all(|&(p, takes, times)| takes && times == 1 && p == r[0].0)
                })
        })
        .map(|c| c.id)
        .collect()
}

/// The own cost of an e-node in seconds (children excluded); infinite when ill-typed.
/// `inlined` is [`inlined_classes`] of `eg`.
///
/// A kernel pays a launch, reading its materialised operands, writing its output, and its
/// flops. An elementwise e-node in an inlined class pays its flops and the reads of its own
/// materialised operands (the cluster kernel of its consumer reads them), but no launch and
/// no output; its consumer reads nothing for it. Views and leaves cost nothing.
pub fn node_cost(eg: &EG, p: &Profile, inlined: &HashSet<Id>, n: &TNode) -> f64 {
    let Some((out, dt)) = node_type(eg, n) else {
        return f64::INFINITY;
    };
    let kids: Vec<(Shape, DType)> = n
        .children
        .iter()
        .filter_map(|c| eg[*c].data.ty.clone())
        .collect();
    let out_b = p.numel(&out) * elem_bytes(dt);
    let in_b: f64 = n
        .children
        .iter()
        .filter(|c| !inlined.contains(&eg.find(**c)))
        .filter_map(|c| eg[*c].data.ty.as_ref())
        .map(|(s, d)| p.numel(s) * elem_bytes(*d))
        .sum();
    let role = role(n);
    let in_inlined_class = matches!(
        role,
        KernelRole::Elementwise | KernelRole::Kernel | KernelRole::Source
    ) && eg
        .lookup(n.clone())
        .is_some_and(|c| inlined.contains(&eg.find(c)));
    let kernel = |flops: f64| {
        if role == KernelRole::Elementwise && in_inlined_class {
            in_b / p.bytes_per_s + flops / p.flops_per_s
        } else {
            // A kernel in a class counted as inlined also pays the read its consumer skipped.
            let out_reads = if in_inlined_class { 2.0 } else { 1.0 };
            p.launch_s + (in_b + out_reads * out_b) / p.bytes_per_s + flops / p.flops_per_s
        }
    };
    let sizes = Sizes {
        out: &out,
        kids: &kids,
        profile: p,
    };
    let cost = match &n.op {
        EOp::Outputs | EOp::Transpose => 0.0,
        EOp::Row(_) => kernel(p.numel(&kids[0].0)),
        EOp::Ir(op) => match op {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => 0.0,
            op if op.kernel_role() == KernelRole::View => 0.0,
            Op::Iota { .. } => p.launch_s,
            Op::Dist(d) => collective_cost(p, d, p.numel(&out) * elem_bytes(dt), in_b, out_b),
            Op::MatMul => kernel(sizes.matmul_flops()),
            // A fused op's flops come from the family that produces it.
            op if op.is_fused() => kernel(
                FAMILIES
                    .iter()
                    .find_map(|f| (f.flops)(op, &sizes))
                    .unwrap_or_else(|| sizes.elementwise_flops()),
            ),
            _ => kernel(sizes.elementwise_flops()),
        },
    };
    // Weight-only expressions are folded into new weights at load (`runtime::fold_weights`;
    // the lowering's prepare phase) and cost nothing per call; a millionth of their cost keeps
    // the cheaper of two foldings. (At a hundredth, the six small prepare kernels that fold a
    // batch norm's statistics and affine into two vectors outweighed the flops the fused op
    // saves over the one elementwise cluster the unfused chain lowers to.)
    let weight_only = !n.is_leaf() && n.children.iter().all(|c| eg[*c].data.weight_only);
    if weight_only {
        cost * 1e-6
    } else {
        cost
    }
}

/// The cost of a collective under `p`: its fixed cost plus the ring bytes each of the
/// `p.world` ranks sends over the link (an all-reduce 2(N−1)/N of its bytes, an all-gather
/// (N−1)/N of its result, a reduce-scatter (N−1)/N of its operand; a `send` its operand);
/// `shard` is a local copy (a kernel reading its rows), `recv` the wait of its `send`,
/// `root_only` nothing.
fn collective_cost(
    p: &Profile,
    d: &transfuse_ir::DistOp,
    bytes: f64,
    in_b: f64,
    out_b: f64,
) -> f64 {
    use transfuse_ir::DistOp;
    use transfuse_planner::comm;
    let n = p.world.max(1) as u64;
    let link = |b: f64| p.collective_s + b / p.link_bytes_per_s;
    match d {
        DistOp::AllReduce => link(comm::all_reduce_bytes(n, bytes)),
        DistOp::AllGather { .. } => link(comm::all_gather_bytes(n, bytes)),
        DistOp::ReduceScatter { .. } => link(comm::reduce_scatter_bytes(n, in_b)),
        DistOp::Send { .. } => link(bytes),
        DistOp::Recv { .. } => 0.0,
        // Removed per rank before loading (`shard::for_rank`): rank 0 reads the operand in
        // place, the others drop the epilogue term it feeds. Priced as rank 0, the slowest
        // rank (its consumer reads the operand; the others skip it).
        DistOp::RootOnly => 0.0,
        DistOp::Shard { .. } => p.launch_s + (out_b + out_b) / p.bytes_per_s,
    }
}

/// The cost of each node of an IR graph under `p` (the extraction's [`node_cost`], in
/// seconds; leaves and views 0), indexed by [`transfuse_ir::NodeId::index`]. What the
/// pipeline cut balances across its stages.
pub fn graph_node_costs(g: &transfuse_ir::Graph, p: &Profile) -> Vec<f64> {
    let mut eg = EG::default();
    let nodes = crate::convert::add_nodes(g, &mut eg);
    eg.rebuild();
    let inlined = inlined_classes(&eg);
    nodes
        .iter()
        .map(|(_, n)| {
            let mut n = n.clone();
            n.children.iter_mut().for_each(|c| *c = eg.find(*c));
            let c = node_cost(&eg, p, &inlined, &n);
            if c.is_finite() {
                c
            } else {
                0.0
            }
        })
        .collect()
}

/// The extraction cost function (see the module docs).
pub struct CostFn<'a> {
    eg: &'a EG,
    profile: &'a Profile,
    parents: HashMap<Id, f64>,
    inlined: HashSet<Id>,
}

impl<'a> CostFn<'a> {
    /// A cost function over `eg` for `profile`.
    pub fn new(eg: &'a EG, profile: &'a Profile) -> CostFn<'a> {
        let mut parents: HashMap<Id, f64> = HashMap::new();
        for class in eg.classes() {
            let mut seen: Vec<Id> = class
                .nodes
                .iter()
                .flat_map(|n| n.children.iter().map(|c| eg.find(*c)))
                .collect();
            seen.sort();
            seen.dedup();
            for c in seen {
                *parents.entry(c).or_insert(0.0) += 1.0;
            }
        }
        CostFn {
            eg,
            profile,
            parents,
            inlined: inlined_classes(eg),
        }
    }
}

impl CostFunction<TNode> for CostFn<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &TNode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = node_cost(self.eg, self.profile, &self.inlined, enode);
        let kids: f64 = enode
            .children
            .iter()
            .map(|c| {
                costs(*c)
                    / self
                        .parents
                        .get(&self.eg.find(*c))
                        .copied()
                        .unwrap_or(1.0)
                        .max(1.0)
            })
            .sum();
        own + kids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{convert, extract};
    use transfuse_ir::{Builder, DType, Graph, UnaryOp};

    /// `tanh(x·s + b) @ w`, x `[4, 8]`, and the graph's DAG cost under `p` before any rule.
    fn chain_into_matmul(p: &Profile, shared: bool) -> f64 {
        let mut b = Builder::new();
        let x = b.input("x", vec![4.into(), 8.into()], DType::F32).unwrap();
        let s = b.weight("s", vec![8.into()]).unwrap();
        let bias = b.weight("b", vec![8.into()]).unwrap();
        let w = b.weight("w", vec![8.into(), 16.into()]).unwrap();
        let xs = b.mul(x, s).unwrap();
        let h = b.add(xs, bias).unwrap();
        let y = b.unary(UnaryOp::Tanh, h).unwrap();
        let out = b.matmul(y, w).unwrap();
        b.output("out", out);
        if shared {
            // x·s read twice: a tensor of its own, as the lowering materialises it.
            b.output("xs", xs);
        }
        cost_of(&b.finish(), p)
    }

    fn cost_of(g: &Graph, p: &Profile) -> f64 {
        let mut eg = EG::default();
        let root = convert::to_egraph(g, &mut eg);
        eg.rebuild();
        extract::extract(&eg, root, p).0
    }

    #[test]
    fn an_elementwise_chain_feeding_a_matmul_is_one_kernel() {
        let p = Profile::gpu();
        let got = chain_into_matmul(&p, false);
        // The cluster (mul, add, tanh inlined into one kernel: reads x, s, b, writes y) and the
        // matmul (reads y and w, writes out): two launches, as the lowering makes them.
        let bytes = 4.0 * ((32 + 8 + 8 + 32) + (32 + 128 + 64)) as f64;
        let flops = 3.0 * 8.0 * 32.0 + 2.0 * 4.0 * 16.0 * 8.0;
        let want = 2.0 * p.launch_s + bytes / p.bytes_per_s + flops / p.flops_per_s;
        assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
        // A shared x·s is materialised: its own kernel, which writes it, and the cluster reads
        // it back.
        let shared = chain_into_matmul(&p, true);
        let extra = p.launch_s + 2.0 * 4.0 * 32.0 / p.bytes_per_s;
        assert!(
            (shared - got - extra).abs() <= 1e-9 * want,
            "{shared} vs {got} + {extra}"
        );
    }

    #[test]
    fn the_lowering_and_the_cost_model_share_one_classification() {
        use transfuse_ir::{inlines_into, BinaryOp, Op};
        let ew = Op::Binary(BinaryOp::Add);
        assert_eq!(ew.kernel_role(), KernelRole::Elementwise);
        assert!(inlines_into(&ew, &Op::Unary(UnaryOp::Exp)));
        let sum = Op::Reduce {
            op: transfuse_ir::ReduceOp::Sum,
            axes: vec![1],
            keepdim: true,
        };
        assert!(inlines_into(&ew, &sum));
        assert!(!inlines_into(&ew, &Op::MatMul));
        assert!(!inlines_into(&sum, &ew));
        assert_eq!(
            role(&TNode::new(EOp::Row(transfuse_ir::ReduceOp::Max), vec![])),
            KernelRole::Kernel
        );
        assert_eq!(role(&TNode::new(EOp::Transpose, vec![])), KernelRole::View);
        for name in Profile::NAMES {
            assert_eq!(Profile::by_name(name).unwrap().name, name);
        }
        assert_eq!(Profile::by_name("lavapipe"), None);
    }
}
