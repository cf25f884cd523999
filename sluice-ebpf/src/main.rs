//! sluice's kernel programs. Entry points only: each runs its pipeline and
//! returns the verdict it computed.
#![no_std]
#![no_main]
// Atomic adds on map values shared between CPUs (core's atomics are not
// available for the BPF target).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the BPF atomic add")]

mod firewall;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use sluice_common::Verdict;

#[xdp]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    match firewall::run(&ctx) {
        Verdict::Pass | Verdict::Audit => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
