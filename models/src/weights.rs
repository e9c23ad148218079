//! Reading weights from `.safetensors` files into host [`Tensor`]s.
//!
//! The file is memory-mapped and parsed with the `safetensors` crate; only the tensors a model
//! asks for are converted (to f32), so buffers stored next to the weights (BERT's
//! `embeddings.position_ids`, GPT-2's `attn.bias`, a tied `lm_head.weight`) cost nothing.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use transfuse_ir::{DType, Tensor, Weights};

use crate::error::ModelError;

/// Loads the `expected` weights `(canonical name, shape)` from the safetensors file at `path`.
///
/// Each weight is looked up under its canonical name first, then under `prefix + name` for
/// each of `prefixes` in order (checkpoints of the same model come with and without a
/// `transformer.` / `bert.` prefix). F32, F16 and BF16 tensors are converted to f32; tensors
/// of the file that are not expected are ignored. The result is keyed by canonical name.
///
/// Errors: [`ModelError::Io`] if the file cannot be opened or mapped,
/// [`ModelError::Safetensors`] if it is truncated or its header is corrupt,
/// [`ModelError::MissingWeight`], [`ModelError::WeightShape`] and [`ModelError::WeightDtype`]
/// for a weight that is absent, has another shape, or another dtype.
pub fn load_safetensors(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    prefixes: &[&str],
) -> Result<Weights, ModelError> {
    load_safetensors_as(path, expected, prefixes, DType::F32)
}

/// [`load_safetensors`] with the float weights held as `float` (`F32`, `F16` or `BF16`): a
/// tensor already in that type is copied as is (an f16 checkpoint for f16 storage is never
/// widened), any other float tensor is converted once (an f32 checkpoint for f16 storage is
/// rounded to nearest here, at load). For a device that stores floats as `float`; the CPU
/// backend widens f16/bf16 weights to f32 itself.
pub fn load_safetensors_as(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    prefixes: &[&str],
    float: DType,
) -> Result<Weights, ModelError> {
    let mmap = map_file(path)?;
    let st = deserialize(path, &mmap)?;
    let mut weights = Weights::with_capacity(expected.len());
    for (name, shape) in expected {
        let view = std::iter::once(name.clone())
            .chain(prefixes.iter().map(|p| format!("{p}{name}")))
            .find_map(|key| st.tensor(&key).ok())
            .ok_or_else(|| ModelError::MissingWeight {
                path: path.to_owned(),
                name: name.clone(),
            })?;
        if view.shape() != shape.as_slice() {
            return Err(ModelError::WeightShape {
                path: path.to_owned(),
                name: name.clone(),
                found: view.shape().to_vec(),
                expected: shape.clone(),
            });
        }
        let t = to_float(view.dtype(), view.data(), shape.clone(), float).ok_or_else(|| {
            ModelError::WeightDtype {
                path: path.to_owned(),
                name: name.clone(),
                dtype: view.dtype().to_string(),
            }
        })?;
        weights.insert(name.clone(), Arc::new(t));
    }
    Ok(weights)
}

/// Which part of a checkpoint tensor one rank of a tensor-parallel group reads: along `axis`,
/// the concatenation of `ranges` of the axis padded (with zero rows) to `padded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AxisSlice {
    /// The split axis.
    pub axis: usize,
    /// `[start, end)` ranges of the padded axis, in order.
    pub ranges: Vec<(usize, usize)>,
    /// The padded axis length (≥ the tensor's).
    pub padded: usize,
}

/// One weight to read: the graph's `name`, the checkpoint's `source` tensor of `shape`, and
/// the rank's slice of it (`None`: all of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRequest {
    /// Name in the graph (and the result).
    pub name: String,
    /// Canonical name in the checkpoint.
    pub source: String,
    /// The checkpoint tensor's full shape.
    pub shape: Vec<usize>,
    /// The slice, if sharded.
    pub slice: Option<AxisSlice>,
}

/// What a sliced load read and keeps, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Bytes copied out of the mapped file (the checkpoint's dtype).
    pub bytes_read: u64,
    /// f32 bytes of the sharded weights this rank holds.
    pub sharded_resident: u64,
    /// f32 bytes of the replicated weights this rank holds.
    pub replicated_resident: u64,
}

impl LoadStats {
    /// All resident f32 bytes.
    pub fn resident(&self) -> u64 {
        self.sharded_resident + self.replicated_resident
    }
}

/// Loads only this rank's slices of the requested weights from the memory-mapped file: a
/// sharded tensor's other rows are never touched, so each rank reads about its share of the
/// checkpoint. Names, prefixes and errors as [`load_safetensors`].
pub fn load_safetensors_sliced(
    path: &Path,
    requests: &[SliceRequest],
    prefixes: &[&str],
) -> Result<(Weights, LoadStats), ModelError> {
    let mmap = map_file(path)?;
    let st = deserialize(path, &mmap)?;
    let mut weights = Weights::with_capacity(requests.len());
    let mut stats = LoadStats::default();
    for req in requests {
        let view = std::iter::once(req.source.clone())
            .chain(prefixes.iter().map(|p| format!("{p}{}", req.source)))
            .find_map(|key| st.tensor(&key).ok())
            .ok_or_else(|| ModelError::MissingWeight {
                path: path.to_owned(),
                name: req.source.clone(),
            })?;
        if view.shape() != req.shape.as_slice() {
            return Err(ModelError::WeightShape {
                path: path.to_owned(),
                name: req.source.clone(),
                found: view.shape().to_vec(),
                expected: req.shape.clone(),
            });
        }
        let dtype_err = || ModelError::WeightDtype {
            path: path.to_owned(),
            name: req.source.clone(),
            dtype: view.dtype().to_string(),
        };
        let es = match view.dtype() {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            _ => return Err(dtype_err()),
        };
        let bytes = view.data();
        let (shape, data) = match &req.slice {
            None => {
                stats.bytes_read += bytes.len() as u64;
                (
                    req.shape.clone(),
                    to_f32(view.dtype(), bytes).ok_or_else(dtype_err)?,
                )
            }
            Some(sl) => {
                let len = req.shape[sl.axis];
                let outer: usize = req.shape[..sl.axis].iter().product();
                let inner: usize = req.shape[sl.axis + 1..].iter().product();
                let rows: usize = sl.ranges.iter().map(|(s, e)| e - s).sum();
                let mut out = Vec::with_capacity(outer * rows * inner);
                for o in 0..outer {
                    for &(s, e) in &sl.ranges {
                        let (a, b) = (s.min(len), e.min(len));
                        let at = (o * len + a) * inner * es;
                        let chunk = &bytes[at..at + (b - a) * inner * es];
                        stats.bytes_read += chunk.len() as u64;
                        out.extend(to_f32(view.dtype(), chunk).ok_or_else(dtype_err)?);
                        // Rows past the tensor: the vocabulary padding, zeros.
                        out.resize(out.len() + (e - s - (b - a)) * inner, 0.0);
                    }
                }
                let mut shape = req.shape.clone();
                shape[sl.axis] = rows;
                (shape, out)
            }
        };
        let resident = 4 * data.len() as u64;
        match req.slice {
            Some(_) => stats.sharded_resident += resident,
            None => stats.replicated_resident += resident,
        }
        weights.insert(req.name.clone(), Arc::new(Tensor::f32(shape, data)));
    }
    Ok((weights, stats))
}

/// The names of the tensors a safetensors file holds.
pub fn safetensors_names(path: &Path) -> Result<Vec<String>, ModelError> {
    let mmap = map_file(path)?;
    let st = deserialize(path, &mmap)?;
    Ok(st.names().into_iter().map(|s| s.to_string()).collect())
}

/// Reads every tensor of a safetensors file (e.g. reference inputs and outputs), keyed by its
/// name in the file: floating-point dtypes (F32, F16, BF16) become f32, integer dtypes
/// (I64, I32, I16, I8, U32, U16, U8) become i64, BOOL becomes bool.
///
/// Errors as [`load_safetensors`]; any other dtype (F64, U64, FP8, ...) is a
/// [`ModelError::WeightDtype`].
pub fn load_all_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    let mmap = map_file(path)?;
    let st = deserialize(path, &mmap)?;
    let mut out = HashMap::with_capacity(st.len());
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let tensor = if let Some(v) = to_f32(view.dtype(), bytes) {
            Tensor::f32(shape, v)
        } else if let Some(v) = to_i64(view.dtype(), bytes) {
            Tensor::i64(shape, v)
        } else if view.dtype() == Dtype::BOOL {
            Tensor::bool(shape, bytes.iter().map(|&b| b != 0).collect())
        } else {
            return Err(ModelError::WeightDtype {
                path: path.to_owned(),
                name: name.to_owned(),
                dtype: view.dtype().to_string(),
            });
        };
        out.insert(name.to_owned(), tensor);
    }
    Ok(out)
}

/// Memory-maps a file; files shorter than the 8-byte header length are rejected before
/// mapping.
fn map_file(path: &Path) -> Result<Mmap, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(ModelError::Safetensors {
            path: path.to_owned(),
            msg: format!("file is {len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: the mapping is read-only and lives only while the file is being loaded; as with
    // any memory-mapped file, another process truncating or rewriting it meanwhile is outside
    // what this loader can guard against.
    unsafe { Mmap::map(&file) }.map_err(io)
}

fn deserialize<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, ModelError> {
    use safetensors::SafeTensorError as E;
    SafeTensors::deserialize(bytes).map_err(|e| {
        let msg = match e {
            E::MetadataIncompleteBuffer | E::InvalidHeaderLength => format!(
                "file is truncated or corrupt ({} bytes do not cover its header's tensors): {e}",
                bytes.len()
            ),
            e => e.to_string(),
        };
        ModelError::Safetensors {
            path: path.to_owned(),
            msg,
        }
    })
}

/// Little-endian F32/F16/BF16 bytes as a tensor of `float` (F32, F16 or BF16): copied when
/// the types agree, else converted (through f32, exact for the widening); `None` for other
/// dtypes.
fn to_float(dtype: Dtype, bytes: &[u8], shape: Vec<usize>, float: DType) -> Option<Tensor> {
    let pairs = || bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
    Some(match (dtype, float) {
        (Dtype::F16, DType::F16) => {
            Tensor::f16(shape, pairs().map(half::f16::from_le_bytes).collect())
        }
        (Dtype::BF16, DType::BF16) => {
            Tensor::bf16(shape, pairs().map(half::bf16::from_le_bytes).collect())
        }
        (_, DType::F16) => Tensor::f16(
            shape,
            to_f32(dtype, bytes)?
                .into_iter()
                .map(half::f16::from_f32)
                .collect(),
        ),
        (_, DType::BF16) => Tensor::bf16(
            shape,
            to_f32(dtype, bytes)?
                .into_iter()
                .map(half::bf16::from_f32)
                .collect(),
        ),
        _ => Tensor::f32(shape, to_f32(dtype, bytes)?),
    })
}

/// Little-endian F32/F16/BF16 bytes as f32; `None` for other dtypes.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Little-endian integer bytes as i64; `None` for non-integer dtypes and U64.
fn to_i64(dtype: Dtype, bytes: &[u8]) -> Option<Vec<i64>> {
    fn conv<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> i64) -> Vec<i64> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N bytes")))
            .collect()
    }
    Some(match dtype {
        Dtype::I64 => conv(bytes, i64::from_le_bytes),
        Dtype::I32 => conv(bytes, |b| i32::from_le_bytes(b).into()),
        Dtype::U32 => conv(bytes, |b| u32::from_le_bytes(b).into()),
        Dtype::I16 => conv(bytes, |b| i16::from_le_bytes(b).into()),
        Dtype::U16 => conv(bytes, |b| u16::from_le_bytes(b).into()),
        Dtype::I8 => conv(bytes, |b: [u8; 1]| i8::from_le_bytes(b).into()),
        Dtype::U8 => conv(bytes, |b: [u8; 1]| b[0].into()),
        _ => return None,
    })
}
