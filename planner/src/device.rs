//! The device table: memory, dense 16-bit tensor throughput, HBM bandwidth and the two link
//! classes (within a node, between nodes) of the GPUs the planner knows, from the vendors'
//! datasheets; or a device described on the command line.
//!
//! Bandwidths are per GPU and per direction, the figure a ring collective is limited by.

use crate::PlanError;

/// One accelerator and its node.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Device {
    /// Table name (`a100-80gb`, …) or `custom`.
    pub name: String,
    /// Memory per device, GiB.
    pub memory_gib: f64,
    /// Dense bf16/fp16 tensor-core peak, TFLOP/s (without structured sparsity).
    pub peak_tflops: f64,
    /// HBM bandwidth, GB/s.
    pub hbm_gbs: f64,
    /// Link bandwidth between two GPUs of one node, per GPU and direction, GB/s.
    pub intra_node_gbs: f64,
    /// Network bandwidth of one GPU to other nodes, per direction, GB/s.
    pub inter_node_gbs: f64,
    /// GPUs per node (the tensor-parallel group is kept within one, as Megatron does).
    pub gpus_per_node: u64,
    /// Fraction of the dense peak that large bf16 GEMMs sustain; an assumption of this model
    /// (see [`GEMM_EFFICIENCY`]), not a datasheet figure.
    pub gemm_efficiency: f64,
}

/// The sustained fraction of the datasheet peak assumed for the GEMMs of a large Transformer
/// layer. Datasheet peaks are at boost clock; cuBLAS on transformer-sized bf16 GEMMs sustains
/// well below them under power limits. This is the model's one free constant: an assumption,
/// not a measurement, stated here so that every estimate can be rescaled.
pub const GEMM_EFFICIENCY: f64 = 0.75;

/// The GPUs of the table, by name.
pub const KNOWN: &[&str] = &["h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb"];

impl Device {
    /// A device of the table, or `PlanError::UnknownGpu` naming the known ones.
    pub fn by_name(name: &str) -> Result<Device, PlanError> {
        // Figures are the SXM parts in 8-GPU HGX/DGX nodes.
        let (memory_gib, peak_tflops, hbm_gbs, intra, inter) = match name {
            // NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3, 3.35 TB/s, BF16 1,979
            // TFLOPS with sparsity (989 dense), NVLink 900 GB/s (bidirectional: 450 per
            // direction). DGX H100: one ConnectX-7 400 Gb/s per GPU = 50 GB/s.
            "h100-80gb" => (80.0, 989.0, 3350.0, 450.0, 50.0),
            // NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, the tensor cores and NVLink
            // of H100; 400 Gb/s per GPU in HGX H200. Memory "GB" on these datasheets are read as
            // GiB, as for the A100 80GB (81,920 MiB).
            "h200-141gb" => (141.0, 989.0, 4800.0, 450.0, 50.0),
            // NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 80 GB HBM2e, 2,039 GB/s,
            // BF16 312 TFLOPS dense (624 sparse), NVLink 600 GB/s (300 per direction). DGX
            // A100 (Selene, the machine of Narayanan et al. 2021): one HDR InfiniBand 200 Gb/s
            // adapter per GPU = 25 GB/s.
            "a100-80gb" => (80.0, 312.0, 2039.0, 300.0, 25.0),
            // The same datasheet, SXM 40GB: 40 GB HBM2, 1,555 GB/s.
            "a100-40gb" => (40.0, 312.0, 1555.0, 300.0, 25.0),
            other => {
                return Err(PlanError::UnknownGpu(other.to_string()));
            }
        };
        Ok(Device {
            name: name.to_string(),
            memory_gib,
            peak_tflops,
            hbm_gbs,
            intra_node_gbs: intra,
            inter_node_gbs: inter,
            gpus_per_node: 8,
            gemm_efficiency: GEMM_EFFICIENCY,
        })
    }

    /// Memory in bytes.
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gib * GIB
    }

    /// Checks that every figure is positive and finite.
    pub fn check(&self) -> Result<(), PlanError> {
        let fields = [
            ("--mem", self.memory_gib),
            ("--tflops", self.peak_tflops),
            ("--hbm-bw", self.hbm_gbs),
            ("--intra-bw", self.intra_node_gbs),
            ("--inter-bw", self.inter_node_gbs),
        ];
        for (flag, v) in fields {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::Usage(format!("{flag} must be > 0, got {v}")));
            }
        }
        if self.gpus_per_node == 0 {
            return Err(PlanError::Usage("--gpus-per-node must be ≥ 1".into()));
        }
        if !(self.gemm_efficiency > 0.0 && self.gemm_efficiency <= 1.0) {
            return Err(PlanError::Usage(format!(
                "the matmul efficiency must be in (0, 1], got {}",
                self.gemm_efficiency
            )));
        }
        Ok(())
    }
}

/// Bytes in a GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
