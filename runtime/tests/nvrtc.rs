//! NVRTC compiles hand-written kernels to PTX (compute_80, compute_90) and SASS (sm_90) without a
//! GPU. Skipped with a message when NVRTC cannot be loaded (run scripts/fetch-nvrtc.sh, or
//! scripts/test.sh which does it), unless `TRANSFUSE_REQUIRE` names `nvrtc`: then a failure.

use transfuse_runtime::nvrtc::{self, NvrtcError};

/// True when `TRANSFUSE_REQUIRE` (comma-separated) names `what` (as tests/common/mod.rs).
fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|x| x.trim() == what))
        .unwrap_or(false)
}

/// Whether to run: NVRTC loads, or it does not and this test skips (or fails when required).
fn nvrtc_or_skip(test: &str) -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) if required("nvrtc") => panic!("TRANSFUSE_REQUIRE names nvrtc: {e}"),
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            false
        }
    }
}

/// Whether the CUDA headers are there (`TRANSFUSE_CUDA_INCLUDE`) for kernels that include
/// `cuda_fp16.h` / `cuda_bf16.h`; absent, those kernels skip, or fail when nvrtc is required.
fn headers_or_skip(test: &str) -> bool {
    match nvrtc::cuda_include_dir() {
        Some(_) => true,
        None if required("nvrtc") => {
            panic!(
                "TRANSFUSE_REQUIRE names nvrtc but {} is not set (run scripts/fetch-nvrtc.sh)",
                nvrtc::INCLUDE_ENV
            )
        }
        None => {
            eprintln!(
                "{test}: skipping the cuda_fp16.h/cuda_bf16.h kernel: {} is not set (run scripts/fetch-nvrtc.sh)",
                nvrtc::INCLUDE_ENV
            );
            false
        }
    }
}

const SAXPY: &str = r#"
extern "C" __global__ void saxpy(float a, const float* __restrict__ x, float* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"#;

/// Half and bfloat16 loads, an f32 warp-shuffle reduction and a block reduction through shared
/// memory: the shapes of the code the generator will emit.
const HALF_REDUCE: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// out[row] = sum_j (float(a[row, j]) * float(b[row, j])), one block of 256 threads per row.
extern "C" __global__ void dot_rows(const __half* __restrict__ a,
                                   const __nv_bfloat16* __restrict__ b,
                                   __half* __restrict__ out, int cols) {
    __shared__ float partial[8];
    const __half* ar = a + (size_t)blockIdx.x * cols;
    const __nv_bfloat16* br = b + (size_t)blockIdx.x * cols;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        acc += __half2float(ar[j]) * __bfloat162float(br[j]);
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) out[blockIdx.x] = __float2half(v);
    }
}
"#;

#[test]
fn saxpy_and_half_kernels_compile_to_ptx() {
    if !nvrtc_or_skip("saxpy_and_half_kernels_compile_to_ptx") {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let headers = headers_or_skip("saxpy_and_half_kernels_compile_to_ptx");
    for arch in ["compute_80", "compute_90"] {
        let ptx = nvrtc::compile_ptx(SAXPY, "saxpy.cu", arch, &[]).unwrap();
        let target = arch.replace("compute", "sm");
        assert!(ptx.contains(&format!(".target {target}")), "{arch}:\n{ptx}");
        assert!(ptx.contains(".entry saxpy"), "{arch}:\n{ptx}");

        if !headers {
            continue;
        }
        let ptx = nvrtc::compile_ptx(HALF_REDUCE, "dot_rows.cu", arch, &["--use_fast_math"])
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(ptx.contains(".entry dot_rows"), "{arch}:\n{ptx}");
        assert!(
            ptx.contains("shfl.sync.bfly"),
            "{arch}: no warp shuffle:\n{ptx}"
        );
        assert!(ptx.contains(".shared"), "{arch}: no shared memory:\n{ptx}");
    }
}

#[test]
fn sass_reports_registers_and_no_spills() {
    if !nvrtc_or_skip("sass_reports_registers_and_no_spills") {
        return;
    }
    let mut cases = vec![(SAXPY, "saxpy.cu", "saxpy", 0)];
    if headers_or_skip("sass_reports_registers_and_no_spills") {
        // partial[8] floats: 32 bytes of static shared memory.
        cases.push((HALF_REDUCE, "dot_rows.cu", "dot_rows", 32));
    }
    for (src, name, kernel, shared) in cases {
        let info = nvrtc::compile_sass(src, name, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{name}: {info:?}");
        assert!(info.cubin_bytes > 0, "{name}: empty cubin");
        assert_eq!(info.kernels.len(), 1, "{name}: {info:?}");
        let k = info.kernel(kernel).unwrap();
        assert!(k.registers > 0, "{name}: {k:?}");
        assert_eq!(
            (k.spill_stores_bytes, k.spill_loads_bytes),
            (0, 0),
            "{name}: {k:?}"
        );
        assert_eq!(k.shared_bytes, shared, "{name}: {k:?}");
    }
}

#[test]
fn a_broken_kernel_returns_the_nvrtc_log() {
    if !nvrtc_or_skip("a_broken_kernel_returns_the_nvrtc_log") {
        return;
    }
    let broken =
        "extern \"C\" __global__ void broken(float* y) {\n    y[0] = undeclared_name;\n}\n";
    for result in [
        nvrtc::compile_ptx(broken, "broken.cu", "compute_80", &[]).map(|_| ()),
        nvrtc::compile_sass(broken, "broken.cu", "sm_90").map(|_| ()),
    ] {
        let err = result.unwrap_err();
        let NvrtcError::Compile {
            name, code, log, ..
        } = &err
        else {
            panic!("expected NvrtcError::Compile, got {err:?}");
        };
        assert_eq!(name, "broken.cu");
        assert_eq!(code, "NVRTC_ERROR_COMPILATION");
        // NVRTC's diagnostic: `broken.cu(2): error: identifier "undeclared_name" is undefined`.
        assert!(
            log.contains("broken.cu(2): error: identifier \"undeclared_name\" is undefined"),
            "{log}"
        );
        let message = err.to_string();
        assert!(message.contains(log.as_str()), "{message}");
    }
}

#[test]
fn a_bad_option_is_an_error_not_a_panic() {
    if !nvrtc_or_skip("a_bad_option_is_an_error_not_a_panic") {
        return;
    }
    let err =
        nvrtc::compile_ptx(SAXPY, "saxpy.cu", "compute_80", &["--no-such-option"]).unwrap_err();
    assert!(matches!(err, NvrtcError::Compile { .. }), "{err:?}");
    let err = nvrtc::compile_ptx(SAXPY, "saxpy.cu", "not_an_arch", &[]).unwrap_err();
    assert!(matches!(err, NvrtcError::Compile { .. }), "{err:?}");
    let err = nvrtc::compile_ptx("a\0b", "nul.cu", "compute_80", &[]).unwrap_err();
    assert!(matches!(err, NvrtcError::Nul { .. }), "{err:?}");
}

/// Without NVRTC every entry point is an `Unavailable` error naming the fix, never a panic.
#[test]
fn without_nvrtc_every_call_is_an_error() {
    let Err(e) = nvrtc::available() else {
        eprintln!("NVRTC is available; the missing-library path is not exercised here");
        return;
    };
    let message = e.to_string();
    eprintln!("{message}");
    assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
    // It names both CUDA 12's and CUDA 13's library and what was searched.
    assert!(message.contains("libnvrtc.so.13"), "{message}");
    assert!(message.contains("libnvrtc.so.12"), "{message}");
    assert!(message.contains("searched: "), "{message}");
    if let Some(dir) = std::env::var_os(nvrtc::LIB_ENV).filter(|d| !d.is_empty()) {
        let dir = std::path::PathBuf::from(dir);
        assert!(
            message.contains(&dir.display().to_string()),
            "{message} does not name {}",
            dir.display()
        );
    }
    assert!(message.contains("scripts/fetch-nvrtc.sh"), "{message}");
    assert_eq!(
        nvrtc::compile_ptx(SAXPY, "saxpy.cu", "compute_80", &[]),
        Err(e.clone())
    );
    assert_eq!(
        nvrtc::compile_sass(SAXPY, "saxpy.cu", "sm_90"),
        Err(e.clone())
    );
    assert_eq!(nvrtc::version(), Err(e));
}

/// The disk cache of the CUDA backend with real NVRTC output: PTX and a cubin compiled, stored,
/// loaded back byte for byte; a corrupted entry is a miss, and the kernel is stored again.
#[test]
fn compiled_kernels_round_trip_through_the_disk_cache() {
    use transfuse_runtime::kernel_cache::{KernelCache, Key};
    if !nvrtc_or_skip("compiled_kernels_round_trip_through_the_disk_cache") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("transfuse-nvrtc-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::at(&dir);
    let version = nvrtc::version().unwrap();
    let ptx = nvrtc::compile_ptx(SAXPY, "saxpy.cu", "compute_80", &[]).unwrap();
    let cubin = nvrtc::compile_cubin(SAXPY, "saxpy.cu", "sm_90", &[]).unwrap();
    let kp = Key::new(SAXPY, "compute_80", version, 13000, &[]);
    let kc = Key::new(SAXPY, "sm_90", version, 13000, &[]);
    assert_eq!(cache.load(&kp), None);
    cache.store(&kp, ptx.as_bytes()).unwrap();
    cache.store(&kc, &cubin).unwrap();
    assert_eq!(cache.load(&kp).as_deref(), Some(ptx.as_bytes()));
    assert_eq!(cache.load(&kc).as_deref(), Some(cubin.as_slice()));
    // A cubin is an ELF file; the PTX names its entry.
    assert_eq!(&cubin[..4], b"\x7fELF");
    assert!(ptx.contains(".entry saxpy"));
    // Flip one byte of the cubin entry: ignored (with a warning), removed, stored again.
    let path = cache.path(&kc);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(cache.load(&kc), None);
    assert!(!path.exists());
    cache.store(&kc, &cubin).unwrap();
    assert_eq!(cache.load(&kc).as_deref(), Some(cubin.as_slice()));
    let _ = std::fs::remove_dir_all(&dir);
}
