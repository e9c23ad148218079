//! The rope kernel template (`kernels::rope`): every catalog kernel's WGSL validates with naga
//! (BF16: CUDA only) and prints as CUDA (NVRTC compiles the catalog in the root tests); the
//! numerics through the kernel-IR interpreter match an f64 reference of
//! `x·cos + rotate_half(x)·sin` at odd row counts, tile sizes that do not divide the elements,
//! and in f16; bad configurations are refused naming the kernel.

mod common;

use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::elementwise::EwTunables;
use transfuse_codegen::kernels::rope::{catalog, rope, RopeCfg};
use transfuse_codegen::kernels::{Generated, Limits};
use transfuse_codegen::kir::Elem;
use transfuse_codegen::{cuda, wgsl};

#[test]
fn catalog_prints_valid_wgsl_and_cuda() {
    let all = catalog();
    assert_eq!(all.len(), 3);
    for g in &all {
        let k = &g.kernel;
        assert!(cuda::print(k).unwrap().contains(&format!("{}(", k.name)));
        if k.uses(Elem::BF16) {
            assert!(wgsl::print(k).is_err());
        } else {
            common::validate_wgsl(&wgsl::print(k).unwrap());
        }
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Multiples of 1/256 in [-2, 2): exact in f16.
            ((s >> 33) % 1024) as f32 / 256.0 - 2.0
        })
        .collect()
}

/// The op's semantics in f64 over `rows × d` contiguous elements.
fn reference(x: &[f32], cos: &[f32], sin: &[f32], d: usize) -> Vec<f32> {
    let h = d / 2;
    (0..x.len())
        .map(|e| {
            let j = e % d;
            let rot = if j < h { -x[e + h] } else { x[e - h] };
            (f64::from(x[e]) * f64::from(cos[e]) + f64::from(rot) * f64::from(sin[e])) as f32
        })
        .collect()
}

/// Runs `g`; f16 storage is the interpreter's f32 buffers rounded on store (the inputs are
/// exact in f16).
fn run(g: &Generated, x: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let n = x.len() as u32;
    let buf = |v: &[f32]| HostBuf::F32(v.to_vec());
    let mut bufs = vec![buf(x), buf(cos), buf(sin), buf(&vec![f32::NAN; x.len()])];
    let grid = g
        .grid
        .clone()
        .map(|gd| gd.eval(&|u| (u == "n").then_some(u64::from(n))).unwrap() as u32);
    interp::run(&g.kernel, grid, &mut bufs, &[n], 32).unwrap_or_else(|e| panic!("{e}"));
    bufs.pop().unwrap().f32().to_vec()
}

#[test]
fn interpreter_matches_the_reference_at_odd_sizes() {
    let l = Limits::webgpu();
    let tiles = [
        EwTunables::default_for(&l),
        EwTunables {
            threads: 7,
            items: 3,
        },
        EwTunables {
            threads: 32,
            items: 1,
        },
    ];
    // f16: |out| ≤ 8, so storing rounds by at most half an ulp at 8 (2⁻⁸).
    for (elem, tol) in [(Elem::F32, 1e-6), (Elem::F16, 4e-3)] {
        for (rows, d) in [(1, 2), (3, 6), (50, 64), (129, 10)] {
            let n = rows * d;
            let (x, cos, sin) = (values(n, 1), values(n, 2), values(n, 3));
            let want = reference(&x, &cos, &sin, d);
            for t in &tiles {
                let cfg = RopeCfg {
                    elem,
                    head_dim: d as u32,
                };
                let g = rope(&cfg, t, &l).unwrap();
                let got = run(&g, &x, &cos, &sin);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{} {t:?} rows {rows}: element {i}: {a} vs {b}",
                        g.kernel.name
                    );
                }
            }
        }
    }
}

#[test]
fn bad_configurations_are_refused_naming_the_kernel() {
    let l = Limits::webgpu();
    let t = EwTunables::default_for(&l);
    for (cfg, what) in [
        (
            RopeCfg {
                elem: Elem::F32,
                head_dim: 7,
            },
            "even",
        ),
        (
            RopeCfg {
                elem: Elem::U32,
                head_dim: 8,
            },
            "storage",
        ),
    ] {
        let e = rope(&cfg, &t, &l).unwrap_err().to_string();
        assert!(e.contains(&cfg.kernel_name()) && e.contains(what), "{e}");
    }
    let too_many = EwTunables {
        threads: 4096,
        items: 1,
    };
    let cfg = RopeCfg {
        elem: Elem::F32,
        head_dim: 8,
    };
    assert!(rope(&cfg, &too_many, &l).is_err());
}
