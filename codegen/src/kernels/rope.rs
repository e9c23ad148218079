//! Rotary position embedding, `out = x·cos + rotate_half(x)·sin` over the last axis of `x`
//! (`d` even): the semantics of `transfuse_ir::Op::Rope` (`runtime/src/cpu/fused.rs` is the
//! reference). `rotate_half(x)[j]` is `−x[j + d/2]` for `j < d/2`, `x[j − d/2]` after; the
//! negation is a multiply by −1 (exact), then the same multiplies and add as the reference,
//! in f32 whatever the storage.
//!
//! Buffers `x, cos, sin, out`, all read at the output's contiguous index (lowering remaps
//! strided and broadcast operands: cos/sin `[seq, d]` against `x [b, h, seq, d]` read with
//! stride 0 along `b, h`); uniform `n` (elements). One element per thread per item, `items`
//! elements `threads` apart per thread; grid `[⌈n / (threads·items)⌉, 1, 1]` (at most 65 535
//! workgroups on WebGPU: `n < 65 535·threads·items`). `d` and the storage type are compile-time
//! constants and make the name (`rope_f16_d128`). Refused with [`CodegenError::Kernel`]: an odd
//! or zero `d`, a storage type other than f32/f16/bf16, tunables outside the target's
//! [`Limits`].

use super::elementwise::EwTunables;
use super::matmul::elem_name;
use super::{check_limits, Generated, GridDim, Limits};
use crate::kir::*;
use crate::CodegenError;

/// What a rope kernel computes (fixed at compile time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeCfg {
    /// Storage type of x, cos, sin and out.
    pub elem: Elem,
    /// The rotated (last) dim, even.
    pub head_dim: u32,
}

impl RopeCfg {
    /// The kernel name (`rope_f32_d64`).
    pub fn kernel_name(&self) -> String {
        format!("rope_{}_d{}", elem_name(self.elem), self.head_dim)
    }
}

/// The rope kernel for `cfg` with tunables `t` (see the module docs).
pub fn rope(cfg: &RopeCfg, t: &EwTunables, limits: &Limits) -> Result<Generated, CodegenError> {
    let name = cfg.kernel_name();
    let err = |msg: String| CodegenError::Kernel {
        kernel: name.clone(),
        msg,
    };
    if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
        return Err(err(format!(
            "head dim {} must be even and positive",
            cfg.head_dim
        )));
    }
    if !matches!(cfg.elem, Elem::F32 | Elem::F16 | Elem::BF16) {
        return Err(err(format!(
            "storage must be F32, F16 or BF16, not {:?}",
            cfg.elem
        )));
    }
    t.validate(&name, limits)?;
    let (d, h) = (cfg.head_dim, cfg.head_dim / 2);
    let ld = |buf: &str, i: Expr| load(buf, i).cast(Elem::F32);
    let per_item = vec![
        let_(
            "e",
            Elem::U32,
            (workgroup_id(0) * u(t.items) + var("it")) * u(t.threads) + local_id(0),
        ),
        if_(
            var("e").lt(uni("n")),
            vec![
                let_("j", Elem::U32, var("e") % u(d)),
                let_("lo", Elem::Bool, var("j").lt(u(h))),
                // The partner element and the sign of rotate_half at `j`.
                let_(
                    "pe",
                    Elem::U32,
                    select(var("lo"), var("e") + u(h), var("e") - u(h)),
                ),
                let_("sg", Elem::F32, select(var("lo"), f(-1.0), f(1.0))),
                let_("rot", Elem::F32, ld("x", var("pe")) * var("sg")),
                store(
                    "out",
                    var("e"),
                    (ld("x", var("e")) * ld("cos", var("e")) + var("rot") * ld("sin", var("e")))
                        .cast(cfg.elem),
                ),
            ],
        ),
    ];
    let buf = |name: &str, access| Buffer {
        name: name.into(),
        elem: cfg.elem,
        access,
    };
    let kernel = Kernel {
        name,
        buffers: vec![
            buf("x", Access::Read),
            buf("cos", Access::Read),
            buf("sin", Access::Read),
            buf("out", Access::ReadWrite),
        ],
        uniforms: vec!["n".into()],
        workgroup: [t.threads, 1, 1],
        shared: vec![],
        body: vec![for_("it", u(0), u(t.items), per_item)],
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("n", t.threads * t.items),
            GridDim::one(),
            GridDim::one(),
        ],
        tunables: t.describe(limits),
    })
}

/// Representative kernels: f32 d64, f16 d128 and bf16 d128 (CUDA) at the defaults.
pub fn catalog() -> Vec<Generated> {
    let w = Limits::webgpu();
    let c = Limits::cuda();
    [
        (Elem::F32, 64, &w),
        (Elem::F16, 128, &w),
        (Elem::BF16, 128, &c),
    ]
    .into_iter()
    .map(|(elem, head_dim, l)| {
        rope(&RopeCfg { elem, head_dim }, &EwTunables::default_for(l), l)
            .expect("catalog config builds")
    })
    .collect()
}
