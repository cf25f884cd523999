//! sluice's socket programs: the cgroup v2 `sock_addr` hooks that judge
//! connect(), sendmsg() and bind() of a workload's processes (stage
//! `stages/sock.rs`), and the socket load balancer's hooks on the root
//! cgroup (stage `stages/sock_lb.rs`). A separate object from the XDP
//! pipeline (own maps and pins; the LB's services, backends and tables are
//! the XDP object's, bound by pin), loaded when a workload is configured or
//! the socket LB is on; and the sk_lookup steering program (stage
//! `stages/steer.rs`, linked to a network namespace). Entry points only.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys stay passed by reference: one moved into aya's `impl Borrow<K>` \
              parameter may be copied again on the 512-byte BPF stack"
)]

mod lb_maps;
#[path = "stages/sock.rs"]
mod sock;
#[path = "stages/sock_lb.rs"]
mod sock_lb;
mod sock_maps;
mod sockaddr;
#[path = "stages/steer.rs"]
mod steer;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, sk_lookup},
    programs::{SkLookupContext, SockAddrContext, SockContext},
};
use sluice_common::sock::SockHook;

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Connect, false)
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Connect, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Sendmsg, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Sendmsg, true)
}

#[cgroup_sock_addr(bind4)]
pub fn sluice_bind4(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Bind, false)
}

#[cgroup_sock_addr(bind6)]
pub fn sluice_bind6(ctx: SockAddrContext) -> i32 {
    sock::judge(&ctx, SockHook::Bind, true)
}

#[cgroup_sock_addr(connect4)]
pub fn slb_connect4(ctx: SockAddrContext) -> i32 {
    sock_lb::balance(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn slb_connect6(ctx: SockAddrContext) -> i32 {
    sock_lb::balance(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn slb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_lb::balance(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn slb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_lb::balance(&ctx, true, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn slb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn slb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn slb_peername4(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn slb_peername6(ctx: SockAddrContext) -> i32 {
    sock_lb::reverse(&ctx, true)
}

#[cgroup_sock(sock_release)]
pub fn slb_release(ctx: SockContext) -> i32 {
    sock_lb::release(&ctx)
}

#[sk_lookup]
pub fn sluice_steer(ctx: SkLookupContext) -> u32 {
    steer::steer(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
