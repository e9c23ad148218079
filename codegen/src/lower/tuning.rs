//! Which tunables each template kernel of a plan gets: the *tuning sites*.
//!
//! Every template call of the lowering (matmul, its GEMV variant, flash attention, its decode
//! variant, softmax, layer/RMS norm) is a [`Site`]: the template family, its structure (the
//! template's configuration and the problem's sizes as polynomials of the symbolic dims, never
//! the tunables), the space of points worth trying and the default point. The default is
//! *shape-aware* when [`Tuning::dims`] gives the dims the plan will run at (the runtime passes
//! the bound dims rounded up to powers of two, so one plan serves a whole shape bucket): the
//! template's `for_problem` default from the problem size and the device kind; without dims,
//! or with [`Tuning::fixed_defaults`], the fixed `default_for` of the limits alone.
//! A [`Chooser`] (the runtime's tuning cache, or the tuner trying one candidate) may replace
//! the default; a point it gives that the template refuses is ignored (the default is kept and
//! the site records why). Tunables never change what a kernel computes, only how: a plan
//! lowered with other tunables has the same buffers, bindings and uniforms.
//!
//! Clusters, reductions, gathers, concats and group/batch norms keep their fixed defaults
//! (not sites yet).

use std::cell::RefCell;

use transfuse_ir::{Bindings, NodeId};

use super::partition::Lower;
use super::Poly;
use crate::kernels::attention::{self, AttentionCfg, AttentionTunables};
use crate::kernels::decode;
use crate::kernels::matmul::{GemvTunables, MatMulConfig, MatMulTunables};
use crate::kernels::norm::{NormConfig, Tune};
use crate::kernels::{DeviceKind, Tunable};

/// A point of a tunable space: each tunable's name and value.
pub type Point = Vec<(String, u32)>;

/// Whether a template accepts a point (why not, if it does not).
type Validity<'a> = dyn Fn(&[(String, u32)]) -> Result<(), String> + 'a;

/// One template call of the lowering (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    /// The IR node the kernel computes (its plan kernel lists it in `nodes`).
    pub node: NodeId,
    /// True for the kernel's decode variant ([`super::Variant`]).
    pub decode: bool,
    /// Template family: `matmul`, `gemv`, `flash`, `attention_split`,
    /// `softmax`, `norm`.
    pub family: &'static str,
    /// The template's configuration and the problem's sizes in dims (no tunables).
    pub structure: String,
    /// The problem's sizes (`m`, `n`, `k`; `rows`, `cols`; `sq`, `sk`) in dims.
    pub sizes: Vec<(&'static str, Poly)>,
    /// The default point (shape-aware when the dims were given).
    pub default: Point,
    /// The points worth trying (every one within the target's limits; some may still fail to
    /// generate, e.g. attention tiles the head dim does not divide).
    pub space: Vec<Point>,
    /// The point used.
    pub chosen: Point,
    /// True when the chooser gave `chosen`.
    pub from_chooser: bool,
    /// Why a point the chooser gave was refused, if it was.
    pub refused: Option<String>,
}

/// Gives tunables for a site (the runtime's tuning cache; the tuner's candidate).
pub trait Chooser {
    /// The point to use at `site`, or `None` for the default.
    fn choose(&self, site: &Site) -> Option<Point>;
}

/// How the lowering picks tunables (see the module docs); `Tuning::default()` is the fixed
/// defaults with no chooser.
#[derive(Default)]
pub struct Tuning<'a> {
    /// The dims the plan will run at (a shape bucket), for shape-aware defaults.
    pub dims: Option<Bindings>,
    /// Use the fixed defaults even with dims (the old behaviour, for comparisons).
    pub fixed_defaults: bool,
    /// Replaces defaults.
    pub chooser: Option<&'a dyn Chooser>,
    sites: RefCell<Vec<Site>>,
}

impl<'a> Tuning<'a> {
    /// Shape-aware defaults at `dims`, with `chooser` if given.
    pub fn at(dims: Bindings, chooser: Option<&'a dyn Chooser>) -> Tuning<'a> {
        Tuning {
            dims: Some(dims),
            chooser,
            ..Tuning::default()
        }
    }

    /// The sites of the last lowering with this tuning, in template-call order.
    pub fn sites(&self) -> Vec<Site> {
        self.sites.borrow().clone()
    }

    /// Forgets the recorded sites.
    pub fn clear_sites(&self) {
        self.sites.borrow_mut().clear();
    }

    fn size(&self, p: &Poly) -> Option<u64> {
        let d = self.dims.as_ref()?;
        p.eval(d).ok().and_then(|v| u64::try_from(v).ok())
    }
}

/// `name = value` pairs of a point, for messages and the cache.
pub fn point_string(p: &[(String, u32)]) -> String {
    p.iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn get(p: &[(String, u32)], name: &str) -> Option<u32> {
    p.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

fn pt(pairs: &[(&str, u32)]) -> Point {
    pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

fn mm_point(t: &MatMulTunables) -> Point {
    pt(&[
        ("tile_m", t.tile_m),
        ("tile_n", t.tile_n),
        ("tile_k", t.tile_k),
        ("rm", t.rm),
        ("rn", t.rn),
        ("reg", t.reg),
    ])
}

fn mm_from(p: &[(String, u32)]) -> Option<MatMulTunables> {
    Some(MatMulTunables {
        tile_m: get(p, "tile_m")?,
        tile_n: get(p, "tile_n")?,
        tile_k: get(p, "tile_k")?,
        rm: get(p, "rm")?,
        rn: get(p, "rn")?,
        // Points stored before the register design existed are tiled.
        reg: get(p, "reg").unwrap_or(0),
    })
}

fn gemv_point(t: &GemvTunables) -> Point {
    pt(&[("threads", t.threads), ("cols", t.cols)])
}

fn gemv_from(p: &[(String, u32)]) -> Option<GemvTunables> {
    Some(GemvTunables {
        threads: get(p, "threads")?,
        cols: get(p, "cols")?,
    })
}

fn attn_point(t: &AttentionTunables) -> Point {
    pt(&[
        ("block_q", t.block_q),
        ("block_k", t.block_k),
        ("threads", t.threads),
        ("rows", t.rows),
    ])
}

fn attn_from(p: &[(String, u32)]) -> Option<AttentionTunables> {
    Some(AttentionTunables {
        block_q: get(p, "block_q")?,
        block_k: get(p, "block_k")?,
        threads: get(p, "threads")?,
        rows: get(p, "rows")?,
    })
}

/// Every consistent combination of the per-axis values of an attention space (in the register
/// design `block_q` is `threads · rows`).
fn attn_points(axes: &[Tunable]) -> Vec<Point> {
    let vals = |n: &str| -> Vec<u32> {
        axes.iter()
            .find(|t| t.name == n)
            .map(|t| t.space.clone())
            .unwrap_or_default()
    };
    let mut out = vec![];
    for rows in vals("rows") {
        for threads in vals("threads") {
            for block_k in vals("block_k") {
                let qs = if rows > 0 {
                    vec![threads * rows]
                } else {
                    vals("block_q")
                };
                for block_q in qs {
                    out.push(attn_point(&AttentionTunables {
                        block_q,
                        block_k,
                        threads,
                        rows,
                    }));
                }
            }
        }
    }
    out
}

fn norm_point(t: &Tune) -> Point {
    pt(&[
        ("threads", t.threads),
        ("per_thread", t.per_thread),
        ("subgroup", t.subgroup),
    ])
}

fn norm_from(p: &[(String, u32)]) -> Option<Tune> {
    Some(Tune {
        threads: get(p, "threads")?,
        per_thread: get(p, "per_thread")?,
        subgroup: get(p, "subgroup")?,
    })
}

impl Lower<'_> {
    /// Records site `s` with its default, asks the chooser; the point to generate with.
    fn site(&mut self, mut s: Site, valid: &Validity<'_>) -> Point {
        s.chosen = s.default.clone();
        if let Some(c) = self.tuning.chooser {
            if let Some(p) = c.choose(&s) {
                match valid(&p) {
                    Ok(()) => {
                        s.chosen = p;
                        s.from_chooser = true;
                    }
                    Err(e) => s.refused = Some(e),
                }
            }
        }
        let chosen = s.chosen.clone();
        self.tuning.sites.borrow_mut().push(s);
        chosen
    }

    fn new_site(
        node: NodeId,
        decode: bool,
        family: &'static str,
        structure: String,
        sizes: Vec<(&'static str, Poly)>,
        default: Point,
        space: Vec<Point>,
    ) -> Site {
        let structure = format!(
            "{structure} {}",
            sizes
                .iter()
                .map(|(n, p)| format!("{n}={p}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Site {
            node,
            decode,
            family,
            structure,
            sizes,
            default,
            space,
            chosen: vec![],
            from_chooser: false,
            refused: None,
        }
    }

    /// True when thin products (one row: decode steps, the GEMV variant) take the register
    /// matmul with one-row blocks instead of the GEMV: on a CPU adapter, operands allowing
    /// vec4 loads, shape-aware defaults (not [`Tuning::fixed_defaults`]). The GEMV splits `k`
    /// over lanes and reduces in shared memory with barriers, which a CPU adapter runs
    /// slowly; one-row register blocks read `a` and `b` as vec4s, 8 columns per invocation.
    pub(super) fn thin_as_reg(&self, vec_ok: bool) -> bool {
        vec_ok && self.o.limits.kind == DeviceKind::Cpu && !self.tuning.fixed_defaults
    }

    /// The matmul's tunables for node `id` (`m`, `n`, `k` in dims; `decode`: for the kernel's
    /// one-row variant). `vec_ok`: the operands allow vec4 loads (see
    /// [`crate::kernels::matmul::matmul_reg`]); on a CPU adapter the register design is then
    /// the default (unless [`Tuning::fixed_defaults`]) and in the space.
    pub(super) fn pick_matmul(
        &mut self,
        id: NodeId,
        decode: bool,
        cfg: &MatMulConfig,
        sizes: [Poly; 3],
        vec_ok: bool,
    ) -> MatMulTunables {
        let limits = self.o.limits;
        let reg = vec_ok && limits.kind == DeviceKind::Cpu;
        let dflt = match (
            self.tuning.fixed_defaults,
            sizes
                .iter()
                .map(|p| self.tuning.size(p))
                .collect::<Option<Vec<_>>>(),
        ) {
            (false, _) if reg => MatMulTunables::cpu_for_problem(
                cfg,
                &limits,
                self.tuning.size(&sizes[0]),
                self.tuning.size(&sizes[1]),
            ),
            (false, Some(s)) => MatMulTunables::for_problem(cfg, &limits, s[0], s[1], s[2]),
            _ => MatMulTunables::default_for(cfg, &limits),
        };
        let mut space: Vec<Point> = MatMulTunables::space(cfg, &limits)
            .iter()
            .map(mm_point)
            .collect();
        if reg {
            space.extend(MatMulTunables::reg_space(cfg, &limits).iter().map(mm_point));
        }
        let [m, n, k] = sizes;
        let s = Self::new_site(
            id,
            decode,
            "matmul",
            format!("{cfg:?}"),
            vec![("m", m), ("n", n), ("k", k)],
            mm_point(&dflt),
            space,
        );
        let p = self.site(s, &|p| {
            let t = mm_from(p).ok_or("not a matmul point".to_string())?;
            if t.reg >= 1 && !reg {
                return Err(
                    "the register design needs a CPU adapter and vec4-aligned operands".into(),
                );
            }
            crate::kernels::matmul::matmul(cfg, &t, &limits)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        mm_from(&p).unwrap_or(dflt)
    }

    /// The GEMV's tunables for node `id` (`decode`: it is the matmul's variant).
    pub(super) fn pick_gemv(
        &mut self,
        id: NodeId,
        decode: bool,
        cfg: &MatMulConfig,
        sizes: [Poly; 3],
    ) -> GemvTunables {
        let limits = self.o.limits;
        let n = self.tuning.size(&sizes[1]);
        let dflt = match (self.tuning.fixed_defaults, n) {
            (false, Some(n)) => GemvTunables::for_problem(cfg, &limits, n),
            _ => GemvTunables::default_for(cfg, &limits),
        };
        let space = GemvTunables::space(cfg, &limits)
            .iter()
            .map(gemv_point)
            .collect();
        let [m, n, k] = sizes;
        let s = Self::new_site(
            id,
            decode,
            "gemv",
            format!("{cfg:?}"),
            vec![("m", m), ("n", n), ("k", k)],
            gemv_point(&dflt),
            space,
        );
        let p = self.site(s, &|p| {
            gemv_from(p)
                .ok_or("not a gemv point".to_string())?
                .validate("gemv", &limits)
                .map_err(|e| e.to_string())
        });
        gemv_from(&p).unwrap_or(dflt)
    }

    /// The split-KV decode partial kernel's tunables ([`decode::split`]) for attention node
    /// `id` (`variant`: as the flash kernel's decode variant): `block_k`, `threads` and the
    /// split count `splits` (family `attention_split`). The default split count comes from the
    /// device kind ([`decode::SplitShape::for_limits`]); the count per call from the key
    /// length ([`decode::split_uniforms`]).
    pub(super) fn pick_split(
        &mut self,
        id: NodeId,
        variant: bool,
        cfg: &AttentionCfg,
        sizes: Vec<(&'static str, Poly)>,
    ) -> (AttentionTunables, decode::SplitShape) {
        let limits = self.o.limits;
        let shape = decode::SplitShape::for_limits(&limits);
        let dflt = decode::split_default_for(cfg, shape, &limits);
        let axes = decode::split_space(cfg, shape, &limits);
        let with_splits = |p: Point, n: u32| {
            let mut p = p;
            p.push(("splits".to_string(), n));
            p
        };
        let counts = axes
            .iter()
            .find(|t| t.name == "splits")
            .map(|t| t.space.clone())
            .unwrap_or_else(|| vec![shape.max_splits]);
        let space = attn_points(&axes)
            .into_iter()
            .flat_map(|p| counts.iter().map(move |&n| with_splits(p.clone(), n)))
            .collect();
        // The shape stays in the structure: the split count is a tunable, `min_chunk` is not.
        let s = Self::new_site(
            id,
            variant,
            "attention_split",
            format!("{cfg:?} min_chunk={}", shape.min_chunk),
            sizes,
            with_splits(attn_point(&dflt), shape.max_splits),
            space,
        );
        let p = self.site(s, &|p| {
            let t = attn_from(p).ok_or("not an attention point".to_string())?;
            let n = get(p, "splits").ok_or("no split count".to_string())?;
            decode::split(cfg, &t, shape.with_splits(n), &limits)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        match (attn_from(&p), get(&p, "splits")) {
            (Some(t), Some(n)) => (t, shape.with_splits(n)),
            _ => (dflt, shape),
        }
    }

    /// Flash tunables for attention node `id`.
    pub(super) fn pick_attention(
        &mut self,
        id: NodeId,
        variant: bool,
        cfg: &AttentionCfg,
        sizes: Vec<(&'static str, Poly)>,
    ) -> AttentionTunables {
        let limits = self.o.limits;
        let dflt = AttentionTunables::default_for(cfg, &limits);
        let axes = AttentionTunables::space(cfg, &limits);
        let s = Self::new_site(
            id,
            variant,
            "flash",
            format!("{cfg:?}"),
            sizes,
            attn_point(&dflt),
            attn_points(&axes),
        );
        let p = self.site(s, &|p| {
            let t = attn_from(p).ok_or("not an attention point".to_string())?;
            attention::flash(cfg, &t, &limits)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        attn_from(&p).unwrap_or(dflt)
    }

    /// Softmax or row-norm tunables for node `id` (`rows`, `cols` in dims). `vec_ok`: rows are
    /// whole, aligned vec4s (`cols % 4 == 0`, aligned operands), so on a CPU adapter the row
    /// design (one row per invocation) is the default (unless [`Tuning::fixed_defaults`]) and
    /// in the space.
    pub(super) fn pick_norm(
        &mut self,
        id: NodeId,
        family: &'static str,
        cfg: &dyn NormConfig,
        structure: String,
        sizes: [Poly; 2],
        vec_ok: bool,
    ) -> Tune {
        let limits = self.o.limits;
        let row_design = vec_ok && limits.kind == DeviceKind::Cpu && cfg.has_rows_design();
        let cols = self.tuning.size(&sizes[1]);
        let dflt = match (self.tuning.fixed_defaults, cols) {
            (false, _) if row_design => Tune::rows(8),
            (false, Some(c)) => Tune::for_problem(cfg, &limits, c),
            _ => Tune::default_for(cfg, &limits),
        };
        // 32-lane subgroup reductions are wrong where subgroups are narrower (a CPU adapter's
        // are 8 lanes): not worth trying there.
        let mut space: Vec<Point> = Tune::space(cfg, &limits)
            .iter()
            .filter(|t| limits.kind == DeviceKind::Gpu || t.subgroup == 0)
            .map(norm_point)
            .collect();
        if row_design {
            space.extend(Tune::rows_space(cfg, &limits).iter().map(norm_point));
        }
        let [rows, cols] = sizes;
        let s = Self::new_site(
            id,
            false,
            family,
            structure,
            vec![("rows", rows), ("cols", cols)],
            norm_point(&dflt),
            space,
        );
        let p = self.site(s, &|p| {
            let t = norm_from(p).ok_or("not a norm point".to_string())?;
            if t.subgroup == crate::kernels::norm::ROWS && !row_design {
                return Err(
                    "the row design needs a CPU adapter and rows of aligned vec4s".to_string(),
                );
            }
            cfg.generate(&t, &limits)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        norm_from(&p).unwrap_or(dflt)
    }
}
