//! The load balancer end to end: a client namespace, an LB namespace running
//! the agent (sluice attached to its client-facing veth), and backend
//! namespaces running real TCP servers. Real connections to the VIP, over
//! IPv4 and IPv6: spread by weight, pinned across a backend add, kept off a
//! drained backend, and moved off a killed backend once health checks see
//! it. A small test of the same paths through the CLI alone is sized for an
//! emulated CPU (the Linux 6.1 tier runs it). Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice::model::lb::maglev;
use sluice_common::{
    addr_words,
    lb::{TABLE_SIZE, flow_hash},
};

use crate::support::{
    agent::{AgentEnv, AgentProc},
    cli::sluice,
    netns::{Netns, PinRoot, ping, wait_links_ready},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
pub(crate) const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 2);
pub(crate) const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10);
pub(crate) const SERVICE_PORT: u16 = 80;
pub(crate) const BACKEND_PORT: u16 = 8080;

pub(crate) fn backend_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 11 + i, 2)
}

pub(crate) fn backend_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 11 + u16::from(i), 0, 0, 0, 2)
}

/// A TCP server in a backend namespace: answers each connection with its
/// name, then echoes lines until the client closes. `stop` closes the
/// listener and every open connection (a killed process).
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, name: &str) -> Server {
        Server::start_on(ns, name, BACKEND_PORT)
    }

    fn start_on(ns: &Netns, name: &str, port: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .expect("bind the backend's port (dual-stack)");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(240);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let name = name.clone();
                        let flag = flag.clone();
                        conns.push(thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                            if writeln!(s, "{name}").is_err() {
                                return;
                            }
                            let mut r = BufReader::new(s.try_clone().expect("clone"));
                            let mut line = String::new();
                            while !flag.load(Ordering::Relaxed) {
                                line.clear();
                                match r.read_line(&mut line) {
                                    Ok(0) => return,
                                    Ok(_) => {
                                        if s.write_all(line.as_bytes()).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                            // Killed: reset rather than close politely.
                            let sock = socket2::SockRef::from(&s);
                            let _ = sock.set_linger(Some(Duration::ZERO));
                        }));
                        conns.retain(|c| !c.is_finished());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("backend server did not start");
        Server {
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Joins two namespaces with a veth pair and addresses both ends.
fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: (Ipv4Addr, Ipv6Addr),
    b: &Netns,
    b_if: &str,
    b_addrs: (Ipv4Addr, Ipv6Addr),
) {
    a.exec_ok([
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    for (ns, ifname, (v4, v6)) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        ns.exec_ok(["ip", "addr", "add", &format!("{v4}/24"), "dev", ifname]);
        ns.exec_ok([
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            ifname,
            "nodad",
        ]);
        ns.exec_ok(["ip", "link", "set", "dev", ifname, "up"]);
    }
}

pub(crate) struct Backend {
    pub(crate) ns: Netns,
    name: String,
    pub(crate) server: Server,
}

pub(crate) struct Topo {
    pub(crate) client: Netns,
    client_if: String,
    pub(crate) lb: Netns,
    pub(crate) lb_if: String,
    pub(crate) backends: Vec<Backend>,
    /// Each backend's end of its veth pair (in its namespace).
    backend_ifs: Vec<String>,
    /// The LB's end of each backend's veth pair.
    pub(crate) lb_backend_ifs: Vec<String>,
}

impl Topo {
    pub(crate) fn new(tag: &str, n: u8) -> Topo {
        let client = Netns::new(&format!("{tag}-c"));
        let lb = Netns::new(&format!("{tag}-l"));
        let id = std::process::id() % 10_000;
        let lb_if = format!("lbc{id}");
        let client_if = format!("cl{id}");
        veth(
            &client,
            &client_if,
            (CLIENT4, CLIENT6),
            &lb,
            &lb_if,
            (LB4, LB6),
        );
        client.exec_ok([
            "ip",
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            &LB4.to_string(),
        ]);
        client.exec_ok([
            "ip",
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &LB6.to_string(),
        ]);
        lb.exec_ok(["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lb.exec_ok(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        let mut backends = Vec::new();
        let mut backend_ifs = Vec::new();
        for i in 0..n {
            let ns = Netns::new(&format!("{tag}-b{i}"));
            let lb_side = (
                Ipv4Addr::new(198, 18, 11 + i, 1),
                Ipv6Addr::new(0x2001, 2, 0, 11 + u16::from(i), 0, 0, 0, 1),
            );
            let be_if = format!("be{i}{id}");
            veth(
                &lb,
                &format!("lb{i}{id}"),
                lb_side,
                &ns,
                &be_if,
                (backend_v4(i), backend_v6(i)),
            );
            backend_ifs.push(be_if);
            ns.exec_ok([
                "ip",
                "route",
                "add",
                "default",
                "via",
                &lb_side.0.to_string(),
            ]);
            ns.exec_ok([
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &lb_side.1.to_string(),
            ]);
            let name = format!("b{i}");
            let server = Server::start(&ns, &name);
            backends.push(Backend { ns, name, server });
        }
        // Forwarded packets wait for neighbour discovery, which waits for
        // the links' IPv6 addresses (all links at once: their DAD runs in
        // parallel).
        let mut links: Vec<(&Netns, &str)> = vec![(&client, &client_if), (&lb, &lb_if)];
        let lb_ifs: Vec<String> = (0..n).map(|i| format!("lb{i}{id}")).collect();
        for (i, be) in backends.iter().enumerate() {
            links.push((&lb, &lb_ifs[i]));
            links.push((&be.ns, &backend_ifs[i]));
        }
        wait_links_ready(&links);
        Topo {
            client,
            client_if,
            lb,
            lb_if,
            backends,
            backend_ifs,
            lb_backend_ifs: lb_ifs,
        }
    }
}

/// One connection from the client namespace to `vip`, from source port
/// `sport`: the backend's name, or None if it failed.
fn connect_once(vip: IpAddr, sport: u16) -> Option<(String, TcpStream)> {
    let local: SocketAddr = match vip {
        IpAddr::V4(_) => (CLIENT4, sport).into(),
        IpAddr::V6(_) => (CLIENT6, sport).into(),
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .ok()?;
    sock.set_reuse_address(true).ok()?;
    sock.bind(&local.into()).ok()?;
    sock.connect_timeout(
        &SocketAddr::new(vip, SERVICE_PORT).into(),
        Duration::from_secs(2),
    )
    .ok()?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(s.try_clone().ok()?)
        .read_line(&mut line)
        .ok()?;
    let name = line.trim().to_string();
    (!name.is_empty()).then_some((name, s))
}

/// Short connections from the client namespace from each port of `ports`:
/// (source port, backend name or None).
fn connect_many(
    client: &Netns,
    vip: IpAddr,
    ports: std::ops::Range<u16>,
) -> Vec<(u16, Option<String>)> {
    client.run(move || {
        ports
            .map(|p| (p, connect_once(vip, p).map(|(n, _)| n)))
            .collect()
    })
}

/// Which backend name the dataplane must pick for a new flow from `sport`,
/// predicted from the Maglev table built here from the same members.
fn predict(vip: IpAddr, sport: u16, members: &[(String, u32)]) -> String {
    predictor(vip, members)(sport)
}

/// [`predict`] for many flows: the table is built once.
fn predictor(vip: IpAddr, members: &[(String, u32)]) -> impl Fn(u16) -> String {
    let list: Vec<maglev::Member<'_>> = members
        .iter()
        .enumerate()
        .map(|(i, (name, weight))| maglev::Member {
            name,
            slot: i as u32,
            weight: *weight,
        })
        .collect();
    let table = maglev::build(&list, TABLE_SIZE).expect("table");
    let (src, dst) = match vip {
        IpAddr::V4(v) => (words(CLIENT4.into()), words(v.into())),
        IpAddr::V6(v) => (words(CLIENT6.into()), words(v.into())),
    };
    let names: Vec<String> = members.iter().map(|(n, _)| n.clone()).collect();
    move |sport| {
        let slot = table[(flow_hash(src, dst, sport, SERVICE_PORT, 6) % TABLE_SIZE) as usize];
        names[slot as usize].clone()
    }
}

fn words(a: IpAddr) -> [u64; 2] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
        IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
    }
    addr_words(&b)
}

pub(crate) fn counts(results: &[(u16, Option<String>)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, r) in results {
        *m.entry(r.clone().unwrap_or_else(|| "FAILED".into()))
            .or_default() += 1;
    }
    m
}

pub(crate) fn lb_json(env: &AgentEnv) -> Value {
    env.cli_json(&["lb", "list", "--json"])
}

pub(crate) fn backend_row<'a>(v: &'a Value, service: &str, backend: &str) -> &'a Value {
    v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["service"] == service))
        .and_then(|s| s["backends"].as_array())
        .and_then(|b| b.iter().find(|x| x["backend"] == backend))
        .unwrap_or_else(|| panic!("no backend {backend} of {service} in {v:#}"))
}

#[test]
fn nat_balances_real_connections_v4_and_v6() {
    let mut topo = Topo::new("lbe", 4);
    let env = AgentEnv::new("lbe");
    let b = |i: u8, v6: bool| {
        if v6 {
            format!("[{}]:{BACKEND_PORT}", backend_v6(i))
        } else {
            format!("{}:{BACKEND_PORT}", backend_v4(i))
        }
    };
    // Weights 1, 2, 3 over backends b0, b1, b2 (b3 is added later).
    let service_toml = |vip: String, v6: bool| {
        format!(
            "[[service]]\nvip = \"{vip}\"\nmode = \"nat\"\nbackends = [\n  {{ addr = \"{}\", weight = 1 }},\n  {{ addr = \"{}\", weight = 2 }},\n  {{ addr = \"{}\", weight = 3 }},\n]\nhealth = {{ check = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n\n",
            b(0, v6),
            b(1, v6),
            b(2, v6)
        )
    };
    let svc4 = format!("{VIP4}:{SERVICE_PORT}/tcp");
    let svc6 = format!("[{VIP6}]:{SERVICE_PORT}/tcp");
    env.write_config(&format!(
        "[flows]\nsample_pass = 1\n\n[[interface]]\nname = \"{}\"\nmode = \"native\"\n\n{}{}",
        topo.lb_if,
        service_toml(format!("{VIP4}:{SERVICE_PORT}"), false),
        service_toml(format!("[{VIP6}]:{SERVICE_PORT}"), true),
    ));
    let netns_arg = format!("--net={}", topo.lb.path().display());
    let _agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);

    let weights = [("b0", 1u32), ("b1", 2), ("b2", 3)];
    for (vip, first) in [(IpAddr::V4(VIP4), 20_000u16), (IpAddr::V6(VIP6), 30_000)] {
        // 1,000 connections: each on the backend the Maglev table predicts,
        // and the split within 10% of the weights.
        let results = connect_many(&topo.client, vip, first..first + 1000);
        let c = counts(&results);
        println!("{vip}: {c:?}");
        assert_eq!(c.get("FAILED"), None, "{vip}: failed connections: {c:?}");
        let members: Vec<(String, u32)> = weights
            .iter()
            .map(|(n, w)| ((*n).to_string(), *w))
            .collect();
        let names = |i: usize| members[i].0.clone();
        let total: u32 = weights.iter().map(|(_, w)| w).sum();
        for (i, (name, w)) in weights.iter().enumerate() {
            let expected = 1000.0 * f64::from(*w) / f64::from(total);
            let got = c.get(*name).copied().unwrap_or(0) as f64;
            assert!(
                (got - expected).abs() <= 0.10 * expected,
                "{vip}: {name} got {got} connections, expected {expected:.0} ±10% ({c:?}) [{}]",
                names(i)
            );
        }
        // The table maps names to slots by its own member names: use the
        // addresses the agent gave it.
        let addr_members: Vec<(String, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, (_, w))| (b(i as u8, vip.is_ipv6()), *w))
            .collect();
        let mut wrong = 0;
        for (port, got) in &results {
            let want = predict(vip, *port, &addr_members);
            let idx = addr_members
                .iter()
                .position(|(n, _)| *n == want)
                .expect("member");
            if got.as_deref() != Some(weights[idx].0) {
                wrong += 1;
            }
        }
        assert_eq!(
            wrong, 0,
            "{vip}: connections not on the backend the Maglev table predicts"
        );
    }

    // Long-lived connections survive adding a backend (the table changes;
    // the connection table keeps them where they are).
    let held: Vec<(String, TcpStream)> = topo.client.run(|| {
        (40_000..40_030)
            .filter_map(|p| connect_once(IpAddr::V4(VIP4), p))
            .collect()
    });
    assert_eq!(held.len(), 30);
    env.cli_ok(&["lb", "backend", "add", &svc4, &b(3, false), "--weight", "3"]);
    let results = connect_many(&topo.client, IpAddr::V4(VIP4), 41_000..41_400);
    let c = counts(&results);
    println!("after adding b3: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert!(
        c.get("b3").copied().unwrap_or(0) > 60,
        "the added backend takes new connections: {c:?}"
    );
    let echoed = topo.client.run(move || {
        held.into_iter()
            .map(|(name, mut s)| {
                let ok = writeln!(s, "ping-{name}").is_ok() && {
                    let mut line = String::new();
                    BufReader::new(&s).read_line(&mut line).is_ok()
                        && line.trim() == format!("ping-{name}")
                };
                (name, s, ok)
            })
            .collect::<Vec<_>>()
    });
    let broken: Vec<&String> = echoed
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(n, _, _)| n)
        .collect();
    assert!(
        broken.is_empty(),
        "connections broken by adding a backend: {broken:?}"
    );
    // The held connections are open: the connection table counts them active.
    let v = lb_json(&env);
    let active: u64 = (0..4)
        .map(|i| {
            backend_row(&v, &svc4, &b(i, false))["active"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(active >= 30, "30 held connections, {active} active: {v:#}");

    // Drain b1: its open connections go on; no new connection reaches it.
    let on_b1: Vec<TcpStream> = echoed
        .into_iter()
        .filter(|(n, _, _)| n == "b1")
        .map(|(_, s, _)| s)
        .collect();
    assert!(!on_b1.is_empty(), "some held connection is on b1");
    let out = env.cli_ok(&["lb", "backend", "drain", &svc4, &b(1, false)]);
    // The answer says what the maps took (one table rebuilt), not "0
    // change(s)" (which counted only firewall entries).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("1 table(s) rebuilt") && !said.contains("0 change(s)"),
        "{said}"
    );
    let results = connect_many(&topo.client, IpAddr::V4(VIP4), 42_000..42_300);
    let c = counts(&results);
    println!("b1 drained: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert_eq!(
        c.get("b1"),
        None,
        "a drained backend got new connections: {c:?}"
    );
    // Each round trip on a held b1 connection: true if it echoed.
    fn echo(s: &TcpStream) -> bool {
        let mut w = s;
        writeln!(w, "still").is_ok() && {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.trim() == "still"
        }
    }
    let on_b1 = Arc::new(on_b1);
    let held_b1 = on_b1.clone();
    let still = topo
        .client
        .run(move || held_b1.iter().filter(|s| echo(s)).count());
    assert_eq!(
        still,
        on_b1.len(),
        "connections on the drained backend must go on"
    );
    // Flow records name the backend and its state (the reader learns
    // backend states about once a second: keep the drained connections busy).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // One JSON record per line.
        let out = env.cli_ok(&["flows", "--json", "--port", &SERVICE_PORT.to_string()]);
        let tagged = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|x| {
                x["backend"] == b(1, false).as_str() && x["backend_state"] == "draining"
            })
        });
        if tagged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no flow record names the drained backend as draining"
        );
        thread::sleep(Duration::from_millis(300));
        let held_b1 = on_b1.clone();
        topo.client
            .run(move || held_b1.iter().filter(|s| echo(s)).count());
    }
    let v = lb_json(&env);
    assert_eq!(
        backend_row(&v, &svc4, &b(1, false))["state"],
        "draining",
        "{v:#}"
    );

    // Kill b2: health checks take it out, and clients keep succeeding.
    topo.backends[2].server.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    let detected = loop {
        let v = lb_json(&env);
        if backend_row(&v, &svc4, &b(2, false))["health"] == "down" {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "killed backend not detected in 10 s: {v:#}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    // fall (2) failed checks 200 ms apart, plus the listing's own delay.
    println!("b2 detected down {detected:?} after it was killed");
    let results = connect_many(&topo.client, IpAddr::V4(VIP4), 43_000..43_300);
    let c = counts(&results);
    println!("b2 killed: {c:?}");
    assert_eq!(
        c.get("FAILED"),
        None,
        "clients failed after the dead backend was taken out: {c:?}"
    );
    assert_eq!(c.get("b2"), None, "{c:?}");
    let results = connect_many(&topo.client, IpAddr::V6(VIP6), 31_000..31_300);
    let c = counts(&results);
    println!("IPv6 with b2 killed: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert_eq!(c.get("b2"), None, "{c:?}");

    // b2 comes back: health checks put it back in the table.
    topo.backends[2].server = Server::start(&topo.backends[2].ns, "b2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_row(&lb_json(&env), &svc4, &b(2, false))["health"] != "up" {
        assert!(
            Instant::now() < deadline,
            "restarted backend not back up in 10 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let results = connect_many(&topo.client, IpAddr::V4(VIP4), 44_000..44_300);
    let c = counts(&results);
    println!("b2 back: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert!(
        c.get("b2").copied().unwrap_or(0) > 30,
        "the recovered backend takes connections again: {c:?}"
    );

    // Counters: the service saw every connection.
    let v = lb_json(&env);
    let row = backend_row(&v, &svc6, &b(0, true));
    assert!(row["connections"].as_u64().unwrap_or(0) > 0, "{v:#}");
    let _ = &topo.backends[0].ns;
    let _ = &topo.backends[0].name;

    // Bad changes are refused whole, naming the problem.
    for (args, want) in [
        (
            vec!["lb", "backend", "add", svc4.as_str(), &b(0, false)],
            "already",
        ),
        (
            vec![
                "lb",
                "service",
                "add",
                "198.19.0.11:80",
                "--backend",
                &b(0, false),
            ],
            "is behind two NAT services",
        ),
        (
            vec!["lb", "backend", "del", svc4.as_str(), "198.18.99.2:8080"],
            "has no backend",
        ),
        (
            vec!["lb", "backend", "weight", svc4.as_str(), &b(0, false), "0"],
            "out of range",
        ),
        (
            vec!["lb", "service", "add", "198.19.0.12"],
            "is not a service",
        ),
    ] {
        let out = env.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
        println!("$ sluice {}\n{err}", args.join(" "));
    }
    let out = env.cli_ok(&["lb", "list"]);
    println!("$ sluice lb list\n{}", String::from_utf8_lossy(&out.stdout));
    let out = env.cli_ok(&["status"]);
    println!("$ sluice status\n{}", String::from_utf8_lossy(&out.stdout));
}

/// `ADDR:PORT` of backend `i` as the service names it.
pub(crate) fn backend_addr(i: u8, v6: bool) -> String {
    if v6 {
        format!("[{}]:{BACKEND_PORT}", backend_v6(i))
    } else {
        format!("{}:{BACKEND_PORT}", backend_v4(i))
    }
}

/// Asserts that every connection of `results` worked and landed on the
/// backend the Maglev table of `members` (`ADDR:PORT`, weight; backend `i`
/// answers as `b{i}`) predicts; returns how many each backend got.
fn assert_on_table(
    what: &str,
    vip: IpAddr,
    results: &[(u16, Option<String>)],
    members: &[(String, u32)],
) -> BTreeMap<String, usize> {
    let predict = predictor(vip, members);
    for (port, got) in results {
        let want = predict(*port);
        let i = members
            .iter()
            .position(|(n, _)| *n == want)
            .expect("a member");
        assert_eq!(
            got.as_deref(),
            Some(format!("b{i}").as_str()),
            "{what}: the connection from port {port} (None: it failed) should be on {want}"
        );
    }
    counts(results)
}

/// The same data path as above, small enough for an emulated CPU: the CLI
/// with no agent attaches sluice to the LB's client-facing veth and adds a
/// NAT service per family over three backends (weights 1, 2, 3). Real
/// connections (40 IPv4, 20 IPv6) each land on the backend the Maglev table
/// predicts (DNAT in XDP, replies translated back in TC egress: TCX, or
/// clsact on kernels before 6.6); so do 20 to an IPv4 DSR service over the
/// same backends (MAC rewrite, XDP redirect to the backend's veth). A
/// drained backend keeps its open connection and gets none of 20 new ones,
/// which land where the table without it predicts.
#[test]
fn cli_small_nat_and_dsr_connections_follow_the_table_and_skip_a_drained_backend() {
    let topo = Topo::new("lbs", 3);
    let pin = PinRoot::new();
    sluice(&pin, &topo.lb, &["attach", &topo.lb_if, "--mode", "native"]);
    let weights = [1u32, 2, 3];
    let members = |v6: bool, drained: Option<u8>| -> Vec<(String, u32)> {
        (0..3u8)
            .map(|i| {
                let w = if drained == Some(i) {
                    0
                } else {
                    weights[usize::from(i)]
                };
                (backend_addr(i, v6), w)
            })
            .collect()
    };
    let svc4 = format!("{VIP4}:{SERVICE_PORT}/tcp");
    let svc6 = format!("[{VIP6}]:{SERVICE_PORT}/tcp");
    for (svc, v6) in [(&svc4, false), (&svc6, true)] {
        let mut args = vec![
            "lb".to_owned(),
            "service".into(),
            "add".into(),
            svc.clone(),
            "--mode".into(),
            "nat".into(),
        ];
        for (addr, w) in members(v6, None) {
            args.push("--backend".into());
            args.push(format!("{addr},weight={w}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sluice(&pin, &topo.lb, &args);
    }

    for (vip, ports) in [
        (IpAddr::V4(VIP4), 20_000..20_040u16),
        (IpAddr::V6(VIP6), 30_000..30_020),
    ] {
        let m = members(vip.is_ipv6(), None);
        let predicted: BTreeSet<String> = ports.clone().map(predictor(vip, &m)).collect();
        assert_eq!(
            predicted.len(),
            3,
            "{vip}: the ports chosen reach every backend in the table"
        );
        let results = connect_many(&topo.client, vip, ports);
        let c = assert_on_table(&format!("{vip}"), vip, &results, &m);
        println!("{vip}: {c:?}");
    }

    // DSR over the same backends: each holds the VIP and listens on the
    // service port; sluice rewrites only the MAC and redirects the frame to
    // the backend's veth, and the backend answers the client through this
    // host's routing (TC egress leaves those replies alone).
    let vip_dsr = Ipv4Addr::new(198, 19, 0, 11);
    let svc_dsr = format!("{vip_dsr}:{SERVICE_PORT}/tcp");
    // A veth hands partial (offloaded) checksums across; frames XDP sends on
    // would carry them unfinished. Real NICs deliver full checksums.
    topo.client
        .exec_ok(["ethtool", "-K", &topo.client_if, "tx", "off"]);
    topo.client.exec_ok([
        "ip",
        "route",
        "add",
        &format!("{vip_dsr}/32"),
        "via",
        &LB4.to_string(),
    ]);
    let mut dsr_servers = Vec::new();
    for (i, (be, be_if)) in (0u8..).zip(topo.backends.iter().zip(&topo.backend_ifs)) {
        be.ns
            .exec_ok(["ip", "addr", "add", &format!("{vip_dsr}/32"), "dev", "lo"]);
        // A veth takes redirected frames only if its peer has NAPI: GRO on
        // the backend's end gives it that.
        be.ns.exec_ok(["ethtool", "-K", be_if, "gro", "on"]);
        dsr_servers.push(Server::start_on(&be.ns, &be.name, SERVICE_PORT));
        // DSR needs the backend's MAC in the LB's neighbour table (with an
        // agent, its health checks keep it there).
        assert_eq!(ping(&topo.lb, backend_v4(i).into(), 1), 1, "LB to b{i}");
    }
    let dsr_members: Vec<(String, u32)> =
        (0..3u8).map(|i| (backend_v4(i).to_string(), 1)).collect();
    let mut args = vec!["lb", "service", "add", svc_dsr.as_str(), "--mode", "dsr"];
    for (addr, _) in &dsr_members {
        args.extend(["--backend", addr.as_str()]);
    }
    sluice(&pin, &topo.lb, &args);
    let vip = IpAddr::V4(vip_dsr);
    // The backends' veths are not attached yet: a frame redirected there
    // could vanish uncounted, so DSR drops it and says why.
    let lb_stat = |name: &str| -> u64 {
        sluice::dataplane::lb::stats(&sluice::dataplane::PinRoot::new(pin.path()))
            .expect("LB stats")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| v)
    };
    let refused = connect_many(&topo.client, vip, 21_000..21_003u16);
    assert!(
        refused.iter().all(|(_, got)| got.is_none()),
        "DSR through an unattached egress: {refused:?}"
    );
    assert!(lb_stat("egress_not_attached") >= 3, "the drops are counted");
    let e = crate::support::cli::sluice_json(
        &pin,
        &topo.lb,
        &[
            "explain",
            "--json",
            "tcp",
            "src",
            &CLIENT4.to_string(),
            "dst",
            &vip_dsr.to_string(),
            "dport",
            &SERVICE_PORT.to_string(),
        ],
    );
    assert_eq!(
        (e["verdict"].as_str(), e["reason"].as_str()),
        (Some("drop"), Some("no-backend")),
        "{e}"
    );
    // Attached (in the devmap sluice redirects through), they take them.
    for lb_if in &topo.lb_backend_ifs {
        sluice(&pin, &topo.lb, &["attach", lb_if, "--mode", "native"]);
    }
    let ports = 22_000..22_020u16;
    let predicted: BTreeSet<String> = ports.clone().map(predictor(vip, &dsr_members)).collect();
    assert_eq!(predicted.len(), 3, "DSR: the ports reach every backend");
    let results = connect_many(&topo.client, vip, ports);
    let c = assert_on_table("DSR", vip, &results, &dsr_members);
    println!("DSR {vip}: {c:?}");

    // An open connection on b1, then b1 drained.
    let before = members(false, None);
    let undrained = predictor(IpAddr::V4(VIP4), &before);
    let port_b1 = (20_100..20_200u16)
        .find(|p| undrained(*p) == before[1].0)
        .expect("a port the table sends to b1");
    let (name, held) = topo
        .client
        .run(move || connect_once(IpAddr::V4(VIP4), port_b1))
        .expect("a connection to b1");
    assert_eq!(name, "b1");
    sluice(
        &pin,
        &topo.lb,
        &["lb", "backend", "drain", &svc4, &backend_addr(1, false)],
    );
    let after = members(false, Some(1));
    let ports = 21_000..21_020u16;
    assert!(
        ports.clone().any(|p| undrained(p) == before[1].0),
        "some of the ports chosen would go to b1 undrained"
    );
    let results = connect_many(&topo.client, IpAddr::V4(VIP4), ports);
    let c = assert_on_table("b1 drained", IpAddr::V4(VIP4), &results, &after);
    println!("b1 drained: {c:?}");
    assert_eq!(c.get("b1"), None, "a drained backend got new connections");
    let echoed = topo.client.run(move || {
        let mut w = &held;
        writeln!(w, "still").is_ok() && {
            let mut line = String::new();
            BufReader::new(&held).read_line(&mut line).is_ok() && line.trim() == "still"
        }
    });
    assert!(
        echoed,
        "the connection open on the drained backend must go on"
    );

    sluice(&pin, &topo.lb, &["detach", &topo.lb_if]);
    drop(dsr_servers);
}

/// Health checks probe from the namespace of the interface the agent
/// balances on: the agent runs in a namespace of its own (as on a host)
/// with `[[interface]] netns = ...`, while the backends are reachable only
/// from the LB namespace. Both stay up (probes from the agent's namespace
/// would fail at once: no route), real
/// connections reach both, and a killed one is taken out and gets none.
#[test]
fn health_checks_probe_from_the_balanced_interfaces_namespace() {
    let mut topo = Topo::new("lbh", 2);
    let env = AgentEnv::new("lbh");
    let svc4 = format!("{VIP4}:{SERVICE_PORT}/tcp");
    env.write_config(&format!(
        "{}[[service]]\nvip = \"{VIP4}:{SERVICE_PORT}\"\nmode = \"nat\"\nbackends = [\"{}\", \"{}\"]\n\
         health = {{ check = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n",
        crate::support::agent::interface_toml(&topo.lb, &topo.lb_if),
        backend_addr(0, false),
        backend_addr(1, false),
    ));
    // The agent runs in a namespace of its own, as on a host: no route to
    // the backends from there.
    let home = Netns::new("lbh-a");
    home.exec_ok(["ip", "link", "set", "lo", "up"]);
    let netns_arg = format!("--net={}", home.path().display());
    let _agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);
    // Ten probe intervals: with fall = 2, probes that fail would have
    // taken both backends down several times over.
    thread::sleep(Duration::from_secs(2));
    let v = lb_json(&env);
    for i in 0..2 {
        let row = backend_row(&v, &svc4, &backend_addr(i, false));
        assert_eq!(row["health"], "up", "backend {i}: {v:#}");
        assert_eq!(row["state"], "active", "backend {i}: {v:#}");
    }
    // check and history count services.
    let cfg = env.config.to_str().expect("utf-8 path").to_string();
    let out = env.cli_ok(&["check", &cfg]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(", 1 service(s) with 2 backend(s))"), "{said}");
    let h = env.cli_json(&["history", "--json"]);
    assert_eq!(
        h.as_array()
            .and_then(|h| h.last())
            .map(|v| v["services"].clone()),
        Some(1.into()),
        "{h:#}"
    );
    let out = env.cli_ok(&["history"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.lines().next().is_some_and(|l| l.contains("SERVICES")),
        "{said}"
    );
    let check = v["services"][0]["health_check"]
        .as_str()
        .unwrap_or_default();
    assert!(
        check.ends_with(&format!("from netns {}", topo.lb.name())),
        "lb list shows where probes run: {check:?}"
    );
    let c = counts(&connect_many(
        &topo.client,
        IpAddr::V4(VIP4),
        45_000..45_100,
    ));
    println!("both up: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert!(c.contains_key("b0") && c.contains_key("b1"), "{c:?}");

    topo.backends[1].server.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = lb_json(&env);
        let row = backend_row(&v, &svc4, &backend_addr(1, false));
        if row["health"] == "down" {
            let err = row["health_error"].as_str().unwrap_or_default();
            assert!(err.contains("connection refused"), "{row:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed backend not detected in 10 s: {v:#}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let c = counts(&connect_many(
        &topo.client,
        IpAddr::V4(VIP4),
        46_000..46_100,
    ));
    println!("b1 killed: {c:?}");
    assert_eq!(c.get("FAILED"), None, "{c:?}");
    assert_eq!(c.get("b1"), None, "{c:?}");
    assert_eq!(c.get("b0"), Some(&100), "{c:?}");
}
