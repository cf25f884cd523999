//! Frames built from a description: Ethernet (optionally one 802.1Q tag),
//! IPv4 or IPv6, then TCP, UDP, an ICMP/ICMPv6 echo request or a bare
//! payload of another protocol, with correct lengths and checksums. Used by
//! `sluice explain` (the frame it hands the real program) and the benchmarks.

use std::net::IpAddr;

pub const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// The transport the frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// An echo request: ICMP for IPv4, ICMPv6 for IPv6.
    Icmp,
    /// Any other IP protocol number, with the payload right after the IP header.
    Other(u8),
}

impl L4 {
    /// The IP protocol number in a frame of this family.
    #[must_use]
    pub const fn proto(self, v6: bool) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp if v6 => 58,
            Self::Icmp => 1,
            Self::Other(p) => p,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub sport: u16,
    pub dport: u16,
    /// The TCP flags byte (TCP only).
    pub tcp_flags: u8,
    pub vlan: Option<u16>,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Pad the frame to at least this many bytes (payload after L4).
    pub min_len: usize,
}

impl Spec {
    /// A 64-byte frame from port 40000: a TCP SYN to 443, UDP to 53, or an
    /// echo request.
    #[must_use]
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            sport: 40000,
            dport: if l4 == L4::Tcp { 443 } else { 53 },
            tcp_flags: 0x02,
            vlan: None,
            src_mac: SRC_MAC,
            dst_mac: DST_MAC,
            min_len: 64,
        }
    }
}

/// Internet checksum (RFC 1071).
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The frame `s` describes. The addresses must be of one family.
#[must_use]
pub fn build(s: &Spec) -> Vec<u8> {
    let v6 = s.src.is_ipv6();
    let proto = s.l4.proto(v6);
    let ip_hdr = if v6 { 40 } else { 20 };
    let l4_hdr = match s.l4 {
        L4::Tcp => 20,
        L4::Udp | L4::Icmp => 8,
        L4::Other(_) => 0,
    };
    let eth_hdr = 14 + if s.vlan.is_some() { 4 } else { 0 };
    let payload_len = s.min_len.saturating_sub(eth_hdr + ip_hdr + l4_hdr);
    let payload = vec![0xa5u8; payload_len];

    // Transport header + payload, checksummed (over the pseudo-header,
    // except ICMP for IPv4).
    let mut l4 = Vec::new();
    let csum_at = match s.l4 {
        L4::Tcp => {
            l4.extend_from_slice(&s.sport.to_be_bytes());
            l4.extend_from_slice(&s.dport.to_be_bytes());
            l4.extend_from_slice(&1u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4); // data offset
            l4.push(s.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            Some(16)
        }
        L4::Udp => {
            l4.extend_from_slice(&s.sport.to_be_bytes());
            l4.extend_from_slice(&s.dport.to_be_bytes());
            l4.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            Some(6)
        }
        L4::Icmp => {
            // Echo request, identifier 1, sequence 1.
            l4.extend_from_slice(&[if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1]);
            Some(2)
        }
        L4::Other(_) => None,
    };
    l4.extend_from_slice(&payload);
    if let Some(at) = csum_at {
        let mut sum_over = Vec::new();
        if v6 || s.l4 != L4::Icmp {
            sum_over.extend_from_slice(&octets(s.src));
            sum_over.extend_from_slice(&octets(s.dst));
            if v6 {
                sum_over.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                sum_over.extend_from_slice(&[0, 0, 0, proto]);
            } else {
                sum_over.extend_from_slice(&[0, proto]);
                sum_over.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            }
        }
        sum_over.extend_from_slice(&l4);
        let mut csum = checksum(&sum_over);
        if s.l4 == L4::Udp && csum == 0 {
            csum = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    }

    let mut ip = Vec::new();
    if v6 {
        ip.extend_from_slice(&0x6000_0000u32.to_be_bytes());
        ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        ip.push(proto);
        ip.push(64);
        ip.extend_from_slice(&octets(s.src));
        ip.extend_from_slice(&octets(s.dst));
    } else {
        ip.push(0x45);
        ip.push(0);
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
        ip.push(64);
        ip.push(proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&octets(s.src));
        ip.extend_from_slice(&octets(s.dst));
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }

    let mut f = Vec::with_capacity(s.min_len.max(eth_hdr + ip.len() + l4.len()));
    f.extend_from_slice(&s.dst_mac);
    f.extend_from_slice(&s.src_mac);
    if let Some(vid) = s.vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_udp_is_64_bytes_with_valid_checksums() {
        let s = Spec::new(
            "198.18.0.1".parse().unwrap(),
            "198.19.255.2".parse().unwrap(),
            L4::Udp,
        );
        let f = build(&s);
        assert_eq!(f.len(), 64);
        assert_eq!(checksum(&f[14..34]), 0, "IPv4 header checksum");
    }

    #[test]
    fn vlan_tcp_v6_lengths() {
        let mut s = Spec::new(
            "2001:2::1".parse().unwrap(),
            "2001:2::2".parse().unwrap(),
            L4::Tcp,
        );
        s.vlan = Some(10);
        let f = build(&s);
        assert_eq!(f.len(), 18 + 40 + 20);
        assert_eq!(&f[12..14], &[0x81, 0x00]);
        assert_eq!(u16::from_be_bytes([f[22], f[23]]) as usize, f.len() - 58);
    }

    #[test]
    fn ports_flags_and_echo_checksums() {
        let mut s = Spec::new(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            L4::Tcp,
        );
        s.sport = 1234;
        s.tcp_flags = 0x14;
        let f = build(&s);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1234);
        assert_eq!(f[34 + 13], 0x14);
        s.l4 = L4::Icmp;
        let f = build(&s);
        assert_eq!(f[23], 1);
        assert_eq!(f[34], 8);
        assert_eq!(checksum(&f[34..]), 0, "ICMP checksum");
        s.l4 = L4::Other(47);
        let f = build(&s);
        assert_eq!((f[23], f.len()), (47, 64));
    }
}
