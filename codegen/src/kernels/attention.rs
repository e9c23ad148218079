//! (being written)

use super::Generated;

/// Representative configurations of this family's kernels, for validation tests.
pub fn catalog() -> Vec<Generated> {
    vec![]
}
