//! The L4 load balancer: packets to a VIP that the firewall let through are
//! pinned to a backend (connection table, else the service's Maglev table),
//! rewritten (NAT: destination; DSR: MAC only) and sent with XDP_TX or a redirect.
//! The pipeline counts and records what it decides.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    cty::c_void,
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use sluice_common::{
    Family, L4, Reason, Verdict,
    handoff::IcmpService,
    lb::{
        BACKEND_F_DOWN, BACKEND_F_DRAINING, Backend, CONN_F_CLOSED, Conn, FlowKey, LB_F_ENABLED,
        LbCounter, MODE_DSR, MODE_NAT, MODE_VXLAN, NO_BACKEND, Service, ServiceKey, TABLE_SIZE,
        VXLAN_PORT, flow_hash, lb_stat,
    },
    words_bytes, words_v4,
};

use crate::{
    counters::bump_lb as bump,
    maps::{
        LB_BACKENDS, LB_BE_STATS, LB_CONFIG, LB_CONNS, LB_FIB, LB_ICMP_SVC, LB_MAGLEV,
        LB_NEW_CONNS, LB_SERVICES, LB_SVC_STATS, LB_TX_PORTS,
    },
    net::{
        csum::{apply, apply_udp4, apply_udp6, delta, fold, sum16},
        parse::{MAX_L3_OFF, MAX_L4_OFF, Packet, TCP_FIN, TCP_RST},
        proto::{
            ETH_HLEN, ICMP_DEST_UNREACH, ICMP_PARAMETERPROB, ICMP_TIME_EXCEEDED, ICMPV6_ERROR_MAX,
            IPPROTO_TCP, IPPROTO_UDP,
        },
        ptr::ptr_at,
    },
    time::{conform, now},
};

/// Address families of `bpf_fib_lookup`.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// A pinned connection's last-seen time is refreshed at most this often
/// (a write per packet would bounce the entry's cache line between CPUs).
const REFRESH_NS: u64 = 1_000_000_000;

/// True when load balancing is on and `pkt` is addressed to a VIP (one
/// lookup of the VIP's marker entry). Called by the main program.
#[inline(always)]
pub fn is_vip(pkt: &Packet) -> bool {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return false;
    };
    if cfg.flags & LB_F_ENABLED == 0 {
        return false;
    }
    let key = ServiceKey {
        addr: pkt.dst,
        port: 0,
        proto: 0,
        family: pkt.family.version(),
        _pad: 0,
    };
    // SAFETY: read-only lookup of a plain value.
    unsafe { LB_SERVICES.get(&key).is_some() }
}

#[inline(always)]
fn service_of(pkt: &Packet) -> Option<Service> {
    let mut key = ServiceKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family.version(),
        _pad: 0,
    };
    // SAFETY: read-only lookups of plain values, copied out.
    unsafe {
        if let Some(s) = LB_SERVICES.get(&key) {
            return Some(*s);
        }
        key.port = 0;
        LB_SERVICES.get(&key).copied()
    }
}

#[inline(always)]
fn account(
    slot_stats: &aya_ebpf::maps::PerCpuArray<LbCounter>,
    i: u32,
    bytes: u64,
    new_conn: bool,
) {
    if let Some(c) = slot_stats.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_conn {
                (*c).conns += 1;
            }
        }
    }
}

/// A usable pinned backend for this packet, or None (balance afresh).
#[inline(always)]
fn pinned(key: &FlowKey, pkt: &Packet, svc: &Service, now: u64, idle_ns: u64) -> Option<u32> {
    let c = LB_CONNS.get_ptr_mut(key)?;
    // SAFETY: live map value; racing writers only store whole words.
    let conn = unsafe { &mut *c };
    // `last_ns` lags the latest packet by up to REFRESH_NS: allow for it, so
    // a connection never idle longer than the timeout is never rebalanced.
    let fresh = idle_ns == 0 || now.saturating_sub(conn.last_ns) <= idle_ns + REFRESH_NS;
    let reopened = pkt.is_syn() && conn.flags & CONN_F_CLOSED != 0;
    let usable = fresh
        && !reopened
        && conn.service == svc.id
        && match LB_BACKENDS.get(conn.backend) {
            Some(b) => {
                b.family != 0 && b.generation == conn.generation && b.flags & BACKEND_F_DOWN == 0
            }
            None => false,
        };
    if !usable {
        bump(lb_stat::CONN_REBALANCED);
        return None;
    }
    if now.saturating_sub(conn.last_ns) > REFRESH_NS {
        conn.last_ns = now;
    }
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 && conn.flags & CONN_F_CLOSED == 0 {
        conn.flags |= CONN_F_CLOSED;
    }
    Some(conn.backend)
}

/// Picks a backend from the service's Maglev table.
#[inline(always)]
fn pick(pkt: &Packet, svc: &Service) -> u32 {
    let idx = flow_hash(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto) % TABLE_SIZE;
    match LB_MAGLEV.get_value(svc.id, &idx) {
        Some(b) => *b,
        None => NO_BACKEND,
    }
}

/// What the LB does with a packet the firewall let through to a VIP. The
/// packet's offsets are within `MAX_L3_OFF` / `MAX_L4_OFF`.
#[inline(always)]
pub fn balance(ctx: &XdpContext, pkt: &Packet, bytes: u64) -> Decision {
    // ICMP errors are handled here, not in `decide`: each of the two
    // needs most of the stack the verifier allows a chain of calls.
    if !pkt.fragment && matches!(pkt.l4, L4::Icmp | L4::Icmpv6) {
        icmp_decision(ctx, pkt)
    } else {
        decide(ctx, pkt, bytes)
    }
}

/// What the LB did with a packet.
pub struct Decision {
    pub verdict: Verdict,
    /// None: the firewall's reason stands.
    pub reason: Option<Reason>,
    /// Backend slot + 1 (0: none).
    pub backend: u32,
    /// The XDP action.
    pub action: u32,
}

impl Decision {
    const fn pass_on(action: u32, backend: u32) -> Self {
        Self {
            verdict: Verdict::Pass,
            reason: None,
            backend,
            action,
        }
    }

    const fn drop(reason: Reason, backend: u32) -> Self {
        Self {
            verdict: Verdict::Drop,
            reason: Some(reason),
            backend,
            action: xdp_action::XDP_DROP,
        }
    }
}

// Its own call frame: the LB program's stack is near the verifier's limit.
#[inline(never)]
fn decide(ctx: &XdpContext, pkt: &Packet, bytes: u64) -> Decision {
    if pkt.fragment {
        return Decision::drop(Reason::VipFragment, 0);
    }
    let Some(svc) = service_of(pkt) else {
        // A VIP, but no service for this port or protocol (ping, ...): the stack decides.
        return Decision::pass_on(xdp_action::XDP_PASS, 0);
    };
    if !matches!(pkt.l4, L4::Tcp | L4::Udp) {
        return Decision::pass_on(xdp_action::XDP_PASS, 0);
    }
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Decision::pass_on(xdp_action::XDP_PASS, 0);
    };
    let now = now();
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family.version(),
        _pad: 0,
    };
    let idle = if matches!(pkt.l4, L4::Tcp) {
        cfg.tcp_idle_ns
    } else {
        cfg.udp_idle_ns
    };
    let mut new_conn = false;
    let mut counted = false;
    let id = match pinned(&key, pkt, &svc, now, idle) {
        Some(id) => id,
        None => {
            let id = pick(pkt, &svc);
            if id == NO_BACKEND {
                account(&LB_SVC_STATS, svc.id, bytes, false);
                return Decision::drop(Reason::NoBackend, 0);
            }
            new_conn = true;
            let recorded = record(
                &key,
                id,
                svc.id,
                now,
                cfg.new_conn_interval_ns,
                cfg.new_conn_tolerance_ns,
            );
            // A connection is counted once: when recorded, or (past the cap)
            // at its SYN; a UDP flow past the cap is not counted.
            counted = recorded || pkt.is_syn();
            id
        }
    };
    let Some(be) = LB_BACKENDS.get(id) else {
        return Decision::drop(Reason::NoBackend, 0);
    };
    if be.family == 0 || (new_conn && be.flags & (BACKEND_F_DOWN | BACKEND_F_DRAINING) != 0) {
        // The table still names a backend that just left it.
        return Decision::drop(Reason::NoBackend, 0);
    }
    account(&LB_SVC_STATS, svc.id, bytes, counted);
    account(&LB_BE_STATS, id, bytes, counted);
    if svc.mode == MODE_NAT && dnat(ctx, pkt, be) != 0 {
        return Decision::drop(Reason::Malformed, id + 1);
    }
    let action = if svc.mode == MODE_VXLAN {
        encap(ctx, pkt, be, svc.vni)
    } else {
        forward(ctx, pkt, be, svc.mode == MODE_DSR)
    };
    if action == xdp_action::XDP_DROP {
        return Decision::drop(Reason::NoBackend, id + 1);
    }
    Decision::pass_on(action, id + 1)
}

#[inline(always)]
fn icmp_decision(ctx: &XdpContext, pkt: &Packet) -> Decision {
    let id = icmp_error(ctx, pkt);
    if id == NO_BACKEND {
        return Decision::pass_on(xdp_action::XDP_PASS, 0);
    }
    let Some(be) = LB_BACKENDS.get(id) else {
        return Decision::pass_on(xdp_action::XDP_PASS, 0);
    };
    let (mode, vni) = match LB_ICMP_SVC.get(0) {
        Some(m) => (m.mode, m.vni),
        None => (MODE_NAT, 0),
    };
    let action = if mode == MODE_VXLAN {
        encap(ctx, pkt, be, vni)
    } else {
        forward(ctx, pkt, be, mode == MODE_DSR)
    };
    if action == xdp_action::XDP_DROP {
        return Decision::drop(Reason::NoBackend, id + 1);
    }
    Decision::pass_on(action, id + 1)
}

/// An ICMP error about a balanced connection (a router on the way to the
/// client saying "fragmentation needed", ...), addressed to the VIP: finds
/// the connection from the packet quoted inside, and for NAT rewrites the
/// outer destination and the quoted source to the backend (checksums
/// updated). Returns the backend slot (its service's mode in `LB_ICMP_SVC`), or
/// `NO_BACKEND` when the error is about nothing sluice balanced.
// Its own call frame: the LB program's stack is near the verifier's limit.
#[inline(never)]
fn icmp_error(ctx: &XdpContext, pkt: &Packet) -> u32 {
    icmp_error_inner(ctx, pkt).unwrap_or(NO_BACKEND)
}

#[inline(always)]
fn icmp_error_inner(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let l3 = core::hint::black_box(pkt.l3_off);
    let l4 = core::hint::black_box(pkt.l4_off);
    if l3 > MAX_L3_OFF || l4 > MAX_L4_OFF {
        return None;
    }
    let v4 = matches!(pkt.family, Family::V4);
    // SAFETY (all reads and writes below): bounds-checked by ptr_at.
    // Reads are at least 2 bytes: for 1-byte reads the compiler turns the
    // bounds check into a form the verifier does not follow.
    let ty = unsafe { (*ptr_at::<[u8; 2]>(ctx, l4)?)[0] };
    let error = if v4 {
        matches!(
            ty,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
    } else {
        (1..=ICMPV6_ERROR_MAX).contains(&ty)
    };
    if !error {
        return None;
    }
    let i3 = l4 + 8;
    // The quoted packet: what the VIP sent the client.
    let (inner_src_off, inner_proto, i4) = if v4 {
        let vihl = unsafe { (*ptr_at::<[u8; 2]>(ctx, i3)?)[0] };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        (
            i3 + 12,
            unsafe { (*ptr_at::<[u8; 2]>(ctx, i3 + 8)?)[1] },
            i3 + ihl,
        )
    } else {
        (
            i3 + 8,
            unsafe { (*ptr_at::<[u8; 2]>(ctx, i3 + 6)?)[0] },
            i3 + 40,
        )
    };
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return None;
    }
    let ports = unsafe { *ptr_at::<[u8; 4]>(ctx, i4)? };
    let inner_sport = u16::from_be_bytes([ports[0], ports[1]]);
    let inner_dport = u16::from_be_bytes([ports[2], ports[3]]);
    let mut isrc = [0u8; 16];
    let mut idst = [0u8; 16];
    if v4 {
        let a = unsafe { *ptr_at::<[u8; 4]>(ctx, inner_src_off)? };
        let b = unsafe { *ptr_at::<[u8; 4]>(ctx, inner_src_off + 4)? };
        isrc[..4].copy_from_slice(&a);
        idst[..4].copy_from_slice(&b);
    } else {
        isrc = unsafe { *ptr_at::<[u8; 16]>(ctx, inner_src_off)? };
        idst = unsafe { *ptr_at::<[u8; 16]>(ctx, inner_src_off + 16)? };
    }
    let vip = sluice_common::addr_words(&isrc);
    // The quoted packet came from the VIP the error is addressed to.
    if vip != pkt.dst {
        return None;
    }
    let key = FlowKey {
        src: sluice_common::addr_words(&idst),
        dst: vip,
        sport: inner_dport,
        dport: inner_sport,
        proto: inner_proto,
        family: pkt.family.version(),
        _pad: 0,
    };
    let conn = LB_CONNS.get_ptr(&key)?;
    // SAFETY: live map value.
    let (id, service) = unsafe { ((*conn).backend, (*conn).service) };
    let be = LB_BACKENDS.get(id)?;
    if be.family == 0 {
        return None;
    }
    let svc_key = ServiceKey {
        addr: vip,
        port: inner_sport,
        proto: inner_proto,
        family: pkt.family.version(),
        _pad: 0,
    };
    // SAFETY: read-only lookups of plain values.
    let svc = unsafe {
        match LB_SERVICES.get(&svc_key) {
            Some(s) => *s,
            None => *LB_SERVICES.get(&ServiceKey { port: 0, ..svc_key })?,
        }
    };
    if svc.id != service {
        return None;
    }
    if let Some(m) = LB_ICMP_SVC.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe {
            *m = IcmpService {
                mode: svc.mode,
                vni: svc.vni,
            };
        }
    }
    bump(lb_stat::ICMP_TRANSLATED);
    if svc.mode != MODE_NAT {
        return Some(id);
    }
    let new = words_bytes(be.addr);
    let check = ptr_at::<[u8; 2]>(ctx, l4 + 2)?;
    let mut icmp_delta = 0u64;
    if v4 {
        let dst = ptr_at::<[u8; 4]>(ctx, l3 + 16)?;
        let ipck = ptr_at::<[u8; 2]>(ctx, l3 + 10)?;
        let n4 = [new[0], new[1], new[2], new[3]];
        unsafe {
            apply(ipck, delta(&*dst, &n4));
            *dst = n4;
        }
        let isrc_p = ptr_at::<[u8; 4]>(ctx, inner_src_off)?;
        let ick = ptr_at::<[u8; 2]>(ctx, i3 + 10)?;
        unsafe {
            let d = delta(&*isrc_p, &n4);
            icmp_delta += d;
            let old_ck = *ick;
            apply(ick, d);
            icmp_delta += delta(&old_ck, &*ick);
            *isrc_p = n4;
        }
    } else {
        let dst = ptr_at::<[u8; 16]>(ctx, l3 + 24)?;
        unsafe {
            // ICMPv6's checksum covers the pseudo-header (outer addresses).
            icmp_delta += delta(&*dst, &new);
            *dst = new;
        }
        let isrc_p = ptr_at::<[u8; 16]>(ctx, inner_src_off)?;
        unsafe {
            icmp_delta += delta(&*isrc_p, &new);
            *isrc_p = new;
        }
    }
    if be.port != 0 && be.port != inner_sport {
        let sp = ptr_at::<[u8; 2]>(ctx, i4)?;
        let np = be.port.to_be_bytes();
        unsafe {
            icmp_delta += delta(&*sp, &np);
            *sp = np;
        }
    }
    apply(check, icmp_delta);
    Some(id)
}

/// Records a new connection unless the new-connection rate is exceeded;
/// true when recorded.
#[inline(always)]
fn record(key: &FlowKey, id: u32, service: u32, now: u64, interval: u64, tolerance: u64) -> bool {
    let room = match LB_NEW_CONNS.get_ptr_mut(0) {
        Some(b) => interval == 0 || conform(b, now, interval, tolerance),
        None => false,
    };
    if !room {
        bump(lb_stat::CONN_CAPPED);
        // An entry this flow replaces (closed, idle, its backend gone) must
        // not keep pinning the rest of it elsewhere than this packet went.
        let _ = LB_CONNS.remove(key);
        return false;
    }
    let generation = match LB_BACKENDS.get(id) {
        Some(b) => b.generation,
        None => 0,
    };
    let conn = Conn {
        backend: id,
        generation,
        service,
        flags: 0,
        created_ns: now,
        last_ns: now,
    };
    if LB_CONNS.insert(key, &conn, 0).is_ok() {
        bump(lb_stat::CONN_CREATED);
        true
    } else {
        bump(lb_stat::CONN_INSERT_FAILED);
        let _ = LB_CONNS.remove(key);
        false
    }
}

/// Rewrites the destination address (and port) to the backend's, with
/// incremental IP and TCP/UDP checksum updates.
// A call of its own keeps the LB program's stack frame under the limit.
#[inline(never)]
fn dnat(ctx: &XdpContext, pkt: &Packet, be: &Backend) -> u32 {
    match dnat_inner(ctx, pkt, be) {
        Some(()) => 0,
        None => 1,
    }
}

#[inline(always)]
fn dnat_inner(ctx: &XdpContext, pkt: &Packet, be: &Backend) -> Option<()> {
    // Re-bounded here: the verifier checks this function on its own.
    let l3 = core::hint::black_box(pkt.l3_off);
    let l4 = core::hint::black_box(pkt.l4_off);
    if l3 > MAX_L3_OFF || l4 > MAX_L4_OFF {
        return None;
    }
    let tcp = pkt.proto == IPPROTO_TCP;
    let check_off = if tcp { l4 + 16 } else { l4 + 6 };
    let check = ptr_at::<[u8; 2]>(ctx, check_off)?;
    let mut d: u64;
    match pkt.family {
        Family::V4 => {
            let dst = ptr_at::<[u8; 4]>(ctx, l3 + 16)?;
            let ipck = ptr_at::<[u8; 2]>(ctx, l3 + 10)?;
            let new = words_v4(be.addr);
            // SAFETY: bounds-checked by ptr_at.
            let old = unsafe { *dst };
            d = delta(&old, &new);
            apply(ipck, d);
            // SAFETY: as above.
            unsafe { *dst = new };
        }
        Family::V6 => {
            let dst = ptr_at::<[u8; 16]>(ctx, l3 + 24)?;
            let new = words_bytes(be.addr);
            // SAFETY: bounds-checked by ptr_at.
            let old = unsafe { *dst };
            d = delta(&old, &new);
            // SAFETY: as above.
            unsafe { *dst = new };
        }
        Family::Other => return None,
    }
    if be.port != 0 && be.port != pkt.dport {
        let port = ptr_at::<[u8; 2]>(ctx, l4 + 2)?;
        let new = be.port.to_be_bytes();
        // SAFETY: bounds-checked by ptr_at.
        let old = unsafe { *port };
        d += delta(&old, &new);
        // SAFETY: as above.
        unsafe { *port = new };
    }
    match (tcp, pkt.family) {
        (false, Family::V4) => apply_udp4(check, d),
        (false, _) => apply_udp6(check, d),
        _ => apply(check, d),
    }
    Some(())
}

/// Sends the rewritten frame towards the backend: the FIB gives the next
/// hop's MAC and the egress interface. NAT frames whose next hop is not
/// known, or whose egress sluice is not attached to, go to the stack
/// (which resolves and forwards them); DSR frames cannot (their
/// destination is the VIP) and are dropped, counted by why.
// A call of its own keeps the LB program's stack frame under the limit.
#[inline(never)]
fn forward(ctx: &XdpContext, pkt: &Packet, be: &Backend, dsr: bool) -> u32 {
    let fallback = |ctx: &XdpContext| {
        let _ = ctx;
        if dsr {
            bump(lb_stat::NO_NEIGHBOUR);
            xdp_action::XDP_DROP
        } else {
            bump(lb_stat::TO_STACK);
            xdp_action::XDP_PASS
        }
    };
    // The 64-byte lookup lives in a per-CPU scratch slot: the LB program's
    // stack is near the verifier's limit.
    let Some(pp) = LB_FIB.get_ptr_mut(0) else {
        return fallback(ctx);
    };
    let pp = pp.cast::<FibParams>();
    // SAFETY: per-CPU slot, only this CPU uses it while the program runs.
    let p = unsafe { &mut *pp };
    // SAFETY: bpf_fib_lookup is plain data; zeroed is a valid start.
    *p = unsafe { core::mem::zeroed() };
    let ingress = ctx.ingress_ifindex() as u32;
    p.ifindex = ingress;
    p.l4_protocol = pkt.proto;
    p.sport = pkt.sport.to_be();
    p.dport = if be.port != 0 {
        be.port.to_be()
    } else {
        pkt.dport.to_be()
    };
    let l3 = core::hint::black_box(pkt.l3_off);
    if l3 > MAX_L3_OFF {
        return fallback(ctx);
    }
    let tot = (ctx.data_end() - ctx.data()).saturating_sub(l3) as u16;
    match pkt.family {
        Family::V4 => {
            p.family = AF_INET;
            p.__bindgen_anon_1.tot_len = tot;
            p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(words_v4(pkt.src));
            p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(words_v4(be.addr));
        }
        _ => {
            p.family = AF_INET6;
            p.__bindgen_anon_1.tot_len = tot;
            p.__bindgen_anon_3.ipv6_src = words_u32(pkt.src);
            p.__bindgen_anon_4.ipv6_dst = words_u32(be.addr);
        }
    }
    // SAFETY: p is a valid bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast::<c_void>(),
            pp,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return fallback(ctx);
    }
    if l3 != ETH_HLEN && (!dsr || p.ifindex != ingress) {
        // VLAN-tagged: the stack knows which tag the egress needs (NAT); a
        // DSR frame can only go back out where it came in, tag and all.
        return fallback(ctx);
    }
    // Redirect only where a redirect is known to land: the receiving
    // interface (XDP_TX) or interfaces sluice is attached to (`LB_TX_PORTS`,
    // whose devmap takes only devices that can send XDP frames). Elsewhere
    // a redirected frame may vanish uncounted (a veth drops it unless its
    // peer has NAPI), so NAT goes to the stack and DSR, which cannot, is
    // dropped and counted.
    let same = p.ifindex == ingress;
    let in_ports = !same && LB_TX_PORTS.get(p.ifindex).is_some();
    if !same && !in_ports {
        if dsr {
            bump(lb_stat::EGRESS_NOT_ATTACHED);
            return xdp_action::XDP_DROP;
        }
        bump(lb_stat::TO_STACK);
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *eth = macs };
    if same {
        bump(lb_stat::TX);
        return xdp_action::XDP_TX;
    }
    bump(lb_stat::REDIRECT);
    LB_TX_PORTS
        .redirect(p.ifindex, 0)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// Outer headers of a VXLAN-encapsulated frame: Ethernet, IPv4, UDP, VXLAN.
const VXLAN_HDRS: usize = 14 + 20 + 8 + 8;
const BPF_FIB_LOOKUP_SRC: u32 = 16;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Encapsulates the frame in VXLAN to the backend (`MODE_VXLAN`): outer
/// source = this host's address on the route to the backend (from the FIB),
/// UDP source port from the flow hash (so the path spreads flows as ECMP
/// would), VNI of the service. The inner frame keeps the client's packet
/// untouched but for its MACs: the destination becomes `vxlan_mac(vni)`,
/// which the backend's VXLAN device must have (TCP takes only frames
/// addressed to the receiving device). Sent with XDP_TX or a redirect
/// to an interface sluice is attached to; otherwise dropped and counted
/// (`no_neighbour`: next hop unresolved; `egress_not_attached`: another
/// egress).
// A call of its own keeps the LB program's stack frame under the limit.
#[inline(never)]
fn encap(ctx: &XdpContext, pkt: &Packet, be: &Backend, vni: u32) -> u32 {
    if be.family != 4 {
        return xdp_action::XDP_DROP;
    }
    let Some(pp) = LB_FIB.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    let pp = pp.cast::<FibParams>();
    // SAFETY: per-CPU slot, only this CPU uses it while the program runs.
    let p = unsafe { &mut *pp };
    // SAFETY: bpf_fib_lookup is plain data; zeroed is a valid start.
    *p = unsafe { core::mem::zeroed() };
    let ingress = ctx.ingress_ifindex() as u32;
    let inner_len = ctx.data_end() - ctx.data();
    let sport =
        0xc000 | (flow_hash(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto) as u16 & 0x3fff);
    p.family = AF_INET;
    p.ifindex = ingress;
    p.l4_protocol = IPPROTO_UDP;
    p.sport = sport.to_be();
    p.dport = VXLAN_PORT.to_be();
    p.__bindgen_anon_1.tot_len = (inner_len + VXLAN_HDRS - 14) as u16;
    let d = words_v4(be.addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(d);
    // SAFETY: p is a valid bpf_fib_lookup in map memory.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast::<c_void>(),
            pp,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    let known = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    if !known && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        bump(lb_stat::NO_NEIGHBOUR);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the lookup filled the source address (BPF_FIB_LOOKUP_SRC).
    let src = unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
    let (dmac, smac, oif) = (p.dmac, p.smac, p.ifindex);
    // SAFETY: growing the headroom by a fixed amount.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VXLAN_HDRS as i32)) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let Some(h) = ptr_at::<[u8; VXLAN_HDRS + 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let ip_len = ((inner_len + VXLAN_HDRS - 14) as u16).to_be_bytes();
    let udp_len = ((inner_len + 16) as u16).to_be_bytes();
    let sp = sport.to_be_bytes();
    let vp = VXLAN_PORT.to_be_bytes();
    let v = vni.to_be_bytes();
    // Sent from here only to where a frame lands (see `forward`). The stack
    // cannot take the rest: it drops packets that arrive with one of its own
    // addresses as their source.
    let tx = known && oif == ingress;
    let redirect = known && !tx && LB_TX_PORTS.get(oif).is_some();
    if !tx && !redirect {
        bump(if known {
            lb_stat::EGRESS_NOT_ATTACHED
        } else {
            lb_stat::NO_NEIGHBOUR
        });
        return xdp_action::XDP_DROP;
    }
    let dst = dmac;
    let mut ip = [
        0x45, 0, ip_len[0], ip_len[1], 0, 0, 0x40, 0, 64, 17, 0, 0, src[0], src[1], src[2], src[3],
        d[0], d[1], d[2], d[3],
    ];
    let c = fold(sum16(&ip)).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    // SAFETY: bounds-checked by ptr_at; the whole outer header plus the
    // inner MACs are written.
    unsafe {
        let h = &mut *h;
        h[..6].copy_from_slice(&dst);
        h[6..12].copy_from_slice(&smac);
        h[12] = 0x08;
        h[13] = 0x00;
        h[14..34].copy_from_slice(&ip);
        h[34..42].copy_from_slice(&[sp[0], sp[1], vp[0], vp[1], udp_len[0], udp_len[1], 0, 0]);
        h[42..50].copy_from_slice(&[0x08, 0, 0, 0, v[1], v[2], v[3], 0]);
        h[50..56].copy_from_slice(&sluice_common::lb::vxlan_mac(vni));
        h[56..62].copy_from_slice(&smac);
    }
    if tx {
        bump(lb_stat::TX);
        return xdp_action::XDP_TX;
    }
    bump(lb_stat::REDIRECT);
    LB_TX_PORTS.redirect(oif, 0).unwrap_or(xdp_action::XDP_DROP)
}

/// `addr_words` words as the four network-order u32 words bpf_fib_lookup wants.
#[inline(always)]
fn words_u32(w: [u64; 2]) -> [u32; 4] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    ]
}
