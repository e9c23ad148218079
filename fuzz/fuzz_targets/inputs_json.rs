//! inputs.json: any bytes through `Batch::from_json_str`, then `Batch::validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transfuse::Batch;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(batch) = Batch::from_json_str(text) {
        let _ = batch.validate();
    }
});
