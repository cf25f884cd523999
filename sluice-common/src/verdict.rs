//! The verdict vocabulary shared by every stage and by user space: what
//! happens to a packet, why, and the `COUNTERS` layout they index.

use crate::{
    addr::{FAMILY_SLOTS, Family},
    packet::{L4, L4_SLOTS},
};

/// What happens to a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Pass = 0,
    Drop = 1,
    /// Passed because the policy (or the rule) is in audit mode, but the
    /// policy would have dropped it.
    Audit = 2,
}

/// Verdict slots in the counter layout.
pub const VERDICT_SLOTS: u32 = 3;

impl Verdict {
    pub const ALL: [Self; 3] = [Self::Pass, Self::Drop, Self::Audit];

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Pass),
            1 => Some(Self::Drop),
            2 => Some(Self::Audit),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Audit => "audit",
        }
    }
}

/// Why a packet got its verdict. Indexes the counters and tags flow records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Nothing matched: the default action applied.
    Default = 0,
    /// The source matched the allow list.
    AllowList = 1,
    /// The source matched the deny list.
    DenyList = 2,
    /// An L4 rule matched.
    Rule = 3,
    /// The frame could not be parsed: the malformed-frame action applied.
    Malformed = 4,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): always passed.
    NotIp = 5,
    /// Over the rate of a `limit` rule.
    RateLimit = 6,
    /// SYN defence: a SYN from an unverified source while a `syn-guard`
    /// rule's rate was exceeded (answered with a challenge), or the answer to
    /// a challenge (consumed once it verified the source).
    SynDefence = 7,
    /// A per-source `limit` rule could not give the source its own bucket
    /// (new-source rate cap reached, or the table refused the insert) and the
    /// shared overflow bucket was empty.
    MapFull = 8,
    /// Addressed to a load-balanced service that has no usable backend (or,
    /// in DSR mode, whose backend's neighbour entry is unknown).
    NoBackend = 9,
    /// An IP fragment addressed to a load-balanced service: sluice does not
    /// balance fragments (later fragments carry no ports).
    VipFragment = 10,
    /// sk_lookup steering (`sluice steer`): the connection or datagram was
    /// delivered to a steered service's socket (pass), or refused because
    /// that socket is missing or cannot take it (drop). Socket-layer flow
    /// records only; never in the packet counters.
    Steer = 11,
}

/// Room in the counter layout for reasons added later without a map migration.
pub const REASON_SLOTS: u32 = 16;

impl Reason {
    pub const ALL: [Self; 12] = [
        Self::Default,
        Self::AllowList,
        Self::DenyList,
        Self::Rule,
        Self::Malformed,
        Self::NotIp,
        Self::RateLimit,
        Self::SynDefence,
        Self::MapFull,
        Self::NoBackend,
        Self::VipFragment,
        Self::Steer,
    ];

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Default),
            1 => Some(Self::AllowList),
            2 => Some(Self::DenyList),
            3 => Some(Self::Rule),
            4 => Some(Self::Malformed),
            5 => Some(Self::NotIp),
            6 => Some(Self::RateLimit),
            7 => Some(Self::SynDefence),
            8 => Some(Self::MapFull),
            9 => Some(Self::NoBackend),
            10 => Some(Self::VipFragment),
            11 => Some(Self::Steer),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AllowList => "allow-list",
            Self::DenyList => "deny-list",
            Self::Rule => "rule",
            Self::Malformed => "malformed",
            Self::NotIp => "not-ip",
            Self::RateLimit => "rate-limit",
            Self::SynDefence => "syn-defence",
            Self::MapFull => "map-full",
            Self::NoBackend => "no-backend",
            Self::VipFragment => "vip-fragment",
            Self::Steer => "steer",
        }
    }
}

/// Slots in `COUNTERS`: one per (family, l4, verdict, reason), so each packet
/// costs a single per-CPU increment and user space sums whichever view it shows.
pub const COUNTER_SLOTS: u32 = FAMILY_SLOTS * L4_SLOTS * VERDICT_SLOTS * REASON_SLOTS;

#[must_use]
pub const fn counter_index(family: Family, l4: L4, verdict: Verdict, reason: Reason) -> u32 {
    (((family.slot()) * L4_SLOTS + l4 as u32) * VERDICT_SLOTS + verdict as u32) * REASON_SLOTS
        + reason as u32
}

/// Packets and bytes. Value of the per-CPU `COUNTERS` and `RULE_STATS` arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

// SAFETY: repr(C), Copy, two u64s: no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_unique_and_in_range() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for f in Family::ALL {
            for l in L4::ALL {
                for v in Verdict::ALL {
                    for r in Reason::ALL {
                        let i = counter_index(f, l, v, r) as usize;
                        assert!(i < seen.len());
                        assert!(!seen[i], "duplicate index {i}");
                        seen[i] = true;
                    }
                }
            }
        }
    }

    #[test]
    fn reason_and_verdict_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u32(r as u32), Some(r));
        }
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_u32(v as u32), Some(v));
        }
        assert_eq!(Reason::from_u32(REASON_SLOTS), None);
    }
}
