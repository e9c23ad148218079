//! NCCL: a [`Communicator`] whose collectives run on CUDA device buffers, across the GPUs of
//! one process and across processes and nodes.
//!
//! - **Loaded at run time, by this module** (`libloading`, every entry point resolved at
//!   load), like NVRTC ([`crate::nvrtc`]): nothing NCCL is needed to build, and a machine
//!   without `libnccl.so.2` gets an error naming the library, what was searched and
//!   [`LIB_ENV`], never a panic. cudarc's `nccl` feature gives the types (the 128-byte
//!   [`sys::ncclUniqueId`], NCCL 2.30's [`sys::ncclConfig_t`], the data type and reduction
//!   enums); its own loader is not used: it tries `libnccl.so` and `libnccl.so.12`, not the
//!   `libnccl.so.2` that the `nvidia-nccl-cu12`/`-cu13` wheels and CUDA's packages install, and
//!   panics when none loads. Return codes are read as C `int`s, never as cudarc's Rust enum (a
//!   newer NCCL may return codes it lacks). [`library_candidates`] gives the search order.
//! - **Non-blocking communicators** (`ncclConfig_t::blocking = 0`, NCCL 2.14 or newer): every
//!   call returns at once and the rank polls `ncclCommGetAsyncError` and its stream
//!   (`cuStreamQuery`) until the operation is done, the communicator reports an error, another
//!   rank of this process fails, or [`NcclComm`]'s timeout passes. In the last three cases the
//!   rank calls `ncclCommAbort` (which also stops the NCCL kernels waiting for a peer) and
//!   returns the error, so a failing or missing rank ends the others instead of hanging them.
//!   An aborted communicator stays dead: every later call returns the first error.
//! - **Device buffers**: [`NcclComm::all_reduce_buffer`], [`NcclComm::all_gather_buffer`] and
//!   [`NcclComm::reduce_scatter_buffer`] run on [`CudaBuffer`]s of the rank's device, on its
//!   default stream (the stream every launch of [`CudaDevice`] uses, so they follow the
//!   kernels before them). A CUDA rank's program ([`crate::tp::DeviceSegments`]) calls them
//!   through [`crate::comm::DeviceComm`] on its own buffers (the all-reduce in place), so its
//!   activations never leave the device between segments. The [`Communicator`] methods, which
//!   take host slices, copy into a device buffer, run the collective there and copy back (the
//!   host path: collectives of inputs, weights and leaves, and [`crate::tp::HostCollectives`]).
//!   The log says which ran ([`Collective::on_device`]). Sums follow NCCL's
//!   order, not rank order: every rank gets the same bits (ring and tree all-reduces reduce
//!   each element once and broadcast it), which may differ from a rank-order sum in the last bits.
//! - **Rendezvous**: ranks of one process share a [`UniqueId`] made by [`UniqueId::new`]; across
//!   processes, rank 0 writes it to a file on a shared filesystem ([`write_rendezvous`]) and
//!   the others wait for it ([`read_rendezvous`], bounded by a timeout), or every process sets
//!   NCCL's own `NCCL_COMM_ID=host:port`, from which each derives the same id.

use std::ffi::{c_char, c_int, c_void, CStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
pub use cudarc::nccl::sys;
use transfuse_ir::{Data, Tensor};

use crate::comm::{Collective, CollectiveKind, Communicator};
use crate::cuda::{CudaBuffer, CudaDevice};
use crate::device::Device;
use crate::RuntimeError;

/// Environment variable naming `libnccl.so.2` itself or the folder holding it, searched first.
pub const LIB_ENV: &str = "TRANSFUSE_NCCL_LIB";
/// The library file names tried in each folder.
pub const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// Oldest NCCL accepted (`ncclGetVersion`'s code): non-blocking communicators came with 2.14.
pub const MIN_VERSION: i32 = 21400;
/// The NCCL version of cudarc's `ncclConfig_t` (2.30): the config's `version` is the smaller
/// of this and the library's, so NCCL reads only fields both know.
const BINDINGS_VERSION: i32 = 23000;

const SUCCESS: c_int = sys::ncclResult_t::ncclSuccess as c_int;
const IN_PROGRESS: c_int = sys::ncclResult_t::ncclInProgress as c_int;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Device {
        backend: "nccl".into(),
        msg: msg.into(),
    }
}

/// A comm handle (an opaque pointer NCCL owns).
type CommHandle = *mut c_void;
type Stream = *mut c_void;
type CollFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    CommHandle,
    Stream,
) -> c_int;
type GatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, CommHandle, Stream) -> c_int;
type P2pFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, CommHandle, Stream) -> c_int;

/// The NCCL entry points used here, resolved when the library is loaded (a missing one is an
/// error naming it). Signatures as nccl.h (and cudarc's bindings) declare them, enums as `int`.
struct Api {
    path: PathBuf,
    version: i32,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(CommHandle) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut sys::ncclUniqueId) -> c_int,
    comm_init_rank_config: unsafe extern "C" fn(
        *mut CommHandle,
        c_int,
        sys::ncclUniqueId,
        c_int,
        *mut sys::ncclConfig_t,
    ) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(CommHandle, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(CommHandle) -> c_int,
    all_reduce: CollFn,
    reduce_scatter: CollFn,
    all_gather: GatherFn,
    send: P2pFn,
    recv: P2pFn,
    /// Kept loaded for the life of the process (the function pointers point into it).
    _lib: libloading::Library,
}

impl Api {
    /// `ncclGetErrorString(r)` and, with a communicator, `ncclGetLastError`.
    fn describe(&self, comm: CommHandle, r: c_int) -> String {
        // SAFETY: ncclGetErrorString takes any value and returns a static string or null.
        let name = unsafe { (self.get_error_string)(r) };
        let mut s = if name.is_null() {
            format!("NCCL error {r}")
        } else {
            // SAFETY: non-null: a NUL-terminated static string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        // SAFETY: ncclGetLastError accepts null or a live communicator.
        let last = unsafe { (self.get_last_error)(comm) };
        if !last.is_null() {
            // SAFETY: as above.
            let l = unsafe { CStr::from_ptr(last) }.to_string_lossy();
            if !l.is_empty() {
                s = format!("{s} ({l})");
            }
        }
        s
    }
}

/// `ncclGetVersion`'s code as `major.minor.patch`.
pub fn version_string(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

/// One place to look for the library: where the path came from, and whether it was asked for
/// explicitly ([`LIB_ENV`]: then failing to load it is final, never a silent fallback).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// `$TRANSFUSE_NCCL_LIB`, `the loader's path`, or empty for a system folder.
    pub what: String,
    /// The file to open (a bare name is resolved by the dynamic loader).
    pub path: PathBuf,
    /// From [`LIB_ENV`].
    pub explicit: bool,
}

/// Where NCCL is looked for, in order; the first that loads is used:
///
/// 1. `$TRANSFUSE_NCCL_LIB`: the library file, or a folder holding one of [`LIB_NAMES`]; when
///    set, nothing else is tried;
/// 2. `$NCCL_HOME/lib`, `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`;
/// 3. the `nvidia-nccl-cu12` wheel installed into the transfuse cache
///    (`pip install --target ${TRANSFUSE_CACHE:-$HOME/.cache/transfuse}/nccl nvidia-nccl-cu12`):
///    `…/nccl/nvidia/nccl/lib`;
/// 4. the `system` folders in order ([`system_lib_dirs`]);
/// 5. the bare names, which the dynamic loader resolves through `LD_LIBRARY_PATH` and its
///    cache (`ldconfig`).
///
/// `var` reads an environment variable (unset or empty: skipped). Pure.
pub fn library_candidates(
    var: &dyn Fn(&str) -> Option<OsString>,
    system: &[PathBuf],
) -> Vec<Candidate> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut out = vec![];
    let folder = |out: &mut Vec<Candidate>, what: &str, dir: &Path, explicit: bool| {
        for n in LIB_NAMES {
            out.push(Candidate {
                what: what.to_string(),
                path: dir.join(n),
                explicit,
            });
        }
    };
    if let Some(p) = get(LIB_ENV) {
        if p.is_dir() {
            folder(&mut out, &format!("${LIB_ENV}"), &p, true);
        } else {
            out.push(Candidate {
                what: format!("${LIB_ENV}"),
                path: p,
                explicit: true,
            });
        }
        return out;
    }
    for (k, sub) in [
        ("NCCL_HOME", "lib"),
        ("CUDA_HOME", "lib64"),
        ("CUDA_PATH", "lib64"),
    ] {
        if let Some(d) = get(k) {
            folder(&mut out, &format!("${k}/{sub}"), &d.join(sub), false);
        }
    }
    let cache = get("TRANSFUSE_CACHE").or_else(|| get("HOME").map(|h| h.join(".cache/transfuse")));
    if let Some(c) = cache {
        folder(
            &mut out,
            "the cached nvidia-nccl wheel",
            &c.join("nccl/nvidia/nccl/lib"),
            false,
        );
    }
    for d in system {
        folder(&mut out, "", d, false);
    }
    for n in LIB_NAMES {
        out.push(Candidate {
            what: "the loader's path".into(),
            path: PathBuf::from(n),
            explicit: false,
        });
    }
    out
}

/// This machine's fixed places for NCCL, those that exist: the NVIDIA wheels of Python
/// environments (`nvidia/nccl/lib` of `nvidia-nccl-cu12`/`-cu13`, as PyTorch installs them, and
/// `nvidia/cu13/lib`) in the site-packages [`crate::nvrtc::system_lib_dirs`] searches, then
/// `/usr/local/cuda/lib64`, `/usr/lib/x86_64-linux-gnu`, `/usr/lib/aarch64-linux-gnu`,
/// `/usr/lib64` and `/usr/local/nccl/lib` (CUDA's and the distributions' packages).
pub fn system_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    for sp in crate::nvrtc::site_packages() {
        for sub in ["nvidia/nccl/lib", "nvidia/cu13/lib"] {
            dirs.push(sp.join(sub));
        }
    }
    dirs.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/local/nccl/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.retain(|d| d.is_dir());
    dirs
}

fn api() -> Result<&'static Api, RuntimeError> {
    static STATE: OnceLock<Result<Api, String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            load(&library_candidates(
                &|k| std::env::var_os(k),
                &system_lib_dirs(),
            ))
        })
        .as_ref()
        .map_err(|e| err(e.clone()))
}

/// Checks that NCCL 2.14 or newer can be loaded (computed once per process): an error naming
/// the library, the search and [`LIB_ENV`] when it cannot, never a panic. No GPU is needed.
pub fn available() -> Result<(), RuntimeError> {
    api().map(|_| ())
}

/// `ncclGetVersion` of the loaded library, e.g. `23007` for 2.30.7.
pub fn version() -> Result<i32, RuntimeError> {
    api().map(|a| a.version)
}

/// The file NCCL was loaded from.
pub fn library_path() -> Result<PathBuf, RuntimeError> {
    api().map(|a| a.path.clone())
}

/// Opens the first candidate that loads; the error lists the search and names [`LIB_ENV`].
fn load(candidates: &[Candidate]) -> Result<Api, String> {
    let mut tried: Vec<String> = vec![];
    let hint = format!(
        "set {LIB_ENV} to libnccl.so.2 or its folder (e.g. the nvidia-nccl-cu12 wheel's \
         nvidia/nccl/lib, or CUDA 13's /usr/lib/x86_64-linux-gnu)"
    );
    for c in candidates {
        let bare = c.path.components().count() == 1;
        if !bare && !c.path.exists() {
            if c.explicit {
                return Err(format!(
                    "NCCL (libnccl.so.2) not loaded: {} = {}: no such file; {hint}",
                    c.what,
                    c.path.display()
                ));
            }
            let dir = c
                .path
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            let line = if c.what.is_empty() {
                dir
            } else {
                format!("{} = {dir}", c.what)
            };
            if !tried.contains(&line) {
                tried.push(line);
            }
            continue;
        }
        match open(&c.path) {
            Ok(api) => return Ok(api),
            Err(e) if c.explicit => {
                return Err(format!(
                    "NCCL (libnccl.so.2) not loaded: {} = {}: {e}; {hint}",
                    c.what,
                    c.path.display()
                ))
            }
            Err(Open::Old(e)) => return Err(e),
            Err(Open::Unloadable(e)) => {
                // A bare name the loader does not find is the common case: name it briefly.
                let e = if bare { "not found".to_string() } else { e };
                tried.push(format!("{}: {e}", c.path.display()));
            }
            Err(Open::Failed(e)) => tried.push(format!("{}: {e}", c.path.display())),
        }
    }
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let ld = if ld.is_empty() { "unset".into() } else { ld };
    Err(format!(
        "NCCL (libnccl.so.2) not found: searched {}; LD_LIBRARY_PATH: {ld}; {hint}",
        tried.join(", ")
    ))
}

enum Open {
    /// Loaded, but older than [`MIN_VERSION`]: final.
    Old(String),
    /// The dynamic loader could not open it.
    Unloadable(String),
    /// Loaded, but missing an entry point.
    Failed(String),
}

impl std::fmt::Display for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Open::Old(s) | Open::Unloadable(s) | Open::Failed(s) => f.write_str(s),
        }
    }
}

fn open(path: &Path) -> Result<Api, Open> {
    // SAFETY: loading NCCL runs its initialisers, which have no preconditions (it opens the
    // CUDA driver lazily, at its first CUDA call).
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading's message is `dlopen failed`; the loader's own reason is its source.
        let why = std::error::Error::source(&e).map(|s| s.to_string());
        Open::Unloadable(why.unwrap_or_else(|| e.to_string()))
    })?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol's type is nccl.h's signature of that function (enums as int),
            // unchanged from 2.14 to 2.30.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| Open::Failed(format!("no {} in it: {e}", $name)))?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym!("ncclGetVersion");
    let mut version: c_int = 0;
    // SAFETY: a valid pointer.
    if unsafe { get_version(&mut version) } != SUCCESS {
        return Err(Open::Failed("ncclGetVersion failed".into()));
    }
    if version < MIN_VERSION {
        return Err(Open::Old(format!(
            "{}: NCCL {} is older than {} (non-blocking communicators)",
            path.display(),
            version_string(version),
            version_string(MIN_VERSION)
        )));
    }
    Ok(Api {
        path: path.to_path_buf(),
        version,
        get_error_string: sym!("ncclGetErrorString"),
        get_last_error: sym!("ncclGetLastError"),
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank_config: sym!("ncclCommInitRankConfig"),
        comm_get_async_error: sym!("ncclCommGetAsyncError"),
        comm_abort: sym!("ncclCommAbort"),
        all_reduce: sym!("ncclAllReduce"),
        reduce_scatter: sym!("ncclReduceScatter"),
        all_gather: sym!("ncclAllGather"),
        send: sym!("ncclSend"),
        recv: sym!("ncclRecv"),
        _lib: lib,
    })
}

/// The id every rank of one NCCL communicator is created with (`ncclUniqueId`, 128 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({}…)", &self.to_hex()[..16])
    }
}

impl UniqueId {
    /// `ncclGetUniqueId`: a new id whose bootstrap root listens in this process (so the process
    /// that makes it must be part of the job), or, with `NCCL_COMM_ID=host:port` set, the id of
    /// that address, the same in every process.
    pub fn new() -> Result<UniqueId, RuntimeError> {
        let api = api()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid pointer to an id.
        let r = unsafe { (api.get_unique_id)(&mut id) };
        if r != SUCCESS {
            return Err(err(format!(
                "ncclGetUniqueId: {}",
                api.describe(std::ptr::null_mut(), r)
            )));
        }
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }

    /// Lower-case hex, 256 digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads [`UniqueId::to_hex`]'s form.
    pub fn from_hex(s: &str) -> Result<UniqueId, String> {
        let s = s.trim();
        if s.len() != 256 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "an NCCL id is 256 hex digits; got {} characters",
                s.len()
            ));
        }
        let mut out = [0u8; 128];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(UniqueId(out))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

/// The first line of a rendezvous file.
const RENDEZVOUS_MAGIC: &str = "transfuse-nccl-id 1";

/// Writes `id` for a job of `world` ranks to `path`, for the other processes'
/// [`read_rendezvous`]: to a temporary file beside it, then renamed, so a reader never sees
/// half a file. A file already there is refused (a stale id from an earlier run would send the
/// others to a bootstrap root that no longer listens): remove it, or use a new path per run.
pub fn write_rendezvous(path: &Path, id: &UniqueId, world: usize) -> Result<(), String> {
    if path.exists() {
        return Err(format!(
            "{} exists (an id from an earlier run?): remove it or name a new file",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(format!("{}: no such folder", dir.display()));
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let text = format!("{RENDEZVOUS_MAGIC}\nworld {world}\n{}\n", id.to_hex());
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}: {e}", tmp.display(), path.display())
    })
}

/// Parses a rendezvous file's text for a job of `world` ranks.
pub fn parse_rendezvous(text: &str, world: usize) -> Result<UniqueId, String> {
    let mut lines = text.lines();
    if lines.next() != Some(RENDEZVOUS_MAGIC) {
        return Err(format!(
            "not a transfuse NCCL rendezvous file (its first line is not `{RENDEZVOUS_MAGIC}`)"
        ));
    }
    let w = lines
        .next()
        .and_then(|l| l.strip_prefix("world "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .ok_or("its second line is not `world N`")?;
    if w != world {
        return Err(format!(
            "written for a world of {w} ranks; this process runs a world of {world} (--tp)"
        ));
    }
    UniqueId::from_hex(lines.next().unwrap_or(""))
}

/// Waits for `path` to appear (rank 0's [`write_rendezvous`]) and reads its id, polling every
/// 50 ms for at most `timeout`.
pub fn read_rendezvous(path: &Path, world: usize, timeout: Duration) -> Result<UniqueId, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                return parse_rendezvous(&text, world)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not appear within {:.1}s (is rank 0's process running, on the same \
                 shared filesystem?)",
                path.display(),
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the ranks of one process share: the first failure, which every rank's poll loop sees.
#[derive(Default)]
struct Local {
    poison: Mutex<Option<String>>,
}

struct State {
    /// Null once aborted.
    comm: CommHandle,
    /// Why it was aborted.
    dead: Option<String>,
}

/// One rank of an NCCL communicator, on its own device (see the module docs).
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: Arc<CudaDevice>,
    timeout: Duration,
    local: Arc<Local>,
    state: Mutex<State>,
    log: Mutex<Vec<Collective>>,
}

// SAFETY: the communicator handle is only used under `state`'s lock (NCCL allows a
// communicator to be used from any thread, one call at a time); the device is Send + Sync.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

/// `ncclConfig_t` as `NCCL_CONFIG_INITIALIZER` makes it (every field undefined, so NCCL's
/// defaults), but non-blocking; `version` says which fields NCCL may read.
fn config(library: i32) -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: library.min(BINDINGS_VERSION) as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Backs off between polls: spins first (a collective of a small model takes microseconds),
/// then sleeps 100 µs.
fn backoff(polls: &mut u32) {
    *polls += 1;
    if *polls < 2000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl NcclComm {
    /// The ranks `first..first + devices.len()` of a communicator of `world` ranks made from
    /// `id`, rank `first + i` on `devices[i]`, each created on its own thread (NCCL needs
    /// every rank of the process to join at once). An error when NCCL is missing, when a rank
    /// fails to join, or when the others do not all join within `timeout` (every rank created
    /// so far is aborted).
    pub fn init(
        devices: Vec<Arc<CudaDevice>>,
        first: usize,
        world: usize,
        id: &UniqueId,
        timeout: Duration,
    ) -> Result<Vec<Arc<NcclComm>>, RuntimeError> {
        let api = api()?;
        if devices.is_empty() || first + devices.len() > world {
            return Err(err(format!(
                "ranks {first}..{} do not fit a world of {world}",
                first + devices.len()
            )));
        }
        let local = Arc::new(Local::default());
        let raw = id.raw();
        let results: Vec<Result<NcclComm, RuntimeError>> = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .into_iter()
                .enumerate()
                .map(|(i, device)| {
                    let local = local.clone();
                    s.spawn(move || {
                        let rank = first + i;
                        device
                            .context()
                            .bind_to_thread()
                            .map_err(|e| err(format!("rank {rank}: binding its device: {e:?}")))?;
                        let mut cfg = config(api.version);
                        let mut comm: CommHandle = std::ptr::null_mut();
                        // SAFETY: valid pointers; the device's context is current on this
                        // thread, which NCCL takes as the rank's device.
                        let r = unsafe {
                            (api.comm_init_rank_config)(
                                &mut comm,
                                world as c_int,
                                raw,
                                rank as c_int,
                                &mut cfg,
                            )
                        };
                        let c = NcclComm {
                            rank,
                            world,
                            device,
                            timeout,
                            local,
                            state: Mutex::new(State { comm, dead: None }),
                            log: Mutex::new(Vec::new()),
                        };
                        if r != SUCCESS && r != IN_PROGRESS {
                            let why = format!(
                                "rank {rank}: ncclCommInitRankConfig: {}",
                                api.describe(comm, r)
                            );
                            c.fail_with(why.clone());
                            return Err(err(why));
                        }
                        c.wait("joining the communicator", false)?;
                        Ok(c)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(err("a rank panicked while joining")))
                })
                .collect()
        });
        let mut comms = vec![];
        let mut first_err = None;
        for r in results {
            match r {
                Ok(c) => comms.push(Arc::new(c)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            for c in &comms {
                c.abort("another rank failed to join");
            }
            return Err(e);
        }
        Ok(comms)
    }

    /// The rank's device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Poisons this process's ranks with `why` (unless already) and aborts this rank's
    /// communicator; returns the poison.
    fn fail_with(&self, why: String) -> String {
        let why = {
            let mut p = self.local.poison.lock().unwrap_or_else(|p| p.into_inner());
            p.get_or_insert(why).clone()
        };
        self.kill(&why);
        why
    }

    /// `ncclCommAbort` (once); later calls return `why`.
    fn kill(&self, why: &str) {
        let mut st = self.lock();
        if !st.comm.is_null() {
            if let Ok(api) = api() {
                // SAFETY: a live communicator of this library; aborting is allowed while
                // operations are pending (it stops them).
                let _ = unsafe { (api.comm_abort)(st.comm) };
            }
            st.comm = std::ptr::null_mut();
        }
        st.dead.get_or_insert_with(|| why.to_string());
    }

    /// The live handle, or the error that killed it (or that poisoned this process's ranks).
    fn live(&self) -> Result<CommHandle, RuntimeError> {
        if let Some(p) = self.local_poison() {
            self.kill(&p);
            return Err(RuntimeError::Comm(p));
        }
        let st = self.lock();
        match &st.dead {
            Some(d) => Err(RuntimeError::Comm(format!(
                "the NCCL communicator was aborted: {d}"
            ))),
            None => Ok(st.comm),
        }
    }

    fn local_poison(&self) -> Option<String> {
        self.local
            .poison
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Polls until the last operation is done: the communicator's async state not in progress
    /// and (with `stream`) the device's stream idle. Ends early, aborting, on an NCCL or CUDA
    /// error, on another local rank's failure, or at the timeout.
    fn wait(&self, what: &str, stream: bool) -> Result<(), RuntimeError> {
        let api = api()?;
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0;
        loop {
            let comm = self.live()?;
            let mut state: c_int = SUCCESS;
            // SAFETY: a live communicator; a valid pointer.
            let r = unsafe { (api.comm_get_async_error)(comm, &mut state) };
            let r = if r != SUCCESS { r } else { state };
            if r == SUCCESS {
                if !stream {
                    return Ok(());
                }
                // SAFETY: the NULL stream of the context current on this thread (the rank's,
                // bound before the operation).
                match unsafe { cu::cuStreamQuery(std::ptr::null_mut()) } {
                    cu::CUresult::CUDA_SUCCESS => return Ok(()),
                    cu::CUresult::CUDA_ERROR_NOT_READY => {}
                    e => {
                        let why = format!("rank {}: {what}: the device failed: {e:?}", self.rank);
                        return Err(RuntimeError::Comm(self.fail_with(why)));
                    }
                }
            } else if r != IN_PROGRESS {
                let why = format!("rank {}: {what}: {}", self.rank, api.describe(comm, r));
                return Err(RuntimeError::Comm(self.fail_with(why)));
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "rank {}: {what} timed out after {:.1}s: another rank never arrived \
                     (TRANSFUSE_TP_TIMEOUT)",
                    self.rank,
                    self.timeout.as_secs_f64()
                );
                return Err(RuntimeError::Comm(self.fail_with(why)));
            }
            backoff(&mut polls);
        }
    }

    /// Binds the rank's device, enqueues `op` on its default stream and waits for it.
    fn run(
        &self,
        what: &str,
        op: impl FnOnce(&Api, CommHandle) -> c_int,
    ) -> Result<(), RuntimeError> {
        let api = api()?;
        let comm = self.live()?;
        self.device.context().bind_to_thread().map_err(|e| {
            RuntimeError::Comm(self.fail_with(format!(
                "rank {}: {what}: binding its device: {e:?}",
                self.rank
            )))
        })?;
        let r = op(api, comm);
        if r != SUCCESS && r != IN_PROGRESS {
            let why = format!("rank {}: {what}: {}", self.rank, api.describe(comm, r));
            return Err(RuntimeError::Comm(self.fail_with(why)));
        }
        self.wait(what, true)
    }

    fn check_len(&self, what: &str, buf: &CudaBuffer, bytes: usize) -> Result<(), RuntimeError> {
        if (buf.bytes() as usize) < bytes {
            return Err(RuntimeError::Comm(format!(
                "rank {}: {what}: a buffer of {} bytes for {bytes}",
                self.rank,
                buf.bytes()
            )));
        }
        Ok(())
    }

    /// In place: the first `elems` f32 of `buf` become their sum over the ranks.
    pub fn all_reduce_buffer(&self, buf: &CudaBuffer, elems: usize) -> Result<(), RuntimeError> {
        self.check_len("all_reduce", buf, 4 * elems)?;
        let p = self.device.ptr(buf) as *mut c_void;
        self.run("all_reduce", |api, comm| {
            // SAFETY: `p` holds `elems` f32 on the rank's device (checked); in place is allowed.
            unsafe {
                (api.all_reduce)(
                    p,
                    p,
                    elems,
                    sys::ncclDataType_t::ncclFloat32 as c_int,
                    sys::ncclRedOp_t::ncclSum as c_int,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    /// `out` (`world × elems` f32) gets every rank's first `elems` f32 of `buf`, in rank order.
    pub fn all_gather_buffer(
        &self,
        buf: &CudaBuffer,
        out: &CudaBuffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        self.check_len("all_gather", buf, 4 * elems)?;
        self.check_len("all_gather", out, 4 * elems * self.world)?;
        let (p, q) = (self.device.ptr(buf), self.device.ptr(out));
        self.run("all_gather", |api, comm| {
            // SAFETY: both buffers live on the rank's device with the sizes checked.
            unsafe {
                (api.all_gather)(
                    p as *const c_void,
                    q as *mut c_void,
                    elems,
                    sys::ncclDataType_t::ncclFloat32 as c_int,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    /// `out` (`elems / world` f32) gets this rank's chunk of the sum over ranks of `buf`'s
    /// first `elems` f32 (`elems` a multiple of the world).
    pub fn reduce_scatter_buffer(
        &self,
        buf: &CudaBuffer,
        out: &CudaBuffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        if !elems.is_multiple_of(self.world) {
            return Err(RuntimeError::Comm(format!(
                "reduce_scatter: rank {} has {elems} elements, not a multiple of the world {}",
                self.rank, self.world
            )));
        }
        let chunk = elems / self.world;
        self.check_len("reduce_scatter", buf, 4 * elems)?;
        self.check_len("reduce_scatter", out, 4 * chunk)?;
        let (p, q) = (self.device.ptr(buf), self.device.ptr(out));
        self.run("reduce_scatter", |api, comm| {
            // SAFETY: both buffers live on the rank's device with the sizes checked.
            unsafe {
                (api.reduce_scatter)(
                    p as *const c_void,
                    q as *mut c_void,
                    chunk,
                    sys::ncclDataType_t::ncclFloat32 as c_int,
                    sys::ncclRedOp_t::ncclSum as c_int,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn upload(&self, data: &[u8], what: &str) -> Result<CudaBuffer, RuntimeError> {
        let b = self.device.alloc(data.len() as u64, what)?;
        self.device.write(&b, data)?;
        Ok(b)
    }

    fn download_f32(&self, buf: &CudaBuffer, elems: usize) -> Result<Vec<f32>, RuntimeError> {
        let bytes = self.device.read(buf, 4 * elems as u64)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn record(&self, kind: CollectiveKind, elems: usize) {
        self.record_on(kind, elems, false)
    }

    fn record_on(&self, kind: CollectiveKind, elems: usize, on_device: bool) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Collective {
                kind,
                elems,
                on_device,
            });
    }

    fn check_peer(&self, what: &str, peer: usize) -> Result<(), RuntimeError> {
        if peer >= self.world || peer == self.rank {
            return Err(RuntimeError::Comm(format!(
                "{what}: rank {} cannot address rank {peer} in a group of {}",
                self.rank, self.world
            )));
        }
        Ok(())
    }

    /// `ncclSend`/`ncclRecv` of `bytes` bytes (as `ncclUint8`) of `buf` with `peer`.
    fn p2p(
        &self,
        send: bool,
        buf: &CudaBuffer,
        bytes: usize,
        peer: usize,
    ) -> Result<(), RuntimeError> {
        let p = self.device.ptr(buf) as *mut c_void;
        let what = if send { "send" } else { "recv" };
        self.run(what, |api, comm| {
            let f = if send { api.send } else { api.recv };
            // SAFETY: `buf` holds at least `bytes` bytes on the rank's device.
            unsafe {
                f(
                    p,
                    bytes,
                    sys::ncclDataType_t::ncclUint8 as c_int,
                    peer as c_int,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: it never waits for the peers (which may be gone).
        self.kill("dropped");
    }
}

/// A tensor's header on the wire: dtype code, rank, up to 6 dims, as little-endian i64.
const HEADER_WORDS: usize = 8;

fn tensor_bytes(t: &Tensor) -> Result<(i64, Vec<u8>), RuntimeError> {
    Ok(match &t.data {
        Data::F32(v) => (0, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Data::I64(v) => (1, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Data::Bool(v) => (2, v.iter().map(|&b| b as u8).collect()),
        Data::F16(v) => (3, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Data::BF16(v) => (4, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    })
}

fn tensor_from(code: i64, shape: Vec<usize>, b: &[u8]) -> Result<Tensor, RuntimeError> {
    let data = match code {
        0 => Data::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        1 => Data::I64(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        2 => Data::Bool(b.iter().map(|&x| x != 0).collect()),
        3 => Data::F16(
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        4 => Data::BF16(
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        c => return Err(RuntimeError::Comm(format!("recv: unknown dtype code {c}"))),
    };
    Ok(Tensor { shape, data })
}

fn elem_bytes(code: i64) -> usize {
    match code {
        0 => 4,
        1 => 8,
        2 => 1,
        _ => 2,
    }
}

impl NcclComm {
    fn same_device(&self, dev: &CudaDevice, what: &str) -> Result<(), RuntimeError> {
        if std::ptr::eq(dev, Arc::as_ptr(&self.device)) {
            return Ok(());
        }
        Err(RuntimeError::Comm(format!(
            "rank {}: {what}: the buffers are on another device than the communicator's",
            self.rank
        )))
    }
}

/// The collectives of a CUDA rank's program ([`crate::tp::DeviceSegments`]): NCCL on its
/// buffers, in place for the all-reduce, no host copy.
impl crate::comm::DeviceComm<CudaDevice> for NcclComm {
    fn all_reduce_device(
        &self,
        dev: &CudaDevice,
        buf: &CudaBuffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        self.same_device(dev, "all_reduce")?;
        self.record_on(CollectiveKind::AllReduce, elems, true);
        self.all_reduce_buffer(buf, elems)
    }

    fn all_gather_device(
        &self,
        dev: &CudaDevice,
        buf: &CudaBuffer,
        out: &CudaBuffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        self.same_device(dev, "all_gather")?;
        self.record_on(CollectiveKind::AllGather, elems, true);
        self.all_gather_buffer(buf, out, elems)
    }

    fn reduce_scatter_device(
        &self,
        dev: &CudaDevice,
        buf: &CudaBuffer,
        out: &CudaBuffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        self.same_device(dev, "reduce_scatter")?;
        self.record_on(CollectiveKind::ReduceScatter, elems, true);
        self.reduce_scatter_buffer(buf, out, elems)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), RuntimeError> {
        self.record(CollectiveKind::AllReduce, data.len());
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = self.upload(&bytes, "all_reduce")?;
        self.all_reduce_buffer(&b, data.len())?;
        data.copy_from_slice(&self.download_f32(&b, data.len())?);
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.record(CollectiveKind::AllGather, data.len());
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = self.upload(&bytes, "all_gather")?;
        let out = self
            .device
            .alloc(4 * (data.len() * self.world) as u64, "all_gather")?;
        self.all_gather_buffer(&b, &out, data.len())?;
        let all = self.download_f32(&out, data.len() * self.world)?;
        Ok(all
            .chunks(data.len().max(1))
            .take(self.world)
            .map(<[f32]>::to_vec)
            .chain(std::iter::repeat_with(Vec::new))
            .take(self.world)
            .collect())
    }

    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>, RuntimeError> {
        self.record(CollectiveKind::ReduceScatter, data.len());
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = self.upload(&bytes, "reduce_scatter")?;
        let chunk = data.len() / self.world.max(1);
        let out = self.device.alloc(4 * chunk as u64, "reduce_scatter")?;
        self.reduce_scatter_buffer(&b, &out, data.len())?;
        self.download_f32(&out, chunk)
    }

    /// A header (dtype, shape) then the data, each an `ncclSend`; unlike the in-process
    /// group's, it waits (at most the timeout) for the receiver's matching `recv`.
    fn send(&self, to: usize, t: Tensor) -> Result<(), RuntimeError> {
        self.check_peer("send", to)?;
        if t.shape.len() > HEADER_WORDS - 2 {
            return Err(RuntimeError::Comm(format!(
                "send: a tensor of rank {} (at most {} travel)",
                t.shape.len(),
                HEADER_WORDS - 2
            )));
        }
        self.record(CollectiveKind::Send, t.len());
        let (code, data) = tensor_bytes(&t)?;
        let mut header = [0i64; HEADER_WORDS];
        header[0] = code;
        header[1] = t.shape.len() as i64;
        for (h, &d) in header[2..].iter_mut().zip(&t.shape) {
            *h = d as i64;
        }
        let hb: Vec<u8> = header.iter().flat_map(|x| x.to_le_bytes()).collect();
        let h = self.upload(&hb, "send")?;
        self.p2p(true, &h, hb.len(), to)?;
        if !data.is_empty() {
            let d = self.upload(&data, "send")?;
            self.p2p(true, &d, data.len(), to)?;
        }
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor, RuntimeError> {
        self.check_peer("recv", from)?;
        let h = self.device.alloc(8 * HEADER_WORDS as u64, "recv")?;
        self.p2p(false, &h, 8 * HEADER_WORDS, from)?;
        let hb = self.device.read(&h, 8 * HEADER_WORDS as u64)?;
        let header: Vec<i64> = hb
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (code, ndim) = (header[0], header[1] as usize);
        if ndim > HEADER_WORDS - 2 || header[2..2 + ndim].iter().any(|&d| d < 0) {
            return Err(RuntimeError::Comm(format!(
                "recv from rank {from}: a malformed header {header:?}"
            )));
        }
        let shape: Vec<usize> = header[2..2 + ndim].iter().map(|&d| d as usize).collect();
        let bytes = shape.iter().product::<usize>() * elem_bytes(code);
        let data = if bytes == 0 {
            vec![]
        } else {
            let d = self.device.alloc(bytes as u64, "recv")?;
            self.p2p(false, &d, bytes, from)?;
            self.device.read(&d, bytes as u64)?
        };
        let t = tensor_from(code, shape, &data)?;
        self.record(CollectiveKind::Recv, t.len());
        Ok(t)
    }

    fn abort(&self, why: &str) {
        self.fail_with(why.to_string());
    }

    fn poisoned(&self) -> Option<String> {
        self.local_poison().or_else(|| self.lock().dead.clone())
    }

    fn take_log(&self) -> Vec<Collective> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: Vec<(&'static str, PathBuf)>) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone().into_os_string())
        }
    }

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p =
                std::env::temp_dir().join(format!("transfuse-nccl-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_lib_variable_is_the_only_candidate_when_set() {
        let v = vars(vec![
            (LIB_ENV, PathBuf::from("/opt/nccl/libnccl.so.2")),
            ("CUDA_HOME", PathBuf::from("/cuda")),
        ]);
        let c = library_candidates(&v, &[PathBuf::from("/sys")]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].path, PathBuf::from("/opt/nccl/libnccl.so.2"));
        assert!(c[0].explicit);
    }

    #[test]
    fn the_search_goes_from_the_homes_to_the_wheel_to_the_system_to_the_loader() {
        let v = vars(vec![
            ("CUDA_HOME", PathBuf::from("/cuda")),
            ("TRANSFUSE_CACHE", PathBuf::from("/c")),
        ]);
        let c = library_candidates(&v, &[PathBuf::from("/sys")]);
        let paths: Vec<String> = c.iter().map(|c| c.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/cuda/lib64/libnccl.so.2",
                "/cuda/lib64/libnccl.so",
                "/c/nccl/nvidia/nccl/lib/libnccl.so.2",
                "/c/nccl/nvidia/nccl/lib/libnccl.so",
                "/sys/libnccl.so.2",
                "/sys/libnccl.so",
                "libnccl.so.2",
                "libnccl.so",
            ]
        );
        assert!(c.iter().all(|c| !c.explicit));
    }

    #[test]
    fn a_missing_explicit_library_is_an_error_naming_the_variable() {
        let c = [Candidate {
            what: format!("${LIB_ENV}"),
            path: PathBuf::from("/nonexistent/libnccl.so.2"),
            explicit: true,
        }];
        let e = load(&c).err().expect("an error");
        assert!(
            e.contains("$TRANSFUSE_NCCL_LIB = /nonexistent/libnccl.so.2: no such file"),
            "{e}"
        );
        assert!(e.contains("libnccl.so.2"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_nccl_fails_to_open_without_a_panic() {
        let t = Tmp::new("notlib");
        let f = t.0.join("libnccl.so.2");
        std::fs::write(&f, b"not an ELF file").unwrap();
        let c = [Candidate {
            what: format!("${LIB_ENV}"),
            path: f.clone(),
            explicit: true,
        }];
        let e = load(&c).err().expect("an error");
        assert!(
            e.contains(&f.display().to_string()) && e.contains(LIB_ENV),
            "{e}"
        );
    }

    #[test]
    fn a_library_without_nccl_is_skipped_when_searched_and_named_when_explicit() {
        // libm is on every glibc system: it loads but has no ncclGetVersion.
        let libm = PathBuf::from("libm.so.6");
        let searched = [Candidate {
            what: String::new(),
            path: libm.clone(),
            explicit: false,
        }];
        let e = load(&searched).err().expect("an error");
        assert!(e.contains("not found") && e.contains(LIB_ENV), "{e}");
        let explicit = [Candidate {
            what: format!("${LIB_ENV}"),
            path: libm,
            explicit: true,
        }];
        let e = load(&explicit).err().expect("an error");
        assert!(e.contains("no ncclGetVersion in it"), "{e}");
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let mut raw = [0u8; 128];
        raw.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7) as u8);
        let id = UniqueId(raw);
        assert_eq!(UniqueId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(UniqueId::from_hex("abc").is_err());
        assert!(UniqueId::from_hex(&"zz".repeat(128)).is_err());
    }

    #[test]
    fn a_rendezvous_file_is_written_once_and_read_by_the_others() {
        let t = Tmp::new("rdv");
        let path = t.0.join("id");
        let id = UniqueId([42; 128]);
        write_rendezvous(&path, &id, 4).unwrap();
        assert_eq!(
            read_rendezvous(&path, 4, Duration::from_millis(10)).unwrap(),
            id
        );
        // A second writer (a stale file) is refused.
        let e = write_rendezvous(&path, &id, 4).unwrap_err();
        assert!(e.contains("exists"), "{e}");
        // Another world size is an error naming --tp.
        let e = read_rendezvous(&path, 2, Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("world of 4") && e.contains("--tp"), "{e}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&t.0).unwrap().flatten().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn a_reader_waits_for_the_writer() {
        let t = Tmp::new("wait");
        let path = t.0.join("id");
        let id = UniqueId([7; 128]);
        std::thread::scope(|s| {
            let reader = s.spawn(|| read_rendezvous(&path, 2, Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(100));
            write_rendezvous(&path, &id, 2).unwrap();
            assert_eq!(reader.join().unwrap().unwrap(), id);
        });
    }

    #[test]
    fn a_reader_gives_up_at_the_timeout() {
        let t = Tmp::new("timeout");
        let e = read_rendezvous(&t.0.join("never"), 2, Duration::from_millis(120)).unwrap_err();
        assert!(e.contains("did not appear within"), "{e}");
    }

    #[test]
    fn malformed_rendezvous_files_are_errors() {
        assert!(parse_rendezvous("hello", 2)
            .unwrap_err()
            .contains("not a transfuse"));
        let e = parse_rendezvous(&format!("{RENDEZVOUS_MAGIC}\nworld x\n"), 2).unwrap_err();
        assert!(e.contains("world N"), "{e}");
        let e = parse_rendezvous(&format!("{RENDEZVOUS_MAGIC}\nworld 2\n00\n"), 2).unwrap_err();
        assert!(e.contains("256 hex digits"), "{e}");
    }

    #[test]
    fn a_writer_needs_an_existing_folder() {
        let e = write_rendezvous(Path::new("/nonexistent-dir/x/id"), &UniqueId([0; 128]), 2)
            .unwrap_err();
        assert!(e.contains("no such folder"), "{e}");
    }

    #[test]
    fn the_config_is_non_blocking_and_versioned_for_both_sides() {
        let c = config(22703);
        assert_eq!(c.blocking, 0);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 22703);
        assert_eq!(config(23107).version, BINDINGS_VERSION as u32);
        assert_eq!(c.cgaClusterSize, c_int::MIN);
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
    }

    #[test]
    fn tensors_cross_the_wire_format() {
        let t = Tensor::f32(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.0]);
        let (code, b) = tensor_bytes(&t).unwrap();
        assert_eq!(tensor_from(code, t.shape.clone(), &b).unwrap(), t);
        let t = Tensor::i64(vec![3], vec![1, -2, 1 << 40]);
        let (code, b) = tensor_bytes(&t).unwrap();
        assert_eq!(b.len(), 3 * elem_bytes(code));
        assert_eq!(tensor_from(code, t.shape.clone(), &b).unwrap(), t);
    }
}
