//! Template binding, one function per fused op: the matmul (tiled, with its GEMV decode
//! variant for a symbolic row count; a weight-side `permute [1,0]` is read as transposed B),
//! attention (flash, with the decode kernel as variant for a symbolic query length; additive
//! mask through its stride uniforms; k/v with fewer heads than q read per key/value head), softmax, layer/RMS/group/instance/batch norm (constant
//! γ = 1, β = 0 → no affine buffers), and concat (placed into a matmul's epilogue when it can
//! be, [`super::place`]; else the lowering's own kernel, shared by later same-shaped concats
//! whose operands are ready). Operands are views; templates written for contiguous operands
//! read them through a load remap.

use transfuse_ir::{Act, DType, Dim, NodeId, Op, Shape};

use super::buffers::BufId;
use super::cluster::{Leaf, Tree};
use super::kernel::Kb;
use super::partition::{Lower, Val};
use super::plan::{UniformExpr, Variant};
use super::{copy, place, rewrite, view, Poly, View};
use crate::kernels::attention::{self, AttentionCfg};
use crate::kernels::decode;
use crate::kernels::elementwise::EwTunables;
use crate::kernels::matmul::{self, MatMulConfig};
use crate::kernels::norm::{self, Affine, NormKind, Tune};
use crate::kernels::rope;
use crate::kernels::Generated;
use crate::kir::*;
use crate::CodegenError;

/// A per-channel (or per-feature) parameter of a norm.
pub(super) enum Param {
    Const(f64),
    /// The logical `[C]` view.
    View(View),
}

/// What [`Lower::matmul_kb`] binds, shared by a matmul's kernel and its GEMV variant.
struct MatMulOperands {
    /// Template uniform values.
    u: Vec<(&'static str, Poly)>,
    /// `a`, read in row-major order.
    a: View,
    /// `b` as the template reads it (transposed when that is its memory order).
    b_logical: View,
    /// Gated: the up weight `b2`, read like `b`.
    b2_logical: Option<View>,
    /// Output columns.
    ndim: Dim,
    /// Output shape.
    oshape: Shape,
}

impl Lower<'_> {
    /// Binds fused op `op` (node `id`) to its template: the one table of fused-op bindings.
    pub(super) fn fused(&mut self, id: NodeId, op: &Op) -> Result<View, CodegenError> {
        match op {
            Op::FusedMatMul {
                act,
                bias,
                residual,
            } => self.matmul(id, *act, *bias, *residual, false),
            Op::GatedMatMul { act } => self.matmul(id, *act, false, false, true),
            Op::Attention {
                scale,
                causal,
                window,
            } => self.attention(id, scale.0, *causal, *window),
            Op::LayerNorm { eps } => self.row_norm(id, NormKind::Layer, eps.0),
            Op::RmsNorm { eps } => self.row_norm(id, NormKind::Rms, eps.0),
            Op::Softmax { scale } => self.softmax(id, scale.0),
            Op::GroupNorm { .. } | Op::InstanceNorm { .. } | Op::BatchNorm => self.channel_norm(id),
            Op::Rope => self.rope(id),
            op => Err(self.unsupported(id, format!("no kernel for `{}`", op.name()))),
        }
    }

    /// `rope(x, cos, sin)`: the template reads all three at the output's index; strided `x`
    /// and broadcast cos/sin tables (`[seq, d]` against `[b, h, seq, d]`) through load remaps.
    fn rope(&mut self, id: NodeId) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let oshape = n.shape.clone();
        let d = oshape
            .last()
            .and_then(Dim::as_known)
            .and_then(|d| u32::try_from(d).ok())
            .ok_or_else(|| self.unsupported(id, "symbolic rotary dim"))?;
        let limits = &self.o.limits;
        let cfg = rope::RopeCfg {
            elem: self.o.elem,
            head_dim: d,
        };
        let gen = rope::rope(&cfg, &EwTunables::default_for(limits), limits)?;
        let mut kb = Kb::new(gen, vec![id]);
        let len = Poly::product(&oshape);
        kb.set("n", len.clone());
        let eb = i64::from(elem_bytes(self.o.elem));
        let x = self.view_of(ins[0])?;
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        for (param, i) in [("cos", 1), ("sin", 2)] {
            let t = self.view_of(ins[i])?;
            let t = t.expand(&oshape).expect("inference checked the broadcast");
            kb.bytes = kb.bytes.add(&t.footprint().scale(eb));
            kb.remap(param, &t);
        }
        let out = self.out_buffer(id);
        kb.bind("out", out.buf);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(3);
        self.push(kb, "rope")?;
        Ok(out)
    }

    pub(super) fn matmul(
        &mut self,
        id: NodeId,
        act: Act,
        bias: bool,
        residual: bool,
        gate: bool,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let oshape = n.shape.clone();
        let g = self.g;
        let ashape = g.node(ins[0]).shape.clone();
        let bshape = g.node(ins[1]).shape.clone();
        let a = self.lin_of(ins[0])?;
        let mut weight = |i: usize| -> Result<(View, bool), CodegenError> {
            Ok(match self.vals[ins[i].index()].clone() {
                Some(Val::Linear { base, .. }) => (base, false),
                _ => (self.view_of(ins[i])?, true),
            })
        };
        let (b, b_strided) = weight(1)?;
        // Gated: the up weight `b2` (operand 2), read with b's layout.
        let b2 = gate.then(|| weight(2)).transpose()?;
        let (ra, rb) = (ashape.len(), bshape.len());
        let kdim = ashape[ra - 1].clone();
        let ndim = bshape[rb - 1].clone();
        let ob = &oshape[..oshape.len() - 2];
        // b read transposed when that is its memory order.
        let mut bperm: Vec<usize> = (0..rb).collect();
        bperm.swap(rb - 2, rb - 1);
        let bt_view = b.permute(&bperm);
        let transposed = b_strided && bt_view.is_dense() && !b.is_dense();
        let (b_logical, b_shape) = if transposed {
            (bt_view, bperm.iter().map(|&p| bshape[p].clone()).collect())
        } else {
            (b.clone(), bshape.clone())
        };
        let b2_logical = match &b2 {
            Some((v, strided)) => {
                let t = v.permute(&bperm);
                let v_transposed = *strided && t.is_dense() && !v.is_dense();
                if v_transposed != transposed {
                    return Err(self.unsupported(id, "gate and up weights differ in layout"));
                }
                Some(if transposed { t } else { v.clone() })
            }
            None => None,
        };
        let mut u: Vec<(&'static str, Poly)> =
            vec![("k", Poly::dim(&kdim)), ("n", Poly::dim(&ndim))];
        if rb == 2 {
            // Every batch dim of a folds into m.
            u.push(("m", Poly::product(&ashape[..ra - 1])));
            for x in ["batch0", "batch1"] {
                u.push((x, Poly::one()));
            }
            for x in ["a_s0", "a_s1", "b_s0", "b_s1"] {
                u.push((x, Poly::zero()));
            }
        } else {
            if ob.len() > 2 {
                return Err(self.unsupported(id, "more than two batch dims with a batched b"));
            }
            u.push(("m", Poly::dim(&ashape[ra - 2])));
            let nb = ob.len();
            let batch = |j: usize| {
                if j + nb >= 2 {
                    Poly::dim(&ob[j + nb - 2])
                } else {
                    Poly::one()
                }
            };
            u.push(("batch0", batch(0)));
            u.push(("batch1", batch(1)));
            // Logical (row-major) batch strides of each operand, 0 where it broadcasts.
            let strides = |shape: &Shape| -> [Poly; 2] {
                let st = view::contiguous_strides(shape);
                let vb = shape.len() - 2;
                let mut out = [Poly::zero(), Poly::zero()];
                for (j, o) in out.iter_mut().enumerate() {
                    // Output batch axis for level j.
                    let Some(oa) = (j + nb).checked_sub(2) else {
                        continue;
                    };
                    let Some(va) = (oa + vb).checked_sub(nb) else {
                        continue;
                    };
                    if oa < nb && va < vb && !shape[va].is(1) {
                        *o = st[va].clone();
                    }
                }
                out
            };
            let [a0, a1] = strides(&ashape);
            let [b0, b1] = strides(&b_shape);
            u.extend([("a_s0", a0), ("a_s1", a1), ("b_s0", b0), ("b_s1", b1)]);
        }
        let cfg = MatMulConfig::plain(self.o.elem)
            .transposed_b(transposed)
            .epilogue(act, bias, residual)
            .gated(gate);
        let limits = self.o.limits;
        // vec4 loads (the register design) need rows of whole, aligned vectors: `k` (and `n`
        // for a `b` read by columns) a multiple of 4, dense operands starting on a multiple of 4.
        let by4 = |d: &Dim| d.as_known().is_some_and(|x| x % 4 == 0);
        let aligned = vec4_aligned;
        let vec_ok = by4(&kdim)
            && (transposed || by4(&ndim))
            && aligned(&a)
            && aligned(&b_logical)
            && b2_logical.as_ref().is_none_or(aligned);
        // One row (decoding) takes the GEMV; a symbolic row count gets it as a variant.
        let rows = u.iter().find(|(x, _)| *x == "m").expect("m").1.clone();
        let sizes = [rows.clone(), Poly::dim(&ndim), Poly::dim(&kdim)];
        let one_row = [Poly::one(), Poly::dim(&ndim), Poly::dim(&kdim)];
        // On a CPU adapter the one-row product is the register matmul with one-row blocks
        // (see `thin_as_reg`), elsewhere the GEMV.
        let thin_reg = self.thin_as_reg(vec_ok);
        let (gen, base, variant) = match rows.as_const() {
            Some(1) if thin_reg => {
                let t = self.pick_matmul(id, false, &cfg, sizes, vec_ok);
                (matmul::matmul(&cfg, &t, &limits)?, cfg.name("gemv"), None)
            }
            Some(1) => {
                let t = self.pick_gemv(id, false, &cfg, sizes);
                (matmul::gemv(&cfg, &t, &limits)?, cfg.name("gemv"), None)
            }
            known => {
                let t = self.pick_matmul(id, false, &cfg, sizes, vec_ok);
                let tiled = matmul::matmul(&cfg, &t, &limits)?;
                let variant = match known {
                    None if thin_reg => {
                        let t = self.pick_matmul(id, true, &cfg, one_row, vec_ok);
                        Some(matmul::matmul(&cfg, &t, &limits)?)
                    }
                    None => {
                        let t = self.pick_gemv(id, true, &cfg, one_row);
                        Some(matmul::gemv(&cfg, &t, &limits)?)
                    }
                    Some(_) => None,
                };
                (tiled, cfg.name("matmul"), variant)
            }
        };
        let ops = MatMulOperands {
            u,
            a,
            b_logical,
            b2_logical,
            ndim: ndim.clone(),
            oshape: oshape.clone(),
        };
        let mut kb = self.matmul_kb(id, &cfg, gen, &ops)?;
        let mut dkb = variant
            .map(|gen| self.matmul_kb(id, &cfg, gen, &ops))
            .transpose()?;
        let out = self.out_buffer(id);
        let eb = i64::from(elem_bytes(self.o.elem));
        let olen = Poly::product(&oshape);
        for k in std::iter::once(&mut kb).chain(dkb.as_mut()) {
            k.bind("out", out.buf);
            k.bytes = k.bytes.add(&b.footprint().scale(eb)).add(&olen.scale(eb));
            if let Some((b2, _)) = &b2 {
                k.bytes = k.bytes.add(&b2.footprint().scale(eb));
            }
        }
        let mut m_batch = Poly::one();
        let mut m_batch_only = Poly::one();
        for (name, p) in &ops.u {
            if matches!(*name, "m" | "batch0" | "batch1") {
                m_batch = m_batch.mul(p);
            }
            if matches!(*name, "batch0" | "batch1") {
                m_batch_only = m_batch_only.mul(p);
            }
        }
        kb.flops = m_batch
            .mul(&Poly::dim(&ndim))
            .mul(&Poly::dim(&kdim))
            .scale(if gate { 4 } else { 2 })
            .add(&olen.scale(
                i64::from(bias) + i64::from(residual) + if act == Act::Identity { 0 } else { 8 },
            ));
        let decode = match dkb {
            Some(mut dkb) => {
                let (bindings, uniforms) = dkb.finish(&cfg.name("gemv"))?;
                Some(Box::new(Variant {
                    gen: dkb.gen,
                    bindings: vec![],
                    buffer_ids: bindings,
                    uniforms,
                    when_one: rows,
                }))
            }
            None => None,
        };
        self.matmuls.insert(
            self.kernels.len(),
            place::MatMulInfo {
                node: id,
                batch: m_batch_only,
                base: base.clone(),
                decode_base: cfg.name("gemv"),
                jobs: 0,
            },
        );
        self.push_with(kb, &base, decode)?;
        Ok(out)
    }

    /// The kernel of matmul node `id` from template `gen` (tiled or GEMV: same buffers and
    /// uniforms), everything bound but `out`, with the bytes of `a`, bias and residual.
    fn matmul_kb(
        &mut self,
        id: NodeId,
        cfg: &MatMulConfig,
        gen: Generated,
        ops: &MatMulOperands,
    ) -> Result<Kb, CodegenError> {
        let ins = self.g.node(id).inputs.clone();
        let mut kb = Kb::new(gen, vec![id]);
        for (name, p) in &ops.u {
            kb.set(name, p.clone());
        }
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.remap("a", &ops.a);
        kb.remap("b", &ops.b_logical);
        kb.bytes = ops.a.footprint().scale(eb);
        let mut next = 2;
        if let Some(b2) = &ops.b2_logical {
            kb.remap("b2", b2);
            next += 1;
        }
        if cfg.bias {
            let v = self.view_of(ins[next])?;
            next += 1;
            let lead = v.shape.iter().take_while(|d| d.is(1)).count();
            let stripped = v.reshape(&v.shape[lead..]).expect("dropping size-1 axes");
            let bv = stripped
                .expand(std::slice::from_ref(&ops.ndim))
                .ok_or_else(|| self.unsupported(id, "the bias varies along rows"))?;
            kb.bytes = kb.bytes.add(&bv.footprint().scale(eb));
            kb.remap("bias", &bv);
        }
        if cfg.residual {
            let v = self.view_of(ins[next])?;
            let rv = v
                .expand(&ops.oshape)
                .expect("inference checked the residual");
            kb.bytes = kb.bytes.add(&rv.footprint().scale(eb));
            kb.remap("residual", &rv);
        }
        Ok(kb)
    }

    pub(super) fn attention(
        &mut self,
        id: NodeId,
        scale: f64,
        causal: bool,
        window: Option<usize>,
    ) -> Result<View, CodegenError> {
        let ins = self.g.node(id).inputs.clone();
        let g = self.g;
        let (qs, vs) = (g.node(ins[0]).shape.clone(), g.node(ins[2]).shape.clone());
        let r = qs.len();
        let known = |d: &Dim, what: &str| {
            d.as_known()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.unsupported(id, format!("symbolic {what} {d}")))
        };
        let d = known(&qs[r - 1], "head dim")?;
        let dv = known(&vs[r - 1], "value head dim")?;
        let window = window
            .map(|w| u32::try_from(w).map_err(|_| self.unsupported(id, "window exceeds u32")))
            .transpose()?;
        let ks = g.node(ins[1]).shape.clone();
        let group = transfuse_ir::kv_group(&qs, &ks)
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| self.unsupported(id, "key/value heads do not divide the query heads"))?;
        let cfg = AttentionCfg {
            elem: self.o.elem,
            head_dim: d,
            dv,
            scale: scale as f32,
            causal,
            window,
            mask: ins.len() == 4,
            group,
        };
        let limits = self.o.limits;
        // A query length of 1 takes the split-KV decode kernels; a symbolic one gets the
        // partial kernel as the flash kernel's decode variant.
        let sq = qs[r - 2].clone();
        let sizes = |sq: Poly| {
            vec![
                ("rows", Poly::product(&qs[..r - 2])),
                ("sq", sq),
                ("sk", Poly::dim(&g.node(ins[1]).shape[r - 2])),
            ]
        };
        let (main, variant, split) = match sq.as_known() {
            Some(1) => {
                let (t, shape) = self.pick_split(id, false, &cfg, sizes(Poly::one()));
                let gen = decode::split(&cfg, &t, shape, &limits)?;
                ((gen, decode::split_name(&cfg)), None, Some(shape))
            }
            known => {
                let t = self.pick_attention(id, false, &cfg, sizes(Poly::dim(&sq)));
                let flash = (attention::flash(&cfg, &t, &limits)?, cfg.kernel_name(false));
                match known {
                    None => {
                        let (t, shape) = self.pick_split(id, true, &cfg, sizes(Poly::one()));
                        let gen = decode::split(&cfg, &t, shape, &limits)?;
                        (flash, Some(gen), Some(shape))
                    }
                    Some(_) => (flash, None, None),
                }
            }
        };
        self.attention_finish(id, &cfg, main, variant, split, sq)
    }

    /// Pushes attention node `id`'s kernels: `main` (flash or, with a query length of 1, the
    /// split-KV partial kernel), the partial kernel as `main`'s decode variant when given, and
    /// with a split shape the partial buffer and the combine, launched only when the keys are
    /// split more than once (and, after a variant, only when the query length `sq` is 1).
    fn attention_finish(
        &mut self,
        id: NodeId,
        cfg: &AttentionCfg,
        (gen, base): (Generated, String),
        variant: Option<Generated>,
        split: Option<decode::SplitShape>,
        sq: Dim,
    ) -> Result<View, CodegenError> {
        let g = self.g;
        let n = g.node(id);
        let ins = n.inputs.clone();
        let oshape = n.shape.clone();
        let qs = g.node(ins[0]).shape.clone();
        let r = qs.len();
        let dv = cfg.dv;
        let limits = self.o.limits;
        let main_split = variant.is_none() && split.is_some();
        let mut kb = self.attention_kb(id, cfg, gen, split)?;
        let mut dkb = variant
            .map(|gen| self.attention_kb(id, cfg, gen, split))
            .transpose()?;
        // The partial results of the split decode: f32, `PART_SPLITS · (dv + 2)` per row.
        let part = split.map(|_| {
            let mut pshape = qs[..r - 2].to_vec();
            pshape.push(Dim::from((decode::PART_SPLITS * (dv + 2)) as usize));
            let buf = self.buffers.add(
                format!("t{}_split", id.0),
                Elem::F32,
                DType::F32,
                pshape.clone(),
                super::BufferKind::Temp,
            );
            let pb = Poly::product(&pshape).scale(4);
            (buf, pb)
        });
        if let Some((buf, pb)) = &part {
            let k = if main_split {
                Some(&mut kb)
            } else {
                dkb.as_mut()
            };
            if let Some(k) = k {
                k.bind("part", *buf);
                k.bytes = k.bytes.add(pb);
            }
        }
        let out = self.out_buffer(id);
        let eb = i64::from(elem_bytes(self.o.elem));
        for k in std::iter::once(&mut kb).chain(dkb.as_mut()) {
            k.bind("out", out.buf);
            k.bytes = k.bytes.add(&Poly::product(&oshape).scale(eb));
        }
        let decode = match dkb {
            Some(mut dkb) => {
                let (bindings, uniforms) = dkb.finish(&decode::split_name(cfg))?;
                Some(Box::new(Variant {
                    gen: dkb.gen,
                    bindings: vec![],
                    buffer_ids: bindings,
                    uniforms,
                    when_one: Poly::dim(&sq),
                }))
            }
            None => None,
        };
        self.push_with(kb, &base, decode)?;
        if let (Some((buf, pbytes)), Some(shape)) = (part, split) {
            let gen = decode::combine(cfg, &limits)?;
            let mut ck = Kb::new(gen, vec![id]);
            let v = self.lin_of(ins[2])?;
            let sk = Poly::dim(&g.node(ins[1]).shape[r - 2]);
            ck.set("bh", Poly::product(&qs[..r - 2]));
            ck.set("sq", Poly::dim(&sq));
            ck.set("sk", sk.clone());
            let nsplit = UniformExpr::Split {
                sk,
                shape,
                nsplit: true,
            };
            ck.uvals.insert("nsplit".into(), nsplit.clone());
            self.bind_rows(&mut ck, "v", "vstride", &v, ins[1], dv);
            ck.bind("part", buf);
            ck.bind("out", out.buf);
            ck.bytes = pbytes.add(&Poly::product(&oshape).scale(eb));
            self.push(ck, &decode::combine_name(cfg))?;
            let last = self.kernels.last_mut().expect("pushed");
            // One split: the partial kernel wrote the output, nothing to combine.
            last.only_split = Some(nsplit);
            if !main_split {
                last.only_when = Some(Poly::dim(&sq));
            }
        }
        Ok(out)
    }

    /// Binds K or V (`param`, view `x`, rows of `inner` elements) of an attention kernel that
    /// addresses rows through a head stride (`stride_u`): in place when each key/value head's
    /// first `sk` rows are dense at a fixed stride (a dense tensor, or a KV cache with its
    /// capacity stride), else through a load remap of the dense layout.
    fn bind_rows(
        &mut self,
        kb: &mut Kb,
        param: &str,
        stride_u: &str,
        x: &View,
        k: NodeId,
        inner: u32,
    ) {
        let ks = self.g.node(k).shape.clone();
        let r = ks.len();
        let rows = Poly::dim(&ks[r - 2]).mul(&Poly::konst(i64::from(inner)));
        let axes = x.merged_axes();
        // One merged axis of stride 1: the whole view is dense, heads `rows` apart.
        let direct = match (x.offset.is_zero(), axes.as_slice()) {
            (true, [(_, one)]) if one.is(1) => Some(rows.clone()),
            (true, [(_, hs), (n, one)]) if one.is(1) && *n == rows => Some(hs.clone()),
            _ => None,
        };
        match direct {
            Some(stride) => {
                kb.bind(param, x.buf);
                kb.set(stride_u, stride);
            }
            None => {
                kb.set(stride_u, rows);
                kb.remap(param, x);
            }
        }
    }

    /// The kernel of attention node `id` from template `gen` (flash, or the split-KV partial
    /// kernel with its split `split`), everything bound but `out` (and `part`), with its bytes
    /// (but the output's) and flops.
    fn attention_kb(
        &mut self,
        id: NodeId,
        cfg: &AttentionCfg,
        gen: Generated,
        split: Option<decode::SplitShape>,
    ) -> Result<Kb, CodegenError> {
        let g = self.g;
        let ins = g.node(id).inputs.clone();
        let (qs, ks) = (g.node(ins[0]).shape.clone(), g.node(ins[1]).shape.clone());
        let q = self.lin_of(ins[0])?;
        let k = self.lin_of(ins[1])?;
        let v = self.lin_of(ins[2])?;
        let r = qs.len();
        let mut kb = Kb::new(gen, vec![id]);
        let (sq, sk) = (qs[r - 2].clone(), ks[r - 2].clone());
        let bh = Poly::product(&qs[..r - 2]);
        let heads = if r >= 3 {
            Poly::dim(&qs[r - 3])
        } else {
            Poly::one()
        };
        kb.set("bh", bh.clone());
        kb.set("heads", heads);
        kb.set("sq", Poly::dim(&sq));
        kb.set("sk", Poly::dim(&sk));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = q
            .footprint()
            .add(&k.footprint())
            .add(&v.footprint())
            .scale(eb);
        kb.remap("q", &q);
        let split = split.filter(|_| kb.gen.kernel.uniforms.iter().any(|u| u == "kstride"));
        if let Some(shape) = split {
            let dv = cfg.dv;
            self.bind_rows(&mut kb, "k", "kstride", &k, ins[1], cfg.head_dim);
            self.bind_rows(&mut kb, "v", "vstride", &v, ins[1], dv);
            for (name, nsplit) in [("chunk", false), ("nsplit", true)] {
                kb.uvals.insert(
                    name.into(),
                    UniformExpr::Split {
                        sk: Poly::dim(&sk),
                        shape,
                        nsplit,
                    },
                );
            }
        } else {
            kb.remap("k", &k);
            kb.remap("v", &v);
        }
        if cfg.mask {
            let m = self.view_of(ins[3])?;
            let mut scores = qs[..r - 1].to_vec();
            scores.push(sk.clone());
            let e = m.expand(&scores).expect("inference checked the mask");
            let st = &e.strides;
            let (sb, sh) = match r {
                2 => (Poly::zero(), Poly::zero()),
                3 => (st[0].clone(), Poly::zero()),
                4 => (st[0].clone(), st[1].clone()),
                _ => return Err(self.unsupported(id, "a mask with more than two batch dims")),
            };
            kb.set("mask_sb", sb);
            kb.set("mask_sh", sh);
            kb.set("mask_sq", st[r - 2].clone());
            kb.set("mask_sk", st[r - 1].clone());
            kb.bind("mask", m.buf);
            if !m.offset.is_zero() {
                let off = kb.value("v_mask_o".into(), &m.offset);
                rewrite::remap_loads(&mut kb.gen.kernel, "mask", &|x| {
                    load("mask", x + off.clone())
                });
            }
            kb.bytes = kb.bytes.add(&e.footprint().scale(eb));
        }
        kb.flops = bh
            .mul(&Poly::dim(&sq))
            .mul(&Poly::dim(&sk))
            .scale(2 * i64::from(cfg.head_dim + cfg.dv) + 5);
        Ok(kb)
    }

    /// Operand `p` of a norm over `x_shape` as a per-`axis` parameter.
    fn param(
        &mut self,
        id: NodeId,
        p: NodeId,
        x_shape: &Shape,
        axis: usize,
    ) -> Result<Param, CodegenError> {
        if let Some(Val::Scalar(c, _)) = self.vals[p.index()] {
            return Ok(Param::Const(c));
        }
        let v = self.view_of(p)?;
        let e = v.expand(x_shape).expect("inference checked the parameter");
        if e.strides
            .iter()
            .enumerate()
            .any(|(a, s)| a != axis && !s.is_zero())
        {
            return Err(self.unsupported(
                id,
                format!(
                    "parameter {} varies along more than axis {axis}",
                    transfuse_ir::shape_string(&v.shape)
                ),
            ));
        }
        Ok(Param::View(View {
            buf: e.buf,
            shape: vec![x_shape[axis].clone()],
            strides: vec![e.strides[axis].clone()],
            offset: e.offset,
        }))
    }

    /// Binds a norm parameter buffer `name` (constants get a one-element buffer).
    fn bind_param(&mut self, kb: &mut Kb, id: NodeId, name: &str, p: Param, len: &Dim) {
        let v = match p {
            Param::View(v) => v,
            Param::Const(c) => {
                let b = self.const_buffer(id, c, DType::F32);
                b.expand(std::slice::from_ref(len)).expect("scalar")
            }
        };
        kb.bytes = kb
            .bytes
            .add(&v.footprint().scale(i64::from(elem_bytes(self.o.elem))));
        kb.remap(name, &v);
    }

    fn affine(params: &[&Param], identity: &[f64]) -> Affine {
        let plain = params
            .iter()
            .zip(identity)
            .all(|(p, want)| matches!(p, Param::Const(c) if c == want));
        if plain {
            Affine::None
        } else {
            Affine::Vector
        }
    }

    pub(super) fn row_norm(
        &mut self,
        id: NodeId,
        kind: NormKind,
        eps: f64,
    ) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let last = shape.len() - 1;
        let mut params = vec![self.param(id, ins[1], &shape, last)?];
        if kind == NormKind::Layer {
            params.push(self.param(id, ins[2], &shape, last)?);
        }
        let affine = Self::affine(&params.iter().collect::<Vec<_>>(), &[1.0, 0.0]);
        let cfg = norm::NormCfg {
            elem: self.o.elem,
            kind,
            eps: eps as f32,
            affine,
            residual: false,
        };
        let sizes = [Poly::product(&shape[..last]), Poly::dim(&shape[last])];
        let vec_ok = rows_of_vec4(&x, &shape[last]);
        let t = self.pick_norm(id, "norm", &cfg, format!("{cfg:?}"), sizes, vec_ok);
        let gen = norm::norm(&cfg, &t, &self.o.limits)?;
        let mut kb = Kb::new(gen, vec![id]);
        kb.set("rows", Poly::product(&shape[..last]));
        kb.set("cols", Poly::dim(&shape[last]));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if affine != Affine::None {
            for (name, p) in ["gamma", "beta"].into_iter().zip(params) {
                self.bind_param(&mut kb, id, name, p, &shape[last]);
            }
        }
        let out = self.out_buffer(id);
        kb.bind("y", out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(8);
        self.push(
            kb,
            match kind {
                NormKind::Layer => "layer_norm",
                NormKind::Rms => "rms_norm",
            },
        )?;
        Ok(out)
    }

    pub(super) fn softmax(&mut self, id: NodeId, scale: f64) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let cfg = norm::SoftmaxCfg {
            elem: self.o.elem,
            scale: scale as f32,
            mask: ins.len() == 2,
        };
        let last = shape.len() - 1;
        let sizes = [Poly::product(&shape[..last]), Poly::dim(&shape[last])];
        let vec_ok = rows_of_vec4(&x, &shape[last]);
        let t = self.pick_norm(id, "softmax", &cfg, format!("{cfg:?}"), sizes, vec_ok);
        let gen = norm::softmax(&cfg, &t, &self.o.limits)?;
        let mut kb = Kb::new(gen, vec![id]);
        kb.set("rows", Poly::product(&shape[..last]));
        kb.set("cols", Poly::dim(&shape[last]));
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if cfg.mask {
            let m = self.view_of(ins[1])?;
            for (index, u) in norm::MASK_UNIFORMS.iter().enumerate() {
                kb.uvals.insert(
                    u.to_string(),
                    UniformExpr::SoftmaxMask {
                        scores: shape.clone(),
                        mask: m.shape.clone(),
                        index,
                    },
                );
            }
            kb.bytes = kb.bytes.add(&m.footprint().scale(eb));
            kb.remap("mask", &m);
        }
        let out = self.out_buffer(id);
        kb.bind("y", out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(5);
        self.push(kb, "softmax")?;
        Ok(out)
    }

    pub(super) fn channel_norm(&mut self, id: NodeId) -> Result<View, CodegenError> {
        let n = self.g.node(id);
        let op = n.op.clone();
        let ins = n.inputs.clone();
        let shape = n.shape.clone();
        let x = self.lin_of(ins[0])?;
        let p1 = self.param(id, ins[1], &shape, 1)?;
        let p2 = self.param(id, ins[2], &shape, 1)?;
        let nn = Poly::dim(&shape[0]);
        let c = Poly::dim(&shape[1]);
        let spatial = Poly::product(&shape[2..]);
        let lim = self.o.limits;
        let (gen, uvals, base, names): (Generated, Vec<(&str, Poly)>, &str, [&str; 2]) = match op {
            Op::GroupNorm { eps, .. } | Op::InstanceNorm { eps } => {
                let instance = matches!(op, Op::InstanceNorm { .. });
                let affine = Self::affine(&[&p1, &p2], &[1.0, 0.0]);
                let cfg = norm::GroupNormCfg {
                    elem: self.o.elem,
                    eps: eps.0 as f32,
                    affine,
                    instance,
                };
                let gen = norm::group_norm(&cfg, &Tune::default_for(&cfg, &lim), &lim)?;
                let u = if instance {
                    vec![
                        ("blocks", nn.mul(&c)),
                        ("channels", c.clone()),
                        ("spatial", spatial.clone()),
                    ]
                } else {
                    let groups = groups_of(&op) as i64;
                    let cpg = c
                        .as_const()
                        .map(|c| c / groups)
                        .ok_or_else(|| self.unsupported(id, "symbolic channel count"))?;
                    vec![
                        ("blocks", nn.scale(groups)),
                        ("groups", Poly::konst(groups)),
                        ("channels_per_group", Poly::konst(cpg)),
                        ("spatial", spatial.clone()),
                    ]
                };
                let names = if affine == Affine::None {
                    ["", ""]
                } else {
                    ["gamma", "beta"]
                };
                (
                    gen,
                    u,
                    if instance {
                        "instance_norm"
                    } else {
                        "group_norm"
                    },
                    names,
                )
            }
            Op::BatchNorm => {
                let cfg = norm::BatchNormCfg { elem: self.o.elem };
                let gen = norm::batch_norm(&cfg, &Tune::default_for(&cfg, &lim), &lim)?;
                let u = vec![
                    ("n", Poly::product(&shape)),
                    ("channels", c.clone()),
                    ("spatial", spatial.clone()),
                ];
                (gen, u, "batch_norm", ["scale", "shift"])
            }
            _ => unreachable!("channel norms only"),
        };
        let mut kb = Kb::new(gen, vec![id]);
        for (name, p) in uvals {
            kb.set(name, p);
        }
        let eb = i64::from(elem_bytes(self.o.elem));
        kb.bytes = x.footprint().scale(eb);
        kb.remap("x", &x);
        if !names[0].is_empty() {
            let cd = shape[1].clone();
            self.bind_param(&mut kb, id, names[0], p1, &cd);
            self.bind_param(&mut kb, id, names[1], p2, &cd);
        }
        let out = self.out_buffer(id);
        kb.bind("y", out.buf);
        let len = Poly::product(&shape);
        kb.bytes = kb.bytes.add(&len.scale(eb));
        kb.flops = len.scale(8);
        self.push(kb, base)?;
        Ok(out)
    }

    /// A concat, sharing its launch with later same-shaped concats whose operands are ready.
    /// A cache's `concat(past, new)` ([`super::PlanCache`]): the past rows are already in the
    /// cache buffer, so only the new rows are written, at rows `past..` through the buffer's
    /// capacity stride — by the matmul that makes them when they are a view of its output
    /// ([`Self::place_concat`]), else by a copy kernel of the new part alone.
    fn cache_concat(&mut self, id: NodeId, axis: usize, buf: BufId) -> Result<(), CodegenError> {
        let g = self.g;
        let n = g.node(id);
        let (shape, past, new) = (n.shape.clone(), n.inputs[0], n.inputs[1]);
        let full = View::contiguous(buf, &self.buffers.get(buf).shape.clone());
        let dst = full.slice(axis, &Dim::from(0), &shape[axis]);
        if self.place_concat(id, axis, Some(&dst))? {
            return Ok(());
        }
        let start = g.node(past).shape[axis].clone();
        let rows = dst.slice(axis, &start, &shape[axis]);
        let x = self.view_of(new)?;
        let dtype = g.node(new).dtype;
        self.cluster_to(
            vec![id],
            &Tree::Leaf(Leaf::View(x, dtype)),
            new,
            Some(&rows),
        )?;
        self.vals[id.index()] = Some(Val::View(dst));
        self.done[id.index()] = true;
        Ok(())
    }

    pub(super) fn concat(&mut self, id: NodeId, axis: usize) -> Result<(), CodegenError> {
        if let Some(buf) = self.caches.get(&id).and_then(|c| c.buf) {
            return self.cache_concat(id, axis, buf);
        }
        if self.place_concat(id, axis, None)? {
            return Ok(());
        }
        let n = self.g.node(id);
        let parts = n.inputs.len();
        let shape = n.shape.clone();
        let lens: Vec<Dim> = n
            .inputs
            .iter()
            .map(|i| self.g.node(*i).shape[axis].clone())
            .collect();
        let mut jobs: Vec<(NodeId, Vec<View>)> = vec![];
        let mut views = vec![];
        for &i in &n.inputs.clone() {
            views.push(self.view_of(i)?);
        }
        jobs.push((id, views));
        let max_jobs = (8 / (parts + 1)).clamp(1, 4);
        for (m, mn) in self.g.nodes().skip(id.index() + 1) {
            if jobs.len() >= max_jobs {
                break;
            }
            let same = matches!(mn.op, Op::Concat { axis: a } if a == axis)
                && mn.shape == shape
                && mn.dtype == n.dtype
                && mn.inputs.len() == parts
                && self.weight_only[m.index()] == self.weight_only[id.index()]
                && !self.done[m.index()]
                && mn
                    .inputs
                    .iter()
                    .zip(&lens)
                    .all(|(i, l)| self.g.node(*i).shape[axis] == *l);
            if !same {
                continue;
            }
            let vs: Option<Vec<View>> = mn.inputs.iter().map(|i| self.try_view(*i)).collect();
            if let Some(vs) = vs {
                jobs.push((m, vs));
            }
        }
        let elem = self.elem_of(n.dtype);
        let gen = copy::concat(
            "concat",
            elem,
            shape.len(),
            axis,
            parts,
            jobs.len(),
            &self.o.limits,
        )?;
        let mut kb = Kb::new(gen, jobs.iter().map(|j| j.0).collect());
        kb.set("total", Poly::product(&shape));
        for (a, d) in shape.iter().enumerate() {
            kb.set(&format!("d{a}"), Poly::dim(d));
        }
        let mut beg = Poly::zero();
        for (p, len) in lens.iter().enumerate() {
            if p > 0 {
                kb.set(&format!("beg{p}"), beg.clone());
            }
            beg = beg.add(&Poly::dim(len));
        }
        let eb = i64::from(elem_bytes(elem));
        let len = Poly::product(&shape);
        for (j, (m, vs)) in jobs.iter().enumerate() {
            for (p, v) in vs.iter().enumerate() {
                for (a, s) in v.strides.iter().enumerate() {
                    kb.set(&format!("s{j}_{p}_{a}"), s.clone());
                }
                kb.set(&format!("o{j}_{p}"), v.offset.clone());
                kb.bind(&format!("in{j}_{p}"), v.buf);
            }
            let out = self.out_buffer(*m);
            kb.bind(&format!("out{j}"), out.buf);
            kb.bytes = kb.bytes.add(&len.scale(2 * eb));
            self.vals[m.index()] = Some(Val::View(out));
            self.done[m.index()] = true;
        }
        self.push(kb, "concat")
    }
}

fn groups_of(op: &Op) -> usize {
    match op {
        Op::GroupNorm { groups, .. } => *groups,
        _ => 0,
    }
}

/// A view whose vec4 loads stay whole and aligned: the 4 logical elements from any multiple
/// of 4 are 4 consecutive buffer elements from a multiple of 4, so a vector load at logical
/// index `L` is one vector load at the remapped index of `L`. Dense views starting on a
/// multiple of 4; strided ones (the permuted attention output `[b, h, s, d] → [b, s, h·d]`
/// that the output projection reads) when their innermost contiguous run is 4·x elements
/// with stride 1 and every other stride and the offset are multiples of 4 (for all dims).
fn vec4_aligned(v: &View) -> bool {
    let by4 = |p: &Poly| p.div_exact(4).is_some();
    if !by4(&v.offset) {
        return false;
    }
    if v.is_dense() {
        return true;
    }
    match v.merged_axes().split_last() {
        None => true,
        Some(((size, stride), outer)) => {
            stride.is(1) && by4(size) && outer.iter().all(|(_, s)| by4(s))
        }
    }
}

/// Rows of `cols` elements of view `x` read as aligned vec4s (the row designs).
fn rows_of_vec4(x: &View, cols: &Dim) -> bool {
    cols.as_known().is_some_and(|c| c % 4 == 0) && vec4_aligned(x)
}
