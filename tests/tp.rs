//! Tensor parallelism on CPU ranks: TP N equals TP 1 (tiny GPT-2, tiny BERT, tiny LLaMA with
//! replicated key/value heads at TP 3; MiniLM when `TRANSFUSE_MINILM_DIR` is set), greedy tokens
//! exact; a degree that does not divide the heads is an error naming the tensor; the loader's
//! per-rank byte counts; the bytes communicated per forward equal Megatron's count.
//!
//! Tolerance: |tp − tp1| ≤ 1e-5·(1 + |tp1|) per element at unpadded positions (the row-parallel sums add the
//! ranks' partial dot products in another order than one GEMM does).

mod common;

use transfuse::ir::Tensor;
use transfuse::models::Model;
use transfuse::passes::place::TpLayout;
use transfuse::passes::shard::comm_cost;
use transfuse::passes::Options;
use transfuse::runtime::comm::CollectiveKind;
use transfuse::runtime::CpuBackend;
use transfuse::tp::forward_bindings;
use transfuse::{Batch, Error, Sampling, Session};

use common::fixture;

const TOL: f32 = 1e-5;

fn dir(name: &str) -> std::path::PathBuf {
    fixture(&format!("{name}/model"))
}

/// TP `n` with the textbook Megatron layout (what the byte counts below are of).
fn tp(name: &str, n: usize) -> Session {
    tp_layout(name, n, TpLayout::Megatron)
}

fn tp_layout(name: &str, n: usize, layout: TpLayout) -> Session {
    let model = Model::load_without_weights(&dir(name), None, false).unwrap();
    let opts = Options {
        tp_layout: layout,
        ..Options::default()
    };
    Session::tp_with(model, n, CpuBackend::new(), &opts).unwrap()
}

fn close(what: &str, a: &Tensor, b: &Tensor) {
    close_masked(what, a, b, None)
}

/// As [`close`], skipping the positions a `[batch][seq]` mask pads (their outputs are
/// meaningless; there the fast and reference CPU backends at TP 1 differ by 2.7e-5 on MiniLM).
fn close_masked(what: &str, a: &Tensor, b: &Tensor, mask: Option<&[Vec<i64>]>) {
    common::assert_close_rel(what, a, b, mask, TOL)
}

fn batch() -> Batch {
    Batch {
        input_ids: vec![vec![5, 17, 42, 7, 99, 3], vec![11, 2, 250, 8, 1, 64]],
        attention_mask: Some(vec![vec![1; 6], vec![1, 1, 1, 1, 0, 0]]),
        token_type_ids: None,
    }
}

fn check_forward(name: &str, degrees: &[usize]) {
    check_forward_in(name, degrees, TpLayout::Megatron)
}

fn check_forward_in(name: &str, degrees: &[usize], layout: TpLayout) {
    let one = Session::cpu(Model::load(&dir(name)).unwrap()).unwrap();
    let want = one.forward(&batch()).unwrap();
    for &n in degrees {
        let s = tp_layout(name, n, layout);
        let got = s.forward(&batch()).unwrap();
        assert_eq!(got.len(), want.len(), "{name} tp {n}: outputs");
        let b = batch();
        for (k, v) in &want {
            close_masked(
                &format!("{name} tp {n} {k}"),
                &got[k],
                v,
                b.attention_mask.as_deref(),
            );
        }
    }
}

fn check_greedy(name: &str, degrees: &[usize]) {
    check_greedy_in(name, degrees, TpLayout::Megatron)
}

fn check_greedy_in(name: &str, degrees: &[usize], layout: TpLayout) {
    let one = Session::cpu(Model::load(&dir(name)).unwrap()).unwrap();
    let want = one.generate(&[1, 2, 3, 4], 8, Sampling::Greedy).unwrap();
    for &n in degrees {
        let got = tp_layout(name, n, layout)
            .generate(&[1, 2, 3, 4], 8, Sampling::Greedy)
            .unwrap();
        assert_eq!(got, want, "{name} tp {n}: greedy tokens");
    }
}

#[test]
fn gpt2_tp2_tp4_equal_tp1() {
    check_forward("tiny_gpt2", &[2, 4]);
    check_greedy("tiny_gpt2", &[2, 4]);
}

#[test]
fn bert_tp2_tp4_equal_tp1() {
    check_forward("tiny_bert", &[2, 4]);
}

/// 6 heads, 2 key/value heads: TP 2 splits both, TP 3 replicates the key/value heads; the
/// vocabulary of 512 is padded to 513 at TP 3.
#[test]
fn llama_tp2_tp3_equal_tp1() {
    check_forward("tiny_llama", &[2, 3]);
    check_greedy("tiny_llama", &[2, 3]);
}

/// Megatron-SP: the residual adds and norms on each rank's rows of the sequence, padded when
/// the degree does not divide it (6 tokens at TP 4 → 2 rows a rank, 2 pad rows; every decoding
/// step's 1 token → 1 row, N − 1 pad rows): equal to TP 1 within the same tolerance, greedy
/// tokens exact.
#[test]
fn sequence_parallel_equals_tp1() {
    let sp = TpLayout::MegatronSp;
    check_forward_in("tiny_gpt2", &[2, 4], sp);
    check_greedy_in("tiny_gpt2", &[2, 4], sp);
    check_forward_in("tiny_bert", &[2, 4], sp);
    check_forward_in("tiny_llama", &[2, 3], sp);
    check_greedy_in("tiny_llama", &[2, 3], sp);
    for (name, n) in [("tiny_gpt2", 4), ("tiny_bert", 2), ("tiny_llama", 3)] {
        let s = tp_layout(name, n, sp);
        let st = s.tp.as_ref().unwrap();
        assert_eq!(st.placement.chosen, "megatron-sp");
        // Every row-parallel site (2 per layer and the embedding) is sequence-parallel.
        assert_eq!(st.placement.sp_sites, 5, "{name} tp {n}");
        assert_eq!(st.placement.sites, 5, "{name} tp {n}");
        let ops = st.sharded.graph.op_counts();
        assert!(!ops.contains_key("all_reduce"), "{name} tp {n}: {ops:?}");
    }
}

/// The bias and residual of every row-parallel matmul added before its all-reduce, in the
/// matmul's epilogue on rank 0 (`all_reduce(x·W + [rank 0: b + r])`): equal to TP 1 within
/// the same tolerance (the same terms summed in another order), greedy tokens exact, and the
/// same collectives moving the same bytes as the textbook layout. LLaMA's bias-free output
/// and down projections count too (their residual add is taken into the matmul first).
#[test]
fn fused_epilogue_equals_tp1_and_moves_megatrons_bytes() {
    let f = TpLayout::MegatronFused;
    check_forward_in("tiny_gpt2", &[2, 4], f);
    check_greedy_in("tiny_gpt2", &[2, 4], f);
    check_forward_in("tiny_bert", &[2, 4], f);
    check_forward_in("tiny_llama", &[2, 3], f);
    check_greedy_in("tiny_llama", &[2, 3], f);
    for (name, n) in [("tiny_gpt2", 4), ("tiny_bert", 2), ("tiny_llama", 3)] {
        let fused = tp_layout(name, n, f);
        let mega = tp(name, n);
        let st = fused.tp.as_ref().unwrap();
        assert_eq!(st.placement.chosen, "megatron-fused");
        // The 2 matmul sites of each layer; the embedding's all-reduce has no epilogue.
        assert_eq!(
            (st.placement.fused_sites, st.placement.sites),
            (4, 5),
            "{name} tp {n}"
        );
        let bind = forward_bindings(2, 6);
        let mst = mega.tp.as_ref().unwrap();
        assert_eq!(
            comm_cost(&st.sharded.graph, &bind, n).unwrap(),
            comm_cost(&mst.sharded.graph, &bind, n).unwrap(),
            "{name} tp {n}"
        );
        st.take_logs();
        mst.take_logs();
        fused.forward(&batch()).unwrap();
        mega.forward(&batch()).unwrap();
        let elems = |logs: Vec<Vec<transfuse::runtime::comm::Collective>>| -> Vec<Vec<_>> {
            logs.into_iter()
                .map(|l| l.into_iter().map(|c| (c.kind, c.elems)).collect())
                .collect()
        };
        assert_eq!(
            elems(st.take_logs()),
            elems(mst.take_logs()),
            "{name} tp {n}"
        );
    }
}

/// `--tp-layout auto` (the default) runs whichever layout the cost model picks, and it
/// equals TP 1 like the forced ones.
#[test]
fn auto_layout_equals_tp1() {
    check_forward_in("tiny_gpt2", &[2], TpLayout::Auto);
    check_greedy_in("tiny_llama", &[3], TpLayout::Auto);
    let s = tp_layout("tiny_gpt2", 2, TpLayout::Auto);
    let p = &s.tp.as_ref().unwrap().placement;
    for k in ["megatron", "megatron-fused", "megatron-sp", "chosen"] {
        assert!(
            p.costs[k].is_finite() && p.costs[k] > 0.0,
            "{k}: {:?}",
            p.costs
        );
    }
    let best = p.costs["megatron"]
        .min(p.costs["megatron-sp"])
        .min(p.costs["megatron-fused"]);
    assert!(p.costs["chosen"] <= best * (1.0 + 1e-9));
}

#[test]
fn minilm_tp2_tp4_equal_tp1() {
    let Some(d) = common::minilm_dir() else {
        return;
    };
    let texts = [
        "tensor parallel ranks",
        "a second sentence, longer than the first one",
    ];
    let one = Session::cpu(Model::load(&d).unwrap()).unwrap();
    let b = one_batch(&one, &texts);
    let want = one.forward(&b).unwrap();
    for layout in [
        TpLayout::Megatron,
        TpLayout::MegatronFused,
        TpLayout::MegatronSp,
    ] {
        for n in [2, 4] {
            let opts = Options {
                tp_layout: layout,
                ..Options::default()
            };
            let m = Model::load_without_weights(&d, None, false).unwrap();
            let s = Session::tp_with(m, n, CpuBackend::new(), &opts).unwrap();
            let got = s.forward(&b).unwrap();
            for (k, v) in &want {
                let what = format!("minilm tp {n} {} {k}", layout.name());
                close_masked(&what, &got[k], v, b.attention_mask.as_deref());
            }
        }
    }
}

fn one_batch(s: &Session, texts: &[&str]) -> Batch {
    let (input_ids, mask) = s
        .model
        .tokenizer
        .as_ref()
        .unwrap()
        .encode_batch_padded(texts)
        .unwrap();
    Batch {
        input_ids,
        attention_mask: Some(mask),
        token_type_ids: None,
    }
}

#[test]
fn degree_that_does_not_divide_the_heads_names_the_tensor() {
    let model = Model::load_without_weights(&dir("tiny_gpt2"), None, false).unwrap();
    let err = Session::cpu_tp(model, 3)
        .err()
        .expect("4 heads over 3 ranks");
    assert!(matches!(err, Error::Shard(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("h.0.attn.c_attn.weight") && msg.contains("4 heads") && msg.contains("--tp 3"),
        "{msg}"
    );
}

/// Per-rank resident bytes = sharded/N + replicated, and bytes read ≈ the rank's share.
#[test]
fn loader_counts_per_rank_bytes() {
    let full = Model::load(&dir("tiny_gpt2")).unwrap();
    let total: u64 = full.weights.values().map(|t| 4 * t.len() as u64).sum();
    let one = tp("tiny_gpt2", 1);
    let st1 = one.tp.as_ref().unwrap().stats[0];
    // TP 1 reads every weight once (the tied table serves the embedding and the head).
    assert_eq!(st1.bytes_read, total);
    assert_eq!(st1.resident(), total);
    for n in [2u64, 4] {
        let s = tp("tiny_gpt2", n as usize);
        let stats = &s.tp.as_ref().unwrap().stats;
        assert_eq!(stats.len(), n as usize);
        for st in stats {
            assert_eq!(st.replicated_resident, st1.replicated_resident);
            assert_eq!(st.sharded_resident, st1.sharded_resident / n);
            assert_eq!(
                st.bytes_read,
                st1.replicated_resident + st1.sharded_resident / n
            );
        }
    }
}

/// Megatron's count: two all-reduces of b·s·h per layer, one for the vocab-parallel embedding,
/// plus the LM head's all-gather of the logits, statically from the graph and as the ranks ran
/// them.
#[test]
fn bytes_communicated_per_forward_equal_megatrons_count() {
    let (b, s, h, layers, vocab) = (2usize, 6usize, 64usize, 2usize, 1000usize);
    for n in [2usize, 4] {
        let sess = tp("tiny_gpt2", n);
        let state = sess.tp.as_ref().unwrap();
        let c = comm_cost(&state.sharded.graph, &forward_bindings(b, s), n).unwrap();
        assert_eq!(c.all_reduces, 2 * layers + 1);
        assert_eq!(
            c.all_reduce_bytes,
            ((2 * layers + 1) * b * s * h * 4) as u64
        );
        assert_eq!(c.all_gathers, 1);
        assert_eq!(c.all_gather_bytes, (b * s * vocab * 4) as u64);
        let ring = ((2 * layers + 1) * b * s * h * 4) as f64 * 2.0 * (n - 1) as f64 / n as f64
            + (b * s * vocab * 4) as f64 * (n - 1) as f64 / n as f64;
        assert!((c.per_rank_ring - ring).abs() < 1e-6);
        state.take_logs();
        sess.forward(&batch()).unwrap();
        for log in state.take_logs() {
            let reduce: usize = log
                .iter()
                .filter(|c| c.kind == CollectiveKind::AllReduce)
                .map(|c| c.elems)
                .sum();
            let gather: usize = log
                .iter()
                .filter(|c| c.kind == CollectiveKind::AllGather)
                .map(|c| c.elems)
                .sum();
            assert_eq!(reduce, (2 * layers + 1) * b * s * h);
            assert_eq!(gather * n, b * s * vocab);
        }
    }
}

/// Megatron-SP's count: each former all-reduce is a reduce-scatter of the (padded) b·s·h and
/// an all-gather of it after the norm — per rank the same ring bytes as the all-reduce,
/// 2(N−1)/N of b·s·h, when N divides s (here s = 6, N = 2); at N = 4 the sequence pads to 8.
#[test]
fn bytes_communicated_per_forward_equal_megatron_sps_count() {
    let (b, s, h, layers, vocab) = (2usize, 6usize, 64usize, 2usize, 1000usize);
    for n in [2usize, 4] {
        let sp = tp_layout("tiny_gpt2", n, TpLayout::MegatronSp);
        let mega = tp("tiny_gpt2", n);
        let bind = forward_bindings(b, s);
        let state = sp.tp.as_ref().unwrap();
        let mut bind_sp = bind.clone();
        let sp_len = s.div_ceil(n) * n;
        bind_sp.insert(transfuse::passes::shard::SEQ_CHUNK.into(), sp_len / n);
        let c = comm_cost(&state.sharded.graph, &bind_sp, n).unwrap();
        let m = comm_cost(&mega.tp.as_ref().unwrap().sharded.graph, &bind, n).unwrap();
        let sites = 2 * layers + 1;
        let stream = (b * sp_len * h * 4) as u64;
        assert_eq!((c.all_reduces, c.reduce_scatters), (0, sites));
        assert_eq!(c.reduce_scatter_bytes, sites as u64 * stream);
        // The norms' outputs gathered (one per site), and the logits.
        assert_eq!(c.all_gathers, sites + 1);
        assert_eq!(
            c.all_gather_bytes,
            sites as u64 * stream + (b * s * vocab * 4) as u64
        );
        let f = (n - 1) as f64 / n as f64;
        let ring = 2.0 * f * (sites as u64 * stream) as f64 + f * (b * s * vocab * 4) as f64;
        assert!(
            (c.per_rank_ring - ring).abs() < 1e-6,
            "{} vs {ring}",
            c.per_rank_ring
        );
        if sp_len == s {
            // Unpadded: exactly the Megatron layout's ring bytes per rank.
            assert!((c.per_rank_ring - m.per_rank_ring).abs() < 1e-6);
        }
        state.take_logs();
        sp.forward(&batch()).unwrap();
        for log in state.take_logs() {
            let kind = |k: CollectiveKind| -> (usize, usize) {
                let v: Vec<usize> = log
                    .iter()
                    .filter(|c| c.kind == k)
                    .map(|c| c.elems)
                    .collect();
                (v.len(), v.iter().sum())
            };
            assert_eq!(kind(CollectiveKind::AllReduce), (0, 0));
            assert_eq!(
                kind(CollectiveKind::ReduceScatter),
                (sites, sites * b * sp_len * h)
            );
            let (k, elems) = kind(CollectiveKind::AllGather);
            assert_eq!(k, sites + 1);
            assert_eq!(elems * n, sites * b * sp_len * h + b * s * vocab);
        }
    }
}

/// No op falls back to replicated: exactly Megatron's collectives in every sharded graph (two
/// all-reduces per layer and one for the embedding, one all-gather for a decoder's logits), at
/// every tested degree — TP 1 included (a world of one: what `scripts/gpu-check.sh` runs over
/// NCCL on one GPU, so its collectives run on the CUDA rank's buffers).
#[test]
fn sharded_graphs_hold_only_megatrons_collectives() {
    for (name, layers, gathers, degrees) in [
        ("tiny_gpt2", 2, 1, &[1usize, 2, 4][..]),
        ("tiny_bert", 2, 0, &[1, 2, 4][..]),
        ("tiny_llama", 2, 1, &[1, 2, 3][..]),
    ] {
        for &n in degrees {
            let s = tp(name, n);
            let g = &s.tp.as_ref().unwrap().sharded.graph;
            let c = comm_cost(g, &forward_bindings(1, 4), n).unwrap();
            assert_eq!(
                (c.all_reduces, c.all_gathers),
                (2 * layers + 1, gathers),
                "{name} tp {n}"
            );
        }
    }
}

mod cli {
    use super::*;
    use common::cli::{assert_error, assert_ok, s, transfuse, TempDir};

    fn gen(model: &str, extra: &[&str]) -> std::process::Output {
        let d = s(&dir(model));
        let mut args = vec![
            "generate",
            "--model",
            &d,
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "5",
            "--json",
        ];
        if !extra.contains(&"--backend") {
            args.extend_from_slice(&["--backend", "cpu"]);
        }
        args.extend_from_slice(extra);
        transfuse(args)
    }

    #[test]
    fn generate_tp_equals_tp1_and_bad_degrees_exit_2() {
        let want = assert_ok(&gen("tiny_gpt2", &[]));
        assert_eq!(assert_ok(&gen("tiny_gpt2", &["--tp", "2"])), want);
        let want = assert_ok(&gen("tiny_llama", &[]));
        assert_eq!(assert_ok(&gen("tiny_llama", &["--tp", "3"])), want);
        assert_error(
            &gen("tiny_gpt2", &["--tp", "3"]),
            &["h.0.attn.c_attn.weight", "[64, 192]", "4 heads", "--tp 3"],
        );
        assert_error(&gen("tiny_gpt2", &["--tp", "0"]), &["--tp"]);
        assert_error(
            &gen("tiny_gpt2", &["--tp", "2", "--tp-layout", "gspmd"]),
            &[
                "--tp-layout",
                "gspmd",
                "megatron-fused",
                "megatron-sp",
                "auto",
            ],
        );
        let want = assert_ok(&gen("tiny_gpt2", &[]));
        for layout in ["megatron", "megatron-fused", "megatron-sp", "auto"] {
            let got = assert_ok(&gen("tiny_gpt2", &["--tp", "4", "--tp-layout", layout]));
            assert_eq!(got, want, "--tp-layout {layout}");
        }
        // A pipeline's TP stages are Megatron groups: SP there is refused by name.
        assert_error(
            &gen(
                "tiny_gpt2",
                &["--tp", "2", "--pp", "2", "--tp-layout", "megatron-sp"],
            ),
            &["--tp-layout megatron-sp", "pipeline"],
        );
        assert_error(
            &gen(
                "tiny_gpt2",
                &["--tp", "2", "--pp", "2", "--tp-layout", "megatron-fused"],
            ),
            &["--tp-layout megatron-fused", "pipeline"],
        );
        // wgpu ranks run (tests/pp.rs checks them); CUDA ranks run over NCCL
        // (tests/tp_nccl.rs checks their errors without NCCL or a GPU).
    }

    #[test]
    fn run_with_tp() {
        let tmp = TempDir::new("tp_cli_run");
        let inputs = tmp.write(
            "inputs.json",
            r#"{"input_ids": [[5, 17, 42, 7], [11, 2, 250, 8]]}"#,
        );
        let (one, two) = (tmp.join("one.safetensors"), tmp.join("two.safetensors"));
        for (out, tp) in [(&one, "1"), (&two, "4")] {
            assert_ok(&transfuse([
                "run",
                "--model",
                &s(&dir("tiny_bert")),
                "--inputs",
                &s(&inputs),
                "--out",
                &s(out),
                "--backend",
                "cpu",
                "--tp",
                tp,
            ]));
        }
        let a = transfuse::models::load_all_safetensors(&one).unwrap();
        let b = transfuse::models::load_all_safetensors(&two).unwrap();
        for (k, v) in &a {
            close(&format!("run --tp 4 {k}"), &b[k], v);
        }
    }

    #[test]
    fn compile_tp_report_and_json() {
        let d = s(&dir("tiny_gpt2"));
        let out = assert_ok(&transfuse([
            "compile",
            "--model",
            &d,
            "--tp",
            "2",
            "--report",
            "--dims",
            "batch=1,seq=16",
        ]));
        // 5 all-reduces of 1·16·64 f32 (2 per layer + the embedding), the logits 16·1000.
        assert!(
            out.contains("collectives per forward: 5 all_reduce (20480 B), 1 all_gather (64000 B)"),
            "{out}"
        );
        // Megatron-SP: each all-reduce → a reduce-scatter and an all-gather, the same ring
        // bytes per rank (seq 16 divides by 2).
        let sp = assert_ok(&transfuse([
            "compile",
            "--model",
            &d,
            "--tp",
            "2",
            "--tp-layout",
            "megatron-sp",
            "--report",
            "--dims",
            "batch=1,seq=16",
        ]));
        assert!(
            sp.contains("layout megatron-sp (--tp-layout megatron-sp); 5 of 5"),
            "{sp}"
        );
        assert!(
            sp.contains("0 all_reduce (0 B), 6 all_gather (84480 B), 5 reduce_scatter (20480 B)"),
            "{sp}"
        );
        let ring = |t: &str| {
            t.split("ring: ")
                .nth(1)
                .map(|r| r.split(' ').next().unwrap().to_string())
        };
        assert_eq!(ring(&sp), ring(&out));
        // auto: both alternatives priced, the cheaper one chosen.
        assert!(out.contains("(--tp-layout auto)"), "{out}");
        assert!(
            out.contains("megatron-sp") && out.contains("chosen"),
            "{out}"
        );
        let out = assert_ok(&transfuse([
            "compile", "--model", &d, "--tp", "4", "--json",
        ]));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["tp"]["degree"], 4);
        assert_eq!(v["tp"]["all_reduces"], 5);
        // The GPU profile: the fused epilogue beats the add after the all-reduce at every
        // site, and SP's extra collectives and launches.
        assert_eq!(v["tp"]["layout"], "megatron-fused");
        assert_eq!(v["tp"]["layout_asked"], "auto");
        assert_eq!(v["tp"]["sites"], 5);
        assert_eq!(v["tp"]["fused_sites"], 4);
        for k in ["megatron", "megatron-fused", "megatron-sp", "chosen"] {
            assert!(v["tp"]["layout_costs_s"][k].as_f64().unwrap() > 0.0, "{k}");
        }
        let costs = &v["tp"]["layout_costs_s"];
        assert!(costs["megatron-fused"].as_f64() < costs["megatron"].as_f64());
        // Forced: the same collectives and bytes as the textbook layout.
        let fused = assert_ok(&transfuse([
            "compile",
            "--model",
            &d,
            "--tp",
            "2",
            "--tp-layout",
            "megatron-fused",
            "--report",
            "--dims",
            "batch=1,seq=16",
        ]));
        assert!(
            fused.contains("layout megatron-fused (--tp-layout megatron-fused); 0 of 5 row-parallel sites sequence-parallel, 4 with the bias and residual before the all-reduce"),
            "{fused}"
        );
        assert!(
            fused.contains(
                "collectives per forward: 5 all_reduce (20480 B), 1 all_gather (64000 B)"
            ),
            "{fused}"
        );
        assert!(fused.contains("root_only"), "{fused}");
        assert_error(
            &transfuse([
                "compile",
                "--model",
                &d,
                "--tp",
                "2",
                "--tp-layout",
                "fused",
            ]),
            &["--tp-layout", "`fused`", "megatron-fused"],
        );
        assert_error(
            &transfuse(["compile", "--model", &d, "--tp", "3"]),
            &["h.0.attn.c_attn.weight", "--tp 3"],
        );
    }
}

/// Device lowering has no collectives yet: a sharded graph is a typed error naming the op,
/// never a panic (the CLI refuses `--tp` with `--backend wgpu|cuda` before this).
#[test]
fn lowering_a_sharded_graph_is_a_typed_error() {
    use transfuse::codegen::lower::{lower, LowerOptions, Target};
    let s = tp("tiny_gpt2", 2);
    let g = &s.tp.as_ref().unwrap().sharded.graph;
    let Err(err) = lower(
        g,
        &LowerOptions::new(Target::Wgsl, transfuse::codegen::kir::Elem::F32),
    ) else {
        panic!("no collectives in kernels");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("all_reduce") || msg.contains("shard") || msg.contains("all_gather"),
        "{msg}"
    );
}
