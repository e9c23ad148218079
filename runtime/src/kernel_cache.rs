//! A disk cache of compiled CUDA kernels (PTX or cubins from NVRTC), so a process that loads
//! a kernel some earlier process compiled skips NVRTC.
//!
//! - **Where**: `$TRANSFUSE_CACHE_DIR/kernels` when set, else the platform cache folder
//!   (`$XDG_CACHE_HOME/transfuse/kernels`, else `~/.cache/transfuse/kernels`) ([`cache_root`]).
//!   `TRANSFUSE_CACHE_DIR` is the folder the tuning cache uses too; kernels keep to their
//!   subfolder. `TRANSFUSE_KERNEL_CACHE=off` turns the cache off.
//! - **Key** ([`Key::new`]): the CUDA C source, the target architecture (`compute_90`,
//!   `sm_90`), the NVRTC version, the driver version and the compile options. The file name
//!   is a 128-bit hash of all of it; the entry repeats the key (with the source's length and a
//!   second hash of it), which a load compares, so a hash collision is a miss, never a wrong
//!   kernel.
//! - **Writes** go to a temporary file in the same folder, then are renamed over the entry:
//!   a reader sees a whole entry or none, and two processes storing the same kernel at once
//!   both succeed.
//! - **Corrupt entries** (truncated, wrong magic, checksum mismatch, another key) give one
//!   warning on stderr, are removed, and the kernel is compiled again; the cache never turns
//!   into an error. A failed store is a warning too.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Environment variable overriding the cache root (the kernels go in its `kernels/`).
pub const CACHE_DIR_ENV: &str = "TRANSFUSE_CACHE_DIR";
/// Set to `off` (or `0`) to compile every kernel afresh.
pub const SWITCH_ENV: &str = "TRANSFUSE_KERNEL_CACHE";

const MAGIC: &[u8; 8] = b"TFKERN1\n";

/// The root of transfuse's caches: `$TRANSFUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/transfuse`,
/// else `$HOME/.cache/transfuse`; `None` when none of them is set.
pub fn cache_root() -> Option<PathBuf> {
    let get = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    get(CACHE_DIR_ENV)
        .or_else(|| get("XDG_CACHE_HOME").map(|d| d.join("transfuse")))
        .or_else(|| get("HOME").map(|h| h.join(".cache/transfuse")))
}

/// FNV-1a, 64 bits, from `seed` (the offset basis for the standard variant).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_ALT: u64 = 0x84222325_cbf29ce4;

/// What a compiled kernel depends on (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// One line naming everything the kernel was compiled from; stored in the entry.
    line: String,
    /// The entry's file name.
    file: String,
}

impl Key {
    /// The key of `src` compiled for `arch` by NVRTC `nvrtc` (major, minor) under a driver of
    /// version `driver` (`cuDriverGetVersion`), with `opts`.
    pub fn new(src: &str, arch: &str, nvrtc: (i32, i32), driver: i32, opts: &[&str]) -> Key {
        let line = format!(
            "arch={arch} nvrtc={}.{} driver={driver} opts={:?} src_len={} src_fnv={:016x}{:016x}",
            nvrtc.0,
            nvrtc.1,
            opts,
            src.len(),
            fnv1a(FNV_BASIS, src.as_bytes()),
            fnv1a(FNV_ALT, src.as_bytes()),
        );
        let all = format!("{line}\n{src}");
        let file = format!(
            "{:016x}{:016x}-{arch}.bin",
            fnv1a(FNV_BASIS ^ 1, all.as_bytes()),
            fnv1a(FNV_ALT ^ 1, all.as_bytes())
        );
        Key { line, file }
    }

    /// The entry's file name.
    pub fn file_name(&self) -> &str {
        &self.file
    }
}

/// The kernel cache in one folder.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    /// The cache under [`cache_root`]`/kernels`, or `None` when there is no root or
    /// `TRANSFUSE_KERNEL_CACHE` is `off`/`0`.
    pub fn from_env() -> Option<KernelCache> {
        let switch = std::env::var(SWITCH_ENV).unwrap_or_default();
        if matches!(switch.trim(), "off" | "0" | "false") {
            return None;
        }
        cache_root().map(|r| KernelCache::at(r.join("kernels")))
    }

    /// A cache in `dir` (created on the first store).
    pub fn at(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `key`'s entry.
    pub fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(&key.file)
    }

    /// The stored bytes of `key`, or `None`: no entry, or a corrupt one (warned about on
    /// stderr and removed).
    pub fn load(&self, key: &Key) -> Option<Vec<u8>> {
        let path = self.path(key);
        let bytes = std::fs::read(&path).ok()?;
        match decode(&bytes, key) {
            Ok(payload) => Some(payload),
            Err(why) => {
                eprintln!(
                    "transfuse: warning: ignoring the corrupt kernel cache entry {} ({why}); \
                     the kernel is compiled again",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `payload` as `key`'s entry: written to a temporary file, then renamed.
    pub fn store(&self, key: &Key, payload: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".{}.{}.{:?}.tmp",
            key.file,
            std::process::id(),
            std::thread::current().id()
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode(key, payload))?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path(key))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// [`KernelCache::store`], a failure only warned about (the kernel was compiled; only the
    /// next process pays).
    pub fn store_or_warn(&self, key: &Key, payload: &[u8]) {
        if let Err(e) = self.store(key, payload) {
            eprintln!(
                "transfuse: warning: could not store a kernel in the cache {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// `MAGIC`, the key line and `\n`, the payload length (u64 LE), the payload's FNV-1a (u64 LE),
/// the payload.
fn encode(key: &Key, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + key.line.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(key.line.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(FNV_BASIS, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode(bytes: &[u8], key: &Key) -> Result<Vec<u8>, String> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a kernel cache entry (bad magic)")?;
    let nl = rest.iter().position(|&b| b == b'\n').ok_or("no key line")?;
    if &rest[..nl] != key.line.as_bytes() {
        return Err("it holds another kernel (key mismatch)".into());
    }
    let rest = &rest[nl + 1..];
    if rest.len() < 16 {
        return Err("truncated header".into());
    }
    let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
    let payload = &rest[16..];
    if payload.len() as u64 != len {
        return Err(format!(
            "truncated: {} payload bytes of {len}",
            payload.len()
        ));
    }
    if fnv1a(FNV_BASIS, payload) != sum {
        return Err("checksum mismatch".into());
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("transfuse-kcache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_stored_entry_loads_back_and_other_keys_miss() {
        let dir = tmp("roundtrip");
        let c = KernelCache::at(&dir);
        let k = Key::new("src", "compute_90", (12, 9), 13000, &[]);
        assert_eq!(c.load(&k), None);
        c.store(&k, b"payload").unwrap();
        assert_eq!(c.load(&k).as_deref(), Some(&b"payload"[..]));
        // Every part of the key matters.
        for other in [
            Key::new("src2", "compute_90", (12, 9), 13000, &[]),
            Key::new("src", "compute_80", (12, 9), 13000, &[]),
            Key::new("src", "compute_90", (13, 0), 13000, &[]),
            Key::new("src", "compute_90", (12, 9), 12090, &[]),
            Key::new("src", "compute_90", (12, 9), 13000, &["--use_fast_math"]),
        ] {
            assert_ne!(other.file_name(), k.file_name());
            assert_eq!(c.load(&other), None);
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_entries_are_ignored_and_removed() {
        let dir = tmp("corrupt");
        let c = KernelCache::at(&dir);
        let k = Key::new("src", "sm_90", (13, 0), 13000, &[]);
        let good = encode(&k, b"0123456789");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let other = encode(&Key::new("x", "sm_90", (13, 0), 13000, &[]), b"0123456789");
        for bad in [
            b"garbage".to_vec(),
            good[..good.len() - 3].to_vec(),
            flipped,
            other,
            Vec::new(),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(c.path(&k), &bad).unwrap();
            assert_eq!(c.load(&k), None);
            assert!(!c.path(&k).exists(), "a corrupt entry is removed");
        }
        // And a store after that works.
        c.store(&k, b"0123456789").unwrap();
        assert_eq!(c.load(&k).as_deref(), Some(&b"0123456789"[..]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_into_an_unwritable_place_is_an_error_not_a_panic() {
        let file = tmp("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let c = KernelCache::at(file.join("kernels"));
        let k = Key::new("src", "sm_90", (13, 0), 13000, &[]);
        assert!(c.store(&k, b"x").is_err());
        c.store_or_warn(&k, b"x");
        let _ = std::fs::remove_file(&file);
    }
}
