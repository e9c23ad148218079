//! Sequence parallelism at run time: a sequence-parallel sharded graph reads its per-rank
//! sequence chunk `c = ⌈seq/N⌉` from the input [`SEQ_CHUNK`] (shape `[c]`, values unused), so
//! that its padded sequence `N·c` is a linear dim; [`SeqChunkInput`] supplies it on every call
//! from the length of the input that holds the sequence.

use crate::ir::Tensor;
use crate::passes::shard::{SeqChunk, SEQ_CHUNK};
use crate::runtime::{KernelTime, Loaded, RuntimeError, TensorMap};

/// A [`Loaded`] whose graph reads [`SEQ_CHUNK`]: adds it to the inputs, then runs `inner`.
pub struct SeqChunkInput {
    inner: Box<dyn Loaded>,
    chunk: SeqChunk,
}

impl SeqChunkInput {
    /// `inner` fed the chunk `chunk` describes.
    pub fn new(inner: Box<dyn Loaded>, chunk: SeqChunk) -> SeqChunkInput {
        SeqChunkInput { inner, chunk }
    }

    fn with_chunk(&self, inputs: &TensorMap) -> Result<TensorMap, RuntimeError> {
        let c = &self.chunk;
        let t = inputs
            .get(&c.input)
            .ok_or_else(|| RuntimeError::MissingInput(c.input.clone()))?;
        let len = *t
            .shape
            .get(c.axis)
            .ok_or_else(|| RuntimeError::InputShape {
                name: c.input.clone(),
                expected: format!("a sequence on axis {}", c.axis),
                found: t.shape.clone(),
                why: "rank differs".into(),
            })?;
        let n = c.chunk(len);
        let mut m = inputs.clone();
        m.insert(SEQ_CHUNK.to_string(), Tensor::i64(vec![n], vec![0; n]));
        Ok(m)
    }
}

impl Loaded for SeqChunkInput {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        let m = self.with_chunk(inputs)?;
        self.inner.run(&m, carry)
    }

    fn clear_carry(&mut self) {
        self.inner.clear_carry()
    }

    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        let m = self.with_chunk(inputs)?;
        self.inner.profile(&m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns its inputs' shapes as outputs.
    struct Echo;

    impl Loaded for Echo {
        fn run(
            &mut self,
            inputs: &TensorMap,
            _carry: &[(String, String)],
        ) -> Result<TensorMap, RuntimeError> {
            Ok(inputs.clone())
        }

        fn clear_carry(&mut self) {}

        fn profile(&mut self, _inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
            Ok(vec![])
        }
    }

    fn wrapped() -> SeqChunkInput {
        let chunk = SeqChunk {
            input: "input_ids".into(),
            axis: 1,
            world: 4,
        };
        SeqChunkInput::new(Box::new(Echo), chunk)
    }

    #[test]
    fn the_chunk_is_the_ceiling_of_the_sequence_over_the_degree() {
        let mut l = wrapped();
        for (seq, c) in [(1usize, 1usize), (4, 1), (6, 2), (8, 2), (9, 3)] {
            let ids = Tensor::i64(vec![2, seq], vec![0; 2 * seq]);
            let out = l
                .run(&TensorMap::from([("input_ids".to_string(), ids)]), &[])
                .unwrap();
            assert_eq!(out[SEQ_CHUNK].shape, vec![c], "seq {seq}");
            assert_eq!(out[SEQ_CHUNK].as_i64().unwrap(), &vec![0; c][..]);
        }
    }

    #[test]
    fn a_missing_or_short_sequence_input_is_a_typed_error() {
        let mut l = wrapped();
        let err = l.run(&TensorMap::new(), &[]).unwrap_err();
        assert!(
            matches!(err, RuntimeError::MissingInput(ref n) if n == "input_ids"),
            "{err}"
        );
        let ids = Tensor::i64(vec![3], vec![0; 3]);
        let err = l
            .run(&TensorMap::from([("input_ids".to_string(), ids)]), &[])
            .unwrap_err();
        assert!(err.to_string().contains("input_ids"), "{err}");
    }
}
