//! The load balancer through BPF_PROG_TEST_RUN, byte for byte: DNAT of
//! TCP/UDP over IPv4 and IPv6 (checksums included), traffic that is not for
//! a VIP untouched, fragments and IP options, the connection table pinning
//! flows across backend changes, the reverse translation (TC egress), and
//! the counters. Needs root.

mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{ProgramFd, SchedClassifier, TestRunOptions},
};
use common::{
    frames::{ExtHeader, Frame},
    kernel::{hex, new_sandbox},
};
use sluice::{
    dataplane::{
        lb as lbmaps,
        sandbox::{Sandbox, XDP_DROP, XDP_PASS},
    },
    lb::{BackendAddr, BackendSpec, Mode, ServiceId, ServiceSpec, maglev},
};
use sluice_common::{
    Counter, Family, L4, Reason, Verdict, counter_index,
    lb::{Conn, FlowKey, TABLE_SIZE, flow_hash, lb_stat},
    map_names,
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 5);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const BE4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 1, 2),
    Ipv4Addr::new(198, 18, 1, 3),
    Ipv4Addr::new(198, 18, 1, 4),
];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 5);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);
const BE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);

fn svc(id: &str, mode: Mode, backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        id: id.parse().unwrap(),
        mode,
        backends: backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.parse().unwrap(),
                weight: 1,
                draining: false,
            })
            .collect(),
    }
}

fn apply(sb: &Sandbox, services: &[ServiceSpec]) {
    lbmaps::apply(sb.root(), services, &HashSet::new()).unwrap_or_else(|e| panic!("apply: {e}"));
}

fn apply_down(sb: &Sandbox, services: &[ServiceSpec], down: &[(&str, &str)]) {
    let down: HashSet<(ServiceId, BackendAddr)> = down
        .iter()
        .map(|(s, b)| (s.parse().unwrap(), b.parse().unwrap()))
        .collect();
    lbmaps::apply(sb.root(), services, &down).unwrap_or_else(|e| panic!("apply: {e}"));
}

fn run(sb: &Sandbox, frame: &[u8]) -> (u32, Vec<u8>) {
    let (r, out) = sb.run_out(frame).expect("test_run");
    (r.action, out)
}

fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: output differs\n got:\n{}\nwant:\n{}",
        hex(got),
        hex(want)
    );
}

fn stat(sb: &Sandbox, index: u32) -> u64 {
    let m: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(sb.root().map(map_names::LB_STATS)).unwrap())).unwrap();
    m.get(&index, 0).unwrap().iter().sum()
}

fn counter(sb: &Sandbox, family: Family, l4: L4, verdict: Verdict, reason: Reason) -> u64 {
    let m: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(sb.root().map(map_names::COUNTERS)).unwrap())).unwrap();
    m.get(&counter_index(family, l4, verdict, reason), 0)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .sum()
}

fn conns(sb: &Sandbox) -> Vec<(FlowKey, Conn)> {
    let m: HashMap<MapData, FlowKey, Conn> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(sb.root().map(map_names::LB_CONNS)).unwrap())).unwrap();
    m.iter().map(Result::unwrap).collect()
}

#[test]
fn dnat_tcp_ipv4_exact_bytes() {
    let sb = new_sandbox();
    apply(&sb, &[svc("198.18.0.10:80/tcp", Mode::Nat, &["198.18.1.2:8080"])]);
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
    assert_eq!(counter(&sb, Family::V4, L4::Tcp, Verdict::Pass, Reason::Default), 1);
}
