//! config.json: any bytes through `parse_config`; a config that parses builds its graph (or
//! is refused with an error) when its sizes are small enough to build quickly.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use transfuse::models::{build_graph, parse_config, BertHeads, ModelConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = parse_config(Path::new("config.json"), text) else {
        return;
    };
    let small = match &cfg {
        ModelConfig::Bert(c) => c.num_hidden_layers <= 4 && c.hidden_size <= 4096,
        ModelConfig::Gpt2(c) => c.n_layer <= 4 && c.n_embd <= 4096,
        ModelConfig::Llama(c) => c.num_hidden_layers <= 4 && c.hidden_size <= 4096,
    };
    if small {
        let _ = build_graph(&cfg, BertHeads::default());
    }
});
