//! `transfuse bench model`: times a model's forward pass (and, for decoders, KV-cache decoding)
//! on a backend, with a per-kernel breakdown and the memory planner's numbers.
//!
//! Timings are host wall-clock: the median of `--iters` end-to-end forwards (inputs uploaded,
//! outputs read back) after `--warmup` runs, and the median of `--iters` forwards with the
//! inputs resident (first launch to device sync, [`transfuse::Session::time_forward`]). The
//! per-kernel table comes from one extra run in which every launch is synchronised (so its
//! total exceeds the resident forward by the launch-and-wait overhead). Decoding reports the
//! prefill (time to first token) apart from the one-token steps, whose median and rate
//! exclude it. Inputs are deterministic
//! pseudo-random ids below the vocabulary size.

use std::time::Instant;

use transfuse::{Batch, Error, Sampling, Session};

/// What to bench.
pub struct BenchArgs {
    pub batch: usize,
    pub seq: usize,
    pub iters: usize,
    pub warmup: usize,
    pub decode_tokens: usize,
    pub json: bool,
    /// The float storage type (`--dtype`), for the report.
    pub dtype: String,
}

fn ids(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<i64>> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab as u64) as i64
                })
                .collect()
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Decoding figures: the prefill step (time to first token) apart from the one-token steps.
struct Decode {
    prompt: usize,
    ttft: f64,
    per_token: Vec<f64>,
    /// Device bytes written to the KV cache outputs (`present_*`) by each decode step
    /// (empty on the CPU backend, which does not count).
    kv_written: Vec<u64>,
}

impl Decode {
    fn total(&self) -> f64 {
        self.per_token.iter().sum::<f64>().max(1e-12)
    }
}

/// Runs the bench and prints its report (a table, or one JSON object with `--json`).
pub fn bench_model(s: &Session, reason: &str, a: &BenchArgs) -> Result<(), Error> {
    if a.batch == 0 || a.seq == 0 || a.iters == 0 {
        return Err(Error::Usage(
            "--batch, --seq and --iters must be at least 1".into(),
        ));
    }
    let (vocab, positions) = (s.model.vocab_size(), s.model.max_positions());
    if a.seq > positions {
        return Err(Error::Usage(format!(
            "--seq {} exceeds the model's {positions} positions",
            a.seq
        )));
    }
    let batch = Batch::new(ids(a.batch, a.seq, vocab));
    for _ in 0..a.warmup {
        s.forward(&batch)?;
    }
    let mut times = vec![];
    for _ in 0..a.iters {
        let t0 = Instant::now();
        s.forward(&batch)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let fwd = median(times.clone());
    let resident = s.time_forward(&batch, a.iters)?;
    let kernels_fwd = median(resident.seconds.clone());
    let tokens = (a.batch * a.seq) as f64;
    let profile = s.profile(&batch)?;
    let mut by_kernel: Vec<(String, String, usize, f64)> = vec![];
    for k in &profile {
        match by_kernel.iter_mut().find(|e| e.0 == k.name) {
            Some(e) => {
                e.2 += 1;
                e.3 += k.seconds;
            }
            None => by_kernel.push((k.name.clone(), k.ops.join("+"), 1, k.seconds)),
        }
    }
    by_kernel.sort_by(|x, y| y.3.total_cmp(&x.3));
    let profiled: f64 = by_kernel.iter().map(|e| e.3).sum();
    let memory = s.memory();
    // Decoding: a prompt of `seq` tokens, then `decode_tokens` one-token steps.
    let decode = match (&s.model.config, a.decode_tokens) {
        (c, n) if n > 0 && c.cache_shape().is_some() => {
            let prompt_len = a.seq.min(positions.saturating_sub(n)).max(1);
            let prompt = ids(1, prompt_len, vocab).remove(0);
            s.generate(&prompt, 2, Sampling::Greedy)?; // warm-up (prefill and one step)
            let (_, steps) = s.generate_steps(&prompt, n + 1, Sampling::Greedy)?;
            let kv_written = steps[1..]
                .iter()
                .filter_map(|st| st.written.as_ref())
                .map(|w| {
                    w.by_tensor
                        .iter()
                        .filter(|(t, _)| t.starts_with("present_"))
                        .map(|(_, b)| b)
                        .sum()
                })
                .collect();
            Some(Decode {
                prompt: prompt_len,
                ttft: steps[0].seconds,
                per_token: steps[1..].iter().map(|st| st.seconds).collect(),
                kv_written,
            })
        }
        _ => None,
    };
    if a.json {
        let kernels: Vec<serde_json::Value> = by_kernel
            .iter()
            .map(|(name, ops, n, secs)| {
                serde_json::json!({"kernel": name, "ops": ops, "launches": n, "ms": secs * 1e3})
            })
            .collect();
        let j = serde_json::json!({
            "model": s.model.dir.display().to_string(),
            "backend": s.backend_name(),
            "device": s.backend_description(),
            "batch": a.batch,
            "seq": a.seq,
            "dtype": a.dtype,
            "forward_ms_median": fwd * 1e3,
            "forward_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
            "tokens_per_s": tokens / fwd,
            "forward_resident_ms_median": kernels_fwd * 1e3,
            "clock": resident.clock,
            "kernels": kernels,
            "profiled_total_ms": profiled * 1e3,
            "memory": memory.map(|m| serde_json::json!({
                "persistent_bytes": m.persistent,
                "io_bytes": m.io,
                "temps_naive_bytes": m.temps_naive,
                "temps_planned_bytes": m.temps_planned,
                "temps_live_peak_bytes": m.temps_live_peak,
            })),
            "decode": decode.as_ref().map(|d| serde_json::json!({
                "prompt": d.prompt,
                "tokens": d.per_token.len(),
                "time_to_first_token_ms": d.ttft * 1e3,
                "per_token_ms_median": median(d.per_token.clone()) * 1e3,
                "decode_ms": d.total() * 1e3,
                "tokens_per_s": d.per_token.len() as f64 / d.total(),
                "kv_bytes_written_per_step": d.kv_written,
            })),
        });
        println!("{j}");
        return Ok(());
    }
    println!(
        "model {} ({}, {} storage) on {}: {}",
        s.model.dir.display(),
        s.model.config.model_type(),
        a.dtype,
        s.backend_name(),
        s.backend_description()
    );
    println!("backend choice: {reason}");
    println!(
        "forward batch {} × seq {}: median {:.2} ms of {} runs (min {:.2}, max {:.2}), {:.0} tokens/s",
        a.batch,
        a.seq,
        fwd * 1e3,
        a.iters,
        times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
        times.iter().copied().fold(0.0, f64::max) * 1e3,
        tokens / fwd
    );
    println!(
        "forward with inputs resident: median {:.2} ms (clock {}: {})",
        kernels_fwd * 1e3,
        resident.clock,
        transfuse::runtime::clock_description(resident.clock)
    );
    println!("per kernel (one run, every launch synchronised, host time around each):");
    println!(
        "{:>10} {:>6} {:>8}  {:<44} ops",
        "ms", "%", "launches", "kernel"
    );
    for (name, ops, n, secs) in &by_kernel {
        println!(
            "{:>10.3} {:>6.1} {:>8}  {:<44} {}",
            secs * 1e3,
            100.0 * secs / profiled.max(1e-12),
            n,
            name,
            ops
        );
    }
    println!(
        "{:>10.3} {:>6.1} {:>8}  total",
        profiled * 1e3,
        100.0,
        profile.len()
    );
    if let Some(m) = memory {
        println!(
            "memory: resident {:.2} MB (weights, derived weights, constants), inputs/outputs {:.2} MB, temporaries {:.2} MB planned \
             by liveness vs {:.2} MB one buffer per tensor ({:.1}× less; live peak {:.2} MB)",
            mb(m.persistent),
            mb(m.io),
            mb(m.temps_planned),
            mb(m.temps_naive),
            m.temps_naive as f64 / (m.temps_planned.max(1)) as f64,
            mb(m.temps_live_peak)
        );
    }
    if let Some(d) = decode {
        let n = d.per_token.len();
        println!(
            "decode: prompt {} tokens: first token after {:.2} ms (prefill); then {n} tokens in {:.1} ms, \
             median {:.3} ms per token ({:.1} tokens/s, prefill excluded; KV cache carried between steps)",
            d.prompt,
            d.ttft * 1e3,
            d.total() * 1e3,
            median(d.per_token.clone()) * 1e3,
            n as f64 / d.total()
        );
        if let (Some(first), Some(last)) = (d.kv_written.first(), d.kv_written.last()) {
            let all: u64 = d.kv_written.iter().sum();
            println!(
                "decode KV writes: {first} B on the first step, {last} B on the last, {all} B over {n} steps \
                 (device bytes stored into the present_* cache outputs)"
            );
        }
    }
    Ok(())
}

/// `transfuse bench attention` as given on the command line.
#[derive(clap::Args)]
pub struct AttentionArgs {
    /// Backend: cpu, wgpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Sequence lengths (query rows = keys), comma-separated.
    #[arg(long, default_value = "128,512,1024")]
    pub seq: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    /// Key/value heads (GQA/MQA; must divide --heads; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head dimension: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Mask: causal, padding (with --lengths), window (with --window) or none.
    #[arg(long, default_value = "causal")]
    pub mask: String,
    /// Padding: valid key lengths, one for every row or one per batch row (default: ¾ of
    /// the keys).
    #[arg(long)]
    pub lengths: Option<String>,
    /// Window: key j is visible from position i iff i − W < j ≤ i (Hugging Face's sliding
    /// window).
    #[arg(long)]
    pub window: Option<usize>,
    /// Decode: one new query row per sequence against a KV cache (see --past).
    #[arg(long)]
    pub decode: bool,
    /// Decode: cache lengths, comma-separated (replaces --seq).
    #[arg(long, default_value = "0,1,37,1024")]
    pub past: String,
    /// Storage type: f32, f16 or bf16 (what the backend can run).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed runs (median, min, max reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed runs first (after the checked first call).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Variants, comma-separated: fused, unfused, primitive.
    #[arg(long, value_delimiter = ',', default_value = "fused,unfused")]
    pub variants: Vec<String>,
    /// One JSON line per case and variant.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV with a header line.
    #[arg(long)]
    pub csv: bool,
    /// Also draw the results (an .svg file).
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// First tune the cases the tuning cache lacks (wgpu, cuda), every variant with the same
    /// budget, then time them with their tuned kernels.
    #[arg(long)]
    pub tune: bool,
    /// With `--tune`: seconds per (case, variant).
    #[arg(long, default_value = "60", allow_hyphen_values = true)]
    pub tune_budget: String,
}

/// A comma-separated list of counts; an empty list or a bad item is an error naming `flag`.
fn parse_list(flag: &str, text: &str) -> Result<Vec<usize>, Error> {
    let items: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if items.is_empty() {
        return Err(Error::Usage(format!("{flag} needs at least one value")));
    }
    items
        .iter()
        .map(|t| {
            t.parse::<usize>()
                .map_err(|_| Error::Usage(format!("{flag}: `{t}` is not a non-negative integer")))
        })
        .collect()
}

/// Checks the arguments (every error names its flag), then runs each point × variant and
/// prints a table, JSON lines or CSV as it goes.
pub fn bench_attention(a: &AttentionArgs) -> Result<(), Error> {
    use transfuse::attention_bench::{self as ab, AttnConfig, MaskKind, Point, Variant};
    let usage = |m: String| Error::Usage(m);
    let mask = MaskKind::from_name(&a.mask).ok_or_else(|| {
        usage(format!(
            "--mask `{}` is unknown (expected causal, padding, window or none)",
            a.mask
        ))
    })?;
    let dtype = ab::elem_from_name(&a.dtype).ok_or_else(|| {
        usage(format!(
            "--dtype `{}` is unknown (expected f32, f16 or bf16)",
            a.dtype
        ))
    })?;
    let lengths = match &a.lengths {
        Some(l) => parse_list("--lengths", l)?,
        None => vec![],
    };
    if let Some(p) = &a.plot {
        if !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            return Err(usage(format!(
                "--plot {}: only .svg is supported (it needs no system fonts)",
                p.display()
            )));
        }
    }
    if a.window.is_some() && mask != MaskKind::Window {
        return Err(usage("--window needs --mask window".into()));
    }
    if !lengths.is_empty() && mask != MaskKind::Padding {
        return Err(usage("--lengths needs --mask padding".into()));
    }
    if mask == MaskKind::Window && a.window.is_none() {
        return Err(usage("--mask window needs --window W".into()));
    }
    if a.iters == 0 {
        return Err(usage("--iters must be at least 1".into()));
    }
    let mut variants = vec![];
    for v in &a.variants {
        let v = Variant::from_name(v).ok_or_else(|| {
            usage(format!(
                "--variants `{v}` is unknown (expected fused, unfused or primitive)"
            ))
        })?;
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    if variants.is_empty() {
        return Err(usage(
            "--variants needs at least one of fused, unfused, primitive".into(),
        ));
    }
    let cfg = AttnConfig {
        batch: a.batch,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        head_dim: a.head_dim,
        mask,
        window: a.window.unwrap_or(0),
        lengths,
        dtype,
    };
    let points: Vec<Point> = if a.decode {
        parse_list("--past", &a.past)?
            .into_iter()
            .map(Point::Decode)
            .collect()
    } else {
        parse_list("--seq", &a.seq)?
            .into_iter()
            .map(Point::Prefill)
            .collect()
    };
    cfg.validate(&points)?;
    let choice = match a.backend.as_str() {
        "cpu" | "wgpu" | "cuda" | "auto" => transfuse::runtime::backend_by_name(&a.backend)?,
        other => {
            return Err(usage(format!(
                "--backend `{other}` is unknown (expected cpu, wgpu, cuda or auto)"
            )))
        }
    };
    let backend = choice.backend;
    if !backend.storage_types().contains(&dtype) {
        let can: Vec<&str> = backend
            .storage_types()
            .into_iter()
            .map(ab::elem_name)
            .collect();
        return Err(usage(format!(
            "--dtype {}: the {} backend ({}) runs {} only",
            a.dtype,
            backend.name(),
            backend.description(),
            can.join(", ")
        )));
    }
    let system = format!("transfuse-{}", backend.name());
    let description = backend.description();
    let peak = ab::peak_tflops(&description, dtype);
    if a.csv {
        println!("{}", ab::CSV_HEADER);
    } else if !a.json {
        println!(
            "bench attention on {} ({description}; {}); {} mask, batch {}, heads {}/{} kv, head dim {}, {}",
            backend.name(),
            choice.reason,
            mask.name(),
            cfg.batch,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            ab::elem_name(dtype)
        );
        println!(
            "each case checked against an f64 reference (tolerance {:.0e}); {} timed runs after {} warm-up; \
             vs unf. = unfused median / this median",
            ab::tolerance(dtype),
            a.iters,
            a.warmup
        );
        println!("{}", ab::table_header());
    }
    if a.tune {
        tune_cases(a, &cfg, &points, &variants, backend.name())?;
    }
    let mut results: Vec<ab::CaseResult> = vec![];
    let mut clock = None;
    for &p in &points {
        let case = cfg.case_name(p);
        let first = results.len();
        // Unfused first, so the fused line can show its speedup as it is printed.
        let mut order = variants.clone();
        order.sort_by_key(|v| *v != Variant::Unfused);
        for &v in &order {
            let outcome = ab::run_case(backend.as_ref(), &cfg, p, v, a.warmup, a.iters)?;
            if let ab::Outcome::Timed(t) = &outcome {
                clock = Some(t.clock);
            }
            results.push(ab::CaseResult {
                system: system.clone(),
                variant: v,
                case: case.clone(),
                point: p,
                outcome,
            });
        }
        // Print in the order asked for.
        let mut these: Vec<&ab::CaseResult> = results[first..].iter().collect();
        these.sort_by_key(|r| variants.iter().position(|v| *v == r.variant));
        let speed = ab::speedups(&results);
        for r in these {
            let i = results
                .iter()
                .position(|o| std::ptr::eq(o, r))
                .expect("in results");
            if a.json {
                println!("{}", r.json(speed[i], peak));
            } else if a.csv {
                println!("{}", ab::csv_line(r, speed[i], peak));
            } else {
                println!("{}", ab::table_line(r, speed[i], peak));
            }
        }
    }
    if !a.json && !a.csv {
        if let Some(c) = clock {
            println!("clock: {c} ({})", transfuse::runtime::clock_description(c));
        }
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "{} attention, {} mask, b{} h{} d{} {} — {}",
            if a.decode { "decode" } else { "prefill" },
            mask.name(),
            cfg.batch,
            cfg.heads,
            cfg.head_dim,
            ab::elem_name(dtype),
            // The adapter's name without the driver details, so the title fits.
            description.split(" (").next().unwrap_or(&description)
        );
        ab::plot(path, &title, &results)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `bench attention --tune`: tunes each (point, variant) graph at its dims, with the same budget
/// for every variant; cases already in the cache cost nothing.
fn tune_cases(
    a: &AttentionArgs,
    cfg: &transfuse::attention_bench::AttnConfig,
    points: &[transfuse::attention_bench::Point],
    variants: &[transfuse::attention_bench::Variant],
    backend: &str,
) -> Result<(), Error> {
    use transfuse::attention_bench as ab;
    use transfuse::runtime::tune;
    if backend == "cpu" {
        return Err(Error::Usage(
            "--tune: the cpu backend has no kernel tunables (use --backend wgpu or cuda)".into(),
        ));
    }
    let budget = match a.tune_budget.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x < 1e7 => std::time::Duration::from_secs_f64(x),
        _ => {
            return Err(Error::Usage(format!(
                "--tune-budget: `{}` is not a positive number of seconds",
                a.tune_budget
            )))
        }
    };
    let g = ab::graph(cfg)?;
    for &p in points {
        for &v in variants {
            let vg = ab::variant_graph(&g, v)?;
            let dims = transfuse::runtime::bind_inputs(&vg, &ab::inputs(cfg, p))?;
            let opts = tune::TuneOptions {
                budget,
                per_kernel: budget,
                ..tune::TuneOptions::default()
            };
            let (r, _) = tune::tune_on(backend, &vg, cfg.dtype, &[dims], &opts, &tune::Quiet)?;
            let tuned: Vec<String> = r
                .sites
                .iter()
                .map(|s| {
                    if s.hit {
                        format!("{} cached", s.family)
                    } else if let Some(w) = &s.skipped_why {
                        format!("{} not tuned ({w})", s.family)
                    } else {
                        format!(
                            "{} {:.2}× ({} → {}; {} tried, {} rejected)",
                            s.family,
                            s.default.1 / s.winner.1.max(1e-12),
                            s.default.0,
                            s.winner.0,
                            s.tried,
                            s.rejected.len()
                        )
                    }
                })
                .collect();
            eprintln!(
                "tune {} {}: {} measurements; {}",
                cfg.case_name(p),
                v.name(),
                r.measurements,
                tuned.join("; ")
            );
        }
    }
    Ok(())
}
