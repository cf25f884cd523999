//! VXLAN direct server return: the encapsulation byte for byte (in a
//! namespace whose FIB knows the backend), the stack fallback when the next
//! hop is not resolved, and real connections through a backend that
//! decapsulates with a Linux VXLAN device and answers the client itself.
//! Needs root.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sluice::{
    dataplane::lb as lbmaps,
    model::lb::{BackendSpec, Mode, ServiceSpec},
};
use sluice_common::{
    addr_words,
    lb::{flow_hash, vxlan_mac},
};

use crate::support::{
    agent::{AgentEnv, AgentProc},
    frames::{Frame, checksum},
    kernel::{hex, new_sandbox},
    netns::{Netns, link_mac},
};

const XDP_DROP: u32 = 1;
const XDP_REDIRECT: u32 = 4;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 1);
const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
const BE_LB: Ipv4Addr = Ipv4Addr::new(198, 18, 21, 1);
const BE4: Ipv4Addr = Ipv4Addr::new(198, 18, 21, 2);
const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x21, 0x02];
const VNI: u32 = 4242;

fn words(a: Ipv4Addr) -> [u64; 2] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.octets());
    addr_words(&b)
}

fn spec(vip: &str, backend: &str, mode: Mode) -> ServiceSpec {
    ServiceSpec {
        id: vip.parse().unwrap(),
        mode,
        backends: vec![BackendSpec {
            addr: backend.parse().unwrap(),
            weight: 1,
            draining: false,
        }],
    }
}

/// The frame the LB must send: outer Ethernet, IPv4 (DF, TTL 64), UDP 4789
/// (no checksum), VXLAN with the VNI, then the client's frame addressed to
/// the VNI's MAC, from the LB's.
fn encapsulated(
    outer_dst: [u8; 6],
    lb_mac: [u8; 6],
    src: Ipv4Addr,
    inner: &[u8],
    sport: u16,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&outer_dst);
    out.extend_from_slice(&lb_mac);
    out.extend_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 8 + 8 + inner.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&BE4.octets());
    let c = checksum(&ip).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    out.extend_from_slice(&ip);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&4789u16.to_be_bytes());
    out.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    let v = VNI.to_be_bytes();
    out.extend_from_slice(&[0x08, 0, 0, 0, v[1], v[2], v[3], 0]);
    out.extend_from_slice(&vxlan_mac(VNI));
    out.extend_from_slice(&lb_mac);
    out.extend_from_slice(&inner[12..]);
    out
}

#[test]
fn vxlan_encapsulation_exact_bytes() {
    // A namespace where the FIB resolves the backend: a veth towards it with
    // a permanent neighbour entry, and forwarding on.
    let ns = Netns::new("vxp");
    let peer = Netns::new("vxq");
    let id = std::process::id() % 100_000;
    let (lb_if, be_if) = (format!("vl{id}"), format!("vb{id}"));
    ns.exec_ok([
        "ip",
        "link",
        "add",
        &lb_if,
        "type",
        "veth",
        "peer",
        "name",
        &be_if,
        "netns",
        peer.name(),
    ]);
    ns.exec_ok(["ip", "addr", "add", &format!("{BE_LB}/24"), "dev", &lb_if]);
    ns.exec_ok(["ip", "link", "set", "dev", &lb_if, "up"]);
    peer.exec_ok(["ip", "link", "set", "dev", &be_if, "up"]);
    ns.exec_ok(["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let lb_mac = link_mac(&ns, &lb_if);
    let inner = Frame::v4(CLIENT4, VIP4)
        .tcp(40000, 80)
        .tcp_flags(0x02)
        .payload(b"hi")
        .build();
    let sport = 0xc000 | (flow_hash(words(CLIENT4), words(VIP4), 40000, 80, 6) as u16 & 0x3fff);
    let frame = inner.clone();
    // Everything from here runs on a thread inside the namespace (the FIB
    // lookups happen there); commands it starts are in it too.
    let (first, second) = ns.run(move || {
        let sb = new_sandbox();
        sluice::engine::lb::apply(
            sb.root(),
            &[spec(
                "198.19.1.10:80/tcp",
                "198.18.21.2",
                Mode::Vxlan { vni: VNI },
            )],
            &HashSet::new(),
        )
        .unwrap();
        let first = sb.run_out(&frame).unwrap();
        let status = std::process::Command::new("ip")
            .args([
                "neigh",
                "replace",
                &BE4.to_string(),
                "lladdr",
                "02:00:00:00:21:02",
                "dev",
                &lb_if,
                "nud",
                "permanent",
            ])
            .status()
            .expect("ip neigh");
        assert!(status.success());
        let index = nix::net::if_::if_nametoindex(lb_if.as_str()).expect("ifindex");
        lbmaps::add_tx_port(sb.root(), index).unwrap();
        let second = sb.run_out(&frame).unwrap();
        ((first.0.action, first.1), (second.0.action, second.1))
    });
    // Neighbour not known yet: encapsulated and handed to the stack, which
    // takes a frame addressed to its own MAC (the client's destination).
    // Neighbour not known yet: dropped (the stack would refuse a packet
    // with its own address as the source) and counted.
    assert_eq!(first.0, XDP_DROP, "next hop unresolved: dropped");
    // Neighbour known, egress a TX port: redirected to its MAC (test_run's
    // frames come in on the namespace's loopback, the backend is behind
    // the veth).
    let want = encapsulated(BE_MAC, lb_mac, BE_LB, &inner, sport);
    assert_eq!(second.0, XDP_REDIRECT);
    assert!(
        second.1 == want,
        "VXLAN\n got:\n{}\nwant:\n{}",
        hex(&second.1),
        hex(&want)
    );
    drop(peer);
}

/// A server on `port` in a namespace: answers each connection with `name`.
fn serve(
    ns: &Netns,
    port: u16,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.spawn(move || {
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        tx.send(()).expect("ready");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = writeln!(s, "{name}");
                }
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    h
}

#[test]
fn vxlan_dsr_serves_real_connections() {
    let client = Netns::new("vxc");
    let lb = Netns::new("vxl");
    let be = Netns::new("vxb");
    let id = std::process::id() % 10_000;
    let (c_if, l_if, lb_be, be_if) = (
        format!("c{id}"),
        format!("l{id}"),
        format!("lx{id}"),
        format!("bx{id}"),
    );
    client.exec_ok([
        "ip",
        "link",
        "add",
        &c_if,
        "type",
        "veth",
        "peer",
        "name",
        &l_if,
        "netns",
        lb.name(),
    ]);
    lb.exec_ok([
        "ip",
        "link",
        "add",
        &lb_be,
        "type",
        "veth",
        "peer",
        "name",
        &be_if,
        "netns",
        be.name(),
    ]);
    for (ns, ifname, addr) in [
        (&client, &c_if, CLIENT4),
        (&lb, &l_if, LB4),
        (&lb, &lb_be, BE_LB),
        (&be, &be_if, BE4),
    ] {
        ns.exec_ok(["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname]);
        ns.exec_ok(["ip", "link", "set", "dev", ifname, "up"]);
    }
    client.exec_ok([
        "ip",
        "route",
        "add",
        &format!("{VIP4}/32"),
        "via",
        &LB4.to_string(),
    ]);
    // A veth hands partial (offloaded) checksums across; frames XDP sends on
    // would carry them unfinished. Real NICs deliver full checksums.
    client.exec_ok(["ethtool", "-K", &c_if, "tx", "off"]);
    lb.exec_ok(["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The backend: VIP on lo, a VXLAN device for the VNI, replies to the
    // client through its default route (the LB host only forwards them).
    be.exec_ok(["ip", "addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    be.exec_ok(["ip", "route", "add", "default", "via", &BE_LB.to_string()]);
    let mac = vxlan_mac(VNI).map(|b| format!("{b:02x}")).join(":");
    be.exec_ok([
        "ip",
        "link",
        "add",
        "vx0",
        "address",
        &mac,
        "type",
        "vxlan",
        "id",
        &VNI.to_string(),
        "dstport",
        "4789",
        "local",
        &BE4.to_string(),
        "dev",
        &be_if,
    ]);
    be.exec_ok(["ip", "link", "set", "dev", "vx0", "up"]);
    for k in ["all", "default", "vx0", &be_if, "lo"] {
        be.exec(["sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(&be, 80, "vxlan-backend", stop.clone());
    // The LB redirects to the backend-facing veth (sluice is attached to it
    // too); a veth takes redirected frames only if its peer runs XDP, so
    // the backend's end gets sluice as well (its own pin root, pass-all).
    let be_pins = crate::support::netns::PinRoot::new();
    let be_pin_root = be_pins.path().display().to_string();
    crate::support::netns::run_ok([
        crate::support::cli::SLUICE,
        "-n",
        be.name(),
        "--pin-root",
        &be_pin_root,
        "--no-agent",
        "attach",
        &be_if,
        "--mode",
        "native",
    ]);

    let env = AgentEnv::new("vx");
    env.write_config(&format!(
        "[lb]\nconnections = 4096\n\n[[interface]]\nname = \"{l_if}\"\nmode = \"native\"\n\n[[interface]]\nname = \"{lb_be}\"\nmode = \"native\"\n\n[[service]]\nvip = \"{VIP4}:80/tcp\"\nmode = \"vxlan\"\nvni = {VNI}\nbackends = [\"{BE4}\"]\nhealth = {{ check = \"tcp\", port = 80, interval = \"200ms\", timeout = \"150ms\" }}\n"
    ));
    let netns_arg = format!("--net={}", lb.path().display());
    let _agent = AgentProc::start_wrapped(&env, &["nsenter", &netns_arg], &[]);

    let ok = client.run(|| {
        (0..50)
            .filter(|_| {
                let Ok(s) = TcpStream::connect_timeout(
                    &SocketAddr::new(IpAddr::V4(VIP4), 80),
                    Duration::from_secs(2),
                ) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).is_ok() && line.trim() == "vxlan-backend"
            })
            .count()
    });
    if ok != 50 {
        let v = env.cli(&["lb", "list", "--json"]);
        eprintln!("lb list: {}", String::from_utf8_lossy(&v.stdout));
        for args in [
            vec!["ip", "-s", "link", "show", "vx0"],
            vec!["ip", "-s", "link", "show", be_if.as_str()],
            vec!["nstat", "-az"],
        ] {
            let o = be.exec(&args);
            eprintln!("backend {args:?}:\n{}", String::from_utf8_lossy(&o.stdout));
        }
        let o = lb.exec(["ip", "-s", "link", "show", lb_be.as_str()]);
        eprintln!("lb {}:\n{}", lb_be, String::from_utf8_lossy(&o.stdout));
        let o = lb.exec(["ip", "neigh"]);
        eprintln!("lb neigh:\n{}", String::from_utf8_lossy(&o.stdout));
    }
    assert_eq!(ok, 50, "connections through the VXLAN DSR service");
    let v = env.cli_json(&["lb", "list", "--json"]);
    let row = &v["services"][0];
    assert_eq!(row["mode"], "vxlan", "{v:#}");
    assert_eq!(
        v["connection_capacity"], 4096,
        "[lb] connections sizes the table: {v:#}"
    );
    assert!(row["connections"].as_u64().unwrap_or(0) >= 50, "{v:#}");
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}
