//! `--tp N --backend cuda` (CUDA ranks over NCCL) and the multi-process flags `--nnodes`,
//! `--node-rank`, `--rendezvous`, through the CLI, on a machine without GPUs or NCCL: every
//! failure is one `error:` line and exit 2 naming the library, the environment variable or
//! the flag, never a panic. (With NCCL and devices, tests/gpu_parity.rs's `nccl_tp` runs the
//! ranks; scripts/gpu-check.sh runs both there.)

mod common;

use common::cli::{assert_error, s, TempDir, GPT2};
use common::fixture;

/// `run` on tiny GPT-2 with `extra`, the environment `envs` set and `NCCL_COMM_ID` removed.
fn run(tmp: &TempDir, extra: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut args = vec![
        "run".to_string(),
        "--model".into(),
        s(&fixture(GPT2)),
        "--inputs".into(),
        s(&fixture("tiny_gpt2/inputs.json")),
        "--out".into(),
        s(&tmp.join("out.safetensors")),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_transfuse"))
        .args(&args)
        .env("TRANSFUSE_CACHE_DIR", common::cli::test_cache_dir())
        .envs(envs.iter().copied())
        .env_remove("NCCL_COMM_ID")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("spawn the transfuse binary");
    assert!(!tmp.join("out.safetensors").exists(), "no output on error");
    out
}

#[test]
fn cuda_ranks_without_libnccl_are_one_clean_error() {
    if transfuse::runtime::nccl::available().is_ok() {
        eprintln!("skipping: NCCL loads here (the GPU tests cover this machine)");
        return;
    }
    let tmp = TempDir::new("nccl_missing");
    let out = run(&tmp, &["--tp", "2", "--backend", "cuda"], &[]);
    assert_error(&out, &["libnccl.so.2", "not found", "TRANSFUSE_NCCL_LIB"]);
    // Also at TP 1 over NCCL (`--nnodes 1`) and for a multi-node rank.
    let out = run(&tmp, &["--nnodes", "1", "--backend", "cuda"], &[]);
    assert_error(&out, &["libnccl.so.2", "TRANSFUSE_NCCL_LIB"]);
    let id = tmp.join("id");
    let out = run(
        &tmp,
        &[
            "--tp",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rendezvous",
            &s(&id),
            "--backend",
            "cuda",
        ],
        &[],
    );
    assert_error(&out, &["libnccl.so.2", "TRANSFUSE_NCCL_LIB"]);
}

#[test]
fn a_bogus_nccl_library_is_one_clean_error_naming_it() {
    let tmp = TempDir::new("nccl_bogus");
    let missing = "/nonexistent-transfuse-nccl/libnccl.so.2";
    let out = run(
        &tmp,
        &["--tp", "2", "--backend", "cuda"],
        &[("TRANSFUSE_NCCL_LIB", missing)],
    );
    assert_error(&out, &["$TRANSFUSE_NCCL_LIB", missing, "no such file"]);
    // A file that is not a shared library, and a folder without one.
    let junk = tmp.write("libnccl.so.2", "not a library");
    let out = run(
        &tmp,
        &["--tp", "2", "--backend", "cuda"],
        &[("TRANSFUSE_NCCL_LIB", &s(&junk))],
    );
    assert_error(&out, &["$TRANSFUSE_NCCL_LIB", &s(&junk)]);
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(
        &tmp,
        &["--tp", "2", "--backend", "cuda"],
        &[("TRANSFUSE_NCCL_LIB", &s(&empty))],
    );
    assert_error(&out, &["$TRANSFUSE_NCCL_LIB", &s(&empty), "libnccl.so.2"]);
}

#[test]
fn bad_multi_node_flags_exit_2_naming_the_flag() {
    let tmp = TempDir::new("nccl_flags");
    let id = s(&tmp.join("id"));
    let stale = s(&tmp.write("stale-id", "old"));
    let nowhere = s(&tmp.join("missing-folder/id"));
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--tp", "2", "--nnodes", "0", "--backend", "cuda"],
            vec!["--nnodes must be ≥ 1"],
        ),
        (
            vec![
                "--tp",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--rendezvous",
                &id,
                "--backend",
                "cuda",
            ],
            vec!["--node-rank 2", "--nnodes 2"],
        ),
        (
            vec![
                "--tp",
                "3",
                "--nnodes",
                "2",
                "--rendezvous",
                &id,
                "--backend",
                "cuda",
            ],
            vec!["--nnodes 2", "does not divide --tp 3"],
        ),
        (
            vec![
                "--tp",
                "2",
                "--nnodes",
                "2",
                "--rendezvous",
                &id,
                "--backend",
                "cpu",
            ],
            vec!["--nnodes", "--backend cuda", "`cpu`"],
        ),
        (
            vec!["--tp", "2", "--node-rank", "0", "--backend", "wgpu"],
            vec!["--node-rank", "--backend cuda"],
        ),
        (
            vec!["--tp", "2", "--nnodes", "2", "--backend", "cuda"],
            vec!["--nnodes 2", "--rendezvous", "NCCL_COMM_ID"],
        ),
        (
            vec![
                "--tp",
                "2",
                "--nnodes",
                "2",
                "--rendezvous",
                &nowhere,
                "--backend",
                "cuda",
            ],
            vec!["--rendezvous", "no such folder"],
        ),
        (
            vec![
                "--tp",
                "2",
                "--nnodes",
                "2",
                "--rendezvous",
                &stale,
                "--backend",
                "cuda",
            ],
            vec!["--rendezvous", "exists"],
        ),
        (
            vec![
                "--tp",
                "2",
                "--nnodes",
                "2",
                "--pp",
                "2",
                "--rendezvous",
                &id,
                "--backend",
                "cuda",
            ],
            vec!["--nnodes", "--pp"],
        ),
        (
            vec!["--nnodes", "1", "--dtype", "f16", "--backend", "cuda"],
            vec!["--dtype f16"],
        ),
    ];
    for (args, culprits) in cases {
        let out = run(&tmp, &args, &[]);
        let line = assert_error(&out, &culprits);
        assert!(
            !line.contains("libnccl"),
            "{args:?}: flags are checked before NCCL: {line}"
        );
    }
    // A stale file is left alone (only node 0's own, after its ranks joined, is removed).
    assert_eq!(std::fs::read_to_string(&stale).unwrap(), "old");
}

#[test]
fn a_node_waiting_for_the_rendezvous_gives_up_at_the_timeout() {
    if transfuse::runtime::nccl::available().is_err() {
        // The file is only read once NCCL has loaded; the unit tests of
        // transfuse_runtime::nccl cover the wait itself without it.
        eprintln!("skipping: NCCL does not load here");
        return;
    }
    let tmp = TempDir::new("nccl_wait");
    let id = s(&tmp.join("never-written"));
    let out = run(
        &tmp,
        &[
            "--tp",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rendezvous",
            &id,
            "--backend",
            "cuda",
        ],
        &[("TRANSFUSE_TP_TIMEOUT", "0.5")],
    );
    // Without a device this ends at the driver check; with one, at the rendezvous timeout.
    let err = common::cli::stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("did not appear") || err.contains("cuda"),
        "{err}"
    );
}
