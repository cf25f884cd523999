//! sk_lookup steering (`sluice steer`): the rule table the `sk_lookup`
//! program of the socket object reads, the destinations (one listening
//! socket each) it delivers to, its counters and map names.

/// Steered services (destinations): each has one slot in `STEER_SOCKS`,
/// `STEER_COOKIES` and `STEER_STATS`. The control plane refuses more.
pub const MAX_STEER_DESTS: u32 = 256;

/// Port ranges one (protocol, prefix) entry holds: its own ranges first,
/// then those of every shorter steered prefix that covers it (longest
/// prefix first), so the longest match alone answers. The control plane
/// refuses a table where an entry would need more.
pub const STEER_RANGES: usize = 8;

/// Trie entries per generation (one per protocol and prefix steered).
pub const STEER_PREFIXES: u32 = 4096;

/// Bits of `SteerKey` before the address: generation, protocol, family.
pub const STEER_KEY_HEAD_BITS: u32 = 24;

/// Data of a `STEER_RULES` LPM key: the generation and protocol and family
/// match whole, then the address bits up to the prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SteerKey {
    pub generation: u8,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Address bytes, IPv4 in the first 4.
    pub addr: [u8; 16],
    pub _pad: u8,
}

// SAFETY: repr(C), Copy, bytes only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteerKey {}

/// `SteerRange::flags`: no socket registered for the destination -> the
/// normal socket lookup runs (default: the connection is refused, so
/// steered traffic never reaches another listener).
pub const STEER_F_PASS_MISSING: u16 = 1 << 0;

/// One port range of an entry and where it steers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerRange {
    /// Ports, inclusive, host order.
    pub lo: u16,
    pub hi: u16,
    /// The destination slot.
    pub dest: u16,
    pub flags: u16,
}

/// Value of `STEER_RULES`: the ranges to try in order (the first that holds
/// the port decides; none: not steered).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerEntry {
    pub n: u32,
    pub ranges: [SteerRange; STEER_RANGES],
}

// SAFETY: repr(C), Copy, integers only, no gap (4 + 8 x 8 bytes).
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteerRange {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteerEntry {}

/// Value of `STEER_DESTS` (by destination slot): the steer that owns the
/// slot and the cookie of the socket registered for it. Kept by the
/// control plane beside the kernel's tables (so a restarted agent finds
/// its slots); the program does not read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerDest {
    /// `SO_COOKIE` of the socket registered; 0: none.
    pub cookie: u64,
    /// Inode of the socket's network namespace.
    pub netns_ino: u64,
    /// The steer's name, NUL-padded; empty: the slot is free.
    pub name: [u8; 32],
    /// What the socket is (checked again when its steer changes): 4 or 6,
    /// IP protocol, a listening TCP socket (1), an IPv6-only socket (1).
    pub family: u8,
    pub proto: u8,
    pub listening: u8,
    pub v6only: u8,
    pub _pad: u32,
}

// SAFETY: repr(C), Copy, integers only, no gap.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SteerDest {}

/// The steering program and the hook it attaches to (a network namespace).
pub const STEER_PROGRAMS: [(&str, &str); 1] = [("sluice_steer", "sk_lookup")];

/// Indexes of a destination's counters in `STEER_STATS`
/// (`dest * steer_stat::PER_DEST + event`).
pub mod steer_stat {
    /// Lookups delivered to the destination's socket.
    pub const STEERED: u32 = 0;
    /// No socket registered: refused (or passed on, `on_missing = pass`).
    pub const NO_SOCKET: u32 = 1;
    /// The socket cannot take the packet (other protocol or family, a TCP
    /// socket not listening): refused.
    pub const INCOMPATIBLE: u32 = 2;
    /// Another sk_lookup program chose a socket first: left to it.
    pub const OTHER_PROGRAM: u32 = 3;
    pub const PER_DEST: u32 = 4;
    pub const NAMES: [&str; PER_DEST as usize] =
        ["steered", "no_socket", "incompatible", "other_program"];
}

/// Bytes of the `STEER_FLOWS` ring (flow records of steered TCP
/// connections and of every refused lookup).
pub const STEER_FLOWS_BYTES: u32 = 256 * 1024;

/// Names of the steering maps (pinned under `<pin root>/sock/maps/`).
pub mod steer_map_names {
    pub const STEER_GENERATION: &str = "STEER_GENERATION";
    pub const STEER_RULES: &str = "STEER_RULES";
    pub const STEER_SOCKS: &str = "STEER_SOCKS";
    pub const STEER_DESTS: &str = "STEER_DESTS";
    pub const STEER_STATS: &str = "STEER_STATS";
    pub const STEER_FLOWS: &str = "STEER_FLOWS";
    pub const STEER_LOST: &str = "STEER_LOST";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<SteerKey>(), 20);
        assert_eq!(core::mem::size_of::<SteerRange>(), 8);
        assert_eq!(core::mem::size_of::<SteerDest>(), 56);
        assert_eq!(core::mem::size_of::<SteerEntry>(), 4 + 8 * STEER_RANGES);
    }
}
