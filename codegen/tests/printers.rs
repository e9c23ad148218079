//! The printers on hand-written kernels covering every statement and expression form: the WGSL
//! validates with naga; CUDA is compiled by the NVRTC tests (tests/codegen_nvrtc.rs at the root).

mod common;

use transfuse_codegen::kir::*;
use transfuse_codegen::{cuda, wgsl};

/// A kernel touching every construct: shared memory + barrier, loops, local arrays, select,
/// casts to/from f16, every math intrinsic, subgroup reductions, uniforms, extreme literals.
pub fn kitchen_sink(elem: Elem) -> Kernel {
    let math = [
        UnOp::Exp,
        UnOp::Log,
        UnOp::Sqrt,
        UnOp::Rsqrt,
        UnOp::Tanh,
        UnOp::Erf,
        UnOp::Abs,
        UnOp::Recip,
        UnOp::Sigmoid,
        UnOp::Sin,
        UnOp::Cos,
        UnOp::Neg,
    ];
    let mut body = vec![
        let_("i", Elem::U32, global_id(0)),
        let_("t", Elem::U32, local_id(0)),
        var_("acc", Elem::F32, f(f32::NEG_INFINITY)),
        Stmt::LocalArray("regs".into(), Elem::F32, 4),
        store_shared(
            "tile",
            var("t"),
            select(
                var("i").lt(uni("n")),
                load("x", var("i").min(uni("n") - u(1))).cast(Elem::F32),
                f(-3.4028235e38),
            ),
        ),
        Stmt::Barrier,
        for_(
            "j",
            u(0),
            u(64),
            vec![assign("acc", var("acc").max(load_shared("tile", var("j"))))],
        ),
        Stmt::StoreLocal("regs".into(), u(1), var("acc")),
    ];
    for (n, op) in math.iter().enumerate() {
        body.push(let_(
            &format!("m{n}"),
            Elem::F32,
            load_local("regs", u(1)).apply(*op),
        ));
    }
    body.push(let_(
        "s",
        Elem::F32,
        Expr::Subgroup(SubgroupOp::Sum, Box::new(var("m0")))
            + Expr::Subgroup(SubgroupOp::Max, Box::new(var("m1"))),
    ));
    body.push(if_(
        var("i")
            .lt(uni("n"))
            .and(var("t").ne_(u(7)).or(Expr::Bool(false))),
        vec![store(
            "y",
            var("i"),
            (var("s") + var("m5") * f(0.5)).cast(elem),
        )],
    ));
    Kernel {
        name: format!(
            "kitchen_sink_{}",
            if elem == Elem::F16 { "f16" } else { "f32" }
        ),
        buffers: vec![
            Buffer {
                name: "x".into(),
                elem,
                access: Access::Read,
            },
            Buffer {
                name: "y".into(),
                elem,
                access: Access::ReadWrite,
            },
        ],
        uniforms: vec!["n".into()],
        workgroup: [64, 1, 1],
        shared: vec![Shared {
            name: "tile".into(),
            elem: Elem::F32,
            len: 64,
        }],
        body,
    }
}

#[test]
fn every_construct_prints_valid_wgsl() {
    for e in [Elem::F32, Elem::F16] {
        common::validate_wgsl(&wgsl::print(&kitchen_sink(e)).unwrap());
    }
}

#[test]
fn bf16_is_refused_by_wgsl_and_printed_for_cuda() {
    let k = kitchen_sink(Elem::BF16);
    assert!(wgsl::print(&k).unwrap_err().to_string().contains("bf16"));
    let src = cuda::print(&k).unwrap();
    assert!(src.contains("#include <cuda_bf16.h>") && src.contains("__float2bfloat16"));
}

#[test]
fn unknown_names_are_errors_naming_the_kernel() {
    let mut k = kitchen_sink(Elem::F32);
    k.body.push(store("y", u(0), var("nope")));
    let e = cuda::print(&k).unwrap_err();
    assert_eq!(
        e.to_string(),
        "kernel `kitchen_sink_f32`: unknown local `nope`"
    );
}
