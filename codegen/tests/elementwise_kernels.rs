//! Generated elementwise clusters, row reductions and gathers: every catalog kernel's WGSL
//! validates with naga (BF16: CUDA only), every kernel prints as CUDA, ill-typed expressions
//! and invalid tunables are refused naming the kernel, one cluster is snapshotted in both
//! languages, and the numerics (through the kernel-IR interpreter) match references computed
//! here — broadcasts of every kind, reductions with prologues, out-of-range gather ids.

mod common;

use std::collections::{HashMap, HashSet};

use expect_test::expect_file;
use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::elementwise::{
    catalog, cluster, gather_rows, gelu_erf_cluster, reduce_rows, EwExpr, EwInput, EwTunables,
    RowTunables,
};
use transfuse_codegen::kernels::{Generated, Limits};
use transfuse_codegen::kir::{BinOp, Elem, UnOp};
use transfuse_codegen::{cuda, wgsl};
use transfuse_ir::ReduceOp;

fn x(i: usize) -> EwExpr {
    EwExpr::input(i)
}

fn c(v: f32) -> EwExpr {
    EwExpr::c(v)
}

#[test]
fn catalog_wgsl_validates_with_naga_and_cuda_prints() {
    let cat = catalog();
    assert!(cat.len() >= 12, "{} kernels", cat.len());
    let names: HashSet<&str> = cat.iter().map(|g| g.kernel.name.as_str()).collect();
    assert_eq!(names.len(), cat.len(), "kernel names are unique");
    for g in &cat {
        let k = &g.kernel;
        let src = cuda::print(k).unwrap();
        assert!(src.contains(&format!("{}(", k.name)));
        if k.uses(Elem::BF16) {
            assert!(wgsl::print(k).unwrap_err().to_string().contains("bf16"));
        } else {
            common::validate_wgsl(&wgsl::print(k).unwrap());
        }
        assert!(k.threads() <= 256 && k.shared_bytes() <= 16 * 1024);
        for t in &g.tunables {
            assert!(t.space.contains(&t.value), "{}: {t:?}", k.name);
        }
    }
    for want in [
        "ew_gelu_erf_f32",
        "ew_attn_mask_i32_f32",
        "ew_add_bias_f32",
        "ew_where_f32",
        "reduce_rows_sum_f32",
        "reduce_rows_max_f32",
        "reduce_rows_mean_sq_f16",
        "gather_rows_i32_f16",
    ] {
        assert!(names.contains(want), "catalog lacks {want}");
    }
}

#[test]
fn gelu_erf_cluster_snapshot() {
    let g = gelu_erf_cluster(Elem::F32, &Limits::webgpu()).unwrap();
    expect_file!["snapshots/elementwise_gelu_erf_f32.wgsl"]
        .assert_eq(&wgsl::print(&g.kernel).unwrap());
    expect_file!["snapshots/elementwise_gelu_erf_f32.cu"]
        .assert_eq(&cuda::print(&g.kernel).unwrap());
}

#[test]
fn every_tuning_validates_with_naga() {
    let l = Limits::webgpu();
    let inputs = [EwInput::new(Elem::F16, 3), EwInput::new(Elem::F32, 1)];
    for t in EwTunables::space(&l) {
        let g = cluster("t", 3, &inputs, &(x(0) + x(1)), Elem::F16, &t, &l).unwrap();
        common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
    }
    for t in RowTunables::space(&l) {
        for rank in 1..=4 {
            let inputs = [EwInput::new(Elem::F16, rank), EwInput::new(Elem::F32, 1)];
            let g = reduce_rows(
                "r",
                ReduceOp::Mean,
                rank,
                &inputs,
                &(x(0) * x(1)),
                Elem::F16,
                &t,
                &l,
            )
            .unwrap();
            common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
        }
        let g = gather_rows("g", Elem::I32, Elem::F32, Elem::F16, &t, &l).unwrap();
        common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
    }
    // Ranks 0..=5, every kind of value.
    for r in 0..=5 {
        let inputs = [
            EwInput::new(Elem::U32, r.min(2)),
            EwInput::new(Elem::I32, r),
            EwInput::new(Elem::F32, 0),
        ];
        let e = EwExpr::select(
            x(0).cast(Elem::Bool).bin(
                BinOp::And,
                x(1).bin(BinOp::Gt, x(1).bin(BinOp::Rem, x(0).cast(Elem::I32))),
            ),
            x(2).un(UnOp::Tanh),
            -x(1).cast(Elem::F32),
        );
        for out in [Elem::F32, Elem::F16, Elem::U32, Elem::I32] {
            let g = cluster(
                "ranks",
                r,
                &inputs,
                &e,
                out,
                &EwTunables::default_for(&l),
                &l,
            )
            .unwrap();
            common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
        }
    }
    let cmp = cluster(
        "cmp_f16",
        1,
        &[EwInput::new(Elem::F32, 1)],
        &x(0).bin(BinOp::Lt, c(0.0)),
        Elem::F16,
        &EwTunables::default_for(&l),
        &l,
    )
    .unwrap();
    common::validate_wgsl(&wgsl::print(&cmp.kernel).unwrap());
}

#[test]
fn ill_typed_expressions_and_bad_tunables_are_refused_naming_the_kernel() {
    let l = Limits::webgpu();
    let t = EwTunables::default_for(&l);
    let f1 = [EwInput::new(Elem::F32, 1)];
    let fu = [EwInput::new(Elem::F32, 1), EwInput::new(Elem::U32, 1)];
    let cases: Vec<(Result<Generated, _>, &str)> = vec![
        (
            cluster(
                "k",
                1,
                &f1,
                &x(0).bin(BinOp::Rem, c(2.0)),
                Elem::F32,
                &t,
                &l,
            ),
            "integers only",
        ),
        (
            cluster("k", 1, &fu, &(x(0) + x(1)), Elem::F32, &t, &l),
            "cast one of them",
        ),
        (
            cluster(
                "k",
                1,
                &f1,
                &EwExpr::select(x(0), c(1.0), c(0.0)),
                Elem::F32,
                &t,
                &l,
            ),
            "condition",
        ),
        (
            cluster(
                "k",
                1,
                &f1,
                &EwExpr::select(
                    x(0).bin(BinOp::Lt, c(0.0)),
                    c(1.0),
                    x(0).bin(BinOp::Lt, c(0.0)),
                ),
                Elem::F32,
                &t,
                &l,
            ),
            "select between",
        ),
        (cluster("k", 1, &f1, &x(3), Elem::F32, &t, &l), "input 3"),
        (
            cluster("k", 1, &fu, &x(1).un(UnOp::Exp), Elem::F32, &t, &l),
            "Exp of a U32",
        ),
        (
            cluster("k", 1, &f1, &x(0).un(UnOp::Not), Elem::F32, &t, &l),
            "Not of a F32",
        ),
        (
            cluster("k", 1, &f1, &x(0).cast(Elem::F16), Elem::F32, &t, &l),
            "cast to F16",
        ),
        (
            cluster(
                "k",
                1,
                &[EwInput::new(Elem::F32, 2)],
                &x(0),
                Elem::F32,
                &t,
                &l,
            ),
            "rank 2 > 1",
        ),
        (
            cluster(
                "k",
                1,
                &[EwInput::new(Elem::Bool, 1)],
                &x(0),
                Elem::F32,
                &t,
                &l,
            ),
            "not a storage type",
        ),
        (
            cluster("k", 1, &f1, &x(0), Elem::Bool, &t, &l),
            "not a storage type",
        ),
        (
            cluster(
                "k",
                1,
                &f1,
                &x(0),
                Elem::F32,
                &EwTunables {
                    threads: 512,
                    items: 1,
                },
                &l,
            ),
            "512 threads",
        ),
        (
            cluster(
                "k",
                1,
                &f1,
                &x(0),
                Elem::F32,
                &EwTunables {
                    threads: 64,
                    items: 0,
                },
                &l,
            ),
            "items",
        ),
        (
            reduce_rows(
                "k",
                ReduceOp::Sum,
                1,
                &f1,
                &x(0),
                Elem::F32,
                &RowTunables { threads: 100 },
                &l,
            ),
            "power of two",
        ),
        (
            reduce_rows(
                "k",
                ReduceOp::Sum,
                1,
                &fu,
                &x(1),
                Elem::F32,
                &RowTunables { threads: 64 },
                &l,
            ),
            "reduces f32",
        ),
        (
            reduce_rows(
                "k",
                ReduceOp::Sum,
                0,
                &[],
                &c(1.0),
                Elem::F32,
                &RowTunables { threads: 64 },
                &l,
            ),
            "rank",
        ),
        (
            gather_rows(
                "k",
                Elem::F32,
                Elem::F32,
                Elem::F32,
                &RowTunables { threads: 64 },
                &l,
            ),
            "ids must be",
        ),
        (
            gather_rows(
                "k",
                Elem::U32,
                Elem::U32,
                Elem::F32,
                &RowTunables { threads: 64 },
                &l,
            ),
            "table must be",
        ),
    ];
    for (i, (r, why)) in cases.into_iter().enumerate() {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("case {i} ({why}) accepted"))
            .to_string();
        assert!(
            e.starts_with("kernel `k`: ") && e.contains(why),
            "case {i}: {e}"
        );
    }
    let e = cluster("1bad name", 1, &f1, &x(0), Elem::F32, &t, &l)
        .unwrap_err()
        .to_string();
    assert!(e.contains("identifiers"), "{e}");
    // Valid under CUDA's limits, not WebGPU's.
    let big = EwTunables {
        threads: 1024,
        items: 1,
    };
    assert!(cluster("k", 1, &f1, &x(0), Elem::F32, &big, &Limits::cuda()).is_ok());
    assert_eq!(
        EwTunables::default_for(&l),
        EwTunables {
            threads: 256,
            items: 1
        }
    );
    assert_eq!(RowTunables::default_for(&Limits::cuda()).threads, 256);
}

// ---- Numerics through the kernel-IR interpreter. ----

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Runs `g` with `bufs` (the output last) and named uniforms; grid from the kernel's GridDims.
fn launch(g: &Generated, bufs: &mut [HostBuf], uniforms: &HashMap<String, u32>) {
    let u: Vec<u32> = g
        .kernel
        .uniforms
        .iter()
        .map(|s| {
            *uniforms
                .get(s)
                .unwrap_or_else(|| panic!("uniform {s} not set"))
        })
        .collect();
    let grid = g
        .grid
        .clone()
        .map(|d| d.eval(&|s| uniforms.get(s).map(|&v| u64::from(v))).unwrap() as u32);
    interp::run(&g.kernel, grid, bufs, &u, 32).unwrap_or_else(|e| panic!("{e}"));
}

/// Uniforms for output dims `dims` and, per input, its strides along every output axis
/// (only the aligned trailing ones are the kernel's uniforms; the others are ignored).
fn ew_uniforms(dims: &[usize], strides: &[Vec<usize>]) -> HashMap<String, u32> {
    let mut m: HashMap<String, u32> = dims
        .iter()
        .enumerate()
        .map(|(a, &d)| (format!("d{a}"), d as u32))
        .collect();
    for (i, s) in strides.iter().enumerate() {
        for (a, &v) in s.iter().enumerate() {
            m.insert(format!("s{i}_{a}"), v as u32);
        }
    }
    m
}

/// Every coordinate of `dims`, row-major.
fn coords(dims: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = dims.iter().product();
    (0..n)
        .map(|mut l| {
            let mut c = vec![0; dims.len()];
            for a in (0..dims.len()).rev() {
                c[a] = l % dims[a];
                l /= dims[a];
            }
            c
        })
        .collect()
}

fn dot(c: &[usize], s: &[usize]) -> usize {
    c.iter().zip(s).map(|(a, b)| a * b).sum()
}

#[test]
fn cluster_broadcasts_by_strides() {
    // out [2, 3, 5] = select(m != 0, (a + bias) * scale, -exp(a)) with a [2, 3, 5],
    // bias [5], scale [3, 1] (rank 2), m u32 [2, 1, 5].
    let dims = [2, 3, 5];
    let inputs = [
        EwInput::new(Elem::F32, 3),
        EwInput::new(Elem::F32, 1),
        EwInput::new(Elem::F32, 2),
        EwInput::new(Elem::U32, 3),
    ];
    let e = EwExpr::select(
        x(3).cast(Elem::Bool),
        (x(0) + x(1)) * x(2),
        -x(0).un(UnOp::Exp),
    );
    let strides = vec![vec![15, 5, 1], vec![0, 0, 1], vec![0, 1, 0], vec![5, 0, 1]];
    let a = rand_vec(30, 1);
    let bias = rand_vec(5, 2);
    let scale = rand_vec(3, 3);
    let m: Vec<u32> = (0..10).map(|i| (i * 7 % 3) as u32 % 2).collect();
    let l = Limits::webgpu();
    for t in [
        EwTunables {
            threads: 4,
            items: 2,
        },
        EwTunables {
            threads: 64,
            items: 1,
        },
        EwTunables {
            threads: 3,
            items: 3,
        },
    ] {
        let g = cluster("bcast", 3, &inputs, &e, Elem::F32, &t, &l).unwrap();
        let mut bufs = vec![
            HostBuf::F32(a.clone()),
            HostBuf::F32(bias.clone()),
            HostBuf::F32(scale.clone()),
            HostBuf::U32(m.clone()),
            HostBuf::F32(vec![f32::NAN; 30]),
        ];
        // Input 1 (rank 1) has only s1_2, input 2 (rank 2) s2_1 and s2_2.
        launch(&g, &mut bufs, &ew_uniforms(&dims, &strides));
        let out = bufs[4].f32();
        for (li, cd) in coords(&dims).iter().enumerate() {
            let av = a[dot(cd, &strides[0])];
            let want = if m[dot(cd, &strides[3])] != 0 {
                (av + bias[dot(cd, &strides[1])]) * scale[dot(cd, &strides[2])]
            } else {
                -av.exp()
            };
            assert_eq!(out[li], want, "{t:?} at {cd:?}");
        }
    }
}

#[test]
fn cluster_low_ranks_and_integer_outputs() {
    let l = Limits::webgpu();
    let t = EwTunables {
        threads: 4,
        items: 1,
    };
    // Rank 1 with a scalar input.
    let g = cluster(
        "r1",
        1,
        &[EwInput::new(Elem::F32, 1), EwInput::new(Elem::F32, 0)],
        &(x(0) * x(1) - c(1.0)),
        Elem::F32,
        &t,
        &l,
    )
    .unwrap();
    let a = rand_vec(7, 5);
    let mut bufs = vec![
        HostBuf::F32(a.clone()),
        HostBuf::F32(vec![3.0]),
        HostBuf::F32(vec![0.0; 7]),
    ];
    launch(&g, &mut bufs, &ew_uniforms(&[7], &[vec![1]]));
    let want: Vec<f32> = a.iter().map(|v| v * 3.0 - 1.0).collect();
    assert_eq!(bufs[2].f32(), &want[..]);
    // Rank 0: one element.
    let g = cluster(
        "r0",
        0,
        &[EwInput::new(Elem::F32, 0)],
        &x(0).un(UnOp::Sqrt),
        Elem::F32,
        &t,
        &l,
    )
    .unwrap();
    let mut bufs = vec![HostBuf::F32(vec![9.0]), HostBuf::F32(vec![0.0])];
    launch(&g, &mut bufs, &HashMap::new());
    assert_eq!(bufs[1].f32(), &[3.0]);
    // Comparison stored as u32, rows broadcast (causal-mask style: iota_q[:, None] >= iota_k).
    let g = cluster(
        "cmp",
        2,
        &[EwInput::new(Elem::I32, 2), EwInput::new(Elem::I32, 1)],
        &x(0).bin(BinOp::Ge, x(1)),
        Elem::U32,
        &t,
        &l,
    )
    .unwrap();
    let (sq, sk) = (3, 5);
    let q: Vec<i32> = (0..sq as i32).map(|i| i + 2).collect();
    let k: Vec<i32> = (0..sk as i32).collect();
    let mut bufs = vec![
        HostBuf::I32(q.clone()),
        HostBuf::I32(k.clone()),
        HostBuf::U32(vec![9; sq * sk]),
    ];
    launch(
        &g,
        &mut bufs,
        &ew_uniforms(&[sq, sk], &[vec![1, 0], vec![0, 1]]),
    );
    let HostBuf::U32(out) = &bufs[2] else {
        panic!()
    };
    for i in 0..sq {
        for j in 0..sk {
            assert_eq!(out[i * sk + j], u32::from(q[i] >= k[j]), "[{i}, {j}]");
        }
    }
}

#[test]
fn catalog_mask_and_gelu_kernels_compute_their_formulas() {
    let cat = catalog();
    let get = |n: &str| cat.iter().find(|g| g.kernel.name == n).unwrap().clone();
    // Additive mask from an i32 [2, 5] mask to [2, 1, 1, 5].
    let g = get("ew_attn_mask_i32_f32");
    let mask: Vec<i32> = vec![1, 1, 1, 0, 0, 1, 0, 1, 1, 1];
    let mut bufs = vec![HostBuf::I32(mask.clone()), HostBuf::F32(vec![f32::NAN; 10])];
    launch(
        &g,
        &mut bufs,
        &ew_uniforms(&[2, 1, 1, 5], &[vec![5, 0, 0, 1]]),
    );
    for (i, (&m, &v)) in mask.iter().zip(bufs[1].f32()).enumerate() {
        assert_eq!(v, (1.0 - m as f32) * f32::MIN, "{i}");
    }
    // GELU (erf), operation for operation like the CPU reference.
    let g = get("ew_gelu_erf_f32");
    let a = rand_vec(3 * 300, 9);
    let mut bufs = vec![HostBuf::F32(a.clone()), HostBuf::F32(vec![0.0; 900])];
    launch(&g, &mut bufs, &ew_uniforms(&[3, 300], &[vec![300, 1]]));
    let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    for (i, (&v, &y)) in a.iter().zip(bufs[1].f32()).enumerate() {
        assert_eq!(y, (v * 0.5) * (libm::erff(v * inv_sqrt2) + 1.0), "{i}");
    }
    // where(cond [3, 4] u32, a [2, 3, 4], scalar).
    let g = get("ew_where_f32");
    let cond: Vec<u32> = (0..12).map(|i| (i % 3 == 0) as u32).collect();
    let a = rand_vec(24, 11);
    let mut bufs = vec![
        HostBuf::U32(cond.clone()),
        HostBuf::F32(a.clone()),
        HostBuf::F32(vec![-7.5]),
        HostBuf::F32(vec![0.0; 24]),
    ];
    launch(
        &g,
        &mut bufs,
        &ew_uniforms(&[2, 3, 4], &[vec![0, 4, 1], vec![12, 4, 1]]),
    );
    for i in 0..24 {
        let want = if cond[i % 12] != 0 { a[i] } else { -7.5 };
        assert_eq!(bufs[3].f32()[i], want, "{i}");
    }
}

#[test]
fn reduce_rows_with_prologues() {
    let l = Limits::webgpu();
    let rt = RowTunables { threads: 32 };
    // Σ_c exp(x[r, c] - rowmax[r]) over [2, 3, 37]; rowmax broadcast along the last axis.
    let dims = [2, 3, 37];
    let a = rand_vec(2 * 3 * 37, 21);
    let rowmax: Vec<f32> = a
        .chunks(37)
        .map(|r| r.iter().copied().fold(f32::MIN, f32::max))
        .collect();
    let g = reduce_rows(
        "sum_exp",
        ReduceOp::Sum,
        3,
        &[EwInput::new(Elem::F32, 3), EwInput::new(Elem::F32, 3)],
        &(x(0) - x(1)).un(UnOp::Exp),
        Elem::F32,
        &rt,
        &l,
    )
    .unwrap();
    let mut bufs = vec![
        HostBuf::F32(a.clone()),
        HostBuf::F32(rowmax.clone()),
        HostBuf::F32(vec![f32::NAN; 6]),
    ];
    launch(
        &g,
        &mut bufs,
        &ew_uniforms(&dims, &[vec![111, 37, 1], vec![3, 1, 0]]),
    );
    for r in 0..6 {
        let want: f32 = a[r * 37..(r + 1) * 37]
            .iter()
            .map(|v| (v - rowmax[r]).exp())
            .sum();
        let got = bufs[2].f32()[r];
        assert!(
            (got - want).abs() <= 1e-5 * want.abs() * 37.0,
            "row {r}: {got} vs {want}"
        );
    }
    // Max over rows shorter than the workgroup, all negative.
    for (op, rank, dims) in [
        (ReduceOp::Max, 2, vec![4, 5]),
        (ReduceOp::Mean, 1, vec![100]),
        (ReduceOp::Mean, 4, vec![2, 2, 3, 7]),
        (ReduceOp::Sum, 3, vec![3, 1, 65]),
    ] {
        let n: usize = dims.iter().product();
        let cols = dims[rank - 1];
        let a: Vec<f32> = rand_vec(n, 30 + rank as u64)
            .iter()
            .map(|v| v - 3.0)
            .collect();
        // Prologue x² · scale with a per-column scale [cols] (rank 1).
        let g = reduce_rows(
            "red",
            op,
            rank,
            &[EwInput::new(Elem::F32, rank), EwInput::new(Elem::F32, 1)],
            &(x(0) * x(1)),
            Elem::F32,
            &rt,
            &l,
        )
        .unwrap();
        let scale = rand_vec(cols, 40);
        let rows = n / cols;
        let mut bufs = vec![
            HostBuf::F32(a.clone()),
            HostBuf::F32(scale.clone()),
            HostBuf::F32(vec![f32::NAN; rows]),
        ];
        let mut strides: Vec<usize> = vec![0; rank];
        let mut s = 1;
        for ax in (0..rank).rev() {
            strides[ax] = s;
            s *= dims[ax];
        }
        let mut u = ew_uniforms(&dims, &[strides]);
        u.insert(format!("s1_{}", rank - 1), 1);
        launch(&g, &mut bufs, &u);
        for r in 0..rows {
            let vals = (0..cols).map(|c| a[r * cols + c] * scale[c]);
            let want = match op {
                ReduceOp::Max => vals.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Sum => vals.sum(),
                ReduceOp::Mean => vals.sum::<f32>() / cols as f32,
            };
            let got = bufs[2].f32()[r];
            assert!(
                (got - want).abs() <= 1e-5 * (want.abs() + 1.0) * cols as f32,
                "{op:?} {dims:?} row {r}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn gather_rows_zeroes_out_of_range_ids() {
    let l = Limits::webgpu();
    let (vocab, width) = (5usize, 70usize);
    let table = rand_vec(vocab * width, 50);
    for ids in [
        HostBuf::U32(vec![0, 4, 5, 2, 99]),
        HostBuf::I32(vec![0, 4, -1, 2, 5]),
    ] {
        let ids_elem = if matches!(ids, HostBuf::U32(_)) {
            Elem::U32
        } else {
            Elem::I32
        };
        let g = gather_rows(
            "gather",
            ids_elem,
            Elem::F32,
            Elem::F32,
            &RowTunables { threads: 32 },
            &l,
        )
        .unwrap();
        let as_i64: Vec<i64> = match &ids {
            HostBuf::U32(v) => v.iter().map(|&x| x as i64).collect(),
            HostBuf::I32(v) => v.iter().map(|&x| x as i64).collect(),
            HostBuf::F32(_) => unreachable!(),
        };
        let n = as_i64.len();
        let mut bufs = vec![
            ids,
            HostBuf::F32(table.clone()),
            HostBuf::F32(vec![f32::NAN; n * width]),
        ];
        let u: HashMap<String, u32> = [("n", n), ("width", width), ("vocab", vocab)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v as u32))
            .collect();
        launch(&g, &mut bufs, &u);
        let out = bufs[2].f32();
        for (i, &id) in as_i64.iter().enumerate() {
            for c in 0..width {
                let want = if (0..vocab as i64).contains(&id) {
                    table[id as usize * width + c]
                } else {
                    0.0
                };
                assert_eq!(out[i * width + c], want, "row {i} (id {id}) col {c}");
            }
        }
    }
}
