//! `transfuse tune`: fills the device's tuning cache for a model (`--dims` shapes, `--dtype`,
//! `--budget`), lists it (`--show [--model DIR]`) or empties it (`--clear`). The tuner itself
//! is `transfuse::runtime::tune`; this file is its arguments, progress bars and tables.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use transfuse::ir::Bindings;
use transfuse::models::Model;
use transfuse::runtime::tune::{self, Progress, TuneOptions, TuneReport, TuningCache};
use transfuse::{Error, Session};

/// `transfuse tune`'s arguments.
#[derive(Args)]
pub struct TuneArgs {
    /// Hugging Face folder of the model to tune (with `--show`: list only its entries).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Backend: wgpu, cuda, or auto (CUDA when a device exists, else wgpu).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Dims to tune at, e.g. `batch=1,seq=128` (repeatable: prefill and decode shapes). Default:
    /// batch=1,seq=128,past=0, and for decoders also seq=1,past=128.
    #[arg(long)]
    pub dims: Vec<String>,
    /// Storage type: f32 (default), f16 or bf16 (cuda only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seconds for the whole model (every `--dims`).
    #[arg(long, default_value = "60", allow_hyphen_values = true)]
    pub budget: String,
    /// Seconds per kernel at most.
    #[arg(long, default_value = "15", allow_hyphen_values = true)]
    pub kernel_budget: String,
    /// List the cache's entries with their speedups instead of tuning.
    #[arg(long, conflicts_with = "clear")]
    pub show: bool,
    /// Empty the cache.
    #[arg(long)]
    pub clear: bool,
    /// Print details of every candidate (tracing at debug level).
    #[arg(long, short)]
    pub verbose: bool,
}

fn seconds(flag: &str, v: &str) -> Result<Duration, Error> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x < 1e7 => Ok(Duration::from_secs_f64(x)),
        _ => Err(Error::Usage(format!(
            "--{flag}: `{v}` is not a positive number of seconds"
        ))),
    }
}

/// The backend to tune on: `auto` is CUDA when a device exists, else wgpu.
fn backend_name(b: &str) -> Result<String, Error> {
    match b {
        "wgpu" | "cuda" => Ok(b.to_string()),
        "auto" => {
            if transfuse::runtime::cuda::shared().is_ok() {
                Ok("cuda".into())
            } else {
                Ok("wgpu".into())
            }
        }
        "cpu" => Err(Error::Usage(
            "--backend cpu: the CPU backend has no kernel tunables (tune wgpu or cuda)".into(),
        )),
        other => Err(Error::Usage(format!(
            "unknown backend `{other}` (expected wgpu, cuda or auto)"
        ))),
    }
}

fn elem_of(dtype: &str) -> Result<transfuse::codegen::kir::Elem, Error> {
    use transfuse::codegen::kir::Elem;
    match dtype {
        "f32" => Ok(Elem::F32),
        "f16" => Ok(Elem::F16),
        "bf16" => Ok(Elem::BF16),
        other => Err(Error::Usage(format!(
            "--dtype: `{other}` (expected f32, f16 or bf16)"
        ))),
    }
}

/// One `--dims` value (`batch=1,seq=128`) over the defaults (seq 128, past 0, others 1).
fn parse_one(syms: &[String], text: &str) -> Result<Bindings, Error> {
    crate::dims_over_defaults(syms, text.split(',').filter(|d| !d.trim().is_empty()))
}

/// Progress bars: one per kernel, tried/total and the best time so far.
struct Bars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, name: &str, total: usize) {
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template("{prefix:>28} [{bar:24}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(name.to_string());
        *self.bar.borrow_mut() = Some(b);
    }

    fn step(&self, tried: usize, best: f64, default: f64) {
        if let Some(b) = self.bar.borrow().as_ref() {
            if tried as u64 > b.length().unwrap_or(0) {
                b.set_length(tried as u64);
            }
            b.set_position(tried as u64);
            b.set_message(format!(
                "best {:.3} ms (default {:.3} ms)",
                best * 1e3,
                default * 1e3
            ));
        }
    }

    fn finish(&self, msg: &str) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
            let _ = msg;
        }
    }
}

fn print_report(r: &TuneReport, cache: &TuningCache) {
    for s in &r.sites {
        let bucket = s.key.rsplit('|').next().unwrap_or("");
        let head = format!("  {:<16} ×{:<2} {:<26}", s.family, s.kernels, bucket);
        if s.hit {
            eprintln!("{head} cache hit");
        } else if let Some(why) = &s.skipped_why {
            eprintln!("{head} not tuned: {why}");
        } else {
            let speed = if s.winner.1 > 0.0 {
                s.default.1 / s.winner.1
            } else {
                1.0
            };
            eprintln!(
                "{head} {:.3} ms → {:.3} ms ({speed:.2}×, spread {:.0} %): {} → {}; tried {}, failed {}, rejected {}",
                s.default.1 * 1e3,
                s.winner.1 * 1e3,
                s.winner.2 * 100.0,
                s.default.0,
                s.winner.0,
                s.tried,
                s.failed,
                s.rejected.len()
            );
            for (p, e) in &s.rejected {
                eprintln!(
                    "      rejected {p} [{}]: output differs from the default's by {e:.3e}",
                    s.key
                );
            }
        }
    }
    let n = r.sites.len();
    let hits = r.hits();
    if r.not_launched > 0 {
        eprintln!(
            "  ({} variants not launched at these dims: tune them with their own --dims)",
            r.not_launched
        );
    }
    eprintln!(
        "measurements: {}, cache hits: {hits}/{n} ({:.0}%)",
        r.measurements,
        if n == 0 {
            100.0
        } else {
            100.0 * hits as f64 / n as f64
        }
    );
    eprintln!(
        "cache: {} ({} entries)",
        cache.path().display(),
        cache.entries().len()
    );
}

fn show(cache: &TuningCache, model: Option<&str>) {
    println!("# {}", cache.path().display());
    println!("# device: {}", cache.device());
    let mut n = 0;
    for (k, e) in cache.entries() {
        if let Some(m) = model {
            if !e.models.iter().any(|x| x == m) {
                continue;
            }
        }
        n += 1;
        let tun: Vec<String> = e.tunables.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{k}\t{:.2}×\t{:.3} ms (default {:.3} ms, spread {:.0} %)\t{}\t{} {}",
            e.speedup(),
            e.seconds * 1e3,
            e.default_seconds * 1e3,
            e.spread * 100.0,
            tun.join(","),
            e.date,
            e.version
        );
    }
    eprintln!("{n} entries");
}

/// Runs `transfuse tune`.
pub fn run(a: &TuneArgs) -> Result<(), Error> {
    let backend = backend_name(&a.backend)?;
    let elem = elem_of(&a.dtype)?;
    let budget = seconds("budget", &a.budget)?;
    let per_kernel = seconds("kernel-budget", &a.kernel_budget)?;
    let model_key = a.model.as_ref().map(|m| {
        std::fs::canonicalize(m)
            .unwrap_or_else(|_| m.clone())
            .display()
            .to_string()
    });
    if a.clear {
        let mut c = tune::open_cache(&backend)?;
        let n = c.clear()?;
        eprintln!("cleared {n} entries from {}", c.path().display());
        return Ok(());
    }
    if a.show {
        let c = tune::open_cache(&backend)?;
        show(&c, model_key.as_deref());
        return Ok(());
    }
    let Some(dir) = &a.model else {
        return Err(Error::Usage(
            "tune: --model DIR is required (or --show / --clear)".into(),
        ));
    };
    let model = Model::load(dir)?;
    let opts = transfuse::passes::Options::from_env()?;
    // The graph a session on this backend runs: optimized under the backend's cost profile.
    let profile = transfuse::runtime::select::backend_by_name(&backend)?
        .backend
        .cost_profile();
    let (graph, _, _) = Session::graph_for(&model, Some(&opts), profile)?;
    let syms = crate::graph_symbols(&graph);
    let mut dims = vec![];
    for d in &a.dims {
        dims.push(parse_one(&syms, d)?);
    }
    if dims.is_empty() {
        dims.push(parse_one(&syms, "")?);
        if syms.iter().any(|s| s == "past") {
            dims.push(parse_one(&syms, "seq=1,past=128")?);
        }
    }
    let topts = TuneOptions {
        budget,
        per_kernel,
        inject_mismatch: std::env::var("TRANSFUSE_TUNE_INJECT_MISMATCH").is_ok_and(|v| v == "1"),
        model: model_key.unwrap_or_default(),
        ..TuneOptions::default()
    };
    let bars = Bars {
        bar: std::cell::RefCell::new(None),
    };
    let (report, cache) = tune::tune_on(&backend, &graph, elem, &dims, &topts, &bars)?;
    eprintln!(
        "tuned {} on {backend} at {}",
        dir.display(),
        dims.iter()
            .map(tune::dims_string)
            .collect::<Vec<_>>()
            .join(" and ")
    );
    print_report(&report, &cache);
    Ok(())
}
