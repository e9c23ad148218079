//! Rewrite rules, one file per family, each a table of named rules.
//!
//! Three ways to write a rule: a plain pattern pair ([`rw`]); a pattern whose right-hand side is
//! built in Rust from the match, for attributes computed from constants ([`rw_build`]); and a
//! [`NodeRule`], a Rust function over one e-node, for shapes patterns cannot state (reshapes of
//! any rank, fused ops with any attribute).

use egg::{Applier, Id, Pattern, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use transfuse_ir::{DType, Op, Scalar};

use crate::analysis::{TAnalysis, EG};
use crate::cost::Sizes;
use crate::lang::{EOp, TNode};

pub mod algebra;
pub mod attention;
pub mod gemm;
pub mod lora;
pub mod norm;
pub mod rope;
pub mod softmax;

/// A rewrite rule of the optimizer.
pub type Rule = Rewrite<TNode, TAnalysis>;

/// A pattern variable.
pub fn var(s: &str) -> Var {
    s.parse().expect("valid pattern variable")
}

fn pattern(s: &str) -> Pattern<TNode> {
    s.parse()
        .unwrap_or_else(|e| panic!("bad pattern {s}: {e:?}"))
}

/// `lhs => rhs`.
pub fn rw(name: &str, lhs: &str, rhs: &str) -> Rule {
    Rewrite::new(name, pattern(lhs), pattern(rhs)).expect("valid rule")
}

/// A right-hand side built in Rust; `None` declines the match.
pub struct Build(pub fn(&mut EG, &Subst) -> Option<Id>);

impl Applier<TNode, TAnalysis> for Build {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        match (self.0)(eg, subst) {
            Some(new) if eg.union(eclass, new) => vec![eclass],
            _ => vec![],
        }
    }
}

/// `lhs => build(match)`.
pub fn rw_build(name: &str, lhs: &str, build: fn(&mut EG, &Subst) -> Option<Id>) -> Rule {
    Rewrite::new(name, pattern(lhs), Build(build)).expect("valid rule")
}

/// An expression to add: existing classes and new nodes over them.
#[derive(Clone, Debug)]
pub enum Plan {
    /// An existing e-class.
    Class(Id),
    /// A new node over planned children.
    Node(EOp, Vec<Plan>),
}

impl Plan {
    /// An IR op over planned children.
    pub fn ir(op: Op, kids: Vec<Plan>) -> Plan {
        Plan::Node(EOp::Ir(op), kids)
    }

    /// An f32 scalar constant.
    pub fn scalar(v: f64) -> Plan {
        Plan::ir(
            Op::Constant {
                value: Scalar(v),
                dtype: DType::F32,
            },
            vec![],
        )
    }

    /// Adds the plan to the e-graph.
    pub fn add(&self, eg: &mut EG) -> Id {
        match self {
            Plan::Class(id) => *id,
            Plan::Node(op, kids) => {
                let kids = kids.iter().map(|k| k.add(eg)).collect();
                eg.add(TNode::new(op.clone(), kids))
            }
        }
    }
}

/// A rule written as a Rust function of one e-node: it returns an equivalent expression.
pub struct NodeRule(pub fn(&EG, &TNode) -> Option<Plan>);

impl Searcher<TNode, TAnalysis> for NodeRule {
    fn search_eclass_with_limit(
        &self,
        eg: &EG,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, TNode>> {
        if limit == 0 || !eg[eclass].nodes.iter().any(|n| (self.0)(eg, n).is_some()) {
            return None;
        }
        Some(SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<TNode, TAnalysis> for NodeRule {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<TNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let plans: Vec<Plan> = eg[eclass]
            .nodes
            .iter()
            .filter_map(|n| (self.0)(eg, n))
            .collect();
        let mut changed = vec![];
        for p in plans {
            let id = p.add(eg);
            if eg.union(eclass, id) {
                changed.push(eclass);
            }
        }
        changed
    }
}

/// A [`NodeRule`] as a rewrite.
pub fn node_rule(name: &str, f: fn(&EG, &TNode) -> Option<Plan>) -> Rule {
    Rewrite::new(name, NodeRule(f), NodeRule(f)).expect("valid rule")
}

/// The nodes of a class whose op satisfies `pred`.
pub fn nodes_where<'a>(
    eg: &'a EG,
    id: Id,
    pred: impl Fn(&EOp) -> bool + 'a,
) -> impl Iterator<Item = &'a TNode> + 'a {
    eg[id].nodes.iter().filter(move |n| pred(&n.op))
}

/// One rule family: its rules and the compute cost of the fused ops it produces, together, so
/// that adding a fused op touches its family's file and, for a new family, one line of
/// [`FAMILIES`].
pub struct Family {
    /// The family's name (`Options::families`, the `--no-fuse` names).
    pub name: &'static str,
    /// Its rules.
    pub rules: fn() -> Vec<Rule>,
    /// Flops of a fused op this family produces (`None`: not one of its ops); bytes moved and
    /// launches are the cost model's own (see [`crate::cost`]).
    pub flops: fn(&Op, &Sizes) -> Option<f64>,
}

/// For families that produce no fused op of their own.
pub fn no_flops(_: &Op, _: &Sizes) -> Option<f64> {
    None
}

/// Every rule family, in the order they are registered.
#[rustfmt::skip]
pub const FAMILIES: &[Family] = &[
    Family { name: "algebra",   rules: algebra::rules,   flops: no_flops },
    Family { name: "softmax",   rules: softmax::rules,   flops: no_flops },
    Family { name: "attention", rules: attention::rules, flops: attention::flops },
    Family { name: "norm",      rules: norm::rules,      flops: no_flops },
    Family { name: "gemm",      rules: gemm::rules,      flops: gemm::flops },
    Family { name: "lora",      rules: lora::rules,      flops: no_flops },
    Family { name: "rope",      rules: rope::rules,      flops: rope::flops },
];

/// The rules of one family (none for an unknown name).
pub fn family(name: &str) -> Vec<Rule> {
    FAMILIES
        .iter()
        .find(|f| f.name == name)
        .map_or_else(Vec::new, |f| (f.rules)())
}

/// Every rule of every family.
pub fn all() -> Vec<Rule> {
    FAMILIES.iter().flat_map(|f| (f.rules)()).collect()
}
