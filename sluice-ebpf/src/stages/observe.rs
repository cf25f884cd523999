//! Observability: sampled flow records and packet capture, both through ring
//! buffers. Neither can change a verdict; what they cannot write is counted.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use sluice_common::{
    CAPTURE_SNAP, CaptureHeader, CaptureRecord, EXPLAIN_MAGIC, ExplainMeta, Family, FlowRecord, L4,
    stat, words_bytes,
};

use crate::{
    counters::bump,
    maps::{CAPTURE, CAPTURE_CONFIG, FLOW_BUDGET, FLOW_CONFIG, FLOWS},
    net::parse::Packet,
    outcome::Outcome,
    time::now,
};

/// Per-CPU record rate cap (GCRA on this CPU's own clock word: no atomics).
#[inline(always)]
fn within_cap(interval: u64, tolerance: u64, now: u64) -> bool {
    if interval == 0 {
        return true;
    }
    let Some(tat) = FLOW_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        let t = if *tat < now { now } else { *tat };
        if t - now > tolerance {
            return false;
        }
        *tat = t + interval;
    }
    true
}

/// Answers `sluice explain`: when the frame carries its metadata block,
/// writes what the pipeline decided into it (the test run returns it).
/// Frames from the wire carry no metadata, so for them this is one bounds
/// check.
#[inline(always)]
pub fn explain(ctx: &XdpContext, out: &Outcome, backend: u32) {
    let meta = ctx.metadata();
    if meta + core::mem::size_of::<ExplainMeta>() > ctx.data() {
        return;
    }
    let m = meta as *mut ExplainMeta;
    // SAFETY: the metadata block lies between data_meta and data (checked
    // above), where the program may read and write.
    unsafe {
        if (*m).magic != EXPLAIN_MAGIC {
            return;
        }
        (*m).verdict = out.verdict as u32;
        (*m).reason = out.reason as u32;
        (*m).matched = out.matched;
        (*m).backend = backend;
        (*m).answered = 1;
    }
}

/// Writes a flow record for this packet if sampling and the rate cap allow.
#[inline(always)]
pub fn flow(
    ctx: &XdpContext,
    pkt: Option<&Packet>,
    family: Family,
    l4: L4,
    out: &Outcome,
    len: u64,
    backend: u32,
) {
    let Some(cfg) = FLOW_CONFIG.get(0) else {
        return;
    };
    // Opaque to the optimiser: it knows a Verdict is < 3 and would drop the
    // bounds check below, which the verifier needs when the verdict came
    // through memory (the LB passes it back from a call).
    let v = core::hint::black_box(out.verdict as usize);
    let sample = if v < 4 { cfg.sample[v] } else { 0 };
    if sample == 0 {
        return;
    }
    // SAFETY: plain helper call.
    if sample > 1 && unsafe { bpf_get_prandom_u32() } % sample != 0 {
        return;
    }
    // The clock is read only for packets that get a record.
    let now = now();
    if !within_cap(cfg.cap_interval_ns, cfg.cap_tolerance_ns, now) {
        bump(stat::FLOWS_LOST_CAP);
        return;
    }
    let Some(mut entry) = FLOWS.reserve::<FlowRecord>(0) else {
        bump(stat::FLOWS_LOST_RING);
        return;
    };
    let r = entry.as_mut_ptr();
    // SAFETY: r points at the reserved record; every field is written
    // before it is submitted.
    unsafe {
        (*r).ts_ns = now;
        (*r).ifindex = ctx.ingress_ifindex() as u32;
        (*r).len = len as u32;
        (*r).family = family.version();
        (*r).l4 = l4 as u8;
        (*r).verdict = out.verdict as u8;
        (*r).reason = out.reason as u8;
        (*r)._pad = 0;
        (*r).matched = out.matched;
        (*r).sample = sample;
        (*r).backend = backend;
        match pkt {
            Some(p) => {
                (*r).src = words_bytes(p.src);
                (*r).dst = words_bytes(p.dst);
                (*r).proto = p.proto;
                (*r).tcp_flags = p.tcp_flags;
                (*r).sport = if p.has_ports { p.sport } else { 0 };
                (*r).dport = if p.has_ports { p.dport } else { 0 };
            }
            None => {
                (*r).src = [0; 16];
                (*r).dst = [0; 16];
                (*r).proto = 0;
                (*r).tcp_flags = 0;
                (*r).sport = 0;
                (*r).dport = 0;
            }
        }
    }
    entry.submit(0);
    bump(stat::FLOWS);
}

/// Copies the packet into the capture ring when a capture wants it.
#[inline(always)]
pub fn capture(ctx: &XdpContext, out: &Outcome, len: u64) {
    let Some(cfg) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    if cfg.enabled == 0 || cfg.verdict_mask & (1 << (out.verdict as u32)) == 0 {
        return;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    if cfg.ifindex != 0 && cfg.ifindex != ifindex {
        return;
    }
    let now = now();
    let Some(mut entry) = CAPTURE.reserve::<CaptureRecord>(0) else {
        bump(stat::CAPTURE_LOST);
        return;
    };
    let mut n = len as usize;
    let snap = cfg.snaplen as usize;
    if n > snap {
        n = snap;
    }
    if n > CAPTURE_SNAP {
        n = CAPTURE_SNAP;
    }
    let rec = entry.as_mut_ptr();
    let copy_len = copy_len(n);
    // SAFETY: rec points at the reserved record; the copy stays inside its
    // data array (n <= CAPTURE_SNAP) and inside the frame (n <= len).
    let copied = unsafe {
        (*rec).header = CaptureHeader {
            ts_ns: now,
            ifindex,
            orig_len: len as u32,
            cap_len: 0,
            verdict: out.verdict as u8,
            reason: out.reason as u8,
            _pad: 0,
        };
        copy_len.is_some_and(|c| {
            bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*rec).data).cast::<c_void>(), c) == 0
        })
    };
    if !copied {
        entry.discard(0);
        bump(stat::CAPTURE_LOST);
        return;
    }
    // SAFETY: as above.
    unsafe { (*rec).header.cap_len = n as u32 };
    entry.submit(0);
    bump(stat::CAPTURED);
}

/// `n` as the length of a copy into a capture record: `None` for 0, else
/// `n` (at most [`CAPTURE_SNAP`]). Written so that the verifier can see the
/// length is at least 1: 6.1's verifier learns nothing from `n != 0`
/// (which is what LLVM makes of any `n >= 1`; 6.18's does), but bounds
/// `n - 1 < SNAP` to `[0, SNAP - 1]`, so `(n - 1) + 1` is `[1, SNAP]`;
/// `black_box` keeps LLVM from folding `(n - 1) + 1` back into `n`.
#[inline(always)]
fn copy_len(n: usize) -> Option<u32> {
    let m = core::hint::black_box(n.wrapping_sub(1));
    if m < CAPTURE_SNAP {
        Some(m as u32 + 1)
    } else {
        None
    }
}
