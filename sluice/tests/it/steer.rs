//! sk_lookup steering end to end: a service (a python process in namespace
//! b) owns one TCP listener per steer and one UDP socket; the agent takes
//! them by pid and fd; clients in namespace a reach a whole prefix, on
//! any port, through those single sockets, while addresses and ports not
//! steered reach ordinary sockets as before. Needs root.

use std::{
    io::{BufRead, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde_json::Value;

use crate::support::{
    agent::{AgentEnv, AgentProc, interface_toml, stderr, stdout},
    netns::{Child, Lab, eventually},
};

/// The service: two dual-stack TCP listeners (web, api) and a UDP socket
/// (dns) that answers with the destination each datagram was sent to.
/// Prints `ready WEB_FD API_FD DNS_FD`; each accepted connection gets
/// `NAME ADDR:PORT` (its own local address) and is closed.
const SERVICE: &str = r#"
import socket, struct, selectors
SOL_IP, IP_PKTINFO, IP_RECVORIGDSTADDR = 0, 8, 20
def listener():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0)); s.listen(512); return s
web, api = listener(), listener()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
u.bind(("0.0.0.0", 0))
print("ready", web.fileno(), api.fileno(), u.fileno(), flush=True)
def text(h, p):
    if h.startswith("::ffff:"): return "%s:%d" % (h[7:], p)
    return ("[%s]:%d" if ":" in h else "%s:%d") % (h, p)
sel = selectors.DefaultSelector()
for name, s in (("web", web), ("api", api), ("dns", u)): sel.register(s, selectors.EVENT_READ, name)
while True:
    for key, _ in sel.select():
        if key.data == "dns":
            data, anc, _, peer = u.recvmsg(2048, 1024)
            for lvl, typ, d in anc:
                if lvl == SOL_IP and typ == IP_RECVORIGDSTADDR:
                    port = struct.unpack("!H", d[2:4])[0]; addr = d[4:8]
            u.sendmsg([("dns %s:%d" % (socket.inet_ntoa(addr), port)).encode()],
                      [(SOL_IP, IP_PKTINFO, struct.pack("I4s4s", 0, addr, bytes(4)))], 0, peer)
        else:
            c, _ = key.fileobj.accept()
            h, p = c.getsockname()[:2]
            c.sendall(("%s %s\n" % (key.data, text(h, p))).encode()); c.close()
"#;

struct Service {
    child: Child,
    fds: [i32; 3],
}

fn start_service(lab: &Lab) -> Service {
    let mut child = Child::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.b.name(),
                "python3",
                "-u",
                "-c",
                SERVICE,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("service output");
    let f: Vec<i32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "service did not start: {line:?}");
    Service {
        child,
        fds: [f[0], f[1], f[2]],
    }
}

/// One TCP connection: the service's line, or the error kind.
fn dial(to: SocketAddr) -> Result<String, std::io::ErrorKind> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.kind())?;
    Ok(out.trim().to_string())
}

/// One datagram and its answer (or None after 1 s).
fn ask(to: SocketAddr) -> Option<String> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok();
    s.send_to(b"q", to).ok()?;
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn steers(env: &AgentEnv) -> Value {
    env.cli_json(&["steer", "list", "--json"])
}

fn steer<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["steer"]["name"] == name))
        .unwrap_or_else(|| panic!("no steer {name} in {v}"))
}

fn counter(v: &Value, name: &str, event: &str) -> u64 {
    steer(v, name)["counters"][event].as_u64().unwrap_or(0)
}

/// Makes `prefix` local to the lab's namespace b (AnyIP) and routed there
/// from a (`v6`: through b's IPv6 address).
fn route_to_b(lab: &Lab, prefix: &str, v6: bool) {
    let family = if v6 { "-6" } else { "-4" };
    lab.b
        .exec_ok(["ip", family, "route", "add", "local", prefix, "dev", "lo"]);
    let via = lab.b_addr(v6).to_string();
    lab.a
        .exec_ok(["ip", family, "route", "add", prefix, "via", via.as_str()]);
}

#[test]
fn one_socket_answers_a_whole_prefix_and_unsteered_traffic_is_untouched() {
    let lab = Lab::new("steer");
    let x = lab.x;
    let v6net = format!("2001:2:0:{:x}::", 0x100 + u16::from(x));
    // The steered prefixes are local to b (AnyIP) and routed from a.
    route_to_b(&lab, &format!("198.19.{x}.0/24"), false);
    route_to_b(&lab, &format!("{v6net}/64"), true);
    let env = AgentEnv::new("steer");
    env.write_config(&format!(
        "{}[[steer]]\nname = \"web\"\nproto = \"tcp\"\nprefixes = [\"198.19.{x}.0/24\", \"{v6net}/64\"]\n\n\
         [[steer]]\nname = \"api\"\nproto = \"tcp\"\nprefixes = [\"198.19.{x}.128/25\"]\nports = \"8000-8099\"\n\n\
         [[steer]]\nname = \"dns\"\nproto = \"udp\"\nprefixes = [\"198.19.{x}.0/24\"]\nports = \"5300-5399\"\n",
        interface_toml(&lab.b, &lab.b_if)
    ));
    let mut agent = AgentProc::start(&env, &[]);
    let svc = start_service(&lab);
    let pid = svc.child.id().to_string();
    let [web_fd, api_fd, dns_fd] = svc.fds.map(|f| f.to_string());

    // Bad registrations name the problem and change nothing.
    let out = env.cli(&["steer", "register", "web", "--pid", &pid]);
    assert!(
        stderr(&out).contains("2 sockets that fit steer web") && stderr(&out).contains("--fd"),
        "{}",
        stderr(&out)
    );
    let out = env.cli(&["steer", "register", "web", "--pid", &pid, "--fd", &dns_fd]);
    assert!(
        stderr(&out).contains("is a UDP socket; steer web is tcp"),
        "{}",
        stderr(&out)
    );
    let out = env.cli(&["steer", "register", "nosuch", "--pid", &pid]);
    assert!(stderr(&out).contains("no steer nosuch"), "{}", stderr(&out));
    let out = env.cli(&["steer", "register", "web", "--pid", "4000000000"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(steer(&steers(&env), "web")["socket"].is_null());
    // Before a socket is registered, steered traffic is refused.
    let probe: SocketAddr = format!("198.19.{x}.5:80").parse().unwrap();
    assert_eq!(
        lab.a.run(move || dial(probe)),
        Err(std::io::ErrorKind::ConnectionRefused)
    );

    env.cli_ok(&["steer", "register", "web", "--pid", &pid, "--fd", &web_fd]);
    // Registering again replaces the open socket (here: with itself).
    let out = env.cli_ok(&["steer", "register", "web", "--pid", &pid, "--fd", &web_fd]);
    assert!(
        stdout(&out).contains("replacing the previous one"),
        "{}",
        stdout(&out)
    );
    env.cli_ok(&["steer", "register", "api", "--pid", &pid, "--fd", &api_fd]);
    // The one UDP socket fits dns: found without --fd.
    let out = env.cli_ok(&["steer", "register", "dns", "--pid", &pid]);
    assert!(
        stdout(&out).contains(&format!("socket fd {dns_fd} of process {pid}")),
        "{}",
        stdout(&out)
    );

    // An ordinary listener and UDP socket in b, on a port the steers cover.
    let (plain_tcp, plain_port) = lab.b.run(|| {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let p = l.local_addr().unwrap().port();
        (l, p)
    });
    let plain = std::thread::spawn(move || {
        let mut n = 0;
        plain_tcp.set_nonblocking(false).unwrap();
        while let Ok((mut c, _)) = plain_tcp.accept() {
            use std::io::Write as _;
            let _ = c.write_all(b"plain\n");
            n += 1;
            if n == 2 {
                break;
            }
        }
    });
    let plain_udp = lab.b.run(|| UdpSocket::bind("0.0.0.0:5400").unwrap());
    let udp_answer = std::thread::spawn(move || {
        plain_udp
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok();
        let mut buf = [0u8; 64];
        if let Ok((_, peer)) = plain_udp.recv_from(&mut buf) {
            let _ = plain_udp.send_to(b"plain", peer);
        }
    });

    // 100 connections to random hosts and ports of the /25 api leaves to
    // web (and 10 to web's IPv6 prefix): all through the one web socket,
    // each accepted with the address and port it was sent to.
    let mut rng = SmallRng::seed_from_u64(u64::from(x));
    let mut wanted: Vec<SocketAddr> = Vec::new();
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 100 {
        let port = rng.gen_range(1024..65000u16);
        if ports.insert(port) {
            let host = Ipv4Addr::new(198, 19, x, rng.gen_range(1..127));
            wanted.push(SocketAddr::new(host.into(), port));
        }
    }
    for i in 0..10u16 {
        let host: Ipv6Addr = format!("{v6net}{:x}", i + 1).parse().unwrap();
        wanted.push(SocketAddr::new(IpAddr::V6(host), 20000 + i));
    }
    // The longer prefix wins on its ports, and leaves the others to web.
    let api: Vec<SocketAddr> = (0..10u16)
        .map(|i| format!("198.19.{x}.200:{}", 8000 + i).parse().unwrap())
        .collect();
    let api_other: SocketAddr = format!("198.19.{x}.200:9000").parse().unwrap();
    let steered_plain: SocketAddr = format!("198.19.{x}.9:{plain_port}").parse().unwrap();
    let (w2, a2) = (wanted.clone(), api.clone());
    let got = lab.a.run(move || {
        let web: Vec<_> = w2.iter().map(|a| (*a, dial(*a))).collect();
        let api: Vec<_> = a2.iter().map(|a| (*a, dial(*a))).collect();
        (web, api, dial(api_other), dial(steered_plain))
    });
    for (to, r) in &got.0 {
        assert_eq!(r.as_deref(), Ok(format!("web {to}").as_str()), "to {to}");
    }
    for (to, r) in &got.1 {
        assert_eq!(r.as_deref(), Ok(format!("api {to}").as_str()), "to {to}");
    }
    assert_eq!(got.2.as_deref(), Ok(format!("web {api_other}").as_str()));
    // A port of the steered prefix goes to the steer even with an ordinary
    // listener on it; the host's own address reaches that listener.
    assert_eq!(
        got.3.as_deref(),
        Ok(format!("web {steered_plain}").as_str())
    );
    let own: SocketAddr = SocketAddr::new(lab.b_v4.into(), plain_port);
    assert_eq!(lab.a.run(move || dial(own)).as_deref(), Ok("plain"));

    // UDP: the steered ports reach the one dns socket; others are untouched.
    let asked: Vec<SocketAddr> = (0..20u16)
        .map(|i| {
            format!("198.19.{x}.{}:{}", 10 + i, 5300 + i * 5)
                .parse()
                .unwrap()
        })
        .collect();
    let a2 = asked.clone();
    let unsteered: SocketAddr = format!("198.19.{x}.10:5400").parse().unwrap();
    let (answers, plain_answer) = lab.a.run(move || {
        (
            a2.iter().map(|a| ask(*a)).collect::<Vec<_>>(),
            ask(unsteered),
        )
    });
    for (to, got) in asked.iter().zip(&answers) {
        assert_eq!(
            got.as_deref(),
            Some(format!("dns {to}").as_str()),
            "to {to}"
        );
    }
    assert_eq!(plain_answer.as_deref(), Some("plain"));
    udp_answer.join().unwrap();

    // Counters, status, flow records.
    let v = steers(&env);
    assert_eq!(counter(&v, "web", "steered"), 112, "{v}");
    assert_eq!(counter(&v, "api", "steered"), 10, "{v}");
    assert_eq!(counter(&v, "dns", "steered"), 20, "{v}");
    assert_eq!(counter(&v, "web", "no_socket"), 1, "{v}");
    assert!(steer(&v, "web")["socket"].as_u64().is_some(), "{v}");
    let status = stdout(&env.cli_ok(&["status"]));
    assert!(
        status.contains(&format!("steer:    sk_lookup on netns {}", lab.b.name()))
            && status.contains("3 steer(s), 3 with a socket"),
        "{status}"
    );
    let records = || -> Vec<Value> {
        stdout(&env.cli_ok(&["flows", "--json", "--reason", "steer", "--limit", "1000"]))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["reason"] == "steer")
            .collect()
    };
    assert!(
        eventually(|| records().len() >= 123),
        "{:?}",
        records().len()
    );
    let recs = records();
    let first = &wanted[0];
    assert!(
        recs.iter().any(|r| r["dst"] == first.ip().to_string()
            && r["dport"].as_u64() == Some(u64::from(first.port()))
            && r["verdict"] == "pass"
            && r["steer"] == "web"
            && r["src"] == lab.a_v4.to_string()),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["verdict"] == "drop"
            && r["steer"] == "web"
            && r["dport"].as_u64() == Some(80)),
        "the refused lookup is a record: {recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["steer"] == "api"),
        "api's connections are named: {recs:?}"
    );
    let text = stdout(&env.cli_ok(&["flows", "--reason", "steer"]));
    assert!(text.contains("pass  steer web"), "{text}");

    // Runtime changes are versions: delete api, its ports fall to web;
    // roll back, they are api's again.
    env.cli_ok(&["steer", "del", "api"]);
    let to = api[0];
    assert_eq!(lab.a.run(move || dial(to)).unwrap(), format!("web {to}"));
    let out = env.cli(&[
        "steer",
        "add",
        "web2",
        "--proto",
        "tcp",
        "--prefix",
        &format!("198.19.{x}.0/24"),
        "--ports",
        "80",
    ]);
    assert!(stderr(&out).contains("both claim tcp"), "{}", stderr(&out));
    env.cli_ok(&["rollback"]);
    // The socket went with the deleted steer: registered again.
    env.cli_ok(&["steer", "register", "api", "--pid", &pid, "--fd", &api_fd]);
    assert_eq!(lab.a.run(move || dial(to)).unwrap(), format!("api {to}"));

    // kill -9 the agent: the pinned link and sockets keep steering; a new
    // agent adopts them.
    agent.kill9();
    let to = wanted[1];
    assert_eq!(lab.a.run(move || dial(to)).unwrap(), format!("web {to}"));
    let _agent = AgentProc::start(&env, &[]);
    let v = steers(&env);
    assert!(steer(&v, "web")["socket"].as_u64().is_some(), "{v}");
    assert_eq!(counter(&v, "web", "steered"), 114, "{v}");

    // The service goes: its sockets leave the map; steered traffic is
    // refused (never handed to another listener), the rest still works.
    drop(svc);
    assert!(
        eventually(|| steer(&steers(&env), "web")["socket"].is_null()),
        "{}",
        steers(&env)
    );
    let to = wanted[2];
    assert_eq!(
        lab.a.run(move || dial(to)),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(lab.a.run(move || dial(own)).as_deref(), Ok("plain"));
    plain.join().unwrap();

    // No steers left: the link and the socket object's pins go.
    for name in ["web", "api", "dns"] {
        env.cli_ok(&["steer", "del", name]);
    }
    let status = stdout(&env.cli_ok(&["status"]));
    assert!(!status.contains("steer:"), "{status}");
    assert!(
        !env.pin_root().join("sock").exists(),
        "socket object pins left: {:?}",
        env.pin.pins()
    );
}

/// Steering with the test's own listener (no Python: the LTS tier runs
/// this one): a port range of a prefix reaches it by pid and fd; ports
/// outside the range reach ordinary sockets, or none.
#[test]
fn a_steered_port_range_reaches_one_listener_and_other_ports_do_not() {
    use std::os::fd::AsRawFd as _;
    let lab = Lab::new("steer-range");
    let x = lab.x;
    route_to_b(&lab, &format!("198.19.{x}.0/24"), false);
    let env = AgentEnv::new("steer-range");
    env.write_config(&format!(
        "{}[[steer]]\nname = \"range\"\nproto = \"tcp\"\nprefixes = [\"198.19.{x}.0/24\"]\nports = \"1000-1999\"\n",
        interface_toml(&lab.b, &lab.b_if)
    ));
    let port = env.serve_metrics();
    let agent = AgentProc::start(&env, &[]);
    let metric =
        |name: &str| crate::support::agent::sample(&crate::support::agent::scrape(port), name);
    assert_eq!(metric("sluice_steer_socket{steer=\"range\"}"), Some(0.0));
    let (steered, plain) = lab.b.run(|| {
        (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("0.0.0.0:2001").unwrap(),
        )
    });
    let fd = steered.as_raw_fd().to_string();
    let me = std::process::id().to_string();
    env.cli_ok(&["steer", "register", "range", "--pid", &me, "--fd", &fd]);
    assert_eq!(metric("sluice_steer_socket{steer=\"range\"}"), Some(1.0));
    let server = std::thread::spawn(move || {
        use std::io::Write as _;
        for _ in 0..100 {
            let (mut c, _) = steered.accept().unwrap();
            let local = c.local_addr().unwrap();
            let _ = c.write_all(format!("steered {local}\n").as_bytes());
        }
        let (mut c, _) = plain.accept().unwrap();
        let _ = c.write_all(b"plain\n");
    });
    let mut rng = SmallRng::seed_from_u64(u64::from(x) + 7);
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 100 {
        ports.insert(rng.gen_range(1000..=1999u16));
    }
    let wanted: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::new(Ipv4Addr::new(198, 19, x, rng.gen_range(1..255)).into(), *p))
        .collect();
    let w2 = wanted.clone();
    let outside: SocketAddr = format!("198.19.{x}.5:2000").parse().unwrap();
    let ordinary: SocketAddr = format!("198.19.{x}.5:2001").parse().unwrap();
    let got = lab.a.run(move || {
        let steered: Vec<_> = w2.iter().map(|a| dial(*a)).collect();
        (steered, dial(outside), dial(ordinary))
    });
    for (to, r) in wanted.iter().zip(&got.0) {
        assert_eq!(
            r.as_deref(),
            Ok(format!("steered {to}").as_str()),
            "to {to}"
        );
    }
    assert_eq!(
        got.1,
        Err(std::io::ErrorKind::ConnectionRefused),
        "no socket on an unsteered port"
    );
    assert_eq!(
        got.2.as_deref(),
        Ok("plain"),
        "an ordinary listener on an unsteered port"
    );
    server.join().unwrap();
    let v = steers(&env);
    assert_eq!(counter(&v, "range", "steered"), 100, "{v}");
    assert_eq!(counter(&v, "range", "no_socket"), 0, "{v}");
    assert_eq!(
        metric("sluice_steer_lookups_total{steer=\"range\",event=\"steered\"}"),
        Some(100.0)
    );
    // The systemd way: the socket unit starts `sluice steer register NAME
    // --fd 3` with the socket as its fd 3; the agent takes it from the CLI
    // process while the CLI waits.
    let second = lab.b.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let raw = second.as_raw_fd();
    let mut cmd = env.cli_cmd(None, &["steer", "register", "range", "--fd", "3"]);
    // SAFETY: only dup2/fcntl, async-signal-safe, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let rc = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run sluice");
    assert!(out.status.success(), "{}", stderr(&out));
    // (The first listener closed with its thread: nothing open is replaced.)
    assert!(
        stdout(&out).contains("registered") && !stdout(&out).contains("replacing"),
        "{}",
        stdout(&out)
    );
    let accept = std::thread::spawn(move || {
        use std::io::Write as _;
        let (mut c, _) = second.accept().unwrap();
        let _ = c.write_all(b"second\n");
    });
    let to = wanted[0];
    assert_eq!(lab.a.run(move || dial(to)).as_deref(), Ok("second"));
    accept.join().unwrap();
    // The listener closed with its thread: the socket left the map.
    assert_eq!(metric("sluice_steer_socket{steer=\"range\"}"), Some(0.0));

    // A change that makes the registered socket unfit (TCP listener, the
    // steer now UDP) lets go of it, and says so.
    let third = lab.b.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let fd = third.as_raw_fd().to_string();
    env.cli_ok(&["steer", "register", "range", "--pid", &me, "--fd", &fd]);
    assert!(steer(&steers(&env), "range")["socket"].as_u64().is_some());
    let udp = env.file(
        "udp.toml",
        &env.config_text(&format!(
            "{}[[steer]]\nname = \"range\"\nproto = \"udp\"\nprefixes = [\"198.19.{x}.0/24\"]\nports = \"1000-1999\"\n",
            interface_toml(&lab.b, &lab.b_if)
        )),
    );
    env.cli_ok(&["apply", udp.to_str().expect("path")]);
    assert!(
        steer(&steers(&env), "range")["socket"].is_null(),
        "{}",
        steers(&env)
    );
    assert!(
        agent
            .log()
            .contains("its socket was let go: it is a TCP socket; steer range is udp"),
        "{}",
        agent.log()
    );
    drop(third);
}
