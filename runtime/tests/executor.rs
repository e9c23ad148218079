//! The plan executor ([`Program`]) on a device whose kernels run on the kernel-IR interpreter:
//! no GPU, no driver, and limits chosen per test, so the executor's own logic is checked
//! everywhere: the memory planner's slot reuse (results equal the CPU backend's), carried
//! outputs, grid clamping for grid-stride kernels, and clean errors naming the tensor or kernel
//! for a binding over the device's limit, too many storage buffers, a grid too large for a
//! kernel that cannot stride, and gathered ids out of range.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use transfuse_codegen::interp::{self, HostBuf};
use transfuse_codegen::kernels::Limits;
use transfuse_codegen::kir::{Elem, Kernel};
use transfuse_codegen::lower::Target;
use transfuse_ir::{Builder, DType, Dim, Graph, Tensor, Weights};
use transfuse_runtime::device::{Device, DeviceInfo};
use transfuse_runtime::{
    fold_weights, Backend, CpuBackend, Loaded, Program, RuntimeError, TensorMap,
};

/// Kernels run by the interpreter on host memory.
struct InterpDevice {
    info: DeviceInfo,
    launches: Mutex<usize>,
    /// Buffer sets bound ([`Device::bind`]).
    binds: Mutex<usize>,
}

impl InterpDevice {
    fn new(max_binding_bytes: u64, max_storage_buffers: u32, max_grid: u32) -> Arc<InterpDevice> {
        isolate_tuning_cache();
        Arc::new(InterpDevice {
            info: DeviceInfo {
                backend: "interp",
                description: "kernel-IR interpreter".into(),
                target: Target::Wgsl,
                limits: Limits::webgpu(),
                max_binding_bytes,
                max_storage_buffers,
                max_grid: [max_grid; 3],
                elems: vec![Elem::F32],
                is_gpu: false,
            },
            launches: Mutex::new(0),
            binds: Mutex::new(0),
        })
    }

    fn roomy() -> Arc<InterpDevice> {
        InterpDevice::new(1 << 30, 8, 65_535)
    }
}

fn to_host(bytes: &[u8], e: Elem) -> HostBuf {
    let words = bytes
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect::<Vec<_>>();
    match e {
        Elem::I32 => HostBuf::I32(words.into_iter().map(i32::from_le_bytes).collect()),
        Elem::U32 | Elem::Bool => HostBuf::U32(words.into_iter().map(u32::from_le_bytes).collect()),
        _ => HostBuf::F32(words.into_iter().map(f32::from_le_bytes).collect()),
    }
}

fn to_bytes(h: &HostBuf) -> Vec<u8> {
    match h {
        HostBuf::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostBuf::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HostBuf::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

impl Device for InterpDevice {
    type Buffer = Arc<Mutex<Vec<u8>>>;
    type Module = Kernel;
    type Bound = Vec<Arc<Mutex<Vec<u8>>>>;

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: u64, _what: &str) -> Result<Self::Buffer, RuntimeError> {
        Ok(Arc::new(Mutex::new(vec![
            0;
            bytes.max(4).div_ceil(4) as usize
                * 4
        ])))
    }

    fn write(&self, buf: &Self::Buffer, data: &[u8]) -> Result<(), RuntimeError> {
        buf.lock().unwrap()[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, buf: &Self::Buffer, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        Ok(buf.lock().unwrap()[..bytes as usize].to_vec())
    }

    fn compile(&self, kernel: &Kernel) -> Result<Kernel, RuntimeError> {
        Ok(kernel.clone())
    }

    fn bind(&self, _k: &Kernel, bufs: &[&Self::Buffer]) -> Result<Self::Bound, RuntimeError> {
        *self.binds.lock().unwrap() += 1;
        Ok(bufs.iter().map(|&b| b.clone()).collect())
    }

    fn bound_to(&self, bound: &Self::Bound, _k: &Kernel, bufs: &[&Self::Buffer]) -> bool {
        bound.len() == bufs.len() && bound.iter().zip(bufs).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    fn launch_bound(
        &self,
        k: &Kernel,
        bound: &Self::Bound,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        let bufs: Vec<&Self::Buffer> = bound.iter().collect();
        *self.launches.lock().unwrap() += 1;
        let mut host: Vec<HostBuf> = bufs
            .iter()
            .zip(&k.buffers)
            .map(|(b, p)| to_host(&b.lock().unwrap(), p.elem))
            .collect();
        interp::run(k, grid, &mut host, uniforms, 32)?;
        for ((b, p), h) in bufs.iter().zip(&k.buffers).zip(&host) {
            if p.access == transfuse_codegen::kir::Access::ReadWrite {
                let bytes = to_bytes(h);
                b.lock().unwrap()[..bytes.len()].copy_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}

fn data(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A two-layer MLP block with a residual and a layer norm over `[n, width]`: several
/// temporaries with overlapping and disjoint lifetimes, fused by the optimizer.
fn mlp(width: usize) -> (Graph, Weights) {
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), width.into()], DType::F32)
        .unwrap();
    let w1 = b
        .weight("w1", vec![width.into(), (2 * width).into()])
        .unwrap();
    let b1 = b.weight("b1", vec![(2 * width).into()]).unwrap();
    let w2 = b
        .weight("w2", vec![(2 * width).into(), width.into()])
        .unwrap();
    let g = b.weight("g", vec![width.into()]).unwrap();
    let be = b.weight("be", vec![width.into()]).unwrap();
    let h = b.matmul(x, w1).unwrap();
    let h = b.add(h, b1).unwrap();
    let h = b.gelu_erf(h).unwrap();
    let y = b.matmul(h, w2).unwrap();
    let y = b.add(y, x).unwrap();
    let y = b.layer_norm(y, g, be, 1e-5).unwrap();
    let z = b.softmax(y).unwrap();
    b.output("y", y);
    b.output("z", z);
    let graph = b.finish();
    let mut w: Weights = HashMap::new();
    let mut put = |name: &str, shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        w.insert(
            name.into(),
            Arc::new(Tensor::f32(shape, data(n, seed, 0.5))),
        );
    };
    put("w1", vec![width, 2 * width], 1);
    put("b1", vec![2 * width], 2);
    put("w2", vec![2 * width, width], 3);
    put("g", vec![width], 4);
    put("be", vec![width], 5);
    let opts = transfuse_passes::Options::default();
    let (g, _) = transfuse_passes::optimize(&graph, &opts).unwrap();
    fold_weights(&g, &w).unwrap()
}

fn inputs(n: usize, width: usize) -> TensorMap {
    HashMap::from([(
        "x".to_string(),
        Tensor::f32(vec![n, width], data(n * width, 9, 3.0)),
    )])
}

fn assert_close(got: &TensorMap, want: &TensorMap) {
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{name}");
        let worst = g
            .as_f32()
            .unwrap()
            .iter()
            .zip(w.as_f32().unwrap())
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        eprintln!("{name}: worst relative-ish error {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
}

#[test]
fn planned_memory_gives_the_cpu_results_and_reuses_buffers() {
    let (g, w) = mlp(24);
    let dev = InterpDevice::roomy();
    let mut p = Program::new(dev.clone(), &g, &w, Elem::F32).unwrap();
    // Several sizes in a row: slots grow and are reused across calls.
    for n in [3, 1, 50, 7] {
        let ins = inputs(n, 24);
        let want = CpuBackend::reference().run(&g, &w, &ins).unwrap();
        let got = p.run(&ins, &[]).unwrap();
        assert_close(&got, &want);
        let m = p.memory().unwrap();
        eprintln!("n={n}: {m:?}");
        assert!(m.temps_live_peak <= m.temps_planned && m.temps_planned <= m.temps_naive);
        assert!(m.persistent > 0 && m.io > 0);
    }
    assert!(*dev.launches.lock().unwrap() > 4);
}

#[test]
fn repeated_calls_reuse_each_kernels_bound_buffers() {
    // The same dims again: the same slots, so no kernel binds its buffers anew; smaller dims of
    // the same shape bucket (the same kernels) that fit the slots bind nothing new either.
    let (g, w) = mlp(24);
    let dev = InterpDevice::roomy();
    let mut p = Program::new(dev.clone(), &g, &w, Elem::F32).unwrap();
    let ins = inputs(50, 24);
    let want = CpuBackend::reference().run(&g, &w, &ins).unwrap();
    assert_close(&p.run(&ins, &[]).unwrap(), &want);
    let (binds, launches) = (*dev.binds.lock().unwrap(), *dev.launches.lock().unwrap());
    assert!(binds > 0 && launches > 0);
    for _ in 0..3 {
        assert_close(&p.run(&ins, &[]).unwrap(), &want);
    }
    assert!(*dev.launches.lock().unwrap() >= launches * 4);
    assert_eq!(
        *dev.binds.lock().unwrap(),
        binds,
        "the same buffers were bound again"
    );
    let small = inputs(40, 24);
    let want = CpuBackend::reference().run(&g, &w, &small).unwrap();
    assert_close(&p.run(&small, &[]).unwrap(), &want);
    assert_eq!(*dev.binds.lock().unwrap(), binds);
}

#[test]
fn carried_outputs_feed_the_next_call() {
    // y = x + s; the output `y` carried as input `s` accumulates: after k calls y = (k)·x.
    let mut b = Builder::new();
    let x = b.input("x", vec![Dim::sym("n")], DType::F32).unwrap();
    let s = b.input("s", vec![Dim::sym("n")], DType::F32).unwrap();
    let y = b.add(x, s).unwrap();
    b.output("y", y);
    let g = b.finish();
    let mut p = Program::new(InterpDevice::roomy(), &g, &HashMap::new(), Elem::F32).unwrap();
    let x = Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]);
    let carry = vec![("y".to_string(), "s".to_string())];
    let first = HashMap::from([
        ("x".to_string(), x.clone()),
        ("s".to_string(), Tensor::f32(vec![3], vec![0.0; 3])),
    ]);
    let out = p.run(&first, &carry).unwrap();
    assert!(out.is_empty(), "carried outputs are not returned");
    let next = HashMap::from([("x".to_string(), x.clone())]);
    p.run(&next, &carry).unwrap();
    let out = p.run(&next, &[]).unwrap();
    assert_eq!(out["y"].as_f32().unwrap(), &[3.0, 6.0, 9.0]);
    // Supplying the input again replaces the carried tensor.
    let out = p.run(&first, &[]).unwrap();
    assert_eq!(out["y"].as_f32().unwrap(), &[1.0, 2.0, 3.0]);
    // After clear_carry, the input must be supplied.
    p.run(&first, &carry).unwrap();
    p.clear_carry();
    let e = p.run(&next, &[]).unwrap_err();
    assert_eq!(e, RuntimeError::MissingInput("s".into()));
}

#[test]
fn tensors_over_the_binding_limit_are_split() {
    // w1 and w2 are 24·48·4 = 4608 bytes, over a 4000-byte binding: each is bound as two
    // chunks (960 + 192 elements) and the results do not change.
    let (g, w) = mlp(24);
    let mut p = Program::new(InterpDevice::new(4000, 8, 65_535), &g, &w, Elem::F32).unwrap();
    for n in [1, 3, 7] {
        let ins = inputs(n, 24);
        let want = CpuBackend::reference().run(&g, &w, &ins).unwrap();
        assert_close(&p.run(&ins, &[]).unwrap(), &want);
    }
    // Three chunks of 320 + 320 + 512 elements.
    let mut p = Program::new(InterpDevice::new(1300, 8, 65_535), &g, &w, Elem::F32).unwrap();
    let ins = inputs(5, 24);
    let want = CpuBackend::reference().run(&g, &w, &ins).unwrap();
    assert_close(&p.run(&ins, &[]).unwrap(), &want);
    // Activations over the binding are split per call too, on a device allowing 16 storage
    // buffers: at 60 rows the input (1440 elements), the hidden layer (2880) and both outputs
    // are chunked (960 elements a chunk); at 7 rows nothing is; then chunked again.
    let mut p = Program::new(InterpDevice::new(4000, 16, 65_535), &g, &w, Elem::F32).unwrap();
    for n in [60, 7, 40, 60] {
        let ins = inputs(n, 24);
        let want = CpuBackend::reference().run(&g, &w, &ins).unwrap();
        assert_close(&p.run(&ins, &[]).unwrap(), &want);
    }
    // Too many chunks for the kernel's storage buffers: one line naming the kernel.
    let msg = p.run(&inputs(400, 24), &[]).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(msg.contains("once its large tensors are split"), "{msg}");
    // A chunked output cannot be carried to the next call.
    let carry = vec![("y".to_string(), "x".to_string())];
    let msg = p.run(&inputs(60, 24), &carry).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("output `y`") && msg.contains("cannot be carried"),
        "{msg}"
    );
    // Splitting that needs more storage buffers than the kernel may bind is refused.
    let msg = Program::new(InterpDevice::new(600, 4, 65_535), &g, &w, Elem::F32)
        .err()
        .expect("refused")
        .to_string();
    eprintln!("{msg}");
    assert!(msg.contains("once its large tensors are split"), "{msg}");
}

#[test]
fn too_many_storage_buffers_names_the_kernel() {
    let (g, w) = mlp(8);
    let msg = Program::new(InterpDevice::new(1 << 30, 2, 65_535), &g, &w, Elem::F32)
        .err()
        .expect("refused")
        .to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("kernel `") && msg.contains("storage buffers"),
        "{msg}"
    );
}

#[test]
fn grids_clamp_for_grid_stride_kernels_and_are_refused_otherwise() {
    // A layer norm alone strides over rows: a 2-workgroup limit still gives the right answer.
    let mut b = Builder::new();
    let x = b
        .input("x", vec![Dim::sym("n"), 16.into()], DType::F32)
        .unwrap();
    let g = b.weight("g", vec![16.into()]).unwrap();
    let be = b.weight("be", vec![16.into()]).unwrap();
    let y = b.layer_norm(x, g, be, 1e-5).unwrap();
    b.output("y", y);
    let graph = b.finish();
    let (graph, _) =
        transfuse_passes::optimize(&graph, &transfuse_passes::Options::default()).unwrap();
    let w: Weights = HashMap::from([
        (
            "g".to_string(),
            Arc::new(Tensor::f32(vec![16], data(16, 1, 1.0))),
        ),
        (
            "be".to_string(),
            Arc::new(Tensor::f32(vec![16], data(16, 2, 1.0))),
        ),
    ]);
    let ins = inputs(50, 16);
    let want = CpuBackend::reference().run(&graph, &w, &ins).unwrap();
    let mut p = Program::new(InterpDevice::new(1 << 30, 8, 2), &graph, &w, Elem::F32).unwrap();
    assert_close(&p.run(&ins, &[]).unwrap(), &want);
    // The MLP's matmul tiles cannot stride: refused, naming the kernel and the axis.
    let (g, w) = mlp(8);
    let mut p = Program::new(InterpDevice::new(1 << 30, 8, 2), &g, &w, Elem::F32).unwrap();
    let msg = p.run(&inputs(200, 8), &[]).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("kernel `") && msg.contains("workgroups along axis"),
        "{msg}"
    );
}

#[test]
fn gathered_ids_out_of_range_are_an_error() {
    let mut b = Builder::new();
    let ids = b.input("ids", vec![Dim::sym("n")], DType::I64).unwrap();
    let table = b.weight("table", vec![5.into(), 3.into()]).unwrap();
    let y = b.gather(table, ids).unwrap();
    b.output("y", y);
    let g = b.finish();
    let w: Weights = HashMap::from([(
        "table".to_string(),
        Arc::new(Tensor::f32(vec![5, 3], data(15, 3, 1.0))),
    )]);
    let mut p = Program::new(InterpDevice::roomy(), &g, &w, Elem::F32).unwrap();
    let ok = HashMap::from([("ids".to_string(), Tensor::i64(vec![2], vec![4, 0]))]);
    let want = CpuBackend::reference().run(&g, &w, &ok).unwrap();
    assert_eq!(p.run(&ok, &[]).unwrap()["y"], want["y"]);
    let bad = HashMap::from([("ids".to_string(), Tensor::i64(vec![2], vec![1, 5]))]);
    match p.run(&bad, &[]).unwrap_err() {
        RuntimeError::IndexOutOfRange { index, size, .. } => assert_eq!((index, size), (5, 5)),
        e => panic!("{e}"),
    }
}

/// Points this process's tuning cache at a temporary folder: tests never touch the user's.
fn isolate_tuning_cache() {
    transfuse_runtime::tune::set_cache_dir(Some(
        std::env::temp_dir().join(format!("transfuse-test-cache-{}", std::process::id())),
    ));
}
