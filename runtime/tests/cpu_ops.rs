//! The CPU backend against naive loops written independently of its kernels.

use std::collections::HashMap;

use transfuse_ir::{shape, Builder, CmpOp, DType, Dim, ReduceOp, Tensor};
use transfuse_runtime::{Backend, CpuBackend, RuntimeError, TensorMap};

mod common;
use common::rand_vec;

fn run(b: Builder, inputs: Vec<(&str, Tensor)>) -> Result<TensorMap, RuntimeError> {
    let g = b.finish();
    let inputs: TensorMap = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    CpuBackend::new().run(&g, &HashMap::new(), &inputs)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn broadcast_binary_matches_naive() {
    let (a, bb, c) = (3, 5, 7);
    let x = rand_vec(a * bb * c, 1, 1.0);
    let y = rand_vec(bb, 2, 1.0);
    let mut b = Builder::new();
    let xi = b.input("x", shape([a, bb, c]), DType::F32).unwrap();
    let yi = b.input("y", shape([bb, 1usize]), DType::F32).unwrap();
    let s = b.sub(xi, yi).unwrap();
    b.output("s", s);
    let out = run(
        b,
        vec![
            ("x", Tensor::f32(vec![a, bb, c], x.clone())),
            ("y", Tensor::f32(vec![bb, 1], y.clone())),
        ],
    )
    .unwrap();
    let mut want = vec![];
    for i in 0..a {
        for j in 0..bb {
            for k in 0..c {
                want.push(x[(i * bb + j) * c + k] - y[j]);
            }
        }
    }
    assert_close(out["s"].as_f32().unwrap(), &want, 0.0);
}

#[test]
fn reductions_over_any_axes() {
    let sh = [3usize, 4, 5];
    let x = rand_vec(60, 3, 2.0);
    for axes in [vec![0], vec![1], vec![2], vec![0, 2], vec![0, 1, 2]] {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
            let mut b = Builder::new();
            let xi = b.input("x", shape(sh), DType::F32).unwrap();
            let r = b.reduce(op, xi, &axes, false).unwrap();
            b.output("r", r);
            let out = run(b, vec![("x", Tensor::f32(sh.to_vec(), x.clone()))]).unwrap();
            let mut acc: HashMap<Vec<usize>, Vec<f32>> = HashMap::new();
            for i in 0..3 {
                for j in 0..4 {
                    for k in 0..5 {
                        let key: Vec<usize> = [i, j, k]
                            .iter()
                            .enumerate()
                            .filter(|(ax, _)| !axes.contains(ax))
                            .map(|(_, &v)| v)
                            .collect();
                        acc.entry(key).or_default().push(x[(i * 4 + j) * 5 + k]);
                    }
                }
            }
            let mut keys: Vec<_> = acc.keys().cloned().collect();
            keys.sort();
            let want: Vec<f32> = keys
                .iter()
                .map(|k| {
                    let v = &acc[k];
                    match op {
                        ReduceOp::Sum => v.iter().sum(),
                        ReduceOp::Max => v.iter().cloned().fold(f32::MIN, f32::max),
                        ReduceOp::Mean => v.iter().sum::<f32>() / v.len() as f32,
                    }
                })
                .collect();
            assert_close(out["r"].as_f32().unwrap(), &want, 1e-5);
        }
    }
}

#[test]
fn batched_matmul_with_broadcast_batch_matches_naive() {
    for (batch, m, k, n) in [(1, 1, 1, 1), (3, 50, 7, 3), (2, 129, 33, 5)] {
        let a = rand_vec(batch * 2 * m * k, 4, 1.0);
        let w = rand_vec(2 * k * n, 5, 1.0);
        let mut b = Builder::new();
        let ai = b.input("a", shape([batch, 2, m, k]), DType::F32).unwrap();
        let wi = b.input("w", shape([2, k, n]), DType::F32).unwrap();
        let c = b.matmul(ai, wi).unwrap();
        b.output("c", c);
        let out = run(
            b,
            vec![
                ("a", Tensor::f32(vec![batch, 2, m, k], a.clone())),
                ("w", Tensor::f32(vec![2, k, n], w.clone())),
            ],
        )
        .unwrap();
        let mut want = vec![0f32; batch * 2 * m * n];
        for bi in 0..batch {
            for h in 0..2 {
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            s += a[((bi * 2 + h) * m + i) * k + p] * w[(h * k + p) * n + j];
                        }
                        want[((bi * 2 + h) * m + i) * n + j] = s;
                    }
                }
            }
        }
        assert_close(out["c"].as_f32().unwrap(), &want, 1e-5);
    }
}

#[test]
fn movement_ops() {
    let x: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let mut b = Builder::new();
    let xi = b.input("x", shape([2usize, 3, 4]), DType::F32).unwrap();
    let p = b.permute(xi, &[2, 0, 1]).unwrap();
    let s = b.slice(xi, 2, 1.into(), 3.into()).unwrap();
    let c = b.concat(&[xi, xi], 1).unwrap();
    let e = b.slice(xi, 0, 1.into(), 2.into()).unwrap();
    let e = b.expand(e, shape([3usize, 3, 4])).unwrap();
    b.output("p", p);
    b.output("s", s);
    b.output("c", c);
    b.output("e", e);
    let out = run(b, vec![("x", Tensor::f32(vec![2, 3, 4], x.clone()))]).unwrap();
    let p = out["p"].as_f32().unwrap();
    assert_eq!(out["p"].shape, vec![4, 2, 3]);
    assert_eq!(p[0..6], [0., 4., 8., 12., 16., 20.]);
    assert_eq!(p[6], 1.0);
    assert_eq!(out["s"].as_f32().unwrap()[..4], [1., 2., 5., 6.]);
    assert_eq!(out["c"].shape, vec![2, 6, 4]);
    assert_eq!(out["c"].as_f32().unwrap()[12..16], [0., 1., 2., 3.]);
    assert_eq!(out["e"].as_f32().unwrap()[..12], x[12..24]);
    assert_eq!(out["e"].as_f32().unwrap()[24..36], x[12..24]);
}

#[test]
fn causal_mask_from_iota_with_symbolic_offset() {
    // Query positions past..past+seq against key positions 0..past+seq.
    let mut b = Builder::new();
    let k = b
        .input("k", vec![Dim::sym("past"), 1.into()], DType::F32)
        .unwrap();
    let q = b
        .input("q", vec![Dim::sym("seq"), 1.into()], DType::F32)
        .unwrap();
    let _ = (k, q);
    let qpos = b.iota(Dim::sym("past"), Dim::sym("seq")).unwrap();
    let qpos = b.reshape(qpos, vec![Dim::sym("seq"), 1.into()]).unwrap();
    let kpos = b
        .iota(0.into(), Dim::sym("past").plus(&Dim::sym("seq")))
        .unwrap();
    let allowed = b.compare(CmpOp::Le, kpos, qpos).unwrap();
    b.output("allowed", allowed);
    let out = run(
        b,
        vec![
            ("k", Tensor::f32(vec![2, 1], vec![0.; 2])),
            ("q", Tensor::f32(vec![2, 1], vec![0.; 2])),
        ],
    )
    .unwrap();
    assert_eq!(out["allowed"].shape, vec![2, 4]);
    assert_eq!(
        out["allowed"].as_bool().unwrap(),
        &[true, true, true, false, true, true, true, true]
    );
}

#[test]
fn softmax_of_fully_masked_row_is_finite_and_uniform() {
    let mut b = Builder::new();
    let x = b.input("x", shape([2usize, 4]), DType::F32).unwrap();
    let m = b.input("m", shape([2usize, 4]), DType::F32).unwrap();
    let s = b.add(x, m).unwrap();
    let p = b.softmax(s).unwrap();
    b.output("p", p);
    let min = f32::MIN;
    let out = run(
        b,
        vec![
            (
                "x",
                Tensor::f32(vec![2, 4], vec![1., 2., 3., 4., 1e4, -1e4, 3., 0.5]),
            ),
            (
                "m",
                Tensor::f32(vec![2, 4], vec![0., 0., min, min, min, min, min, min]),
            ),
        ],
    )
    .unwrap();
    let p = out["p"].as_f32().unwrap();
    assert!(p.iter().all(|v| v.is_finite()), "{p:?}");
    let e = 1f32.exp();
    assert_close(&p[..4], &[1. / (1. + e), e / (1. + e), 0., 0.], 1e-6);
}

#[test]
fn gather_out_of_range_is_a_typed_error() {
    let mut b = Builder::new();
    let t = b.input("t", shape([3usize, 2]), DType::F32).unwrap();
    let ids = b.input("ids", vec![Dim::sym("n")], DType::I64).unwrap();
    let g = b.gather(t, ids).unwrap();
    b.output("g", g);
    let g = b.finish();
    let table = Tensor::f32(vec![3, 2], vec![0., 1., 2., 3., 4., 5.]);
    let mut inputs: TensorMap = HashMap::from([
        ("t".to_string(), table),
        ("ids".to_string(), Tensor::i64(vec![2], vec![2, 0])),
    ]);
    let out = CpuBackend::new().run(&g, &HashMap::new(), &inputs).unwrap();
    assert_eq!(out["g"].as_f32().unwrap(), &[4., 5., 0., 1.]);
    inputs.insert("ids".into(), Tensor::i64(vec![2], vec![1, 3]));
    let e = CpuBackend::new()
        .run(&g, &HashMap::new(), &inputs)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "op `gather` (node %2): index 3 out of range for table of 3 rows"
    );
}

#[test]
fn input_checks_name_the_input() {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 2.into()], DType::F32)
        .unwrap();
    let y = b.input("y", vec![Dim::sym("n")], DType::F32).unwrap();
    let _ = (x, y);
    let g = b.finish();
    let cpu = CpuBackend::new();
    let none = HashMap::new();
    let e = cpu.run(&g, &none, &TensorMap::new()).unwrap_err();
    assert_eq!(e, RuntimeError::MissingInput("x".into()));
    let inputs = HashMap::from([
        ("x".to_string(), Tensor::f32(vec![3, 2], vec![0.; 6])),
        ("y".to_string(), Tensor::f32(vec![4], vec![0.; 4])),
    ]);
    let e = cpu.run(&g, &none, &inputs).unwrap_err();
    assert!(e.to_string().contains("`n` is 4 here but 3"), "{e}");
    let inputs = HashMap::from([
        ("x".to_string(), Tensor::i64(vec![3, 2], vec![0; 6])),
        ("y".to_string(), Tensor::f32(vec![3], vec![0.; 3])),
    ]);
    let e = cpu.run(&g, &none, &inputs).unwrap_err();
    assert_eq!(e.to_string(), "input `x` has dtype i64, expected f32");
}

/// A loaded program's carried values (a KV cache): an output carried into an input is used
/// while the caller does not supply that input, an input the caller supplies wins over it for
/// that run without replacing it, and both modes agree.
#[test]
fn carried_values_are_used_until_the_caller_supplies_the_input() {
    use transfuse_ir::{BinaryOp, Graph, Op};
    let mut g = Graph::new();
    let input = |g: &mut Graph, name: &str| {
        g.add(
            Op::Input {
                name: name.into(),
                shape: shape([2]),
                dtype: DType::F32,
            },
            &[],
        )
        .unwrap()
    };
    let (x, past) = (input(&mut g, "x"), input(&mut g, "past"));
    let y = g.add(Op::Binary(BinaryOp::Add), &[x, past]).unwrap();
    g.set_output("y", y);
    g.set_output("present", y);
    let t = |v: f32| Tensor::f32(vec![2], vec![v, v]);
    let map = |items: &[(&str, f32)]| -> TensorMap {
        items.iter().map(|&(k, v)| (k.to_string(), t(v))).collect()
    };
    let carry = [("present".to_string(), "past".to_string())];
    for cpu in [CpuBackend::new(), CpuBackend::reference()] {
        let mut p = cpu.load(&g, &HashMap::new()).unwrap();
        let mut step = |inputs: TensorMap, carry: &[(String, String)]| {
            p.run(&inputs, carry).unwrap()["y"].as_f32().unwrap()[0]
        };
        assert_eq!(step(map(&[("x", 1.0), ("past", 0.0)]), &carry), 1.0);
        // past = the carried y (1).
        assert_eq!(step(map(&[("x", 1.0)]), &carry), 2.0);
        // The caller's past wins for this run; the carried 2 stays.
        assert_eq!(step(map(&[("x", 1.0), ("past", 10.0)]), &[]), 11.0);
        assert_eq!(step(map(&[("x", 0.0)]), &[]), 2.0);
        p.clear_carry();
        assert!(
            p.run(&map(&[("x", 0.0)]), &[]).is_err(),
            "no past after clear_carry"
        );
    }
}
