//! sk_lookup steering: a connection or datagram addressed to a steered
//! (protocol, prefix, port range) is delivered to its destination's one
//! socket, whatever address that socket is bound to (Cloudflare's tubular
//! model). Longest prefix wins; within it, the first range holding the port.

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key, programs::SkLookupContext};
use sluice_common::{
    FlowRecord, L4, Reason, Verdict,
    steer::{STEER_F_PASS_MISSING, STEER_KEY_HEAD_BITS, SteerKey, steer_stat},
};

use crate::sock_maps::{
    STEER_FLOWS, STEER_GENERATION, STEER_LOST, STEER_RULES, STEER_SOCKS, STEER_STATS,
};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;

/// An IPv6 address of the context as bytes: four loads at constant
/// offsets from the context pointer (the verifier refuses a load through a
/// context pointer that was moved, as a loop over the words would do).
///
/// # Safety
/// `w` points into the kernel's `bpf_sk_lookup` context.
#[inline(always)]
unsafe fn words(w: *const [u32; 4]) -> [u8; 16] {
    let w = w.cast::<u32>();
    // SAFETY: per the caller; volatile keeps four separate narrow loads.
    let (a, b, c, d) = unsafe {
        (
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        )
    };
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.to_ne_bytes());
    out[4..8].copy_from_slice(&b.to_ne_bytes());
    out[8..12].copy_from_slice(&c.to_ne_bytes());
    out[12..].copy_from_slice(&d.to_ne_bytes());
    out
}

/// The verdict for one socket lookup.
#[inline(always)]
pub fn steer(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel's context; fields are read one by one (narrow
    // loads the verifier allows), never copied whole.
    let (family, proto, port) = unsafe { ((*l).family, (*l).protocol, (*l).local_port) };
    let mut key = SteerKey {
        generation: STEER_GENERATION.get(0).map_or(0, |g| (*g & 1) as u8),
        proto: proto as u8,
        ..SteerKey::default()
    };
    if family == AF_INET {
        key.family = 4;
        // SAFETY: as above.
        let a = unsafe { (*l).local_ip4 };
        key.addr[..4].copy_from_slice(&a.to_ne_bytes());
    } else if family == AF_INET6 {
        key.family = 6;
        // SAFETY: as above.
        key.addr = unsafe { words(&raw const (*l).local_ip6) };
    } else {
        return SK_PASS;
    }
    let Some(entry) = STEER_RULES.get(&Key::new(STEER_KEY_HEAD_BITS + 128, key)) else {
        return SK_PASS;
    };
    let mut hit = None;
    for (i, r) in entry.ranges.iter().enumerate() {
        // Only the entry's `n` ranges count (the rest are empty, `1-0`).
        if hit.is_some() || i as u32 >= entry.n {
            break;
        }
        if u32::from(r.lo) <= port && port <= u32::from(r.hi) {
            hit = Some(*r);
        }
    }
    let Some(range) = hit else {
        return SK_PASS;
    };
    let dest = u32::from(range.dest);
    let (event, verdict) = match STEER_SOCKS.redirect_sk_lookup(ctx, dest, 0) {
        Ok(()) => (steer_stat::STEERED, SK_PASS),
        Err(e) if e == -ENOENT => {
            let pass = range.flags & STEER_F_PASS_MISSING != 0;
            (steer_stat::NO_SOCKET, if pass { SK_PASS } else { SK_DROP })
        }
        // Another program chose a socket first: its choice stands.
        Err(e) if e == -EEXIST => (steer_stat::OTHER_PROGRAM, SK_PASS),
        Err(_) => (steer_stat::INCOMPATIBLE, SK_DROP),
    };
    if let Some(n) = STEER_STATS.get_ptr_mut(dest * steer_stat::PER_DEST + event) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
    // Every refused lookup, and every steered TCP connection (one lookup
    // per SYN; UDP looks up every datagram: counted only).
    if verdict == SK_DROP || (event == steer_stat::STEERED && proto == 6) {
        record(ctx, &key, port, proto, dest, verdict == SK_PASS);
    }
    verdict
}

#[inline(always)]
fn record(ctx: &SkLookupContext, key: &SteerKey, port: u32, proto: u32, dest: u32, pass: bool) {
    let Some(mut entry) = STEER_FLOWS.reserve::<FlowRecord>(0) else {
        if let Some(n) = STEER_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe { *n += 1 };
        }
        return;
    };
    let l = ctx.lookup;
    let mut src = [0u8; 16];
    // SAFETY: narrow context reads, as in `steer`.
    let (sport, ifindex) = unsafe { ((*l).remote_port, (*l).ingress_ifindex) };
    if key.family == 4 {
        // SAFETY: as above.
        let a = unsafe { (*l).remote_ip4 };
        src[..4].copy_from_slice(&a.to_ne_bytes());
    } else {
        // SAFETY: as above.
        src = unsafe { words(&raw const (*l).remote_ip6) };
    }
    entry.write(FlowRecord {
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        ifindex,
        len: 0,
        src,
        dst: key.addr,
        sport: u16::from_be(sport),
        dport: port as u16,
        family: key.family,
        proto: proto as u8,
        tcp_flags: 0,
        l4: if proto == 6 {
            L4::Tcp as u8
        } else {
            L4::Udp as u8
        },
        verdict: if pass {
            Verdict::Pass as u8
        } else {
            Verdict::Drop as u8
        },
        reason: Reason::Steer as u8,
        _pad: 0,
        matched: dest,
        sample: 1,
        backend: 0,
    });
    entry.submit(0);
}
