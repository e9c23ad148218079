use transfuse::models::{build_graph, load_config, BertHeads};
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let cfg = load_config(dir.as_ref()).unwrap();
    let g = build_graph(
        &cfg,
        BertHeads {
            pooler: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (o, r) = transfuse_passes::optimize(&g, &transfuse_passes::Options::default()).unwrap();
    println!(
        "before {:?}\nafter {:?}\n{:?}\nrules {:?}\ncost {} -> {}",
        r.ops_before, r.ops_after, r.egraph, r.rules_applied, r.cost_before, r.cost_after
    );
    if std::env::var("SHOW").is_ok() {
        print!("{}", transfuse::ir::to_text(&o));
    }
}
#[allow(dead_code)]
fn unused() {}
