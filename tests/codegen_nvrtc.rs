//! Every kernel template's CUDA C compiles with NVRTC: PTX for compute_80 and compute_90, SASS
//! for sm_90 with zero spills (ptxas register report). Skips with a message when NVRTC is absent,
//! fails when `TRANSFUSE_REQUIRE` names `nvrtc` (CI). f16/bf16 kernels need the CUDA headers
//! (`TRANSFUSE_CUDA_INCLUDE`, set by scripts/test.sh).

mod common;

use transfuse::codegen::{cuda, kernels};
use transfuse::runtime::nvrtc;

fn nvrtc_or_skip() -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) if common::required("nvrtc") => panic!("TRANSFUSE_REQUIRE names nvrtc: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

#[test]
fn every_template_compiles_for_compute_80_90_and_sm_90_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let catalog = kernels::catalog();
    assert!(!catalog.is_empty());
    let mut table = Vec::new();
    for g in &catalog {
        let k = &g.kernel;
        let src = cuda::print(k).unwrap();
        let needs_headers = src.contains("#include");
        if needs_headers && nvrtc::cuda_include_dir().is_none() {
            assert!(
                !common::required("nvrtc"),
                "{}: CUDA headers missing (TRANSFUSE_CUDA_INCLUDE)",
                k.name
            );
            eprintln!("skipping {}: no CUDA headers", k.name);
            continue;
        }
        for arch in ["compute_80", "compute_90"] {
            if let Err(e) = nvrtc::compile_ptx(&src, &k.name, arch, &[]) {
                panic!("{} for {arch}: {e}\n--- source ---\n{src}", k.name);
            }
        }
        let sass = nvrtc::compile_sass(&src, &k.name, "sm_90")
            .unwrap_or_else(|e| panic!("{} for sm_90: {e}\n--- source ---\n{src}", k.name));
        let r = sass
            .kernel(&k.name)
            .unwrap_or_else(|| panic!("{}: no ptxas report", k.name));
        assert_eq!(
            (r.spill_stores_bytes, r.spill_loads_bytes),
            (0, 0),
            "{} spills",
            k.name
        );
        table.push(format!(
            "{:<48} {:>4} regs {:>6} B shared",
            k.name, r.registers, r.shared_bytes
        ));
    }
    eprintln!("{}", table.join("\n"));
}
