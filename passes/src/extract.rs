//! Extraction: pick one e-node per e-class so that the graph reachable from the root is
//! cheapest under the cost model.
//!
//! Two phases. First egg's greedy extractor with a critical-path cost (own cost plus the
//! costliest child): it never double-counts a tensor shared by many consumers (a per-path sum
//! grows exponentially with depth and drowns the local differences that decide fusion), and
//! being strictly increasing it never picks a cycle. Then a local search on the true DAG
//! cost, where a shared tensor is paid once: for every class in the extracted graph it tries
//! each alternative e-node, prices the switch incrementally with reference counts (only the
//! sub-graph that enters or leaves is touched), and keeps it when the total drops and no cycle
//! appears. This is what lets a shared mask be replaced by a `causal` flag. When a switch alone
//! does not pay because it brings in a new tensor that other classes could share, a group move
//! switches those classes too (each to its node over the new tensor) and keeps the lot when the
//! total drops: a merged projection (one matmul for q, k and v) costs more than any one of the
//! three it replaces and only wins when all three slice it.

use std::collections::{HashMap, HashSet};

use egg::{Id, Language, RecExpr};

use crate::analysis::EG;
use crate::cost::{inlined_classes, node_cost, Profile};
use crate::lang::TNode;

/// Greedy costs: own cost plus the costliest child, plus a tiny constant so every parent
/// costs more than each of its children. A worklist from the leaves up (a class is re-priced
/// when a child gets cheaper), so deep graphs cost O(classes), not O(classes × depth).
fn greedy(eg: &EG, dag: &mut Dag<'_>) -> HashMap<Id, (f64, TNode)> {
    let mut best: HashMap<Id, (f64, TNode)> = HashMap::new();
    let mut queue: std::collections::VecDeque<Id> = eg
        .classes()
        .filter(|c| c.nodes.iter().any(|n| n.children.is_empty()))
        .map(|c| c.id)
        .collect();
    let mut queued: std::collections::HashSet<Id> = queue.iter().copied().collect();
    while let Some(c) = queue.pop_front() {
        queued.remove(&c);
        let mut changed = false;
        for n in &eg[c].nodes {
            let n = canonical(eg, n);
            let mut worst: f64 = 0.0;
            let mut ok = true;
            for k in &n.children {
                match best.get(k) {
                    Some((kc, _)) => worst = worst.max(*kc),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                continue;
            }
            let cost = dag.own(&n) + 1e-12 + worst;
            if cost.is_finite() && best.get(&c).is_none_or(|(b, _)| cost < *b) {
                best.insert(c, (cost, n));
                changed = true;
            }
        }
        if changed {
            for p in eg[c].parents() {
                let p = eg.find(p);
                if queued.insert(p) {
                    queue.push_back(p);
                }
            }
        }
    }
    best
}

struct Dag<'a> {
    eg: &'a EG,
    profile: &'a Profile,
    inlined: HashSet<Id>,
    own: HashMap<TNode, f64>,
    choice: HashMap<Id, TNode>,
    rc: HashMap<Id, usize>,
    total: f64,
}

impl Dag<'_> {
    fn own(&mut self, n: &TNode) -> f64 {
        if let Some(c) = self.own.get(n) {
            return *c;
        }
        let c = node_cost(self.eg, self.profile, &self.inlined, n);
        self.own.insert(n.clone(), c);
        c
    }

    fn add_ref(&mut self, c: Id) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            let rc = self.rc.entry(c).or_insert(0);
            *rc += 1;
            if *rc == 1 {
                let n = self.choice[&c].clone();
                self.total += self.own(&n);
                stack.extend(n.children.iter().copied());
            }
        }
    }

    fn release(&mut self, c: Id) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            let rc = self
                .rc
                .get_mut(&c)
                .expect("released classes are referenced");
            *rc -= 1;
            if *rc == 0 {
                let n = self.choice[&c].clone();
                self.total -= self.own(&n);
                stack.extend(n.children.iter().copied());
            }
        }
    }

    /// Switches class `c` (in the DAG) to node `n`, returning the node it had.
    fn switch(&mut self, c: Id, n: TNode) -> TNode {
        let old = self
            .choice
            .insert(c, n.clone())
            .expect("classes in the DAG have a choice");
        self.total += self.own(&n) - self.own(&old);
        for k in &n.children {
            self.add_ref(*k);
        }
        for k in &old.children {
            self.release(*k);
        }
        old
    }

    /// The group move: after `c` switched to a node that brings in the classes `fresh`, every
    /// other class in the DAG with a node over a fresh (non-leaf) class switches to that node
    /// too, so the new tensor is paid once for all its consumers. Returns the switched
    /// classes with the nodes they had.
    fn co_switch(&mut self, c: Id, fresh: &[Id]) -> Vec<(Id, TNode)> {
        let eg = self.eg;
        let mut moved = vec![];
        for &k in fresh {
            if self.choice[&k].is_leaf() {
                continue;
            }
            let mut parents: Vec<Id> = eg[k].parents().map(|p| eg.find(p)).collect();
            parents.sort();
            parents.dedup();
            for p in parents {
                if p == c || self.rc.get(&p).copied().unwrap_or(0) == 0 {
                    continue;
                }
                let alt = eg[p].nodes.iter().map(|n| canonical(eg, n)).find(|n| {
                    n.children.contains(&k)
                        && n != &self.choice[&p]
                        && n.children.iter().all(|x| self.choice.contains_key(x))
                });
                if let Some(alt) = alt.filter(|n| self.own(n).is_finite()) {
                    let old = self.switch(p, alt);
                    moved.push((p, old));
                }
            }
        }
        moved
    }

    /// True if the current choices have a cycle through one of `starts` (the classes just
    /// switched: the DAG was acyclic before, so any new cycle passes through one of them). One
    /// depth-first walk for all of them, however many a group move switched.
    fn cyclic(&self, starts: &[Id]) -> bool {
        // 1: on the walk's path, 2: done.
        let mut state: HashMap<Id, u8> = HashMap::new();
        for &s in starts {
            if state.contains_key(&s) {
                continue;
            }
            state.insert(s, 1);
            let mut path: Vec<(Id, usize)> = vec![(s, 0)];
            while let Some((c, i)) = path.last_mut() {
                let kids = &self.choice[c].children;
                if let Some(&k) = kids.get(*i) {
                    *i += 1;
                    match state.get(&k) {
                        Some(1) => return true,
                        Some(_) => {}
                        None => {
                            state.insert(k, 1);
                            path.push((k, 0));
                        }
                    }
                } else {
                    state.insert(*c, 2);
                    path.pop();
                }
            }
        }
        false
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
    let mut dag = Dag {
        eg,
        profile,
        inlined: inlined_classes(eg),
        own: HashMap::new(),
        choice: HashMap::new(),
        rc: HashMap::new(),
        total: 0.0,
    };
    let t0 = std::time::Instant::now();
    dag.choice = greedy(eg, &mut dag)
        .into_iter()
        .map(|(c, (_, n))| (c, n))
        .collect();
    let t_greedy = t0.elapsed();
    if !dag.choice.contains_key(&root) {
        return (f64::INFINITY, RecExpr::default());
    }
    dag.add_ref(root);
    for _pass in 0..4 {
        let mut improved = false;
        let mut classes: Vec<Id> = dag
            .rc
            .iter()
            .filter(|(_, &r)| r > 0)
            .map(|(c, _)| *c)
            .collect();
        classes.sort();
        for c in classes {
            if dag.rc.get(&c).copied().unwrap_or(0) == 0 || eg[c].nodes.len() < 2 {
                continue;
            }
            for alt in eg[c]
                .nodes
                .iter()
                .map(|n| canonical(eg, n))
                .collect::<Vec<_>>()
            {
                if alt == dag.choice[&c]
                    || !dag.own(&alt).is_finite()
                    || alt.children.iter().any(|k| !dag.choice.contains_key(k))
                {
                    continue;
                }
                let before = dag.total;
                let fresh: Vec<Id> = alt
                    .children
                    .iter()
                    .copied()
                    .filter(|k| dag.rc.get(k).copied().unwrap_or(0) == 0)
                    .collect();
                let old = dag.switch(c, alt.clone());
                let mut moved = vec![(c, old)];
                if dag.total >= before - 1e-12 * before.abs() {
                    moved.extend(dag.co_switch(c, &fresh));
                }
                let switched: Vec<Id> = moved.iter().map(|(k, _)| *k).collect();
                if dag.total < before - 1e-12 * before.abs() && !dag.cyclic(&switched) {
                    improved = true;
                    break;
                }
                for (k, n) in moved.into_iter().rev() {
                    dag.switch(k, n);
                }
                dag.total = before;
            }
        }
        if !improved {
            break;
        }
    }
    if std::env::var_os("TRANSFUSE_EXTRACT_TIMING").is_some() {
        eprintln!(
            "extract: greedy {:?}, search {:?}",
            t_greedy,
            t0.elapsed() - t_greedy
        );
    }
    // Emit the reachable classes in post-order.
    let mut expr = RecExpr::default();
    let mut index: HashMap<Id, Id> = HashMap::new();
    let mut stack = vec![(root, false)];
    while let Some((c, expanded)) = stack.pop() {
        if index.contains_key(&c) {
            continue;
        }
        let n = &dag.choice[&c];
        if expanded {
            let kids = n.children.iter().map(|k| index[k]).collect();
            index.insert(c, expr.add(TNode::new(n.op.clone(), kids)));
        } else {
            stack.push((c, true));
            stack.extend(
                n.children
                    .iter()
                    .filter(|k| !index.contains_key(k))
                    .map(|k| (*k, false)),
            );
        }
    }
    (dag.total, expr)
}
