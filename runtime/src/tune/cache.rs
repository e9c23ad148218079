//! The tuning cache: one JSON file per device, `tuning-<backend>-<hash>.json`, in
//! `TRANSFUSE_CACHE_DIR` or else the platform cache folder (`~/.cache/transfuse/tuning` on
//! Linux).
//!
//! A device is its backend, its adapter description (name, type, driver and driver version) and,
//! for a CPU adapter, its worker-thread count (lavapipe's `LP_NUM_THREADS`, else the cores).
//! An entry's key is the kernel family, a hash of the kernel's structure without its tunables
//! ([`transfuse_codegen::lower::tuning::Site::structure`]), the storage type and the shape
//! bucket (each symbolic dim the kernel's sizes mention, rounded up to a power of two).
//!
//! Updates are read-merge-write under an advisory lock on `<file>.lock` (fs4), written to a
//! temporary file and renamed over the old one, so two tuners in two processes lose nothing and
//! a reader never sees half a file. A file that does not parse, or of an older schema, gives
//! one warning (stderr), is moved aside (`<file>.bad-<seconds>`) and rebuilt; one of a newer
//! schema is left untouched and used read-only (its entries read where they parse).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use transfuse_codegen::kir::Elem;
use transfuse_codegen::lower::tuning::{Point, Site};
use transfuse_ir::Bindings;

use crate::device::DeviceInfo;
use crate::RuntimeError;

/// The file format's version: an older file is rebuilt, a newer one only read.
pub const SCHEMA: u32 = 1;

/// One tuned kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Template family.
    pub family: String,
    /// The kernel's structure (template configuration, sizes in dims), for `tune --show`.
    pub structure: String,
    /// Storage type.
    pub dtype: String,
    /// Shape bucket (`seq=128,batch=1`).
    pub bucket: String,
    /// The tunables to use (the default's when no candidate was 5 % faster).
    pub tunables: BTreeMap<String, u32>,
    /// The default's tunables when it was tuned.
    pub default_tunables: BTreeMap<String, u32>,
    /// Seconds per launch of the winner (min of medians).
    pub seconds: f64,
    /// Its spread: (max − min) / min of its medians.
    pub spread: f64,
    /// Seconds per launch of the default.
    pub default_seconds: f64,
    /// Candidates timed.
    pub tried: usize,
    /// Date tuned (`YYYY-MM-DD`, UTC).
    pub date: String,
    /// transfuse version that tuned it.
    pub version: String,
    /// The models it was tuned for (`tune --show --model DIR` filters by it).
    #[serde(default)]
    pub models: Vec<String>,
}

impl Entry {
    /// Default time / winner time.
    pub fn speedup(&self) -> f64 {
        if self.seconds > 0.0 {
            self.default_seconds / self.seconds
        } else {
            1.0
        }
    }

    /// The winner as a point.
    pub fn point(&self) -> Point {
        self.tunables.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    schema: u32,
    device: String,
    entries: BTreeMap<String, Entry>,
}

/// What identifies a device in the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceKey {
    /// Backend, adapter, driver and (CPU adapters) worker threads, as one line.
    pub id: String,
}

impl DeviceKey {
    /// The key of `info` (see the module docs).
    pub fn of(info: &DeviceInfo) -> DeviceKey {
        let mut id = format!("{} | {}", info.backend, info.description);
        if !info.is_gpu {
            let threads = std::env::var("LP_NUM_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                });
            id.push_str(&format!(" | threads {threads}"));
        }
        DeviceKey { id }
    }

    /// The file name: backend plus a hash of the whole key.
    fn file_name(&self) -> String {
        let backend: String = self
            .id
            .split(" | ")
            .next()
            .unwrap_or("dev")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        format!("tuning-{backend}-{:016x}.json", fnv64(&self.id))
    }
}

/// FNV-1a, 64 bits: the structure hash of the keys and the file name hash.
pub fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `x` rounded up to a power of two (0 stays 0).
pub fn bucket_of(x: usize) -> usize {
    if x == 0 {
        0
    } else {
        x.next_power_of_two()
    }
}

/// Every dim rounded up to a power of two.
pub fn bucket_dims(dims: &Bindings) -> Bindings {
    dims.iter()
        .map(|(k, &v)| (k.clone(), bucket_of(v)))
        .collect()
}

/// The storage type's name in keys.
pub fn elem_name(e: Elem) -> &'static str {
    match e {
        Elem::F16 => "f16",
        Elem::BF16 => "bf16",
        _ => "f32",
    }
}

/// The cache key of `site` at the (bucketed) `dims` with storage `elem`: family, structure
/// hash, dtype and the bucket of the dims its sizes mention.
pub fn key_of(site: &Site, elem: Elem, dims: &Bindings) -> (String, String) {
    let mut syms: Vec<&str> = site.sizes.iter().flat_map(|(_, p)| p.symbols()).collect();
    syms.sort_unstable();
    syms.dedup();
    let bucket = syms
        .iter()
        .map(|s| format!("{s}={}", dims.get(*s).map_or(0, |&v| bucket_of(v))))
        .collect::<Vec<_>>()
        .join(",");
    let key = format!(
        "{}|{:016x}|{}|{bucket}",
        site.family,
        fnv64(&site.structure),
        elem_name(elem)
    );
    (key, bucket)
}

static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Sets the cache folder for this process, as `TRANSFUSE_CACHE_DIR` would (in-process tests
/// point it at a temporary folder without touching the environment).
pub fn set_cache_dir(dir: Option<PathBuf>) {
    *DIR.lock().unwrap_or_else(|p| p.into_inner()) = dir;
}

/// The cache folder: [`set_cache_dir`]'s, else `TRANSFUSE_CACHE_DIR`, else the platform's
/// cache folder.
pub fn cache_dir() -> Result<PathBuf, RuntimeError> {
    if let Some(d) = DIR.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return Ok(d);
    }
    if let Some(d) = std::env::var_os("TRANSFUSE_CACHE_DIR") {
        if !d.is_empty() {
            return Ok(PathBuf::from(d));
        }
    }
    directories::ProjectDirs::from("", "", "transfuse")
        .map(|p| p.cache_dir().join("tuning"))
        .ok_or_else(|| {
            cache_err(
                Path::new("."),
                "no cache folder: set TRANSFUSE_CACHE_DIR or HOME".into(),
            )
        })
}

fn cache_err(path: &Path, msg: String) -> RuntimeError {
    RuntimeError::Cache {
        path: path.display().to_string(),
        msg,
    }
}

/// Files already warned about in this process (one warning each).
static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn warn_once(path: &Path, msg: &str) {
    let mut w = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if w.get_or_insert_with(HashSet::new)
        .insert(path.to_path_buf())
    {
        eprintln!("warning: tuning cache {}: {msg}", path.display());
    }
}

/// What reading a file found.
enum Read {
    Missing,
    Ok(File),
    /// Newer schema: entries that parsed.
    Newer(BTreeMap<String, Entry>),
    /// Corrupt or older: why.
    Bad(String),
}

fn read_file(path: &Path) -> Read {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Missing,
        Err(e) => return Read::Bad(format!("unreadable ({e})")),
    };
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Read::Bad(format!("not valid JSON ({e})")),
    };
    let schema = v.get("schema").and_then(serde_json::Value::as_u64);
    match schema {
        Some(s) if s > u64::from(SCHEMA) => {
            let mut entries = BTreeMap::new();
            if let Some(m) = v.get("entries").and_then(serde_json::Value::as_object) {
                for (k, e) in m {
                    if let Ok(e) = serde_json::from_value::<Entry>(e.clone()) {
                        entries.insert(k.clone(), e);
                    }
                }
            }
            Read::Newer(entries)
        }
        Some(s) if s == u64::from(SCHEMA) => match serde_json::from_value::<File>(v) {
            Ok(f) => Read::Ok(f),
            Err(e) => Read::Bad(format!("does not match schema {SCHEMA} ({e})")),
        },
        Some(s) => Read::Bad(format!("schema {s} is older than {SCHEMA}")),
        None => Read::Bad("no schema number".into()),
    }
}

/// The tuning cache of one device (see the module docs).
#[derive(Clone, Debug)]
pub struct TuningCache {
    path: PathBuf,
    device: DeviceKey,
    entries: BTreeMap<String, Entry>,
    read_only: bool,
}

impl TuningCache {
    /// The cache of `info`'s device in [`cache_dir`], read now (a bad file is moved aside).
    pub fn open(info: &DeviceInfo) -> Result<TuningCache, RuntimeError> {
        let dev = DeviceKey::of(info);
        Self::open_at(&cache_dir()?, dev)
    }

    /// The cache of device `device` in folder `dir`.
    pub fn open_at(dir: &Path, device: DeviceKey) -> Result<TuningCache, RuntimeError> {
        let path = dir.join(device.file_name());
        let mut c = TuningCache {
            path,
            device,
            entries: BTreeMap::new(),
            read_only: false,
        };
        c.reload();
        Ok(c)
    }

    /// Rereads the file (without a lock: the file is replaced whole, never written in place).
    pub fn reload(&mut self) {
        match read_file(&self.path) {
            Read::Missing => self.entries.clear(),
            Read::Ok(f) => {
                self.entries = f.entries;
                self.read_only = false;
            }
            Read::Newer(e) => {
                warn_once(
                    &self.path,
                    "written by a newer transfuse (schema above 1); used read-only, not updated",
                );
                self.entries = e;
                self.read_only = true;
            }
            Read::Bad(why) => {
                // Moved aside under the lock, so a concurrent writer's new file is not lost.
                let _ = self.with_lock(|c| {
                    if let Read::Bad(why) = read_file(&c.path) {
                        c.move_aside(&why);
                    }
                    Ok(())
                });
                let _ = why;
                self.entries.clear();
            }
        }
    }

    fn move_aside(&self, why: &str) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = self.path.with_extension(format!("json.bad-{secs}"));
        let moved = fs::rename(&self.path, &aside).is_ok();
        warn_once(
            &self.path,
            &if moved {
                format!("{why}; moved to {} and rebuilt", aside.display())
            } else {
                format!("{why}; ignored and rebuilt")
            },
        );
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device line.
    pub fn device(&self) -> &str {
        &self.device.id
    }

    /// True when the file is of a newer schema (never written).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Every entry by key.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    fn with_lock<T>(
        &mut self,
        f: impl FnOnce(&mut TuningCache) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)
            .map_err(|e| cache_err(dir, format!("cannot create the folder: {e}")))?;
        let lock_path = self.path.with_extension("json.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| cache_err(&lock_path, format!("cannot open the lock file: {e}")))?;
        // fs4's flock (std's `File::lock` is newer than the crate's minimum Rust).
        fs4::FileExt::lock(&lock)
            .map_err(|e| cache_err(&lock_path, format!("cannot lock: {e}")))?;
        let r = f(self);
        let _ = fs4::FileExt::unlock(&lock);
        r
    }

    /// Adds (or replaces) entries: under the lock, rereads the file, merges, writes a
    /// temporary file and renames it over the old one. A read-only (newer-schema) cache keeps
    /// them in memory only.
    pub fn insert(&mut self, new: Vec<(String, Entry)>) -> Result<(), RuntimeError> {
        if self.read_only {
            self.entries.extend(new);
            return Ok(());
        }
        self.with_lock(|c| {
            let mut entries = match read_file(&c.path) {
                Read::Ok(f) => f.entries,
                Read::Missing => BTreeMap::new(),
                Read::Newer(e) => {
                    c.read_only = true;
                    warn_once(
                        &c.path,
                        "written by a newer transfuse meanwhile; not updated",
                    );
                    c.entries = e;
                    c.entries.extend(new);
                    return Ok(());
                }
                Read::Bad(why) => {
                    c.move_aside(&why);
                    BTreeMap::new()
                }
            };
            for (k, mut e) in new {
                if let Some(old) = entries.get(&k) {
                    for m in &old.models {
                        if !e.models.contains(m) {
                            e.models.push(m.clone());
                        }
                    }
                }
                entries.insert(k, e);
            }
            c.write(&entries)?;
            c.entries = entries;
            Ok(())
        })
    }

    /// Empties the cache (the file is rewritten with no entries).
    pub fn clear(&mut self) -> Result<usize, RuntimeError> {
        let n = self.entries.len();
        if self.read_only {
            return Err(cache_err(
                &self.path,
                "written by a newer transfuse: not cleared (delete it by hand)".into(),
            ));
        }
        self.with_lock(|c| {
            c.write(&BTreeMap::new())?;
            c.entries.clear();
            Ok(())
        })?;
        Ok(n)
    }

    fn write(&self, entries: &BTreeMap<String, Entry>) -> Result<(), RuntimeError> {
        let f = File {
            schema: SCHEMA,
            device: self.device.id.clone(),
            entries: entries.clone(),
        };
        let text = serde_json::to_string_pretty(&f)
            .map_err(|e| cache_err(&self.path, format!("cannot serialise: {e}")))?;
        let tmp = self
            .path
            .with_extension(format!("json.tmp-{}", std::process::id()));
        let mut out =
            fs::File::create(&tmp).map_err(|e| cache_err(&tmp, format!("cannot create: {e}")))?;
        out.write_all(text.as_bytes())
            .and_then(|()| out.sync_all())
            .map_err(|e| cache_err(&tmp, format!("cannot write: {e}")))?;
        fs::rename(&tmp, &self.path)
            .map_err(|e| cache_err(&self.path, format!("cannot replace: {e}")))
    }
}

/// Today's date, UTC, `YYYY-MM-DD`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: &str) -> Entry {
        Entry {
            family: "matmul".into(),
            structure: tag.into(),
            dtype: "f32".into(),
            bucket: "seq=128".into(),
            tunables: BTreeMap::from([("tile_m".to_string(), 32)]),
            default_tunables: BTreeMap::from([("tile_m".to_string(), 64)]),
            seconds: 1e-3,
            spread: 0.02,
            default_seconds: 2e-3,
            tried: 3,
            date: today(),
            version: "0".into(),
            models: vec![tag.into()],
        }
    }

    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "transfuse-cache-unit-{test}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn buckets_round_up_to_powers_of_two() {
        assert_eq!(
            [0, 1, 2, 3, 513, 1000, 1024].map(bucket_of),
            [0, 1, 2, 4, 1024, 1024, 1024]
        );
    }

    #[test]
    fn the_date_is_a_calendar_date() {
        let d = today();
        assert_eq!(d.len(), 10, "{d}");
        let parts: Vec<u32> = d.split('-').map(|x| x.parse().unwrap()).collect();
        assert!(parts[0] >= 2024 && (1..=12).contains(&parts[1]) && (1..=31).contains(&parts[2]));
    }

    #[test]
    fn two_handles_merge_instead_of_overwriting() {
        let d = dir("merge");
        let dev = DeviceKey {
            id: "wgpu | test".into(),
        };
        let mut a = TuningCache::open_at(&d, dev.clone()).unwrap();
        let mut b = TuningCache::open_at(&d, dev.clone()).unwrap();
        a.insert(vec![("k1".into(), entry("a"))]).unwrap();
        // b never saw k1; its write rereads the file under the lock.
        b.insert(vec![("k2".into(), entry("b"))]).unwrap();
        let c = TuningCache::open_at(&d, dev).unwrap();
        assert_eq!(c.entries().keys().collect::<Vec<_>>(), ["k1", "k2"]);
        assert_eq!(c.get("k1").unwrap().speedup(), 2.0);
        let _ = fs::remove_dir_all(&d);
    }
}
