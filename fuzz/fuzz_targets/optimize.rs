//! The optimizer on random well-typed graphs (`transfuse_fuzz::case`): optimizing never fails
//! or panics, and the optimized graph (weights folded, as a session does) gives the
//! unoptimized graph's CPU results within `TOL · (1 + |x|)` wherever those are finite.
#![no_main]

use std::time::Duration;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use transfuse::ir::to_text;
use transfuse::passes::{optimize, Options, Profile};
use transfuse::runtime::{fold_weights, Backend, CpuBackend};
use transfuse_fuzz::{case, mismatches};

const TOL: f32 = 2e-3;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(c) = case(&mut u) else {
        return;
    };
    let cpu = CpuBackend::new();
    let want = cpu
        .load(&c.graph, &c.weights)
        .and_then(|mut l| l.run(&c.inputs, &[]))
        .unwrap_or_else(|e| panic!("unoptimized graph fails: {e}\n{}", to_text(&c.graph)));
    let opts = Options {
        node_limit: 20_000,
        iter_limit: 12,
        time_limit: Duration::from_secs(5),
        profile: if data.first().is_some_and(|b| b & 1 == 1) {
            Profile::cpu()
        } else {
            Profile::gpu()
        },
        ..Options::default()
    };
    let (opt, _) = optimize(&c.graph, &opts)
        .unwrap_or_else(|e| panic!("optimize fails: {e}\n{}", to_text(&c.graph)));
    let (fg, fw) = fold_weights(&opt, &c.weights)
        .unwrap_or_else(|e| panic!("fold_weights fails: {e}\n{}", to_text(&opt)));
    let got = cpu
        .load(&fg, &fw)
        .and_then(|mut l| l.run(&c.inputs, &[]))
        .unwrap_or_else(|e| panic!("optimized graph fails: {e}\n{}", to_text(&fg)));
    let bad = mismatches(&want, &got, TOL);
    assert!(
        bad.is_empty(),
        "optimized differs from unoptimized at {} elements, first {:?}\nbefore:\n{}\nafter:\n{}",
        bad.len(),
        &bad[..bad.len().min(4)],
        to_text(&c.graph),
        to_text(&fg)
    );
});
