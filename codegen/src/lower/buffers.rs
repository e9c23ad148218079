//! Typed buffer ids. Every buffer the lowering makes is a [`BufId`], an index into one table
//! ([`BufferTable`], which becomes [`Plan::buffers`](super::Plan::buffers) in the same order).
//! Views, kernel bindings ([`PlanKernel::buffer_ids`](super::PlanKernel::buffer_ids)), producers
//! and placement refer to buffers by id only; a buffer's name lives in the table alone and is
//! copied into the kernels' [`bindings`](super::PlanKernel::bindings) once, when the plan is
//! finished. So naming a buffer after a graph output (or anything else) cannot leave a stale
//! name behind in some map.

use transfuse_ir::{DType, Shape};

use super::plan::{BufferKind, PlanBuffer, PlanKernel};
use crate::kir::Elem;

/// A buffer of a plan: its index in [`Plan::buffers`](super::Plan::buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufId(pub u32);

impl BufId {
    /// The index in the buffer table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The buffers made so far, by id.
#[derive(Clone, Debug, Default)]
pub(super) struct BufferTable {
    list: Vec<PlanBuffer>,
}

impl BufferTable {
    /// A new buffer; `name` gets a `_1`, `_2`, … suffix if another buffer has it.
    pub(super) fn add(
        &mut self,
        name: String,
        elem: Elem,
        dtype: DType,
        shape: Shape,
        kind: BufferKind,
    ) -> BufId {
        let mut name = name;
        if self.find(&name).is_some() {
            let base = name.clone();
            let mut k = 1;
            while self.find(&name).is_some() {
                name = format!("{base}_{k}");
                k += 1;
            }
        }
        let id = BufId(u32::try_from(self.list.len()).expect("fewer than 2^32 buffers"));
        self.list.push(PlanBuffer {
            name,
            elem,
            dtype,
            shape,
            kind,
        });
        id
    }

    /// Buffer `id`.
    pub(super) fn get(&self, id: BufId) -> &PlanBuffer {
        &self.list[id.index()]
    }

    /// Buffer `id`, to rename it or change its kind.
    pub(super) fn get_mut(&mut self, id: BufId) -> &mut PlanBuffer {
        &mut self.list[id.index()]
    }

    /// The buffer called `name`.
    pub(super) fn find(&self, name: &str) -> Option<BufId> {
        self.list
            .iter()
            .position(|b| b.name == name)
            .map(|i| BufId(i as u32))
    }

    /// Every buffer, in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &PlanBuffer> {
        self.list.iter()
    }

    /// Number of buffers.
    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    /// The buffers, in id order.
    pub(super) fn into_vec(self) -> Vec<PlanBuffer> {
        self.list
    }

    fn names(&self, ids: &[BufId]) -> Vec<String> {
        ids.iter().map(|&b| self.get(b).name.clone()).collect()
    }

    /// Gives `k`'s bindings (and its decode variant's) the names of their buffer ids.
    pub(super) fn name_bindings(&self, k: &mut PlanKernel) {
        k.bindings = self.names(&k.buffer_ids);
        if let Some(v) = k.decode.as_deref_mut() {
            v.bindings = self.names(&v.buffer_ids);
        }
    }
}
