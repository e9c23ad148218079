//! The device interface the plan executor ([`crate::program`]) runs on: buffers, kernel
//! compilation, launches. One implementation per API: [`crate::webgpu::WgpuDevice`] (any WebGPU
//! adapter through wgpu) and [`crate::cuda::CudaDevice`] (cudarc's driver API + NVRTC).
//!
//! The executor owns everything above this line (which buffer a tensor lives in, which kernel
//! runs next, the memory plan); a device only moves bytes and launches what it is given, in
//! order. Launches are asynchronous; [`Device::read`] and [`Device::sync`] wait for every launch
//! before them.

use transfuse_codegen::kernels::Limits;
use transfuse_codegen::kir::{Elem, Kernel};
use transfuse_codegen::lower::Target;

use crate::RuntimeError;

/// What the executor needs to know about a device before lowering a graph for it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Backend name (`wgpu`, `cuda`).
    pub backend: &'static str,
    /// Human-readable adapter / device description (printed by `--verbose`).
    pub description: String,
    /// The printer its kernels need.
    pub target: Target,
    /// Threads per workgroup and shared memory the lowering may use.
    pub limits: Limits,
    /// Largest range one kernel parameter may bind, in bytes.
    pub max_binding_bytes: u64,
    /// Most storage buffers one kernel may bind.
    pub max_storage_buffers: u32,
    /// Most workgroups per grid axis.
    pub max_grid: [u32; 3],
    /// Storage types its kernels may use.
    pub elems: Vec<Elem>,
    /// True for a real GPU, false for a CPU adapter (lavapipe, llvmpipe, WARP).
    pub is_gpu: bool,
}

/// A compute device (see the module docs).
pub trait Device: Send + Sync {
    /// A device buffer.
    type Buffer: Send;
    /// A compiled kernel, ready to launch.
    type Module: Send;
    /// A kernel's buffers bound once ([`Device::bind`]).
    type Bound: Send;

    /// Limits and identity.
    fn info(&self) -> &DeviceInfo;

    /// A zeroed buffer of at least `bytes` bytes (at least 4, rounded up to 4). `what` names the
    /// tensor in errors.
    fn alloc(&self, bytes: u64, what: &str) -> Result<Self::Buffer, RuntimeError>;

    /// Writes `data` at the start of `buf`, after every launch issued before.
    fn write(&self, buf: &Self::Buffer, data: &[u8]) -> Result<(), RuntimeError>;

    /// Reads the first `bytes` bytes of `buf`, after every launch issued before.
    fn read(&self, buf: &Self::Buffer, bytes: u64) -> Result<Vec<u8>, RuntimeError>;

    /// Copies byte runs `(from, to, bytes)` of `src` to `dst` (another buffer; offsets and
    /// lengths multiples of 4), after every launch issued before and before every later one:
    /// a KV cache moved into a larger buffer. The default reads `src` back and writes `dst`
    /// whole from the start, so it is only for a fresh (zeroed) `dst`; devices override it with
    /// a device-side copy.
    fn copy(
        &self,
        src: &Self::Buffer,
        dst: &Self::Buffer,
        runs: &[(u64, u64, u64)],
    ) -> Result<(), RuntimeError> {
        let src_end = runs.iter().map(|r| r.0 + r.2).max().unwrap_or(0);
        let dst_end = runs.iter().map(|r| r.1 + r.2).max().unwrap_or(0);
        if dst_end == 0 {
            return Ok(());
        }
        let data = self.read(src, src_end)?;
        let mut out = vec![0u8; dst_end as usize];
        for &(from, to, n) in runs {
            let (from, to, n) = (from as usize, to as usize, n as usize);
            out[to..to + n].copy_from_slice(&data[from..from + n]);
        }
        self.write(dst, &out)
    }

    /// Compiles `kernel` (printed for [`DeviceInfo::target`]).
    fn compile(&self, kernel: &Kernel) -> Result<Self::Module, RuntimeError>;

    /// Enqueues one launch: `bufs` in the kernel's parameter order, its `uniforms`, `grid`
    /// workgroups. Binds the buffers anew each time: a caller launching the same kernel on the
    /// same buffers again keeps a [`Device::bind`] and calls [`Device::launch_bound`].
    fn launch(
        &self,
        module: &Self::Module,
        bufs: &[&Self::Buffer],
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        let bound = self.bind(module, bufs)?;
        self.launch_bound(module, &bound, uniforms, grid)
    }

    /// The buffers of a kernel bound once (a bind group on wgpu, the argument pointers on
    /// CUDA), for any number of launches of `module` on them. Launch it only on buffers
    /// [`Device::bound_to`] confirms, which the caller keeps alive. Checks the buffer count.
    fn bind(
        &self,
        module: &Self::Module,
        bufs: &[&Self::Buffer],
    ) -> Result<Self::Bound, RuntimeError>;

    /// Whether `bound` was made by [`Device::bind`] for `module` and exactly `bufs`.
    fn bound_to(&self, bound: &Self::Bound, module: &Self::Module, bufs: &[&Self::Buffer]) -> bool;

    /// [`Device::launch`] with buffers bound before; only the uniforms and the grid are new.
    fn launch_bound(
        &self,
        module: &Self::Module,
        bound: &Self::Bound,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError>;

    /// Waits for every launch issued so far.
    fn sync(&self) -> Result<(), RuntimeError>;

    /// Starts timing the launches that follow on the device's own clock (timestamp queries);
    /// false when the device has none.
    fn timer_start(&self) -> bool {
        false
    }

    /// After [`Device::timer_start`]: waits for the launches and returns the device seconds
    /// from the start of the first one to the end of the last; `None` without a device clock
    /// or launches (then only synchronises).
    fn timer_stop(&self) -> Result<Option<f64>, RuntimeError> {
        self.sync()?;
        Ok(None)
    }
}

/// The argument check of every [`Device::launch`]: `bufs` and `uniforms` as many as kernel
/// `name` declares (`want`: buffers, uniforms).
pub fn check_launch_args(
    backend: &str,
    name: &str,
    want: (usize, usize),
    bufs: usize,
    uniforms: usize,
) -> Result<(), RuntimeError> {
    if (bufs, uniforms) == want {
        return Ok(());
    }
    Err(RuntimeError::Device {
        backend: backend.to_string(),
        msg: format!(
            "kernel `{name}` takes {} buffers and {} uniforms, got {bufs} and {uniforms}",
            want.0, want.1
        ),
    })
}
