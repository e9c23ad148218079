//! safetensors: header and data. Half the inputs are raw bytes; the other half a header built
//! from the input (tensors with arbitrary dtypes, shapes and offsets, consistent or not) over
//! arbitrary data. Both go through `load_all_safetensors` and `load_safetensors` (expecting
//! two weights, one under a prefix) from a file, as the CLI reads them.
#![no_main]

use std::io::Write;
use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use transfuse::models::{load_all_safetensors, load_safetensors};

const DTYPES: [&str; 14] = [
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
    "F8_E4M3",
];

fn file() -> PathBuf {
    std::env::temp_dir().join(format!("transfuse-fuzz-{}.safetensors", std::process::id()))
}

fn built(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let n = u.int_in_range(0usize..=3)?;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for i in 0..n {
        let dtype = *u.choose(&DTYPES)?;
        let rank = u.int_in_range(0usize..=3)?;
        let shape: Vec<usize> = (0..rank)
            .map(|_| u.int_in_range(0usize..=5))
            .collect::<arbitrary::Result<_>>()?;
        let len: usize = u.int_in_range(0usize..=200)?;
        let (start, end) = if u.arbitrary()? {
            (offset, offset + len)
        } else {
            (u.int_in_range(0usize..=300)?, u.int_in_range(0usize..=300)?)
        };
        offset = end.max(offset);
        let name = match i {
            0 => "a".to_string(),
            1 => "p.b".to_string(),
            _ => String::arbitrary(u)?,
        };
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}),
        );
    }
    if u.arbitrary()? {
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    }
    let text = serde_json::to_vec(&header).expect("json");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(u.bytes(u.len())?);
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        match built(&mut Unstructured::new(rest)) {
            Ok(b) => b,
            Err(_) => return,
        }
    };
    let path = file();
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&bytes))
        .expect("write the temp file");
    let _ = load_all_safetensors(&path);
    let expected = vec![("a".to_string(), vec![2, 2]), ("b".to_string(), vec![3])];
    let _ = load_safetensors(&path, &expected, &["p."]);
});
