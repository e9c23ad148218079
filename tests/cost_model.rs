//! The cost model ranks the optimizer's choices the way the backends' measured times do: for
//! attention (MiniLM-shaped b1 h12 d64 at seq 128 and 1024, and tiny GPT-2's own), the
//! estimated time of the fused choice (the optimizer with the `attention` family, as
//! `transfuse bench attention` builds its `fused` variant) is below that of the unfused one
//! (without it) under every device profile, as `bench attention --backend cpu` and
//! `--backend wgpu` (lavapipe: the `cpu-adapter` profile) measure it (README benchmarks). Only
//! the estimated ranking is asserted, never a time.

mod common;

use transfuse::attention_bench::{graph, AttnConfig, MaskKind};
use transfuse::codegen::kir::Elem;
use transfuse::ir::Graph;
use transfuse::models::Model;
use transfuse::passes::{optimize, Options, Profile};

/// The estimated seconds of `g` optimized with or without the attention family, and how many
/// attention ops the result has.
fn estimate(g: &Graph, profile: &Profile, dims: &[(&str, usize)], fused: bool) -> (f64, usize) {
    let mut o = Options {
        profile: profile.clone(),
        ..Options::default()
    };
    for (k, v) in dims {
        o.profile.dims.insert(k.to_string(), *v);
    }
    if !fused {
        o.families.retain(|f| f != "attention");
    }
    let (opt, r) = optimize(g, &o).expect("optimizer");
    let n = opt.op_counts().get("attention").copied().unwrap_or(0);
    (r.cost_after, n)
}

fn attention(heads: usize, head_dim: usize) -> Graph {
    graph(&AttnConfig {
        batch: 1,
        heads,
        kv_heads: heads,
        head_dim,
        mask: MaskKind::Causal,
        window: 0,
        lengths: vec![],
        dtype: Elem::F32,
    })
    .expect("attention graph")
}

fn ranks_fused_first(what: &str, g: &Graph, dims: &[(&str, usize)], layers: usize) {
    for name in Profile::NAMES {
        let p = Profile::by_name(name).expect("known profile");
        let (fused, nf) = estimate(g, &p, dims, true);
        let (unfused, nu) = estimate(g, &p, dims, false);
        eprintln!(
            "{what} {dims:?} {name}: fused {:.4} ms, unfused {:.4} ms, unfused/fused {:.2}",
            fused * 1e3,
            unfused * 1e3,
            unfused / fused
        );
        assert_eq!((nf, nu), (layers, 0), "{what} {name}: attention ops");
        assert!(
            fused < unfused,
            "{what} {dims:?} under {name}: fused {fused} s estimated at least unfused {unfused} s"
        );
    }
}

#[test]
fn minilm_shaped_attention_ranks_fused_first_on_every_profile() {
    let g = attention(12, 64);
    for seq in [128, 1024] {
        ranks_fused_first("b1 h12 d64", &g, &[("seq", seq), ("kv", seq)], 1);
    }
}

#[test]
fn tiny_gpt2_attention_ranks_fused_first_on_every_profile() {
    // Its own head shape (4 heads of 16) in the benchmark's graph, 4 heads of 32 (the nearest
    // that `bench attention --head-dim` runs), and the whole model.
    for d in [16, 32] {
        let g = attention(4, d);
        ranks_fused_first(&format!("b1 h4 d{d}"), &g, &[("seq", 128), ("kv", 128)], 1);
    }
    let m = Model::load(&common::fixture("tiny_gpt2/model")).expect("fixture loads");
    // Two layers (config.json's n_layer).
    ranks_fused_first("tiny GPT-2", &m.graph, &[("seq", 128)], 2);
}

/// A session with the default options optimizes for its backend's profile: `cpu` on the CPU
/// backend, `cpu-adapter` on wgpu over a CPU adapter (lavapipe), `gpu` on a GPU.
#[test]
fn a_session_optimizes_for_its_backends_profile() {
    use transfuse::runtime::{Backend, CpuBackend};
    let cost_under = |name: &str| {
        let m = Model::load(&common::fixture("tiny_gpt2/model")).expect("fixture loads");
        let o = Options {
            profile: Profile::by_name(name).expect("known profile"),
            ..Options::default()
        };
        optimize(&m.graph, &o).expect("optimizer").1.cost_after
    };
    let session_cost = |b: Box<dyn Backend>| {
        let m = Model::load(&common::fixture("tiny_gpt2/model")).expect("fixture loads");
        let s = transfuse::Session::new(m, b).expect("session");
        s.report.expect("optimized").cost_after
    };
    // Costs of different profiles differ by far more than summation order could.
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
    let cpu = CpuBackend::new();
    assert_eq!(cpu.cost_profile(), "cpu");
    let (got, want) = (session_cost(Box::new(cpu)), cost_under("cpu"));
    assert!(
        same(got, want),
        "cpu session: {got} s, cpu profile: {want} s"
    );
    assert!(!same(got, cost_under("gpu")));
    if let Some(b) = common::wgpu_backend() {
        let want = if b.description().contains("Cpu") {
            "cpu-adapter"
        } else {
            "gpu"
        };
        assert_eq!(b.cost_profile(), want);
        let (got, cost) = (session_cost(Box::new(b)), cost_under(want));
        assert!(
            same(got, cost),
            "wgpu session: {got} s, {want} profile: {cost} s"
        );
    }
}
