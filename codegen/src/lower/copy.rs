//! The lowering's own small kernels, written directly in the kernel IR: concatenation of strided
//! views (several independent concatenations of one shape in one launch) and iota.

use crate::kernels::{check_limits, Factor, Generated, GridDim, Limits, Tunable};
use crate::kir::*;
use crate::CodegenError;

/// Threads per workgroup of the copy kernels under `limits`.
pub fn copy_threads(limits: &Limits) -> u32 {
    limits.max_threads.clamp(32, 256)
}

fn threads_tunable(t: u32, limits: &Limits) -> Tunable {
    Tunable {
        name: "threads",
        value: t,
        space: [64, 128, 256, 512, 1024]
            .into_iter()
            .filter(|&x| x <= limits.max_threads)
            .chain([t])
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect(),
    }
}

/// `jobs` concatenations along `axis` of rank-`rank` outputs of one shape, each of `parts`
/// strided views, element type `elem`.
///
/// Buffers: per job `j`, its parts `in{j}_{p}` then `out{j}`. Uniforms: `total` (elements of
/// one output), sizes `d{a}`, part starts along the axis `beg{p}` (p ≥ 1), and per job and part
/// the strides `s{j}_{p}_{a}` and offset `o{j}_{p}` of the view. Grid `[⌈total/threads⌉, jobs,
/// 1]`; a grid-stride loop over x, so a launcher may clamp the grid.
pub fn concat(
    name: &str,
    elem: Elem,
    rank: usize,
    axis: usize,
    parts: usize,
    jobs: usize,
    limits: &Limits,
) -> Result<Generated, CodegenError> {
    let t = copy_threads(limits);
    let mut buffers = vec![];
    for j in 0..jobs {
        for p in 0..parts {
            buffers.push(Buffer {
                name: format!("in{j}_{p}"),
                elem,
                access: Access::Read,
            });
        }
        buffers.push(Buffer {
            name: format!("out{j}"),
            elem,
            access: Access::ReadWrite,
        });
    }
    let mut uniforms = vec!["total".to_string()];
    uniforms.extend((0..rank).map(|a| format!("d{a}")));
    uniforms.extend((1..parts).map(|p| format!("beg{p}")));
    for j in 0..jobs {
        for p in 0..parts {
            uniforms.extend((0..rank).map(|a| format!("s{j}_{p}_{a}")));
            uniforms.push(format!("o{j}_{p}"));
        }
    }
    let mut body = vec![];
    // Coordinates of element i, innermost first.
    let mut q = "i".to_string();
    for a in (0..rank).rev() {
        let c = format!("c{a}");
        if a == 0 {
            body.push(let_(&c, Elem::U32, var(&q)));
        } else {
            body.push(let_(&c, Elem::U32, var(&q) % uni(&format!("d{a}"))));
            let nq = format!("q{a}");
            body.push(let_(&nq, Elem::U32, var(&q) / uni(&format!("d{a}"))));
            q = nq;
        }
    }
    let coord = |a: usize, p: usize| {
        if a == axis && p > 0 {
            var(&format!("c{a}")) - uni(&format!("beg{p}"))
        } else {
            var(&format!("c{a}"))
        }
    };
    let copy = |j: usize, p: usize| {
        let mut idx = uni(&format!("o{j}_{p}"));
        for a in 0..rank {
            idx = idx + coord(a, p) * uni(&format!("s{j}_{p}_{a}"));
        }
        store(
            &format!("out{j}"),
            var("i"),
            load(&format!("in{j}_{p}"), idx).cast(elem),
        )
    };
    for j in 0..jobs {
        // Parts from the last: if c < beg_p {…earlier…} else {part p}.
        let mut sel = vec![copy(j, 0)];
        for p in 1..parts {
            sel = vec![Stmt::If(
                var(&format!("c{axis}")).lt(uni(&format!("beg{p}"))),
                sel,
                vec![copy(j, p)],
            )];
        }
        if jobs == 1 {
            body.extend(sel);
        } else {
            body.push(if_(workgroup_id(1).eq_(u(j as u32)), sel));
        }
    }
    let kernel = Kernel {
        name: name.to_string(),
        buffers,
        uniforms,
        workgroup: [t, 1, 1],
        shared: vec![],
        body: vec![
            let_("stride", Elem::U32, num_workgroups(0) * u(t)),
            for_step(
                "i",
                workgroup_id(0) * u(t) + local_id(0),
                uni("total"),
                var("stride"),
                body,
            ),
        ],
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [
            GridDim::of("total", t),
            GridDim {
                factors: vec![Factor::Const(jobs as u32)],
                per_group: 1,
            },
            GridDim::one(),
        ],
        tunables: vec![threads_tunable(t, limits)],
    })
}

/// `out[i] = start + i` for `i < len` (i32). Buffers `out`; uniforms `start, len`.
pub fn iota(name: &str, limits: &Limits) -> Result<Generated, CodegenError> {
    let t = copy_threads(limits);
    let kernel = Kernel {
        name: name.to_string(),
        buffers: vec![Buffer {
            name: "out".into(),
            elem: Elem::I32,
            access: Access::ReadWrite,
        }],
        uniforms: vec!["start".into(), "len".into()],
        workgroup: [t, 1, 1],
        shared: vec![],
        body: vec![
            let_("i", Elem::U32, global_id(0)),
            if_(
                var("i").lt(uni("len")),
                vec![store(
                    "out",
                    var("i"),
                    (uni("start") + var("i")).cast(Elem::I32),
                )],
            ),
        ],
    };
    check_limits(&kernel, limits)?;
    Ok(Generated {
        kernel,
        grid: [GridDim::of("len", t), GridDim::one(), GridDim::one()],
        tunables: vec![threads_tunable(t, limits)],
    })
}
