//! The autotuner and its cache ([`cache`]).
//!
//! [`tune_graph`] tunes every template kernel (tuning site, see
//! [`transfuse_codegen::lower::tuning`]) of a graph's plan at the given dims on a device:
//!
//! 1. the plan is lowered with the shape-aware defaults of the dims' bucket; sites whose cache
//!    key is already in the cache are hits and cost nothing (a second `tune` measures nothing);
//!    sites with the same key (the same matmul in every layer) are tuned once;
//! 2. each remaining site's kernel is run alone on deterministic random inputs of its bound
//!    sizes, with the default tunables, for the reference output — a split-KV decode partial
//!    kernel together with its combine (when its split count launches one), comparing the
//!    attention's output rather than the partial results, since the split count `splits` is
//!    one of its tunables (a candidate's split uniforms and grid are its own);
//! 3. candidates: the whole space when it has at most [`TuneOptions::exhaustive`] points, else a
//!    seeded random sample refined by local search (one tunable changed to a neighbouring
//!    value of the best so far), within the per-kernel cap and the model's budget. Each is
//!    generated (re-lowering the plan with that one site overridden), compiled (failures and
//!    limit violations skipped and counted), run on the same inputs and compared with the
//!    default's output (beyond the family's tolerance: rejected and reported), then timed;
//! 4. timing: device timestamps where the device has them (else the host clock around a
//!    synchronised batch), each sample a batch of launches of ~2 ms, candidate and default
//!    interleaved, three rounds of three samples each (one each for kernels over 20 ms), the
//!    minimum of the rounds' medians;
//!    the winner is re-measured the same way against the default and kept only when at least
//!    5 % faster (else the default is stored, so the site is not tuned again); its spread
//!    ((max − min)/min of its medians) is stored with it.
//!
//! Programs ([`crate::Program`]) read the cache on every call's shape bucket unless
//! [`set_cache_enabled`]`(false)` (`--no-cache`); they never tune.

pub mod cache;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use transfuse_codegen::kir::{elem_bytes, Access, Elem};
use transfuse_codegen::lower::tuning::{point_string, Chooser, Point, Site, Tuning};
use transfuse_codegen::lower::{lower_tuned, LowerOptions, Plan};
use transfuse_ir::{Bindings, Graph};

use crate::device::Device;
use crate::RuntimeError;
pub use cache::{bucket_dims, cache_dir, key_of, set_cache_dir, Entry, TuningCache};

static CACHE_ON: AtomicBool = AtomicBool::new(true);

/// Whether programs read the tuning cache (`--no-cache` turns it off for the process).
pub fn set_cache_enabled(on: bool) {
    CACHE_ON.store(on, Ordering::SeqCst);
}

/// See [`set_cache_enabled`].
pub fn cache_enabled() -> bool {
    CACHE_ON.load(Ordering::SeqCst)
}

/// `TRANSFUSE_FIXED_DEFAULTS=1`: lower with the old fixed defaults (limits only), for
/// comparisons in benchmarks.
pub fn fixed_defaults() -> bool {
    std::env::var("TRANSFUSE_FIXED_DEFAULTS").is_ok_and(|v| v == "1")
}

/// The cache as a [`Chooser`] at a shape bucket: a hit replaces the default.
pub struct CacheChooser<'c> {
    /// The cache.
    pub cache: &'c TuningCache,
    /// Storage type.
    pub elem: Elem,
    /// The bucketed dims.
    pub dims: Bindings,
}

impl Chooser for CacheChooser<'_> {
    fn choose(&self, site: &Site) -> Option<Point> {
        let (key, _) = key_of(site, self.elem, &self.dims);
        self.cache.get(&key).map(Entry::point)
    }
}

/// Overrides one site (node, variant) with a point: the tuner's candidate.
struct One {
    node: transfuse_ir::NodeId,
    decode: bool,
    point: Point,
}

impl Chooser for One {
    fn choose(&self, site: &Site) -> Option<Point> {
        (site.node == self.node && site.decode == self.decode).then(|| self.point.clone())
    }
}

/// Budgets and knobs of [`tune_graph`].
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Wall time for the whole model (all dims).
    pub budget: Duration,
    /// Wall time per kernel at most.
    pub per_kernel: Duration,
    /// Spaces up to this many points are searched exhaustively.
    pub exhaustive: usize,
    /// Seed of the random sample.
    pub seed: u64,
    /// Test hook: the first candidate timed of each kernel gets a perturbed output, so the
    /// comparison must reject it.
    pub inject_mismatch: bool,
    /// Recorded in the entries (`tune --show --model`).
    pub model: String,
    /// Only sites of these families (empty: all).
    pub families: Vec<String>,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            budget: Duration::from_secs(60),
            per_kernel: Duration::from_secs(15),
            exhaustive: 24,
            seed: 0x7475_6e65,
            inject_mismatch: false,
            model: String::new(),
            families: vec![],
        }
    }
}

/// What happened at one distinct site.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteReport {
    /// Cache key.
    pub key: String,
    /// Family.
    pub family: String,
    /// How many plan kernels share the key.
    pub kernels: usize,
    /// Already in the cache (nothing measured).
    pub hit: bool,
    /// Not tuned here (not launched at these dims, or binds a split tensor): why.
    pub skipped_why: Option<String>,
    /// Space size.
    pub space: usize,
    /// Candidates timed.
    pub tried: usize,
    /// Candidates that failed to generate or compile.
    pub failed: usize,
    /// Candidates whose output differed: their tunables and the largest error.
    pub rejected: Vec<(String, f64)>,
    /// The default's tunables and seconds.
    pub default: (String, f64),
    /// The winner's tunables, seconds and spread (the default's when none was 5 % faster).
    pub winner: (String, f64, f64),
}

/// The result of [`tune_graph`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TuneReport {
    /// Per distinct site, in plan order.
    pub sites: Vec<SiteReport>,
    /// Timed batches of launches (0 when everything was a hit).
    pub measurements: usize,
    /// Sites not launched at their dims (a decode variant at a prefill shape), not tuned.
    pub not_launched: usize,
}

impl TuneReport {
    /// Sites found in the cache.
    pub fn hits(&self) -> usize {
        self.sites.iter().filter(|s| s.hit).count()
    }
}

/// Progress of [`tune_graph`] (the CLI draws bars).
pub trait Progress {
    /// Starts site `name` with `total` candidates planned.
    fn start(&self, name: &str, total: usize);
    /// After each candidate: tried so far, best seconds so far vs the default's.
    fn step(&self, tried: usize, best: f64, default: f64);
    /// The site is done.
    fn finish(&self, msg: &str);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: &str, _: usize) {}
    fn step(&self, _: usize, _: f64, _: f64) {}
    fn finish(&self, _: &str) {}
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn err(backend: &str, msg: String) -> RuntimeError {
    RuntimeError::Device {
        backend: backend.to_string(),
        msg,
    }
}

/// The buffers of one kernel at bound dims, with the written ones' initial bytes.
struct Bench<D: Device> {
    bufs: Vec<D::Buffer>,
    /// (param index, bytes, initial contents) of every written parameter.
    written: Vec<(usize, u64, Vec<u8>)>,
}

fn fill(elem: Elem, n: usize, rng: &mut Rng) -> Vec<u8> {
    match elem {
        Elem::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.unit()).to_le_bytes())
            .collect(),
        Elem::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.unit()).to_le_bytes())
            .collect(),
        Elem::I32 => vec![0; 4 * n],
        Elem::U32 | Elem::Bool => (0..n).flat_map(|_| 1u32.to_le_bytes()).collect(),
        _ => (0..n).flat_map(|_| rng.unit().to_le_bytes()).collect(),
    }
}

fn floats(elem: Elem, b: &[u8]) -> Vec<f32> {
    match elem {
        Elem::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Elem::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Elem::I32 | Elem::U32 | Elem::Bool => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// The family's tolerance: `|x − ref| ≤ tol · (1 + |ref|)`.
fn tolerance(elem: Elem) -> f32 {
    match elem {
        Elem::F16 | Elem::BF16 => 2e-2,
        _ => 1e-4,
    }
}

/// The launched kernel of plan kernel `k` (its decode variant when `decode`).
fn launched(plan: &Plan, k: usize, decode: bool) -> Option<&transfuse_codegen::kir::Kernel> {
    plan.kernels[k].launched(decode).map(|(g, _, _)| &g.kernel)
}

/// Tunes `graph`'s template kernels on `dev` at each of `dims_list` (storage `elem`) and
/// stores the winners in `cache` (see the module docs).
pub fn tune_graph<D: Device>(
    dev: &Arc<D>,
    graph: &Graph,
    elem: Elem,
    dims_list: &[Bindings],
    cache: &mut TuningCache,
    opts: &TuneOptions,
    progress: &dyn Progress,
) -> Result<TuneReport, RuntimeError> {
    let info = dev.info().clone();
    let lopts = LowerOptions {
        elem,
        limits: info.limits,
        target: info.target,
    };
    let deadline = Instant::now() + opts.budget;
    let mut report = TuneReport::default();
    for (di, dims) in dims_list.iter().enumerate() {
        let bucket = bucket_dims(dims);
        let base = Tuning::at(bucket.clone(), None);
        let plan = lower_tuned(graph, &lopts, &base)?;
        let sites = base.sites();
        // Distinct keys, in plan order.
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut todo: Vec<(Site, String, String)> = vec![];
        for s in sites {
            // A variant not launched at these dims (the GEMV at 128 rows) is another shape's.
            let launched_here = kernel_of(&plan, &s)
                .map(|k| plan.use_decode(k, dims).map(|d| d == s.decode))
                .transpose()?
                .unwrap_or(false);
            if !launched_here {
                report.not_launched += 1;
                continue;
            }
            let (key, bucket_s) = key_of(&s, elem, &bucket);
            if !opts.families.is_empty() && !opts.families.iter().any(|f| f == s.family) {
                continue;
            }
            if let Some(&i) = seen.get(&key) {
                if let Some(r) = report.sites.get_mut(i) {
                    r.kernels += 1;
                }
                continue;
            }
            seen.insert(key.clone(), report.sites.len());
            let hit = cache.get(&key).is_some();
            report.sites.push(SiteReport {
                key: key.clone(),
                family: s.family.to_string(),
                kernels: 1,
                hit,
                skipped_why: None,
                space: s.space.len(),
                tried: 0,
                failed: 0,
                rejected: vec![],
                default: (point_string(&s.default), 0.0),
                winner: (point_string(&s.default), 0.0, 0.0),
            });
            if !hit {
                todo.push((s, key, bucket_s));
            }
        }
        let n_todo = todo.len();
        for (done, (s, key, bucket_s)) in todo.into_iter().enumerate() {
            let ri = seen[&key];
            let now = Instant::now();
            if now >= deadline {
                report.sites[ri].skipped_why = Some("the model's budget is spent".into());
                continue;
            }
            // An equal share of what is left (of this dims' part of the budget).
            let left = (n_todo - done) as u32 * (dims_list.len() - di) as u32;
            let cap = opts.per_kernel.min((deadline - now) / left.max(1)).max(
                // A few seconds per kernel (within its cap) while the budget lasts.
                Duration::from_secs(2)
                    .min(opts.per_kernel)
                    .min(deadline - now),
            );
            let r = tune_site(
                dev, graph, &lopts, &bucket, dims, &plan, &s, opts, cap, progress,
            );
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    report.sites[ri].skipped_why = Some(e.to_string());
                    continue;
                }
            };
            let sr = &mut report.sites[ri];
            match r {
                SiteOutcome::Skipped(why) => sr.skipped_why = Some(why),
                SiteOutcome::Tuned {
                    tried,
                    failed,
                    rejected,
                    default_s,
                    winner,
                    measurements,
                } => {
                    report.measurements += measurements;
                    sr.tried = tried;
                    sr.failed = failed;
                    sr.rejected = rejected;
                    sr.default.1 = default_s;
                    sr.winner = (point_string(&winner.0), winner.1, winner.2);
                    let entry = Entry {
                        family: s.family.to_string(),
                        structure: s.structure.clone(),
                        dtype: cache::elem_name(elem).to_string(),
                        bucket: bucket_s,
                        tunables: winner.0.iter().cloned().collect::<BTreeMap<_, _>>(),
                        default_tunables: s.default.iter().cloned().collect(),
                        seconds: winner.1,
                        spread: winner.2,
                        default_seconds: default_s,
                        tried,
                        date: cache::today(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        models: if opts.model.is_empty() {
                            vec![]
                        } else {
                            vec![opts.model.clone()]
                        },
                    };
                    // Stored as soon as each kernel is done: an interrupted tune keeps them.
                    cache.insert(vec![(key.clone(), entry)])?;
                }
            }
        }
    }
    Ok(report)
}

enum SiteOutcome {
    Skipped(String),
    Tuned {
        tried: usize,
        failed: usize,
        rejected: Vec<(String, f64)>,
        default_s: f64,
        /// Point, seconds, spread.
        winner: (Point, f64, f64),
        measurements: usize,
    },
}

/// The plan kernel (index) computing `s`'s node.
fn kernel_of(plan: &Plan, s: &Site) -> Option<usize> {
    plan.kernels.iter().position(|k| k.nodes.contains(&s.node))
}

#[allow(clippy::too_many_arguments)]
fn tune_site<D: Device>(
    dev: &Arc<D>,
    graph: &Graph,
    lopts: &LowerOptions,
    bucket: &Bindings,
    dims: &Bindings,
    plan: &Plan,
    s: &Site,
    opts: &TuneOptions,
    cap: Duration,
    progress: &dyn Progress,
) -> Result<SiteOutcome, RuntimeError> {
    let info = dev.info();
    let backend = info.backend;
    let start = Instant::now();
    let Some(k) = kernel_of(plan, s) else {
        return Ok(SiteOutcome::Skipped("no plan kernel computes it".into()));
    };
    if plan.kernels[k].phase != transfuse_codegen::lower::Phase::Forward {
        return Ok(SiteOutcome::Skipped("a prepare kernel (runs once)".into()));
    }
    // KV caches: bound to the rows these dims need (no spare capacity).
    let dims = &plan.cache_dims(dims);
    let use_decode = plan.use_decode(k, dims)?;
    if use_decode != s.decode {
        return Ok(SiteOutcome::Skipped(format!(
            "not launched at {}",
            dims_string(dims)
        )));
    }
    let Some(kernel) = launched(plan, k, s.decode) else {
        return Ok(SiteOutcome::Skipped("no such variant".into()));
    };
    let (_, bindings, _) = plan.kernels[k].launched(s.decode).expect("checked");
    // A split-KV decode's combine (the next kernel, computing the same node, gated on the
    // split count, reading the site kernel's partial results): run after the site's kernel
    // when launched, so that what is compared is the attention's output, whatever the split
    // count. (A flash kernel whose decode variant is the partial kernel has none.)
    let combine_k = (k + 1 < plan.kernels.len()
        && plan.kernels[k + 1].only_split.is_some()
        && plan.kernels[k + 1].nodes.contains(&s.node)
        && plan.kernels[k + 1]
            .bindings
            .iter()
            .all(|b| bindings.contains(b)))
    .then_some(k + 1);
    // Buffers at the bound dims.
    let mut rng = Rng(opts.seed ^ cache::fnv64(&s.structure));
    let (_, grid) = plan.launch_args_for(k, s.decode, dims)?;
    for (a, &g) in grid.iter().enumerate() {
        if g > info.max_grid[a] {
            return Ok(SiteOutcome::Skipped(format!(
                "its grid ({g} workgroups on axis {a}) needs clamping"
            )));
        }
    }
    let mut bufs = vec![];
    let mut written = vec![];
    for (i, (param, name)) in kernel.buffers.iter().zip(bindings).enumerate() {
        let b = plan
            .buffer(name)
            .ok_or_else(|| err(backend, format!("no buffer `{name}`")))?;
        let n = b.len().eval_usize(dims)?;
        let bytes = (n as u64) * u64::from(elem_bytes(b.elem));
        if bytes > info.max_binding_bytes {
            return Ok(SiteOutcome::Skipped(format!(
                "binds `{name}` ({bytes} bytes), over the largest binding"
            )));
        }
        let buf = dev.alloc(bytes, name)?;
        let data = fill(b.elem, n, &mut rng);
        dev.write(&buf, &data)?;
        if param.access == Access::ReadWrite {
            written.push((i, bytes, data));
        }
        bufs.push(buf);
    }
    // The combine's parameters among the site kernel's buffers; the buffers it reads (the
    // partial results) are intermediate, not compared.
    let combine = match combine_k {
        Some(ck) => {
            let ckern = &plan.kernels[ck].gen.kernel;
            let mut params = vec![];
            for (p, name) in ckern.buffers.iter().zip(&plan.kernels[ck].bindings) {
                let i = bindings.iter().position(|b| b == name).expect("checked");
                params.push((i, p.access));
            }
            Some((dev.compile(ckern)?, params))
        }
        None => None,
    };
    let intermediate: Vec<usize> = combine
        .as_ref()
        .map(|(_, ps)| {
            ps.iter()
                .filter(|(_, a)| *a == Access::Read)
                .map(|(i, _)| *i)
                .collect()
        })
        .unwrap_or_default();
    let compared: Vec<bool> = written
        .iter()
        .map(|(i, _, _)| !intermediate.contains(i))
        .collect();
    let combine_ctx = combine
        .as_ref()
        .map(|(m, ps)| (m, ps.iter().map(|(i, _)| *i).collect::<Vec<_>>()));
    // How a lowering launches the site: its kernel's uniforms and grid, and the combine's
    // when launched at these dims.
    let launch_of = |p: &Plan| -> Result<Launch, RuntimeError> {
        let (u, g) = p.launch_args_for(k, s.decode, dims)?;
        let combine = match combine_k {
            Some(ck) if p.launched_at(ck, dims)? => Some(p.launch_args(ck, dims)?),
            _ => None,
        };
        Ok(Launch {
            uniforms: u,
            grid: g,
            combine,
        })
    };
    let mut bench: Bench<D> = Bench { bufs, written };
    let out_elem = |i: usize| kernel.buffers[i].elem;
    // The default's output.
    let default_module = dev.compile(kernel)?;
    let default_launch = launch_of(plan)?;
    let run_once =
        |m: &D::Module, l: &Launch, b: &mut Bench<D>| -> Result<Vec<Vec<f32>>, RuntimeError> {
            for (i, _, data) in &b.written {
                dev.write(&b.bufs[*i], data)?;
            }
            launch_all(dev.as_ref(), &b.bufs, m, l, combine_ctx.as_ref())?;
            let mut outs = vec![];
            for ((i, bytes, _), &cmp) in b.written.iter().zip(&compared) {
                if cmp {
                    outs.push(floats(out_elem(*i), &dev.read(&b.bufs[*i], *bytes)?));
                }
            }
            Ok(outs)
        };
    let reference = run_once(&default_module, &default_launch, &mut bench)?;
    // Launches per timed sample: ~2 ms of work.
    let t0 = Instant::now();
    launch_all(
        dev.as_ref(),
        &bench.bufs,
        &default_module,
        &default_launch,
        combine_ctx.as_ref(),
    )?;
    dev.sync()?;
    let one = t0.elapsed().as_secs_f64().max(1e-6);
    let reps = ((2e-3 / one).ceil() as usize).clamp(1, 64);
    let mut measurements = 0usize;
    // Slow kernels (over 20 ms a launch) take one sample per round: the rounds' spread still
    // shows the noise, and a candidate costs six launches instead of eighteen.
    let timer = Timer {
        reps,
        per_round: if one > 0.02 { 1 } else { 3 },
        combine: combine_ctx.as_ref(),
    };
    // Candidates.
    let space: Vec<Point> = s
        .space
        .iter()
        .filter(|p| !same_point(p, &s.default))
        .cloned()
        .collect();
    let mut queue: Vec<Point> = if space.len() <= opts.exhaustive {
        space.clone()
    } else {
        let mut idx: Vec<usize> = (0..space.len()).collect();
        for i in (1..idx.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
        idx.into_iter()
            .take(opts.exhaustive / 2)
            .map(|i| space[i].clone())
            .collect()
    };
    // A split-KV decode's split counts are each tried (first) with the other tunables at
    // their defaults: the count matters most at batch 1, and a sample could miss it.
    if space.len() > opts.exhaustive {
        for p in &space {
            let others_default = p
                .iter()
                .all(|(n, v)| n == "splits" || s.default.iter().any(|(dn, dv)| dn == n && dv == v));
            if others_default && !queue.iter().any(|q| same_point(q, p)) {
                queue.push(p.clone());
            }
        }
    }
    let local = space.len() > opts.exhaustive;
    progress.start(
        &format!("{} {}", s.family, dims_string(dims)),
        queue.len().min(space.len()),
    );
    let mut tried_set: HashSet<String> = HashSet::new();
    let (mut tried, mut failed) = (0usize, 0usize);
    let mut rejected = vec![];
    let mut best: Option<(Point, f64, D::Module, Launch)> = None;
    let mut default_best = f64::INFINITY;
    let mut injected = false;
    while let Some(p) = queue.pop().or_else(|| {
        // Local search: neighbours of the best so far, one tunable at a time.
        if !local {
            return None;
        }
        let (bp, _, _, _) = best.as_ref()?;
        neighbours(bp, &space)
            .into_iter()
            .find(|n| !tried_set.contains(&point_string(n)))
    }) {
        if start.elapsed() >= cap {
            break;
        }
        if !tried_set.insert(point_string(&p)) {
            continue;
        }
        // Generate: the plan re-lowered with this one site overridden.
        let one = One {
            node: s.node,
            decode: s.decode,
            point: p.clone(),
        };
        let t = Tuning::at(bucket.clone(), Some(&one));
        let cand = match lower_tuned(graph, lopts, &t) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("{} {}: not generated: {e}", s.family, point_string(&p));
                failed += 1;
                continue;
            }
        };
        let applied = t
            .sites()
            .iter()
            .any(|x| x.node == s.node && x.decode == s.decode && x.from_chooser);
        // The same buffers; the same uniforms, except that a split-KV decode's split count
        // changes its split uniforms (and the combine's), which the candidate's launch uses.
        let args_of = |a: &Plan| {
            a.kernels[k]
                .launched(s.decode)
                .map(|x| (x.1.to_vec(), x.2.to_vec()))
        };
        let (ca, pa) = (args_of(&cand), args_of(plan));
        let same_shape = cand.kernels.len() == plan.kernels.len()
            && ca.as_ref().map(|x| &x.0) == pa.as_ref().map(|x| &x.0)
            && (combine_k.is_some() || ca.as_ref().map(|x| &x.1) == pa.as_ref().map(|x| &x.1));
        if !applied || !same_shape {
            tracing::debug!("{} {}: refused by the template", s.family, point_string(&p));
            failed += 1;
            continue;
        }
        let ck = launched(&cand, k, s.decode).expect("same shape");
        let cl = launch_of(&cand)?;
        let over = |g: &[u32; 3]| g.iter().zip(info.max_grid).any(|(&g, m)| g > m);
        if over(&cl.grid) || cl.combine.as_ref().is_some_and(|(_, g)| over(g)) {
            failed += 1;
            continue;
        }
        let module = match dev.compile(ck) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("{} {}: does not compile: {e}", s.family, point_string(&p));
                failed += 1;
                continue;
            }
        };
        let mut out = match run_once(&module, &cl, &mut bench) {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("{} {}: failed to run: {e}", s.family, point_string(&p));
                failed += 1;
                continue;
            }
        };
        if opts.inject_mismatch && !injected {
            injected = true;
            if let Some(x) = out.first_mut().and_then(|o| o.first_mut()) {
                *x += 1.0;
            }
        }
        if let Some(e) = max_err(&out, &reference, tolerance(lopts.elem)) {
            tracing::warn!(
                "{} {}: output differs from the default's (error {e:.3e}): rejected",
                s.family,
                point_string(&p)
            );
            rejected.push((point_string(&p), e));
            continue;
        }
        let ((dt, _), (ct, _)) = timer.compare(
            dev.as_ref(),
            &bench.bufs,
            (&default_module, &default_launch),
            (&module, &cl),
            3,
            &mut measurements,
        )?;
        tried += 1;
        default_best = default_best.min(dt);
        tracing::debug!(
            "{} {}: {:.3} ms (default {:.3} ms)",
            s.family,
            point_string(&p),
            ct * 1e3,
            dt * 1e3
        );
        if best.as_ref().is_none_or(|b| ct < b.1) {
            best = Some((p.clone(), ct, module, cl));
        }
        progress.step(
            tried,
            best.as_ref().map_or(default_best, |b| b.1),
            default_best,
        );
    }
    // Re-measure the winner against the default.
    let (winner, default_s) = match best {
        Some((p, _, m, l)) => {
            let ((dt, _), (ct, cspread)) = timer.compare(
                dev.as_ref(),
                &bench.bufs,
                (&default_module, &default_launch),
                (&m, &l),
                if timer.per_round == 1 { 3 } else { 5 },
                &mut measurements,
            )?;
            if ct <= 0.95 * dt {
                ((p, ct, cspread), dt)
            } else {
                ((s.default.clone(), dt, 0.0), dt)
            }
        }
        None => {
            let ((dt, dspread), _) = timer.compare(
                dev.as_ref(),
                &bench.bufs,
                (&default_module, &default_launch),
                (&default_module, &default_launch),
                2,
                &mut measurements,
            )?;
            ((s.default.clone(), dt, dspread), dt)
        }
    };
    progress.finish(&format!(
        "{} → {} ({:.2}×)",
        point_string(&s.default),
        point_string(&winner.0),
        default_s / winner.1.max(1e-12)
    ));
    Ok(SiteOutcome::Tuned {
        tried,
        failed,
        rejected,
        default_s,
        winner,
        measurements,
    })
}

/// How one lowering launches a site: its kernel's uniforms and grid, and (split-KV decode)
/// the combine's when it is launched.
struct Launch {
    uniforms: Vec<u32>,
    grid: [u32; 3],
    combine: Option<(Vec<u32>, [u32; 3])>,
}

/// The combine kernel's module and its parameters (indices into the site kernel's buffers).
type CombineCtx<'a, M> = (&'a M, Vec<usize>);

/// Launches the site kernel `m` as `l` says, then the combine if `l` launches it.
fn launch_all<D: Device>(
    dev: &D,
    bufs: &[D::Buffer],
    m: &D::Module,
    l: &Launch,
    combine: Option<&CombineCtx<'_, D::Module>>,
) -> Result<(), RuntimeError> {
    let refs: Vec<&D::Buffer> = bufs.iter().collect();
    dev.launch(m, &refs, &l.uniforms, l.grid)?;
    if let (Some((u, g)), Some((cm, params))) = (&l.combine, combine) {
        let crefs: Vec<&D::Buffer> = params.iter().map(|&i| &bufs[i]).collect();
        dev.launch(cm, &crefs, u, *g)?;
    }
    Ok(())
}

/// Seconds (min of the rounds' medians) and spread of one kernel.
type MinSpread = (f64, f64);

/// Timed samples of one site's launches (see the module docs).
struct Timer<'a, M> {
    reps: usize,
    per_round: usize,
    combine: Option<&'a CombineCtx<'a, M>>,
}

impl<M> Timer<'_, M> {
    /// Seconds per launch of `m` (with the combine, when `l` launches it) over one batch of
    /// `reps` launches.
    fn sample<D: Device<Module = M>>(
        &self,
        dev: &D,
        bufs: &[D::Buffer],
        m: &M,
        l: &Launch,
    ) -> Result<f64, RuntimeError> {
        let timed = dev.timer_start();
        let t = Instant::now();
        for _ in 0..self.reps {
            launch_all(dev, bufs, m, l, self.combine)?;
        }
        let device = if timed { dev.timer_stop()? } else { None };
        if device.is_none() {
            dev.sync()?;
        }
        Ok(device.unwrap_or_else(|| t.elapsed().as_secs_f64()) / self.reps as f64)
    }

    /// `rounds` rounds of three samples of `a` and `b` interleaved: (min of medians, spread)
    /// of each.
    fn compare<D: Device<Module = M>>(
        &self,
        dev: &D,
        bufs: &[D::Buffer],
        a: (&M, &Launch),
        b: (&M, &Launch),
        rounds: usize,
        count: &mut usize,
    ) -> Result<(MinSpread, MinSpread), RuntimeError> {
        let (mut ma, mut mb) = (vec![], vec![]);
        for _ in 0..rounds {
            let (mut sa, mut sb) = (vec![], vec![]);
            for _ in 0..self.per_round {
                sa.push(self.sample(dev, bufs, a.0, a.1)?);
                sb.push(self.sample(dev, bufs, b.0, b.1)?);
                *count += 2;
            }
            ma.push(median(&mut sa));
            mb.push(median(&mut sb));
        }
        Ok((min_spread(&ma), min_spread(&mb)))
    }
}

fn same_point(a: &[(String, u32)], b: &[(String, u32)]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// Points of `space` that differ from `p` in one tunable, by one step of that tunable's
/// values.
fn neighbours(p: &[(String, u32)], space: &[Point]) -> Vec<Point> {
    let mut out = vec![];
    for (i, (name, v)) in p.iter().enumerate() {
        let mut vals: Vec<u32> = space
            .iter()
            .filter_map(|q| q.iter().find(|(n, _)| n == name).map(|(_, x)| *x))
            .collect();
        vals.sort_unstable();
        vals.dedup();
        let pos = vals.iter().position(|x| x == v);
        let adj: Vec<u32> = match pos {
            Some(j) => [j.checked_sub(1), Some(j + 1)]
                .into_iter()
                .flatten()
                .filter_map(|j| vals.get(j).copied())
                .collect(),
            None => vec![],
        };
        for x in adj {
            let mut q = p.to_vec();
            q[i].1 = x;
            if space.iter().any(|s| same_point(s, &q)) {
                out.push(q);
            }
        }
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    (min, if min > 0.0 { (max - min) / min } else { 0.0 })
}

/// The largest error beyond tolerance, if any (NaN where the reference is finite counts).
fn max_err(out: &[Vec<f32>], reference: &[Vec<f32>], tol: f32) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for (o, r) in out.iter().zip(reference) {
        for (&x, &y) in o.iter().zip(r) {
            let bad = if y.is_finite() {
                !x.is_finite() || (x - y).abs() > tol * (1.0 + y.abs())
            } else {
                x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan())
            };
            if bad {
                let e = f64::from((x - y).abs());
                let e = if e.is_finite() { e } else { f64::INFINITY };
                worst = Some(worst.map_or(e, |w| w.max(e)));
            }
        }
    }
    worst
}

/// `batch=1,seq=128`.
pub fn dims_string(d: &Bindings) -> String {
    d.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The tuning cache of backend `backend`'s device (`wgpu` or `cuda`): opens the device.
pub fn open_cache(backend: &str) -> Result<TuningCache, RuntimeError> {
    match backend {
        "wgpu" => TuningCache::open(crate::webgpu::shared()?.info()),
        "cuda" => TuningCache::open(crate::cuda::shared()?.info()),
        other => Err(err(
            other,
            format!("`{other}` has no tuning cache (only wgpu and cuda kernels are tuned)"),
        )),
    }
}

/// [`tune_graph`] on backend `backend`'s shared device (`wgpu` or `cuda`), with its cache.
pub fn tune_on(
    backend: &str,
    graph: &Graph,
    elem: Elem,
    dims_list: &[Bindings],
    opts: &TuneOptions,
    progress: &dyn Progress,
) -> Result<(TuneReport, TuningCache), RuntimeError> {
    fn go<D: Device>(
        dev: Arc<D>,
        graph: &Graph,
        elem: Elem,
        dims_list: &[Bindings],
        opts: &TuneOptions,
        progress: &dyn Progress,
    ) -> Result<(TuneReport, TuningCache), RuntimeError> {
        let mut cache = TuningCache::open(dev.info())?;
        if !dev.info().elems.contains(&elem) {
            return Err(err(
                dev.info().backend,
                format!(
                    "{elem:?} storage is not supported by {}",
                    dev.info().description
                ),
            ));
        }
        let r = tune_graph(&dev, graph, elem, dims_list, &mut cache, opts, progress)?;
        Ok((r, cache))
    }
    match backend {
        "wgpu" => go(
            crate::webgpu::shared()?,
            graph,
            elem,
            dims_list,
            opts,
            progress,
        ),
        "cuda" => go(
            crate::cuda::shared()?,
            graph,
            elem,
            dims_list,
            opts,
            progress,
        ),
        other => Err(err(
            other,
            format!("`{other}` cannot be tuned (only wgpu and cuda kernels have tunables)"),
        )),
    }
}
