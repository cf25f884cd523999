//! Hand-checked cases for the reference model and the frame builders: one or
//! more per rule of `docs/dataplane.md`, so that a disagreement in the
//! differential test can be pinned on the kernel, not on the model.
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rand::{SeedableRng, rngs::SmallRng};
use sluice_common::{Family, L4, Reason, Verdict};

use crate::support::{
    frames::{self, ExtHeader, Frame, TPID_8021AD, TPID_8021Q, checksum},
    model::{self, Outcome, Packet, Parsed, Policy, Rule, judge},
};

fn a4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 literal")
}

fn a6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 literal")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix literal")
}

fn tcp4(dport: u16) -> Frame {
    Frame::v4(a4("198.18.0.1"), a4("198.18.1.2")).tcp(40000, dport)
}

fn tcp6(dport: u16) -> Frame {
    Frame::v6(a6("2001:2:0:0::1"), a6("2001:2:0:1::2")).tcp(40000, dport)
}

/// The L3/L4 view of `frame`, asserting the parser accepts it.
fn packet(frame: &[u8]) -> Packet {
    match model::parse(frame) {
        Parsed::Ip(p) => p,
        other => panic!("expected an IP packet, got {other:?}"),
    }
}

fn malformed(policy: &Policy, frame: &[u8], family: Family) {
    let out = judge(policy, frame);
    let verdict = if policy.malformed_drop {
        Verdict::Drop
    } else {
        Verdict::Pass
    };
    assert_eq!(
        (out.verdict, out.reason, out.family, out.l4),
        (verdict, Reason::Malformed, family, L4::None),
        "{out:?}"
    );
}

/// Kernel defaults: default pass, malformed drop.
fn defaults() -> Policy {
    Policy {
        malformed_drop: true,
        ..Policy::default()
    }
}

#[test]
fn builders_produce_consistent_headers() {
    let f = Frame::v4(a4("198.18.0.1"), a4("198.18.1.2"))
        .ipv4_options(&[1, 1, 1])
        .udp(53, 5353)
        .payload(b"hello")
        .build();
    let ip = &f[14..];
    assert_eq!(ip[0], 0x46, "IHL counts the options padded to 4 bytes");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 24 + 8 + 5);
    assert_eq!(checksum(&ip[..24]), 0, "IPv4 header checksum verifies");
    let udp = &ip[24..];
    assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 13);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17, 0, 13]);
    pseudo.extend_from_slice(udp);
    assert_eq!(checksum(&pseudo), 0, "UDP checksum verifies");

    let f = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
        .ext(ExtHeader::HopByHop { len_units: 1 })
        .ext(ExtHeader::Ah { len_units: 1 })
        .icmpv6_echo(1, 1)
        .vlan(TPID_8021AD, 100)
        .vlan(TPID_8021Q, 10)
        .build();
    assert_eq!(&f[12..14], &[0x88, 0xa8]);
    assert_eq!(&f[16..18], &[0x81, 0x00]);
    assert_eq!(&f[20..22], &[0x86, 0xdd]);
    let ip = &f[22..];
    assert_eq!(ip[6], 0, "first next header is hop-by-hop");
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 16 + 12 + 8);
    assert_eq!(ip[40], 51, "hop-by-hop chains to AH");
    assert_eq!(ip[56], 58, "AH chains to ICMPv6");
    assert_eq!(packet(&f).l4, L4::Icmpv6);
}

#[test]
fn short_ethernet_is_malformed_other() {
    let f = tcp4(80).build();
    malformed(&defaults(), &f[..13], Family::Other);
    let lenient = Policy {
        malformed_drop: false,
        ..defaults()
    };
    malformed(&lenient, &f[..13], Family::Other);
    assert_eq!(judge(&lenient, &f[..13]).verdict, Verdict::Pass);
}

#[test]
fn not_ip_passes_even_under_default_drop() {
    let policy = Policy {
        default_drop: true,
        deny: vec![net("0.0.0.0/0")],
        ..defaults()
    };
    let arp = Frame::ethertype(
        frames::ETH_P_ARP,
        frames::arp_request(a4("198.18.0.1"), a4("198.18.0.2")),
    )
    .vlan(TPID_8021Q, 5)
    .build();
    let out = judge(&policy, &arp);
    assert_eq!(
        out,
        Outcome {
            verdict: Verdict::Pass,
            reason: Reason::NotIp,
            family: Family::Other,
            l4: L4::None,
            list_hit: None,
            rule_hit: None,
        }
    );
}

#[test]
fn vlan_tags_two_walked_third_malformed_truncated_malformed() {
    let two = tcp4(80).vlan(TPID_8021AD, 1).vlan(TPID_8021Q, 2).build();
    assert_eq!(packet(&two).dport, Some(80));
    let three = tcp4(80)
        .vlan(TPID_8021AD, 1)
        .vlan(TPID_8021Q, 2)
        .vlan(TPID_8021Q, 3)
        .build();
    malformed(&defaults(), &three, Family::Other);
    // Tag announced but cut short: 16 of its 18 bytes.
    let one = tcp4(80).vlan(TPID_8021Q, 1).build();
    malformed(&defaults(), &one[..16], Family::Other);
    // The tag is there but the IP header is not: the failure is IPv4's.
    malformed(&defaults(), &one[..18], Family::V4);
}

#[test]
fn ipv4_header_checks() {
    let good = tcp4(80).build();
    for ihl in 0..5u8 {
        let mut f = good.clone();
        f[14] = 0x40 | ihl;
        malformed(&defaults(), &f, Family::V4);
    }
    let mut f = good.clone();
    f[14] = 0x65; // version 6 behind EtherType IPv4
    malformed(&defaults(), &f, Family::V4);
    // Total length past the frame, and shorter than the header.
    let mut f = good.clone();
    f[16..18].copy_from_slice(&41u16.to_be_bytes());
    malformed(&defaults(), &f, Family::V4);
    let mut f = good.clone();
    f[16..18].copy_from_slice(&19u16.to_be_bytes());
    malformed(&defaults(), &f, Family::V4);
    // 19 bytes of IP header.
    malformed(&defaults(), &good[..14 + 19], Family::V4);
    // Trailing Ethernet padding is fine.
    let padded = tcp4(80).pad_to(60).trailer(&[0xee; 7]).build();
    assert_eq!(packet(&padded).l4, L4::Tcp);
}

#[test]
fn ipv4_options_are_skipped() {
    let f = tcp4(443).ipv4_options(&[0x44; 40]).build();
    assert_eq!(f[14], 0x4f);
    let p = packet(&f);
    assert_eq!((p.l4, p.dport, p.proto), (L4::Tcp, Some(443), 6));
    // With IHL 15 the transport needs 60 + 20 bytes; total length covers only 70.
    let mut short = f.clone();
    short[16..18].copy_from_slice(&70u16.to_be_bytes());
    malformed(&defaults(), &short, Family::V4);
}

#[test]
fn later_fragment_has_no_ports_and_skips_dport_rules() {
    let policy = Policy {
        rules: vec![
            Rule {
                drop: true,
                dport: Some((80, 80)),
                ..Rule::default()
            },
            Rule {
                drop: true,
                proto: Some(6),
                src: Some(net("198.18.0.0/24")),
                ..Rule::default()
            },
        ],
        ..defaults()
    };
    // Nothing past the IP header is read, so 3 bytes of "TCP" are fine.
    let f = Frame::v4(a4("198.18.0.1"), a4("198.18.1.2"))
        .fragment(185, false)
        .proto(6, vec![0, 80, 0])
        .build();
    let out = judge(&policy, &f);
    assert_eq!(
        (out.l4, out.reason, out.rule_hit),
        (L4::Fragment, Reason::Rule, Some(1))
    );
    assert_eq!(packet(&f).proto, 6);
    // The same packet unfragmented hits the port rule.
    assert_eq!(judge(&policy, &tcp4(80).build()).rule_hit, Some(0));
    // A first fragment carries ports.
    let first = tcp4(80).fragment(0, true).build();
    assert_eq!(judge(&policy, &first).rule_hit, Some(0));
}

#[test]
fn udp_length_checks_and_first_fragments() {
    let base = || {
        Frame::v4(a4("198.18.0.1"), a4("198.18.1.2"))
            .udp(53, 53)
            .payload(&[0; 4])
    };
    let p = packet(&base().build());
    assert_eq!((p.l4, p.dport), (L4::Udp, Some(53)));
    malformed(&defaults(), &base().udp_length(13).build(), Family::V4);
    malformed(&defaults(), &base().udp_length(7).build(), Family::V4);
    // A first fragment's UDP length covers the whole datagram.
    let first = base().udp_length(1400).fragment(0, true).build();
    assert_eq!(packet(&first).l4, L4::Udp);
    malformed(
        &defaults(),
        &base().udp_length(7).fragment(0, true).build(),
        Family::V4,
    );
    // Same in IPv6 with a fragment header with M; an atomic fragment (M clear) is checked.
    let v6 = |more| {
        Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
            .fragment(0, more)
            .udp(53, 53)
            .udp_length(1400)
            .build()
    };
    assert_eq!(packet(&v6(true)).l4, L4::Udp);
    malformed(&defaults(), &v6(false), Family::V6);
    // 7 bytes of UDP header.
    let f = base().payload(&[]).build();
    let mut short = f[..f.len() - 1].to_vec();
    short[16..18].copy_from_slice(&27u16.to_be_bytes());
    malformed(&defaults(), &short, Family::V4);
}

#[test]
fn tcp_data_offset_checks() {
    malformed(
        &defaults(),
        &tcp4(80).tcp_data_offset(4).build(),
        Family::V4,
    );
    let ok = tcp4(80).tcp_data_offset(15).build();
    assert_eq!(packet(&ok).l4, L4::Tcp);
    // Data offset 15 claims 60 bytes; cut the options to 59.
    let mut cut = ok.clone();
    cut.truncate(cut.len() - 1);
    let ip_len = u16::from_be_bytes([cut[16], cut[17]]) - 1;
    cut[16..18].copy_from_slice(&ip_len.to_be_bytes());
    malformed(&defaults(), &cut, Family::V4);
    // 19 bytes of TCP header in IPv6.
    let f = tcp6(80).build();
    let mut short = f[..f.len() - 1].to_vec();
    short[18..20].copy_from_slice(&19u16.to_be_bytes());
    malformed(&defaults(), &short, Family::V6);
}

#[test]
fn icmp_classes_depend_on_family() {
    let icmp4 = Frame::v4(a4("198.18.0.1"), a4("198.18.0.2"))
        .icmp_echo(1, 1)
        .build();
    assert_eq!(packet(&icmp4).l4, L4::Icmp);
    let v6_in_v4 = Frame::v4(a4("198.18.0.1"), a4("198.18.0.2"))
        .icmpv6_echo(1, 1)
        .build();
    assert_eq!(packet(&v6_in_v4).l4, L4::Other);
    let icmp6 = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
        .icmpv6_echo(1, 1)
        .build();
    assert_eq!(packet(&icmp6).l4, L4::Icmpv6);
    let v4_in_v6 = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
        .icmp_echo(1, 1)
        .build();
    assert_eq!(packet(&v4_in_v6).l4, L4::Other);
    // 7 bytes of ICMP.
    let short = Frame::v4(a4("198.18.0.1"), a4("198.18.0.2"))
        .proto(1, vec![8; 7])
        .build();
    malformed(&defaults(), &short, Family::V4);
    // Other protocols need nothing at all.
    for proto in [47, 50, 59, 132] {
        let f = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
            .proto(proto, vec![])
            .build();
        let p = packet(&f);
        assert_eq!((p.l4, p.proto, p.dport), (L4::Other, proto, None));
    }
}

#[test]
fn ipv6_header_checks() {
    let good = tcp6(22).build();
    malformed(&defaults(), &good[..14 + 39], Family::V6);
    let mut f = good.clone();
    f[14] = 0x45;
    malformed(&defaults(), &f, Family::V6);
    let mut f = good.clone();
    f[18..20].copy_from_slice(&21u16.to_be_bytes());
    malformed(&defaults(), &f, Family::V6);
    // A shorter payload length leaves too few bytes for TCP.
    let mut f = good.clone();
    f[18..20].copy_from_slice(&19u16.to_be_bytes());
    malformed(&defaults(), &f, Family::V6);
    let padded = tcp6(22).trailer(&[0; 9]).build();
    assert_eq!(packet(&padded).dport, Some(22));
}

#[test]
fn ipv6_extension_chain_rules() {
    let hbh = ExtHeader::HopByHop { len_units: 0 };
    let dst = ExtHeader::DestOpts { len_units: 2 };
    let first = tcp6(80)
        .ext(hbh)
        .ext(ExtHeader::Routing { len_units: 0 })
        .build();
    assert_eq!(packet(&first).dport, Some(80));
    malformed(&defaults(), &tcp6(80).ext(dst).ext(hbh).build(), Family::V6);

    let chain = |n: usize| {
        let mut f = tcp6(443).ext(hbh);
        for i in 1..n {
            f = f.ext(if i % 2 == 0 {
                dst
            } else {
                ExtHeader::Ah { len_units: 1 }
            });
        }
        f.build()
    };
    assert_eq!(packet(&chain(8)).dport, Some(443));
    malformed(&defaults(), &chain(9), Family::V6);
    // 8 headers followed by a non-extension protocol is fine.
    let mut f = Frame::v6(a6("2001:2::1"), a6("2001:2::2")).proto(59, vec![]);
    for _ in 0..8 {
        f = f.ext(ExtHeader::Fragment {
            offset_units: 0,
            more: false,
        });
    }
    assert_eq!(packet(&f.build()).l4, L4::Other);

    // An extension header running past the payload length.
    let mut f = tcp6(80).ext(ExtHeader::DestOpts { len_units: 0 }).build();
    f[18..20].copy_from_slice(&7u16.to_be_bytes());
    malformed(&defaults(), &f, Family::V6);
}

#[test]
fn ipv6_later_fragment_stops_but_must_fit() {
    let f = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
        .ext(ExtHeader::HopByHop { len_units: 0 })
        .fragment(1, true)
        .proto(17, vec![1, 2])
        .build();
    let p = packet(&f);
    assert_eq!((p.l4, p.proto, p.dport), (L4::Fragment, 17, None));
    // Only 7 of the fragment header's 8 bytes are inside the payload.
    let bare = Frame::v6(a6("2001:2::1"), a6("2001:2::2"))
        .fragment(1, false)
        .proto(6, vec![])
        .build();
    let mut cut = bare[..bare.len() - 1].to_vec();
    cut[18..20].copy_from_slice(&7u16.to_be_bytes());
    malformed(&defaults(), &cut, Family::V6);
}

#[test]
fn allow_beats_deny_and_longest_prefix_is_reported() {
    let policy = Policy {
        allow: vec![
            net("198.18.0.0/15"),
            net("198.18.0.0/24"),
            net("2001:2::/48"),
        ],
        deny: vec![net("198.18.0.1/32"), net("0.0.0.0/0")],
        rules: vec![Rule {
            drop: true,
            ..Rule::default()
        }],
        ..defaults()
    };
    let out = judge(&policy, &tcp4(80).build());
    assert_eq!(
        (out.verdict, out.reason, out.list_hit, out.rule_hit),
        (
            Verdict::Pass,
            Reason::AllowList,
            Some(net("198.18.0.0/24")),
            None
        )
    );
    let other = Frame::v4(a4("198.19.0.1"), a4("198.18.0.1"))
        .tcp(1, 80)
        .build();
    let out = judge(&policy, &other);
    assert_eq!(
        (out.verdict, out.reason, out.list_hit),
        (Verdict::Pass, Reason::AllowList, Some(net("198.18.0.0/15")))
    );
    let outside = Frame::v4(a4("203.0.113.1"), a4("198.18.0.1"))
        .tcp(1, 80)
        .build();
    let out = judge(&policy, &outside);
    assert_eq!(
        (out.verdict, out.reason, out.list_hit),
        (Verdict::Drop, Reason::DenyList, Some(net("0.0.0.0/0")))
    );
    // Lists never cross families: 0.0.0.0/0 does not cover IPv6.
    let v6 = Frame::v6(a6("2001:db8::1"), a6("2001:2::1"))
        .tcp(1, 80)
        .build();
    let out = judge(&policy, &v6);
    assert_eq!((out.reason, out.rule_hit), (Reason::Rule, Some(0)));
    // Malformed packets never reach the lists.
    malformed(&policy, &tcp4(80).tcp_data_offset(3).build(), Family::V4);
}

#[test]
fn rules_first_match_family_proto_ports_prefixes() {
    let policy = Policy {
        rules: vec![
            // IPv6-only by its source prefix.
            Rule {
                drop: true,
                src: Some(net("::/0")),
                ..Rule::default()
            },
            Rule {
                drop: false,
                proto: Some(17),
                dport: Some((50, 60)),
                ..Rule::default()
            },
            Rule {
                drop: true,
                dst: Some(net("198.18.1.0/24")),
                ..Rule::default()
            },
            Rule {
                drop: false,
                proto: Some(47),
                ..Rule::default()
            },
        ],
        default_drop: true,
        ..defaults()
    };
    let hit = |f: Vec<u8>| {
        let out = judge(&policy, &f);
        (out.verdict, out.reason, out.rule_hit)
    };
    assert_eq!(
        hit(tcp6(80).build()),
        (Verdict::Drop, Reason::Rule, Some(0))
    );
    let udp = Frame::v4(a4("198.18.0.1"), a4("198.18.1.2"))
        .udp(1, 53)
        .build();
    assert_eq!(hit(udp), (Verdict::Pass, Reason::Rule, Some(1)));
    // TCP to 53: rule 1 wants UDP; rule 2 matches the destination.
    let tcp = Frame::v4(a4("198.18.0.1"), a4("198.18.1.2"))
        .tcp(1, 53)
        .build();
    assert_eq!(hit(tcp), (Verdict::Drop, Reason::Rule, Some(2)));
    let gre = Frame::v4(a4("198.18.0.1"), a4("198.19.0.2"))
        .proto(47, vec![0; 4])
        .build();
    assert_eq!(hit(gre), (Verdict::Pass, Reason::Rule, Some(3)));
    let udp_61 = Frame::v4(a4("198.18.0.1"), a4("198.19.0.2"))
        .udp(1, 61)
        .build();
    assert_eq!(hit(udp_61), (Verdict::Drop, Reason::Default, None));
    // Protocol "0" means any, as in the kernel encoding.
    let any = Policy {
        rules: vec![Rule {
            drop: true,
            proto: Some(0),
            ..Rule::default()
        }],
        ..defaults()
    };
    assert_eq!(judge(&any, &tcp4(1).build()).rule_hit, Some(0));
}

/// Random frames, corruptions and policies: the model never panics and its
/// outcomes keep the doc's invariants; the mix covers every class.
#[test]
fn random_material_is_judged_consistently() {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut seen = std::collections::HashSet::new();
    for i in 0..20_000 {
        let policy = frames::random_policy(&mut rng);
        let mut frame = frames::random_frame(&mut rng);
        assert!(frame.len() >= 14);
        if i % 2 == 1 {
            frames::mutate(&mut rng, &mut frame);
        }
        let out = judge(&policy, &frame);
        seen.insert((out.family, out.l4, out.reason));
        match out.reason {
            Reason::NotIp => assert_eq!(
                (out.family, out.l4, out.verdict),
                (Family::Other, L4::None, Verdict::Pass)
            ),
            Reason::Malformed => assert_eq!(out.l4, L4::None),
            Reason::AllowList | Reason::DenyList => assert!(out.list_hit.is_some()),
            Reason::Rule => assert!(out.rule_hit.is_some()),
            Reason::Default => assert!(out.list_hit.is_none() && out.rule_hit.is_none()),
            // The model's random policies hold no limit or syn-guard rules.
            Reason::RateLimit | Reason::SynDefence | Reason::MapFull => {
                panic!("the model judged {:?} without a limit rule", out.reason)
            }
            // The model has no load balancer.
            Reason::NoBackend | Reason::VipFragment => {
                panic!("the model judged {:?} without a service", out.reason)
            }
            // Socket-layer records only; never a packet's reason.
            Reason::Steer => panic!("the packet model judged {:?}", out.reason),
        }
    }
    for family in [Family::V4, Family::V6] {
        for l4 in [L4::Tcp, L4::Udp, L4::Other, L4::Fragment] {
            for reason in [
                Reason::AllowList,
                Reason::DenyList,
                Reason::Rule,
                Reason::Default,
            ] {
                assert!(
                    seen.contains(&(family, l4, reason)),
                    "never saw {family:?} {l4:?} {reason:?}"
                );
            }
        }
        assert!(seen.contains(&(family, L4::None, Reason::Malformed)));
    }
    assert!(seen.contains(&(Family::V4, L4::Icmp, Reason::Default)));
    assert!(seen.contains(&(Family::V6, L4::Icmpv6, Reason::Default)));
    assert!(seen.contains(&(Family::Other, L4::None, Reason::Malformed)));
    assert!(seen.contains(&(Family::Other, L4::None, Reason::NotIp)));
}
