//! Reference model of the XDP program's verdict, written from
//! `docs/dataplane.md` (sections 1 and 2) alone, never from the kernel code, so
//! that a differential test compares two independent readings of the contract.
//!
//! It models one policy generation: [`Policy`] is what the active generation
//! holds, and [`judge`] says what the kernel must do with a frame under it.
//!
//! ```text
//! parse(frame)          -> Parsed::{NotIp, Malformed(family), Ip(Packet)}
//! judge(&policy, frame) -> Outcome { verdict, reason, family, l4, list_hit, rule_hit }
//! ```
//!
//! Readings of the doc that are not spelled out there:
//! - A rule's family is the family of its `src`/`dst` prefixes. A rule whose
//!   two prefixes have different families cannot be encoded (the kernel rule
//!   has one family field), so the model lets it match nothing.
//! - `proto: Some(0)` is the same as `None`: the kernel encodes "any" as 0.
//! - Lists hold prefixes, so `list_hit` is the matching entry truncated to its
//!   prefix length (`198.18.0.7/24` is reported as `198.18.0.0/24`).
//! - An IPv6 packet is a "first fragment" (no UDP length check) when any
//!   fragment header walked before the transport header has M set (a fragment
//!   header with offset 0 and M clear is an atomic fragment: checked).
//! - An extension header whose length byte cannot be read is malformed, like
//!   one that does not fit (the smallest extension header is 8 bytes anyway).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sluice_common::{Family, L4, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, Reason, Verdict};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

/// One generation of policy, as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Source prefixes that are always passed (both families in one list; the
    /// kernel splits them into `ALLOW_V4`/`ALLOW_V6`).
    pub allow: Vec<IpNet>,
    /// Source prefixes that are dropped unless allow-listed.
    pub deny: Vec<IpNet>,
    /// Evaluated in order, first match wins.
    pub rules: Vec<Rule>,
    /// Action for IP traffic nothing matched (the kernel default is pass).
    pub default_drop: bool,
    /// Action for frames that cannot be parsed (the kernel default is drop).
    pub malformed_drop: bool,
    /// Audit mode: what the lists, rules or default would drop is passed
    /// and counted with verdict `Audit`; malformed frames are not affected.
    pub audit: bool,
}

/// An L4 rule; `None` conditions always hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Drop when it matches (else pass).
    pub drop: bool,
    /// IPv4 protocol / last IPv6 next header. `Some(0)` means any, as in the kernel.
    pub proto: Option<u8>,
    /// Inclusive destination port range; only packets with ports can match.
    pub dport: Option<(u16, u16)>,
    /// Inclusive source port range; only packets with ports can match.
    pub sport: Option<(u16, u16)>,
    /// TCP flags test (set, mask): only TCP packets whose flags masked with
    /// `mask` equal `set` match.
    pub tcp_flags: Option<(u8, u8)>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    /// A drop rule in audit mode: its matches are passed, counted as `Audit`.
    pub audit: bool,
}

/// What the kernel must do with a frame, and how it must count it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub reason: Reason,
    pub family: Family,
    pub l4: L4,
    /// The longest matching allow or deny prefix that decided the verdict.
    pub list_hit: Option<IpNet>,
    /// Index in `Policy::rules` of the rule that decided the verdict.
    pub rule_hit: Option<usize>,
}

/// An IP packet the parser accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub family: Family,
    pub l4: L4,
    /// IPv4 protocol field or the last IPv6 next header (for a later IPv6
    /// fragment: the fragment header's next header).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Destination port, for TCP and UDP that are not later fragments.
    pub dport: Option<u16>,
    /// Source port, likewise.
    pub sport: Option<u16>,
    /// The TCP header's flags byte, for TCP that is not a later fragment.
    pub tcp_flags: Option<u8>,
}

/// Result of section 1 (parsing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4 or IPv6: passed untouched.
    NotIp,
    /// Could not be parsed; the family says how far the parser got.
    Malformed(Family),
    Ip(Packet),
}

/// Section 2: the verdict for `frame` under `policy`.
#[must_use]
pub fn judge(policy: &Policy, frame: &[u8]) -> Outcome {
    let pkt = match parse(frame) {
        Parsed::NotIp => {
            return outcome(Verdict::Pass, Reason::NotIp, Family::Other, L4::None);
        }
        Parsed::Malformed(family) => {
            let verdict = action(policy.malformed_drop);
            return outcome(verdict, Reason::Malformed, family, L4::None);
        }
        Parsed::Ip(pkt) => pkt,
    };
    let base = outcome(Verdict::Pass, Reason::Default, pkt.family, pkt.l4);

    if let Some(hit) = longest_match(&policy.allow, pkt.src) {
        return Outcome {
            reason: Reason::AllowList,
            list_hit: Some(hit),
            ..base
        };
    }
    if let Some(hit) = longest_match(&policy.deny, pkt.src) {
        return Outcome {
            verdict: audited(true, policy.audit),
            reason: Reason::DenyList,
            list_hit: Some(hit),
            ..base
        };
    }
    if let Some((i, rule)) = policy
        .rules
        .iter()
        .enumerate()
        .find(|(_, rule)| rule_matches(rule, &pkt))
    {
        return Outcome {
            verdict: audited(rule.drop, policy.audit || rule.audit),
            reason: Reason::Rule,
            rule_hit: Some(i),
            ..base
        };
    }
    Outcome {
        verdict: audited(policy.default_drop, policy.audit),
        ..base
    }
}

fn outcome(verdict: Verdict, reason: Reason, family: Family, l4: L4) -> Outcome {
    Outcome {
        verdict,
        reason,
        family,
        l4,
        list_hit: None,
        rule_hit: None,
    }
}

/// A drop that audit mode turns into a counted pass.
fn audited(drop: bool, audit: bool) -> Verdict {
    match (drop, audit) {
        (false, _) => Verdict::Pass,
        (true, false) => Verdict::Drop,
        (true, true) => Verdict::Audit,
    }
}

fn action(drop: bool) -> Verdict {
    if drop { Verdict::Drop } else { Verdict::Pass }
}

/// Longest prefix in `list` containing `addr` (families never mix: an IPv4
/// prefix never contains an IPv6 address, `::/0` does not cover IPv4).
fn longest_match(list: &[IpNet], addr: IpAddr) -> Option<IpNet> {
    list.iter()
        .filter(|net| net.contains(&addr))
        .max_by_key(|net| net.prefix_len())
        .map(IpNet::trunc)
}

fn family_of(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

fn rule_matches(rule: &Rule, pkt: &Packet) -> bool {
    // The rule's family comes from whichever addresses it names; both must
    // agree with the packet (a mixed rule therefore never matches).
    let family_ok = [rule.src, rule.dst]
        .iter()
        .flatten()
        .all(|net| family_of(net) == pkt.family);
    let proto_ok = match rule.proto {
        None | Some(0) => true,
        Some(p) => p == pkt.proto,
    };
    let in_range = |range: Option<(u16, u16)>, port: Option<u16>| match (range, port) {
        (None, _) => true,
        (Some((lo, hi)), Some(port)) => (lo..=hi).contains(&port),
        (Some(_), None) => false,
    };
    let port_ok = in_range(rule.dport, pkt.dport) && in_range(rule.sport, pkt.sport);
    let flags_ok = match (rule.tcp_flags, pkt.tcp_flags) {
        (None, _) => true,
        (Some((set, mask)), Some(flags)) => flags & mask == set,
        (Some(_), None) => false,
    };
    let src_ok = rule.src.is_none_or(|net| net.contains(&pkt.src));
    let dst_ok = rule.dst.is_none_or(|net| net.contains(&pkt.dst));
    family_ok && proto_ok && port_ok && flags_ok && src_ok && dst_ok
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Section 1: how the parser sees `frame`.
#[must_use]
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HLEN {
        return Parsed::Malformed(Family::Other);
    }
    let mut ethertype = be16(frame, 12);
    let mut off = ETH_HLEN;
    let is_vlan = |et: u16| et == ETH_P_8021Q || et == ETH_P_8021AD;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        if frame.len() < off + VLAN_HLEN {
            return Parsed::Malformed(Family::Other);
        }
        // Tag = TCI (2 bytes) then the inner EtherType.
        ethertype = be16(frame, off + 2);
        off += VLAN_HLEN;
    }
    if is_vlan(ethertype) {
        return Parsed::Malformed(Family::Other);
    }
    let l3 = &frame[off..];
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(l3),
        ETH_P_IPV6 => parse_ipv6(l3),
        _ => return Parsed::NotIp,
    };
    parsed.map_or(
        Parsed::Malformed(family_of_ethertype(ethertype)),
        Parsed::Ip,
    )
}

fn family_of_ethertype(ethertype: u16) -> Family {
    if ethertype == ETH_P_IP {
        Family::V4
    } else {
        Family::V6
    }
}

/// `None` = malformed (family IPv4).
fn parse_ipv4(ip: &[u8]) -> Option<Packet> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if hlen < 20 || total < hlen || total > ip.len() {
        return None;
    }
    let frag = be16(ip, 6);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    let proto = ip[9];
    let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let mut pkt = Packet {
        family: Family::V4,
        l4: L4::Fragment,
        proto,
        src,
        dst,
        dport: None,
        sport: None,
        tcp_flags: None,
    };
    if offset != 0 {
        return Some(pkt);
    }
    let (l4, ports) = parse_transport(Family::V4, proto, &ip[hlen..total], more_fragments)?;
    pkt.l4 = l4;
    set_ports(&mut pkt, ports);
    Some(pkt)
}

/// `None` = malformed (family IPv6).
fn parse_ipv6(ip: &[u8]) -> Option<Packet> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(be16(ip, 4));
    if 40 + payload_len > ip.len() {
        return None;
    }
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&ip[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let mut pkt = Packet {
        family: Family::V6,
        l4: L4::Fragment,
        proto: 0,
        src: addr(8),
        dst: addr(24),
        dport: None,
        sport: None,
        tcp_flags: None,
    };
    let payload = &ip[40..40 + payload_len];
    let is_ext = |nh: u8| {
        matches!(
            nh,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS
        )
    };
    let mut next = ip[6];
    let mut off = 0;
    let mut first_fragment = false;
    for walked in 0..MAX_IPV6_EXT_HEADERS {
        if !is_ext(next) {
            break;
        }
        if next == IPPROTO_HOPOPTS && walked > 0 {
            return None;
        }
        let hdr = &payload[off..];
        if hdr.len() < 2 {
            return None;
        }
        let size = match next {
            IPPROTO_FRAGMENT => 8,
            IPPROTO_AH => (usize::from(hdr[1]) + 2) * 4,
            _ => (usize::from(hdr[1]) + 1) * 8,
        };
        if size > hdr.len() {
            return None;
        }
        if next == IPPROTO_FRAGMENT {
            let field = be16(hdr, 2);
            if field >> 3 != 0 {
                pkt.proto = hdr[0];
                return Some(pkt);
            }
            first_fragment |= field & 1 != 0;
        }
        next = hdr[0];
        off += size;
    }
    if is_ext(next) {
        return None;
    }
    pkt.proto = next;
    let (l4, ports) = parse_transport(Family::V6, next, &payload[off..], first_fragment)?;
    pkt.l4 = l4;
    set_ports(&mut pkt, ports);
    Some(pkt)
}

fn set_ports(pkt: &mut Packet, ports: Option<Ports>) {
    if let Some((sport, dport, flags)) = ports {
        pkt.sport = Some(sport);
        pkt.dport = Some(dport);
        pkt.tcp_flags = flags;
    }
}

/// `l4` is exactly the bytes available to the transport header. `None` = malformed.
/// Source port, destination port and (TCP) the flags byte.
type Ports = (u16, u16, Option<u8>);

fn parse_transport(
    family: Family,
    proto: u8,
    l4: &[u8],
    first_fragment: bool,
) -> Option<(L4, Option<Ports>)> {
    match (proto, family) {
        (IPPROTO_TCP, _) => {
            if l4.len() < 20 {
                return None;
            }
            let data_offset = usize::from(l4[12] >> 4);
            if data_offset < 5 || data_offset * 4 > l4.len() {
                return None;
            }
            Some((L4::Tcp, Some((be16(l4, 0), be16(l4, 2), Some(l4[13])))))
        }
        (IPPROTO_UDP, _) => {
            if l4.len() < 8 {
                return None;
            }
            let udp_len = usize::from(be16(l4, 4));
            // A first fragment's UDP length covers the reassembled datagram.
            if udp_len < 8 || (!first_fragment && udp_len > l4.len()) {
                return None;
            }
            Some((L4::Udp, Some((be16(l4, 0), be16(l4, 2), None))))
        }
        (IPPROTO_ICMP, Family::V4) => (l4.len() >= 8).then_some((L4::Icmp, None)),
        (IPPROTO_ICMPV6, Family::V6) => (l4.len() >= 8).then_some((L4::Icmpv6, None)),
        _ => Some((L4::Other, None)),
    }
}
