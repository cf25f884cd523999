//! Bounded header parsing: Ethernet, up to two VLAN tags, IPv4 (options,
//! fragments), IPv6 (extension chain) and the TCP/UDP/ICMP/ICMPv6 headers.
//! Every read goes through `ptr::ptr_at`, which checks it against the frame's end.

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use sluice_common::{Family, L4, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS};

use super::{
    proto::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS,
        IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING,
        IPPROTO_TCP, IPPROTO_UDP,
    },
    ptr::ptr_at,
};

/// ICMP and ICMPv6 messages are at least 8 bytes (type, code, checksum, 4 more).
const ICMP_MIN_LEN: usize = 8;

/// What the pipeline needs to know about an IP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: Family,
    pub l4: L4,
    /// IPv4 protocol or the last IPv6 next-header value.
    pub proto: u8,
    /// Source and destination as `sluice_common::addr_words` words.
    pub src: [u64; 2],
    pub dst: [u64; 2],
    /// Ports, valid when `has_ports`.
    pub sport: u16,
    pub dport: u16,
    pub has_ports: bool,
    /// TCP flags byte (0 when not TCP) and sequence number.
    pub tcp_flags: u8,
    pub tcp_seq: u32,
    /// Part of a fragmented datagram (first or later fragment).
    pub fragment: bool,
    /// Offsets of the IP header and of the transport header (valid for
    /// TCP/UDP/ICMP; equal to `l3_off` otherwise).
    pub l3_off: usize,
    pub l4_off: usize,
}

/// Bounds of the header offsets the parser can produce (two VLAN tags; an
/// IPv6 chain of extension headers), restated for the verifier wherever
/// offsets come back from memory (the LB's handed-over parse).
pub const MAX_L3_OFF: usize = 22;
pub const MAX_L4_OFF: usize = 2048;

/// Room for a `Packet` in the per-CPU `LB_PACKET` slot, which hands the
/// parse over from the main program to the LB program (and to its own
/// second half). Words, so the map's BTF needs no kernel-only types.
pub type PacketSlot = [u64; 12];

const _: () = assert!(core::mem::size_of::<Packet>() <= core::mem::size_of::<PacketSlot>());

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

impl Packet {
    /// What is known of a frame that is not IP or failed parsing: its
    /// family, and no transport (class `none`).
    #[inline(always)]
    pub const fn other(family: Family) -> Self {
        Self {
            family,
            l4: L4::None,
            proto: 0,
            src: [0; 2],
            dst: [0; 2],
            sport: 0,
            dport: 0,
            has_ports: false,
            tcp_flags: 0,
            tcp_seq: 0,
            fragment: false,
            l3_off: 0,
            l4_off: 0,
        }
    }

    /// A connection attempt: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        matches!(self.l4, L4::Tcp) && self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

pub enum Parsed {
    Ip(Packet),
    /// Not IPv4/IPv6: passed untouched.
    NotIp,
    /// Cannot be parsed; the family is what the Ethernet header claimed.
    Malformed(Family),
}

/// Frame length for the IP length-consistency checks. `data_end` is read
/// volatile so the optimiser cannot use these checks to drop the `ptr_at`
/// bounds checks that the verifier needs to see.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    // SAFETY: ctx.ctx is the xdp_md the kernel passed in.
    let end = unsafe { core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) };
    (end as usize).wrapping_sub(ctx.data())
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the frame.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = read::<EthHdr>(ctx, 0) else {
        return Parsed::Malformed(Family::Other);
    };
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut off = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(tag) = read::<VlanHdr>(ctx, off) else {
            return Parsed::Malformed(Family::Other);
        };
        ether_type = u16::from_be(tag.ether_type);
        off += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => match parse_ipv4(ctx, off) {
            Some(p) => Parsed::Ip(p),
            None => Parsed::Malformed(Family::V4),
        },
        ETH_P_IPV6 => match parse_ipv6(ctx, off) {
            Some(p) => Parsed::Ip(p),
            None => Parsed::Malformed(Family::V6),
        },
        // More tags than sluice walks through: the payload cannot be judged.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Malformed(Family::Other),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Option<Packet> {
    let ip = read::<Ipv4Hdr>(ctx, off)?;
    if ip.vihl >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(ip.vihl & 0x0f) * 4;
    if hlen < Ipv4Hdr::LEN {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let frame_len = frame_len(ctx);
    if tot_len < hlen || off + tot_len > frame_len {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let more_fragments = frags & 0x2000 != 0;
    let fragment = frags & 0x3fff != 0;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&ip.src_addr);
    dst[..4].copy_from_slice(&ip.dst_addr);
    let mut pkt = Packet {
        l4: L4::Fragment,
        proto: ip.proto,
        src: sluice_common::addr_words(&src),
        dst: sluice_common::addr_words(&dst),
        l3_off: off,
        l4_off: off,
        ..Packet::other(Family::V4)
    };
    pkt.fragment = fragment;
    if frags & 0x1fff != 0 {
        // A later fragment carries no transport header.
        return Some(pkt);
    }
    parse_l4(ctx, &mut pkt, off + hlen, tot_len - hlen, more_fragments)?;
    Some(pkt)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Option<Packet> {
    let ip = read::<Ipv6Hdr>(ctx, off)?;
    if ip.vcf[0] >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let frame_len = frame_len(ctx);
    let end = off + Ipv6Hdr::LEN + payload_len;
    if end > frame_len {
        return None;
    }
    let mut pkt = Packet {
        l4: L4::Fragment,
        proto: ip.next_hdr,
        src: sluice_common::addr_words(&ip.src_addr),
        dst: sluice_common::addr_words(&ip.dst_addr),
        l3_off: off,
        l4_off: off,
        ..Packet::other(Family::V6)
    };
    let mut next = ip.next_hdr;
    let mut cur = off + Ipv6Hdr::LEN;
    let mut more_fragments = false;
    for i in 0..MAX_IPV6_EXT_HEADERS {
        let ext_len = match next {
            // Hop-by-hop options are only valid straight after the IPv6 header.
            IPPROTO_HOPOPTS if i != 0 => return None,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h = read::<[u8; 2]>(ctx, cur)?;
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            IPPROTO_AH => {
                let h = read::<[u8; 2]>(ctx, cur)?;
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let h = read::<[u8; 4]>(ctx, cur)?;
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                next = h[0];
                more_fragments |= offset_flags & 1 != 0;
                pkt.fragment = true;
                if offset_flags & 0xfff8 != 0 {
                    if cur + 8 > end {
                        return None;
                    }
                    pkt.proto = next;
                    return Some(pkt);
                }
                8
            }
            _ => break,
        };
        if cur + ext_len > end {
            return None;
        }
        cur += ext_len;
    }
    if matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS | IPPROTO_AH
    ) {
        // Longer extension chain than sluice walks through.
        return None;
    }
    pkt.proto = next;
    parse_l4(ctx, &mut pkt, cur, end - cur, more_fragments)?;
    Some(pkt)
}

#[inline(always)]
fn tcp_flags(t: &TcpHdr) -> u8 {
    let bit = |v: u16, f: u8| if v != 0 { f } else { 0 };
    bit(t.fin(), TCP_FIN)
        | bit(t.syn(), TCP_SYN)
        | bit(t.rst(), TCP_RST)
        | bit(t.psh(), TCP_PSH)
        | bit(t.ack(), TCP_ACK)
        | bit(t.urg(), TCP_URG)
        | bit(t.ece(), TCP_ECE)
        | bit(t.cwr(), TCP_CWR)
}

/// Fills the transport fields. `len` is what the IP header says follows
/// (it is already known to lie inside the frame). `None` = malformed.
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    pkt: &mut Packet,
    off: usize,
    len: usize,
    more_fragments: bool,
) -> Option<()> {
    match pkt.proto {
        IPPROTO_TCP => {
            if len < TcpHdr::LEN {
                return None;
            }
            let tcp = read::<TcpHdr>(ctx, off)?;
            // Data offset in 32-bit words (read from the header already
            // fetched: a second packet read would need its own bounds check).
            let data_off = usize::from(tcp.doff()) * 4;
            if data_off < TcpHdr::LEN || data_off > len {
                return None;
            }
            pkt.l4 = L4::Tcp;
            pkt.sport = u16::from_be_bytes(tcp.source);
            pkt.dport = u16::from_be_bytes(tcp.dest);
            pkt.has_ports = true;
            pkt.tcp_seq = u32::from_be_bytes(tcp.seq);
            pkt.tcp_flags = tcp_flags(&tcp);
            pkt.l4_off = off;
        }
        IPPROTO_UDP => {
            if len < UdpHdr::LEN {
                return None;
            }
            let udp = read::<UdpHdr>(ctx, off)?;
            let udp_len = usize::from(u16::from_be_bytes(udp.len));
            // A first fragment holds only part of the datagram udp.len describes.
            if udp_len < UdpHdr::LEN || (!more_fragments && udp_len > len) {
                return None;
            }
            pkt.l4 = L4::Udp;
            pkt.sport = u16::from_be_bytes(udp.src);
            pkt.dport = u16::from_be_bytes(udp.dst);
            pkt.has_ports = true;
            pkt.l4_off = off;
        }
        // ICMP for IPv4, ICMPv6 for IPv6 (the other one is just another protocol).
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if (pkt.proto == IPPROTO_ICMP) == matches!(pkt.family, Family::V4) =>
        {
            if len < ICMP_MIN_LEN {
                return None;
            }
            ptr_at::<[u8; ICMP_MIN_LEN]>(ctx, off)?;
            pkt.l4 = if pkt.proto == IPPROTO_ICMP {
                L4::Icmp
            } else {
                L4::Icmpv6
            };
            pkt.l4_off = off;
        }
        _ => pkt.l4 = L4::Other,
    }
    Some(())
}
