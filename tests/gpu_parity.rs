//! Parity with PyTorch/transformers on the device backends: the same fixtures as
//! tests/parity.rs, run as compiled kernels (optimized graph → plan → WGSL / CUDA) on wgpu
//! (lavapipe in CI) and, when a device is present, CUDA. Each test is written once and
//! instantiated per backend.
//!
//! Tolerances: 1e-3 absolute for hidden states and logits (the kernels accumulate in a
//! different order than PyTorch — tiled matmuls, online softmax — and lavapipe's `exp`/`sqrt`
//! are not correctly rounded; measured errors are printed and sit near 1e-5), 1e-4 for the
//! L2-normalised sentence embeddings (values below 1, so tighter). Greedy tokens are exact.

mod common;

use common::{
    assert_close_masked, encoder_batch, fixture, minilm_dir, minilm_sentences, outputs_of, rows,
};
use std::sync::Arc;
use transfuse::models::{Model, Pooling};

use transfuse::codegen::kir::Kernel;
use transfuse::runtime::device::{Device, DeviceInfo};
use transfuse::runtime::{Backend, DeviceBackend, RuntimeError};
use transfuse::{Batch, Sampling, Session};

const TOL: f32 = 1e-3;

fn session(model: Model, backend: Box<dyn Backend>) -> Session {
    let s = Session::new(model, backend).unwrap();
    eprintln!("backend: {}", s.backend_description());
    s
}

fn tiny_gpt2_logits(backend: Box<dyn Backend>) {
    let refs = outputs_of("tiny_gpt2");
    let ids = rows(&refs["input_ids"]);
    let mask = rows(&refs["attention_mask_padded"]);
    let s = session(Model::load(&fixture("tiny_gpt2/model")).unwrap(), backend);
    let out = s.forward(&Batch::new(ids.clone())).unwrap();
    assert_close_masked(&out["logits"], &refs["logits"], None, TOL, "logits");
    let padded = Batch {
        input_ids: ids,
        attention_mask: Some(mask.clone()),
        token_type_ids: None,
    };
    let out = s.forward(&padded).unwrap();
    let want = &refs["logits_padded"];
    assert_close_masked(&out["logits"], want, Some(&mask), TOL, "logits_padded");
    let m = s.memory().expect("device backends report memory");
    eprintln!("memory: {m:?}");
    assert!(m.temps_planned <= m.temps_naive && m.temps_planned >= m.temps_live_peak);
}

fn tiny_gpt2_greedy(backend: Box<dyn Backend>) {
    let refs = outputs_of("tiny_gpt2");
    let want = rows(&refs["greedy_ids"]).remove(0);
    let prompt = rows(&refs["input_ids"]).remove(0);
    let s = session(Model::load(&fixture("tiny_gpt2/model")).unwrap(), backend);
    let got = s
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want);
    // Twice: the carried cache of the first call must not leak into the second.
    let again = s
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(again, want);
}

fn tiny_bert(backend: Box<dyn Backend>) {
    let refs = outputs_of("tiny_bert");
    let (batch, mask) = encoder_batch(&refs);
    let s = session(Model::load(&fixture("tiny_bert/model")).unwrap(), backend);
    let out = s.forward(&batch).unwrap();
    let want = &refs["last_hidden_state"];
    assert_close_masked(
        &out["last_hidden_state"],
        want,
        Some(&mask),
        TOL,
        "last_hidden_state",
    );
    let want = &refs["pooler_output"];
    assert_close_masked(&out["pooler_output"], want, None, TOL, "pooler_output");
}

fn minilm(backend: Box<dyn Backend>) {
    let Some(dir) = minilm_dir() else { return };
    let refs = outputs_of("minilm");
    let (batch, mask) = encoder_batch(&refs);
    let sentences = minilm_sentences();
    let sentences: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let model = Model::load_with(&dir, Some(Pooling::Mean), true).unwrap();
    let s = session(model, backend);
    let out = s.forward(&batch).unwrap();
    let want = &refs["last_hidden_state"];
    assert_close_masked(
        &out["last_hidden_state"],
        want,
        Some(&mask),
        TOL,
        "last_hidden_state",
    );
    let want = &refs["mean_pooled_l2norm"];
    assert_close_masked(&out["embeddings"], want, None, 1e-4, "embeddings");
    let emb = s.embed(&sentences).unwrap();
    assert_close_masked(&emb, want, None, 1e-4, "embed()");
}

/// One test per (backend, case).
macro_rules! per_backend {
    ($($case:ident),*) => {
        mod wgpu {
            $(
                #[test]
                fn $case() {
                    if let Some(b) = crate::common::wgpu_backend() {
                        super::$case(Box::new(b));
                    }
                }
            )*
        }
        mod cuda {
            $(
                #[test]
                fn $case() {
                    if let Some(b) = crate::common::cuda_backend() {
                        super::$case(Box::new(b));
                    }
                }
            )*
        }
    };
}

per_backend!(tiny_gpt2_logits, tiny_gpt2_greedy, tiny_bert, minilm);

/// A device with a smaller largest binding than it really has, to exercise weight splitting.
struct Limited<D: Device> {
    inner: Arc<D>,
    info: DeviceInfo,
}

impl<D: Device> Device for Limited<D> {
    type Buffer = D::Buffer;
    type Module = D::Module;
    type Bound = D::Bound;
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn alloc(&self, bytes: u64, what: &str) -> Result<D::Buffer, RuntimeError> {
        self.inner.alloc(bytes, what)
    }
    fn write(&self, buf: &D::Buffer, data: &[u8]) -> Result<(), RuntimeError> {
        self.inner.write(buf, data)
    }
    fn read(&self, buf: &D::Buffer, bytes: u64) -> Result<Vec<u8>, RuntimeError> {
        self.inner.read(buf, bytes)
    }
    fn copy(
        &self,
        src: &D::Buffer,
        dst: &D::Buffer,
        runs: &[(u64, u64, u64)],
    ) -> Result<(), RuntimeError> {
        self.inner.copy(src, dst, runs)
    }
    fn compile(&self, k: &Kernel) -> Result<D::Module, RuntimeError> {
        self.inner.compile(k)
    }
    fn bind(&self, m: &D::Module, bufs: &[&D::Buffer]) -> Result<D::Bound, RuntimeError> {
        self.inner.bind(m, bufs)
    }
    fn bound_to(&self, b: &D::Bound, m: &D::Module, bufs: &[&D::Buffer]) -> bool {
        self.inner.bound_to(b, m, bufs)
    }
    fn launch_bound(
        &self,
        m: &D::Module,
        b: &D::Bound,
        uniforms: &[u32],
        grid: [u32; 3],
    ) -> Result<(), RuntimeError> {
        self.inner.launch_bound(m, b, uniforms, grid)
    }
    fn sync(&self) -> Result<(), RuntimeError> {
        self.inner.sync()
    }
}

/// Tiny GPT-2 under a 64 KiB binding limit: the token embedding (1000 × 64 f32 = 256 000 bytes)
/// is bound as four chunks by the gather and the tied LM head, the batch's logits (128 000
/// bytes) as two; the logits and greedy tokens do not change.
#[test]
fn wgpu_split_tensors_keep_gpt2_exact() {
    let Some(dev) = common::wgpu_backend().map(|b| b.device().clone()) else {
        return;
    };
    let mut info = dev.info().clone();
    info.max_binding_bytes = 64 * 1024;
    let limited = Arc::new(Limited { inner: dev, info });
    let refs = outputs_of("tiny_gpt2");
    // Both sequences: the logits (2 × 16 × 1000 × 4 bytes) exceed the binding too, so the LM
    // head writes them as two chunks.
    let ids = rows(&refs["input_ids"]);
    let model = Model::load(&fixture("tiny_gpt2/model")).unwrap();
    let s = Session::new(model, Box::new(DeviceBackend::on(limited))).unwrap();
    let out = s.forward(&Batch::new(ids)).unwrap();
    assert_close_masked(&out["logits"], &refs["logits"], None, TOL, "logits (split)");
    let want = rows(&refs["greedy_ids"]).remove(0);
    let prompt = rows(&refs["input_ids"]).remove(0);
    let got = s
        .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
        .unwrap();
    assert_eq!(got, want);
}

/// CUDA ranks over NCCL (`Session::cuda_tp`, what `--tp N --backend cuda` runs): TP 1 on one
/// device, TP 2 when two exist, against the same fixtures and tolerances. They skip without
/// NCCL or a device unless `TRANSFUSE_REQUIRE` names `nccl` (and `cuda`); scripts/gpu-check.sh
/// runs them with both.
mod nccl_tp {
    use super::*;
    use crate::common::required;
    use transfuse::tp::NcclJob;

    /// The number of CUDA devices when NCCL and the driver are usable, else `None` (a failure
    /// when required).
    fn devices() -> Option<usize> {
        if let Err(e) = transfuse::runtime::nccl::available() {
            assert!(!required("nccl"), "TRANSFUSE_REQUIRE names nccl: {e}");
            eprintln!("skipping: {e}");
            return None;
        }
        match transfuse::runtime::cuda::device_count() {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => {
                assert!(!required("cuda"), "TRANSFUSE_REQUIRE names cuda: no device");
                eprintln!("skipping: no CUDA device");
                None
            }
            Err(e) => {
                assert!(!required("cuda"), "TRANSFUSE_REQUIRE names cuda: {e}");
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    fn ranks(name: &str, n: usize) -> Session {
        crate::common::cuda_backend();
        let model = Model::load_without_weights(&fixture(name), None, false).unwrap();
        let s = Session::cuda_tp(
            model,
            n,
            &NcclJob::single(),
            &transfuse::passes::Options::default(),
        )
        .unwrap();
        eprintln!("{name} tp {n}: {}", s.backend_description());
        s
    }

    fn gpt2(n: usize) {
        let refs = outputs_of("tiny_gpt2");
        let ids = rows(&refs["input_ids"]);
        let s = ranks("tiny_gpt2/model", n);
        let tp = s.tp.as_ref().unwrap();
        tp.take_logs();
        let out = s.forward(&Batch::new(ids)).unwrap();
        assert_close_masked(&out["logits"], &refs["logits"], None, TOL, "logits");
        // The CUDA ranks ran their collectives with NCCL on the programs' device buffers
        // (`DeviceSegments`), none through host memory: 5 all-reduces and the logits'
        // all-gather each.
        for (r, log) in tp.take_logs().into_iter().enumerate() {
            assert_eq!(log.len(), 6, "rank {r}: {log:?}");
            assert!(log.iter().all(|c| c.on_device), "rank {r}: {log:?}");
        }
        let want = rows(&refs["greedy_ids"]).remove(0);
        let prompt = rows(&refs["input_ids"]).remove(0);
        let got = s
            .generate(&prompt, want.len() - prompt.len(), Sampling::Greedy)
            .unwrap();
        assert_eq!(got, want, "greedy tokens at tp {n}");
    }

    fn bert(n: usize) {
        let refs = outputs_of("tiny_bert");
        let (batch, mask) = encoder_batch(&refs);
        let s = ranks("tiny_bert/model", n);
        let out = s.forward(&batch).unwrap();
        let want = &refs["last_hidden_state"];
        assert_close_masked(
            &out["last_hidden_state"],
            want,
            Some(&mask),
            TOL,
            "last_hidden_state",
        );
    }

    #[test]
    fn tp1_over_nccl_matches_the_fixtures() {
        if devices().is_none() {
            return;
        }
        gpt2(1);
        bert(1);
    }

    #[test]
    fn tp2_over_nccl_matches_the_fixtures() {
        match devices() {
            Some(n) if n >= 2 => {
                gpt2(2);
                bert(2);
            }
            Some(n) => eprintln!("skipping: TP 2 needs 2 CUDA devices, the driver sees {n}"),
            None => {}
        }
    }

    #[test]
    fn more_ranks_than_devices_is_a_usage_error_naming_tp() {
        let Some(n) = devices() else { return };
        // Tiny GPT-2 has 4 heads: a degree that divides them, beyond the devices.
        let Some(tp) = [2, 4].into_iter().find(|&t| t > n) else {
            eprintln!("skipping: {n} devices, no degree of 4 heads beyond them");
            return;
        };
        let model = Model::load_without_weights(&fixture("tiny_gpt2/model"), None, false).unwrap();
        let e = Session::cuda_tp(
            model,
            tp,
            &NcclJob::single(),
            &transfuse::passes::Options::default(),
        )
        .err()
        .expect("an error");
        let m = e.to_string();
        assert!(matches!(e, transfuse::Error::Usage(_)), "{m}");
        assert!(
            m.contains(&format!("--tp {tp}")) && m.contains("CUDA device"),
            "{m}"
        );
    }
}
