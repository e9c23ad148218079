use transfuse::models::{bert, BertConfig, BertHeads};
fn main() {
    let layers: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(12);
    let hidden: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(768);
    let cfg = BertConfig {
        vocab_size: 30522,
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 12,
        intermediate_size: 4 * hidden,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        hidden_act: transfuse::models::Activation::GeluErf,
        layer_norm_eps: 1e-12,
    };
    let g = bert::build_graph(
        &cfg,
        BertHeads {
            pooler: true,
            ..Default::default()
        },
    )
    .unwrap();
    let t = std::time::Instant::now();
    let (_o, r) = transfuse::passes::optimize(&g, &transfuse::passes::Options::default()).unwrap();
    println!(
        "{:?}\n{:?}\n{:?}\ncost {} -> {}  total {:?} sat {}",
        r.ops_after,
        r.rules_applied,
        r.egraph,
        r.cost_before,
        r.cost_after,
        t.elapsed(),
        r.egraph.seconds
    );
}
