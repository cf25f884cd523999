//! Frame builders, random frames and corruptions for the dataplane tests.
//!
//! Building one frame: start from the network layer, add the rest in any order,
//! then [`Frame::build`]:
//!
//! ```ignore
//! let f = Frame::v4(v4(198, 18, 0, 1), v4(198, 18, 1, 2))
//!     .tcp(40000, 443)
//!     .vlan(0x8100, 10)
//!     .build();
//! let f = Frame::v6(src6, dst6)
//!     .ext(ExtHeader::HopByHop { len_units: 0 })
//!     .fragment(0, true)               // IPv6: appends a fragment header
//!     .udp(5353, 53)
//!     .udp_length(4000)                // a lie, allowed in a first fragment
//!     .build();
//! let arp = Frame::ethertype(0x0806, vec![0; 28]).build();
//! ```
//!
//! The pieces are public too: [`ethernet`], [`ipv4_header`], [`ipv6_ext_header`],
//! [`Transport::encode`] and [`checksum`]. Lengths, IHL and checksums are
//! computed; the lying variants (`udp_length`, `tcp_data_offset`, [`mutate`])
//! exist to make broken frames on purpose.
//!
//! Random material for differential tests: [`random_frame`], [`mutate`] and
//! [`random_policy`] draw addresses and ports from small pools ([`V4_NETS`],
//! [`V6_NETS`], [`PORTS`]) so that list and rule hits are frequent.
//! `mutate` can truncate below 14 bytes: `BPF_PROG_TEST_RUN` refuses XDP input
//! shorter than an Ethernet header, so a kernel harness must skip those.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, seq::SliceRandom};

use super::model::{Policy, Rule};

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;

pub const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Sequence number of TCP segments unless a test sets one.
pub const DEFAULT_TCP_SEQ: u32 = 0x1000_0000;

/// /24s inside 198.18.0.0/15 that random frames and policies use (hosts 1..=8).
pub const V4_NETS: [[u8; 3]; 4] = [[198, 18, 0], [198, 18, 1], [198, 19, 0], [198, 19, 200]];
/// /64s inside 2001:2::/48 that random frames and policies use (hosts ::1..=::8).
pub const V6_NETS: [[u16; 4]; 4] = [
    [0x2001, 2, 0, 0],
    [0x2001, 2, 0, 1],
    [0x2001, 2, 0, 0xa],
    [0x2001, 2, 0, 0xff00],
];
/// Ports random frames and rules use.
pub const PORTS: [u16; 9] = [22, 53, 80, 443, 4444, 4445, 1023, 1024, 8080];

#[must_use]
pub const fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// An IPv6 extension header; each is emitted at its full size with its
/// next-header byte chained to whatever follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtHeader {
    /// (len_units + 1) × 8 bytes, filled with PadN options.
    HopByHop { len_units: u8 },
    /// (len_units + 1) × 8 bytes, routing type 253 (experimental), 0 segments left.
    Routing { len_units: u8 },
    /// (len_units + 1) × 8 bytes, filled with PadN options.
    DestOpts { len_units: u8 },
    /// 8 bytes; `offset_units` is in 8-byte units (13 bits).
    Fragment { offset_units: u16, more: bool },
    /// (len_units + 2) × 4 bytes.
    Ah { len_units: u8 },
}

impl ExtHeader {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::HopByHop { .. } => 0,
            Self::Routing { .. } => 43,
            Self::Fragment { .. } => 44,
            Self::Ah { .. } => 51,
            Self::DestOpts { .. } => 60,
        }
    }

    #[must_use]
    pub fn size(self) -> usize {
        match self {
            Self::HopByHop { len_units }
            | Self::Routing { len_units }
            | Self::DestOpts { len_units } => (usize::from(len_units) + 1) * 8,
            Self::Fragment { .. } => 8,
            Self::Ah { len_units } => (usize::from(len_units) + 2) * 4,
        }
    }
}

/// Bytes of one extension header whose next header is `next`.
#[must_use]
pub fn ipv6_ext_header(ext: ExtHeader, next: u8) -> Vec<u8> {
    let size = ext.size();
    let mut b = vec![0u8; size];
    b[0] = next;
    match ext {
        ExtHeader::HopByHop { len_units } | ExtHeader::DestOpts { len_units } => {
            b[1] = len_units;
            // PadN options (at most 257 bytes each) fill the options area so
            // that it is valid TLV; Pad1 for a last lone byte.
            let mut at = 2;
            while at < size {
                let room = size - at;
                if room == 1 {
                    b[at] = 0;
                    break;
                }
                let n = (room - 2).min(255);
                b[at] = 1;
                b[at + 1] = n as u8;
                at += n + 2;
            }
        }
        ExtHeader::Routing { len_units } => {
            b[1] = len_units;
            b[2] = 253;
        }
        ExtHeader::Fragment { offset_units, more } => {
            let field = ((offset_units & 0x1fff) << 3) | u16::from(more);
            b[2..4].copy_from_slice(&field.to_be_bytes());
            b[4..8].copy_from_slice(&0x5eed_0001_u32.to_be_bytes());
        }
        ExtHeader::Ah { len_units } => {
            b[1] = len_units;
            // SPI and sequence number when the header is long enough to hold them.
            for (i, byte) in [0, 0, 0x10, 0x01, 0, 0, 0, 1].into_iter().enumerate() {
                if let Some(slot) = b.get_mut(4 + i) {
                    *slot = byte;
                }
            }
        }
    }
    b
}

/// Internet checksum (RFC 1071) of `data`, folded and complemented.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checksum of an upper-layer message over the IPv4 or IPv6 pseudo-header.
fn pseudo_checksum(src: IpAddr, dst: IpAddr, proto: u8, msg: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + msg.len());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            data.extend_from_slice(&s.octets());
            data.extend_from_slice(&d.octets());
            data.extend_from_slice(&[0, proto]);
            // Oversized test payloads simply get a wrong checksum.
            data.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        }
        _ => {
            data.extend_from_slice(&ip_octets(src));
            data.extend_from_slice(&ip_octets(dst));
            data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    data.extend_from_slice(msg);
    checksum(&data)
}

fn ip_octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The transport layer of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `data_offset` is written as given; the header is `max(data_offset, 5) × 4`
    /// bytes (options are NOPs), so a value below 5 is a lie.
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        data_offset: u8,
        /// Sequence number ([`DEFAULT_TCP_SEQ`] unless set with [`Frame::tcp_seq`]).
        seq: u32,
        payload: Vec<u8>,
    },
    /// `length: None` writes the true length.
    Udp {
        sport: u16,
        dport: u16,
        length: Option<u16>,
        payload: Vec<u8>,
    },
    IcmpEcho {
        id: u16,
        seq: u16,
        payload: Vec<u8>,
    },
    Icmpv6Echo {
        id: u16,
        seq: u16,
        payload: Vec<u8>,
    },
    /// Any other protocol: `payload` is sent as is.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl Transport {
    /// IPv4 protocol / IPv6 next header of this transport.
    #[must_use]
    pub const fn proto(&self) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            Self::IcmpEcho { .. } => 1,
            Self::Icmpv6Echo { .. } => 58,
            Self::Raw { proto, .. } => *proto,
        }
    }

    fn payload_mut(&mut self) -> &mut Vec<u8> {
        match self {
            Self::Tcp { payload, .. }
            | Self::Udp { payload, .. }
            | Self::IcmpEcho { payload, .. }
            | Self::Icmpv6Echo { payload, .. }
            | Self::Raw { payload, .. } => payload,
        }
    }

    /// Header and payload, with the checksum computed for `src` → `dst`.
    #[must_use]
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let proto = self.proto();
        match self {
            Self::Tcp {
                sport,
                dport,
                flags,
                data_offset,
                seq,
                payload,
            } => {
                let hlen = usize::from((*data_offset).max(5)) * 4;
                let mut b = vec![1u8; hlen]; // NOP options beyond byte 20
                b[..20].fill(0);
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..8].copy_from_slice(&seq.to_be_bytes());
                b[12] = *data_offset << 4;
                b[13] = *flags;
                b[14..16].copy_from_slice(&64240_u16.to_be_bytes());
                b.extend_from_slice(payload);
                let sum = pseudo_checksum(src, dst, proto, &b);
                b[16..18].copy_from_slice(&sum.to_be_bytes());
                b
            }
            Self::Udp {
                sport,
                dport,
                length,
                payload,
            } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                let true_len = (8 + payload.len()) as u16;
                b.extend_from_slice(&length.unwrap_or(true_len).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                let sum = match pseudo_checksum(src, dst, proto, &b) {
                    0 => 0xffff, // 0 means "no checksum" in UDP
                    s => s,
                };
                b[6..8].copy_from_slice(&sum.to_be_bytes());
                b
            }
            Self::IcmpEcho { id, seq, payload } | Self::Icmpv6Echo { id, seq, payload } => {
                let v6 = matches!(self, Self::Icmpv6Echo { .. });
                let mut b = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(payload);
                // ICMPv6 covers the pseudo-header, ICMP only the message.
                let sum = if v6 {
                    pseudo_checksum(src, dst, proto, &b)
                } else {
                    checksum(&b)
                };
                b[2..4].copy_from_slice(&sum.to_be_bytes());
                b
            }
            Self::Raw { payload, .. } => payload.clone(),
        }
    }
}

/// Fields of an IPv4 header the tests vary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// Raw option bytes, zero-padded (EOL) to a multiple of 4; at most 40 bytes.
    pub options: Vec<u8>,
    /// In 8-byte units (13 bits).
    pub frag_offset: u16,
    pub more_fragments: bool,
}

/// The IPv4 header for a payload of `payload_len` bytes: IHL, total length and
/// header checksum are computed.
///
/// # Panics
/// If the options do not fit in 40 bytes.
#[must_use]
pub fn ipv4_header(h: &Ipv4, proto: u8, payload_len: usize) -> Vec<u8> {
    let mut opts = h.options.clone();
    opts.resize(opts.len().div_ceil(4) * 4, 0);
    assert!(opts.len() <= 40, "IPv4 options are limited to 40 bytes");
    let hlen = 20 + opts.len();
    let mut b = vec![0u8; 20];
    b[0] = 0x40 | (hlen / 4) as u8;
    // Oversized payloads wrap; the tests never build packets over 64 KiB.
    b[2..4].copy_from_slice(&((hlen + payload_len) as u16).to_be_bytes());
    b[4..6].copy_from_slice(&0x1234_u16.to_be_bytes());
    let frag = (h.frag_offset & 0x1fff) | if h.more_fragments { 0x2000 } else { 0 };
    b[6..8].copy_from_slice(&frag.to_be_bytes());
    b[8] = h.ttl;
    b[9] = proto;
    b[12..16].copy_from_slice(&h.src.octets());
    b[16..20].copy_from_slice(&h.dst.octets());
    b.extend_from_slice(&opts);
    let sum = checksum(&b);
    b[10..12].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Ethernet header (fixed MACs) with `vlans` as `(tpid, vid)`, outermost first,
/// then `ethertype`.
#[must_use]
pub fn ethernet(vlans: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(14 + 4 * vlans.len());
    b.extend_from_slice(&DST_MAC);
    b.extend_from_slice(&SRC_MAC);
    for &(tpid, vid) in vlans {
        b.extend_from_slice(&tpid.to_be_bytes());
        b.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    b.extend_from_slice(&ethertype.to_be_bytes());
    b
}

/// The network layer of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Net {
    V4(Ipv4),
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        ext: Vec<ExtHeader>,
    },
    /// A non-IP EtherType with its payload (ARP, LLDP, ...).
    Other {
        ethertype: u16,
        payload: Vec<u8>,
    },
}

/// A frame under construction. Fields are public for tests that want to
/// tweak something the chained methods do not cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub vlans: Vec<(u16, u16)>,
    pub net: Net,
    /// Ignored for [`Net::Other`].
    pub transport: Transport,
    /// Bytes after the IP packet (Ethernet padding).
    pub trailer: Vec<u8>,
}

impl Frame {
    fn new(net: Net) -> Self {
        Self {
            vlans: Vec::new(),
            net,
            // "No next header" with no payload until a transport is chosen.
            transport: Transport::Raw {
                proto: 59,
                payload: Vec::new(),
            },
            trailer: Vec::new(),
        }
    }

    #[must_use]
    pub fn v4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::new(Net::V4(Ipv4 {
            src,
            dst,
            ttl: 64,
            options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
        }))
    }

    #[must_use]
    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::new(Net::V6 {
            src,
            dst,
            hop_limit: 64,
            ext: Vec::new(),
        })
    }

    /// A frame of any EtherType carrying `payload`.
    #[must_use]
    pub fn ethertype(ethertype: u16, payload: Vec<u8>) -> Self {
        Self::new(Net::Other { ethertype, payload })
    }

    /// A frame from `src` to `dst`, IPv4 or IPv6 after the addresses.
    ///
    /// # Panics
    /// If the families differ.
    #[must_use]
    pub fn ip(src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Self::v4(s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => Self::v6(s, d),
            _ => panic!("mixed address families: {src} -> {dst}"),
        }
    }

    /// Adds a VLAN tag inside the ones already added.
    #[must_use]
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    /// IPv4 TTL / IPv6 hop limit.
    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        match &mut self.net {
            Net::V4(h) => h.ttl = ttl,
            Net::V6 { hop_limit, .. } => *hop_limit = ttl,
            Net::Other { .. } => panic!("ttl on a non-IP frame"),
        }
        self
    }

    /// IPv4 options (raw bytes, padded to a multiple of 4).
    #[must_use]
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        let Net::V4(h) = &mut self.net else {
            panic!("IPv4 options on a non-IPv4 frame")
        };
        h.options = options.to_vec();
        self
    }

    /// IPv4: sets fragment offset (8-byte units) and MF. IPv6: appends a
    /// fragment extension header.
    #[must_use]
    pub fn fragment(mut self, offset_units: u16, more: bool) -> Self {
        match &mut self.net {
            Net::V4(h) => {
                h.frag_offset = offset_units;
                h.more_fragments = more;
            }
            Net::V6 { ext, .. } => ext.push(ExtHeader::Fragment { offset_units, more }),
            Net::Other { .. } => panic!("fragment on a non-IP frame"),
        }
        self
    }

    /// Appends an IPv6 extension header after the ones already added.
    #[must_use]
    pub fn ext(mut self, header: ExtHeader) -> Self {
        let Net::V6 { ext, .. } = &mut self.net else {
            panic!("extension header on a non-IPv6 frame")
        };
        ext.push(header);
        self
    }

    /// TCP SYN, data offset 5, no payload.
    #[must_use]
    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.transport = Transport::Tcp {
            sport,
            dport,
            flags: 0x02,
            data_offset: 5,
            seq: DEFAULT_TCP_SEQ,
            payload: Vec::new(),
        };
        self
    }

    /// TCP sequence number.
    #[must_use]
    pub fn tcp_seq(mut self, value: u32) -> Self {
        let Transport::Tcp { seq, .. } = &mut self.transport else {
            panic!("tcp_seq without tcp")
        };
        *seq = value;
        self
    }

    #[must_use]
    pub fn tcp_flags(mut self, value: u8) -> Self {
        let Transport::Tcp { flags, .. } = &mut self.transport else {
            panic!("tcp_flags without tcp")
        };
        *flags = value;
        self
    }

    /// Data offset in 32-bit words; ≥ 5 adds NOP options, < 5 is a lie.
    #[must_use]
    pub fn tcp_data_offset(mut self, value: u8) -> Self {
        let Transport::Tcp { data_offset, .. } = &mut self.transport else {
            panic!("tcp_data_offset without tcp")
        };
        *data_offset = value & 0x0f;
        self
    }

    #[must_use]
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.transport = Transport::Udp {
            sport,
            dport,
            length: None,
            payload: Vec::new(),
        };
        self
    }

    /// Writes `value` as the UDP length instead of the true one.
    #[must_use]
    pub fn udp_length(mut self, value: u16) -> Self {
        let Transport::Udp { length, .. } = &mut self.transport else {
            panic!("udp_length without udp")
        };
        *length = Some(value);
        self
    }

    #[must_use]
    pub fn icmp_echo(mut self, id: u16, seq: u16) -> Self {
        self.transport = Transport::IcmpEcho {
            id,
            seq,
            payload: Vec::new(),
        };
        self
    }

    #[must_use]
    pub fn icmpv6_echo(mut self, id: u16, seq: u16) -> Self {
        self.transport = Transport::Icmpv6Echo {
            id,
            seq,
            payload: Vec::new(),
        };
        self
    }

    /// Any protocol number, with `payload` as its whole content.
    #[must_use]
    pub fn proto(mut self, proto: u8, payload: Vec<u8>) -> Self {
        self.transport = Transport::Raw { proto, payload };
        self
    }

    /// Replaces the transport payload (after its header).
    #[must_use]
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        *self.transport.payload_mut() = bytes.to_vec();
        self
    }

    /// Bytes appended after the IP packet, outside its length.
    #[must_use]
    pub fn trailer(mut self, bytes: &[u8]) -> Self {
        self.trailer.extend_from_slice(bytes);
        self
    }

    /// Zero-pads the frame to at least `len` bytes, as Ethernet pads to 60.
    #[must_use]
    pub fn pad_to(mut self, len: usize) -> Self {
        let short = len.saturating_sub(self.clone().build().len());
        self.trailer.extend(std::iter::repeat_n(0, short));
        self
    }

    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let ethertype = match &self.net {
            Net::V4(_) => ETH_P_IP,
            Net::V6 { .. } => ETH_P_IPV6,
            Net::Other { ethertype, .. } => *ethertype,
        };
        let mut out = ethernet(&self.vlans, ethertype);
        match &self.net {
            Net::V4(h) => {
                let l4 = self.transport.encode(IpAddr::V4(h.src), IpAddr::V4(h.dst));
                out.extend_from_slice(&ipv4_header(h, self.transport.proto(), l4.len()));
                out.extend_from_slice(&l4);
            }
            Net::V6 {
                src,
                dst,
                hop_limit,
                ext,
            } => {
                let upper = self.transport.proto();
                let mut payload = Vec::new();
                for (i, header) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(upper, |h| h.number());
                    payload.extend_from_slice(&ipv6_ext_header(*header, next));
                }
                payload
                    .extend_from_slice(&self.transport.encode(IpAddr::V6(*src), IpAddr::V6(*dst)));
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                out.push(ext.first().map_or(upper, |h| h.number()));
                out.push(*hop_limit);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&payload);
            }
            Net::Other { payload, .. } => out.extend_from_slice(payload),
        }
        out.extend_from_slice(&self.trailer);
        out
    }
}

/// An ARP request from `sender` for `target`, as a frame payload.
#[must_use]
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    b.extend_from_slice(&SRC_MAC);
    b.extend_from_slice(&sender.octets());
    b.extend_from_slice(&[0; 6]);
    b.extend_from_slice(&target.octets());
    b
}

// ---------------------------------------------------------------------------
// Random material
// ---------------------------------------------------------------------------

/// A pool IPv4 address; now and then one outside the pool so that "no list
/// or rule matched" stays common too.
pub fn pool_v4(rng: &mut impl Rng) -> Ipv4Addr {
    if rng.gen_bool(0.05) {
        return v4(203, 0, 113, rng.gen_range(1..=8));
    }
    let [a, b, c] = V4_NETS[rng.gen_range(0..V4_NETS.len())];
    v4(a, b, c, rng.gen_range(1..=8))
}

/// A pool IPv6 address; now and then one outside the pool.
pub fn pool_v6(rng: &mut impl Rng) -> Ipv6Addr {
    let host = rng.gen_range(1..=8);
    if rng.gen_bool(0.05) {
        return Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, host);
    }
    let [a, b, c, d] = V6_NETS[rng.gen_range(0..V6_NETS.len())];
    Ipv6Addr::new(a, b, c, d, 0, 0, 0, host)
}

pub fn pool_port(rng: &mut impl Rng) -> u16 {
    if rng.gen_bool(0.05) {
        rng.r#gen()
    } else {
        PORTS[rng.gen_range(0..PORTS.len())]
    }
}

fn random_bytes(rng: &mut impl Rng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max);
    (0..len).map(|_| rng.r#gen()).collect()
}

fn random_transport(rng: &mut impl Rng, v6: bool) -> Transport {
    let payload = random_bytes(rng, 48);
    match rng.gen_range(0..100) {
        0..30 => Transport::Tcp {
            sport: pool_port(rng),
            dport: pool_port(rng),
            flags: *[0x02, 0x10, 0x12, 0x18, 0x11, 0x04]
                .choose(rng)
                .unwrap_or(&0x02),
            // Mostly plain, sometimes with NOP options.
            data_offset: if rng.gen_bool(0.8) {
                5
            } else {
                rng.gen_range(6..=15)
            },
            seq: DEFAULT_TCP_SEQ,
            payload,
        },
        30..60 => Transport::Udp {
            sport: pool_port(rng),
            dport: pool_port(rng),
            length: None,
            payload,
        },
        // The family's own ICMP, then the other family's (class `other`).
        60..75 if v6 => Transport::Icmpv6Echo {
            id: rng.r#gen(),
            seq: rng.r#gen(),
            payload,
        },
        60..75 => Transport::IcmpEcho {
            id: rng.r#gen(),
            seq: rng.r#gen(),
            payload,
        },
        75..80 if v6 => Transport::IcmpEcho {
            id: rng.r#gen(),
            seq: rng.r#gen(),
            payload,
        },
        75..80 => Transport::Icmpv6Echo {
            id: rng.r#gen(),
            seq: rng.r#gen(),
            payload,
        },
        _ => {
            // GRE, ESP, no-next-header, SCTP, plus odd numbers; never an IPv6
            // extension header number (that would change the chain).
            let proto = *[47, 50, 59, 132, 4, 41, 255, 253]
                .choose(rng)
                .unwrap_or(&47);
            Transport::Raw { proto, payload }
        }
    }
}

fn random_ext(rng: &mut impl Rng) -> ExtHeader {
    let len_units = if rng.gen_bool(0.7) {
        0
    } else {
        rng.gen_range(1..=4)
    };
    match rng.gen_range(0..5) {
        0 => ExtHeader::HopByHop { len_units },
        1 => ExtHeader::Routing { len_units },
        2 => ExtHeader::DestOpts { len_units },
        3 => ExtHeader::Ah {
            len_units: len_units * 2 + 1,
        },
        _ => ExtHeader::Fragment {
            offset_units: random_frag_offset(rng),
            more: rng.gen_bool(0.5),
        },
    }
}

/// Fragment offset: first fragments as often as later ones.
fn random_frag_offset(rng: &mut impl Rng) -> u16 {
    if rng.gen_bool(0.5) {
        0
    } else {
        *[1, 2, 185, 0x1fff].choose(rng).unwrap_or(&1)
    }
}

/// A valid-looking frame from a wide mix of families, transports, VLAN
/// stacks, IPv4 options, fragments and IPv6 extension chains. Some of the mix
/// is malformed by design (3 VLAN tags, 9 extension headers, a late
/// hop-by-hop), as real traffic can be.
pub fn random_frame(rng: &mut impl Rng) -> Vec<u8> {
    let mut frame = match rng.gen_range(0..100) {
        0..5 => {
            let (ethertype, payload) = match rng.gen_range(0..4) {
                0 | 1 => (ETH_P_ARP, arp_request(pool_v4(rng), pool_v4(rng))),
                2 => (0x88cc, random_bytes(rng, 40)), // LLDP
                _ => (rng.r#gen(), random_bytes(rng, 40)),
            };
            Frame::ethertype(ethertype, payload)
        }
        5..55 => {
            let mut f = Frame::v4(pool_v4(rng), pool_v4(rng)).ttl(rng.gen_range(1..=255));
            if rng.gen_bool(0.2) {
                let n = rng.gen_range(1..=40);
                // NOPs, or arbitrary bytes: options are skipped, not interpreted.
                let opts: Vec<u8> = if rng.gen_bool(0.5) {
                    vec![1; n]
                } else {
                    (0..n).map(|_| rng.r#gen()).collect()
                };
                f = f.ipv4_options(&opts);
            }
            if rng.gen_bool(0.25) {
                f = f.fragment(random_frag_offset(rng), rng.gen_bool(0.7));
            }
            f.transport = random_transport(rng, false);
            f
        }
        _ => {
            let mut f = Frame::v6(pool_v6(rng), pool_v6(rng)).ttl(rng.gen_range(1..=255));
            let chain = match rng.gen_range(0..100) {
                0..50 => 0,
                50..80 => rng.gen_range(1..=2),
                80..95 => rng.gen_range(3..=8),
                _ => 9,
            };
            for i in 0..chain {
                let mut ext = random_ext(rng);
                // Keep hop-by-hop first most of the time: elsewhere it is malformed.
                if matches!(ext, ExtHeader::HopByHop { .. }) && i > 0 && rng.gen_bool(0.8) {
                    ext = ExtHeader::DestOpts { len_units: 0 };
                }
                f = f.ext(ext);
            }
            f.transport = random_transport(rng, true);
            f
        }
    };
    frame.vlans = match rng.gen_range(0..100) {
        0..60 => vec![],
        60..80 => vec![random_tag(rng)],
        80..95 => vec![random_tag(rng), random_tag(rng)],
        _ => vec![random_tag(rng), random_tag(rng), random_tag(rng)],
    };
    if rng.gen_bool(0.3) {
        frame = frame.pad_to(60);
    }
    frame.build()
}

fn random_tag(rng: &mut impl Rng) -> (u16, u16) {
    let tpid = if rng.gen_bool(0.7) {
        TPID_8021Q
    } else {
        TPID_8021AD
    };
    (tpid, rng.gen_range(1..4095))
}

/// Where the headers of a frame seem to be, read loosely so that a corruption
/// can aim at a field. Not a parser: it believes whatever the bytes say.
struct Layout {
    l3: usize,
    v6: bool,
    /// Offset of the transport header and its protocol, if found.
    l4: Option<(usize, u8)>,
}

fn layout(frame: &[u8]) -> Option<Layout> {
    let mut off = 12;
    let mut et = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    while et == TPID_8021Q || et == TPID_8021AD {
        off += 4;
        et = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    let l3 = off + 2;
    match et {
        ETH_P_IP => {
            let ihl = usize::from(frame.get(l3)? & 0x0f);
            let proto = *frame.get(l3 + 9)?;
            let l4 = (ihl >= 5).then_some((l3 + ihl * 4, proto));
            Some(Layout { l3, v6: false, l4 })
        }
        ETH_P_IPV6 => {
            let mut next = *frame.get(l3 + 6)?;
            let mut at = l3 + 40;
            for _ in 0..12 {
                let len = match next {
                    0 | 43 | 60 => (usize::from(*frame.get(at + 1)?) + 1) * 8,
                    51 => (usize::from(*frame.get(at + 1)?) + 2) * 4,
                    44 => 8,
                    _ => break,
                };
                next = *frame.get(at)?;
                at += len;
            }
            Some(Layout {
                l3,
                v6: true,
                l4: Some((at, next)),
            })
        }
        _ => None,
    }
}

fn put16(frame: &mut [u8], at: usize, value: u16) {
    if at + 2 <= frame.len() {
        frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
}

/// A wrong length near `truth`: off by one either way, zero, huge, or random.
fn lie(rng: &mut impl Rng, truth: u16) -> u16 {
    match rng.gen_range(0..6) {
        0 => truth.wrapping_add(1),
        1 => truth.wrapping_sub(1),
        2 => truth.wrapping_add(rng.gen_range(2..64)),
        3 => truth.saturating_sub(rng.gen_range(2..64)),
        4 => *[0, 7, 19, 0xffff].choose(rng).unwrap_or(&0),
        _ => rng.r#gen(),
    }
}

/// Applies one to three realistic corruptions to `frame`: truncation (often
/// at a header boundary), flipped bytes in the first 80, a wrong IHL, a lying
/// IPv4 total length / IPv6 payload length, a wrong TCP data offset or UDP
/// length, or trailing padding. The result may be valid anyway.
pub fn mutate(rng: &mut impl Rng, frame: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..=3) {
        mutate_once(rng, frame);
    }
}

fn mutate_once(rng: &mut impl Rng, frame: &mut Vec<u8>) {
    let lay = layout(frame);
    match rng.gen_range(0..8) {
        0 => {
            // Header boundaries and their neighbours are where parsers slip.
            let mut cuts = vec![0, 13, 14, 17, 18, 22];
            if let Some(l) = &lay {
                cuts.extend([l.l3, l.l3 + 19, l.l3 + 20, l.l3 + 39, l.l3 + 40, l.l3 + 48]);
                if let Some((l4, _)) = l.l4 {
                    cuts.extend([l4, l4 + 1, l4 + 7, l4 + 8, l4 + 19, l4 + 20]);
                }
            }
            let len = if rng.gen_bool(0.6) {
                *cuts.choose(rng).unwrap_or(&0)
            } else {
                rng.gen_range(0..=frame.len())
            };
            frame.truncate(len);
        }
        1 => {
            let span = frame.len().min(80);
            if span > 0 {
                for _ in 0..rng.gen_range(1..=4) {
                    let at = rng.gen_range(0..span);
                    frame[at] ^= rng.gen_range(1..=255);
                }
            }
        }
        2 => {
            if let Some(l) = lay.filter(|l| !l.v6)
                && let Some(b) = frame.get_mut(l.l3)
            {
                *b = (*b & 0xf0) | rng.gen_range(0..16);
            }
        }
        3 => {
            // IPv4 total length at +2, IPv6 payload length at +4.
            if let Some(l) = lay {
                let at = if l.v6 { l.l3 + 4 } else { l.l3 + 2 };
                if at + 2 <= frame.len() {
                    let truth = u16::from_be_bytes([frame[at], frame[at + 1]]);
                    put16(frame, at, lie(rng, truth));
                }
            }
        }
        4 => {
            if let Some(Layout {
                l4: Some((at, 6)), ..
            }) = lay
                && let Some(b) = frame.get_mut(at + 12)
            {
                *b = (*b & 0x0f) | (rng.gen_range(0..16) << 4);
            }
        }
        5 => {
            if let Some(Layout {
                l4: Some((at, 17)), ..
            }) = lay
                && at + 6 <= frame.len()
            {
                let truth = u16::from_be_bytes([frame[at + 4], frame[at + 5]]);
                put16(frame, at + 4, lie(rng, truth));
            }
        }
        6 => {
            if let Some(Layout { l3, v6: false, .. }) = lay {
                // Turn the packet into a first or later fragment.
                let frag = random_frag_offset(rng) | if rng.gen_bool(0.5) { 0x2000 } else { 0 };
                put16(frame, l3 + 6, frag);
            }
        }
        _ => {
            let pad = random_bytes(rng, 32);
            frame.extend_from_slice(&pad);
        }
    }
}

fn random_prefix(rng: &mut impl Rng, v6: bool) -> IpNet {
    // Prefixes covering the whole pool are kept rare: with them common, the
    // allow list would decide most packets and the rules would seldom be reached.
    let broad = rng.gen_bool(0.1);
    let lens: &[u8] = match (v6, broad) {
        (true, true) => &[0, 16, 32, 48],
        (true, false) => &[63, 64, 96, 126, 127, 128],
        (false, true) => &[0, 8, 15, 16],
        (false, false) => &[23, 24, 28, 30, 31, 32],
    };
    let len = *lens.choose(rng).unwrap_or(&24);
    if v6 {
        IpNet::V6(
            Ipv6Net::new(pool_v6(rng), len)
                .expect("valid IPv6 prefix length")
                .trunc(),
        )
    } else {
        IpNet::V4(
            Ipv4Net::new(pool_v4(rng), len)
                .expect("valid IPv4 prefix length")
                .trunc(),
        )
    }
}

fn random_list(rng: &mut impl Rng) -> Vec<IpNet> {
    let n = *[0, 0, 1, 2, 3, 5, 8].choose(rng).unwrap_or(&0);
    (0..n)
        .map(|_| {
            let v6 = rng.gen_bool(0.5);
            random_prefix(rng, v6)
        })
        .collect()
}

/// A random policy over the same pools as [`random_frame`]: overlapping allow
/// and deny prefixes of varied lengths (including /0 and host routes), 0–20
/// rules, random default and malformed actions.
pub fn random_policy(rng: &mut impl Rng) -> Policy {
    let allow = random_list(rng);
    let mut deny = random_list(rng);
    // Sometimes deny exactly what is allowed, or a wider/narrower overlap.
    if let Some(net) = allow.choose(rng).copied()
        && rng.gen_bool(0.3)
    {
        deny.push(net);
        if let Some(super_net) = net.supernet() {
            deny.push(super_net);
        }
    }
    let rules = (0..rng.gen_range(0..=20))
        .map(|_| random_rule(rng))
        .collect();
    Policy {
        allow,
        deny,
        rules,
        default_drop: rng.gen_bool(0.5),
        malformed_drop: rng.gen_bool(0.7),
        audit: rng.gen_bool(0.15),
    }
}

fn random_rule(rng: &mut impl Rng) -> Rule {
    // One family per rule: the kernel rule has a single family field.
    let v6 = rng.gen_bool(0.5);
    let proto = if rng.gen_bool(0.4) {
        None
    } else {
        Some(*[6, 17, 1, 58, 47, 50, 59, 132].choose(rng).unwrap_or(&6))
    };
    let dport = match rng.gen_range(0..10) {
        0..5 => None,
        5..8 => {
            let p = pool_port(rng);
            Some((p, p))
        }
        _ => {
            let (a, b) = (pool_port(rng), pool_port(rng));
            Some((a.min(b), a.max(b)))
        }
    };
    let sport = match rng.gen_range(0..10) {
        0..7 => None,
        7..9 => {
            let p = pool_port(rng);
            Some((p, p))
        }
        _ => {
            let (a, b) = (pool_port(rng), pool_port(rng));
            Some((a.min(b), a.max(b)))
        }
    };
    // The flag sets random frames carry, tested by mask/value pairs that
    // tell them apart (SYN alone, SYN-ACK, any ACK, RST, FIN).
    let tcp_flags = rng.gen_bool(0.25).then(|| {
        *[
            (0x02, 0x12),
            (0x12, 0x12),
            (0x10, 0x10),
            (0x04, 0x04),
            (0x01, 0x01),
            (0x00, 0x02),
        ]
        .choose(rng)
        .unwrap_or(&(0x02, 0x12))
    });
    let drop = rng.gen_bool(0.5);
    Rule {
        drop,
        audit: drop && rng.gen_bool(0.2),
        proto,
        dport,
        sport,
        tcp_flags,
        src: rng.gen_bool(0.4).then(|| random_prefix(rng, v6)),
        dst: rng.gen_bool(0.4).then(|| random_prefix(rng, v6)),
    }
}

// ---------------------------------------------------------------------------
// Reading captured frames
// ---------------------------------------------------------------------------

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The TCP header of a captured frame (untagged Ethernet; IPv4 with any
/// header length, or IPv6 without extension headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeen {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

impl TcpSeen {
    /// None for anything else (ARP, UDP, ICMP, a truncated frame).
    #[must_use]
    pub fn parse(f: &[u8]) -> Option<TcpSeen> {
        let be16 = |at: usize| Some(u16::from_be_bytes(f.get(at..at + 2)?.try_into().ok()?));
        let be32 = |at: usize| Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?));
        let (src, dst, l4) = match be16(12)? {
            ETH_P_IP => {
                let ihl = usize::from(f.get(14)? & 0x0f) * 4;
                if *f.get(23)? != 6 {
                    return None;
                }
                let a: [u8; 4] = f.get(26..30)?.try_into().ok()?;
                let b: [u8; 4] = f.get(30..34)?.try_into().ok()?;
                (IpAddr::from(a), IpAddr::from(b), 14 + ihl)
            }
            ETH_P_IPV6 => {
                if *f.get(20)? != 6 {
                    return None;
                }
                let a: [u8; 16] = f.get(22..38)?.try_into().ok()?;
                let b: [u8; 16] = f.get(38..54)?.try_into().ok()?;
                (IpAddr::from(a), IpAddr::from(b), 54)
            }
            _ => return None,
        };
        Some(TcpSeen {
            dst_mac: f.get(0..6)?.try_into().ok()?,
            src_mac: f.get(6..12)?.try_into().ok()?,
            src,
            dst,
            sport: be16(l4)?,
            dport: be16(l4 + 2)?,
            seq: be32(l4 + 4)?,
            ack: be32(l4 + 8)?,
            flags: *f.get(l4 + 13)?,
        })
    }

    /// A SYN without ACK (a connection attempt).
    #[must_use]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }

    #[must_use]
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK
    }

    #[must_use]
    pub fn is_rst(&self) -> bool {
        self.flags & TCP_RST != 0
    }
}
