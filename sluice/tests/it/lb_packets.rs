//! The load balancer through BPF_PROG_TEST_RUN, byte for byte: DNAT of
//! TCP/UDP over IPv4 and IPv6 (checksums included), traffic that is not for
//! a VIP untouched, fragments and IP options, the connection table pinning
//! flows across backend changes, the reverse translation (TC egress), and
//! the counters. Needs root.
//!
//! The fixtures are tables per feature (frame, services, expected verdict,
//! bytes and counter deltas); the framework that runs them is `harness`,
//! the frame builders are `support::frames`.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use sluice::{
    dataplane::{
        lb as lbmaps,
        sandbox::{Sandbox, XDP_DROP, XDP_PASS},
    },
    model::lb::Mode,
};
use sluice_common::{
    Family, L4, Reason, Verdict,
    lb::{CONN_F_CLOSED, LbCounter, lb_stat},
};

mod harness;

use harness::*;

use crate::support::{
    frames::{ETH_P_ARP, ExtHeader, Frame, TPID_8021Q, arp_request},
    kernel::{hex, new_sandbox},
    netns::{Netns, link_mac},
};

// ---------------------------------------------------------------------------
// 1. DNAT, byte for byte
// ---------------------------------------------------------------------------

#[test]
fn dnat_tcp_ipv4_exact_bytes() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"])],
    );
    let input = Frame::v4(CLIENT4, VIP4)
        .tcp(40000, 80)
        .tcp_flags(0x02)
        .tcp_seq(7)
        .payload(b"hello")
        .build();
    let want = Frame::v4(CLIENT4, BE4[0])
        .tcp(40000, 8080)
        .tcp_flags(0x02)
        .tcp_seq(7)
        .payload(b"hello")
        .build();
    let (action, out) = run(&sb, &input);
    // No route to 198.18.1.2 in the test's namespace: the rewritten frame
    // goes to the stack, MACs unchanged.
    assert_eq!(action, XDP_PASS);
    assert_frame("IPv4 TCP DNAT", &out, &want);
    assert_eq!(stat(&sb, lb_stat::TO_STACK), 1);
    assert_eq!(stat(&sb, lb_stat::CONN_CREATED), 1);
    assert_eq!(
        counter(&sb, Family::V4, L4::Tcp, Verdict::Pass, Reason::Default),
        1
    );
}

/// A DNATed frame that goes to the stack: one new connection, counted with
/// the firewall's reason.
fn nat_case(what: &'static str, input: Vec<u8>, want: Vec<u8>, family: Family, l4: L4) -> Case {
    Case {
        what,
        input,
        action: XDP_PASS,
        want,
        lb: vec![(lb_stat::TO_STACK, 1), (lb_stat::CONN_CREATED, 1)],
        counted: Some((family, l4, Verdict::Pass, Reason::Default)),
    }
}

#[test]
fn dnat_exact_bytes_table() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.2:5353"]),
            svc("198.18.0.10:8000/tcp", Mode::Nat, &["198.18.1.3"]),
            svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
            svc("[2001:2::10]:53/udp", Mode::Nat, &["[2001:2:0:1::2]:5353"]),
        ],
    );
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BE4[0]));
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));

    // UDP over IPv4 without a checksum (0): stays 0 after the rewrite.
    let no_sum = |dst: Ipv4Addr, dport: u16| {
        let mut f = Frame::v4(CLIENT4, dst)
            .udp(40003, dport)
            .payload(b"query")
            .build();
        f[14 + 20 + 6..14 + 20 + 8].fill(0);
        f
    };
    // UDP over IPv4 whose rewritten checksum computes to 0: sent as 0xffff.
    let p4 = zero_sum_payload(|p| udp_frame(c4, b4, 40004, 5353, p), 14 + 20 + 6);
    // IPv4 options (router alert, NOPs, end of list) stay; the transport
    // header is found after them.
    let opts = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    let with_opts = |dst: Ipv4Addr, dport: u16| {
        Frame::v4(CLIENT4, dst)
            .ipv4_options(&opts)
            .tcp(40005, dport)
            .tcp_flags(SYN)
            .payload(b"opts")
            .build()
    };
    let tagged = |dst: Ipv4Addr, dport: u16| {
        Frame::v4(CLIENT4, dst)
            .vlan(TPID_8021Q, 10)
            .tcp(40006, dport)
            .tcp_flags(SYN)
            .build()
    };
    let ext6 = |dst: Ipv6Addr, dport: u16| {
        Frame::v6(CLIENT6, dst)
            .ext(ExtHeader::DestOpts { len_units: 1 })
            .tcp(40007, dport)
            .tcp_flags(SYN)
            .payload(b"ext")
            .build()
    };
    let padded = |dst: Ipv4Addr, dport: u16| {
        Frame::v4(CLIENT4, dst)
            .udp(40008, dport)
            .payload(b"x")
            .pad_to(60)
            .build()
    };
    let acked = |dst: IpAddr, dport: u16| {
        Frame::ip(c4, dst)
            .tcp(40009, dport)
            .tcp_flags(0x18)
            .tcp_seq(0xdead_beef)
            .payload(&[0xa5; 333])
            .build()
    };
    let cases = vec![
        nat_case(
            "IPv6 TCP",
            tcp_frame(c6, v6, 40001, 443, SYN, b"hello6"),
            tcp_frame(c6, b6, 40001, 8443, SYN, b"hello6"),
            Family::V6,
            L4::Tcp,
        ),
        nat_case(
            "IPv4 UDP",
            udp_frame(c4, v4, 40002, 53, b"query"),
            udp_frame(c4, b4, 40002, 5353, b"query"),
            Family::V4,
            L4::Udp,
        ),
        nat_case(
            "IPv6 UDP",
            udp_frame(c6, v6, 40002, 53, b"query6"),
            udp_frame(c6, b6, 40002, 5353, b"query6"),
            Family::V6,
            L4::Udp,
        ),
        nat_case(
            "IPv4 UDP with checksum 0 (none): stays 0",
            no_sum(VIP4, 53),
            no_sum(BE4[0], 5353),
            Family::V4,
            L4::Udp,
        ),
        nat_case(
            "IPv4 UDP whose new checksum computes to 0: 0xffff",
            udp_frame(c4, v4, 40004, 53, &p4),
            udp_frame(c4, b4, 40004, 5353, &p4),
            Family::V4,
            L4::Udp,
        ),
        nat_case(
            "backend without a port: the destination port is kept",
            tcp_frame(c4, v4, 40010, 8000, SYN, b"keep"),
            tcp_frame(c4, IpAddr::V4(BE4[1]), 40010, 8000, SYN, b"keep"),
            Family::V4,
            L4::Tcp,
        ),
        nat_case(
            "IPv4 with options",
            with_opts(VIP4, 80),
            with_opts(BE4[0], 8080),
            Family::V4,
            L4::Tcp,
        ),
        nat_case(
            "VLAN-tagged IPv4: rewritten, to the stack",
            tagged(VIP4, 80),
            tagged(BE4[0], 8080),
            Family::V4,
            L4::Tcp,
        ),
        nat_case(
            "IPv6 TCP after a destination-options header",
            ext6(VIP6, 443),
            ext6(BE6, 8443),
            Family::V6,
            L4::Tcp,
        ),
        nat_case(
            "IPv4 UDP in a frame with Ethernet padding (padding kept)",
            padded(VIP4, 53),
            padded(BE4[0], 5353),
            Family::V4,
            L4::Udp,
        ),
        nat_case(
            "IPv4 TCP data segment as a flow's first packet",
            acked(v4, 80),
            acked(b4, 8080),
            Family::V4,
            L4::Tcp,
        ),
    ];
    run_cases(&sb, &cases, run);
    assert_eq!(
        conns(&sb).len(),
        cases.len(),
        "one connection-table entry per case"
    );
}

/// IPv6 UDP must never carry checksum 0 (RFC 8200 §8.1: a computed 0 is
/// sent as 0xffff; receivers drop a zero checksum).
#[test]
fn dnat_ipv6_udp_zero_checksum_is_sent_as_ffff() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[svc(
            "[2001:2::10]:53/udp",
            Mode::Nat,
            &["[2001:2:0:1::2]:5353"],
        )],
    );
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));
    let p = zero_sum_payload(|p| udp_frame(c6, b6, 40000, 5353, p), 14 + 40 + 6);
    let input = udp_frame(c6, v6, 40000, 53, &p);
    let want = udp_frame(c6, b6, 40000, 5353, &p);
    let (action, out) = run(&sb, &input);
    assert_eq!(action, XDP_PASS);
    assert_frame("IPv6 UDP DNAT whose checksum computes to 0", &out, &want);
}

// ---------------------------------------------------------------------------
// 2. Not for a VIP
// ---------------------------------------------------------------------------

fn untouched(what: &'static str, input: Vec<u8>, counted: (Family, L4, Verdict, Reason)) -> Case {
    Case {
        what,
        want: input.clone(),
        input,
        action: XDP_PASS,
        lb: vec![],
        counted: Some(counted),
    }
}

#[test]
fn not_for_a_vip_is_untouched() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
            svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
        ],
    );
    let (c4, v4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
    let (c6, v6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6));
    let pass = |f, l| (f, l, Verdict::Pass, Reason::Default);
    let cases = vec![
        untouched(
            "TCP to another address, same port",
            tcp_frame(
                c4,
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
                40000,
                80,
                SYN,
                b"",
            ),
            pass(Family::V4, L4::Tcp),
        ),
        untouched(
            "TCP to a backend's address and port",
            tcp_frame(c4, IpAddr::V4(BE4[0]), 40000, 8080, SYN, b""),
            pass(Family::V4, L4::Tcp),
        ),
        untouched(
            "TCP to a VIP port without a service",
            tcp_frame(c4, v4, 40000, 81, SYN, b""),
            pass(Family::V4, L4::Tcp),
        ),
        untouched(
            "UDP to the VIP's TCP service port",
            udp_frame(c4, v4, 40000, 80, b"x"),
            pass(Family::V4, L4::Udp),
        ),
        untouched(
            "ICMP echo to the VIP",
            Frame::v4(CLIENT4, VIP4)
                .icmp_echo(7, 1)
                .payload(b"ping")
                .build(),
            pass(Family::V4, L4::Icmp),
        ),
        untouched(
            "ICMPv6 echo to the IPv6 VIP",
            Frame::v6(CLIENT6, VIP6)
                .icmpv6_echo(7, 1)
                .payload(b"ping")
                .build(),
            pass(Family::V6, L4::Icmpv6),
        ),
        untouched(
            "IPv6 TCP to a VIP port without a service",
            tcp_frame(c6, v6, 40000, 80, SYN, b""),
            pass(Family::V6, L4::Tcp),
        ),
        untouched(
            "ARP for the VIP",
            Frame::ethertype(ETH_P_ARP, arp_request(CLIENT4, VIP4)).build(),
            (Family::Other, L4::None, Verdict::Pass, Reason::NotIp),
        ),
    ];
    run_cases(&sb, &cases, run);
    assert!(
        conns(&sb).is_empty(),
        "no connection recorded: {:?}",
        conns(&sb)
    );
    let ids = [svc_id(&sb, SVC_WEB), svc_id(&sb, "[2001:2::10]:443/tcp")];
    let counts = lbmaps::service_counters(sb.root(), ids.into_iter()).unwrap();
    for id in ids {
        assert_eq!(
            counts[&id],
            LbCounter::default(),
            "service {id} counted traffic not for it"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Fragments
// ---------------------------------------------------------------------------

fn vip_fragment(what: &'static str, input: Vec<u8>, family: Family, l4: L4) -> Case {
    Case {
        what,
        want: input.clone(),
        input,
        action: XDP_DROP,
        lb: vec![],
        counted: Some((family, l4, Verdict::Drop, Reason::VipFragment)),
    }
}

#[test]
fn fragments_to_a_vip_are_dropped() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.2:5353"]),
            svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
        ],
    );
    let cases = vec![
        vip_fragment(
            "IPv4 TCP first fragment (MF, offset 0)",
            Frame::v4(CLIENT4, VIP4)
                .tcp(40000, 80)
                .payload(&[1; 64])
                .fragment(0, true)
                .build(),
            Family::V4,
            L4::Tcp,
        ),
        vip_fragment(
            "IPv4 UDP first fragment (MF, offset 0, UDP length of the whole datagram)",
            Frame::v4(CLIENT4, VIP4)
                .udp(40000, 53)
                .udp_length(3000)
                .payload(&[2; 64])
                .fragment(0, true)
                .build(),
            Family::V4,
            L4::Udp,
        ),
        vip_fragment(
            "IPv4 last fragment (offset 185)",
            Frame::v4(CLIENT4, VIP4)
                .proto(6, vec![3; 64])
                .fragment(185, false)
                .build(),
            Family::V4,
            L4::Fragment,
        ),
        vip_fragment(
            "IPv4 middle fragment (MF, offset 8)",
            Frame::v4(CLIENT4, VIP4)
                .proto(17, vec![4; 64])
                .fragment(8, true)
                .build(),
            Family::V4,
            L4::Fragment,
        ),
        vip_fragment(
            "IPv6 TCP first fragment (fragment header, offset 0, M)",
            Frame::v6(CLIENT6, VIP6)
                .fragment(0, true)
                .tcp(40000, 443)
                .payload(&[5; 64])
                .build(),
            Family::V6,
            L4::Tcp,
        ),
        vip_fragment(
            "IPv6 later fragment (offset 100)",
            Frame::v6(CLIENT6, VIP6)
                .fragment(100, false)
                .proto(6, vec![6; 64])
                .build(),
            Family::V6,
            L4::Fragment,
        ),
    ];
    run_cases(&sb, &cases, run);
    assert!(
        conns(&sb).is_empty(),
        "fragments recorded connections: {:?}",
        conns(&sb)
    );
}

// ---------------------------------------------------------------------------
// 4. Whole-VIP services
// ---------------------------------------------------------------------------

#[test]
fn whole_vip_service_keeps_every_port() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc("198.18.0.10:*/tcp", Mode::Nat, &["198.18.1.2"]),
            svc("[2001:2::10]:*/udp", Mode::Nat, &["[2001:2:0:1::2]"]),
        ],
    );
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BE4[0]));
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));
    let mut cases = Vec::new();
    for (i, dport) in [1u16, 22, 80, 443, 8080, 65535].into_iter().enumerate() {
        let sport = 41000 + i as u16;
        cases.push(nat_case(
            "IPv4 TCP to some port of a whole-VIP service",
            tcp_frame(c4, v4, sport, dport, SYN, b"any"),
            tcp_frame(c4, b4, sport, dport, SYN, b"any"),
            Family::V4,
            L4::Tcp,
        ));
        cases.push(nat_case(
            "IPv6 UDP to some port of a whole-VIP service",
            udp_frame(c6, v6, sport, dport, b"any6"),
            udp_frame(c6, b6, sport, dport, b"any6"),
            Family::V6,
            L4::Udp,
        ));
    }
    cases.push(untouched(
        "IPv4 UDP to the VIP of a TCP-only whole-VIP service",
        udp_frame(c4, v4, 41100, 53, b"x"),
        (Family::V4, L4::Udp, Verdict::Pass, Reason::Default),
    ));
    run_cases(&sb, &cases, run);
}

// ---------------------------------------------------------------------------
// 5. Distribution, and agreement with an independent Maglev build
// ---------------------------------------------------------------------------

#[test]
fn distribution_follows_the_predicted_maglev_table() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)]);
    let p = Predictor::new(&sb, SVC_WEB, &[(WEB3[0], 1), (WEB3[1], 1), (WEB3[2], 1)]);
    const N: u16 = 3000;
    let before = snap(&sb);
    let mut per: StdHashMap<IpAddr, u64> = StdHashMap::new();
    let mut wrong = Vec::new();
    let mut bytes = 0;
    for sport in 10_000..10_000 + N {
        let input = tcp_frame(CLIENT4.into(), VIP4.into(), sport, 80, SYN, b"");
        bytes += input.len() as u64;
        let (addr, port) = target(p.pick_web(sport), 80);
        let want = tcp_frame(CLIENT4.into(), addr, sport, port, SYN, b"");
        let (action, out) = run(&sb, &input);
        if action != XDP_PASS || out != want {
            if wrong.len() < 5 {
                wrong.push(format!(
                    "sport {sport}: action {action}\n got:\n{}\nwant:\n{}",
                    hex(&out),
                    hex(&want)
                ));
            } else {
                wrong.push(String::new());
            }
        }
        *per.entry(dst_of_v4(&out).0).or_default() += 1;
    }
    let after = snap(&sb);
    println!("split over {N} flows: {per:?}");
    assert!(
        wrong.is_empty(),
        "{} of {N} flows not where the independent Maglev build puts them; first ones:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let n = u64::from(N);
    assert_deltas(
        "3,000 SYNs",
        &before,
        &after,
        &[(lb_stat::TO_STACK, n), (lb_stat::CONN_CREATED, n)],
        &[ctr(
            Family::V4,
            L4::Tcp,
            Verdict::Pass,
            Reason::Default,
            n,
            bytes,
        )],
    );
    assert_eq!(per.len(), 3, "every backend gets flows: {per:?}");
    for (addr, got) in &per {
        // Within 10% of an equal share (1,000 each).
        assert!(
            (900..=1100).contains(got),
            "backend {addr} got {got} of {N}: {per:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 6. The connection table
// ---------------------------------------------------------------------------

/// Opens flows CLIENT4:sport → VIP:80 (one SYN each) and returns where each went.
fn open_flows(sb: &Sandbox, sports: std::ops::Range<u16>) -> Vec<(u16, (IpAddr, u16))> {
    sports.map(|s| (s, send_web(sb, s, SYN, b""))).collect()
}

/// The web service with a fourth backend, .5.
const WEB4: [&str; 4] = [
    "198.18.1.2:8080",
    "198.18.1.3:8080",
    "198.18.1.4:8080",
    "198.18.1.5:8080",
];

/// One change to the backends of the web service (three backends, 300
/// flows opened), and what the established flows must do after it.
struct BackendChange {
    what: &'static str,
    /// Makes the change; checks what it left in the maps; returns the
    /// table (as predicted here) that new or moved flows follow.
    change: fn(&Sandbox, &Flows) -> Predictor,
    /// The backend whose flows go where the new table says (balanced again,
    /// then pinned there); every other flow stays on its backend.
    moves_off: Option<&'static str>,
    /// Payload of the established flows' next segment (an ACK).
    payload: &'static [u8],
    /// Checks of its own after that round: (sb, new table, where each flow is now).
    then: fn(&Sandbox, &Predictor, &Flows),
}

type Flows = Vec<(u16, (IpAddr, u16))>;

/// Every established flow sends one ACK: flows on `moves_off` go where
/// `table` says (never back to it), every other flow stays where it was;
/// each flow moved is one rebalanced and one created connection. Returns
/// where each flow is now.
fn ack_round(
    sb: &Sandbox,
    what: &str,
    flows: &Flows,
    moves_off: Option<&str>,
    table: &Predictor,
    payload: &[u8],
) -> Flows {
    let off = moves_off.map(|b| be_target(b, 80));
    let moving = flows.iter().filter(|(_, t)| Some(*t) == off).count() as u64;
    let before = snap(sb);
    let mut now_at = Vec::new();
    let mut bytes = 0;
    for (s, t) in flows {
        bytes += tcp_frame(CLIENT4.into(), VIP4.into(), *s, 80, ACK, payload).len() as u64;
        let got = send_web(sb, *s, ACK, payload);
        if Some(*t) == off {
            assert_eq!(
                got,
                target(table.pick_web(*s), 80),
                "{what}: flow {s} of {off:?}"
            );
            assert_ne!(Some(got), off, "{what}: flow {s} back on {off:?}");
        } else {
            assert_eq!(got, *t, "{what}: flow {s} moved");
        }
        now_at.push((*s, got));
    }
    let after = snap(sb);
    println!("{what}: {moving} flows balanced again");
    assert_deltas(
        what,
        &before,
        &after,
        &[
            (lb_stat::TO_STACK, flows.len() as u64),
            (lb_stat::CONN_REBALANCED, moving),
            (lb_stat::CONN_CREATED, moving),
        ],
        &[ctr(
            Family::V4,
            L4::Tcp,
            Verdict::Pass,
            Reason::Default,
            flows.len() as u64,
            bytes,
        )],
    );
    now_at
}

/// New flows 30,000..30,300 go where `table` says; returns where they went.
fn fresh_flows(sb: &Sandbox, table: &Predictor) -> Flows {
    let fresh = open_flows(sb, 30_000..30_300);
    for (s, t) in &fresh {
        assert_eq!(
            *t,
            target(table.pick_web(*s), 80),
            "new flow {s} not where the new table says"
        );
    }
    fresh
}

const BACKEND_CHANGES: &[BackendChange] = &[
    BackendChange {
        what: "a backend is added: established flows stay",
        change: |sb, flows| {
            let old = Predictor::new(sb, SVC_WEB, &WEB3.map(|n| (n, 1)));
            for (s, t) in flows {
                assert_eq!(
                    *t,
                    target(old.pick_web(*s), 80),
                    "sport {s}: first packet not where the table says"
                );
            }
            apply(sb, &[svc(SVC_WEB, Mode::Nat, &WEB4)]);
            let new = Predictor::new(sb, SVC_WEB, &WEB4.map(|n| (n, 1)));
            let moved = flows
                .iter()
                .filter(|(s, t)| target(new.pick_web(*s), 80) != *t)
                .count();
            println!(
                "the new table moves {moved} of {} established flows",
                flows.len()
            );
            assert!(
                moved > 50,
                "the new table should move about a quarter of the flows, moves {moved}"
            );
            new
        },
        moves_off: None,
        payload: b"data",
        then: |sb, new, _| {
            // New flows follow the new table, the new backend included.
            let before = snap(sb);
            let fresh = fresh_flows(sb, new);
            let to_new = fresh
                .iter()
                .filter(|(_, t)| *t == be_target(WEB4[3], 80))
                .count();
            println!("{to_new} of 300 new flows went to the added backend");
            assert!(to_new > 0);
            let after = snap(sb);
            let created = lb_stat::CONN_CREATED as usize;
            assert_eq!(after.lb[created] - before.lb[created], 300);
            assert_eq!(after.lb[lb_stat::CONN_REBALANCED as usize], 0);
        },
    },
    BackendChange {
        what: "a backend drains: it keeps its flows and gets no new ones",
        change: |sb, flows| {
            let on_drained = flows
                .iter()
                .filter(|(_, t)| *t == be_target(WEB3[1], 80))
                .count();
            println!("{on_drained} of 300 flows on the backend to drain");
            assert!(on_drained > 0);
            apply(sb, &[svc_draining(SVC_WEB, &WEB3, &[WEB3[1]])]);
            let state = sluice::engine::lb::read(sb.root()).unwrap();
            let m = state[0]
                .members
                .iter()
                .find(|m| m.backend == WEB3[1].parse().unwrap())
                .unwrap();
            assert!(
                m.draining && !m.down && m.table_slots == 0,
                "drained member: {m:?}"
            );
            Predictor::new(sb, SVC_WEB, &[(WEB3[0], 1), (WEB3[1], 0), (WEB3[2], 1)])
        },
        moves_off: None,
        payload: b"",
        then: |sb, new, _| {
            let drained = be_target(WEB3[1], 80);
            for (s, t) in fresh_flows(sb, new) {
                assert_ne!(t, drained, "new flow {s} went to the draining backend");
            }
            let end = snap(sb);
            assert_eq!(end.lb[lb_stat::CONN_CREATED as usize], 600);
            assert_eq!(end.lb[lb_stat::CONN_REBALANCED as usize], 0);
        },
    },
    BackendChange {
        what: "a backend goes down: its flows are balanced again",
        change: |sb, flows| {
            assert!(flows.iter().any(|(_, t)| *t == be_target(WEB3[1], 80)));
            apply_down(sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)], &[(SVC_WEB, WEB3[1])]);
            Predictor::new(sb, SVC_WEB, &[(WEB3[0], 1), (WEB3[1], 0), (WEB3[2], 1)])
        },
        moves_off: Some(WEB3[1]),
        payload: b"",
        // Pinned again to their new backends.
        then: |sb, new, now_at| {
            ack_round(sb, "second packets", now_at, None, new, b"");
        },
    },
    BackendChange {
        what: "a re-used backend slot does not inherit pinned flows",
        change: |sb, flows| {
            // Remove .3 (its slot is freed), then add .9, which gets the freed slot.
            let old_slot = member_slot(sb, SVC_WEB, WEB3[1]);
            assert!(flows.iter().any(|(_, t)| *t == be_target(WEB3[1], 80)));
            apply(sb, &[svc(SVC_WEB, Mode::Nat, &[WEB3[0], WEB3[2]])]);
            let with9 = [WEB3[0], WEB3[2], "198.18.1.9:8080"];
            apply(sb, &[svc(SVC_WEB, Mode::Nat, &with9)]);
            assert_eq!(
                member_slot(sb, SVC_WEB, with9[2]),
                old_slot,
                "the new backend re-uses the freed slot"
            );
            let p = Predictor::new(sb, SVC_WEB, &with9.map(|n| (n, 1)));
            let (gone, nine) = (be_target(WEB3[1], 80), be_target(with9[2], 80));
            let not_to_nine = flows
                .iter()
                .filter(|(s, t)| *t == gone && target(p.pick_web(*s), 80) != nine)
                .count();
            assert!(
                not_to_nine > 0,
                "some flows of the removed backend must not map to the new one"
            );
            p
        },
        moves_off: Some(WEB3[1]),
        payload: b"",
        then: |_, _, _| {},
    },
];

/// Each change of [`BACKEND_CHANGES`] on a sandbox of its own: 300 flows
/// opened, the change, one ACK per flow, then the change's own checks.
/// Every failing change is reported by name.
#[test]
fn established_flows_across_backend_changes() {
    let failures: Vec<String> = BACKEND_CHANGES
        .iter()
        .filter_map(|c| {
            let run = std::panic::catch_unwind(|| {
                let sb = new_sandbox();
                apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)]);
                let flows = open_flows(&sb, 20_000..20_300);
                let table = (c.change)(&sb, &flows);
                let now_at = ack_round(&sb, c.what, &flows, c.moves_off, &table, c.payload);
                (c.then)(&sb, &table, &now_at);
            });
            run.err().map(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                format!("{}: {msg}", c.what)
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} backend changes failed:\n{}",
        failures.len(),
        BACKEND_CHANGES.len(),
        failures.join("\n")
    );
}

#[test]
fn fin_or_rst_then_syn_is_balanced_afresh() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)]);
    // 0..100: SYN, then FIN (even) or RST (odd). 100..200: SYN only.
    let closed = open_flows(&sb, 20_000..20_100);
    let open = open_flows(&sb, 20_100..20_200);
    for (i, (s, t)) in closed.iter().enumerate() {
        let flags = if i % 2 == 0 { FIN_ACK } else { RST };
        assert_eq!(send_web(&sb, *s, flags, b""), *t);
        // The rest of a closing connection stays pinned.
        assert_eq!(send_web(&sb, *s, ACK, b""), *t);
    }
    let table = conns(&sb);
    let closed_ports: HashSet<u16> = closed.iter().map(|(s, _)| *s).collect();
    for (k, c) in &table {
        let want = if closed_ports.contains(&k.sport) {
            CONN_F_CLOSED
        } else {
            0
        };
        assert_eq!(c.flags, want, "entry of sport {}: {c:?}", k.sport);
    }
    assert_eq!(table.len(), 200);
    assert_eq!(stat(&sb, lb_stat::CONN_REBALANCED), 0);

    // A new table, so a flow balanced afresh can be told from a pinned one.
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB4)]);
    let p = Predictor::new(&sb, SVC_WEB, &WEB4.map(|n| (n, 1)));
    let before = snap(&sb);
    let mut moved = 0;
    for (s, t) in &closed {
        let got = send_web(&sb, *s, SYN, b"");
        assert_eq!(
            got,
            target(p.pick_web(*s), 80),
            "new SYN on closed flow {s}"
        );
        moved += usize::from(got != *t);
    }
    // A retransmitted SYN of an open connection stays pinned.
    for (s, t) in &open {
        assert_eq!(
            send_web(&sb, *s, SYN, b""),
            *t,
            "SYN retransmission of open flow {s}"
        );
    }
    let after = snap(&sb);
    println!("{moved} of 100 reopened flows landed elsewhere");
    assert!(moved > 0);
    let bytes = 200 * tcp_frame(CLIENT4.into(), VIP4.into(), 1, 80, SYN, b"").len() as u64;
    assert_deltas(
        "SYNs after FIN/RST and retransmitted SYNs",
        &before,
        &after,
        &[
            (lb_stat::TO_STACK, 200),
            (lb_stat::CONN_REBALANCED, 100),
            (lb_stat::CONN_CREATED, 100),
        ],
        &[ctr(
            Family::V4,
            L4::Tcp,
            Verdict::Pass,
            Reason::Default,
            200,
            bytes,
        )],
    );
    assert!(
        conns(&sb).iter().all(|(_, c)| c.flags == 0),
        "reopened entries are open again"
    );
}

#[test]
fn idle_connections_are_rebalanced_per_protocol() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.2:5353"]),
        ],
    );
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BE4[0]));
    let udp = |sb: &Sandbox| {
        let (action, out) = run(sb, &udp_frame(c4, v4, 45000, 53, b"q"));
        assert_eq!(action, XDP_PASS);
        assert_frame("UDP", &out, &udp_frame(c4, b4, 45000, 5353, b"q"));
    };
    let r = lb_stat::CONN_REBALANCED as usize;
    // (TCP idle timeout, UDP idle timeout) in seconds: TCP 1 s and UDP 60 s,
    // then the other way round. Each flow is idle 2.2 s: balanced again
    // past a 1 s timeout, kept within 60 s.
    for (round, (tcp_idle, udp_idle)) in [(1, 60), (60, 1)].into_iter().enumerate() {
        lbmaps::set_conn_settings(sb.root(), tcp_idle, udp_idle, 100_000, 100_000).unwrap();
        if round == 0 {
            send_web(&sb, 45000, SYN, b"");
            udp(&sb);
        }
        thread::sleep(Duration::from_millis(2200));
        let before = snap(&sb);
        send_web(&sb, 45000, ACK, b"");
        let mid = snap(&sb);
        udp(&sb);
        let after = snap(&sb);
        assert_eq!(
            mid.lb[r] - before.lb[r],
            u64::from(tcp_idle == 1),
            "TCP idle 2.2 s, timeout {tcp_idle} s"
        );
        assert_eq!(
            after.lb[r] - mid.lb[r],
            u64::from(udp_idle == 1),
            "UDP idle 2.2 s, timeout {udp_idle} s"
        );
        if round == 1 {
            assert_eq!(
                after.lb[lb_stat::CONN_CREATED as usize],
                4,
                "2 flows, each recorded twice"
            );
        }
    }
}

/// A flow whose packets are 0.4 s apart is never idle for the 1 s timeout
/// (the shortest the configuration accepts, `conn_tcp_idle = "1s"`).
#[test]
fn active_flow_is_not_expired_by_the_refresh_granularity() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"])]);
    lbmaps::set_conn_settings(sb.root(), 1, 1, 100_000, 100_000).unwrap();
    let start = Instant::now();
    send_web(&sb, 46000, SYN, b"");
    for i in 1..=5 {
        thread::sleep(Duration::from_millis(400));
        send_web(&sb, 46000, ACK, b"");
        println!(
            "packet {i} at {:?}, conns_rebalanced {}",
            start.elapsed(),
            stat(&sb, lb_stat::CONN_REBALANCED)
        );
    }
    assert_eq!(
        stat(&sb, lb_stat::CONN_REBALANCED),
        0,
        "an active flow was balanced again"
    );
    assert_eq!(stat(&sb, lb_stat::CONN_CREATED), 1);
}

// ---------------------------------------------------------------------------
// 7. The new-connection cap
// ---------------------------------------------------------------------------

#[test]
fn new_connection_cap_records_only_the_burst() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)]);
    lbmaps::set_conn_settings(sb.root(), 900, 300, 10, 10).unwrap();
    let p = Predictor::new(&sb, SVC_WEB, &WEB3.map(|n| (n, 1)));
    let frames: Vec<(u16, Vec<u8>)> = (50_000..50_100)
        .map(|s| (s, tcp_frame(CLIENT4.into(), VIP4.into(), s, 80, SYN, b"")))
        .collect();
    let before = snap(&sb);
    let start = Instant::now();
    let outs: Vec<(u16, u32, Vec<u8>)> = frames
        .iter()
        .map(|(s, f)| {
            let (a, o) = run(&sb, f);
            (*s, a, o)
        })
        .collect();
    let took = start.elapsed();
    let after = snap(&sb);
    let d = |i: u32| after.lb[i as usize] - before.lb[i as usize];
    let (created, capped) = (d(lb_stat::CONN_CREATED), d(lb_stat::CONN_CAPPED));
    println!("100 SYNs in {took:?}: {created} recorded, {capped} capped");
    // 10 per second, burst 10: 10 at once, one more per 100 ms.
    let extra = took.as_millis() as u64 / 100;
    assert!(
        (10..=11 + extra).contains(&created),
        "recorded {created} (took {took:?})"
    );
    assert_eq!(created + capped, 100);
    assert_eq!(conns(&sb).len() as u64, created);
    for (s, a, o) in &outs {
        let (addr, port) = target(p.pick_web(*s), 80);
        assert_eq!(*a, XDP_PASS, "sport {s}");
        assert_frame(
            &format!("sport {s}"),
            o,
            &tcp_frame(CLIENT4.into(), addr, *s, port, SYN, b""),
        );
    }
    let id = svc_id(&sb, SVC_WEB);
    let c = lbmaps::service_counters(sb.root(), [id].into_iter()).unwrap()[&id];
    assert_eq!(
        (c.packets, c.conns),
        (100, 100),
        "capped connections still count as connections"
    );
    assert_eq!(d(lb_stat::TO_STACK), 100);
}

// ---------------------------------------------------------------------------
// 8. No usable backend
// ---------------------------------------------------------------------------

fn no_backend(what: &'static str, input: Vec<u8>, family: Family, l4: L4) -> Case {
    Case {
        what,
        want: input.clone(),
        input,
        action: XDP_DROP,
        lb: vec![],
        counted: Some((family, l4, Verdict::Drop, Reason::NoBackend)),
    }
}

#[test]
fn service_without_usable_backend_drops() {
    let sb = new_sandbox();
    let services = [
        svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"]),
        svc_draining(
            "198.18.0.10:81/tcp",
            &["198.18.1.3:8081"],
            &["198.18.1.3:8081"],
        ),
        svc_draining(
            "198.18.0.10:82/tcp",
            &["198.18.1.4:8082", "198.18.1.5:8082"],
            &["198.18.1.4:8082"],
        ),
        svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.2:5353"]),
        svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
        svc("198.18.0.11:80/tcp", Mode::Nat, &[]),
    ];
    apply_down(
        &sb,
        &services,
        &[
            ("198.18.0.10:80/tcp", "198.18.1.2:8080"),
            ("198.18.0.10:82/tcp", "198.18.1.5:8082"),
            ("198.18.0.10:53/udp", "198.18.1.2:5353"),
            ("[2001:2::10]:443/tcp", "[2001:2:0:1::2]:8443"),
        ],
    );
    let (c4, v4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
    let cases = vec![
        no_backend(
            "only backend down",
            tcp_frame(c4, v4, 40000, 80, SYN, b""),
            Family::V4,
            L4::Tcp,
        ),
        no_backend(
            "only backend draining",
            tcp_frame(c4, v4, 40000, 81, SYN, b""),
            Family::V4,
            L4::Tcp,
        ),
        no_backend(
            "one backend draining, the other down",
            tcp_frame(c4, v4, 40000, 82, SYN, b""),
            Family::V4,
            L4::Tcp,
        ),
        no_backend(
            "UDP, only backend down",
            udp_frame(c4, v4, 40000, 53, b"q"),
            Family::V4,
            L4::Udp,
        ),
        no_backend(
            "IPv6, only backend down",
            tcp_frame(CLIENT6.into(), VIP6.into(), 40000, 443, SYN, b""),
            Family::V6,
            L4::Tcp,
        ),
        no_backend(
            "service without backends",
            tcp_frame(
                c4,
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
                40000,
                80,
                SYN,
                b"",
            ),
            Family::V4,
            L4::Tcp,
        ),
    ];
    run_cases(&sb, &cases, run);
    assert!(conns(&sb).is_empty());
    // Service counters count the dropped packet, no backend does.
    let ids: Vec<u32> = services
        .iter()
        .map(|s| svc_id(&sb, &s.id.to_string()))
        .collect();
    let counts = lbmaps::service_counters(sb.root(), ids.iter().copied()).unwrap();
    for (s, id) in services.iter().zip(&ids) {
        assert_eq!(counts[id].packets, 1, "service {}: {:?}", s.id, counts[id]);
        assert_eq!(counts[id].conns, 0, "service {}: {:?}", s.id, counts[id]);
    }
    let be = lbmaps::backend_counters(sb.root(), 0..16).unwrap();
    assert!(
        be.values().all(|c| *c == LbCounter::default()),
        "backend counters: {be:?}"
    );
}

#[test]
fn pinned_flow_survives_its_only_backend_draining() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &[WEB3[0]])]);
    let t = send_web(&sb, 40000, SYN, b"");
    assert_eq!(t, be_target(WEB3[0], 80));
    apply(&sb, &[svc_draining(SVC_WEB, &[WEB3[0]], &[WEB3[0]])]);
    let before = snap(&sb);
    assert_eq!(
        send_web(&sb, 40000, ACK, b"more"),
        t,
        "pinned flow on a draining backend"
    );
    let input = tcp_frame(CLIENT4.into(), VIP4.into(), 40001, 80, SYN, b"");
    let (action, out) = run(&sb, &input);
    let after = snap(&sb);
    assert_eq!(action, XDP_DROP, "new flow with only a draining backend");
    assert_frame("dropped new flow", &out, &input);
    let ack_len = tcp_frame(CLIENT4.into(), VIP4.into(), 40000, 80, ACK, b"more").len() as u64;
    assert_deltas(
        "pinned ACK, then a new SYN",
        &before,
        &after,
        &[(lb_stat::TO_STACK, 1)],
        &[
            ctr(
                Family::V4,
                L4::Tcp,
                Verdict::Pass,
                Reason::Default,
                1,
                ack_len,
            ),
            ctr(
                Family::V4,
                L4::Tcp,
                Verdict::Drop,
                Reason::NoBackend,
                1,
                input.len() as u64,
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// 9. Reverse NAT (TC egress)
// ---------------------------------------------------------------------------

fn reversed(what: &'static str, input: Vec<u8>, want: Vec<u8>) -> Case {
    Case {
        what,
        input,
        action: TC_NEXT,
        want,
        lb: vec![(lb_stat::REVERSE_NAT, 1)],
        counted: None,
    }
}

fn tc_untouched(what: &'static str, input: Vec<u8>) -> Case {
    Case {
        what,
        want: input.clone(),
        input,
        action: TC_NEXT,
        lb: vec![],
        counted: None,
    }
}

#[test]
fn reverse_nat_exact_bytes() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.2:5353"]),
            svc("198.18.0.10:8000/tcp", Mode::Nat, &["198.18.1.3"]),
            svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
            svc("[2001:2::10]:53/udp", Mode::Nat, &["[2001:2:0:1::2]:5353"]),
            svc("198.18.0.20:80/tcp", Mode::Dsr, &["198.18.1.5"]),
            svc("198.18.0.30:*/udp", Mode::Nat, &["198.18.1.6"]),
        ],
    );
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BE4[0]));
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));
    let ip4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let no_sum = |src: IpAddr, sport: u16| {
        let mut f = udp_frame(src, c4, sport, 40000, b"answer");
        f[14 + 20 + 6..14 + 20 + 8].fill(0);
        f
    };
    let opts = [0x01, 0x01, 0x01, 0x00];
    let with_opts = |src: Ipv4Addr, sport: u16| {
        Frame::v4(src, CLIENT4)
            .ipv4_options(&opts)
            .tcp(sport, 40000)
            .tcp_flags(0x12)
            .build()
    };
    let cases = vec![
        reversed(
            "IPv4 TCP SYN-ACK from the backend",
            tcp_frame(b4, c4, 8080, 40000, 0x12, b"welcome"),
            tcp_frame(v4, c4, 80, 40000, 0x12, b"welcome"),
        ),
        reversed(
            "IPv4 UDP reply",
            udp_frame(b4, c4, 5353, 40000, b"answer"),
            udp_frame(v4, c4, 53, 40000, b"answer"),
        ),
        reversed(
            "IPv4 UDP reply without checksum: stays 0",
            no_sum(b4, 5353),
            no_sum(v4, 53),
        ),
        reversed(
            "IPv4 TCP with options",
            with_opts(BE4[0], 8080),
            with_opts(VIP4, 80),
        ),
        reversed(
            "IPv4 TCP from a backend without a port (service port kept)",
            tcp_frame(ip4(198, 18, 1, 3), c4, 8000, 40000, 0x12, b""),
            tcp_frame(v4, c4, 8000, 40000, 0x12, b""),
        ),
        reversed(
            "IPv6 TCP SYN-ACK",
            tcp_frame(b6, c6, 8443, 40000, 0x12, b"welcome6"),
            tcp_frame(v6, c6, 443, 40000, 0x12, b"welcome6"),
        ),
        reversed(
            "IPv6 UDP reply",
            udp_frame(b6, c6, 5353, 40000, b"answer6"),
            udp_frame(v6, c6, 53, 40000, b"answer6"),
        ),
        reversed(
            "IPv4 UDP from a whole-VIP backend: any port, kept",
            udp_frame(ip4(198, 18, 1, 6), c4, 1234, 40000, b"w"),
            udp_frame(ip4(198, 18, 0, 30), c4, 1234, 40000, b"w"),
        ),
        tc_untouched(
            "IPv4 TCP from a host that is no backend",
            tcp_frame(ip4(198, 18, 1, 9), c4, 8080, 40000, 0x12, b""),
        ),
        tc_untouched(
            "IPv4 TCP from a backend, another port",
            tcp_frame(b4, c4, 9999, 40000, 0x12, b""),
        ),
        tc_untouched(
            "IPv4 UDP from the TCP backend's port",
            udp_frame(b4, c4, 8080, 40000, b""),
        ),
        tc_untouched(
            "IPv4 TCP from a DSR backend (no reverse entry)",
            tcp_frame(ip4(198, 18, 1, 5), c4, 80, 40000, 0x12, b""),
        ),
        tc_untouched(
            "IPv6 TCP from a host that is no backend",
            tcp_frame(
                IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 9)),
                c6,
                8443,
                40000,
                0x12,
                b"",
            ),
        ),
        tc_untouched(
            "ICMP from a backend",
            Frame::v4(BE4[0], CLIENT4).icmp_echo(1, 1).build(),
        ),
        tc_untouched(
            "IPv4 later fragment from a backend",
            Frame::v4(BE4[0], CLIENT4)
                .proto(17, vec![9; 32])
                .fragment(100, false)
                .build(),
        ),
    ];
    run_cases(&sb, &cases, run_tc);
}

#[test]
fn reverse_nat_ipv6_udp_zero_checksum_is_sent_as_ffff() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[svc(
            "[2001:2::10]:53/udp",
            Mode::Nat,
            &["[2001:2:0:1::2]:5353"],
        )],
    );
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));
    let p = zero_sum_payload(|p| udp_frame(v6, c6, 53, 40000, p), 14 + 40 + 6);
    let (action, out) = run_tc(&sb, &udp_frame(b6, c6, 5353, 40000, &p));
    assert_eq!(action, TC_NEXT);
    assert_frame(
        "IPv6 UDP reply whose checksum computes to 0",
        &out,
        &udp_frame(v6, c6, 53, 40000, &p),
    );
}

#[test]
fn reverse_nat_off_without_services() {
    let sb = new_sandbox();
    // The LB is enabled by the first service and disabled with the last.
    apply(
        &sb,
        &[svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"])],
    );
    apply(&sb, &[]);
    let input = tcp_frame(BE4[0].into(), CLIENT4.into(), 8080, 40000, 0x12, b"");
    let before = snap(&sb);
    let (action, out) = run_tc(&sb, &input);
    assert_eq!(action, TC_NEXT);
    assert_frame("reply with no services", &out, &input);
    assert_deltas("reply with no services", &before, &snap(&sb), &[], &[]);
    // And the XDP side passes traffic to the old VIP untouched.
    let input = tcp_frame(CLIENT4.into(), VIP4.into(), 40000, 80, SYN, b"");
    let (action, out) = run(&sb, &input);
    assert_eq!(action, XDP_PASS);
    assert_frame("old VIP", &out, &input);
}

// ---------------------------------------------------------------------------
// 10. Per-service and per-backend counters
// ---------------------------------------------------------------------------

#[test]
fn service_and_backend_counters_are_exact() {
    let sb = new_sandbox();
    let services = [
        svc(SVC_WEB, Mode::Nat, &[WEB3[0], WEB3[1]]),
        svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.4:5353"]),
        svc("198.18.0.10:81/tcp", Mode::Nat, &["198.18.1.5:8081"]),
    ];
    apply_down(&sb, &services, &[("198.18.0.10:81/tcp", "198.18.1.5:8081")]);
    let web = svc_id(&sb, SVC_WEB);
    let dns = svc_id(&sb, "198.18.0.10:53/udp");
    let dead = svc_id(&sb, "198.18.0.10:81/tcp");
    let slot_of: StdHashMap<(IpAddr, u16), u32> = [
        (be_target(WEB3[0], 80), member_slot(&sb, SVC_WEB, WEB3[0])),
        (be_target(WEB3[1], 80), member_slot(&sb, SVC_WEB, WEB3[1])),
        (
            be_target("198.18.1.4:5353", 53),
            member_slot(&sb, "198.18.0.10:53/udp", "198.18.1.4:5353"),
        ),
    ]
    .into_iter()
    .collect();
    let dead_slot = member_slot(&sb, "198.18.0.10:81/tcp", "198.18.1.5:8081");

    let mut want_svc: StdHashMap<u32, LbCounter> = StdHashMap::new();
    let mut want_be: StdHashMap<u32, LbCounter> = StdHashMap::new();
    let add = |m: &mut StdHashMap<u32, LbCounter>, k: u32, len: usize, conn: bool| {
        let c = m.entry(k).or_default();
        c.packets += 1;
        c.bytes += len as u64;
        c.conns += u64::from(conn);
    };
    // 12 TCP flows: SYN, then two data segments of different sizes.
    for s in 0..12u16 {
        let sport = 42_000 + s;
        for (i, (flags, payload)) in [
            (SYN, vec![]),
            (ACK, vec![7; 100]),
            (0x18, vec![8; 1000 + usize::from(s)]),
        ]
        .into_iter()
        .enumerate()
        {
            let len = tcp_frame(CLIENT4.into(), VIP4.into(), sport, 80, flags, &payload).len();
            let t = send_web(&sb, sport, flags, &payload);
            add(&mut want_svc, web, len, i == 0);
            add(&mut want_be, slot_of[&t], len, i == 0);
        }
    }
    // 5 UDP flows, 2 datagrams each.
    for s in 0..5u16 {
        for n in 0..2usize {
            let payload = vec![1; 10 + n * 50];
            let input = udp_frame(CLIENT4.into(), VIP4.into(), 43_000 + s, 53, &payload);
            let (action, out) = run(&sb, &input);
            assert_eq!(action, XDP_PASS);
            let t = dst_of_v4(&out);
            assert_frame(
                "UDP",
                &out,
                &udp_frame(CLIENT4.into(), t.0, 43_000 + s, t.1, &payload),
            );
            add(&mut want_svc, dns, input.len(), n == 0);
            add(&mut want_be, slot_of[&t], input.len(), n == 0);
        }
    }
    // 3 SYNs to a service whose only backend is down: the service counts
    // the packets (no connection), no backend does.
    for s in 0..3u16 {
        let input = tcp_frame(CLIENT4.into(), VIP4.into(), 44_000 + s, 81, SYN, b"");
        assert_eq!(run(&sb, &input).0, XDP_DROP);
        add(&mut want_svc, dead, input.len(), false);
    }
    let got_svc = lbmaps::service_counters(sb.root(), [web, dns, dead].into_iter()).unwrap();
    let mut slots: Vec<u32> = slot_of.values().copied().collect();
    slots.push(dead_slot);
    let got_be = lbmaps::backend_counters(sb.root(), slots.iter().copied()).unwrap();
    println!("services {got_svc:?}\nbackends {got_be:?}");
    for id in [web, dns, dead] {
        assert_eq!(got_svc[&id], want_svc[&id], "service {id}");
    }
    for slot in &slots {
        assert_eq!(
            got_be[slot],
            want_be.get(slot).copied().unwrap_or_default(),
            "backend slot {slot}"
        );
    }
    assert!(
        want_be.len() == 3,
        "both web backends and the DNS backend got traffic: {want_be:?}"
    );
}

// ---------------------------------------------------------------------------
// 11. With a route and a neighbour (own network namespace)
// ---------------------------------------------------------------------------

/// The MAC the backends' neighbour entries get (not the test frames' own
/// destination MAC, so a rewrite is visible).
const BACKEND_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0x02];

/// `frame` with its Ethernet destination and source replaced.
fn with_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// A namespace where 198.18.1.0/24 and 2001:2:0:1::/64 are on `lb0` (a veth
/// whose peer `lb0p` is up, so lb0 has carrier) and forwarding is on (the
/// FIB helper refuses to forward otherwise). Returns it and lb0's MAC.
fn fib_netns(tag: &str) -> (Netns, [u8; 6]) {
    let ns = Netns::new(tag);
    for cmd in [
        "ip link add lb0 type veth peer name lb0p",
        "ip addr add 198.18.1.1/24 dev lb0",
        "ip -6 addr add 2001:2:0:1::1/64 dev lb0 nodad",
        "ip link set dev lb0 up",
        "ip link set dev lb0p up",
        "sysctl -q -w net.ipv4.ip_forward=1",
        "sysctl -q -w net.ipv6.conf.all.forwarding=1",
    ] {
        ns.exec_ok(cmd.split(' '));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&ns.exec_ok(["ip", "link", "show", "dev", "lb0"]).stdout)
        .contains("LOWER_UP")
    {
        assert!(Instant::now() < deadline, "lb0 has no carrier after 5 s");
        thread::sleep(Duration::from_millis(20));
    }
    let mac = link_mac(&ns, "lb0");
    (ns, mac)
}

#[test]
fn dsr_and_nat_with_a_route_and_a_neighbour() {
    let (ns, lb_mac) = fib_netns("lbfib");
    let ns_name = ns.name().to_string();
    ns.run(move || {
        let ifindex = nix::net::if_::if_nametoindex("lb0").expect("lb0 ifindex");
        let sb = new_sandbox();
        apply(
            &sb,
            &[
                svc("198.18.0.20:80/tcp", Mode::Dsr, &["198.18.1.2"]),
                svc("[2001:2::20]:80/tcp", Mode::Dsr, &["[2001:2:0:1::2]"]),
                svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
                svc("[2001:2::10]:443/tcp", Mode::Nat, &["[2001:2:0:1::2]:8443"]),
            ],
        );
        let exec = |cmd: &str| {
            let mut argv = vec!["ip", "netns", "exec", ns_name.as_str()];
            argv.extend(cmd.split(' '));
            crate::support::netns::run_ok(argv);
        };
        let c4 = IpAddr::V4(CLIENT4);
        let dsr4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 20));
        let dsr6 = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x20));
        let step = |what: &str,
                    input: Vec<u8>,
                    action: u32,
                    want: Vec<u8>,
                    lb: &[(u32, u64)],
                    counted: (u32, u64, u64)| {
            let before = snap(&sb);
            let (a, out) = run(&sb, &input);
            let after = snap(&sb);
            println!("{what}: action {a}");
            assert_eq!(
                a,
                action,
                "{what}: action\ninput:\n{}\noutput:\n{}",
                hex(&input),
                hex(&out)
            );
            assert_frame(what, &out, &want);
            assert_deltas(what, &before, &after, lb, &[counted]);
        };
        let pass = |f, l, len: usize| ctr(f, l, Verdict::Pass, Reason::Default, 1, len as u64);

        // DSR, route but no neighbour yet: dropped (DSR cannot leave the
        // next hop to the stack).
        let f = tcp_frame(c4, dsr4, 40000, 80, SYN, b"dsr");
        step(
            "DSR, no neighbour",
            f.clone(),
            XDP_DROP,
            f.clone(),
            &[(lb_stat::NO_NEIGHBOUR, 1), (lb_stat::CONN_CREATED, 1)],
            ctr(
                Family::V4,
                L4::Tcp,
                Verdict::Drop,
                Reason::NoBackend,
                1,
                f.len() as u64,
            ),
        );

        exec("ip neigh add 198.18.1.2 lladdr 02:00:00:00:0b:02 dev lb0 nud permanent");
        exec("ip -6 neigh add 2001:2:0:1::2 lladdr 02:00:00:00:0b:02 dev lb0 nud permanent");
        // test_run's ingress is the namespace's loopback, the backend is
        // behind lb0: neither the receiving interface nor one sluice is
        // attached to (not in LB_TX_PORTS), where a redirected frame could
        // vanish uncounted: DSR drops it, counted; NAT hands it to the stack.
        let f = tcp_frame(c4, dsr4, 40007, 80, SYN, b"dsr");
        step(
            "DSR, egress not a TX port",
            f.clone(),
            XDP_DROP,
            f.clone(),
            &[
                (lb_stat::EGRESS_NOT_ATTACHED, 1),
                (lb_stat::CONN_CREATED, 1),
            ],
            ctr(
                Family::V4,
                L4::Tcp,
                Verdict::Drop,
                Reason::NoBackend,
                1,
                f.len() as u64,
            ),
        );
        // NAT, egress lb0 not in LB_TX_PORTS: to the stack, MACs untouched.
        let f = tcp_frame(c4, VIP4.into(), 40003, 80, SYN, b"nat");
        step(
            "NAT, egress not a TX port",
            f,
            XDP_PASS,
            tcp_frame(c4, BE4[0].into(), 40003, 8080, SYN, b"nat"),
            &[(lb_stat::TO_STACK, 1), (lb_stat::CONN_CREATED, 1)],
            pass(
                Family::V4,
                L4::Tcp,
                tcp_frame(c4, VIP4.into(), 40003, 80, SYN, b"nat").len(),
            ),
        );
        lbmaps::add_tx_port(sb.root(), ifindex).expect("add TX port");
        // With lb0 a TX port: redirected through LB_TX_PORTS.
        let f = tcp_frame(c4, dsr4, 40001, 80, SYN, b"dsr");
        step(
            "DSR IPv4",
            f.clone(),
            XDP_REDIRECT,
            with_macs(f.clone(), BACKEND_MAC, lb_mac),
            &[(lb_stat::REDIRECT, 1), (lb_stat::CONN_CREATED, 1)],
            pass(Family::V4, L4::Tcp, f.len()),
        );
        // The pinned flow from before the neighbour existed goes out too.
        let f = tcp_frame(c4, dsr4, 40000, 80, ACK, b"again");
        step(
            "DSR IPv4, pinned flow",
            f.clone(),
            XDP_REDIRECT,
            with_macs(f.clone(), BACKEND_MAC, lb_mac),
            &[(lb_stat::REDIRECT, 1)],
            pass(Family::V4, L4::Tcp, f.len()),
        );
        let f = tcp_frame(IpAddr::V6(CLIENT6), dsr6, 40002, 80, SYN, b"dsr6");
        step(
            "DSR IPv6",
            f.clone(),
            XDP_REDIRECT,
            with_macs(f.clone(), BACKEND_MAC, lb_mac),
            &[(lb_stat::REDIRECT, 1), (lb_stat::CONN_CREATED, 1)],
            pass(Family::V6, L4::Tcp, f.len()),
        );

        // NAT with lb0 a TX port: MACs from the FIB, redirected through LB_TX_PORTS.
        let f = tcp_frame(c4, VIP4.into(), 40004, 80, SYN, b"nat");
        step(
            "NAT, egress a TX port",
            f.clone(),
            XDP_REDIRECT,
            with_macs(
                tcp_frame(c4, BE4[0].into(), 40004, 8080, SYN, b"nat"),
                BACKEND_MAC,
                lb_mac,
            ),
            &[(lb_stat::REDIRECT, 1), (lb_stat::CONN_CREATED, 1)],
            pass(Family::V4, L4::Tcp, f.len()),
        );
        let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BE6));
        let f = tcp_frame(c6, v6, 40005, 443, SYN, b"nat6");
        step(
            "NAT IPv6, egress a TX port",
            f.clone(),
            XDP_REDIRECT,
            with_macs(
                tcp_frame(c6, b6, 40005, 8443, SYN, b"nat6"),
                BACKEND_MAC,
                lb_mac,
            ),
            &[(lb_stat::REDIRECT, 1), (lb_stat::CONN_CREATED, 1)],
            pass(Family::V6, L4::Tcp, f.len()),
        );
        // A VLAN-tagged NAT frame still goes to the stack (which knows the
        // tag the egress needs), MACs untouched.
        let tagged = |dst: Ipv4Addr, dport: u16| {
            Frame::v4(CLIENT4, dst)
                .vlan(TPID_8021Q, 10)
                .tcp(40006, dport)
                .tcp_flags(SYN)
                .build()
        };
        let f = tagged(VIP4, 80);
        step(
            "VLAN-tagged NAT, egress a TX port",
            f.clone(),
            XDP_PASS,
            tagged(BE4[0], 8080),
            &[(lb_stat::TO_STACK, 1), (lb_stat::CONN_CREATED, 1)],
            pass(Family::V4, L4::Tcp, f.len()),
        );
    });
}

// ---------------------------------------------------------------------------
// 12. Flow records
// ---------------------------------------------------------------------------

/// Reads every record in the sandbox's flow ring.
fn drain_flows(sb: &Sandbox) -> Vec<sluice_common::FlowRecord> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ring = sluice::dataplane::flows::FlowRing::open(sb.root()).expect("flow ring");
        let mut out = Vec::new();
        while ring.drain_now(4096, &mut out) > 0 {}
        out
    })
}

/// One record per packet, LB'd ones included (the firewall leaves the record
/// to the LB program), carrying the backend slot + 1.
#[test]
fn flow_records_name_the_backend_once() {
    let sb = new_sandbox();
    let services = [
        svc(SVC_WEB, Mode::Nat, &WEB3),
        svc("198.18.0.10:81/tcp", Mode::Nat, &["198.18.1.5:8081"]),
    ];
    apply_down(&sb, &services, &[("198.18.0.10:81/tcp", "198.18.1.5:8081")]);
    sluice::dataplane::runtime::set_flow_config(
        sb.root(),
        &sluice_common::FlowConfig {
            sample: [1, 1, 1, 0],
            cap_interval_ns: 0,
            cap_tolerance_ns: 0,
        },
    )
    .unwrap();
    let slot_of: StdHashMap<(IpAddr, u16), u32> = WEB3
        .iter()
        .map(|n| (be_target(n, 80), member_slot(&sb, SVC_WEB, n)))
        .collect();
    let (c4, v4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
    // (frame, verdict, reason, backend field)
    let mut want = Vec::new();
    for sport in 47_000..47_010u16 {
        let t = send_web(&sb, sport, SYN, b"");
        want.push((sport, 80, Verdict::Pass, Reason::Default, slot_of[&t] + 1));
    }
    let t = send_web(&sb, 47_000, ACK, b"x");
    want.push((47_000, 80, Verdict::Pass, Reason::Default, slot_of[&t] + 1));
    let other = tcp_frame(
        c4,
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11)),
        47_100,
        80,
        SYN,
        b"",
    );
    assert_eq!(run(&sb, &other).0, XDP_PASS);
    want.push((47_100, 80, Verdict::Pass, Reason::Default, 0));
    let dead = tcp_frame(c4, v4, 47_101, 81, SYN, b"");
    assert_eq!(run(&sb, &dead).0, XDP_DROP);
    want.push((47_101, 81, Verdict::Drop, Reason::NoBackend, 0));
    let frag = Frame::v4(CLIENT4, VIP4)
        .tcp(47_102, 80)
        .fragment(0, true)
        .build();
    assert_eq!(run(&sb, &frag).0, XDP_DROP);
    want.push((47_102, 80, Verdict::Drop, Reason::VipFragment, 0));

    let recs = drain_flows(&sb);
    let got: Vec<(u16, u16, u8, u8, u32)> = recs
        .iter()
        .map(|r| (r.sport, r.dport, r.verdict, r.reason, r.backend))
        .collect();
    let want: Vec<(u16, u16, u8, u8, u32)> = want
        .iter()
        .map(|&(s, d, v, r, b)| (s, d, v as u8, r as u8, b))
        .collect();
    assert_eq!(
        got, want,
        "flow records (sport, dport, verdict, reason, backend)"
    );
    // The record shows the packet as the client sent it (the VIP).
    for r in &recs[..11] {
        assert_eq!(&r.dst[..4], &VIP4.octets(), "{r:?}");
    }
}

// ---------------------------------------------------------------------------
// More: weights, IPv6 agreement, precedence, removal, XDP_TX
// ---------------------------------------------------------------------------

#[test]
fn weighted_and_ipv6_tables_follow_the_prediction() {
    let sb = new_sandbox();
    let mut web = svc(SVC_WEB, Mode::Nat, &WEB3);
    for (b, w) in web.backends.iter_mut().zip([1, 2, 3]) {
        b.weight = w;
    }
    let v6_names = [
        "[2001:2:0:1::2]:8443",
        "[2001:2:0:1::3]:8443",
        "[2001:2:0:1::4]:8443",
    ];
    apply(
        &sb,
        &[web, svc("[2001:2::10]:443/tcp", Mode::Nat, &v6_names)],
    );
    let p4 = Predictor::new(&sb, SVC_WEB, &[(WEB3[0], 1), (WEB3[1], 2), (WEB3[2], 3)]);
    let p6 = Predictor::new(&sb, "[2001:2::10]:443/tcp", &v6_names.map(|n| (n, 1)));
    let mut per4: StdHashMap<IpAddr, u64> = StdHashMap::new();
    for sport in 10_000..13_000u16 {
        let t = send_web(&sb, sport, SYN, b"");
        assert_eq!(t, target(p4.pick_web(sport), 80), "IPv4 sport {sport}");
        *per4.entry(t.0).or_default() += 1;
    }
    println!("weights 1:2:3 over 3,000 flows: {per4:?}");
    for (name, share) in [(WEB3[0], 500), (WEB3[1], 1000), (WEB3[2], 1500)] {
        let got = per4[&be_target(name, 80).0];
        assert!(
            got.abs_diff(share) <= share / 10,
            "{name}: {got} flows, want {share} ± 10%"
        );
    }
    let (c6, v6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6));
    let mut per6: StdHashMap<IpAddr, u64> = StdHashMap::new();
    for sport in 10_000..10_600u16 {
        let (addr, port) = target(p6.pick(c6, v6, sport, 443, 6), 443);
        let (action, out) = run(&sb, &tcp_frame(c6, v6, sport, 443, SYN, b""));
        assert_eq!(action, XDP_PASS);
        assert_frame(
            &format!("IPv6 sport {sport}"),
            &out,
            &tcp_frame(c6, addr, sport, port, SYN, b""),
        );
        *per6.entry(addr).or_default() += 1;
    }
    println!("IPv6, 600 flows: {per6:?}");
    assert_eq!(per6.len(), 3);
}

#[test]
fn exact_port_service_wins_over_the_whole_vip() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:*/tcp", Mode::Nat, &["198.18.1.3"]),
        ],
    );
    let (c4, v4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4));
    let cases = vec![
        nat_case(
            "port 80: its own service",
            tcp_frame(c4, v4, 40000, 80, SYN, b""),
            tcp_frame(c4, IpAddr::V4(BE4[0]), 40000, 8080, SYN, b""),
            Family::V4,
            L4::Tcp,
        ),
        nat_case(
            "port 81: the whole-VIP service",
            tcp_frame(c4, v4, 40000, 81, SYN, b""),
            tcp_frame(c4, IpAddr::V4(BE4[1]), 40000, 81, SYN, b""),
            Family::V4,
            L4::Tcp,
        ),
    ];
    run_cases(&sb, &cases, run);
}

#[test]
fn removed_service_stops_balancing_and_translating() {
    let sb = new_sandbox();
    let web = svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]);
    let dns = svc("198.18.0.10:53/udp", Mode::Nat, &["198.18.1.3:5353"]);
    apply(&sb, &[web.clone(), dns.clone()]);
    let (c4, v4, b3) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BE4[1]));
    send_web(&sb, 40000, SYN, b"");
    apply(&sb, &[dns]);
    let cases = vec![
        untouched(
            "TCP to the removed service (its VIP still has a service)",
            tcp_frame(c4, v4, 40001, 80, SYN, b""),
            (Family::V4, L4::Tcp, Verdict::Pass, Reason::Default),
        ),
        untouched(
            "a flow pinned to the removed service",
            tcp_frame(c4, v4, 40000, 80, ACK, b"late"),
            (Family::V4, L4::Tcp, Verdict::Pass, Reason::Default),
        ),
        nat_case(
            "UDP to the service that stays",
            udp_frame(c4, v4, 40002, 53, b"q"),
            udp_frame(c4, b3, 40002, 5353, b"q"),
            Family::V4,
            L4::Udp,
        ),
    ];
    run_cases(&sb, &cases, run);
    let tc = vec![
        tc_untouched(
            "reply from the removed service's backend",
            tcp_frame(IpAddr::V4(BE4[0]), c4, 8080, 40000, 0x12, b""),
        ),
        reversed(
            "reply from the remaining service's backend",
            udp_frame(b3, c4, 5353, 40002, b"a"),
            udp_frame(v4, c4, 53, 40002, b"a"),
        ),
    ];
    run_cases(&sb, &tc, run_tc);
}

/// test_run of the sandbox's XDP program as if received on `ifindex`.
fn run_on(sb: &Sandbox, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let prog = aya::programs::Xdp::from_pin(
        sb.root().prog(),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .expect("pinned XDP program");
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let mut ctx = Vec::with_capacity(24);
    for v in [0, frame.len() as u32, 0, ifindex, 0, 0] {
        ctx.extend_from_slice(&v.to_ne_bytes());
    }
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("test_run on ifindex {ifindex}: {e}"));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The backend behind the interface the frame came in on: XDP_TX with the
/// MACs from the FIB. test_run takes the ingress interface from the context
/// only when that interface has registered XDP receive queues, which a veth
/// does once a native XDP program is attached: the sandbox's own program is
/// attached to lb0 for that (lb0's peer sends nothing: IPv6 off, no IPv4).
#[test]
fn xdp_tx_when_the_backend_is_behind_the_receiving_interface() {
    let ns = Netns::new("lbtx");
    for cmd in [
        "ip link add lb0 type veth peer name lb0p",
        "sysctl -q -w net.ipv6.conf.lb0p.disable_ipv6=1",
        "ip addr add 198.18.1.1/24 dev lb0",
        "ip link set dev lb0 up",
        "ip link set dev lb0p up",
        "sysctl -q -w net.ipv4.ip_forward=1",
        "ip neigh add 198.18.1.2 lladdr 02:00:00:00:0b:02 dev lb0 nud permanent",
    ] {
        ns.exec_ok(cmd.split(' '));
    }
    let lb_mac = link_mac(&ns, "lb0");
    ns.run(move || {
        let ifindex = nix::net::if_::if_nametoindex("lb0").expect("lb0 ifindex");
        let sb = new_sandbox();
        let mut xdp = aya::programs::Xdp::from_pin(
            sb.root().prog(),
            aya_obj::programs::XdpAttachType::Interface,
        )
        .expect("pinned XDP program");
        xdp.attach("lb0", aya::programs::XdpMode::Driver)
            .expect("attach to lb0 (native)");
        apply(
            &sb,
            &[
                svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
                svc("198.18.0.20:80/tcp", Mode::Dsr, &["198.18.1.2"]),
            ],
        );
        let c4 = IpAddr::V4(CLIENT4);
        let dsr4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 20));
        let cases = [
            (
                "NAT back out of lb0",
                tcp_frame(c4, VIP4.into(), 40000, 80, SYN, b"nat"),
                with_macs(
                    tcp_frame(c4, BE4[0].into(), 40000, 8080, SYN, b"nat"),
                    BACKEND_MAC,
                    lb_mac,
                ),
            ),
            (
                "DSR back out of lb0",
                tcp_frame(c4, dsr4, 40001, 80, SYN, b"dsr"),
                with_macs(
                    tcp_frame(c4, dsr4, 40001, 80, SYN, b"dsr"),
                    BACKEND_MAC,
                    lb_mac,
                ),
            ),
        ];
        for (what, input, want) in cases {
            let before = snap(&sb);
            let (action, out) = run_on(&sb, &input, ifindex);
            let after = snap(&sb);
            println!("{what}: action {action}");
            assert_eq!(
                action,
                sluice::dataplane::sandbox::XDP_TX,
                "{what}\n{}",
                hex(&out)
            );
            assert_frame(what, &out, &want);
            assert_deltas(
                what,
                &before,
                &after,
                &[(lb_stat::TX, 1), (lb_stat::CONN_CREATED, 1)],
                &[ctr(
                    Family::V4,
                    L4::Tcp,
                    Verdict::Pass,
                    Reason::Default,
                    1,
                    input.len() as u64,
                )],
            );
        }
    });
}

// ---------------------------------------------------------------------------
// The firewall decides first
// ---------------------------------------------------------------------------

const DENIED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);

/// Deny-lists 198.19.1.0/24, allow-lists 198.19.2.0/24, drops TCP to port 81
/// by rule; `audit`: policy-wide audit mode.
fn firewall_policy(sb: &Sandbox, audit: bool) {
    let deny: ipnet::IpNet = "198.19.1.0/24".parse().unwrap();
    let allow: ipnet::IpNet = "198.19.2.0/24".parse().unwrap();
    let rule = sluice::model::policy::RuleSpec {
        action: Verdict::Drop,
        audit: false,
        proto: Some(6),
        dport: Some((81, 81)),
        sport: None,
        src: None,
        dst: None,
        syn: false,
        tcp_flags: None,
        rate: None,
    };
    let mut maps = sb.policy().expect("policy maps");
    maps.commit(sluice::dataplane::Change {
        add: vec![
            (sluice::dataplane::policy::list_for(false, &deny), deny),
            (sluice::dataplane::policy::list_for(true, &allow), allow),
        ],
        rules: Some(vec![rule.to_rule()]),
        audit: Some(audit),
        ..sluice::dataplane::Change::default()
    })
    .expect("commit policy");
}

#[test]
fn firewall_decides_before_the_lb() {
    let sb = new_sandbox();
    apply(
        &sb,
        &[
            svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"]),
            svc("198.18.0.10:81/tcp", Mode::Nat, &["198.18.1.3:8081"]),
        ],
    );
    firewall_policy(&sb, false);
    let v4 = IpAddr::V4(VIP4);
    let denied = tcp_frame(DENIED.into(), v4, 40000, 80, SYN, b"");
    let cases = vec![
        Case {
            what: "deny-listed client: dropped by the firewall, never balanced",
            want: denied.clone(),
            input: denied,
            action: XDP_DROP,
            lb: vec![],
            counted: Some((Family::V4, L4::Tcp, Verdict::Drop, Reason::DenyList)),
        },
        Case {
            what: "allow-listed client: balanced, counted once with the allow-list reason",
            input: tcp_frame(ALLOWED.into(), v4, 40000, 80, SYN, b""),
            action: XDP_PASS,
            want: tcp_frame(ALLOWED.into(), IpAddr::V4(BE4[0]), 40000, 8080, SYN, b""),
            lb: vec![(lb_stat::TO_STACK, 1), (lb_stat::CONN_CREATED, 1)],
            counted: Some((Family::V4, L4::Tcp, Verdict::Pass, Reason::AllowList)),
        },
        Case {
            what: "rule drop of the service port",
            want: tcp_frame(CLIENT4.into(), v4, 40000, 81, SYN, b""),
            input: tcp_frame(CLIENT4.into(), v4, 40000, 81, SYN, b""),
            action: XDP_DROP,
            lb: vec![],
            counted: Some((Family::V4, L4::Tcp, Verdict::Drop, Reason::Rule)),
        },
    ];
    run_cases(&sb, &cases, run);
    let maps = sb.policy().unwrap();
    let hits: Vec<(u64, String)> = [
        sluice_common::ListId::DenyV4,
        sluice_common::ListId::AllowV4,
    ]
    .into_iter()
    .flat_map(|l| maps.list_entries(l).unwrap())
    .map(|e| (e.packets, e.prefix.to_string()))
    .collect();
    assert_eq!(
        hits,
        vec![
            (1, "198.19.1.0/24".to_string()),
            (1, "198.19.2.0/24".to_string())
        ],
        "list entry hits"
    );
}

/// In audit mode a would-be drop passes and is counted as audit; a packet
/// to a VIP is then balanced, and must still be counted as audit.
#[test]
fn audited_packet_to_a_vip_is_counted_as_audit() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"])]);
    firewall_policy(&sb, true);
    let v4 = IpAddr::V4(VIP4);
    let mut c = nat_case(
        "deny-listed client in audit mode: passes, balanced, counted as audit",
        tcp_frame(DENIED.into(), v4, 40000, 80, SYN, b""),
        tcp_frame(DENIED.into(), IpAddr::V4(BE4[0]), 40000, 8080, SYN, b""),
        Family::V4,
        L4::Tcp,
    );
    c.counted = Some((Family::V4, L4::Tcp, Verdict::Audit, Reason::DenyList));
    run_cases(&sb, &[c], run);
}

/// A VLAN-tagged frame to a DSR VIP: the FIB picked an untagged egress
/// (lb0), so the frame must not leave with the tag it came in with.
#[test]
fn dsr_vlan_tagged_frame_does_not_leave_with_its_ingress_tag() {
    let (ns, lb_mac) = fib_netns("lbvlan");
    ns.exec_ok("ip neigh add 198.18.1.2 lladdr 02:00:00:00:0b:02 dev lb0 nud permanent".split(' '));
    ns.run(move || {
        let sb = new_sandbox();
        apply(
            &sb,
            &[svc("198.18.0.20:80/tcp", Mode::Dsr, &["198.18.1.2"])],
        );
        let dsr4 = Ipv4Addr::new(198, 18, 0, 20);
        let tagged = Frame::v4(CLIENT4, dsr4)
            .vlan(TPID_8021Q, 10)
            .tcp(40000, 80)
            .tcp_flags(SYN)
            .build();
        let untagged = with_macs(
            Frame::v4(CLIENT4, dsr4)
                .tcp(40000, 80)
                .tcp_flags(SYN)
                .build(),
            BACKEND_MAC,
            lb_mac,
        );
        let (action, out) = run(&sb, &tagged);
        // Either not sent (dropped, untouched), or sent untagged.
        let ok =
            (action == XDP_DROP && out == tagged) || (action == XDP_REDIRECT && out == untagged);
        assert!(
            ok,
            "action {action}; a frame for untagged lb0 left tagged?\n in:\n{}\nout:\n{}",
            hex(&tagged),
            hex(&out)
        );
    });
}

/// Past the cap a connection is forwarded unrecorded; its later packets are
/// not new connections and must not be counted as such.
#[test]
fn packets_of_a_capped_connection_are_not_new_connections() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"])]);
    // One new entry per second, no burst: the second SYN is capped.
    lbmaps::set_conn_settings(sb.root(), 900, 300, 1, 1).unwrap();
    send_web(&sb, 48_000, SYN, b"");
    send_web(&sb, 48_001, SYN, b"");
    send_web(&sb, 48_001, ACK, b"data");
    send_web(&sb, 48_001, ACK, b"more");
    let id = svc_id(&sb, SVC_WEB);
    let c = lbmaps::service_counters(sb.root(), [id].into_iter()).unwrap()[&id];
    let (created, capped) = (
        stat(&sb, lb_stat::CONN_CREATED),
        stat(&sb, lb_stat::CONN_CAPPED),
    );
    println!("service {c:?}, conns_created {created}, conns_capped {capped}");
    assert_eq!(c.packets, 4);
    assert_eq!(created, 1);
    assert_eq!(c.conns, 2, "two connections were opened");
}

/// A new SYN on a closed connection is balanced afresh; when the cap leaves
/// it unrecorded, the old closed entry must not pull the rest of the new
/// connection back to the old backend.
#[test]
fn capped_reopen_does_not_split_a_connection() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &WEB3)]);
    lbmaps::set_conn_settings(sb.root(), 900, 300, 1, 1).unwrap();
    let old = Predictor::new(&sb, SVC_WEB, &WEB3.map(|n| (n, 1)));
    let new = Predictor::new(&sb, SVC_WEB, &[(WEB3[0], 1), (WEB3[1], 0), (WEB3[2], 1)]);
    let a = be_target(WEB3[1], 80);
    let sport = (49_000..50_000u16)
        .find(|s| target(old.pick_web(*s), 80) == a)
        .unwrap();
    // Recorded (the bucket is full), then closed.
    assert_eq!(send_web(&sb, sport, SYN, b""), a);
    assert_eq!(send_web(&sb, sport, FIN_ACK, b""), a);
    // The old backend drains: a new connection on the same tuple goes elsewhere.
    apply(&sb, &[svc_draining(SVC_WEB, &WEB3, &[WEB3[1]])]);
    let b = target(new.pick_web(sport), 80);
    let start = Instant::now();
    assert_eq!(send_web(&sb, sport, SYN, b""), b, "the reopening SYN");
    let capped = stat(&sb, lb_stat::CONN_CAPPED);
    assert_eq!(
        capped,
        1,
        "the reopening SYN was not recorded (took {:?})",
        start.elapsed()
    );
    assert_eq!(
        send_web(&sb, sport, ACK, b"request"),
        b,
        "the ACK after the reopening SYN went elsewhere than the SYN"
    );
}

/// A service removed and another added in its place gets its id and its
/// backend slots, but not their counters: they start from zero.
#[test]
fn reused_service_ids_and_backend_slots_start_from_zero() {
    let sb = new_sandbox();
    apply(&sb, &[svc(SVC_WEB, Mode::Nat, &["198.18.1.2:8080"])]);
    for sport in 41_000..41_010u16 {
        run(
            &sb,
            &tcp_frame(CLIENT4.into(), VIP4.into(), sport, 80, SYN, b"x"),
        );
    }
    let old = svc_id(&sb, SVC_WEB);
    let c = lbmaps::service_counters(sb.root(), [old].into_iter()).unwrap()[&old];
    assert_eq!(c.packets, 10);
    apply(&sb, &[]);
    let other = "198.18.0.11:80/tcp";
    apply(&sb, &[svc(other, Mode::Nat, &["198.18.1.3:8080"])]);
    let id = svc_id(&sb, other);
    assert_eq!(id, old, "the freed id is handed out again");
    let c = lbmaps::service_counters(sb.root(), [id].into_iter()).unwrap()[&id];
    assert_eq!(
        (c.packets, c.bytes, c.conns),
        (0, 0, 0),
        "the new service's counters"
    );
    let be = lbmaps::backend_counters(sb.root(), 0..16).unwrap();
    assert!(
        be.values().all(|c| c.packets == 0),
        "no backend slot keeps the old backend's packets: {be:?}"
    );
}
