//! Every kernel family on the device backends against the CPU backend, written once and
//! instantiated per backend (`mod wgpu`, `mod cuda`, like tests/gpu_parity.rs).
//!
//! Each case builds a small graph from primitive ops with the builder, optimizes it with the
//! default options (and asserts the fused op it is about appears, so the case really runs that
//! kernel family), folds weight-only work as a session does (except where the case is about
//! reading an unfolded view, e.g. a transposed weight), loads it with
//! `Program::new(dev, &graph, &weights, elem)` and compares every output with
//! `CpuBackend::run` on the same optimized graph, for several bindings of the symbolic dims.
//! Sizes 1, 3, 50, 129 and 783 where they apply, large magnitudes, `-inf` and `f32::MIN`
//! masks, fully masked attention and softmax rows, attention with one query row (the decode
//! variant) and more, head dims 32 and 64.
//!
//! Families: elementwise clusters (GELU erf/tanh, SiLU, broadcast add/mul/where/compare/cast
//! chains), row reductions (last axis, and an inner axis through a permute), softmax, layer
//! and RMS norm (and a residual add feeding a layer norm: the optimizer has no fused
//! residual-norm op, so that is an elementwise kernel then the norm), group/instance/batch
//! norm, matmul with every epilogue (bias, activation, residual, transposed weight, batched
//! operands, gemv shapes), attention (padding, causal, sliding window, fully masked rows,
//! decode), gather (embedding lookup) and concat.
//!
//! # Tolerances
//!
//! Per element, `|device - cpu| <= tol · (1 + |cpu|)` (absolute below 1, relative above);
//! for matmuls `tol · (1 + Σ_k |x_ik·w_kj|)`, the size of the terms of the dot product, which
//! is what its rounding error is proportional to (see `Case::abs_scale`):
//!
//! - f32 storage: `tol = 1e-4`. The kernels compute in f32 but sum in another order than the
//!   CPU (tree reductions, tiled matmuls, online softmax) and the device's `exp`, `tanh`,
//!   `erf`, `sqrt` are not correctly rounded (Vulkan allows a few ulp). Measured on lavapipe:
//!   ≤ 1e-6 for most cases, 1.5e-5 for attention with q ×100. (Scaled by `1 + |y|` instead,
//!   the matmul with ×100 inputs and k = 783 measured up to 1.45e-4 at an output where the
//!   products cancel, 1.9 out of Σ|x·w| ≈ 2e4: two correct summation orders, not a kernel
//!   error; the dot-product scale puts it near 1e-7.) A wrong index, operand or mask is off
//!   by O(1).
//! - f16 storage: see [`TOL_F16`]. The CPU reference then runs on the same f16-rounded inputs
//!   and weights the device was given, so the tolerance only covers what the kernels store in
//!   f16 (outputs and intermediates), not the quantisation of the inputs.
//!
//! Large-magnitude reductions use positive data (no cancellation), so the relative-ish
//! tolerance is meaningful for sums.
//!
//! Also here: `launch_order_across_threads` (the device is shared by the process, and these
//! tests run in parallel on it).
//!
//! Device access: a test skips with a `skipped: ...` message when the backend has no device,
//! and fails when `TRANSFUSE_REQUIRE` (comma-separated) names it (`wgpu`, `cuda`). On lavapipe
//! (`WGPU_BACKEND=vulkan`, Mesa's CPU Vulkan driver) the kernels run for real.

use std::sync::Arc;

use half::f16;
use transfuse_codegen::kir::Elem;
use transfuse_ir::{
    shape, BResult, BinaryOp, Builder, CmpOp, DType, Data, Dim, NodeId, Op, ReduceOp, Scalar,
    Tensor, UnaryOp, WeightLayout, Weights,
};
use transfuse_passes::{optimize, Options};
use transfuse_runtime::cuda::CudaDevice;
use transfuse_runtime::device::Device;
use transfuse_runtime::webgpu::{self, WgpuDevice};
use transfuse_runtime::{
    bind_inputs, fold_weights, nvrtc, Backend, CpuBackend, Loaded, Program, TensorMap,
};

/// f32 storage: `|device - cpu| <= TOL_F32 · (1 + |cpu|)`.
const TOL_F32: f32 = 1e-4;

/// f16 storage: `|device - cpu| <= TOL_F16 · (1 + |cpu|)`, the CPU running on the f16-rounded
/// inputs and weights. f16 keeps 11 significant bits: storing an output rounds it by up to
/// 2⁻¹¹ ≈ 4.9e-4 relative, and an f16 intermediate (a matmul output feeding another kernel, a
/// mask computed in the graph) adds its own rounding, amplified by what follows (a softmax
/// turns an absolute error δ in a score into a relative error δ in its probability). 4e-3
/// is eight output roundings: room for a rounded intermediate or two, well below the
/// error of a wrong operand or a dropped mask. Measured on lavapipe: softmax 1.3e-4,
/// attention 2.4e-4, matmul 4.8e-4 (one output rounding), layer norm after a residual add
/// 5.7e-4 (the sum is an f16 intermediate).
const TOL_F16: f32 = 4e-3;

const SIZES: [usize; 5] = [1, 3, 50, 129, 783];

/// `finfo(f32).min`, HF's mask fill.
const MIN: f64 = f32::MIN as f64;

// ---------------------------------------------------------------------------------------------
// Devices.

/// True when `TRANSFUSE_REQUIRE` (comma-separated) names `what` (as tests/common/mod.rs).
fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|x| x.trim() == what))
        .unwrap_or(false)
}

/// The shared wgpu device; `None` after a `skipped: ...` message when there is no adapter, a
/// failure when `TRANSFUSE_REQUIRE` names `wgpu`.
fn wgpu_dev() -> Option<Arc<WgpuDevice>> {
    isolate_tuning_cache();
    match webgpu::shared() {
        Ok(d) => Some(d),
        Err(e) if required("wgpu") => panic!("TRANSFUSE_REQUIRE names wgpu but: {e}"),
        Err(e) => {
            eprintln!("skipped: no wgpu device: {e}");
            None
        }
    }
}

/// The shared CUDA device; `None` after a `skipped: ...` message when there is no driver or
/// device, a failure when `TRANSFUSE_REQUIRE` names `cuda`.
fn cuda_dev() -> Option<Arc<CudaDevice>> {
    isolate_tuning_cache();
    match transfuse_runtime::cuda::shared() {
        Ok(d) => Some(d),
        Err(e) if required("cuda") => panic!("TRANSFUSE_REQUIRE names cuda but: {e}"),
        Err(e) => {
            eprintln!("skipped: no CUDA device: {e}");
            None
        }
    }
}

/// True when `dev` can run kernels with storage `elem`; otherwise a `skipped: ...` message (a
/// failure for CUDA f16 when `TRANSFUSE_REQUIRE` names `cuda`: the f16 kernels include
/// `cuda_fp16.h`, which NVRTC finds through `TRANSFUSE_CUDA_INCLUDE`).
fn supports<D: Device>(dev: &D, elem: Elem, test: &str) -> bool {
    let info = dev.info();
    if !info.elems.contains(&elem) {
        eprintln!(
            "skipped {test}: {elem:?} storage is not supported by {}",
            info.description
        );
        return false;
    }
    if info.backend == "cuda" && elem != Elem::F32 && nvrtc::cuda_include_dir().is_none() {
        let why = format!(
            "{} is not set: {elem:?} kernels include cuda_fp16.h (run scripts/fetch-nvrtc.sh)",
            nvrtc::INCLUDE_ENV
        );
        if required("cuda") {
            panic!("TRANSFUSE_REQUIRE names cuda but {why}");
        }
        eprintln!("skipped {test}: {why}");
        return false;
    }
    true
}

fn tol(elem: Elem) -> f32 {
    match elem {
        Elem::F32 => TOL_F32,
        Elem::F16 => TOL_F16,
        e => panic!("no tolerance for {e:?} storage"),
    }
}

/// A large negative mask fill the storage type holds: `f32::MIN` in f32; in f16 (where
/// `f32::MIN` becomes `-inf`) the most negative finite f16.
fn fill(elem: Elem) -> f32 {
    match elem {
        Elem::F16 => f16::MIN.to_f32(),
        _ => f32::MIN,
    }
}

// ---------------------------------------------------------------------------------------------
// Data.

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn for_name(parts: &[&str], salt: u64) -> Rng {
        let mut h = 0xcbf29ce484222325u64 ^ salt;
        for p in parts {
            for b in p.bytes().chain([0xff]) {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
        }
        Rng(h)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Makes an input tensor of a concrete shape.
type Gen = Box<dyn Fn(&[usize], &mut Rng) -> Tensor>;

/// Uniform in `offset + [-scale, scale)`.
fn rand(scale: f32, offset: f32) -> Gen {
    Box::new(move |s, r| {
        let n = s.iter().product();
        Tensor::f32(
            s.to_vec(),
            (0..n).map(|_| offset + scale * r.sym()).collect(),
        )
    })
}

/// An f32 tensor whose element at (row, column) is `f(row, column)` (rows = all leading axes).
fn by_row_col(f: impl Fn(usize, usize) -> f32 + 'static) -> Gen {
    Box::new(move |s, _| {
        let cols = *s.last().unwrap_or(&1);
        let n: usize = s.iter().product();
        Tensor::f32(s.to_vec(), (0..n).map(|i| f(i / cols, i % cols)).collect())
    })
}

/// The tensor as the device stores it with `elem` and reads it back (f32 data rounded to f16).
fn stored(t: &Tensor, elem: Elem) -> Tensor {
    match (&t.data, elem) {
        (Data::F32(v), Elem::F16) => Tensor::f32(
            t.shape.clone(),
            v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        ),
        _ => t.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases.

/// A graph under construction, its input generators, weights and expectations.
struct Case {
    label: String,
    b: Builder,
    inputs: Vec<(String, Vec<Dim>, Gen)>,
    weights: Weights,
    /// Fused ops the optimized graph must contain: `name attr..` (each pattern once per
    /// occurrence; attributes matched as words of `Op::attrs`, `scale=…` never needed).
    fused: Vec<String>,
    /// Strings some kernel of the plan must have among its IR ops or in its entry name.
    kernels: Vec<String>,
    /// Symbol whose value 1 (and only 1) must make an attention kernel launch its decode variant.
    decode_iff: Option<String>,
    fold: bool,
    /// A stem of which two kernels of the load-time plan must share one entry name (identical
    /// code bound to different buffers).
    twins: Option<String>,
    /// Errors scaled by `1 + |CPU output on |inputs| and |weights||` instead of `1 + |cpu|`.
    abs_scale: bool,
}

impl Case {
    fn new(label: impl Into<String>) -> Case {
        Case {
            label: label.into(),
            b: Builder::new(),
            inputs: vec![],
            weights: Weights::new(),
            fused: vec![],
            kernels: vec![],
            decode_iff: None,
            fold: true,
            twins: None,
            abs_scale: false,
        }
    }

    fn with(&mut self, f: impl FnOnce(&mut Builder) -> BResult) -> NodeId {
        let label = &self.label;
        f(&mut self.b).unwrap_or_else(|e| panic!("{label}: builder: {e}"))
    }

    /// An input of `dtype` declared with `dims`, its values made by `gen` at each run.
    fn input_gen(&mut self, name: &str, dims: Vec<Dim>, dtype: DType, gen: Gen) -> NodeId {
        let id = self.with(|b| b.input(name, dims.clone(), dtype));
        self.inputs.push((name.to_string(), dims, gen));
        id
    }

    /// An f32 input uniform in `offset + [-scale, scale)`.
    fn input(&mut self, name: &str, dims: Vec<Dim>, scale: f32, offset: f32) -> NodeId {
        self.input_gen(name, dims, DType::F32, rand(scale, offset))
    }

    /// A weight uniform in `offset + [-scale, scale)`.
    fn weight(&mut self, name: &str, s: &[usize], scale: f32, offset: f32) -> NodeId {
        let id = self.with(|b| b.weight(name, shape(s.iter().copied())));
        let t = rand(scale, offset)(s, &mut Rng::for_name(&[&self.label, name], 7));
        self.weights.insert(name.to_string(), Arc::new(t));
        id
    }

    fn out(&mut self, name: &str, id: NodeId) {
        self.b.output(name, id);
    }

    fn fused(mut self, pattern: &str) -> Case {
        self.fused.push(pattern.to_string());
        self
    }

    fn kernel(mut self, op_or_entry: &str) -> Case {
        self.kernels.push(op_or_entry.to_string());
        self
    }

    fn twins(mut self, stem: &str) -> Case {
        self.twins = Some(stem.to_string());
        self
    }

    fn decode_iff(mut self, sym: &str) -> Case {
        self.decode_iff = Some(sym.to_string());
        self
    }

    /// Scales each output's errors by the same graph run on the absolute values of the inputs
    /// and weights: for a matmul (any epilogue), `Σ_k |x_ik·w_kj|` (+ |bias|, |residual|), the
    /// size of the terms an f32 dot product rounds. A dot product's rounding error is bounded
    /// by `≈ k·2⁻²⁴·Σ|x·w|` and is typically `√k·2⁻²⁴·Σ|x·w|`; when the terms cancel (|y| ≪
    /// Σ|x·w|) that is large next to `1 + |y|` for two correct summation orders, so a bound
    /// relative to |y| would measure the data's cancellation, not the kernel.
    fn abs_scale(mut self) -> Case {
        self.abs_scale = true;
        self
    }

    fn no_fold(mut self) -> Case {
        self.fold = false;
        self
    }

    /// Optimizes, loads on `dev` with storage `elem` and compares every output with the CPU
    /// backend for each binding of the symbolic dims in `runs`; returns the worst scaled error.
    fn run<D: Device + 'static>(self, dev: &Arc<D>, elem: Elem, runs: &[&[(&str, usize)]]) -> f32 {
        let Case {
            label,
            b,
            inputs: gens,
            weights,
            fused,
            kernels,
            decode_iff,
            fold,
            twins,
            abs_scale,
        } = self;
        // Data depends on the case only: every backend and storage type sees the same.
        let seed_label = label.clone();
        let label = format!("{} {elem:?} {label}", dev.info().backend);
        let g = b.finish();
        let (opt, _) = optimize(&g, &Options::default()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let text = transfuse_ir::to_text(&opt);
        let mut ops: Vec<&Op> = opt
            .nodes()
            .map(|(_, n)| &n.op)
            .filter(|o| o.is_fused())
            .collect();
        for p in &fused {
            let mut words = p.split_whitespace();
            let name = words.next().expect("a pattern names an op");
            let attrs: Vec<&str> = words.collect();
            let hit = ops.iter().position(|o| {
                let have = o.attrs();
                o.name() == name
                    && attrs
                        .iter()
                        .all(|a| have.split_whitespace().any(|h| h == *a))
            });
            match hit {
                Some(i) => {
                    ops.remove(i);
                }
                None => panic!("{label}: the optimized graph lacks `{p}`:\n{text}"),
            }
        }
        let (g, w) = if fold {
            fold_weights(&opt, &weights).unwrap_or_else(|e| panic!("{label}: folding: {e}"))
        } else {
            (opt, weights)
        };
        let mut prog = Program::new(dev.clone(), &g, &w, elem)
            .unwrap_or_else(|e| panic!("{label}: loading: {e}\n{text}"));
        let entries: Vec<String> = prog
            .plan()
            .kernels
            .iter()
            .map(|k| k.entry().to_string())
            .collect();
        for want in &kernels {
            let found = prog
                .plan()
                .kernels
                .iter()
                .any(|k| k.ops.iter().any(|o| o == want) || k.entry().contains(want.as_str()));
            assert!(found, "{label}: no kernel computes `{want}`: {entries:?}");
        }
        if let Some(stem) = &twins {
            let named: Vec<&String> = entries
                .iter()
                .filter(|e| e.contains(stem.as_str()))
                .collect();
            let twin = named
                .iter()
                .enumerate()
                .any(|(i, e)| named[i + 1..].contains(e));
            assert!(
                twin,
                "{label}: no two `{stem}` kernels share an entry: {entries:?}"
            );
        }
        // The CPU reference sees what the device stores.
        let w_ref: Weights = w
            .iter()
            .map(|(k, t)| (k.clone(), Arc::new(stored(t, elem))))
            .collect();
        let tol = tol(elem);
        let (mut worst, mut worst_at) = (0f32, String::new());
        for (ri, run) in runs.iter().enumerate() {
            let dims: transfuse_ir::Bindings =
                run.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let inputs: TensorMap = gens
                .iter()
                .map(|(name, d, gen)| {
                    let s = transfuse_ir::eval_shape(d, &dims)
                        .unwrap_or_else(|e| panic!("{label}: input `{name}`: {e}"));
                    let mut rng = Rng::for_name(&[&seed_label, name], ri as u64);
                    (name.clone(), gen(&s, &mut rng))
                })
                .collect();
            let ref_inputs: TensorMap = inputs
                .iter()
                .map(|(k, t)| (k.clone(), stored(t, elem)))
                .collect();
            let what = format!("{label} {run:?}");
            if let Some(sym) = &decode_iff {
                let b = bind_inputs(&g, &inputs).unwrap();
                let plan = prog.plan();
                let decode = (0..plan.kernels.len()).any(|k| plan.use_decode(k, &b).unwrap());
                assert_eq!(
                    decode,
                    b[sym.as_str()] == 1,
                    "{what}: decode variant used: {decode}"
                );
            }
            let want = CpuBackend::reference()
                .run(&g, &w_ref, &ref_inputs)
                .unwrap_or_else(|e| panic!("{what}: cpu: {e}"));
            let scale = abs_scale.then(|| {
                let w_abs: Weights = w_ref
                    .iter()
                    .map(|(k, t)| (k.clone(), Arc::new(abs(t))))
                    .collect();
                let i_abs: TensorMap = ref_inputs
                    .iter()
                    .map(|(k, t)| (k.clone(), abs(t)))
                    .collect();
                CpuBackend::reference()
                    .run(&g, &w_abs, &i_abs)
                    .unwrap_or_else(|e| panic!("{what}: cpu on |inputs|: {e}"))
            });
            let got = prog
                .run(&inputs, &[])
                .unwrap_or_else(|e| panic!("{what}: device: {e}"));
            assert_eq!(got.len(), want.len(), "{what}: outputs");
            for (name, wt) in &want {
                let sc = scale.as_ref().map(|s| &s[name]);
                let d = compare(&what, name, &got[name], wt, sc, tol);
                if d >= worst {
                    (worst, worst_at) = (d, format!("`{name}` at {run:?}"));
                }
            }
        }
        eprintln!(
            "{label}: worst {worst:.2e} ({worst_at}; tol {tol:.0e}); kernels {}",
            entries.join(" ")
        );
        worst
    }
}

/// `|x|` elementwise for f32 tensors; others unchanged.
fn abs(t: &Tensor) -> Tensor {
    match &t.data {
        Data::F32(v) => Tensor::f32(t.shape.clone(), v.iter().map(|x| x.abs()).collect()),
        _ => t.clone(),
    }
}

/// The worst `|got - want| / (1 + |scale|)` over `name`'s elements (`scale`: `want` unless
/// given); panics past `tol`, on a non-finite value, or (integers, bools) on any difference.
fn compare(
    what: &str,
    name: &str,
    got: &Tensor,
    want: &Tensor,
    scale: Option<&Tensor>,
    tol: f32,
) -> f32 {
    assert_eq!(got.shape, want.shape, "{what}: `{name}` shape");
    let (Data::F32(a), Data::F32(b)) = (&got.data, &want.data) else {
        assert_eq!(got, want, "{what}: `{name}`");
        return 0.0;
    };
    let s = scale.map_or(b.as_slice(), |s| s.as_f32().expect("an f32 scale"));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(y.is_finite(), "{what}: the CPU's `{name}`[{i}] is {y}");
        assert!(
            x.is_finite(),
            "{what}: the device's `{name}`[{i}] is {x} (cpu {y})"
        );
        let d = (x - y).abs() / (1.0 + s[i].abs());
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    if worst > tol {
        let bad: Vec<usize> = a
            .iter()
            .zip(b)
            .enumerate()
            .filter(|(i, (x, y))| (*x - *y).abs() / (1.0 + s[*i].abs()) > tol)
            .map(|(i, _)| i)
            .collect();
        let zeros = a.iter().filter(|x| **x == 0.0).count();
        panic!(
            "{what}: `{name}`[{at}]: device {} vs cpu {} (scale 1 + {}: error {worst:.2e} > \
             {tol:.0e}); {} of {} elements off ({zeros} device zeros), the first at {:?}",
            a[at],
            b[at],
            s[at].abs(),
            bad.len(),
            a.len(),
            &bad[..bad.len().min(12)]
        );
    }
    worst
}

/// The worst error of a family, printed at the end of its test.
struct Worst {
    family: &'static str,
    backend: &'static str,
    elem: Elem,
    worst: f32,
}

impl Worst {
    fn new<D: Device>(family: &'static str, dev: &D, elem: Elem) -> Worst {
        Worst {
            family,
            backend: dev.info().backend,
            elem,
            worst: 0.0,
        }
    }

    fn add(&mut self, w: f32) {
        self.worst = self.worst.max(w);
    }
}

impl Drop for Worst {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            eprintln!(
                "== {} {:?} {}: worst scaled error {:.2e} (tol {:.0e})",
                self.backend,
                self.elem,
                self.family,
                self.worst,
                tol(self.elem)
            );
        }
    }
}

fn sym(s: &str) -> Dim {
    Dim::sym(s)
}

/// `[sym, rest..]`.
fn dims(first: &str, rest: &[usize]) -> Vec<Dim> {
    std::iter::once(sym(first))
        .chain(rest.iter().map(|&n| n.into()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Elementwise clusters.

fn elementwise<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("elementwise", &**dev, elem);
    for &n in &SIZES {
        for mag in [1.0f32, 1e3] {
            let mut c = Case::new(format!("elementwise n={n} x{mag}"));
            let x = c.input("x", dims("rows", &[n]), mag, 0.0);
            // A column [rows, 1] and a row [n] broadcast against x.
            let a = c.input("a", dims("rows", &[1]), mag, 0.0);
            let w = c.weight("w", &[n], 1.0, 0.5);
            let ids = c.input_gen(
                "ids",
                dims("rows", &[n]),
                DType::I64,
                Box::new(|s, r| {
                    let n = s.iter().product();
                    Tensor::i64(
                        s.to_vec(),
                        (0..n).map(|_| (r.next() % 2001) as i64 - 1000).collect(),
                    )
                }),
            );
            let y = c.with(|b| b.gelu_erf(x));
            c.out("gelu_erf", y);
            let y = c.with(|b| b.gelu_tanh(x));
            c.out("gelu_tanh", y);
            let y = c.with(|b| b.silu(x));
            c.out("silu", y);
            // where(x > a, x·w + 0.5, ids / 3), clamped below at -2, divided by 1 + e^-|a|.
            let y = c.with(|b| {
                let xw = b.mul(x, w)?;
                let xw = b.add_scalar(xw, 0.5)?;
                let cond = b.compare(CmpOp::Gt, x, a)?;
                let idf = b.cast(ids, DType::F32)?;
                let three = b.scalar(3.0)?;
                let idf = b.div(idf, three)?;
                let y = b.select(cond, xw, idf)?;
                let lo = b.scalar(-2.0)?;
                let y = b.binary(BinaryOp::Max, y, lo)?;
                let e = b.unary(UnaryOp::Abs, a)?;
                let e = b.unary(UnaryOp::Neg, e)?;
                let e = b.unary(UnaryOp::Exp, e)?;
                let e = b.add_scalar(e, 1.0)?;
                b.div(y, e)
            });
            c.out("chain", y);
            // log, sqrt, tanh, recip, pow, sigmoid, relu, min.
            let y = c.with(|b| {
                let ax = b.unary(UnaryOp::Abs, x)?;
                let l = b.add_scalar(ax, 1.0)?;
                let l = b.unary(UnaryOp::Log, l)?;
                let s = b.unary(UnaryOp::Sqrt, ax)?;
                let t = b.unary(UnaryOp::Tanh, x)?;
                let st = b.mul(s, t)?;
                let r = b.add_scalar(ax, 1.0)?;
                let r = b.unary(UnaryOp::Recip, r)?;
                let sg = b.unary(UnaryOp::Sigmoid, x)?;
                let two = b.scalar(2.0)?;
                let p = b.binary(BinaryOp::Pow, sg, two)?;
                let re = b.unary(UnaryOp::Relu, a)?;
                let m = b.binary(BinaryOp::Min, re, w)?;
                let y = b.add(l, st)?;
                let y = b.sub(y, r)?;
                let y = b.add(y, p)?;
                b.add(y, m)
            });
            c.out("math", y);
            if mag == 1.0 {
                // sin/cos are only accurate near [-π, π] on GPUs (Vulkan bounds their error
                // there only).
                let y = c.with(|b| {
                    let s = b.unary(UnaryOp::Sin, x)?;
                    let co = b.unary(UnaryOp::Cos, a)?;
                    b.mul(s, co)
                });
                c.out("trig", y);
            }
            // A bool output and an i64 one.
            let y = c.with(|b| b.compare(CmpOp::Le, x, a));
            c.out("le", y);
            let y = c.with(|b| {
                let seven = b.scalar_i64(7)?;
                let d = b.sub(ids, seven)?;
                b.unary(UnaryOp::Abs, d)
            });
            c.out("abs_i64", y);
            let c = c
                .kernel("erf")
                .kernel("tanh")
                .kernel("sigmoid")
                .kernel("where");
            worst.add(c.run(dev, elem, &[&[("rows", 1)], &[("rows", 3)]]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row reductions.

fn reductions<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("reductions", &**dev, elem);
    for &n in &SIZES {
        // Unit signed data, and large positive data (no cancellation in the sums).
        for (mag, offset) in [(1.0f32, 0.0f32), (1e3, 1e4)] {
            let mut c = Case::new(format!("reduce n={n} x{mag}+{offset}"));
            let x = c.input("x", dims("rows", &[n]), mag, offset);
            let y = c.with(|b| b.reduce(ReduceOp::Sum, x, &[1], false));
            c.out("sum", y);
            let y = c.with(|b| b.reduce(ReduceOp::Max, x, &[1], true));
            c.out("max", y);
            let y = c.with(|b| b.reduce(ReduceOp::Mean, x, &[1], true));
            c.out("mean", y);
            // A fused prologue: Σ (x/mag)².
            let y = c.with(|b| {
                let s = b.mul_scalar(x, 1.0 / mag as f64)?;
                let sq = b.mul(s, s)?;
                b.reduce(ReduceOp::Sum, sq, &[1], false)
            });
            c.out("sum_sq", y);
            // An inner axis: x3 [rows, 7, n] reduced over the 7 through a permute, and directly.
            let x3 = c.input("x3", dims("rows", &[7, n]), mag, offset);
            let y = c.with(|b| {
                let p = b.permute(x3, &[0, 2, 1])?;
                b.reduce(ReduceOp::Sum, p, &[2], false)
            });
            c.out("sum_permuted", y);
            let y = c.with(|b| b.reduce(ReduceOp::Max, x3, &[1], false));
            c.out("max_axis1", y);
            let y = c.with(|b| b.reduce(ReduceOp::Mean, x3, &[1], true));
            c.out("mean_axis1", y);
            let c = c
                .kernel("reduce_sum")
                .kernel("reduce_max")
                .kernel("reduce_mean");
            worst.add(c.run(dev, elem, &[&[("rows", 1)], &[("rows", 3)]]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax.

fn softmax<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("softmax", &**dev, elem);
    let fill = fill(elem);
    for &n in &SIZES {
        for mag in [1.0f32, 100.0] {
            let mut c = Case::new(format!("softmax n={n} x{mag}"));
            let x = c.input("x", dims("b", &[2, n]), 4.0 * mag, 0.0);
            let y = c.with(|b| {
                let s = b.mul_scalar(x, 0.37)?;
                b.softmax(s)
            });
            c.out("y_plain", y);
            // A [n] mask: every fourth key -inf (key 0 never, so no row is fully masked).
            let keys = c.input_gen(
                "keys",
                vec![n.into()],
                DType::F32,
                by_row_col(|_, j| if j % 4 == 3 { f32::NEG_INFINITY } else { 0.0 }),
            );
            let y = c.with(|b| {
                let s = b.mul_scalar(x, 0.37)?;
                let s = b.add(s, keys)?;
                b.softmax(s)
            });
            c.out("y_keys", y);
            // A full [b, 2, n] mask: rows 1, 4, … fully masked with the large negative fill,
            // every third key of the others.
            let rows = c.input_gen(
                "rows",
                dims("b", &[2, n]),
                DType::F32,
                by_row_col(
                    move |r, j| {
                        if r % 3 == 1 || j % 3 == 2 {
                            fill
                        } else {
                            0.0
                        }
                    },
                ),
            );
            let y = c.with(|b| {
                let s = b.add(x, rows)?;
                b.softmax(s)
            });
            c.out("y_rows", y);
            let c = c.fused("softmax").fused("softmax").fused("softmax");
            worst.add(c.run(dev, elem, &[&[("b", 1)], &[("b", 2)]]));
        }
    }
}

/// Softmax under HF's extended mask computed in the graph, `(1 - attention_mask)·finfo.min`
/// as `[b, 1, n]`: item 0 has its last n/4 keys padded, item 1 is all padding (fully masked
/// rows: uniform on the CPU). With f16 storage the mask is an f16 temporary, where
/// `finfo(f32).min` saturates to `-inf`: the kernel must still give the CPU's uniform rows, not
/// NaN.
fn softmax_graph_mask<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("softmax, mask computed in the graph", &**dev, elem);
    for &n in &SIZES {
        let mut c = Case::new(format!("softmax hf mask n={n}"));
        let x = c.input("x", dims("b", &[2, n]), 4.0, 0.0);
        let ext = hf_mask(&mut c, n.into());
        let y = c.with(|b| {
            let ext = b.reshape(ext, vec![sym("b"), 1.into(), n.into()])?;
            let s = b.mul_scalar(x, 0.37)?;
            let s = b.add(s, ext)?;
            b.softmax(s)
        });
        c.out("y", y);
        worst.add(
            c.fused("softmax")
                .run(dev, elem, &[&[("b", 2)], &[("b", 3)]]),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Layer and RMS norm.

fn layer_rms_norm<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("layer/rms norm", &**dev, elem);
    for &n in &SIZES {
        for (mag, offset) in [(1.0f32, 0.0f32), (1e3, 100.0)] {
            let mut c = Case::new(format!("layer/rms norm n={n} x{mag}+{offset}"));
            let x = c.input("x", dims("rows", &[n]), mag, offset);
            let g = c.weight("g", &[n], 0.5, 1.0);
            let be = c.weight("b", &[n], 0.5, 0.0);
            let y = c.with(|b| b.layer_norm(x, g, be, 1e-5));
            c.out("ln", y);
            let y = c.with(|b| b.rms_norm(x, g, 1e-6));
            c.out("rms", y);
            let c = c.fused("layer_norm").fused("rms_norm");
            worst.add(c.run(dev, elem, &[&[("rows", 1)], &[("rows", 5)]]));
        }
    }
    // A residual add feeding the norm (pre-norm stream): both the sum and the norm are outputs.
    for n in [129, 783] {
        let mut c = Case::new(format!("residual + layer norm n={n}"));
        let x = c.input("x", dims("rows", &[n]), 2.0, 0.0);
        let r = c.input("r", dims("rows", &[n]), 2.0, 0.5);
        let g = c.weight("g", &[n], 0.5, 1.0);
        let be = c.weight("b", &[n], 0.5, 0.0);
        let s = c.with(|b| b.add(x, r));
        let y = c.with(|b| b.layer_norm(s, g, be, 1e-5));
        c.out("sum", s);
        c.out("ln", y);
        let c = c.fused("layer_norm");
        worst.add(c.run(dev, elem, &[&[("rows", 3)]]));
    }
}

// ---------------------------------------------------------------------------------------------
// Group, instance and batch norm.

fn channel_norms<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("group/instance/batch norm", &**dev, elem);
    // Rank 4 (two spatial axes): a rank-3 instance norm is `instance_norm_rank3`.
    for spatial in [vec![5usize, 7], vec![3, 43], vec![1, 783], vec![129, 3]] {
        let mut s = vec![6usize];
        s.extend(&spatial);
        let mut per_channel = vec![6usize];
        per_channel.extend(spatial.iter().map(|_| 1));
        for (mag, offset) in [(1.0f32, 0.0f32), (1e3, 100.0)] {
            let mut c = Case::new(format!("channel norms [N, {s:?}] x{mag}+{offset}"));
            let x = c.input("x", dims("n", &s), mag, offset);
            let g = c.weight("g", &per_channel, 0.5, 1.0);
            let be = c.weight("b", &per_channel, 0.5, 0.0);
            let y = c.with(|b| b.group_norm(x, g, be, 3, 1e-5));
            c.out("group3", y);
            let y = c.with(|b| b.group_norm(x, g, be, 2, 1e-5));
            c.out("group2", y);
            let y = c.with(|b| b.instance_norm(x, g, be, 1e-5));
            c.out("instance", y);
            // Inference batch norm with running statistics: folded into scale and shift.
            let mean = c.weight("bn.running_mean", &per_channel, 1.0, 0.0);
            let var = c.weight("bn.running_var", &per_channel, 0.4, 0.6);
            let bw = c.weight("bn.weight", &per_channel, 0.5, 1.0);
            let bb = c.weight("bn.bias", &per_channel, 0.5, 0.0);
            let y = c.with(|b| {
                let xc = b.sub(x, mean)?;
                let v = b.add_scalar(var, 1e-5)?;
                let inv = b.unary(UnaryOp::Rsqrt, v)?;
                let y = b.mul(xc, inv)?;
                let y = b.mul(y, bw)?;
                b.add(y, bb)
            });
            c.out("batch", y);
            let c = c
                .fused("group_norm groups=3")
                .fused("group_norm groups=2")
                .fused("instance_norm")
                .fused("batch_norm");
            worst.add(c.run(dev, elem, &[&[("n", 1)], &[("n", 2)]]));
        }
    }
}

/// Instance norm of a rank-3 `[N, C, L]` (1-D spatial) with a per-channel affine `[C, 1]`.
/// The normalised axis is the last one, so the optimizer extracts a layer norm over it; the
/// per-channel affine is not absorbed into it (layer/RMS norm parameters are per feature, the
/// last axis) and runs as an elementwise kernel after it.
fn instance_norm_rank3<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("instance norm, rank 3", &**dev, elem);
    for l in [1, 3, 129] {
        let mut c = Case::new(format!("instance norm [N, 6, {l}]"));
        let x = c.input("x", dims("n", &[6, l]), 1.0, 0.0);
        let g = c.weight("g", &[6, 1], 0.5, 1.0);
        let be = c.weight("b", &[6, 1], 0.5, 0.0);
        let y = c.with(|b| b.instance_norm(x, g, be, 1e-5));
        c.out("instance", y);
        worst.add(c.run(dev, elem, &[&[("n", 2)]]));
    }
}

// ---------------------------------------------------------------------------------------------
// Matmul and its epilogues.

/// The epilogues of `h @ W`: which activation (by builder call), bias, residual.
#[derive(Clone, Copy, Debug)]
enum Epi {
    Plain,
    Bias,
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
    Residual,
    GeluResidual,
}

impl Epi {
    const ALL: [Epi; 8] = [
        Epi::Plain,
        Epi::Bias,
        Epi::GeluErf,
        Epi::GeluTanh,
        Epi::Relu,
        Epi::Silu,
        Epi::Residual,
        Epi::GeluResidual,
    ];

    /// The fused op it becomes (`None`: a plain matmul).
    fn fused(self) -> Option<&'static str> {
        Some(match self {
            Epi::Plain => return None,
            Epi::Bias => "fused_matmul act=identity bias",
            Epi::GeluErf => "fused_matmul act=gelu_erf bias",
            Epi::GeluTanh => "fused_matmul act=gelu_tanh bias",
            Epi::Relu => "fused_matmul act=relu",
            Epi::Silu => "fused_matmul act=silu bias",
            Epi::Residual => "fused_matmul act=identity bias residual",
            Epi::GeluResidual => "fused_matmul act=gelu_erf bias residual",
        })
    }
}

/// `epi(x @ w)` with x `[b, m, k]` (b symbolic) scaled by `mag`, w `[k, n]`.
fn matmul_case(m: usize, k: usize, n: usize, epi: Epi, mag: f32) -> Case {
    let mut c = Case::new(format!("matmul [b,{m},{k}]x[{k},{n}] {epi:?} x{mag}"));
    let x = c.input("x", dims("b", &[m, k]), mag, 0.0);
    let w = c.weight("w", &[k, n], 1.0, 0.0);
    let mm = c.with(|b| b.matmul(x, w));
    let with_bias = |c: &mut Case, y: NodeId| {
        let bias = c.weight("bias", &[n], 1.0, 0.0);
        c.with(|b| b.add(y, bias))
    };
    let y = match epi {
        Epi::Plain => mm,
        Epi::Bias => with_bias(&mut c, mm),
        Epi::GeluErf | Epi::GeluResidual => {
            let y = with_bias(&mut c, mm);
            c.with(|b| b.gelu_erf(y))
        }
        Epi::GeluTanh => {
            let y = with_bias(&mut c, mm);
            c.with(|b| b.gelu_tanh(y))
        }
        Epi::Relu => c.with(|b| b.unary(UnaryOp::Relu, mm)),
        Epi::Silu => {
            let y = with_bias(&mut c, mm);
            c.with(|b| b.silu(y))
        }
        Epi::Residual => with_bias(&mut c, mm),
    };
    let y = if matches!(epi, Epi::Residual | Epi::GeluResidual) {
        let r = c.input("r", dims("b", &[m, n]), 1.0, 0.0);
        c.with(|b| b.add(r, y))
    } else {
        y
    };
    c.out("y", y);
    let c = c.abs_scale();
    match epi.fused() {
        Some(f) => c.fused(f),
        None => c.kernel("matmul"),
    }
}

fn matmul<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("matmul", &**dev, elem);
    let runs: &[&[(&str, usize)]] = &[&[("b", 1)], &[("b", 2)]];
    // Every epilogue on one odd shape.
    for epi in Epi::ALL {
        worst.add(matmul_case(3, 129, 50, epi, 1.0).run(dev, elem, runs));
    }
    // Odd shapes, gemv ones (m = 1) included, two epilogues each; large inputs on some.
    for (m, k, n, epis, mag) in [
        (1, 783, 50, [Epi::Bias, Epi::GeluErf], 1.0f32),
        (129, 50, 129, [Epi::Plain, Epi::Residual], 1.0),
        (1, 1, 1, [Epi::Plain, Epi::Silu], 1.0),
        (50, 783, 3, [Epi::Relu, Epi::GeluResidual], 100.0),
        (783, 3, 50, [Epi::Bias, Epi::GeluTanh], 100.0),
        (1, 129, 783, [Epi::Plain, Epi::Silu], 1.0),
        // One row with vec4-aligned k and n: on CPU adapters the one-row register blocks.
        (1, 132, 52, [Epi::Bias, Epi::GeluResidual], 1.0),
        // Eight rows or more, vec4-aligned k and n: on CPU adapters with 8-lane subgroups
        // the broadcast register design (lanes sharing rows of a through subgroupBroadcast).
        (129, 132, 52, [Epi::Plain, Epi::GeluResidual], 1.0),
        (783, 12, 68, [Epi::Bias, Epi::Silu], 100.0),
        (50, 36, 100, [Epi::Residual, Epi::GeluTanh], 1.0),
    ] {
        for epi in epis {
            worst.add(matmul_case(m, k, n, epi, mag).run(dev, elem, runs));
        }
    }
    // A weight stored [out, in] (PyTorch's Linear), not folded: the kernel reads it transposed.
    for (m, k, n) in [
        (129, 50, 3),
        (1, 783, 50),
        (1, 128, 50),
        (129, 52, 129),
        (783, 36, 65),
    ] {
        let mut c = Case::new(format!("linear out-in [b,{m},{k}]x[{n},{k}]ᵀ"));
        let x = c.input("x", dims("b", &[m, k]), 1.0, 0.0);
        let w = c.weight("w", &[n, k], 1.0, 0.0);
        let bias = c.weight("bias", &[n], 1.0, 0.0);
        let y = c.with(|b| b.linear(x, w, Some(bias), WeightLayout::OutIn));
        let y = c.with(|b| b.gelu_erf(y));
        c.out("y", y);
        let c = c
            .fused("fused_matmul act=gelu_erf bias")
            .kernel("_bt")
            .no_fold()
            .abs_scale();
        worst.add(c.run(dev, elem, runs));
    }
    // Batched activations on both sides ([b, 2, m, k] @ [b, 2, k, n], attention-like), a
    // transposed activation, and a batched weight.
    for (m, k, n) in [(50, 33, 129), (1, 64, 50), (3, 1, 3)] {
        let mut c = Case::new(format!("batched [b,2,{m},{k}]x[b,2,{k},{n}]"));
        let a = c.input("a", dims("b", &[2, m, k]), 1.0, 0.0);
        let bt = c.input("bt", dims("b", &[2, n, k]), 1.0, 0.0);
        let y = c.with(|b| {
            let t = b.transpose_last(bt)?;
            b.matmul(a, t)
        });
        c.out("abt", y);
        let bb = c.input("bb", dims("b", &[2, k, n]), 1.0, 0.0);
        let y = c.with(|b| b.matmul(a, bb));
        c.out("ab", y);
        worst.add(c.kernel("matmul").abs_scale().run(dev, elem, runs));
    }
    // Heads merged as attention's output feeds the output projection: x [b, h, m, d]
    // permuted to [b, m, h, d], reshaped to [b, m, h·d] @ w + bias + residual. With d a
    // multiple of 4 a CPU adapter reads the strided rows with vec4 loads (the register design).
    for (h, m, d, n) in [
        (3, 50, 4, 129),
        (3, 129, 8, 52),
        (2, 1, 4, 3),
        (3, 783, 4, 50),
    ] {
        let mut c = Case::new(format!("merged heads [b,{h},{m},{d}] x [{},{n}]", h * d));
        let x = c.input("x", dims("b", &[h, m, d]), 1.0, 0.0);
        let w = c.weight("w", &[h * d, n], 1.0, 0.0);
        let bias = c.weight("bias", &[n], 1.0, 0.0);
        let r = c.input("r", dims("b", &[m, n]), 1.0, 0.0);
        let y = c.with(|b| {
            let p = b.permute(x, &[0, 2, 1, 3])?;
            let mh = b.reshape(p, vec![sym("b"), m.into(), (h * d).into()])?;
            let y = b.matmul(mh, w)?;
            let y = b.add(y, bias)?;
            b.add(r, y)
        });
        c.out("y", y);
        let c = c
            .fused("fused_matmul act=identity bias residual")
            .abs_scale();
        worst.add(c.run(dev, elem, runs));
    }
    {
        let (m, k, n) = (129, 50, 3);
        let mut c = Case::new(format!(
            "transposed activation and batched weight m={m} k={k}"
        ));
        let xt = c.input("xt", vec![k.into(), sym("m")], 1.0, 0.0);
        let w = c.weight("w", &[k, n], 1.0, 0.0);
        let y = c.with(|b| {
            let x = b.permute(xt, &[1, 0])?;
            b.matmul(x, w)
        });
        c.out("xtw", y);
        let x = c.input("x", vec![2.into(), sym("m"), k.into()], 1.0, 0.0);
        let wb = c.weight("wb", &[2, k, n], 1.0, 0.0);
        let bias = c.weight("bias", &[n], 1.0, 0.0);
        let y = c.with(|b| {
            let y = b.matmul(x, wb)?;
            b.add(y, bias)
        });
        c.out("batched_w", y);
        let c = c.fused("fused_matmul act=identity bias").abs_scale();
        worst.add(c.run(dev, elem, &[&[("m", 1)], &[("m", m)]]));
    }
}

/// Two matmuls of identical code (so one entry name) on different weights, run at shapes of
/// alternating buckets (16 rows, 2 rows: on a CPU adapter the register design's block
/// changes with the rows, so both kernels are swapped at each switch). Switching back must
/// give each kernel its own compiled binding: kernels kept for a bucket were once keyed by
/// entry name alone, so the first layer's matmul ran with the second's buffers (tiny GPT-2's
/// second `generate` on lavapipe decoded wrong tokens).
fn bucket_switch_twin_kernels<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut c = Case::new("two identical matmuls across buckets");
    let x = c.input("x", dims("s", &[64]), 1.0, 0.0);
    let mut y = x;
    for l in 0..2 {
        let w = c.weight(&format!("w{l}"), &[64, 64], 0.25, 0.0);
        let bias = c.weight(&format!("b{l}"), &[64], 1.0, 0.0);
        y = c.with(|b| {
            let m = b.matmul(y, w)?;
            let m = b.add(m, bias)?;
            b.gelu_erf(m)
        });
    }
    c.out("y", y);
    let c = c
        .fused("fused_matmul act=gelu_erf bias")
        .fused("fused_matmul act=gelu_erf bias")
        .twins("matmul")
        .abs_scale();
    let runs: &[&[(&str, usize)]] = &[&[("s", 16)], &[("s", 2)], &[("s", 16)], &[("s", 2)]];
    c.run(dev, elem, runs);
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// `(1 - attention_mask)·MIN` as `[b, 1, 1, s]` from an i64 `[b, s]` input: item 0 has its last
/// `s/4` tokens padded, item 1 is all padding (every row of it fully masked), others none.
fn hf_mask(c: &mut Case, s: Dim) -> NodeId {
    let m = c.input_gen(
        "attention_mask",
        vec![sym("b"), s.clone()],
        DType::I64,
        Box::new(|sh, _| {
            let (bn, sn) = (sh[0], sh[1]);
            let v = (0..bn * sn).map(|i| {
                let (b, j) = (i / sn, i % sn);
                i64::from(!(b == 1 || (b == 0 && j >= sn - sn / 4)))
            });
            Tensor::i64(sh.to_vec(), v.collect())
        }),
    );
    c.with(|b| {
        let f = b.cast(m, DType::F32)?;
        let one = b.scalar(1.0)?;
        let inv = b.sub(one, f)?;
        let ext = b.mul_scalar(inv, MIN)?;
        b.reshape(ext, vec![sym("b"), 1.into(), 1.into(), s])
    })
}

/// The causal condition `kpos <= qpos` from iotas, as GPT-2 builds it (`[seq, past + seq]`).
fn causal_cond(c: &mut Case, past: Dim, seq: Dim) -> NodeId {
    c.with(|b| {
        let qpos = b.iota(past.clone(), seq.clone())?;
        let qpos = b.reshape(qpos, vec![seq.clone(), 1.into()])?;
        let kpos = b.iota(0.into(), past.plus(&seq))?;
        b.compare(CmpOp::Le, kpos, qpos)
    })
}

/// `[b, H, len, d]`.
fn heads(h: usize, len: Dim, d: usize) -> Vec<Dim> {
    vec![sym("b"), h.into(), len, d.into()]
}

/// transformers' `rotate_half` + `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin`.
fn rope(b: &mut Builder, x: NodeId, cos: NodeId, sin: NodeId) -> BResult {
    let r = b.rank(x) - 1;
    let d = b.shape(x)[r].as_known().expect("known head dim");
    let hi = b.slice(x, r, (d / 2).into(), d.into())?;
    let lo = b.slice(x, r, 0.into(), (d / 2).into())?;
    let neg = b.unary(UnaryOp::Neg, hi)?;
    let rot = b.concat(&[neg, lo], r)?;
    let a = b.mul(x, cos)?;
    let c = b.mul(rot, sin)?;
    b.add(a, c)
}

/// transformers' `repeat_kv`: `[b, kvh, s, d]` → `[b, kvh·g, s, d]` through reshape, expand,
/// reshape.
fn repeat_kv(b: &mut Builder, x: NodeId, g: usize) -> BResult {
    let s = b.shape(x).clone();
    let kvh = s[1].as_known().expect("known kv heads");
    let five = vec![
        s[0].clone(),
        kvh.into(),
        1.into(),
        s[2].clone(),
        s[3].clone(),
    ];
    let x = b.reshape(x, five.clone())?;
    let mut big = five;
    big[2] = g.into();
    let x = b.expand(x, big)?;
    b.reshape(
        x,
        vec![s[0].clone(), (kvh * g).into(), s[2].clone(), s[3].clone()],
    )
}

/// The LLaMA family's fused ops as the loader spells them: rope on q and k, `repeat_kv` into
/// causal grouped-query attention over a KV cache (prefill and the decode variant), and the
/// SwiGLU MLP (tiled and GEMV).
fn llama_ops<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("llama ops", &**dev, elem);
    for (d, kvh, g) in [(32, 2, 2), (64, 1, 4)] {
        let mut c = Case::new(format!(
            "rope + gqa attention d={d} kv_heads={kvh} group={g}"
        ));
        let (seq, past) = (sym("seq"), sym("past"));
        let q = c.input("q", heads(kvh * g, seq.clone(), d), 1.0, 0.0);
        let cos = c.input("cos", vec![seq.clone(), d.into()], 1.0, 0.0);
        let sin = c.input("sin", vec![seq.clone(), d.into()], 1.0, 0.0);
        let kn = c.input("k_new", heads(kvh, seq.clone(), d), 1.0, 0.0);
        let vn = c.input("v_new", heads(kvh, seq.clone(), d), 2.0, 0.0);
        let pk = c.input("past_k", heads(kvh, past.clone(), d), 1.0, 0.0);
        let pv = c.input("past_v", heads(kvh, past.clone(), d), 2.0, 0.0);
        let q = c.with(|b| rope(b, q, cos, sin));
        let kr = c.with(|b| rope(b, kn, cos, sin));
        let k = c.with(|b| b.concat(&[pk, kr], 2));
        let v = c.with(|b| b.concat(&[pv, vn], 2));
        c.out("present_k", k);
        let cond = causal_cond(&mut c, past.clone(), seq.clone());
        let m = c.with(|b| {
            let zero = b.scalar(0.0)?;
            let fill = b.scalar(MIN)?;
            b.select(cond, zero, fill)
        });
        let (kx, vx) = (
            c.with(|b| repeat_kv(b, k, g)),
            c.with(|b| repeat_kv(b, v, g)),
        );
        let o = c.with(|b| b.attention(q, kx, vx, Some(m)));
        c.out("o", o);
        let c = c.fused("rope").fused("attention causal").decode_iff("seq");
        worst.add(c.run(
            dev,
            elem,
            &[
                &[("b", 2), ("seq", 5), ("past", 0)],
                &[("b", 2), ("seq", 1), ("past", 6)],
            ],
        ));
    }
    for (k, n) in [(72, 40), (129, 50)] {
        let mut c = Case::new(format!("swiglu k={k} n={n}"));
        let x = c.input("x", dims("rows", &[k]), 1.0, 0.0);
        let wg = c.weight("wg", &[k, n], 0.2, 0.0);
        let wu = c.weight("wu", &[k, n], 0.2, 0.0);
        let y = c.with(|b| {
            let g = b.matmul(x, wg)?;
            let u = b.matmul(x, wu)?;
            let sg = b.unary(UnaryOp::Sigmoid, g)?;
            let s = b.mul(g, sg)?;
            b.mul(s, u)
        });
        c.out("y", y);
        let c = c.fused("gated_matmul").abs_scale();
        worst.add(c.run(dev, elem, &[&[("rows", 5)], &[("rows", 1)]]));
    }
}

fn attention<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("attention", &**dev, elem);
    let fill = fill(elem);
    let runs: &[&[(&str, usize)]] = &[&[("b", 2)]];
    let h = 2;

    // Padding (HF BERT): hidden states split into heads, the extended mask, merged back.
    // Item 1 is all padding: its rows are fully masked (finfo.min, uniform weights).
    for (s, d) in [(3, 32), (50, 64), (129, 32)] {
        let mut c = Case::new(format!("attention padding s={s} d={d}"));
        let [q, k, v] = ["hq", "hk", "hv"].map(|n| {
            let x = c.input(n, dims("b", &[s, h * d]), 1.0, 0.0);
            c.with(|b| b.split_heads(x, h))
        });
        let m = hf_mask(&mut c, s.into());
        let o = c.with(|b| b.attention(q, k, v, Some(m)));
        let o = c.with(|b| b.merge_heads(o));
        c.out("o", o);
        worst.add(c.fused("attention").run(dev, elem, runs));
    }

    // Causal from iotas (GPT-2), alone and combined with padding; q ×100 on one.
    for (s, d, padded, mag) in [
        (1, 32, false, 1.0f32),
        (50, 64, false, 100.0),
        (129, 32, true, 1.0),
        (50, 32, true, 1.0),
    ] {
        let mut c = Case::new(format!(
            "attention causal s={s} d={d} padded={padded} q x{mag}"
        ));
        let q = c.input("q", heads(h, s.into(), d), mag, 0.0);
        let k = c.input("k", heads(h, s.into(), d), 1.0, 0.0);
        let v = c.input("v", heads(h, s.into(), d), 2.0, 0.0);
        let cond = causal_cond(&mut c, 0.into(), s.into());
        let keep = if padded {
            hf_mask(&mut c, s.into())
        } else {
            c.with(|b| b.scalar(0.0))
        };
        let m = c.with(|b| {
            let fill = b.scalar(MIN)?;
            b.select(cond, keep, fill)
        });
        let o = c.with(|b| b.attention(q, k, v, Some(m)));
        c.out("o", o);
        worst.add(c.fused("attention causal").run(dev, elem, runs));
    }

    // Sliding windows: no optimizer rule makes one (models state them), so the fused op is
    // built directly. A zero window hides every key: every row fully masked.
    for (sq, sk, d, causal, window) in [
        (50, 50, 32, true, 4),
        (3, 129, 64, true, 7),
        (50, 50, 64, false, 7),
        (3, 50, 32, true, 0),
    ] {
        let mut c = Case::new(format!(
            "attention window={window} causal={causal} sq={sq} sk={sk} d={d}"
        ));
        let q = c.input("q", heads(h, sq.into(), d), 1.0, 0.0);
        let k = c.input("k", heads(h, sk.into(), d), 1.0, 0.0);
        let v = c.input("v", heads(h, sk.into(), d), 2.0, 0.0);
        let op = Op::Attention {
            scale: Scalar(1.0 / (d as f64).sqrt()),
            causal,
            window: Some(window),
        };
        let o = c.with(|b| b.op(op, &[q, k, v]));
        c.out("o", o);
        let c = c.fused(&format!("attention window={window}"));
        worst.add(c.run(dev, elem, runs));
    }

    // Fully masked rows from a [b, 1, sq, sk] mask: every fifth query row masked entirely with
    // the large negative fill, the others have every fourth key at -inf. q ×1 and ×100.
    for (sq, sk, d) in [(50, 50, 64), (3, 129, 32), (129, 3, 32), (1, 50, 64)] {
        for mag in [1.0f32, 100.0] {
            let mut c = Case::new(format!(
                "attention masked rows sq={sq} sk={sk} d={d} q x{mag}"
            ));
            let q = c.input("q", heads(h, sq.into(), d), mag, 0.0);
            let k = c.input("k", heads(h, sk.into(), d), 1.0, 0.0);
            let v = c.input("v", heads(h, sk.into(), d), 2.0, 0.0);
            let m = c.input_gen(
                "m",
                vec![sym("b"), 1.into(), sq.into(), sk.into()],
                DType::F32,
                by_row_col(move |r, j| {
                    if (r % sq) % 5 == 0 {
                        fill
                    } else if j % 4 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                }),
            );
            let o = c.with(|b| b.attention(q, k, v, Some(m)));
            c.out("o", o);
            worst.add(c.fused("attention").run(dev, elem, runs));
        }
    }

    // A KV cache: q [b, H, seq, d] against concat(past, new) with the causal iota mask. With
    // seq = 1 the kernel launches its decode variant, otherwise the main kernel.
    for d in [32, 64] {
        let mut c = Case::new(format!("attention kv cache d={d}"));
        let (seq, past) = (sym("seq"), sym("past"));
        let q = c.input("q", heads(h, seq.clone(), d), 1.0, 0.0);
        let pk = c.input("past_k", heads(h, past.clone(), d), 1.0, 0.0);
        let pv = c.input("past_v", heads(h, past.clone(), d), 2.0, 0.0);
        let nk = c.input("k", heads(h, seq.clone(), d), 1.0, 0.0);
        let nv = c.input("v", heads(h, seq.clone(), d), 2.0, 0.0);
        let k = c.with(|b| b.concat(&[pk, nk], 2));
        let v = c.with(|b| b.concat(&[pv, nv], 2));
        let cond = causal_cond(&mut c, past, seq);
        let m = c.with(|b| {
            let zero = b.scalar(0.0)?;
            let fill = b.scalar(MIN)?;
            b.select(cond, zero, fill)
        });
        let o = c.with(|b| b.attention(q, k, v, Some(m)));
        c.out("o", o);
        c.out("present_k", k);
        let c = c.fused("attention causal").decode_iff("seq");
        worst.add(c.run(
            dev,
            elem,
            &[
                &[("b", 2), ("past", 49), ("seq", 1)],
                &[("b", 1), ("past", 0), ("seq", 1)],
                &[("b", 2), ("past", 7), ("seq", 3)],
                &[("b", 1), ("past", 0), ("seq", 50)],
                &[("b", 2), ("past", 128), ("seq", 1)],
            ],
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Gather and concat.

fn gather_concat<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("gather/concat", &**dev, elem);
    let (vocab, width) = (50, 33);
    let mut c = Case::new("embeddings + concat");
    let table = c.weight("wte", &[vocab, width], 1.0, 0.0);
    let pos_table = c.weight("wpe", &[256, width], 1.0, 0.0);
    // Ids cover both ends of the table.
    let ids = c.input_gen(
        "ids",
        vec![sym("b"), sym("s")],
        DType::I64,
        Box::new(move |sh, r| {
            let n: usize = sh.iter().product();
            let v = (0..n).map(|i| match i {
                0 => 0,
                1 => vocab as i64 - 1,
                _ => (r.next() % vocab as u64) as i64,
            });
            Tensor::i64(sh.to_vec(), v.collect())
        }),
    );
    let e = c.with(|b| {
        let tok = b.gather(table, ids)?;
        let pos = b.iota(0.into(), sym("s"))?;
        let pos = b.gather(pos_table, pos)?;
        b.add(tok, pos)
    });
    c.out("emb", e);
    // Computed ids: min(ids + 1, vocab - 1).
    let y = c.with(|b| {
        let one = b.scalar_i64(1)?;
        let top = b.scalar_i64(vocab as i64 - 1)?;
        let i = b.add(ids, one)?;
        let i = b.binary(BinaryOp::Min, i, top)?;
        b.gather(table, i)
    });
    c.out("shifted", y);
    // Concat on the last axis with another input, and on the sequence axis after a past.
    let z = c.input("z", vec![sym("b"), sym("s"), 7.into()], 1.0, 0.0);
    let y = c.with(|b| b.concat(&[e, z], 2));
    c.out("cat_last", y);
    let past = c.input("past", vec![sym("b"), sym("p"), width.into()], 1.0, 0.0);
    let y = c.with(|b| b.concat(&[past, e], 1));
    c.out("cat_seq", y);
    // A strided view in a concat: z transposed.
    let y = c.with(|b| {
        let zt = b.permute(z, &[0, 2, 1])?;
        let zt2 = b.mul_scalar(zt, 2.0)?;
        b.concat(&[zt, zt2], 1)
    });
    c.out("cat_view", y);
    let c = c.kernel("gather").kernel("concat");
    worst.add(c.run(
        dev,
        elem,
        &[
            &[("b", 1), ("s", 1), ("p", 0)],
            &[("b", 2), ("s", 50), ("p", 3)],
            &[("b", 1), ("s", 129), ("p", 127)],
        ],
    ));
}

// ---------------------------------------------------------------------------------------------
// Launch order across threads.

/// A chain of 36 kernels (each reads the one before) run 500 times while another thread reads
/// a buffer of its own in a loop: every run must match the CPU. The device is shared by the
/// process (as by every test here, run in parallel), so a read on one thread must not submit
/// launches another thread recorded after work of that thread that depends on them.
fn launch_order_across_threads<D: Device + 'static>(dev: &Arc<D>, elem: Elem) {
    let mut worst = Worst::new("launch order across threads", &**dev, elem);
    let mut b = Builder::new();
    let x = b.input("x", vec![sym("n"), 64.into()], DType::F32).unwrap();
    let mut y = x;
    for _ in 0..12 {
        let m = b.reduce(ReduceOp::Max, y, &[1], true).unwrap();
        let d = b.sub(y, m).unwrap();
        y = b.unary(UnaryOp::Exp, d).unwrap();
    }
    b.output("y", y);
    let g = b.finish();
    let w = Weights::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let buf = dev.alloc(4, "probe").unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                dev.read(&buf, 4).unwrap();
            }
        })
    };
    let mut p = Program::new(dev.clone(), &g, &w, elem).unwrap();
    let mut wrong = 0;
    for it in 0..500 {
        let v = (0..4 * 64)
            .map(|i| ((i * 7 + it) % 13) as f32 / 3.0)
            .collect();
        let inputs: TensorMap = [("x".to_string(), Tensor::f32(vec![4, 64], v))].into();
        let want = CpuBackend::reference().run(&g, &w, &inputs).unwrap();
        let got = p.run(&inputs, &[]).unwrap();
        let (a, e) = (got["y"].as_f32().unwrap(), want["y"].as_f32().unwrap());
        let d = a
            .iter()
            .zip(e)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .map(|d| if d.is_nan() { f32::INFINITY } else { d })
            .fold(0f32, f32::max);
        wrong += usize::from(d > tol(elem));
        worst.add(d);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(wrong, 0, "{wrong} of 500 runs differ from the CPU");
}

// ---------------------------------------------------------------------------------------------
// One test per (backend, case, storage).

macro_rules! per_backend {
    ($($(#[$attr:meta])* $test:ident => $case:ident($elem:ident)),* $(,)?) => {
        mod wgpu {
            use super::*;
            $(
                $(#[$attr])*
                #[test]
                fn $test() {
                    if let Some(d) = wgpu_dev() {
                        if supports(&*d, Elem::$elem, stringify!($test)) {
                            super::$case(&d, Elem::$elem);
                        }
                    }
                }
            )*
        }
        mod cuda {
            use super::*;
            $(
                $(#[$attr])*
                #[test]
                fn $test() {
                    if let Some(d) = cuda_dev() {
                        if supports(&*d, Elem::$elem, stringify!($test)) {
                            super::$case(&d, Elem::$elem);
                        }
                    }
                }
            )*
        }
    };
}

per_backend! {
    elementwise => elementwise(F32),
    reductions => reductions(F32),
    softmax => softmax(F32),
    softmax_graph_mask => softmax_graph_mask(F32),
    layer_rms_norm => layer_rms_norm(F32),
    channel_norms => channel_norms(F32),
    instance_norm_rank3 => instance_norm_rank3(F32),
    matmul => matmul(F32),
    bucket_switch_twin_kernels => bucket_switch_twin_kernels(F32),
    attention => attention(F32),
    llama_ops => llama_ops(F32),
    gather_concat => gather_concat(F32),
    launch_order_across_threads => launch_order_across_threads(F32),
    softmax_f16 => softmax(F16),
    softmax_graph_mask_f16 => softmax_graph_mask(F16),
    layer_rms_norm_f16 => layer_rms_norm(F16),
    matmul_f16 => matmul(F16),
    attention_f16 => attention(F16),
    llama_ops_f16 => llama_ops(F16),
}

/// Points this process's tuning cache at a temporary folder: tests never touch the user's.
fn isolate_tuning_cache() {
    transfuse_runtime::tune::set_cache_dir(Some(
        std::env::temp_dir().join(format!("transfuse-test-cache-{}", std::process::id())),
    ));
}

/// More launches in one submission than the wgpu uniform arena holds (1024), each with its own
/// uniform (the length `n`), on two buffer sets bound once and launched alternately
/// (`a → b`, `b → a`: `dst[i] = src[i] + 1` for `i < n`): the buffers end as the host's
/// replay of the same launches.
#[test]
fn wgpu_many_launches_keep_their_own_uniforms() {
    let Some(dev) = wgpu_dev() else {
        return;
    };
    let mut b = Builder::new();
    let x = b.input("x", vec![sym("n")], DType::F32).unwrap();
    let one = b.scalar(1.0).unwrap();
    let y = b.add(x, one).unwrap();
    b.output("y", y);
    let g = b.finish();
    let info = dev.info();
    let opts = transfuse_codegen::lower::LowerOptions {
        elem: Elem::F32,
        limits: info.limits,
        target: info.target,
    };
    let plan = transfuse_codegen::lower::lower(&g, &opts).unwrap();
    let (ki, k) = plan
        .kernels
        .iter()
        .enumerate()
        .find(|(_, k)| k.phase == transfuse_codegen::lower::Phase::Forward)
        .expect("one forward kernel");
    let m = dev.compile(&k.gen.kernel).unwrap();
    const LEN: usize = 64;
    let bufs = [
        dev.alloc(LEN as u64 * 4, "a").unwrap(),
        dev.alloc(LEN as u64 * 4, "b").unwrap(),
    ];
    let (xb, yb) = (&plan.inputs[0].buffer, &plan.outputs[0].buffer);
    let order = |src: usize| -> Vec<&_> {
        k.bindings
            .iter()
            .map(|n| {
                assert!(n == xb || n == yb, "binding {n}");
                &bufs[if n == xb { src } else { 1 - src }]
            })
            .collect()
    };
    let bound = [
        dev.bind(&m, &order(0)).unwrap(),
        dev.bind(&m, &order(1)).unwrap(),
    ];
    assert!(dev.bound_to(&bound[0], &m, &order(0)));
    assert!(!dev.bound_to(&bound[0], &m, &order(1)));
    let mut host = [vec![0f32; LEN], vec![0f32; LEN]];
    for l in 0..1500 {
        let n = l % LEN + 1;
        let src = l % 2;
        let dims = transfuse_ir::Bindings::from([("n".to_string(), n)]);
        let (uniforms, grid) = plan.launch_args_for(ki, false, &dims).unwrap();
        assert!(!uniforms.is_empty(), "`n` is a uniform");
        dev.launch_bound(&m, &bound[src], &uniforms, grid).unwrap();
        let [a, b] = &mut host;
        let (from, to) = if src == 0 { (a, b) } else { (b, a) };
        for (t, f) in to.iter_mut().zip(from.iter()).take(n) {
            *t = f + 1.0;
        }
    }
    for (buf, want) in bufs.iter().zip(&host) {
        let got: Vec<f32> = dev
            .read(buf, LEN as u64 * 4)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&got, want);
    }
}
