//! The CUDA device: cudarc's driver API for memory and launches, NVRTC ([`crate::nvrtc`]) for
//! kernels, behind the same [`Device`] interface as [`crate::webgpu::WgpuDevice`], so the plan
//! executor ([`crate::program::Program`]) runs on it unchanged.
//!
//! - **Nothing CUDA is needed to build or to start.** The driver (`libcuda.so.1`) and NVRTC are
//!   loaded at run time. cudarc panics when it cannot load a library, so [`CudaDevice::new`]
//!   checks first ([`driver_present`], [`crate::nvrtc::available`]) and returns
//!   [`RuntimeError::Device`] when one is missing, when the driver is older than CUDA 12.0 or
//!   when it sees no device.
//! - **One device per process** ([`shared`]): device 0 (pick another with
//!   `CUDA_VISIBLE_DEVICES`), its primary context, its default stream. The result, error
//!   included, is computed once, so [`CudaBackend::new`] is cheap after the first call (and on
//!   the first, without a driver, it is one failed `dlopen` per candidate name). Tensor-parallel
//!   CUDA ranks open one device each instead ([`CudaDevice::open`], rank r on device r).
//! - **One stream, in order.** Every copy and launch goes to the context's default (NULL)
//!   stream, so a launch sees the writes and launches issued before it and a read sees them
//!   all; cudarc's per-buffer event tracking (for multi-stream use) is turned off. Host writes
//!   and reads are synchronous copies (`cuMemcpyHtoD` / `cuMemcpyDtoH`): they wait for the
//!   launches before them, and the host data may be dropped when they return.
//! - **Kernels**: each [`Kernel`] is printed as CUDA C ([`transfuse_codegen::cuda::print`]),
//!   compiled by NVRTC for the device's own architecture and loaded as a module. The loaded
//!   function is cached by source inside the device, so a kernel shared by several graphs (or
//!   loaded again) compiles once per process, and what NVRTC emitted is kept on disk
//!   ([`crate::kernel_cache`], keyed by source, architecture, NVRTC and driver versions), so
//!   a later process skips NVRTC. What NVRTC emits ([`DeviceInfo::description`]
//!   says which):
//!   - PTX for `compute_XY`, the device's compute capability (or the newest NVRTC knows, when
//!     the device is newer), JIT-compiled by the driver;
//!   - a cubin for `sm_XY` when the driver is older than NVRTC: a driver cannot JIT PTX from a
//!     newer toolkit, but runs its cubins (CUDA minor-version compatibility).
//! - **Launches**: grid as given, block = the kernel's workgroup, no dynamic shared memory (the
//!   kernels declare static `__shared__` arrays), parameters = the buffers' device pointers in
//!   order, then the `unsigned int` uniforms. A grid with a zero axis launches nothing.
//! - **Limits** ([`DeviceInfo`]): [`Limits::cuda`] (1024 threads, 48 KiB static shared memory)
//!   or less if the device says so; no per-binding limit (a buffer is a pointer: its cap is the
//!   device's memory); 256 buffers per kernel (8-byte pointers, well inside the 4 KiB of kernel
//!   parameters); the device's grid limits; f32, f16 and bf16 storage (the printed kernels only
//!   convert f16/bf16 to and from f32, which `cuda_fp16.h` / `cuda_bf16.h` provide on every
//!   architecture NVRTC 12 targets).
//! - **Timing** ([`Device::timer_start`] / [`Device::timer_stop`], what `time_forward` and
//!   `bench` use): CUDA events (`cuEventRecord`, `cuEventElapsedTime`) on the same stream, the
//!   start recorded just before the first timed launch and the end after the last, so
//!   [`crate::Timing::clock`] is `"device"`, as with wgpu's timestamp queries.
//! - **Errors** are [`RuntimeError::Device`] naming what was being done and the driver's error
//!   (`CUDA_ERROR_…: text`). Launches are asynchronous: a kernel that faults is reported by the
//!   next read or [`Device::sync`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as cu;
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use cudarc::nvrtc::Ptx;
use transfuse_codegen::kernels::Limits;
use transfuse_codegen::kir::{Elem, Kernel};
use transfuse_codegen::lower::Target;

use crate::device::{Device, DeviceInfo};
use crate::kernel_cache::{KernelCache, Key};
use crate::nvrtc;
use crate::program::DeviceBackend;
use crate::RuntimeError;

const BACKEND: &str = "cuda";

/// Oldest driver accepted, as `cuDriverGetVersion` encodes it (`1000 * major + 10 * minor`).
const MIN_DRIVER: i32 = 12000;

/// Most buffers one kernel may take: 256 pointers are 2 KiB of the 4 KiB of kernel parameters.
const MAX_BUFFERS: u32 = 256;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

/// A driver error as `CUDA_ERROR_NAME: description`.
fn drv(e: &DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name}: {}", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// `12090` → `12.9`.
fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// True when the CUDA driver library (`libcuda.so.1`, `nvcuda.dll`) can be loaded: the check
/// every use of the driver API comes after, since cudarc panics without it. Computed once per
/// process.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to open the candidate library names (running the driver's
    // initialisers, which have no preconditions); it calls nothing in them.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The driver entry points this backend reaches through cudarc's CUDA 12.9 bindings. cudarc
/// resolves each at its first call and panics when it is missing, so [`CudaDevice::new`] checks
/// them all first ([`missing_driver_symbols`]). Every one is exported by CUDA 12.0+ drivers,
/// CUDA 13's (580) included: a driver keeps the symbols of the older toolkits it runs.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuFuncGetAttribute",
    "cuLaunchKernel",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemAllocAsync",
    "cuMemsetD8Async",
    "cuMemFreeAsync",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventElapsedTime",
    "cuEventDestroy_v2",
];

/// The [`DRIVER_SYMBOLS`] that `libcuda.so.1` does not export (empty when it cannot be opened
/// by that name: cudarc's own search then decides).
pub fn missing_driver_symbols() -> Vec<&'static str> {
    // SAFETY: opening the driver runs its initialisers, which have no preconditions; no symbol
    // is called.
    let Ok(lib) = (unsafe { libloading::Library::new("libcuda.so.1") }) else {
        return vec![];
    };
    DRIVER_SYMBOLS
        .iter()
        .copied()
        // SAFETY: only the symbol's address is looked up; it is never called through this type.
        .filter(|s| unsafe { lib.get::<*const ()>(s.as_bytes()) }.is_err())
        .collect()
}

/// The process-wide device (device 0), created on first use; the error is kept and returned
/// again.
pub fn shared() -> Result<Arc<CudaDevice>, RuntimeError> {
    static DEVICE: OnceLock<Result<Arc<CudaDevice>, RuntimeError>> = OnceLock::new();
    DEVICE
        .get_or_init(|| CudaDevice::new().map(Arc::new))
        .clone()
}

/// What NVRTC emits for the device (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Code {
    /// PTX for `compute_XY` (`major * 10 + minor`), JIT-compiled by the driver.
    Ptx(i32),
    /// A cubin for `sm_XY`.
    Cubin(i32),
}

impl Code {
    /// The NVRTC `--gpu-architecture` value.
    fn arch(self) -> String {
        match self {
            Code::Ptx(a) => format!("compute_{a}"),
            Code::Cubin(a) => format!("sm_{a}"),
        }
    }
}

/// Chooses what to compile for a device of compute capability `cc` (`major * 10 + minor`),
/// under a driver of version `driver` (`cuDriverGetVersion`), with NVRTC `nvrtc` (major, minor)
/// supporting the architectures `supported` (ascending).
fn choose_code(cc: i32, driver: i32, nvrtc: (i32, i32), supported: &[i32]) -> Result<Code, String> {
    let nvrtc_version = 1000 * nvrtc.0 + 10 * nvrtc.1;
    let nv = format!("NVRTC {}.{}", nvrtc.0, nvrtc.1);
    let cap = format!("compute capability {}.{}", cc / 10, cc % 10);
    let Some(&newest_fit) = supported.iter().rev().find(|&&a| a <= cc) else {
        return Err(format!(
            "{nv} cannot compile for {cap}: its architectures are {supported:?}"
        ));
    };
    if driver >= nvrtc_version {
        return Ok(Code::Ptx(newest_fit));
    }
    if supported.contains(&cc) {
        return Ok(Code::Cubin(cc));
    }
    Err(format!(
        "the driver (CUDA {}) is older than {nv}, so it cannot JIT its PTX, and {nv} has no \
         sm_{cc} target for {cap}; update the driver",
        version_string(driver)
    ))
}

/// A device allocation (see [`Device::alloc`]).
pub struct CudaBuffer {
    slice: CudaSlice<u8>,
}

impl CudaBuffer {
    /// Its size in bytes (the size asked for, rounded up to a multiple of 4, at least 4).
    pub fn bytes(&self) -> u64 {
        self.slice.len() as u64
    }

    /// The cudarc allocation.
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // cudarc frees without making its context current; a thread that never used the
        // device (a `Loaded` dropped elsewhere) has none. Binding through `set_current` rather
        // than `bind_to_thread` leaves the context's recorded errors for the next call.
        // SAFETY: the context outlives its allocations (the slice holds it).
        let _ = unsafe { cu::ctx::set_current(self.slice.context().cu_ctx()) };
    }
}

/// A compiled kernel: the loaded function and what a launch needs.
pub struct CudaKernel {
    name: String,
    func: CudaFunction,
    block: [u32; 3],
    buffers: usize,
    uniforms: usize,
}

impl CudaKernel {
    /// The entry-point name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A CUDA device: its primary context, default stream and kernel cache (see the module docs).
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    code: Code,
    /// `cuDriverGetVersion` and `nvrtcVersion`: part of the disk cache's key.
    driver: i32,
    nvrtc_version: (i32, i32),
    /// Compiled kernels on disk ([`crate::kernel_cache`]); `None` when off.
    disk: Option<KernelCache>,
    /// Loaded kernels by CUDA C source.
    kernels: Mutex<HashMap<String, CudaFunction>>,
    /// The event timer of [`Device::timer_start`] / [`Device::timer_stop`].
    timer: Mutex<Timer>,
}

/// Where the event timer is: between `timer_start` and the first launch (`Armed`), or after
/// it, with the start event recorded just before that launch (`Running`).
enum Timer {
    Off,
    Armed,
    Running(CudaEvent),
}

/// The driver's checks before any call through cudarc (the library present, every entry point
/// exported, CUDA 12.0 or newer); returns the driver's version.
fn checked_driver() -> Result<i32, RuntimeError> {
    if !driver_present() {
        return Err(err(
            "no CUDA driver library (libcuda.so.1) found: the NVIDIA driver is not installed \
                 or not on the loader's path",
        ));
    }
    let missing = missing_driver_symbols();
    if !missing.is_empty() {
        return Err(err(format!(
            "the CUDA driver library lacks {} (entry points of the CUDA 12 driver API this \
                 backend calls); update the driver",
            missing.join(", ")
        )));
    }
    let mut driver = 0;
    // SAFETY: the library is present (checked above); `driver` is a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut driver) }
        .result()
        .map_err(|e| err(format!("querying the driver version: {}", drv(&e))))?;
    if driver < MIN_DRIVER {
        return Err(err(format!(
            "the CUDA driver supports CUDA {}; CUDA {} or newer is needed",
            version_string(driver),
            version_string(MIN_DRIVER)
        )));
    }
    Ok(driver)
}

/// How many CUDA devices the driver sees (after [`checked_driver`]'s checks: an error, never a
/// panic, without a driver).
pub fn device_count() -> Result<usize, RuntimeError> {
    let driver = checked_driver()?;
    match CudaContext::device_count() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        Err(e) => Err(err(format!(
            "initialising the driver (CUDA {}): {}",
            version_string(driver),
            drv(&e)
        ))),
    }
}

impl CudaDevice {
    /// Opens device 0 (see the module docs). Prefer [`shared`]: this creates a second handle on
    /// the same primary context, with its own kernel cache.
    pub fn new() -> Result<CudaDevice, RuntimeError> {
        CudaDevice::open(0)
    }

    /// Opens device `ordinal` (`0..`[`device_count`]), its primary context and default stream:
    /// what a tensor-parallel rank runs on (rank `r` on device `r`). Each call is a new handle
    /// with its own kernel cache.
    pub fn open(ordinal: usize) -> Result<CudaDevice, RuntimeError> {
        let driver = checked_driver()?;
        let count = match CudaContext::device_count() {
            Ok(n) => n,
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(e) => return Err(err(format!("initialising the driver: {}", drv(&e)))),
        };
        if count <= 0 {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES")
                .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"))
                .unwrap_or_default();
            return Err(err(format!(
                "the driver (CUDA {}) found no CUDA device{visible}",
                version_string(driver)
            )));
        }
        if ordinal >= count as usize {
            return Err(err(format!(
                "device {ordinal} asked for; the driver sees {count} CUDA device{}",
                if count == 1 { "" } else { "s" }
            )));
        }
        nvrtc::available().map_err(|e| err(e.to_string()))?;
        let nvrtc_version = nvrtc::version().map_err(|e| err(e.to_string()))?;
        let supported = nvrtc::supported_archs().map_err(|e| err(e.to_string()))?;

        let ctx = CudaContext::new(ordinal)
            .map_err(|e| err(format!("opening device {ordinal}: {}", drv(&e))))?;
        // SAFETY: every allocation and launch of this device goes to one stream (the default
        // one), so no cross-stream synchronisation is needed; nothing is allocated yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();

        let attr = |a: sys::CUdevice_attribute, what: &str| -> Result<i32, RuntimeError> {
            ctx.attribute(a)
                .map_err(|e| err(format!("reading the device's {what}: {}", drv(&e))))
        };
        use sys::CUdevice_attribute as A;
        let name = ctx
            .name()
            .map_err(|e| err(format!("reading the device name: {}", drv(&e))))?;
        let major = attr(
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "compute capability",
        )?;
        let minor = attr(
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "compute capability",
        )?;
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?;
        let threads = attr(
            A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            "threads per block",
        )?;
        let shared = attr(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK,
            "shared memory per block",
        )?;
        let grid = [
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, "grid size")?,
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, "grid size")?,
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, "grid size")?,
        ];
        let memory = ctx
            .total_mem()
            .map_err(|e| err(format!("reading the device memory size: {}", drv(&e))))?
            as u64;

        let cc = major * 10 + minor;
        let code = choose_code(cc, driver, nvrtc_version, &supported)
            .map_err(|m| err(format!("{name}: {m}")))?;
        let cuda = Limits::cuda();
        let positive = |v: i32| u32::try_from(v).unwrap_or(0).max(1);
        let info = DeviceInfo {
            backend: BACKEND,
            description: format!(
                "{name} (compute capability {major}.{minor}, {:.1} GiB, {sms} SMs; driver CUDA \
                 {}, NVRTC {}.{} → {})",
                memory as f64 / f64::from(1u32 << 30),
                version_string(driver),
                nvrtc_version.0,
                nvrtc_version.1,
                code.arch()
            ),
            target: Target::Cuda,
            limits: Limits {
                max_threads: cuda.max_threads.min(positive(threads)),
                max_shared_bytes: cuda.max_shared_bytes.min(positive(shared)),
                kind: cuda.kind,
                subgroup_min: cuda.subgroup_min,
            },
            max_binding_bytes: memory,
            max_storage_buffers: MAX_BUFFERS,
            max_grid: grid.map(positive),
            elems: vec![Elem::F32, Elem::F16, Elem::BF16],
            is_gpu: true,
        };
        Ok(CudaDevice {
            ctx,
            stream,
            info,
            code,
            driver,
            nvrtc_version,
            disk: KernelCache::from_env(),
            kernels: Mutex::new(HashMap::new()),
            timer: Mutex::new(Timer::Off),
        })
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compiles `src` (the kernel `name`) with NVRTC, loads it and finds its entry point.
    fn build(&self, name: &str, src: &str, threads: u32) -> Result<CudaFunction, RuntimeError> {
        let file = format!("{name}.cu");
        let arch = self.code.arch();
        let key = Key::new(src, &arch, self.nvrtc_version, self.driver, &[]);
        let bytes = match self.disk.as_ref().and_then(|d| d.load(&key)) {
            Some(bytes) => bytes,
            None => {
                let bytes = match self.code {
                    Code::Ptx(_) => {
                        nvrtc::compile_ptx(src, &file, &arch, &[]).map(String::into_bytes)
                    }
                    Code::Cubin(_) => nvrtc::compile_cubin(src, &file, &arch, &[]),
                }
                .map_err(|e| err(format!("compiling kernel `{name}`: {e}")))?;
                if let Some(d) = &self.disk {
                    d.store_or_warn(&key, &bytes);
                }
                bytes
            }
        };
        let image = match self.code {
            Code::Ptx(_) => Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned()),
            Code::Cubin(_) => Ptx::from_binary(bytes),
        };
        let module = self.ctx.load_module(image).map_err(|e| {
            let hint = if e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                " (the driver is older than NVRTC: update it)"
            } else {
                ""
            };
            err(format!(
                "loading kernel `{name}` ({arch}): {}{hint}",
                drv(&e)
            ))
        })?;
        let func = module
            .load_function(name)
            .map_err(|e| err(format!("finding entry `{name}` in its module: {}", drv(&e))))?;
        // SAFETY: the function was just loaded and its module is alive (`func` holds it).
        let max = unsafe {
            cu::function::get_function_attribute(
                func.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
            )
        }
        .map_err(|e| err(format!("reading kernel `{name}`'s attributes: {}", drv(&e))))?;
        if i64::from(threads) > i64::from(max) {
            return Err(err(format!(
                "kernel `{name}` runs {threads} threads per block; its resources (registers) \
                 allow {max} on {}",
                self.info.description
            )));
        }
        Ok(func)
    }
}

/// `bytes` rounded up to a multiple of 4, at least 4.
fn pad4(bytes: u64) -> u64 {
    bytes.max(4).div_ceil(4) * 4
}

impl Device for CudaDevice {
    type Buffer = CudaBuffer;
    type Module = CudaKernel;
    type Bound = CudaBound;

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: u64, what: &str) -> Result<CudaBuffer, RuntimeError> {
        let size = pad4(bytes);
        let len = usize::try_from(size)
            .map_err(|_| err(format!("tensor `{what}` needs {size} bytes")))?;
        let slice = self
            .stream
            .alloc_zeros::<u8>(len)
            .map_err(|e| err(format!("allocating {size} bytes for `{what}`: {}", drv(&e))))?;
        Ok(CudaBuffer { slice })
    }

    fn write(&self, buf: &CudaBuffer, data: &[u8]) -> Result<(), RuntimeError> {
        if data.len() as u64 > buf.bytes() {
            return Err(err(format!(
                "writing {} bytes into a buffer of {}",
                data.len(),
                buf.bytes()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        // Zero the padding, as the wgpu device does (the buffer's size is a multiple of 4).
        let padded;
        let src = if data.len().is_multiple_of(4) {
            data
        } else {
            let mut v = data.to_vec();
            v.resize(pad4(data.len() as u64) as usize, 0);
            padded = v;
            &padded
        };
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(format!("writing to the device: {}", drv(&e))))?;
        let (ptr, _record) = buf.slice.device_ptr(&self.stream);
        // SAFETY: `ptr` is a live allocation of this context of at least `src.len()` bytes
        // (checked above; the padding stays within the buffer's multiple-of-4 size). The copy is
        // synchronous on the NULL stream: it follows the launches before it and has read `src`
        // when it returns.
        unsafe { cu::memcpy_htod_sync(ptr, src) }.map_err(|e| {
            err(format!(
                "writing {} bytes to the device: {}",
                src.len(),
                drv(&e)
            ))
        })
    }

    fn read(&self, buf: &CudaBuffer, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        if bytes > buf.bytes() {
            return Err(err(format!(
                "reading {bytes} bytes from a buffer of {}",
                buf.bytes()
            )));
        }
        let mut out = vec![0u8; bytes as usize];
        if out.is_empty() {
            return self.sync().map(|()| out);
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(format!("reading from the device: {}", drv(&e))))?;
        let (ptr, _record) = buf.slice.device_ptr(&self.stream);
        // SAFETY: `ptr` is a live allocation of at least `bytes` bytes (checked above). The
        // copy is synchronous on the NULL stream: it waits for every launch before it and has
        // filled `out` when it returns.
        unsafe { cu::memcpy_dtoh_sync(&mut out, ptr) }.map_err(|e| {
            err(format!(
                "reading {bytes} bytes back (a kernel launched before may have failed): {}",
                drv(&e)
            ))
        })?;
        Ok(out)
    }

    fn copy(
        &self,
        src: &CudaBuffer,
        dst: &CudaBuffer,
        runs: &[(u64, u64, u64)],
    ) -> Result<(), RuntimeError> {
        for &(from, to, n) in runs {
            if from + n > src.bytes() || to + n > dst.bytes() {
                return Err(err(format!(
                    "copying {n} bytes from offset {from} of {} to offset {to} of {}",
                    src.bytes(),
                    dst.bytes()
                )));
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(format!("copying on the device: {}", drv(&e))))?;
        let (sp, _rs) = src.slice.device_ptr(&self.stream);
        let (dp, _rd) = dst.slice.device_ptr(&self.stream);
        for &(from, to, n) in runs {
            if n == 0 {
                continue;
            }
            // SAFETY: both are live allocations of this context and the runs lie within them
            // (checked above). Synchronous on the NULL stream like `write`: it follows the
            // launches before it and precedes those after.
            unsafe { cu::memcpy_dtod_sync(dp + to, sp + from, n as usize) }
                .map_err(|e| err(format!("copying {n} bytes on the device: {}", drv(&e))))?;
        }
        Ok(())
    }

    fn compile(&self, kernel: &Kernel) -> Result<CudaKernel, RuntimeError> {
        let threads = kernel.threads();
        if threads == 0 || threads > self.info.limits.max_threads {
            return Err(err(format!(
                "kernel `{}` has {threads} threads per block; {} allows 1 to {}",
                kernel.name, self.info.description, self.info.limits.max_threads
            )));
        }
        let src = transfuse_codegen::cuda::print(kernel)?;
        let cached = self
            .kernels
            .lock()
            .expect("kernel cache")
            .get(&src)
            .cloned();
        let func = match cached {
            Some(f) => f,
            None => {
                // Compiled outside the lock: two threads may compile the same kernel at once,
                // and the second insert replaces an identical function.
                let f = self.build(&kernel.name, &src, threads)?;
                self.kernels
                    .lock()
                    .expect("kernel cache")
                    .insert(src, f.clone());
                f
            }
        };
        Ok(CudaKernel {
            name: kernel.name.clone(),
            func,
            block: kernel.workgroup,
            buffers: kernel.buffers.len(),
            uniforms: kernel.uniforms.len(),
        })
    }

    fn bind(&self, m: &CudaKernel, bufs: &[&CudaBuffer]) -> Result<CudaBound, RuntimeError> {
        if bufs.len() != m.buffers {
            crate::device::check_launch_args(
                BACKEND,
                &m.name,
                (m.buffers, m.uniforms),
                bufs.len(),
                m.uniforms,
            )?;
        }
        Ok(CudaBound {
            func: m.func.cu_function(),
            ptrs: bufs.iter().map(|b| self.ptr(b)).collect(),
        })
    }

    fn bound_to(&self, b: &CudaBound, m: &CudaKernel, bufs: &[&CudaBuffer]) -> bool {
        b.func == m.func.cu_function()
            && b.ptrs.len() == bufs.len()
            && b.ptrs.iter().zip(bufs).all(|(&p, q)| p == self.ptr(q))
    }

    fn launch_bound(
        &self,
        m: &CudaKernel,
        b: &CudaBound,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        crate::device::check_launch_args(
            BACKEND,
            &m.name,
            (m.buffers, m.uniforms),
            b.ptrs.len(),
            uniforms.len(),
        )?;
        if b.func != m.func.cu_function() {
            return Err(err(format!(
                "kernel `{}` launched with arguments bound for another kernel",
                m.name
            )));
        }
        if grid.contains(&0) {
            return Ok(());
        }
        {
            let mut timer = self.timer.lock().expect("timer");
            if matches!(*timer, Timer::Armed) {
                *timer = Timer::Running(self.event("starting the timer")?);
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(format!("launching kernel `{}`: {}", m.name, drv(&e))))?;
        // The argument values, then a pointer to each (cuLaunchKernel's `kernelParams`).
        let mut ptrs = b.ptrs.clone();
        let mut words = uniforms.to_vec();
        let mut params: Vec<*mut std::ffi::c_void> = ptrs
            .iter_mut()
            .map(|p| (p as *mut sys::CUdeviceptr).cast())
            .chain(words.iter_mut().map(|w| (w as *mut u32).cast()))
            .collect();
        // SAFETY: the function was printed from a kernel whose parameters are exactly its
        // buffers as pointers, in order, then its uniforms as `unsigned int`; the counts were
        // checked above. The pointers were taken by `bind` from buffers the executor confirmed
        // with `bound_to` just before and keeps alive; every launch is on this one stream, so
        // cudarc's cross-stream event tracking has nothing to order. `params` and the values
        // it points to outlive the call (the driver copies them at launch).
        unsafe {
            cu::launch_kernel(
                m.func.cu_function(),
                (grid[0], grid[1], grid[2]),
                (m.block[0], m.block[1], m.block[2]),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| {
            err(format!(
                "launching kernel `{}` (grid {grid:?}, block {:?}): {}",
                m.name,
                m.block,
                drv(&e)
            ))
        })?;
        Ok(())
    }

    fn sync(&self) -> Result<(), RuntimeError> {
        self.stream.synchronize().map_err(|e| {
            err(format!(
                "waiting for the device (a kernel launched before failed): {}",
                drv(&e)
            ))
        })
    }

    /// Arms the event timer: the next launch records a start event just before it.
    fn timer_start(&self) -> bool {
        *self.timer.lock().expect("timer") = Timer::Armed;
        true
    }

    /// Records an end event after the launches and returns the events' elapsed time
    /// (`cuEventElapsedTime`, about 0.5 µs resolution); `None` when nothing was launched.
    fn timer_stop(&self) -> Result<Option<f64>, RuntimeError> {
        let state = std::mem::replace(&mut *self.timer.lock().expect("timer"), Timer::Off);
        let Timer::Running(start) = state else {
            self.sync()?;
            return Ok(None);
        };
        let end = self.event("stopping the timer")?;
        let ms = start.elapsed_ms(&end).map_err(|e| {
            err(format!(
                "reading the event timer (a kernel launched before may have failed): {}",
                drv(&e)
            ))
        })?;
        self.sync()?;
        Ok(Some(f64::from(ms) * 1e-3))
    }
}

/// A kernel's arguments bound once ([`Device::bind`]): its function and the device pointers of
/// its buffers, in order.
pub struct CudaBound {
    func: sys::CUfunction,
    ptrs: Vec<sys::CUdeviceptr>,
}

// SAFETY: a `CUfunction` is a driver handle, usable from any thread once its context is
// current (every use binds it first); the pointers are plain device addresses.
unsafe impl Send for CudaBound {}

impl CudaDevice {
    /// The device address of `buf`.
    pub(crate) fn ptr(&self, buf: &CudaBuffer) -> sys::CUdeviceptr {
        let (ptr, _record) = buf.slice.device_ptr(&self.stream);
        ptr
    }

    /// A timing event recorded now on the device's stream.
    fn event(&self, what: &str) -> Result<CudaEvent, RuntimeError> {
        let ev = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| err(format!("{what}: creating an event: {}", drv(&e))))?;
        ev.record(&self.stream)
            .map_err(|e| err(format!("{what}: recording an event: {}", drv(&e))))?;
        Ok(ev)
    }
}

/// The CUDA backend: graphs lowered to CUDA C and run by [`crate::Program`] on the shared
/// [`CudaDevice`].
pub type CudaBackend = DeviceBackend<CudaDevice>;

impl DeviceBackend<CudaDevice> {
    /// The backend on the shared device ([`shared`]); an error, never a panic, when the driver
    /// library, NVRTC or a device is missing. Cheap after the first call in a process.
    pub fn new() -> Result<CudaBackend, RuntimeError> {
        Ok(DeviceBackend::on(shared()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NVRTC_12_9: &[i32] = &[
        50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 120, 121,
    ];

    #[test]
    fn ptx_for_the_device_when_the_driver_is_new_enough() {
        assert_eq!(
            choose_code(90, 12090, (12, 9), NVRTC_12_9),
            Ok(Code::Ptx(90))
        );
        assert_eq!(
            choose_code(86, 13000, (12, 9), NVRTC_12_9),
            Ok(Code::Ptx(86))
        );
        assert_eq!(Code::Ptx(90).arch(), "compute_90");
    }

    #[test]
    fn a_device_newer_than_nvrtc_gets_the_newest_ptx_below_it() {
        assert_eq!(
            choose_code(130, 13000, (12, 9), NVRTC_12_9),
            Ok(Code::Ptx(121))
        );
        assert_eq!(
            choose_code(88, 12090, (12, 9), NVRTC_12_9),
            Ok(Code::Ptx(87))
        );
    }

    #[test]
    fn an_older_driver_gets_a_cubin() {
        assert_eq!(
            choose_code(80, 12040, (12, 9), NVRTC_12_9),
            Ok(Code::Cubin(80))
        );
        assert_eq!(Code::Cubin(80).arch(), "sm_80");
        let e = choose_code(130, 12040, (12, 9), NVRTC_12_9).unwrap_err();
        assert!(e.contains("CUDA 12.4") && e.contains("sm_130"), "{e}");
    }

    #[test]
    fn a_device_older_than_nvrtc_supports_is_refused() {
        let e = choose_code(35, 12090, (12, 9), NVRTC_12_9).unwrap_err();
        assert!(e.contains("compute capability 3.5"), "{e}");
    }

    /// CUDA 13's NVRTC targets Turing and newer only (no sm_5x–7.2); the exact list on a
    /// machine is what `nvrtcGetSupportedArchs` says.
    const NVRTC_13_0: &[i32] = &[75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];

    #[test]
    fn an_h200_under_cuda_13_gets_compute_90_ptx_or_an_sm_90_cubin() {
        // Driver 580 is CUDA 13.0: NVRTC 13.0's PTX is JIT-compiled...
        assert_eq!(
            choose_code(90, 13000, (13, 0), NVRTC_13_0),
            Ok(Code::Ptx(90))
        );
        // ...a newer NVRTC's is not, so it compiles a cubin.
        assert_eq!(
            choose_code(90, 13000, (13, 1), NVRTC_13_0),
            Ok(Code::Cubin(90))
        );
        // The pinned 12.9 NVRTC under that driver: PTX.
        assert_eq!(
            choose_code(90, 13000, (12, 9), NVRTC_12_9),
            Ok(Code::Ptx(90))
        );
        // A Volta card cannot be served by NVRTC 13.
        assert!(choose_code(70, 13000, (13, 0), NVRTC_13_0).is_err());
    }

    #[test]
    fn versions_print_as_major_minor() {
        assert_eq!(version_string(12090), "12.9");
        assert_eq!(version_string(13010), "13.1");
    }
}
