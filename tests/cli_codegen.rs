//! `transfuse compile --target … [--emit DIR] [--dtype …] [--dims …] [--report]` end to end:
//! one self-contained source per kernel plus plan.json, the per-kernel report with the
//! planned bytes against the lower bound, and every bad option as one `error:` line (exit 2).

mod common;

use common::cli::*;

use std::path::Path;

use common::fixture;

fn validate_wgsl(src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("WGSL parse error:\n{}\n{src}", e.emit_to_string(src)));
    let caps = naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SHADER_FLOAT16;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("WGSL validation error:\n{}\n{src}", e.emit_to_string(src)));
}

/// The emitted folder: plan.json and the kernel files it names (decode variants included),
/// checked against each other.
fn read_emitted(dir: &Path, ext: &str) -> (serde_json::Value, Vec<(String, String)>) {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
    let kernels = plan["kernels"].as_array().unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "plan.json")
        .collect();
    files.sort();
    let mut named = vec![];
    for (i, k) in kernels.iter().enumerate() {
        named.push(k["file"].as_str().unwrap().to_string());
        if let Some(f) = k["decode_file"].as_str() {
            assert_eq!(f, format!("{i:02}_{}.{ext}", k["decode"].as_str().unwrap()));
            named.push(f.to_string());
        }
    }
    named.sort();
    assert_eq!(files, named, "one file per kernel and decode variant");
    let mut out = vec![];
    for (i, k) in kernels.iter().enumerate() {
        let (entry, file) = (k["entry"].as_str().unwrap(), k["file"].as_str().unwrap());
        assert_eq!(file, format!("{i:02}_{entry}.{ext}"));
        if let Some(f) = k["decode_file"].as_str() {
            let src = std::fs::read_to_string(dir.join(f)).unwrap();
            let d = k["decode"].as_str().unwrap();
            assert!(src.contains(d), "{f} defines {d}");
            out.push((f.to_string(), src));
        }
        let src = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(src.contains(entry), "{file} defines {entry}");
        // Each binding names a buffer of the plan; each uniform has an expression.
        let buffers: Vec<&str> = plan["buffers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        for b in k["bindings"].as_array().unwrap() {
            assert!(buffers.contains(&b["buffer"].as_str().unwrap()), "{b}");
        }
        for u in k["uniforms"].as_array().unwrap() {
            assert!(!u["expr"].as_str().unwrap().is_empty());
        }
        out.push((file.to_string(), src));
    }
    (plan, out)
}

#[test]
fn emit_cuda_writes_one_source_per_kernel_and_plan_json() {
    let tmp = TempDir::new("emit_cuda");
    let dir = tmp.join("out");
    let out = transfuse([
        "compile",
        "--model",
        &s(&fixture(GPT2)),
        "--target",
        "cuda",
        "--emit",
        &s(&dir),
        "--dims",
        "batch=2,seq=16,past=3",
    ]);
    assert_ok(&out);
    assert!(
        stderr_of(&out).contains("lowered to"),
        "{}",
        stderr_of(&out)
    );
    let (plan, files) = read_emitted(&dir, "cu");
    assert_eq!(plan["target"], "cuda");
    assert_eq!(plan["elem"], "f32");
    for (file, src) in &files {
        assert!(src.contains("extern \"C\" __global__"), "{file}");
    }
    let t = &plan["totals"];
    assert_eq!(t["dims"]["seq"], 16);
    assert!(t["forward_bytes_at"].as_i64().unwrap() >= t["lower_bound_bytes_at"].as_i64().unwrap());
    // Sizes are expressions of the symbolic dims.
    let logits = plan["buffers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "logits")
        .unwrap();
    assert_eq!(logits["kind"], "output");
    assert_eq!(logits["elements"], "1000*batch*seq");
    assert_eq!(logits["bytes_at"], 4 * 1000 * 2 * 16);
    // Kernel 0 launches with a grid at the given dims.
    assert!(plan["kernels"][0]["grid_at"].as_array().is_some());
    // Attention kernels name their decode variant, matmuls their GEMV (written too), none
    // launched at seq=16.
    let kernels = plan["kernels"].as_array().unwrap();
    let att: Vec<_> = kernels
        .iter()
        .filter(|k| k["ops"][0] == "attention" && k["only_when"].is_null())
        .collect();
    assert_eq!(att.len(), 2, "one per GPT-2 block");
    // Each followed by its split-KV combine, launched only for one query row.
    let combines = kernels.iter().filter(|k| k["only_when"] == "seq").count();
    assert_eq!(combines, 2);
    let with: Vec<_> = kernels.iter().filter(|k| k["decode"].is_string()).collect();
    assert_eq!(
        with.len(),
        2 + 2 * 4 + 1,
        "attention, 4 matmuls per block, LM head"
    );
    for k in with {
        let op = k["ops"][0].as_str().unwrap();
        assert!(op == "attention" || op.ends_with("matmul"), "{k}");
        assert_eq!(k["decode_at"], false);
    }
}

#[test]
fn emit_wgsl_f16_is_valid_wgsl() {
    let tmp = TempDir::new("emit_wgsl");
    let dir = tmp.join("out");
    let out = transfuse([
        "compile",
        "--model",
        &s(&fixture(BERT)),
        "--target",
        "wgsl",
        "--dtype",
        "f16",
        "--emit",
        &s(&dir),
    ]);
    assert_ok(&out);
    let (plan, files) = read_emitted(&dir, "wgsl");
    assert_eq!(plan["elem"], "f16");
    let prepare = plan["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["phase"] == "prepare")
        .count();
    assert!(prepare > 0, "BERT's merged QKV weights are prepared once");
    for (_, src) in &files {
        validate_wgsl(src);
    }
    assert!(files.iter().any(|(_, s)| s.contains("enable f16;")));
}

#[test]
fn report_with_a_target_lists_kernels_and_bytes_against_the_lower_bound() {
    let out = transfuse([
        "compile",
        "--model",
        &s(&fixture(GPT2)),
        "--report",
        "--target",
        "cuda",
        "--dims",
        "batch=1,seq=32",
    ]);
    let stdout = assert_ok(&out);
    assert!(
        stdout.contains("fused_matmul"),
        "the optimizer's table comes first"
    );
    assert!(stdout.contains("kernels (cuda f32; bytes and flops at batch=1 past=0 seq=32)"));
    assert!(stdout.contains("attention_f32_d16_causal_mask"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("planned global-memory traffic of one forward"))
        .unwrap_or_else(|| panic!("no bytes line:\n{stdout}"));
    assert!(line.contains("lower bound"), "{line}");
    eprintln!("{stdout}");
}

#[test]
fn bad_codegen_options_are_one_line_errors() {
    let model = s(&fixture(GPT2));
    let run = |extra: &[&str]| {
        let mut args = vec!["compile", "--model", &model];
        args.extend_from_slice(extra);
        transfuse(args)
    };
    assert_error(
        &run(&["--target", "wgsl", "--dtype", "bf16"]),
        &["bf16", "cuda", "WGSL"],
    );
    assert_error(&run(&["--target", "metal"]), &["metal", "cuda or wgsl"]);
    assert_error(
        &run(&["--target", "cuda", "--dtype", "f64"]),
        &["f64", "bf16"],
    );
    assert_error(&run(&["--emit", "/tmp/never"]), &["--target"]);
    assert_error(
        &run(&["--target", "cuda", "--dims", "seq"]),
        &["--dims", "seq"],
    );
    assert_error(
        &run(&["--target", "cuda", "--dims", "heads=3"]),
        &["heads", "batch, past, seq"],
    );
    assert_error(&run(&["--target", "cuda", "--dims", "seq=x"]), &["seq=x"]);
    assert_error(
        &run(&["--target", "wgsl", "--limits", "gpu"]),
        &["--limits", "gpu", "webgpu or device"],
    );
    assert_error(
        &run(&["--target", "cuda", "--limits", "device"]),
        &["--limits device", "wgsl"],
    );
    assert_error(&run(&["--limits", "device"]), &["--target"]);
    // An unwritable --emit folder names the path.
    let tmp = TempDir::new("bad_emit");
    let file = tmp.join("a_file");
    std::fs::write(&file, "x").unwrap();
    assert_error(
        &run(&["--target", "cuda", "--emit", &s(&file.join("sub"))]),
        &["a_file"],
    );
}

/// `--limits device` lowers for the wgpu adapter as `run` does: on a CPU adapter (lavapipe) the
/// matmuls whose operands allow vec4 loads are the register design (no shared memory) and
/// every kernel validates;
/// `--limits webgpu` keeps WebGPU's limits and the tiled design.
#[test]
fn wgsl_limits_device_emits_what_runs() {
    if common::wgpu_backend().is_none() {
        return;
    }
    let model = s(&fixture(GPT2));
    let mut seen = vec![];
    for limits in ["webgpu", "device"] {
        let tmp = TempDir::new(&format!("limits_{limits}"));
        let out = transfuse([
            "compile",
            "--model",
            &model,
            "--target",
            "wgsl",
            "--limits",
            limits,
            "--dims",
            "batch=1,seq=16",
            "--emit",
            &s(&tmp.0),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, files) = read_emitted(&tmp.0, "wgsl");
        let mm: Vec<&(String, String)> = files
            .iter()
            .filter(|(f, _)| f.contains("_matmul_"))
            .collect();
        assert!(!mm.is_empty(), "matmul kernels in {files:?}");
        for (_, src) in &files {
            validate_wgsl(src);
        }
        let shared = mm
            .iter()
            .filter(|(_, src)| src.contains("var<workgroup>"))
            .count();
        seen.push((limits, mm.len(), shared));
    }
    eprintln!("{seen:?}");
    let cpu = {
        use transfuse::runtime::device::Device;
        let dev = transfuse::runtime::webgpu::shared().expect("wgpu device");
        dev.info().limits.kind == transfuse::codegen::kernels::DeviceKind::Cpu
    };
    // WebGPU's limits: every matmul tiled through shared memory.
    assert_eq!(seen[0].1, seen[0].2, "{seen:?}");
    if cpu {
        // Register matmuls where the operands allow vec4 loads (not every one: a permuted
        // activation or a k not a multiple of 4 keeps the tiled design).
        assert!(
            seen[1].2 < seen[1].1,
            "register matmuls on a CPU adapter: {seen:?}"
        );
    }
}
