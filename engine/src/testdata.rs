//! Deterministic, incompressible filler data for `ferry demo` and the tests (xorshift64; not cryptographic).

/// `n` pseudo-random bytes; the same seed always gives the same bytes, different seeds unrelated ones.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_are_independent_and_repeatable() {
        assert_eq!(super::pseudo_random(64, 1), super::pseudo_random(64, 1));
        assert_ne!(super::pseudo_random(64, 2), super::pseudo_random(64, 3));
    }
}
