//! Packet tests through BPF_PROG_TEST_RUN: a table of frames, policies and the
//! exact verdict, reason and counter deltas the XDP program must produce.
//! The reference model must agree with every row too. Needs root.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sluice_common::{Family, L4, Reason, Verdict};

const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C4: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 9);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 9);

struct Case {
    name: String,
    frame: Vec<u8>,
    policy: Policy,
    verdict: Verdict,
    reason: Reason,
    family: Family,
    l4: L4,
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The policy most rows run under: deny 198.19.0.0/16 and 2001:2:0:7::/64,
/// allow 198.19.5.9 back, drop UDP 4444 and ICMP, drop TCP 1-1023 to
/// 198.18.0.0/24, default pass, malformed drop.
fn base_policy() -> Policy {
    Policy {
        allow: vec![net("198.19.5.8/31")],
        deny: vec![
            net("198.19.0.0/16"),
            net("2001:2:0:7::/64"),
            net("198.18.9.0/24"),
        ],
        rules: vec![
            Rule {
                drop: true,
                proto: Some(17),
                dport: Some((4444, 4444)),
                ..Rule::default()
            },
            Rule {
                drop: true,
                proto: Some(1),
                ..Rule::default()
            },
            Rule {
                drop: true,
                proto: Some(6),
                dport: Some((1, 1023)),
                dst: Some(net("198.18.0.0/24")),
                ..Rule::default()
            },
            Rule {
                drop: true,
                proto: Some(58),
                src: Some(net("2001:2::/64")),
                ..Rule::default()
            },
            Rule {
                drop: false,
                proto: Some(47),
                ..Rule::default()
            },
        ],
        default_drop: false,
        malformed_drop: true,
        audit: false,
    }
}

fn case(
    name: &str,
    frame: Vec<u8>,
    verdict: Verdict,
    reason: Reason,
    family: Family,
    l4: L4,
) -> Case {
    Case {
        name: name.into(),
        frame,
        policy: base_policy(),
        verdict,
        reason,
        family,
        l4,
    }
}

use Family::{Other as FO, V4, V6};
use Reason::{AllowList, Default as Dflt, DenyList, Malformed, NotIp, Rule as ByRule};
use Verdict::{Drop, Pass};

use crate::support::{
    frames::{ETH_P_ARP, ExtHeader, Frame, TPID_8021AD, TPID_8021Q},
    kernel::{self, Expected},
    model::{self, Policy, Rule},
};

fn table() -> Vec<Case> {
    let mut t = vec![
        // Valid traffic of every protocol, both families.
        case(
            "v4 tcp to 8443 passes by default",
            Frame::v4(A4, B4).tcp(40000, 8443).build(),
            Pass,
            Dflt,
            V4,
            L4::Tcp,
        ),
        case(
            "v4 tcp to 22 on 198.18.0.0/24 hits the port-range rule",
            Frame::v4(A4, B4).tcp(40000, 22).build(),
            Drop,
            ByRule,
            V4,
            L4::Tcp,
        ),
        case(
            "v4 tcp to 22 elsewhere passes",
            Frame::v4(A4, Ipv4Addr::new(198, 18, 1, 2))
                .tcp(40000, 22)
                .build(),
            Pass,
            Dflt,
            V4,
            L4::Tcp,
        ),
        case(
            "v4 udp 4444 dropped by rule",
            Frame::v4(A4, B4).udp(5000, 4444).build(),
            Drop,
            ByRule,
            V4,
            L4::Udp,
        ),
        case(
            "v4 udp 4445 passes",
            Frame::v4(A4, B4).udp(5000, 4445).build(),
            Pass,
            Dflt,
            V4,
            L4::Udp,
        ),
        case(
            "v4 icmp echo dropped by rule",
            Frame::v4(A4, B4).icmp_echo(1, 1).build(),
            Drop,
            ByRule,
            V4,
            L4::Icmp,
        ),
        case(
            "v6 tcp passes",
            Frame::v6(A6, B6).tcp(40000, 22).build(),
            Pass,
            Dflt,
            V6,
            L4::Tcp,
        ),
        case(
            "v6 udp 4444 dropped by rule",
            Frame::v6(A6, B6).udp(5000, 4444).build(),
            Drop,
            ByRule,
            V6,
            L4::Udp,
        ),
        case(
            "v6 udp 4445 passes",
            Frame::v6(A6, B6).udp(5000, 4445).build(),
            Pass,
            Dflt,
            V6,
            L4::Udp,
        ),
        case(
            "v6 icmpv6 from 2001:2::/64 dropped by rule",
            Frame::v6(A6, B6).icmpv6_echo(1, 1).build(),
            Drop,
            ByRule,
            V6,
            L4::Icmpv6,
        ),
        case(
            "v6 icmpv6 from elsewhere passes",
            Frame::v6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1), B6)
                .icmpv6_echo(1, 1)
                .build(),
            Pass,
            Dflt,
            V6,
            L4::Icmpv6,
        ),
        case(
            "v4 gre matches the pass rule",
            Frame::v4(A4, B4).proto(47, vec![0; 8]).build(),
            Pass,
            ByRule,
            V4,
            L4::Other,
        ),
        case(
            "v4 sctp passes by default",
            Frame::v4(A4, B4).proto(132, vec![0; 12]).build(),
            Pass,
            Dflt,
            V4,
            L4::Other,
        ),
        case(
            "v6 no-next-header passes",
            Frame::v6(A6, B6).proto(59, vec![]).build(),
            Pass,
            Dflt,
            V6,
            L4::Other,
        ),
        case(
            "icmp (1) inside IPv6 is class other but matches proto 1",
            Frame::v6(A6, B6)
                .proto(1, vec![8, 0, 0, 0, 0, 0, 0, 0])
                .build(),
            Drop,
            ByRule,
            V6,
            L4::Other,
        ),
        // Lists.
        case(
            "v4 source in deny list",
            Frame::v4(Ipv4Addr::new(198, 19, 1, 1), B4)
                .tcp(1, 443)
                .build(),
            Drop,
            DenyList,
            V4,
            L4::Tcp,
        ),
        case(
            "v4 source allowed back inside a denied /16",
            Frame::v4(C4, B4).udp(1, 4444).build(),
            Pass,
            AllowList,
            V4,
            L4::Udp,
        ),
        case(
            "v6 source in deny list",
            Frame::v6(C6, B6).tcp(1, 443).build(),
            Drop,
            DenyList,
            V6,
            L4::Tcp,
        ),
        case(
            "deny list applies before rules",
            Frame::v4(Ipv4Addr::new(198, 18, 9, 1), B4)
                .proto(47, vec![0; 8])
                .build(),
            Drop,
            DenyList,
            V4,
            L4::Other,
        ),
        // Not IP.
        case(
            "arp passes untouched",
            crate::support::frames::arp_request(A4, B4),
            Pass,
            NotIp,
            FO,
            L4::None,
        ),
        case(
            "unknown ethertype passes",
            Frame::ethertype(0x88cc, vec![0; 46]).build(),
            Pass,
            NotIp,
            FO,
            L4::None,
        ),
        // VLAN.
        case(
            "802.1Q tag",
            Frame::v4(A4, B4).udp(1, 4444).vlan(TPID_8021Q, 10).build(),
            Drop,
            ByRule,
            V4,
            L4::Udp,
        ),
        case(
            "QinQ 802.1ad + 802.1Q",
            Frame::v6(A6, B6)
                .tcp(1, 80)
                .vlan(TPID_8021AD, 100)
                .vlan(TPID_8021Q, 10)
                .build(),
            Pass,
            Dflt,
            V6,
            L4::Tcp,
        ),
        case(
            "double 802.1Q",
            Frame::v4(Ipv4Addr::new(198, 19, 2, 2), B4)
                .tcp(1, 80)
                .vlan(TPID_8021Q, 1)
                .vlan(TPID_8021Q, 2)
                .build(),
            Drop,
            DenyList,
            V4,
            L4::Tcp,
        ),
        case(
            "three tags are more than sluice walks",
            Frame::v4(A4, B4)
                .tcp(1, 80)
                .vlan(TPID_8021AD, 1)
                .vlan(TPID_8021Q, 2)
                .vlan(TPID_8021Q, 3)
                .build(),
            Drop,
            Malformed,
            FO,
            L4::None,
        ),
        case(
            "vlan tagged arp",
            Frame::ethertype(ETH_P_ARP, vec![0; 28])
                .vlan(TPID_8021Q, 5)
                .build(),
            Pass,
            NotIp,
            FO,
            L4::None,
        ),
        // IPv4 options and lengths.
        case(
            "ihl 6 (one option word)",
            Frame::v4(A4, B4)
                .ipv4_options(&[1, 1, 1, 1])
                .udp(1, 4444)
                .build(),
            Drop,
            ByRule,
            V4,
            L4::Udp,
        ),
        case(
            "ihl 15 (40 option bytes)",
            Frame::v4(A4, B4).ipv4_options(&[1; 40]).tcp(1, 22).build(),
            Drop,
            ByRule,
            V4,
            L4::Tcp,
        ),
        case(
            "ethernet padding after the IP packet is fine",
            Frame::v4(A4, B4).udp(1, 4445).pad_to(60).build(),
            Pass,
            Dflt,
            V4,
            L4::Udp,
        ),
        // Fragments.
        case(
            "v4 first fragment has ports",
            Frame::v4(A4, B4)
                .fragment(0, true)
                .udp(1, 4444)
                .udp_length(3000)
                .build(),
            Drop,
            ByRule,
            V4,
            L4::Udp,
        ),
        case(
            "v4 later fragment: no ports, port rule does not match",
            Frame::v4(A4, B4).fragment(185, false).udp(1, 4444).build(),
            Pass,
            Dflt,
            V4,
            L4::Fragment,
        ),
        case(
            "v4 later fragment still hits the deny list",
            Frame::v4(Ipv4Addr::new(198, 19, 3, 3), B4)
                .fragment(185, true)
                .udp(1, 80)
                .build(),
            Drop,
            DenyList,
            V4,
            L4::Fragment,
        ),
        case(
            "v4 later icmp fragment matches the proto-only rule",
            Frame::v4(A4, B4)
                .fragment(100, false)
                .icmp_echo(1, 1)
                .build(),
            Drop,
            ByRule,
            V4,
            L4::Fragment,
        ),
        case(
            "v6 first fragment has ports",
            Frame::v6(A6, B6)
                .fragment(0, true)
                .udp(1, 4444)
                .udp_length(3000)
                .build(),
            Drop,
            ByRule,
            V6,
            L4::Udp,
        ),
        case(
            "v6 later fragment: no ports",
            Frame::v6(A6, B6).fragment(100, false).udp(1, 4444).build(),
            Pass,
            Dflt,
            V6,
            L4::Fragment,
        ),
        // IPv6 extension chains.
        case(
            "hop-by-hop, routing, dest-opts then udp",
            Frame::v6(A6, B6)
                .ext(ExtHeader::HopByHop { len_units: 0 })
                .ext(ExtHeader::Routing { len_units: 1 })
                .ext(ExtHeader::DestOpts { len_units: 2 })
                .udp(1, 4444)
                .build(),
            Drop,
            ByRule,
            V6,
            L4::Udp,
        ),
        case(
            "AH then tcp",
            Frame::v6(A6, B6)
                .ext(ExtHeader::Ah { len_units: 4 })
                .tcp(1, 80)
                .build(),
            Pass,
            Dflt,
            V6,
            L4::Tcp,
        ),
        case(
            "hop-by-hop not first is malformed",
            Frame::v6(A6, B6)
                .ext(ExtHeader::DestOpts { len_units: 0 })
                .ext(ExtHeader::HopByHop { len_units: 0 })
                .tcp(1, 80)
                .build(),
            Drop,
            Malformed,
            V6,
            L4::None,
        ),
        case(
            "8 extension headers are walked",
            {
                let mut f = Frame::v6(A6, B6).ext(ExtHeader::HopByHop { len_units: 0 });
                for _ in 0..7 {
                    f = f.ext(ExtHeader::DestOpts { len_units: 0 });
                }
                f.udp(1, 4444).build()
            },
            Drop,
            ByRule,
            V6,
            L4::Udp,
        ),
        case(
            "9 extension headers are too many",
            {
                let mut f = Frame::v6(A6, B6).ext(ExtHeader::HopByHop { len_units: 0 });
                for _ in 0..8 {
                    f = f.ext(ExtHeader::DestOpts { len_units: 0 });
                }
                f.udp(1, 4444).build()
            },
            Drop,
            Malformed,
            V6,
            L4::None,
        ),
        // Lies and broken headers.
        case(
            "ihl 4 is malformed",
            with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14, 0x44),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "ihl 0 is malformed",
            with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14, 0x40),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "ip version 6 in an IPv4 ethertype",
            with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14, 0x65),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "total length beyond the frame",
            with_be16(Frame::v4(A4, B4).tcp(1, 80).build(), 16, 1500),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "total length shorter than the header",
            with_be16(Frame::v4(A4, B4).tcp(1, 80).build(), 16, 19),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "total length leaving no room for tcp",
            with_be16(Frame::v4(A4, B4).tcp(1, 80).build(), 16, 30),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "ipv6 payload length beyond the frame",
            with_be16(Frame::v6(A6, B6).udp(1, 80).build(), 18, 900),
            Drop,
            Malformed,
            V6,
            L4::None,
        ),
        case(
            "udp length larger than the datagram",
            Frame::v4(A4, B4).udp(1, 80).udp_length(400).build(),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "udp length below 8",
            Frame::v6(A6, B6).udp(1, 80).udp_length(7).build(),
            Drop,
            Malformed,
            V6,
            L4::None,
        ),
        case(
            "tcp data offset 4",
            Frame::v4(A4, B4).tcp(1, 80).tcp_data_offset(4).build(),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "tcp data offset past the segment",
            with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14 + 20 + 12, 0xf0),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
        case(
            "icmp shorter than 8 bytes",
            Frame::v4(A4, B4).proto(1, vec![8, 0, 0, 0]).build(),
            Drop,
            Malformed,
            V4,
            L4::None,
        ),
    ];
    // The malformed action is configurable.
    let mut lenient = case(
        "malformed pass when configured",
        with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14, 0x43),
        Pass,
        Malformed,
        V4,
        L4::None,
    );
    lenient.policy.malformed_drop = false;
    t.push(lenient);
    // The default action is configurable.
    let mut strict = case(
        "default drop when configured",
        Frame::v4(A4, B4).tcp(1, 8443).build(),
        Drop,
        Dflt,
        V4,
        L4::Tcp,
    );
    strict.policy.default_drop = true;
    t.push(strict);
    // Audit mode, policy-wide: would-be drops pass and are counted as audit;
    // malformed frames are still dropped.
    for (name, frame, reason, l4) in [
        (
            "audit: deny-listed source passes",
            Frame::v4(Ipv4Addr::new(198, 19, 1, 1), B4)
                .tcp(1, 443)
                .build(),
            DenyList,
            L4::Tcp,
        ),
        (
            "audit: rule drop passes",
            Frame::v4(A4, B4).udp(5000, 4444).build(),
            ByRule,
            L4::Udp,
        ),
    ] {
        let mut c = case(name, frame, Verdict::Audit, reason, V4, l4);
        c.policy.audit = true;
        t.push(c);
    }
    let mut c = case(
        "audit: default drop passes",
        Frame::v6(A6, B6).tcp(1, 8443).build(),
        Verdict::Audit,
        Dflt,
        V6,
        L4::Tcp,
    );
    c.policy.audit = true;
    c.policy.default_drop = true;
    t.push(c);
    let mut c = case(
        "audit does not cover malformed frames",
        with_byte(Frame::v4(A4, B4).tcp(1, 80).build(), 14, 0x44),
        Drop,
        Malformed,
        V4,
        L4::None,
    );
    c.policy.audit = true;
    t.push(c);
    // Audit on one rule only.
    let mut c = case(
        "audit rule passes its matches",
        Frame::v4(A4, B4).udp(5000, 4444).build(),
        Verdict::Audit,
        ByRule,
        V4,
        L4::Udp,
    );
    c.policy.rules[0].audit = true;
    t.push(c);
    let mut c = case(
        "other rules still drop beside an audit rule",
        Frame::v4(A4, B4).icmp_echo(1, 1).build(),
        Drop,
        ByRule,
        V4,
        L4::Icmp,
    );
    c.policy.rules[0].audit = true;
    t.push(c);
    t.extend(source_ports_and_tcp_flags());
    t.extend(truncations());
    t
}

/// Rules on source ports and TCP flags, ahead of the base rules: drop
/// UDP from port 53 of 1024-65535 (reflection), drop TCP with exactly SYN
/// and FIN set, drop IPv6 TCP resets that carry no ACK.
fn source_ports_and_tcp_flags() -> Vec<Case> {
    let rules = [
        Rule {
            drop: true,
            proto: Some(17),
            sport: Some((53, 53)),
            dport: Some((1024, 65535)),
            ..Rule::default()
        },
        Rule {
            drop: true,
            tcp_flags: Some((0x03, 0x03)),
            ..Rule::default()
        },
        Rule {
            drop: true,
            proto: Some(6),
            tcp_flags: Some((0x04, 0x14)),
            src: Some(net("2001:2::/48")),
            ..Rule::default()
        },
    ];
    let rows = [
        (
            "udp from 53 to a high port",
            Frame::v4(A4, B4).udp(53, 40000).build(),
            Drop,
            ByRule,
            V4,
            L4::Udp,
        ),
        (
            "udp from 53 to 53 is not the rule's",
            Frame::v4(A4, B4).udp(53, 53).build(),
            Pass,
            Dflt,
            V4,
            L4::Udp,
        ),
        (
            "udp from 54 to a high port",
            Frame::v6(A6, B6).udp(54, 40000).build(),
            Pass,
            Dflt,
            V6,
            L4::Udp,
        ),
        (
            "tcp from 53 is not udp",
            Frame::v4(A4, B4).tcp(53, 40000).build(),
            Pass,
            Dflt,
            V4,
            L4::Tcp,
        ),
        (
            "syn+fin",
            Frame::v4(A4, B4).tcp(1, 8443).tcp_flags(0x03).build(),
            Drop,
            ByRule,
            V4,
            L4::Tcp,
        ),
        (
            "syn+fin+ack has both in the mask",
            Frame::v6(A6, B6).tcp(1, 8443).tcp_flags(0x13).build(),
            Drop,
            ByRule,
            V6,
            L4::Tcp,
        ),
        (
            "syn alone",
            Frame::v4(A4, B4).tcp(1, 8443).tcp_flags(0x02).build(),
            Pass,
            Dflt,
            V4,
            L4::Tcp,
        ),
        (
            "v6 rst without ack",
            Frame::v6(A6, B6).tcp(1, 8443).tcp_flags(0x04).build(),
            Drop,
            ByRule,
            V6,
            L4::Tcp,
        ),
        (
            "v6 rst with ack",
            Frame::v6(A6, B6).tcp(1, 8443).tcp_flags(0x14).build(),
            Pass,
            Dflt,
            V6,
            L4::Tcp,
        ),
        (
            "v4 rst without ack is not the v6 rule's",
            Frame::v4(A4, B4).tcp(1, 8443).tcp_flags(0x04).build(),
            Pass,
            Dflt,
            V4,
            L4::Tcp,
        ),
        (
            "a later fragment has no flags or ports",
            Frame::v4(A4, B4)
                .udp(53, 40000)
                .fragment(185, false)
                .build(),
            Pass,
            Dflt,
            V4,
            L4::Fragment,
        ),
    ];
    rows.into_iter()
        .map(|(name, frame, verdict, reason, family, l4)| {
            let mut c = case(
                &format!("sport/flags: {name}"),
                frame,
                verdict,
                reason,
                family,
                l4,
            );
            c.policy.rules.splice(0..0, rules.iter().cloned());
            c
        })
        .collect()
}

fn with_byte(mut f: Vec<u8>, at: usize, v: u8) -> Vec<u8> {
    f[at] = v;
    f
}

fn with_be16(mut f: Vec<u8>, at: usize, v: u16) -> Vec<u8> {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    f
}

/// Every frame cut at every length from 14 bytes up: an IP packet that no
/// longer fits its own length fields is malformed, with the family of the
/// EtherType once the VLAN tags are whole.
fn truncations() -> Vec<Case> {
    let full: Vec<(&str, Vec<u8>, usize, Family)> = vec![
        ("v4 tcp", Frame::v4(A4, B4).tcp(1, 80).build(), 0, V4),
        (
            "v4 udp with options in QinQ",
            Frame::v4(A4, B4)
                .ipv4_options(&[1; 8])
                .udp(1, 53)
                .vlan(TPID_8021AD, 1)
                .vlan(TPID_8021Q, 2)
                .build(),
            2,
            V4,
        ),
        ("v4 icmp", Frame::v4(A4, B4).icmp_echo(1, 2).build(), 0, V4),
        (
            "v6 ext chain udp",
            Frame::v6(A6, B6)
                .ext(ExtHeader::HopByHop { len_units: 0 })
                .ext(ExtHeader::Fragment {
                    offset_units: 0,
                    more: true,
                })
                .udp(1, 53)
                .build(),
            0,
            V6,
        ),
        (
            "v6 tcp in a vlan",
            Frame::v6(A6, B6).tcp(1, 80).vlan(TPID_8021Q, 3).build(),
            1,
            V6,
        ),
        (
            "v6 icmpv6",
            Frame::v6(A6, B6).icmpv6_echo(1, 2).build(),
            0,
            V6,
        ),
    ];
    let mut out = Vec::new();
    for (name, frame, tags, family) in full {
        for cut in 14..frame.len() {
            let fam = if cut < 14 + 4 * tags { FO } else { family };
            out.push(case(
                &format!("{name} cut to {cut} bytes"),
                frame[..cut].to_vec(),
                Drop,
                Malformed,
                fam,
                L4::None,
            ));
        }
    }
    out
}

#[test]
fn packet_table() {
    let sandbox = kernel::new_sandbox();
    let mut maps = sandbox.policy().expect("policy maps");
    let mut failures = Vec::new();
    let mut current: Option<Policy> = None;
    let cases = table();
    for c in &cases {
        if current.as_ref() != Some(&c.policy) {
            kernel::set_policy(&mut maps, &c.policy);
            current = Some(c.policy.clone());
        }
        let model = model::judge(&c.policy, &c.frame);
        let want = (c.verdict, c.reason, c.family, c.l4);
        let mut problems = Vec::new();
        if (model.verdict, model.reason, model.family, model.l4) != want {
            problems.push(format!("model says {model:?}"));
        }
        let before = kernel::snapshot(&maps);
        let run = sandbox.run(&c.frame).expect("test_run");
        let after = kernel::snapshot(&maps);
        if run.action != kernel::xdp_action(c.verdict) {
            problems.push(format!(
                "kernel returned XDP action {}, want {}",
                run.action,
                kernel::xdp_action(c.verdict)
            ));
        }
        let mut expected = Expected::default();
        expected.add(&model, c.frame.len());
        if let Err(e) = expected.check(&before, &after) {
            problems.push(format!("counters:\n{e}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: want {:?}\n{}\nframe ({} bytes):\n{}",
                c.name,
                want,
                problems.join("\n"),
                c.frame.len(),
                kernel::hex(&c.frame)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
