//! Extraction: pick one e-node per e-class so that the graph reachable from the root is
//! cheapest under the cost model.
//!
//! Two phases. egg's greedy extractor, with each class's cost shared among its parents, gives
//! a start. Then a local search re-prices the whole extracted DAG, where a tensor used by many
//! consumers is paid once: for every reachable class it tries each alternative e-node and keeps
//! a switch that lowers the DAG's total cost (a cyclic choice costs infinity). This is what
//! lets a shared mask be dropped for a `causal` flag, a decision that per-path costs get wrong.

use std::collections::{HashMap, HashSet};

use egg::{Extractor, Id, RecExpr};

use crate::analysis::EG;
use crate::cost::{node_cost, CostFn, Profile};
use crate::lang::TNode;

struct Search<'a> {
    eg: &'a EG,
    profile: &'a Profile,
    own: HashMap<TNode, f64>,
}

impl Search<'_> {
    fn own(&mut self, n: &TNode) -> f64 {
        if let Some(c) = self.own.get(n) {
            return *c;
        }
        let c = node_cost(self.eg, self.profile, n);
        self.own.insert(n.clone(), c);
        c
    }

    /// Total own cost of the classes reachable from `root`, or infinity on a cycle.
    fn dag_cost(&mut self, root: Id, choice: &HashMap<Id, TNode>) -> (f64, Vec<Id>) {
        let mut total = 0.0;
        let mut done: HashSet<Id> = HashSet::new();
        let mut on_stack: HashSet<Id> = HashSet::new();
        let mut order = Vec::new();
        // Iterative post-order DFS: (class, children pushed?)
        let mut stack = vec![(root, false)];
        while let Some((c, expanded)) = stack.pop() {
            if expanded {
                on_stack.remove(&c);
                if done.insert(c) {
                    let n = choice[&c].clone();
                    total += self.own(&n);
                    order.push(c);
                }
                continue;
            }
            if done.contains(&c) {
                continue;
            }
            if !on_stack.insert(c) {
                return (f64::INFINITY, vec![]);
            }
            stack.push((c, true));
            let Some(n) = choice.get(&c) else {
                return (f64::INFINITY, vec![]);
            };
            for k in &n.children {
                let k = self.eg.find(*k);
                if on_stack.contains(&k) {
                    return (f64::INFINITY, vec![]);
                }
                if !done.contains(&k) {
                    stack.push((k, false));
                }
            }
        }
        (total, order)
    }
}

fn canonical(eg: &EG, n: &TNode) -> TNode {
    TNode::new(
        n.op.clone(),
        n.children.iter().map(|c| eg.find(*c)).collect(),
    )
}

/// The cheapest graph from `root`: its DAG cost and the term.
pub fn extract(eg: &EG, root: Id, profile: &Profile) -> (f64, RecExpr<TNode>) {
    let root = eg.find(root);
    let greedy = Extractor::new(eg, CostFn::new(eg, profile));
    let mut choice: HashMap<Id, TNode> = HashMap::new();
    for class in eg.classes() {
        if greedy.find_best_cost(class.id).is_finite() {
            choice.insert(class.id, canonical(eg, greedy.find_best_node(class.id)));
        }
    }
    let mut s = Search {
        eg,
        profile,
        own: HashMap::new(),
    };
    let (mut best, mut order) = s.dag_cost(root, &choice);
    for _pass in 0..4 {
        let mut improved = false;
        for c in order.clone() {
            let current = choice[&c].clone();
            for alt in &eg[c].nodes {
                let alt = canonical(eg, alt);
                if alt == current || !s.own(&alt).is_finite() {
                    continue;
                }
                let prev = choice
                    .insert(c, alt.clone())
                    .expect("reachable classes have a choice");
                let (cost, new_order) = s.dag_cost(root, &choice);
                if cost < best * (1.0 - 1e-9) {
                    best = cost;
                    order = new_order;
                    improved = true;
                    break;
                }
                choice.insert(c, prev);
            }
        }
        if !improved {
            break;
        }
    }
    let mut expr = RecExpr::default();
    let mut index: HashMap<Id, Id> = HashMap::new();
    for c in order {
        let n = &choice[&c];
        let kids = n.children.iter().map(|k| index[&eg.find(*k)]).collect();
        index.insert(c, expr.add(TNode::new(n.op.clone(), kids)));
    }
    (best, expr)
}
