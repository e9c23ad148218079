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
//! [`place`] puts both layouts of a graph into one e-graph: each is the sharding pass's
//! rewrite of the same source graph ([`crate::shard::shard`], with and without
//! [`ShardSpec::sequence_parallel`]), and every value that both compute identically on every
//! rank (the same sharding state: replicated, or the same head/column split) is one e-class.
//! The classes where the layouts differ are the placements: at the residual stream a class
//! holds the Megatron node (the add after the `all_reduce`) and, reached through the
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
    /// Megatron-LM's textbook layout: one `all_reduce` per row-parallel site, everything
    /// between the sites replicated.
    Megatron,
    /// Megatron-SP at every site: `reduce_scatter` + `all_gather` around the residual adds
    /// and norms, which run on each rank's rows of the sequence.
    MegatronSp,
    /// Chosen per site by the cost model ([`place`]).
    #[default]
    Auto,
}

impl TpLayout {
    /// The layout called `name` (`megatron`, `megatron-sp`, `auto`).
    pub fn by_name(name: &str) -> Option<TpLayout> {
        match name {
            "megatron" => Some(TpLayout::Megatron),
            "megatron-sp" => Some(TpLayout::MegatronSp),
            "auto" => Some(TpLayout::Auto),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            TpLayout::Megatron => "megatron",
            TpLayout::MegatronSp => "megatron-sp",
            TpLayout::Auto => "auto",
        }
    }

    /// The names [`TpLayout::by_name`] knows.
    pub const NAMES: [&'static str; 3] = ["megatron", "megatron-sp", "auto"];
}

/// What [`place`] chose and why.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The sharded graph every rank runs.
    pub sharded: Sharded,
    /// The layout asked for.
    pub asked: TpLayout,
    /// What was chosen: `megatron`, `megatron-sp`, or `mixed` (some sites each way).
    pub chosen: &'static str,
    /// Estimated seconds per forward under the profile (compute and collectives), of each
    /// alternative and of the chosen graph: `megatron`, `megatron-sp`, `chosen`. Empty when
    /// the layout was forced.
    pub costs: BTreeMap<&'static str, f64>,
    /// Sites: the Megatron layout's all-reduces (row-parallel matmuls and the vocab-parallel
    /// embedding).
    pub sites: usize,
    /// Sites the chosen graph runs sequence-parallel (a `reduce_scatter` each).
    pub sp_sites: usize,
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
    let with_sp = |on: bool| ShardSpec {
        sequence_parallel: on,
        ..spec.clone()
    };
    let m = shard(g, &with_sp(false))?;
    let sites = count(&m.graph, "all_reduce");
    let forced = |s: Sharded, chosen| Placement {
        sp_sites: count(&s.graph, "reduce_scatter"),
        sharded: s,
        asked: layout,
        chosen,
        costs: BTreeMap::new(),
        sites,
    };
    match layout {
        TpLayout::Megatron => return Ok(forced(m, "megatron")),
        TpLayout::MegatronSp => return Ok(forced(shard(g, &with_sp(true))?, "megatron-sp")),
        TpLayout::Auto => {}
    }
    let s = shard(g, &with_sp(true))?;
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
    if s.seq_chunk.is_none() && count(&s.graph, "reduce_scatter") == 0 {
        // No site could be sequence-parallel: nothing to choose.
        costs.insert("chosen", costs["megatron"]);
        return Ok(Placement {
            costs,
            chosen: "megatron",
            ..forced(m, "megatron")
        });
    }
    costs.insert("megatron-sp", graph_cost(&s.graph, &p));
    // The extractor's pick over the merged e-graph, unless a pure layout is cheaper (its
    // local search moves one class, or one group, at a time; switching a whole region between
    // the layouts can be beyond it).
    let (merged, cost) = merge_and_extract(&m, &s, &p)?;
    let (graph, cost) = [
        (merged, cost),
        (m.graph.clone(), costs["megatron"]),
        (s.graph.clone(), costs["megatron-sp"]),
    ]
    .into_iter()
    .min_by(|a, b| a.1.total_cmp(&b.1))
    .expect("three candidates");
    costs.insert("chosen", cost);
    let sp_sites = count(&graph, "reduce_scatter");
    let chosen = match sp_sites {
        0 => "megatron",
        k if k == count(&s.graph, "reduce_scatter") => "megatron-sp",
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
    })
}

/// Both layouts in one e-graph, the classes they agree on merged; the cheapest graph.
fn merge_and_extract(m: &Sharded, s: &Sharded, p: &Profile) -> Result<(Graph, f64), ShardError> {
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
    let (im, rm) = add(&m.graph, &mut eg);
    let (is, rs) = add(&s.graph, &mut eg);
    let names: Vec<String> = m.graph.outputs().iter().map(|(n, _)| n.clone()).collect();
    let names_s: Vec<String> = s.graph.outputs().iter().map(|(n, _)| n.clone()).collect();
    if names != names_s {
        return Err(ShardError::Unsupported(
            "the two layouts have different outputs".into(),
        ));
    }
    for ((nm, sm), (ns, ss)) in m.states.iter().zip(&s.states) {
        if sm == ss && !matches!(sm, St::Seq { .. }) {
            eg.union(im[nm.index()], is[ns.index()]);
        }
    }
    eg.union(rm, rs);
    eg.rebuild();
    let (cost, expr) = extract::extract(&eg, eg.find(rm), p);
    let g = convert::from_recexpr(&expr, &names)?;
    Ok((g, cost))
}
