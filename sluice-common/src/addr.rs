//! Address families and the address words every key and rule compares.
//!
//! One encoding of a family is stored anywhere: the IP version (4, 6; 0 when
//! not IP), as rules, source keys, LB keys, escalations and flow records
//! hold it ([`Family::version`], [`Family::from_version`]). `Family`'s own
//! discriminant (0/1/2) is only the dense index of the per-family counter
//! slots ([`Family::slot`]), never written into a record or key.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Network-layer family of a packet.
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

    /// The family as every key, rule and record stores it: 4, 6, or 0 when
    /// not IP.
    #[must_use]
    #[inline(always)]
    pub const fn version(self) -> u8 {
        match self {
            Self::V4 => 4,
            Self::V6 => 6,
            Self::Other => 0,
        }
    }

    /// The inverse of [`Family::version`]; anything but 4 and 6 is `Other`.
    #[must_use]
    #[inline(always)]
    pub const fn from_version(v: u8) -> Self {
        match v {
            4 => Self::V4,
            6 => Self::V6,
            _ => Self::Other,
        }
    }

    /// The index of this family's slot in the per-family counters.
    #[must_use]
    #[inline(always)]
    pub const fn slot(self) -> u32 {
        self as u32
    }

    /// The family of an address.
    #[must_use]
    pub const fn of(a: &IpAddr) -> Self {
        match a {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// The words of an IPv4 address (as [`addr_words`] of it zero-padded).
#[must_use]
#[inline(always)]
pub fn v4_words(a: [u8; 4]) -> [u64; 2] {
    let mut hi = [0u8; 8];
    hi[..4].copy_from_slice(&a);
    [u64::from_ne_bytes(hi), 0]
}

/// The IPv4 address held in words (its first 4 bytes).
#[must_use]
#[inline(always)]
pub fn words_v4(w: [u64; 2]) -> [u8; 4] {
    let b = w[0].to_ne_bytes();
    [b[0], b[1], b[2], b[3]]
}

/// An address as keys and records hold it: 16 bytes, IPv4 in the first 4.
#[must_use]
pub fn ip_bytes(a: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b = v.octets(),
    }
    b
}

/// An address as keys and rules compare it (the words of [`ip_bytes`]).
#[must_use]
pub fn ip_words(a: &IpAddr) -> [u64; 2] {
    addr_words(&ip_bytes(a))
}

/// The address stored as `bytes` under IP `version` (4 or 6); `None` for
/// any other version (not IP).
#[must_use]
pub fn ip_from_bytes(version: u8, b: &[u8; 16]) -> Option<IpAddr> {
    match Family::from_version(version) {
        Family::V4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        Family::V6 => Some(IpAddr::V6(Ipv6Addr::from(*b))),
        Family::Other => None,
    }
}

/// [`ip_from_bytes`] for an address held as words.
#[must_use]
pub fn ip_from_words(version: u8, w: [u64; 2]) -> Option<IpAddr> {
    ip_from_bytes(version, &words_bytes(w))
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
        let v4 = [198, 18, 7, 9];
        let mut padded = [0u8; 16];
        padded[..4].copy_from_slice(&v4);
        assert_eq!(v4_words(v4), addr_words(&padded));
        assert_eq!(words_v4(v4_words(v4)), v4);
    }

    #[test]
    fn versions() {
        assert_eq!(Family::V4.version(), 4);
        assert_eq!(Family::V6.version(), 6);
        assert_eq!(Family::Other.version(), 0);
        for f in Family::ALL {
            assert_eq!(Family::from_version(f.version()), f);
        }
        assert_eq!(Family::from_version(1), Family::Other);
        assert_eq!(Family::from_version(2), Family::Other);
    }

    #[test]
    fn addresses_round_trip() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let v6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1));
        for a in [v4, v6] {
            let v = Family::of(&a).version();
            assert_eq!(ip_from_bytes(v, &ip_bytes(&a)), Some(a));
            assert_eq!(ip_from_words(v, ip_words(&a)), Some(a));
        }
        assert_eq!(ip_from_bytes(0, &[0; 16]), None);
        assert_eq!(ip_bytes(&v4)[4..], [0u8; 12]);
    }
}
