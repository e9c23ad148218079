//! Split-KV decode attention (flash-decoding): one query row per batch-head against a long KV
//! cache, the keys split across workgroups so that batch-1 decoding fills the device. The only
//! decode attention kernels: every attention whose query length is 1 runs them. Two kernels,
//! both from the kernel IR (so WGSL and CUDA C alike):
//!
//! 1. [`split`], grid `(nsplit, bh, 1)`: workgroup `(s, bh)` runs an online softmax (per tile
//!    of `block_k` keys: scores by all threads, tile max, probabilities, `p·v` by key slices ×
//!    column owners) over keys `[s·chunk, min((s+1)·chunk, sk))` only — clipped to the keys the
//!    causal/window mask lets the row see — and stores its partial result unnormalised:
//!    running max `m`, sum `l` and the `dv` accumulators, f32, at
//!    `part[((bh·PART_SPLITS) + s)·(dv + 2) ..]`. With **one split** (`nsplit = 1`) it instead
//!    writes the final `out` row itself (`acc / l`, or the mean of `v` when the row saw no key),
//!    and the combine is not launched (the plan gates it on `nsplit > 1`);
//! 2. [`combine`], grid `(1, bh, 1)`: `M = max_s m_s`, `out = Σ_s acc_s·e^(m_s − M) / Σ_s
//!    l_s·e^(m_s − M)`; a row whose `M` is still `f32::MIN` (it saw no key) takes the mean of
//!    `v` over all `sk` keys, as the reference and the other attention kernels do.
//!
//! The split is chosen per call from the length ([`split_uniforms`]): `nsplit =
//! clamp(floor(sk / min_chunk), 1, max_splits)` and `chunk = ceil(sk / nsplit)`. `max_splits`
//! is the tunable `splits` (a power of two up to [`PART_SPLITS`]); its default and `min_chunk`
//! come from the device kind ([`SplitShape::for_limits`]: up to 32 splits of ≥ 64 keys on
//! GPUs, 8 of ≥ 128 on CPU adapters, which run a few workgroups at a time on their threads).
//! Empty splits store `m = f32::MIN, l = 0` and weigh nothing. The partial buffer always has
//! room for [`PART_SPLITS`] splits per row, so the split count changes no buffer.
//!
//! # Operands and uniforms
//!
//! `q [bh, sq, d]`, `k`, `v`, `[mask]` (as [`super::attention`]'s: grouped-query heads
//! through `group`, the mask through its four strides), `part`, `out [bh, sq, dv]`, except that
//! K and V rows are addressed through *strides*: key `j` of key/value head `h` is at
//! `k[h·kstride + j·d ..]`, its value at `v[h·vstride + j·dv ..]`. A dense operand has
//! `kstride = sk·d`; a KV cache of capacity `cap` rows (the lowering's `kv_cap`) has `kstride =
//! cap·d`, so the kernel reads the first `sk` rows of each head in place. Uniforms: `bh, heads,
//! sq, sk`, the mask's four strides, `kstride, vstride, chunk, nsplit`; the combine takes `bh,
//! sq, sk, vstride, nsplit`. Only `sq = 1` is meant (the lowering launches these when the query
//! length is 1); the positions still follow the reference's `pos = i + sk − sq`.
//!
//! # Tunables
//!
//! [`AttentionTunables`] `block_k` and `threads` of the partial kernel, and the split count
//! `splits` ([`split_counts`]), which changes the partial buffer's contents but not the
//! attention's output: the tuner compares the output after the combine.

use super::attention::{
    check_common, for_cols, kernel_err, kv_head, score, shared, tile_range, AttentionCfg,
    AttentionTunables, DECODE_BLOCKS, MASKED, MAX_COLS, THREADS,
};
use super::{check_limits, DeviceKind, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// Threads of the combine kernel.
const COMBINE_THREADS: u32 = 64;

/// Splits per batch-head the partial buffer has room for: the largest `splits` tunable.
pub const PART_SPLITS: u32 = 64;

/// Split counts (`max_splits`) worth trying.
pub const SPLITS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];

/// How a call's keys are split: at most `max_splits` workgroups per batch-head, each at least
/// `min_chunk` keys (except when `sk` is shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SplitShape {
    /// Most splits (sizes the partial buffer: `bh · max_splits · (dv + 2)` f32).
    pub max_splits: u32,
    /// Fewest keys per split.
    pub min_chunk: u32,
}

impl SplitShape {
    /// By device kind: GPUs want many workgroups (32 splits of ≥ 64 keys); a CPU adapter
    /// runs a few at a time on its threads (8 splits of ≥ 128 keys).
    pub fn for_limits(limits: &Limits) -> SplitShape {
        match limits.kind {
            DeviceKind::Gpu => SplitShape {
                max_splits: 32,
                min_chunk: 64,
            },
            DeviceKind::Cpu => SplitShape {
                max_splits: 8,
                min_chunk: 128,
            },
        }
    }
}

impl SplitShape {
    /// This shape with at most `n` splits.
    pub fn with_splits(self, n: u32) -> SplitShape {
        SplitShape {
            max_splits: n,
            ..self
        }
    }
}

/// The split-count tunable `splits` (`max_splits`): default by device kind
/// ([`SplitShape::for_limits`]), space [`SPLITS`].
pub fn split_counts(limits: &Limits) -> Tunable {
    Tunable {
        name: "splits",
        value: SplitShape::for_limits(limits).max_splits,
        space: SPLITS.to_vec(),
    }
}

/// `(chunk, nsplit)` for `sk` keys: `nsplit = clamp(floor(sk / min_chunk), 1, max_splits)`,
/// `chunk = ceil(sk / nsplit)` (at least 1): every split but a short cache's only one has at
/// least `min_chunk` keys.
pub fn split_uniforms(sk: u64, shape: SplitShape) -> (u32, u32) {
    let n = (sk / u64::from(shape.min_chunk.max(1))).clamp(1, u64::from(shape.max_splits.max(1)));
    let chunk = sk.div_ceil(n).max(1);
    (chunk as u32, n as u32)
}

/// The partial kernel's name (`attention_split_…`, the configuration as in
/// [`AttentionCfg::kernel_name`]).
pub fn split_name(cfg: &AttentionCfg) -> String {
    cfg.kernel_name(true)
        .replacen("attention_decode_", "attention_split_", 1)
}

/// The combine kernel's name.
pub fn combine_name(cfg: &AttentionCfg) -> String {
    cfg.kernel_name(true)
        .replacen("attention_decode_", "attention_combine_", 1)
}

/// The partial kernel's default tunables under `limits`: 128 threads (or the most that fit),
/// one key per thread per tile.
pub fn split_default_for(
    cfg: &AttentionCfg,
    shape: SplitShape,
    limits: &Limits,
) -> AttentionTunables {
    for threads in [128, 256, 64, 32] {
        let t = AttentionTunables {
            block_q: 1,
            block_k: threads,
            threads,
            rows: 0,
        };
        if build_split(cfg, &t, shape, limits).is_ok() {
            return t;
        }
    }
    AttentionTunables {
        block_q: 1,
        block_k: 32,
        threads: 32,
        rows: 0,
    }
}

/// The partial kernel's search space: `block_k` and `threads`, each over the values valid with
/// the other at the default, and the split count `splits` (at `shape.max_splits`).
pub fn split_space(cfg: &AttentionCfg, shape: SplitShape, limits: &Limits) -> Vec<Tunable> {
    let t = split_default_for(cfg, shape, limits);
    let ok = |x: &AttentionTunables| build_split(cfg, x, shape, limits).is_ok();
    let one = |name: &'static str, value: u32, cands: &[u32]| {
        let set = |v| t.with(name, v).expect("known tunable");
        let mut space: Vec<u32> = cands.iter().copied().filter(|&v| ok(&set(v))).collect();
        if !space.contains(&value) {
            space.push(value);
            space.sort_unstable();
        }
        Tunable { name, value, space }
    };
    vec![
        one("block_q", 1, &[1]),
        one("block_k", t.block_k, &DECODE_BLOCKS),
        one("threads", t.threads, &THREADS),
        one("rows", 0, &[0]),
        Tunable {
            value: shape.max_splits,
            ..split_counts(limits)
        },
    ]
}

/// The partial kernel (see the module docs).
pub fn split(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    shape: SplitShape,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let kernel = build_split(cfg, t, shape, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("nsplit", 1),
            GridDim::of("bh", 1),
            GridDim::one(),
        ],
        tunables: split_space(cfg, shape, limits)
            .into_iter()
            .map(|mut x| {
                x.value = match x.name {
                    "block_k" => t.block_k,
                    "threads" => t.threads,
                    "splits" => shape.max_splits,
                    _ => x.value,
                };
                x
            })
            .collect(),
    })
}

fn build_split(
    cfg: &AttentionCfg,
    t: &AttentionTunables,
    shape: SplitShape,
    limits: &Limits,
) -> Result<Kernel, CodegenError> {
    let name = split_name(cfg);
    check_common(cfg, t, &name)?;
    let (bk, nt, d, dv) = (t.block_k, t.threads, cfg.head_dim, cfg.dv);
    if t.rows != 0 || t.block_q != 1 {
        return Err(kernel_err(
            &name,
            format!(
                "block_q = {}, rows = {}: split decode handles one query row, tiled",
                t.block_q, t.rows
            ),
        ));
    }
    if shape.max_splits == 0 || shape.min_chunk == 0 || shape.max_splits > PART_SPLITS {
        return Err(kernel_err(
            &name,
            format!("split shape {shape:?}: splits must be in 1..={PART_SPLITS}, chunks ≥ 1"),
        ));
    }
    // Column owners, key slices, columns per thread (as the decode kernel).
    let ct = nt.min(dv);
    let ks_n = nt / ct;
    let cpt = dv.div_ceil(ct);
    if cpt > MAX_COLS {
        return Err(kernel_err(
            &name,
            format!("{cpt} accumulator columns per thread exceed {MAX_COLS}: use more threads"),
        ));
    }
    let mut body = vec![
        let_("tid", Elem::U32, local_id(0)),
        let_("sp", Elem::U32, workgroup_id(0)),
        let_("bhi", Elem::U32, workgroup_id(1)),
        let_("qrow", Elem::U32, var("bhi") * uni("sq")),
        let_("kbase", Elem::U32, kv_head(cfg) * uni("kstride")),
        let_("vbase", Elem::U32, kv_head(cfg) * uni("vstride")),
    ];
    if cfg.mask {
        body.push(let_(
            "mbase",
            Elem::U32,
            var("bhi") / uni("heads") * uni("mask_sb") + var("bhi") % uni("heads") * uni("mask_sh"),
        ));
    }
    // The last query row (the only one: sq = 1).
    body.push(let_("qi", Elem::U32, uni("sq") - u(1)));
    body.extend([
        let_("ks", Elem::U32, var("tid") / u(ct)),
        let_("cc", Elem::U32, var("tid") % u(ct)),
        var_("m_run", Elem::F32, f(MASKED)),
        var_("l_run", Elem::F32, f(0.0)),
        Stmt::LocalArray("acc".into(), Elem::F32, cpt),
        for_(
            "ii",
            u(0),
            u(cpt),
            vec![Stmt::StoreLocal("acc".into(), var("ii"), f(0.0))],
        ),
        for_step(
            "idx",
            var("tid"),
            u(d),
            u(nt),
            vec![store_shared(
                "qv",
                var("idx"),
                load("q", (var("qrow") + var("qi")) * u(d) + var("idx")).cast(Elem::F32),
            )],
        ),
        Stmt::Barrier,
    ]);
    // The keys the row may see, [kt_lo·bk, kend), clipped to this split's chunk.
    body.extend(tile_range(cfg, var("qi"), 1, bk));
    body.extend([
        let_("c_lo", Elem::U32, var("sp") * uni("chunk")),
        let_(
            "c_hi",
            Elem::U32,
            (var("c_lo") + uni("chunk")).min(uni("sk")),
        ),
        let_("r_lo", Elem::U32, var("c_lo").max(var("kt_lo") * u(bk))),
        let_("r_hi", Elem::U32, var("c_hi").min(var("kend"))),
    ]);

    let mut sc = vec![
        let_("j", Elem::U32, var("k0") + var("c")),
        let_("kb", Elem::U32, var("kbase") + var("j") * u(d)),
        var_("dot", Elem::F32, f(0.0)),
        for_(
            "kk",
            u(0),
            u(d),
            vec![assign(
                "dot",
                var("dot")
                    + load_shared("qv", var("kk"))
                        * load("k", var("kb") + var("kk")).cast(Elem::F32),
            )],
        ),
    ];
    sc.extend(score(cfg, var("qi"), var("j"), None));
    sc.push(store_shared("sc", var("c"), var("score")));
    let tile = vec![
        let_("nvalid", Elem::U32, u(bk).min(var("r_hi") - var("k0"))),
        for_step("c", var("tid"), var("nvalid"), u(nt), sc),
        Stmt::Barrier,
        var_("mt", Elem::F32, f(MASKED)),
        for_(
            "c",
            u(0),
            var("nvalid"),
            vec![assign("mt", var("mt").max(load_shared("sc", var("c"))))],
        ),
        let_("mn", Elem::F32, var("m_run").max(var("mt"))),
        let_("a", Elem::F32, (var("m_run") - var("mn")).exp()),
        for_step(
            "c",
            var("tid"),
            var("nvalid"),
            u(nt),
            vec![store_shared(
                "pr",
                var("c"),
                (load_shared("sc", var("c")) - var("mn")).exp(),
            )],
        ),
        assign("m_run", var("mn")),
        Stmt::Barrier,
        if_(
            var("ks").lt(u(ks_n)),
            vec![
                assign("l_run", var("l_run") * var("a")),
                for_(
                    "ii",
                    u(0),
                    u(cpt),
                    vec![Stmt::StoreLocal(
                        "acc".into(),
                        var("ii"),
                        load_local("acc", var("ii")) * var("a"),
                    )],
                ),
                for_step(
                    "c",
                    var("ks"),
                    var("nvalid"),
                    u(ks_n),
                    vec![
                        let_("p", Elem::F32, load_shared("pr", var("c"))),
                        assign("l_run", var("l_run") + var("p")),
                        let_(
                            "vb",
                            Elem::U32,
                            var("vbase") + (var("k0") + var("c")) * u(dv),
                        ),
                        for_cols(
                            cfg,
                            "cc",
                            ct,
                            cpt,
                            vec![Stmt::StoreLocal(
                                "acc".into(),
                                var("ii"),
                                load_local("acc", var("ii"))
                                    + var("p") * load("v", var("vb") + var("col")).cast(Elem::F32),
                            )],
                        ),
                    ],
                ),
            ],
        ),
        Stmt::Barrier,
    ];
    // Uniform bounds (uniforms and the workgroup id): barriers inside are in uniform flow.
    body.push(for_step("k0", var("r_lo"), var("r_hi"), u(bk), tile));

    // Key slices share the running max: their sums add up.
    body.push(if_(
        var("ks").lt(u(ks_n)),
        vec![
            for_cols(
                cfg,
                "cc",
                ct,
                cpt,
                vec![store_shared(
                    "red",
                    var("ks") * u(dv) + var("col"),
                    load_local("acc", var("ii")),
                )],
            ),
            if_(
                var("cc").eq_(u(0)),
                vec![store_shared("lred", var("ks"), var("l_run"))],
            ),
        ],
    ));
    body.push(Stmt::Barrier);
    // Every thread: the workgroup's sum (the running max is the same in every thread).
    body.extend([
        var_("lt", Elem::F32, f(0.0)),
        for_(
            "s",
            u(0),
            u(ks_n),
            vec![assign("lt", var("lt") + load_shared("lred", var("s")))],
        ),
    ]);
    let col_total = || {
        vec![
            var_("tot", Elem::F32, f(0.0)),
            for_(
                "s",
                u(0),
                u(ks_n),
                vec![assign(
                    "tot",
                    var("tot") + load_shared("red", var("s") * u(dv) + var("col")),
                )],
            ),
        ]
    };
    // One split: this workgroup saw all the keys, so it writes the output row itself (the
    // combine is not launched).
    let mut direct = col_total();
    direct.push(Stmt::If(
        var("m_run").eq_(f(MASKED)),
        // No key seen: the mean of v over all sk keys.
        vec![
            var_("vm", Elem::F32, f(0.0)),
            for_(
                "j",
                u(0),
                uni("sk"),
                vec![assign(
                    "vm",
                    var("vm")
                        + load("v", var("vbase") + var("j") * u(dv) + var("col")).cast(Elem::F32),
                )],
            ),
            store(
                "out",
                var("orow") * u(dv) + var("col"),
                (var("vm") / uni("sk").cast(Elem::F32).max(f(1.0))).cast(cfg.elem),
            ),
        ],
        vec![store(
            "out",
            var("orow") * u(dv) + var("col"),
            (var("tot") / var("lt")).cast(cfg.elem),
        )],
    ));
    // Several: the unnormalised partial result.
    let mut partial = col_total();
    partial.push(store("part", var("pbase") + u(2) + var("col"), var("tot")));
    body.push(let_("orow", Elem::U32, var("qrow") + var("qi")));
    body.push(let_(
        "pbase",
        Elem::U32,
        (var("bhi") * u(PART_SPLITS) + var("sp")) * u(dv + 2),
    ));
    body.push(Stmt::If(
        uni("nsplit").eq_(u(1)),
        vec![if_(
            var("tid").lt(u(ct)),
            vec![for_cols(cfg, "cc", ct, cpt, direct)],
        )],
        vec![
            if_(
                var("tid").lt(u(ct)),
                vec![for_cols(cfg, "cc", ct, cpt, partial)],
            ),
            if_(
                var("tid").eq_(u(0)),
                vec![
                    store("part", var("pbase"), var("m_run")),
                    store("part", var("pbase") + u(1), var("lt")),
                ],
            ),
        ],
    ));

    let b = |name: &str, elem, access| Buffer {
        name: name.into(),
        elem,
        access,
    };
    let mut buffers = vec![
        b("q", cfg.elem, Access::Read),
        b("k", cfg.elem, Access::Read),
        b("v", cfg.elem, Access::Read),
    ];
    if cfg.mask {
        buffers.push(b("mask", cfg.elem, Access::Read));
    }
    buffers.push(b("part", Elem::F32, Access::ReadWrite));
    buffers.push(b("out", cfg.elem, Access::ReadWrite));
    let mut uniforms: Vec<String> = ["bh", "heads", "sq", "sk"].map(String::from).to_vec();
    if cfg.mask {
        uniforms.extend(["mask_sb", "mask_sh", "mask_sq", "mask_sk"].map(String::from));
    }
    uniforms.extend(["kstride", "vstride", "chunk", "nsplit"].map(String::from));
    let kernel = Kernel {
        name,
        buffers,
        uniforms,
        workgroup: [nt, 1, 1],
        shared: vec![
            shared("qv", Elem::F32, d),
            shared("sc", Elem::F32, bk),
            shared("pr", Elem::F32, bk),
            shared("red", Elem::F32, ks_n * dv),
            shared("lred", Elem::F32, ks_n),
        ],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(kernel)
}

/// The combine kernel (see the module docs): `COMBINE_THREADS` threads over the output columns
/// of one batch-head.
pub fn combine(cfg: &AttentionCfg, limits: &Limits) -> Result<Generated, CodegenError> {
    let name = combine_name(cfg);
    let dv = cfg.dv;
    let nt = COMBINE_THREADS.min(limits.max_threads);
    let row = dv + 2;
    let m_of = |s: Expr| load("part", var("pb") + s * u(row));
    let body = vec![
        let_("tid", Elem::U32, local_id(0)),
        let_("bhi", Elem::U32, workgroup_id(1)),
        let_("pb", Elem::U32, var("bhi") * u(PART_SPLITS * row)),
        let_("vbase", Elem::U32, kv_head(cfg) * uni("vstride")),
        let_("orow", Elem::U32, var("bhi") * uni("sq") + uni("sq") - u(1)),
        var_("mx", Elem::F32, f(MASKED)),
        for_(
            "s",
            u(0),
            uni("nsplit"),
            vec![assign("mx", var("mx").max(m_of(var("s"))))],
        ),
        var_("lt", Elem::F32, f(0.0)),
        for_(
            "s",
            u(0),
            uni("nsplit"),
            vec![assign(
                "lt",
                var("lt")
                    + load("part", var("pb") + var("s") * u(row) + u(1))
                        * (m_of(var("s")) - var("mx")).exp(),
            )],
        ),
        for_step(
            "col",
            var("tid"),
            u(dv),
            u(nt),
            vec![Stmt::If(
                var("mx").eq_(f(MASKED)),
                // No key seen: the mean of v over all sk keys.
                vec![
                    var_("tot", Elem::F32, f(0.0)),
                    for_(
                        "j",
                        u(0),
                        uni("sk"),
                        vec![assign(
                            "tot",
                            var("tot")
                                + load("v", var("vbase") + var("j") * u(dv) + var("col"))
                                    .cast(Elem::F32),
                        )],
                    ),
                    store(
                        "out",
                        var("orow") * u(dv) + var("col"),
                        (var("tot") / uni("sk").cast(Elem::F32).max(f(1.0))).cast(cfg.elem),
                    ),
                ],
                vec![
                    var_("tot", Elem::F32, f(0.0)),
                    for_(
                        "s",
                        u(0),
                        uni("nsplit"),
                        vec![assign(
                            "tot",
                            var("tot")
                                + load("part", var("pb") + var("s") * u(row) + u(2) + var("col"))
                                    * (m_of(var("s")) - var("mx")).exp(),
                        )],
                    ),
                    store(
                        "out",
                        var("orow") * u(dv) + var("col"),
                        (var("tot") / var("lt")).cast(cfg.elem),
                    ),
                ],
            )],
        ),
    ];
    let b = |name: &str, elem, access| Buffer {
        name: name.into(),
        elem,
        access,
    };
    let kernel = Kernel {
        name,
        buffers: vec![
            b("v", cfg.elem, Access::Read),
            b("part", Elem::F32, Access::Read),
            b("out", cfg.elem, Access::ReadWrite),
        ],
        uniforms: ["bh", "sq", "sk", "vstride", "nsplit"]
            .map(String::from)
            .to_vec(),
        workgroup: [nt, 1, 1],
        shared: vec![],
        body,
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [GridDim::one(), GridDim::of("bh", 1), GridDim::one()],
        tunables: vec![],
    })
}

/// Representative configurations (naga and NVRTC validate them in the tests): f32/f16 with
/// head dims 64 and 128, plain, causal + mask, a sliding window and grouped-query, under
/// WebGPU's limits; bf16 (CUDA only) under CUDA's.
pub fn catalog() -> Vec<Generated> {
    let mut out = vec![];
    for (elem, d, causal, window, mask, group) in [
        (Elem::F32, 64, false, None, false, 1),
        (Elem::F32, 64, true, None, true, 1),
        (Elem::F16, 128, true, None, true, 4),
        (Elem::F32, 128, false, None, true, 2),
        (Elem::F16, 128, true, Some(512), false, 1),
        (Elem::F16, 64, false, None, true, 1),
        (Elem::BF16, 128, false, None, false, 1),
        (Elem::BF16, 64, true, Some(64), true, 8),
    ] {
        let limits = if elem == Elem::BF16 {
            Limits::cuda()
        } else {
            Limits::webgpu()
        };
        let shape = SplitShape::for_limits(&limits);
        let cfg = AttentionCfg {
            elem,
            head_dim: d,
            dv: d,
            scale: super::attention::default_scale(d),
            causal,
            window,
            mask,
            group,
        };
        let t = split_default_for(&cfg, shape, &limits);
        out.push(split(&cfg, &t, shape, &limits).expect("catalog split"));
        out.push(combine(&cfg, &limits).expect("catalog combine"));
    }
    out
}
