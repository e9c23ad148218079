//! Optimizer compile time on BERT-base-sized graphs (hidden 768, 12 heads, vocab 30522) at 12,
//! 24 and 48 layers, from the config alone; the cost should grow linearly with depth.
//!
//! `cargo bench --bench compile`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use transfuse::models::{bert, BertConfig, BertHeads};
use transfuse::passes::{optimize, Options};

/// A BERT-base config with `layers` layers.
pub fn bert_base(layers: usize) -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 768,
        num_hidden_layers: layers,
        num_attention_heads: 12,
        intermediate_size: 3072,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        hidden_act: transfuse::models::Activation::GeluErf,
        layer_norm_eps: 1e-12,
    }
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("optimize_bert_base");
    g.sample_size(10);
    for layers in [12, 24, 48] {
        let graph = bert::build_graph(
            &bert_base(layers),
            BertHeads {
                pooler: true,
                ..Default::default()
            },
        )
        .unwrap();
        let (_, report) = optimize(&graph, &Options::default()).unwrap();
        eprintln!(
            "{layers} layers: {} nodes in, e-graph {} nodes / {} classes, {} iterations, {}, ops after: attention {} layer_norm {}",
            graph.len(),
            report.egraph.nodes,
            report.egraph.classes,
            report.egraph.iterations,
            report.egraph.stop_reason,
            report.ops_after.get("attention").unwrap_or(&0),
            report.ops_after.get("layer_norm").unwrap_or(&0),
        );
        g.bench_with_input(BenchmarkId::from_parameter(layers), &graph, |b, graph| {
            b.iter(|| optimize(graph, &Options::default()).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
