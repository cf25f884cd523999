//! The DDoS stage through BPF_PROG_TEST_RUN on the kernel's own clock: how
//! exactly `limit` rules hold their rate, the SYN guard's challenge (byte for
//! byte) and answers, the new-source cap, and escalation reports. Needs root.
//!
//! Timed tests pace packets by absolute wall-clock deadlines and judge what
//! the kernel counted (verdict counters, `STATS`), never how fast the test
//! managed to send: a busy machine makes the test send less, not fail.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use sluice::{
    dataplane::{
        Change, runtime,
        sandbox::{Sandbox, XDP_DROP, XDP_PASS, XDP_TX},
    },
    model::policy::RuleSpec,
};
use sluice_common::{
    Bucket, Counter, DdosConfig, Escalation, Family, L4, Reason, Rule, SrcKey, Verdict, addr_words,
    counter_index, map_names, stat,
};

use crate::support::{
    frames::{DST_MAC, ExtHeader, Frame, SRC_MAC, checksum},
    kernel::{hex, new_sandbox, slot_name},
    rate::{Gcra, boot_ns, model_passes, pace},
};

const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const C4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);

const PORT: u16 = 9000;

// ---------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------

fn rule(words: &str) -> Rule {
    let w: Vec<String> = words.split_whitespace().map(str::to_owned).collect();
    RuleSpec::parse(&w)
        .unwrap_or_else(|e| panic!("rule '{words}': {e}"))
        .to_rule()
}

/// Replaces the sandbox's rules (default pass stays); returns them as
/// committed, with their ids and stats slots.
fn set_rules(sb: &Sandbox, rules: &[&str]) -> Vec<Rule> {
    let mut maps = sb.policy().expect("policy maps");
    maps.commit(Change {
        rules: Some(rules.iter().map(|r| rule(r)).collect()),
        ..Change::default()
    })
    .expect("commit rules");
    maps.rules()
        .expect("rules")
        .into_iter()
        .map(|v| v.rule)
        .collect()
}

fn set_audit(sb: &Sandbox, on: bool) {
    sb.policy()
        .expect("policy maps")
        .commit(Change {
            audit: Some(on),
            ..Change::default()
        })
        .expect("commit audit");
}

fn counters(sb: &Sandbox) -> Vec<Counter> {
    sb.policy()
        .expect("policy maps")
        .counters()
        .expect("counters")
}

fn stats(sb: &Sandbox) -> [u64; stat::SLOTS as usize] {
    runtime::stats(sb.root()).expect("STATS")
}

fn slot(f: Family, l4: L4, v: Verdict, r: Reason) -> String {
    slot_name(counter_index(f, l4, v, r))
}

/// The counter slots that changed between two snapshots, by name:
/// (packets, bytes).
fn delta(before: &[Counter], after: &[Counter]) -> BTreeMap<String, (u64, u64)> {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| a.packets != b.packets)
        .map(|(i, (b, a))| {
            (
                slot_name(i as u32),
                (a.packets - b.packets, a.bytes - b.bytes),
            )
        })
        .collect()
}

fn packets(d: &BTreeMap<String, (u64, u64)>, f: Family, l4: L4, v: Verdict, r: Reason) -> u64 {
    d.get(&slot(f, l4, v, r)).map_or(0, |c| c.0)
}

fn map(sb: &Sandbox, name: &'static str) -> Map {
    let path = sb.root().map(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What `offer` saw for one of its frames.
#[derive(Debug, Default, Clone)]
struct Offered {
    sent: u64,
    passed: u64,
    /// When each was sent (just before the test run), ns from the start.
    times: Vec<u64>,
}

/// Offers each of `frames` `rate` times per second for `dur` (see [`pace`]);
/// returns per frame what was sent and passed (by the XDP action), the
/// counter changes, and the time from the first packet to the last.
fn offer(
    sb: &Sandbox,
    frames: &[Vec<u8>],
    rate: u64,
    dur: Duration,
) -> (Vec<Offered>, BTreeMap<String, (u64, u64)>, Duration) {
    let mut seen = vec![Offered::default(); frames.len()];
    let before = counters(sb);
    let t0 = Instant::now();
    let (_, window) = pace(rate, dur, || {
        for (f, s) in frames.iter().zip(seen.iter_mut()) {
            s.times
                .push(u64::try_from(t0.elapsed().as_nanos()).expect("ns"));
            let r = sb.run(f).expect("test_run");
            assert!(
                r.action == XDP_PASS || r.action == XDP_DROP,
                "unexpected action {}",
                r.action
            );
            s.sent += 1;
            s.passed += u64::from(r.action == XDP_PASS);
        }
        true
    });
    let after = counters(sb);
    (seen, delta(&before, &after), window)
}

/// Judges one limited flow that passed `got` packets:
/// - against the reference bucket fed the very send times (`model`): within
///   2% of `rate × window` (at least 5 packets: the kernel's clock reads a
///   little after the test's);
/// - against the nominal rate, `burst + rate × window`: within 10% of
///   `rate × window`. A machine too busy to offer three times the limit
///   (the model itself is then off the nominal rate) is judged against the
///   model only, and says so.
fn judge(what: &str, got: u64, model: u64, rate: u64, burst: u64, window: Duration) {
    let ideal = rate as f64 * window.as_secs_f64();
    let nominal = burst as f64 + ideal;
    let (tight, loose) = ((0.02 * ideal).max(5.0), 0.1 * ideal);
    println!(
        "{what}: {got} passed in {window:?}; reference bucket {model}, nominal {nominal:.0} ± {loose:.0}"
    );
    assert!(
        (got as f64 - model as f64).abs() <= tight,
        "{what}: {got} passed; the reference bucket passes {model} of the same packets (± {tight:.0})"
    );
    if (model as f64 - nominal).abs() <= loose {
        assert!(
            (got as f64 - nominal).abs() <= loose,
            "{what}: {got} passed in {window:?}; {rate}/s with burst {burst} gives {nominal:.0} (± {loose:.0})"
        );
    } else {
        println!("{what}: the machine could not offer the load; judged against the reference only");
    }
}

// ---------------------------------------------------------------------------
// Rate-limit exactness
// ---------------------------------------------------------------------------

/// Three times the limit for 2.5 s, then half the limit for 1 s.
const OVER: Duration = Duration::from_millis(2500);
const UNDER: Duration = Duration::from_secs(1);

fn udp4(src: Ipv4Addr) -> Vec<u8> {
    Frame::v4(src, B4).udp(5000, PORT).build()
}

#[test]
fn limit_shared_bucket_holds_its_rate() {
    let sb = new_sandbox();
    let rules = set_rules(&sb, &["limit 1000/s burst 100 udp dport 9000"]);
    let frame = udp4(A4);
    let udp_pass = |d: &_| packets(d, Family::V4, L4::Udp, Verdict::Pass, Reason::Default);
    let udp_limited = |d: &_| packets(d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit);

    let (seen, d, window) = offer(&sb, std::slice::from_ref(&frame), 3000, OVER);
    let s = &seen[0];
    assert_eq!(
        (udp_pass(&d), udp_limited(&d)),
        (s.passed, s.sent - s.passed),
        "the counters agree with the XDP actions: {d:?}"
    );
    assert_eq!(d.len(), 2, "only pass/default and drop/rate-limit: {d:?}");
    let model = model_passes(Gcra::packets(1000, 100), &s.times);
    judge("shared 1000/s", udp_pass(&d), model, 1000, 100, window);
    let rule_hits = sb.policy().expect("policy").rules().expect("rules")[0].packets;
    let limited_total = counters(&sb)
        [counter_index(Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit) as usize]
        .packets;
    assert_eq!(
        rule_hits, limited_total,
        "the limit rule counts what it dropped ({rules:?})"
    );

    // Under the limit nothing is dropped, even right after the flood.
    let (seen, d, _) = offer(&sb, std::slice::from_ref(&frame), 500, UNDER);
    assert!(seen[0].sent > 0, "nothing offered");
    assert_eq!(seen[0].passed, seen[0].sent, "under the limit: {d:?}");
    assert_eq!(udp_pass(&d), seen[0].sent, "{d:?}");
    assert_eq!(udp_limited(&d), 0, "{d:?}");
}

#[test]
fn limit_per_source_buckets_are_independent() {
    let sb = new_sandbox();
    let rules = set_rules(&sb, &["limit 1000/s burst 100 per-source udp dport 9000"]);
    let frames = [udp4(A4), udp4(C4)];

    let (seen, d, window) = offer(&sb, &frames, 3000, OVER);
    let passed: u64 = seen.iter().map(|s| s.passed).sum();
    let sent: u64 = seen.iter().map(|s| s.sent).sum();
    assert_eq!(
        packets(&d, Family::V4, L4::Udp, Verdict::Pass, Reason::Default),
        passed,
        "{d:?}"
    );
    assert_eq!(
        packets(&d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit),
        sent - passed,
        "{d:?}"
    );
    // Each source gets the whole rate (a shared bucket would split it).
    for (name, s) in ["198.18.0.1", "198.18.0.3"].iter().zip(&seen) {
        let model = model_passes(Gcra::packets(1000, 100), &s.times);
        judge(
            &format!("per-source 1000/s, {name}"),
            s.passed,
            model,
            1000,
            100,
            window,
        );
    }

    // Each source has its own bucket, keyed by the rule's slot.
    let buckets: HashMap<MapData, SrcKey, Bucket> =
        HashMap::try_from(map(&sb, map_names::SRC_BUCKETS)).expect("SRC_BUCKETS");
    for ip in [A4, C4] {
        let key = src_key(rules[0].id, IpAddr::V4(ip));
        assert!(
            buckets.get(&key, 0).is_ok(),
            "no bucket for {ip} (key {key:?})"
        );
    }
    assert_eq!(stats(&sb)[stat::SRC_INSERTED as usize], 2);

    let (seen, d, _) = offer(&sb, &frames, 500, UNDER);
    for s in &seen {
        assert!(s.sent > 0, "nothing offered");
        assert_eq!(s.passed, s.sent, "under the limit: {seen:?} {d:?}");
    }
}

#[test]
fn limit_byte_rate_holds_its_rate() {
    let sb = new_sandbox();
    set_rules(&sb, &["limit 100kB/s burst 10kB udp dport 9000"]);
    let frame = Frame::v4(A4, B4)
        .udp(5000, PORT)
        .payload(&[0x5a; 958])
        .build();
    assert_eq!(frame.len(), 1000);

    // 300 frames (300 kB) a second for 3 s against 100 kB/s: judged in
    // frames (100/s, a burst of 10).
    let (seen, d, window) = offer(
        &sb,
        std::slice::from_ref(&frame),
        300,
        Duration::from_secs(3),
    );
    let pass = slot(Family::V4, L4::Udp, Verdict::Pass, Reason::Default);
    let (p, bytes) = d.get(&pass).copied().unwrap_or_default();
    assert_eq!(p, seen[0].passed, "{d:?}");
    assert_eq!(bytes, p * 1000, "bytes counted");
    assert_eq!(
        packets(&d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit),
        seen[0].sent - p,
        "{d:?}"
    );
    let model = model_passes(Gcra::bytes(100_000, 10_000, 1000), &seen[0].times);
    judge("100kB/s, 1000-byte frames", p, model, 100, 10, window);

    let (seen, d, _) = offer(&sb, std::slice::from_ref(&frame), 50, UNDER);
    assert!(seen[0].sent > 0, "nothing offered");
    assert_eq!(seen[0].passed, seen[0].sent, "under the limit: {d:?}");
}

/// `burst N` is exactly how many packets (or bytes) pass back to back:
/// twenty frames in one kernel test run into a fresh bucket whose token
/// takes 100 ms, so time cannot add one (unless the run itself is held up
/// that long, which the check allows for).
#[test]
fn limit_burst_is_exact() {
    let sb = new_sandbox();
    set_rules(
        &sb,
        &[
            "limit 10/s burst 5 udp dport 9001",
            "limit 10kB/s burst 5kB udp dport 9002",
            "limit 10/s burst 5 per-source udp dport 9003",
            "limit 10kB/s burst 5kB per-source udp dport 9004",
        ],
    );
    for (what, port, len) in [
        ("packets", 9001, 60),
        ("bytes", 9002, 1000),
        ("packets per source", 9003, 60),
        ("bytes per source", 9004, 1000),
    ] {
        let frame = Frame::v4(A4, B4).udp(5000, port).pad_to(len).build();
        let before = counters(&sb);
        let t = Instant::now();
        sb.run_repeat(&frame, 20).expect("test_run");
        // Packet k past the burst needs k tokens (100 ms each) of time.
        let slack = (t.elapsed().as_secs_f64() / 0.1).floor() as u64;
        let d = delta(&before, &counters(&sb));
        let passed = packets(&d, Family::V4, L4::Udp, Verdict::Pass, Reason::Default);
        assert!(
            (5..=5 + slack).contains(&passed),
            "{what}: {passed} of 20 back-to-back {len}-byte frames passed; the burst is 5 ({d:?})"
        );
        assert_eq!(
            packets(&d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit),
            20 - passed,
            "{what}: {d:?}"
        );
    }
}

fn src_key(rule_id: u32, ip: IpAddr) -> SrcKey {
    let mut a = [0u8; 16];
    let fam = match ip {
        IpAddr::V4(v) => {
            a[..4].copy_from_slice(&v.octets());
            4
        }
        IpAddr::V6(v) => {
            a.copy_from_slice(&v.octets());
            6
        }
    };
    SrcKey {
        rule_id,
        family: fam,
        addr: addr_words(&a),
    }
}

// ---------------------------------------------------------------------------
// SYN guard
// ---------------------------------------------------------------------------

const SYN_PORT: u16 = 80;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// TCP pseudo-header (RFC 793 / RFC 8200 §8.1) for a segment of `len` bytes.
fn pseudo_header(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    let mut p = octets(src);
    p.extend_from_slice(&octets(dst));
    if src.is_ipv4() {
        p.extend_from_slice(&[0, 6]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 6]);
    }
    p
}

/// The challenge the guard must send for a SYN `client:sport -> server:dport`
/// from SRC_MAC to DST_MAC, written out field by field: Ethernet with the
/// MACs swapped; a fresh IP header (IPv4: no options, ID 0, DF, TTL 64;
/// IPv6: hop limit 64) from server to client; a 20-byte TCP header
/// `dport -> sport`, seq = cookie ^ 0x5eed5eed, ack = cookie, SYN|ACK,
/// window 65535, no options, no payload.
fn expected_challenge(
    client: IpAddr,
    server: IpAddr,
    sport: u16,
    dport: u16,
    cookie: u32,
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&(cookie ^ 0x5eed_5eed).to_be_bytes());
    tcp.extend_from_slice(&cookie.to_be_bytes());
    tcp.extend_from_slice(&[0x50, TCP_SYN | TCP_ACK, 0xff, 0xff, 0, 0, 0, 0]);
    let mut sum_in = pseudo_header(server, client, tcp.len());
    sum_in.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&checksum(&sum_in).to_be_bytes());

    let mut f = Vec::new();
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&DST_MAC);
    if client.is_ipv4() {
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&octets(server));
        ip.extend_from_slice(&octets(client));
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
    } else {
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        f.extend_from_slice(&octets(server));
        f.extend_from_slice(&octets(client));
    }
    f.extend_from_slice(&tcp);
    f
}

/// Checks the checksums of a frame as a receiver would: the IPv4 header sums
/// to zero, and the TCP segment with its pseudo-header sums to zero.
fn assert_checksums(what: &str, f: &[u8]) {
    let (l3, l4) = (14, if f[12..14] == [0x08, 0x00] { 34 } else { 54 });
    let (src, dst): (IpAddr, IpAddr) = if l4 == 34 {
        assert_eq!(checksum(&f[l3..l4]), 0, "{what}: IPv4 header checksum");
        let s: [u8; 4] = f[26..30].try_into().expect("4 bytes");
        let d: [u8; 4] = f[30..34].try_into().expect("4 bytes");
        (s.into(), d.into())
    } else {
        let s: [u8; 16] = f[22..38].try_into().expect("16 bytes");
        let d: [u8; 16] = f[38..54].try_into().expect("16 bytes");
        (s.into(), d.into())
    };
    let mut sum_in = pseudo_header(src, dst, f.len() - l4);
    sum_in.extend_from_slice(&f[l4..]);
    assert_eq!(checksum(&sum_in), 0, "{what}: TCP checksum\n{}", hex(f));
}

/// Runs one frame and asserts its XDP action and that exactly one packet of
/// its length was counted, in `want`. Returns the frame as the program left it.
fn step(sb: &Sandbox, what: &str, frame: &[u8], action: u32, want: (Verdict, Reason)) -> Vec<u8> {
    // The EtherType, after one VLAN tag if there is one.
    let at = if frame[12..14] == [0x81, 0x00] {
        16
    } else {
        12
    };
    let fam = if frame[at..at + 2] == [0x08, 0x00] {
        Family::V4
    } else {
        Family::V6
    };
    let before = counters(sb);
    let (r, out) = sb.run_out(frame).expect("test_run");
    let d = delta(&before, &counters(sb));
    let want_d = BTreeMap::from([(slot(fam, L4::Tcp, want.0, want.1), (1, frame.len() as u64))]);
    assert!(
        r.action == action && d == want_d,
        "{what}: action {} (want {action}), counters {d:?} (want {want_d:?})\nframe:\n{}\nout:\n{}",
        r.action,
        hex(frame),
        hex(&out)
    );
    out
}

fn tcp_frame(src: IpAddr, dst: IpAddr, sport: u16, flags: u8, seq: u32) -> Frame {
    Frame::ip(src, dst)
        .tcp(sport, SYN_PORT)
        .tcp_flags(flags)
        .tcp_seq(seq)
}

/// Makes every SYN over the guard's rate from now on: its bucket's
/// theoretical arrival time far in the future (so no step of the test
/// depends on how fast the machine runs it).
fn exhaust(sb: &Sandbox, slot: u32) {
    let mut buckets: Array<MapData, Bucket> =
        Array::try_from(map(sb, map_names::RULE_BUCKETS)).expect("RULE_BUCKETS");
    let b = Bucket {
        tat_ns: boot_ns() + 3600 * 1_000_000_000,
        ..Bucket::default()
    };
    buckets.set(slot, b, 0).expect("write RULE_BUCKETS");
}

fn syn_guard_exchange(client: IpAddr, server: IpAddr, other: IpAddr) {
    use Reason::{Default as Dflt, SynDefence};
    use Verdict::{Audit, Drop, Pass};
    let v4 = client.is_ipv4();
    let sb = new_sandbox();
    let rules = set_rules(&sb, &["syn-guard 1/s burst 1 tcp dport 80"]);
    let sport = 40000;
    // A SYN with 20 bytes of options (as real SYNs have), which the answer
    // must not keep.
    let syn = |src: IpAddr, sport: u16| {
        tcp_frame(src, server, sport, TCP_SYN, 0x1234_5678)
            .tcp_data_offset(10)
            .build()
    };

    // The first SYN is within the rate; the next one (microseconds later,
    // against 1/s burst 1) is not.
    step(
        &sb,
        "first SYN",
        &syn(client, sport),
        XDP_PASS,
        (Pass, Dflt),
    );
    let s0 = stats(&sb);
    let first = syn(client, sport);
    // Cookies change with a 2^36 ns (~69 s) period of the boot clock.
    let period = boot_ns() >> 36;
    let out = step(&sb, "second SYN", &first, XDP_TX, (Drop, SynDefence));
    exhaust(&sb, rules[0].stats_slot);

    let l4 = if v4 { 34 } else { 54 };
    assert_eq!(out.len(), l4 + 20, "answer length\n{}", hex(&out));
    let cookie = u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().expect("4 bytes"));
    let want = expected_challenge(client, server, sport, SYN_PORT, cookie);
    assert!(
        out == want,
        "challenge bytes differ\ngot:\n{}\nwant:\n{}",
        hex(&out),
        hex(&want)
    );
    assert_checksums("challenge", &out);
    let s1 = stats(&sb);
    assert_eq!(
        s1[stat::SYN_CHALLENGES as usize],
        s0[stat::SYN_CHALLENGES as usize] + 1
    );

    // The same SYN again gets the same cookie (in the same period).
    let again = step(&sb, "SYN retransmitted", &first, XDP_TX, (Drop, SynDefence));
    if boot_ns() >> 36 == period {
        assert_eq!(again, want, "same 4-tuple, same cookie");
    }

    // Another unverified source: a reset with a wrong sequence number or with
    // ACK set is not an answer; it goes through the rules like any packet.
    let other_out = step(
        &sb,
        "other's SYN",
        &syn(other, 41000),
        XDP_TX,
        (Drop, SynDefence),
    );
    let other_cookie = u32::from_be_bytes(other_out[l4 + 8..l4 + 12].try_into().expect("4"));
    let wrong = tcp_frame(other, server, 41000, TCP_RST, other_cookie.wrapping_add(1)).build();
    step(&sb, "RST, wrong seq", &wrong, XDP_PASS, (Pass, Dflt));
    let rst_ack = tcp_frame(other, server, 41000, TCP_RST | TCP_ACK, other_cookie).build();
    step(
        &sb,
        "RST|ACK with the cookie",
        &rst_ack,
        XDP_PASS,
        (Pass, Dflt),
    );
    // The client's cookie does not answer for another source.
    let stolen = tcp_frame(other, server, 41000, TCP_RST, cookie).build();
    step(
        &sb,
        "RST with another's cookie",
        &stolen,
        XDP_PASS,
        (Pass, Dflt),
    );
    assert_eq!(stats(&sb)[stat::SYN_VERIFIED as usize], 0);
    step(
        &sb,
        "other still unverified",
        &syn(other, 41000),
        XDP_TX,
        (Drop, SynDefence),
    );

    // The client's stack answers the SYN-ACK's wrong ack with RST, seq = ack:
    // consumed, and the client is verified.
    let answer = tcp_frame(client, server, sport, TCP_RST, cookie).build();
    step(
        &sb,
        "RST with the cookie",
        &answer,
        XDP_DROP,
        (Drop, SynDefence),
    );
    assert_eq!(stats(&sb)[stat::SYN_VERIFIED as usize], 1);

    // From now on the client's SYNs pass, from any port, though the rate is
    // still exceeded (others are still challenged).
    let s2 = stats(&sb);
    step(&sb, "verified SYN", &first, XDP_PASS, (Pass, Dflt));
    step(
        &sb,
        "verified SYN, other port",
        &syn(client, 40001),
        XDP_PASS,
        (Pass, Dflt),
    );
    step(
        &sb,
        "other challenged",
        &syn(other, 41001),
        XDP_TX,
        (Drop, SynDefence),
    );
    assert_eq!(
        stats(&sb)[stat::SYN_CHALLENGES as usize],
        s2[stat::SYN_CHALLENGES as usize] + 1
    );

    // A VLAN-tagged SYN is answered on the same VLAN: the tag stays between
    // the swapped MACs and the rebuilt headers.
    let tagged = Frame::ip(other, server)
        .vlan(0x8100, 10)
        .tcp(41004, SYN_PORT)
        .tcp_data_offset(10)
        .build();
    let out = step(&sb, "tagged SYN", &tagged, XDP_TX, (Drop, SynDefence));
    assert_eq!(out.len(), l4 + 4 + 20, "answer length\n{}", hex(&out));
    let ck = u32::from_be_bytes(out[l4 + 12..l4 + 16].try_into().expect("4 bytes"));
    let mut want = expected_challenge(other, server, 41004, SYN_PORT, ck);
    want.splice(12..12, [0x81, 0x00, 0x00, 10]);
    assert!(
        out == want,
        "tagged challenge bytes differ\ngot:\n{}\nwant:\n{}",
        hex(&out),
        hex(&want)
    );

    // Frames sluice does not answer: IPv4 options, IPv6 extension headers.
    let odd = if v4 {
        Frame::ip(other, server).ipv4_options(&[1, 1, 1, 0])
    } else {
        Frame::ip(other, server).ext(ExtHeader::DestOpts { len_units: 0 })
    }
    .tcp(41002, SYN_PORT)
    .build();
    let s3 = stats(&sb);
    step(
        &sb,
        "SYN with IP options / ext headers",
        &odd,
        XDP_DROP,
        (Drop, SynDefence),
    );
    assert_eq!(
        stats(&sb)[stat::SYN_CHALLENGES as usize],
        s3[stat::SYN_CHALLENGES as usize]
    );

    // Audit mode (policy-wide): passed as audit, not rewritten, not counted
    // as a challenge.
    set_audit(&sb, true);
    let probe = syn(other, 41003);
    let out = step(&sb, "policy audit", &probe, XDP_PASS, (Audit, SynDefence));
    assert_eq!(out, probe, "audit mode must not rewrite the SYN");
    set_audit(&sb, false);
    step(&sb, "audit off again", &probe, XDP_TX, (Drop, SynDefence));

    // Audit on the rule itself.
    let rules = set_rules(&sb, &["audit syn-guard 1/s burst 1 tcp dport 80"]);
    exhaust(&sb, rules[0].stats_slot);
    let out = step(&sb, "rule audit", &probe, XDP_PASS, (Audit, SynDefence));
    assert_eq!(out, probe, "an audit rule must not rewrite the SYN");
    assert_eq!(
        stats(&sb)[stat::SYN_CHALLENGES as usize],
        s3[stat::SYN_CHALLENGES as usize] + 1,
        "only the SYN after audit was turned off was answered"
    );

    // An answer that arrives while the policy is in audit mode verifies the
    // source but is passed (as audit), not consumed.
    let rules = set_rules(&sb, &["syn-guard 1/s burst 1 tcp dport 80"]);
    exhaust(&sb, rules[0].stats_slot);
    let out = step(
        &sb,
        "challenge before audit",
        &syn(other, 41005),
        XDP_TX,
        (Drop, SynDefence),
    );
    let ck = u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().expect("4 bytes"));
    set_audit(&sb, true);
    let verified = stats(&sb)[stat::SYN_VERIFIED as usize];
    let answer = tcp_frame(other, server, 41005, TCP_RST, ck).build();
    step(
        &sb,
        "answer in audit mode",
        &answer,
        XDP_PASS,
        (Audit, SynDefence),
    );
    assert_eq!(stats(&sb)[stat::SYN_VERIFIED as usize], verified + 1);
    set_audit(&sb, false);
}

/// A new rule that gets the stats slot of a deleted one starts with fresh
/// buckets: shared ones are reset, per-source ones are keyed by rule id.
#[test]
fn a_reused_rule_slot_starts_with_fresh_buckets() {
    let sb = new_sandbox();
    for text in [
        "limit 1/s burst 1 udp dport 9000",
        "limit 1/s burst 1 per-source udp dport 9000",
    ] {
        let first = set_rules(&sb, &[text]);
        let frame = udp4(A4);
        let before = counters(&sb);
        sb.run_repeat(&frame, 3).expect("test_run");
        let d = delta(&before, &counters(&sb));
        assert_eq!(
            packets(&d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit),
            2,
            "{text}: the first rule's bucket did not fill: {d:?}"
        );
        // Replace the rule by an equal one: it reuses slot 0 under a new id.
        set_rules(&sb, &[]);
        let second = set_rules(&sb, &[text]);
        assert_eq!(second[0].stats_slot, first[0].stats_slot, "{text}");
        assert_ne!(second[0].id, first[0].id, "{text}");
        let before = counters(&sb);
        sb.run(&frame).expect("test_run");
        let d = delta(&before, &counters(&sb));
        assert_eq!(
            packets(&d, Family::V4, L4::Udp, Verdict::Pass, Reason::Default),
            1,
            "{text}: the new rule inherited the deleted rule's bucket: {d:?}"
        );
        set_rules(&sb, &[]);
    }
}

#[test]
fn syn_guard_challenge_and_answer_v4() {
    syn_guard_exchange(A4.into(), B4.into(), C4.into());
}

#[test]
fn syn_guard_challenge_and_answer_v6() {
    syn_guard_exchange(A6.into(), B6.into(), C6.into());
}

// ---------------------------------------------------------------------------
// New-source cap
// ---------------------------------------------------------------------------

#[test]
fn new_source_cap_keeps_known_sources() {
    let sb = new_sandbox();
    let cur = runtime::ddos_config(sb.root()).expect("DDOS_CONFIG");
    let (interval, tolerance) = sluice_common::settings::gcra(50, 50);
    runtime::set_ddos_config(
        sb.root(),
        &DdosConfig {
            new_source_interval_ns: interval,
            new_source_tolerance_ns: tolerance,
            ..cur
        },
    )
    .expect("set DDOS_CONFIG");
    assert_eq!(
        runtime::ddos_config(sb.root())
            .expect("DDOS_CONFIG")
            .verified_ttl_ns,
        cur.verified_ttl_ns
    );
    let rules = set_rules(&sb, &["limit 100/s burst 10 per-source udp dport 9000"]);
    let known = Ipv4Addr::new(198, 18, 0, 7);
    let pass = |d: &_| packets(d, Family::V4, L4::Udp, Verdict::Pass, Reason::Default);
    let limited = |d: &_| packets(d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit);
    let map_full = |d: &_| packets(d, Family::V4, L4::Udp, Verdict::Drop, Reason::MapFull);

    assert_eq!(sb.run(&udp4(known)).expect("test_run").action, XDP_PASS);
    assert_eq!(stats(&sb)[stat::SRC_INSERTED as usize], 1);
    // Let the known source's bucket fill up again (10 at 100/s).
    thread::sleep(Duration::from_millis(150));

    // 5000 new sources, one packet each, back to back.
    const FLOOD: u32 = 5000;
    let flood: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| udp4(Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect();
    let before = counters(&sb);
    let t0 = Instant::now();
    for f in &flood {
        sb.run(f).expect("test_run");
    }
    let flood_time = t0.elapsed();
    let d = delta(&before, &counters(&sb));
    let st = stats(&sb);
    let (inserted, capped) = (
        st[stat::SRC_INSERTED as usize] - 1,
        st[stat::SRC_CAPPED as usize],
    );
    println!(
        "flood of {FLOOD} sources in {flood_time:?}: {inserted} buckets, {capped} capped, \
         {} passed, {} map-full",
        pass(&d),
        map_full(&d)
    );
    assert_eq!(
        inserted + capped,
        u64::from(FLOOD),
        "every new source is counted once"
    );
    let cap = 50.0 + 50.0 * flood_time.as_secs_f64() + 1.0;
    assert!(
        (inserted as f64) <= cap,
        "{inserted} buckets created in {flood_time:?} against a cap of 50/s burst 50"
    );
    assert!(capped > 0, "the cap refused no source");
    assert!(
        map_full(&d) > 0,
        "no flood packet was dropped as map-full: {d:?}"
    );
    // The capped sources share one bucket of the rule's rate (100/s burst 10).
    let overflow_cap = 10.0 + 100.0 * flood_time.as_secs_f64() + 1.0;
    assert!(
        (pass(&d) as f64) <= inserted as f64 + overflow_cap,
        "too many passed: {d:?}"
    );
    assert_eq!(pass(&d) + map_full(&d), u64::from(FLOOD), "{d:?}");
    assert_eq!(limited(&d), 0, "{d:?}");

    // The known source kept its own bucket...
    let buckets: HashMap<MapData, SrcKey, Bucket> =
        HashMap::try_from(map(&sb, map_names::SRC_BUCKETS)).expect("SRC_BUCKETS");
    let key = src_key(rules[0].id, IpAddr::V4(known));
    let b = buckets
        .get(&key, 0)
        .unwrap_or_else(|e| panic!("the known source lost its bucket ({key:?}): {e}"));
    assert!(b.tat_ns > 0, "{b:?}");

    // ... and its own rate: its burst of 10 passes right after the flood
    // drained the shared overflow bucket, and what is over is rate-limit
    // (its own bucket), not map-full (the overflow's).
    let before = counters(&sb);
    let frame = udp4(known);
    let t = Instant::now();
    let passed = (0..20)
        .filter(|_| sb.run(&frame).expect("test_run").action == XDP_PASS)
        .count() as u64;
    // One more token every 10 ms, should the test be held up meanwhile.
    let refill = (t.elapsed().as_secs_f64() * 100.0).ceil() as u64;
    let d = delta(&before, &counters(&sb));
    assert!(
        (10..=10 + refill).contains(&passed),
        "known source: {passed} of 20 passed back to back; its burst is 10 ({d:?})"
    );
    assert_eq!(pass(&d), passed, "{d:?}");
    assert_eq!(limited(&d), 20 - passed, "{d:?}");
    assert_eq!(
        map_full(&d),
        0,
        "the known source went to the overflow bucket: {d:?}"
    );
    assert_eq!(
        stats(&sb)[stat::SRC_CAPPED as usize],
        capped,
        "a known source is not a new one"
    );
}

// ---------------------------------------------------------------------------
// Escalation
// ---------------------------------------------------------------------------

fn read_escalations(sb: &Sandbox) -> Vec<Escalation> {
    let mut ring = runtime::open_ring(sb.root(), map_names::EVENTS).expect("EVENTS");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(
            item.len(),
            std::mem::size_of::<Escalation>(),
            "EVENTS record size"
        );
        // SAFETY: the record is exactly one Escalation, a plain-integer repr(C) struct.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Escalation>()) });
    }
    out
}

#[test]
fn escalation_reports_a_source_over_its_limit_once() {
    let sb = new_sandbox();
    let rules = set_rules(
        &sb,
        &["limit 100/s burst 10 per-source /24 /64 escalate 500ms ttl 90s udp dport 9000"],
    );
    let over = udp4(Ipv4Addr::new(198, 18, 7, 33));
    let under = udp4(Ipv4Addr::new(198, 18, 8, 44));

    // 1000/s from one source (ten times its limit) and 50/s from another.
    // The first report is due 0.5 s into the run of over-limit packets, a
    // repeat not before 1 s after that: sending stops 1.2 s after the first
    // over-limit packet (bounded at 5 s if none comes).
    let start = boot_ns();
    let mut sent: Vec<u64> = Vec::new();
    let mut first_drop: Option<u64> = None;
    let mut under_dropped = 0;
    pace(1000, Duration::from_secs(5), || {
        let t = boot_ns();
        if first_drop.is_some_and(|f| t >= f + 1_200_000_000) {
            return false;
        }
        sent.push(t);
        if sb.run(&over).expect("test_run").action != XDP_PASS && first_drop.is_none() {
            first_drop = Some(t);
        }
        if sent.len() % 20 == 1 && sb.run(&under).expect("test_run").action != XDP_PASS {
            under_dropped += 1;
        }
        true
    });
    assert_eq!(under_dropped, 0, "the source under its limit was limited");
    let first_t = first_drop.expect("the source over its limit was never limited");

    let events = read_escalations(&sb);
    assert_eq!(events.len(), 1, "escalations: {events:#?}");
    let e = events[0];
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[198, 18, 7, 0]);
    assert_eq!(
        (e.rule_id, e.family, e.addr, e.prefix_len, e.ttl_s),
        (rules[0].id, 4, addr, 24, 90),
        "{e:#?}"
    );
    // Reported by the first packet sent 0.5 s after the first over-limit
    // one (the kernel reads its clock a little after the test does: the
    // packet after that at the latest).
    let due = first_t + 500_000_000;
    let k = sent
        .iter()
        .position(|t| *t >= due)
        .expect("sent for 0.5 s over the limit");
    let latest = sent.get(k + 2).copied().unwrap_or(u64::MAX);
    let after_ms = |t: u64| t.saturating_sub(first_t) as f64 / 1e6;
    assert!(
        e.ts_ns >= due && e.ts_ns < latest,
        "reported {:.1} ms after the first over-limit packet; due at 500 ms, by {:.1} ms",
        after_ms(e.ts_ns),
        after_ms(latest)
    );
    assert!(
        e.over_for_ms >= 500 && f64::from(e.over_for_ms) <= after_ms(e.ts_ns),
        "over_for_ms {} (reported {:.1} ms after the first over-limit packet)",
        e.over_for_ms,
        after_ms(e.ts_ns)
    );
    // So within the first second, unless the test itself was held up.
    let max_gap = sent[..=k]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);
    let in_first_second = e.ts_ns - start < 1_000_000_000;
    assert!(
        in_first_second || max_gap > 100_000_000,
        "reported {:.1} ms after the start",
        (e.ts_ns - start) as f64 / 1e6
    );
    if !in_first_second {
        println!("the test was held up (gap {max_gap} ns): report after the first second");
    }
    let st = stats(&sb);
    assert_eq!(
        (
            st[stat::ESCALATIONS as usize],
            st[stat::ESCALATIONS_LOST as usize]
        ),
        (1, 0)
    );
}

/// A run of over-limit packets that another CPU started with a later clock
/// reading than this packet's must not look endless (an unsigned
/// underflow once reported such a source at once).
#[test]
fn a_later_run_start_does_not_escalate_at_once() {
    let sb = new_sandbox();
    let rules = set_rules(
        &sb,
        &["limit 10/s burst 1 per-source escalate 10s ttl 60s udp dport 9000"],
    );
    let ahead = boot_ns() + 1_000_000_000;
    let mut buckets: aya::maps::HashMap<MapData, SrcKey, Bucket> =
        aya::maps::HashMap::try_from(map(&sb, map_names::SRC_BUCKETS)).expect("SRC_BUCKETS");
    let key = src_key(rules[0].id, IpAddr::V4(A4));
    let b = Bucket {
        tat_ns: ahead + 3600 * 1_000_000_000,
        over_since_ns: ahead,
        last_over_ns: ahead,
        reported_ns: 0,
    };
    buckets.insert(key, b, 0).expect("write SRC_BUCKETS");
    let before = counters(&sb);
    sb.run(&udp4(A4)).expect("test_run");
    let d = delta(&before, &counters(&sb));
    assert_eq!(
        packets(&d, Family::V4, L4::Udp, Verdict::Drop, Reason::RateLimit),
        1,
        "{d:?}"
    );
    assert!(
        read_escalations(&sb).is_empty(),
        "a source over its limit for no time was escalated"
    );
}
