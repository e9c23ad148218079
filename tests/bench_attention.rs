//! `transfuse bench attention`: every case kind on cpu and wgpu is within the stated tolerance
//! of the f64 reference (through the library, small sizes, one timed run — no timing is
//! asserted), the JSON lines carry every field, and bad arguments are one-line errors.

mod common;

use common::cli::{assert_error, assert_ok, transfuse, TempDir};
use transfuse::attention_bench::{
    run_case, tolerance, AttnConfig, MaskKind, Outcome, Point, Variant,
};
use transfuse::codegen::kir::Elem;
use transfuse::runtime::{Backend, CpuBackend};

fn cfg(mask: MaskKind) -> AttnConfig {
    AttnConfig {
        batch: 2,
        heads: 4,
        kv_heads: 4,
        head_dim: 32,
        mask,
        window: 0,
        lengths: vec![],
        dtype: Elem::F32,
    }
}

/// The matrix the issue names: every mask kind, GQA 4/2 and MQA 4/1, decode with past 0/1/37,
/// head dims 32/64/128 (odd sequence lengths, so no tile divides them).
fn cases() -> Vec<(AttnConfig, Point)> {
    let mut v = vec![];
    for mask in [MaskKind::Causal, MaskKind::None] {
        v.push((cfg(mask), Point::Prefill(33)));
    }
    let mut pad = cfg(MaskKind::Padding);
    pad.lengths = vec![20, 33];
    v.push((pad, Point::Prefill(33)));
    let mut pad1 = cfg(MaskKind::Padding);
    pad1.lengths = vec![0]; // fully masked rows: uniform weights, as the f64 reference says
    v.push((pad1, Point::Prefill(5)));
    let mut win = cfg(MaskKind::Window);
    win.window = 8;
    v.push((win, Point::Prefill(33)));
    for kv in [2, 1] {
        let mut g = cfg(MaskKind::Causal);
        g.kv_heads = kv;
        v.push((g, Point::Prefill(17)));
    }
    for past in [0, 1, 37] {
        v.push((cfg(MaskKind::Causal), Point::Decode(past)));
    }
    let mut gd = cfg(MaskKind::Padding);
    gd.kv_heads = 2;
    v.push((gd, Point::Decode(37)));
    for d in [64, 128] {
        let mut c = cfg(MaskKind::Causal);
        c.head_dim = d;
        c.batch = 1;
        v.push((c, Point::Prefill(19)));
    }
    v
}

/// Runs every case in every variant; every one — GQA/MQA (fused: k/v read per key/value head)
/// and the sliding window included — must be timed within tolerance. Returns how many were
/// checked.
fn check_all(backend: &dyn Backend, dtype: Elem) -> usize {
    let mut checked = 0;
    for (mut c, p) in cases() {
        c.dtype = dtype;
        for v in [Variant::Fused, Variant::Unfused, Variant::Primitive] {
            let what = format!("{} {} on {}", c.case_name(p), v.name(), backend.name());
            match run_case(backend, &c, p, v, 0, 1).unwrap() {
                Outcome::Timed(t) => {
                    assert!(
                        t.max_abs_diff <= tolerance(dtype),
                        "{what}: {} > {}",
                        t.max_abs_diff,
                        tolerance(dtype)
                    );
                    let clocks: &[&str] = match backend.name() {
                        "cpu" => &["host"],
                        _ => &["device", "host-sync"],
                    };
                    assert!(clocks.contains(&t.clock), "{what}: clock {}", t.clock);
                    eprintln!(
                        "{what}: max abs diff {:.2e} ({} clock)",
                        t.max_abs_diff, t.clock
                    );
                    checked += 1;
                }
                // Known and reported, not hidden: the primitive graph stores `score + (1 − m)·
                // f32::MIN` in half precision, where it overflows to −inf, so a fully masked
                // row is −inf − (−inf) = NaN. The fused softmax and attention kernels read an
                // f16 −inf as f32::MIN (uniform weights, as the f64 reference says); the
                // primitive reduce/exp chain has no such reading. The bench prints `error:`.
                Outcome::Wrong { max_abs_diff, .. }
                    if v == Variant::Primitive
                        && dtype != Elem::F32
                        && c.lengths == [0]
                        && max_abs_diff.is_infinite() =>
                {
                    eprintln!("{what}: error (f16 overflow of the primitive mask, expected)");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }
    checked
}

#[test]
fn every_case_matches_the_f64_reference_on_cpu() {
    let n = check_all(&CpuBackend::new(), Elem::F32);
    assert!(n >= 30, "only {n} cases timed");
}

#[test]
fn every_case_matches_the_f64_reference_on_wgpu() {
    let Some(b) = common::wgpu_backend() else {
        return;
    };
    let n = check_all(&b, Elem::F32);
    assert!(n >= 30, "only {n} cases timed");
}

#[test]
fn every_case_matches_the_f64_reference_on_wgpu_in_f16() {
    let Some(b) = common::wgpu_backend() else {
        return;
    };
    if !b.storage_types().contains(&Elem::F16) {
        assert!(
            !common::required("wgpu"),
            "the wgpu adapter offers no f16 (lavapipe does)"
        );
        eprintln!("skipping: adapter without SHADER_F16");
        return;
    }
    let n = check_all(&b, Elem::F16);
    assert!(n >= 30, "only {n} cases timed");
}

#[test]
fn a_wrong_result_reports_an_error_not_a_time() {
    // A tolerance check that cannot fail would be worthless: a perturbed output must trip it.
    let c = cfg(MaskKind::Causal);
    let p = Point::Prefill(9);
    let inp = transfuse::attention_bench::inputs(&c, p);
    let g = transfuse::attention_bench::graph(&c).unwrap();
    let mut out = CpuBackend::new()
        .run(&g, &Default::default(), &inp)
        .unwrap()
        .remove("out")
        .unwrap();
    let good = transfuse::attention_bench::max_abs_diff(&c, p, &inp, &out);
    assert!(good < 1e-6, "{good}");
    if let transfuse::ir::Data::F32(v) = &mut out.data {
        v[5] += 1e-3;
    }
    let bad = transfuse::attention_bench::max_abs_diff(&c, p, &inp, &out);
    assert!(bad > tolerance(Elem::F32), "{bad}");
}

#[test]
fn json_lines_carry_every_field() {
    let out = transfuse([
        "bench",
        "attention",
        "--backend",
        "cpu",
        "--seq",
        "16,31",
        "--heads",
        "2",
        "--head-dim",
        "32",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--variants",
        "fused,unfused,primitive",
        "--json",
    ]);
    let stdout = assert_ok(&out);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    for j in &lines {
        for f in [
            "system",
            "variant",
            "case",
            "median_ms",
            "min_ms",
            "max_ms",
            "runs",
            "first_call_ms",
            "tflops",
            "gbps",
            "max_abs_diff",
            "clock",
        ] {
            assert!(j.get(f).is_some_and(|v| !v.is_null()), "{f} missing: {j}");
        }
        assert_eq!(j["system"], "transfuse-cpu");
        assert_eq!(j["runs"], 2);
        assert!(j["max_abs_diff"].as_f64().unwrap() <= 1e-4, "{j}");
    }
    assert_eq!(lines[0]["case"], "causal_attn_b1_h2_s16_d32_f32");
    assert_eq!(lines[3]["case"], "causal_attn_b1_h2_s31_d32_f32");
    let fused = &lines[0];
    assert_eq!(fused["variant"], "fused");
    assert!(fused["speedup_vs_unfused"].as_f64().unwrap() > 0.0);
}

#[test]
fn csv_table_and_plot() {
    let tmp = TempDir::new("bench_attention_plot");
    let svg = tmp.join("attn.svg");
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "bench",
            "attention",
            "--backend",
            "cpu",
            "--seq",
            "8,16",
            "--heads",
            "2",
            "--head-dim",
            "32",
            "--iters",
            "1",
            "--warmup",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let csv = assert_ok(&transfuse(args(&["--csv"])));
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some(transfuse::attention_bench::CSV_HEADER));
    assert_eq!(lines.filter(|l| l.ends_with(",ok")).count(), 4, "{csv}");
    let table = assert_ok(&transfuse(args(&["--plot", svg.to_str().unwrap()])));
    assert!(table.contains("median ms"), "{table}");
    assert!(table.contains("clock: "), "{table}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("fused"), "{text}");
    let decode = assert_ok(&transfuse([
        "bench",
        "attention",
        "--backend",
        "cpu",
        "--decode",
        "--past",
        "0,5",
        "--heads",
        "2",
        "--head-dim",
        "32",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]));
    assert!(decode.contains("decode_attn_b1_h2_p5_d32_f32"), "{decode}");
}

/// `--kv-heads` below `--heads` runs the fused grouped-query attention (k/v read per key/value
/// head), checked against the f64 reference like every other case.
#[test]
fn kv_heads_run_fused_gqa() {
    let out = transfuse([
        "bench",
        "attention",
        "--backend",
        "cpu",
        "--seq",
        "8",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--head-dim",
        "32",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]);
    let stdout = assert_ok(&out);
    let fused = stdout
        .lines()
        .find(|l| l.contains("causal_attn_b1_h4_kv1_s8_d32_f32") && l.contains(" fused "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(!fused.contains("unsupported"), "{fused}");
    assert!(!fused.contains("error"), "{fused}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", "attention", "--backend", "cpu"];
        a.extend_from_slice(extra);
        transfuse(a)
    };
    assert_error(
        &bench(&["--heads", "12", "--kv-heads", "5"]),
        &["--kv-heads"],
    );
    assert_error(&bench(&["--head-dim", "48"]), &["--head-dim", "48"]);
    assert_error(
        &bench(&["--mask", "window", "--window", "0"]),
        &["--window"],
    );
    assert_error(&bench(&["--mask", "window"]), &["--window"]);
    assert_error(&bench(&["--seq", ""]), &["--seq"]);
    assert_error(&bench(&["--seq", "0,128"]), &["--seq"]);
    assert_error(&bench(&["--seq", "12x"]), &["--seq", "12x"]);
    assert_error(&bench(&["--decode", "--past", ""]), &["--past"]);
    assert_error(
        &bench(&["--mask", "padding", "--seq", "16", "--lengths", "17"]),
        &["--lengths", "17", "--seq 16"],
    );
    assert_error(&bench(&["--mask", "sideways"]), &["--mask", "sideways"]);
    assert_error(
        &bench(&["--variants", "fastest"]),
        &["--variants", "fastest"],
    );
    assert_error(&bench(&["--dtype", "f16"]), &["--dtype", "cpu"]);
    assert_error(&bench(&["--dtype", "f8"]), &["--dtype", "f8"]);
    assert_error(&bench(&["--plot", "x.pdf"]), &["--plot"]);
    assert_error(&bench(&["--iters", "0"]), &["--iters"]);
    assert_error(&bench(&["--lengths", "3"]), &["--lengths"]);
}
