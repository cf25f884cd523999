//! Flow records end to end: the kernel samples packets into the FLOWS ring,
//! the agent reads it, and `sluice flows` (recent, filtered, followed, top)
//! shows exactly the packets that went through. Plus back-pressure: a reader
//! that stalls loses records (counted) and never changes a verdict.
//!
//! Needs root and bpffs. The agent tests run in a [`Lab`] (namespaces A and
//! B joined by a veth pair; the agent keeps sluice attached on B's end) with
//! their own state directory, socket, config and pin root ([`AgentEnv`]);
//! the back-pressure test drives the program with BPF_PROG_TEST_RUN in a
//! [`Sandbox`](sluice::dataplane::sandbox::Sandbox). Guards remove
//! everything on failure too.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde_json::Value;
use sluice::dataplane::{Change, flows::FlowRing, policy::list_for, runtime, sandbox};
use sluice_common::{Family, FlowConfig, FlowRecord, L4, Reason, Verdict, counter_index, stat};

use crate::support::{
    agent::{
        AgentEnv, AgentProc, api_get, free_port, interface_toml, policy_toml, sample, scrape,
        stderr, stdout,
    },
    cli::expect_one_line_error,
    frames::Frame,
    kernel::new_sandbox,
    netns::{Child, Lab, Netns},
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Polls `f` every 50 ms until it holds; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A `[flows]` table.
fn flows_toml(sample: u32, rate_cap: u64, burst: Option<u64>) -> String {
    let burst = burst.map(|b| format!("burst = {b}\n")).unwrap_or_default();
    format!(
        "\n[flows]\nsample_pass = {sample}\nsample_drop = {sample}\nsample_audit = {sample}\nrate_cap = {rate_cap}\n{burst}"
    )
}

/// `flows stats --json`.
fn flow_stats(env: &AgentEnv) -> Value {
    env.cli_json(&["flows", "stats", "--json"])
}

fn stat_u64(s: &Value, key: &str) -> u64 {
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("flows stats has no numeric {key}: {s}"))
}

/// Waits until the agent holds the ring and the kernel samples as configured.
fn wait_reading(env: &AgentEnv) {
    wait_until(
        "the agent reads flow records",
        Duration::from_secs(10),
        || {
            let s = flow_stats(env);
            s["reading"] == true && s["applied"] == true
        },
    );
}

/// `flows --json ARGS...` (all that are held unless ARGS limit them): the
/// records, one JSON object per line.
fn records(env: &AgentEnv, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["flows", "--json"];
    if !args.contains(&"--limit") {
        all.extend(["--limit", "10000"]);
    }
    all.extend_from_slice(args);
    let out = env.cli_ok(&all);
    stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("flows --json line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// A flow's (source, source port, destination, destination port).
type Tuple = (IpAddr, u16, IpAddr, u16);

fn tuple_of(r: &Value) -> Option<Tuple> {
    let addr = |k: &str| r[k].as_str()?.parse::<IpAddr>().ok();
    let port = |k: &str| r[k].as_u64().and_then(|p| u16::try_from(p).ok());
    Some((addr("src")?, port("sport")?, addr("dst")?, port("dport")?))
}

/// One test flow: `count` UDP datagrams of `payload` bytes.
#[derive(Debug, Clone, Copy)]
struct Flow {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    count: u64,
    payload: usize,
    /// Prefix length of the deny entry that drops it.
    denied: Option<u64>,
}

impl Flow {
    fn tuple(&self) -> Tuple {
        (self.src, self.sport, self.dst, self.dport)
    }

    /// Ethernet + IP + UDP + payload, as the program sees the frame.
    fn frame_len(&self) -> u64 {
        let ip = if self.src.is_ipv4() { 20 } else { 40 };
        (14 + ip + 8 + self.payload) as u64
    }

    fn bytes(&self) -> u64 {
        self.count * self.frame_len()
    }
}

/// Sends every flow's datagrams from namespace `a`, 1 ms apart (the veth
/// never has to drop one).
fn send(a: &Netns, flows: &[Flow]) {
    let flows = flows.to_vec();
    a.run(move || {
        for f in &flows {
            let sock = UdpSocket::bind(SocketAddr::new(f.src, f.sport))
                .unwrap_or_else(|e| panic!("bind {}:{}: {e}", f.src, f.sport));
            let payload = vec![0x5a; f.payload];
            for _ in 0..f.count {
                sock.send_to(&payload, SocketAddr::new(f.dst, f.dport))
                    .expect("send_to");
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
}

fn mac(ns: &Netns, ifname: &str) -> String {
    let out = ns.exec_ok(["cat", &format!("/sys/class/net/{ifname}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Permanent neighbour entries both ways, so no ARP or neighbour discovery
/// runs during a test: the only IP packets B receives are the test's own.
fn static_neighbours(lab: &Lab, a_addrs: &[IpAddr]) {
    let (a_mac, b_mac) = (mac(&lab.a, &lab.a_if), mac(&lab.b, &lab.b_if));
    for addr in [IpAddr::V4(lab.b_v4), IpAddr::V6(lab.b_v6)] {
        lab.a.exec_ok([
            "ip",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &b_mac,
            "dev",
            &lab.a_if,
            "nud",
            "permanent",
        ]);
    }
    for addr in a_addrs {
        lab.b.exec_ok([
            "ip",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &a_mac,
            "dev",
            &lab.b_if,
            "nud",
            "permanent",
        ]);
    }
}

/// UDP sockets bound in `b` on the flows' destination ports (kept open so B
/// answers nothing with ICMP).
fn receivers(b: &Netns, flows: &[Flow]) -> Vec<UdpSocket> {
    let ends: Vec<SocketAddr> = flows
        .iter()
        .map(|f| SocketAddr::new(f.dst, f.dport))
        .collect();
    b.run(move || {
        ends.iter()
            .map(|e| UdpSocket::bind(e).unwrap_or_else(|err| panic!("bind {e}: {err}")))
            .collect()
    })
}

/// A `sluice flows --follow --json ...` process and the lines it printed.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Follower {
    fn start(env: &AgentEnv, args: &[&str]) -> Follower {
        let mut cmd = env.cli_cmd(None, &[&["flows", "--follow", "--json"][..], args].concat());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = Child::spawn(&mut cmd);
        let out = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Follower {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn records(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
            .collect()
    }

    fn stop(mut self) -> Vec<Value> {
        self.child.kill_and_wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.records()
    }
}

// ---------------------------------------------------------------------------
// Exactly the packets sent, at 1:1 sampling
// ---------------------------------------------------------------------------

#[test]
fn every_packet_is_recorded_once_filtered_followed_and_ranked() {
    let lab = Lab::new("flows");
    let env = AgentEnv::new("flows");
    let x = lab.x;
    // Two more sources in A, each inside a deny prefix.
    let denied_v4 = Ipv4Addr::new(198, 18, x, 10);
    let denied_v6 = Ipv6Addr::new(0x2001, 2, 0, u16::from(x), 0, 0, 0, 0x10);
    lab.a.exec_ok([
        "ip",
        "addr",
        "add",
        &format!("{denied_v4}/24"),
        "dev",
        &lab.a_if,
    ]);
    lab.a.exec_ok([
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{denied_v6}/64"),
        "dev",
        &lab.a_if,
        "nodad",
    ]);
    let deny_v4 = format!("198.18.{x}.8/30");
    let deny_v6 = format!("2001:2:0:{x:x}::10/124");
    let (a4, a6, b4, b6) = (
        IpAddr::V4(lab.a_v4),
        IpAddr::V6(lab.a_v6),
        IpAddr::V4(lab.b_v4),
        IpAddr::V6(lab.b_v6),
    );
    let (d4, d6) = (IpAddr::V4(denied_v4), IpAddr::V6(denied_v6));
    static_neighbours(&lab, &[a4, a6, d4, d6]);
    let flow = |src, sport, dst, dport, count, payload, denied| Flow {
        src,
        sport,
        dst,
        dport,
        count,
        payload,
        denied,
    };
    // Packets: B 25 > C 20 > A2 18 > D 15 > A1 12.
    // Bytes:   D 3930 > C 1440 > B 1300 > A2 936 > A1 624.
    let a1 = flow(a4, 40001, b4, 7001, 12, 10, None);
    let a2 = flow(a4, 40002, b4, 7002, 18, 10, None);
    let fb = flow(d4, 40003, b4, 7003, 25, 10, Some(30));
    let fc = flow(a6, 40004, b6, 7004, 20, 10, None);
    let fd = flow(d6, 40005, b6, 7005, 15, 200, Some(124));
    let all = [a1, a2, fb, fc, fd];
    let _sinks = receivers(&lab.b, &all);

    env.write_config(&format!(
        "{}{}{}",
        interface_toml(&lab.b, &lab.b_if),
        policy_toml("pass", &[], &[deny_v4.as_str(), deny_v6.as_str()]),
        flows_toml(1, 0, None)
    ));
    let _agent = AgentProc::start(&env, &[]);
    wait_reading(&env);

    let follower = Follower::start(&env, &["--src", &format!("198.18.{x}.0/24")]);
    wait_until(
        "the follower is subscribed",
        Duration::from_secs(10),
        || stat_u64(&flow_stats(&env), "followers") >= 1,
    );

    send(&lab.a, &all);

    let ours = |recs: &[Value]| -> BTreeMap<Tuple, Vec<Value>> {
        let mut m: BTreeMap<Tuple, Vec<Value>> = BTreeMap::new();
        for r in recs {
            if r["protocol"] == "udp"
                && let Some(t) = tuple_of(r)
                && all.iter().any(|f| f.tuple() == t)
            {
                m.entry(t).or_default().push(r.clone());
            }
        }
        m
    };
    let total: u64 = all.iter().map(|f| f.count).sum();
    let count = |m: &BTreeMap<Tuple, Vec<Value>>| m.values().map(Vec::len).sum::<usize>() as u64;
    wait_until(
        "every packet sent shows up in `sluice flows`",
        Duration::from_secs(10),
        || count(&ours(&records(&env, &[]))) >= total,
    );
    // Nothing more arrives late.
    thread::sleep(Duration::from_millis(300));
    let got = ours(&records(&env, &[]));
    for f in &all {
        let recs = got
            .get(&f.tuple())
            .unwrap_or_else(|| panic!("no records for {f:?}"));
        assert_eq!(recs.len() as u64, f.count, "records of {f:?}");
        for r in recs {
            let (verdict, reason) = match f.denied {
                Some(_) => ("drop", "deny-list"),
                None => ("pass", "default"),
            };
            assert_eq!(r["verdict"], verdict, "{r}");
            assert_eq!(r["reason"], reason, "{r}");
            assert_eq!(r["prefix_len"].as_u64(), f.denied, "{r}");
            assert_eq!(r["len"].as_u64(), Some(f.frame_len()), "{r}");
            assert_eq!(r["sample"], 1, "{r}");
            assert_eq!(r["proto"], 17, "{r}");
            assert_eq!(r["interface"], lab.b_if.as_str(), "{r}");
            let family = if f.src.is_ipv4() { "ipv4" } else { "ipv6" };
            assert_eq!(r["family"], family, "{r}");
        }
    }
    assert_eq!(count(&got), total, "{got:#?}");

    // Filters return exactly the matching subset.
    let drops = records(&env, &["--verdict", "drop"]);
    assert!(drops.iter().all(|r| r["verdict"] == "drop"), "{drops:?}");
    let drops: BTreeMap<Tuple, u64> = ours(&drops)
        .into_iter()
        .map(|(t, v)| (t, v.len() as u64))
        .collect();
    assert_eq!(
        drops,
        BTreeMap::from([(fb.tuple(), fb.count), (fd.tuple(), fd.count)])
    );
    let from_denied = records(&env, &["--src", &deny_v4]);
    let prefix: IpNet = deny_v4.parse().unwrap();
    assert!(
        from_denied
            .iter()
            .all(|r| prefix.contains(&r["src"].as_str().unwrap().parse::<IpAddr>().unwrap())),
        "{from_denied:?}"
    );
    let from_denied = ours(&from_denied);
    assert_eq!(from_denied.len(), 1);
    assert_eq!(from_denied[&fb.tuple()].len() as u64, fb.count);
    let by_port = records(&env, &["--port", "40004"]);
    assert_eq!(by_port.len() as u64, fc.count, "{by_port:?}");
    assert!(by_port.iter().all(|r| tuple_of(r) == Some(fc.tuple())));
    let d_only = records(
        &env,
        &["--reason", "deny-list", "--dst", &lab.b_v6.to_string()],
    );
    assert_eq!(ours(&d_only).len(), 1);
    assert_eq!(d_only.len() as u64, fd.count, "{d_only:?}");
    let last = records(&env, &["--src", &denied_v4.to_string(), "--limit", "3"]);
    assert_eq!(last.len(), 3);
    let seqs: Vec<u64> = last.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "newest last: {seqs:?}"
    );

    // A readable line per record.
    let text = env.cli_ok(&["flows", "--src", &denied_v4.to_string(), "--limit", "1"]);
    let line = stdout(&text);
    for part in [
        format!("{denied_v4}:40003 -> {}:7003", lab.b_v4),
        "udp".into(),
        "drop".into(),
        "deny-list (/30)".into(),
        format!("{}B", fb.frame_len()),
        lab.b_if.clone(),
    ] {
        assert!(line.contains(&part), "{part:?} missing from {line:?}");
    }
    assert_eq!(line.lines().count(), 1, "{line:?}");
    let text = env.cli_ok(&["flows", "--port", "40005", "--limit", "1"]);
    assert!(
        stdout(&text).contains(&format!("[{denied_v6}]:40005 -> [{}]:7005", lab.b_v6)),
        "{}",
        stdout(&text)
    );

    // The follower saw exactly the IPv4 packets.
    let want_v4: u64 = all
        .iter()
        .filter(|f| f.src.is_ipv4())
        .map(|f| f.count)
        .sum();
    wait_until(
        "the follower printed every IPv4 packet",
        Duration::from_secs(10),
        || follower.records().len() as u64 >= want_v4,
    );
    thread::sleep(Duration::from_millis(200));
    let followed = follower.stop();
    assert!(
        followed.iter().all(|r| r.get("lost").is_none()),
        "{followed:?}"
    );
    let followed = ours(&followed);
    for f in all.iter().filter(|f| f.src.is_ipv4()) {
        assert_eq!(followed[&f.tuple()].len() as u64, f.count, "followed {f:?}");
    }
    assert_eq!(count(&followed), want_v4);

    // Top flows, sources and destinations, by packets and by bytes.
    let top = |by: &str| env.cli_json(&["flows", "top", "--json", "--by", by, "--limit", "1000"]);
    let ranked_flows = |t: &Value| -> Vec<(Tuple, u64, u64)> {
        t["flows"]
            .as_array()
            .unwrap_or_else(|| panic!("flows top --json has no flows: {t}"))
            .iter()
            .filter(|r| r["protocol"] == "udp")
            .filter_map(|r| {
                let t = tuple_of(r)?;
                all.iter().any(|f| f.tuple() == t).then(|| {
                    (
                        t,
                        r["packets"].as_u64().unwrap(),
                        r["bytes"].as_u64().unwrap(),
                    )
                })
            })
            .collect()
    };
    let ranked_addrs = |t: &Value, key: &str| -> Vec<(IpAddr, u64, u64)> {
        t[key]
            .as_array()
            .unwrap_or_else(|| panic!("flows top --json has no {key}: {t}"))
            .iter()
            .map(|r| {
                (
                    r["addr"].as_str().unwrap().parse().unwrap(),
                    r["packets"].as_u64().unwrap(),
                    r["bytes"].as_u64().unwrap(),
                )
            })
            .filter(|(a, _, _)| [a4, a6, d4, d6].contains(a))
            .collect()
    };
    let row = |f: &Flow| (f.tuple(), f.count, f.bytes());
    let by_packets = top("packets");
    assert_eq!(by_packets["by"], "packets");
    assert_eq!(
        ranked_flows(&by_packets),
        [row(&fb), row(&fc), row(&a2), row(&fd), row(&a1)]
    );
    let tr = by_packets["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| tuple_of(r) == Some(fb.tuple()))
        .unwrap();
    assert_eq!(tr["verdicts"]["drop"], fb.count);
    assert_eq!(tr["verdicts"]["pass"], 0);
    assert_eq!(tr["sampled"], false);
    let a4_total = (a1.count + a2.count, a1.bytes() + a2.bytes());
    assert_eq!(
        ranked_addrs(&by_packets, "sources"),
        [
            (a4, a4_total.0, a4_total.1),
            (d4, fb.count, fb.bytes()),
            (a6, fc.count, fc.bytes()),
            (d6, fd.count, fd.bytes()),
        ]
    );
    let by_bytes = top("bytes");
    assert_eq!(
        ranked_flows(&by_bytes),
        [row(&fd), row(&fc), row(&fb), row(&a2), row(&a1)]
    );
    assert_eq!(
        ranked_addrs(&by_bytes, "sources"),
        [
            (d6, fd.count, fd.bytes()),
            (a4, a4_total.0, a4_total.1),
            (a6, fc.count, fc.bytes()),
            (d4, fb.count, fb.bytes()),
        ]
    );
    let drop_top = env.cli_json(&["flows", "top", "--json", "--verdict", "drop"]);
    assert_eq!(ranked_flows(&drop_top), [row(&fb), row(&fd)]);
    let dests = ranked_addrs(&by_packets, "destinations");
    assert!(
        dests.is_empty(),
        "destinations are B's addresses: {dests:?}"
    );
    let dst_rows: Vec<(String, u64)> = by_packets["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["addr"].as_str().unwrap().to_owned(),
                r["packets"].as_u64().unwrap(),
            )
        })
        .filter(|(a, _)| *a == lab.b_v4.to_string() || *a == lab.b_v6.to_string())
        .collect();
    assert_eq!(
        dst_rows,
        [
            (lab.b_v4.to_string(), a1.count + a2.count + fb.count),
            (lab.b_v6.to_string(), fc.count + fd.count),
        ]
    );
    let text = stdout(&env.cli_ok(&["flows", "top"]));
    assert!(text.contains("Top flows by packets"), "{text}");
    assert!(text.contains("Top sources by packets"), "{text}");

    // The API refuses bad values with the valid ones named.
    let (code, body) = api_get(&env.socket, "/v1/flows?verdict=nope").expect("API answers");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("valid: pass, drop, audit"), "{body}");
    let (code, body) = api_get(&env.socket, "/v1/flows/top?reason=rule").expect("API answers");
    assert_eq!(code, 400, "{body}");
}

// ---------------------------------------------------------------------------
// Bad values, no agent
// ---------------------------------------------------------------------------

#[test]
fn bad_values_and_a_missing_agent_are_one_line_errors() {
    let env = AgentEnv::new("flows-cli");
    for (args, needle) in [
        (
            &["flows", "--verdict", "deny"][..],
            "unknown verdict 'deny' (valid: pass, drop, audit)",
        ),
        (
            &["flows", "--reason", "nope"][..],
            "(valid: default, allow-list, deny-list, rule, malformed, not-ip, rate-limit, \
             syn-defence, map-full, no-backend, vip-fragment, steer)",
        ),
        (
            &["flows", "--src", "198.18.0.0/33"][..],
            "'198.18.0.0/33' is not a CIDR or an address",
        ),
        (&["flows", "--dst", "nonsense"][..], "is not a CIDR"),
        (&["flows", "--port", "70000"][..], "'70000' is not a port"),
        (&["flows", "--limit", "0"][..], "is not a limit (1-10000)"),
        (
            &["flows", "top", "--by", "flows"][..],
            "unknown ranking 'flows' (valid: packets, bytes)",
        ),
        (
            &["flows", "top", "--reason", "rule"][..],
            "--reason does not apply to the top flows",
        ),
        (
            &["flows", "--verdict", "drop"][..],
            "flow records are read by the agent",
        ),
        (&["flows", "top"][..], "no agent is running at"),
    ] {
        let out = env.cli(args);
        let line = expect_one_line_error(&format!("sluice {args:?}"), &out);
        assert!(line.contains(needle), "{args:?}: {line:?} lacks {needle:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
    }
}

// ---------------------------------------------------------------------------
// Back-pressure: a stalled reader
// ---------------------------------------------------------------------------

fn kernel_stats(sb: &sandbox::Sandbox) -> [u64; stat::SLOTS as usize] {
    runtime::stats(sb.root()).expect("read STATS")
}

fn one_in_one(cap: (u64, u64)) -> FlowConfig {
    FlowConfig {
        sample: [1, 1, 1, 0],
        cap_interval_ns: cap.0,
        cap_tolerance_ns: cap.1,
    }
}

/// Reads every record left in the sandbox's ring.
fn drain(sb: &sandbox::Sandbox) -> Vec<FlowRecord> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ring = FlowRing::open(sb.root()).expect("open the flow ring");
        let mut out = Vec::new();
        while ring.drain_now(4096, &mut out) > 0 {}
        assert_eq!(ring.short, 0);
        out
    })
}

#[test]
fn a_full_ring_loses_records_counted_and_never_a_verdict() {
    let sb = new_sandbox();
    let mut maps = sb.policy().expect("policy maps");
    let deny: IpNet = "198.18.200.0/24".parse().unwrap();
    maps.commit(Change {
        add: vec![(list_for(false, &deny), deny)],
        ..Change::default()
    })
    .expect("deny add");
    runtime::set_flow_config(sb.root(), &one_in_one((0, 0))).expect("flow config");

    let passed = Frame::v4(
        Ipv4Addr::new(198, 18, 201, 1),
        Ipv4Addr::new(198, 18, 201, 2),
    )
    .udp(1000, 53)
    .build();
    let dropped = Frame::v4(
        Ipv4Addr::new(198, 18, 200, 1),
        Ipv4Addr::new(198, 18, 201, 2),
    )
    .udp(1001, 53)
    .build();
    // About 52,000 records fit the 4 MiB ring: nobody reads, so it fills.
    const PASSED: u32 = 40_000;
    const DROPPED: u32 = 30_000;
    let r = sb.run_repeat(&passed, PASSED).expect("test run");
    assert_eq!(r.action, sandbox::XDP_PASS);
    let r = sb.run_repeat(&dropped, DROPPED).expect("test run");
    assert_eq!(r.action, sandbox::XDP_DROP);

    let counters = maps.counters().expect("counters");
    let slot = |v, reason| counters[counter_index(Family::V4, L4::Udp, v, reason) as usize].packets;
    assert_eq!(slot(Verdict::Pass, Reason::Default), u64::from(PASSED));
    assert_eq!(slot(Verdict::Drop, Reason::DenyList), u64::from(DROPPED));
    let s = kernel_stats(&sb);
    let (written, lost_ring, lost_cap) = (
        s[stat::FLOWS as usize],
        s[stat::FLOWS_LOST_RING as usize],
        s[stat::FLOWS_LOST_CAP as usize],
    );
    assert_eq!(written + lost_ring, u64::from(PASSED + DROPPED), "{s:?}");
    assert!(lost_ring > 0, "the ring should have filled: {s:?}");
    assert_eq!(lost_cap, 0);

    // The ring holds exactly what was written, in order, each record right.
    let recs = drain(&sb);
    assert_eq!(recs.len() as u64, written);
    for (i, r) in recs.iter().enumerate() {
        let (verdict, reason, sport) = if i < PASSED as usize {
            (Verdict::Pass, Reason::Default, 1000)
        } else {
            (Verdict::Drop, Reason::DenyList, 1001)
        };
        assert_eq!(
            (r.verdict, r.reason, r.sport, r.dport, r.proto, r.sample),
            (verdict as u8, reason as u8, sport, 53, 17, 1),
            "record {i}: {r:?}"
        );
        if verdict == Verdict::Drop {
            assert_eq!(r.matched, 24, "deny entry's prefix length");
        }
    }
    // Read, the ring takes records again.
    sb.run_repeat(&dropped, 100).expect("test run");
    let s2 = kernel_stats(&sb);
    assert_eq!(s2[stat::FLOWS as usize], written + 100);
    assert_eq!(s2[stat::FLOWS_LOST_RING as usize], lost_ring);
    assert_eq!(drain(&sb).len(), 100);
}

#[test]
fn the_rate_cap_limits_records_per_cpu_and_counts_the_rest() {
    let sb = new_sandbox();
    const RATE: u64 = 1000;
    const BURST: u64 = 100;
    runtime::set_flow_config(
        sb.root(),
        &one_in_one(sluice_common::settings::gcra(RATE, BURST)),
    )
    .expect("flow config");
    let frame = Frame::v6(
        "2001:2:0:ff01::1".parse().unwrap(),
        "2001:2:0:ff01::2".parse().unwrap(),
    )
    .udp(1000, 53)
    .build();
    const SENT: u32 = 20_000;
    let started = Instant::now();
    let r = sb.run_repeat(&frame, SENT).expect("test run");
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(r.action, sandbox::XDP_PASS);
    let counters = sb.policy().unwrap().counters().unwrap();
    assert_eq!(
        counters[counter_index(Family::V6, L4::Udp, Verdict::Pass, Reason::Default) as usize]
            .packets,
        u64::from(SENT)
    );
    let s = kernel_stats(&sb);
    let (written, lost_ring, lost_cap) = (
        s[stat::FLOWS as usize],
        s[stat::FLOWS_LOST_RING as usize],
        s[stat::FLOWS_LOST_CAP as usize],
    );
    assert_eq!(written + lost_cap, u64::from(SENT), "{s:?}");
    assert_eq!(lost_ring, 0);
    // Each CPU the run happened on may write its burst plus the rate.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let most = cpus * (BURST as f64 + RATE as f64 * elapsed) + 1.0;
    assert!(
        written >= BURST && (written as f64) <= most,
        "{written} records written in {elapsed:.3} s (burst {BURST}, {RATE}/s, {cpus} CPUs)"
    );
    assert_eq!(drain(&sb).len() as u64, written);
}

/// The agent stalled (SIGSTOP) while a flood arrives: the kernel counts the
/// records the full ring refused, the agent reports them (API and metrics),
/// reads on once resumed; a reload's rate cap is counted too.
#[test]
fn the_agent_reports_records_lost_to_a_full_ring_and_to_the_rate_cap() {
    let lab = Lab::new("flowlost");
    let env = AgentEnv::new("flowlost");
    let x = lab.x;
    let denied = Ipv4Addr::new(198, 18, x, 10);
    lab.a.exec_ok([
        "ip",
        "addr",
        "add",
        &format!("{denied}/24"),
        "dev",
        &lab.a_if,
    ]);
    static_neighbours(&lab, &[IpAddr::V4(lab.a_v4)]);
    let port = free_port();
    let config = |flows: &str| {
        let text = env.config_text(&format!(
            "{}{}{flows}",
            interface_toml(&lab.b, &lab.b_if),
            policy_toml("pass", &[], &[&format!("{denied}/32")]),
        ));
        let text = text.replace(
            "[agent]\n",
            &format!("[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
        );
        env.write_atomically(&env.config, &text);
    };
    config(&flows_toml(1, 0, None));
    let agent = AgentProc::start(&env, &[]);
    wait_reading(&env);

    // Stall the reader and flood: far more drops than the ring holds.
    const FLOOD: u32 = 150_000;
    agent.signal(libc::SIGSTOP);
    let target = SocketAddr::new(IpAddr::V4(lab.b_v4), 9);
    let sent = lab.a.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(denied), 0)).expect("bind");
        let start = Instant::now();
        let mut sent = 0u32;
        while sent < FLOOD && start.elapsed() < Duration::from_secs(20) {
            if sock.send_to(&[0u8; 8], target).is_ok() {
                sent += 1;
            }
        }
        sent
    });
    agent.signal(libc::SIGCONT);
    assert!(sent > 100_000, "only {sent} datagrams sent");

    let s = flow_stats(&env);
    assert!(stat_u64(&s, "lost_ring_full") > 0, "{s}");
    // Once resumed, the agent reads all the kernel wrote.
    wait_until(
        "the agent reads every record written",
        Duration::from_secs(20),
        || {
            let s = flow_stats(&env);
            stat_u64(&s, "records_read") == stat_u64(&s, "records_written")
        },
    );
    let m = scrape(port);
    let lost = sample(&m, "sluice_flow_records_lost_total{cause=\"ring-full\"}").unwrap_or(0.0);
    assert!(lost > 0.0, "{m}");
    let event = sample(
        &m,
        "sluice_events_total{event=\"flow_records_lost_ring_full\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(event, lost, "{m}");
    assert!(
        sample(&m, "sluice_flow_records_read_total").unwrap_or(0.0) > 0.0,
        "{m}"
    );
    assert!(sample(&m, "sluice_flows_tracked").is_some(), "{m}");
    assert!(sample(&m, "sluice_flow_evictions_total").is_some(), "{m}");
    // Verdicts held: every record of the flood says drop, deny-list.
    let flood = records(&env, &["--src", &denied.to_string()]);
    // The agent keeps the newest 10,000 records; nearly all are the flood's.
    assert!(
        (9_000..=10_000).contains(&flood.len()),
        "{} flood records held",
        flood.len()
    );
    assert!(
        flood
            .iter()
            .all(|r| r["verdict"] == "drop" && r["reason"] == "deny-list"),
        "a flood record with another verdict"
    );

    // It reads on: new packets show up.
    let probe = Flow {
        src: IpAddr::V4(lab.a_v4),
        sport: 41000,
        dst: IpAddr::V4(lab.b_v4),
        dport: 41000,
        count: 5,
        payload: 4,
        denied: None,
    };
    let _sink = receivers(&lab.b, &[probe]);
    send(&lab.a, &[probe]);
    wait_until(
        "the resumed agent records new packets",
        Duration::from_secs(10),
        || records(&env, &["--port", "41000"]).len() == 5,
    );

    // A reload with a tight rate cap: most records of a burst are capped.
    let before = stat_u64(&flow_stats(&env), "lost_rate_cap");
    config(&flows_toml(1, 10, Some(1)));
    wait_until(
        "the reload applies the new cap",
        Duration::from_secs(10),
        || {
            let s = flow_stats(&env);
            s["settings"]["rate_cap"] == 10 && s["applied"] == true
        },
    );
    let burst = Flow {
        sport: 41001,
        dport: 41001,
        count: 200,
        ..probe
    };
    let _sink2 = receivers(&lab.b, &[burst]);
    lab.a.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(burst.src, burst.sport)).expect("bind");
        for _ in 0..burst.count {
            let _ = sock.send_to(&[0u8; 4], SocketAddr::new(burst.dst, burst.dport));
        }
    });
    wait_until(
        "capped records are counted",
        Duration::from_secs(10),
        || stat_u64(&flow_stats(&env), "lost_rate_cap") > before,
    );
    let m = scrape(port);
    assert!(
        sample(&m, "sluice_flow_records_lost_total{cause=\"rate-cap\"}").unwrap_or(0.0) > 0.0,
        "{m}"
    );
    let out = env.cli_ok(&["flows", "stats"]);
    assert!(stdout(&out).contains("lost, rate cap"), "{}", stdout(&out));
    drop(agent);
}
