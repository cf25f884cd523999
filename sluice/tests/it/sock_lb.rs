//! The socket load balancer end to end: the agent runs in the LB namespace
//! of the load-balancer topology (`lb_e2e::Topo`), and clients in that
//! same namespace (local clients) connect to the VIP. Each socket must land
//! on the backend the Maglev table predicts from its cookie, see the VIP as
//! its peer, and leave no state behind once closed; UDP replies come from
//! the VIP; drained and killed backends get no new sockets; a service with
//! the socket LB off is left alone. Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use sluice::{dataplane::PinRoot, model::lb::maglev};
use sluice_common::lb::{TABLE_SIZE, socket_hash};

use crate::{
    lb_e2e::{BACKEND_PORT, SERVICE_PORT, Topo, VIP4, VIP6, backend_addr, backend_row, lb_json},
    support::{
        agent::{AgentEnv, AgentProc},
        netns::Netns,
    },
};

/// The socket's cookie (`SO_COOKIE`): what the socket LB hashes.
fn cookie(fd: &impl AsRawFd) -> u64 {
    const SO_COOKIE: libc::c_int = 57;
    let mut c = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid buffer and length for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut c).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    c
}

/// One connection to `vip`: (cookie, peer address as getpeername() reports
/// it, backend name), or the error.
fn connect_once(vip: IpAddr) -> Result<(u64, SocketAddr, String), String> {
    connect_to(SocketAddr::new(vip, SERVICE_PORT))
}

/// [`connect_once`] to any address (an IPv4-mapped VIP).
fn connect_to(to: SocketAddr) -> Result<(u64, SocketAddr, String), String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok((cookie(&s), peer, line.trim().to_string()))
}

/// `n` connections from the LB namespace (local clients).
fn connect_many(
    ns: &Netns,
    vip: IpAddr,
    n: usize,
) -> Vec<Result<(u64, SocketAddr, String), String>> {
    ns.run(move || (0..n).map(|_| connect_once(vip)).collect())
}

/// The backend (its name `b{i}`) the socket LB must pick for a socket with
/// `cookie`, from the Maglev table of `members` (ADDR:PORT, weight).
fn predictor(members: &[(String, u32)]) -> impl Fn(u64) -> String + use<> {
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
    move |cookie| format!("b{}", table[(socket_hash(cookie) % TABLE_SIZE) as usize])
}

fn counts(results: &[Result<(u64, SocketAddr, String), String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        let k = match r {
            Ok((_, _, name)) => name.clone(),
            Err(e) => format!("FAILED: {e}"),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Sockets the kernel still remembers as translated.
fn remembered(pin_root: &Path) -> usize {
    sluice::dataplane::sock_lb::sockets(&PinRoot::new(pin_root.to_path_buf()))
        .expect("read SOCK_LB_SOCKS")
        .len()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Fills `SOCK_LB_SOCKS` with made-up entries (cookies from the top of
/// the range, which real sockets never have) until the kernel refuses
/// more; removes them when dropped.
struct StateFiller {
    map: aya::maps::HashMap<aya::maps::MapData, u64, sluice_common::sock::SockLbSock>,
    keys: Vec<u64>,
}

impl StateFiller {
    fn fill(pin_root: &Path) -> StateFiller {
        let root = PinRoot::new(pin_root.to_path_buf());
        let path = sluice::dataplane::sock::sock_root(&root)
            .map(sluice_common::sock::sock_map_names::SOCK_LB_SOCKS);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut map = aya::maps::Map::from_map_data(data)
            .and_then(aya::maps::HashMap::try_from)
            .expect("SOCK_LB_SOCKS is a hash map");
        let mut keys = Vec::new();
        for i in 0..(u64::from(sluice_common::sock::SOCK_LB_CAPACITY) + 10) {
            let k = u64::MAX - i;
            if map
                .insert(k, sluice_common::sock::SockLbSock::default(), 0)
                .is_err()
            {
                break;
            }
            keys.push(k);
        }
        assert!(
            keys.len() + 16 >= sluice_common::sock::SOCK_LB_CAPACITY as usize
                && keys.len() <= sluice_common::sock::SOCK_LB_CAPACITY as usize,
            "{} entries fitted",
            keys.len()
        );
        StateFiller { map, keys }
    }
}

impl Drop for StateFiller {
    fn drop(&mut self) {
        for k in &self.keys {
            let _ = self.map.remove(k);
        }
    }
}

/// A UDP responder in a backend namespace: answers each datagram with its name.
struct Udp {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Udp {
    fn start(ns: &Netns, name: &str) -> Udp {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let s =
                UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, BACKEND_PORT)).expect("bind udp");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            tx.send(()).expect("ready");
            let mut buf = [0u8; 512];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(name.as_bytes(), from);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("udp responder did not start");
        Udp {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn event(v: &serde_json::Value, name: &str) -> u64 {
    v["socket"]["events"]
        .as_array()
        .and_then(|e| e.iter().find(|x| x[0] == name))
        .and_then(|x| x[1].as_u64())
        .unwrap_or_else(|| panic!("no socket LB counter {name} in {v:#}"))
}

#[test]
fn local_clients_are_balanced_at_the_socket_by_the_maglev_table() {
    let topo = Topo::new("slb", 3);
    let env = AgentEnv::new("slb");
    let _udp: Vec<Udp> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Udp::start(&b.ns, &format!("b{i}")))
        .collect();
    // Weights 2 and 3 over b0 and b1 (b2 joins later); TCP and UDP, v4 and v6.
    let svc = |vip: String, proto: &str, v6: bool| {
        format!(
            "[[service]]\nvip = \"{vip}/{proto}\"\nbackends = [\n  {{ addr = \"{}\", weight = 2 }},\n  {{ addr = \"{}\", weight = 3 }},\n]\n\n",
            backend_addr(0, v6),
            backend_addr(1, v6),
        )
    };
    let port = crate::support::agent::free_port();
    let text = env.config_text(&format!(
        "[[interface]]\nname = \"{}\"\nmode = \"native\"\n\n{}{}{}{}",
        topo.lb_if,
        svc(format!("{VIP4}:{SERVICE_PORT}"), "tcp", false),
        svc(format!("[{VIP6}]:{SERVICE_PORT}"), "tcp", true),
        svc(format!("{VIP4}:{SERVICE_PORT}"), "udp", false),
        svc(format!("[{VIP6}]:{SERVICE_PORT}"), "udp", true),
    ));
    let text = text.replace(
        "[agent]\n",
        &format!("[agent]\nmetrics = \"127.0.0.1:{port}\"\n"),
    );
    env.write_atomically(&env.config, &text);
    let netns_arg = format!("--net={}", topo.lb.path().display());
    let agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);
    assert!(
        agent.wait_for_log("socket load balancer updated", Duration::from_secs(10)),
        "the socket LB was not put in force: {}",
        agent.log()
    );
    let svc4 = format!("{VIP4}:{SERVICE_PORT}/tcp");
    let members = |v6: bool| -> Vec<(String, u32)> {
        vec![(backend_addr(0, v6), 2), (backend_addr(1, v6), 3)]
    };

    // 2,000 IPv4 connections: each on the backend its cookie predicts, the
    // peer is the VIP, and the split within 10% of the weights.
    let results = connect_many(&topo.lb, IpAddr::V4(VIP4), 2000);
    let c = counts(&results);
    println!("v4: {c:?}");
    let predict = predictor(&members(false));
    for r in &results {
        let (cookie, peer, name) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("connect failed: {e} ({c:?})"));
        assert_eq!(
            *peer,
            SocketAddr::new(IpAddr::V4(VIP4), SERVICE_PORT),
            "getpeername"
        );
        assert_eq!(*name, predict(*cookie), "cookie {cookie}");
    }
    for (name, w) in [("b0", 2.0), ("b1", 3.0)] {
        let expected = 2000.0 * w / 5.0;
        let got = c.get(name).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() <= 0.10 * expected,
            "{name}: {got} sockets, expected {expected} ±10% ({c:?})"
        );
    }
    // No per-packet LB: the service's packet counters did not move, the
    // socket LB counted every socket, and none is remembered after close.
    let v = lb_json(&env);
    let row = v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["service"] == svc4.as_str()))
        .expect("service row");
    assert_eq!(row["packets"], 0, "{row:#}");
    assert_eq!(row["socket"], true, "{row:#}");
    let sockets: u64 = (0..2)
        .map(|i| {
            backend_row(&v, &svc4, &backend_addr(i, false))["sockets"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(sockets, 2000, "{v:#}");
    assert_eq!(event(&v, "connect"), 2000, "{v:#}");
    assert_eq!(v["socket"]["on"], true, "{v:#}");
    wait_for(
        "closed sockets to be forgotten",
        Duration::from_secs(5),
        || remembered(env.pin_root()) == 0,
    );

    // IPv6 likewise.
    let results = connect_many(&topo.lb, IpAddr::V6(VIP6), 300);
    let predict6 = predictor(&members(true));
    for r in &results {
        let (cookie, peer, name) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("v6 connect failed: {e}"));
        assert_eq!(
            *peer,
            SocketAddr::new(IpAddr::V6(VIP6), SERVICE_PORT),
            "getpeername v6"
        );
        assert_eq!(*name, predict6(*cookie), "v6 cookie {cookie}");
    }

    // UDP: request/response through sendmsg()/recvmsg(); the reply comes
    // from the VIP; one socket's datagrams all go to one backend.
    let replies: Vec<(u64, SocketAddr, String)> = topo.lb.run(|| {
        (0..100)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut names = Vec::new();
                let mut from = None;
                for _ in 0..3 {
                    s.send_to(b"who", (VIP4, SERVICE_PORT)).expect("sendto");
                    let mut buf = [0u8; 64];
                    let (n, f) = s.recv_from(&mut buf).expect("udp reply");
                    names.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    from = Some(f);
                }
                assert!(
                    names.windows(2).all(|w| w[0] == w[1]),
                    "one socket, one backend: {names:?}"
                );
                (cookie(&s), from.expect("reply"), names[0].clone())
            })
            .collect()
    });
    for (cookie, from, name) in &replies {
        assert_eq!(
            *from,
            SocketAddr::new(IpAddr::V4(VIP4), SERVICE_PORT),
            "recvmsg source"
        );
        assert_eq!(*name, predict(*cookie), "udp cookie {cookie}");
    }
    // IPv6 UDP likewise (recvmsg6).
    let replies6: Vec<(u64, SocketAddr, String)> = topo.lb.run(|| {
        (0..30)
            .map(|_| {
                let s = UdpSocket::bind("[::]:0").expect("udp6 socket");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                s.send_to(b"who", (VIP6, SERVICE_PORT)).expect("sendto v6");
                let mut buf = [0u8; 64];
                let (n, from) = s.recv_from(&mut buf).expect("udp6 reply");
                (
                    cookie(&s),
                    from,
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )
            })
            .collect()
    });
    for (cookie, from, name) in &replies6 {
        assert_eq!(
            *from,
            SocketAddr::new(IpAddr::V6(VIP6), SERVICE_PORT),
            "recvmsg6 source"
        );
        assert_eq!(*name, predict6(*cookie), "udp6 cookie {cookie}");
    }
    // An IPv6 socket to the IPv4 VIP (::ffff:a.b.c.d) is balanced by the
    // IPv4 service and sees the mapped VIP as its peer.
    let mapped = SocketAddr::new(IpAddr::V6(VIP4.to_ipv6_mapped()), SERVICE_PORT);
    let results = topo
        .lb
        .run(move || (0..50).map(|_| connect_to(mapped)).collect::<Vec<_>>());
    for r in &results {
        let (cookie, peer, name) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("v4-mapped connect failed: {e}"));
        assert_eq!(*peer, mapped, "getpeername of a v4-mapped connect");
        assert_eq!(*name, predict(*cookie), "v4-mapped cookie {cookie}");
    }
    let v = lb_json(&env);
    assert!(event(&v, "sendmsg") >= 330, "{v:#}");
    wait_for(
        "UDP sockets to be forgotten",
        Duration::from_secs(5),
        || remembered(env.pin_root()) == 0,
    );

    // A drained backend gets no new sockets; a new one does.
    env.cli_ok(&["lb", "backend", "drain", &svc4, &backend_addr(1, false)]);
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 200));
    println!("b1 drained: {c:?}");
    assert_eq!(c.get("b0"), Some(&200), "{c:?}");
    env.cli_ok(&["lb", "backend", "add", &svc4, &backend_addr(2, false)]);
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 200));
    println!("b2 added: {c:?}");
    assert_eq!(c.values().sum::<usize>(), 200);
    assert!(
        c.contains_key("b0") && c.contains_key("b2") && !c.contains_key("b1"),
        "{c:?}"
    );

    // Switched off for the service: local connects are left alone (the VIP
    // is not routed from here, so they fail), and counted as skipped.
    let skipped = event(&lb_json(&env), "skipped");
    env.cli_ok(&["lb", "service", "set", &svc4, "--socket-lb", "off"]);
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 5));
    assert!(c.keys().all(|k| k.starts_with("FAILED")), "{c:?}");
    let v = lb_json(&env);
    assert_eq!(event(&v, "skipped"), skipped + 5, "{v:#}");
    env.cli_ok(&["lb", "service", "set", &svc4, "--socket-lb", "on"]);
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 20));
    assert_eq!(
        c.get("b0").copied().unwrap_or(0) + c.get("b2").copied().unwrap_or(0),
        20,
        "{c:?}"
    );

    // Clients of other namespaces go through the packet LB as before.
    let out = topo.client.run(|| connect_once(IpAddr::V4(VIP4)));
    let (_, peer, _) = out.expect("client namespace connects through XDP");
    assert_eq!(peer, SocketAddr::new(IpAddr::V4(VIP4), SERVICE_PORT));
    let v = lb_json(&env);
    let row = v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["service"] == svc4.as_str()))
        .expect("service row");
    assert!(row["packets"].as_u64().unwrap_or(0) > 0, "{row:#}");

    // Metrics carry the socket LB too.
    // (The agent, and its metrics endpoint, live in the LB namespace.)
    let metrics = topo.lb.run(move || crate::support::agent::scrape(port));
    assert!(
        crate::support::agent::sample(&metrics, "sluice_sock_lb_events_total{event=\"connect\"}")
            .is_some_and(|v| v >= 2000.0),
        "{metrics}"
    );
    assert_eq!(
        crate::support::agent::sample(&metrics, "sluice_sock_lb_on "),
        Some(1.0)
    );

    // Status names the links (docs/sock.md shows both listings).
    let st = env.cli_json(&["status", "--json"]);
    assert_eq!(st["socket_lb"]["on"], true, "{st:#}");
    assert_eq!(
        st["socket_lb"]["hooks"].as_array().map(Vec::len),
        Some(9),
        "{st:#}"
    );
    println!(
        "{}",
        String::from_utf8_lossy(&env.cli_ok(&["lb", "list"]).stdout)
    );
    println!(
        "{}",
        String::from_utf8_lossy(&env.cli_ok(&["status"]).stdout)
    );
    drop(agent);
}

#[test]
fn a_killed_backend_leaves_and_local_clients_keep_succeeding() {
    let mut topo = Topo::new("slk", 2);
    let env = AgentEnv::new("slk");
    env.write_config(&format!(
        "[[interface]]\nname = \"{}\"\nmode = \"native\"\n\n[[service]]\nvip = \"{VIP4}:{SERVICE_PORT}\"\nbackends = [\"{}\", \"{}\"]\n\
         health = {{ check = \"tcp\", interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n",
        topo.lb_if,
        backend_addr(0, false),
        backend_addr(1, false),
    ));
    let netns_arg = format!("--net={}", topo.lb.path().display());
    let agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);
    assert!(
        agent.wait_for_log("socket load balancer updated", Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 100));
    assert!(c.contains_key("b0") && c.contains_key("b1"), "{c:?}");
    // An established socket keeps its backend across the kill of the other.
    let kept = topo.lb.run(|| {
        let s = TcpStream::connect((VIP4, SERVICE_PORT)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut line = String::new();
        BufReader::new(s.try_clone().expect("clone"))
            .read_line(&mut line)
            .expect("name");
        (s, line.trim().to_string())
    });
    let victim = if kept.1 == "b0" { 1 } else { 0 };
    topo.backends[victim].server.kill();
    let svc4 = format!("{VIP4}:{SERVICE_PORT}/tcp");
    wait_for(
        "health checks to take the backend down",
        Duration::from_secs(10),
        || {
            backend_row(&lb_json(&env), &svc4, &backend_addr(victim as u8, false))["health"]
                == "down"
        },
    );
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 100));
    println!("after the kill: {c:?}");
    assert_eq!(c.get(&kept.1), Some(&100), "{c:?}");
    // The kept socket still talks to its backend.
    let (mut s, name) = kept;
    use std::io::Write as _;
    writeln!(s, "ping").expect("write");
    let mut line = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("echo");
    assert_eq!(line.trim(), "ping", "{name}");
    drop(s);
    wait_for("sockets to be forgotten", Duration::from_secs(5), || {
        remembered(env.pin_root()) == 0
    });

    // A full socket-state map (filled here with made-up cookies): sockets
    // are still balanced, report their backend as the peer (documented),
    // and every miss is counted; once there is room, the VIP again.
    let survivor: SocketAddr = backend_addr(1 - victim as u8, false)
        .parse()
        .expect("backend address");
    let full_before = event(&lb_json(&env), "state_full");
    let filler = StateFiller::fill(env.pin_root());
    for r in &connect_many(&topo.lb, IpAddr::V4(VIP4), 10) {
        let (_, peer, got) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("connect with the state map full: {e}"));
        assert_eq!(*got, name, "still balanced");
        assert_eq!(*peer, survivor, "not remembered: the backend is the peer");
    }
    assert_eq!(event(&lb_json(&env), "state_full") - full_before, 10);
    drop(filler);
    for r in &connect_many(&topo.lb, IpAddr::V4(VIP4), 3) {
        let (_, peer, _) = r.as_ref().expect("connect once there is room");
        assert_eq!(*peer, SocketAddr::new(IpAddr::V4(VIP4), SERVICE_PORT));
    }

    // kill -9: the pinned links keep balancing local clients; a restarted
    // agent adopts them.
    let mut agent = agent;
    agent.kill9();
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 20));
    assert_eq!(c.get(&name), Some(&20), "without the agent: {c:?}");
    drop(agent);
    let agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);
    let st = env.cli_json(&["status", "--json"]);
    assert_eq!(st["socket_lb"]["on"], true, "{st:#}");

    // Switched off for every service ([lb] socket = false): the links go,
    // and local connects are left alone (the VIP is not routed here).
    let text = std::fs::read_to_string(&env.config).expect("config");
    env.write_atomically(&env.config, &format!("[lb]\nsocket = false\n\n{text}"));
    agent.signal(libc::SIGHUP);
    wait_for("the socket LB to be off", Duration::from_secs(10), || {
        env.cli_json(&["status", "--json"])
            .get("socket_lb")
            .is_none()
    });
    let c = counts(&connect_many(&topo.lb, IpAddr::V4(VIP4), 3));
    assert!(c.keys().all(|k| k.starts_with("FAILED")), "{c:?}");
    let links = env.pin_root().join("sock/lb");
    assert!(
        !links.exists() || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0) == 0,
        "socket LB link pins left"
    );
    drop(agent);
}
