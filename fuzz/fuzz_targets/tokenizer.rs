//! Tokenizer: the GPT-2 byte-level BPE fixture encodes arbitrary bytes (as lossy UTF-8), with
//! and without special tokens, and decodes the ids back; arbitrary ids decode or are refused.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use transfuse::models::Tokenizer;

/// The fixture and its vocabulary size, computed once: `vocab_size` clones the whole vocabulary
/// (50k strings), which done per input held the target at ~60 executions a second.
fn tokenizer() -> &'static (Tokenizer, i64) {
    static T: OnceLock<(Tokenizer, i64)> = OnceLock::new();
    T.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gpt2_tokenizer/tokenizer.json");
        let t = Tokenizer::from_file(&p).expect("the fixture tokenizer loads");
        let vocab = t.vocab_size() as i64;
        (t, vocab)
    })
}

fuzz_target!(|data: &[u8]| {
    let (t, vocab) = tokenizer();
    let vocab = *vocab;
    let text = String::from_utf8_lossy(data);
    for special in [false, true] {
        if let Ok(ids) = t.encode(&text, special) {
            assert!(ids.iter().all(|&i| (0..vocab).contains(&i)), "{ids:?}");
            let back = t.decode(&ids).expect("encoded ids decode");
            // Byte-level BPE is lossless; decoding skips special tokens, so only text without
            // one (`<|endoftext|>`) must come back exactly.
            if !special && !text.contains("<|") {
                assert_eq!(back, text, "round trip");
            }
        }
    }
    let ids: Vec<i64> = data
        .chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            i64::from(i32::from_le_bytes(b))
        })
        .collect();
    let _ = t.decode(&ids);
    let _ = t.encode_batch_padded(&[text.as_ref(), "hello"]);
});
