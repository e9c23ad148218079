//! The pipeline-parallel runner: the stages of a cut graph (`transfuse_passes::pipeline`) as
//! one thread each, passing activations through a [`Communicator`]'s `send`/`recv`.
//!
//! A call splits its inputs along their `batch` axis into `M` micro-batches; stage `s` runs
//! micro-batch `i`, sends what the next stage needs to stage `s + 1` and goes on with `i + 1`
//! while stage `s + 1` works on `i` (sends are buffered, so a stage never waits for its
//! successor). Each stage may itself be a tensor-parallel group ([`crate::tp::TpLoaded`]): P×T
//! ranks. The outputs are the stages' graph outputs, the micro-batches concatenated back
//! along `batch`. A carried output (a KV cache: `present_*` → `past_*`) stays with the stage
//! that computes it (each stage its layers' cache; a tensor-parallel stage each rank its heads');
//! a call that carries a cache (a decoding step) therefore runs as one micro-batch.
//!
//! A stage that fails (an error or a panic) aborts the group: the stages waiting in a `recv`
//! return that error instead of waiting; the call returns the failing stage's own error and the
//! group is reset for the next call. Activations cross stages through host memory (a device
//! stage reads its outputs back and the next uploads them).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use transfuse_ir::{Data, Tensor};

use crate::comm::{Collective, Communicator, InProcessComm};
use crate::{KernelTime, Loaded, RuntimeError, TensorMap};

/// One stage: its loaded graph, what it receives from the stage before and sends to the next.
pub struct PpStage {
    /// The stage's graph on its backend (or a tensor-parallel group).
    pub loaded: Box<dyn Loaded>,
    /// Names of the inputs received from the stage before, in the order they are sent.
    pub recv: Vec<String>,
    /// Names of the values sent to the stage after, in order: outputs, or inputs received and
    /// passed on.
    pub send: Vec<String>,
}

/// The stages of a pipeline run as one [`Loaded`].
pub struct PpLoaded {
    stages: Vec<PpStage>,
    comms: Vec<Arc<InProcessComm>>,
    micro_batches: usize,
    /// The `batch` axis of each input and output that has one.
    batch_axes: HashMap<String, usize>,
}

/// Rows `from..to` of `t` along `axis`.
pub fn slice_axis(t: &Tensor, axis: usize, from: usize, to: usize) -> Tensor {
    let outer: usize = t.shape[..axis].iter().product();
    let len = t.shape[axis];
    let inner: usize = t.shape[axis + 1..].iter().product();
    fn pick<T: Clone>(
        v: &[T],
        outer: usize,
        len: usize,
        inner: usize,
        a: usize,
        b: usize,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * (b - a) * inner);
        for o in 0..outer {
            out.extend_from_slice(&v[(o * len + a) * inner..(o * len + b) * inner]);
        }
        out
    }
    let data = match &t.data {
        Data::F32(v) => Data::F32(pick(v, outer, len, inner, from, to)),
        Data::I64(v) => Data::I64(pick(v, outer, len, inner, from, to)),
        Data::Bool(v) => Data::Bool(pick(v, outer, len, inner, from, to)),
        Data::F16(v) => Data::F16(pick(v, outer, len, inner, from, to)),
        Data::BF16(v) => Data::BF16(pick(v, outer, len, inner, from, to)),
    };
    let mut shape = t.shape.clone();
    shape[axis] = to - from;
    Tensor { shape, data }
}

/// `parts` concatenated along `axis` (equal shapes elsewhere and one dtype: parts of one
/// output).
pub fn concat_axis(parts: &[Tensor], axis: usize) -> Result<Tensor, RuntimeError> {
    let first = &parts[0];
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let mut shape = first.shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    let bad = || RuntimeError::Comm("micro-batch outputs of different shapes or types".into());
    for p in parts {
        if p.shape.len() != first.shape.len()
            || p.shape[..axis] != first.shape[..axis]
            || p.shape[axis + 1..] != first.shape[axis + 1..]
            || p.dtype() != first.dtype()
        {
            return Err(bad());
        }
    }
    fn join<T: Clone>(vs: &[&Vec<T>], lens: &[usize], outer: usize, inner: usize) -> Vec<T> {
        let mut out = Vec::new();
        for o in 0..outer {
            for (v, &l) in vs.iter().zip(lens) {
                out.extend_from_slice(&v[o * l * inner..(o + 1) * l * inner]);
            }
        }
        out
    }
    let lens: Vec<usize> = parts.iter().map(|p| p.shape[axis]).collect();
    // One arm per element type: every part must hold the first part's type.
    macro_rules! joined {
        ($variant:ident) => {{
            let vs = parts
                .iter()
                .map(|p| match &p.data {
                    Data::$variant(v) => Ok(v),
                    _ => Err(bad()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Data::$variant(join(&vs, &lens, outer, inner))
        }};
    }
    let data = match &first.data {
        Data::F32(_) => joined!(F32),
        Data::I64(_) => joined!(I64),
        Data::Bool(_) => joined!(Bool),
        Data::F16(_) => joined!(F16),
        Data::BF16(_) => joined!(BF16),
    };
    Ok(Tensor { shape, data })
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

impl PpLoaded {
    /// Stage `s` is `stages[s]`, sending to stage `s + 1` through `comms[s]`; `batch_axes`
    /// gives the `batch` axis of the inputs and outputs (from the graphs' declared shapes).
    ///
    /// Panics if the two lengths differ or `micro_batches` is 0 (programming errors).
    pub fn new(
        stages: Vec<PpStage>,
        comms: Vec<Arc<InProcessComm>>,
        micro_batches: usize,
        batch_axes: HashMap<String, usize>,
    ) -> PpLoaded {
        assert_eq!(stages.len(), comms.len(), "one communicator per stage");
        assert!(micro_batches >= 1, "at least one micro-batch");
        PpLoaded {
            stages,
            comms,
            micro_batches,
            batch_axes,
        }
    }

    /// The number of stages.
    pub fn stages(&self) -> usize {
        self.stages.len()
    }

    /// The sends and receives each stage ran since the last call of this method.
    pub fn take_logs(&self) -> Vec<Vec<Collective>> {
        self.comms.iter().map(|c| c.take_log()).collect()
    }

    /// `inputs` split into the micro-batches.
    fn split(&self, inputs: &TensorMap, m: usize) -> Result<Vec<TensorMap>, RuntimeError> {
        let mut batch = None;
        for (name, t) in inputs {
            if let Some(&a) = self.batch_axes.get(name) {
                let b = *t
                    .shape
                    .get(a)
                    .ok_or_else(|| RuntimeError::MissingInput(name.clone()))?;
                match batch {
                    None => batch = Some((b, name.clone())),
                    Some((b0, ref n0)) if b0 != b => {
                        return Err(RuntimeError::Comm(format!(
                            "inputs `{n0}` and `{name}` disagree on the batch: {b0} vs {b}"
                        )))
                    }
                    _ => {}
                }
            }
        }
        let b = batch.map_or(1, |(b, _)| b);
        if m > 1 && (b < m || !b.is_multiple_of(m)) {
            return Err(RuntimeError::Comm(format!(
                "--micro-batches {m} does not divide the batch of {b}"
            )));
        }
        let per = b / m;
        let mut parts = vec![TensorMap::new(); m];
        for (name, t) in inputs {
            for (i, p) in parts.iter_mut().enumerate() {
                let v = match self.batch_axes.get(name) {
                    Some(&a) if m > 1 => slice_axis(t, a, i * per, (i + 1) * per),
                    _ => t.clone(),
                };
                p.insert(name.clone(), v);
            }
        }
        Ok(parts)
    }
}

impl Loaded for PpLoaded {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        // Decoding with a KV cache runs one micro-batch: each stage carries its layers' cache
        // for the whole batch.
        let m = match carry.is_empty() {
            true => self.micro_batches,
            false => 1,
        };
        let parts = self.split(inputs, m)?;
        let p = self.stages.len();
        let comms = &self.comms;
        let parts = &parts;
        let results: Vec<Result<Vec<TensorMap>, RuntimeError>> = std::thread::scope(|sc| {
            let handles: Vec<_> = self
                .stages
                .iter_mut()
                .enumerate()
                .map(|(s, stage)| {
                    sc.spawn(move || {
                        let comm = &comms[s];
                        let body = || -> Result<Vec<TensorMap>, RuntimeError> {
                            let mut outs = Vec::with_capacity(m);
                            for part in parts {
                                let mut ins = part.clone();
                                if s > 0 {
                                    for name in &stage.recv {
                                        ins.insert(name.clone(), comm.recv(s - 1)?);
                                    }
                                }
                                let mut out = stage.loaded.run(&ins, carry)?;
                                if s + 1 < p {
                                    for name in &stage.send {
                                        // Computed here, or received and passed on.
                                        let t = out.remove(name).or_else(|| ins.remove(name));
                                        let t = t.ok_or_else(|| {
                                            RuntimeError::MissingInput(format!(
                                                "stage {s} did not output `{name}`"
                                            ))
                                        })?;
                                        comm.send(s + 1, t)?;
                                    }
                                }
                                outs.push(out);
                            }
                            Ok(outs)
                        };
                        let res = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|e| {
                            Err(RuntimeError::Comm(format!(
                                "stage {s} panicked: {}",
                                panic_message(e)
                            )))
                        });
                        if let Err(e) = &res {
                            if !matches!(e, RuntimeError::Comm(_)) || comm.poisoned().is_none() {
                                comm.abort(&format!("pipeline stage {s} failed: {e}"));
                            }
                        }
                        res
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("stage panics are caught"))
                .collect()
        });
        if results.iter().any(|r| r.is_err()) {
            for c in &self.comms {
                c.reset();
            }
            let mut first = None;
            for r in results {
                if let Err(e) = r {
                    if !matches!(e, RuntimeError::Comm(_)) {
                        return Err(e);
                    }
                    first.get_or_insert(e);
                }
            }
            return Err(first.expect("an error"));
        }
        // Per micro-batch, every stage's outputs.
        let mut per_mb: Vec<TensorMap> = vec![TensorMap::new(); m];
        for r in results {
            for (i, out) in r.expect("checked").into_iter().enumerate() {
                per_mb[i].extend(out);
            }
        }
        if m == 1 {
            return Ok(per_mb.pop().expect("one micro-batch"));
        }
        let mut out = TensorMap::new();
        let names: Vec<String> = per_mb[0].keys().cloned().collect();
        for name in names {
            let pieces: Vec<Tensor> = per_mb
                .iter_mut()
                .map(|o| o.remove(&name).expect("every micro-batch has every output"))
                .collect();
            let axis = *self.batch_axes.get(&name).ok_or_else(|| {
                RuntimeError::Comm(format!(
                    "output `{name}` has no batch axis to join {m} micro-batches along"
                ))
            })?;
            out.insert(name, concat_axis(&pieces, axis)?);
        }
        Ok(out)
    }

    fn clear_carry(&mut self) {
        for s in &mut self.stages {
            s.loaded.clear_carry();
        }
    }

    /// Every stage's kernel times, stage after stage on one micro-batch of `inputs`.
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let mut ins = inputs.clone();
        let mut times = Vec::new();
        let p = self.stages.len();
        for (s, stage) in self.stages.iter_mut().enumerate() {
            let mut out = stage.loaded.run(&ins, &[])?;
            times.extend(stage.loaded.profile(&ins)?);
            if s + 1 < p {
                for name in &stage.send {
                    // Computed here, or received and passed on (then already in `ins`).
                    match out.remove(name) {
                        Some(t) => {
                            ins.insert(name.clone(), t);
                        }
                        None if ins.contains_key(name) => {}
                        None => return Err(RuntimeError::MissingInput(name.clone())),
                    }
                }
            }
        }
        Ok(times)
    }
}
