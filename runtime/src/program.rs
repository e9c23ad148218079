//! The plan executor: runs a lowered graph ([`transfuse_codegen::lower::Plan`]) on any
//! [`Device`].
//!
//! At load ([`Program::new`]) the graph is lowered for the device (its printer, its limits, the
//! storage type asked for), every kernel is compiled once, weights are uploaded once, constant
//! buffers filled, and the prepare kernels (weight-only work: merged QKV weights, transposes)
//! run once. Each call ([`Loaded::run`]):
//!
//! 1. binds the symbolic dims from the inputs' shapes (carried tensors included);
//! 2. checks gathered ids against their tables (the kernels clamp; the error is here);
//! 3. plans the temporaries ([`crate::memory`]) for those dims (the last call's plan when the
//!    dims repeat), growing slot buffers when a plan needs more than they hold (with 25 %
//!    headroom, so a growing KV cache does not reallocate every step);
//! 4. uploads the inputs (f32 → the plan's storage type, i64 → i32, bool → u32) and launches the
//!    forward kernels in order with the uniforms and grid [`Plan::launch_args`] gives; an
//!    attention kernel with a decode variant launches it when the query length is 1. Each
//!    compiled kernel keeps its buffers bound ([`Device::bind`]: a bind group on wgpu) and binds
//!    again only when one of its buffers changed (a slot grew, an output was carried);
//! 5. reads the outputs back, except carried ones: those stay on the device and become inputs
//!    of the next call (the buffer they replace is reused for the next output).
//!
//! Tensors over the device's largest binding (128 MiB on lavapipe) are bound as several chunk
//! buffers, the kernels that bind them rewritten to select the chunk
//! ([`transfuse_codegen::lower::rewrite::split_buffer`]): weights once at load, activations
//! per call (kernels compiled per chunk count and cached; such activations get their own
//! buffers outside the slot plan, and cannot be carried). Grids over the device's per-axis
//! limit are clamped for grid-stride kernels (they read `num_workgroups`) and refused for the
//! others; kernels with more storage buffers than the device allows (after splitting) are
//! refused, naming them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use transfuse_codegen::kir::{elem_bytes, Access, Builtin, Elem, Expr};
use transfuse_codegen::lower::{self, rewrite, BufferKind, LowerOptions, Phase, Plan};
use transfuse_ir::{Bindings, DType, Data, Graph, NodeId, Op, Tensor, Weights};

use crate::device::{Device, DeviceInfo};
use crate::memory::{self, Interval};
use crate::tune::{self, TuningCache};
use crate::{
    bind_shapes, Backend, BytesWritten, KernelTime, Loaded, MemoryReport, RuntimeError, TensorMap,
    Timing, TuningUse,
};
use transfuse_codegen::lower::tuning::Tuning;

/// A device buffer and its capacity in bytes.
struct Held<B> {
    buf: B,
    cap: u64,
}

/// A kernel as compiled for the device: the module, and per parameter the plan buffer and
/// chunk bound to it (chunk 0 unless the buffer is split).
struct Compiled<M, B> {
    module: M,
    name: String,
    binds: Vec<(String, usize)>,
    grid_strided: [bool; 3],
    /// Its buffers as bound for the last launch ([`Device::bind`]), reused while the buffers
    /// stay the same.
    bound: std::sync::Mutex<Option<B>>,
}

/// Per kernel parameter: the plan buffer and chunk bound to it.
type Binds = Vec<(String, usize)>;

/// Where a compiled kernel of another bucket was used: plan kernel index, decode variant or
/// not, entry name.
type SpareKey = (usize, bool, String);

/// A kernel compiled for device `D`.
type DevCompiled<D> = Compiled<<D as Device>::Module, <D as Device>::Bound>;

/// A plan kernel compiled: the main kernel and its decode variant.
type MainAndDecode<M, B> = (Compiled<M, B>, Option<Compiled<M, B>>);

/// A carried tensor: its buffer, shape and dtype.
type Carried<B> = (Held<B>, Vec<usize>, DType);

/// A tensor left in a device buffer between programs on one device (the segments of a rank
/// split at its collectives, [`crate::tp::DeviceSegments`]): what [`Program::run_keeping`]
/// returns and [`Program::set_device_input`] takes, so a value crosses from one program to the
/// next without a host round trip.
pub struct DeviceTensor<B> {
    /// The buffer; its first `shape`'s elements of `elem` hold the tensor.
    pub buf: B,
    /// The buffer's size in bytes (at least the tensor's).
    pub cap: u64,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// The graph's type of it.
    pub dtype: DType,
    /// The device storage type it is held in.
    pub elem: Elem,
}

/// Outputs left on the device by [`Program::run_keeping`], by name.
pub type KeptOutputs<B> = HashMap<String, DeviceTensor<B>>;

impl<B> DeviceTensor<B> {
    /// Its elements.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// The bytes its elements take.
    pub fn bytes(&self) -> u64 {
        self.elems() as u64 * u64::from(elem_bytes(self.elem))
    }
}

/// Where a plan buffer lives during a call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Slot(usize),
    Io,
    /// Over the device's largest binding: chunk buffers in `Program::big`.
    Big,
}

/// A kernel compiled with some activations split: (plan kernel, decode, (buffer, chunks)…).
type ChunkKey = (usize, bool, Vec<(String, u32)>);

/// The temporaries' placement at some dims (see `Program::temp_plan`).
struct TempPlan {
    /// Slot or `Big` of each temporary.
    places: HashMap<String, Place>,
    plan: memory::MemoryPlan,
    /// Temporaries over the largest binding: name, elements, storage type.
    big: Vec<(String, u64, Elem)>,
}

/// A gather whose ids come straight from a graph input: checked on the host before a call.
struct IdCheck {
    node: NodeId,
    input: String,
    rows: usize,
}

/// A graph compiled for a device, weights resident (see the module docs).
pub struct Program<D: Device> {
    dev: Arc<D>,
    graph: Graph,
    plan: Plan,
    /// Per plan kernel: the compiled main kernel and its decode variant.
    /// None until the first call compiles it (see [`Program::new`]).
    compiled: Vec<Option<MainAndDecode<D::Module, D::Bound>>>,
    /// Resident buffers split into chunks: buffer → (elements, elements per chunk).
    splits: HashMap<String, (u32, u32)>,
    /// Weights, derived weights, constants: one buffer, or several chunks when split.
    persistent: HashMap<String, Vec<D::Buffer>>,
    persistent_bytes: u64,
    slots: Vec<Held<D::Buffer>>,
    /// Activations over the largest binding this call, as chunk buffers by plan buffer name.
    big: HashMap<String, Vec<Held<D::Buffer>>>,
    /// Kernels compiled for the chunk counts of such activations.
    chunked: std::sync::Mutex<HashMap<ChunkKey, DevCompiled<D>>>,
    /// Input and output buffers by plan buffer name.
    io: HashMap<String, Held<D::Buffer>>,
    /// Carried tensors by graph input name: buffer and shape.
    carried: HashMap<String, Carried<D::Buffer>>,
    /// Rows along the cache axis of every cache buffer ([`lower::PlanCache`]; in `io` under
    /// the cache's buffer name), bound as `kv_cap`; 0 before the first call.
    kv_cap: usize,
    /// Caches carried from the last call: graph input name → the shape its buffer holds.
    kv_carried: HashMap<String, Vec<usize>>,
    id_checks: Vec<IdCheck>,
    last_memory: Option<MemoryReport>,
    /// Device bytes written by the last call ([`Loaded::bytes_written`]).
    written: BytesWritten,
    /// The memory plan of the last call's dims, reused while they repeat.
    temp_plan: Option<(Bindings, Arc<TempPlan>)>,
    /// What the plan was lowered with (re-lowered per shape bucket).
    lopts: LowerOptions,
    /// The device's tuning cache (None with `--no-cache` or when it cannot be opened).
    cache: Option<TuningCache>,
    /// Why there is no cache, when there is none.
    cache_note: String,
    /// The shape bucket the forward kernels' tunables were chosen for.
    bucket: Option<Bindings>,
    /// The plan lowered for each shape bucket seen (by its dims string), with its tuning
    /// sites and how many came from the cache.
    lowered: HashMap<String, Arc<(Plan, usize, usize)>>,
    /// Compiled kernels of other buckets, by plan kernel index, variant (true: decode) and
    /// entry name (switching back compiles nothing). Not by name alone: kernels of identical
    /// code (each layer's same matmul) share a name but bind their own plan buffers.
    spare: HashMap<SpareKey, Compiled<D::Module, D::Bound>>,
    tuning_use: Option<TuningUse>,
}

fn dev_err(backend: &str, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Device {
        backend: backend.to_string(),
        msg: msg.into(),
    }
}

/// Host tensor → device bytes of storage type `elem`.
fn to_bytes(t: &Tensor, elem: Elem, name: &str) -> Result<Vec<u8>, RuntimeError> {
    Ok(match (&t.data, elem) {
        (Data::F32(v), Elem::F32) => bytemuck::cast_slice(v).to_vec(),
        (Data::F32(v), Elem::F16) => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        (Data::F32(v), Elem::BF16) => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        // Kept in the checkpoint's precision: copied as is when it is the storage type.
        (Data::F16(v), Elem::F16) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (Data::BF16(v), Elem::BF16) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        (Data::F16(_) | Data::BF16(_), Elem::F32 | Elem::F16 | Elem::BF16) => {
            let wide = t.floats_f32().expect("float");
            return to_bytes(&Tensor::f32(t.shape.clone(), wide.into_owned()), elem, name);
        }
        (Data::I64(v), Elem::I32) => {
            let mut out = Vec::with_capacity(v.len() * 4);
            for &x in v {
                let y = i32::try_from(x).map_err(|_| RuntimeError::InputShape {
                    name: name.to_string(),
                    expected: "i32-range values".into(),
                    found: t.shape.clone(),
                    why: format!("value {x} does not fit the device's i32 storage"),
                })?;
                out.extend(y.to_le_bytes());
            }
            out
        }
        (Data::Bool(v), Elem::U32) => v.iter().flat_map(|&b| u32::from(b).to_le_bytes()).collect(),
        _ => {
            return Err(RuntimeError::Codegen(format!(
                "`{name}`: a {} tensor cannot be stored as {elem:?}",
                t.dtype()
            )))
        }
    })
}

/// Device bytes of storage type `elem` → a host tensor of `shape` and `dtype`.
fn from_bytes(b: &[u8], elem: Elem, dtype: DType, shape: Vec<usize>) -> Tensor {
    let words = |b: &[u8]| -> Vec<[u8; 4]> {
        b.chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let halves = |b: &[u8]| -> Vec<[u8; 2]> { b.chunks_exact(2).map(|c| [c[0], c[1]]).collect() };
    match (elem, dtype) {
        (Elem::F16, _) => Tensor::f32(
            shape,
            halves(b)
                .into_iter()
                .map(|h| half::f16::from_le_bytes(h).to_f32())
                .collect(),
        ),
        (Elem::BF16, _) => Tensor::f32(
            shape,
            halves(b)
                .into_iter()
                .map(|h| half::bf16::from_le_bytes(h).to_f32())
                .collect(),
        ),
        (_, DType::I64) => Tensor::i64(
            shape,
            words(b)
                .into_iter()
                .map(|w| i64::from(i32::from_le_bytes(w)))
                .collect(),
        ),
        (_, DType::Bool) => Tensor::bool(
            shape,
            words(b)
                .into_iter()
                .map(|w| u32::from_le_bytes(w) != 0)
                .collect(),
        ),
        _ => Tensor::f32(
            shape,
            words(b).into_iter().map(f32::from_le_bytes).collect(),
        ),
    }
}

fn const_bytes(v: f64, elem: Elem, n: usize) -> Vec<u8> {
    let one: Vec<u8> = match elem {
        Elem::F32 => (v as f32).to_le_bytes().to_vec(),
        // Never a storage type; four f32 lanes if it were one.
        Elem::F32x4 => (v as f32).to_le_bytes().repeat(4),
        Elem::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        Elem::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        Elem::I32 => (v as i32).to_le_bytes().to_vec(),
        Elem::U32 | Elem::Bool => (v as u32).to_le_bytes().to_vec(),
    };
    one.repeat(n)
}

/// True when the kernel reads `num_workgroups` along `axis` (a grid-stride loop, so a launcher
/// may clamp that axis).
fn grid_strided(k: &transfuse_codegen::kir::Kernel, axis: u8) -> bool {
    k.any_expr(&|e| matches!(e, Expr::Builtin(Builtin::NumWorkgroups(a)) if *a == axis))
}

/// Gathers whose ids are a graph input (through views and casts).
fn id_checks(g: &Graph, weights: &Weights) -> Vec<IdCheck> {
    let mut out = vec![];
    for (id, n) in g.nodes() {
        if n.op != Op::Gather {
            continue;
        }
        let rows = match &g.node(n.inputs[0]).op {
            Op::Weight { name, .. } => match weights.get(name).and_then(|t| t.shape.first()) {
                Some(&r) => r,
                None => continue,
            },
            _ => match g.node(n.inputs[0]).shape.first().and_then(|d| d.as_known()) {
                Some(r) => r,
                None => continue,
            },
        };
        let mut src = n.inputs[1];
        loop {
            let s = g.node(src);
            match &s.op {
                Op::Reshape { .. }
                | Op::Permute { .. }
                | Op::Expand { .. }
                | Op::Slice { .. }
                | Op::Cast { .. } => src = s.inputs[0],
                Op::Input { name, .. } => {
                    out.push(IdCheck {
                        node: id,
                        input: name.clone(),
                        rows,
                    });
                    break;
                }
                _ => break,
            }
        }
    }
    out
}

impl<D: Device> Program<D> {
    /// Lowers `graph` for `dev` with float storage `elem`, compiles its kernels, uploads
    /// `weights` and runs the prepare kernels.
    pub fn new(
        dev: Arc<D>,
        graph: &Graph,
        weights: &Weights,
        elem: Elem,
    ) -> Result<Program<D>, RuntimeError> {
        let info = dev.info().clone();
        let backend = info.backend;
        if !info.elems.contains(&elem) {
            return Err(dev_err(
                backend,
                format!("{elem:?} storage is not supported by {}", info.description),
            ));
        }
        let opts = LowerOptions {
            elem,
            limits: info.limits,
            target: info.target,
        };
        let plan = lower::lower(graph, &opts)?;
        let (cache, cache_note) = if !tune::cache_enabled() {
            (None, "not read (--no-cache)".to_string())
        } else {
            match TuningCache::open(&info) {
                Ok(c) => {
                    let note = c.path().display().to_string();
                    (Some(c), note)
                }
                Err(e) => (None, format!("not read ({e})")),
            }
        };
        let splits = Self::splits(&plan, &info)?;
        // Prepare kernels are compiled now (they run at load); forward kernels at the first
        // call, with the tunables of its shape bucket (compiling the load-time defaults too
        // would compile most kernels twice before the first result). Their binding counts are
        // checked now, so a plan the device cannot run fails to load.
        let mut compiled = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let variants = std::iter::once((&k.gen.kernel, &k.bindings))
                .chain(k.decode.as_deref().map(|v| (&v.gen.kernel, &v.bindings)));
            if k.phase == Phase::Forward {
                for (kernel, bindings) in variants {
                    Self::split_for(&info, kernel, bindings, &splits)?;
                }
                compiled.push(None);
                continue;
            }
            let main = Self::compile(&dev, &k.gen.kernel, &k.bindings, &splits)?;
            let decode = match &k.decode {
                Some(v) => Some(Self::compile(&dev, &v.gen.kernel, &v.bindings, &splits)?),
                None => None,
            };
            compiled.push(Some((main, decode)));
        }
        let mut p = Program {
            dev,
            graph: graph.clone(),
            id_checks: id_checks(graph, weights),
            plan,
            lopts: opts,
            compiled,
            splits,
            persistent: HashMap::new(),
            persistent_bytes: 0,
            slots: vec![],
            big: HashMap::new(),
            chunked: std::sync::Mutex::default(),
            io: HashMap::new(),
            carried: HashMap::new(),
            kv_cap: 0,
            kv_carried: HashMap::new(),
            last_memory: None,
            written: BytesWritten::default(),
            temp_plan: None,
            cache,
            cache_note,
            bucket: None,
            spare: HashMap::new(),
            lowered: HashMap::new(),
            tuning_use: None,
        };
        p.upload_persistent(weights)?;
        Ok(p)
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Chooses the forward kernels' tunables for the shape bucket of `dims` (each dim rounded
    /// up to a power of two): the plan is lowered again (once per bucket, then remembered) with
    /// the shape-aware defaults of the bucket and the tuning cache's entries, and the kernels whose code changed are swapped in
    /// (compiled once per bucket; kernels of an earlier bucket are kept). Nothing happens while
    /// the bucket stays the same. A plan whose structure changed (it never should: tunables
    /// only change how a kernel computes) is not used.
    fn retune(&mut self, dims: &Bindings) -> Result<(), RuntimeError> {
        let bucket = tune::bucket_dims(dims);
        if self.bucket.as_ref() == Some(&bucket) {
            return Ok(());
        }
        // Each bucket is lowered once per program: decoding crosses a bucket at every power of
        // two of `past`, and generating alternates the prompt's bucket with the steps'.
        let key = tune::dims_string(&bucket);
        let lowered = match self.lowered.get(&key) {
            Some(l) => l.clone(),
            None => {
                let chooser = self.cache.as_ref().map(|c| tune::CacheChooser {
                    cache: c,
                    elem: self.lopts.elem,
                    dims: bucket.clone(),
                });
                let mut t = Tuning::at(
                    bucket.clone(),
                    chooser.as_ref().map(|c| c as &dyn lower::tuning::Chooser),
                );
                t.fixed_defaults = tune::fixed_defaults();
                let plan = lower::lower_tuned(&self.graph, &self.lopts, &t)?;
                let sites = t.sites();
                drop(chooser);
                let from_cache = sites.iter().filter(|s| s.from_chooser).count();
                let l = Arc::new((plan, sites.len(), from_cache));
                self.lowered.insert(key, l.clone());
                l
            }
        };
        let (plan, sites, from_cache) = (&lowered.0, lowered.1, lowered.2);
        if !same_structure(&self.plan, plan) {
            tracing::warn!(
                "tunables for {} changed the plan's structure: kept the load-time kernels",
                tune::dims_string(&bucket)
            );
            self.compile_missing()?;
            self.bucket = Some(bucket);
            return Ok(());
        }
        let mut swapped = 0;
        for i in 0..plan.kernels.len() {
            if plan.kernels[i].phase != Phase::Forward {
                continue;
            }
            if self.compiled[i].is_none() {
                // First call: the bucket's kernels directly.
                let k = &plan.kernels[i];
                let main = self.compiled_for(i, false, &k.gen.kernel, &k.bindings)?;
                let decode = match &k.decode {
                    Some(v) => Some(self.compiled_for(i, true, &v.gen.kernel, &v.bindings)?),
                    None => None,
                };
                self.compiled[i] = Some((main, decode));
                self.plan.kernels[i].gen = k.gen.clone();
                if let (Some(nv), Some(ov)) = (&k.decode, self.plan.kernels[i].decode.as_mut()) {
                    ov.gen = nv.gen.clone();
                }
                continue;
            }
            if plan.kernels[i].entry() != self.plan.kernels[i].entry() {
                let new = self.compiled_for(
                    i,
                    false,
                    &plan.kernels[i].gen.kernel,
                    &plan.kernels[i].bindings,
                )?;
                let compiled = self.compiled[i].as_mut().expect("compiled above");
                let old = std::mem::replace(&mut compiled.0, new);
                self.spare.insert((i, false, old.name.clone()), old);
                self.plan.kernels[i].gen = plan.kernels[i].gen.clone();
                swapped += 1;
            }
            if let (Some(nv), Some(ov)) = (&plan.kernels[i].decode, &self.plan.kernels[i].decode) {
                if nv.gen.kernel.name != ov.gen.kernel.name {
                    let new = self.compiled_for(i, true, &nv.gen.kernel, &nv.bindings)?;
                    let compiled = self.compiled[i].as_mut().expect("compiled above");
                    if let Some(old) = compiled.1.replace(new) {
                        self.spare.insert((i, true, old.name.clone()), old);
                    }
                    let gen = nv.gen.clone();
                    if let Some(v) = self.plan.kernels[i].decode.as_mut() {
                        v.gen = gen;
                    }
                    swapped += 1;
                }
            }
        }
        // Set last: a call that failed above tries this bucket again.
        self.bucket = Some(bucket.clone());
        if swapped > 0 {
            self.chunked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        tracing::debug!(
            "bucket {}: {sites} tuning sites, {from_cache} from the cache, {swapped} kernels swapped",
            tune::dims_string(&bucket),
        );
        self.tuning_use = Some(TuningUse {
            sites,
            from_cache,
            cache: self.cache_note.clone(),
        });
        Ok(())
    }

    /// Compiles the forward kernels not compiled yet, as the load-time plan has them.
    fn compile_missing(&mut self) -> Result<(), RuntimeError> {
        for i in 0..self.plan.kernels.len() {
            if self.compiled[i].is_some() {
                continue;
            }
            let k = &self.plan.kernels[i];
            let main = Self::compile(&self.dev, &k.gen.kernel, &k.bindings, &self.splits)?;
            let decode = match &k.decode {
                Some(v) => Some(Self::compile(
                    &self.dev,
                    &v.gen.kernel,
                    &v.bindings,
                    &self.splits,
                )?),
                None => None,
            };
            self.compiled[i] = Some((main, decode));
        }
        Ok(())
    }

    /// Plan kernel `i`'s main kernel (its decode variant when `decode`) compiled, or taken from
    /// an earlier bucket's compile of that same kernel `i`.
    fn compiled_for(
        &mut self,
        i: usize,
        decode: bool,
        kernel: &transfuse_codegen::kir::Kernel,
        bindings: &[String],
    ) -> Result<Compiled<D::Module, D::Bound>, RuntimeError> {
        match self.spare.remove(&(i, decode, kernel.name.clone())) {
            Some(c) => Ok(c),
            None => Self::compile(&self.dev, kernel, bindings, &self.splits),
        }
    }

    /// Resident buffers over the device's largest binding, split into chunks that fit:
    /// buffer → (elements, elements per chunk).
    fn splits(plan: &Plan, info: &DeviceInfo) -> Result<HashMap<String, (u32, u32)>, RuntimeError> {
        let none = Bindings::new();
        let mut out = HashMap::new();
        for b in &plan.buffers {
            if !matches!(
                b.kind,
                BufferKind::Weight | BufferKind::Derived | BufferKind::Const(_)
            ) {
                continue;
            }
            let eb = u64::from(elem_bytes(b.elem));
            let n = b.len().eval_usize(&none)? as u64;
            if n * eb <= info.max_binding_bytes {
                continue;
            }
            // Chunks of a multiple of 64 elements (any offset alignment a device asks).
            let chunk = (info.max_binding_bytes / eb) / 64 * 64;
            let fits = |x: u64| u32::try_from(x).ok();
            match (fits(n), fits(chunk)) {
                (Some(n), Some(c)) if c > 0 => {
                    out.insert(b.name.clone(), (n, c));
                }
                _ => {
                    return Err(dev_err(
                        info.backend,
                        format!(
                            "tensor `{}` ({n} elements) cannot be split into bindings of {} bytes",
                            b.name, info.max_binding_bytes
                        ),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Compiles `kernel` with its split parameters rewritten into chunks.
    fn compile(
        dev: &Arc<D>,
        kernel: &transfuse_codegen::kir::Kernel,
        bindings: &[String],
        splits: &HashMap<String, (u32, u32)>,
    ) -> Result<Compiled<D::Module, D::Bound>, RuntimeError> {
        let (k, binds) = Self::split_for(dev.info(), kernel, bindings, splits)?;
        Ok(Compiled {
            module: dev.compile(&k)?,
            name: k.name.clone(),
            binds,
            grid_strided: [0u8, 1, 2].map(|a| grid_strided(&k, a)),
            bound: std::sync::Mutex::new(None),
        })
    }

    /// `kernel` with its split parameters rewritten into chunks, and the (plan buffer, chunk)
    /// bound to each of its parameters; an error when it binds more storage buffers than the
    /// device allows.
    fn split_for(
        info: &DeviceInfo,
        kernel: &transfuse_codegen::kir::Kernel,
        bindings: &[String],
        splits: &HashMap<String, (u32, u32)>,
    ) -> Result<(transfuse_codegen::kir::Kernel, Binds), RuntimeError> {
        let mut k = kernel.clone();
        let mut binds = vec![];
        for (param, buf) in kernel.buffers.iter().zip(bindings) {
            match splits.get(buf) {
                Some(&(len, chunk)) => {
                    let names = rewrite::split_buffer(&mut k, &param.name, len, chunk);
                    binds.extend((0..names.len()).map(|c| (buf.clone(), c)));
                }
                None => binds.push((buf.clone(), 0)),
            }
        }
        if k.buffers.len() > info.max_storage_buffers as usize {
            return Err(dev_err(
                info.backend,
                format!(
                    "kernel `{}` binds {} storage buffers{}; {} allows {}",
                    k.name,
                    k.buffers.len(),
                    if k.buffers.len() > kernel.buffers.len() {
                        " once its large tensors are split"
                    } else {
                        ""
                    },
                    info.description,
                    info.max_storage_buffers
                ),
            ));
        }
        Ok((k, binds))
    }

    /// Elements per chunk of a split tensor of `elem` (a multiple of 64 that fits a binding).
    fn chunk_elems(&self, elem: Elem) -> u64 {
        (self.dev.info().max_binding_bytes / u64::from(elem_bytes(elem))) / 64 * 64
    }

    /// Chunk buffers for an activation of `n` elements of `elem` (every chunk full-size: the
    /// kernels clamp indices into a whole chunk).
    fn ensure_chunks(&mut self, name: &str, n: u64, elem: Elem) -> Result<(), RuntimeError> {
        let chunk = self.chunk_elems(elem);
        if chunk == 0 {
            return self.check_binding(name, n * u64::from(elem_bytes(elem)));
        }
        let parts = n.div_ceil(chunk) as usize;
        let bytes = chunk * u64::from(elem_bytes(elem));
        let mut held = self.big.remove(name).unwrap_or_default();
        held.truncate(parts);
        let mut out = Vec::with_capacity(parts);
        let mut old = held.into_iter();
        for c in 0..parts {
            let h = old.next();
            out.push(Self::ensure(
                &self.dev,
                h,
                bytes,
                &format!("{name} (chunk {c})"),
            )?);
        }
        self.big.insert(name.to_string(), out);
        Ok(())
    }

    /// (elements, chunk) of a split resident buffer.
    fn splits_of(&self, name: &str) -> Option<(u32, u32)> {
        self.splits.get(name).copied()
    }

    fn backend(&self) -> &'static str {
        self.dev.info().backend
    }

    fn check_binding(&self, name: &str, bytes: u64) -> Result<(), RuntimeError> {
        let max = self.dev.info().max_binding_bytes;
        if bytes > max {
            // Intermediates are named after their node: say which kernel writes them.
            let writer = self.plan.kernels.iter().find(|k| {
                k.bindings
                    .iter()
                    .zip(&k.gen.kernel.buffers)
                    .any(|(b, p)| b == name && p.access == Access::ReadWrite)
            });
            let what = match writer {
                Some(k) if self.plan.buffer(name).map(|b| &b.kind) == Some(&BufferKind::Temp) => {
                    format!(
                        "tensor `{name}` (written by kernel `{}`: {})",
                        k.entry(),
                        k.ops.join("+")
                    )
                }
                _ => format!("tensor `{name}`"),
            };
            return Err(dev_err(
                self.backend(),
                format!(
                    "{what} takes {bytes} bytes; {} binds at most {max} bytes per buffer and \
                     this tensor cannot be split",
                    self.dev.info().description
                ),
            ));
        }
        Ok(())
    }

    /// Weights, derived weights, constants and prepare-phase temporaries, then the prepare
    /// kernels.
    fn upload_persistent(&mut self, weights: &Weights) -> Result<(), RuntimeError> {
        let none = Bindings::new();
        let prepare_bound: Vec<&str> = self
            .plan
            .kernels
            .iter()
            .filter(|k| k.phase == Phase::Prepare)
            .flat_map(|k| k.bindings.iter().map(String::as_str))
            .collect();
        let mut made = HashMap::new();
        let mut total = 0u64;
        for b in &self.plan.buffers {
            let persistent = match b.kind {
                BufferKind::Weight | BufferKind::Derived | BufferKind::Const(_) => true,
                BufferKind::Temp => prepare_bound.contains(&b.name.as_str()),
                _ => false,
            };
            if !persistent {
                continue;
            }
            let n = b.len().eval_usize(&none)?;
            let eb = elem_bytes(b.elem) as usize;
            let bytes = n as u64 * eb as u64;
            // Chunk sizes in bytes (one chunk unless split).
            let chunks: Vec<usize> = match self.splits_of(&b.name) {
                Some((len, chunk)) => (0..len.div_ceil(chunk))
                    .map(|c| (chunk.min(len - c * chunk) as usize) * eb)
                    .collect(),
                None => {
                    self.check_binding(&b.name, bytes)?;
                    vec![bytes as usize]
                }
            };
            let mut data: Option<Vec<u8>> = None;
            match b.kind {
                BufferKind::Weight => {
                    let io = self
                        .plan
                        .weights
                        .iter()
                        .find(|w| w.buffer == b.name)
                        .ok_or_else(|| RuntimeError::MissingWeight(b.name.clone()))?;
                    let t = weights
                        .get(&io.name)
                        .ok_or_else(|| RuntimeError::MissingWeight(io.name.clone()))?;
                    let want = transfuse_ir::eval_shape(&io.shape, &none)?;
                    if t.shape != want {
                        return Err(RuntimeError::WeightShape {
                            name: io.name.clone(),
                            expected: want,
                            found: t.shape.clone(),
                        });
                    }
                    data = Some(to_bytes(t, b.elem, &io.name)?);
                }
                BufferKind::Const(v) => data = Some(const_bytes(v, b.elem, n)),
                _ => {}
            }
            let mut bufs = Vec::with_capacity(chunks.len());
            let mut at = 0;
            for (c, &len) in chunks.iter().enumerate() {
                let what = if chunks.len() > 1 {
                    format!("{} (chunk {c})", b.name)
                } else {
                    b.name.clone()
                };
                let buf = self.dev.alloc(len as u64, &what)?;
                if let Some(d) = &data {
                    self.dev.write(&buf, &d[at..at + len])?;
                }
                at += len;
                bufs.push(buf);
            }
            total += bytes;
            made.insert(b.name.clone(), bufs);
        }
        self.persistent = made;
        self.persistent_bytes = total;
        for i in 0..self.plan.kernels.len() {
            if self.plan.kernels[i].phase == Phase::Prepare {
                self.launch(i, &none, &HashMap::new())?;
            }
        }
        self.dev.sync()
    }

    /// Launches kernel `i` (its decode variant when it applies) with buffers resolved through
    /// `places` (persistent buffers need no entry).
    fn launch(
        &self,
        i: usize,
        dims: &Bindings,
        places: &HashMap<&str, Place>,
    ) -> Result<(), RuntimeError> {
        let decode = self.plan.use_decode(i, dims)?;
        let c = match &self.compiled[i] {
            Some((_, Some(d))) if decode => d,
            Some((m, _)) => m,
            None => {
                return Err(dev_err(
                    self.backend(),
                    format!("kernel {i} was launched before it was compiled"),
                ))
            }
        };
        let (uniforms, mut grid) = self.plan.launch_args_for(i, decode, dims)?;
        let max = self.dev.info().max_grid;
        for a in 0..3 {
            if grid[a] > max[a] {
                if c.grid_strided[a] {
                    grid[a] = max[a];
                } else {
                    return Err(dev_err(
                        self.backend(),
                        format!(
                            "kernel `{}` needs {} workgroups along axis {a}; the device allows {}",
                            c.name, grid[a], max[a]
                        ),
                    ));
                }
            }
        }
        // Activations over the largest binding this call: the kernel with them split.
        let mut split: Vec<(String, u32)> = vec![];
        for (name, _) in &c.binds {
            if places.get(name.as_str()) == Some(&Place::Big)
                && !split.iter().any(|(n, _)| n == name)
            {
                split.push((name.clone(), self.big[name].len() as u32));
            }
        }
        if split.is_empty() {
            return self.launch_with(c, places, &uniforms, grid);
        }
        let key: ChunkKey = (i, decode, split);
        let mut cache = self.chunked.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(&key) {
            let k = &self.plan.kernels[i];
            let (kernel, bindings) = match &k.decode {
                Some(v) if decode => (&v.gen.kernel, &v.bindings),
                _ => (&k.gen.kernel, &k.bindings),
            };
            let mut splits = self.splits.clone();
            for (name, parts) in &key.2 {
                let elem = self.plan.buffer(name).map_or(Elem::F32, |b| b.elem);
                let chunk = self.chunk_elems(elem) as u32;
                splits.insert(name.clone(), (parts * chunk, chunk));
            }
            let compiled = Self::compile(&self.dev, kernel, bindings, &splits)?;
            cache.insert(key.clone(), compiled);
        }
        self.launch_with(&cache[&key], places, &uniforms, grid)
    }

    /// Launches a compiled kernel, resolving its bindings through `places`.
    fn launch_with(
        &self,
        c: &Compiled<D::Module, D::Bound>,
        places: &HashMap<&str, Place>,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        let mut bufs = Vec::with_capacity(c.binds.len());
        for (name, chunk) in &c.binds {
            let b = match places.get(name.as_str()) {
                Some(Place::Slot(s)) => &self.slots[*s].buf,
                Some(Place::Io) => self.io_buffer(name)?,
                Some(Place::Big) => &self.big[name][*chunk].buf,
                _ => self
                    .persistent
                    .get(name)
                    .and_then(|v| v.get(*chunk))
                    .ok_or_else(|| dev_err(self.backend(), format!("no buffer `{name}`")))?,
            };
            bufs.push(b);
        }
        let mut bound = c.bound.lock().unwrap_or_else(|p| p.into_inner());
        let reuse = matches!(&*bound, Some(b) if self.dev.bound_to(b, &c.module, &bufs));
        if !reuse {
            *bound = Some(self.dev.bind(&c.module, &bufs)?);
        }
        let b = bound.as_ref().expect("bound above");
        self.dev.launch_bound(&c.module, b, uniforms, grid)
    }

    fn io_buffer(&self, buffer: &str) -> Result<&D::Buffer, RuntimeError> {
        // A carried input (not supplied this call, see `prepare_call`) wins over the buffer
        // an earlier call uploaded it to.
        let carried = self
            .plan
            .inputs
            .iter()
            .find(|i| i.buffer == buffer)
            .and_then(|i| self.carried.get(&i.name));
        if let Some((h, _, _)) = carried {
            return Ok(&h.buf);
        }
        self.io
            .get(buffer)
            .map(|h| &h.buf)
            .ok_or_else(|| dev_err(self.backend(), format!("no buffer `{buffer}`")))
    }

    /// A buffer of at least `bytes` in `held` (kept when big enough, else replaced with 25 %
    /// headroom).
    fn ensure(
        dev: &D,
        held: Option<Held<D::Buffer>>,
        bytes: u64,
        what: &str,
    ) -> Result<Held<D::Buffer>, RuntimeError> {
        match held {
            Some(h) if h.cap >= bytes => Ok(h),
            _ => {
                let cap = (bytes + bytes / 4).div_ceil(256) * 256;
                Ok(Held {
                    buf: dev.alloc(cap, what)?,
                    cap,
                })
            }
        }
    }

    fn check_ids(&self, inputs: &TensorMap) -> Result<(), RuntimeError> {
        for c in &self.id_checks {
            let Some(t) = inputs.get(&c.input) else {
                continue;
            };
            if let Data::I64(v) = &t.data {
                if let Some(&bad) = v.iter().find(|&&x| x < 0 || x as usize >= c.rows) {
                    return Err(RuntimeError::IndexOutOfRange {
                        node: c.node.index() as u32,
                        index: bad,
                        size: c.rows,
                    });
                }
            }
        }
        Ok(())
    }

    /// Where the temporaries of the forward kernels live at `dims`: their sizes and live
    /// ranges, the slot plan, and those over the largest binding.
    fn temp_plan(&self, dims: &Bindings) -> Result<TempPlan, RuntimeError> {
        let mut places: HashMap<String, Place> = HashMap::new();
        let mut temps: Vec<(String, Interval)> = vec![];
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut big: Vec<(String, u64, Elem)> = vec![];
        for (ki, k) in self.plan.kernels.iter().enumerate() {
            if k.phase != Phase::Forward {
                continue;
            }
            let alt = k
                .decode
                .as_ref()
                .map(|v| v.bindings.iter())
                .into_iter()
                .flatten();
            for name in k.bindings.iter().chain(alt) {
                let Some(b) = self.plan.buffer(name) else {
                    continue;
                };
                if b.kind != BufferKind::Temp || self.persistent.contains_key(name) {
                    continue;
                }
                match index.get(name.as_str()) {
                    Some(&t) => temps[t].1.last = ki,
                    None if places.contains_key(name) => {}
                    None => {
                        let n = b.len().eval_usize(dims)? as u64;
                        let bytes = n * u64::from(elem_bytes(b.elem));
                        if bytes > self.dev.info().max_binding_bytes {
                            big.push((name.clone(), n, b.elem));
                            places.insert(name.clone(), Place::Big);
                            continue;
                        }
                        index.insert(name, temps.len());
                        temps.push((
                            name.clone(),
                            Interval {
                                bytes,
                                first: ki,
                                last: ki,
                            },
                        ));
                    }
                }
            }
        }
        let intervals: Vec<Interval> = temps.iter().map(|t| t.1.clone()).collect();
        let mp = memory::plan(&intervals);
        for ((name, _), &s) in temps.iter().zip(&mp.slot_of) {
            places.insert(name.clone(), Place::Slot(s));
        }
        Ok(TempPlan {
            places,
            plan: mp,
            big,
        })
    }

    /// Everything up to the launches: dims, memory plan, uploads. Returns the dims and places.
    fn prepare_call(
        &mut self,
        inputs: &TensorMap,
    ) -> Result<(Bindings, HashMap<String, Place>), RuntimeError> {
        let declared: Vec<(&str, &[transfuse_ir::Dim], DType)> = self
            .graph
            .inputs()
            .into_iter()
            .map(|(n, s, d)| (n, s.as_slice(), d))
            .collect();
        let (carried, kv_carried) = (&self.carried, &self.kv_carried);
        let mut dims = bind_shapes(&declared, &|name| {
            inputs
                .get(name)
                .map(|t| (t.shape.clone(), t.dtype()))
                .or_else(|| carried.get(name).map(|(_, s, d)| (s.clone(), *d)))
                .or_else(|| kv_carried.get(name).map(|s| (s.clone(), DType::F32)))
        })?;
        self.check_ids(inputs)?;
        // Tunables by the shape bucket of the graph's own dims: the cache capacity changes no
        // kernel's code, so it must not make a bucket of its own.
        self.retune(&dims)?;
        let kv_cap = self.kv_capacity(&dims)?;
        if let Some(cap) = kv_cap {
            dims.insert(lower::CACHE_CAP.to_string(), cap);
        }
        self.written = BytesWritten::default();
        if let Some(cap) = kv_cap {
            self.ensure_caches(inputs, &dims, cap)?;
        }
        // The memory plan of these dims (the last call's when they repeat).
        let tp = match &self.temp_plan {
            Some((d, tp)) if *d == dims => tp.clone(),
            _ => {
                let tp = Arc::new(self.temp_plan(&dims)?);
                self.temp_plan = Some((dims.clone(), tp.clone()));
                tp
            }
        };
        let (mut places, mp) = (tp.places.clone(), &tp.plan);
        let big = &tp.big;
        for (s, &bytes) in mp.slots.iter().enumerate() {
            if s == self.slots.len() {
                self.slots
                    .push(Self::ensure(&self.dev, None, bytes, &format!("slot{s}"))?);
            } else if self.slots[s].cap < bytes {
                self.slots[s] = Self::ensure(&self.dev, None, bytes, &format!("slot{s}"))?;
            }
        }
        let mut big_bytes = 0;
        for (name, n, elem) in big {
            self.ensure_chunks(name, *n, *elem)?;
            big_bytes += n * u64::from(elem_bytes(*elem));
        }
        // Inputs.
        let mut io_bytes = 0u64;
        let plan_inputs = self.plan.inputs.clone();
        for io in &plan_inputs {
            places.insert(io.buffer.clone(), Place::Io);
            let b = self.plan.buffer(&io.buffer).expect("inputs have buffers");
            let elem = b.elem;
            let n = b.len().eval_usize(&dims)? as u64;
            let bytes = n * u64::from(elem_bytes(elem));
            io_bytes += bytes;
            if let Some(c) = self.plan.cache_of(&io.name).cloned() {
                // The cache buffer (allocated by `ensure_caches`): a supplied past is written
                // into its first rows; a carried one is already there.
                if let Some(t) = inputs.get(&io.name) {
                    self.kv_carried.remove(&io.name);
                    let data = to_bytes(t, elem, &io.name)?;
                    if !data.is_empty() {
                        let eb = elem_bytes(elem) as usize;
                        let padded = c.pad(&data, &t.shape, self.kv_cap, eb);
                        self.dev.write(&self.io[&io.buffer].buf, &padded)?;
                        self.written.host += padded.len() as u64;
                        self.written
                            .by_tensor
                            .push((io.name.clone(), padded.len() as u64));
                    }
                }
                continue;
            }
            let Some(t) = inputs.get(&io.name) else {
                continue; // carried
            };
            if bytes > self.dev.info().max_binding_bytes {
                places.insert(io.buffer.clone(), Place::Big);
                self.carried.remove(&io.name);
                self.ensure_chunks(&io.buffer, n, elem)?;
                let data = to_bytes(t, elem, &io.name)?;
                let step = (self.chunk_elems(elem) * u64::from(elem_bytes(elem))) as usize;
                for (c, part) in data.chunks(step).enumerate() {
                    self.dev.write(&self.big[&io.buffer][c].buf, part)?;
                }
                self.written.host += data.len() as u64;
                self.written
                    .by_tensor
                    .push((io.name.clone(), data.len() as u64));
                continue;
            }
            // Supplied inputs replace carried ones.
            if let Some((h, _, _)) = self.carried.remove(&io.name) {
                self.io.entry(io.buffer.clone()).or_insert(h);
            }
            let data = to_bytes(t, b.elem, &io.name)?;
            let h = Self::ensure(&self.dev, self.io.remove(&io.buffer), bytes, &io.name)?;
            self.dev.write(&h.buf, &data)?;
            self.written.host += data.len() as u64;
            self.written
                .by_tensor
                .push((io.name.clone(), data.len() as u64));
            self.io.insert(io.buffer.clone(), h);
        }
        let plan_outputs = self.plan.outputs.clone();
        for io in &plan_outputs {
            places.insert(io.buffer.clone(), Place::Io);
            if self.plan.cache_of(&io.name).is_some() {
                continue; // the cache buffer, counted with its input
            }
            let b = self.plan.buffer(&io.buffer).expect("outputs have buffers");
            let elem = b.elem;
            let n = b.len().eval_usize(&dims)? as u64;
            let bytes = n * u64::from(elem_bytes(elem));
            io_bytes += bytes;
            if bytes > self.dev.info().max_binding_bytes {
                places.insert(io.buffer.clone(), Place::Big);
                self.ensure_chunks(&io.buffer, n, elem)?;
                continue;
            }
            let h = Self::ensure(&self.dev, self.io.remove(&io.buffer), bytes, &io.name)?;
            self.io.insert(io.buffer.clone(), h);
        }
        self.last_memory = Some(MemoryReport {
            persistent: self.persistent_bytes,
            io: io_bytes,
            temps_naive: mp.naive_bytes + big_bytes,
            temps_planned: mp.planned_bytes + big_bytes,
            temps_live_peak: mp.live_peak_bytes,
        });
        Ok((dims, places))
    }

    /// The cache capacity for a call at `dims` (None without caches): the current one while
    /// every cache's rows fit, else twice it (at least 16 rows, at least the rows needed), so
    /// growing costs amortised O(1) copied rows per appended row.
    fn kv_capacity(&self, dims: &Bindings) -> Result<Option<usize>, RuntimeError> {
        if self.plan.caches.is_empty() {
            return Ok(None);
        }
        let mut need = 0;
        for c in &self.plan.caches {
            if let Some(o) = self.plan.outputs.iter().find(|o| o.name == c.output) {
                need = need.max(transfuse_ir::eval_shape(&o.shape, dims)?[c.axis]);
            }
        }
        Ok(Some(if need <= self.kv_cap && self.kv_cap > 0 {
            self.kv_cap
        } else {
            need.max(2 * self.kv_cap).max(16)
        }))
    }

    /// Every cache buffer at capacity `cap`: kept while it is big enough, else a new buffer
    /// into which a carried cache's rows are copied once (each outer block's rows move to the
    /// new row stride; counted in `copies`). Sets [`Program::kv_cap`].
    fn ensure_caches(
        &mut self,
        inputs: &TensorMap,
        dims: &Bindings,
        cap: usize,
    ) -> Result<(), RuntimeError> {
        let caches = self.plan.caches.clone();
        for c in &caches {
            let b = self.plan.buffer(&c.buffer).expect("caches have buffers");
            let eb = elem_bytes(b.elem) as usize;
            let bytes = b.len().eval_usize(dims)? as u64 * eb as u64;
            if bytes > self.dev.info().max_binding_bytes {
                return Err(dev_err(
                    self.backend(),
                    format!(
                        "KV cache `{}` at {cap} rows takes {bytes} bytes, over the largest \
                         binding of {} ({} bytes): a smaller batch or context would fit",
                        c.output,
                        self.dev.info().description,
                        self.dev.info().max_binding_bytes
                    ),
                ));
            }
            let old = self.io.remove(&c.buffer);
            let keep = cap == self.kv_cap && old.as_ref().is_some_and(|h| h.cap >= bytes);
            if keep {
                self.io.insert(c.buffer.clone(), old.expect("kept"));
                continue;
            }
            let fresh = Held {
                buf: self.dev.alloc(bytes, &c.output)?,
                cap: bytes,
            };
            let held = self
                .kv_carried
                .get(&c.input)
                .filter(|_| !inputs.contains_key(&c.input));
            if let (Some(old), Some(shape)) = (&old, held) {
                let rows = shape[c.axis];
                let from = c.row_runs(shape, rows, self.kv_cap, eb);
                let to = c.row_runs(shape, rows, cap, eb);
                let runs: Vec<(u64, u64, u64)> =
                    from.iter().zip(&to).map(|(f, t)| (f.0, t.0, f.1)).collect();
                self.dev.copy(&old.buf, &fresh.buf, &runs)?;
                self.written.copies += runs.iter().map(|r| r.2).sum::<u64>();
            }
            self.io.insert(c.buffer.clone(), fresh);
        }
        self.kv_cap = cap;
        Ok(())
    }

    /// Adds the forward kernels' stores at `dims` to [`Program::written`]: each buffer a
    /// launched kernel may write counts whole (see [`BytesWritten`]).
    fn count_kernel_writes(&mut self, dims: &Bindings) -> Result<(), RuntimeError> {
        let mut by_buffer: HashMap<&str, u64> = HashMap::new();
        let mut total = 0;
        for i in self.forward_kernels_at(dims)? {
            let decode = self.plan.use_decode(i, dims)?;
            let Some((gen, bindings, _)) = self.plan.kernels[i].launched(decode) else {
                continue;
            };
            for (p, name) in gen.kernel.buffers.iter().zip(bindings) {
                if p.access != Access::ReadWrite {
                    continue;
                }
                let Some(b) = self.plan.buffer(name) else {
                    continue;
                };
                let eb = u64::from(elem_bytes(b.elem));
                let bytes = if b.kind == BufferKind::Cache {
                    // A cache's writer stores its new rows only: output minus input elements.
                    let c = self.plan.caches.iter().find(|c| c.buffer == *name);
                    let elems = |io: Option<&lower::PlanIo>| -> Result<u64, RuntimeError> {
                        Ok(match io {
                            Some(io) => transfuse_ir::eval_shape(&io.shape, dims)?
                                .iter()
                                .product::<usize>() as u64,
                            None => 0,
                        })
                    };
                    let out = c.and_then(|c| self.plan.outputs.iter().find(|o| o.name == c.output));
                    let inp = c.and_then(|c| self.plan.inputs.iter().find(|i| i.name == c.input));
                    (elems(out)? - elems(inp)?) * eb
                } else {
                    b.len().eval_usize(dims)? as u64 * eb
                };
                total += bytes;
                *by_buffer.entry(name.as_str()).or_default() += bytes;
            }
        }
        self.written.kernels += total;
        // A cache's input shares its buffer with the output: the stores are the output's.
        let ios = self
            .plan
            .inputs
            .iter()
            .filter(|i| self.plan.cache_of(&i.name).is_none())
            .chain(&self.plan.outputs);
        for io in ios {
            if let Some(&b) = by_buffer.get(io.buffer.as_str()) {
                self.written.by_tensor.push((io.name.clone(), b));
            }
        }
        Ok(())
    }

    /// The forward kernels launched at `dims`, in order (a split-KV combine kernel only when
    /// decoding: [`Plan::launched_at`]).
    fn forward_kernels_at(&self, dims: &Bindings) -> Result<Vec<usize>, RuntimeError> {
        let mut out = vec![];
        for i in 0..self.plan.kernels.len() {
            if self.plan.kernels[i].phase == Phase::Forward && self.plan.launched_at(i, dims)? {
                out.push(i);
            }
        }
        Ok(out)
    }

    fn places_ref(places: &HashMap<String, Place>) -> HashMap<&str, Place> {
        places.iter().map(|(k, v)| (k.as_str(), *v)).collect()
    }
}

impl<D: Device> Program<D> {
    /// The storage type of graph input or output `name` (None: no such input or output).
    pub fn io_elem(&self, name: &str) -> Option<Elem> {
        let io = self
            .plan
            .inputs
            .iter()
            .chain(&self.plan.outputs)
            .find(|io| io.name == name)?;
        self.plan.buffer(&io.buffer).map(|b| b.elem)
    }

    /// Supplies graph input `name` as a device buffer for the following calls (until replaced
    /// or supplied on the host), bound in place: no upload. Refused when the input does not
    /// exist, is a KV cache, is held in another storage type, or is larger than one binding.
    pub fn set_device_input(
        &mut self,
        name: &str,
        t: DeviceTensor<D::Buffer>,
    ) -> Result<(), RuntimeError> {
        let backend = self.backend();
        let Some(io) = self.plan.inputs.iter().find(|io| io.name == name) else {
            return Err(dev_err(
                backend,
                format!("no input `{name}` to bind a buffer to"),
            ));
        };
        let elem = self.plan.buffer(&io.buffer).map(|b| b.elem);
        if self.plan.cache_of(name).is_some()
            || elem != Some(t.elem)
            || t.cap < t.bytes()
            || t.bytes() > self.dev.info().max_binding_bytes
        {
            return Err(dev_err(
                backend,
                format!(
                    "input `{name}` ({elem:?} storage) cannot take a device buffer of {} bytes                      holding {:?} {:?}",
                    t.cap, t.elem, t.shape
                ),
            ));
        }
        let held = Held {
            buf: t.buf,
            cap: t.cap,
        };
        self.carried
            .insert(name.to_string(), (held, t.shape, t.dtype));
        Ok(())
    }

    /// [`Loaded::run`] without carried outputs, the outputs named in `keep` left in their
    /// device buffers and returned as [`DeviceTensor`]s (the program allocates new ones for
    /// its next call) instead of read back.
    pub fn run_keeping(
        &mut self,
        inputs: &TensorMap,
        keep: &[String],
    ) -> Result<(TensorMap, KeptOutputs<D::Buffer>), RuntimeError> {
        self.run_inner(inputs, &[], keep)
    }

    fn run_inner(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
        keep: &[String],
    ) -> Result<(TensorMap, KeptOutputs<D::Buffer>), RuntimeError> {
        let mut kept = HashMap::new();
        let (dims, places) = self.prepare_call(inputs)?;
        {
            let places = Self::places_ref(&places);
            for i in self.forward_kernels_at(&dims)? {
                self.launch(i, &dims, &places)?;
            }
        }
        self.count_kernel_writes(&dims)?;
        let mut out = HashMap::new();
        let outputs = self.plan.outputs.clone();
        for io in &outputs {
            let b = self.plan.buffer(&io.buffer).expect("outputs have buffers");
            let shape = transfuse_ir::eval_shape(&io.shape, &dims)?;
            let bytes = b.len().eval_usize(&dims)? as u64 * u64::from(elem_bytes(b.elem));
            let is_big = places.get(&io.buffer) == Some(&Place::Big);
            if let Some(c) = self.plan.cache_of(&io.name).cloned() {
                if carry.iter().any(|(o, i)| *o == io.name && *i == c.input) {
                    // Stays in place: the next call's past is these rows.
                    self.kv_carried.insert(c.input.clone(), shape);
                    continue;
                }
                self.kv_carried.remove(&c.input);
                let full = self.plan.buffer_len(&io.buffer, &dims)? as u64;
                let eb = elem_bytes(b.elem) as usize;
                let padded = self.dev.read(&self.io[&io.buffer].buf, full * eb as u64)?;
                let data = c.compact(&padded, &shape, self.kv_cap, eb);
                out.insert(io.name.clone(), from_bytes(&data, b.elem, io.dtype, shape));
                continue;
            }
            if keep.contains(&io.name) && !is_big {
                let h = self.io.remove(&io.buffer).expect("allocated above");
                kept.insert(
                    io.name.clone(),
                    DeviceTensor {
                        buf: h.buf,
                        cap: h.cap,
                        shape,
                        dtype: io.dtype,
                        elem: b.elem,
                    },
                );
                continue;
            }
            if let Some((_, input)) = carry.iter().find(|(o, _)| *o == io.name) {
                if is_big {
                    return Err(dev_err(
                        self.backend(),
                        format!(
                            "output `{}` takes {bytes} bytes, over the largest binding: it cannot \
                             be carried to the next call (a smaller batch or context would fit)",
                            io.name
                        ),
                    ));
                }
                let h = self.io.remove(&io.buffer).expect("allocated above");
                if let Some((old, _, _)) = self.carried.insert(input.clone(), (h, shape, io.dtype))
                {
                    self.io.insert(io.buffer.clone(), old);
                }
                continue;
            }
            let data = if is_big {
                let step = self.chunk_elems(b.elem) * u64::from(elem_bytes(b.elem));
                let mut data = Vec::with_capacity(bytes as usize);
                for h in &self.big[&io.buffer] {
                    let want = step.min(bytes - data.len() as u64);
                    data.extend(self.dev.read(&h.buf, want)?);
                }
                data
            } else {
                self.dev.read(&self.io[&io.buffer].buf, bytes)?
            };
            out.insert(io.name.clone(), from_bytes(&data, b.elem, io.dtype, shape));
        }
        Ok((out, kept))
    }
}

/// Reads a [`DeviceTensor`] back to the host.
pub fn read_device_tensor<D: Device>(
    dev: &D,
    t: &DeviceTensor<D::Buffer>,
) -> Result<Tensor, RuntimeError> {
    let data = dev.read(&t.buf, t.bytes())?;
    Ok(from_bytes(&data, t.elem, t.dtype, t.shape.clone()))
}

impl<D: Device + 'static> Loaded for Program<D> {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        Ok(self.run_inner(inputs, carry, &[])?.0)
    }

    fn clear_carry(&mut self) {
        self.carried.clear();
        self.kv_carried.clear();
    }

    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let (dims, places) = self.prepare_call(inputs)?;
        self.dev.sync()?;
        let places = Self::places_ref(&places);
        let mut times = vec![];
        for i in self.forward_kernels_at(&dims)? {
            let t0 = Instant::now();
            self.launch(i, &dims, &places)?;
            self.dev.sync()?;
            let k = &self.plan.kernels[i];
            let name = match &k.decode {
                Some(v) if self.plan.use_decode(i, &dims)? => v.gen.kernel.name.clone(),
                _ => k.gen.kernel.name.clone(),
            };
            times.push(KernelTime {
                name,
                ops: k.ops.clone(),
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        Ok(times)
    }

    fn time_forward(&mut self, inputs: &TensorMap, iters: usize) -> Result<Timing, RuntimeError> {
        let (dims, places) = self.prepare_call(inputs)?;
        self.dev.sync()?;
        let places = Self::places_ref(&places);
        let mut seconds = Vec::with_capacity(iters);
        let mut device_clock = true;
        let launched = self.forward_kernels_at(&dims)?;
        for _ in 0..iters {
            let timed = self.dev.timer_start();
            let t0 = Instant::now();
            for &i in &launched {
                self.launch(i, &dims, &places)?;
            }
            let device = if timed { self.dev.timer_stop()? } else { None };
            if !timed {
                self.dev.sync()?;
            }
            let host = t0.elapsed().as_secs_f64();
            device_clock &= device.is_some();
            seconds.push(device.unwrap_or(host));
        }
        Ok(Timing {
            seconds,
            // One clock for the whole set: the device's only if every run had it.
            clock: if device_clock && iters > 0 {
                "device"
            } else {
                "host-sync"
            },
        })
    }

    fn memory(&self) -> Option<MemoryReport> {
        self.last_memory
    }

    fn bytes_written(&self) -> Option<BytesWritten> {
        Some(self.written.clone())
    }

    fn tuning(&self) -> Option<TuningUse> {
        self.tuning_use.clone()
    }
}

/// Equal buffers, kernels, nodes, bindings and uniforms: plans that differ in tunables only.
fn same_structure(a: &Plan, b: &Plan) -> bool {
    a.buffers == b.buffers
        && a.kernels.len() == b.kernels.len()
        && a.kernels.iter().zip(&b.kernels).all(|(x, y)| {
            x.nodes == y.nodes
                && x.phase == y.phase
                && x.bindings == y.bindings
                && x.uniforms == y.uniforms
                && match (&x.decode, &y.decode) {
                    (None, None) => true,
                    (Some(v), Some(w)) => v.bindings == w.bindings && v.uniforms == w.uniforms,
                    _ => false,
                }
        })
}

/// A backend running graphs as compiled kernels on a [`Device`]: each `load` is a
/// [`Program`] with f32 storage. [`crate::WgpuBackend`] and [`crate::CudaBackend`] are this on
/// their shared devices.
pub struct DeviceBackend<D: Device> {
    dev: Arc<D>,
}

impl<D: Device> DeviceBackend<D> {
    /// The backend on `dev`.
    pub fn on(dev: Arc<D>) -> DeviceBackend<D> {
        DeviceBackend { dev }
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.dev
    }
}

impl<D: Device + 'static> Backend for DeviceBackend<D> {
    fn name(&self) -> &str {
        self.dev.info().backend
    }

    fn description(&self) -> String {
        self.dev.info().description.clone()
    }

    fn cost_profile(&self) -> &'static str {
        match self.dev.info().limits.kind {
            transfuse_codegen::kernels::DeviceKind::Cpu => "cpu-adapter",
            transfuse_codegen::kernels::DeviceKind::Gpu => "gpu",
        }
    }

    fn load(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Loaded>, RuntimeError> {
        self.load_as(graph, weights, Elem::F32)
    }

    fn storage_types(&self) -> Vec<Elem> {
        let floats = [Elem::F32, Elem::F16, Elem::BF16];
        let info = self.dev.info();
        floats
            .into_iter()
            .filter(|e| info.elems.contains(e))
            .collect()
    }

    fn load_as(
        &self,
        graph: &Graph,
        weights: &Weights,
        storage: Elem,
    ) -> Result<Box<dyn Loaded>, RuntimeError> {
        Ok(Box::new(Program::new(
            self.dev.clone(),
            graph,
            weights,
            storage,
        )?))
    }
}
