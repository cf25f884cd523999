//! Section 8: what a TCP connect()+close costs through the socket LB, the
//! packet LB (XDP NAT in, TC reverse NAT out), and directly to the backend,
//! same run. Three namespaces: a client, the LB host (sluice attached to
//! its client-facing veth, the socket LB serving it) and a backend with a
//! listener. Local clients (on the LB host) use the socket LB; remote
//! clients (the client namespace, routed through the LB host) the packet
//! LB; each is compared with a direct connect from the same place.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use sluice::{
    dataplane::{AttachMode, PinRoot, attach},
    model::lb::{BackendAddr, BackendSpec, LbService, Mode, Proto, ServiceId, ServiceSpec},
};

use crate::{
    Plan,
    netns::{Netns, PinDir},
    stats::{Measurement, Section},
    util,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 1);
const LB_C: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);
const LB_B: Ipv4Addr = Ipv4Addr::new(198, 18, 41, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 41, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 40, 10);
const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Where the direct connects go: the same backend host, a port no service
/// names (replies from a NAT backend's service port are translated back to
/// the VIP on the LB host's client-facing interface, whoever they are for).
const DIRECT_PORT: u16 = 8081;

#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    /// The LB host itself (a local client).
    Local,
    /// The client namespace, routed through the LB host.
    Remote,
}

struct Case {
    name: &'static str,
    key: &'static str,
    from: From,
    to: SocketAddr,
    socket_lb: bool,
    /// The case this one is compared with (its key).
    baseline: Option<&'static str>,
}

fn cases() -> [Case; 5] {
    let vip = SocketAddr::from((VIP, PORT));
    let backend = SocketAddr::from((BACKEND, DIRECT_PORT));
    [
        Case {
            name: "local client, direct to the backend (baseline)",
            key: "local-direct",
            from: From::Local,
            to: backend,
            socket_lb: false,
            baseline: None,
        },
        Case {
            name: "local client, direct to the backend, socket LB on (not a service)",
            key: "local-direct-socket-lb-on",
            from: From::Local,
            to: backend,
            socket_lb: true,
            baseline: Some("local-direct"),
        },
        Case {
            name: "local client to the VIP: socket LB",
            key: "local-socket-lb",
            from: From::Local,
            to: vip,
            socket_lb: true,
            baseline: Some("local-direct"),
        },
        Case {
            name: "remote client, direct to the backend through the LB host (baseline)",
            key: "remote-direct",
            from: From::Remote,
            to: backend,
            socket_lb: false,
            baseline: None,
        },
        Case {
            name: "remote client to the VIP: packet LB (XDP NAT, TC reverse NAT)",
            key: "remote-packet-lb",
            from: From::Remote,
            to: vip,
            socket_lb: false,
            baseline: Some("remote-direct"),
        },
    ]
}

fn veth(
    a: &Netns,
    a_if: &str,
    a_ip: Ipv4Addr,
    b: &Netns,
    b_if: &str,
    b_ip: Ipv4Addr,
) -> Result<()> {
    a.exec_ok(&[
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
    ])?;
    for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
        ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
        ns.exec_ok(&["ip", "link", "set", "dev", ifname, "up"])?;
    }
    Ok(())
}

fn service() -> LbService {
    LbService {
        spec: ServiceSpec {
            id: ServiceId {
                vip: VIP.into(),
                port: PORT,
                proto: Proto::Tcp,
            },
            mode: Mode::Nat,
            backends: vec![BackendSpec {
                addr: BackendAddr {
                    addr: BACKEND.into(),
                    port: BACKEND_PORT,
                },
                weight: 1,
                draining: false,
            }],
        },
        health: None,
        socket: true,
    }
}

/// The socket LB on or off, set from the LB host's namespace (it serves
/// the namespace it is turned on from).
fn socket_lb(lb: &Netns, root: &PinRoot, on: bool) -> Result<()> {
    let root = root.clone();
    lb.run(move || {
        sluice::engine::sock_lb::apply(&root, on, &[service()], None)
            .map(|_| ())
            .map_err(|e| anyhow!("socket LB: {e}"))
    })
}

pub fn run(plan: &Plan) -> Result<Section> {
    let mut sec = Section::new(
        "socklb",
        "socket LB: connect() cost",
        "TCP connect()+close (RST) to a listener in a backend namespace: from the LB host \
         (sluice attached to its client-facing veth) directly to the backend, and to the VIP \
         through the socket LB (the address rewritten in connect(), no per-packet work); from \
         a client namespace routed through the LB host directly to the backend, and to the VIP \
         through the packet LB (XDP DNAT on the way in, TC reverse NAT on the way out). Mean ns \
         per connect over the batch, median over rounds (each round runs every case once); \
         over_baseline_ns compares each path with the direct connect from the same place, \
         measured in the same run.",
    );
    let connects: usize = if plan.smoke { 200 } else { 20_000 };
    let client = Netns::new("slc")?;
    let lb = Netns::new("sll")?;
    let backend = Netns::new("slb")?;
    let tag = std::process::id() % 10_000;
    let (c_if, lc_if, lb_if, b_if) = (
        format!("sc{tag}"),
        format!("slc{tag}"),
        format!("slb{tag}"),
        format!("sb{tag}"),
    );
    veth(&client, &c_if, CLIENT, &lb, &lc_if, LB_C)?;
    veth(&lb, &lb_if, LB_B, &backend, &b_if, BACKEND)?;
    client.exec_ok(&["ip", "route", "add", "default", "via", &LB_C.to_string()])?;
    backend.exec_ok(&["ip", "route", "add", "default", "via", &LB_B.to_string()])?;
    lb.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let pins = PinDir::new();
    {
        let (root, iface, label) = (pins.root.clone(), lc_if.clone(), lb.name().to_string());
        lb.run(move || {
            attach::attach(&root, &iface, AttachMode::Native, &label)
                .map(|_| ())
                .map_err(|e| anyhow!("sluice attach: {e}"))
        })?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut accepts = Vec::new();
    for port in [BACKEND_PORT, DIRECT_PORT] {
        let listener = backend.run(move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            // SAFETY: listen() again on a listening socket only resizes its backlog.
            if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
                bail!("listen: {}", std::io::Error::last_os_error());
            }
            Ok(l)
        })?;
        let stop = stop.clone();
        accepts.push(std::thread::spawn(move || {
            while let Ok((s, _)) = listener.accept() {
                drop(s);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    let result = (|| -> Result<()> {
        sluice::engine::lb::apply(&pins.root, &[service().spec], &HashSet::new())
            .map_err(|e| anyhow!("sluice lb apply: {e}"))?;
        let cases = cases();
        // Rounds: every case once per round, so drift in the machine's
        // load falls on all of them alike.
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(plan.runs); cases.len()];
        for round in 0..=plan.runs {
            for (i, c) in cases.iter().enumerate() {
                util::check_stop()?;
                socket_lb(&lb, &pins.root, c.socket_lb)?;
                let ns = match c.from {
                    From::Local => &lb,
                    From::Remote => &client,
                };
                let to = c.to;
                // Round 0 warms neighbour entries, routes and caches: not kept.
                let n = if round == 0 {
                    connects / 10 + 1
                } else {
                    connects
                };
                let took = ns
                    .run(move || {
                        let t = Instant::now();
                        for _ in 0..n {
                            match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                                Ok(s) => util::close_now(s),
                                Err(e) => bail!("connect to {to}: {e}"),
                            }
                        }
                        Ok(t.elapsed())
                    })
                    .map_err(|e| anyhow!("{}: {e}", c.name))?;
                if round > 0 {
                    samples[i].push(took.as_nanos() as f64 / n as f64);
                }
            }
        }
        let mut medians: Vec<(&str, f64)> = Vec::new();
        for (c, samples) in cases.iter().zip(samples) {
            let mut m = Measurement::from_samples(
                &format!("socklb/{}", c.key),
                c.name,
                "ns/connect",
                samples,
                "mean ns per TCP connect() (+ RST close) over the batch, median over rounds",
            )
            .param("connects", connects);
            if let Some(x) = m.median {
                if let Some(b) = c
                    .baseline
                    .and_then(|k| medians.iter().find(|(key, _)| *key == k))
                {
                    m = m.with_extra("over_baseline_ns", x - b.1);
                }
                medians.push((c.key, x));
            }
            sec.push(m);
        }
        Ok(())
    })();
    let _ = socket_lb(&lb, &pins.root, false);
    stop.store(true, Ordering::Relaxed);
    let _ = lb.run(move || {
        for port in [BACKEND_PORT, DIRECT_PORT] {
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from((BACKEND, port)),
                Duration::from_secs(2),
            );
        }
        Ok(())
    });
    for a in accepts {
        let _ = a.join();
    }
    {
        let (root, iface, label) = (pins.root.clone(), lc_if.clone(), lb.name().to_string());
        let _ = lb.run(move || {
            attach::detach(&root, &iface, &label)
                .map(|_| ())
                .map_err(|e| anyhow!("sluice detach: {e}"))
        });
    }
    result?;
    Ok(sec)
}
