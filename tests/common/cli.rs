//! Helpers for the CLI tests: temp dirs, running the binary, asserting clean errors.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::fixture;

/// The tiny GPT-2 fixture folder.
pub const GPT2: &str = "tiny_gpt2/model";
/// The tiny BERT fixture folder.
pub const BERT: &str = "tiny_bert/model";

/// A fresh directory under the system temp dir, unique per test and process, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("transfuse-cli-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Writes `text` to `rel` and returns the file's path.
    pub fn write(&self, rel: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(rel);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Copies the files of fixture folder `src` (e.g. `tiny_bert/model`) into `rel`.
    pub fn copy_model(&self, src: &str, rel: &str) -> PathBuf {
        let dst = self.join(rel);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(fixture(src)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
        dst
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tuning-cache folder of this test process (a temporary one: no test reads or writes
/// the user's cache).
pub fn test_cache_dir() -> PathBuf {
    super::isolate_tuning_cache()
}

/// Runs the binary with `args` (backtraces off, so a panic would show its hint).
pub fn transfuse<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_transfuse"))
        .args(args)
        .env("TRANSFUSE_CACHE_DIR", test_cache_dir())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("spawn the transfuse binary")
}

/// Runs the binary with `args` and the environment variables `envs` set.
pub fn transfuse_env<I, S>(args: I, envs: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_transfuse"))
        .args(args)
        .env("TRANSFUSE_CACHE_DIR", test_cache_dir())
        .envs(envs.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("spawn the transfuse binary")
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a clean usage error: exit code 2, stderr is exactly one line `error: ...` that
/// contains every string of `culprits`, and no panic. Returns the line.
pub fn assert_error(out: &Output, culprits: &[&str]) -> String {
    let err = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status {:?}, stderr:\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "backtrace hint:\n{err}");
    assert!(
        err.ends_with('\n') && err.lines().count() == 1,
        "stderr is not exactly one line:\n{err}"
    );
    let line = err.trim_end_matches('\n');
    assert!(line.starts_with("error: "), "no `error: ` prefix: {line}");
    for c in culprits {
        assert!(line.contains(c), "{line:?} does not name {c:?}");
    }
    // Shown with --nocapture, so the messages can be reviewed.
    eprintln!("{line}");
    line.to_owned()
}

/// Asserts success and no panic; returns stdout.
pub fn assert_ok(out: &Output) -> String {
    let err = stderr_of(out);
    assert!(
        out.status.success(),
        "exit status {:?}, stderr:\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}
