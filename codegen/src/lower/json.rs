//! `plan.json`: the plan in readable form (sizes, uniforms and grids as expressions of the
//! symbolic dims; with `dims`, also their values and the estimated bytes/flops). Each kernel's
//! `decode` is its decode variant's entry (null without one) and `decode_file` its source
//! file; with `dims`, `decode_at` says whether the variant is launched at those dims.
//! `only_when` (null for most) is the expression a kernel launched only when it is 1 waits for
//! (a split-KV decode's combine: the query length); `only_split` (null for most) the split
//! count a kernel launched only when it exceeds 1 waits for (that combine again). `caches` lists the appendable KV caches (input, output, their shared buffer, the axis; the
//! buffer has `kv_cap` rows along it, a dim the runtime binds).

use serde_json::{json, Value};
use transfuse_ir::{shape_string, Bindings, Shape};

use super::{Phase, Plan, UniformExpr};
use crate::kernels::matmul::elem_name;
use crate::kernels::{Factor, GridDim};

fn dims(s: &Shape) -> Value {
    Value::Array(s.iter().map(|d| Value::String(d.to_string())).collect())
}

/// `ceil(a*b / n)` with the kernel's uniform expressions substituted.
fn grid_expr(d: &GridDim, names: &[String], exprs: &[UniformExpr]) -> String {
    let factors: Vec<String> = d
        .factors
        .iter()
        .map(|f| match f {
            Factor::Const(c) => c.to_string(),
            Factor::Uniform(u) => match names.iter().position(|n| n == u) {
                Some(i) => {
                    let e = exprs[i].to_string();
                    if e.contains(['+', '-']) {
                        format!("({e})")
                    } else {
                        e
                    }
                }
                None => u.clone(),
            },
        })
        .collect();
    let prod = if factors.is_empty() {
        "1".to_string()
    } else {
        factors.join("*")
    };
    if d.per_group <= 1 {
        prod
    } else {
        format!("ceil({prod}/{})", d.per_group)
    }
}

impl Plan {
    /// The plan as JSON; with `dims`, values at those dims too (`*_at` fields).
    pub fn to_json(&self, dims_at: Option<&Bindings>) -> Value {
        // A cache's capacity, unless given: exactly its rows at those dims.
        let with_cap = dims_at.map(|b| self.cache_dims(b));
        let dims_at = with_cap.as_ref();
        let at = |p: &super::Poly| dims_at.and_then(|b| p.eval(b).ok());
        let io = |v: &[super::PlanIo]| -> Value {
            v.iter()
                .map(|x| {
                    json!({
                        "name": x.name,
                        "buffer": x.buffer,
                        "dtype": x.dtype.name(),
                        "shape": dims(&x.shape),
                    })
                })
                .collect()
        };
        let buffers: Vec<Value> = self
            .buffers
            .iter()
            .map(|b| {
                let mut o = json!({
                    "name": b.name,
                    "kind": b.kind.name(),
                    "elem": elem_name(b.elem),
                    "dtype": b.dtype.name(),
                    "shape": dims(&b.shape),
                    "elements": b.len().to_string(),
                    "bytes": b.bytes().to_string(),
                });
                if let super::BufferKind::Const(v) = b.kind {
                    o["value"] = json!(v);
                }
                if let Some(x) = at(&b.bytes()) {
                    o["bytes_at"] = json!(x);
                }
                o
            })
            .collect();
        let aliases: Vec<Value> = self
            .aliases
            .iter()
            .map(|a| {
                json!({
                    "node": a.node.0,
                    "of": self.buffers[a.view.buf.index()].name,
                    "shape": dims(&a.shape),
                    "strided": a.strided,
                    "view_shape": dims(&a.view.shape),
                    "strides": a.view.strides.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    "offset": a.view.offset.to_string(),
                })
            })
            .collect();
        let kernels: Vec<Value> = self
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let names = &k.gen.kernel.uniforms;
                let mut o = json!({
                    "index": i,
                    "entry": k.entry(),
                    "file": self.file_name(i),
                    "phase": match k.phase { Phase::Prepare => "prepare", Phase::Forward => "forward" },
                    "nodes": k.nodes.iter().map(|n| n.0).collect::<Vec<_>>(),
                    "ops": k.ops,
                    "bindings": k.gen.kernel.buffers.iter().zip(&k.bindings).map(|(p, b)| json!({
                        "param": p.name,
                        "buffer": b,
                        "access": match p.access { crate::kir::Access::Read => "read", crate::kir::Access::ReadWrite => "read_write" },
                    })).collect::<Vec<_>>(),
                    "uniforms": names.iter().zip(&k.uniforms).map(|(n, e)| json!({"name": n, "expr": e.to_string()})).collect::<Vec<_>>(),
                    "grid": k.gen.grid.iter().map(|d| grid_expr(d, names, &k.uniforms)).collect::<Vec<_>>(),
                    "workgroup": k.gen.kernel.workgroup,
                    "shared_bytes": k.gen.kernel.shared_bytes(),
                    "tunables": k.gen.tunables.iter().map(|t| json!({"name": t.name, "value": t.value, "space": t.space})).collect::<Vec<_>>(),
                    "bytes": k.bytes.to_string(),
                    "flops": k.flops.to_string(),
                    "decode": k.decode_entry(),
                    "decode_file": self.decode_file_name(i),
                    "only_when": k.only_when.as_ref().map(|p| p.to_string()),
                    "only_split": k.only_split.as_ref().map(|e| e.to_string()),
                });
                if let Some(b) = dims_at {
                    o["bytes_at"] = json!(at(&k.bytes));
                    o["flops_at"] = json!(at(&k.flops));
                    if let Ok((u, g)) = self.launch_args(i, b) {
                        o["uniforms_at"] = json!(u);
                        o["grid_at"] = json!(g);
                    }
                    if k.decode.is_some() {
                        o["decode_at"] = json!(self.use_decode(i, b).ok());
                    }
                }
                o
            })
            .collect();
        let (fb, ff, lb) = (
            self.forward_bytes(),
            self.forward_flops(),
            self.lower_bound_bytes(),
        );
        let mut totals = json!({
            "forward_kernels": self.forward().count(),
            "prepare_kernels": self.kernels.len() - self.forward().count(),
            "forward_bytes": fb.to_string(),
            "forward_flops": ff.to_string(),
            "lower_bound_bytes": lb.to_string(),
        });
        if let Some(b) = dims_at {
            totals["forward_bytes_at"] = json!(at(&fb));
            totals["forward_flops_at"] = json!(at(&ff));
            totals["lower_bound_bytes_at"] = json!(at(&lb));
            totals["dims"] = json!(b);
        }
        json!({
            "target": self.target.name(),
            "elem": elem_name(self.elem),
            "inputs": io(&self.inputs),
            "weights": io(&self.weights),
            "outputs": io(&self.outputs),
            "caches": self.caches.iter().map(|c| json!({
                "input": c.input,
                "output": c.output,
                "buffer": c.buffer,
                "axis": c.axis,
                "capacity": super::CACHE_CAP,
            })).collect::<Vec<_>>(),
            "buffers": buffers,
            "aliases": aliases,
            "kernels": kernels,
            "totals": totals,
        })
    }

    /// A one-line shape description of buffer `name` (for reports).
    pub fn buffer_shape(&self, name: &str) -> Option<String> {
        self.buffer(name).map(|b| shape_string(&b.shape))
    }
}
