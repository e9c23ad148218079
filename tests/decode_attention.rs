//! The split-KV decode attention on wgpu (and CUDA where present) against the CPU backend at
//! cache lengths 1, 3, 50, 129 and 783 (none a multiple of the split or the key tile): one
//! causal attention over a KV cache spelled as the models spell it (`present = concat(past,
//! new)`, a graph output: an appendable cache in one capacity buffer), a query row per head,
//! grouped-query heads too. The cache is supplied from the host (written into the capacity
//! buffer) and, in a second run, made by a prefill and carried on the device; both read the
//! presents back densely. Also with a sliding window, an additive padding mask, and a query
//! length that is the constant 1 (the split kernels as the plan's own kernels rather than a
//! variant). Within 1e-4·(1 + |cpu|) (the kernel families' f32 tolerance).

mod common;

use std::collections::HashMap;

use transfuse::ir::{Builder, DType, Dim, Graph, Op, Scalar, Tensor};
use transfuse::runtime::{Backend, CpuBackend};

const D: usize = 16;

/// What the attention masks: causal (always), a sliding window, an additive padding-style mask
/// `[1, 1, seq, past + seq]` (made by a concat, like the past's), and whether the query length
/// is the constant 1 (the split kernels as the plan's main kernels) or the symbol `seq` (as
/// the flash kernel's decode variant).
#[derive(Clone, Copy, Debug)]
struct Kind {
    window: Option<usize>,
    mask: bool,
    one: bool,
}

const PLAIN: Kind = Kind {
    window: None,
    mask: false,
    one: false,
};

/// `attention(q, concat(past_k, k), concat(past_v, v) [, mask])`, causal, `heads` query heads
/// over `heads / group` key/value heads.
fn graph(heads: usize, group: usize, kind: Kind) -> Graph {
    let mut b = Builder::new();
    let past = Dim::sym("past");
    let seq = if kind.one {
        Dim::from(1)
    } else {
        Dim::sym("seq")
    };
    let kvh = heads / group;
    let q = b
        .input(
            "q",
            vec![1.into(), heads.into(), seq.clone(), D.into()],
            DType::F32,
        )
        .unwrap();
    let cache = |t: &Dim| vec![1.into(), kvh.into(), t.clone(), D.into()];
    let pk = b.input("past_k", cache(&past), DType::F32).unwrap();
    let pv = b.input("past_v", cache(&past), DType::F32).unwrap();
    let k = b.input("k", cache(&seq), DType::F32).unwrap();
    let v = b.input("v", cache(&seq), DType::F32).unwrap();
    let k = b.concat(&[pk, k], 2).unwrap();
    let v = b.concat(&[pv, v], 2).unwrap();
    let mut ins = vec![q, k, v];
    if kind.mask {
        let m = |t: &Dim| vec![1.into(), 1.into(), seq.clone(), t.clone()];
        let pm = b.input("past_mask", m(&past), DType::F32).unwrap();
        let nm = b.input("mask", m(&seq), DType::F32).unwrap();
        ins.push(b.concat(&[pm, nm], 3).unwrap());
    }
    let o = b
        .op(
            Op::Attention {
                scale: Scalar(0.25),
                causal: true,
                window: kind.window,
            },
            &ins,
        )
        .unwrap();
    b.output("out", o);
    b.output("present_k", k);
    b.output("present_v", v);
    b.finish()
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 512) as f32 / 128.0 - 2.0
        })
        .collect()
}

fn inputs(heads: usize, kvh: usize, past: usize, seq: usize, seed: u64) -> HashMap<String, Tensor> {
    let t = |s: u64, h: usize, rows: usize| {
        Tensor::f32(vec![1, h, rows, D], values(seed * 7 + s, h * rows * D))
    };
    // Padding: every third key hidden by f32::MIN, the others a small bias.
    let mask = |cols: usize, first: usize| {
        let row: Vec<f32> = (first..first + cols)
            .map(|j| {
                if j % 3 == 1 {
                    f32::MIN
                } else {
                    (j % 5) as f32 * 0.25
                }
            })
            .collect();
        Tensor::f32(vec![1, 1, seq, cols], row.repeat(seq))
    };
    HashMap::from([
        ("q".to_string(), t(1, heads, seq)),
        ("past_k".to_string(), t(2, kvh, past)),
        ("past_v".to_string(), t(3, kvh, past)),
        ("k".to_string(), t(4, kvh, seq)),
        ("v".to_string(), t(5, kvh, seq)),
        ("past_mask".to_string(), mask(past, 0)),
        ("mask".to_string(), mask(seq, past)),
    ])
}

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}");
    let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: element {i}: {a} vs {b}"
        );
    }
}

/// The kinds every backend runs: plain, a window shorter than most lengths, a padding mask,
/// both, and the constant query length of 1.
const KINDS: [Kind; 5] = [
    PLAIN,
    Kind {
        window: Some(40),
        ..PLAIN
    },
    Kind {
        mask: true,
        ..PLAIN
    },
    Kind {
        window: Some(100),
        mask: true,
        one: true,
    },
    Kind { one: true, ..PLAIN },
];

/// The graph's inputs (the mask's only when it has one).
fn only(g: &Graph, mut x: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let names: Vec<String> = g.inputs().iter().map(|(n, _, _)| n.to_string()).collect();
    x.retain(|k, _| names.contains(k));
    x
}

fn check(dev: &dyn Backend, name: &str) {
    for kind in KINDS {
        for (heads, group) in [(4, 1), (4, 2)] {
            check_one(dev, name, kind, heads, group);
        }
    }
}

fn check_one(dev: &dyn Backend, name: &str, kind: Kind, heads: usize, group: usize) {
    let g = graph(heads, group, kind);
    let kvh = heads / group;
    let w = HashMap::new();
    let mut cpu = CpuBackend::new().load(&g, &w).unwrap();
    for (n, len) in [1usize, 3, 50, 129, 783].into_iter().enumerate() {
        let what = format!("{name} {kind:?} heads {heads} group {group} length {len}");
        // The past from the host, one new row: the decode kernels.
        let x = only(&g, inputs(heads, kvh, len - 1, 1, n as u64));
        let want = cpu.run(&x, &[]).unwrap();
        let mut d = dev.load(&g, &w).unwrap();
        let got = d.run(&x, &[]).unwrap();
        for o in ["out", "present_k", "present_v"] {
            close(&format!("{what} (host past): {o}"), &got[o], &want[o]);
        }
        if kind.one || kind.mask {
            // A prefill needs a query length other than 1 (and the mask is the host's).
            continue;
        }
        // The same past made by a prefill and carried on the device.
        let mut p = only(&g, inputs(heads, kvh, 0, len - 1, n as u64));
        for (i, src) in [("k", "past_k"), ("v", "past_v")] {
            p.insert(i.to_string(), x[src].clone());
        }
        let carry = [
            ("present_k".to_string(), "past_k".to_string()),
            ("present_v".to_string(), "past_v".to_string()),
        ];
        if len > 1 {
            d.clear_carry();
            d.run(&p, &carry).unwrap();
            let mut step = x.clone();
            step.remove("past_k");
            step.remove("past_v");
            let got = d.run(&step, &[]).unwrap();
            for o in ["out", "present_k", "present_v"] {
                close(&format!("{what} (carried past): {o}"), &got[o], &want[o]);
            }
        }
    }
}

#[test]
fn wgpu_split_decode_matches_the_cpu() {
    if let Some(b) = common::wgpu_backend() {
        check(&b, "wgpu");
    }
}

#[test]
fn cuda_split_decode_matches_the_cpu() {
    if let Some(b) = common::cuda_backend() {
        check(&b, "cuda");
    }
}

/// The runs above launch the split-KV kernels: a decode step runs the partial kernel and, only
/// when the keys are split more than once, the combine (one split: one kernel, the partial
/// kernel writes the output). Lavapipe is a CPU adapter: splits of at least 128 keys.
#[test]
fn the_decode_step_launches_the_split_kernels() {
    let Some(b) = common::wgpu_backend() else {
        return;
    };
    for kind in [PLAIN, Kind { one: true, ..PLAIN }] {
        let g = graph(4, 1, kind);
        let w = HashMap::new();
        let mut d = b.load(&g, &w).unwrap();
        let mut names = |past: usize, seq: usize| -> Vec<String> {
            d.profile(&only(&g, inputs(4, 4, past, seq, 0)))
                .unwrap()
                .into_iter()
                .map(|k| k.name)
                .filter(|n| n.starts_with("attention_"))
                .collect()
        };
        // 50 keys: one split, one attention kernel.
        let one = names(49, 1);
        assert_eq!(one.len(), 1, "{kind:?}: {one:?}");
        assert!(one[0].starts_with("attention_split_"), "{one:?}");
        // 783 keys: several splits, then the combine.
        let many = names(782, 1);
        assert_eq!(many.len(), 2, "{kind:?}: {many:?}");
        assert!(many[0].starts_with("attention_split_"), "{many:?}");
        assert!(many[1].starts_with("attention_combine_"), "{many:?}");
        if !kind.one {
            let prefill = names(0, 5);
            assert!(
                !prefill
                    .iter()
                    .any(|n| n.contains("combine") || n.contains("split")),
                "{prefill:?}"
            );
        }
    }
}

/// The tuner's space for the split-KV decode includes the split count, and it compares each
/// candidate's attention output (after the combine, when the candidate's count launches one)
/// with the default's: at 300 keys (two splits by default on a CPU adapter) no candidate
/// differs — one split writes the output without a combine, 64 splits of 5 keys combine many
/// — and a perturbed one is rejected.
#[test]
fn the_tuner_tries_split_counts_against_the_output() {
    use transfuse::runtime::device::Device;
    use transfuse::runtime::tune::{cache::DeviceKey, tune_graph, Quiet, TuneOptions, TuningCache};
    if common::wgpu_backend().is_none() {
        return;
    }
    let dev = transfuse::runtime::webgpu::shared().unwrap();
    let g = graph(4, 1, Kind { one: true, ..PLAIN });
    let dims = transfuse::ir::Bindings::from([("past".to_string(), 299usize)]);
    for inject in [false, true] {
        let dir = std::env::temp_dir().join(format!(
            "transfuse-split-tune-{}-{inject}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cache = TuningCache::open_at(&dir, DeviceKey::of(dev.info())).unwrap();
        let opts = TuneOptions {
            budget: std::time::Duration::from_secs(30),
            per_kernel: std::time::Duration::from_secs(10),
            families: vec!["attention_split".into()],
            inject_mismatch: inject,
            ..TuneOptions::default()
        };
        let r = tune_graph(
            &dev,
            &g,
            transfuse::codegen::kir::Elem::F32,
            std::slice::from_ref(&dims),
            &mut cache,
            &opts,
            &Quiet,
        )
        .unwrap();
        let site = r
            .sites
            .iter()
            .find(|s| s.family == "attention_split")
            .unwrap_or_else(|| panic!("no split site: {r:?}"));
        assert!(site.skipped_why.is_none(), "{site:?}");
        assert!(site.default.0.contains("splits="), "{site:?}");
        if inject {
            assert_eq!(site.rejected.len(), 1, "{site:?}");
            assert!(site.rejected[0].0.contains("splits="), "{site:?}");
        } else {
            assert!(site.rejected.is_empty(), "{site:?}");
            // Every split count of the space but the default was tried (first).
            assert!(site.tried + site.failed >= 6, "{site:?}");
            // Stored: a second tune is a hit and measures nothing.
            let again = tune_graph(
                &dev,
                &g,
                transfuse::codegen::kir::Elem::F32,
                std::slice::from_ref(&dims),
                &mut cache,
                &opts,
                &Quiet,
            )
            .unwrap();
            assert_eq!(again.measurements, 0, "{again:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
