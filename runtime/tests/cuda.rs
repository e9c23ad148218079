//! The CUDA backend.
//!
//! - Without a driver library (CI machines, this workspace's): `CudaBackend::new` is an error
//!   naming the driver, returned again on the next call, never a panic.
//! - With a device: the buffer round trip and launch checks of `CudaDevice`, and a small graph
//!   (softmax, layer norm, matmul + bias, GELU), as built and optimized, run by
//!   `Program<CudaDevice>` and compared with the CPU backend: within 1e-4 in f32 storage,
//!   looser in f16 and bf16 (those need `TRANSFUSE_CUDA_INCLUDE`).
//!
//! - With NVRTC only (no GPU needed): every kernel of those plans compiles the way the device
//!   would compile it.
//!
//! The device tests skip with a message when no CUDA device can be opened (no driver, no GPU,
//! no NVRTC), unless `TRANSFUSE_REQUIRE` names `cuda`: then they fail. The NVRTC test skips
//! without NVRTC unless `TRANSFUSE_REQUIRE` names `nvrtc`.

use std::collections::HashMap;
use std::sync::Arc;

use transfuse_codegen::kir::Elem;
use transfuse_codegen::lower::{lower, LowerOptions, Target};
use transfuse_ir::{shape, Builder, DType, Data, Dim, Graph, Tensor, Weights};
use transfuse_runtime::cuda::{self, CudaBackend, CudaDevice};
use transfuse_runtime::device::Device;
use transfuse_runtime::{nvrtc, Backend, CpuBackend, Loaded, Program, RuntimeError, TensorMap};

mod common;
use common::rand_vec;

/// True when `TRANSFUSE_REQUIRE` (comma-separated) names `what` (as tests/common/mod.rs).
fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|x| x.trim() == what))
        .unwrap_or(false)
}

/// The shared device, or `None` after printing why this test is skipped (a failure when
/// `TRANSFUSE_REQUIRE` names `cuda`).
fn device_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    isolate_tuning_cache();
    match cuda::shared() {
        Ok(d) => {
            eprintln!("{test}: on {}", d.info().description);
            Some(d)
        }
        Err(e) if required("cuda") => panic!("TRANSFUSE_REQUIRE names cuda: {e}"),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            None
        }
    }
}

#[test]
fn without_a_driver_the_backend_is_an_error_not_a_panic() {
    let first = CudaBackend::new();
    if cuda::driver_present() {
        match &first {
            Ok(b) => eprintln!("a CUDA driver is present: {}", b.description()),
            Err(e) => eprintln!("a CUDA driver is present but the backend failed: {e}"),
        }
        return;
    }
    let Err(e) = first else {
        panic!("no driver library, yet CudaBackend::new succeeded");
    };
    let msg = e.to_string();
    assert!(
        matches!(&e, RuntimeError::Device { backend, .. } if backend == "cuda"),
        "{e:?}"
    );
    assert!(
        msg.contains("driver") && msg.contains("libcuda.so.1"),
        "the error should name the driver library: {msg}"
    );
    // Kept: the second call gives the same error without looking again.
    assert_eq!(CudaBackend::new().err(), Some(e));
}

#[test]
fn device_info_describes_a_cuda_gpu() {
    let Some(dev) = device_or_skip("device_info_describes_a_cuda_gpu") else {
        return;
    };
    let info = dev.info();
    assert_eq!(info.backend, "cuda");
    assert_eq!(info.target, Target::Cuda);
    assert!(info.is_gpu);
    assert!(
        info.description.contains("compute capability"),
        "{}",
        info.description
    );
    assert!(info.limits.max_threads >= 256 && info.limits.max_threads <= 1024);
    assert!(info.limits.max_shared_bytes >= 16 * 1024 && info.limits.max_shared_bytes <= 48 * 1024);
    assert!(
        info.max_binding_bytes >= 1 << 30,
        "{}",
        info.max_binding_bytes
    );
    assert!(info.max_grid[0] >= 65535);
    for e in [Elem::F32, Elem::F16, Elem::BF16] {
        assert!(info.elems.contains(&e), "{e:?}");
    }
    let backend = CudaBackend::new().expect("the shared device opened");
    assert_eq!(backend.name(), "cuda");
    assert!(
        Arc::ptr_eq(backend.device(), &dev),
        "one device per process"
    );
}

#[test]
fn buffers_round_trip() {
    let Some(dev) = device_or_skip("buffers_round_trip") else {
        return;
    };
    let buf = dev.alloc(7, "seven").unwrap();
    assert_eq!(buf.bytes(), 8, "rounded up to 4");
    assert_eq!(
        dev.read(&buf, 8).unwrap(),
        vec![0; 8],
        "allocations are zeroed"
    );
    dev.write(&buf, &[1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert_eq!(dev.read(&buf, 7).unwrap(), vec![1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(dev.read(&buf, 0).unwrap(), Vec::<u8>::new());
    assert!(dev.write(&buf, &[0; 9]).is_err(), "a write past the end");
    assert!(dev.read(&buf, 9).is_err(), "a read past the end");
    assert_eq!(dev.alloc(0, "empty").unwrap().bytes(), 4);
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let b = dev.alloc(big.len() as u64, "big").unwrap();
    dev.write(&b, &big).unwrap();
    assert_eq!(dev.read(&b, big.len() as u64).unwrap(), big);
    dev.sync().unwrap();
}

#[test]
fn launches_check_their_arguments_and_skip_empty_grids() {
    let Some(dev) = device_or_skip("launches_check_their_arguments_and_skip_empty_grids") else {
        return;
    };
    let (g, _) = graph();
    let plan = lower(&g, &LowerOptions::new(Target::Cuda, Elem::F32)).unwrap();
    let k = &plan.kernels[0].gen.kernel;
    let m = dev.compile(k).unwrap();
    assert_eq!(m.name(), k.name);
    // The second compile is a cache hit: the same kernel, no NVRTC run.
    let again = dev.compile(k).unwrap();
    assert_eq!(again.name(), k.name);
    let bufs: Vec<_> = k
        .buffers
        .iter()
        .map(|b| dev.alloc(4, &b.name).unwrap())
        .collect();
    let refs: Vec<_> = bufs.iter().collect();
    let uniforms = vec![0u32; k.uniforms.len()];
    dev.launch(&m, &refs, &uniforms, [0, 1, 1]).unwrap();
    dev.launch(&m, &refs, &uniforms, [1, 1, 0]).unwrap();
    let e = dev
        .launch(&m, &refs[..refs.len() - 1], &uniforms, [1, 1, 1])
        .unwrap_err();
    assert!(e.to_string().contains("buffers"), "{e}");
    dev.sync().unwrap();
}

/// What `CudaDevice::compile` does short of loading, on any machine with NVRTC: every kernel of
/// the test graph's plans (as built and optimized; f32, f16, bf16 storage) printed as CUDA C
/// compiles to PTX (`compute_80`), and those of the f32 plans to a cubin too (`sm_90`, the path
/// for drivers older than NVRTC). Skipped without NVRTC unless `TRANSFUSE_REQUIRE` names `nvrtc`.
#[test]
fn the_kernels_it_would_load_compile_with_nvrtc() {
    if let Err(e) = nvrtc::available() {
        if required("nvrtc") {
            panic!("TRANSFUSE_REQUIRE names nvrtc: {e}");
        }
        eprintln!("skipped the_kernels_it_would_load_compile_with_nvrtc: {e}");
        return;
    }
    let archs = nvrtc::supported_archs().unwrap();
    assert!(archs.contains(&80) && archs.contains(&90), "{archs:?}");
    assert!(
        archs.windows(2).all(|w| w[0] < w[1]),
        "ascending: {archs:?}"
    );
    eprintln!("NVRTC {:?} targets {archs:?}", nvrtc::version().unwrap());
    let (g, _) = graph();
    let (opt, _) = transfuse_passes::optimize(&g, &transfuse_passes::Options::default())
        .expect("the graph optimizes");
    let mut elems = vec![Elem::F32];
    if nvrtc::cuda_include_dir().is_some() {
        elems.extend([Elem::F16, Elem::BF16]);
    } else {
        eprintln!("f16/bf16 plans skipped: {} is not set", nvrtc::INCLUDE_ENV);
    }
    let mut compiled = 0;
    for graph in [&g, &opt] {
        for &elem in &elems {
            let plan = lower(graph, &LowerOptions::new(Target::Cuda, elem)).unwrap();
            for k in &plan.kernels {
                let gens = std::iter::once(&k.gen).chain(k.decode.as_ref().map(|v| &v.gen));
                for gen in gens {
                    let src = transfuse_codegen::cuda::print(&gen.kernel).unwrap();
                    let name = format!("{}.cu", gen.kernel.name);
                    let ptx = nvrtc::compile_ptx(&src, &name, "compute_80", &[])
                        .unwrap_or_else(|e| panic!("{e}\n{src}"));
                    assert!(ptx.contains(&format!(".entry {}", gen.kernel.name)));
                    // ptxas is slow: cubins for the f32 plans only.
                    if elem == Elem::F32 {
                        let cubin = nvrtc::compile_cubin(&src, &name, "sm_90", &[])
                            .unwrap_or_else(|e| panic!("{e}\n{src}"));
                        assert_eq!(&cubin[..4], b"\x7fELF", "a cubin is an ELF image");
                    }
                    compiled += 1;
                }
            }
        }
    }
    eprintln!("{compiled} kernels compiled");
    assert!(compiled >= 4);
}

/// `x: [n, 50]` → `probs = softmax(x)`, `h = gelu(layer_norm(x) · w + bias)` (`[n, 20]`),
/// `p = softmax(h)`.
fn graph() -> (Graph, Weights) {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 50.into()], DType::F32)
        .unwrap();
    let gamma = b.weight("ln.gamma", shape([50])).unwrap();
    let beta = b.weight("ln.beta", shape([50])).unwrap();
    let w = b.weight("w", shape([50, 20])).unwrap();
    let bias = b.weight("bias", shape([20])).unwrap();
    let probs = b.softmax(x).unwrap();
    let ln = b.layer_norm(x, gamma, beta, 1e-5).unwrap();
    let mm = b.matmul(ln, w).unwrap();
    let mm = b.add(mm, bias).unwrap();
    let h = b.gelu_erf(mm).unwrap();
    let p = b.softmax(h).unwrap();
    b.output("probs", probs);
    b.output("h", h);
    b.output("p", p);
    let weights: Weights = [
        ("ln.gamma", vec![50], 1.0),
        ("ln.beta", vec![50], 0.5),
        ("w", vec![50, 20], 0.3),
        ("bias", vec![20], 0.5),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, dims, scale))| {
        let n = dims.iter().product();
        let mut v = rand_vec(n, 100 + i as u64, scale);
        if name == "ln.gamma" {
            v.iter_mut().for_each(|g| *g += 1.0);
        }
        (name.to_string(), Arc::new(Tensor::f32(dims, v)))
    })
    .collect();
    (b.finish(), weights)
}

fn inputs(rows: usize, seed: u64) -> TensorMap {
    HashMap::from([(
        "x".to_string(),
        Tensor::f32(vec![rows, 50], rand_vec(rows * 50, seed, 3.0)),
    )])
}

/// Asserts every output of `got` is within `tol · (1 + |want|)` of `want`.
fn assert_close(got: &TensorMap, want: &TensorMap, tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{what}: `{name}` shape");
        let (Data::F32(a), Data::F32(b)) = (&g.data, &w.data) else {
            panic!("{what}: `{name}` is not f32");
        };
        let (i, d) = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .enumerate()
            .fold(
                (0, 0.0f32),
                |m, (i, d)| if d > m.1 || d.is_nan() { (i, d) } else { m },
            );
        assert!(
            d <= tol,
            "{what}: `{name}` differs by {d} (relative to 1 + |cpu|) at {i}: cuda {} vs cpu {}",
            a[i],
            b[i]
        );
    }
}

/// Runs `g` on the CUDA device with storage `elem` for 3 then 7 rows and compares with the CPU
/// backend running `reference`.
fn check(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    reference: &Graph,
    weights: &Weights,
    elem: Elem,
    tol: f32,
) {
    let what = format!("{elem:?}");
    let mut p = Program::new(dev.clone(), g, weights, elem)
        .unwrap_or_else(|e| panic!("{what}: loading: {e}"));
    for (rows, seed) in [(3, 1), (7, 2)] {
        let x = inputs(rows, seed);
        let want = CpuBackend::reference().run(reference, weights, &x).unwrap();
        let got = p
            .run(&x, &[])
            .unwrap_or_else(|e| panic!("{what}, {rows} rows: {e}"));
        assert_close(&got, &want, tol, &format!("{what}, {rows} rows"));
    }
    let times = p.profile(&inputs(3, 1)).unwrap();
    assert!(!times.is_empty() && times.iter().all(|t| t.seconds >= 0.0));
    assert!(p.memory().is_some());
}

#[test]
fn graphs_match_the_cpu_backend() {
    let Some(dev) = device_or_skip("graphs_match_the_cpu_backend") else {
        return;
    };
    let (g, weights) = graph();
    let (opt, report) = transfuse_passes::optimize(&g, &transfuse_passes::Options::default())
        .expect("the graph optimizes");
    eprintln!("optimized: {report:?}");
    check(&dev, &g, &g, &weights, Elem::F32, 1e-4);
    check(&dev, &opt, &g, &weights, Elem::F32, 1e-4);

    // Through the Backend interface too.
    let backend = CudaBackend::new().unwrap();
    let x = inputs(5, 3);
    let got = backend.run(&opt, &weights, &x).unwrap();
    let want = CpuBackend::reference().run(&g, &weights, &x).unwrap();
    assert_close(&got, &want, 1e-4, "CudaBackend::run");
}

#[test]
fn half_storage_matches_the_cpu_backend_loosely() {
    let Some(dev) = device_or_skip("half_storage_matches_the_cpu_backend_loosely") else {
        return;
    };
    if nvrtc::cuda_include_dir().is_none() {
        if required("cuda") {
            panic!(
                "TRANSFUSE_REQUIRE names cuda but {} is not set: f16/bf16 kernels include \
                 cuda_fp16.h / cuda_bf16.h (run scripts/fetch-nvrtc.sh)",
                nvrtc::INCLUDE_ENV
            );
        }
        eprintln!(
            "skipped half_storage_matches_the_cpu_backend_loosely: {} is not set (run \
             scripts/fetch-nvrtc.sh)",
            nvrtc::INCLUDE_ENV
        );
        return;
    }
    let (g, weights) = graph();
    let (opt, _) = transfuse_passes::optimize(&g, &transfuse_passes::Options::default())
        .expect("the graph optimizes");
    // f16 keeps 11 significant bits, bf16 8: every stored intermediate is rounded.
    check(&dev, &opt, &g, &weights, Elem::F16, 2e-2);
    check(&dev, &opt, &g, &weights, Elem::BF16, 6e-2);
}

/// `time_forward` on the CUDA backend is timed by CUDA events: the clock is `"device"`, every
/// run has a positive, finite time, and the timer without launches gives `None`. The results
/// stay right after timing.
#[test]
fn forward_runs_are_timed_by_cuda_events() {
    let Some(dev) = device_or_skip("forward_runs_are_timed_by_cuda_events") else {
        return;
    };
    assert!(dev.timer_start());
    assert_eq!(dev.timer_stop().unwrap(), None, "no launch, no device time");
    let (g, weights) = graph();
    let mut p = Program::new(dev.clone(), &g, &weights, Elem::F32).unwrap();
    let x = inputs(7, 4);
    let t = p.time_forward(&x, 3).unwrap();
    eprintln!("event times: {:?}", t.seconds);
    assert_eq!(t.clock, "device");
    assert_eq!(t.seconds.len(), 3);
    assert!(
        t.seconds.iter().all(|s| *s > 0.0 && s.is_finite()),
        "{:?}",
        t.seconds
    );
    let want = CpuBackend::reference().run(&g, &weights, &x).unwrap();
    assert_close(&p.run(&x, &[]).unwrap(), &want, 1e-4, "after timing");
}

/// A kernel compiled by one device handle is stored on disk and the next handle loads it
/// (with `TRANSFUSE_CACHE_DIR` pointing at a fresh folder); the results match the CPU.
#[test]
fn compiled_kernels_are_cached_on_disk() {
    if cuda::shared().is_err() {
        let _ = device_or_skip("compiled_kernels_are_cached_on_disk");
        return;
    }
    let dir = std::env::temp_dir().join(format!("transfuse-cuda-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Read by CudaDevice::new (another test opening a device meanwhile may use it too: harmless).
    std::env::set_var("TRANSFUSE_CACHE_DIR", &dir);
    let (g, weights) = graph();
    let x = inputs(3, 5);
    let want = CpuBackend::reference().run(&g, &weights, &x).unwrap();
    let first = Arc::new(CudaDevice::new().unwrap());
    let mut p = Program::new(first, &g, &weights, Elem::F32).unwrap();
    assert_close(&p.run(&x, &[]).unwrap(), &want, 1e-4, "first handle");
    let stored = std::fs::read_dir(dir.join("kernels"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(stored > 0, "nothing stored under {}", dir.display());
    let second = Arc::new(CudaDevice::new().unwrap());
    let mut p = Program::new(second, &g, &weights, Elem::F32).unwrap();
    assert_close(
        &p.run(&x, &[]).unwrap(),
        &want,
        1e-4,
        "second handle, from the disk cache",
    );
    let after = std::fs::read_dir(dir.join("kernels"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(after, stored, "the second handle compiled nothing new");
    std::env::remove_var("TRANSFUSE_CACHE_DIR");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where a driver library is present, it exports every entry point the backend calls through
/// cudarc (whose missing symbols would be a panic at first call, not an error).
#[test]
fn the_driver_exports_every_entry_point_used() {
    if !cuda::driver_present() {
        eprintln!("skipped the_driver_exports_every_entry_point_used: no driver library");
        return;
    }
    assert_eq!(cuda::missing_driver_symbols(), Vec::<&str>::new());
}

/// Points this process's tuning cache at a temporary folder: tests never touch the user's.
fn isolate_tuning_cache() {
    transfuse_runtime::tune::set_cache_dir(Some(
        std::env::temp_dir().join(format!("transfuse-test-cache-{}", std::process::id())),
    ));
}

// --- NCCL (runtime/src/nccl.rs) -------------------------------------------------------------
//
// Without libnccl.so.2 these are an error, never a panic; with it and a device they run
// collectives for real. They skip with a message unless `TRANSFUSE_REQUIRE` names `nccl`
// (then NCCL must load) and `cuda` (then a device must exist too). scripts/gpu-check.sh runs
// them with both. Two or more devices add the cross-device checks; one device cannot (NCCL
// refuses two ranks of one communicator on the same GPU).

use std::time::Duration;
use transfuse_runtime::comm::Communicator;
use transfuse_runtime::nccl::{self, NcclComm, UniqueId};

/// True when NCCL loads; panics when `TRANSFUSE_REQUIRE` names `nccl` and it does not.
fn nccl_or_skip(test: &str) -> bool {
    match nccl::available() {
        Ok(()) => {
            eprintln!(
                "{test}: NCCL {} from {}",
                nccl::version_string(nccl::version().unwrap()),
                nccl::library_path().unwrap().display()
            );
            true
        }
        Err(e) if required("nccl") => panic!("TRANSFUSE_REQUIRE names nccl: {e}"),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            false
        }
    }
}

#[test]
fn nccl_missing_is_an_error_from_every_entry_point_not_a_panic() {
    if nccl::available().is_ok() {
        eprintln!("NCCL is present: nothing to check here");
        return;
    }
    assert!(
        !required("nccl"),
        "TRANSFUSE_REQUIRE names nccl but it does not load"
    );
    let e = nccl::available().unwrap_err().to_string();
    assert!(
        e.contains("libnccl.so.2") && e.contains(nccl::LIB_ENV),
        "{e}"
    );
    assert!(UniqueId::new().is_err());
    assert!(nccl::version().is_err());
}

/// The devices for a communicator of `n` ranks, or `None` (with a message) when fewer exist.
fn devices_or_skip(test: &str, n: usize) -> Option<Vec<Arc<CudaDevice>>> {
    if !nccl_or_skip(test) {
        return None;
    }
    let count = match cuda::device_count() {
        Ok(c) => c,
        Err(e) if required("cuda") => panic!("TRANSFUSE_REQUIRE names cuda: {e}"),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            return None;
        }
    };
    if count < n {
        assert!(
            !(required("cuda") && n == 1),
            "TRANSFUSE_REQUIRE names cuda but the driver sees no device"
        );
        eprintln!("skipped {test}: needs {n} CUDA devices, the driver sees {count}");
        return None;
    }
    isolate_tuning_cache();
    Some(
        (0..n)
            .map(|i| Arc::new(CudaDevice::open(i).unwrap()))
            .collect(),
    )
}

#[test]
fn nccl_world_of_one_runs_every_collective() {
    let Some(devs) = devices_or_skip("nccl_world_of_one_runs_every_collective", 1) else {
        return;
    };
    let id = UniqueId::new().unwrap();
    let comms = NcclComm::init(devs, 0, 1, &id, Duration::from_secs(60)).unwrap();
    let c = &comms[0];
    let x = rand_vec(1000, 3, 1.0);
    let mut y = x.clone();
    c.all_reduce_sum(&mut y).unwrap();
    assert_eq!(y, x, "the sum over one rank is the identity");
    assert_eq!(c.all_gather(&x).unwrap(), vec![x.clone()]);
    assert_eq!(c.reduce_scatter_sum(&x).unwrap(), x);
    // On device buffers, in place.
    let d = c.device();
    let buf = d.alloc(4 * x.len() as u64, "x").unwrap();
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    d.write(&buf, &bytes).unwrap();
    c.all_reduce_buffer(&buf, x.len()).unwrap();
    assert_eq!(d.read(&buf, bytes.len() as u64).unwrap(), bytes);
    // An abort ends the communicator: later calls return its error.
    c.abort("injected failure");
    let e = c.all_reduce_sum(&mut y).unwrap_err().to_string();
    assert!(e.contains("injected failure"), "{e}");
    assert!(c.poisoned().is_some());
}

#[test]
fn nccl_two_devices_reduce_gather_scatter_and_pass_tensors() {
    let Some(devs) = devices_or_skip("nccl_two_devices_reduce_gather_scatter_and_pass_tensors", 2)
    else {
        return;
    };
    let id = UniqueId::new().unwrap();
    let comms = NcclComm::init(devs, 0, 2, &id, Duration::from_secs(60)).unwrap();
    let xs: Vec<Vec<f32>> = (0..2).map(|r| rand_vec(512, 10 + r, 1.0)).collect();
    let sum: Vec<f32> = xs[0].iter().zip(&xs[1]).map(|(a, b)| a + b).collect();
    std::thread::scope(|s| {
        for (r, c) in comms.iter().enumerate() {
            let (xs, sum) = (&xs, &sum);
            s.spawn(move || {
                let mut y = xs[r].clone();
                c.all_reduce_sum(&mut y).unwrap();
                for (a, b) in y.iter().zip(sum) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
                assert_eq!(c.all_gather(&xs[r]).unwrap(), *xs);
                let part = c.reduce_scatter_sum(&xs[r]).unwrap();
                let want = &sum[r * 256..(r + 1) * 256];
                for (a, b) in part.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
                let t = Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, r as f32]);
                if r == 0 {
                    c.send(1, t).unwrap();
                } else {
                    let got = c.recv(0).unwrap();
                    assert_eq!(
                        got,
                        Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
                    );
                }
            });
        }
    });
}

#[test]
fn nccl_a_failing_rank_ends_the_other_instead_of_hanging_it() {
    let Some(devs) = devices_or_skip(
        "nccl_a_failing_rank_ends_the_other_instead_of_hanging_it",
        2,
    ) else {
        return;
    };
    let id = UniqueId::new().unwrap();
    // The timeout is the fallback; the abort must end rank 0 long before it.
    let comms = NcclComm::init(devs, 0, 2, &id, Duration::from_secs(120)).unwrap();
    std::thread::scope(|s| {
        let c0 = &comms[0];
        let c1 = &comms[1];
        let waiting = s.spawn(move || {
            let mut y = vec![1.0f32; 64];
            c0.all_reduce_sum(&mut y)
        });
        std::thread::sleep(Duration::from_millis(200));
        c1.abort("rank 1 failed: injected");
        let e = waiting.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("injected"), "{e}");
    });
}

#[test]
fn nccl_a_rank_that_never_arrives_times_out() {
    let Some(devs) = devices_or_skip("nccl_a_rank_that_never_arrives_times_out", 2) else {
        return;
    };
    let id = UniqueId::new().unwrap();
    let comms = NcclComm::init(devs, 0, 2, &id, Duration::from_secs(2)).unwrap();
    let mut y = vec![1.0f32; 64];
    // Rank 1 never calls: rank 0 gives up at its timeout and aborts.
    let e = comms[0].all_reduce_sum(&mut y).unwrap_err().to_string();
    assert!(e.contains("timed out"), "{e}");
}

#[test]
fn nccl_unique_ids_come_from_the_library_without_a_device() {
    if !nccl_or_skip("nccl_unique_ids_come_from_the_library_without_a_device") {
        return;
    }
    // ncclGetUniqueId only opens a bootstrap socket: no GPU needed.
    let (a, b) = (UniqueId::new().unwrap(), UniqueId::new().unwrap());
    assert_ne!(a, b, "two ids (two bootstrap roots) differ");
    assert_eq!(UniqueId::from_hex(&a.to_hex()).unwrap(), a);
}

/// A CUDA rank's program running its collectives on its own buffers
/// (`tp::DeviceSegments` over a world-of-one `NcclComm`): every collective of the chain on the
/// device path (NCCL on the program's buffers, the reorders as device copies), equal to the
/// CPU backend's world of one, and logged as run on the device.
#[test]
fn nccl_world_of_one_device_segments_run_collectives_on_device_buffers() {
    use transfuse_runtime::comm::DeviceComm;
    use transfuse_runtime::tp::DeviceSegments;
    let test = "nccl_world_of_one_device_segments_run_collectives_on_device_buffers";
    let Some(devs) = devices_or_skip(test, 1) else {
        return;
    };
    let g = common::dist_chain(1);
    let x = Tensor::f32(vec![2, 4, 6], rand_vec(48, 7, 2.0));
    let inputs: TensorMap = HashMap::from([("x".to_string(), x)]);
    let want = CpuBackend::new().run(&g, &Weights::new(), &inputs).unwrap();
    let id = UniqueId::new().unwrap();
    let comms = NcclComm::init(devs.clone(), 0, 1, &id, Duration::from_secs(60)).unwrap();
    let c = comms[0].clone();
    let dc: Arc<dyn DeviceComm<CudaDevice>> = c.clone();
    let hc: Arc<dyn Communicator> = c.clone();
    let mut l = DeviceSegments::load(devs[0].clone(), &g, &Weights::new(), dc, hc).unwrap();
    assert_eq!(l.device_collectives(), (6, 6));
    for round in 0..2 {
        let got = l.run(&inputs, &[]).unwrap();
        for (k, v) in &want {
            assert_eq!(&got[k], v, "{k} (call {round})");
        }
    }
    let log = c.take_log();
    assert_eq!(log.len(), 8, "{log:?}");
    assert!(log.iter().all(|e| e.on_device), "{log:?}");
}
