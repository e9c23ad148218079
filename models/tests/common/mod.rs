//! Helpers shared by the integration tests of transfuse-models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `<workspace>/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `<workspace>/tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// Whether `TRANSFUSE_REQUIRE` (comma-separated) names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|s| s.trim() == what))
        .unwrap_or(false)
}

/// The directory in env var `var`, for tests that need a large download.
///
/// Unset: panics if `TRANSFUSE_REQUIRE` names `what`, else prints why the test is skipped
/// and returns `None` (the caller returns). Set to a path that is not a directory: panics.
pub fn optional_dir(var: &str, what: &str, hint: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            assert!(
                dir.is_dir(),
                "{var}={} is not a directory ({hint})",
                dir.display()
            );
            Some(dir)
        }
        None if required(what) => {
            panic!("TRANSFUSE_REQUIRE contains `{what}` but {var} is not set ({hint})")
        }
        None => {
            eprintln!("skipping: {var} not set ({hint})");
            None
        }
    }
}

/// The all-MiniLM-L6-v2 model folder from `TRANSFUSE_MINILM_DIR`, or `None` to skip.
pub fn minilm_dir() -> Option<PathBuf> {
    optional_dir(
        "TRANSFUSE_MINILM_DIR",
        "minilm",
        "run scripts/fetch-minilm.sh",
    )
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "transfuse-models-test-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `bytes` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
