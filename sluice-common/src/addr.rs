//! Address families and the address words every key and rule compares.
//! `Family` is the counters' and flow records' encoding (0/1/2); keys and
//! rules store the IP version (4/6), which `Family::version` gives.

/// Network-layer family of a packet, as the counters see it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Not IP, or an Ethernet/VLAN header too short to tell.
    Other = 0,
    V4 = 1,
    V6 = 2,
}

pub const FAMILY_SLOTS: u32 = 3;

impl Family {
    pub const ALL: [Self; 3] = [Self::Other, Self::V4, Self::V6];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// The family as rules, source keys and LB keys store it: 4, 6, or 0
    /// when not IP.
    #[must_use]
    #[inline(always)]
    pub const fn version(self) -> u8 {
        match self {
            Self::V4 => 4,
            Self::V6 => 6,
            Self::Other => 0,
        }
    }
}

/// The words a rule compares for an address: IPv4 is zero-padded to 16 bytes.
#[must_use]
pub fn addr_words(addr: &[u8; 16]) -> [u64; 2] {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&addr[..8]);
    lo.copy_from_slice(&addr[8..]);
    [u64::from_ne_bytes(hi), u64::from_ne_bytes(lo)]
}

/// The inverse of [`addr_words`]: the address bytes (IPv4 in the first 4).
#[must_use]
#[inline(always)]
pub fn words_bytes(w: [u64; 2]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_ne_bytes());
    b[8..].copy_from_slice(&w[1].to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        let a: [u8; 16] = core::array::from_fn(|i| i as u8 * 7);
        assert_eq!(words_bytes(addr_words(&a)), a);
    }

    #[test]
    fn versions() {
        assert_eq!(Family::V4.version(), 4);
        assert_eq!(Family::V6.version(), 6);
        assert_eq!(Family::Other.version(), 0);
    }
}
