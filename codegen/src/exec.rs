//! Runs a [`Plan`] on the kernel-IR interpreter: allocates every buffer, launches each kernel
//! in order (its decode variant instead where [`Plan::use_decode`] says so) with the uniforms
//! and grid [`Plan::launch_args_for`] gives, and returns the graph outputs. Slow, exact,
//! device-free: the test of a whole lowering against the CPU reference.

use std::collections::HashMap;

use transfuse_ir::{Bindings, DType, Data, Tensor};

use crate::interp::{self, HostBuf};
use crate::kir::{Access, Elem};
use crate::lower::{BufferKind, Plan, CACHE_CAP};
use crate::CodegenError;

/// Subgroup width the interpreter assumes (CUDA's warp; the templates' `subgroup` tunable).
pub const SUBGROUP: u32 = 32;

/// A host tensor as a buffer of the plan's storage: f32 as f32 (f16/bf16 storage is held as
/// f32 by the interpreter and rounded on store), i64 as i32 (error if out of range), bool as
/// u32.
pub fn host_buf(t: &Tensor) -> Result<HostBuf, CodegenError> {
    Ok(match &t.data {
        Data::F32(v) => HostBuf::F32(v.clone()),
        Data::F16(_) | Data::BF16(_) => HostBuf::F32(t.floats_f32().expect("float").into_owned()),
        Data::I64(v) => HostBuf::I32(
            v.iter()
                .map(|&x| {
                    i32::try_from(x)
                        .map_err(|_| CodegenError::Plan(format!("i64 value {x} exceeds i32")))
                })
                .collect::<Result<_, _>>()?,
        ),
        Data::Bool(v) => HostBuf::U32(v.iter().map(|&b| u32::from(b)).collect()),
    })
}

/// A buffer back as a host tensor of `shape` and `dtype`.
pub fn tensor(b: &HostBuf, shape: Vec<usize>, dtype: DType) -> Tensor {
    match (b, dtype) {
        (HostBuf::F32(v), _) => Tensor::f32(shape, v.clone()),
        (HostBuf::I32(v), DType::I64) => {
            Tensor::i64(shape, v.iter().map(|&x| i64::from(x)).collect())
        }
        (HostBuf::U32(v), DType::Bool) => Tensor::bool(shape, v.iter().map(|&x| x != 0).collect()),
        (HostBuf::I32(v), _) => Tensor::i64(shape, v.iter().map(|&x| i64::from(x)).collect()),
        (HostBuf::U32(v), _) => Tensor::i64(shape, v.iter().map(|&x| i64::from(x)).collect()),
    }
}

fn zeros(e: Elem, n: usize) -> HostBuf {
    match e {
        Elem::I32 => HostBuf::I32(vec![0; n]),
        Elem::U32 | Elem::Bool => HostBuf::U32(vec![0; n]),
        _ => HostBuf::F32(vec![0.0; n]),
    }
}

fn eval(s: &transfuse_ir::Shape, b: &Bindings) -> Result<Vec<usize>, CodegenError> {
    transfuse_ir::eval_shape(s, b).map_err(|e| CodegenError::Plan(e.to_string()))
}

fn buf_len(b: &HostBuf) -> usize {
    match b {
        HostBuf::F32(v) => v.len(),
        HostBuf::U32(v) => v.len(),
        HostBuf::I32(v) => v.len(),
    }
}

/// Runs `plan` (prepare and forward kernels) with `inputs` and `weights` (by graph name) and
/// the dims `bindings`; returns the outputs by name.
pub fn run_plan_interpreted(
    plan: &Plan,
    inputs: &HashMap<String, HostBuf>,
    weights: &HashMap<String, HostBuf>,
    bindings: &Bindings,
) -> Result<HashMap<String, HostBuf>, CodegenError> {
    // A cache's capacity: exactly the output's rows unless the caller bound it.
    let dims = plan.cache_dims(bindings);
    let bindings = &dims;
    let cap = dims.get(CACHE_CAP).copied().unwrap_or(0);
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let bytes_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut mem: HashMap<&str, HostBuf> = HashMap::new();
    for b in &plan.buffers {
        if b.kind == BufferKind::Cache {
            let c = plan
                .caches
                .iter()
                .find(|c| c.buffer == b.name)
                .expect("a cache");
            let io = plan
                .inputs
                .iter()
                .find(|i| i.name == c.input)
                .expect("cache input");
            let shape = eval(&io.shape, bindings)?;
            let h = match inputs.get(&c.input) {
                Some(HostBuf::F32(v)) if v.len() == shape.iter().product::<usize>() => v,
                _ => {
                    return Err(CodegenError::Plan(format!(
                        "missing f32 input `{}` of {shape:?}",
                        c.input
                    )))
                }
            };
            let padded = c.pad(&f32_bytes(h), &shape, cap, 4);
            mem.insert(b.name.as_str(), HostBuf::F32(bytes_f32(&padded)));
            continue;
        }
        let n = b.len().eval_usize(bindings)?;
        let given = |src: &HashMap<String, HostBuf>, what: &str| -> Result<HostBuf, CodegenError> {
            let h = src
                .get(&b.name)
                .ok_or_else(|| CodegenError::Plan(format!("missing {what} `{}`", b.name)))?;
            if buf_len(h) != n {
                return Err(CodegenError::Plan(format!(
                    "{what} `{}` has {} elements, the plan expects {n}",
                    b.name,
                    buf_len(h)
                )));
            }
            let ok = matches!(
                (h, b.elem),
                (HostBuf::F32(_), Elem::F32 | Elem::F16 | Elem::BF16)
                    | (HostBuf::I32(_), Elem::I32)
                    | (HostBuf::U32(_), Elem::U32)
            );
            if !ok {
                return Err(CodegenError::Plan(format!(
                    "{what} `{}` is not stored as {:?}",
                    b.name, b.elem
                )));
            }
            Ok(h.clone())
        };
        let h = match b.kind {
            BufferKind::Input => given(inputs, "input")?,
            BufferKind::Weight => given(weights, "weight")?,
            BufferKind::Const(v) => match zeros(b.elem, n) {
                HostBuf::F32(_) => HostBuf::F32(vec![v as f32; n]),
                HostBuf::I32(_) => HostBuf::I32(vec![v as i32; n]),
                HostBuf::U32(_) => HostBuf::U32(vec![v as u32; n]),
            },
            _ => zeros(b.elem, n),
        };
        mem.insert(b.name.as_str(), h);
    }
    for i in 0..plan.kernels.len() {
        if !plan.launched_at(i, bindings)? {
            continue;
        }
        let decode = plan.use_decode(i, bindings)?;
        let (uniforms, grid) = plan.launch_args_for(i, decode, bindings)?;
        let (gen, binds, _) = plan.kernels[i]
            .launched(decode)
            .expect("checked by launch_args_for");
        let kernel = &gen.kernel;
        // Take each bound buffer out (a buffer bound twice is cloned for its read-only uses).
        let mut bufs = Vec::with_capacity(binds.len());
        let mut owner: Vec<bool> = vec![];
        for (j, name) in binds.iter().enumerate() {
            let first = binds[..j].iter().all(|n| n != name);
            if first {
                let b = mem
                    .remove(name.as_str())
                    .ok_or_else(|| CodegenError::Plan(format!("no buffer `{name}`")))?;
                bufs.push(b);
            } else {
                let src = binds[..j].iter().position(|n| n == name).expect("seen");
                bufs.push(bufs[src].clone());
            }
            owner.push(first);
        }
        let result = interp::run(kernel, grid, &mut bufs, &uniforms, SUBGROUP);
        // Put the buffers back (a written duplicate wins).
        let mut back: HashMap<&str, HostBuf> = HashMap::new();
        for (j, b) in bufs.into_iter().enumerate() {
            let name = binds[j].as_str();
            let written = kernel.buffers[j].access == Access::ReadWrite;
            if owner[j] || written {
                back.insert(name, b);
            }
        }
        for (name, b) in back {
            let key = plan
                .buffers
                .iter()
                .find(|x| x.name == name)
                .map(|x| x.name.as_str())
                .expect("bound buffers exist");
            mem.insert(key, b);
        }
        result?;
    }
    let mut out = HashMap::new();
    for o in &plan.outputs {
        let b = mem
            .remove(o.buffer.as_str())
            .ok_or_else(|| CodegenError::Plan(format!("no output buffer `{}`", o.buffer)))?;
        let b = match (plan.cache_of(&o.name), &b) {
            (Some(c), HostBuf::F32(v)) => {
                let shape = eval(&o.shape, bindings)?;
                HostBuf::F32(bytes_f32(&c.compact(&f32_bytes(v), &shape, cap, 4)))
            }
            _ => b,
        };
        out.insert(o.name.clone(), b);
    }
    Ok(out)
}
