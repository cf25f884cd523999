//! Section 6: the load balancer. Per-packet cost of the LB path (new flow,
//! established flow, IPv6, DSR) against the same program on traffic that is
//! not for a VIP; live Mpps forwarded through a DSR service; control-plane
//! time to build and swap Maglev tables, up to 512 services x 8 backends.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    maps::{Array, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use sluice::{
    dataplane::{
        AttachMode, PinRoot, attach,
        lb::{self as lbmaps},
        sandbox::{Sandbox, XDP_PASS, XDP_TX},
    },
    model::lb::{BackendSpec, Mode, ServiceSpec, maglev},
};
use sluice_common::{
    Bucket,
    lb::{LbConfig, TABLE_SIZE},
    map_names,
};

use crate::{
    Plan,
    frames::{self, L4, Spec},
    netns::{Lab, PinDir},
    progs::XdpMd,
    report::group,
    stats::{Measurement, percentile},
    util,
};

pub fn method(plan: &Plan) -> String {
    let (services, per) = capacity(plan);
    format!(
        "Per packet: two namespaces and a veth pair (as in section 2); sluice attached natively to the receiving end, with \
         ip_forward on and permanent neighbour entries for the backends (behind that same veth), so the LB's FIB lookup \
         succeeds and it rewrites the MACs and returns XDP_TX. BPF_PROG_TEST_RUN is \
         called from inside that namespace with the veth as the frame's ingress interface (ctx_in), on 64-byte TCP frames \
         (74 bytes for IPv6). Baselines: the same program on the same kind of frame to an address that is no VIP, with no \
         service at all (LB off) and with the services configured (one extra lookup: is this a VIP?). `repeat` rows: the \
         kernel's mean over {rep} back-to-back runs on one frame. BPF_PROG_TEST_RUN re-runs on the frame the previous run \
         left, and NAT rewrites the destination, so these NAT rows use a service whose backend is the VIP itself (same port): \
         every run takes the full hit path (connection-table hit, backend lookup, checksum update, FIB lookup, MAC rewrite, \
         XDP_TX) on an unchanged frame; the DSR row needs no such trick (DSR rewrites only MACs). `single` rows: {k} calls with \
         repeat 1, the kernel's time for each (one run plus one clock read, ns resolution), median per run; new flows need \
         them (each call a new source port, so every run misses the connection table, picks from the Maglev table and \
         inserts), and the `single` established row with a real backend (port 80 -> 8080) checks the identity-backend trick \
         against a real rewrite. The over-the-cap row is a new flow while the new-connection cap is exhausted (Maglev pick, \
         not recorded: what a SYN flood's packets cost). Every measured call is checked: verdict, and LB_STATS deltas (hits \
         create no entry, new flows create exactly one each, over-cap packets are capped, non-VIP packets touch no LB \
         counter). Cells are medians over {runs} runs; +ns is a row's median minus its baseline's. \
         Live: the harness of section 2 (generator namespace flooding 64-byte UDP frames from 65,536 sources over a veth, \
         {w:.2} s window after {wu:.2} s warm-up, fresh namespaces per run, configurations in turn inside each run). The \
         generator's veth runs bench_drop_all in every configuration so frames sent back to it are taken off its rings and \
         counted. LB: a DSR service on the receiver's own address (every UDP port), 4 backends behind the same veth \
         (routes and permanent neighbours): the LB balances each frame, gives it the backend's MAC and sends it back out \
         with XDP_TX; Mpps = frames that arrived back at the generator's veth per second of the window. DSR rather than \
         NAT because the generator (with BPF_PROG_TEST_RUN live frames, where the kernel allows them) recycles its pages: a NAT rewrite of the destination \
         would leave the recycled frames addressed to a backend instead of the VIP. Its baseline is a reflector on the \
         same path (bench_trafficgen attached to the receiver: rewrite the source, XDP_TX), counted the same way; the \
         firewall rows (ceiling XDP_DROP, sluice deny-list drop, sluice pass to the stack) count frames the receiver took \
         off its rings, as in section 2. Checks: the LB's XDP_TX counter matches the frames the receiver took in and \
         nothing reached its stack. \
         Control plane: a sluice Sandbox; `lb::apply` timed from call to return (backends written, Maglev table of \
         {TABLE_SIZE} slots built, filled into a new array with one batched update and swapped in with one map update). \
         From empty: one service with 100 / 1,000 backends, and {services} services x {per} backends; one table rebuilt: a \
         weight change in the 100 / 1,000-backend service; `maglev::build` alone is the user-space share. After the \
         {services}-service apply the kernel's state is read back and checked.",
        rep = plan.pp_repeat,
        k = singles(plan),
        runs = plan.runs,
        w = plan.live_window.as_secs_f64(),
        wu = plan.live_warmup.as_secs_f64(),
    )
}

/// Calls with repeat 1 per `single` measurement and run.
pub fn singles(plan: &Plan) -> usize {
    if plan.smoke { 200 } else { 5_000 }
}

/// Services and backends per service of the capacity row.
fn capacity(plan: &Plan) -> (usize, usize) {
    if plan.smoke { (32, 8) } else { (512, 8) }
}

// ---------------------------------------------------------------------------
// Shared plumbing
// ---------------------------------------------------------------------------

/// sluice attached natively to a lab's receiving veth, with its own pins;
/// detached and unpinned on drop (the lab's namespaces outlive it).
pub struct SluiceOn<'a> {
    lab: &'a Lab,
    pins: PinDir,
    attached: bool,
}

impl<'a> SluiceOn<'a> {
    pub fn attach(lab: &'a Lab) -> Result<Self> {
        let mut g = Self {
            lab,
            pins: PinDir::new(),
            attached: false,
        };
        let (root, iface, label) = (
            g.pins.root.clone(),
            lab.rx_if.clone(),
            lab.rx.name().to_string(),
        );
        lab.rx.run(move || {
            attach::attach(&root, &iface, AttachMode::Native, &label)
                .map_err(|e| anyhow!("sluice attach: {e}"))
        })?;
        g.attached = true;
        Ok(g)
    }

    pub fn root(&self) -> &PinRoot {
        &self.pins.root
    }
}

impl Drop for SluiceOn<'_> {
    fn drop(&mut self) {
        if self.attached {
            let (root, iface, label) = (
                self.pins.root.clone(),
                self.lab.rx_if.clone(),
                self.lab.rx.name().to_string(),
            );
            let _ = self.lab.rx.run(move || {
                attach::detach(&root, &iface, &label)
                    .map(|_| ())
                    .map_err(|e| anyhow!("sluice detach: {e}"))
            });
        }
        // The PinDir removes whatever is left of the pins.
    }
}

pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes the receiver a router whose backends sit behind its own veth:
/// forwarding on, a permanent neighbour entry (the generator's MAC) for each
/// address, and for IPv6 an address on the veth.
pub fn backends_behind_veth(lab: &Lab, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<()> {
    let ns = &lab.rx;
    let mac = mac_text(lab.tx_mac);
    ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    if !v6.is_empty() {
        ns.exec_ok(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{}.disable_ipv6=0", lab.rx_if),
        ])?;
        ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])?;
        ns.exec_ok(&[
            "ip", "-6", "addr", "add", RX_V6_NET, "dev", &lab.rx_if, "nodad",
        ])?;
    }
    let all = v4
        .iter()
        .map(|a| IpAddr::from(*a))
        .chain(v6.iter().map(|a| IpAddr::from(*a)));
    for a in all {
        // On-link: the FIB must know a route before the neighbour counts.
        let (family, host) = if a.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        ns.exec_ok(&[
            "ip",
            family,
            "route",
            "replace",
            &format!("{a}/{host}"),
            "dev",
            &lab.rx_if,
        ])?;
        ns.exec_ok(&[
            "ip",
            family,
            "neigh",
            "replace",
            &a.to_string(),
            "lladdr",
            &mac,
            "dev",
            &lab.rx_if,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

pub fn service(id: &str, mode: Mode, backends: &[String]) -> Result<ServiceSpec> {
    Ok(ServiceSpec {
        id: id.parse().map_err(|e| anyhow!("{id}: {e}"))?,
        mode,
        backends: backends
            .iter()
            .map(|b| {
                Ok(BackendSpec {
                    addr: b.parse().map_err(|e| anyhow!("{b}: {e}"))?,
                    weight: 1,
                    draining: false,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    })
}

pub fn apply(root: &PinRoot, services: &[ServiceSpec]) -> Result<()> {
    sluice::engine::lb::apply(root, services, &HashSet::new())
        .map_err(|e| anyhow!("lb apply: {e}"))?;
    Ok(())
}

/// One LB_STATS counter (summed over CPUs) by name.
pub fn lb_stat(root: &PinRoot, name: &str) -> Result<u64> {
    lbmaps::stats(root)
        .map_err(|e| anyhow!("lb stats: {e}"))?
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .with_context(|| format!("no LB counter {name}"))
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// Replaces the 16-bit word at `at` and updates each checksum at `cks`
/// incrementally (RFC 1624).
fn patch16(frame: &mut [u8], at: usize, new: u16, cks: &[usize]) {
    let old = u16::from_be_bytes([frame[at], frame[at + 1]]);
    for &ck in cks {
        let hc = u16::from_be_bytes([frame[ck], frame[ck + 1]]);
        let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        frame[ck..ck + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    frame[at..at + 2].copy_from_slice(&new.to_be_bytes());
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// An untagged TCP frame (64 bytes for IPv4, 74 for IPv6) from the
/// generator's side to the receiver, with the given source port and flags.
fn tcp_frame(lab: &Lab, src: IpAddr, dst: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
    tcp_frame_macs(lab.tx_mac, lab.rx_mac, src, dst, sport, flags)
}

fn tcp_frame_macs(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut s = Spec::new(src, dst, L4::Tcp);
    s.dport = SERVICE_PORT;
    s.src_mac = src_mac;
    s.dst_mac = dst_mac;
    let mut f = frames::build(&s);
    let l4 = if src.is_ipv6() { 14 + 40 } else { 14 + 20 };
    patch16(&mut f, l4, sport, &[l4 + 16]);
    let w = u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]);
    patch16(&mut f, l4 + 12, (w & 0xff00) | u16::from(flags), &[l4 + 16]);
    f
}

// ---------------------------------------------------------------------------
// Per packet
// ---------------------------------------------------------------------------

const SERVICE_PORT: u16 = 80;
const RX_V6_NET: &str = "2001:2:0:ff::2/64";
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 5);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 5);
/// NAT service whose only backend is the VIP itself (see the method text).
const VIP_SAME4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 10);
const VIP_SAME6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10);
/// NAT service with 4 real backends on port 8080.
const VIP_NAT4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 11);
/// DSR service with 4 backends.
const VIP_DSR4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 12);
/// Addresses that are no VIP (the baselines).
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 50);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x50);

fn nat_backends() -> Vec<Ipv4Addr> {
    (21..25).map(|i| Ipv4Addr::new(198, 19, 255, i)).collect()
}

fn dsr_backends() -> Vec<Ipv4Addr> {
    (31..35).map(|i| Ipv4Addr::new(198, 19, 255, i)).collect()
}

fn pp_services() -> Result<Vec<ServiceSpec>> {
    Ok(vec![
        service(
            &format!("{VIP_SAME4}:{SERVICE_PORT}/tcp"),
            Mode::Nat,
            &[format!("{VIP_SAME4}:{SERVICE_PORT}")],
        )?,
        service(
            &format!("{VIP_NAT4}:{SERVICE_PORT}/tcp"),
            Mode::Nat,
            &nat_backends()
                .iter()
                .map(|a| format!("{a}:8080"))
                .collect::<Vec<_>>(),
        )?,
        service(
            &format!("{VIP_DSR4}:{SERVICE_PORT}/tcp"),
            Mode::Dsr,
            &dsr_backends()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )?,
        service(
            &format!("[{VIP_SAME6}]:{SERVICE_PORT}/tcp"),
            Mode::Nat,
            &[format!("[{VIP_SAME6}]:{SERVICE_PORT}")],
        )?,
    ])
}

/// What a measured packet must do to the LB's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Not for a VIP: no LB counter moves.
    NotVip,
    /// Connection-table hit: one XDP_TX each, no new entry.
    Hit,
    /// New connection: one entry created and one XDP_TX each.
    NewFlow,
    /// New connection over the cap: capped (not recorded), one XDP_TX each.
    OverCap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// One call, `repeat` runs on one frame: the kernel's mean.
    Repeat,
    /// Calls with repeat 1: median of the kernel's time per call.
    Single,
}

struct PpCase {
    id: &'static str,
    label: &'static str,
    /// Services configured (false: none, LB off).
    lb: bool,
    how: How,
    path: Path,
    expect: u32,
    /// The frame (for `NewFlow`: the first one; later calls change the
    /// source address and port).
    frame: Vec<u8>,
    /// Id of the row this one is compared with.
    base: Option<&'static str>,
}

fn pp_cases(lab: &Lab) -> Vec<PpCase> {
    let ack4 = |dst: Ipv4Addr| tcp_frame(lab, CLIENT4.into(), dst.into(), 40_000, TCP_ACK);
    let ack6 = |dst: Ipv6Addr| tcp_frame(lab, CLIENT6.into(), dst.into(), 40_000, TCP_ACK);
    let case = |id, label, lb, how, path, expect, frame, base| PpCase {
        id,
        label,
        lb,
        how,
        path,
        expect,
        frame,
        base,
    };
    use How::{Repeat, Single};
    use Path::{Hit, NewFlow, NotVip, OverCap};
    vec![
        case(
            "pp/baseline-off-v4",
            "baseline: no service (LB off), IPv4 non-VIP",
            false,
            Repeat,
            NotVip,
            XDP_PASS,
            ack4(OTHER4),
            None,
        ),
        case(
            "pp/baseline-off-v6",
            "baseline: no service (LB off), IPv6 non-VIP",
            false,
            Repeat,
            NotVip,
            XDP_PASS,
            ack6(OTHER6),
            None,
        ),
        case(
            "pp/baseline-on-v4",
            "baseline: services configured, IPv4 non-VIP",
            true,
            Repeat,
            NotVip,
            XDP_PASS,
            ack4(OTHER4),
            Some("pp/baseline-off-v4"),
        ),
        case(
            "pp/established-nat-v4",
            "LB established flow (hit), NAT, IPv4",
            true,
            Repeat,
            Hit,
            XDP_TX,
            ack4(VIP_SAME4),
            Some("pp/baseline-off-v4"),
        ),
        case(
            "pp/established-nat-v6",
            "LB established flow (hit), NAT, IPv6",
            true,
            Repeat,
            Hit,
            XDP_TX,
            ack6(VIP_SAME6),
            Some("pp/baseline-off-v6"),
        ),
        case(
            "pp/established-dsr-v4",
            "LB established flow (hit), DSR, IPv4",
            true,
            Repeat,
            Hit,
            XDP_TX,
            ack4(VIP_DSR4),
            Some("pp/baseline-off-v4"),
        ),
        case(
            "pp/new-over-cap-v4",
            "LB new flow over the new-connection cap (pick, not recorded), NAT, IPv4",
            true,
            Repeat,
            OverCap,
            XDP_TX,
            tcp_frame(lab, CLIENT4.into(), VIP_SAME4.into(), 33_333, TCP_SYN),
            Some("pp/baseline-off-v4"),
        ),
        case(
            "single/baseline-off-v4",
            "baseline: no service (LB off), IPv4 non-VIP",
            false,
            Single,
            NotVip,
            XDP_PASS,
            ack4(OTHER4),
            None,
        ),
        case(
            "single/baseline-on-v4",
            "baseline: services configured, IPv4 non-VIP",
            true,
            Single,
            NotVip,
            XDP_PASS,
            ack4(OTHER4),
            Some("single/baseline-off-v4"),
        ),
        case(
            "single/established-nat-v4-same",
            "LB established flow (hit), NAT to the VIP itself, IPv4",
            true,
            Single,
            Hit,
            XDP_TX,
            ack4(VIP_SAME4),
            Some("single/baseline-off-v4"),
        ),
        case(
            "single/established-nat-v4",
            "LB established flow (hit), NAT 80 -> backend:8080, IPv4",
            true,
            Single,
            Hit,
            XDP_TX,
            ack4(VIP_NAT4),
            Some("single/baseline-off-v4"),
        ),
        case(
            "single/new-flow-nat-v4",
            "LB new flow (miss, Maglev pick, insert), NAT 80 -> backend:8080, IPv4",
            true,
            Single,
            NewFlow,
            XDP_TX,
            tcp_frame(lab, CLIENT4.into(), VIP_NAT4.into(), 1024, TCP_SYN),
            Some("single/baseline-off-v4"),
        ),
    ]
}

/// BPF_PROG_TEST_RUN of the attached program with `ifindex` as ingress
/// (the calling thread must be in its namespace): (action, ns per run).
fn run_on(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, f64)> {
    let md = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    // SAFETY: XdpMd is repr(C) plain data.
    let ctx =
        unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(ctx);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .map_err(|e| anyhow!("test_run: {e}: {:?}", std::error::Error::source(&e)))?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// The new-flow frame number `i` (IPv4): source port 1024 + i % 60,000,
/// source address 198.18.128.0 + i / 60,000.
fn new_flow_frame(first: &[u8], i: usize) -> Vec<u8> {
    let mut f = first.to_vec();
    let (ip_ck, l4) = (14 + 10, 14 + 20);
    // The address is in the IP header checksum and the TCP pseudo-header.
    patch16(
        &mut f,
        14 + 14,
        0x8000 + (i / 60_000) as u16,
        &[ip_ck, l4 + 16],
    );
    patch16(&mut f, l4, 1024 + (i % 60_000) as u16, &[l4 + 16]);
    f
}

#[derive(Clone, Copy)]
struct Params {
    runs: usize,
    repeat: u32,
    singles: usize,
}

/// Per-run samples of each case, in the order of `pp_cases`.
fn pp_measure(
    root: PinRoot,
    ifindex: u32,
    cases: &[PpCase],
    p: Params,
    services: &[ServiceSpec],
) -> Result<Vec<Vec<f64>>> {
    let prog = Xdp::from_pin(root.prog(), aya_obj::programs::XdpAttachType::Interface)
        .map_err(|e| anyhow!("opening the pinned sluice program: {e}"))?;
    let mut out: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    let mut flows = 0usize;
    let stats = |root: &PinRoot| -> Result<[u64; 4]> {
        Ok([
            lb_stat(root, "tx")?,
            lb_stat(root, "conns_created")?,
            lb_stat(root, "conns_capped")?,
            lb_stat(root, "to_stack")?,
        ])
    };
    for _ in 0..p.runs {
        for lb_on in [false, true] {
            apply(&root, if lb_on { services } else { &[] })?;
            for (i, c) in cases.iter().enumerate() {
                util::check_stop()?;
                if c.lb != lb_on {
                    continue;
                }
                let saved_cfg = if c.path == Path::OverCap {
                    Some(exhaust_cap(&root)?)
                } else {
                    None
                };
                let r = (|| -> Result<f64> {
                    // Warm-up: pins an established flow, caches warm.
                    if c.path != Path::NewFlow {
                        let (a, _) = run_on(&prog, &c.frame, ifindex, 1)?;
                        if a != c.expect {
                            bail!("{}: verdict {a}, expected {}", c.label, c.expect);
                        }
                    }
                    let before = stats(&root)?;
                    let (value, n) = match c.how {
                        How::Repeat => {
                            let (a, ns) = run_on(&prog, &c.frame, ifindex, p.repeat)?;
                            if a != c.expect {
                                bail!("{}: verdict {a}, expected {}", c.label, c.expect);
                            }
                            (ns, u64::from(p.repeat))
                        }
                        How::Single => {
                            let mut v = Vec::with_capacity(p.singles);
                            for _ in 0..p.singles {
                                let frame = if c.path == Path::NewFlow {
                                    flows += 1;
                                    new_flow_frame(&c.frame, flows)
                                } else {
                                    c.frame.clone()
                                };
                                let (a, ns) = run_on(&prog, &frame, ifindex, 1)?;
                                if a != c.expect {
                                    bail!("{}: verdict {a}, expected {}", c.label, c.expect);
                                }
                                v.push(ns);
                            }
                            (percentile(&v, 50.0), p.singles as u64)
                        }
                    };
                    let after = stats(&root)?;
                    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
                    let (tx, created, capped, to_stack) = (d[0], d[1], d[2], d[3]);
                    let ok = match c.path {
                        Path::NotVip => tx == 0 && created == 0 && capped == 0 && to_stack == 0,
                        Path::Hit => tx == n && created == 0 && capped == 0,
                        Path::NewFlow => tx == n && created == n && capped == 0,
                        Path::OverCap => tx == n && created == 0 && capped == n,
                    };
                    if !ok {
                        bail!(
                            "{}: not the {:?} path: over {n} runs the LB counted tx {tx}, \
                             conns_created {created}, conns_capped {capped}, to_stack {to_stack}",
                            c.label,
                            c.path
                        );
                    }
                    Ok(value)
                })();
                if let Some(cfg) = saved_cfg {
                    restore_cap(&root, cfg)?;
                }
                out[i].push(r?);
            }
        }
    }
    Ok(out)
}

fn new_conns_bucket(root: &PinRoot) -> Result<Array<MapData, Bucket>> {
    let path = root.map(map_names::LB_NEW_CONNS);
    let data = MapData::from_pin(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Array::try_from(Map::Array(data)).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Exhausts the new-connection cap (returns the settings to restore).
fn exhaust_cap(root: &PinRoot) -> Result<LbConfig> {
    let cfg = lbmaps::config(root).map_err(|e| anyhow!("lb config: {e}"))?;
    lbmaps::set_config(
        root,
        LbConfig {
            new_conn_interval_ns: 1 << 40,
            new_conn_tolerance_ns: 0,
            ..cfg
        },
    )
    .map_err(|e| anyhow!("lb config: {e}"))?;
    new_conns_bucket(root)?
        .set(
            0,
            Bucket {
                tat_ns: u64::MAX / 2,
                ..Bucket::default()
            },
            0,
        )
        .map_err(|e| anyhow!("LB_NEW_CONNS: {e}"))?;
    Ok(cfg)
}

fn restore_cap(root: &PinRoot, cfg: LbConfig) -> Result<()> {
    lbmaps::set_config(root, cfg).map_err(|e| anyhow!("lb config: {e}"))?;
    new_conns_bucket(root)?
        .set(0, Bucket::default(), 0)
        .map_err(|e| anyhow!("LB_NEW_CONNS: {e}"))?;
    Ok(())
}

const PP_METHOD_REPEAT: &str = "BPF_PROG_TEST_RUN on the attached program (veth as ingress), repeat on one frame: kernel mean ns per run, median over runs";
const PP_METHOD_SINGLE: &str = "BPF_PROG_TEST_RUN on the attached program (veth as ingress), repeat 1: median of the kernel's ns per call within a run, median over runs";

pub fn per_packet(plan: &Plan) -> Result<Vec<Measurement>> {
    let lab = Lab::new(1)?;
    let sluice = SluiceOn::attach(&lab)?;
    let mut v4 = vec![VIP_SAME4];
    v4.extend(nat_backends());
    v4.extend(dsr_backends());
    backends_behind_veth(&lab, &v4, &[VIP_SAME6])?;
    let services = pp_services()?;
    let cases = pp_cases(&lab);
    let ifindex = lab.rx.ifindex(&lab.rx_if)?;
    let p = Params {
        runs: plan.runs,
        repeat: plan.pp_repeat,
        singles: singles(plan),
    };
    let root = sluice.root().clone();
    let meta: Vec<_> = cases
        .iter()
        .map(|c| (c.id, c.label, c.how, c.base, c.frame.len()))
        .collect();
    let samples = lab
        .rx
        .run(move || pp_measure(root, ifindex, &cases, p, &services))?;
    let mut out: Vec<Measurement> = Vec::new();
    for ((id, label, how, _, len), s) in meta.iter().zip(samples) {
        let (method, kind) = match how {
            How::Repeat => (PP_METHOD_REPEAT, "repeat"),
            How::Single => (PP_METHOD_SINGLE, "single"),
        };
        let mut m = Measurement::from_samples(id, label, "ns/packet", s, method)
            .param("how", kind)
            .param("frame_bytes", *len);
        if *how == How::Repeat {
            m = m.param("repeat", plan.pp_repeat);
        } else {
            m = m.param("calls", singles(plan));
        }
        out.push(m);
    }
    for (i, (_, _, _, base, _)) in meta.iter().enumerate() {
        let Some(b) = base else { continue };
        let bm = out.iter().find(|m| m.id == *b).and_then(|m| m.median);
        if let (Some(bm), Some(x)) = (bm, out[i].median) {
            out[i].extra.insert("over_baseline_ns".into(), x - bm);
            out[i].params.insert("baseline".into(), (*b).into());
        }
    }
    drop(sluice);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------

fn backends_of(n: usize, first: u32) -> Vec<String> {
    (0..n as u32)
        .map(|k| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + first + k);
            format!("{a}:8080")
        })
        .collect()
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

pub fn control(plan: &Plan) -> Result<Vec<Measurement>> {
    let sb = Sandbox::new().map_err(|e| anyhow!("sluice sandbox: {e}"))?;
    let root = sb.root().clone();
    let (n_svc, per) = capacity(plan);
    let mut rows: Vec<(String, String, String, Vec<f64>)> = Vec::new();
    let mut push = |id: String, label: String, method: &str, v: f64| {
        if let Some(r) = rows.iter_mut().find(|r| r.0 == id) {
            r.3.push(v);
        } else {
            rows.push((id, label, method.to_string(), vec![v]));
        }
    };
    let many: Vec<ServiceSpec> = (0..n_svc)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i as u32);
            service(
                &format!("{vip}:80/tcp"),
                Mode::Nat,
                &backends_of(per, (i * per) as u32),
            )
        })
        .collect::<Result<_>>()?;
    for run in 0..plan.runs {
        for n in [100usize, 1_000] {
            util::check_stop()?;
            eprintln!("  lb: control plane, {n} backends, run {}", run + 1);
            let names = backends_of(n, 0);
            let list: Vec<maglev::Member<'_>> = names
                .iter()
                .enumerate()
                .map(|(i, name)| maglev::Member {
                    name,
                    slot: i as u32,
                    weight: 1,
                })
                .collect();
            let ms = timed(|| {
                maglev::build(&list, TABLE_SIZE)
                    .map(|_| ())
                    .map_err(|e| anyhow!("maglev: {e}"))
            })?;
            push(
                format!("cp/maglev-build/{n}"),
                format!("maglev::build, {} backends (user space only)", group(n)),
                "wall time of maglev::build for a table of 65,537 slots",
                ms,
            );
            let mut svc = service("198.18.0.10:80/tcp", Mode::Nat, &names)?;
            apply(&root, &[])?;
            let ms = timed(|| apply(&root, std::slice::from_ref(&svc)))?;
            push(
                format!("cp/add-service/{n}"),
                format!("apply: add a service with {} backends", group(n)),
                "wall time of lb::apply from an empty LB",
                ms,
            );
            // One weight change: that table is rebuilt and swapped.
            svc.backends[0].weight = 2;
            let ms = timed(|| apply(&root, std::slice::from_ref(&svc)))?;
            push(
                format!("cp/reweight/{n}"),
                format!(
                    "apply: one weight changed in the {}-backend service (table rebuilt, swapped)",
                    group(n)
                ),
                "wall time of lb::apply changing one backend's weight",
                ms,
            );
            let st = sluice::engine::lb::read(&root).map_err(|e| anyhow!("lb read: {e}"))?;
            if st.len() != 1 || st[0].members.len() != n {
                bail!(
                    "after apply: {} services, expected 1 with {n} backends",
                    st.len()
                );
            }
        }
        util::check_stop()?;
        eprintln!(
            "  lb: control plane, {n_svc} services x {per} backends, run {}",
            run + 1
        );
        apply(&root, &[])?;
        let ms = timed(|| apply(&root, &many))?;
        push(
            format!("cp/many/{n_svc}x{per}"),
            format!(
                "apply: {n_svc} services x {per} backends ({} backends) from empty",
                group(n_svc * per)
            ),
            "wall time of lb::apply from an empty LB",
            ms,
        );
        if run == 0 {
            check_many(&sb, &many, per)?;
        }
        let ms = timed(|| apply(&root, &[]))?;
        push(
            format!("cp/remove-many/{n_svc}x{per}"),
            format!("apply: remove all {n_svc} services"),
            "wall time of lb::apply to an empty LB",
            ms,
        );
    }
    Ok(rows
        .into_iter()
        .map(|(id, label, method, s)| Measurement::from_samples(&id, &label, "ms", s, &method))
        .collect())
}

/// The kernel holds every service with every backend in its table, and a
/// packet to the last service is balanced.
fn check_many(sb: &Sandbox, many: &[ServiceSpec], per: usize) -> Result<()> {
    let st = sluice::engine::lb::read(sb.root()).map_err(|e| anyhow!("lb read: {e}"))?;
    let members: usize = st.iter().map(|s| s.members.len()).sum();
    let empty = st
        .iter()
        .flat_map(|s| &s.members)
        .filter(|m| m.table_slots == 0)
        .count();
    if st.len() != many.len() || members != many.len() * per || empty != 0 {
        bail!(
            "after apply: {} services, {members} backends ({empty} without table slots); expected {} and {}",
            st.len(),
            many.len(),
            many.len() * per
        );
    }
    let last = many.last().context("no services")?;
    let mut s = Spec::new(CLIENT4.into(), last.id.vip, L4::Tcp);
    s.dport = last.id.port;
    let before = lb_stat(sb.root(), "conns_created")?;
    let r = sb
        .run(&frames::build(&s))
        .map_err(|e| anyhow!("test_run: {e}"))?;
    let created = lb_stat(sb.root(), "conns_created")? - before;
    if created != 1 {
        bail!(
            "a packet to {} was not balanced (verdict {}, conns_created +{created})",
            last.id,
            r.action
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn l4_valid(f: &[u8]) -> bool {
        let v6 = f[12] == 0x86;
        let (src, dst, l4) = if v6 {
            (&f[22..38], &f[38..54], &f[54..])
        } else {
            (&f[26..30], &f[30..34], &f[34..])
        };
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(src);
        pseudo.extend_from_slice(dst);
        if v6 {
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
        } else {
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        pseudo.extend_from_slice(l4);
        frames::checksum(&pseudo) == 0
    }

    fn spec_frame(src: IpAddr, dst: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
        tcp_frame_macs(frames::SRC_MAC, frames::DST_MAC, src, dst, sport, flags)
    }

    #[test]
    fn patched_frames_keep_valid_checksums() {
        let f = spec_frame(CLIENT4.into(), VIP_NAT4.into(), 1234, TCP_ACK);
        assert_eq!(f.len(), 64);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1234);
        assert_eq!(f[34 + 13], TCP_ACK);
        assert!(l4_valid(&f));
        assert_eq!(frames::checksum(&f[14..34]), 0);
        let f = spec_frame(CLIENT6.into(), VIP_SAME6.into(), 999, TCP_SYN);
        assert_eq!(f.len(), 74);
        assert!(l4_valid(&f));
        let first = spec_frame(CLIENT4.into(), VIP_NAT4.into(), 1024, TCP_SYN);
        for i in [1usize, 59_999, 60_000, 123_456] {
            let g = new_flow_frame(&first, i);
            assert!(l4_valid(&g), "flow {i}");
            assert_eq!(frames::checksum(&g[14..34]), 0, "flow {i}");
            assert_eq!(&g[26..28], &[198, 18]);
            assert_eq!(
                u16::from_be_bytes([g[28], g[29]]),
                0x8000 + (i / 60_000) as u16
            );
        }
    }
}
