//! The load balancer's packet-test framework: the test network's
//! addresses, services, running a frame through XDP or TC egress, counter
//! snapshots and exact deltas, the table runner, and the independent Maglev
//! prediction. The fixtures (tables per feature) are in `lb_packets`.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use sluice::{
    dataplane::sandbox::{Sandbox, XDP_PASS},
    model::lb::{BackendAddr, BackendSpec, Mode, ServiceId, ServiceSpec, maglev},
};
use sluice_common::{
    COUNTER_SLOTS, Counter, Family, L4, Reason, Verdict, addr_words, counter_index,
    lb::{Conn, FlowKey, TABLE_SIZE, flow_hash, lb_stat},
    map_names,
};

use crate::support::{
    frames::Frame,
    kernel::{hex, slot_name},
};

/// XDP_REDIRECT (the sandbox names only the actions the firewall uses).
pub(super) const XDP_REDIRECT: u32 = 4;
/// TC_ACT_UNSPEC (-1, TCX_NEXT) as test_run reports it.
pub(super) const TC_NEXT: u32 = u32::MAX;

pub(super) const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 5);
pub(super) const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub(super) const BE4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 1, 2),
    Ipv4Addr::new(198, 18, 1, 3),
    Ipv4Addr::new(198, 18, 1, 4),
];
pub(super) const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 5);
pub(super) const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);
pub(super) const BE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);

pub(super) const SVC_WEB: &str = "198.18.0.10:80/tcp";
pub(super) const WEB3: [&str; 3] = ["198.18.1.2:8080", "198.18.1.3:8080", "198.18.1.4:8080"];

pub(super) const SYN: u8 = 0x02;
pub(super) const ACK: u8 = 0x10;
pub(super) const FIN_ACK: u8 = 0x11;
pub(super) const RST: u8 = 0x04;

// ---------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------

pub(super) fn svc(id: &str, mode: Mode, backends: &[&str]) -> ServiceSpec {
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

/// A NAT service whose listed backends are draining.
pub(super) fn svc_draining(id: &str, backends: &[&str], draining: &[&str]) -> ServiceSpec {
    let mut s = svc(id, Mode::Nat, backends);
    for b in &mut s.backends {
        b.draining = draining
            .iter()
            .any(|d| d.parse::<BackendAddr>().unwrap() == b.addr);
    }
    s
}

pub(super) fn apply(sb: &Sandbox, services: &[ServiceSpec]) {
    sluice::engine::lb::apply(sb.root(), services, &HashSet::new())
        .unwrap_or_else(|e| panic!("apply: {e}"));
}

pub(super) fn apply_down(sb: &Sandbox, services: &[ServiceSpec], down: &[(&str, &str)]) {
    let down: HashSet<(ServiceId, BackendAddr)> = down
        .iter()
        .map(|(s, b)| (s.parse().unwrap(), b.parse().unwrap()))
        .collect();
    sluice::engine::lb::apply(sb.root(), services, &down).unwrap_or_else(|e| panic!("apply: {e}"));
}

pub(super) fn run(sb: &Sandbox, frame: &[u8]) -> (u32, Vec<u8>) {
    let (r, out) = sb.run_out(frame).expect("test_run");
    (r.action, out)
}

/// Runs the TC egress program (skb test_run: the input is an Ethernet frame).
pub(super) fn run_tc(sb: &Sandbox, frame: &[u8]) -> (u32, Vec<u8>) {
    let path = sb.root().prog_dir().join(sluice_common::TC_EGRESS_PROGRAM);
    let prog =
        SchedClassifier::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let r = prog
        .test_run(opts)
        .unwrap_or_else(|e| panic!("tc test_run: {e}\nframe:\n{}", hex(frame)));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

pub(super) fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: output differs\n got:\n{}\nwant:\n{}",
        hex(got),
        hex(want)
    );
}

pub(super) fn stat(sb: &Sandbox, index: u32) -> u64 {
    let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(sb.root().map(map_names::LB_STATS)).unwrap(),
    ))
    .unwrap();
    m.get(&index, 0).unwrap().iter().sum()
}

pub(super) fn counter(
    sb: &Sandbox,
    family: Family,
    l4: L4,
    verdict: Verdict,
    reason: Reason,
) -> u64 {
    let m: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(sb.root().map(map_names::COUNTERS)).unwrap(),
    ))
    .unwrap();
    m.get(&counter_index(family, l4, verdict, reason), 0)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .sum()
}

pub(super) fn conns(sb: &Sandbox) -> Vec<(FlowKey, Conn)> {
    let m: HashMap<MapData, FlowKey, Conn> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(sb.root().map(map_names::LB_CONNS)).unwrap(),
    ))
    .unwrap();
    m.iter().map(Result::unwrap).collect()
}

/// Every LB_STATS and COUNTERS slot, summed over CPUs.
#[derive(Clone, Debug)]
pub(super) struct Snap {
    pub(super) lb: Vec<u64>,
    pub(super) ctr: Vec<Counter>,
}

pub(super) fn snap(sb: &Sandbox) -> Snap {
    let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(sb.root().map(map_names::LB_STATS)).unwrap(),
    ))
    .unwrap();
    let lb = (0..lb_stat::SLOTS)
        .map(|i| m.get(&i, 0).unwrap().iter().sum())
        .collect();
    let c: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(
        MapData::from_pin(sb.root().map(map_names::COUNTERS)).unwrap(),
    ))
    .unwrap();
    let ctr = (0..COUNTER_SLOTS)
        .map(|i| {
            c.get(&i, 0)
                .unwrap()
                .iter()
                .fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                })
        })
        .collect();
    Snap { lb, ctr }
}

/// A COUNTERS slot with the packets and bytes it should gain.
pub(super) fn ctr(
    family: Family,
    l4: L4,
    verdict: Verdict,
    reason: Reason,
    packets: u64,
    bytes: u64,
) -> (u32, u64, u64) {
    (counter_index(family, l4, verdict, reason), packets, bytes)
}

/// Checks that every LB_STATS and COUNTERS slot moved by exactly what is
/// listed (unlisted slots: not at all); names every mismatch.
pub(super) fn deltas(
    before: &Snap,
    after: &Snap,
    lb: &[(u32, u64)],
    counters: &[(u32, u64, u64)],
) -> Result<(), String> {
    let mut problems = Vec::new();
    for (i, (b, a)) in before.lb.iter().zip(&after.lb).enumerate() {
        let want: u64 = lb
            .iter()
            .filter(|(s, _)| *s == i as u32)
            .map(|(_, n)| n)
            .sum();
        if a - b != want {
            problems.push(format!(
                "LB_STATS {} ({i}): got +{}, want +{want}",
                lb_stat::NAMES[i],
                a - b
            ));
        }
    }
    for (i, (b, a)) in before.ctr.iter().zip(&after.ctr).enumerate() {
        let want = counters
            .iter()
            .filter(|(s, _, _)| *s == i as u32)
            .fold((0, 0), |acc, (_, p, by)| (acc.0 + p, acc.1 + by));
        let got = (a.packets - b.packets, a.bytes - b.bytes);
        if got != want {
            problems.push(format!(
                "COUNTERS {} ({i}): got +{got:?}, want +{want:?} (packets, bytes)",
                slot_name(i as u32)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

pub(super) fn assert_deltas(
    what: &str,
    before: &Snap,
    after: &Snap,
    lb: &[(u32, u64)],
    counters: &[(u32, u64, u64)],
) {
    if let Err(e) = deltas(before, after, lb, counters) {
        panic!("{what}: counters:\n{e}");
    }
}

/// One frame through a program: what goes in, what must come out.
pub(super) struct Case {
    pub(super) what: &'static str,
    pub(super) input: Vec<u8>,
    pub(super) action: u32,
    pub(super) want: Vec<u8>,
    /// LB_STATS deltas.
    pub(super) lb: Vec<(u32, u64)>,
    /// The COUNTERS slot that counts this one packet (None: no slot moves,
    /// as for the TC program).
    pub(super) counted: Option<(Family, L4, Verdict, Reason)>,
}

/// Runs every case on `sb` (in order, each one's deltas on their own) and
/// reports all failures at once, each with its input frame.
pub(super) fn run_cases(
    sb: &Sandbox,
    cases: &[Case],
    runner: fn(&Sandbox, &[u8]) -> (u32, Vec<u8>),
) {
    let mut failures = Vec::new();
    for c in cases {
        let before = snap(sb);
        let (action, out) = runner(sb, &c.input);
        let after = snap(sb);
        let mut problems = Vec::new();
        if action != c.action {
            problems.push(format!("action {action}, want {}", c.action));
        }
        if out != c.want {
            problems.push(format!(
                "output differs\n got:\n{}\nwant:\n{}",
                hex(&out),
                hex(&c.want)
            ));
        }
        let counted: Vec<(u32, u64, u64)> = c
            .counted
            .iter()
            .map(|&(f, l, v, r)| ctr(f, l, v, r, 1, c.input.len() as u64))
            .collect();
        if let Err(e) = deltas(&before, &after, &c.lb, &counted) {
            problems.push(e);
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n{}\ninput:\n{}",
                c.what,
                problems.join("\n"),
                hex(&c.input)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

pub(super) fn words(a: IpAddr) -> [u64; 2] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
    }
    addr_words(&b)
}

pub(super) fn tcp_frame(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    Frame::ip(src, dst)
        .tcp(sport, dport)
        .tcp_flags(flags)
        .payload(payload)
        .build()
}

pub(super) fn udp_frame(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    Frame::ip(src, dst)
        .udp(sport, dport)
        .payload(payload)
        .build()
}

/// Where a backend sends a packet addressed to `dport`: its address, and its
/// port or (none) the packet's.
pub(super) fn target(be: BackendAddr, dport: u16) -> (IpAddr, u16) {
    (be.addr, if be.port == 0 { dport } else { be.port })
}

/// The destination (address, port) of an untagged IPv4 TCP/UDP frame
/// without options.
pub(super) fn dst_of_v4(frame: &[u8]) -> (IpAddr, u16) {
    let a = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    (IpAddr::V4(a), u16::from_be_bytes([frame[36], frame[37]]))
}

/// The Maglev table of a service as predicted here, from the member names
/// (as the user wrote them), weights and the slots the kernel holds: an
/// independent rebuild, not a read of the kernel's table.
pub(super) struct Predictor {
    table: Vec<u32>,
    by_slot: StdHashMap<u32, BackendAddr>,
}

impl Predictor {
    /// `members`: (name, weight); weight 0 = out of the table.
    pub(super) fn new(sb: &Sandbox, service: &str, members: &[(&str, u32)]) -> Self {
        let id: ServiceId = service.parse().unwrap();
        let state = sluice::engine::lb::read(sb.root()).expect("lb read");
        let s = state
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no service {service} in {state:?}"));
        let mut by_slot = StdHashMap::new();
        let list: Vec<maglev::Member<'_>> = members
            .iter()
            .map(|&(name, weight)| {
                let addr: BackendAddr = name.parse().unwrap();
                let m = s
                    .members
                    .iter()
                    .find(|m| m.backend == addr)
                    .unwrap_or_else(|| panic!("no member {name} in {s:?}"));
                by_slot.insert(m.slot, addr);
                maglev::Member {
                    name,
                    slot: m.slot,
                    weight,
                }
            })
            .collect();
        let table = maglev::build(&list, TABLE_SIZE).expect("maglev build");
        Self { table, by_slot }
    }

    pub(super) fn pick(
        &self,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> BackendAddr {
        let i = flow_hash(words(src), words(dst), sport, dport, proto) % TABLE_SIZE;
        self.by_slot[&self.table[i as usize]]
    }

    pub(super) fn pick_web(&self, sport: u16) -> BackendAddr {
        self.pick(IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), sport, 80, 6)
    }
}

/// Sends a TCP segment CLIENT4:sport → VIP4:80 (no route: to the stack),
/// checks the output is exactly the segment DNATed to the backend it went
/// to, and returns that backend.
pub(super) fn send_web(sb: &Sandbox, sport: u16, flags: u8, payload: &[u8]) -> (IpAddr, u16) {
    let input = tcp_frame(CLIENT4.into(), VIP4.into(), sport, 80, flags, payload);
    let (action, out) = run(sb, &input);
    assert_eq!(
        action,
        XDP_PASS,
        "sport {sport} flags {flags:#x}:\n{}",
        hex(&input)
    );
    assert!(
        out.len() >= 38,
        "short output for sport {sport}:\n{}",
        hex(&out)
    );
    let (addr, port) = dst_of_v4(&out);
    let want = tcp_frame(CLIENT4.into(), addr, sport, port, flags, payload);
    assert_frame(&format!("sport {sport} flags {flags:#x}"), &out, &want);
    (addr, port)
}

pub(super) fn be_target(name: &str, dport: u16) -> (IpAddr, u16) {
    target(name.parse().unwrap(), dport)
}

/// A UDP payload that makes the checksum of `build(payload)` come out as 0
/// (sent as 0xffff): the 2 bytes equal the checksum over a zero payload.
pub(super) fn zero_sum_payload(build: impl Fn(&[u8]) -> Vec<u8>, csum_at: usize) -> Vec<u8> {
    let f = build(&[0, 0]);
    let c = [f[csum_at], f[csum_at + 1]];
    let p = c.to_vec();
    let g = build(&p);
    assert_eq!(
        [g[csum_at], g[csum_at + 1]],
        [0xff, 0xff],
        "payload {p:02x?} does not sum to 0"
    );
    p
}

pub(super) fn svc_id(sb: &Sandbox, service: &str) -> u32 {
    let id: ServiceId = service.parse().unwrap();
    sluice::engine::lb::read(sb.root())
        .unwrap()
        .into_iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("no service {service}"))
        .slot
}

pub(super) fn member_slot(sb: &Sandbox, service: &str, backend: &str) -> u32 {
    let id: ServiceId = service.parse().unwrap();
    let addr: BackendAddr = backend.parse().unwrap();
    sluice::engine::lb::read(sb.root())
        .unwrap()
        .into_iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("no service {service}"))
        .members
        .into_iter()
        .find(|m| m.backend == addr)
        .unwrap_or_else(|| panic!("no member {backend} in {service}"))
        .slot
}
