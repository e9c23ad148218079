//! Collectives on device buffers ([`DeviceSegments`]): a graph split at its collectives, the
//! segments on wgpu devices (one per rank, lavapipe here), the values that cross a collective
//! left in device buffers and the collectives run on them through [`DeviceComm`] (the
//! in-process group's host-staged defaults here; NCCL on CUDA buffers on a GPU, which
//! `scripts/gpu-check.sh` runs). Every op of the device path — in-place all-reduce, all-gather
//! and reduce-scatter along an inner axis (reordered on the device), shard, root_only, a value
//! read again after an in-place all-reduce — equals the CPU ranks exactly (the same sums in
//! the same order, f32 storage).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use transfuse_ir::{Tensor, Weights};

mod common;
use transfuse_runtime::comm::{Communicator, DeviceComm, InProcessGroup};
use transfuse_runtime::tp::{DeviceSegments, TpLoaded};
use transfuse_runtime::webgpu::WgpuDevice;
use transfuse_runtime::{Backend, CpuBackend, Loaded};

fn required(what: &str) -> bool {
    std::env::var("TRANSFUSE_REQUIRE")
        .map(|v| v.split(',').any(|x| x.trim() == what))
        .unwrap_or(false)
}

#[test]
fn device_collectives_equal_the_cpu_ranks() {
    let world = 2;
    let g = common::dist_chain(world);
    let x = Tensor::f32(vec![2, 4, 6], common::rand_vec(48, 11, 4.0));
    let inputs = HashMap::from([("x".to_string(), x)]);
    let comms = InProcessGroup::ranks(world, Duration::from_secs(20));
    let cpu: Vec<Box<dyn Loaded>> = comms
        .iter()
        .map(|c| {
            CpuBackend::new()
                .with_comm(c.clone())
                .load(&g, &Weights::new())
                .unwrap()
        })
        .collect();
    let want = TpLoaded::new(cpu, comms).run(&inputs, &[]).unwrap();

    let mut devices = Vec::new();
    for _ in 0..world {
        match WgpuDevice::new() {
            Ok(d) => devices.push(Arc::new(d)),
            Err(e) if required("wgpu") => panic!("TRANSFUSE_REQUIRE names wgpu but: {e}"),
            Err(e) => {
                eprintln!("skipped: no wgpu device: {e}");
                return;
            }
        }
    }
    let comms = InProcessGroup::ranks(world, Duration::from_secs(20));
    let mut ranks: Vec<Box<dyn Loaded>> = Vec::new();
    for (d, c) in devices.iter().zip(&comms) {
        let dc: Arc<dyn DeviceComm<WgpuDevice>> = c.clone();
        let hc: Arc<dyn Communicator> = c.clone();
        let l = DeviceSegments::load(d.clone(), &g, &Weights::new(), dc, hc).unwrap();
        // Every collective here reads a computed value: all of them on the device path.
        assert_eq!(l.device_collectives(), (6, 6));
        ranks.push(Box::new(l));
    }
    let mut tp = TpLoaded::new(ranks, comms);
    for round in 0..2 {
        let got = tp.run(&inputs, &[]).unwrap();
        assert_eq!(got.len(), want.len());
        for (k, v) in &want {
            assert_eq!(&got[k], v, "{k} (call {round})");
        }
    }
    // The ranks' logs: the same collectives, in order, as the CPU ranks run them.
    for log in tp.take_logs() {
        let kinds: Vec<_> = log.iter().map(|c| (c.kind, c.elems)).collect();
        use transfuse_runtime::comm::CollectiveKind::*;
        let one = vec![
            (AllReduce, 24),
            (AllGather, 24),
            (ReduceScatter, 48),
            (AllReduce, 24),
        ];
        assert_eq!(kinds, [one.clone(), one].concat());
    }
}
