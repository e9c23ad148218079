//! The matmul templates: every catalog kernel's WGSL validates with naga (BF16: CUDA only),
//! every kernel prints as CUDA, invalid tunables are refused naming the kernel, the tunable
//! spaces hold only valid points, and the numerics — through the kernel-IR interpreter — match
//! a reference at odd sizes, every epilogue, transposed `b` and broadcast batches.

mod common;

use std::collections::{HashMap, HashSet};

use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::matmul::{
    self, activation, catalog, gemv, GemvTunables, MatMulConfig, MatMulTunables,
};
use transfuse_codegen::kernels::{Generated, Limits};
use transfuse_codegen::kir::{Elem, Expr};
use transfuse_codegen::{cuda, wgsl, CodegenError};
use transfuse_ir::Act;

#[test]
fn catalog_wgsl_validates_with_naga_and_cuda_prints() {
    let cat = catalog();
    assert!(cat.len() >= 20, "{} matmul kernels", cat.len());
    let names: HashSet<&str> = cat.iter().map(|g| g.kernel.name.as_str()).collect();
    assert_eq!(names.len(), cat.len(), "kernel names are unique");
    for g in &cat {
        let k = &g.kernel;
        let src = cuda::print(k).unwrap();
        assert!(src.contains(&format!(
            "void __launch_bounds__({}) {}(",
            k.threads(),
            k.name
        )));
        if k.uses(Elem::BF16) {
            assert!(src.contains("cuda_bf16.h"));
            assert!(wgsl::print(k).unwrap_err().to_string().contains("bf16"));
        } else {
            common::validate_wgsl(&wgsl::print(k).unwrap());
        }
        assert!(
            k.threads() <= 256 && k.shared_bytes() <= 16 * 1024,
            "{}",
            k.name
        );
    }
    for want in [
        "matmul_f32",
        "matmul_f32_bt",
        "matmul_f32_bias_gelu_erf",
        "matmul_f32_bt_bias_gelu_tanh_res",
        "matmul_f16_relu",
        "matmul_bf16_bt_silu",
        "matmul_f16_bt_batched_qk",
        "matmul_bf16_bt_bias_128x128x16_8x8",
        "gemv_f32_bt_bias_gelu_erf_res",
        "gemv_f16_bias",
    ] {
        assert!(names.contains(want), "catalog lacks {want}: {names:?}");
    }
}

#[test]
fn every_webgpu_tiling_validates_with_naga() {
    let l = Limits::webgpu();
    for bt in [false, true] {
        let cfg = MatMulConfig::plain(Elem::F16)
            .epilogue(Act::GeluTanh, true, true)
            .transposed_b(bt);
        let space = MatMulTunables::space(&cfg, &l);
        assert!(space.len() > 20, "{} points", space.len());
        for t in &space {
            let g = matmul::matmul(&cfg, t, &l).unwrap();
            assert!(g.kernel.threads() <= 256 && g.kernel.shared_bytes() <= 16 * 1024);
            common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
        }
        for t in GemvTunables::space(&cfg, &l) {
            let g = gemv(&cfg, &t, &l).unwrap();
            common::validate_wgsl(&wgsl::print(&g.kernel).unwrap());
        }
    }
}

#[test]
fn defaults_and_spaces() {
    let cfg = MatMulConfig::plain(Elem::F32);
    let w = MatMulTunables::default_for(&cfg, &Limits::webgpu());
    assert_eq!(
        w,
        MatMulTunables {
            tile_m: 64,
            tile_n: 64,
            tile_k: 16,
            rm: 4,
            rn: 4,
            reg: 0
        }
    );
    let c = MatMulTunables::default_for(&cfg, &Limits::cuda());
    assert_eq!(
        (c.tile_m, c.tile_n, c.tile_k, c.rm, c.rn),
        (128, 128, 16, 8, 8)
    );
    for (l, d) in [(Limits::webgpu(), w), (Limits::cuda(), c)] {
        let space = MatMulTunables::space(&cfg, &l);
        assert!(space.contains(&d));
        for t in &space {
            assert!(t.threads() <= l.max_threads && t.shared_bytes() <= l.max_shared_bytes);
            t.validate("matmul", &l).unwrap();
        }
        let g = matmul::matmul(&cfg, &d, &l).unwrap();
        let names: Vec<&str> = g.tunables.iter().map(|t| t.name).collect();
        assert_eq!(names, ["tile_m", "tile_n", "tile_k", "rm", "rn", "reg"]);
        for t in &g.tunables {
            assert!(t.space.contains(&t.value), "{t:?}");
        }
        let gt = GemvTunables::default_for(&cfg, &l);
        assert!(GemvTunables::space(&cfg, &l).contains(&gt));
    }
    assert!(
        MatMulTunables::space(&cfg, &Limits::cuda()).len()
            > MatMulTunables::space(&cfg, &Limits::webgpu()).len()
    );
}

fn kernel_err(r: Result<Generated, CodegenError>) -> String {
    match r {
        Err(e @ CodegenError::Kernel { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(g) => panic!("{} was accepted", g.kernel.name),
    }
}

#[test]
fn invalid_tunables_and_configs_are_refused_naming_the_kernel() {
    let l = Limits::webgpu();
    let cfg = MatMulConfig::plain(Elem::F32).epilogue(Act::Relu, true, false);
    let t = |tile_m, tile_n, tile_k, rm, rn| MatMulTunables {
        tile_m,
        tile_n,
        tile_k,
        rm,
        rn,
        reg: 0,
    };
    for (bad, why) in [
        (t(64, 64, 16, 3, 4), "does not divide"),
        (t(64, 64, 0, 4, 4), "nonzero"),
        (
            t(128, 128, 16, 2, 2),
            "4096 threads exceed the target's 256",
        ),
        (t(128, 128, 32, 8, 8), "bytes of shared memory exceed"),
        (t(128, 128, 16, 16, 8), "128 accumulators"),
        (t(512, 64, 8, 8, 8), "larger than 256"),
    ] {
        let e = kernel_err(matmul::matmul(&cfg, &bad, &l));
        assert!(e.starts_with("kernel `matmul_f32_bias_relu`:"), "{e}");
        assert!(
            e.contains(why) || why == "128 accumulators" && e.contains("64 accumulators"),
            "{e}"
        );
    }
    // Valid under CUDA's limits, not WebGPU's.
    let big = t(128, 128, 32, 8, 8);
    assert!(matmul::matmul(&cfg, &big, &Limits::cuda()).is_ok());
    let e = kernel_err(matmul::matmul(
        &MatMulConfig::plain(Elem::U32),
        &t(16, 16, 8, 1, 1),
        &l,
    ));
    assert!(
        e.contains("matmul_u32") && e.contains("not a float type"),
        "{e}"
    );
    for bad in [
        GemvTunables {
            threads: 96,
            cols: 8,
        },
        GemvTunables {
            threads: 64,
            cols: 128,
        },
        GemvTunables {
            threads: 512,
            cols: 8,
        },
    ] {
        let e = kernel_err(gemv(&cfg, &bad, &l));
        assert!(e.starts_with("kernel `gemv_f32_bias_relu`:"), "{e}");
    }
}

// ---- Numerics through the kernel-IR interpreter. ----

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `act(y)` as the kernel computes it, on the host (through the same expression, evaluated by
/// hand for each activation).
fn act_ref(act: Act, y: f32) -> f32 {
    let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    let cubic = 0.044715f64 as f32;
    let sqrt_2_pi = (2.0 / std::f64::consts::PI).sqrt() as f32;
    match act {
        Act::Identity => y,
        Act::GeluErf => (y * 0.5) * (libm::erff(y * inv_sqrt2) + 1.0),
        Act::GeluTanh => (y * 0.5) * (((y + y * y * y * cubic) * sqrt_2_pi).tanh() + 1.0),
        Act::Relu => y.max(0.0),
        Act::Silu => y / (1.0 + (-y).exp()),
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// (batch0, batch1)
    batch: (usize, usize),
    /// Batch strides in units of one operand matrix (0 = broadcast): (a_s0, a_s1, b_s0, b_s1).
    bstrides: (usize, usize, usize, usize),
}

#[allow(clippy::needless_range_loop)] // (z, i, j) index several operands at once
fn run_case(cfg: &MatMulConfig, g: &Generated, c: &Case, tol_scale: f32) {
    let Case {
        m,
        n,
        k,
        batch: (b0, b1),
        bstrides: (as0, as1, bs0, bs1),
    } = *c;
    let (amat, bmat) = (m * k, k * n);
    let a_len = ((b0 - 1) * as0 + (b1 - 1) * as1 + 1) * amat;
    let b_len = ((b0 - 1) * bs0 + (b1 - 1) * bs1 + 1) * bmat;
    let round = |v: Vec<f32>| -> Vec<f32> {
        match cfg.elem {
            Elem::F16 => v.iter().map(|x| f16_round(*x)).collect(),
            _ => v,
        }
    };
    let a = round(rand_vec(a_len, 1 + (m * 31 + k) as u64));
    let b = round(rand_vec(b_len, 2 + (n * 17 + k) as u64));
    let b2 = round(rand_vec(b_len, 5 + (n * 13 + k) as u64));
    let bias = round(rand_vec(n, 3));
    let res = round(rand_vec(b0 * b1 * m * n, 4));
    let uniforms: HashMap<&str, u32> = [
        ("m", m),
        ("n", n),
        ("k", k),
        ("batch0", b0),
        ("batch1", b1),
        ("a_s0", as0 * amat),
        ("a_s1", as1 * amat),
        ("b_s0", bs0 * bmat),
        ("b_s1", bs1 * bmat),
    ]
    .into_iter()
    .map(|(s, v)| (s, v as u32))
    .collect();
    let mut bufs = vec![HostBuf::F32(a.clone()), HostBuf::F32(b.clone())];
    if cfg.gate {
        bufs.push(HostBuf::F32(b2.clone()));
    }
    if cfg.bias {
        bufs.push(HostBuf::F32(bias.clone()));
    }
    if cfg.residual {
        bufs.push(HostBuf::F32(res.clone()));
    }
    bufs.push(HostBuf::F32(vec![f32::NAN; b0 * b1 * m * n]));
    let u: Vec<u32> = g
        .kernel
        .uniforms
        .iter()
        .map(|s| uniforms[s.as_str()])
        .collect();
    let grid = g
        .grid
        .clone()
        .map(|d| d.eval(&|s| uniforms.get(s).map(|&v| v as u64)).unwrap() as u32);
    interp::run(&g.kernel, grid, &mut bufs, &u, 32)
        .unwrap_or_else(|e| panic!("{}: {e}", g.kernel.name));
    let out = bufs.last().unwrap().f32();
    for z0 in 0..b0 {
        for z1 in 0..b1 {
            let z = z0 * b1 + z1;
            let ao = (z0 * as0 + z1 * as1) * amat;
            let bo = (z0 * bs0 + z1 * bs1) * bmat;
            for i in 0..m {
                for j in 0..n {
                    let (mut acc, mut mag, mut up) = (0f64, 0f64, 0f64);
                    for kk in 0..k {
                        let bi = if cfg.b_transposed {
                            bo + j * k + kk
                        } else {
                            bo + kk * n + j
                        };
                        let p = a[ao + i * k + kk] as f64 * b[bi] as f64;
                        acc += p;
                        mag += p.abs();
                        up += a[ao + i * k + kk] as f64 * b2[bi] as f64;
                    }
                    let mut y = acc as f32;
                    if cfg.bias {
                        y += bias[j];
                    }
                    let mut want = act_ref(cfg.act, y);
                    if cfg.gate {
                        // |up| ≤ k, so the error of `act(y)` scales by at most k as well.
                        want *= up as f32;
                        mag *= k.max(1) as f64;
                    }
                    let oi = z * m * n + i * n + j;
                    if cfg.residual {
                        want += res[oi];
                    }
                    let got = out[oi];
                    // 1e-5 relative·k (the f32 sum's error grows with k), with the f16
                    // output rounding folded into `tol_scale`; `mag` bounds cancellation.
                    let tol =
                        tol_scale * (k.max(1) as f32) * (want.abs() + 1.0) + 1e-6 * mag as f32;
                    assert!(
                        (got - want).abs() <= tol,
                        "{} m={m} n={n} k={k} batch={b0}x{b1} at [{z}, {i}, {j}]: got {got}, want {want}",
                        g.kernel.name
                    );
                }
            }
        }
    }
}

fn f16_round(v: f32) -> f32 {
    // Round through the interpreter's own f16 rounding: a one-thread kernel would be overkill;
    // f16 has 11 significant bits, so round the f32 mantissa to 10 explicit bits (inputs are in
    // [-1, 1], no subnormals or overflow to care about beyond 2^-14).
    if v == 0.0 || v.abs() < 6.2e-5 {
        return 0.0;
    }
    let bits = v.to_bits();
    let r = bits.wrapping_add(0xfff + ((bits >> 13) & 1)) & !0x1fff;
    f32::from_bits(r)
}

/// Small tiles so odd sizes span several workgroups without slow interpretation.
fn small() -> MatMulTunables {
    MatMulTunables {
        tile_m: 16,
        tile_n: 16,
        tile_k: 8,
        rm: 2,
        rn: 4,
        reg: 0,
    }
}

#[test]
fn matmul_odd_sizes_match_reference() {
    let l = Limits::webgpu();
    for bt in [false, true] {
        let cfg = MatMulConfig::plain(Elem::F32).transposed_b(bt);
        let g = matmul::matmul(&cfg, &small(), &l).unwrap();
        for (m, n, k) in [
            (1, 1, 1),
            (3, 50, 1),
            (50, 3, 129),
            (129, 1, 3),
            (1, 129, 50),
            (3, 3, 3),
            (50, 129, 3),
            (129, 50, 50),
        ] {
            let c = Case {
                m,
                n,
                k,
                batch: (1, 1),
                bstrides: (1, 1, 1, 1),
            };
            run_case(&cfg, &g, &c, 1e-5);
        }
    }
}

#[test]
fn every_epilogue_both_layouts() {
    let l = Limits::webgpu();
    let acts = [
        Act::Identity,
        Act::GeluErf,
        Act::GeluTanh,
        Act::Relu,
        Act::Silu,
    ];
    for (i, act) in acts.into_iter().enumerate() {
        for bt in [false, true] {
            for (bias, res) in [(true, true), (i % 2 == 0, false)] {
                let cfg = MatMulConfig::plain(Elem::F32)
                    .epilogue(act, bias, res)
                    .transposed_b(bt);
                let g = matmul::matmul(&cfg, &small(), &l).unwrap();
                let c = Case {
                    m: 3 + 17 * i,
                    n: 50 - 9 * i,
                    k: 3 + 7 * i,
                    batch: (1, 1),
                    bstrides: (1, 1, 1, 1),
                };
                run_case(&cfg, &g, &c, 1e-5);
            }
        }
    }
}

/// Gated (SwiGLU) kernels: `act(a @ b) · (a @ b2)`, tiled and GEMV, both layouts, odd sizes,
/// a broadcast weight batch.
#[test]
fn gated_kernels_match_reference() {
    let l = Limits::webgpu();
    for bt in [false, true] {
        for act in [Act::Silu, Act::GeluTanh] {
            let cfg = MatMulConfig::plain(Elem::F32)
                .epilogue(act, false, false)
                .transposed_b(bt)
                .gated(true);
            let tiled = matmul::matmul(&cfg, &small(), &l).unwrap();
            let default = matmul::matmul(&cfg, &MatMulTunables::default_for(&cfg, &l), &l).unwrap();
            let gv = gemv(
                &cfg,
                &GemvTunables {
                    threads: 64,
                    cols: 4,
                },
                &l,
            )
            .unwrap();
            for (m, n, k, batch, bstrides) in [
                (1, 129, 50, (1, 1), (1, 1, 1, 1)),
                (50, 3, 129, (1, 1), (1, 1, 1, 1)),
                (3, 50, 1, (1, 1), (1, 1, 1, 1)),
                (3, 9, 33, (2, 2), (2, 1, 0, 0)),
            ] {
                let c = Case {
                    m,
                    n,
                    k,
                    batch,
                    bstrides,
                };
                for g in [&tiled, &default, &gv] {
                    run_case(&cfg, g, &c, 1e-5);
                }
            }
        }
    }
}

#[test]
fn batches_broadcast_through_zero_strides() {
    let l = Limits::webgpu();
    for bt in [false, true] {
        let cfg = MatMulConfig::plain(Elem::F32)
            .epilogue(Act::Silu, true, true)
            .transposed_b(bt);
        let g = matmul::matmul(&cfg, &small(), &l).unwrap();
        for (batch, bstrides) in [
            ((2, 3), (3, 1, 0, 0)), // [2, 3, m, k] × [k, n] (a weight shared by all batches)
            ((2, 3), (3, 1, 3, 1)), // both fully batched (attention-style)
            ((2, 3), (1, 0, 0, 1)), // [2, 1, m, k] × [1, 3, k, n]
            ((1, 4), (0, 0, 0, 1)), // a broadcast, b batched
        ] {
            let c = Case {
                m: 5,
                n: 19,
                k: 17,
                batch,
                bstrides,
            };
            run_case(&cfg, &g, &c, 1e-5);
        }
    }
}

#[test]
fn default_tilings_and_f16_storage() {
    // The WebGPU default (64×64×16, 4×4) at a size spanning partial tiles.
    let l = Limits::webgpu();
    let cfg = MatMulConfig::plain(Elem::F32)
        .epilogue(Act::GeluErf, true, false)
        .transposed_b(true);
    let g = matmul::matmul(&cfg, &MatMulTunables::default_for(&cfg, &l), &l).unwrap();
    let c = Case {
        m: 70,
        n: 65,
        k: 19,
        batch: (1, 1),
        bstrides: (1, 1, 1, 1),
    };
    run_case(&cfg, &g, &c, 1e-5);
    // f16 storage: inputs exactly representable, output rounded to f16 (2^-11 relative).
    let cfg = MatMulConfig::plain(Elem::F16).epilogue(Act::GeluTanh, true, true);
    let g = matmul::matmul(&cfg, &small(), &l).unwrap();
    let c = Case {
        m: 20,
        n: 33,
        k: 50,
        batch: (1, 2),
        bstrides: (0, 1, 0, 0),
    };
    run_case(&cfg, &g, &c, 1e-5 + 1.0 / 2048.0 / 50.0);
}

#[test]
fn gemv_matches_reference() {
    let l = Limits::webgpu();
    for bt in [false, true] {
        for (act, bias, res) in [(Act::Identity, false, false), (Act::GeluErf, true, true)] {
            let cfg = MatMulConfig::plain(Elem::F32)
                .epilogue(act, bias, res)
                .transposed_b(bt);
            for t in [
                GemvTunables::default_for(&cfg, &l),
                GemvTunables {
                    threads: 64,
                    cols: 4,
                },
            ] {
                let g = gemv(&cfg, &t, &l).unwrap();
                for (m, n, k, batch, bstrides) in [
                    (1, 129, 50, (1, 1), (1, 1, 1, 1)),
                    (1, 3, 129, (1, 1), (1, 1, 1, 1)),
                    (3, 50, 1, (1, 1), (1, 1, 1, 1)),
                    (1, 9, 33, (2, 2), (2, 1, 0, 0)),
                ] {
                    let c = Case {
                        m,
                        n,
                        k,
                        batch,
                        bstrides,
                    };
                    run_case(&cfg, &g, &c, 1e-5);
                }
            }
        }
    }
}

#[test]
fn activation_is_spelled_like_the_cpu_reference() {
    // GeluErf uses the erf intrinsic; Silu is x·sigmoid(x).
    let y = transfuse_codegen::kir::var("y");
    assert!(format!("{:?}", activation(Act::GeluErf, y.clone())).contains("Erf"));
    assert!(format!("{:?}", activation(Act::Silu, y.clone())).contains("Sigmoid"));
    assert_eq!(activation(Act::Identity, y.clone()), y);
    assert!(matches!(activation(Act::Relu, y), Expr::Bin(..)));
}

// ---- The register design (CPU adapters). ----

#[test]
fn every_register_point_validates_with_naga_and_prints_cuda() {
    let l = Limits::webgpu();
    for (bt, gate, elem) in [
        (false, false, Elem::F32),
        (true, false, Elem::F16),
        (true, true, Elem::F32),
        (false, true, Elem::F16),
    ] {
        let cfg = MatMulConfig::plain(elem)
            .epilogue(Act::GeluTanh, true, true)
            .transposed_b(bt)
            .gated(gate);
        let space = MatMulTunables::reg_space(&cfg, &l);
        assert!(space.len() > 50, "{} points", space.len());
        // With 8-lane subgroups the broadcast points join the space.
        let l8 = Limits {
            subgroup_min: 8,
            ..l
        };
        let wide = MatMulTunables::reg_space(&cfg, &l8);
        assert!(wide.iter().any(|t| t.reg == 2) && wide.len() > space.len());
        for t in wide.iter().filter(|t| t.reg == 2) {
            let g = matmul::matmul(&cfg, t, &l8).unwrap();
            assert_eq!(g.kernel.threads(), 8);
            let src = wgsl::print(&g.kernel).unwrap();
            assert!(src.contains("subgroupBroadcast"), "{}", g.kernel.name);
            common::validate_wgsl(&src);
            let cu = cuda::print(&g.kernel).unwrap();
            assert!(cu.contains("tf_bcast8"), "{}", g.kernel.name);
        }
        for t in &space {
            assert_eq!(t.reg, 1);
            let g = matmul::matmul(&cfg, t, &l).unwrap();
            assert!(
                g.kernel.shared.is_empty(),
                "{}: no shared memory",
                g.kernel.name
            );
            assert_eq!(g.kernel.threads(), t.threads());
            let src = wgsl::print(&g.kernel).unwrap();
            assert!(src.contains("vec4"), "{}: vec4 loads", g.kernel.name);
            common::validate_wgsl(&src);
            cuda::print(&g.kernel).unwrap();
        }
    }
}

#[test]
fn register_design_refuses_what_it_cannot_generate() {
    let l = Limits::webgpu();
    let cfg = MatMulConfig::plain(Elem::F32);
    // A non-transposed b is read as vectors of 4 columns.
    let msg = kernel_err(matmul::matmul(
        &cfg,
        &MatMulTunables::reg(4, 2, 2, 4, 1),
        &l,
    ));
    assert!(
        msg.contains("matmul_f32") && msg.contains("multiple of 4"),
        "{msg}"
    );
    let mut t = MatMulTunables::reg(4, 4, 2, 4, 1);
    t.tile_k = 5;
    let msg = kernel_err(matmul::matmul(&cfg, &t, &l));
    assert!(msg.contains("at most 4 vec4 steps"), "{msg}");
    t.tile_k = 1;
    t.reg = 3;
    let msg = kernel_err(matmul::matmul(&cfg, &t, &l));
    assert!(msg.contains("reg must be 0"), "{msg}");
    // The broadcast design: only with subgroups of 8 lanes or more, one row of 8 lanes.
    let msg = kernel_err(matmul::matmul(&cfg, &MatMulTunables::bcast(8, 8, 1), &l));
    assert!(msg.contains("subgroups of at least 8"), "{msg}");
    let l8 = Limits {
        subgroup_min: 8,
        ..l
    };
    let mut t = MatMulTunables::bcast(8, 8, 1);
    t.rm = 4;
    t.tile_m = 4;
    let msg = kernel_err(matmul::matmul(&cfg, &t, &l8));
    assert!(msg.contains("multiple of 8 rows"), "{msg}");
    let msg = kernel_err(matmul::matmul(
        &cfg,
        &MatMulTunables {
            reg: 2,
            ..MatMulTunables::reg(8, 8, 2, 4, 1)
        },
        &l8,
    ));
    assert!(msg.contains("one row of 8"), "{msg}");
    let msg = kernel_err(matmul::matmul(
        &cfg,
        &MatMulTunables::reg(4, 4, 32, 32, 1),
        &l,
    ));
    assert!(msg.contains("threads exceed"), "{msg}");
    // The broadcast design keeps at most 512 outputs per invocation.
    let msg = kernel_err(matmul::matmul(&cfg, &MatMulTunables::bcast(64, 16, 1), &l8));
    assert!(msg.contains("exceeds 512 accumulators"), "{msg}");
    assert!(matmul::matmul(&cfg, &MatMulTunables::bcast(64, 8, 1), &l8).is_ok());
    assert_eq!(MatMulTunables::reg(8, 8, 1, 8, 1).shared_bytes(), 0);
}

/// The register design matches the reference at odd `m` (and odd `n` with `b` transposed;
/// `n` is a multiple of 4 otherwise, and `k` always: the lowering chooses the design only
/// then), every epilogue, gates, k unrolling with a tail, and broadcast batches.
#[test]
fn register_design_matches_reference() {
    let l = Limits::webgpu();
    let pts = [
        MatMulTunables::reg(8, 8, 1, 8, 1),
        MatMulTunables::reg(4, 8, 2, 4, 2),
        MatMulTunables::reg(1, 4, 1, 8, 1),
        MatMulTunables::reg(2, 4, 4, 2, 4),
        // The one-row default of thin products (decode steps) on CPU adapters.
        MatMulTunables::reg(1, 8, 1, 8, 1),
        // The broadcast design (8-lane subgroups): 8 and 16 rows, unrolled with a tail; the
        // CPU adapters' default (32 × 8, two steps), a block of 24 rows and the space's
        // largest blocks.
        MatMulTunables::bcast(8, 8, 1),
        MatMulTunables::bcast(16, 4, 2),
        MatMulTunables::bcast(32, 8, 2),
        MatMulTunables::bcast(24, 8, 2),
        MatMulTunables::bcast(64, 8, 1),
        MatMulTunables::bcast(32, 16, 2),
    ];
    let l8 = Limits {
        subgroup_min: 8,
        ..l
    };
    let acts = [
        Act::Identity,
        Act::GeluErf,
        Act::Silu,
        Act::GeluTanh,
        Act::Relu,
    ];
    for (i, t) in pts.iter().enumerate() {
        for bt in [false, true] {
            let cfg = MatMulConfig::plain(Elem::F32)
                .epilogue(acts[i % acts.len()], i % 2 == 0, i != 1)
                .transposed_b(bt);
            let g = matmul::matmul(&cfg, t, &l8).unwrap();
            for (m, n, k) in [
                (1usize, 1usize, 4usize),
                (3, 50, 52),
                (50, 3, 132),
                (129, 1, 8),
                (1, 129, 36),
                (3, 3, 4),
                (783, 3, 8),
                (2, 783, 12),
            ] {
                let n: usize = if bt { n } else { n.next_multiple_of(4) };
                let c = Case {
                    m,
                    n,
                    k,
                    batch: (1, 1),
                    bstrides: (1, 1, 1, 1),
                };
                run_case(&cfg, &g, &c, 1e-5);
            }
        }
    }
    // Gated, f16 storage, batches broadcast through zero strides.
    for bt in [false, true] {
        let cfg = MatMulConfig::plain(Elem::F32)
            .epilogue(Act::Silu, true, false)
            .transposed_b(bt)
            .gated(true);
        for t in [
            MatMulTunables::reg(4, 4, 2, 4, 2),
            MatMulTunables::bcast(8, 4, 1),
        ] {
            let g = matmul::matmul(&cfg, &t, &l8).unwrap();
            for (m, n, k) in [(3, 4, 4), (50, 20, 36), (129, 8, 12)] {
                let c = Case {
                    m,
                    n,
                    k,
                    batch: (1, 1),
                    bstrides: (1, 1, 1, 1),
                };
                run_case(&cfg, &g, &c, 1e-5);
            }
        }
        let cfg = MatMulConfig::plain(Elem::F32).transposed_b(bt);
        for t in [
            MatMulTunables::reg(4, 4, 2, 4, 1),
            MatMulTunables::bcast(8, 4, 2),
        ] {
            let g = matmul::matmul(&cfg, &t, &l8).unwrap();
            let c = Case {
                m: 5,
                n: 12,
                k: 8,
                batch: (2, 3),
                bstrides: (3, 1, 0, 1),
            };
            run_case(&cfg, &g, &c, 1e-5);
        }
        let cfg = MatMulConfig::plain(Elem::F16)
            .epilogue(Act::GeluErf, true, true)
            .transposed_b(bt);
        let g = matmul::matmul(&cfg, &MatMulTunables::bcast(8, 8, 1), &l8).unwrap();
        let c = Case {
            m: 50,
            n: 12,
            k: 20,
            batch: (1, 1),
            bstrides: (1, 1, 1, 1),
        };
        run_case(&cfg, &g, &c, 1e-5 + 1.0 / 2048.0 / 20.0);
    }
}

/// Every broadcast point of the tuner's space (8-lane subgroups), both layouts, matches the
/// reference at one odd size with the full epilogue.
#[test]
fn every_broadcast_point_matches_reference() {
    let l8 = Limits {
        subgroup_min: 8,
        ..Limits::webgpu()
    };
    for bt in [false, true] {
        let cfg = MatMulConfig::plain(Elem::F32)
            .epilogue(Act::GeluErf, true, true)
            .transposed_b(bt);
        let pts: Vec<MatMulTunables> = MatMulTunables::reg_space(&cfg, &l8)
            .into_iter()
            .filter(|t| t.reg == 2)
            .collect();
        assert!(pts.len() >= 20, "{} broadcast points", pts.len());
        for t in &pts {
            let g = matmul::matmul(&cfg, t, &l8).unwrap();
            let c = Case {
                m: 71,
                n: if bt { 37 } else { 36 },
                k: 12,
                batch: (1, 1),
                bstrides: (1, 1, 1, 1),
            };
            run_case(&cfg, &g, &c, 1e-5);
        }
    }
}

#[test]
fn register_design_is_the_cpu_adapters_default_when_operands_allow_vectors() {
    let cfg = MatMulConfig::plain(Elem::F32).transposed_b(true);
    let t = MatMulTunables::reg_for_problem(&cfg, Some(128), Some(384));
    assert_eq!((t.reg, t.rm, t.rn, t.threads()), (1, 8, 8, 8));
    // Narrow problems: fewer rows per block, the workgroup's width shrinks to the problem.
    let t = MatMulTunables::reg_for_problem(&cfg, Some(2), Some(8));
    assert_eq!((t.rm, t.rn, t.tile_n), (2, 8, 8));
    let t = MatMulTunables::reg_for_problem(&cfg, Some(1), Some(1000));
    assert_eq!((t.rm, t.rn, t.tile_m, t.threads()), (1, 8, 1, 8));
    assert!(t.validate("matmul", &Limits::webgpu()).is_ok());
    // With 8-lane subgroups (llvmpipe) the broadcast design, 32 × 8 blocks with two vec4
    // steps per k iteration, fewer rows (a multiple of 8) for fewer than 32, for 8 rows or more.
    let l8 = Limits {
        subgroup_min: 8,
        ..Limits::webgpu()
    };
    let t = MatMulTunables::cpu_for_problem(&cfg, &l8, Some(128), Some(384));
    assert_eq!((t.reg, t.rm, t.rn, t.tile_k, t.threads()), (2, 32, 8, 2, 8));
    assert!(MatMulTunables::reg_space(&cfg, &l8).contains(&t));
    let t = MatMulTunables::cpu_for_problem(&cfg, &l8, None, Some(384));
    assert_eq!((t.reg, t.rm), (2, 32));
    let t = MatMulTunables::cpu_for_problem(&cfg, &l8, Some(16), Some(384));
    assert_eq!((t.reg, t.rm, t.tile_m), (2, 16, 16));
    let t = MatMulTunables::cpu_for_problem(&cfg, &l8, Some(8), Some(64));
    assert_eq!((t.reg, t.rm), (2, 8));
    let t = MatMulTunables::cpu_for_problem(&cfg, &l8, Some(4), Some(384));
    assert_eq!((t.reg, t.rm), (1, 4));
    let t = MatMulTunables::cpu_for_problem(&cfg, &Limits::webgpu(), Some(128), Some(384));
    assert_eq!(t.reg, 1);
}
