//! One stable hash for what must hash alike in every process and release: consistent-hashing
//! keys (every proxy maps a key to the same endpoint), resource versions (a reconnecting proxy
//! with nothing changed receives nothing), and the config hash that rolls a Deployment.

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_published_test_vectors_hold() {
        // FNV-1a 64 of "" and "a" (from the algorithm's reference).
        assert_eq!(super::fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63dc4c8601ec8c);
    }
}
