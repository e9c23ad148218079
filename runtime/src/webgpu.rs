//! The WebGPU device: wgpu 30 on Vulkan, Metal or DX12 (no GL fallback). In CI it runs on
//! Mesa's lavapipe, a Vulkan driver on the CPU (`WGPU_BACKEND=vulkan`).
//!
//! - **One device per process** ([`shared`]): setting a device up costs 60–500 ms, so every
//!   backend, session and test shares it.
//! - **The adapter's own limits** are requested (not WebGPU's defaults) and passed to the
//!   lowering: threads per workgroup, workgroup memory, storage-buffer binding size and count.
//!   `SHADER_F16` is requested when the adapter has it (f16 plans).
//! - **Adapter choice**: `WGPU_BACKEND` picks the APIs (wgpu reads it); among the adapters a
//!   discrete GPU comes first, then integrated, virtual, other, and a CPU adapter last.
//! - **Compiled pipelines are cached** by WGSL source for the life of the device, so sessions
//!   (and tests) sharing kernels compile each once.
//! - **Launches are recorded** into one command encoder and submitted when the host needs a
//!   result ([`Device::read`], [`Device::sync`]) or before a host write, so a whole forward
//!   pass is one submission; host writes in between are staged by the queue and go with it.
//! - **Uniforms** of every launch of a submission are packed into one host array, each at an
//!   offset aligned for dynamic uniform offsets, written into one device-lifetime uniform
//!   buffer (the *arena*) just before the submit; a launch binds it at its dynamic offset, so
//!   bind groups ([`Device::bind`]) do not depend on uniform values and the executor builds
//!   each once per kernel and buffer set. A full arena submits what is recorded and starts
//!   over (queue order keeps the earlier submission's values).
//! - **Readback staging** buffers are kept and reused (the largest one so far).
//! - **Errors** (validation, out of memory) never panic: shader and pipeline creation run in
//!   an error scope, everything else is caught by the device's uncaptured-error handler and
//!   returned by the next submit as [`RuntimeError::Device`].

use std::sync::{Arc, Mutex, OnceLock};

use transfuse_codegen::kernels::{DeviceKind, Limits};
use transfuse_codegen::kir::{Access, Elem, Kernel};
use transfuse_codegen::lower::Target;

use crate::device::{Device, DeviceInfo};
use crate::program::DeviceBackend;
use crate::RuntimeError;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Device {
        backend: "wgpu".into(),
        msg: msg.into(),
    }
}

/// A wgpu device and queue (see the module docs).
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: DeviceInfo,
    adapter: wgpu::AdapterInfo,
    /// Launches recorded since the last submit, and their uniforms.
    pending: Mutex<Pending>,
    /// The uniform arena (see the module docs) and its dynamic-offset alignment.
    arena: wgpu::Buffer,
    align: u64,
    /// A readback staging buffer kept for the next read.
    staging: Mutex<Option<wgpu::Buffer>>,
    /// Errors the device reported outside an error scope.
    errors: Arc<Mutex<Vec<String>>>,
    /// Compiled kernels by WGSL source: sessions sharing kernels compile them once.
    cache: Mutex<std::collections::HashMap<String, Arc<Pipeline>>>,
    /// Timestamp queries, when the adapter offers them.
    timer: Option<Timer>,
    /// While timing: whether the first pass's start has been written.
    timing: Mutex<Option<bool>>,
}

/// Two timestamps (start of the first timed pass, end of the last) and where they resolve.
struct Timer {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f32,
}

/// Bytes of the uniform arena: 1024 launches of up to 64 uniforms at a 256-byte alignment.
const ARENA_BYTES: u64 = 256 * 1024;

/// What the next submit carries.
#[derive(Default)]
struct Pending {
    enc: Option<wgpu::CommandEncoder>,
    /// The arena's contents for the recorded launches.
    uniforms: Vec<u8>,
}

/// A kernel's bind group and the buffers it binds (see [`Device::bind`]).
pub struct WgpuBound {
    group: wgpu::BindGroup,
    pipeline: Arc<Pipeline>,
    bufs: Vec<wgpu::Buffer>,
}

/// A compiled pipeline and its bind-group layout.
struct Pipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// A compiled kernel: its pipeline and bind-group layout.
pub struct WgpuModule {
    name: String,
    compiled: Arc<Pipeline>,
    buffers: usize,
    uniforms: usize,
}

/// The process-wide device, created on first use; the error is kept and returned again.
pub fn shared() -> Result<Arc<WgpuDevice>, RuntimeError> {
    static DEVICE: OnceLock<Result<Arc<WgpuDevice>, RuntimeError>> = OnceLock::new();
    DEVICE
        .get_or_init(|| WgpuDevice::new().map(Arc::new))
        .clone()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl WgpuDevice {
    /// Opens the best adapter (see the module docs). Prefer [`shared`].
    pub fn new() -> Result<WgpuDevice, RuntimeError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        // No validation layers unless asked (WGPU_VALIDATION=1): they are slow and often absent.
        desc.flags = wgpu::InstanceFlags::empty().with_env();
        let desc = desc.with_env();
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let adapter = adapters.into_iter().next().ok_or_else(|| {
            err(format!(
                "no adapter found for backends {backends:?} (on Linux without a GPU install \
                 mesa-vulkan-drivers and set WGPU_BACKEND=vulkan)"
            ))
        })?;
        let ainfo = adapter.get_info();
        let limits = adapter.limits();
        // f16 storage when offered; subgroups when offered (the subgroup tunables need them).
        // Timestamp queries when offered (bench attention's device clock).
        let features = adapter.features()
            & (wgpu::Features::SHADER_F16
                | wgpu::Features::SUBGROUP
                | wgpu::Features::TIMESTAMP_QUERY);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("transfuse"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| err(format!("adapter `{}` refused a device: {e}", ainfo.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().expect("error sink").push(e.to_string());
        }));
        let mut elems = vec![Elem::F32];
        if features.contains(wgpu::Features::SHADER_F16) {
            elems.push(Elem::F16);
        }
        let info = DeviceInfo {
            backend: "wgpu",
            description: format!(
                "{} ({:?}, {:?}, driver {} {})",
                ainfo.name, ainfo.backend, ainfo.device_type, ainfo.driver, ainfo.driver_info
            ),
            target: Target::Wgsl,
            limits: Limits {
                max_threads: limits
                    .max_compute_invocations_per_workgroup
                    .min(limits.max_compute_workgroup_size_x),
                max_shared_bytes: limits.max_compute_workgroup_storage_size,
                kind: if ainfo.device_type == wgpu::DeviceType::Cpu {
                    DeviceKind::Cpu
                } else {
                    DeviceKind::Gpu
                },
                subgroup_min: if features.contains(wgpu::Features::SUBGROUP) {
                    ainfo.subgroup_min_size
                } else {
                    0
                },
            },
            max_binding_bytes: limits.max_storage_buffer_binding_size,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            max_grid: [limits.max_compute_workgroups_per_dimension; 3],
            elems,
            is_gpu: ainfo.device_type != wgpu::DeviceType::Cpu,
        };
        let timer = features
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Timer {
                set: device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("timer"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                }),
                resolve: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("timer resolve"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                period_ns: queue.get_timestamp_period(),
            })
            .filter(|t| t.period_ns > 0.0);
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniform arena"),
            size: ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(WgpuDevice {
            device,
            queue,
            info,
            adapter: ainfo,
            arena,
            align: u64::from(limits.min_uniform_buffer_offset_alignment).max(16),
            staging: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            errors,
            cache: Mutex::default(),
            timer,
            timing: Mutex::new(None),
        })
    }

    /// The adapter wgpu reports.
    pub fn adapter(&self) -> &wgpu::AdapterInfo {
        &self.adapter
    }

    /// Submits the recorded launches (if any) and reports errors seen so far.
    fn flush(&self) -> Result<(), RuntimeError> {
        let mut p = self.pending.lock().expect("encoder");
        if let Some(enc) = p.enc.take() {
            self.submit(&mut p, enc);
        }
        drop(p);
        self.check()
    }

    /// Writes the recorded launches' uniforms into the arena and submits `enc` (their
    /// encoder, taken out of `p`). The queue runs the write before the command buffer and
    /// after every earlier submission.
    fn submit(&self, p: &mut Pending, enc: wgpu::CommandEncoder) {
        if !p.uniforms.is_empty() {
            self.queue.write_buffer(&self.arena, 0, &p.uniforms);
            p.uniforms.clear();
        }
        self.queue.submit([enc.finish()]);
    }

    fn check(&self) -> Result<(), RuntimeError> {
        let mut errs = self.errors.lock().expect("error sink");
        if errs.is_empty() {
            return Ok(());
        }
        let all = std::mem::take(&mut *errs);
        Err(err(all.join("; ")))
    }

    /// Records `fill` (copies into a `size`-byte staging buffer) after every pending launch,
    /// submits, waits and returns the staging buffer's first `bytes` bytes. The encoder lock is
    /// held until the submit: another thread's launches taken out of the shared encoder must
    /// not be submitted after this copy.
    fn read_back(
        &self,
        size: u64,
        bytes: u64,
        fill: impl FnOnce(&mut wgpu::CommandEncoder, &wgpu::Buffer),
    ) -> Result<Vec<u8>, RuntimeError> {
        let kept = self.staging.lock().expect("staging").take();
        let staging = match kept {
            Some(b) if b.size() >= size => b,
            _ => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: size.max(256),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        let mut pending = self.pending.lock().expect("encoder");
        let mut enc = pending
            .enc
            .take()
            .unwrap_or_else(|| self.device.create_command_encoder(&Default::default()));
        fill(&mut enc, &staging);
        self.submit(&mut pending, enc);
        drop(pending);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, ..size, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| err("readback was never mapped"))?
            .map_err(|e| err(format!("mapping a readback buffer: {e}")))?;
        let view = staging
            .get_mapped_range(..size)
            .map_err(|e| err(format!("reading back: {e}")))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        // Kept for the next read unless a larger one was kept meanwhile.
        let mut kept = self.staging.lock().expect("staging");
        if kept.as_ref().is_none_or(|k| k.size() < staging.size()) {
            *kept = Some(staging);
        }
        Ok(out)
    }

    fn wait(&self) -> Result<(), RuntimeError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| err(format!("waiting for the device: {e}")))?;
        self.check()
    }
}

fn pad4(bytes: u64) -> u64 {
    bytes.max(4).div_ceil(4) * 4
}

/// Bytes of a kernel's uniform struct of `n` u32 fields (WGSL rounds it up to 16).
fn uniform_bytes(n: usize) -> u64 {
    (n.div_ceil(4) * 16) as u64
}

impl Device for WgpuDevice {
    type Buffer = wgpu::Buffer;
    type Module = WgpuModule;
    type Bound = WgpuBound;

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: u64, what: &str) -> Result<wgpu::Buffer, RuntimeError> {
        let size = pad4(bytes);
        let max = self.device.limits().max_buffer_size;
        if size > max {
            return Err(err(format!(
                "tensor `{what}` needs {size} bytes; the adapter's largest buffer is {max}"
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(err(format!("allocating {size} bytes for `{what}`: {e}")));
        }
        Ok(buf)
    }

    fn write(&self, buf: &wgpu::Buffer, data: &[u8]) -> Result<(), RuntimeError> {
        // Launches recorded before must see the old contents: submit them first.
        self.flush()?;
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buf, 0, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(pad4(data.len() as u64) as usize, 0);
            self.queue.write_buffer(buf, 0, &padded);
        }
        Ok(())
    }

    fn read(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        let size = pad4(bytes);
        self.read_back(size, bytes, |enc, staging| {
            enc.copy_buffer_to_buffer(buf, 0, staging, 0, size)
        })
    }

    fn copy(
        &self,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        runs: &[(u64, u64, u64)],
    ) -> Result<(), RuntimeError> {
        // Recorded into the pending encoder: ordered after the launches before it.
        let mut pending = self.pending.lock().expect("encoder");
        let enc = pending
            .enc
            .get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        for &(from, to, n) in runs {
            if n > 0 {
                enc.copy_buffer_to_buffer(src, from, dst, to, n);
            }
        }
        Ok(())
    }

    fn compile(&self, kernel: &Kernel) -> Result<WgpuModule, RuntimeError> {
        let src = transfuse_codegen::wgsl::print(kernel)
            .map_err(|e| RuntimeError::Codegen(e.to_string()))?;
        let wrap = |compiled| WgpuModule {
            name: kernel.name.clone(),
            compiled,
            buffers: kernel.buffers.len(),
            uniforms: kernel.uniforms.len(),
        };
        if let Some(p) = self.cache.lock().expect("kernel cache").get(&src) {
            return Ok(wrap(p.clone()));
        }
        let key = src.clone();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&kernel.name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let stage = wgpu::ShaderStages::COMPUTE;
        let mut entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: stage,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: b.access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        if !kernel.uniforms.is_empty() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: kernel.buffers.len() as u32,
                visibility: stage,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&kernel.name),
                entries: &entries,
            });
        let playout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&kernel.name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&kernel.name),
                layout: Some(&playout),
                module: &module,
                entry_point: Some(&kernel.name),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(err(format!("kernel `{}` was rejected: {e}", kernel.name)));
        }
        let compiled = Arc::new(Pipeline { pipeline, layout });
        self.cache
            .lock()
            .expect("kernel cache")
            .insert(key, compiled.clone());
        Ok(wrap(compiled))
    }

    fn bind(&self, m: &WgpuModule, bufs: &[&wgpu::Buffer]) -> Result<WgpuBound, RuntimeError> {
        if bufs.len() != m.buffers {
            crate::device::check_launch_args(
                "wgpu",
                &m.name,
                (m.buffers, m.uniforms),
                bufs.len(),
                m.uniforms,
            )?;
        }
        let mut entries: Vec<wgpu::BindGroupEntry> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        if m.uniforms > 0 {
            entries.push(wgpu::BindGroupEntry {
                binding: bufs.len() as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.arena,
                    offset: 0,
                    size: std::num::NonZeroU64::new(uniform_bytes(m.uniforms)),
                }),
            });
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&m.name),
            layout: &m.compiled.layout,
            entries: &entries,
        });
        Ok(WgpuBound {
            group,
            pipeline: m.compiled.clone(),
            bufs: bufs.iter().map(|&b| b.clone()).collect(),
        })
    }

    fn bound_to(&self, b: &WgpuBound, m: &WgpuModule, bufs: &[&wgpu::Buffer]) -> bool {
        Arc::ptr_eq(&b.pipeline, &m.compiled)
            && b.bufs.len() == bufs.len()
            && b.bufs.iter().zip(bufs).all(|(x, &y)| x == y)
    }

    fn launch_bound(
        &self,
        m: &WgpuModule,
        b: &WgpuBound,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        crate::device::check_launch_args(
            "wgpu",
            &m.name,
            (m.buffers, m.uniforms),
            b.bufs.len(),
            uniforms.len(),
        )?;
        if !Arc::ptr_eq(&b.pipeline, &m.compiled) {
            return Err(err(format!(
                "kernel `{}` launched with buffers bound for another kernel",
                m.name
            )));
        }
        if grid.contains(&0) {
            return Ok(());
        }
        let mut pending = self.pending.lock().expect("encoder");
        // This launch's uniforms at the next aligned offset of the arena; a full arena submits
        // the launches recorded so far first.
        let size = uniform_bytes(uniforms.len());
        let mut offset = (pending.uniforms.len() as u64).div_ceil(self.align) * self.align;
        if !uniforms.is_empty() && offset + size > ARENA_BYTES {
            if let Some(enc) = pending.enc.take() {
                self.submit(&mut pending, enc);
            }
            pending.uniforms.clear();
            offset = 0;
        }
        if !uniforms.is_empty() {
            let u = &mut pending.uniforms;
            u.resize(offset as usize, 0);
            u.extend(uniforms.iter().flat_map(|w| w.to_le_bytes()));
            u.resize((offset + size) as usize, 0);
        }
        let Pending { enc, .. } = &mut *pending;
        let enc = enc.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        {
            // While timing, the first pass writes the start and every pass the end (the last
            // one's end remains).
            let mut timing = self.timing.lock().expect("timing");
            let writes = match (&self.timer, timing.as_mut()) {
                (Some(t), Some(started)) => {
                    let first = !*started;
                    *started = true;
                    Some(wgpu::ComputePassTimestampWrites {
                        query_set: &t.set,
                        beginning_of_pass_write_index: first.then_some(0),
                        end_of_pass_write_index: Some(1),
                    })
                }
                _ => None,
            };
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&m.name),
                timestamp_writes: writes,
            });
            pass.set_pipeline(&m.compiled.pipeline);
            if uniforms.is_empty() {
                pass.set_bind_group(0, &b.group, &[]);
            } else {
                pass.set_bind_group(0, &b.group, &[offset as u32]);
            }
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), RuntimeError> {
        self.flush()?;
        self.wait()
    }

    fn timer_start(&self) -> bool {
        if self.timer.is_none() {
            return false;
        }
        *self.timing.lock().expect("timing") = Some(false);
        true
    }

    fn timer_stop(&self) -> Result<Option<f64>, RuntimeError> {
        let started = self.timing.lock().expect("timing").take();
        let (Some(t), Some(true)) = (&self.timer, started) else {
            self.sync()?;
            return Ok(None);
        };
        let bytes = self.read_back(16, 16, |enc, staging| {
            enc.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
            enc.copy_buffer_to_buffer(&t.resolve, 0, staging, 0, 16);
        })?;
        let ticks: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let (t0, t1) = (ticks[0], ticks[1]);
        // A reversed pair means the driver's counter is not usable here: fall back to the host.
        Ok((t1 > t0).then(|| (t1 - t0) as f64 * f64::from(t.period_ns) * 1e-9))
    }
}

/// The WebGPU backend: graphs lowered to WGSL and run by [`crate::Program`] on the process's
/// shared wgpu device ([`shared`]).
pub type WgpuBackend = DeviceBackend<WgpuDevice>;

impl DeviceBackend<WgpuDevice> {
    /// The backend on the shared device; an error when no adapter is found.
    pub fn new() -> Result<WgpuBackend, RuntimeError> {
        Ok(DeviceBackend::on(shared()?))
    }
}
