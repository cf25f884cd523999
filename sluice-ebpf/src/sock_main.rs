//! sluice's socket programs: the cgroup v2 `sock_addr` hooks that judge
//! connect(), sendmsg() and bind() of a workload's processes. A separate
//! object from the XDP pipeline (own maps, own pins), loaded only when a
//! workload is configured. Entry points only; the stage is `stages/sock.rs`.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys stay passed by reference: one moved into aya's `impl Borrow<K>` \
              parameter may be copied again on the 512-byte BPF stack"
)]

#[path = "stages/sock.rs"]
mod sock;
mod sock_maps;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
