//! A SYN flood from spoofed sources against a server behind sluice's SYN
//! guard, in network namespaces, while a real client opens 100 connections:
//! at least 95 must complete, and the server's stack must see few of the
//! spoofed SYNs. Needs root, bpffs and iproute2 (`ip`, `tc`).
//!
//! Lab: namespace A (client and flooder) and B (server), joined by a veth
//! pair; sluice attached natively on B's end with `syn-guard 200/s tcp dport
//! PORT` (default pass). The flood is raw Ethernet frames written to A's veth
//! end through an AF_PACKET socket, as fast as one thread can (and the link
//! takes), from random sources that B has no route to; the client is a plain
//! TCP client in A. The client's first SYN is challenged (the flood keeps the
//! guard's rate used up), its stack answers with a reset that verifies it,
//! and its retransmitted SYN and every later one pass.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use sluice::dataplane::{PinRoot as SluiceRoot, PolicyMaps, runtime};
use sluice_common::{Family, L4, Reason, Verdict, counter_index, stat};

use crate::support::{
    cli::sluice,
    frames::Frame,
    kernel::slot_name,
    netns::{Lab, Netns, PacketSocket, PinRoot, link_mac, stack_counter},
};

const PORT: u16 = 7100;
/// The guard's rate: SYNs per second that pass unchallenged.
const GUARD_RATE: u64 = 200;
const CONNECTIONS: u32 = 100;
const MIN_OK: u32 = 95;
/// Limits for one connection attempt and for all of them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// The client starts a connection every 20 ms (if the previous one is done),
/// so its 100 connections span about 2 s of flood.
const SPACING: Duration = Duration::from_millis(20);
/// Hard limit for the flood and the server, whatever happens to the test.
const THREAD_LIMIT: Duration = Duration::from_secs(45);
/// Distinct spoofed SYNs the flood cycles through.
const FLOOD_FRAMES: usize = 16_384;
/// Source MAC of the flood: not A's, so the challenges sluice sends back are
/// addressed to nobody in A and are dropped at A's Ethernet layer.
const FLOOD_MAC: [u8; 6] = [0x02, 0x5f, 0x10, 0x0d, 0x00, 0x01];

/// Sets the flag on drop: the flood and the server stop also when the test
/// panics (their threads are not joined then).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Echo server (a thread in B)
// ---------------------------------------------------------------------------

/// Listens on `PORT` in `ns` and echoes one line per connection until `stop`
/// (or `THREAD_LIMIT`); returns the number of lines echoed. Returns once the
/// listener is bound.
fn echo_server(ns: &Netns, v6: bool, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
    let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let server = ns.spawn(move || {
        let listener = match TcpListener::bind((any, PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return 0;
            }
        };
        listener.set_nonblocking(true).expect("set_nonblocking");
        let _ = ready_tx.send(Ok(()));
        let start = Instant::now();
        let mut echoed = 0;
        while !stop.load(Ordering::Relaxed) && start.elapsed() < THREAD_LIMIT {
            match listener.accept() {
                Ok((s, _)) => echoed += u32::from(echo_line(s)),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
        echoed
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => server,
        Ok(Err(e)) => panic!("echo server: cannot listen on {PORT} in {}: {e}", ns.name()),
        Err(e) => panic!("echo server in {} not ready: {e}", ns.name()),
    }
}

/// Reads one line (at most 256 bytes, 2 s) and writes it back.
fn echo_line(mut s: TcpStream) -> bool {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.ends_with(b"\n") && line.len() < buf.len() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => line.extend_from_slice(&buf[..n]),
        }
    }
    s.write_all(&line).is_ok()
}

// ---------------------------------------------------------------------------
// Client (a thread in A)
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ClientReport {
    ok: u32,
    failures: Vec<String>,
    /// Slowest successful connection (the first one waits for a SYN
    /// retransmission after its challenge).
    slowest: Duration,
    took: Duration,
}

/// `CONNECTIONS` connections to `target`, one after another, `SPACING`
/// apart: connect, send a line, read it back.
fn client(ns: &Netns, target: SocketAddr) -> JoinHandle<ClientReport> {
    ns.spawn(move || {
        let mut r = ClientReport::default();
        let start = Instant::now();
        for i in 0..CONNECTIONS {
            let due = start + SPACING * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            if start.elapsed() > CLIENT_LIMIT {
                r.failures
                    .push(format!("{} not tried: out of time", CONNECTIONS - i));
                break;
            }
            let t = Instant::now();
            match echo_once(target, i) {
                Ok(()) => {
                    r.ok += 1;
                    r.slowest = r.slowest.max(t.elapsed());
                }
                Err(e) => r
                    .failures
                    .push(format!("#{i}: {e} after {:?}", t.elapsed())),
            }
        }
        r.took = start.elapsed();
        r
    })
}

fn echo_once(target: SocketAddr, i: u32) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let msg = format!("hello {i}\n");
    s.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back == msg.as_bytes() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("echo {back:?}")))
    }
}

// ---------------------------------------------------------------------------
// Flood (a thread in A)
// ---------------------------------------------------------------------------

/// SYNs to `server:PORT` from random sources B has no route to (IPv4:
/// 198.18.128.0/17 except the lab's own /24; IPv6: 2001:2:0:ff00::/56, never
/// given to a lab) and random ports, as Ethernet frames to `server_mac`.
fn spoofed_syns(lab: &Lab, v6: bool, server_mac: [u8; 6]) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(u64::from(std::process::id()));
    (0..FLOOD_FRAMES)
        .map(|_| {
            let src: IpAddr = if v6 {
                Ipv6Addr::new(
                    0x2001,
                    2,
                    0,
                    0xff00 | rng.gen_range(0..=0xff),
                    rng.r#gen(),
                    rng.r#gen(),
                    rng.r#gen(),
                    rng.r#gen(),
                )
                .into()
            } else {
                let third = loop {
                    let t = rng.gen_range(128..=255u8);
                    if t != lab.x {
                        break t;
                    }
                };
                Ipv4Addr::new(198, 18, third, rng.gen_range(1..=254)).into()
            };
            let mut f = Frame::ip(src, lab.b_addr(v6))
                .tcp(rng.gen_range(1024..=65535), PORT)
                .build();
            f[..6].copy_from_slice(&server_mac);
            f[6..12].copy_from_slice(&FLOOD_MAC);
            f
        })
        .collect()
}

#[derive(Debug)]
struct FloodReport {
    sent: u64,
    took: Duration,
}

/// Sends `frames` round and round on `ifname` in `ns` until `stop` (or
/// `THREAD_LIMIT`).
fn flood(
    ns: &Netns,
    ifname: &str,
    frames: Vec<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<FloodReport> {
    let ifname = ifname.to_owned();
    ns.spawn(move || {
        let sock = PacketSocket::open(&ifname, false);
        // TC_PRIO_BULK: pfifo_fast's lowest band (see `syn_flood`).
        sock.set_priority(2);
        let start = Instant::now();
        let mut sent = 0u64;
        'outer: loop {
            for chunk in frames.chunks(256) {
                if stop.load(Ordering::Relaxed) || start.elapsed() > THREAD_LIMIT {
                    break 'outer;
                }
                for f in chunk {
                    // A full queue refuses a frame now and then: not sent.
                    sent += u64::from(sock.send(f));
                }
            }
        }
        FloodReport {
            sent,
            took: start.elapsed(),
        }
    })
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

fn syn_flood(v6: bool) {
    // The two tests each run a flood as fast as a core allows; on a small
    // machine two at once (or a flood beside the 6.1 guest) would mostly
    // measure each other.
    let _alone = crate::support::heavy();
    let lab = Lab::new(if v6 { "syn6" } else { "syn4" });
    let pin = PinRoot::new();
    sluice(&pin, &lab.b, &["attach", &lab.b_if, "--mode", "native"]);
    sluice(
        &pin,
        &lab.b,
        &[
            "rule",
            "add",
            "syn-guard",
            &format!("{GUARD_RATE}/s"),
            "tcp",
            "dport",
            &PORT.to_string(),
        ],
    );
    // sluice answers challenges with XDP_TX on B's veth end, which queues
    // the frame on the peer's NAPI ring. GRO on A's end gives it that ring,
    // but veth_xdp_flush() only schedules the peer's NAPI when the peer has
    // an XDP program: with GRO alone the challenges sat in the ring unseen
    // (tried: `xdp_tx` counted on B, nothing arrived in A). So A's end gets
    // an XDP program that passes everything: a second sluice, with its own
    // pins and the default policy (no rules, default pass).
    let pin_a = PinRoot::new();
    // One veth ring (256 frames) carries the flood and the client: a flood
    // written straight into it keeps it full and the client's segments are
    // lost with the flood's, a limit of the lab link rather than anything
    // the SYN guard is about. With a qdisc on A's end the veth pushes back
    // instead of dropping, and pfifo_fast serves the client (priority 0,
    // band 1) before the flood (SO_PRIORITY 2, band 2): the flood still gets
    // every slot the client does not use.
    lab.a.exec_ok([
        "tc",
        "qdisc",
        "replace",
        "dev",
        &lab.a_if,
        "root",
        "pfifo_fast",
    ]);
    sluice(&pin_a, &lab.a, &["attach", &lab.a_if, "--mode", "native"]);
    // Spoofed SYNs the guard lets through reach B's TCP stack, which cannot
    // route an answer to their source and counts them as ListenDrops; make
    // sure reverse-path filtering does not hide them from that count.
    for conf in ["all", "default", lab.b_if.as_str()] {
        lab.b.exec_ok([
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=0"),
        ]);
    }

    let server_mac = link_mac(&lab.b, &lab.b_if);
    let frames = spoofed_syns(&lab, v6, server_mac);
    let root = SluiceRoot::new(pin.path());
    let listen_drops0 = stack_counter(&lab.b, "TcpExt", "ListenDrops");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
    let server = echo_server(&lab.b, v6, Arc::clone(&stop));
    let flooder = flood(&lab.a, &lab.a_if, frames, Arc::clone(&stop));
    // Let the flood use up the guard's rate before the client starts.
    thread::sleep(Duration::from_millis(300));

    let target = SocketAddr::new(lab.b_addr(v6), PORT);
    let report = match client(&lab.a, target).join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    };
    stop.store(true, Ordering::Relaxed);
    let flood = flooder.join().expect("flood thread");
    let echoed = server.join().expect("server thread");

    let listen_drops = stack_counter(&lab.b, "TcpExt", "ListenDrops") - listen_drops0;
    let st = runtime::stats(&root).expect("STATS");
    let challenges = st[stat::SYN_CHALLENGES as usize];
    let verified = st[stat::SYN_VERIFIED as usize];
    let counters = PolicyMaps::open(&root)
        .expect("policy maps")
        .counters()
        .expect("counters");
    let fam = if v6 { Family::V6 } else { Family::V4 };
    let count = |v, r| counters[counter_index(fam, L4::Tcp, v, r) as usize].packets;
    let defence = count(Verdict::Drop, Reason::SynDefence);
    let passed = count(Verdict::Pass, Reason::Default);
    let pps = flood.sent as f64 / flood.took.as_secs_f64();
    println!(
        "{}: {}/{CONNECTIONS} connections in {:?} (slowest {:?}), {echoed} echoed; \
         flood {} SYNs in {:?} ({pps:.0}/s); {challenges} challenges, {verified} verified; \
         {} {defence}, {} {passed}; server ListenDrops {listen_drops}",
        if v6 { "IPv6" } else { "IPv4" },
        report.ok,
        report.took,
        report.slowest,
        flood.sent,
        flood.took,
        slot_name(counter_index(
            fam,
            L4::Tcp,
            Verdict::Drop,
            Reason::SynDefence
        )),
        slot_name(counter_index(fam, L4::Tcp, Verdict::Pass, Reason::Default)),
    );

    assert!(
        report.ok >= MIN_OK,
        "only {} of {CONNECTIONS} connections completed: {:?}",
        report.ok,
        report.failures
    );
    assert!(
        flood.sent >= 10_000,
        "the flood sent only {} SYNs in {:?}",
        flood.sent,
        flood.took
    );
    assert!(verified >= 1, "the client was never verified");
    // Almost every spoofed SYN was answered by sluice rather than passed.
    assert!(
        challenges * 2 >= flood.sent,
        "{challenges} challenges for {} spoofed SYNs",
        flood.sent
    );
    assert!(
        defence >= challenges,
        "{defence} syn-defence drops, {challenges} challenges"
    );
    // What reached the server's stack is about what the guard's rate allows
    // over the flood's duration (plus its burst), a small share of the flood.
    let allowed = GUARD_RATE as f64 * flood.took.as_secs_f64() * 1.2 + 2.0 * GUARD_RATE as f64;
    assert!(
        (listen_drops as f64) <= allowed,
        "{listen_drops} spoofed SYNs reached the server's stack in {:?} (guard {GUARD_RATE}/s)",
        flood.took
    );
    assert!(
        listen_drops * 20 <= challenges,
        "{listen_drops} spoofed SYNs reached the server, {challenges} were challenged"
    );

    sluice(&pin, &lab.b, &["detach", &lab.b_if]);
    sluice(&pin_a, &lab.a, &["detach", &lab.a_if]);
}

#[test]
fn syn_flood_v4_real_client_gets_through() {
    syn_flood(false);
}

#[test]
fn syn_flood_v6_real_client_gets_through() {
    syn_flood(true);
}
