//! The stable text form of a graph (for snapshot tests and `transfuse graph`) and Graphviz DOT.
//!
//! One line per node in topological order, then one line per output:
//! `%7 = matmul(%5, %6) : f32[batch, seq, 64]`, `%9 = reduce_max{axes=[3] keepdim}(%8) : …`,
//! `out "logits" = %40`. The form depends only on the graph, never on addresses or hash order.

use std::fmt::Write;

use crate::dim::shape_string;
use crate::graph::Graph;

/// The graph as text, one node per line.
pub fn to_text(g: &Graph) -> String {
    let mut s = String::new();
    for (id, n) in g.nodes() {
        let attrs = n.op.attrs();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!("{{{attrs}}}")
        };
        let args: Vec<String> = n.inputs.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(
            s,
            "{id} = {}{attrs}({}) : {}{}",
            n.op.name(),
            args.join(", "),
            n.dtype,
            shape_string(&n.shape)
        );
    }
    for (name, id) in g.outputs() {
        let _ = writeln!(s, "out {name:?} = {id}");
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph as Graphviz DOT: a box per node (op, attributes, dtype and shape), an edge per
/// operand labelled with its position, and an ellipse per named output.
pub fn to_dot(g: &Graph) -> String {
    let mut s = String::from("digraph transfuse {\n  node [shape=box, fontname=\"monospace\"];\n");
    for (id, n) in g.nodes() {
        let label = format!(
            "{id} {} {}\\n{}{}",
            n.op.name(),
            escape(&n.op.attrs()),
            n.dtype,
            shape_string(&n.shape)
        );
        let _ = writeln!(s, "  n{} [label=\"{label}\"];", id.0);
        for (k, i) in n.inputs.iter().enumerate() {
            let _ = writeln!(s, "  n{} -> n{} [label=\"{k}\"];", i.0, id.0);
        }
    }
    for (name, id) in g.outputs() {
        let _ = writeln!(
            s,
            "  \"out:{0}\" [shape=ellipse, label=\"{0}\"];",
            escape(name)
        );
        let _ = writeln!(s, "  n{} -> \"out:{}\";", id.0, escape(name));
    }
    s.push_str("}\n");
    s
}
