//! Matmul microbenchmark on the wgpu device: GFLOP/s of given tunables at given shapes, each
//! result checked against an f64 host reference first.
//!
//! ```text
//! WGPU_BACKEND=vulkan cargo run --release --example wgpu_matmul -- \
//!     [--shapes 128x384x1152,4096x384x1536] [--epi bias|bias_gelu|bias_res|none] \
//!     [--rounds 5] [--ms 150] POINT...
//! ```
//!
//! A shape is `MxKxN` (`b` stored `[k, n]`, as the MiniLM plan reads its derived weights). A
//! point is `name` = a kernel's tunables: `b<rm>x<rn>u<unroll>` (broadcast register design),
//! `r<rm>x<rn>w<wy>x<wx>u<unroll>` (register design), `t<tm>x<tn>x<tk>m<rm>x<rn>` (tiled),
//! `f<rm>x<rn>u<unroll>` (broadcast design with fused multiply-adds), or `default` (the
//! shape-aware default of the lowering on this device). Points are timed round-robin: each
//! round times every point once (a batch of launches of about `--ms` milliseconds, the host
//! clock around a synchronised batch) and the minimum of the rounds is printed, as wall time
//! and as the process's CPU time per launch (all threads; robust on a loaded machine, where
//! wall time depends on what else runs).

use std::collections::HashMap;
use std::time::Instant;

use transfuse::codegen::kernels::matmul::{self, MatMulConfig, MatMulTunables};
use transfuse::codegen::kir::Elem;
use transfuse::ir::Act;
use transfuse::runtime::device::Device;
use transfuse::runtime::webgpu;

fn parse_nums(s: &str, seps: &[char]) -> Option<Vec<u32>> {
    s.split(|c| seps.contains(&c))
        .map(|x| x.parse().ok())
        .collect()
}

fn parse_point(
    p: &str,
    cfg: &MatMulConfig,
    limits: &transfuse::codegen::kernels::Limits,
    m: u64,
    n: u64,
) -> Option<MatMulTunables> {
    if p == "default" {
        return Some(MatMulTunables::cpu_for_problem(
            cfg,
            limits,
            Some(m),
            Some(n),
        ));
    }
    let (kind, rest) = p.split_at(1);
    let v = parse_nums(rest, &['x', 'u', 'w', 'm', 'v'])?;
    Some(match (kind, v.as_slice()) {
        ("b", [rm, rn, un]) => MatMulTunables::bcast(*rm, *rn, *un),
        ("r", [rm, rn, wy, wx, un]) => MatMulTunables::reg(*rm, *rn, *wy, *wx, *un),
        ("t", [tm, tn, tk, rm, rn]) => MatMulTunables {
            tile_m: *tm,
            tile_n: *tn,
            tile_k: *tk,
            rm: *rm,
            rn: *rn,
            reg: 0,
        },
        _ => return None,
    })
}

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

/// CPU seconds used by this process so far (every thread: llvmpipe's workers included), from
/// `/proc/self/stat` (clock ticks of 10 ms); `None` off Linux.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn main() {
    let mut shapes = vec![
        (128u32, 384u32, 1152u32),
        (128, 384, 384),
        (128, 384, 1536),
        (128, 1536, 384),
    ];
    let mut epi = "bias".to_string();
    let mut rounds = 5;
    let mut target_ms = 150.0;
    let mut points = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--shapes" => {
                shapes = args
                    .next()
                    .expect("--shapes MxKxN,...")
                    .split(',')
                    .map(|s| {
                        let v = parse_nums(s, &['x']).expect("shape MxKxN");
                        (v[0], v[1], v[2])
                    })
                    .collect()
            }
            "--epi" => epi = args.next().expect("--epi"),
            "--rounds" => rounds = args.next().expect("--rounds").parse().expect("rounds"),
            "--ms" => target_ms = args.next().expect("--ms").parse().expect("ms"),
            _ => points.push(a),
        }
    }
    if points.is_empty() {
        points.push("default".into());
    }
    let (act, bias, res) = match epi.as_str() {
        "none" => (Act::Identity, false, false),
        "bias" => (Act::Identity, true, false),
        "bias_gelu" => (Act::GeluErf, true, false),
        "bias_res" => (Act::Identity, true, true),
        e => panic!("--epi {e}"),
    };
    let cfg = MatMulConfig::plain(Elem::F32).epilogue(act, bias, res);
    let dev = webgpu::shared().expect("wgpu device");
    let limits = dev.info().limits;
    eprintln!("device: {}", dev.info().description);
    for &(m, k, n) in &shapes {
        let a = rand_vec((m * k) as usize, 1);
        let b = rand_vec((k * n) as usize, 2);
        let bs = rand_vec(n as usize, 3);
        let rs = rand_vec((m * n) as usize, 4);
        let up = |v: &[f32], what: &str| {
            let buf = dev.alloc(4 * v.len() as u64, what).unwrap();
            dev.write(&buf, &bytes(v)).unwrap();
            buf
        };
        let (ba, bb, bbias, bres) = (up(&a, "a"), up(&b, "b"), up(&bs, "bias"), up(&rs, "res"));
        let bout = dev.alloc(4 * u64::from(m * n), "out").unwrap();
        let uni: HashMap<&str, u32> = [
            ("m", m),
            ("n", n),
            ("k", k),
            ("batch0", 1),
            ("batch1", 1),
            ("a_s0", 0),
            ("a_s1", 0),
            ("b_s0", 0),
            ("b_s1", 0),
        ]
        .into_iter()
        .collect();
        // Reference on a sample of outputs (every 7th row, every 5th column).
        let want = |i: usize, j: usize| -> f32 {
            let mut acc = 0f64;
            for kk in 0..k as usize {
                acc += a[i * k as usize + kk] as f64 * b[kk * n as usize + j] as f64;
            }
            let mut y = acc as f32;
            if bias {
                y += bs[j];
            }
            if act == Act::GeluErf {
                y = 0.5 * y * (1.0 + libm_erf(y / std::f32::consts::SQRT_2));
            }
            if res {
                y += rs[i * n as usize + j];
            }
            y
        };
        struct Cand {
            name: String,
            module: <webgpu::WgpuDevice as Device>::Module,
            bound: <webgpu::WgpuDevice as Device>::Bound,
            u: Vec<u32>,
            grid: [u32; 3],
            batch: usize,
            best: f64,
            best_cpu: f64,
        }
        let mut cands = vec![];
        for p in &points {
            let Some(t) = parse_point(p, &cfg, &limits, m.into(), n.into()) else {
                eprintln!("{p}: not a point");
                continue;
            };
            let g = match matmul::matmul(&cfg, &t, &limits) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("{m}x{k}x{n} {p}: {e}");
                    continue;
                }
            };
            let t0 = Instant::now();
            let module = dev.compile(&g.kernel).unwrap();
            let compile_s = t0.elapsed().as_secs_f64();
            let mut bufs = vec![&ba, &bb];
            if bias {
                bufs.push(&bbias);
            }
            if res {
                bufs.push(&bres);
            }
            bufs.push(&bout);
            let bound = dev.bind(&module, &bufs).unwrap();
            let u: Vec<u32> = g.kernel.uniforms.iter().map(|s| uni[s.as_str()]).collect();
            let grid = g
                .grid
                .clone()
                .map(|d| d.eval(&|s| uni.get(s).map(|&v| u64::from(v))).unwrap() as u32);
            dev.write(&bout, &bytes(&vec![f32::NAN; (m * n) as usize]))
                .unwrap();
            dev.launch_bound(&module, &bound, &u, grid).unwrap();
            let got = dev.read(&bout, 4 * u64::from(m * n)).unwrap();
            let got: Vec<f32> = got
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut max_err = 0f32;
            for i in (0..m as usize).step_by(7) {
                for j in (0..n as usize).step_by(5) {
                    let w = want(i, j);
                    let e = (got[i * n as usize + j] - w).abs() / (1.0 + w.abs());
                    max_err = max_err.max(if e.is_nan() { f32::INFINITY } else { e });
                }
            }
            // One timed launch to size the batch.
            let t0 = Instant::now();
            dev.launch_bound(&module, &bound, &u, grid).unwrap();
            dev.sync().unwrap();
            let one = t0.elapsed().as_secs_f64() * 1e3;
            let batch = ((target_ms / one).round() as usize).clamp(1, 1000);
            eprintln!(
                "{m}x{k}x{n} {p:<14} {:?} compile {compile_s:.2}s, max rel err {max_err:.1e}",
                t
            );
            cands.push(Cand {
                name: p.clone(),
                module,
                bound,
                u,
                grid,
                batch,
                best: f64::INFINITY,
                best_cpu: f64::INFINITY,
            });
        }
        for _ in 0..rounds {
            for c in cands.iter_mut() {
                let (t0, c0) = (Instant::now(), cpu_seconds());
                for _ in 0..c.batch {
                    dev.launch_bound(&c.module, &c.bound, &c.u, c.grid).unwrap();
                }
                dev.sync().unwrap();
                let ms = t0.elapsed().as_secs_f64() * 1e3 / c.batch as f64;
                c.best = c.best.min(ms);
                if let (Some(a), Some(b)) = (c0, cpu_seconds()) {
                    c.best_cpu = c.best_cpu.min((b - a) * 1e3 / c.batch as f64);
                }
            }
        }
        for c in &cands {
            let gflops = 2.0 * f64::from(m) * f64::from(n) * f64::from(k) / (c.best * 1e6);
            let cpu_gflops = 2.0 * f64::from(m) * f64::from(n) * f64::from(k) / (c.best_cpu * 1e6);
            println!(
                "{m}x{k}x{n} {epi:<9} {:<14} wall {:9.3} ms {:7.2} GFLOP/s   cpu {:9.3} ms {:7.2} GFLOP/s per core",
                c.name, c.best, gflops, c.best_cpu, cpu_gflops
            );
        }
    }
}

/// erf (Abramowitz–Stegun 7.1.26, as the WGSL printer spells it: |error| < 1.5e-7), in f64.
fn libm_erf(x: f32) -> f32 {
    let x = f64::from(x);
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let p = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
        + 0.254829592)
        * t;
    (x.signum() * (1.0 - p * (-a * a).exp())) as f32
}
