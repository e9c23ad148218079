//! # transfuse-passes
//!
//! The optimizer: the graph goes into an e-graph ([`convert`]), rule families ([`rules`])
//! saturate it under node, iteration and time limits, the cheapest equivalent graph is
//! extracted under a cost model ([`cost`]) and converted back. Every fused op in a compiled
//! model is one these rules found; the builder never emits them.
//!
//! Never hangs: when a limit stops saturation the report says which, and the best graph found
//! so far is used (it is always equivalent: every rule is an equivalence).
//!
//! ```
//! use transfuse_ir::{Builder, DType, Dim};
//! use transfuse_passes::{optimize, Options};
//!
//! let mut b = Builder::new();
//! let x = b.input("x", vec![Dim::sym("n"), 16.into()], DType::F32).unwrap();
//! let y = b.softmax(x).unwrap();
//! b.output("y", y);
//! let (g, report) = optimize(&b.finish(), &Options::default()).unwrap();
//! assert_eq!(g.op_counts()["softmax"], 1);
//! assert!(!g.op_counts().contains_key("exp"));
//! assert_eq!(report.ops_before["exp"], 1);
//! ```
#![warn(missing_docs)]

pub use egg;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use egg::{Runner, StopReason};
use transfuse_ir::{Graph, IrError};

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod extract;
pub mod lang;
pub mod pipeline;
pub mod place;
pub mod rules;
pub mod shard;

pub use cost::Profile;
pub use rules::Rule;

/// Optimizer settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Stop when the e-graph holds this many e-nodes.
    pub node_limit: usize,
    /// Stop after this many iterations.
    pub iter_limit: usize,
    /// Stop after this much time.
    pub time_limit: Duration,
    /// The cost model's target.
    pub profile: Profile,
    /// Rule families to use (names from [`rules::FAMILIES`]).
    pub families: Vec<String>,
    /// Merge LoRA adapters into their base weights (`x @ W + s·(x @ A) @ B` →
    /// `x @ (W + s·AB)`, the `lora` family). Default true; false leaves the `lora` family out
    /// even when `families` names it, keeping adapters as separate matmuls so a server can swap
    /// them per request (multi-adapter serving).
    pub merge_lora: bool,
    /// How a tensor-parallel session lays the model out (`--tp-layout`; default: chosen by
    /// cost, [`place::TpLayout::Auto`]).
    pub tp_layout: place::TpLayout,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            node_limit: 200_000,
            iter_limit: 40,
            time_limit: Duration::from_secs(10),
            profile: Profile::gpu(),
            families: rules::FAMILIES.iter().map(|f| f.name.to_string()).collect(),
            merge_lora: true,
            tp_layout: place::TpLayout::default(),
        }
    }
}

impl Options {
    /// Defaults overridden by `TRANSFUSE_EGRAPH_NODES`, `TRANSFUSE_EGRAPH_ITERS` and
    /// `TRANSFUSE_EGRAPH_SECONDS` when set. A variable that is set must hold a valid limit
    /// ([`parse_count`], [`parse_seconds`]): anything else is [`PassError::Limit`] naming it.
    pub fn from_env() -> Result<Options, PassError> {
        let mut o = Options::default();
        let var = |k: &str| -> Result<Option<String>, PassError> {
            match std::env::var(k) {
                Ok(v) => Ok(Some(v)),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(v)) => Err(PassError::Limit {
                    name: k.to_string(),
                    value: v.to_string_lossy().into_owned(),
                    expected: "valid UTF-8",
                }),
            }
        };
        if let Some(v) = var("TRANSFUSE_EGRAPH_NODES")? {
            o.node_limit = parse_count("TRANSFUSE_EGRAPH_NODES", &v)?;
        }
        if let Some(v) = var("TRANSFUSE_EGRAPH_ITERS")? {
            o.iter_limit = parse_count("TRANSFUSE_EGRAPH_ITERS", &v)?;
        }
        if let Some(v) = var("TRANSFUSE_EGRAPH_SECONDS")? {
            o.time_limit = parse_seconds("TRANSFUSE_EGRAPH_SECONDS", &v)?;
        }
        if let Some(v) = var("TRANSFUSE_EGRAPH_WITHOUT")? {
            o.families = without_families("TRANSFUSE_EGRAPH_WITHOUT", &v)?;
        }
        Ok(o)
    }
}

/// Every rule family except those in the comma-separated `value` (named `name` for the
/// error): how `TRANSFUSE_EGRAPH_WITHOUT=attention` compares a model with and without a fusion.
/// An unknown family is [`PassError::Limit`] naming it.
pub fn without_families(name: &str, value: &str) -> Result<Vec<String>, PassError> {
    let drop: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    if let Some(bad) = drop
        .iter()
        .find(|f| !rules::FAMILIES.iter().any(|fam| fam.name == **f))
    {
        return Err(PassError::Limit {
            name: name.to_string(),
            value: bad.to_string(),
            expected: "rule family names: algebra, softmax, attention, norm, gemm, lora, rope",
        });
    }
    Ok(rules::FAMILIES
        .iter()
        .map(|f| f.name.to_string())
        .filter(|f| !drop.contains(&f.as_str()))
        .collect())
}

/// A node or iteration limit named `name` (a flag or a variable, for the error): a whole
/// number from 1 to `usize::MAX`, surrounding spaces allowed.
pub fn parse_count(name: &str, value: &str) -> Result<usize, PassError> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| PassError::Limit {
            name: name.to_string(),
            value: value.to_string(),
            expected: "a whole number ≥ 1",
        })
}

/// A time limit in seconds named `name` (a flag or a variable, for the error): a finite number
/// > 0 that a [`Duration`] holds (below 2⁶⁴ s), fractions allowed.
pub fn parse_seconds(name: &str, value: &str) -> Result<Duration, PassError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| PassError::Limit {
            name: name.to_string(),
            value: value.to_string(),
            expected: "a number of seconds > 0 and below 1.8e19",
        })
}

/// What saturation did.
#[derive(Clone, Debug, PartialEq)]
pub struct EgraphReport {
    /// E-nodes at the end.
    pub nodes: usize,
    /// E-classes at the end.
    pub classes: usize,
    /// Iterations run.
    pub iterations: usize,
    /// `saturated`, `iteration_limit`, `node_limit`, `time_limit` or another reason.
    pub stop_reason: String,
    /// Seconds spent saturating.
    pub seconds: f64,
}

/// What the optimizer did.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Op name → count before.
    pub ops_before: BTreeMap<String, usize>,
    /// Op name → count after.
    pub ops_after: BTreeMap<String, usize>,
    /// Saturation statistics.
    pub egraph: EgraphReport,
    /// Rule name → times applied.
    pub rules_applied: BTreeMap<String, usize>,
    /// The extracted graph's estimated cost (seconds under the profile).
    pub cost_after: f64,
    /// The input graph's estimated cost under the same model.
    pub cost_before: f64,
    /// Seconds for the whole optimization.
    pub seconds: f64,
}

/// Errors of the optimizer (they indicate a bug: rules preserve well-typedness).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The extracted graph failed IR validation.
    #[error("optimizer produced an invalid graph: {0}")]
    Invalid(#[from] IrError),
    /// A limit from a flag or an environment variable that is not a valid value.
    #[error("{name}: expected {expected}, got `{value}`")]
    Limit {
        /// The flag (`--time-limit`) or variable (`TRANSFUSE_EGRAPH_SECONDS`).
        name: String,
        /// The value given.
        value: String,
        /// What a valid value is.
        expected: &'static str,
    },
}

fn stop_name(r: &Option<StopReason>) -> String {
    match r {
        Some(StopReason::Saturated) => "saturated".into(),
        Some(StopReason::IterationLimit(_)) => "iteration_limit".into(),
        Some(StopReason::NodeLimit(_)) => "node_limit".into(),
        Some(StopReason::TimeLimit(_)) => "time_limit".into(),
        Some(StopReason::Other(s)) => s.clone(),
        None => "none".into(),
    }
}

/// Optimizes `g` with the rule families named in `opts` (less `lora` unless
/// [`Options::merge_lora`]).
pub fn optimize(g: &Graph, opts: &Options) -> Result<(Graph, Report), PassError> {
    let rules: Vec<Rule> = opts
        .families
        .iter()
        .filter(|f| opts.merge_lora || f.as_str() != "lora")
        .flat_map(|f| rules::family(f))
        .collect();
    optimize_with(g, opts, &rules)
}

/// Optimizes `g` with an explicit rule set (tests use this for explosive rules).
pub fn optimize_with(
    g: &Graph,
    opts: &Options,
    rules: &[Rule],
) -> Result<(Graph, Report), PassError> {
    let t0 = Instant::now();
    let mut eg = analysis::EG::default();
    let root = convert::to_egraph(g, &mut eg);
    eg.rebuild();
    let cost_before = extract::extract(&eg, root, &opts.profile).0;
    let t_sat = Instant::now();
    let runner = Runner::default()
        .with_egraph(eg)
        .with_node_limit(opts.node_limit)
        .with_iter_limit(opts.iter_limit)
        .with_time_limit(opts.time_limit)
        .run(rules);
    let sat_seconds = t_sat.elapsed().as_secs_f64();
    let mut rules_applied = BTreeMap::new();
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *rules_applied.entry(name.to_string()).or_insert(0) += n;
        }
    }
    let eg = &runner.egraph;
    let root = eg.find(root);
    let (cost_after, expr) = extract::extract(eg, root, &opts.profile);
    let names: Vec<String> = g.outputs().iter().map(|(n, _)| n.clone()).collect();
    let out = convert::from_recexpr(&expr, &names)?;
    let report = Report {
        ops_before: g.op_counts(),
        ops_after: out.op_counts(),
        egraph: EgraphReport {
            nodes: eg.total_number_of_nodes(),
            classes: eg.number_of_classes(),
            iterations: runner.iterations.len(),
            stop_reason: stop_name(&runner.stop_reason),
            seconds: sat_seconds,
        },
        rules_applied,
        cost_after,
        cost_before,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((out, report))
}

#[cfg(test)]
mod without_tests {
    use super::*;

    #[test]
    fn without_drops_only_the_named_families_and_names_every_family_when_refusing() {
        let all: Vec<&str> = rules::FAMILIES.iter().map(|f| f.name).collect();
        let kept = without_families("X", " attention , lora").unwrap();
        assert_eq!(kept.len(), all.len() - 2);
        assert!(!kept.iter().any(|f| f == "attention" || f == "lora"));
        let Err(PassError::Limit {
            value, expected, ..
        }) = without_families("X", "nope")
        else {
            panic!("an unknown family is refused");
        };
        assert_eq!(value, "nope");
        for f in all {
            assert!(expected.contains(f), "the error lists `{f}`: {expected}");
        }
    }
}
