//! The cost model: estimated seconds = global-memory bytes / bandwidth + launches × launch cost
//! + flops / throughput, per target profile.
//!
//! Every non-view op is one kernel that reads its operands and writes its output once; a fused
//! op therefore saves the intermediate tensors it no longer materialises and their launches.
//! Views cost nothing: `reshape`, and `slice`, which codegen folds into its consumers'
//! indexing (a strided view). Pricing `slice` as a copy kernel would make a merged projection
//! (`gemm`'s `merge-projections`: one matmul on concatenated weights, then one slice per
//! projection) lose to the separate matmuls — BERT-base's q/k/v cost ~26 µs as three kernels,
//! ~17 µs as one, and three copy slices would add ~14 µs — although no copy is ever made.
//! Sizes are evaluated with the profile's values for the symbolic dims (default 128).
//! Extraction is greedy over the e-graph; a class's cost is shared among its parents so that a
//! tensor read by several consumers (a layer's input feeds q, k, v and the residual) is not
//! counted once per path, which would grow exponentially with depth and drown the local
//! differences that decide fusion.

use std::collections::HashMap;

use egg::{CostFunction, Id, Language};
use transfuse_ir::{Bindings, DType, Op, Shape};

use crate::analysis::{node_type, EG};
use crate::lang::{EOp, TNode};
use crate::rules::FAMILIES;

/// A target's rough throughput numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// `gpu` or `cpu`.
    pub name: String,
    /// Global-memory bandwidth, bytes/s.
    pub bytes_per_s: f64,
    /// Arithmetic throughput, flop/s.
    pub flops_per_s: f64,
    /// Cost of one kernel launch (or loop nest), seconds.
    pub launch_s: f64,
    /// Values assumed for symbolic dims (others: 128).
    pub dims: Bindings,
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
        }
    }

    /// The profile called `name`.
    pub fn by_name(name: &str) -> Option<Profile> {
        match name {
            "gpu" => Some(Profile::gpu()),
            "cpu" => Some(Profile::cpu()),
            _ => None,
        }
    }

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

/// The own cost of an e-node in seconds (children excluded); infinite when ill-typed.
pub fn node_cost(eg: &EG, p: &Profile, n: &TNode) -> f64 {
    let Some((out, dt)) = node_type(eg, n) else {
        return f64::INFINITY;
    };
    let kids: Vec<(Shape, DType)> = n
        .children
        .iter()
        .filter_map(|c| eg[*c].data.ty.clone())
        .collect();
    let out_b = p.numel(&out) * elem_bytes(dt);
    let in_b: f64 = kids.iter().map(|(s, d)| p.numel(s) * elem_bytes(*d)).sum();
    let kernel = |flops: f64| p.launch_s + (in_b + out_b) / p.bytes_per_s + flops / p.flops_per_s;
    let sizes = Sizes {
        out: &out,
        kids: &kids,
        profile: p,
    };
    let cost = match &n.op {
        EOp::Outputs => 0.0,
        EOp::Row(_) => kernel(p.numel(&kids[0].0)),
        EOp::Transpose => kernel(0.0),
        EOp::Ir(op) => match op {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => 0.0,
            Op::Reshape { .. } | Op::Slice { .. } => 0.0,
            Op::Iota { .. } => p.launch_s,
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
    // Weight-only expressions run once per set of weights, not per call.
    let weight_only = !n.is_leaf() && n.children.iter().all(|c| eg[*c].data.weight_only);
    if weight_only {
        cost * 0.01
    } else {
        cost
    }
}

/// The extraction cost function (see the module docs).
pub struct CostFn<'a> {
    eg: &'a EG,
    profile: &'a Profile,
    parents: HashMap<Id, f64>,
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
        }
    }
}

impl CostFunction<TNode> for CostFn<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &TNode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = node_cost(self.eg, self.profile, enode);
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
