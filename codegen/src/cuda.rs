//! The CUDA C printer: a self-contained translation unit per kernel (NVRTC takes it alone).
//!
//! Buffers become `__restrict__` pointers (const when read-only), uniforms `unsigned int`
//! arguments after them, shared arrays `__shared__` locals; `extern "C"` keeps the entry name
//! unmangled and `__launch_bounds__` states the workgroup size. f16/bf16 use `cuda_fp16.h` /
//! `cuda_bf16.h`. Subgroup reductions are butterfly `__shfl_xor_sync` over a full 32-lane warp.

use std::fmt::Write;

use crate::kir::{Access, BinOp, Builtin, Elem, Expr, Kernel, SubgroupOp, UnOp};
use crate::print::{Mem, Syntax};
use crate::types::{check_uniform, Scope};
use crate::CodegenError;

fn ty(e: Elem) -> &'static str {
    match e {
        Elem::F32 => "float",
        Elem::F16 => "__half",
        Elem::BF16 => "__nv_bfloat16",
        Elem::U32 => "unsigned int",
        Elem::I32 => "int",
        Elem::Bool => "bool",
        Elem::F32x4 => "float4",
    }
}

fn axis(a: u8) -> &'static str {
    ["x", "y", "z"][a.min(2) as usize]
}

fn float_lit(v: f32) -> String {
    if v.is_finite() {
        format!("{v:?}f")
    } else {
        format!("__int_as_float(0x{:08x})", v.to_bits())
    }
}

/// float4 arithmetic and loads (CUDA has no float4 operators). A vector load reads four
/// scalars: correct at any alignment (a binding may start at any element), which NVCC merges
/// into one 16-byte load where it can prove alignment.
const VEC4: &str = "__device__ __forceinline__ float4 operator+(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ __forceinline__ float4 operator-(float4 a, float4 b) { return make_float4(a.x - b.x, a.y - b.y, a.z - b.z, a.w - b.w); }
__device__ __forceinline__ float4 operator*(float4 a, float4 b) { return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w); }
__device__ __forceinline__ float4 operator/(float4 a, float4 b) { return make_float4(a.x / b.x, a.y / b.y, a.z / b.z, a.w / b.w); }
__device__ __forceinline__ float4 operator-(float4 a) { return make_float4(-a.x, -a.y, -a.z, -a.w); }
__device__ __forceinline__ float4 fminf(float4 a, float4 b) { return make_float4(fminf(a.x, b.x), fminf(a.y, b.y), fminf(a.z, b.z), fminf(a.w, b.w)); }
__device__ __forceinline__ float4 fmaxf(float4 a, float4 b) { return make_float4(fmaxf(a.x, b.x), fmaxf(a.y, b.y), fmaxf(a.z, b.z), fmaxf(a.w, b.w)); }
__device__ __forceinline__ float tf_dot4(float4 a, float4 b) { return ((a.x * b.x + a.y * b.y) + a.z * b.z) + a.w * b.w; }
__device__ __forceinline__ float4 tf_splat4(float x) { return make_float4(x, x, x, x); }
__device__ __forceinline__ float4 tf_ld4(const float* p) { return make_float4(p[0], p[1], p[2], p[3]); }
";

struct P<'a> {
    k: &'a Kernel,
    out: String,
}

impl P<'_> {
    fn expr(&self, s: &Scope, e: &Expr) -> Result<String, CodegenError> {
        let k = &self.k.name;
        Ok(match e {
            Expr::F32(v) => float_lit(*v),
            Expr::U32(v) => format!("{v}u"),
            Expr::I32(v) => format!("{v}"),
            Expr::Bool(b) => b.to_string(),
            Expr::Var(n) => {
                s.ty(k, e)?;
                n.clone()
            }
            Expr::Uniform(n) => {
                check_uniform(self.k, n)?;
                n.clone()
            }
            Expr::Builtin(b) => match b {
                Builtin::LocalId(a) => format!("threadIdx.{}", axis(*a)),
                Builtin::WorkgroupId(a) => format!("blockIdx.{}", axis(*a)),
                Builtin::NumWorkgroups(a) => format!("gridDim.{}", axis(*a)),
                Builtin::GlobalId(a) => {
                    let x = axis(*a);
                    format!("(blockIdx.{x} * blockDim.{x} + threadIdx.{x})")
                }
            },
            Expr::Load(b, i) | Expr::LoadShared(b, i) | Expr::LoadLocal(b, i) => {
                format!("{b}[{}]", self.expr(s, i)?)
            }
            Expr::Bin(op, a, b) => {
                let (x, y) = (self.expr(s, a)?, self.expr(s, b)?);
                let float = matches!(s.ty(k, a)?, Elem::F32 | Elem::F32x4);
                match op {
                    BinOp::Min if float => format!("fminf({x}, {y})"),
                    BinOp::Max if float => format!("fmaxf({x}, {y})"),
                    BinOp::Min => format!("(({x}) < ({y}) ? ({x}) : ({y}))"),
                    BinOp::Max => format!("(({x}) > ({y}) ? ({x}) : ({y}))"),
                    BinOp::Dot => format!("tf_dot4({x}, {y})"),
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
                match op {
                    UnOp::Neg => format!("(-{x})"),
                    UnOp::Not => format!("(!{x})"),
                    UnOp::Exp => format!("expf({x})"),
                    UnOp::Log => format!("logf({x})"),
                    UnOp::Sqrt => format!("sqrtf({x})"),
                    UnOp::Rsqrt => format!("rsqrtf({x})"),
                    UnOp::Tanh => format!("tanhf({x})"),
                    UnOp::Erf => format!("erff({x})"),
                    UnOp::Abs => format!("fabsf({x})"),
                    UnOp::Recip => format!("(1.0f / {x})"),
                    UnOp::Sigmoid => format!("(1.0f / (1.0f + expf(-{x})))"),
                    UnOp::Sin => format!("sinf({x})"),
                    UnOp::Cos => format!("cosf({x})"),
                    UnOp::Lane(i) => {
                        format!("({x}).{}", ["x", "y", "z", "w"][(*i).min(3) as usize])
                    }
                }
            }
            Expr::Select(c, a, b) => {
                format!(
                    "({} ? {} : {})",
                    self.expr(s, c)?,
                    self.expr(s, a)?,
                    self.expr(s, b)?
                )
            }
            Expr::Cast(Elem::F32x4, a) if s.ty(k, a)? != Elem::F32x4 => {
                s.check_vector_cast(k, a)?;
                match &**a {
                    Expr::Load(b, i) => format!("tf_ld4(&{b}[{}])", self.expr(s, i)?),
                    _ => format!("tf_splat4({})", self.expr(s, &a.clone().cast(Elem::F32))?),
                }
            }
            Expr::Cast(to, a) => {
                let x = self.expr(s, a)?;
                let from = s.ty(k, a)?;
                match (from, to) {
                    (f, t) if f == *t => x,
                    (Elem::F16, Elem::F32) => format!("__half2float({x})"),
                    (Elem::BF16, Elem::F32) => format!("__bfloat162float({x})"),
                    (_, Elem::F16) => format!("__float2half((float)({x}))"),
                    (_, Elem::BF16) => format!("__float2bfloat16((float)({x}))"),
                    (Elem::F16, t) => format!("(({})__half2float({x}))", ty(*t)),
                    (Elem::BF16, t) => format!("(({})__bfloat162float({x}))", ty(*t)),
                    (_, t) => format!("(({})({x}))", ty(*t)),
                }
            }
            Expr::Fma(a, b, c) => {
                let f = if s.ty(k, e)? == Elem::F32x4 {
                    "tf_fma4"
                } else {
                    "fmaf"
                };
                format!(
                    "{f}({}, {}, {})",
                    self.expr(s, a)?,
                    self.expr(s, b)?,
                    self.expr(s, c)?
                )
            }
            Expr::Subgroup(SubgroupOp::Broadcast(l), a) => {
                format!("tf_bcast8({}, {l})", self.expr(s, a)?)
            }
            Expr::Subgroup(op, a) => {
                let f = match op {
                    SubgroupOp::Sum => "tf_warp_sum",
                    SubgroupOp::Max => "tf_warp_max",
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
        let c = if mutable { "" } else { "const " };
        Ok(format!("{c}{} {n} = {v};", ty(e)))
    }

    fn local_array(&self, n: &str, e: Elem, len: u32) -> Result<Vec<String>, CodegenError> {
        let zero = if e == Elem::F32x4 {
            "make_float4(0.0f, 0.0f, 0.0f, 0.0f)".to_string()
        } else {
            format!("({})0", ty(e))
        };
        Ok(vec![
            format!("{} {n}[{len}];", ty(e)),
            format!(
                "for (unsigned int tf_i = 0u; tf_i < {len}u; ++tf_i) {{ {n}[tf_i] = {zero}; }}"
            ),
        ])
    }

    fn store(&self, _mem: Mem, arr: &str, i: &str, v: &str) -> String {
        format!("{arr}[{i}] = {v};")
    }

    fn for_header(&self, var: &str, a: &str, b: &str, c: &str) -> String {
        format!("for (unsigned int {var} = {a}; {var} < {b}; {var} += {c}) {{")
    }

    fn barrier(&self) -> &'static str {
        "__syncthreads();"
    }
}

/// Prints `k` as a self-contained CUDA C translation unit.
pub fn print(k: &Kernel) -> Result<String, CodegenError> {
    let mut p = P {
        k,
        out: String::new(),
    };
    let _ = writeln!(
        p.out,
        "// {}: generated by transfuse-codegen; do not edit.",
        k.name
    );
    if k.uses(Elem::F16) {
        p.out.push_str("#include <cuda_fp16.h>\n");
    }
    if k.uses(Elem::BF16) {
        p.out.push_str("#include <cuda_bf16.h>\n");
    }
    if k.any_expr(&|e| matches!(e, Expr::Subgroup(..))) {
        p.out.push_str(
            "__device__ __forceinline__ float tf_warp_sum(float v) {\n    \
             for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n    \
             return v;\n}\n\
             __device__ __forceinline__ float tf_warp_max(float v) {\n    \
             for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));\n    \
             return v;\n}\n\
             __device__ __forceinline__ float tf_bcast8(float v, int l) {\n    \
             return __shfl_sync(__activemask(), v, l, 8);\n}\n",
        );
    }
    if k.uses(Elem::F32x4) {
        p.out.push_str(VEC4);
        if k.any_expr(&|e| matches!(e, Expr::Fma(..))) {
            p.out.push_str(
                "__device__ __forceinline__ float4 tf_fma4(float4 a, float4 b, float4 c) { return \
                 make_float4(fmaf(a.x, b.x, c.x), fmaf(a.y, b.y, c.y), fmaf(a.z, b.z, c.z), \
                 fmaf(a.w, b.w, c.w)); }\n",
            );
        }
        if k.any_expr(&|e| matches!(e, Expr::Subgroup(..))) {
            p.out.push_str(
                "__device__ __forceinline__ float4 tf_bcast8(float4 v, int l) {\n    \
                 return make_float4(tf_bcast8(v.x, l), tf_bcast8(v.y, l), tf_bcast8(v.z, l), \
                 tf_bcast8(v.w, l));\n}\n",
            );
        }
        if k.uses(Elem::F16) {
            p.out.push_str(
                "__device__ __forceinline__ float4 tf_ld4(const __half* p) { return \
                 make_float4(__half2float(p[0]), __half2float(p[1]), __half2float(p[2]), \
                 __half2float(p[3])); }\n",
            );
        }
        if k.uses(Elem::BF16) {
            p.out.push_str(
                "__device__ __forceinline__ float4 tf_ld4(const __nv_bfloat16* p) { return \
                 make_float4(__bfloat162float(p[0]), __bfloat162float(p[1]), \
                 __bfloat162float(p[2]), __bfloat162float(p[3])); }\n",
            );
        }
    }
    let mut params: Vec<String> = k
        .buffers
        .iter()
        .map(|b| {
            let c = if b.access == Access::Read {
                "const "
            } else {
                ""
            };
            format!("{c}{}* __restrict__ {}", ty(b.elem), b.name)
        })
        .collect();
    params.extend(k.uniforms.iter().map(|u| format!("unsigned int {u}")));
    let _ = writeln!(
        p.out,
        "extern \"C\" __global__ void __launch_bounds__({}) {}({}) {{",
        k.threads(),
        k.name,
        params.join(", ")
    );
    for sh in &k.shared {
        let _ = writeln!(
            p.out,
            "    __shared__ {} {}[{}];",
            ty(sh.elem),
            sh.name,
            sh.len
        );
    }
    let mut scope = Scope::of(k);
    let mut body = String::new();
    crate::print::stmts(&p, &mut body, &mut scope, &k.body, 1)?;
    p.out.push_str(&body);
    p.out.push_str("}\n");
    Ok(p.out)
}
