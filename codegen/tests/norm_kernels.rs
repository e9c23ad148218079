//! The softmax / normalisation templates (codegen/src/kernels/norm.rs): every catalog kernel
//! prints (WGSL validated by naga unless bf16, CUDA for all), tunables are validated and their
//! spaces generate, the mask broadcasting uniforms are right, the plain affine f32 layer norm is
//! snapshotted, and the f32 (and some f16) kernels compute the right numbers when run through the
//! kernel-IR interpreter at odd sizes, with the register-cached and streamed paths, tree and
//! subgroup reductions, and a clamped grid (the grid-stride row loop).

mod common;

use std::collections::HashSet;

use expect_test::expect_file;
use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::norm::*;
use transfuse_codegen::kernels::{check_limits, Generated, Limits};
use transfuse_codegen::kir::Elem;
use transfuse_codegen::{cuda, wgsl, CodegenError};

// ---- Printing and validation. ----

#[test]
fn every_catalog_kernel_prints_valid_wgsl_and_cuda() {
    let cat = catalog();
    assert!(cat.len() >= 20, "{} kernels", cat.len());
    let mut names = HashSet::new();
    for g in &cat {
        let k = &g.kernel;
        assert!(names.insert(k.name.clone()), "duplicate name {}", k.name);
        let src = cuda::print(k).unwrap_or_else(|e| panic!("{e}"));
        assert!(src.contains(&format!(
            "void __launch_bounds__({}) {}(",
            k.threads(),
            k.name
        )));
        if k.uses(Elem::BF16) {
            assert!(wgsl::print(k).unwrap_err().to_string().contains("bf16"));
        } else {
            common::validate_wgsl(&wgsl::print(k).unwrap_or_else(|e| panic!("{e}")));
        }
        let limits = if k.threads() > 256 {
            Limits::cuda()
        } else {
            Limits::webgpu()
        };
        check_limits(k, &limits).unwrap();
        assert!(!g.tunables.is_empty(), "{}", k.name);
        for t in &g.tunables {
            assert!(t.space.contains(&t.value), "{}: {t:?}", k.name);
        }
    }
    for stem in [
        "softmax_",
        "softmax_mask_",
        "layer_norm_",
        "layer_norm_add_",
        "rms_norm_",
        "group_norm_",
        "instance_norm_",
        "batch_norm_",
    ] {
        for e in ["f32", "f16", "bf16"] {
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with(stem) && n.contains(&format!("_{e}_"))),
                "no {stem}*{e} kernel in {names:?}"
            );
        }
    }
}

fn configs() -> Vec<Box<dyn NormConfig>> {
    let mut v: Vec<Box<dyn NormConfig>> = vec![];
    for elem in [Elem::F32, Elem::F16] {
        v.push(Box::new(SoftmaxCfg {
            elem,
            scale: 0.5,
            mask: true,
        }));
        v.push(Box::new(NormCfg {
            elem,
            kind: NormKind::Layer,
            eps: 1e-5,
            affine: Affine::Vector,
            residual: true,
        }));
        v.push(Box::new(NormCfg {
            elem,
            kind: NormKind::Rms,
            eps: 1e-6,
            affine: Affine::Scalar,
            residual: false,
        }));
        v.push(Box::new(GroupNormCfg {
            elem,
            eps: 1e-5,
            affine: Affine::None,
            instance: false,
        }));
        v.push(Box::new(BatchNormCfg { elem }));
    }
    v
}

#[test]
fn every_point_of_the_search_space_generates_within_limits() {
    for limits in [Limits::webgpu(), Limits::cuda()] {
        for cfg in configs() {
            let space = Tune::space(cfg.as_ref(), &limits);
            let def = Tune::default_for(cfg.as_ref(), &limits);
            assert!(space.contains(&def), "{def:?} not in the space");
            assert_eq!(
                space.iter().map(|t| t.threads).max(),
                Some(limits.max_threads)
            );
            assert_eq!(
                space.iter().any(|t| t.subgroup == 32),
                cfg.reduces(),
                "subgroup tunable only where the kernel reduces"
            );
            let mut names = HashSet::new();
            for t in &space {
                let g = cfg.generate(t, &limits).unwrap();
                check_limits(&g.kernel, &limits).unwrap();
                assert!(names.insert(g.kernel.name.clone()), "{}", g.kernel.name);
                let threads = g.tunables.iter().find(|x| x.name == "threads").unwrap();
                assert_eq!(threads.value, t.threads);
                assert!(threads.space.iter().all(|&x| x <= limits.max_threads));
            }
            if cfg.elem() == Elem::F16 && limits == Limits::webgpu() {
                // A sample of the space as WGSL: the smallest and largest of each kind.
                for t in [space[0], space[space.len() - 1]] {
                    common::validate_wgsl(
                        &wgsl::print(&cfg.generate(&t, &limits).unwrap().kernel).unwrap(),
                    );
                }
            }
        }
    }
}

#[test]
fn invalid_tunables_and_configs_are_refused_naming_the_kernel() {
    let web = Limits::webgpu();
    let sm = SoftmaxCfg {
        elem: Elem::F32,
        scale: 1.0,
        mask: false,
    };
    let ok = Tune::default_for(&sm, &web);
    let bad = [
        (Tune { threads: 512, ..ok }, "exceeds the target's 256"),
        (Tune { threads: 96, ..ok }, "not a power of two"),
        (
            Tune { threads: 16, ..ok },
            "not a power of two of at least 32",
        ),
        (
            Tune {
                per_thread: 0,
                ..ok
            },
            "per_thread = 0",
        ),
        (
            Tune {
                per_thread: 17,
                ..ok
            },
            "per_thread = 17",
        ),
        (Tune { subgroup: 16, ..ok }, "subgroup = 16"),
    ];
    for (t, msg) in bad {
        let e = softmax(&sm, &t, &web).unwrap_err();
        let CodegenError::Kernel { kernel, msg: m } = &e else {
            panic!("{e:?}")
        };
        assert!(kernel.starts_with("softmax_f32_"), "{e}");
        assert!(m.contains(msg), "{e} lacks {msg:?}");
    }
    // 1024 threads are fine for CUDA, not for WebGPU.
    let big = Tune {
        threads: 1024,
        ..ok
    };
    assert!(softmax(&sm, &big, &Limits::cuda()).is_ok());
    assert!(softmax(&sm, &big, &web).is_err());
    // Shared memory over a (made-up) target's limit.
    let tiny = Limits {
        max_threads: 1024,
        max_shared_bytes: 1024,
        ..Limits::cuda()
    };
    let e = softmax(&sm, &big, &tiny).unwrap_err().to_string();
    assert!(e.contains("bytes of shared memory"), "{e}");
    assert!(softmax(
        &sm,
        &Tune {
            subgroup: 32,
            ..big
        },
        &tiny
    )
    .is_ok());
    // Batch norm does not reduce: no subgroup variant.
    let e = batch_norm(
        &BatchNormCfg { elem: Elem::F32 },
        &Tune { subgroup: 32, ..ok },
        &web,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("kernel `batch_norm_f32_"), "{e}");
    // Storage types, scale and eps.
    let e = softmax(
        &SoftmaxCfg {
            elem: Elem::U32,
            ..sm
        },
        &ok,
        &web,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("storage type u32"), "{e}");
    let e = softmax(
        &SoftmaxCfg {
            scale: f32::NAN,
            ..sm
        },
        &ok,
        &web,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not finite"), "{e}");
    let ln = NormCfg {
        elem: Elem::F16,
        kind: NormKind::Layer,
        eps: -1.0,
        affine: Affine::Vector,
        residual: false,
    };
    let e = norm(&ln, &ok, &web).unwrap_err().to_string();
    assert!(
        e.starts_with("kernel `layer_norm_") && e.contains("eps = -1"),
        "{e}"
    );
    let gn = GroupNormCfg {
        elem: Elem::BF16,
        eps: f32::INFINITY,
        affine: Affine::Vector,
        instance: true,
    };
    let e = group_norm(&gn, &ok, &web).unwrap_err().to_string();
    assert!(e.starts_with("kernel `instance_norm_"), "{e}");
}

#[test]
fn names_distinguish_configurations() {
    let web = Limits::webgpu();
    let t = Tune {
        threads: 128,
        per_thread: 2,
        subgroup: 0,
    };
    let name = |c: &dyn NormConfig, t: &Tune| c.generate(t, &web).unwrap().kernel.name;
    let sm = |scale, mask| SoftmaxCfg {
        elem: Elem::F32,
        scale,
        mask,
    };
    assert_eq!(name(&sm(1.0, false), &t), "softmax_f32_t128x2");
    assert_eq!(
        name(&sm(0.125, true), &t),
        "softmax_mask_s3e000000_f32_t128x2"
    );
    assert_eq!(
        name(&sm(1.0, false), &Tune { subgroup: 32, ..t }),
        "softmax_f32_t128x2_sg32"
    );
    let ln = NormCfg {
        elem: Elem::BF16,
        kind: NormKind::Layer,
        eps: 1e-5,
        affine: Affine::Vector,
        residual: true,
    };
    assert_eq!(name(&ln, &t), "layer_norm_add_e3727c5ac_bf16_t128x2");
    let rms = NormCfg {
        kind: NormKind::Rms,
        affine: Affine::None,
        residual: false,
        ..ln
    };
    assert_eq!(name(&rms, &t), "rms_norm_plain_e3727c5ac_bf16_t128x2");
}

#[test]
fn layer_norm_f32_snapshot() {
    let cfg = NormCfg {
        elem: Elem::F32,
        kind: NormKind::Layer,
        eps: 1e-5,
        affine: Affine::Vector,
        residual: false,
    };
    let web = Limits::webgpu();
    let g = norm(&cfg, &Tune::default_for(&cfg, &web), &web).unwrap();
    expect_file!["snapshots/layer_norm_f32.wgsl"].assert_eq(&wgsl::print(&g.kernel).unwrap());
    expect_file!["snapshots/layer_norm_f32.cu"].assert_eq(&cuda::print(&g.kernel).unwrap());
}

// ---- Mask broadcasting. ----

/// Offset of mask element for scores index `idx` by plain broadcasting.
fn mask_offset(scores: &[usize], mask: &[usize], flat: usize) -> usize {
    let r = scores.len();
    let mut m = vec![1; r - mask.len()];
    m.extend_from_slice(mask);
    let (mut rem, mut off, mut stride) = (flat, 0, 1);
    for d in (0..r).rev() {
        let i = rem % scores[d];
        rem /= scores[d];
        if m[d] != 1 {
            off += i * stride;
        }
        stride *= m[d];
    }
    off
}

fn offset_by_uniforms(u: &[u32; 7], row: usize, j: usize) -> usize {
    let row = row as u32;
    let t0 = (row / u[0]) % u[1] * u[2];
    let t1 = (row / u[3]) % u[4] * u[5];
    (t0 + t1) as usize + j * u[6] as usize
}

#[test]
fn mask_uniforms_match_broadcasting() {
    let scores = [2, 3, 4, 5];
    let masks: &[&[usize]] = &[
        &[2, 1, 1, 5],
        &[2, 1, 4, 5],
        &[1, 1, 4, 5],
        &[1, 3, 1, 5],
        &[2, 3, 4, 5],
        &[4, 5],
        &[5],
        &[2, 1, 4, 1],
        &[3, 4, 1],
        &[1],
        &[2, 3, 1, 1],
        &[1, 3, 4, 5],
    ];
    for &m in masks {
        let u = mask_uniforms(&scores, m).unwrap_or_else(|| panic!("{m:?}"));
        for flat in 0..scores.iter().product() {
            let (row, j) = (flat / 5, flat % 5);
            assert_eq!(
                offset_by_uniforms(&u, row, j),
                mask_offset(&scores, m, flat),
                "mask {m:?} at {flat}: {u:?}"
            );
        }
    }
    // Three separate runs of row dimensions; not broadcastable; too many dims.
    assert_eq!(
        mask_uniforms(&[2, 2, 2, 2, 2, 3], &[2, 1, 2, 1, 2, 3]),
        None
    );
    assert_eq!(mask_uniforms(&[2, 3, 4], &[3, 3]), None);
    assert_eq!(mask_uniforms(&[4], &[1, 4]), None);
    assert!(mask_uniforms(&[2, 1, 2, 1, 2, 3], &[2, 1, 2, 1, 2, 3]).is_some());
}

// ---- Numerics through the interpreter. ----

const COLS: [usize; 4] = [1, 50, 129, 783];

/// Deterministic values in [-3, 3).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
        })
        .collect()
}

/// The tunings each kernel is run with: registers cover every row (default), rows longer than
/// the register cache (streamed tail), subgroup reductions.
fn tunings(reduces: bool) -> Vec<(Tune, Limits)> {
    let web = Limits::webgpu();
    let mut v = vec![
        (
            Tune {
                threads: 256,
                per_thread: 4,
                subgroup: 0,
            },
            web,
        ),
        (
            Tune {
                threads: 32,
                per_thread: 2,
                subgroup: 0,
            },
            web,
        ),
    ];
    if reduces {
        v.push((
            Tune {
                threads: 64,
                per_thread: 1,
                subgroup: 32,
            },
            web,
        ));
    }
    v
}

/// Runs `g` with uniforms by name; the grid from the plan, or `clamp` workgroups at most.
fn launch(g: &Generated, bufs: &mut [HostBuf], uniforms: &[(&str, u32)], clamp: Option<u32>) {
    let value = |n: &str| {
        uniforms
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{}: uniform {n} not given", g.kernel.name))
    };
    let vals: Vec<u32> = g.kernel.uniforms.iter().map(|n| value(n)).collect();
    let mut grid = [0u32; 3];
    for (a, d) in g.grid.iter().enumerate() {
        let n = d.eval(&|n| Some(u64::from(value(n)))).unwrap() as u32;
        grid[a] = clamp.map_or(n, |c| n.min(c));
    }
    interp::run(&g.kernel, grid, bufs, &vals, 32).unwrap_or_else(|e| panic!("{e}"));
}

/// |got − want| ≤ tol · max(|want|, 0.1 · max|want| over its row).
fn assert_close(what: &str, got: &[f32], want: &[f64], row: usize, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (r, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let scale = w.iter().fold(0f64, |a, &v| a.max(v.abs())) * 0.1;
        for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
            let err = (a as f64 - b).abs();
            assert!(
                err <= tol * b.abs().max(scale),
                "{what}: row {r} col {j}: got {a}, want {b} (err {err:e})"
            );
        }
    }
}

fn f16(v: &[f32]) -> Vec<f32> {
    // Values in [-3, 3) on a 2⁻⁸ grid are exact in f16, and so are sums of two of them.
    v.iter().map(|&x| (x * 256.0).round() / 256.0).collect()
}

fn softmax_ref(x: &[f32], mask: Option<&[f32]>, scale: f32, cols: usize) -> Vec<f64> {
    let mut out = vec![];
    for (r, row) in x.chunks(cols).enumerate() {
        // Scores as f32, exactly as the op: x·scale, then + mask.
        let s: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                let v = if scale != 1.0 { v * scale } else { v };
                (match mask {
                    Some(m) => v + m[r * cols + j],
                    None => v,
                }) as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / sum));
    }
    out
}

#[test]
fn softmax_matches_reference() {
    let rows = 3;
    for mask in [false, true] {
        for scale in [1.0f32, 0.125] {
            let cfg = SoftmaxCfg {
                elem: Elem::F32,
                scale,
                mask,
            };
            for (tune, limits) in tunings(true) {
                let g = softmax(&cfg, &tune, &limits).unwrap();
                for cols in COLS {
                    let x = data(rows * cols, cols as u64);
                    // A full [rows, cols] mask; row 1 fully masked with f32::MIN, a few
                    // f32::MIN entries elsewhere.
                    let mut m = data(rows * cols, 7 + cols as u64);
                    for v in &mut m[cols..2 * cols] {
                        *v = f32::MIN;
                    }
                    for j in (0..cols).step_by(3) {
                        m[j] = f32::MIN;
                    }
                    let mut bufs = vec![HostBuf::F32(x.clone())];
                    let mut uni = vec![("rows", rows as u32), ("cols", cols as u32)];
                    let mu = mask_uniforms(&[rows, cols], &[rows, cols]).unwrap();
                    if mask {
                        bufs.push(HostBuf::F32(m.clone()));
                        uni.extend(MASK_UNIFORMS.iter().copied().zip(mu));
                    }
                    bufs.push(HostBuf::F32(vec![f32::NAN; rows * cols]));
                    launch(&g, &mut bufs, &uni, None);
                    let got = bufs.last().unwrap().f32();
                    let want = softmax_ref(&x, mask.then_some(&m[..]), scale, cols);
                    let what = format!("{} cols {cols}", g.kernel.name);
                    assert_close(&what, got, &want, cols, 1e-5);
                    if mask {
                        // The fully masked row is uniform.
                        for &p in &got[cols..2 * cols] {
                            assert!(
                                (p - 1.0 / cols as f32).abs() <= 1e-5 / cols as f32,
                                "{what}: {p}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn softmax_broadcast_masks_and_clamped_grid() {
    // Scores [2, 3, 4, cols]; masks broadcast in several ways; the grid clamped to 5
    // workgroups (the grid-stride loop covers the 24 rows).
    let scores = [2usize, 3, 4];
    let cols = 50;
    let rows: usize = scores.iter().product();
    let cfg = SoftmaxCfg {
        elem: Elem::F32,
        scale: 0.125,
        mask: true,
    };
    let tune = Tune {
        threads: 32,
        per_thread: 1,
        subgroup: 0,
    };
    let g = softmax(&cfg, &tune, &Limits::webgpu()).unwrap();
    let x = data(rows * cols, 99);
    let full = [scores[0], scores[1], scores[2], cols];
    for mshape in [
        vec![2, 1, 1, cols],
        vec![2, 1, 4, cols],
        vec![1, 3, 1, cols],
        vec![4, 1],
    ] {
        let m = data(mshape.iter().product(), 5);
        let dense: Vec<f32> = (0..rows * cols)
            .map(|i| m[mask_offset(&full, &mshape, i)])
            .collect();
        let mu = mask_uniforms(&full, &mshape).unwrap();
        let mut uni = vec![("rows", rows as u32), ("cols", cols as u32)];
        uni.extend(MASK_UNIFORMS.iter().copied().zip(mu));
        let mut bufs = vec![
            HostBuf::F32(x.clone()),
            HostBuf::F32(m),
            HostBuf::F32(vec![0.0; rows * cols]),
        ];
        launch(&g, &mut bufs, &uni, Some(5));
        let want = softmax_ref(&x, Some(&dense), 0.125, cols);
        assert_close(
            &format!("mask {mshape:?}"),
            bufs[2].f32(),
            &want,
            cols,
            1e-5,
        );
    }
}

fn norm_ref(
    x: &[f32],
    kind: NormKind,
    eps: f32,
    gamma: Option<&dyn Fn(usize, usize) -> f32>,
    beta: Option<&dyn Fn(usize, usize) -> f32>,
    cols: usize,
) -> Vec<f64> {
    let mut out = vec![];
    for (r, row) in x.chunks(cols).enumerate() {
        let n = cols as f64;
        let (mean, var) = match kind {
            NormKind::Layer => {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                (mean, var)
            }
            NormKind::Rms => (
                0.0,
                row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n,
            ),
        };
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, &v) in row.iter().enumerate() {
            let mut y = (v as f64 - mean) * rstd;
            if let Some(g) = gamma {
                y *= g(r, j) as f64;
            }
            if let Some(b) = beta {
                y += b(r, j) as f64;
            }
            out.push(y);
        }
    }
    out
}

#[test]
fn layer_and_rms_norm_match_reference() {
    let rows = 3;
    for kind in [NormKind::Layer, NormKind::Rms] {
        for affine in [Affine::Vector, Affine::Scalar, Affine::None] {
            for residual in [false, true] {
                let cfg = NormCfg {
                    elem: Elem::F32,
                    kind,
                    eps: 1e-5,
                    affine,
                    residual,
                };
                for (tune, limits) in tunings(true) {
                    let g = norm(&cfg, &tune, &limits).unwrap();
                    for cols in COLS {
                        let x: Vec<f32> = data(rows * cols, cols as u64)
                            .iter()
                            .map(|v| v * 2.0 + 1.0)
                            .collect();
                        let res = data(rows * cols, 3 + cols as u64);
                        let plen = if affine == Affine::Vector { cols } else { 1 };
                        let gamma = data(plen, 11);
                        let beta = data(plen, 12);
                        let mut bufs = vec![HostBuf::F32(x.clone())];
                        if residual {
                            bufs.push(HostBuf::F32(res.clone()));
                        }
                        if affine != Affine::None {
                            bufs.push(HostBuf::F32(gamma.clone()));
                            if kind == NormKind::Layer {
                                bufs.push(HostBuf::F32(beta.clone()));
                            }
                        }
                        bufs.push(HostBuf::F32(vec![f32::NAN; rows * cols]));
                        if residual {
                            bufs.push(HostBuf::F32(vec![f32::NAN; rows * cols]));
                        }
                        let uni = [("rows", rows as u32), ("cols", cols as u32)];
                        launch(&g, &mut bufs, &uni, None);
                        let input: Vec<f32> = if residual {
                            x.iter().zip(&res).map(|(a, b)| a + b).collect()
                        } else {
                            x.clone()
                        };
                        let pi = |j: usize| if plen == 1 { 0 } else { j };
                        let gf = |_: usize, j: usize| gamma[pi(j)];
                        let bf = |_: usize, j: usize| beta[pi(j)];
                        let aff = affine != Affine::None;
                        let want = norm_ref(
                            &input,
                            kind,
                            1e-5,
                            aff.then_some(&gf as &dyn Fn(usize, usize) -> f32),
                            (aff && kind == NormKind::Layer)
                                .then_some(&bf as &dyn Fn(usize, usize) -> f32),
                            cols,
                        );
                        let what = format!("{} cols {cols}", g.kernel.name);
                        let n = bufs.len();
                        let y = if residual { &bufs[n - 2] } else { &bufs[n - 1] };
                        assert_close(&what, y.f32(), &want, cols, 1e-5);
                        if residual {
                            assert_eq!(bufs[n - 1].f32(), &input[..], "{what}: sum");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn group_and_instance_norm_match_reference() {
    let n = 3;
    for instance in [false, true] {
        for affine in [Affine::Vector, Affine::None] {
            let cfg = GroupNormCfg {
                elem: Elem::F32,
                eps: 1e-5,
                affine,
                instance,
            };
            for (tune, limits) in tunings(true) {
                let g = group_norm(&cfg, &tune, &limits).unwrap();
                // (channels, groups, spatial): block lengths 1, 2·25, 3·43, 783.
                for (c, groups, spatial) in [(2, 2, 1), (6, 3, 25), (6, 2, 43), (2, 2, 783)] {
                    let groups = if instance { c } else { groups };
                    let cpg = c / groups;
                    let len = cpg * spatial;
                    let x = data(n * c * spatial, (c * spatial) as u64);
                    let gamma = data(c, 21);
                    let beta = data(c, 22);
                    let mut bufs = vec![HostBuf::F32(x.clone())];
                    if affine == Affine::Vector {
                        bufs.push(HostBuf::F32(gamma.clone()));
                        bufs.push(HostBuf::F32(beta.clone()));
                    }
                    bufs.push(HostBuf::F32(vec![f32::NAN; x.len()]));
                    let uni = [
                        ("blocks", (n * groups) as u32),
                        ("groups", groups as u32),
                        ("channels", c as u32),
                        ("channels_per_group", cpg as u32),
                        ("spatial", spatial as u32),
                    ];
                    launch(&g, &mut bufs, &uni, None);
                    // Block b = (n, group); channel of column j: group·cpg + j / spatial.
                    let chan = |b: usize, j: usize| (b % groups) * cpg + j / spatial;
                    let gf = |b: usize, j: usize| gamma[chan(b, j)];
                    let bf = |b: usize, j: usize| beta[chan(b, j)];
                    let aff = affine == Affine::Vector;
                    let want = norm_ref(
                        &x,
                        NormKind::Layer,
                        1e-5,
                        aff.then_some(&gf as &dyn Fn(usize, usize) -> f32),
                        aff.then_some(&bf as &dyn Fn(usize, usize) -> f32),
                        len,
                    );
                    let what = format!("{} c {c} groups {groups} spatial {spatial}", g.kernel.name);
                    assert_close(&what, bufs.last().unwrap().f32(), &want, len, 1e-5);
                }
            }
        }
    }
}

#[test]
fn batch_norm_matches_reference_with_a_clamped_grid() {
    let cfg = BatchNormCfg { elem: Elem::F32 };
    for (tune, limits) in tunings(false) {
        let g = batch_norm(&cfg, &tune, &limits).unwrap();
        for spatial in COLS {
            let (n, c) = (3, 5);
            let x = data(n * c * spatial, spatial as u64);
            let scale = data(c, 1);
            let shift = data(c, 2);
            for clamp in [None, Some(2)] {
                let mut bufs = vec![
                    HostBuf::F32(x.clone()),
                    HostBuf::F32(scale.clone()),
                    HostBuf::F32(shift.clone()),
                    HostBuf::F32(vec![f32::NAN; x.len()]),
                ];
                let uni = [
                    ("n", x.len() as u32),
                    ("channels", c as u32),
                    ("spatial", spatial as u32),
                ];
                launch(&g, &mut bufs, &uni, clamp);
                let want: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let ch = (i / spatial) % c;
                        v * scale[ch] + shift[ch]
                    })
                    .collect();
                assert_eq!(
                    bufs[3].f32(),
                    &want[..],
                    "{} spatial {spatial}",
                    g.kernel.name
                );
            }
        }
    }
}

#[test]
fn f16_storage_rounds_outputs_only() {
    // f16 softmax and residual layer norm: inputs exactly representable in f16, outputs within
    // f16 rounding (2⁻¹¹ relative) of the f64 reference; the stored sum is x + res rounded.
    let (rows, cols) = (3, 129);
    let web = Limits::webgpu();
    let tune = Tune {
        threads: 32,
        per_thread: 2,
        subgroup: 32,
    };
    let sm = softmax(
        &SoftmaxCfg {
            elem: Elem::F16,
            scale: 1.0,
            mask: false,
        },
        &tune,
        &web,
    )
    .unwrap();
    let x = f16(&data(rows * cols, 4));
    let mut bufs = vec![
        HostBuf::F32(x.clone()),
        HostBuf::F32(vec![0.0; rows * cols]),
    ];
    launch(&sm, &mut bufs, &[("rows", 3), ("cols", cols as u32)], None);
    assert_close(
        "f16 softmax",
        bufs[1].f32(),
        &softmax_ref(&x, None, 1.0, cols),
        cols,
        1e-3,
    );

    let ln = norm(
        &NormCfg {
            elem: Elem::F16,
            kind: NormKind::Layer,
            eps: 1e-5,
            affine: Affine::None,
            residual: true,
        },
        &tune,
        &web,
    )
    .unwrap();
    let res = f16(&data(rows * cols, 5));
    let mut bufs = vec![
        HostBuf::F32(x.clone()),
        HostBuf::F32(res.clone()),
        HostBuf::F32(vec![0.0; rows * cols]),
        HostBuf::F32(vec![0.0; rows * cols]),
    ];
    launch(&ln, &mut bufs, &[("rows", 3), ("cols", cols as u32)], None);
    let sum: Vec<f32> = x.iter().zip(&res).map(|(a, b)| a + b).collect();
    assert_eq!(bufs[3].f32(), &sum[..]);
    let want = norm_ref(&sum, NormKind::Layer, 1e-5, None, None, cols);
    assert_close("f16 layer norm", bufs[2].f32(), &want, cols, 1e-3);
}

// ---- The row design (one row per invocation, vec4 loads; CPU adapters). ----

/// Row counts (odd, spanning partial workgroups and a clamped grid) and row lengths (multiples
/// of 4: the lowering chooses the row design only then).
const ROW_ROWS: [usize; 5] = [1, 3, 50, 129, 783];
const ROW_COLS: [usize; 3] = [4, 52, 384];

#[test]
fn row_design_validates_with_naga_prints_cuda_and_is_refused_where_absent() {
    let web = Limits::webgpu();
    let mut n = 0;
    for cfg in configs() {
        let space = Tune::rows_space(cfg.as_ref(), &web);
        if !cfg.has_rows_design() {
            assert!(space.is_empty());
            let e = cfg.generate(&Tune::rows(8), &web).unwrap_err().to_string();
            assert!(e.contains("no row design"), "{e}");
            continue;
        }
        assert_eq!(space.len(), 4);
        for t in space {
            let g = cfg.generate(&t, &web).unwrap();
            assert!(g.kernel.shared.is_empty() && g.kernel.name.contains("_rows"));
            if !g.kernel.uses(Elem::BF16) {
                let src = wgsl::print(&g.kernel).unwrap();
                assert!(src.contains("vec4"), "{}", g.kernel.name);
                common::validate_wgsl(&src);
            }
            cuda::print(&g.kernel).unwrap();
            n += 1;
        }
    }
    assert!(n >= 8, "{n} row-design kernels");
    let cfg = SoftmaxCfg {
        elem: Elem::F32,
        scale: 1.0,
        mask: false,
    };
    for bad in [
        Tune::rows(4),
        Tune::rows(128),
        Tune {
            per_thread: 2,
            ..Tune::rows(8)
        },
    ] {
        let e = softmax(&cfg, &bad, &web).unwrap_err().to_string();
        assert!(e.contains("softmax_f32") && e.contains("row design"), "{e}");
    }
}

#[test]
fn row_design_softmax_matches_reference() {
    for (i, &rows) in ROW_ROWS.iter().enumerate() {
        for mask in [false, true] {
            let cfg = SoftmaxCfg {
                elem: Elem::F32,
                scale: if mask { 0.125 } else { 1.0 },
                mask,
            };
            let t = Tune::rows([8, 16, 32, 64][i % 4]);
            let g = softmax(&cfg, &t, &Limits::webgpu()).unwrap();
            for cols in ROW_COLS.into_iter().filter(|c| rows * c <= 60_000) {
                let x = data(rows * cols, cols as u64 + rows as u64);
                let mut m = data(rows * cols, 7 + cols as u64);
                // Row 0 fully masked: uniform, as the CPU gives.
                for v in &mut m[..cols] {
                    *v = f32::MIN;
                }
                let mut bufs = vec![HostBuf::F32(x.clone())];
                let mut uni = vec![("rows", rows as u32), ("cols", cols as u32)];
                if mask {
                    bufs.push(HostBuf::F32(m.clone()));
                    let mu = mask_uniforms(&[rows, cols], &[rows, cols]).unwrap();
                    uni.extend(MASK_UNIFORMS.iter().copied().zip(mu));
                }
                bufs.push(HostBuf::F32(vec![f32::NAN; rows * cols]));
                // A clamped grid: the grid-stride loop covers every row.
                launch(&g, &mut bufs, &uni, Some(3));
                let want = softmax_ref(&x, mask.then_some(&m[..]), cfg.scale, cols);
                let what = format!("{} rows {rows} cols {cols}", g.kernel.name);
                assert_close(&what, bufs.last().unwrap().f32(), &want, cols, 1e-5);
            }
        }
    }
}

#[test]
fn row_design_norms_match_reference() {
    for kind in [NormKind::Layer, NormKind::Rms] {
        for affine in [Affine::Vector, Affine::Scalar, Affine::None] {
            for elem in [Elem::F32, Elem::F16] {
                let cfg = NormCfg {
                    elem,
                    kind,
                    eps: 1e-5,
                    affine,
                    residual: false,
                };
                for (i, &rows) in ROW_ROWS.iter().enumerate() {
                    let g =
                        norm(&cfg, &Tune::rows([8, 16, 32, 64][i % 4]), &Limits::webgpu()).unwrap();
                    for cols in ROW_COLS.into_iter().filter(|c| rows * c <= 60_000) {
                        let round = |v: Vec<f32>| if elem == Elem::F16 { f16(&v) } else { v };
                        let x = round(data(rows * cols, cols as u64 + 5));
                        let plen = if affine == Affine::Vector { cols } else { 1 };
                        let (gamma, beta) = (round(data(plen, 11)), round(data(plen, 12)));
                        let mut bufs = vec![HostBuf::F32(x.clone())];
                        if affine != Affine::None {
                            bufs.push(HostBuf::F32(gamma.clone()));
                            if kind == NormKind::Layer {
                                bufs.push(HostBuf::F32(beta.clone()));
                            }
                        }
                        bufs.push(HostBuf::F32(vec![f32::NAN; rows * cols]));
                        let uni = [("rows", rows as u32), ("cols", cols as u32)];
                        launch(&g, &mut bufs, &uni, Some(2));
                        let pi = |j: usize| if plen == 1 { 0 } else { j };
                        let gf = |_: usize, j: usize| gamma[pi(j)];
                        let bf = |_: usize, j: usize| beta[pi(j)];
                        let aff = affine != Affine::None;
                        let want = norm_ref(
                            &x,
                            kind,
                            1e-5,
                            aff.then_some(&gf as &dyn Fn(usize, usize) -> f32),
                            (aff && kind == NormKind::Layer)
                                .then_some(&bf as &dyn Fn(usize, usize) -> f32),
                            cols,
                        );
                        let what = format!("{} rows {rows} cols {cols}", g.kernel.name);
                        // f16 storage: the output rounded to f16 (2⁻¹¹ relative).
                        let tol = if elem == Elem::F16 { 1e-3 } else { 1e-5 };
                        assert_close(&what, bufs.last().unwrap().f32(), &want, cols, tol);
                    }
                }
            }
        }
    }
}
