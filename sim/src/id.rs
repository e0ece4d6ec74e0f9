//! Simulator-minted ids and the stable hashes everything seeded is keyed on: the fixed-size
//! [`Id`] (minting, parsing, string form), `mix64` (seeds, id tails, signatures) and `fnv64`
//! (hashing id strings into seeds).
//!
//! This is the bottom of the simulator's module graph: it depends on no other module. It does not
//! decide which ids exist (the store does) nor what is derived from them (`content`).

/// Length of every simulator-minted id: a 3-letter prefix, `_`, and 12 base62 characters.
pub(crate) const ID_LEN: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A fixed-size ASCII id. Byte order equals string order, so sorting by `Id` is sorting by the
/// id string, which is how the API breaks `created_at` ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Id([u8; ID_LEN]);

impl Id {
    /// Mints the `seq`-th id. The 11-character tail is a bijective mix of `seq`, so distinct
    /// sequence numbers can never collide, while the ids look random and carry no time order.
    pub(crate) fn mint(prefix: &[u8; 3], seq: u64, key: u64) -> Id {
        let mut bytes = [0u8; ID_LEN];
        bytes[..3].copy_from_slice(prefix);
        bytes[3] = b'_';
        bytes[4] = BASE62[(mix64(seq ^ key.rotate_left(29)) % 62) as usize];
        // 62^11 > 2^64, so 11 digits hold any u64 and the encoding stays injective.
        let mut value = mix64(seq.wrapping_add(key));
        for byte in bytes[5..].iter_mut().rev() {
            *byte = BASE62[(value % 62) as usize];
            value /= 62;
        }
        Id(bytes)
    }

    /// Interprets a path segment as an id; anything of the wrong length cannot exist.
    pub(crate) fn parse(text: &str) -> Option<Id> {
        <[u8; ID_LEN]>::try_from(text.as_bytes()).ok().map(Id)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Minted ids are ASCII and parsed ids come from a `&str` of exactly this length.
        std::str::from_utf8(&self.0).expect("ids are valid UTF-8")
    }
}

/// SplitMix64's finalizer: a bijection on `u64` with good avalanche, used for ids and seeds.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash (unlike `DefaultHasher`, guaranteed not to change between Rust releases),
/// so derived text depends only on the seed and the id.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_unique_fixed_length_and_not_time_ordered() {
        let key = mix64(42);
        let ids: Vec<Id> = (0..10_000).map(|seq| Id::mint(b"enc", seq, key)).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.iter().all(|id| id.as_str().starts_with("enc_")));
        assert!(
            ids.windows(2).any(|w| w[0] > w[1]),
            "ids must not follow minting order"
        );
    }
}
