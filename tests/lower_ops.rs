//! Op-level lowering: small graphs exercising what the fixture models do not (softmax with a
//! broadcast mask, RMS/group/instance/batch norm, reductions over inner axes, integer and
//! boolean clusters, gathers with computed ids, materialised iota, concat of strided views,
//! batched broadcast matmuls, transposed operands, rank-3 and windowed attention, reshapes no
//! strides express), each lowered, its WGSL validated by naga, run on the kernel-IR
//! interpreter and compared with the CPU backend; and the refusals.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse::codegen::exec::{host_buf, run_plan_interpreted, tensor};
use transfuse::codegen::interp::HostBuf;
use transfuse::codegen::kir::Elem;
use transfuse::codegen::lower::{lower, LowerOptions, Plan, Target};
use transfuse::codegen::CodegenError;
use transfuse::ir::{
    shape, Act, BinaryOp, Builder, CmpOp, DType, Data, Dim, Graph, Op, ReduceOp, Scalar, Tensor,
    UnaryOp, Weights,
};
use transfuse::runtime::{bind_inputs, Backend, CpuBackend, TensorMap};

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(7);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn f32t(dims: &[usize], seed: u64) -> Tensor {
    Tensor::f32(dims.to_vec(), noise(dims.iter().product(), seed))
}

fn validate_wgsl(src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("WGSL parse error:\n{}\n{src}", e.emit_to_string(src)));
    let caps = naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SHADER_FLOAT16;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("WGSL validation error:\n{}\n{src}", e.emit_to_string(src)));
}

/// Lowers `g`, validates every kernel's WGSL, runs the plan on the interpreter and compares
/// each output with the CPU backend (f32 within 1e-4 absolute, integers and bools exactly).
fn check(g: &Graph, inputs: &TensorMap, weights: &Weights, what: &str) -> Plan {
    let plan = lower(g, &LowerOptions::new(Target::Wgsl, Elem::F32))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    for k in &plan.kernels {
        validate_wgsl(&Target::Wgsl.print(&k.gen.kernel).unwrap());
        if let Some(v) = &k.decode {
            validate_wgsl(&Target::Wgsl.print(&v.gen.kernel).unwrap());
        }
    }
    let want = CpuBackend::new().run(g, weights, inputs).expect("cpu runs");
    let b = bind_inputs(g, inputs).unwrap();
    let hi: HashMap<String, HostBuf> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), host_buf(v).unwrap()))
        .collect();
    let hw: HashMap<String, HostBuf> = weights
        .iter()
        .map(|(k, v)| (k.clone(), host_buf(v).unwrap()))
        .collect();
    let got = run_plan_interpreted(&plan, &hi, &hw, &b).unwrap_or_else(|e| panic!("{what}: {e}"));
    for o in &plan.outputs {
        let w = &want[&o.name];
        let t = tensor(&got[&o.name], w.shape.clone(), o.dtype);
        match (&t.data, &w.data) {
            (Data::F32(a), Data::F32(b)) => {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| {
                        if x.is_nan() && y.is_nan() {
                            0.0
                        } else {
                            (x - y).abs()
                        }
                    })
                    .fold(0f32, f32::max);
                assert!(d <= 1e-4, "{what}: {} differs by {d}\n{a:?}\n{b:?}", o.name);
            }
            _ => assert_eq!(t, *w, "{what}: {}", o.name),
        }
    }
    eprintln!("{what}: {} kernels, outputs match", plan.kernels.len());
    plan
}

fn inputs(v: &[(&str, Tensor)]) -> TensorMap {
    v.iter().map(|(k, t)| (k.to_string(), t.clone())).collect()
}

fn weights(v: &[(&str, Tensor)]) -> Weights {
    v.iter()
        .map(|(k, t)| (k.to_string(), Arc::new(t.clone())))
        .collect()
}

fn sym(s: &str) -> Dim {
    Dim::sym(s)
}

#[test]
fn softmax_with_a_broadcast_mask_and_scale() {
    let mut b = Builder::new();
    let x = b
        .input(
            "x",
            vec![sym("b"), 2.into(), sym("s"), sym("s")],
            DType::F32,
        )
        .unwrap();
    let m = b
        .input(
            "m",
            vec![sym("b"), 1.into(), 1.into(), sym("s")],
            DType::F32,
        )
        .unwrap();
    let y = b.op(Op::Softmax { scale: Scalar(0.5) }, &[x, m]).unwrap();
    b.output("y", y);
    let p = b.op(Op::Softmax { scale: Scalar(1.0) }, &[x]).unwrap();
    b.output("p", p);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[2, 2, 5, 5], 1)), ("m", f32t(&[2, 1, 1, 5], 2))]);
    check(&g, &i, &Weights::new(), "softmax");
}

#[test]
fn norms_rms_layer_plain_group_instance_batch() {
    let mut b = Builder::new();
    let x = b.input("x", vec![sym("n"), 8.into()], DType::F32).unwrap();
    let gw = b.weight("g", shape([8usize])).unwrap();
    let r = b.op(Op::RmsNorm { eps: Scalar(1e-6) }, &[x, gw]).unwrap();
    b.output("rms", r);
    let one = b.scalar(1.0).unwrap();
    let zero = b.scalar(0.0).unwrap();
    let l = b
        .op(Op::LayerNorm { eps: Scalar(1e-5) }, &[x, one, zero])
        .unwrap();
    b.output("ln_plain", l);
    let two = b.scalar(2.0).unwrap();
    let l2 = b
        .op(Op::LayerNorm { eps: Scalar(1e-5) }, &[x, gw, two])
        .unwrap();
    b.output("ln_mixed", l2);
    let img = b
        .input(
            "img",
            vec![sym("m"), 4.into(), 3.into(), 2.into()],
            DType::F32,
        )
        .unwrap();
    let cg = b.weight("cg", shape([4usize, 1, 1])).unwrap();
    let cb = b.weight("cb", shape([4usize, 1, 1])).unwrap();
    let gn = b
        .op(
            Op::GroupNorm {
                groups: 2,
                eps: Scalar(1e-5),
            },
            &[img, cg, cb],
        )
        .unwrap();
    b.output("gn", gn);
    let inn = b
        .op(Op::InstanceNorm { eps: Scalar(1e-5) }, &[img, cg, cb])
        .unwrap();
    b.output("in", inn);
    let bn = b.op(Op::BatchNorm, &[img, cg, cb]).unwrap();
    b.output("bn", bn);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[3, 8], 3)), ("img", f32t(&[2, 4, 3, 2], 4))]);
    let w = weights(&[
        ("g", f32t(&[8], 5)),
        ("cg", f32t(&[4, 1, 1], 6)),
        ("cb", f32t(&[4, 1, 1], 7)),
    ]);
    check(&g, &i, &w, "norms");
}

#[test]
fn reductions_over_inner_axes_with_fused_prologues() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 3.into(), 5.into()], DType::F32)
        .unwrap();
    let s1 = b.reduce(ReduceOp::Sum, x, &[1], false).unwrap();
    b.output("sum_axis1", s1);
    let e = b.unary(UnaryOp::Exp, x).unwrap();
    let e1 = b.add_scalar(e, -1.0).unwrap();
    let mx = b.reduce(ReduceOp::Max, e1, &[2], true).unwrap();
    b.output("max_last", mx);
    let mn = b.reduce(ReduceOp::Mean, x, &[0], true).unwrap();
    b.output("mean_axis0", mn);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[4, 3, 5], 8))]);
    check(&g, &i, &Weights::new(), "reductions");
}

#[test]
fn integer_and_boolean_clusters_computed_gather_ids_and_iota() {
    let mut b = Builder::new();
    let ids = b
        .input("ids", vec![sym("b"), sym("s")], DType::I64)
        .unwrap();
    let flag = b
        .input("flag", vec![sym("b"), sym("s")], DType::Bool)
        .unwrap();
    let x = b.input("x", vec![sym("b"), sym("s")], DType::F32).unwrap();
    let table = b.weight("table", shape([10usize, 3])).unwrap();
    // ids + 1, clamped below 10 by a min with a constant
    let one = b.scalar_i64(1).unwrap();
    let nine = b.scalar_i64(9).unwrap();
    let ids1 = b.add(ids, one).unwrap();
    let ids1 = b.binary(BinaryOp::Min, ids1, nine).unwrap();
    let rows = b.gather(table, ids1).unwrap();
    b.output("rows", rows);
    // |ids - 4| as i64 output, a bool output
    let four = b.scalar_i64(4).unwrap();
    let d = b.sub(ids, four).unwrap();
    let a = b.unary(UnaryOp::Abs, d).unwrap();
    b.output("abs", a);
    let half = b.scalar(0.0).unwrap();
    let pos = b.compare(CmpOp::Gt, x, half).unwrap();
    let both = b.compare(CmpOp::Eq, pos, flag).unwrap();
    b.output("agree", both);
    let zero = b.scalar(0.0).unwrap();
    let relu = b.unary(UnaryOp::Relu, x).unwrap();
    let two = b.scalar(2.0).unwrap();
    let sq = b.binary(BinaryOp::Pow, relu, two).unwrap();
    let w = b.select(flag, sq, zero).unwrap();
    let c = b.cast(ids, DType::F32).unwrap();
    let y = b.add(w, c).unwrap();
    b.output("y", y);
    // an iota used directly as an output, and through a cast
    let io = b.iota(sym("s"), sym("s")).unwrap();
    b.output("iota", io);
    let g = b.finish();
    let i = inputs(&[
        ("ids", Tensor::i64(vec![2, 3], vec![0, 3, 9, 4, 7, 2])),
        (
            "flag",
            Tensor::bool(vec![2, 3], vec![true, false, true, true, true, false]),
        ),
        ("x", f32t(&[2, 3], 9)),
    ]);
    let w = weights(&[("table", f32t(&[10, 3], 10))]);
    check(&g, &i, &w, "integer/bool clusters");
}

#[test]
fn concat_of_strided_views_and_expand() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 4.into(), 6.into()], DType::F32)
        .unwrap();
    let y = b.input("y", vec![sym("n"), 6.into()], DType::F32).unwrap();
    let xt = b.permute(x, &[0, 2, 1]).unwrap(); // [n, 6, 4]
    let xs = b.slice(xt, 2, 1.into(), 3.into()).unwrap(); // [n, 6, 2]
    let yr = b.reshape(y, vec![sym("n"), 6.into(), 1.into()]).unwrap();
    let ye = b.expand(yr, vec![sym("n"), 6.into(), 3.into()]).unwrap();
    let c = b.concat(&[xs, ye, xt], 2).unwrap(); // [n, 6, 9]
    b.output("c", c);
    // A sibling concat of the same shape shares the launch.
    let c2 = b.concat(&[xs, ye, xt], 2).unwrap();
    let c2 = b.mul(c2, c2).unwrap();
    b.output("c2", c2);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[2, 4, 6], 11)), ("y", f32t(&[2, 6], 12))]);
    let plan = check(&g, &i, &Weights::new(), "concat");
    let concats = plan
        .kernels
        .iter()
        .filter(|k| k.ops.iter().all(|o| o == "concat"))
        .collect::<Vec<_>>();
    assert_eq!(concats.len(), 1, "both concats in one launch");
    assert_eq!(concats[0].nodes.len(), 2);
}

#[test]
fn batched_broadcast_and_transposed_matmuls() {
    let mut b = Builder::new();
    let a = b
        .input(
            "a",
            vec![2.into(), 1.into(), sym("m"), 4.into()],
            DType::F32,
        )
        .unwrap();
    let w = b
        .input(
            "w",
            vec![1.into(), 3.into(), 4.into(), 5.into()],
            DType::F32,
        )
        .unwrap();
    let y = b.matmul(a, w).unwrap(); // [2, 3, m, 5]
    b.output("y", y);
    // x @ Wᵀ with W [5, 4] (a weight read transposed), bias, gelu, residual
    let x = b.input("x", vec![sym("m"), 4.into()], DType::F32).unwrap();
    let wt = b.weight("wt", shape([5usize, 4])).unwrap();
    let wtp = b.permute(wt, &[1, 0]).unwrap();
    let bias = b.weight("bias", shape([5usize])).unwrap();
    let res = b
        .input("res", vec![sym("m"), 5.into()], DType::F32)
        .unwrap();
    let f = b
        .op(
            Op::FusedMatMul {
                act: Act::GeluErf,
                bias: true,
                residual: true,
            },
            &[x, wtp, bias, res],
        )
        .unwrap();
    b.output("f", f);
    // a transposed activation: xᵀ [4, m] @ res [m, 5]
    let xt = b.permute(x, &[1, 0]).unwrap();
    let z = b.matmul(xt, res).unwrap();
    b.output("z", z);
    let g = b.finish();
    let i = inputs(&[
        ("a", f32t(&[2, 1, 3, 4], 13)),
        ("w", f32t(&[1, 3, 4, 5], 14)),
        ("x", f32t(&[3, 4], 15)),
        ("res", f32t(&[3, 5], 16)),
    ]);
    let wts = weights(&[("wt", f32t(&[5, 4], 17)), ("bias", f32t(&[5], 18))]);
    let plan = check(&g, &i, &wts, "matmuls");
    assert!(
        plan.kernels
            .iter()
            .any(|k| k.entry().starts_with("matmul_f32_bt_bias_gelu_erf_res")),
        "the permuted weight is read as transposed B"
    );
}

#[test]
fn attention_rank3_windowed_and_with_a_square_mask() {
    let mut b = Builder::new();
    let q = b
        .input("q", vec![sym("h"), sym("s"), 8.into()], DType::F32)
        .unwrap();
    let k = b
        .input("k", vec![sym("h"), sym("t"), 8.into()], DType::F32)
        .unwrap();
    let v = b
        .input("v", vec![sym("h"), sym("t"), 4.into()], DType::F32)
        .unwrap();
    let o = b
        .op(
            Op::Attention {
                scale: Scalar(0.3),
                causal: true,
                window: Some(3),
            },
            &[q, k, v],
        )
        .unwrap();
    b.output("o", o);
    let m = b.input("m", vec![sym("s"), sym("t")], DType::F32).unwrap();
    let o2 = b
        .op(
            Op::Attention {
                scale: Scalar(0.5),
                causal: false,
                window: None,
            },
            &[q, k, v, m],
        )
        .unwrap();
    b.output("o2", o2);
    let g = b.finish();
    let i = inputs(&[
        ("q", f32t(&[2, 5, 8], 19)),
        ("k", f32t(&[2, 7, 8], 20)),
        ("v", f32t(&[2, 7, 4], 21)),
        ("m", f32t(&[5, 7], 22)),
    ]);
    let plan = check(&g, &i, &Weights::new(), "attention");
    // One query row: both launches take their decode variants.
    let i = inputs(&[
        ("q", f32t(&[2, 1, 8], 23)),
        ("k", f32t(&[2, 7, 8], 24)),
        ("v", f32t(&[2, 7, 4], 25)),
        ("m", f32t(&[1, 7], 26)),
    ]);
    let b = bind_inputs(&g, &i).unwrap();
    let att: Vec<usize> = (0..plan.kernels.len())
        .filter(|&k| plan.kernels[k].decode.is_some())
        .collect();
    assert_eq!(att.len(), 2);
    assert!(att.iter().all(|&k| plan.use_decode(k, &b).unwrap()));
    check(&g, &i, &Weights::new(), "attention, one query row");
}

/// LLaMA's attention core: rope on a head-split (permuted, strided) q and on k with `[s, d]`
/// cos/sin tables broadcast over batch and heads, then grouped-query attention (4 query heads
/// over 2 key/value heads) — prefill and the decode variant.
#[test]
fn rope_on_strided_heads_and_grouped_query_attention() {
    let mut b = Builder::new();
    let (s, d) = (sym("s"), 8usize);
    let x = b
        .input(
            "x",
            vec![2.into(), s.clone(), 4.into(), d.into()],
            DType::F32,
        )
        .unwrap();
    let q = b.permute(x, &[0, 2, 1, 3]).unwrap();
    let k = b
        .input(
            "k",
            vec![2.into(), 2.into(), s.clone(), d.into()],
            DType::F32,
        )
        .unwrap();
    let v = b
        .input(
            "v",
            vec![2.into(), 2.into(), s.clone(), 6.into()],
            DType::F32,
        )
        .unwrap();
    let cos = b
        .input("cos", vec![s.clone(), d.into()], DType::F32)
        .unwrap();
    let sin = b
        .input("sin", vec![s.clone(), d.into()], DType::F32)
        .unwrap();
    let qr = b.op(Op::Rope, &[q, cos, sin]).unwrap();
    let kr = b.op(Op::Rope, &[k, cos, sin]).unwrap();
    b.output("kr", kr);
    let o = b
        .op(
            Op::Attention {
                scale: Scalar(0.35),
                causal: true,
                window: Some(3),
            },
            &[qr, kr, v],
        )
        .unwrap();
    b.output("o", o);
    let g = b.finish();
    for (len, seed) in [(5, 40), (1, 50)] {
        let i = inputs(&[
            ("x", f32t(&[2, len, 4, d], seed)),
            ("k", f32t(&[2, 2, len, d], seed + 1)),
            ("v", f32t(&[2, 2, len, 6], seed + 2)),
            ("cos", f32t(&[len, d], seed + 3)),
            ("sin", f32t(&[len, d], seed + 4)),
        ]);
        let plan = check(&g, &i, &Weights::new(), &format!("rope + GQA, s = {len}"));
        let names: Vec<&str> = plan
            .kernels
            .iter()
            .map(|k| k.gen.kernel.name.as_str())
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.starts_with("rope_")).count(),
            2,
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("_g2")), "{names:?}");
    }
}

/// LLaMA's MLP core: the gated matmul with PyTorch-layout `[out, in]` weights read transposed
/// and with `[in, out]` ones, over a symbolic row count (tiled kernel and its GEMV variant).
#[test]
fn gated_matmul_both_weight_layouts_tiled_and_gemv() {
    for out_in in [true, false] {
        let mut b = Builder::new();
        let x = b
            .input("x", vec![2.into(), sym("s"), 12.into()], DType::F32)
            .unwrap();
        let (wshape, tshape): (Vec<usize>, Vec<usize>) = if out_in {
            (vec![10, 12], vec![10, 12])
        } else {
            (vec![12, 10], vec![12, 10])
        };
        let w = |b: &mut Builder, name: &str| {
            let w = b.weight(name, shape(wshape.iter().copied())).unwrap();
            if out_in {
                b.permute(w, &[1, 0]).unwrap()
            } else {
                w
            }
        };
        let (wg, wu) = (w(&mut b, "wg"), w(&mut b, "wu"));
        let y = b
            .op(Op::GatedMatMul { act: Act::Silu }, &[x, wg, wu])
            .unwrap();
        b.output("y", y);
        let g = b.finish();
        let ws = weights(&[("wg", f32t(&tshape, 60)), ("wu", f32t(&tshape, 61))]);
        for (len, seed) in [(5, 62), (1, 63)] {
            let i = inputs(&[("x", f32t(&[2, len, 12], seed))]);
            let plan = check(
                &g,
                &i,
                &ws,
                &format!("gated matmul out_in={out_in} s={len}"),
            );
            assert_eq!(plan.kernels.len(), 1);
            assert!(plan.kernels[0].decode.is_some());
        }
    }
}

#[test]
fn reshapes_no_strides_express_are_read_in_order_or_copied() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let t = b.permute(x, &[0, 2, 1]).unwrap(); // [n, 4, 3]
    let r = b.reshape(t, vec![sym("n"), 12.into()]).unwrap(); // not a strided view
    let e = b.unary(UnaryOp::Tanh, r).unwrap();
    b.output("e", e);
    b.output("r", r);
    let w = b.weight("w", shape([12usize, 2])).unwrap();
    let y = b.matmul(r, w).unwrap(); // read through the load remap
    b.output("y", y);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[2, 3, 4], 23))]);
    let wts = weights(&[("w", f32t(&[12, 2], 24))]);
    let plan = check(&g, &i, &wts, "reshapes");
    assert!(plan.aliases.iter().any(|a| !a.strided));
}

#[test]
fn unsupported_ops_are_named_with_their_node() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let s = b.reduce(ReduceOp::Sum, x, &[1, 2], false).unwrap();
    b.output("s", s);
    let g = b.finish();
    let e = lower(&g, &LowerOptions::new(Target::Cuda, Elem::F32)).unwrap_err();
    assert!(
        matches!(&e, CodegenError::Unsupported { op, node: 1, .. } if op == "reduce_sum"),
        "{e}"
    );
    assert!(
        e.to_string().starts_with("op `reduce_sum` (node %1)"),
        "{e}"
    );
    let e = lower(&g, &LowerOptions::new(Target::Cuda, Elem::U32)).unwrap_err();
    assert!(e.to_string().contains("f32, f16 or bf16"), "{e}");
}

#[test]
fn launch_args_follow_the_bound_dims() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("b"), sym("s"), 8.into()], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    b.output("y", y);
    let g = b.finish();
    let plan = lower(&g, &LowerOptions::new(Target::Cuda, Elem::F16)).unwrap();
    assert_eq!(plan.kernels.len(), 1);
    let k = &plan.kernels[0];
    let bind = |bb: usize, s: usize| -> transfuse::ir::Bindings {
        [("b".to_string(), bb), ("s".to_string(), s)].into()
    };
    let (u, grid) = plan.launch_args(0, &bind(2, 300)).unwrap();
    // Uniforms: only the symbolic sizes survive (d0 = b, d1 = s; the rest are literals).
    let names = &k.gen.kernel.uniforms;
    let val = |n: &str| u[names.iter().position(|x| x == n).unwrap()];
    assert_eq!((val("d0"), val("d1")), (2, 300));
    assert_eq!(grid, [(300 * 8u32).div_ceil(256), 2, 1]);
    assert_eq!(plan.buffer_len("y", &bind(2, 300)).unwrap(), 2 * 300 * 8);
    let j = plan.to_json(Some(&bind(1, 4)));
    assert_eq!(j["kernels"][0]["grid"][0], "ceil(s*8/256)");
    assert_eq!(j["buffers"][0]["bytes"], "16*b*s");
    assert!(plan.launch_args(0, &bind(1, usize::MAX / 4)).is_err());
    assert!(plan.launch_args(0, &Default::default()).is_err());
}

#[test]
fn two_outputs_on_one_node_and_outputs_that_are_views_of_outputs() {
    // Two names for one elementwise kernel's result, and for one matmul's.
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Tanh, x).unwrap();
    b.output("y", y);
    b.output("y_again", y);
    let w = b.weight("w", shape([4usize, 5])).unwrap();
    let m = b.matmul(y, w).unwrap();
    b.output("m", m);
    b.output("m_again", m);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[2, 3, 4], 31))]);
    let wts = weights(&[("w", f32t(&[4, 5], 32))]);
    let plan = check(&g, &i, &wts, "two outputs on one node");
    assert_eq!(plan.outputs.len(), 4);

    // Outputs that are views (reshape, permute, slice) of another output, before and after it.
    let mut b = Builder::new();
    let x = b
        .input("x", vec![sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    let r = b.reshape(y, vec![sym("n"), 12.into()]).unwrap();
    b.output("r", r); // the plain view first: it takes the kernel's buffer
    b.output("y", y);
    let p = b.permute(y, &[0, 2, 1]).unwrap();
    b.output("p", p);
    let s = b
        .op(
            Op::Slice {
                axis: 2,
                start: 1.into(),
                end: 3.into(),
            },
            &[y],
        )
        .unwrap();
    b.output("s", s);
    let g = b.finish();
    let i = inputs(&[("x", f32t(&[3, 3, 4], 33))]);
    let plan = check(&g, &i, &Weights::new(), "outputs that are views of outputs");
    let mut names: Vec<&str> = plan.outputs.iter().map(|o| o.buffer.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 4, "each output has its own buffer");
}
