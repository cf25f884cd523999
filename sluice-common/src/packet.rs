//! What the kernel's parser makes of a frame: its transport class, and how
//! deep it looks (VLAN tags, IPv6 extension headers).

/// Number of VLAN tags (802.1Q / 802.1ad) the parser walks through.
pub const MAX_VLAN_TAGS: usize = 2;

/// Number of IPv6 extension headers the parser walks through.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Transport class of a packet, as the counters see it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// No transport header known (not IP, or malformed before it).
    None = 0,
    Tcp = 1,
    Udp = 2,
    Icmp = 3,
    Icmpv6 = 4,
    /// Any other IP protocol (GRE, ESP, SCTP, no-next-header, ...).
    Other = 5,
    /// A non-first IP fragment: no transport header, matched on L3 only.
    Fragment = 6,
}

pub const L4_SLOTS: u32 = 7;

impl L4 {
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Tcp,
        Self::Udp,
        Self::Icmp,
        Self::Icmpv6,
        Self::Other,
        Self::Fragment,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Other => "other",
            Self::Fragment => "fragment",
        }
    }
}

/// The TCP header's flag bits by the names rules use for them (`flags
/// syn/syn,ack`), in wire order.
pub const TCP_FLAG_NAMES: [(&str, u8); 8] = [
    ("fin", 0x01),
    ("syn", 0x02),
    ("rst", 0x04),
    ("psh", 0x08),
    ("ack", 0x10),
    ("urg", 0x20),
    ("ece", 0x40),
    ("cwr", 0x80),
];
