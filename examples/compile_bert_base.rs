//! Optimizes a BERT-base-sized graph built from a config in code (no weights needed) and prints
//! what the optimizer fused and how long it took.
//!
//! `cargo run --release --example compile_bert_base -- [LAYERS] [HIDDEN]` (default 12 768).

use transfuse::models::{bert, Activation, BertConfig, BertHeads};
use transfuse::passes::{optimize, Options};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|s| s.parse::<usize>().expect("a number"));
    let layers = args.next().unwrap_or(12);
    let hidden = args.next().unwrap_or(768);
    let cfg = BertConfig {
        vocab_size: 30522,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 12,
        intermediate_size: 4 * hidden,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        hidden_act: Activation::GeluErf,
        layer_norm_eps: 1e-12,
    };
    let g = bert::build_graph(
        &cfg,
        BertHeads {
            pooler: true,
            ..Default::default()
        },
    )
    .expect("a valid config");
    let (opt, report) =
        optimize(&g, &Options::default()).expect("the optimizer never fails on a valid graph");
    print!("{}", transfuse::report_table(&report));
    println!(
        "{} → {} nodes: {} in {:.1} ms",
        g.len(),
        opt.len(),
        transfuse::fusion_summary(&report),
        report.seconds * 1e3
    );
}
