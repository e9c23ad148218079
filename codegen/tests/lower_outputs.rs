//! Graph outputs that share a node or are views of one another: lowering gives each output its
//! own buffer (the kernel's own for the first that is plain, a copy for the rest) and the plan,
//! run on the kernel-IR interpreter, gives each the values the graph says (references computed
//! here from the inputs; `tests/lower_ops.rs` compares the same graphs with the CPU backend).

mod common;

use std::collections::HashMap;

use transfuse_codegen::exec::run_plan_interpreted;
use transfuse_codegen::interp::HostBuf;
use transfuse_codegen::kir::Elem;
use transfuse_codegen::lower::{lower, LowerOptions, Plan, Target};
use transfuse_ir::{shape, Bindings, Builder, DType, Dim, Graph, Op, UnaryOp};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32 * 37 + seed * 11) % 17) as f32 / 8.0 - 1.0)
        .collect()
}

fn run(
    g: &Graph,
    inputs: &[(&str, Vec<f32>)],
    weights: &[(&str, Vec<f32>)],
    dims: &[(&str, usize)],
) -> (Plan, HashMap<String, Vec<f32>>) {
    let plan = lower(g, &LowerOptions::new(Target::Wgsl, Elem::F32)).expect("lowers");
    for k in &plan.kernels {
        common::validate_wgsl(&Target::Wgsl.print(&k.gen.kernel).unwrap());
    }
    let host = |v: &[(&str, Vec<f32>)]| -> HashMap<String, HostBuf> {
        v.iter()
            .map(|(k, x)| (k.to_string(), HostBuf::F32(x.clone())))
            .collect()
    };
    let b: Bindings = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let out = run_plan_interpreted(&plan, &host(inputs), &host(weights), &b).expect("runs");
    let out = out
        .into_iter()
        .map(|(k, v)| match v {
            HostBuf::F32(x) => (k, x),
            other => panic!("{k}: {other:?}"),
        })
        .collect();
    (plan, out)
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-5, "{what}[{i}]: {a} vs {b}");
    }
}

fn distinct_buffers(plan: &Plan) -> usize {
    let mut names: Vec<&str> = plan.outputs.iter().map(|o| o.buffer.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

#[test]
fn two_outputs_on_one_node() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Tanh, x).unwrap();
    b.output("y", y);
    b.output("y_again", y);
    let w = b.weight("w", shape([4usize, 5])).unwrap();
    let m = b.matmul(y, w).unwrap();
    b.output("m", m);
    b.output("m_again", m);
    let g = b.finish();
    let (xv, wv) = (values(24, 1), values(20, 2));
    let (plan, out) = run(&g, &[("x", xv.clone())], &[("w", wv.clone())], &[("n", 2)]);
    assert_eq!(distinct_buffers(&plan), 4);
    let yv: Vec<f32> = xv.iter().map(|v| v.tanh()).collect();
    let mut mv = vec![0f32; 6 * 5];
    for r in 0..6 {
        for c in 0..5 {
            mv[r * 5 + c] = (0..4).map(|k| yv[r * 4 + k] * wv[k * 5 + c]).sum();
        }
    }
    close("y", &out["y"], &yv);
    close("y_again", &out["y_again"], &yv);
    close("m", &out["m"], &mv);
    close("m_again", &out["m_again"], &mv);
}

#[test]
fn outputs_that_are_views_of_another_output() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 3.into(), 4.into()], DType::F32)
        .unwrap();
    let y = b.unary(UnaryOp::Exp, x).unwrap();
    let r = b.reshape(y, vec![Dim::sym("n"), 12.into()]).unwrap();
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
    let n = 3;
    let xv = values(n * 12, 3);
    let (plan, out) = run(&g, &[("x", xv.clone())], &[], &[("n", n)]);
    assert_eq!(distinct_buffers(&plan), 4);
    let yv: Vec<f32> = xv.iter().map(|v| v.exp()).collect();
    let at = |i: usize, j: usize, k: usize| yv[(i * 3 + j) * 4 + k];
    let pv: Vec<f32> = (0..n)
        .flat_map(|i| (0..4).flat_map(move |k| (0..3).map(move |j| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    let sv: Vec<f32> = (0..n)
        .flat_map(|i| (0..3).flat_map(move |j| (1..3).map(move |k| (i, j, k))))
        .map(|(i, j, k)| at(i, j, k))
        .collect();
    close("r", &out["r"], &yv);
    close("y", &out["y"], &yv);
    close("p", &out["p"], &pv);
    close("s", &out["s"], &sv);
}
