//! Kernels index with u32: a tensor of 2^32 elements or more (GPT-2's logits at batch 128 ×
//! 1024 × 50 257) must be refused with an error naming it, never launched to wrap silently.
//! Checked at the boundary with symbolic sizes (nothing is allocated).

use transfuse_codegen::kir::Elem;
use transfuse_codegen::lower::{lower, LowerOptions, Plan, Target};
use transfuse_codegen::CodegenError;
use transfuse_ir::{shape, Bindings, Builder, DType, Dim, Op, UnaryOp};

fn dims(v: &[(&str, usize)]) -> Bindings {
    v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
}

fn plan_of(g: &transfuse_ir::Graph) -> Plan {
    lower(g, &LowerOptions::new(Target::Cuda, Elem::F32)).expect("lowers")
}

#[test]
fn an_elementwise_kernel_takes_2_pow_32_minus_1_elements_and_refuses_2_pow_32() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("a"), Dim::sym("b")], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    b.output("y", y);
    let plan = plan_of(&b.finish());
    assert_eq!(plan.kernels.len(), 1);
    // 65537 · 65535 = 2^32 − 1: every index fits.
    let fits = dims(&[("a", 65537), ("b", 65535)]);
    assert_eq!(plan.buffer_len("y", &fits).unwrap(), (1usize << 32) - 1);
    plan.launch_args(0, &fits)
        .expect("2^32 - 1 elements fit u32 indices");
    // 65536 · 65536 = 2^32: the last index would wrap to 0.
    let wraps = dims(&[("a", 65536), ("b", 65536)]);
    let e = plan.launch_args(0, &wraps).unwrap_err();
    assert!(
        matches!(&e, CodegenError::IndexOverflow { tensor, elements: 4294967296, max: 4294967295, .. } if tensor == "x"),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("tensor `x` has 4294967296 elements"), "{e}");
    assert!(e.contains("32-bit"), "{e}");
}

#[test]
fn constant_sizes_too_large_fail_when_lowering() {
    let mut b = Builder::new();
    let x = b
        .input("x", shape([65536usize, 65536]), DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    b.output("y", y);
    let e = lower(&b.finish(), &LowerOptions::new(Target::Cuda, Elem::F32)).unwrap_err();
    assert!(
        matches!(&e, CodegenError::IndexOverflow { tensor, .. } if tensor == "x"),
        "{e:?}"
    );
    let mut b = Builder::new();
    let x = b
        .input("x", shape([65537usize, 65535]), DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    b.output("y", y);
    lower(&b.finish(), &LowerOptions::new(Target::Cuda, Elem::F32)).expect("2^32 - 1 fits");
}

#[test]
fn gpt2_logits_at_batch_128_and_1024_tokens_are_named() {
    let mut b = Builder::new();
    let h = b
        .input(
            "hidden",
            vec![Dim::sym("batch"), Dim::sym("seq"), 768.into()],
            DType::F32,
        )
        .unwrap();
    let w = b.weight("wte_t", shape([768usize, 50257])).unwrap();
    let logits = b.matmul(h, w).unwrap();
    b.output("logits", logits);
    let plan = plan_of(&b.finish());
    let k = plan
        .kernels
        .iter()
        .position(|k| k.bindings.iter().any(|b| b == "logits"))
        .expect("the matmul writes the logits");
    plan.launch_args(k, &dims(&[("batch", 8), ("seq", 1024)]))
        .expect("8 × 1024 × 50257 < 2^32");
    let e = plan
        .launch_args(k, &dims(&[("batch", 128), ("seq", 1024)]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor `logits` has 6587285504 elements"), "{e}");
}

#[test]
fn a_grid_stride_kernel_also_needs_room_for_one_stride() {
    // A concat's kernel loops over its output with a stride of the whole grid.
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 1024.into()], DType::F32)
        .unwrap();
    let y = b
        .input("y", vec![Dim::sym("n"), 1024.into()], DType::F32)
        .unwrap();
    let c = b.op(Op::Concat { axis: 0 }, &[x, y]).unwrap();
    b.output("c", c);
    let plan = plan_of(&b.finish());
    assert_eq!(plan.kernels.len(), 1);
    // 2^30 elements (n = 2^19, two parts of n × 1024) and a grid of about as many threads:
    // below 2^32 together.
    plan.launch_args(0, &dims(&[("n", 1 << 19)])).unwrap();
    // 3·2^30 elements fit u32, but an index plus one stride of the grid does not.
    let e = plan
        .launch_args(0, &dims(&[("n", 3 << 19)]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor `c` has 3221225472 elements"), "{e}");
    assert!(e.contains("grid-stride"), "{e}");
}
