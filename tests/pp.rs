//! Pipeline parallelism: PP P with M micro-batches equals PP 1 (tiny GPT-2 and tiny BERT at
//! PP 2 with 1–4 micro-batches, MiniLM at PP 2 and 3 when `TRANSFUSE_MINILM_DIR` is set, an
//! 8-layer GPT-2 with random weights at PP 4, PP 2 × TP 2), on CPU stages and on wgpu stages
//! (the same matrix, each stage its own device); greedy tokens exact through the pipeline; the stage cut balanced;
//! bad degrees named; a failing stage ends every stage with its error.
//!
//! Tolerances: 1e-5·(1 + |ref|) per element on CPU stages (a stage runs the same kernels as the
//! whole graph; only PP × TP's row-parallel sums reorder additions), 1e-3 on wgpu stages
//! against the CPU reference (as the wgpu parity tests), at unpadded positions.

mod common;

use std::path::PathBuf;

use transfuse::ir::Tensor;
use transfuse::models::Model;
use transfuse::pp::stage_backend;
use transfuse::{Batch, Sampling, Session};

use common::fixture;

fn dir(name: &str) -> PathBuf {
    fixture(&format!("{name}/model"))
}

fn opts() -> transfuse::passes::Options {
    transfuse::passes::Options::default()
}

fn pp_session(d: &std::path::Path, pp: usize, m: usize, tp: usize, backend: &str) -> Session {
    let model = match tp {
        1 => Model::load(d).unwrap(),
        _ => Model::load_without_weights(d, None, false).unwrap(),
    };
    Session::pp_with(model, pp, m, tp, &|| stage_backend(backend), &opts()).unwrap()
}

/// Four rows (so 1, 2 and 4 micro-batches divide it), one padded.
fn batch4() -> Batch {
    Batch {
        input_ids: vec![
            vec![5, 17, 42, 7, 99, 3],
            vec![11, 2, 250, 8, 1, 64],
            vec![9, 9, 31, 400, 12, 6],
            vec![77, 3, 5, 18, 2, 900],
        ],
        attention_mask: Some(vec![
            vec![1; 6],
            vec![1, 1, 1, 1, 0, 0],
            vec![1; 6],
            vec![1, 1, 1, 1, 1, 0],
        ]),
        token_type_ids: None,
    }
}

fn check(what: &str, want: &transfuse::runtime::TensorMap, s: &Session, b: &Batch, tol: f32) {
    let got = s.forward(b).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (k, v) in want {
        common::assert_close_rel(
            &format!("{what} {k}"),
            &got[k],
            v,
            b.attention_mask.as_deref(),
            tol,
        );
    }
}

fn reference(d: &std::path::Path, b: &Batch) -> transfuse::runtime::TensorMap {
    Session::cpu(Model::load(d).unwrap())
        .unwrap()
        .forward(b)
        .unwrap()
}

#[test]
fn gpt2_and_bert_pp2_with_1_to_4_micro_batches_equal_pp1() {
    pp2_micro_batches("cpu", 1e-5);
}

/// PP 2 with 1–4 micro-batches on tiny GPT-2 and tiny BERT on `backend`'s stages, within `tol`
/// of the CPU's PP 1.
fn pp2_micro_batches(backend: &str, tol: f32) {
    for name in ["tiny_gpt2", "tiny_bert"] {
        let d = dir(name);
        let want = reference(&d, &batch4());
        for m in 1..=4 {
            // Three micro-batches do not divide a batch of 4: three rows instead.
            let b = match m {
                3 => {
                    let mut b = batch4();
                    b.input_ids.pop();
                    b.attention_mask.as_mut().unwrap().pop();
                    b
                }
                _ => batch4(),
            };
            let want = match m {
                3 => reference(&d, &b),
                _ => want.clone(),
            };
            let s = pp_session(&d, 2, m, 1, backend);
            check(&format!("{name} {backend} pp 2 m {m}"), &want, &s, &b, tol);
            // Every micro-batch crossed the one stage boundary: stage 0 sent, stage 1 received.
            let logs = s.pp.as_ref().unwrap().take_logs();
            let sends = logs[0].len() / s.pp.as_ref().unwrap().pipeline.stages[0].send.len();
            assert_eq!(sends, m, "{name} m {m}: one message set per micro-batch");
            assert_eq!(logs[1].len(), logs[0].len());
        }
    }
}

#[test]
fn greedy_tokens_exact_through_the_pipeline() {
    let d = dir("tiny_gpt2");
    let want = Session::cpu(Model::load(&d).unwrap())
        .unwrap()
        .generate(&[1, 2, 3, 4], 8, Sampling::Greedy)
        .unwrap();
    let got = pp_session(&d, 2, 1, 1, "cpu")
        .generate(&[1, 2, 3, 4], 8, Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want, "pp 2 greedy tokens");
    let got = pp_session(&dir("tiny_llama"), 2, 1, 2, "cpu")
        .generate(&[1, 2, 3, 4], 6, Sampling::Greedy)
        .unwrap();
    let want = Session::cpu(Model::load(&dir("tiny_llama")).unwrap())
        .unwrap()
        .generate(&[1, 2, 3, 4], 6, Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want, "llama pp 2 × tp 2 greedy tokens");
}

#[test]
fn pp2_times_tp2_equals_pp1() {
    for name in ["tiny_gpt2", "tiny_bert"] {
        let d = dir(name);
        let want = reference(&d, &batch4());
        let s = pp_session(&d, 2, 2, 2, "cpu");
        check(&format!("{name} pp 2 × tp 2"), &want, &s, &batch4(), 1e-5);
    }
}

#[test]
fn minilm_pp2_pp3_equal_pp1() {
    minilm_pp2_pp3("cpu", 1e-5);
}

/// MiniLM (6 layers) at PP 2 (2 micro-batches) and PP 3 on `backend`'s stages, within `tol`
/// of the CPU's PP 1.
fn minilm_pp2_pp3(backend: &str, tol: f32) {
    let Some(d) = common::minilm_dir() else {
        return;
    };
    let texts = [
        "pipeline stages",
        "a second sentence, longer than the first one",
    ];
    let one = Session::cpu(Model::load(&d).unwrap()).unwrap();
    let (input_ids, mask) = one
        .model
        .tokenizer
        .as_ref()
        .unwrap()
        .encode_batch_padded(&texts)
        .unwrap();
    let b = Batch {
        input_ids,
        attention_mask: Some(mask),
        token_type_ids: None,
    };
    let want = one.forward(&b).unwrap();
    for (pp, m) in [(2, 2), (3, 1)] {
        let s = pp_session(&d, pp, m, 1, backend);
        assert_eq!(s.pp.as_ref().unwrap().pipeline.layers, 6);
        check(&format!("minilm {backend} pp {pp}"), &want, &s, &b, tol);
    }
}

/// An 8-layer GPT-2 (tiny GPT-2's dims) with deterministic pseudo-random weights.
fn eight_layer_gpt2(tag: &str) -> PathBuf {
    let out =
        std::env::temp_dir().join(format!("transfuse-pp-gpt2-8l-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let cfg = std::fs::read_to_string(dir("tiny_gpt2").join("config.json")).unwrap();
    let cfg = cfg.replace("\"n_layer\": 2", "\"n_layer\": 8");
    std::fs::write(out.join("config.json"), cfg).unwrap();
    let cfg = transfuse::models::load_config(&out).unwrap();
    let g = transfuse::models::build_graph(&cfg, Default::default()).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut tensors = Vec::new();
    for (name, shape) in transfuse::models::expected_weights(&g).unwrap() {
        let n: usize = shape.iter().product();
        let norm_scale = name.contains("ln_") && name.ends_with(".weight");
        let data: Vec<f32> = (0..n)
            .map(|_| match norm_scale {
                true => 1.0 + 0.1 * next(),
                false => 0.2 * next(),
            })
            .collect();
        tensors.push((name, Tensor::f32(shape, data)));
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    transfuse::write_safetensors(&out.join("model.safetensors"), &refs).unwrap();
    out
}

#[test]
fn gpt2_8_layers_pp4_equals_pp1() {
    gpt2_8_layers_pp4("cpu", 1e-5);
}

/// The 8-layer GPT-2 at PP 4 on `backend`'s stages: the stage cut, outputs within `tol` of the
/// CPU's PP 1 and greedy tokens exact.
fn gpt2_8_layers_pp4(backend: &str, tol: f32) {
    let d = eight_layer_gpt2(backend);
    let want = reference(&d, &batch4());
    let s = pp_session(&d, 4, 2, 1, backend);
    let p = &s.pp.as_ref().unwrap().pipeline;
    assert_eq!(p.layers, 8);
    // Equal layers, balanced: two per stage (the head's cost tips none over).
    let ranges: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
    assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 8);
    assert!(ranges.iter().all(|r| !r.is_empty()), "{ranges:?}");
    check(
        &format!("gpt2-8l {backend} pp 4"),
        &want,
        &s,
        &batch4(),
        tol,
    );
    // Decoding runs one micro-batch (batch 1); each stage carries its layers' cache.
    let greedy = pp_session(&d, 4, 1, 1, backend)
        .generate(&[1, 2, 3], 5, Sampling::Greedy)
        .unwrap();
    let want = Session::cpu(Model::load(&d).unwrap())
        .unwrap()
        .generate(&[1, 2, 3], 5, Sampling::Greedy)
        .unwrap();
    assert_eq!(greedy, want, "gpt2-8l pp 4 greedy tokens");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_degrees_name_the_flag() {
    let d = dir("tiny_gpt2");
    let err = Session::pp_with(
        Model::load(&d).unwrap(),
        3,
        1,
        1,
        &|| stage_backend("cpu"),
        &opts(),
    )
    .err()
    .expect("3 stages over 2 layers");
    assert!(
        err.to_string().contains("--pp 3") && err.to_string().contains("2 layers"),
        "{err}"
    );
    let s = pp_session(&d, 2, 3, 1, "cpu");
    let err = s.forward(&batch4()).unwrap_err().to_string();
    assert!(err.contains("--micro-batches 3"), "{err}");
    let mut b = batch4();
    b.input_ids.truncate(2);
    b.attention_mask.as_mut().unwrap().truncate(2);
    let err = s.forward(&b).unwrap_err().to_string();
    assert!(err.contains("--micro-batches 3"), "{err}");
}

/// A stage that fails before its first message.
struct Failing;

impl transfuse::runtime::Loaded for Failing {
    fn run(
        &mut self,
        _: &transfuse::runtime::TensorMap,
        _: &[(String, String)],
    ) -> Result<transfuse::runtime::TensorMap, transfuse::runtime::RuntimeError> {
        Err(transfuse::runtime::RuntimeError::MissingInput(
            "injected-failure".into(),
        ))
    }
    fn clear_carry(&mut self) {}
    fn profile(
        &mut self,
        _: &transfuse::runtime::TensorMap,
    ) -> Result<Vec<transfuse::runtime::KernelTime>, transfuse::runtime::RuntimeError> {
        Err(transfuse::runtime::RuntimeError::MissingInput(
            "injected-failure".into(),
        ))
    }
}

/// Each stage of a real 2-stage cut in turn replaced by one that fails: the other stage (waiting
/// in a `recv` with a 600 s timeout, or sending) ends with the failing stage's error at once,
/// and the group is reset for the next call.
#[test]
fn a_failing_stage_ends_every_stage_with_its_error() {
    use std::collections::HashMap;
    use std::time::Duration;
    use transfuse::runtime::comm::InProcessGroup;
    use transfuse::runtime::pp::{PpLoaded, PpStage};
    use transfuse::runtime::{Backend, CpuBackend, Loaded, TensorMap};
    let model = Model::load(&dir("tiny_gpt2")).unwrap();
    let (g, _) = transfuse::passes::optimize(&model.graph, &opts()).unwrap();
    let p = transfuse::passes::pipeline::cut(&g, 2, &transfuse::passes::Profile::cpu()).unwrap();
    let s0 = Session::cpu(Model::load(&dir("tiny_gpt2")).unwrap()).unwrap();
    let b = Batch::new(vec![vec![1, 2, 3]]);
    let mut inputs: TensorMap = HashMap::new();
    inputs.insert("input_ids".into(), Tensor::i64(vec![1, 3], vec![1, 2, 3]));
    inputs.insert("attention_mask".into(), Tensor::i64(vec![1, 3], vec![1; 3]));
    let c = model.config.cache_shape().unwrap();
    for i in 0..c.layers {
        for n in [
            transfuse::models::gpt2::past_key(i),
            transfuse::models::gpt2::past_value(i),
        ] {
            inputs.insert(n, Tensor::f32(vec![1, c.kv_heads, 0, c.head_dim], vec![]));
        }
    }
    let want = s0.forward(&b).unwrap();
    for failing in 0..2 {
        let comms = InProcessGroup::ranks(2, Duration::from_secs(600));
        let stages: Vec<PpStage> = p
            .stages
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let loaded: Box<dyn Loaded> = match i == failing {
                    true => Box::new(Failing),
                    false => {
                        let (graph, w) =
                            transfuse::runtime::fold_weights(&st.graph, &model.weights).unwrap();
                        CpuBackend::new().load(&graph, &w).unwrap()
                    }
                };
                PpStage {
                    loaded,
                    recv: st.recv.clone(),
                    send: st.send.clone(),
                }
            })
            .collect();
        let mut pl = PpLoaded::new(stages, comms.clone(), 1, HashMap::new());
        let err = pl.run(&inputs, &[]).unwrap_err();
        assert!(
            err.to_string().contains("injected-failure"),
            "stage {failing}: {err}"
        );
        assert!(comms[0].poisoned().is_none(), "reset after the call");
        let err = pl.run(&inputs, &[]).unwrap_err();
        assert!(
            err.to_string().contains("injected-failure"),
            "stage {failing}: {err}"
        );
    }
    // The same cut with working stages gives the whole graph's logits.
    let comms = InProcessGroup::ranks(2, Duration::from_secs(600));
    let stages: Vec<PpStage> = p
        .stages
        .iter()
        .map(|st| {
            let (graph, w) = transfuse::runtime::fold_weights(&st.graph, &model.weights).unwrap();
            PpStage {
                loaded: CpuBackend::new().load(&graph, &w).unwrap(),
                recv: st.recv.clone(),
                send: st.send.clone(),
            }
        })
        .collect();
    let mut pl = PpLoaded::new(stages, comms, 1, HashMap::new());
    let got = pl.run(&inputs, &[]).unwrap();
    common::assert_close_rel(
        "direct pp 2 logits",
        &got["logits"],
        &want["logits"],
        None,
        1e-5,
    );
}

/// wgpu stages, each its own device: the CPU cases' matrix (PP 2 with 1–4 micro-batches on
/// tiny GPT-2 and tiny BERT, MiniLM at PP 2 and 3, the 8-layer GPT-2 at PP 4 with greedy
/// tokens) and PP 2 greedy on tiny GPT-2, within 1e-3 of the CPU reference.
#[test]
fn wgpu_stages_equal_pp1() {
    if common::wgpu_backend().is_none() {
        return;
    }
    pp2_micro_batches("wgpu", 1e-3);
    minilm_pp2_pp3("wgpu", 1e-3);
    gpt2_8_layers_pp4("wgpu", 1e-3);
    let d = dir("tiny_gpt2");
    let want = Session::cpu(Model::load(&d).unwrap())
        .unwrap()
        .generate(&[1, 2, 3, 4], 6, Sampling::Greedy)
        .unwrap();
    let got = pp_session(&d, 2, 1, 1, "wgpu")
        .generate(&[1, 2, 3, 4], 6, Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want, "wgpu pp 2 greedy tokens");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_transfuse"))
        .args(args)
        .output()
        .unwrap()
}

/// `run --pp 2 --micro-batches 2` writes the outputs PP 1 writes (within 1e-5), `compile --pp 2
/// --report` prints the cut, and bad degrees exit 2 naming the flag.
#[test]
fn cli_pp_run_compile_report_and_bad_degrees() {
    let tmp = std::env::temp_dir().join(format!("transfuse-pp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let inputs = tmp.join("inputs.json");
    std::fs::write(
        &inputs,
        r#"{"input_ids": [[5, 17, 42], [11, 2, 250]], "attention_mask": [[1, 1, 1], [1, 1, 0]]}"#,
    )
    .unwrap();
    let m = dir("tiny_gpt2");
    let m = m.to_str().unwrap();
    let i = inputs.to_str().unwrap();
    let mut outs = Vec::new();
    for (name, extra) in [
        ("pp1", &[][..]),
        ("pp2", &["--pp", "2", "--micro-batches", "2"][..]),
    ] {
        let out = tmp.join(format!("{name}.safetensors"));
        let mut args = vec!["run", "--model", m, "--inputs", i, "--backend", "cpu"];
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = cli(&args);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let w = transfuse::models::load_all_safetensors(&out).unwrap();
        outs.push(w["logits"].clone());
    }
    let mask = vec![vec![1, 1, 1], vec![1, 1, 0]];
    common::assert_close_rel("cli pp 2 logits", &outs[1], &outs[0], Some(&mask), 1e-5);
    let o = cli(&["compile", "--model", m, "--pp", "2", "--report"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("pipeline parallel: 2 stages over 2 layers")
            && text.contains("stage 0: layers 0..1")
            && text.contains("stage 1: layers 1..2"),
        "{text}"
    );
    for (args, flag) in [
        (vec!["--pp", "3"], "--pp 3"),
        (
            vec!["--pp", "2", "--micro-batches", "3"],
            "--micro-batches 3",
        ),
    ] {
        let mut a = vec!["run", "--model", m, "--inputs", i, "--backend", "cpu"];
        let out = tmp.join("bad.safetensors");
        a.extend_from_slice(&["--out", out.to_str().unwrap()]);
        a.extend_from_slice(&args);
        let o = cli(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(flag) && err.lines().count() == 1, "{err}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// TP 2 on wgpu ranks (each its own device, collectives on the host between the devices'
/// segments) equals TP 1 within 1e-3 for tiny GPT-2 and tiny LLaMA, greedy tokens exact; PP 2 ×
/// TP 2 on wgpu ranks likewise.
#[test]
fn wgpu_tp2_ranks_equal_tp1() {
    if common::wgpu_backend().is_none() {
        return;
    }
    // The layouts: Megatron's all-reduces (the bias and residual after them, or before them
    // in the row-parallel matmuls' epilogues on rank 0), and Megatron-SP's reduce-scatters
    // and all-gathers around the norms (its padding of the sequence in the device segments).
    use transfuse::passes::place::TpLayout;
    for (name, layout) in [
        ("tiny_gpt2", TpLayout::Megatron),
        ("tiny_llama", TpLayout::Megatron),
        ("tiny_gpt2", TpLayout::MegatronFused),
        ("tiny_llama", TpLayout::MegatronFused),
        ("tiny_gpt2", TpLayout::MegatronSp),
        ("tiny_llama", TpLayout::MegatronSp),
    ] {
        let d = dir(name);
        let mut b = batch4();
        b.input_ids.truncate(2);
        b.attention_mask.as_mut().unwrap().truncate(2);
        let want = reference(&d, &b);
        let model = Model::load_without_weights(&d, None, false).unwrap();
        let o = transfuse::passes::Options {
            tp_layout: layout,
            ..opts()
        };
        let s = Session::wgpu_tp(model, 2, &o).unwrap();
        assert_eq!(s.backend_name(), "wgpu");
        let name = format!("{name} {}", layout.name());
        let sp = s.tp.as_ref().unwrap().sharded.graph.op_counts();
        assert_eq!(
            sp.contains_key("reduce_scatter"),
            layout == TpLayout::MegatronSp,
            "{name}"
        );
        check(&format!("{name} wgpu tp 2"), &want, &s, &b, 1e-3);
        let want = Session::cpu(Model::load(&d).unwrap())
            .unwrap()
            .generate(&[1, 2, 3, 4], 3, Sampling::Greedy)
            .unwrap();
        let got = s.generate(&[1, 2, 3, 4], 3, Sampling::Greedy).unwrap();
        assert_eq!(got, want, "{name} wgpu tp 2 greedy tokens");
    }
    // PP 2 × TP 2 on wgpu: four ranks, each its own device.
    let d = dir("tiny_gpt2");
    let mut b = batch4();
    b.input_ids.truncate(2);
    b.attention_mask.as_mut().unwrap().truncate(2);
    let want = reference(&d, &b);
    let s = pp_session(&d, 2, 2, 2, "wgpu");
    check("tiny_gpt2 wgpu pp 2 × tp 2", &want, &s, &b, 1e-3);
}
