//! The socket load balancer: a local client's connect() (TCP, connected
//! UDP) or sendmsg() (unconnected UDP) to a service is given a backend from
//! the service's Maglev table, the same table and backend health the packet
//! LB uses, so the connection goes straight to the backend with no per-packet
//! NAT. getpeername() and recvmsg() then report the VIP. Part of the socket
//! object (`sock_main.rs`); the programs attach to the root cgroup and act
//! only on sockets of the dataplane's network namespace.
//!
//! A socket's backend is `table[socket_hash(cookie) % TABLE_SIZE]`: fixed
//! for the socket's life (every datagram of a UDP socket goes to one
//! backend), and predictable from `SO_COOKIE`.

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use sluice_common::{
    lb::{
        BACKEND_F_DOWN, BACKEND_F_DRAINING, NO_BACKEND, Service, ServiceKey, TABLE_SIZE,
        socket_hash,
    },
    sock::{SOCK_LB_F_ENABLED, SockLbSock, sock_lb_stat},
};

use crate::{
    lb_maps::{LB_BACKENDS, LB_MAGLEV, LB_SERVICES},
    sock_maps::{SOCK_LB_BACKENDS, SOCK_LB_CONFIG, SOCK_LB_OFF, SOCK_LB_SOCKS, SOCK_LB_STATS},
    sockaddr,
};

/// The call goes on (with whatever address it now has).
const PROCEED: i32 = 1;
/// The call fails (with the error set by `bpf_set_retval`).
const FAIL: i32 = 0;
const EHOSTUNREACH: i32 = 113;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[inline(always)]
fn bump(i: u32) {
    if let Some(n) = SOCK_LB_STATS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
}

/// The socket LB is on and `ctx` is a socket of the namespace it serves.
#[inline(always)]
fn serves(ctx: *mut core::ffi::c_void) -> bool {
    let Some(cfg) = SOCK_LB_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: plain helper call on the program's context.
    cfg.flags & SOCK_LB_F_ENABLED != 0 && unsafe { bpf_get_netns_cookie(ctx) } == cfg.netns_cookie
}

/// The service `key` names (exact port, else the VIP's every-port
/// service), with the key it was found under.
#[inline(always)]
fn service(mut key: ServiceKey) -> Option<(Service, ServiceKey)> {
    // SAFETY: read-only lookups of plain values, copied out.
    unsafe {
        if let Some(s) = LB_SERVICES.get(&key) {
            return Some((*s, key));
        }
        key.port = 0;
        LB_SERVICES.get(&key).map(|s| (*s, key))
    }
}

/// connect() / sendmsg() to a service: the address becomes a backend's.
#[inline(always)]
pub fn balance(ctx: &SockAddrContext, v6: bool, sendmsg: bool) -> i32 {
    let raw = ctx.sock_addr.cast();
    if !serves(raw) {
        return PROCEED;
    }
    let c = sockaddr::read(ctx, v6);
    if c.proto != IPPROTO_TCP && c.proto != IPPROTO_UDP {
        return PROCEED;
    }
    let Some((svc, key)) = service(ServiceKey {
        addr: c.addr,
        port: c.port,
        proto: c.proto as u8,
        family: c.family as u8,
        _pad: 0,
    }) else {
        return PROCEED;
    };
    // SAFETY: read-only lookup.
    if unsafe { SOCK_LB_OFF.get(&key) }.is_some() {
        bump(sock_lb_stat::SKIPPED);
        return PROCEED;
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(raw) };
    let idx = socket_hash(cookie) % TABLE_SIZE;
    let slot = LB_MAGLEV
        .get_value(svc.id, &idx)
        .copied()
        .unwrap_or(NO_BACKEND);
    let usable = match LB_BACKENDS.get(slot) {
        Some(b) if slot != NO_BACKEND => {
            b.family != 0 && b.flags & (BACKEND_F_DOWN | BACKEND_F_DRAINING) == 0
        }
        _ => false,
    };
    let Some(be) = LB_BACKENDS.get(slot).filter(|_| usable) else {
        bump(sock_lb_stat::NO_BACKEND);
        // SAFETY: plain helper call; the hook fails the call with it.
        unsafe { bpf_set_retval(-EHOSTUNREACH) };
        return FAIL;
    };
    if u32::from(be.family) != c.family || (v6 && c.family == 4 && !c.mapped) {
        bump(sock_lb_stat::FAMILY);
        return PROCEED;
    }
    let port = if be.port != 0 { be.port } else { c.port };
    sockaddr::write(ctx, v6, c.family, be.addr, port);
    let entry = SockLbSock {
        vip: c.addr,
        backend: be.addr,
        vip_port: c.port,
        backend_port: port,
        family: c.family as u8,
        proto: c.proto as u8,
        _pad: 0,
        slot,
        _pad2: 0,
    };
    if SOCK_LB_SOCKS.insert(&cookie, &entry, 0).is_err() {
        bump(sock_lb_stat::STATE_FULL);
    }
    bump(if sendmsg {
        sock_lb_stat::SENDMSG
    } else {
        sock_lb_stat::CONNECT
    });
    if let Some(n) = SOCK_LB_BACKENDS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
    PROCEED
}

/// getpeername() / recvmsg() of a translated socket: its backend's address
/// is reported as the VIP it asked for.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let raw = ctx.sock_addr.cast();
    // Every recvmsg() and getpeername() on the host comes here: sockets of
    // other namespaces (never translated) stop before the hash lookup.
    if !serves(raw) {
        return PROCEED;
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(raw) };
    // SAFETY: the value is copied out at once.
    let Some(e) = (unsafe { SOCK_LB_SOCKS.get(&cookie) }).copied() else {
        return PROCEED;
    };
    let c = sockaddr::read(ctx, v6);
    if c.addr == e.backend && c.port == e.backend_port && c.family == u32::from(e.family) {
        sockaddr::write(ctx, v6, c.family, e.vip, e.vip_port);
        bump(sock_lb_stat::REVERSED);
    }
    PROCEED
}

/// A socket is released: its entry goes.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let raw = ctx.sock.cast();
    if serves(raw) {
        // SAFETY: plain helper call on the program's context.
        let cookie = unsafe { bpf_get_socket_cookie(raw) };
        let _ = SOCK_LB_SOCKS.remove(&cookie);
    }
    PROCEED
}
