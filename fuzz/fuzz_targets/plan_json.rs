//! plan.json round trip: a random well-typed graph (optimized or not) lowered for CUDA or WGSL
//! in f32 or f16 either lowers or is refused with an error (never a panic); every kernel of a
//! plan prints; its plan.json, with and without dims, serialises and parses back to the same
//! value.
#![no_main]

use std::time::Duration;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use transfuse::codegen::kir::Elem;
use transfuse::codegen::lower::{lower, LowerOptions, Target};
use transfuse::passes::{optimize, Options};
use transfuse_fuzz::case;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let Ok(c) = case(&mut u) else {
        return;
    };
    let g = if mode & 1 == 1 {
        let opts = Options {
            node_limit: 20_000,
            iter_limit: 12,
            time_limit: Duration::from_secs(5),
            ..Options::default()
        };
        optimize(&c.graph, &opts).expect("optimize").0
    } else {
        c.graph.clone()
    };
    let target = if mode & 2 == 2 {
        Target::Cuda
    } else {
        Target::Wgsl
    };
    let elem = if mode & 4 == 4 { Elem::F16 } else { Elem::F32 };
    let Ok(plan) = lower(&g, &LowerOptions::new(target, elem)) else {
        return;
    };
    for k in &plan.kernels {
        target
            .print(&k.gen.kernel)
            .expect("a lowered kernel prints");
        if let Some(v) = &k.decode {
            target
                .print(&v.gen.kernel)
                .expect("a decode variant prints");
        }
    }
    for dims in [None, Some(&c.bindings)] {
        let v = plan.to_json(dims);
        let text = serde_json::to_string_pretty(&v).expect("plan JSON serialises");
        let back: serde_json::Value = serde_json::from_str(&text).expect("plan JSON parses");
        assert_eq!(back, v, "plan.json round trip");
    }
});
