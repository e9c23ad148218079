//! The WGSL printer: one self-contained module per kernel (naga validates it alone).
//!
//! Buffers are storage bindings `b_<name>` (group 0, bindings in order; `read` or
//! `read_write`), uniforms one `var<uniform> u: Uniforms` struct after them, shared arrays
//! `var<workgroup> s_<name>`. `enable f16;` when f16 is used; bf16 has no WGSL type and is
//! refused. Non-finite and extreme f32 literals are printed as exact bit patterns; erf (absent
//! from WGSL) as Abramowitz–Stegun 7.1.26 (|error| < 1.5e-7). Subgroup reductions use the
//! subgroup built-ins without `enable subgroups;` (naga 30 rejects that directive).

use std::fmt::Write;

use crate::kir::{Access, BinOp, Builtin, Elem, Expr, Kernel, SubgroupOp, UnOp};
use crate::print::{Mem, Syntax};
use crate::types::{check_uniform, Scope};
use crate::CodegenError;

fn ty(k: &Kernel, e: Elem) -> Result<&'static str, CodegenError> {
    Ok(match e {
        Elem::F32 => "f32",
        Elem::F16 => "f16",
        Elem::U32 => "u32",
        Elem::I32 => "i32",
        Elem::Bool => "bool",
        Elem::F32x4 => "vec4<f32>",
        Elem::BF16 => {
            return Err(CodegenError::Kernel {
                kernel: k.name.clone(),
                msg: "bf16 has no WGSL type".into(),
            })
        }
    })
}

fn axis(a: u8) -> &'static str {
    ["x", "y", "z"][a.min(2) as usize]
}

fn float_lit(v: f32) -> String {
    if v.is_finite() && v.abs() < 1e37 {
        format!("{v:?}")
    } else {
        format!("bitcast<f32>(0x{:08x}u)", v.to_bits())
    }
}

const ERF: &str = "fn tf_erf(x: f32) -> f32 {
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let p = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(x) * (1.0 - p * exp(-a * a));
}
";

struct P<'a> {
    k: &'a Kernel,
    out: String,
    /// Buffers declared as arrays of 4-vectors (read by a vector load): a scalar access of
    /// element `i` is `b[i / 4][i % 4]`.
    vec_bufs: Vec<String>,
}

impl P<'_> {
    fn scalar_index(&self, b: &str, i: &str) -> String {
        if self.vec_bufs.iter().any(|v| v == b) {
            format!("[({i}) / 4u][({i}) % 4u]")
        } else {
            format!("[{i}]")
        }
    }
}

impl P<'_> {
    fn expr(&self, s: &Scope, e: &Expr) -> Result<String, CodegenError> {
        let k = &self.k.name;
        Ok(match e {
            Expr::F32(v) => float_lit(*v),
            Expr::U32(v) => format!("{v}u"),
            Expr::I32(v) => format!("{v}i"),
            Expr::Bool(b) => b.to_string(),
            Expr::Var(n) => {
                s.ty(k, e)?;
                n.clone()
            }
            Expr::Uniform(n) => {
                check_uniform(self.k, n)?;
                format!("u.{n}")
            }
            Expr::Builtin(b) => match b {
                Builtin::LocalId(a) => format!("tf_lid.{}", axis(*a)),
                Builtin::WorkgroupId(a) => format!("tf_wid.{}", axis(*a)),
                Builtin::NumWorkgroups(a) => format!("tf_nwg.{}", axis(*a)),
                Builtin::GlobalId(a) => format!("tf_gid.{}", axis(*a)),
            },
            Expr::Load(b, i) => format!("b_{b}{}", self.scalar_index(b, &self.expr(s, i)?)),
            Expr::LoadShared(b, i) => format!("s_{b}[{}]", self.expr(s, i)?),
            Expr::LoadLocal(b, i) => format!("{b}[{}]", self.expr(s, i)?),
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.expr(s, a)?, self.expr(s, b)?);
                match op {
                    BinOp::Min => format!("min({x}, {y})"),
                    BinOp::Max => format!("max({x}, {y})"),
                    BinOp::Dot => format!("dot({x}, {y})"),
                    _ => {
                        let o = match op {
                            BinOp::Add => "+",
                            BinOp::Sub => "-",
                            BinOp::Mul => "*",
                            BinOp::Div => "/",
                            BinOp::Rem => "%",
                            BinOp::Lt => "<",
                            BinOp::Le => "<=",
                            BinOp::Gt => ">",
                            BinOp::Ge => ">=",
                            BinOp::Eq => "==",
                            BinOp::Ne => "!=",
                            BinOp::And => "&&",
                            BinOp::Or => "||",
                            BinOp::Min | BinOp::Max | BinOp::Dot => unreachable!(),
                        };
                        format!("({x} {o} {y})")
                    }
                }
            }
            Expr::Un(op, a) => {
                let x = self.expr(s, a)?;
                let one = if s.ty(k, a)? == Elem::F16 {
                    "1.0h"
                } else {
                    "1.0"
                };
                match op {
                    UnOp::Neg => format!("(-{x})"),
                    UnOp::Not => format!("(!{x})"),
                    UnOp::Exp => format!("exp({x})"),
                    UnOp::Log => format!("log({x})"),
                    UnOp::Sqrt => format!("sqrt({x})"),
                    UnOp::Rsqrt => format!("inverseSqrt({x})"),
                    UnOp::Tanh => format!("tanh({x})"),
                    UnOp::Erf => format!("tf_erf({x})"),
                    UnOp::Abs => format!("abs({x})"),
                    UnOp::Recip => format!("({one} / {x})"),
                    UnOp::Sigmoid => format!("({one} / ({one} + exp(-{x})))"),
                    UnOp::Sin => format!("sin({x})"),
                    UnOp::Cos => format!("cos({x})"),
                    UnOp::Lane(i) => format!("{x}.{}", ["x", "y", "z", "w"][(*i).min(3) as usize]),
                }
            }
            Expr::Select(c, a, b) => {
                format!(
                    "select({}, {}, {})",
                    self.expr(s, b)?,
                    self.expr(s, a)?,
                    self.expr(s, c)?
                )
            }
            Expr::Cast(Elem::F32x4, a) if s.ty(k, a)? != Elem::F32x4 => {
                s.check_vector_cast(k, a)?;
                match &**a {
                    Expr::Load(b, i) => {
                        let v = format!("b_{b}[({}) / 4u]", self.expr(s, i)?);
                        if s.ty(k, a)? == Elem::F32 {
                            v
                        } else {
                            format!("vec4<f32>({v})")
                        }
                    }
                    _ => {
                        let x = self.expr(s, a)?;
                        if s.ty(k, a)? == Elem::F32 {
                            format!("vec4<f32>({x})")
                        } else {
                            format!("vec4<f32>(f32({x}))")
                        }
                    }
                }
            }
            Expr::Cast(to, a) => {
                let x = self.expr(s, a)?;
                if s.ty(k, a)? == *to {
                    x
                } else {
                    format!("{}({x})", ty(self.k, *to)?)
                }
            }
            Expr::Fma(a, b, c) => {
                s.ty(k, e)?;
                format!(
                    "fma({}, {}, {})",
                    self.expr(s, a)?,
                    self.expr(s, b)?,
                    self.expr(s, c)?
                )
            }
            Expr::Subgroup(SubgroupOp::Broadcast(l), a) => {
                format!("subgroupBroadcast({}, {l}u)", self.expr(s, a)?)
            }
            Expr::Subgroup(op, a) => {
                let f = match op {
                    SubgroupOp::Sum => "subgroupAdd",
                    SubgroupOp::Max => "subgroupMax",
                    SubgroupOp::Broadcast(_) => unreachable!("printed above"),
                };
                format!("{f}({})", self.expr(s, a)?)
            }
        })
    }
}

impl Syntax for P<'_> {
    fn expr(&self, s: &Scope, e: &Expr) -> Result<String, CodegenError> {
        P::expr(self, s, e)
    }

    fn decl(&self, mutable: bool, n: &str, e: Elem, v: &str) -> Result<String, CodegenError> {
        let kw = if mutable { "var" } else { "let" };
        Ok(format!("{kw} {n}: {} = {v};", ty(self.k, e)?))
    }

    fn local_array(&self, n: &str, e: Elem, len: u32) -> Result<Vec<String>, CodegenError> {
        Ok(vec![format!("var {n}: array<{}, {len}>;", ty(self.k, e)?)])
    }

    fn store(&self, mem: Mem, arr: &str, i: &str, v: &str) -> String {
        match mem {
            Mem::Local => format!("{arr}[{i}] = {v};"),
            Mem::Global => format!("b_{arr}{} = {v};", self.scalar_index(arr, i)),
            Mem::Shared => format!("s_{arr}[{i}] = {v};"),
        }
    }

    fn for_header(&self, var: &str, a: &str, b: &str, c: &str) -> String {
        format!("for (var {var}: u32 = {a}; {var} < {b}; {var} = {var} + {c}) {{")
    }

    fn barrier(&self) -> &'static str {
        "workgroupBarrier();"
    }
}

/// Prints `k` as a self-contained WGSL module with entry point `k.name`.
pub fn print(k: &Kernel) -> Result<String, CodegenError> {
    let mut p = P {
        k,
        out: String::new(),
        vec_bufs: crate::kir::vector_buffers(k),
    };
    let _ = writeln!(
        p.out,
        "// {}: generated by transfuse-codegen; do not edit.",
        k.name
    );
    if k.uses(Elem::F16) {
        p.out.push_str("enable f16;\n");
    }
    if k.uses(Elem::BF16) {
        ty(k, Elem::BF16)?;
    }
    for (i, b) in k.buffers.iter().enumerate() {
        let access = if b.access == Access::Read {
            "read"
        } else {
            "read_write"
        };
        let elem = ty(k, b.elem)?;
        let elem = if p.vec_bufs.contains(&b.name) {
            format!("vec4<{elem}>")
        } else {
            elem.to_string()
        };
        let _ = writeln!(
            p.out,
            "@group(0) @binding({i}) var<storage, {access}> b_{}: array<{elem}>;",
            b.name,
        );
    }
    if !k.uniforms.is_empty() {
        let fields: Vec<String> = k.uniforms.iter().map(|u| format!("{u}: u32")).collect();
        let _ = writeln!(p.out, "struct Uniforms {{ {} }}", fields.join(", "));
        let _ = writeln!(
            p.out,
            "@group(0) @binding({}) var<uniform> u: Uniforms;",
            k.buffers.len()
        );
    }
    for sh in &k.shared {
        let _ = writeln!(
            p.out,
            "var<workgroup> s_{}: array<{}, {}>;",
            sh.name,
            ty(k, sh.elem)?,
            sh.len
        );
    }
    if k.any_expr(&|e| matches!(e, Expr::Un(UnOp::Erf, _))) {
        p.out.push_str(ERF);
    }
    let [x, y, z] = k.workgroup;
    let _ = writeln!(
        p.out,
        "@compute @workgroup_size({x}, {y}, {z})\nfn {}(@builtin(local_invocation_id) tf_lid: vec3<u32>, \
         @builtin(workgroup_id) tf_wid: vec3<u32>, @builtin(num_workgroups) tf_nwg: vec3<u32>, \
         @builtin(global_invocation_id) tf_gid: vec3<u32>) {{",
        k.name
    );
    let mut scope = Scope::of(k);
    let mut body = String::new();
    crate::print::stmts(&p, &mut body, &mut scope, &k.body, 1)?;
    p.out.push_str(&body);
    p.out.push_str("}\n");
    Ok(p.out)
}
