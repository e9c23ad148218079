//! Compile time from config.json alone. `optimize_bert_base`: the optimizer on BERT-base-sized
//! graphs (hidden 768, 12 heads, vocab 30522) at 12, 24 and 48 layers (the cost should grow
//! linearly with depth). `whole_compile`: config.json → graph → optimize → lower → print every
//! kernel (decode variants included) for both CUDA and WGSL, for BERT-base and GPT-2 XL
//! (48 layers, hidden 1600, 25 heads) — what `transfuse compile --target` does before writing.
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

const BERT_BASE_JSON: &str = r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
  "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
  "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
  "layer_norm_eps": 1e-12}"#;

const GPT2_XL_JSON: &str = r#"{"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1600,
  "n_layer": 48, "n_head": 25, "n_positions": 1024, "n_inner": null,
  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}"#;

/// config.json in `dir` → source text of every kernel for both targets; returns the number of
/// kernel sources.
fn whole(dir: &std::path::Path) -> usize {
    use transfuse::codegen::kir::Elem;
    use transfuse::codegen::lower::{lower, LowerOptions, Target};
    let cfg = transfuse::models::load_config(dir).unwrap();
    let graph = transfuse::models::build_graph(&cfg, BertHeads::default()).unwrap();
    let (opt, _) = optimize(&graph, &Options::default()).unwrap();
    let mut sources = 0;
    for target in [Target::Cuda, Target::Wgsl] {
        let plan = lower(&opt, &LowerOptions::new(target, Elem::F32)).unwrap();
        for k in &plan.kernels {
            sources += target.print(&k.gen.kernel).unwrap().len().min(1);
            if let Some(v) = &k.decode {
                sources += target.print(&v.gen.kernel).unwrap().len().min(1);
            }
        }
    }
    sources
}

fn whole_compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("whole_compile");
    g.sample_size(10);
    for (name, json) in [("bert_base", BERT_BASE_JSON), ("gpt2_xl", GPT2_XL_JSON)] {
        let dir =
            std::env::temp_dir().join(format!("transfuse-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        eprintln!("{name}: {} kernel sources (cuda + wgsl)", whole(&dir));
        g.bench_function(name, |b| b.iter(|| whole(&dir)));
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

criterion_group!(benches, compile, whole_compile);
criterion_main!(benches);
