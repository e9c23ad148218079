//! The attention kernel templates (`kernels::attention`): every catalog kernel prints valid
//! WGSL (naga) and CUDA; tunables outside the target's limits are refused naming the kernel;
//! every listed search-space value builds; snapshots of one prefill kernel; and the f32 (and
//! one f16) kernels run through the IR interpreter agree with an f64 reference of the op's
//! semantics (mask, causal, window, fully masked rows, several key tiles); cases of one query
//! row also run the split-KV decode kernels (`kernels::decode`) against the same reference.

mod common;

use expect_test::expect_file;
use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::attention::{
    catalog, default_scale, flash, AttentionCfg, AttentionTunables,
};
use transfuse_codegen::kernels::decode::{
    combine, split, split_default_for, split_space, split_uniforms, SplitShape, PART_SPLITS,
};
use transfuse_codegen::kernels::{DeviceKind, Generated, Limits};
use transfuse_codegen::kir::{Elem, Expr, SubgroupOp};
use transfuse_codegen::{cuda, wgsl};

fn cfg(elem: Elem, d: u32, causal: bool, window: Option<u32>, mask: bool) -> AttentionCfg {
    AttentionCfg {
        elem,
        head_dim: d,
        dv: d,
        scale: default_scale(d),
        causal,
        window,
        mask,
        group: 1,
    }
}

#[test]
fn catalog_prints_valid_wgsl_and_cuda() {
    let all = catalog();
    assert!((16..=28).contains(&all.len()), "{} kernels", all.len());
    let mut names: Vec<&str> = all.iter().map(|g| g.kernel.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "kernel names are unique");
    for g in &all {
        let k = &g.kernel;
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
    }
}

#[test]
fn catalog_fits_its_targets() {
    for g in catalog() {
        let k = &g.kernel;
        let limits = if k.uses(Elem::BF16) {
            Limits::cuda()
        } else {
            Limits::webgpu()
        };
        assert!(k.threads() <= limits.max_threads, "{}", k.name);
        assert!(k.shared_bytes() <= limits.max_shared_bytes, "{}", k.name);
        for t in &g.tunables {
            assert!(t.space.contains(&t.value), "{}: {}", k.name, t.name);
        }
        eprintln!(
            "{:<40} {:>4} threads {:>6} B shared  {}",
            k.name,
            k.threads(),
            k.shared_bytes(),
            g.tunables
                .iter()
                .map(|t| format!("{}={}", t.name, t.value))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

#[test]
fn defaults_and_every_space_value_build_under_both_targets() {
    for elem in [Elem::F32, Elem::F16, Elem::BF16] {
        for d in [32, 64, 128, 256, 96, 4] {
            for (causal, window, mask) in [
                (false, None, false),
                (true, None, true),
                (true, Some(8), false),
            ] {
                let c = cfg(elem, d, causal, window, mask);
                for limits in [
                    Limits::webgpu(),
                    Limits::cuda(),
                    Limits::webgpu().with_kind(DeviceKind::Cpu),
                ] {
                    let t = AttentionTunables::default_for(&c, &limits);
                    let g = flash(&c, &t, &limits).unwrap_or_else(|e| panic!("{e}"));
                    assert!(g.kernel.shared_bytes() <= limits.max_shared_bytes);
                    for tun in AttentionTunables::space(&c, &limits) {
                        for v in &tun.space {
                            let x = t.with(tun.name, *v).expect("known tunable");
                            flash(&c, &x, &limits).unwrap_or_else(|e| panic!("{x:?}: {e}"));
                        }
                    }
                    let shape = SplitShape::for_limits(&limits);
                    let t = split_default_for(&c, shape, &limits);
                    split(&c, &t, shape, &limits).unwrap_or_else(|e| panic!("{e}"));
                    for tun in split_space(&c, shape, &limits) {
                        for v in &tun.space {
                            let (x, sh) = match tun.name {
                                "splits" => (t, shape.with_splits(*v)),
                                n => (t.with(n, *v).expect("known tunable"), shape),
                            };
                            split(&c, &x, sh, &limits).unwrap_or_else(|e| panic!("{x:?}: {e}"));
                        }
                    }
                    combine(&c, &limits).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
}

#[test]
fn default_tunables_per_target() {
    let d64 = cfg(Elem::F32, 64, true, None, true);
    let d128 = cfg(Elem::F32, 128, false, None, false);
    let t = |block_q, block_k, threads| AttentionTunables {
        block_q,
        block_k,
        threads,
        rows: 0,
    };
    assert_eq!(
        AttentionTunables::default_for(&d64, &Limits::webgpu()),
        t(32, 16, 256)
    );
    assert_eq!(
        AttentionTunables::default_for(&d128, &Limits::webgpu()),
        t(16, 8, 256)
    );
    assert_eq!(
        AttentionTunables::default_for(&d128, &Limits::cuda()),
        t(32, 32, 256)
    );
    let shape = SplitShape::for_limits(&Limits::webgpu());
    assert_eq!(
        split_default_for(&d128, shape, &Limits::webgpu()),
        t(1, 128, 128)
    );
}

fn refused(r: Result<Generated, transfuse_codegen::CodegenError>, name: &str, what: &str) {
    let e = r.expect_err("refused").to_string();
    assert!(e.contains(&format!("kernel `{name}`")), "{e}");
    assert!(e.contains(what), "{e}");
}

#[test]
fn tunables_outside_limits_are_refused_naming_the_kernel() {
    let c = cfg(Elem::F32, 128, true, None, true);
    let name = "attention_f32_d128_causal_mask";
    let web = Limits::webgpu();
    let t = |block_q, block_k, threads| AttentionTunables {
        block_q,
        block_k,
        threads,
        rows: 0,
    };
    refused(flash(&c, &t(32, 32, 256), &web), name, "shared memory");
    refused(flash(&c, &t(16, 8, 512), &web), name, "threads exceed");
    refused(
        flash(&c, &t(16, 8, 100), &web),
        name,
        "not a multiple of block_q",
    );
    refused(flash(&c, &t(1, 8, 256), &web), name, "exceeds dv");
    refused(flash(&c, &t(16, 8, 16), &web), name, "accumulator columns");
    refused(flash(&c, &t(16, 0, 256), &web), name, "block_k = 0");
    assert!(flash(&c, &t(32, 32, 256), &Limits::cuda()).is_ok());
    let dname = "attention_split_f32_d128_causal_mask";
    let shape = SplitShape::for_limits(&web);
    refused(
        split(&c, &t(2, 256, 256), shape, &web),
        dname,
        "block_q = 2",
    );
    refused(
        split(&c, &t(1, 256, 1024), shape, &web),
        dname,
        "threads exceed",
    );
    refused(
        split(&c, &t(1, 8192, 256), shape, &web),
        dname,
        "shared memory",
    );
    let mut bad = c;
    bad.elem = Elem::U32;
    refused(
        flash(&bad, &t(16, 8, 256), &web),
        "attention_u32_d128_causal_mask",
        "not f32, f16 or bf16",
    );
    bad = c;
    bad.head_dim = 512;
    bad.scale = default_scale(512);
    refused(
        flash(&bad, &t(16, 8, 256), &Limits::cuda()),
        "attention_f32_d512_dv128_causal_mask",
        "outside 1..=256",
    );
    bad = c;
    bad.scale = f32::NAN;
    assert!(flash(&bad, &t(16, 8, 256), &web)
        .unwrap_err()
        .to_string()
        .contains("not finite"));
}

#[test]
fn names_follow_the_config() {
    let mut c = cfg(Elem::F16, 64, true, None, true);
    assert_eq!(c.kernel_name(false), "attention_f16_d64_causal_mask");
    c.window = Some(128);
    c.causal = false;
    c.dv = 32;
    c.scale = 0.5;
    assert_eq!(
        c.kernel_name(true),
        "attention_decode_f16_d64_dv32_w128_mask_s3f000000"
    );
    c.group = 4;
    assert_eq!(
        c.kernel_name(false),
        "attention_f16_d64_dv32_w128_mask_g4_s3f000000"
    );
}

#[test]
fn snapshot_f32_d64_causal_mask() {
    let c = cfg(Elem::F32, 64, true, None, true);
    let limits = Limits::webgpu();
    let g = flash(&c, &AttentionTunables::default_for(&c, &limits), &limits).unwrap();
    let w = wgsl::print(&g.kernel).unwrap();
    common::validate_wgsl(&w);
    expect_file!["snapshots/attention_f32_d64_causal_mask.wgsl"].assert_eq(&w);
    expect_file!["snapshots/attention_f32_d64_causal_mask.cu"]
        .assert_eq(&cuda::print(&g.kernel).unwrap());
}

// ---- Numerics through the IR interpreter. ----

/// A small deterministic generator of values in [-1, 1) that are multiples of 1/256 (exact in
/// f16).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % 512) as f32 / 256.0 - 1.0
    }
    fn vec(&mut self, n: usize, mul: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * mul).collect()
    }
}

/// One attention problem: `batch × heads` heads, mask `[mb, mh, sq, sk]` broadcast.
struct Case {
    batch: usize,
    heads: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Mask data and its element strides (batch, head, query, key).
    mask: Option<(Vec<f32>, [usize; 4])>,
    /// Query heads per key/value head: k, v hold `batch·heads / group` heads.
    group: usize,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        batch: usize,
        heads: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        mask_heads: bool,
        fully_masked_row: Option<usize>,
    ) -> Case {
        let mut r = Lcg(seed);
        let bh = batch * heads;
        let q = r.vec(bh * sq * d, 3.0);
        let k = r.vec(bh * sk * d, 3.0);
        let v = r.vec(bh * sk * dv, 1.0);
        // Mask [batch, heads or 1, sq, sk].
        let mh = if mask_heads { heads } else { 1 };
        let mut m = r.vec(batch * mh * sq * sk, 2.0);
        if let Some(i) = fully_masked_row {
            // Batch 0, head 0, query row i: every key masked with f32::MIN.
            for j in 0..sk {
                m[i * sk + j] = f32::MIN;
            }
        }
        // A padding-style key masked for every query of the last batch.
        for i in 0..sq {
            let base = ((batch - 1) * mh * sq + i) * sk;
            m[base + sk - 1] = f32::MIN;
        }
        let strides = [mh * sq * sk, if mask_heads { sq * sk } else { 0 }, sk, 1];
        Case {
            batch,
            heads,
            sq,
            sk,
            d,
            dv,
            q,
            k,
            v,
            mask: Some((m, strides)),
            group: 1,
        }
    }

    /// The same case with `group` query heads per key/value head (k, v cut to their heads).
    fn grouped(mut self, group: usize) -> Case {
        let kvh = self.batch * self.heads / group;
        self.k.truncate(kvh * self.sk * self.d);
        self.v.truncate(kvh * self.sk * self.dv);
        self.group = group;
        self
    }

    /// The op's semantics: f32 scores (as the CPU kernel rounds them), softmax and the
    /// weighted sum in f64.
    fn reference(&self, c: &AttentionCfg) -> Vec<f32> {
        let (sq, sk, d, dv) = (self.sq, self.sk, self.d, self.dv);
        let mut out = vec![0f32; self.batch * self.heads * sq * dv];
        for bi in 0..self.batch * self.heads {
            let (b, h) = (bi / self.heads, bi % self.heads);
            let kvi = bi / self.group;
            for i in 0..sq {
                let pos = i as i64 + sk as i64 - sq as i64;
                let s: Vec<f32> = (0..sk)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|x| {
                                f64::from(self.q[(bi * sq + i) * d + x])
                                    * f64::from(self.k[(kvi * sk + j) * d + x])
                            })
                            .sum();
                        let x = (dot * f64::from(c.scale)) as f32;
                        let m = match (&self.mask, c.mask) {
                            (Some((m, st)), true) => {
                                m[b * st[0] + h * st[1] + i * st[2] + j * st[3]]
                            }
                            _ => 0.0,
                        };
                        let j = j as i64;
                        let seen = (!c.causal || j <= pos)
                            && c.window.is_none_or(|w| j > pos - i64::from(w));
                        if seen {
                            x + m
                        } else {
                            x + f32::MIN
                        }
                    })
                    .collect();
                let max = s
                    .iter()
                    .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
                let p: Vec<f64> = s.iter().map(|&x| (f64::from(x) - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for col in 0..dv {
                    let acc: f64 = (0..sk)
                        .map(|j| p[j] * f64::from(self.v[(kvi * sk + j) * dv + col]))
                        .sum();
                    out[(bi * sq + i) * dv + col] = (acc / sum) as f32;
                }
            }
        }
        out
    }

    /// Runs a generated kernel through the interpreter.
    fn run(&self, g: &Generated) -> Vec<f32> {
        let k = &g.kernel;
        let bh = (self.batch * self.heads) as u32;
        let mut uniforms = vec![bh, self.heads as u32, self.sq as u32, self.sk as u32];
        let mut bufs = vec![
            HostBuf::F32(self.q.clone()),
            HostBuf::F32(self.k.clone()),
            HostBuf::F32(self.v.clone()),
        ];
        if k.buffers.iter().any(|b| b.name == "mask") {
            let (m, st) = self.mask.as_ref().expect("case has a mask");
            bufs.push(HostBuf::F32(m.clone()));
            uniforms.extend(st.iter().map(|&s| s as u32));
        }
        bufs.push(HostBuf::F32(vec![
            f32::NAN;
            self.batch
                * self.heads
                * self.sq
                * self.dv
        ]));
        let value = |name: &str| {
            k.uniforms
                .iter()
                .position(|u| u == name)
                .map(|i| u64::from(uniforms[i]))
        };
        let grid = g
            .grid
            .clone()
            .map(|gd| gd.eval(&value).expect("grid evaluates") as u32);
        interp::run(k, grid, &mut bufs, &uniforms, 32).unwrap_or_else(|e| panic!("{e}"));
        bufs.pop().unwrap().f32().to_vec()
    }
}

impl Case {
    /// The split-KV decode kernels on this case (one query row, dense K/V).
    fn run_split(
        &self,
        c: &AttentionCfg,
        t: &AttentionTunables,
        shape: SplitShape,
        limits: &Limits,
    ) -> Vec<f32> {
        assert_eq!(self.sq, 1);
        let bh = self.batch * self.heads;
        let (chunk, nsplit) = split_uniforms(self.sk as u64, shape);
        let value = |name: &str| -> u32 {
            let st = self.mask.as_ref().map(|(_, st)| *st).unwrap_or_default();
            match name {
                "bh" => bh as u32,
                "heads" => self.heads as u32,
                "sq" => 1,
                "sk" => self.sk as u32,
                "mask_sb" => st[0] as u32,
                "mask_sh" => st[1] as u32,
                "mask_sq" => st[2] as u32,
                "mask_sk" => st[3] as u32,
                "kstride" => (self.sk * self.d) as u32,
                "vstride" => (self.sk * self.dv) as u32,
                "chunk" => chunk,
                "nsplit" => nsplit,
                u => panic!("uniform {u}"),
            }
        };
        let args = |g: &Generated| {
            let u: Vec<u32> = g.kernel.uniforms.iter().map(|n| value(n)).collect();
            let grid = g
                .grid
                .clone()
                .map(|gd| gd.eval(&|n: &str| Some(u64::from(value(n)))).expect("grid") as u32);
            (u, grid)
        };
        let g = split(c, t, shape, limits).unwrap_or_else(|e| panic!("{e}"));
        let (u, grid) = args(&g);
        let mut bufs = vec![
            HostBuf::F32(self.q.clone()),
            HostBuf::F32(self.k.clone()),
            HostBuf::F32(self.v.clone()),
        ];
        if c.mask {
            bufs.push(HostBuf::F32(self.mask.as_ref().expect("mask").0.clone()));
        }
        bufs.push(HostBuf::F32(vec![
            f32::NAN;
            bh * PART_SPLITS as usize * (self.dv + 2)
        ]));
        bufs.push(HostBuf::F32(vec![f32::NAN; bh * self.dv]));
        interp::run(&g.kernel, grid, &mut bufs, &u, 32).unwrap_or_else(|e| panic!("{e}"));
        let out = bufs.pop().unwrap();
        let part = bufs.pop().unwrap();
        if nsplit == 1 {
            return out.f32().to_vec();
        }
        let g = combine(c, limits).unwrap();
        let (u, grid) = args(&g);
        let mut bufs = vec![HostBuf::F32(self.v.clone()), part, out];
        interp::run(&g.kernel, grid, &mut bufs, &u, 32).unwrap_or_else(|e| panic!("{e}"));
        bufs.pop().unwrap().f32().to_vec()
    }
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= tol,
            "{name}: element {n}: got {g}, want {w}"
        );
    }
}

/// Runs prefill (with the given and the default tunables) and decode on `case` for `c`.
fn check(case: &Case, c: &AttentionCfg, tiles: &[AttentionTunables], tol: f32) {
    let want = case.reference(c);
    let limits = Limits::webgpu();
    let mut all = tiles.to_vec();
    all.push(AttentionTunables::default_for(c, &limits));
    // The register design: odd row counts, workgroups and key tiles (partial last tiles), and
    // the CPU adapter's default.
    all.extend(LANES);
    let cpu = AttentionTunables::default_for(c, &limits.with_kind(DeviceKind::Cpu));
    assert!(cpu.rows > 0, "{cpu:?}");
    all.push(cpu);
    for t in &all {
        let g = flash(c, t, &limits).unwrap_or_else(|e| panic!("{e}"));
        let what = format!("{} {t:?}", g.kernel.name);
        assert_close(&what, &case.run(&g), &want, tol);
    }
    // With 8-lane subgroups (llvmpipe) 8-invocation register kernels share K/V vectors by
    // broadcast where a tile holds whole groups of 8 vectors: the default, 3 rows with 4-key
    // tiles (a partial last tile), and 3-key tiles (whole groups only when d/4 is 8's multiple).
    let l8 = Limits {
        subgroup_min: 8,
        ..limits.with_kind(DeviceKind::Cpu)
    };
    let lanes8 = |rows: u32, block_k: u32| AttentionTunables {
        block_q: 8 * rows,
        block_k,
        threads: 8,
        rows,
    };
    for t in [
        AttentionTunables::default_for(c, &l8),
        lanes8(3, 4),
        lanes8(1, 3),
    ] {
        let g = flash(c, &t, &l8).unwrap_or_else(|e| panic!("{e}"));
        let whole = (t.block_k * c.head_dim / 4).is_multiple_of(8)
            && (t.block_k * c.dv / 4).is_multiple_of(8);
        let shares = g
            .kernel
            .any_expr(&|e| matches!(e, Expr::Subgroup(SubgroupOp::Broadcast(_), _)));
        assert_eq!(shares, whole && t.threads == 8, "{} {t:?}", g.kernel.name);
        let what = format!("{} {t:?} (broadcast K/V)", g.kernel.name);
        assert_close(&what, &case.run(&g), &want, tol);
    }
    // One query row: the split-KV decode kernels (partial, then the combine when split),
    // small tiles and the default, one split and several (keys of 4 per split at least).
    if case.sq == 1 {
        for t in [
            AttentionTunables {
                block_q: 1,
                block_k: 4,
                threads: 8,
                rows: 0,
            },
            AttentionTunables {
                block_q: 1,
                block_k: 32,
                threads: 64,
                rows: 0,
            },
        ] {
            for max_splits in [1, 3, 64] {
                let shape = SplitShape {
                    max_splits,
                    min_chunk: 4,
                };
                let what = format!("split decode {t:?} {shape:?}");
                assert_close(&what, &case.run_split(c, &t, shape, &limits), &want, tol);
            }
        }
    }
}

/// Small tiles: several query blocks and key tiles, a partial last tile, 4 or 5 threads per
/// row (5: the columns do not divide evenly).
const SMALL: [AttentionTunables; 3] = [
    AttentionTunables {
        block_q: 2,
        block_k: 4,
        threads: 8,
        rows: 0,
    },
    AttentionTunables {
        block_q: 4,
        block_k: 3,
        threads: 16,
        rows: 0,
    },
    AttentionTunables {
        block_q: 2,
        block_k: 3,
        threads: 10,
        rows: 0,
    },
];

/// The register design at small sizes: 1–3 rows per invocation, 2–3 invocations, 1–4 keys per
/// tile.
const LANES: [AttentionTunables; 3] = [
    AttentionTunables {
        block_q: 3,
        block_k: 3,
        threads: 3,
        rows: 1,
    },
    AttentionTunables {
        block_q: 4,
        block_k: 1,
        threads: 2,
        rows: 2,
    },
    AttentionTunables {
        block_q: 6,
        block_k: 4,
        threads: 2,
        rows: 3,
    },
];

#[test]
fn f32_kernels_match_the_reference() {
    // bh = 2 (one batch, two heads), sq = 5, sk = 7, d = 32; head 0 row 1 fully masked.
    let case = Case::new(1, 1, 2, 5, 7, 32, 32, true, Some(1));
    for (causal, window, mask) in [
        (false, None, false),
        (false, None, true),
        (true, None, false),
        (true, None, true),
        (true, Some(3), false),
        (true, Some(2), true),
        (false, Some(4), true),
        (false, Some(0), false),
    ] {
        check(
            &case,
            &cfg(Elem::F32, 32, causal, window, mask),
            &SMALL,
            1e-4,
        );
    }
}

#[test]
fn f32_grouped_query_heads_read_their_key_value_head() {
    // 2 batches × 4 query heads over 2 key/value heads (GQA) and over 1 (MQA): query head h
    // reads key/value head h / group; the per-head mask still follows the query heads.
    for group in [2, 4] {
        let case = Case::new(7, 2, 4, 5, 7, 32, 32, true, Some(2)).grouped(group);
        for (causal, window, mask) in [(false, None, true), (true, Some(3), true)] {
            let mut c = cfg(Elem::F32, 32, causal, window, mask);
            c.group = group as u32;
            check(&case, &c, &SMALL, 1e-4);
        }
    }
}

#[test]
fn f32_more_queries_than_keys_and_broadcast_masks() {
    // sq > sk: causal rows 0..2 see no key (uniform average of v); batch 2 × 1 head, the mask
    // [2, 1, sq, sk] broadcast over heads; dv ≠ d exercises the column guards.
    let case = Case::new(2, 2, 1, 7, 5, 32, 24, false, None);
    for (causal, window, mask) in [(true, None, true), (true, Some(2), false)] {
        let mut c = cfg(Elem::F32, 32, causal, window, mask);
        c.dv = 24;
        check(&case, &c, &SMALL, 1e-4);
    }
}

#[test]
fn f32_decode_over_a_long_cache() {
    // One query against 70 keys (three 32-key tiles), and 3 queries (speculative decoding).
    for sq in [1, 3] {
        let case = Case::new(3, 1, 2, sq, 70, 32, 32, true, None);
        for (causal, window, mask) in [(false, None, true), (true, Some(20), true)] {
            check(
                &case,
                &cfg(Elem::F32, 32, causal, window, mask),
                &SMALL,
                1e-4,
            );
        }
    }
}

#[test]
fn f32_one_query_row_every_mask_kind() {
    // One query row (decode): a fully masked row (head 0), a padding key, a per-head and a
    // broadcast mask, causal, windows (one of no key), GQA/MQA, dv ≠ d, odd key counts.
    for (i, sk) in [1usize, 3, 50, 129].into_iter().enumerate() {
        let seed = 30 + i as u64;
        for (causal, window, mask) in [
            (false, None, true),
            (true, None, false),
            (true, Some(5), true),
            (false, Some(0), false),
        ] {
            let case = Case::new(seed, 1, 2, 1, sk, 32, 32, true, Some(0));
            check(&case, &cfg(Elem::F32, 32, causal, window, mask), &[], 1e-4);
            let case = Case::new(seed, 2, 4, 1, sk, 32, 32, true, None).grouped(4);
            let mut c = cfg(Elem::F32, 32, causal, window, mask);
            c.group = 4;
            check(&case, &c, &[], 1e-4);
        }
        let case = Case::new(seed, 2, 1, 1, sk, 32, 24, false, None);
        let mut c = cfg(Elem::F32, 32, true, None, true);
        c.dv = 24;
        check(&case, &c, &[], 1e-4);
    }
}

#[test]
fn f16_kernel_matches_within_f16_rounding() {
    // Inputs are multiples of 1/256 (exact in f16); the mask holds no f32::MIN (it is -inf in
    // f16), so the fully masked row is left out.
    let mut case = Case::new(4, 1, 2, 5, 7, 32, 32, true, None);
    if let Some((m, _)) = &mut case.mask {
        for x in m.iter_mut() {
            *x = x.max(-10000.0);
        }
    }
    let c = cfg(Elem::F16, 32, true, None, true);
    let want = case.reference(&c);
    let limits = Limits::webgpu();
    for t in [SMALL[0], LANES[2]] {
        let g = flash(&c, &t, &limits).unwrap();
        assert_close(&g.kernel.name, &case.run(&g), &want, 2e-3);
    }
}

#[test]
fn cpu_adapters_get_the_register_design() {
    let cpu = Limits::webgpu().with_kind(DeviceKind::Cpu);
    let t = |d: u32| AttentionTunables::default_for(&cfg(Elem::F32, d, true, None, true), &cpu);
    let lanes = |rows: u32| AttentionTunables {
        block_q: 8 * rows,
        block_k: 2,
        threads: 8,
        rows,
    };
    assert_eq!(t(32), lanes(8));
    assert_eq!(t(64), lanes(8));
    assert_eq!(t(128), lanes(4));
    assert_eq!(t(256), lanes(2));
    // Head dims that are not multiples of 4 keep the tiled design; GPUs always do.
    assert_eq!(t(6).rows, 0);
    let gpu = cfg(Elem::F32, 64, true, None, true);
    assert_eq!(
        AttentionTunables::default_for(&gpu, &Limits::webgpu()).rows,
        0
    );
    let g = flash(&gpu, &t(64), &cpu).unwrap();
    assert_eq!(g.kernel.threads(), 8);
    assert_eq!(g.kernel.shared_bytes(), 0);
    assert!(!g
        .kernel
        .body
        .iter()
        .any(|s| matches!(s, transfuse_codegen::kir::Stmt::Barrier)));
    let rows = g.tunables.iter().find(|x| x.name == "rows").unwrap();
    assert_eq!(rows.value, 8);
    assert!(rows.space.contains(&16), "{rows:?}");
    // Refusals name the kernel.
    let name = "attention_f32_d64_causal_mask";
    let mut bad = t(64);
    bad.block_q = 7;
    refused(flash(&gpu, &bad, &cpu), name, "threads · rows");
    refused(flash(&gpu, &lanes(32), &cpu), name, "unrolls too far");
    let mut odd = cfg(Elem::F32, 6, false, None, false);
    odd.scale = default_scale(6);
    refused(
        flash(&odd, &lanes(1), &cpu),
        "attention_f32_d6",
        "multiples of 4",
    );
    refused(
        split(&gpu, &lanes(1), SplitShape::for_limits(&cpu), &cpu),
        "attention_split_f32_d64_causal_mask",
        "one query row",
    );
}

#[test]
fn snapshot_register_design_f16_d8_causal_mask() {
    let c = cfg(Elem::F16, 8, true, None, true);
    let t = AttentionTunables {
        block_q: 4,
        block_k: 2,
        threads: 2,
        rows: 2,
    };
    let g = flash(&c, &t, &Limits::webgpu().with_kind(DeviceKind::Cpu)).unwrap();
    let w = wgsl::print(&g.kernel).unwrap();
    common::validate_wgsl(&w);
    expect_file!["snapshots/attention_lanes_f16_d8_causal_mask.wgsl"].assert_eq(&w);
    expect_file!["snapshots/attention_lanes_f16_d8_causal_mask.cu"]
        .assert_eq(&cuda::print(&g.kernel).unwrap());
}
