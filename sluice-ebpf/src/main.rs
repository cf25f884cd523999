//! sluice's kernel programs. Entry points only: each runs its pipeline and
//! returns the verdict it computed.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys stay passed by reference: one moved into aya's `impl Borrow<K>` \
              parameter may be copied again on the 512-byte BPF stack"
)]
// Atomic adds on map values shared between CPUs (core's atomics are not
// available for the BPF target).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the BPF atomic add")]

mod counters;
mod lb_maps;
mod maps;
mod net;
mod outcome;
mod pipeline;
mod stages;
mod time;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pipeline::Action;

#[xdp]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    match pipeline::ingress(&ctx) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
    }
}

/// Answers a SYN with the SYN guard's challenge. Reached only by a tail
/// call from `sluice_xdp` after it judged the SYN; never attached.
#[xdp]
pub fn sluice_syn_challenge(ctx: XdpContext) -> u32 {
    pipeline::syn_challenge(&ctx)
}

/// The load balancer. Reached only by a tail call from `sluice_xdp` for
/// packets to a VIP the firewall let through; never attached.
#[xdp]
pub fn sluice_lb(ctx: XdpContext) -> u32 {
    pipeline::balance(&ctx)
}

/// TC egress: translates NAT backends' replies back to the VIP.
#[classifier]
pub fn sluice_tc_egress(ctx: TcContext) -> i32 {
    pipeline::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
