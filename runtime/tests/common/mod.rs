//! Helpers shared by the runtime's integration tests.

/// `n` deterministic pseudo-random values in `[-scale, scale)` from `seed` (an LCG; the high
/// 24 bits of each state), so a failing case reproduces exactly.
pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
