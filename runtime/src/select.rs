//! Picking a backend by name: `cpu`, `wgpu`, `cuda`, or `auto` (CUDA when a device exists, else
//! a wgpu adapter — a real GPU before a CPU adapter, as [`crate::webgpu`] ranks them — else the
//! CPU backend). The choice says why, so the CLI can tell the user which backend ran.

use crate::{Backend, CpuBackend, CudaBackend, RuntimeError, WgpuBackend};

/// A backend and how it was chosen.
pub struct BackendChoice {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// Why this one: for `auto`, what was tried before it and why it was skipped.
    pub reason: String,
}

/// The backend called `name` (`cpu`, `wgpu`, `cuda`, `auto`). Asking for `wgpu` or `cuda`
/// explicitly fails with the reason when it is unavailable; `auto` falls back.
pub fn backend_by_name(name: &str) -> Result<BackendChoice, RuntimeError> {
    let chosen = |b: Box<dyn Backend>, reason: String| BackendChoice { backend: b, reason };
    match name {
        "cpu" => Ok(chosen(Box::new(CpuBackend::new()), "asked for".into())),
        "wgpu" => Ok(chosen(Box::new(WgpuBackend::new()?), "asked for".into())),
        "cuda" => Ok(chosen(Box::new(CudaBackend::new()?), "asked for".into())),
        "auto" => {
            let mut skipped = vec![];
            match CudaBackend::new() {
                Ok(b) => return Ok(chosen(Box::new(b), "auto: a CUDA device is present".into())),
                Err(e) => skipped.push(format!("cuda unavailable ({e})")),
            }
            match WgpuBackend::new() {
                Ok(b) => {
                    skipped.push("using the best wgpu adapter".into());
                    return Ok(chosen(Box::new(b), format!("auto: {}", skipped.join("; "))));
                }
                Err(e) => skipped.push(format!("wgpu unavailable ({e})")),
            }
            skipped.push("using the CPU reference backend".into());
            Ok(chosen(
                Box::new(CpuBackend::new()),
                format!("auto: {}", skipped.join("; ")),
            ))
        }
        other => Err(RuntimeError::Device {
            backend: other.to_string(),
            msg: "unknown backend; expected cpu, wgpu, cuda or auto".into(),
        }),
    }
}
