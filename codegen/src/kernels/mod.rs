//! Kernel templates: each module turns a configuration (shapes known at compile time such as
//! head dim, element type, mask kind) and tunable parameters into a [`Generated`] kernel with
//! its launch geometry. Sizes known only at run time (rows, sequence lengths) are uniforms.
//!
//! Every template validates its tunables against the target's [`Limits`] and declares its
//! search space, so the autotuner can search it later without re-deriving anything.

use crate::kir::Kernel;
use crate::CodegenError;

/// A tunable parameter: its value and the values worth trying.
#[derive(Clone, Debug, PartialEq)]
pub struct Tunable {
    /// Name (`block_q`, `tile_m`, `threads`, …).
    pub name: &'static str,
    /// Value used.
    pub value: u32,
    /// Valid values under the target's limits (includes `value`).
    pub space: Vec<u32>,
}

impl Tunable {
    /// The tunable `name` at `value` whose search space is every value the points of a
    /// tuning `space` take on this axis (`get`), plus `value`, sorted and distinct.
    pub fn axis<T>(
        name: &'static str,
        value: u32,
        space: &[T],
        get: impl Fn(&T) -> u32,
    ) -> Tunable {
        let mut s: Vec<u32> = space.iter().map(get).chain([value]).collect();
        s.sort_unstable();
        s.dedup();
        Tunable {
            name,
            value,
            space: s,
        }
    }
}

/// What kind of processor runs the kernels: templates with more than one design pick by it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A GPU (or unknown): shared-memory tiles, many threads per workgroup.
    #[default]
    Gpu,
    /// A CPU adapter (lavapipe/llvmpipe, SwiftShader): every load is a loop over the SIMD
    /// lanes, so designs that hold data in registers and load vectors win (see
    /// `notes/wgsl-on-lavapipe.md`).
    Cpu,
}

/// What a target guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most threads per workgroup.
    pub max_threads: u32,
    /// Most workgroup-shared bytes.
    pub max_shared_bytes: u32,
    /// The kind of device (the runtime fills it from the adapter).
    pub kind: DeviceKind,
    /// The fewest lanes a subgroup (warp) of the device has, 0 when unknown or without
    /// subgroup operations: designs broadcasting within groups of 8 lanes
    /// ([`crate::kir::SubgroupOp::Broadcast`]) need at least 8.
    pub subgroup_min: u32,
}

impl Limits {
    /// WebGPU's guaranteed minimums (256 invocations, 16 KiB workgroup memory).
    pub fn webgpu() -> Limits {
        Limits {
            max_threads: 256,
            max_shared_bytes: 16 * 1024,
            kind: DeviceKind::Gpu,
            subgroup_min: 0,
        }
    }

    /// The same limits on a device of kind `kind`.
    pub fn with_kind(self, kind: DeviceKind) -> Limits {
        Limits { kind, ..self }
    }

    /// CUDA (sm_80+): 1024 threads per block, 48 KiB static shared memory.
    pub fn cuda() -> Limits {
        Limits {
            max_threads: 1024,
            max_shared_bytes: 48 * 1024,
            kind: DeviceKind::Gpu,
            subgroup_min: 32,
        }
    }
}

/// A factor of a launch size: a uniform's run-time value or a constant.
#[derive(Clone, Debug, PartialEq)]
pub enum Factor {
    /// The value of a uniform of the kernel.
    Uniform(String),
    /// A constant.
    Const(u32),
}

/// `ceil(Π factors / per_group)` workgroups along one axis.
#[derive(Clone, Debug, PartialEq)]
pub struct GridDim {
    /// Factors of the work size.
    pub factors: Vec<Factor>,
    /// Work items per workgroup.
    pub per_group: u32,
}

impl GridDim {
    /// Exactly one workgroup.
    pub fn one() -> GridDim {
        GridDim {
            factors: vec![],
            per_group: 1,
        }
    }

    /// `ceil(uniform / per_group)`.
    pub fn of(uniform: &str, per_group: u32) -> GridDim {
        GridDim {
            factors: vec![Factor::Uniform(uniform.into())],
            per_group,
        }
    }

    /// Evaluates with the uniforms' values.
    pub fn eval(&self, uniform: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        let mut n: u64 = 1;
        for f in &self.factors {
            n = n.checked_mul(match f {
                Factor::Uniform(u) => uniform(u)?,
                Factor::Const(c) => u64::from(*c),
            })?;
        }
        Some(n.div_ceil(u64::from(self.per_group.max(1))))
    }
}

/// A kernel ready to launch: source-independent IR, grid, tunables, estimated work.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The kernel.
    pub kernel: Kernel,
    /// Workgroups along x, y, z.
    pub grid: [GridDim; 3],
    /// Tunables with their values and search spaces.
    pub tunables: Vec<Tunable>,
}

/// Checks a kernel against a target's limits.
pub fn check_limits(k: &Kernel, limits: &Limits) -> Result<(), CodegenError> {
    if k.threads() > limits.max_threads {
        return Err(CodegenError::Kernel {
            kernel: k.name.clone(),
            msg: format!(
                "{} threads exceed the target's {}",
                k.threads(),
                limits.max_threads
            ),
        });
    }
    if k.shared_bytes() > limits.max_shared_bytes {
        return Err(CodegenError::Kernel {
            kernel: k.name.clone(),
            msg: format!(
                "{} bytes of shared memory exceed the target's {}",
                k.shared_bytes(),
                limits.max_shared_bytes
            ),
        });
    }
    Ok(())
}

pub mod attention;
pub mod decode;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod rope;

/// Every family's representative kernels (validated by naga and NVRTC in the tests).
pub fn catalog() -> Vec<Generated> {
    let mut all = attention::catalog();
    all.extend(decode::catalog());
    all.extend(norm::catalog());
    all.extend(matmul::catalog());
    all.extend(elementwise::catalog());
    all.extend(rope::catalog());
    all
}
