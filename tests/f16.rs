//! f16/bf16 models end to end: the float tensors of a whole model stored as f16 (WebGPU, CUDA)
//! or bf16 (CUDA) on the device, weights converted once at load, kernels accumulating in f32,
//! held to the CPU backend's f32 reference; the resident weight bytes halve; bf16 plans of
//! whole models compile with NVRTC; the CLI's `--dtype` and its errors.
//!
//! ## Tolerances, from f16 precision
//!
//! f16 keeps 11 significant bits: a value `x` is stored as `x(1 + δ)` with `|δ| ≤ u = 2⁻¹¹ ≈
//! 4.9e-4` (bf16: 8 bits, `u = 2⁻⁸ ≈ 3.9e-3`). Every tensor the plan stores — each weight, each
//! activation between kernels — carries one such rounding; inside a kernel the arithmetic is f32
//! (its own rounding, 2⁻²⁴, is negligible here). A logit is a dot product of the final
//! hidden state with a row of the (f16) embedding table; each of its inputs is the end of a
//! chain of stored tensors: per layer the normalised input, Q/K/V, the attention output, the
//! projection, the normalised residual, the MLP hidden and its activation, the MLP output and
//! the residual sum (≈ 10 stores), and the weight of each matmul on the way (≈ 6). Relative
//! errors add along a chain to first order, so for the 2-layer fixtures a logit's error is at
//! most about `(2·16 + 4)·u ≈ 36u` of the scale of the terms it sums, which we bound by the
//! largest f32 logit magnitude, `L = max|logit|`; normalisation (layer/RMS norm divides by a
//! norm computed from the same rounded values) does not amplify relative errors. The tolerance
//! is therefore `TOL = 36·u·max(L, 1)` absolute (≈ 1.8e-2·L in f16): a bound from the storage
//! precision and the depth, not a fit to the measured error, which is printed and sits well
//! below it.
//!
//! Greedy decoding: if every logit is within `TOL` of f32's, the arg-max can only change at a
//! step where f32's top-2 gap is at most `2·TOL` (each of the two logits moves by up to `TOL`).
//! So the f16 tokens must equal f32's up to the first step whose f32 gap is within `2·TOL`;
//! a differing token is accepted only at such a step (after it the two sequences have different
//! prefixes and are not compared).
//!
//! Embeddings: MiniLM's L2-normalised mean-pooled embeddings (6 layers) in f16 must have cosine
//! similarity ≥ 0.9999 to f32's (the issue's bound): an angle of ≈ 1.4e-2 rad, ≈ 29u.

mod common;

use common::cli::{assert_error, assert_ok, s, transfuse_env, GPT2};
use common::{fixture, minilm_dir, minilm_sentences, outputs_of, rows};
use transfuse::codegen::kir::Elem;
use transfuse::codegen::lower::{lower, LowerOptions, Target};
use transfuse::ir::{DType, Data, Tensor};
use transfuse::models::{Model, Pooling};
use transfuse::runtime::{nvrtc, Backend};
use transfuse::{Batch, Sampling, Session};

/// Unit roundoff of a storage type.
fn unit_roundoff(e: Elem) -> f32 {
    match e {
        Elem::F16 => 2f32.powi(-11),
        Elem::BF16 => 2f32.powi(-8),
        _ => 2f32.powi(-24),
    }
}

/// Stored tensors on a logit's longest chain for a `layers`-layer decoder (see the module docs).
fn roundings(layers: usize) -> f32 {
    (16 * layers + 4) as f32
}

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn device_session(model: Model, backend: Box<dyn Backend>, e: Elem) -> Session {
    let opts = transfuse::passes::Options::default();
    let s = Session::with_storage(model, backend, Some(&opts), e).unwrap();
    eprintln!("{:?} on {}", e, s.backend_description());
    s
}

fn load(fixture_dir: &str) -> Model {
    Model::load(&fixture(fixture_dir)).unwrap()
}

/// The model with its weights held on the host in `e`'s type, as the CLI loads it for a
/// device storing `e` (an f32 checkpoint rounded once at load).
fn load_for(fixture_dir: &str, e: Elem) -> Model {
    let dir = fixture(fixture_dir);
    Model::load_as(&dir, None, false, transfuse::host_float(e)).unwrap()
}

/// The logit tolerance of `e` for a decoder of `layers` layers whose f32 logits are `want`.
fn logit_tol(e: Elem, layers: usize, want: &[f32]) -> f32 {
    roundings(layers) * unit_roundoff(e) * max_abs(want).max(1.0)
}

/// Logits of `ids` in storage `e` on `backend` against the CPU's f32, within [`logit_tol`];
/// returns the tolerance.
fn check_logits(name: &str, dev: &Session, cpu: &Session, e: Elem, ids: &[Vec<i64>]) -> f32 {
    let batch = Batch::new(ids.to_vec());
    let want = cpu.forward(&batch).unwrap().remove("logits").unwrap();
    let got = dev.forward(&batch).unwrap().remove("logits").unwrap();
    assert_eq!(got.shape, want.shape, "{name}: logits shape");
    let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
    let layers = cpu.model.config.cache_shape().map_or(1, |c| c.layers);
    let tol = logit_tol(e, layers, w);
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        let d = (a - b).abs();
        assert!(
            d <= tol,
            "{name} {e:?} logits[{i}]: {a} vs f32 {b} (|diff| {d} > {tol})"
        );
        worst = worst.max(d);
    }
    eprintln!(
        "{name} {e:?}: max |logit − f32| {worst:.3e} over {} (tol {tol:.3e} = {} u · max|logit| {:.3})",
        g.len(),
        roundings(layers),
        max_abs(w)
    );
    tol
}

/// Greedy tokens in storage `e` equal f32's wherever f32's top-2 gap exceeds `2·tol`.
fn check_greedy(name: &str, dev: &Session, cpu: &Session, prompt: &[i64], new: usize, tol: f32) {
    let want = cpu.generate(prompt, new, Sampling::Greedy).unwrap();
    let got = dev.generate(prompt, new, Sampling::Greedy).unwrap();
    assert_eq!(&got[..prompt.len()], prompt, "{name}: the prompt is kept");
    let Some(i) = (prompt.len()..want.len()).find(|&i| got[i] != want[i]) else {
        eprintln!("{name}: {new} greedy tokens equal f32's");
        return;
    };
    // f32's logits for the step that differs: the last position over the common prefix.
    let out = cpu.forward(&Batch::new(vec![want[..i].to_vec()])).unwrap();
    let l = &out["logits"];
    let v = l.shape[2];
    let last = &l.as_f32().unwrap()[(i - 1) * v..i * v];
    let mut sorted = last.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let gap = sorted[0] - sorted[1];
    assert!(
        gap <= 2.0 * tol,
        "{name}: token {i} is {} in f16 but {} in f32, whose top-2 gap {gap} exceeds 2·tol {}",
        got[i],
        want[i],
        2.0 * tol
    );
    eprintln!(
        "{name}: tokens equal up to {i}; there f32's top-2 gap {gap:.3e} ≤ 2·tol, so it may differ"
    );
}

fn gpt2_matches_f32(backend: Box<dyn Backend>, e: Elem) {
    let refs = outputs_of("tiny_gpt2");
    let dev = device_session(load_for("tiny_gpt2/model", e), backend, e);
    let cpu = Session::cpu(load("tiny_gpt2/model")).unwrap();
    let tol = check_logits("tiny_gpt2", &dev, &cpu, e, &rows(&refs["input_ids"]));
    let greedy = rows(&refs["greedy_ids"]).remove(0);
    let prompt = rows(&refs["input_ids"]).remove(0);
    check_greedy(
        "tiny_gpt2",
        &dev,
        &cpu,
        &prompt,
        greedy.len() - prompt.len(),
        tol,
    );
}

/// The fixture's prompt for greedy decoding (`inputs.json`).
fn prompt_of(name: &str) -> Vec<i64> {
    let text = std::fs::read_to_string(fixture(&format!("{name}/inputs.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["prompt"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn llama_matches_f32(backend: Box<dyn Backend>, e: Elem) {
    let refs = outputs_of("tiny_llama");
    let dev = device_session(load_for("tiny_llama/model", e), backend, e);
    let cpu = Session::cpu(load("tiny_llama/model")).unwrap();
    let tol = check_logits("tiny_llama", &dev, &cpu, e, &rows(&refs["input_ids"]));
    let greedy = rows(&refs["greedy_ids"]).remove(0);
    let prompt = prompt_of("tiny_llama");
    check_greedy(
        "tiny_llama",
        &dev,
        &cpu,
        &prompt,
        greedy.len() - prompt.len(),
        tol,
    );
}

fn minilm_embeddings_match_f32(backend: Box<dyn Backend>, e: Elem) {
    let Some(dir) = minilm_dir() else { return };
    let sentences = minilm_sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let model = |f| Model::load_as(&dir, Some(Pooling::Mean), true, f).unwrap();
    let dev = device_session(model(transfuse::host_float(e)), backend, e);
    let cpu = Session::cpu(model(DType::F32)).unwrap();
    let (got, want) = (dev.embed(&texts).unwrap(), cpu.embed(&texts).unwrap());
    assert_eq!(got.shape, want.shape);
    let hidden = want.shape[1];
    let rows = got
        .as_f32()
        .unwrap()
        .chunks(hidden)
        .zip(want.as_f32().unwrap().chunks(hidden));
    let mut worst = 1f64;
    for (i, (a, b)) in rows.enumerate() {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(
            cos >= 0.9999,
            "MiniLM {e:?}: sentence {i} ({:?}) has cosine {cos} to f32 (< 0.9999)",
            texts[i]
        );
        worst = worst.min(cos);
    }
    eprintln!(
        "MiniLM {e:?}: lowest cosine to f32 {worst:.7} over {} sentences",
        texts.len()
    );
}

/// Resident bytes (weights, derived weights, constants) of `dir` stored as `e` after one run.
fn resident(dir: &str, backend: Box<dyn Backend>, e: Elem) -> u64 {
    let s = device_session(load_for(dir, e), backend, e);
    s.forward(&Batch::new(vec![vec![1, 2, 3]])).unwrap();
    s.memory()
        .expect("device backends report memory")
        .persistent
}

fn resident_weight_bytes_halve(make: &dyn Fn() -> Box<dyn Backend>, e: Elem) {
    for dir in ["tiny_gpt2/model", "tiny_llama/model"] {
        let (full, half) = (resident(dir, make(), Elem::F32), resident(dir, make(), e));
        eprintln!("{dir}: resident {full} B in f32, {half} B in {e:?}");
        assert!(full > 0);
        assert_eq!(
            2 * half,
            full,
            "{dir}: {e:?} resident bytes are not half of f32's"
        );
    }
}

mod wgpu {
    use super::*;

    fn f16_backend() -> Option<Box<dyn Backend>> {
        let b = common::wgpu_backend()?;
        if !b.storage_types().contains(&Elem::F16) {
            assert!(
                !common::required("wgpu"),
                "the wgpu adapter ({}) lacks shader-f16",
                b.description()
            );
            eprintln!("skipping: the wgpu adapter lacks shader-f16");
            return None;
        }
        Some(Box::new(b))
    }

    #[test]
    fn tiny_gpt2_f16_logits_and_greedy_match_f32() {
        if let Some(b) = f16_backend() {
            gpt2_matches_f32(b, Elem::F16);
        }
    }

    #[test]
    fn tiny_llama_f16_logits_and_greedy_match_f32() {
        if let Some(b) = f16_backend() {
            llama_matches_f32(b, Elem::F16);
        }
    }

    #[test]
    fn minilm_f16_embeddings_cosine_to_f32() {
        if let Some(b) = f16_backend() {
            minilm_embeddings_match_f32(b, Elem::F16);
        }
    }

    #[test]
    fn f16_resident_weight_bytes_are_half_of_f32() {
        if f16_backend().is_some() {
            resident_weight_bytes_halve(&|| f16_backend().unwrap(), Elem::F16);
        }
    }

    #[test]
    fn bf16_is_refused_naming_the_backend_and_the_type() {
        let Some(b) = common::wgpu_backend() else {
            return;
        };
        let e = Session::with_storage(load("tiny_gpt2/model"), Box::new(b), None, Elem::BF16)
            .err()
            .expect("WGSL has no bf16");
        let msg = e.to_string();
        assert!(
            msg.contains("--dtype bf16") && msg.contains("wgpu") && msg.contains("no bf16"),
            "{msg}"
        );
    }
}

mod cuda {
    use super::*;

    fn backend() -> Option<Box<dyn Backend>> {
        common::cuda_backend().map(|b| Box::new(b) as Box<dyn Backend>)
    }

    #[test]
    fn tiny_gpt2_f16_and_bf16_match_f32() {
        for e in [Elem::F16, Elem::BF16] {
            if let Some(b) = backend() {
                gpt2_matches_f32(b, e);
            }
        }
    }

    #[test]
    fn tiny_llama_f16_and_bf16_match_f32() {
        for e in [Elem::F16, Elem::BF16] {
            if let Some(b) = backend() {
                llama_matches_f32(b, e);
            }
        }
    }

    #[test]
    fn minilm_f16_and_bf16_embeddings_cosine_to_f32() {
        for e in [Elem::F16, Elem::BF16] {
            if let Some(b) = backend() {
                minilm_embeddings_match_f32(b, e);
            }
        }
    }

    #[test]
    fn f16_and_bf16_resident_weight_bytes_are_half_of_f32() {
        for e in [Elem::F16, Elem::BF16] {
            if backend().is_some() {
                resident_weight_bytes_halve(&|| backend().unwrap(), e);
            }
        }
    }
}

/// Every kernel of the bf16 plans of whole models (tiny GPT-2, tiny LLaMA, tiny BERT; decode
/// variants included) compiles with NVRTC for compute_80 and compute_90, no GPU needed.
#[test]
fn bf16_model_plans_compile_with_nvrtc() {
    match nvrtc::available() {
        Ok(()) => {}
        Err(e) if common::required("nvrtc") => panic!("TRANSFUSE_REQUIRE names nvrtc: {e}"),
        Err(e) => return eprintln!("skipping: {e}"),
    }
    if nvrtc::cuda_include_dir().is_none() {
        assert!(
            !common::required("nvrtc"),
            "CUDA headers missing (TRANSFUSE_CUDA_INCLUDE): bf16 needs cuda_bf16.h"
        );
        return eprintln!("skipping: no CUDA headers for cuda_bf16.h");
    }
    let opts = transfuse::passes::Options::default();
    for dir in ["tiny_gpt2/model", "tiny_llama/model", "tiny_bert/model"] {
        let (graph, _, _) = Session::graph_for(&load(dir), Some(&opts), "gpu").unwrap();
        let plan = lower(&graph, &LowerOptions::new(Target::Cuda, Elem::BF16)).unwrap();
        let mut n = 0;
        for k in &plan.kernels {
            let variants = std::iter::once(&k.gen).chain(k.decode.as_deref().map(|d| &d.gen));
            for g in variants {
                let src = transfuse::codegen::cuda::print(&g.kernel).unwrap();
                assert!(src.contains("bf16"), "{dir}: {} is not bf16", g.kernel.name);
                for arch in ["compute_80", "compute_90"] {
                    if let Err(e) = nvrtc::compile_ptx(&src, &g.kernel.name, arch, &[]) {
                        panic!("{dir}: {} for {arch}: {e}\n{src}", g.kernel.name);
                    }
                }
                n += 1;
            }
        }
        eprintln!("{dir}: {n} bf16 kernels compiled with NVRTC");
        assert!(n > 0);
    }
}

#[test]
fn cli_dtype_runs_and_reports_resident_bytes() {
    let Some(b) = common::wgpu_backend() else {
        return;
    };
    if !b.storage_types().contains(&Elem::F16) {
        return eprintln!("skipping: the wgpu adapter lacks shader-f16");
    }
    let model = s(&fixture(GPT2));
    let env = [("WGPU_BACKEND", "vulkan")];
    let mut resident = vec![];
    for dtype in ["f32", "f16"] {
        let out = transfuse_env(
            [
                "generate",
                "--model",
                &model,
                "--prompt-ids",
                "1,2,3",
                "--max-new-tokens",
                "2",
                "--backend",
                "wgpu",
                "--dtype",
                dtype,
                "-v",
            ],
            &env,
        );
        assert_ok(&out);
        let err = common::cli::stderr_of(&out);
        let line = err
            .lines()
            .find(|l| l.starts_with("memory: resident "))
            .unwrap_or_else(|| panic!("no memory line:\n{err}"));
        assert!(line.contains(&format!("({dtype} storage)")), "{line}");
        let bytes: u64 = line["memory: resident ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        resident.push(bytes);
    }
    assert_eq!(
        resident[1] * 2,
        resident[0],
        "f16 resident bytes: {resident:?}"
    );
}

#[test]
fn cli_dtype_errors_exit_2_with_one_line() {
    let model = s(&fixture(GPT2));
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "1",
        ];
        args.extend_from_slice(extra);
        transfuse_env(args, &[("WGPU_BACKEND", "vulkan")])
    };
    assert_error(
        &gen(&["--dtype", "f8"]),
        &["--dtype", "f8", "f32, f16 or bf16"],
    );
    assert_error(
        &gen(&["--backend", "cpu", "--dtype", "f16"]),
        &["--dtype f16", "cpu", "f32 only"],
    );
    assert_error(
        &gen(&["--tp", "2", "--backend", "cpu", "--dtype", "bf16"]),
        &["--dtype bf16", "--tp"],
    );
    if common::wgpu_backend().is_some() {
        assert_error(
            &gen(&["--backend", "wgpu", "--dtype", "bf16"]),
            &["--dtype bf16", "wgpu", "no bf16"],
        );
    }
    // run, embed and bench model take the flag too.
    let bert = s(&fixture(common::cli::BERT));
    let out = transfuse_env(
        [
            "embed",
            "--model",
            &bert,
            "--text",
            "hi",
            "--backend",
            "cpu",
            "--dtype",
            "bf16",
        ],
        &[],
    );
    assert_error(&out, &["--dtype bf16", "cpu"]);
    let out = transfuse_env(
        [
            "bench",
            "model",
            "--model",
            &model,
            "--backend",
            "cpu",
            "--dtype",
            "x",
        ],
        &[],
    );
    assert_error(&out, &["--dtype", "x"]);
    let dir = common::cli::TempDir::new("dtype_errors");
    let inputs = dir.write("inputs.json", r#"{"input_ids": [[1, 2, 3]]}"#);
    let out = transfuse_env(
        [
            "run",
            "--model",
            &model,
            "--inputs",
            &s(&inputs),
            "--out",
            &s(&dir.join("out.safetensors")),
            "--backend",
            "cpu",
            "--dtype",
            "f16",
        ],
        &[],
    );
    assert_error(&out, &["--dtype f16", "cpu"]);
}

/// The host copy: `Model::load_as` keeps an f16 checkpoint's bits (never widened) and rounds an
/// f32 checkpoint once to the same values; its float weights take half the bytes of f32's.
/// The CPU backend, given such weights, widens them: the same logits as the f32 load of the
/// f16 checkpoint, bit for bit.
#[test]
fn f16_checkpoints_stay_f16_on_the_host_and_the_cpu_widens_them() {
    let src = fixture("tiny_gpt2/model");
    let tmp = common::cli::TempDir::new("f16_checkpoint");
    let dir = tmp.copy_model(GPT2, "model");
    // An f16 checkpoint: every tensor of the fixture rounded to f16.
    let all = transfuse::models::load_all_safetensors(&src.join("model.safetensors")).unwrap();
    let halves: Vec<(String, Tensor)> = all
        .iter()
        .map(|(n, t)| {
            let v = t.as_f32().expect("float checkpoint");
            let h = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (n.clone(), Tensor::f16(t.shape.clone(), h))
        })
        .collect();
    let named: Vec<(&str, &Tensor)> = halves.iter().map(|(n, t)| (n.as_str(), t)).collect();
    transfuse::write_safetensors(&dir.join("model.safetensors"), &named).unwrap();

    let f16_ckpt = Model::load_as(&dir, None, false, DType::F16).unwrap();
    let f32_ckpt = Model::load_as(&src, None, false, DType::F16).unwrap();
    let bytes = |m: &Model| -> (usize, usize) {
        m.weights.values().fold((0, 0), |(h, f), t| match &t.data {
            Data::F16(_) => (h + 2 * t.len(), f + 4 * t.len()),
            _ => (h + t.len() * t.elem_bytes(), f + t.len() * t.elem_bytes()),
        })
    };
    for (name, t) in &f16_ckpt.weights {
        let Data::F16(got) = &t.data else {
            // Only the synthesized weights are f32 (none for GPT-2).
            panic!("`{name}` is {} on the host, not f16", t.dtype())
        };
        let want = halves
            .iter()
            .find(|(n, _)| n == name || n.ends_with(&format!(".{name}")));
        if let Some((
            _,
            Tensor {
                data: Data::F16(w), ..
            },
        )) = want
        {
            assert_eq!(got, w, "`{name}`: the checkpoint's f16 bits");
        }
        assert_eq!(
            t.data, f32_ckpt.weights[name].data,
            "`{name}`: rounded once at load"
        );
    }
    let (held, as_f32) = bytes(&f16_ckpt);
    eprintln!("tiny GPT-2 on the host: {held} B as f16, {as_f32} B as f32");
    assert_eq!(2 * held, as_f32);

    let batch = Batch::new(vec![vec![5, 7, 11, 13]]);
    let widened = Session::cpu(Model::load(&dir).unwrap()).unwrap();
    let kept = Session::cpu(f16_ckpt).unwrap();
    let (a, b) = (
        widened.forward(&batch).unwrap().remove("logits").unwrap(),
        kept.forward(&batch).unwrap().remove("logits").unwrap(),
    );
    assert_eq!(
        a, b,
        "the CPU widens f16 weights exactly as the loader does"
    );
}

/// f16/bf16 are host tensor types: a graph that declares or casts to one is refused at
/// insertion with an error naming the type (the storage type is a lowering option instead).
#[test]
fn graphs_refuse_f16_and_bf16_tensors() {
    use transfuse::ir::{Builder, Dim};
    for d in [DType::F16, DType::BF16] {
        let mut b = Builder::new();
        let e = b.input("x", vec![Dim::from(2)], d).unwrap_err();
        assert!(e.to_string().contains(d.name()), "{e}");
        let x = b.input("y", vec![Dim::from(2)], DType::F32).unwrap();
        let e = b.cast(x, d).unwrap_err();
        assert!(e.to_string().contains("lower with that storage"), "{e}");
    }
}
