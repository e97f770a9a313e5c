//! What the proxy, the rate-limit service, the control plane and `mycelctl quota` must agree on
//! about a global limit: how a key's value is named to the service, and how long a counter may
//! remember.

/// Longer key values are sent as their digest.
pub const MAX_KEY_AS_IS: usize = 256;

/// The longest a rate's counter remembers: `burst × perSeconds / requests` (31 days, the
/// longest month).
pub const MAX_MEMORY_SECONDS: u64 = 31 * 86_400;

/// The key as the service is told it: a long value by its SHA-256 (the service bounds what it
/// accepts; two values still count apart). A value that looks like a digest is sent as one too,
/// so that none stands for another.
pub fn counter_key(value: &str) -> String {
    if value.len() <= MAX_KEY_AS_IS && !value.starts_with('#') {
        return value.to_string();
    }
    digest(value)
}

/// `#` and the SHA-256 of `value`, in hex.
pub fn digest(value: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(value.as_bytes());
    let mut out = String::with_capacity(65);
    out.push('#');
    for b in d {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether a rate of `requests` per `per_seconds` with `burst` remembers at most
/// [`MAX_MEMORY_SECONDS`] (computed exactly: every party decides the same at the edge).
pub fn within_memory(requests: u64, per_seconds: u64, burst: u64) -> bool {
    u128::from(burst) * u128::from(per_seconds) <= u128::from(MAX_MEMORY_SECONDS) * u128::from(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_and_digest_lookalikes_are_sent_as_digests() {
        assert_eq!(counter_key("alice"), "alice");
        let long = "x".repeat(MAX_KEY_AS_IS + 1);
        assert_eq!(counter_key(&long).len(), 65);
        assert_ne!(counter_key(&long), counter_key(&"x".repeat(MAX_KEY_AS_IS + 2)));
        let lookalike = counter_key(&long);
        assert_ne!(
            counter_key(&lookalike),
            lookalike,
            "a digest sent as a value is not the value it digests"
        );
        assert_eq!(
            digest("abc"),
            "#ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "SHA-256 of abc (FIPS 180-2's example)"
        );
    }

    #[test]
    fn the_memory_bound_is_exact_at_its_edge() {
        assert!(within_memory(1, 86_400, 31));
        assert!(!within_memory(1, 86_400, 32));
        // Where floating point disagreed with itself: 325 a day with a burst of 10 075.
        assert!(within_memory(325, 86_400, 10_075));
        assert!(!within_memory(325, 86_400, 10_076));
        assert!(!within_memory(1, u64::MAX, u64::MAX), "no overflow");
        assert!(within_memory(u64::MAX, 1, u64::MAX), "no overflow");
    }
}
