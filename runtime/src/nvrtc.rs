//! CUDA C → PTX / SASS through NVRTC, the CUDA run-time compiler, on machines with or without
//! a GPU.
//!
//! NVRTC is loaded at run time, by this module itself (`libloading`, every entry point resolved
//! at load): nothing CUDA is needed to build the workspace, and when no NVRTC can be found
//! every function here returns [`NvrtcError::Unavailable`], listing what was searched, instead
//! of panicking. CUDA 12 (`libnvrtc.so.12`) and CUDA 13 (`libnvrtc.so.13`) are both accepted
//! ([`library_candidates`] gives the search order; cudarc's own NVRTC loader, which knows only
//! `libnvrtc.so` and `.so.12`, is not used). `scripts/fetch-nvrtc.sh` installs NVRTC 12.9 (and
//! the CUDA headers) from pinned PyPI wheels; `scripts/test.sh` then puts its folder on
//! `LD_LIBRARY_PATH` and exports:
//!
//! - `TRANSFUSE_NVRTC_LIB`: the folder holding `libnvrtc.so.13` or `libnvrtc.so.12` (or the
//!   library file itself), searched first.
//! - `TRANSFUSE_CUDA_INCLUDE`: the folder holding `cuda_fp16.h`, `cuda_bf16.h`, … (NVRTC 12.9
//!   has no built-in copies); passed to every compilation as `--include-path`. Unset, the
//!   headers are looked for under `CUDA_PATH`, `CUDA_HOME`, the wheel fetch-nvrtc.sh installs,
//!   `/usr/local/cuda/include` and Python's site-packages ([`search_cuda_include`]); a source
//!   that includes them when none has them is [`NvrtcError::NoCudaHeaders`], listing the search.
//!
//! [`compile_ptx`] gives PTX for a virtual architecture (`compute_80`, `compute_90`), what the
//! CUDA backend loads ([`compile_cubin`] a cubin instead, when the driver is too old to JIT
//! that PTX; [`supported_archs`] says what this NVRTC targets). [`compile_sass`] compiles all
//! the way to a cubin for a real architecture (`sm_90`) with `--ptxas-options=-v` and returns,
//! per kernel, the registers, spills and static shared memory ptxas reported: what a codegen
//! test checks without a GPU.
//!
//! ```
//! use transfuse_runtime::nvrtc;
//!
//! let src = r#"extern "C" __global__ void scale(float* x, float a, int n) {
//!     int i = blockIdx.x * blockDim.x + threadIdx.x;
//!     if (i < n) x[i] *= a;
//! }"#;
//! match nvrtc::available() {
//!     Ok(()) => {
//!         let ptx = nvrtc::compile_ptx(src, "scale.cu", "compute_80", &[]).unwrap();
//!         assert!(ptx.contains(".entry scale"));
//!         let sass = nvrtc::compile_sass(src, "scale.cu", "sm_90").unwrap();
//!         assert_eq!(sass.kernels[0].name, "scale");
//!         assert_eq!(sass.kernels[0].spill_stores_bytes, 0);
//!     }
//!     Err(e) => eprintln!("skipping: {e}"),
//! }
//! ```

use std::ffi::{c_char, c_int, CStr, CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming the folder that holds `libnvrtc.so.13` / `.so.12` (or the file).
pub const LIB_ENV: &str = "TRANSFUSE_NVRTC_LIB";
/// Environment variable naming the CUDA include folder (`cuda_fp16.h`, `cuda_bf16.h`).
pub const INCLUDE_ENV: &str = "TRANSFUSE_CUDA_INCLUDE";

/// Errors of loading NVRTC or compiling with it. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvrtcError {
    /// `libnvrtc` could not be loaded.
    #[error(
        "NVRTC is not available: no libnvrtc.so.13, libnvrtc.so.12 or libnvrtc.so could be \
         loaded ({why}); run scripts/fetch-nvrtc.sh and put the folder it prints last in \
         {LIB_ENV} (or on LD_LIBRARY_PATH); scripts/test.sh does both"
    )]
    Unavailable {
        /// What was searched and where.
        why: String,
    },
    /// The loaded NVRTC is older than 12.0 (it may lack entry points used here).
    #[error("NVRTC {major}.{minor} is too old: 12.0 or newer is needed (scripts/fetch-nvrtc.sh installs 12.9)")]
    TooOld {
        /// Major version reported by `nvrtcVersion`.
        major: i32,
        /// Minor version reported by `nvrtcVersion`.
        minor: i32,
    },
    /// The source includes `cuda_fp16.h` / `cuda_bf16.h` and no searched folder has them.
    #[error(
        "`{name}` includes cuda_fp16.h/cuda_bf16.h, which NVRTC has no built-in copy of, and \
         no folder searched holds cuda_fp16.h (searched: {searched}); run scripts/fetch-nvrtc.sh \
         or set {INCLUDE_ENV} to the folder holding it"
    )]
    NoCudaHeaders {
        /// The program name.
        name: String,
        /// Every place searched, in order.
        searched: String,
    },
    /// The source, name or an option contains a NUL byte.
    #[error("`{name}`: {what} contains a NUL byte")]
    Nul {
        /// The program name.
        name: String,
        /// Which argument.
        what: String,
    },
    /// NVRTC rejected the program or its options; `log` is NVRTC's program log.
    #[error("NVRTC failed to compile `{name}` for {arch} ({code}):\n{log}")]
    Compile {
        /// The program name.
        name: String,
        /// The target architecture.
        arch: String,
        /// The NVRTC result code, e.g. `NVRTC_ERROR_COMPILATION`.
        code: String,
        /// The NVRTC program log: the compiler's diagnostics.
        log: String,
    },
    /// Another NVRTC call failed.
    #[error("NVRTC call {call} failed for `{name}`: {code}")]
    Call {
        /// The program name.
        name: String,
        /// The NVRTC function.
        call: &'static str,
        /// The NVRTC result code.
        code: String,
    },
    /// The ptxas report in the log of a SASS compilation could not be read.
    #[error("could not read the ptxas report for `{name}`: {why}\n{log}")]
    Report {
        /// The program name.
        name: String,
        /// What was wrong.
        why: String,
        /// The whole program log.
        log: String,
    },
}

/// The resources ptxas reported for one kernel (`__global__` function).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelResources {
    /// The entry name as ptxas prints it (mangled unless declared `extern "C"`).
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores to local memory.
    pub spill_stores_bytes: u32,
    /// Bytes of spill loads from local memory.
    pub spill_loads_bytes: u32,
    /// Bytes of static shared memory (`smem`); dynamic shared memory is not included.
    pub shared_bytes: u32,
}

/// The result of [`compile_sass`]: the cubin's size and each kernel's resources.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SassInfo {
    /// Size of the cubin NVRTC produced, in bytes.
    pub cubin_bytes: usize,
    /// One entry per kernel, in ptxas order.
    pub kernels: Vec<KernelResources>,
}

impl SassInfo {
    /// The kernel called `name`, if any.
    pub fn kernel(&self, name: &str) -> Option<&KernelResources> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

/// Checks that NVRTC 12 or newer can be loaded. Every other function here calls it first;
/// call it to decide whether to skip CUDA work. The result is computed once per process.
///
/// NVRTC is opened here, not through cudarc (whose loader only knows `libnvrtc.so` and
/// `libnvrtc.so.12` and panics without them): see [`library_candidates`] for the search.
pub fn available() -> Result<(), NvrtcError> {
    api().map(|_| ())
}

/// The loaded library: its path and entry points.
fn api() -> Result<&'static Api, NvrtcError> {
    static STATE: OnceLock<Result<Api, NvrtcError>> = OnceLock::new();
    STATE.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The version of the loaded NVRTC, e.g. `(12, 9)`.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    api().map(|a| a.version)
}

/// The file NVRTC was loaded from (a candidate of [`library_candidates`], as found).
pub fn library_path() -> Result<PathBuf, NvrtcError> {
    api().map(|a| a.path.clone())
}

/// `nvrtcProgram`: an opaque handle.
type ProgramHandle = *mut std::ffi::c_void;
/// `nvrtcResult`, as the C `int` it is (NVRTC 13 may return codes the 12.9 bindings lack, so it
/// is never read as cudarc's Rust enum).
type NvResult = c_int;
const NVRTC_SUCCESS: NvResult = 0;

type SizeFn = unsafe extern "C" fn(ProgramHandle, *mut usize) -> NvResult;
type GetFn = unsafe extern "C" fn(ProgramHandle, *mut c_char) -> NvResult;

/// The NVRTC entry points used here, resolved all at once when the library is loaded: a
/// symbol missing from some NVRTC version is an [`NvrtcError::Unavailable`] naming it, not a
/// panic at its first call. Every one exists in NVRTC 12.0 through 13.x (13.0 removed only
/// `nvrtcGetNVVM*`, unused here).
struct Api {
    path: PathBuf,
    version: (i32, i32),
    get_error_string: unsafe extern "C" fn(NvResult) -> *const c_char,
    get_num_supported_archs: unsafe extern "C" fn(*mut c_int) -> NvResult,
    get_supported_archs: unsafe extern "C" fn(*mut c_int) -> NvResult,
    #[allow(clippy::type_complexity)]
    create_program: unsafe extern "C" fn(
        *mut ProgramHandle,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvResult,
    compile_program: unsafe extern "C" fn(ProgramHandle, c_int, *const *const c_char) -> NvResult,
    destroy_program: unsafe extern "C" fn(*mut ProgramHandle) -> NvResult,
    get_ptx_size: SizeFn,
    get_ptx: GetFn,
    get_cubin_size: SizeFn,
    get_cubin: GetFn,
    get_log_size: SizeFn,
    get_log: GetFn,
    /// Kept loaded for the life of the process (the function pointers point into it).
    _lib: libloading::Library,
}

impl Api {
    /// `nvrtcGetErrorString`, e.g. `NVRTC_ERROR_COMPILATION`.
    fn error_name(&self, r: NvResult) -> String {
        // SAFETY: nvrtcGetErrorString takes any value and returns a static string (or null).
        let p = unsafe { (self.get_error_string)(r) };
        if p.is_null() {
            return format!("NVRTC error {r}");
        }
        // SAFETY: a non-null result is a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, r: NvResult, name: &str, call: &'static str) -> Result<(), NvrtcError> {
        if r == NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(NvrtcError::Call {
                name: name.to_string(),
                call,
                code: self.error_name(r),
            })
        }
    }
}

/// The library file names tried in each folder, newest first.
pub const LIB_NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Where NVRTC is looked for, in order; the first that loads (and is 12.0 or newer) is used:
///
/// 1. `$TRANSFUSE_NVRTC_LIB`: a library file itself, or a folder holding one of [`LIB_NAMES`]
///    (`libnvrtc.so.13` from CUDA 13, `libnvrtc.so.12` from CUDA 12, then `libnvrtc.so`);
/// 2. `$CUDA_PATH/lib64`, `$CUDA_HOME/lib64`;
/// 3. the wheel `scripts/fetch-nvrtc.sh` installs:
///    `${TRANSFUSE_CACHE:-$HOME/.cache/transfuse}/nvrtc/nvidia/cuda_nvrtc/lib`;
/// 4. the `system` folders in order ([`system_lib_dirs`]: `/usr/local/cuda/lib64`, then the
///    NVIDIA wheels of Python environments: `nvidia/cu13/lib` (CUDA 13's wheels, as PyTorch
///    cu130 installs them) and `nvidia/cuda_nvrtc/lib` (CUDA 12's));
/// 5. the bare names, which the dynamic loader resolves through `LD_LIBRARY_PATH` and its
///    cache (`ldconfig`).
///
/// `var` reads an environment variable (unset or empty: skipped). Pure: the result is a list of
/// (what, path) to try, with `what` naming its origin for the error message.
pub fn library_candidates(
    var: &dyn Fn(&str) -> Option<OsString>,
    system: &[PathBuf],
) -> Vec<(String, PathBuf)> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut out = vec![];
    let folder = |out: &mut Vec<(String, PathBuf)>, what: String, dir: &Path| {
        for n in LIB_NAMES {
            out.push((what.clone(), dir.join(n)));
        }
    };
    if let Some(p) = get(LIB_ENV) {
        if p.is_dir() {
            folder(&mut out, format!("${LIB_ENV}"), &p);
        } else {
            out.push((format!("${LIB_ENV}"), p));
        }
    }
    for k in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(d) = get(k) {
            folder(&mut out, format!("${k}/lib64"), &d.join("lib64"));
        }
    }
    let cache = get("TRANSFUSE_CACHE").or_else(|| get("HOME").map(|h| h.join(".cache/transfuse")));
    if let Some(c) = cache {
        folder(
            &mut out,
            "the fetch-nvrtc.sh wheel".into(),
            &c.join("nvrtc/nvidia/cuda_nvrtc/lib"),
        );
    }
    for d in system {
        folder(&mut out, String::new(), d);
    }
    for n in LIB_NAMES {
        out.push(("the loader's path".into(), PathBuf::from(n)));
    }
    out
}

/// This machine's fixed places for NVRTC: `/usr/local/cuda/lib64`, then, in the site-packages
/// of `$VIRTUAL_ENV`, of every `PATH` entry's parent that ends in `bin` (a virtualenv such as
/// `/opt/torch/.venv`), `~/.local`, `/usr/local` and `/usr`: `nvidia/cu13/lib` and
/// `nvidia/cuda_nvrtc/lib` (those that exist).
pub fn system_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/local/cuda/lib64")];
    for sp in site_packages() {
        for sub in ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"] {
            dirs.push(sp.join(sub));
        }
    }
    // /usr/local/cuda/lib64 stays listed (an error names it); wheels only where they exist.
    let wheels = dirs.split_off(1);
    dirs.extend(wheels.into_iter().filter(|d| d.is_dir()));
    dirs
}

/// Python site-packages folders that exist, of the prefixes [`system_lib_dirs`] names.
pub(crate) fn site_packages() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = vec![];
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        prefixes.push(v.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for p in std::env::split_paths(&path) {
            if p.file_name().is_some_and(|n| n == "bin") {
                if let Some(parent) = p.parent() {
                    prefixes.push(parent.to_path_buf());
                }
            }
        }
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        prefixes.push(PathBuf::from(h).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
    let mut out = vec![];
    for prefix in prefixes {
        let lib = prefix.join("lib");
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons {
            for sp in ["site-packages", "dist-packages"] {
                let d = py.join(sp);
                if d.is_dir() && !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
}

fn load() -> Result<Api, NvrtcError> {
    let candidates = library_candidates(&|k| std::env::var_os(k), &system_lib_dirs());
    let mut tried: Vec<String> = vec![];
    for (what, path) in candidates {
        let bare = path.components().count() == 1;
        if !bare && !path.exists() {
            // Not worth a line per missing file: only folders that have no NVRTC are named,
            // once, below.
            let in_folder = path
                .file_name()
                .is_some_and(|n| LIB_NAMES.iter().any(|l| n == *l));
            let dir = match path.parent() {
                Some(d) if in_folder => d.display().to_string(),
                _ => format!("{} (no such file)", path.display()),
            };
            let line = if what.is_empty() {
                dir
            } else {
                format!("{what} = {dir}")
            };
            if !tried.contains(&line) {
                tried.push(line);
            }
            continue;
        }
        match open(&path) {
            Ok(api) => return Ok(api),
            Err(Open::Old(e)) => return Err(e),
            Err(Open::Failed(e)) => {
                // A bare name the loader does not find is the common case: name it briefly.
                let e = if bare { "not found".to_string() } else { e };
                tried.push(format!("{}: {e}", path.display()));
            }
        }
    }
    let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let ld = if ld.is_empty() { "unset".into() } else { ld };
    Err(NvrtcError::Unavailable {
        why: format!("searched: {}; LD_LIBRARY_PATH: {ld}", tried.join(", ")),
    })
}

enum Open {
    /// Loaded, but older than 12.0: final.
    Old(NvrtcError),
    /// Not loadable, or missing an entry point.
    Failed(String),
}

fn open(path: &Path) -> Result<Api, Open> {
    // Through symbolic links to the real file: NVRTC finds its builtins library
    // (libnvrtc-builtins.so.X.Y) in the folder it was loaded from, so a link in another folder
    // would compile nothing (NVRTC_ERROR_BUILTIN_OPERATION_FAILURE).
    let real = if path.components().count() > 1 {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
    } else {
        path.to_path_buf()
    };
    // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
    let lib =
        unsafe { libloading::Library::new(&real) }.map_err(|e| Open::Failed(e.to_string()))?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol's type is NVRTC's C signature of that function (nvrtc.h,
            // unchanged from 12.0 to 13.x).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| Open::Failed(format!("no {} in it: {e}", $name)))?
        };
    }
    let nvrtc_version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvResult =
        sym!("nvrtcVersion");
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid.
    if unsafe { nvrtc_version(&mut major, &mut minor) } != NVRTC_SUCCESS {
        return Err(Open::Failed("nvrtcVersion failed".into()));
    }
    if major < 12 {
        return Err(Open::Old(NvrtcError::TooOld { major, minor }));
    }
    Ok(Api {
        path: real,
        version: (major, minor),
        get_error_string: sym!("nvrtcGetErrorString"),
        get_num_supported_archs: sym!("nvrtcGetNumSupportedArchs"),
        get_supported_archs: sym!("nvrtcGetSupportedArchs"),
        create_program: sym!("nvrtcCreateProgram"),
        compile_program: sym!("nvrtcCompileProgram"),
        destroy_program: sym!("nvrtcDestroyProgram"),
        get_ptx_size: sym!("nvrtcGetPTXSize"),
        get_ptx: sym!("nvrtcGetPTX"),
        get_cubin_size: sym!("nvrtcGetCUBINSize"),
        get_cubin: sym!("nvrtcGetCUBIN"),
        get_log_size: sym!("nvrtcGetProgramLogSize"),
        get_log: sym!("nvrtcGetProgramLog"),
        _lib: lib,
    })
}

/// Compiles CUDA C `src` to PTX for the virtual architecture `arch` (e.g. `"compute_80"`).
///
/// `name` is the program's file name in diagnostics (e.g. `"attention.cu"`). The options are
/// `--gpu-architecture=ARCH`, `--include-path=DIR` for the [`cuda_include_dir`] found, then
/// `extra_opts` (e.g. `["--use_fast_math"]`). On failure the error carries NVRTC's log.
pub fn compile_ptx(
    src: &str,
    name: &str,
    arch: &str,
    extra_opts: &[&str],
) -> Result<String, NvrtcError> {
    let prog = Program::compile(src, name, arch, extra_opts)?;
    let ptx = prog.output(prog.api.get_ptx_size, prog.api.get_ptx, "nvrtcGetPTX")?;
    Ok(String::from_utf8_lossy(until_nul(&ptx)).into_owned())
}

/// Compiles CUDA C `src` to a cubin (SASS) for the real architecture `arch` (e.g. `"sm_90"`):
/// what the CUDA backend loads when the driver is older than NVRTC and so cannot JIT its PTX.
/// The options are those of [`compile_ptx`].
pub fn compile_cubin(
    src: &str,
    name: &str,
    arch: &str,
    extra_opts: &[&str],
) -> Result<Vec<u8>, NvrtcError> {
    let prog = Program::compile(src, name, arch, extra_opts)?;
    prog.output(prog.api.get_cubin_size, prog.api.get_cubin, "nvrtcGetCUBIN")
}

/// The architectures the loaded NVRTC compiles for, as `major * 10 + minor` in ascending
/// order (`[50, 52, …, 90, 100, 101, 103, 120, 121]` for 12.9): `compute_XY` and `sm_XY` both exist for each.
pub fn supported_archs() -> Result<Vec<i32>, NvrtcError> {
    let api = api()?;
    let mut n: c_int = 0;
    // SAFETY: the library is loaded; `n` is a valid pointer.
    api.check(
        unsafe { (api.get_num_supported_archs)(&mut n) },
        "",
        "nvrtcGetNumSupportedArchs",
    )?;
    let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: `archs` holds the `n` ints NVRTC reported.
        api.check(
            unsafe { (api.get_supported_archs)(archs.as_mut_ptr()) },
            "",
            "nvrtcGetSupportedArchs",
        )?;
    }
    archs.sort_unstable();
    Ok(archs)
}

/// Compiles CUDA C `src` to SASS (a cubin) for the real architecture `arch` (e.g. `"sm_90"`)
/// with `--ptxas-options=-v`, and reads the registers, spills and shared memory of each kernel
/// from ptxas' report in the program log.
pub fn compile_sass(src: &str, name: &str, arch: &str) -> Result<SassInfo, NvrtcError> {
    let prog = Program::compile(src, name, arch, &["--ptxas-options=-v"])?;
    let cubin = prog.output(prog.api.get_cubin_size, prog.api.get_cubin, "nvrtcGetCUBIN")?;
    let log = prog.log()?;
    let kernels = parse_ptxas_report(&log).map_err(|why| NvrtcError::Report {
        name: name.to_string(),
        why,
        log: log.clone(),
    })?;
    Ok(SassInfo {
        cubin_bytes: cubin.len(),
        kernels,
    })
}

/// The CUDA include folder (the first that holds `cuda_fp16.h`, searched as
/// [`search_cuda_include`] says, in this process' environment and this machine's system
/// folders), or `None`. Sources that include `cuda_fp16.h` or `cuda_bf16.h` need it: NVRTC has
/// no built-in copies.
pub fn cuda_include_dir() -> Option<PathBuf> {
    search_cuda_include(&|k| std::env::var_os(k), &system_include_dirs()).ok()
}

/// The folder holding `cuda_fp16.h` (and `cuda_bf16.h`), the first of:
///
/// 1. `$TRANSFUSE_CUDA_INCLUDE` itself, 2. `$CUDA_PATH/include`, 3. `$CUDA_HOME/include`,
/// 4. the wheel `scripts/fetch-nvrtc.sh` installs, pinned to match its NVRTC:
///    `${TRANSFUSE_CACHE:-$HOME/.cache/transfuse}/nvrtc/nvidia/cuda_runtime/include`,
/// 5. the `system` folders in order ([`system_include_dirs`]: `/usr/local/cuda/include`, then
///    `nvidia/cuda_runtime/include` in Python's site-packages folders).
///
/// `var` reads an environment variable (unset or empty: not searched). Pure apart from file
/// existence checks, so it is tested on a temp dir. `Err` lists every place searched, in order.
pub fn search_cuda_include(
    var: &dyn Fn(&str) -> Option<OsString>,
    system: &[PathBuf],
) -> Result<PathBuf, Vec<String>> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut candidates: Vec<(String, Option<PathBuf>)> = vec![];
    let mut from_var = |k: &str, sub: &str| {
        let what = if sub.is_empty() {
            format!("${k}")
        } else {
            format!("${k}/{sub}")
        };
        candidates.push((what, get(k).map(|d| d.join(sub))));
    };
    from_var(INCLUDE_ENV, "");
    from_var("CUDA_PATH", "include");
    from_var("CUDA_HOME", "include");
    let cache = get("TRANSFUSE_CACHE").or_else(|| get("HOME").map(|h| h.join(".cache/transfuse")));
    candidates.push((
        "the fetch-nvrtc.sh wheel".into(),
        cache.map(|c| c.join("nvrtc").join(WHEEL_INCLUDE)),
    ));
    candidates.extend(system.iter().map(|d| (String::new(), Some(d.clone()))));
    let mut searched = vec![];
    for (what, dir) in candidates {
        match dir {
            Some(d) if d.join("cuda_fp16.h").is_file() => return Ok(d),
            Some(d) if what.is_empty() => searched.push(d.display().to_string()),
            Some(d) => searched.push(format!("{what} = {}", d.display())),
            None => searched.push(format!("{what} (unset)")),
        }
    }
    Err(searched)
}

/// Where the `nvidia-cuda-runtime-cu12` wheel keeps the headers, under a site-packages folder
/// (or `scripts/fetch-nvrtc.sh`'s target).
const WHEEL_INCLUDE: &str = "nvidia/cuda_runtime/include";

/// This machine's fixed places for the CUDA headers: `/usr/local/cuda/include`, then the
/// wheels (`nvidia/cuda_runtime/include`, CUDA 13's `nvidia/cu13/include`) in the
/// site-packages of the prefixes [`system_lib_dirs`] names (every `python3.*` under their
/// `lib`, and Debian's `dist-packages`).
pub fn system_include_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/local/cuda/include")];
    for sp in site_packages() {
        // CUDA 12's runtime wheel, then CUDA 13's (everything under nvidia/cu13).
        dirs.push(sp.join(WHEEL_INCLUDE));
        dirs.push(sp.join("nvidia/cu13/include"));
    }
    dirs
}

/// Whether `src` includes a CUDA header NVRTC has no built-in copy of.
fn needs_cuda_headers(src: &str) -> bool {
    src.contains("cuda_fp16.h") || src.contains("cuda_bf16.h")
}

/// The options every compilation gets: the architecture and the CUDA include folder.
fn base_options(arch: &str, include: Option<&Path>) -> Vec<String> {
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    if let Some(dir) = include {
        opts.push(format!("--include-path={}", dir.display()));
    }
    opts
}

/// An NVRTC program, destroyed on drop. Owns the strings NVRTC may point into.
struct Program {
    api: &'static Api,
    handle: ProgramHandle,
    name: String,
    _src: CString,
    _name: CString,
}

impl Program {
    /// Creates the program and compiles it; a failed compilation returns the log.
    fn compile(src: &str, name: &str, arch: &str, extra: &[&str]) -> Result<Self, NvrtcError> {
        let api = api()?;
        let nul = |what: &str| NvrtcError::Nul {
            name: name.to_string(),
            what: what.to_string(),
        };
        let c_src = CString::new(src).map_err(|_| nul("the source"))?;
        let c_name = CString::new(name).map_err(|_| nul("the name"))?;
        let include = match search_cuda_include(&|k| std::env::var_os(k), &system_include_dirs()) {
            Ok(dir) => Some(dir),
            Err(searched) if needs_cuda_headers(src) => {
                return Err(NvrtcError::NoCudaHeaders {
                    name: name.to_string(),
                    searched: searched.join(", "),
                })
            }
            Err(_) => None,
        };
        let opts = base_options(arch, include.as_deref())
            .into_iter()
            .chain(extra.iter().map(|o| o.to_string()))
            .map(|o| CString::new(o.as_str()).map_err(|_| nul(&format!("option `{o}`"))))
            .collect::<Result<Vec<_>, _>>()?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

        let mut handle: ProgramHandle = std::ptr::null_mut();
        // SAFETY: NVRTC is loaded; the strings are NUL-terminated and outlive the program
        // (they are moved into it below); no headers are passed.
        let r = unsafe {
            (api.create_program)(
                &mut handle,
                c_src.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        api.check(r, name, "nvrtcCreateProgram")?;
        let prog = Program {
            api,
            handle,
            name: name.to_string(),
            _src: c_src,
            _name: c_name,
        };
        let n = c_int::try_from(opt_ptrs.len()).map_err(|_| NvrtcError::Call {
            name: name.to_string(),
            call: "nvrtcCompileProgram",
            code: format!("{} options is too many", opt_ptrs.len()),
        })?;
        // SAFETY: the program is live; `opt_ptrs` holds `n` valid C strings alive until return.
        let r = unsafe { (api.compile_program)(prog.handle, n, opt_ptrs.as_ptr()) };
        if r != NVRTC_SUCCESS {
            return Err(NvrtcError::Compile {
                name: name.to_string(),
                arch: arch.to_string(),
                code: api.error_name(r),
                log: prog.log()?,
            });
        }
        Ok(prog)
    }

    /// NVRTC's program log (diagnostics and, with `--ptxas-options=-v`, ptxas' report).
    fn log(&self) -> Result<String, NvrtcError> {
        let bytes = self.output(
            self.api.get_log_size,
            self.api.get_log,
            "nvrtcGetProgramLog",
        )?;
        Ok(String::from_utf8_lossy(until_nul(&bytes))
            .trim_end()
            .to_string())
    }

    /// One of the program's outputs through its size and copy functions.
    fn output(
        &self,
        size_fn: SizeFn,
        get_fn: GetFn,
        call: &'static str,
    ) -> Result<Vec<u8>, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: the program is live and compiled; `size` is a valid pointer.
        self.api
            .check(unsafe { size_fn(self.handle, &mut size) }, &self.name, call)?;
        let mut buf = vec![0u8; size];
        if size > 0 {
            // SAFETY: `buf` has the `size` bytes NVRTC asked for.
            let r = unsafe { get_fn(self.handle, buf.as_mut_ptr().cast::<c_char>()) };
            self.api.check(r, &self.name, call)?;
        }
        Ok(buf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once. A failure
        // here leaks the program, which is all that can be done in drop.
        let _ = unsafe { (self.api.destroy_program)(&mut self.handle) };
    }
}

/// The bytes before the first NUL (NVRTC's strings are NUL-terminated).
fn until_nul(bytes: &[u8]) -> &[u8] {
    CStr::from_bytes_until_nul(bytes).map_or(bytes, CStr::to_bytes)
}

/// Reads ptxas' `-v` report: per entry function, the lines
///
/// ```text
/// ptxas info    : Compiling entry function 'saxpy' for 'sm_90'
/// ptxas info    : Function properties for saxpy
/// ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
/// ```
///
/// Properties of non-inlined device functions (`Function properties for` a name that is not the
/// entry being compiled) are skipped.
fn parse_ptxas_report(log: &str) -> Result<Vec<KernelResources>, String> {
    // Each kernel with whether its `Used N registers` line was seen.
    let mut kernels: Vec<(KernelResources, bool)> = Vec::new();
    // Whether the last "Function properties for X" named the current entry.
    let mut props_of_entry = false;
    for line in log.lines() {
        // "ptxas info    : TEXT" or "ptxas         .     TEXT".
        let Some(body) = line.strip_prefix("ptxas") else {
            continue;
        };
        let body = body.trim_start();
        let body = body.strip_prefix("info").unwrap_or(body).trim_start();
        let Some(body) = body.strip_prefix([':', '.']).map(str::trim) else {
            continue;
        };
        if let Some(rest) = body.strip_prefix("Compiling entry function '") {
            let name = rest.split('\'').next().unwrap_or_default();
            let k = KernelResources {
                name: name.to_string(),
                ..Default::default()
            };
            kernels.push((k, false));
            props_of_entry = false;
        } else if let Some(rest) = body.strip_prefix("Function properties for ") {
            props_of_entry = kernels.last().is_some_and(|(k, _)| k.name == rest.trim());
        } else if body.contains("bytes stack frame") {
            if let (true, Some((k, _))) = (props_of_entry, kernels.last_mut()) {
                k.spill_stores_bytes = bytes_before(body, "bytes spill stores")?;
                k.spill_loads_bytes = bytes_before(body, "bytes spill loads")?;
            }
        } else if let Some(rest) = body.strip_prefix("Used ") {
            let Some((k, seen)) = kernels.last_mut() else {
                return Err(format!("`{line}` before any entry function"));
            };
            k.registers = number(rest.split_whitespace().next().unwrap_or_default(), line)?;
            if body.contains("bytes smem") {
                k.shared_bytes = bytes_before(body, "bytes smem")?;
            }
            *seen = true;
        }
    }
    if let Some((k, _)) = kernels.iter().find(|(_, seen)| !seen) {
        return Err(format!("no `Used N registers` line for `{}`", k.name));
    }
    Ok(kernels.into_iter().map(|(k, _)| k).collect())
}

/// The number right before `label` in a comma-separated ptxas line (`…, 8 bytes spill stores`).
fn bytes_before(line: &str, label: &str) -> Result<u32, String> {
    let field = line
        .split(',')
        .find(|f| f.contains(label))
        .ok_or_else(|| format!("no `{label}` in `{line}`"))?;
    number(field.split_whitespace().next().unwrap_or_default(), line)
}

fn number(s: &str, line: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a number in `{line}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_report() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'reduce' for 'sm_90'
ptxas info    : Function properties for reduce
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
ptxas info    : Function properties for _Z6helperf
ptxas         .     24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_Z5saxpyPfS_fi' for 'sm_90'
ptxas info    : Function properties for _Z5saxpyPfS_fi
ptxas         .     16 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 372 bytes cmem[0]
ptxas info    : Compile time = 3.691 ms";
        let kernels = parse_ptxas_report(log).unwrap();
        assert_eq!(
            kernels,
            vec![
                KernelResources {
                    name: "reduce".into(),
                    registers: 14,
                    spill_stores_bytes: 0,
                    spill_loads_bytes: 0,
                    shared_bytes: 4096,
                },
                KernelResources {
                    name: "_Z5saxpyPfS_fi".into(),
                    registers: 255,
                    spill_stores_bytes: 12,
                    spill_loads_bytes: 4,
                    shared_bytes: 0,
                },
            ]
        );
    }

    #[test]
    fn a_report_without_registers_is_an_error() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90'";
        let err = parse_ptxas_report(log).unwrap_err();
        assert!(err.contains("`k`"), "{err}");
    }

    #[test]
    fn an_empty_report_has_no_kernels() {
        assert_eq!(parse_ptxas_report(""), Ok(vec![]));
    }

    /// A fresh folder under the system temp dir, removed on drop.
    struct Tmp(std::path::PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            let d =
                std::env::temp_dir().join(format!("transfuse-nvrtc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Tmp(d)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn vars(pairs: Vec<(&'static str, PathBuf)>) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_os_str().to_owned())
        }
    }

    #[test]
    fn cuda_headers_are_found_under_cuda_home() {
        let tmp = Tmp::new("cuda-home");
        let include = tmp.0.join("include");
        std::fs::create_dir_all(&include).unwrap();
        std::fs::write(include.join("cuda_fp16.h"), "").unwrap();
        let v = vars(vec![("CUDA_HOME", tmp.0.clone())]);
        assert_eq!(search_cuda_include(&v, &[]), Ok(include.clone()));
        // CUDA_PATH comes first, but only when it has the header.
        let empty = tmp.0.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let v = vars(vec![
            ("CUDA_PATH", empty.clone()),
            ("CUDA_HOME", tmp.0.clone()),
        ]);
        assert_eq!(search_cuda_include(&v, &[]), Ok(include.clone()));
        // So does a system folder (e.g. /usr/local/cuda/include) when no variable is set.
        assert_eq!(
            search_cuda_include(&vars(vec![]), &[empty.clone(), include.clone()]),
            Ok(include)
        );
    }

    #[test]
    fn cuda_headers_in_the_fetched_wheel_are_found() {
        let tmp = Tmp::new("wheel");
        let include = tmp.0.join("nvrtc/nvidia/cuda_runtime/include");
        std::fs::create_dir_all(&include).unwrap();
        std::fs::write(include.join("cuda_fp16.h"), "").unwrap();
        let v = vars(vec![("TRANSFUSE_CACHE", tmp.0.clone())]);
        assert_eq!(search_cuda_include(&v, &[]), Ok(include));
    }

    #[test]
    fn missing_cuda_headers_list_what_was_searched() {
        let tmp = Tmp::new("missing");
        let (a, b) = (tmp.0.join("a"), tmp.0.join("b"));
        let v = vars(vec![(INCLUDE_ENV, a.clone()), ("CUDA_HOME", b.clone())]);
        let sys = tmp.0.join("sys");
        let searched = search_cuda_include(&v, std::slice::from_ref(&sys)).unwrap_err();
        let all = searched.join("; ");
        for want in [
            a.display().to_string(),
            b.join("include").display().to_string(),
            "CUDA_PATH".to_string(),
            sys.display().to_string(),
        ] {
            assert!(all.contains(&want), "{all:?} does not name {want}");
        }
    }

    #[test]
    fn nvrtc_13_is_looked_for_before_12_in_every_folder() {
        let tmp = Tmp::new("lib-order");
        let v = vars(vec![
            (LIB_ENV, tmp.0.clone()),
            ("CUDA_HOME", PathBuf::from("/opt/cuda")),
            ("TRANSFUSE_CACHE", PathBuf::from("/c")),
        ]);
        let sys = PathBuf::from("/site/nvidia/cu13/lib");
        let c = library_candidates(&v, std::slice::from_ref(&sys));
        let paths: Vec<PathBuf> = c.iter().map(|(_, p)| p.clone()).collect();
        let want: Vec<PathBuf> = [
            tmp.0.clone(),
            "/opt/cuda/lib64".into(),
            "/c/nvrtc/nvidia/cuda_nvrtc/lib".into(),
            sys.clone(),
        ]
        .iter()
        .flat_map(|d| LIB_NAMES.map(|n| d.join(n)))
        .chain(LIB_NAMES.map(PathBuf::from))
        .collect();
        assert_eq!(paths, want);
        assert_eq!(c[0].0, format!("${LIB_ENV}"));
        assert_eq!(c[3].0, "$CUDA_HOME/lib64");
    }

    #[test]
    fn the_lib_variable_may_name_the_file_itself() {
        let v = vars(vec![(LIB_ENV, PathBuf::from("/x/libnvrtc.so.13.0.88"))]);
        let c = library_candidates(&v, &[]);
        assert_eq!(c[0].1, PathBuf::from("/x/libnvrtc.so.13.0.88"));
        // Unset variables add nothing but the loader's own search.
        assert_eq!(
            library_candidates(&vars(vec![]), &[]).len(),
            LIB_NAMES.len()
        );
    }

    #[test]
    fn a_file_that_is_not_nvrtc_fails_to_open_without_a_panic() {
        let tmp = Tmp::new("not-a-lib");
        let fake = tmp.0.join("libnvrtc.so.13");
        std::fs::write(&fake, "not an ELF file").unwrap();
        match open(&fake) {
            Err(Open::Failed(e)) => assert!(!e.is_empty()),
            Err(Open::Old(e)) => panic!("{e}"),
            Ok(_) => panic!("a text file loaded as NVRTC"),
        }
    }

    #[test]
    fn the_loaded_library_opens_again_by_its_path_with_every_entry_point() {
        let Ok(path) = library_path() else {
            eprintln!("skipping: NVRTC is not available");
            return;
        };
        let api = open(&path).unwrap_or_else(|_| panic!("{} did not open", path.display()));
        assert!(api.version.0 >= 12);
        assert_eq!(api.error_name(NVRTC_SUCCESS), "NVRTC_SUCCESS");
        assert_eq!(api.error_name(6), "NVRTC_ERROR_COMPILATION");
    }

    #[test]
    fn base_options_name_the_architecture_first() {
        assert_eq!(base_options("sm_90", None)[0], "--gpu-architecture=sm_90");
        assert_eq!(
            base_options("sm_90", Some(Path::new("/x/include")))[1],
            "--include-path=/x/include"
        );
    }
}
