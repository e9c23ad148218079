//! The op set: one declarative table per op family, each op with a stable printable name.
//!
//! The fused ops (softmax, attention, norms, matmul epilogues) are declared in [`Op`] too, but
//! appear only as the optimizer's output; their names, attributes, inference and decomposition
//! live in `fused.rs`.

use std::fmt;

use crate::dim::{shape_string, Dim, Shape};

/// Element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit float: activations and weights.
    F32,
    /// 64-bit integer: token ids, masks, positions.
    I64,
    /// Boolean: results of comparisons.
    Bool,
    /// 16-bit IEEE float, a *host tensor* type: checkpoint weights kept in their precision
    /// for a device that stores them so. Graph tensors are never f16 (inference refuses it):
    /// the device's storage precision is a lowering option (`LowerOptions::elem`), not a
    /// graph dtype, so no rewrite ever sees a dtype change.
    F16,
    /// bfloat16, a host tensor type as [`DType::F16`].
    BF16,
}

impl DType {
    /// The printable name (`f32`, `i64`, `bool`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::Bool => "bool",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// True for the float types (f32, f16, bf16).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An f64 attribute (constant value, scale, epsilon) with total equality, order and hash by
/// its bits, so ops can be compared and hashed (the optimizer's e-graph needs both).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalar(pub f64);

impl Eq for Scalar {}

impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scalar {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl std::hash::Hash for Scalar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}", self.0)
    }
}

/// Declares a fieldless op enum with its printable names, both directions.
macro_rules! op_table {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $variant,)* }

        impl $name {
            /// Every variant, in table order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The printable name.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }

            /// The variant with this printable name.
            pub fn from_name(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)* _ => None }
            }
        }
    };
}

op_table! {
    /// Elementwise unary ops (f32 unless noted).
    UnaryOp {
        /// -x (f32 and i64)
        Neg = "neg",
        /// e^x
        Exp = "exp",
        /// ln x
        Log = "log",
        /// √x
        Sqrt = "sqrt",
        /// 1/√x
        Rsqrt = "rsqrt",
        /// tanh x
        Tanh = "tanh",
        /// the Gauss error function
        Erf = "erf",
        /// 1/x
        Recip = "recip",
        /// max(x, 0)
        Relu = "relu",
        /// 1/(1+e^-x)
        Sigmoid = "sigmoid",
        /// |x| (f32 and i64)
        Abs = "abs",
        /// sin x
        Sin = "sin",
        /// cos x
        Cos = "cos",
        /// logical not (bool)
        Not = "not",
    }
}

op_table! {
    /// Elementwise binary ops with numpy broadcasting; both operands share one dtype.
    BinaryOp {
        /// a + b
        Add = "add",
        /// a - b
        Sub = "sub",
        /// a * b
        Mul = "mul",
        /// a / b
        Div = "div",
        /// max(a, b)
        Max = "max",
        /// min(a, b)
        Min = "min",
        /// a^b (f32)
        Pow = "pow",
    }
}

op_table! {
    /// Comparisons with broadcasting; the result is bool.
    CmpOp {
        /// a == b
        Eq = "eq",
        /// a != b
        Ne = "ne",
        /// a < b
        Lt = "lt",
        /// a <= b
        Le = "le",
        /// a > b
        Gt = "gt",
        /// a >= b
        Ge = "ge",
    }
}

op_table! {
    /// The activation of a matmul epilogue.
    Act {
        /// no activation
        Identity = "identity",
        /// exact GELU (erf)
        GeluErf = "gelu_erf",
        /// tanh-approximated GELU
        GeluTanh = "gelu_tanh",
        /// max(x, 0)
        Relu = "relu",
        /// x·sigmoid(x)
        Silu = "silu",
    }
}

op_table! {
    /// Reductions over a set of axes.
    ReduceOp {
        /// Σ
        Sum = "sum",
        /// max
        Max = "max",
        /// arithmetic mean
        Mean = "mean",
    }
}

/// The ops of tensor parallelism (`transfuse_passes::shard`'s output): collectives across the
/// `world` ranks of a tensor-parallel group, and the rank-local slice. Every rank runs the same
/// graph; a backend needs a communicator to run them where `world > 1` (a world of 1 is the
/// identity). One `Op` variant for the family, so the ops touch one arm of each match.
#[allow(missing_docs)] // variant fields are described on the variant
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DistOp {
    /// Elementwise sum of the operand over all ranks; every rank gets the sum (same shape).
    AllReduce,
    /// The ranks' operands concatenated along `axis` in rank order (`axis` grows `world`×).
    AllGather { axis: usize, world: usize },
    /// This rank's `1/world` contiguous chunk of a replicated operand along `axis` (no
    /// communication; the axis length must divide).
    Shard { axis: usize, world: usize },
    /// The elementwise sum over ranks, of which this rank keeps its `1/world` contiguous chunk
    /// along `axis` (the axis length must divide): an all-reduce's first half.
    ReduceScatter { axis: usize, world: usize },
    /// Sends the operand to rank `peer` (point to point: a pipeline stage's activations to
    /// the next stage); its value is the operand, unchanged.
    Send { peer: usize },
    /// Receives a tensor from rank `peer`; the operand only gives the shape and type of what
    /// arrives (its values are not read).
    Recv { peer: usize },
    /// The operand on rank 0, zeros of its shape on every other rank (no communication): a
    /// term added to the partial sums of an `all_reduce` once, exactly (the bias and the
    /// residual of a row-parallel matmul added in its epilogue before the reduce). A world of
    /// one is the identity. `transfuse_passes::shard::for_rank` removes it per rank before
    /// loading (the operand itself on rank 0; on the others the epilogue term it feeds is
    /// dropped).
    RootOnly,
}

impl DistOp {
    /// The printable name (`all_reduce`, `all_gather`, `shard`, `reduce_scatter`, `send`,
    /// `recv`, `root_only`).
    pub fn name(self) -> &'static str {
        match self {
            DistOp::AllReduce => "all_reduce",
            DistOp::AllGather { .. } => "all_gather",
            DistOp::Shard { .. } => "shard",
            DistOp::ReduceScatter { .. } => "reduce_scatter",
            DistOp::Send { .. } => "send",
            DistOp::Recv { .. } => "recv",
            DistOp::RootOnly => "root_only",
        }
    }
}

/// One node's operation. Operands are the node's inputs, in order.
#[allow(missing_docs)] // variant fields are described on the variant
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A named graph input (token ids, masks, KV cache) with its declared shape.
    Input {
        name: String,
        shape: Shape,
        dtype: DType,
    },
    /// A named weight, bound to a tensor when the graph runs (always f32).
    Weight { name: String, shape: Shape },
    /// A scalar constant (shape `[]`).
    Constant { value: Scalar, dtype: DType },
    /// `[start, start+1, …, start+len-1]` as i64, shape `[len]`; the way positions and causal
    /// masks see symbolic lengths.
    Iota { start: Dim, len: Dim },
    /// Elementwise unary.
    Unary(UnaryOp),
    /// Elementwise binary with broadcasting.
    Binary(BinaryOp),
    /// Comparison with broadcasting, giving bool.
    Compare(CmpOp),
    /// `where(cond, a, b)`, broadcasting all three.
    Where,
    /// Reduction over `axes` (sorted, unique).
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdim: bool,
    },
    /// Batched matmul `[.., m, k] × [.., k, n]`, batch dims broadcast.
    MatMul,
    /// Reinterpret the elements with a new shape of the same size.
    Reshape { shape: Shape },
    /// Reorder axes: output axis `i` is input axis `perm[i]`.
    Permute { perm: Vec<usize> },
    /// Broadcast size-1 axes (and new leading axes) to `shape`.
    Expand { shape: Shape },
    /// Elements `start..end` along `axis`.
    Slice { axis: usize, start: Dim, end: Dim },
    /// Join all operands along `axis`.
    Concat { axis: usize },
    /// Embedding lookup: `table[ids]`; table `[V, rest..]`, ids integer → `ids.shape ++ rest`.
    Gather,
    /// Convert the element type.
    Cast { dtype: DType },
    /// A collective or rank-local op of tensor parallelism ([`DistOp`]).
    Dist(DistOp),

    // ---- Fused ops: produced only by the optimizer (transfuse-passes). Each has a CPU
    // ---- implementation and a primitive decomposition, held equal by tests; everything the
    // ---- IR knows about one (name, attributes, inference, decomposition) is in `fused.rs`.
    /// `softmax(x·scale [+ mask])` over the last axis; operands `x [, mask]`, the additive mask
    /// broadcasting to `x`.
    Softmax { scale: Scalar },
    /// `softmax(q kᵀ·scale [+ mask] [causal] [window]) v`; operands `q [.., sq, d]`,
    /// `k [.., sk, d]`, `v [.., sk, dv] [, mask]` (additive, broadcasting to `[.., sq, sk]`).
    /// `causal`: query `i` sees keys `j <= i + sk - sq`; `window`: and only the last `window`
    /// of those.
    /// `k`, `v` may have fewer heads than `q` (axis `r - 3`, a divisor): grouped-query
    /// attention, query head `i` reading key/value head `i / group` (see [`crate::kv_group`]).
    Attention {
        scale: Scalar,
        causal: bool,
        window: Option<usize>,
    },
    /// `(x - E[x]) / √(Var[x] + eps) · gamma + beta` over the last axis; operands
    /// `x, gamma, beta` (gamma/beta broadcast to `x`).
    LayerNorm { eps: Scalar },
    /// `x / √(E[x²] + eps) · gamma` over the last axis; operands `x, gamma`.
    RmsNorm { eps: Scalar },
    /// Layer norm over each of `groups` channel groups of `x [N, C, ..]`; operands
    /// `x, gamma, beta` (broadcast to `x`).
    GroupNorm { groups: usize, eps: Scalar },
    /// Normalisation over the spatial axes of each channel of `x [N, C, ..]`; operands
    /// `x, gamma, beta` (broadcast to `x`).
    InstanceNorm { eps: Scalar },
    /// Inference batch norm with running statistics and affine folded: `x · scale + shift`
    /// with per-channel `scale`, `shift` broadcast to `x [N, C, ..]`.
    BatchNorm,
    /// A gated MLP's two projections in one: `act(x @ w_gate) · (x @ w_up)` (SwiGLU with
    /// `act = silu`); operands `x, w_gate, w_up` (the two weights of one shape).
    GatedMatMul { act: Act },
    /// Rotary position embedding in transformers' rotate-half form: `x·cos + rotate_half(x)·sin`
    /// with `rotate_half(x) = concat(−x[.., d/2..], x[.., ..d/2])` over the last axis (`d`
    /// known and even); operands `x, cos, sin` (cos/sin broadcast to `x`, e.g. `[seq, d]`).
    Rope,
    /// `act(x @ w [+ bias]) [+ residual]`; operands `x, w [, bias] [, residual]`.
    FusedMatMul {
        act: Act,
        bias: bool,
        residual: bool,
    },
}

/// What an op becomes in the lowered launch plan (`codegen::lower`). The one classification
/// both the lowering's partition and the optimizer's cost model (`passes::cost`) read, so the
/// cost model prices the kernels that exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelRole {
    /// A buffer the caller provides (input, weight) or a scalar folded into its readers
    /// (constant): no kernel.
    Leaf,
    /// A strided view of its operand folded into its readers' indexing (reshape, permute,
    /// expand, slice): no kernel. (A reshape no strides express is read through a load remap,
    /// or copied for a reader that needs strides.)
    View,
    /// Read in place by an elementwise consumer or a reduction (gather: the table row by the
    /// id; iota), materialised by one kernel for any other consumer.
    Source,
    /// Unary, binary, compare, where, cast: inlined into its consumer when
    /// [`inlines_into`] holds and it has one use and is no graph output, else the root of one
    /// elementwise cluster kernel that computes the whole inlined chain.
    Elementwise,
    /// A kernel of its own that reads its operands and writes its output once: reductions,
    /// matmul, concat and every fused op.
    Kernel,
}

/// Whether an elementwise `producer` used once, by `consumer` only and not as a graph output,
/// is inlined into it (no kernel, no materialised tensor): consumers that take an elementwise
/// prologue are elementwise ops (the cluster grows) and reductions (the reduce kernel reads the
/// expression). A matmul, a fused op or a concat reads materialised operands.
pub fn inlines_into(producer: &Op, consumer: &Op) -> bool {
    producer.kernel_role() == KernelRole::Elementwise && consumer.takes_prologue()
}

impl Op {
    /// The op's printable name (`matmul`, `exp`, `reduce_sum`, …).
    pub fn name(&self) -> String {
        match self {
            Op::Input { .. } => "input".into(),
            Op::Weight { .. } => "weight".into(),
            Op::Constant { .. } => "const".into(),
            Op::Iota { .. } => "iota".into(),
            Op::Unary(u) => u.name().into(),
            Op::Binary(b) => b.name().into(),
            Op::Compare(c) => c.name().into(),
            Op::Where => "where".into(),
            Op::Reduce { op, .. } => format!("reduce_{}", op.name()),
            Op::MatMul => "matmul".into(),
            Op::Reshape { .. } => "reshape".into(),
            Op::Permute { .. } => "permute".into(),
            Op::Expand { .. } => "expand".into(),
            Op::Slice { .. } => "slice".into(),
            Op::Concat { .. } => "concat".into(),
            Op::Gather => "gather".into(),
            Op::Cast { .. } => "cast".into(),
            Op::Dist(d) => d.name().into(),
            fused => crate::fused::def(fused)
                .expect("every op is primitive or fused")
                .name
                .into(),
        }
    }

    /// The op's attributes as they appear in the text form, e.g. `axes=[2] keepdim`.
    pub fn attrs(&self) -> String {
        fn list<T: fmt::Display>(xs: &[T]) -> String {
            let v: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
            format!("[{}]", v.join(", "))
        }
        match self {
            Op::Input { name, .. } | Op::Weight { name, .. } => format!("{name:?}"),
            Op::Constant { value, .. } => value.to_string(),
            Op::Iota { start, len } => format!("start={start} len={len}"),
            Op::Reduce { axes, keepdim, .. } => {
                format!(
                    "axes={}{}",
                    list(axes),
                    if *keepdim { " keepdim" } else { "" }
                )
            }
            Op::Reshape { shape } | Op::Expand { shape } => shape_string(shape),
            Op::Permute { perm } => list(perm),
            Op::Slice { axis, start, end } => format!("axis={axis} {start}..{end}"),
            Op::Concat { axis } => format!("axis={axis}"),
            Op::Cast { dtype } => dtype.to_string(),
            Op::Dist(
                DistOp::AllGather { axis, world }
                | DistOp::Shard { axis, world }
                | DistOp::ReduceScatter { axis, world },
            ) => {
                format!("axis={axis} world={world}")
            }
            Op::Dist(DistOp::Send { peer } | DistOp::Recv { peer }) => format!("peer={peer}"),
            op => crate::fused::def(op).map_or_else(String::new, |d| (d.attrs)(op)),
        }
    }

    /// What the op becomes in the lowered plan (see [`KernelRole`]).
    pub fn kernel_role(&self) -> KernelRole {
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } => KernelRole::Leaf,
            Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => {
                KernelRole::View
            }
            Op::Gather | Op::Iota { .. } => KernelRole::Source,
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Cast { .. } => {
                KernelRole::Elementwise
            }
            _ => KernelRole::Kernel,
        }
    }

    /// Whether the op's kernel computes an inlined elementwise expression of its operands
    /// (elementwise ops and reductions; see [`inlines_into`]).
    pub fn takes_prologue(&self) -> bool {
        self.kernel_role() == KernelRole::Elementwise || matches!(self, Op::Reduce { .. })
    }

    /// True for ops only the optimizer produces.
    pub fn is_fused(&self) -> bool {
        crate::fused::def(self).is_some()
    }

    /// How many operands the op takes (`None`: any number ≥ 1).
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Iota { .. } => Some(0),
            Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Cast { .. }
            | Op::Dist(_) => Some(1),
            Op::Binary(_) | Op::Compare(_) | Op::MatMul | Op::Gather => Some(2),
            Op::Where => Some(3),
            Op::Concat { .. } => None,
            fused => {
                crate::fused::def(fused)
                    .expect("every op is primitive or fused")
                    .arity
            }
        }
    }
}
