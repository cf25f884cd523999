//! Benchmark-only XDP programs: the ceiling (drop everything), a minimal
//! hand-written source lookup to compare sluice's pipeline against, and the
//! traffic generator driven by BPF_PROG_TEST_RUN with live frames. Also
//! one program every verifier refuses, for the test of how sluice reports
//! a refusal (sluice/tests/it/compat.rs).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys stay passed by reference: one moved into aya's `impl Borrow<K>` \
              parameter may be copied again on the 512-byte BPF stack"
)]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use ptr::ptr_at;

// The pipeline's own bounds-checked pointer: the reference does the same
// checks sluice does.
#[path = "net/ptr.rs"]
mod ptr;
// The pipeline's checksum arithmetic, for the generator's source rewrite.
#[path = "net/csum.rs"]
#[allow(dead_code, reason = "the generator uses only the incremental update")]
mod csum;

/// Reference lists: plain address keys (no generation byte), no counters.
#[map]
static REF_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1 << 20, 0);
#[map]
static REF_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1 << 20, 0);

/// Per-CPU frame counter of the generator.
#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// How many distinct IPv4 sources the generator cycles through (set at load).
#[unsafe(no_mangle)]
static GEN_SOURCES: u32 = 1;

/// Reads the first byte of the frame without checking it is there: every
/// kernel's verifier refuses this (invalid access to packet). Never loaded
/// except by the test of verifier refusals.
#[xdp]
pub fn probe_refused(ctx: XdpContext) -> u32 {
    // SAFETY: none; the verifier is meant to refuse it.
    let first = unsafe { core::ptr::read_volatile(ctx.data() as *const u8) };
    if first == 0 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The ceiling: the cheapest possible XDP program.
#[xdp]
pub fn bench_drop_all(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The same source lookup sluice does, with nothing else: untagged
/// Ethernet, IPv4 or IPv6 source address, one LPM lookup, drop on a hit.
#[xdp]
pub fn bench_reference(ctx: XdpContext) -> u32 {
    let Some(eth_type) = ptr_at::<[u8; 2]>(&ctx, 12) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let hit = match u16::from_be_bytes(unsafe { *eth_type }) {
        0x0800 => match ptr_at::<[u8; 4]>(&ctx, 14 + 12) {
            Some(src) => REF_V4.get(&Key::new(32, unsafe { *src })).is_some(),
            None => return xdp_action::XDP_DROP,
        },
        0x86dd => match ptr_at::<[u8; 16]>(&ctx, 14 + 8) {
            Some(src) => REF_V6.get(&Key::new(128, unsafe { *src })).is_some(),
            None => return xdp_action::XDP_DROP,
        },
        _ => false,
    };
    if hit {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Traffic generator for BPF_PROG_TEST_RUN live frames: gives each IPv4
/// frame the next source address (low 16 bits cycle through GEN_SOURCES),
/// fixes the header checksum incrementally (RFC 1624), and transmits it out
/// of the interface it was injected on (a veth, so it lands on the peer).
#[xdp]
pub fn bench_trafficgen(ctx: XdpContext) -> u32 {
    // SAFETY: read of a load-time constant.
    let sources = unsafe { core::ptr::read_volatile(&raw const GEN_SOURCES) }.max(1);
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n % sources
    };
    let (Some(check), Some(src_lo)) = (
        ptr_at::<[u8; 2]>(&ctx, 14 + 10),
        ptr_at::<[u8; 2]>(&ctx, 14 + 14),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let new = (n as u16).to_be_bytes();
        csum::apply(check, csum::delta(&*src_lo, &new));
        *src_lo = new;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
