//! Elementwise clusters: what an elementwise op, a gather or an iota becomes before it is
//! materialised ([`Tree`] over [`Leaf`] reads), and the kernels that materialise them: a
//! cluster (`kernels::elementwise::cluster`: one expression over strided leaves), a last-axis
//! reduction of any single axis through a permuted view (`reduce_rows`), and iota. Leaves read
//! views through their stride uniforms; a gather reads its table row by the id in place (ids
//! clamped into the table; the runtime validates them), a non-strided reshape through a load
//! remap in row-major order.

use transfuse_ir::{BinaryOp, CmpOp, DType, Dim, NodeId, ReduceOp, Shape, UnaryOp};

use super::buffers::BufId;
use super::kernel::Kb;
use super::partition::{Lower, Val};
use super::{copy, rewrite, Poly, View};
use crate::kernels::elementwise::{self, EwExpr, EwInput, EwTunables, RowTunables};
use crate::kir::*;
use crate::CodegenError;

/// Where a gathered id comes from.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Ids {
    View(View),
    Iota { start: Dim },
}

/// `table[ids]`, read in place.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct GatherSrc {
    pub(super) table: View,
    pub(super) ids: Ids,
    pub(super) ids_shape: Shape,
    pub(super) shape: Shape,
}

/// A value an elementwise expression reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Leaf {
    View(View, DType),
    Gather(Box<GatherSrc>, DType),
    Iota {
        start: Dim,
        len: Dim,
    },
    /// `base` in row-major order, seen with another shape.
    Linear(View, Shape, DType),
}

impl Leaf {
    pub(super) fn shape(&self) -> Shape {
        match self {
            Leaf::View(v, _) => v.shape.clone(),
            Leaf::Linear(_, s, _) => s.clone(),
            Leaf::Gather(g, _) => g.shape.clone(),
            Leaf::Iota { len, .. } => vec![len.clone()],
        }
    }
}

/// An elementwise expression not yet materialised.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tree {
    Leaf(Leaf),
    Const(f64, DType),
    Un(UnaryOp, Box<Tree>, DType),
    Bin(BinaryOp, Box<Tree>, Box<Tree>, DType),
    Cmp(CmpOp, Box<Tree>, Box<Tree>),
    Where(Box<Tree>, Box<Tree>, Box<Tree>, DType),
    Cast(DType, Box<Tree>),
}

impl Tree {
    pub(super) fn dtype(&self) -> DType {
        match self {
            Tree::Leaf(Leaf::View(_, d) | Leaf::Gather(_, d) | Leaf::Linear(_, _, d)) => *d,
            Tree::Leaf(Leaf::Iota { .. }) => DType::I64,
            Tree::Const(_, d) | Tree::Un(_, _, d) | Tree::Bin(_, _, _, d) => *d,
            Tree::Where(_, _, _, d) | Tree::Cast(d, _) => *d,
            Tree::Cmp(..) => DType::Bool,
        }
    }

    pub(super) fn ops(&self) -> i64 {
        match self {
            Tree::Leaf(_) | Tree::Const(..) => 0,
            Tree::Un(_, a, _) | Tree::Cast(_, a) => 1 + a.ops(),
            Tree::Bin(_, a, b, _) | Tree::Cmp(_, a, b) => 1 + a.ops() + b.ops(),
            Tree::Where(c, a, b, _) => 1 + c.ops() + a.ops() + b.ops(),
        }
    }

    pub(super) fn leaves(&self, out: &mut Vec<Leaf>) {
        match self {
            Tree::Leaf(l) => {
                if !out.contains(l) {
                    out.push(l.clone());
                }
            }
            Tree::Const(..) => {}
            Tree::Un(_, a, _) | Tree::Cast(_, a) => a.leaves(out),
            Tree::Bin(_, a, b, _) | Tree::Cmp(_, a, b) => {
                a.leaves(out);
                b.leaves(out);
            }
            Tree::Where(c, a, b, _) => {
                c.leaves(out);
                a.leaves(out);
                b.leaves(out);
            }
        }
    }

    /// The expression over `leaves` (values: f32, i32 for i64, bool).
    pub(super) fn ew(&self, leaves: &[Leaf]) -> Result<EwExpr, String> {
        let i32c = |v: f64| EwExpr::c(v as f32).cast(Elem::I32);
        Ok(match self {
            Tree::Leaf(l) => {
                let i = leaves.iter().position(|x| x == l).expect("collected leaf");
                let x = EwExpr::input(i);
                if self.dtype() == DType::Bool {
                    x.cast(Elem::Bool)
                } else {
                    x
                }
            }
            Tree::Const(v, d) => match d {
                // Graph tensors are never f16/bf16 (inference refuses them).
                DType::F32 | DType::F16 | DType::BF16 => EwExpr::c(*v as f32),
                DType::I64 => i32c(*v),
                DType::Bool => EwExpr::c(if *v != 0.0 { 1.0 } else { 0.0 }).cast(Elem::Bool),
            },
            Tree::Un(op, a, d) => {
                let x = a.ew(leaves)?;
                let un = |o: UnOp| x.clone().un(o);
                match op {
                    UnaryOp::Neg => un(UnOp::Neg),
                    UnaryOp::Exp => un(UnOp::Exp),
                    UnaryOp::Log => un(UnOp::Log),
                    UnaryOp::Sqrt => un(UnOp::Sqrt),
                    UnaryOp::Rsqrt => un(UnOp::Rsqrt),
                    UnaryOp::Tanh => un(UnOp::Tanh),
                    UnaryOp::Erf => un(UnOp::Erf),
                    UnaryOp::Recip => un(UnOp::Recip),
                    UnaryOp::Sigmoid => un(UnOp::Sigmoid),
                    UnaryOp::Sin => un(UnOp::Sin),
                    UnaryOp::Cos => un(UnOp::Cos),
                    UnaryOp::Not => un(UnOp::Not),
                    UnaryOp::Relu => x.bin(BinOp::Max, EwExpr::c(0.0)),
                    UnaryOp::Abs if *d == DType::I64 => {
                        EwExpr::select(x.clone().bin(BinOp::Lt, i32c(0.0)), -x.clone(), x)
                    }
                    UnaryOp::Abs => un(UnOp::Abs),
                }
            }
            Tree::Bin(op, a, b, d) => {
                let (x, y) = (a.ew(leaves)?, b.ew(leaves)?);
                match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Max => x.bin(BinOp::Max, y),
                    BinaryOp::Min => x.bin(BinOp::Min, y),
                    BinaryOp::Pow if *d != DType::F32 => {
                        return Err("integer pow".into());
                    }
                    BinaryOp::Pow => {
                        let c = match **b {
                            Tree::Const(e, _) => Some(e),
                            _ => None,
                        };
                        if c == Some(1.0) {
                            x
                        } else if c == Some(2.0) {
                            x.clone() * x
                        } else if c == Some(0.5) {
                            x.un(UnOp::Sqrt)
                        } else {
                            // x^y = e^(y·ln x): powf up to rounding for x > 0; NaN for x < 0,
                            // where powf gives a value for integer y.
                            (y * x.un(UnOp::Log)).un(UnOp::Exp)
                        }
                    }
                }
            }
            Tree::Cmp(op, a, b) => {
                let (mut x, mut y) = (a.ew(leaves)?, b.ew(leaves)?);
                if a.dtype() == DType::Bool {
                    x = x.cast(Elem::U32);
                    y = y.cast(Elem::U32);
                }
                let o = match op {
                    CmpOp::Eq => BinOp::Eq,
                    CmpOp::Ne => BinOp::Ne,
                    CmpOp::Lt => BinOp::Lt,
                    CmpOp::Le => BinOp::Le,
                    CmpOp::Gt => BinOp::Gt,
                    CmpOp::Ge => BinOp::Ge,
                };
                x.bin(o, y)
            }
            Tree::Where(c, a, b, _) => EwExpr::select(c.ew(leaves)?, a.ew(leaves)?, b.ew(leaves)?),
            Tree::Cast(to, a) => {
                let x = a.ew(leaves)?;
                if a.dtype() == *to {
                    x
                } else {
                    x.cast(match to {
                        DType::F32 | DType::F16 | DType::BF16 => Elem::F32,
                        DType::I64 => Elem::I32,
                        DType::Bool => Elem::Bool,
                    })
                }
            }
        })
    }
}

impl Lower<'_> {
    /// The strides of `leaf` over an index space of shape `shape` (broadcast, then `perm`).
    fn leaf_strides(
        &self,
        leaf: &Leaf,
        shape: &Shape,
        id: NodeId,
    ) -> Result<Vec<Poly>, CodegenError> {
        let v = match leaf {
            Leaf::View(v, _) => v.clone(),
            // Only the strides matter: any buffer will do.
            _ => View::contiguous(BufId(0), &leaf.shape()),
        };
        v.expand(shape).map(|e| e.strides).ok_or_else(|| {
            self.unsupported(
                id,
                format!(
                    "{} does not broadcast to {}",
                    transfuse_ir::shape_string(&leaf.shape()),
                    transfuse_ir::shape_string(shape)
                ),
            )
        })
    }

    fn leaf_elem(&self, l: &Leaf) -> Elem {
        match l {
            Leaf::View(v, _) => self.buf_elem(v.buf),
            Leaf::Gather(g, _) => self.buf_elem(g.table.buf),
            Leaf::Linear(b, _, _) => self.buf_elem(b.buf),
            Leaf::Iota { .. } => Elem::I32,
        }
    }

    /// Binds leaf `i` (parameter `in{i}`) of a cluster or reduction, with its remap and bytes.
    fn bind_leaf(
        &mut self,
        kb: &mut Kb,
        i: usize,
        leaf: &Leaf,
        id: NodeId,
    ) -> Result<(), CodegenError> {
        let param = format!("in{i}");
        match leaf {
            Leaf::View(v, _) => {
                kb.bind(&param, v.buf);
                if !v.offset.is_zero() {
                    let off = kb.value(format!("v_{param}_o"), &v.offset);
                    let p = param.clone();
                    rewrite::remap_loads(&mut kb.gen.kernel, &param, &|x| {
                        load(&p, x + off.clone())
                    });
                }
                let eb = i64::from(elem_bytes(self.buf_elem(v.buf)));
                kb.bytes = kb.bytes.add(&v.footprint().scale(eb));
            }
            Leaf::Iota { start, .. } => {
                let s = kb.value(format!("v_{param}_start"), &Poly::dim(start));
                rewrite::remap_loads(&mut kb.gen.kernel, &param, &|x| s.clone() + x);
            }
            Leaf::Gather(g, _) => self.bind_gather(kb, &param, g, id)?,
            Leaf::Linear(base, _, _) => {
                let eb = i64::from(elem_bytes(self.buf_elem(base.buf)));
                kb.bytes = kb.bytes.add(&base.footprint().scale(eb));
                kb.remap(&param, base);
            }
        }
        Ok(())
    }

    /// Parameter `param` reads `table[ids]` at the gather's logical index.
    fn bind_gather(
        &mut self,
        kb: &mut Kb,
        param: &str,
        g: &GatherSrc,
        id: NodeId,
    ) -> Result<(), CodegenError> {
        let t = &g.table;
        if t.rank() < 1 {
            return Err(self.unsupported(id, "gather from a rank-0 table"));
        }
        kb.bind(param, t.buf);
        let rest = View {
            buf: t.buf,
            shape: t.shape[1..].to_vec(),
            strides: t.strides[1..].to_vec(),
            offset: t.offset.clone(),
        };
        let width = Poly::product(&rest.shape);
        let tag = format!("v_{param}");
        let w = kb.value(format!("{tag}_w"), &width);
        let rs = kb.value(format!("{tag}_rs"), &t.strides[0]);
        let vmax = kb.value(
            format!("{tag}_vmax"),
            &Poly::dim(&t.shape[0]).sub(&Poly::one()),
        );
        let col = kb.phys(&format!("{tag}_c"), &rest);
        let eb = i64::from(elem_bytes(self.buf_elem(t.buf)));
        let rows = Poly::product(&g.ids_shape);
        kb.bytes = kb.bytes.add(&rows.mul(&width).scale(eb));
        let id_of: Box<dyn Fn(Expr) -> Expr> = match &g.ids {
            Ids::View(iv) => {
                let ip = format!("{param}_ids");
                kb.add_buffer(&ip, Elem::I32, iv.buf);
                kb.bytes = kb.bytes.add(&iv.footprint().scale(4));
                let f = kb.phys(&format!("{tag}_i"), iv);
                Box::new(move |row| {
                    load(&ip, f(row))
                        .apply2(BinOp::Max, Expr::I32(0))
                        .cast(Elem::U32)
                        .min(vmax.clone())
                })
            }
            Ids::Iota { start } => {
                let s = kb.value(format!("{tag}_start"), &Poly::dim(start));
                Box::new(move |row| (s.clone() + row).min(vmax.clone()))
            }
        };
        let p = param.to_string();
        rewrite::remap_loads(&mut kb.gen.kernel, param, &|l| {
            let row = l.clone() / w.clone();
            let c = l % w.clone();
            load(&p, id_of(row) * rs.clone() + col(c))
        });
        Ok(())
    }

    /// A cluster computing `tree` into the output buffer of `out_node`.
    pub(super) fn cluster(
        &mut self,
        nodes: Vec<NodeId>,
        tree: &Tree,
        out_node: NodeId,
    ) -> Result<View, CodegenError> {
        self.cluster_to(nodes, tree, out_node, None)
    }

    /// [`Self::cluster`] of `out_node`'s shape, storing into `dst` (a strided view of another
    /// buffer: a cache's new rows) instead of a buffer of its own when given.
    pub(super) fn cluster_to(
        &mut self,
        nodes: Vec<NodeId>,
        tree: &Tree,
        out_node: NodeId,
        dst: Option<&View>,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(out_node);
        let (shape, dtype) = (n.shape.clone(), n.dtype);
        let mut leaves = vec![];
        tree.leaves(&mut leaves);
        let expr = tree
            .ew(&leaves)
            .map_err(|m| self.unsupported(out_node, m))?;
        let r = shape.len();
        let inputs: Vec<EwInput> = leaves
            .iter()
            .map(|l| EwInput::new(self.leaf_elem(l), r))
            .collect();
        let out_elem = self.elem_of(dtype);
        let gen = elementwise::cluster(
            "ew",
            r,
            &inputs,
            &expr,
            out_elem,
            &EwTunables::default_for(&self.o.limits),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, nodes);
        for (a, d) in shape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        for (i, leaf) in leaves.iter().enumerate() {
            let st = self.leaf_strides(leaf, &shape, out_node)?;
            for (a, s) in st.into_iter().enumerate() {
                kb.set(&format!("s{i}_{a}"), s);
            }
            self.bind_leaf(&mut kb, i, leaf, out_node)?;
        }
        let out = match dst {
            Some(v) => {
                kb.bind("out", v.buf);
                if !v.is_plain() {
                    let f = kb.phys("v_out", v);
                    let body = std::mem::take(&mut kb.gen.kernel.body);
                    kb.gen.kernel.body = super::rewrite::expand_stores(body, "out", &mut |i, x| {
                        vec![store("out", f(i), x)]
                    });
                }
                v.clone()
            }
            None => {
                let out = self.out_buffer(out_node);
                kb.bind("out", out.buf);
                out
            }
        };
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(i64::from(elem_bytes(out_elem))));
        kb.flops = len.scale(tree.ops());
        self.push(kb, "ew")?;
        Ok(out)
    }

    pub(super) fn reduce(
        &mut self,
        id: NodeId,
        op: ReduceOp,
        axes: &[usize],
    ) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let x = n.inputs[0];
        let xshape = self.g.node(x).shape.clone();
        let [axis] = axes else {
            return Err(self.unsupported(id, "reductions over several axes are not lowered"));
        };
        let tree = self.tree_of(x);
        if tree.dtype() != DType::F32 {
            return Err(self.unsupported(id, "reductions of integers are not lowered"));
        }
        let r = xshape.len();
        let perm: Vec<usize> = (0..r).filter(|a| a != axis).chain([*axis]).collect();
        let pshape: Shape = perm.iter().map(|&a| xshape[a].clone()).collect();
        let mut leaves = vec![];
        tree.leaves(&mut leaves);
        let expr = tree.ew(&leaves).map_err(|m| self.unsupported(id, m))?;
        let inputs: Vec<EwInput> = leaves
            .iter()
            .map(|l| EwInput::new(self.leaf_elem(l), r))
            .collect();
        let out_elem = self.elem_of(n.dtype);
        let gen = elementwise::reduce_rows(
            "reduce",
            op,
            r,
            &inputs,
            &expr,
            out_elem,
            &RowTunables::default_for(&self.o.limits),
            &self.o.limits,
        )?;
        let mut nodes = vec![id];
        if matches!(self.vals[x.index()], Some(Val::Tree(_))) {
            nodes.insert(0, x);
        }
        let mut kb = Kb::new(gen, nodes);
        for (a, d) in pshape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        for (i, leaf) in leaves.iter().enumerate() {
            let st = self.leaf_strides(leaf, &xshape, id)?;
            for (a, &p) in perm.iter().enumerate() {
                kb.set(&format!("s{i}_{a}"), st[p].clone());
            }
            self.bind_leaf(&mut kb, i, leaf, id)?;
        }
        let out = self.out_buffer(id);
        kb.bind("out", out.buf);
        let len = Poly::product(&xshape);
        kb.bytes = kb
            .bytes
            .add(&Poly::product(&n.shape).scale(i64::from(elem_bytes(out_elem))));
        kb.flops = len.scale(tree.ops() + 1);
        self.push(kb, &format!("reduce_{}", op.name()))?;
        Ok(out)
    }

    pub(super) fn iota(
        &mut self,
        id: NodeId,
        start: &Dim,
        len: &Dim,
    ) -> Result<View, CodegenError> {
        let gen = copy::iota("iota", &self.o.limits)?;
        let mut kb = Kb::new(gen, vec![id]);
        kb.set("start", Poly::dim(start));
        kb.set("len", Poly::dim(len));
        let out = self.out_buffer(id);
        kb.bind("out", out.buf);
        kb.bytes = Poly::dim(len).scale(4);
        self.push(kb, "iota")?;
        Ok(out)
    }
}
