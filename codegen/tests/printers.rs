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

#[test]
fn interpreter_runs_the_doc_kernel_and_catches_bad_access() {
    use transfuse_codegen::interp::{run, HostBuf};
    let k = Kernel {
        name: "double".into(),
        buffers: vec![
            Buffer {
                name: "x".into(),
                elem: Elem::F32,
                access: Access::Read,
            },
            Buffer {
                name: "y".into(),
                elem: Elem::F16,
                access: Access::ReadWrite,
            },
        ],
        uniforms: vec!["n".into()],
        workgroup: [4, 1, 1],
        shared: vec![Shared {
            name: "t".into(),
            elem: Elem::F32,
            len: 4,
        }],
        body: vec![
            let_("i", Elem::U32, global_id(0)),
            store_shared(
                "t",
                local_id(0),
                select(
                    var("i").lt(uni("n")),
                    load("x", var("i").min(uni("n") - u(1))),
                    f(0.0),
                ),
            ),
            Stmt::Barrier,
            var_("s", Elem::F32, f(0.0)),
            for_(
                "j",
                u(0),
                u(4),
                vec![assign("s", var("s") + load_shared("t", var("j")))],
            ),
            if_(
                var("i").lt(uni("n")),
                vec![store(
                    "y",
                    var("i"),
                    var("s")
                        + Expr::Subgroup(SubgroupOp::Max, Box::new(load_shared("t", local_id(0))))
                            * f(1.0 / 3.0),
                )],
            ),
        ],
    };
    let mut bufs = vec![
        HostBuf::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        HostBuf::F32(vec![0.0; 6]),
    ];
    run(&k, [2, 1, 1], &mut bufs, &[6], 2).unwrap();
    // Workgroup 0 sums 1..4 = 10; workgroup 1 sums 5 + 6 = 11. Subgroups of 2 take pair maxima.
    let want = [
        10.0 + 2.0 / 3.0,
        10.0 + 2.0 / 3.0,
        10.0 + 4.0 / 3.0,
        10.0 + 4.0 / 3.0,
        11.0 + 2.0,
        11.0 + 2.0,
    ];
    for (g, w) in bufs[1].f32().iter().zip(want) {
        // y is f16: 10.666 rounds to 10.664 (spacing 2^-7 near 10).
        assert!((g - w).abs() <= 0.008, "{g} vs {w}");
        assert_eq!(*g, half_round(*g));
    }
    // A barrier under a per-thread condition is reported, not silently run.
    let mut bad = k.clone();
    bad.body = vec![if_(local_id(0).lt(u(2)), vec![Stmt::Barrier])];
    let e = run(&bad, [1, 1, 1], &mut bufs, &[6], 2).unwrap_err();
    assert!(
        e.to_string().contains("barrier reached by only part"),
        "{e}"
    );
    // Out-of-bounds stores are errors naming the buffer.
    let e = run(&k, [2, 1, 1], &mut bufs, &[7], 2).unwrap_err();
    assert!(e.to_string().contains("out of bounds"), "{e}");
}

/// The fused multiply-add: printed as WGSL `fma` (naga validates it, f32 and vec4) and CUDA
/// `fmaf` / `tf_fma4`, rounded once by the interpreter, and refused on mixed operand types.
#[test]
fn fma_prints_for_both_targets_and_rounds_once() {
    use transfuse_codegen::interp::{run, HostBuf};
    let buf = |name: &str, access| Buffer {
        name: name.into(),
        elem: Elem::F32,
        access,
    };
    let k = Kernel {
        name: "fused".into(),
        buffers: vec![buf("x", Access::Read), buf("y", Access::ReadWrite)],
        uniforms: vec![],
        workgroup: [1, 1, 1],
        shared: vec![],
        body: vec![
            let_("v", Elem::F32x4, load4("x", u(0))),
            let_("c", Elem::F32, load("x", u(4))),
            let_("w", Elem::F32x4, fma(var("v"), var("v"), splat4(var("c")))),
            store(
                "y",
                u(0),
                fma(load("x", u(0)), load("x", u(0)), load("x", u(4))),
            ),
            store("y", u(1), var("w").lane(1)),
        ],
    };
    let src = wgsl::print(&k).unwrap();
    assert!(src.contains("fma("), "{src}");
    common::validate_wgsl(&src);
    let cu = cuda::print(&k).unwrap();
    assert!(cu.contains("fmaf(") && cu.contains("tf_fma4("), "{cu}");
    // (1 + 2^-12)² - (1 + 2^-11) = 2^-24 exactly; unfused, the product rounds it away.
    let a = 1.0 + 2f32.powi(-12);
    let c = -(1.0 + 2f32.powi(-11));
    assert_eq!(a * a + c, 0.0);
    let mut bufs = vec![
        HostBuf::F32(vec![a, a, a, a, c]),
        HostBuf::F32(vec![0.0; 2]),
    ];
    run(&k, [1, 1, 1], &mut bufs, &[], 1).unwrap();
    assert_eq!(bufs[1].f32(), &[2f32.powi(-24); 2][..]);
    let mut bad = k.clone();
    bad.body = vec![store(
        "y",
        u(0),
        fma(load("x", u(0)), load4("x", u(0)), load("x", u(4))).lane(0),
    )];
    let e = cuda::print(&bad).unwrap_err().to_string();
    assert!(
        e.contains("`fused`") && e.contains("fused multiply-add"),
        "{e}"
    );
}

/// Rounds to f16 by a route independent of the interpreter: scale to the f16 spacing.
fn half_round(v: f32) -> f32 {
    let e = v.abs().log2().floor();
    let ulp = (e - 10.0).exp2();
    (v / ulp).round() * ulp
}
