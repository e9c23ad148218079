//! # transfuse-runtime
//!
//! Runs graphs. The [`Backend`] trait is what every backend implements: [`CpuBackend`] is the
//! executable specification of every op, the reference the device backends are checked
//! against; [`WgpuBackend`] (any WebGPU adapter) and [`CudaBackend`] (cudarc + NVRTC) run the
//! graph as compiled kernels through one executor, [`Program`], generic over a
//! [`device::Device`] ([`memory`] plans its temporaries by liveness). [`backend_by_name`]
//! picks one (`auto`: CUDA, else wgpu, else CPU). A backend `load`s a graph once (kernels
//! compiled, weights resident) into a [`Loaded`] graph that runs many times and can carry
//! outputs on the device into the next call (a KV cache). Symbolic dims (`batch`, `seq`,
//! `past`) are bound from the inputs on each call ([`bind_inputs`]), so one graph serves every
//! batch size and sequence length without recompilation.
//!
//! ```
//! use std::collections::HashMap;
//! use transfuse_ir::{Builder, DType, Dim, Tensor};
//! use transfuse_runtime::{Backend, CpuBackend};
//!
//! let mut b = Builder::new();
//! let x = b.input("x", vec![Dim::sym("n"), 2.into()], DType::F32).unwrap();
//! let y = b.softmax(x).unwrap();
//! b.output("y", y);
//! let g = b.finish();
//!
//! let inputs = HashMap::from([("x".to_string(), Tensor::f32(vec![1, 2], vec![0.0, 0.0]))]);
//! let out = CpuBackend::new().run(&g, &HashMap::new(), &inputs).unwrap();
//! assert_eq!(out["y"].as_f32().unwrap(), &[0.5, 0.5]);
//!
//! // The same graph as a WGSL kernel on a WebGPU adapter, when this machine has one.
//! if let Ok(gpu) = transfuse_runtime::WgpuBackend::new() {
//!     let mut loaded = gpu.load(&g, &HashMap::new()).unwrap();
//!     let out = loaded.run(&inputs, &[]).unwrap();
//!     assert!((out["y"].as_f32().unwrap()[0] - 0.5).abs() < 1e-6);
//! }
//! ```
#![warn(missing_docs)]

use std::collections::HashMap;

use transfuse_codegen::kir::Elem;
use transfuse_ir::{Bindings, DType, Graph, IrError, Tensor, Weights};

pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod fold;
pub mod kernel_cache;
pub mod memory;
pub mod nccl;
pub mod nvrtc;
pub mod pp;
pub mod program;
pub mod select;
pub mod tp;
pub mod tune;
pub mod webgpu;

pub use cpu::CpuBackend;
pub use cuda::CudaBackend;
pub use fold::fold_weights;
pub use program::{DeviceBackend, Program};
pub use select::{backend_by_name, BackendChoice};
pub use webgpu::WgpuBackend;

/// Named host tensors (graph inputs or outputs).
pub type TensorMap = HashMap<String, Tensor>;

/// Errors of running a graph. Each names the input, weight or node it is about.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RuntimeError {
    /// A graph input was not supplied.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// An input has the wrong dtype.
    #[error("input `{name}` has dtype {found}, expected {expected}")]
    InputDtype {
        /// Input name.
        name: String,
        /// Declared dtype.
        expected: DType,
        /// Supplied dtype.
        found: DType,
    },
    /// An input's shape does not fit its declaration (or binds a symbol two ways).
    #[error("input `{name}` has shape {found:?}, expected {expected}: {why}")]
    InputShape {
        /// Input name.
        name: String,
        /// Declared shape, printed.
        expected: String,
        /// Supplied shape.
        found: Vec<usize>,
        /// What does not fit.
        why: String,
    },
    /// A weight the graph needs was not supplied.
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    /// A weight has the wrong shape.
    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    WeightShape {
        /// Weight name.
        name: String,
        /// Declared shape.
        expected: Vec<usize>,
        /// Supplied shape.
        found: Vec<usize>,
    },
    /// A gather index is out of range.
    #[error("op `gather` (node %{node}): index {index} out of range for table of {size} rows")]
    IndexOutOfRange {
        /// The gather node.
        node: u32,
        /// The offending index.
        index: i64,
        /// The table's row count.
        size: usize,
    },
    /// A node could not be executed (unsupported dtype combination and the like).
    #[error("op `{op}` (node %{node}): {msg}")]
    Op {
        /// Op name.
        op: String,
        /// Node id.
        node: u32,
        /// What went wrong.
        msg: String,
    },
    /// A shape expression could not be evaluated.
    #[error(transparent)]
    Ir(#[from] IrError),
    /// A device backend could not start or failed: no adapter or driver, a kernel the device
    /// rejected, a tensor over its limits.
    #[error("{backend}: {msg}")]
    Device {
        /// `wgpu` or `cuda`.
        backend: String,
        /// What went wrong.
        msg: String,
    },
    /// The tuning cache could not be read or written (a corrupt file is not this: it is moved
    /// aside with a warning).
    #[error("tuning cache {path}: {msg}")]
    Cache {
        /// The file or folder.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The graph could not be lowered to kernels for the device.
    #[error("codegen: {0}")]
    Codegen(String),
    /// A collective of tensor parallelism failed: a rank failed and aborted the group (the
    /// message is that rank's error), a collective timed out, or the ranks disagreed.
    #[error("parallel ranks: {0}")]
    Comm(String),
}

impl From<transfuse_codegen::CodegenError> for RuntimeError {
    fn from(e: transfuse_codegen::CodegenError) -> Self {
        RuntimeError::Codegen(e.to_string())
    }
}

/// A backend that runs whole graphs.
pub trait Backend {
    /// A short name (`cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &str;

    /// The device it runs on, for people (`--verbose`).
    fn description(&self) -> String {
        self.name().to_string()
    }

    /// Prepares `graph` to run: compiles its kernels and uploads `weights` once.
    fn load(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Loaded>, RuntimeError>;

    /// The optimizer's cost profile for this backend (a `passes::Profile` name): `gpu`, `cpu`
    /// (the CPU backend) or `cpu-adapter` (a GPU API on a CPU adapter such as lavapipe).
    fn cost_profile(&self) -> &'static str {
        "gpu"
    }

    /// The float storage types this backend can run (`F32` at least).
    fn storage_types(&self) -> Vec<Elem> {
        vec![Elem::F32]
    }

    /// Loads `graph` with its float tensors stored as `storage` on the device (inputs and
    /// outputs stay f32 on the host and are converted at the transfer). `F32` is [`Backend::load`];
    /// any other type the backend does not list in [`Backend::storage_types`] is an error
    /// naming the backend.
    fn load_as(
        &self,
        graph: &Graph,
        weights: &Weights,
        storage: Elem,
    ) -> Result<Box<dyn Loaded>, RuntimeError> {
        if storage == Elem::F32 {
            return self.load(graph, weights);
        }
        Err(RuntimeError::Device {
            backend: self.name().to_string(),
            msg: format!("{storage:?} storage is not supported (it runs f32 only)"),
        })
    }

    /// Runs `graph` with `weights` on `inputs` once, returning its named outputs.
    fn run(
        &self,
        graph: &Graph,
        weights: &Weights,
        inputs: &TensorMap,
    ) -> Result<TensorMap, RuntimeError> {
        self.load(graph, weights)?.run(inputs, &[])
    }
}

/// Time of one kernel (or op) of a profiled run.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// Kernel entry name (or op name on the CPU).
    pub name: String,
    /// The IR ops it computes.
    pub ops: Vec<String>,
    /// Seconds, host-measured around the launch and a device sync.
    pub seconds: f64,
}

/// A graph ready to run on a backend, its weights resident.
pub trait Loaded: Send {
    /// Runs on `inputs`. Each `(output, input)` pair of `carry` keeps that output on the
    /// device instead of returning it, and feeds it as that input to the following calls that
    /// do not supply it (a KV cache between decoding steps).
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError>;

    /// Drops the carried tensors.
    fn clear_carry(&mut self);

    /// Runs on `inputs` timing each kernel (each launch synchronised, so slower than
    /// [`Loaded::run`]); the outputs are discarded.
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError>;

    /// Times `iters` forward runs on `inputs` and says by which clock. The default times
    /// whole [`Loaded::run`] calls on the host (`"host"`); device backends upload the inputs
    /// once and time the launches of one forward with the device's timestamps where it has
    /// them (`"device"`), else up to a device sync (`"host-sync"`), so transfers are not
    /// counted.
    fn time_forward(&mut self, inputs: &TensorMap, iters: usize) -> Result<Timing, RuntimeError> {
        let mut seconds = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t0 = std::time::Instant::now();
            self.run(inputs, &[])?;
            seconds.push(t0.elapsed().as_secs_f64());
        }
        Ok(Timing {
            seconds,
            clock: "host",
        })
    }

    /// The memory plan of the last run (`None` on the CPU backend).
    fn memory(&self) -> Option<MemoryReport> {
        None
    }

    /// Where the last run's kernel tunables came from (`None` on the CPU backend).
    fn tuning(&self) -> Option<TuningUse> {
        None
    }

    /// Device bytes the last run wrote (`None` on the CPU backend, which has no device
    /// memory to count).
    fn bytes_written(&self) -> Option<BytesWritten> {
        None
    }
}

/// Device bytes one run of a [`Loaded`] graph wrote ([`Loaded::bytes_written`]): host uploads,
/// device-side buffer copies and kernel stores.
///
/// A kernel's stores into a buffer it may write count as that buffer's whole logical tensor
/// at the run's dims (every kernel writes its outputs whole), except a KV cache's buffer
/// ([`transfuse_codegen::lower::PlanCache`]), whose writer stores only the new rows: it counts
/// the output's elements minus the input's. `copies` are the device copies of a cache moved
/// into a larger buffer (a growth step); readback staging copies are not counted (they write
/// host-visible staging memory, not the graph's buffers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BytesWritten {
    /// Host → device uploads (inputs; not the weights, uploaded once at load).
    pub host: u64,
    /// Device → device buffer copies.
    pub copies: u64,
    /// Kernel stores, temporaries included.
    pub kernels: u64,
    /// Bytes written per graph input and output (uploads and kernel stores), by tensor name.
    pub by_tensor: Vec<(String, u64)>,
}

impl BytesWritten {
    /// The bytes written to the named tensor (0 when none were).
    pub fn tensor(&self, name: &str) -> u64 {
        self.by_tensor
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, b)| b)
            .sum()
    }

    /// All bytes written.
    pub fn total(&self) -> u64 {
        self.host + self.copies + self.kernels
    }
}

/// Where the tunables of the last run's template kernels came from ([`Loaded::tuning`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TuningUse {
    /// Template kernels (tuning sites) of the plan.
    pub sites: usize,
    /// Of those, how many took their tunables from the tuning cache.
    pub from_cache: usize,
    /// The cache file read, or why none was (`--no-cache`).
    pub cache: String,
}

/// Forward times from [`Loaded::time_forward`].
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Seconds per run, in order.
    pub seconds: Vec<f64>,
    /// The clock: `"device"` (the device's timestamps from the start of the first kernel to
    /// the end of the last, inputs resident), `"host-sync"` (host wall time from the first
    /// launch to a device sync, inputs resident) or `"host"` (host wall time around whole
    /// runs, transfers included). See [`clock_description`].
    pub clock: &'static str,
}

/// What a [`Timing::clock`] name measures, in words.
pub fn clock_description(clock: &str) -> &'static str {
    match clock {
        "device" => "device timestamps from the start of the first kernel to the end of the last, inputs resident",
        "host-sync" => "host wall time from the first launch to a device sync, inputs resident",
        _ => "host wall time around whole runs",
    }
}

/// Device memory of the last run of a [`Loaded`] graph, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Weights, derived weights and constants (resident).
    pub persistent: u64,
    /// Inputs, outputs and carried tensors.
    pub io: u64,
    /// Temporaries with one buffer each.
    pub temps_naive: u64,
    /// Temporaries as planned by liveness ([`memory::plan`]).
    pub temps_planned: u64,
    /// Most temporary bytes live at once (the floor of any plan).
    pub temps_live_peak: u64,
}

/// Binds the graph's symbolic dims from the supplied inputs and checks their dtypes and shapes.
///
/// A dim that is a bare symbol binds it (two inputs binding it differently is an error); every
/// other dim is evaluated afterwards and must match.
pub fn bind_inputs(graph: &Graph, inputs: &TensorMap) -> Result<Bindings, RuntimeError> {
    let declared: Vec<(&str, &[transfuse_ir::Dim], DType)> = graph
        .inputs()
        .into_iter()
        .map(|(n, s, d)| (n, s.as_slice(), d))
        .collect();
    bind_shapes(&declared, &|name| {
        inputs.get(name).map(|t| (t.shape.clone(), t.dtype()))
    })
}

/// The shape and dtype supplied for an input.
pub type Supplied = (Vec<usize>, DType);

/// [`bind_inputs`] over declared `(name, shape, dtype)` inputs and a lookup of what was
/// supplied for each (shape and dtype).
pub fn bind_shapes(
    declared: &[(&str, &[transfuse_ir::Dim], DType)],
    supplied: &dyn Fn(&str) -> Option<Supplied>,
) -> Result<Bindings, RuntimeError> {
    let mut b = Bindings::new();
    let shape_err = |name: &str, shape: &[transfuse_ir::Dim], found: &[usize], why: String| {
        RuntimeError::InputShape {
            name: name.to_string(),
            expected: transfuse_ir::shape_string(shape),
            found: found.to_vec(),
            why,
        }
    };
    let mut found: Vec<Vec<usize>> = vec![];
    for &(name, shape, dtype) in declared {
        let (t_shape, t_dtype) =
            supplied(name).ok_or_else(|| RuntimeError::MissingInput(name.to_string()))?;
        if t_dtype != dtype {
            return Err(RuntimeError::InputDtype {
                name: name.to_string(),
                expected: dtype,
                found: t_dtype,
            });
        }
        if t_shape.len() != shape.len() {
            return Err(shape_err(name, shape, &t_shape, "rank differs".into()));
        }
        for (d, &n) in shape.iter().zip(&t_shape) {
            if let Some(s) = d.as_sym() {
                match b.get(s) {
                    Some(&prev) if prev != n => {
                        return Err(shape_err(
                            name,
                            shape,
                            &t_shape,
                            format!("`{s}` is {n} here but {prev} in another input"),
                        ))
                    }
                    _ => {
                        b.insert(s.to_string(), n);
                    }
                }
            }
        }
        found.push(t_shape);
    }
    for (&(name, shape, _), t_shape) in declared.iter().zip(&found) {
        for (d, &n) in shape.iter().zip(t_shape) {
            let want = d
                .eval(&b)
                .map_err(|e| shape_err(name, shape, t_shape, e.to_string()))?;
            if want != n {
                return Err(shape_err(
                    name,
                    shape,
                    t_shape,
                    format!("dim `{d}` is {want}, got {n}"),
                ));
            }
        }
    }
    Ok(b)
}
