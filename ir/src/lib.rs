//! # transfuse-ir
//!
//! The tensor graph every later stage of transfuse rewrites: primitive ops in declarative tables
//! ([`op`]), shapes with symbolic dims bound at run time ([`dim`]), shape and dtype inference at
//! insertion ([`graph`]), a builder whose composite helpers emit primitives only ([`builder`]),
//! the primitive decomposition of every fused op ([`decompose`](mod@decompose)), and a stable
//! text form and Graphviz export ([`print`](mod@print)).
//!
//! ```
//! use transfuse_ir::{Builder, DType, Dim, to_text};
//!
//! let mut b = Builder::new();
//! let x = b.input("x", vec![Dim::sym("batch"), 8.into()], DType::F32).unwrap();
//! let y = b.softmax(x).unwrap();
//! b.output("y", y);
//! let g = b.finish();
//! assert_eq!(g.op_counts()["exp"], 1);
//! assert!(to_text(&g).contains("reduce_max{axes=[1] keepdim}(%0) : f32[batch, 1]"));
//! ```
#![warn(missing_docs)]

pub mod builder;
pub mod decompose;
pub mod dim;
mod fused;
pub mod graph;
pub mod op;
pub mod print;
pub mod tensor;

pub use builder::{BResult, Builder, WeightLayout};
pub use decompose::decompose;
pub use dim::{eval_shape, shape, shape_string, Bindings, Dim, Shape};
pub use fused::kv_group;
pub use graph::{broadcast_shapes, infer, Graph, Node, NodeId};
pub use op::{
    inlines_into, Act, BinaryOp, CmpOp, DType, DistOp, KernelRole, Op, ReduceOp, Scalar, UnaryOp,
};
pub use print::{to_dot, to_text};
pub use tensor::{Data, Tensor, Weights};

/// Errors of graph construction and shape evaluation.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum IrError {
    /// An op's operands do not fit it.
    #[error("op `{op}` (node %{node}): {msg}")]
    Shape {
        /// The op's printable name.
        op: String,
        /// The node id it would have had.
        node: u32,
        /// What is wrong.
        msg: String,
    },
    /// An operand refers to a node that does not exist.
    #[error("operand %{0} does not exist")]
    UnknownNode(u32),
    /// A symbolic dim has no value.
    #[error("symbolic dim `{0}` is not bound")]
    UnboundSymbol(String),
    /// A dim evaluated to a negative size.
    #[error("dim {0} is negative")]
    NegativeDim(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn bad_shapes_are_typed_errors_naming_the_op() {
        let mut b = Builder::new();
        let x = b.input("x", shape([2usize, 3]), DType::F32).unwrap();
        let y = b.input("y", shape([4usize, 5]), DType::F32).unwrap();
        let e = b.matmul(x, y).unwrap_err();
        assert_eq!(
            e.to_string(),
            "op `matmul` (node %2): inner dims differ: [2, 3] × [4, 5]"
        );
        let e = b.add(x, y).unwrap_err();
        assert!(e.to_string().contains("do not broadcast"), "{e}");
        let e = b.reshape(x, shape([7usize])).unwrap_err();
        assert!(e.to_string().starts_with("op `reshape`"), "{e}");
        let ids = b.input("ids", shape([2usize]), DType::F32).unwrap();
        assert!(b.gather(x, ids).is_err());
        assert_eq!(b.graph().len(), 3, "failed ops leave the graph unchanged");
    }

    #[test]
    fn symbolic_shapes_flow_through_attention() {
        let mut b = Builder::new();
        let q = b
            .input(
                "q",
                vec![Dim::sym("batch"), Dim::sym("seq"), 16.into()],
                DType::F32,
            )
            .unwrap();
        let past = b
            .input(
                "past",
                vec![Dim::sym("batch"), 2.into(), Dim::sym("past"), 8.into()],
                DType::F32,
            )
            .unwrap();
        let qh = b.split_heads(q, 2).unwrap();
        let k = b.concat(&[past, qh], 2).unwrap();
        let o = b.attention(qh, k, k, None).unwrap();
        let m = b.merge_heads(o).unwrap();
        assert_eq!(shape_string(b.shape(k)), "[batch, 2, past+seq, 8]");
        assert_eq!(shape_string(b.shape(m)), "[batch, seq, 16]");
    }

    #[test]
    fn text_form_is_stable() {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![Dim::sym("batch"), 4.into()], DType::F32)
            .unwrap();
        let g = b.weight("g", shape([4usize])).unwrap();
        let beta = b.weight("b", shape([4usize])).unwrap();
        let y = b.layer_norm(x, g, beta, 1e-5).unwrap();
        b.output("y", y);
        let graph = b.finish();
        expect![[r#"
            %0 = input{"x"}() : f32[batch, 4]
            %1 = weight{"g"}() : f32[4]
            %2 = weight{"b"}() : f32[4]
            %3 = reduce_mean{axes=[1] keepdim}(%0) : f32[batch, 1]
            %4 = sub(%0, %3) : f32[batch, 4]
            %5 = mul(%4, %4) : f32[batch, 4]
            %6 = reduce_mean{axes=[1] keepdim}(%5) : f32[batch, 1]
            %7 = const{1e-5}() : f32[]
            %8 = add(%6, %7) : f32[batch, 1]
            %9 = rsqrt(%8) : f32[batch, 1]
            %10 = mul(%4, %9) : f32[batch, 4]
            %11 = mul(%10, %1) : f32[batch, 4]
            %12 = add(%11, %2) : f32[batch, 4]
            out "y" = %12
        "#]]
        .assert_eq(&to_text(&graph));
        let dot = to_dot(&graph);
        assert!(dot.starts_with("digraph transfuse {"));
        assert!(dot.contains("n4 -> n5 [label=\"0\"]"));
        assert!(dot.contains("\"out:y\""));
    }
}
