//! The split-KV decode attention kernels (`kernels::decode`): the catalog prints valid WGSL
//! (naga) and CUDA; the partial and combine kernels run one after the other through the IR
//! interpreter agree with an f64 reference of the op's semantics at cache lengths 1, 3, 50,
//! 129 and 783 (none a multiple of the split or of the key tile), for the GPU and the
//! CPU-adapter split shapes, with a causal mask and an additive mask (a fully masked row and a
//! masked padding key), grouped-query heads, several tunables, and K/V read through a cache's
//! capacity stride (the rows past `sk` hold NaN, so reading one would show); sliding windows;
//! head dims 64 and 128; every split count of the tunable; and with one split the partial
//! kernel alone writes the output (the combine is not run).

mod common;

use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::attention::{default_scale, AttentionCfg, AttentionTunables};
use transfuse_codegen::kernels::decode::{
    catalog, combine, split, split_default_for, split_space, split_uniforms, SplitShape,
    PART_SPLITS, SPLITS,
};
use transfuse_codegen::kernels::{DeviceKind, Generated, Limits};
use transfuse_codegen::kir::Elem;
use transfuse_codegen::{cuda, wgsl};

#[test]
fn catalog_prints_valid_wgsl_and_cuda() {
    let all = catalog();
    assert_eq!(all.len(), 16);
    for g in &all {
        let k = &g.kernel;
        cuda::print(k).unwrap_or_else(|e| panic!("{e}"));
        if k.name.contains("bf16") {
            continue; // bf16 prints only as CUDA
        }
        common::validate_wgsl(&wgsl::print(k).unwrap_or_else(|e| panic!("{e}")));
    }
}

#[test]
fn the_split_follows_the_length_and_the_device() {
    let gpu = SplitShape::for_limits(&Limits::webgpu());
    let cpu = SplitShape::for_limits(&Limits::webgpu().with_kind(DeviceKind::Cpu));
    assert_eq!(split_uniforms(1, gpu), (1, 1));
    assert_eq!(split_uniforms(50, gpu), (50, 1));
    assert_eq!(split_uniforms(129, gpu), (65, 2));
    assert_eq!(split_uniforms(783, gpu), (66, 12));
    assert_eq!(split_uniforms(100_000, gpu), (3125, 32));
    assert_eq!(split_uniforms(783, cpu), (131, 6));
    assert_eq!(split_uniforms(0, gpu), (1, 1));
}

#[test]
fn every_space_value_builds() {
    let limits = Limits::webgpu();
    let shape = SplitShape::for_limits(&limits);
    let c = cfg(64, true, true, 1);
    let d = split_default_for(&c, shape, &limits);
    for t in split_space(&c, shape, &limits) {
        for v in &t.space {
            let (x, sh) = match t.name {
                "splits" => (d, shape.with_splits(*v)),
                n => (d.with(n, *v).unwrap(), shape),
            };
            split(&c, &x, sh, &limits).unwrap_or_else(|e| panic!("{} = {v}: {e}", t.name));
        }
    }
    let splits = split_space(&c, shape, &limits)
        .into_iter()
        .find(|t| t.name == "splits")
        .expect("the split count is a tunable");
    assert_eq!(splits.value, shape.max_splits);
    assert_eq!(splits.space, SPLITS.to_vec());
    // Out of range: refused, naming the kernel.
    for bad in [0, PART_SPLITS + 1] {
        let e = split(&c, &d, shape.with_splits(bad), &limits).unwrap_err();
        assert!(
            e.to_string()
                .contains("attention_split_f32_d64_causal_mask"),
            "{e}"
        );
    }
}

fn cfg(d: u32, causal: bool, mask: bool, group: u32) -> AttentionCfg {
    wcfg(d, causal, None, mask, group)
}

fn wcfg(d: u32, causal: bool, window: Option<u32>, mask: bool, group: u32) -> AttentionCfg {
    AttentionCfg {
        elem: Elem::F32,
        head_dim: d,
        dv: d,
        scale: default_scale(d),
        causal,
        window,
        mask,
        group,
    }
}

/// Values in [-1, 1) that are multiples of 1/256.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % 512) as f32 / 256.0 - 1.0
    }
}

/// One decode step: `bh` query heads of one row against `sk` keys held in `cap ≥ sk` rows per
/// key/value head (rows past `sk` are NaN).
struct Case {
    bh: usize,
    heads: usize,
    sk: usize,
    cap: usize,
    d: usize,
    group: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[bh, 1, sk]` additive mask.
    mask: Vec<f32>,
}

impl Case {
    fn new(seed: u64, heads: usize, sk: usize, cap: usize, d: usize, group: usize) -> Case {
        let mut r = Lcg(seed);
        let bh = 2 * heads;
        let kvh = bh / group;
        let mut rows = |n: usize, mul: f32| -> Vec<f32> {
            let mut out = vec![f32::NAN; kvh * cap * d];
            for h in 0..kvh {
                for x in 0..n * d {
                    out[h * cap * d + x] = r.next() * mul;
                }
            }
            out
        };
        let k = rows(sk, 3.0);
        let v = rows(sk, 1.0);
        let q = (0..bh * d).map(|_| r.next() * 3.0).collect();
        let mut mask: Vec<f32> = (0..bh * sk).map(|_| r.next() * 2.0).collect();
        // Head 0 sees no key; the last head's last key is padding.
        mask[..sk].fill(f32::MIN);
        mask[bh * sk - 1] = f32::MIN;
        Case {
            bh,
            heads,
            sk,
            cap,
            d,
            group,
            q,
            k,
            v,
            mask,
        }
    }

    fn reference(&self, c: &AttentionCfg) -> Vec<f32> {
        let (sk, cap, d) = (self.sk, self.cap, self.d);
        let mut out = vec![0f32; self.bh * d];
        for bi in 0..self.bh {
            let kv = bi / self.group;
            let s: Vec<f32> = (0..sk)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|x| {
                            f64::from(self.q[bi * d + x])
                                * f64::from(self.k[(kv * cap + j) * d + x])
                        })
                        .sum();
                    let x = (dot * f64::from(c.scale)) as f32;
                    // One query at position sk − 1 sees every key when causal; a window
                    // of w the last w.
                    let seen = c
                        .window
                        .is_none_or(|w| j as i64 > sk as i64 - 1 - i64::from(w));
                    if !seen {
                        x + f32::MIN
                    } else if c.mask {
                        x + self.mask[bi * sk + j]
                    } else {
                        x
                    }
                })
                .collect();
            let max = s
                .iter()
                .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
            let p: Vec<f64> = s.iter().map(|&x| (f64::from(x) - max).exp()).collect();
            let sum: f64 = p.iter().sum();
            for col in 0..d {
                let acc: f64 = (0..sk)
                    .map(|j| p[j] * f64::from(self.v[(kv * cap + j) * d + col]))
                    .sum();
                out[bi * d + col] = (acc / sum) as f32;
            }
        }
        out
    }

    fn uniforms(&self, g: &Generated, shape: SplitShape) -> (Vec<u32>, [u32; 3]) {
        let (chunk, nsplit) = split_uniforms(self.sk as u64, shape);
        let stride = (self.cap * self.d) as u32;
        let value = |name: &str| -> u32 {
            match name {
                "bh" => self.bh as u32,
                "heads" => self.heads as u32,
                "sq" => 1,
                "sk" => self.sk as u32,
                "mask_sb" => (self.heads * self.sk) as u32,
                "mask_sh" => self.sk as u32,
                "mask_sq" => self.sk as u32,
                "mask_sk" => 1,
                "kstride" | "vstride" => stride,
                "chunk" => chunk,
                "nsplit" => nsplit,
                u => panic!("uniform {u}"),
            }
        };
        let k = &g.kernel;
        let u: Vec<u32> = k.uniforms.iter().map(|n| value(n)).collect();
        let look = |n: &str| {
            k.uniforms
                .iter()
                .position(|x| x == n)
                .map(|i| u64::from(u[i]))
        };
        let grid = g
            .grid
            .clone()
            .map(|gd| gd.eval(&look).expect("grid") as u32);
        (u, grid)
    }

    /// The partial kernel, then the combine when the keys are split more than once (as the
    /// plan launches them): the output and the number of kernels run.
    fn run(
        &self,
        c: &AttentionCfg,
        t: &AttentionTunables,
        shape: SplitShape,
        limits: &Limits,
    ) -> (Vec<f32>, usize) {
        let part_len = self.bh * PART_SPLITS as usize * (self.d + 2);
        let g = split(c, t, shape, limits).unwrap_or_else(|e| panic!("{e}"));
        let (u, grid) = self.uniforms(&g, shape);
        let mut bufs = vec![
            HostBuf::F32(self.q.clone()),
            HostBuf::F32(self.k.clone()),
            HostBuf::F32(self.v.clone()),
        ];
        if c.mask {
            bufs.push(HostBuf::F32(self.mask.clone()));
        }
        bufs.push(HostBuf::F32(vec![f32::NAN; part_len]));
        bufs.push(HostBuf::F32(vec![f32::NAN; self.bh * self.d]));
        interp::run(&g.kernel, grid, &mut bufs, &u, 32).unwrap_or_else(|e| panic!("{e}"));
        let out = bufs.pop().unwrap();
        let part = bufs.pop().unwrap();
        if split_uniforms(self.sk as u64, shape).1 == 1 {
            return (out.f32().to_vec(), 1);
        }
        let g = combine(c, limits).unwrap();
        let (u, grid) = self.uniforms(&g, shape);
        let mut bufs = vec![HostBuf::F32(self.v.clone()), part, out];
        interp::run(&g.kernel, grid, &mut bufs, &u, 32).unwrap_or_else(|e| panic!("{e}"));
        (bufs.pop().unwrap().f32().to_vec(), 2)
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}: element {n}: got {g}, want {w}"
        );
    }
}

fn check(case: &Case, c: &AttentionCfg) {
    let want = case.reference(c);
    for kind in [DeviceKind::Gpu, DeviceKind::Cpu] {
        let limits = Limits::webgpu().with_kind(kind);
        let shape = SplitShape::for_limits(&limits);
        let small = AttentionTunables {
            block_q: 1,
            block_k: 32,
            threads: 32,
            rows: 0,
        };
        for t in [split_default_for(c, shape, &limits), small] {
            let (got, kernels) = case.run(c, &t, shape, &limits);
            let one = split_uniforms(case.sk as u64, shape).1 == 1;
            assert_eq!(kernels, if one { 1 } else { 2 });
            assert_close(&format!("sk {} {kind:?} {t:?}", case.sk), &got, &want);
        }
    }
}

#[test]
fn split_decode_matches_the_reference_at_odd_lengths() {
    for (i, sk) in [1usize, 3, 50, 129, 783].into_iter().enumerate() {
        // Dense (cap = sk) and a cache with spare capacity.
        for cap in [sk, sk + 7] {
            let case = Case::new(11 + i as u64, 2, sk, cap, 16, 1);
            check(&case, &cfg(16, false, false, 1));
            check(&case, &cfg(16, true, true, 1));
        }
    }
}

#[test]
fn split_decode_grouped_query_heads() {
    for sk in [3usize, 129] {
        let case = Case::new(5, 4, sk, sk + 3, 8, 2);
        check(&case, &cfg(8, true, true, 2));
    }
}

#[test]
fn split_decode_windows_and_head_dims_64_and_128() {
    // Sliding windows (one shorter than a split, one of no key: the mean of v), a padding
    // mask, causal, grouped-query heads, at head dims 64 and 128.
    for (i, sk) in [3usize, 129, 783].into_iter().enumerate() {
        for d in [64u32, 128] {
            let case = Case::new(21 + i as u64, 2, sk, sk + 5, d as usize, 2);
            check(&case, &wcfg(d, true, Some(40), true, 2));
            check(&case, &wcfg(d, true, None, true, 2));
        }
    }
    let case = Case::new(3, 2, 50, 50, 64, 1);
    check(&case, &wcfg(64, true, Some(0), false, 1));
    check(&case, &wcfg(64, false, Some(7), true, 1));
}

#[test]
fn every_split_count_gives_the_same_output() {
    // The split count is a tunable: every value of its space (1: one kernel, the partial
    // writes the output) matches the reference, at a length every count splits differently.
    let limits = Limits::webgpu();
    let c = wcfg(64, true, Some(300), true, 1);
    let case = Case::new(9, 2, 783, 783, 64, 1);
    let want = case.reference(&c);
    let t = split_default_for(&c, SplitShape::for_limits(&limits), &limits);
    for n in SPLITS {
        let shape = SplitShape {
            max_splits: n,
            min_chunk: 1,
        };
        let (got, kernels) = case.run(&c, &t, shape, &limits);
        assert_eq!(kernels, if n == 1 { 1 } else { 2 }, "splits {n}");
        assert_eq!(split_uniforms(783, shape).1, n);
        assert_close(&format!("splits {n}"), &got, &want);
    }
}
