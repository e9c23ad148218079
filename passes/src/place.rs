//! Tensor-parallel placements chosen by cost inside the e-graph.
//!
//! Where a collective goes is a choice with a price on both sides. Per row-parallel site
//! (attention output, MLP down projection, vocab-parallel embedding) Megatron-LM puts one
//! `all_reduce` of the partial sums and adds the bias and the residual, and runs the next norm,
//! after it, on every rank over the whole sequence; Megatron-SP (Korthikanti et al.) splits the
//! all-reduce into a `reduce_scatter` along the sequence and an `all_gather` placed after the
//! residual add and the norm, so those run on each rank's `⌈seq/N⌉` rows. The ring bytes are
//! the same (an all-reduce is a reduce-scatter then an all-gather); SP saves (N−1)/N of the
//! add and norm work and pays a second collective's fixed cost and the padding.
//!
//! The other choice is where the bias and the residual go. After the `all_reduce` (Megatron's
//! order) they are one elementwise kernel over the reduced stream: it reads the sum and the
//! residual and writes the new stream. Before it, `all_reduce(x·W + [rank 0: b + r])`, they
//! are the row-parallel matmul's epilogue on rank 0 (`root_only` operands, which
//! [`crate::shard::for_rank`] turns into the operand on rank 0 and a dropped epilogue term on
//! the others): the matmul reads the residual once more and the elementwise kernel, its launch
//! and two passes over the stream are gone. Priced as rank 0, the slowest. Without SP the
//! fused form is never dearer under this model; SP's adds run on `⌈seq/N⌉` rows, so where SP
//! wins, the adds stay after the reduce-scatter.
//!
//! [`place`] puts the layouts of a graph into one e-graph: each is the sharding pass's
//! rewrite of the same source graph ([`crate::shard::shard`] with
//! [`ShardSpec::sequence_parallel`] or [`ShardSpec::epilogue_before_reduce`] or neither), and
//! every value that both compute identically on every
//! rank (the same sharding state: replicated, or the same head/column split) is one e-class.
//! The classes where the layouts differ are the placements: at the residual stream a class
//! holds the Megatron node (the add after the `all_reduce`), the fused one (the `all_reduce`
//! of the matmul with the epilogue) and, reached through the
//! `all_gather`, the SP one (the add before it, on the rank's rows), and at each norm output the
//! norm over the whole sequence and the gathered norm over the rows. The extractor
//! ([`crate::extract`]) then picks per site under the profile's compute, launch and collective
//! costs ([`crate::cost`]); any mix it picks is exact, since every e-node of a class computes
//! the class's value.

use std::collections::BTreeMap;

use egg::Id;
use transfuse_ir::Graph;

use crate::analysis::EG;
use crate::convert;
use crate::cost::Profile;
use crate::extract;
use crate::lang::{EOp, TNode};
use crate::shard::{shard, ShardError, ShardSpec, Sharded, St};

/// How `--tp` lays a model out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TpLayout {
    /// Megatron-LM's textbook layout: one `all_reduce` per row-parallel site, the bias and
    /// the residual added after it, everything between the sites replicated.
    Megatron,
    /// Megatron's collectives with the bias and the residual of each row-parallel matmul
    /// added before the `all_reduce`, in the matmul's epilogue on rank 0
    /// ([`ShardSpec::epilogue_before_reduce`]).
    MegatronFused,
    /// Megatron-SP at every site: `reduce_scatter` + `all_gather` around the residual adds
    /// and norms, which run on each rank's rows of the sequence.
    MegatronSp,
    /// Chosen per site by the cost model ([`place`]).
    #[default]
    Auto,
}

impl TpLayout {
    /// The layout called `name` (`megatron`, `megatron-fused`, `megatron-sp`, `auto`).
    pub fn by_name(name: &str) -> Option<TpLayout> {
        match name {
            "megatron" => Some(TpLayout::Megatron),
            "megatron-fused" => Some(TpLayout::MegatronFused),
            "megatron-sp" => Some(TpLayout::MegatronSp),
            "auto" => Some(TpLayout::Auto),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            TpLayout::Megatron => "megatron",
            TpLayout::MegatronFused => "megatron-fused",
            TpLayout::MegatronSp => "megatron-sp",
            TpLayout::Auto => "auto",
        }
    }

    /// The names [`TpLayout::by_name`] knows.
    pub const NAMES: [&'static str; 4] = ["megatron", "megatron-fused", "megatron-sp", "auto"];
}

/// What [`place`] chose and why.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The sharded graph every rank runs (specialise it per rank with
    /// [`crate::shard::for_rank`] before loading).
    pub sharded: Sharded,
    /// The layout asked for.
    pub asked: TpLayout,
    /// What was chosen: `megatron`, `megatron-fused`, `megatron-sp`, or `mixed` (sites in
    /// more than one of these forms).
    pub chosen: &'static str,
    /// Estimated seconds per forward under the profile (compute and collectives), of each
    /// alternative and of the chosen graph: `megatron`, `megatron-fused`, `megatron-sp`
    /// (when some site can be sequence-parallel), `chosen`. Empty when the layout was forced.
    pub costs: BTreeMap<&'static str, f64>,
    /// Sites: the Megatron layout's all-reduces (row-parallel matmuls and the vocab-parallel
    /// embedding).
    pub sites: usize,
    /// Sites the chosen graph runs sequence-parallel (a `reduce_scatter` each).
    pub sp_sites: usize,
    /// Sites whose bias and residual the chosen graph adds before the `all_reduce`, in the
    /// row-parallel matmul's epilogue.
    pub fused_sites: usize,
}

/// Row-parallel sites whose epilogue runs before the reduce: `all_reduce`s of a fused matmul
/// that reads a `root_only` operand.
pub fn fused_sites(g: &Graph) -> usize {
    use transfuse_ir::{DistOp, Op};
    g.nodes()
        .filter(|(_, n)| n.op == Op::Dist(DistOp::AllReduce))
        .filter(|(_, n)| {
            let m = g.node(n.inputs[0]);
            matches!(m.op, Op::FusedMatMul { .. })
                && m.inputs
                    .iter()
                    .any(|x| g.node(*x).op == Op::Dist(DistOp::RootOnly))
        })
        .count()
}

fn count(g: &Graph, name: &str) -> usize {
    g.op_counts().get(name).copied().unwrap_or(0)
}

/// The cost of `g` alone under `p` (its DAG cost, as extraction prices it).
pub fn graph_cost(g: &Graph, p: &Profile) -> f64 {
    let mut eg = EG::default();
    let root = convert::to_egraph(g, &mut eg);
    eg.rebuild();
    extract::extract(&eg, root, p).0
}

/// Shards `g` (an optimized graph) with `spec` in `layout`; under [`TpLayout::Auto`] the
/// placements are chosen by cost under `profile` (its `world` set to the degree).
pub fn place(
    g: &Graph,
    spec: &ShardSpec,
    layout: TpLayout,
    profile: &Profile,
) -> Result<Placement, ShardError> {
    // Every layout shards the same source graph (their states are merged by source node).
    let g = &crate::shard::absorb_residuals(g)?;
    let with = |sp: bool, fused: bool| ShardSpec {
        sequence_parallel: sp,
        epilogue_before_reduce: fused,
        ..spec.clone()
    };
    let m = shard(g, &with(false, false))?;
    let sites = count(&m.graph, "all_reduce");
    let forced = |s: Sharded, chosen| Placement {
        sp_sites: count(&s.graph, "reduce_scatter"),
        fused_sites: fused_sites(&s.graph),
        sharded: s,
        asked: layout,
        chosen,
        costs: BTreeMap::new(),
        sites,
    };
    match layout {
        TpLayout::Megatron => return Ok(forced(m, "megatron")),
        TpLayout::MegatronFused => {
            return Ok(forced(shard(g, &with(false, true))?, "megatron-fused"))
        }
        TpLayout::MegatronSp => return Ok(forced(shard(g, &with(true, false))?, "megatron-sp")),
        TpLayout::Auto => {}
    }
    let f = shard(g, &with(false, true))?;
    let s = shard(g, &with(true, false))?;
    let mut p = profile.clone();
    p.world = spec.degree;
    if let Some(c) = &s.seq_chunk {
        // Price the rank's rows at ⌈seq/N⌉ of the profile's sequence length.
        let len = g
            .inputs()
            .into_iter()
            .find(|(n, _, _)| *n == c.input)
            .and_then(|(_, shape, _)| shape.get(c.axis).cloned());
        if let Some(len) = len {
            let mut b = p.dims.clone();
            for sym in len.symbols() {
                b.entry(sym.to_string()).or_insert(128);
            }
            if let Ok(l) = len.eval(&b) {
                p.dims.insert(crate::shard::SEQ_CHUNK.into(), c.chunk(l));
            }
        }
    }
    let mut costs = BTreeMap::new();
    costs.insert("megatron", graph_cost(&m.graph, &p));
    costs.insert("megatron-fused", graph_cost(&f.graph, &p));
    let sp = s.seq_chunk.is_some() || count(&s.graph, "reduce_scatter") > 0;
    let mut layouts = vec![&m, &f];
    if sp {
        costs.insert("megatron-sp", graph_cost(&s.graph, &p));
        layouts.push(&s);
    }
    // The extractor's pick over the merged e-graph, unless a pure layout is cheaper (its
    // local search moves one class, or one group, at a time; switching a whole region between
    // the layouts can be beyond it).
    let (merged, cost) = merge_and_extract(&layouts, &p)?;
    let mut candidates = vec![(merged, cost)];
    for (l, name) in layouts
        .iter()
        .zip(["megatron", "megatron-fused", "megatron-sp"])
    {
        candidates.push((l.graph.clone(), costs[name]));
    }
    let (graph, cost) = candidates
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("candidates");
    costs.insert("chosen", cost);
    let sp_sites = count(&graph, "reduce_scatter");
    let fused = fused_sites(&graph);
    let all_fused = fused_sites(&f.graph);
    let chosen = match (sp_sites, fused) {
        (0, 0) => "megatron",
        (0, k) if k == all_fused => "megatron-fused",
        (k, 0) if k == count(&s.graph, "reduce_scatter") => "megatron-sp",
        _ => "mixed",
    };
    // Extraction keeps what the outputs reach; the chunk input is read by no node, only its
    // symbol by the shapes, so it is declared again when they mention it.
    let mut graph = graph;
    let uses_chunk = graph.nodes().any(|(_, n)| {
        n.shape
            .iter()
            .any(|d| d.symbols().any(|s| s == crate::shard::SEQ_CHUNK))
    });
    if uses_chunk
        && !graph
            .inputs()
            .iter()
            .any(|(n, _, _)| *n == crate::shard::SEQ_CHUNK)
    {
        graph.add(
            transfuse_ir::Op::Input {
                name: crate::shard::SEQ_CHUNK.into(),
                shape: vec![transfuse_ir::Dim::sym(crate::shard::SEQ_CHUNK)],
                dtype: transfuse_ir::DType::I64,
            },
            &[],
        )?;
    }
    let sharded = Sharded {
        graph,
        weights: m.weights.clone(),
        degree: m.degree,
        seq_chunk: if uses_chunk {
            s.seq_chunk.clone()
        } else {
            None
        },
        states: Vec::new(),
    };
    Ok(Placement {
        sharded,
        asked: layout,
        chosen,
        costs,
        sites,
        sp_sites,
        fused_sites: fused,
    })
}

/// The layouts in one e-graph, the classes they agree on merged; the cheapest graph.
fn merge_and_extract(layouts: &[&Sharded], p: &Profile) -> Result<(Graph, f64), ShardError> {
    let mut eg = EG::default();
    let add = |g: &Graph, eg: &mut EG| -> (Vec<Id>, Id) {
        let ids: Vec<Id> = convert::add_nodes(g, eg)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let outs = g.outputs().iter().map(|(_, id)| ids[id.index()]).collect();
        let root = eg.add(TNode::new(EOp::Outputs, outs));
        (ids, root)
    };
    let added: Vec<(Vec<Id>, Id)> = layouts.iter().map(|l| add(&l.graph, &mut eg)).collect();
    let names: Vec<String> = layouts[0]
        .graph
        .outputs()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    for l in &layouts[1..] {
        let other: Vec<String> = l.graph.outputs().iter().map(|(n, _)| n.clone()).collect();
        if other != names {
            return Err(ShardError::Unsupported(
                "the layouts have different outputs".into(),
            ));
        }
    }
    for a in 0..layouts.len() {
        for b in a + 1..layouts.len() {
            let pairs = layouts[a].states.iter().zip(&layouts[b].states);
            for ((na, sa), (nb, sb)) in pairs {
                if sa == sb && !matches!(sa, St::Seq { .. }) {
                    eg.union(added[a].0[na.index()], added[b].0[nb.index()]);
                }
            }
            eg.union(added[a].1, added[b].1);
        }
    }
    eg.rebuild();
    let root = eg.find(added[0].1);
    let (cost, expr) = extract::extract(&eg, root, p);
    let g = convert::from_recexpr(&expr, &names)?;
    Ok((g, cost))
}
