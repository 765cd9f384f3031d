//! Stable hashing for consistent-hash keys and endpoint placement.
//!
//! Everything here must give the same output in every process and every release: node proxies
//! on different nodes must map a key to the same endpoint, and a change would remap every
//! sticky session. That is why std's randomly seeded `RandomState` is not used.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// 2^64 / golden ratio: spreads consecutive integers over the whole `u64` range.
pub(super) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Stable 64-bit hash of a request attribute (header value, source IP bytes).
///
/// FNV-1a 64 followed by the MurmurHash3 `fmix64` finalizer: FNV-1a alone is fast on the short
/// keys we hash but its high bits avalanche poorly (keys differing in the last byte stay close),
/// which would cluster neighbouring IP addresses on the ring. The output is frozen.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix64(h)
}

/// MurmurHash3 `fmix64`: a bijective avalanche on 64 bits.
///
/// Applied to every caller-supplied hash before use, so that weak hashes (for example a raw
/// IPv4 address as an integer) still spread evenly over the ring or table.
pub(super) fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Maps a hash to a uniform number in [0, 1) (top 53 bits, the f64 mantissa).
pub(super) fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_frozen() {
        // Golden values, computed independently (Python reference of FNV-1a 64 + fmix64).
        // Changing them remaps every sticky session in the mesh.
        assert_eq!(hash_key(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash_key(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(hash_key(b"x-user-42"), 0xadf2_c438_d294_67bf);
        assert_eq!(hash_key(b"10.0.0.1"), 0xc879_e56d_dc6c_5c88);
    }

    #[test]
    fn neighbouring_keys_land_far_apart() {
        // Without the finalizer these differ only in the low bits.
        let a = hash_key(b"10.0.0.1");
        let b = hash_key(b"10.0.0.2");
        assert!((a ^ b).count_ones() > 16, "{a:x} {b:x}");
        assert_ne!(a >> 32, b >> 32);
    }

    #[test]
    fn unit_is_in_range() {
        assert_eq!(unit(0), 0.0);
        assert!(unit(u64::MAX) < 1.0);
    }
}
