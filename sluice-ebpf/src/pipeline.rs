//! The XDP pipeline, the one place that orders the stages: parse, firewall
//! (which consults ddos for its rules), then the LB jump, counters, flow
//! record, capture and the SYN challenge. Every entry point runs one
//! function here; stages never call each other back.

use aya_ebpf::{
    bindings::xdp_action,
    programs::{TcContext, XdpContext},
};
use sluice_common::{
    Family, JUMP_LB, JUMP_SYN_CHALLENGE, L4, Reason, Verdict, counter_index,
    handoff::{HANDOFF_F_CHALLENGE, HANDOFF_F_IP, Handoff},
};

use crate::{
    counters::count,
    maps::{JUMP, LB_PACKET, LB_VERDICT},
    net::parse::{MAX_L3_OFF, MAX_L4_OFF, Packet, Parsed, parse},
    outcome::Outcome,
    stages::{ddos, firewall, lb, observe, tc},
};

/// What the entry point does with the frame.
pub enum Action {
    Pass,
    Drop,
}

/// `sluice_xdp`: judges every frame; packets to a VIP that pass go on to
/// the LB program, SYNs to be challenged to the challenge program.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Action {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // The parsed packet and then the verdict go into this CPU's hand-off
    // slots (the LB program reads the same slots after its tail call), and
    // each stage after parsing reads them back from there: values from map
    // memory are unknown to the verifier, so the many paths through parsing
    // (and then through judging) meet in one state where the next stage
    // starts, which is then verified about once instead of once per path.
    // Linux 6.1's verifier ran out of its 1M instructions otherwise.
    let (Some(slot), Some(v)) = (LB_PACKET.get_ptr_mut(0), LB_VERDICT.get_ptr_mut(0)) else {
        // Cannot happen (one-entry arrays); fail closed.
        return Action::Drop;
    };
    let slot = slot.cast::<Packet>();
    let mut flags = 0;
    // SAFETY (all writes to `slot`): this CPU's slot, which a Packet fits.
    let outcome = match parse(ctx) {
        Parsed::NotIp => {
            unsafe { slot.write(Packet::other(Family::Other)) };
            Outcome::of(Verdict::Pass, Reason::NotIp)
        }
        Parsed::Malformed(family) => {
            unsafe { slot.write(Packet::other(family)) };
            Outcome::of(firewall::malformed_action(), Reason::Malformed)
        }
        Parsed::Ip(pkt) => {
            unsafe { slot.write(pkt) };
            flags |= HANDOFF_F_IP;
            // Read back through an opaque pointer: the optimiser must not
            // hand the judge the values it just wrote.
            // SAFETY: written just above.
            firewall::judge(unsafe { &*core::hint::black_box(slot) }, bytes)
        }
    };
    if outcome.challenge {
        flags |= HANDOFF_F_CHALLENGE;
    }
    // SAFETY: this CPU's slot.
    unsafe {
        v.write(Handoff {
            reason: outcome.reason as u32,
            matched: outcome.matched,
            verdict: outcome.verdict as u32,
            flags,
        });
    }
    finish(ctx, slot, v)
}

#[inline(always)]
fn action(v: Verdict) -> Action {
    match v {
        Verdict::Pass | Verdict::Audit => Action::Pass,
        Verdict::Drop => Action::Drop,
    }
}

/// The second half of `ingress`, on the handed-over verdict and packet:
/// the LB jump, counters, flow record, capture and the SYN challenge.
#[inline(always)]
fn finish(ctx: &XdpContext, slot: *const Packet, v: *const Handoff) -> Action {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // SAFETY: both point at this CPU's slots written just before; volatile
    // so the optimiser cannot forward the values written (the point is
    // that the verifier sees them come from memory).
    let (h, pkt) = unsafe { (core::ptr::read_volatile(v), &*slot) };
    let outcome = Outcome {
        reason: Reason::from_u32(h.reason).unwrap_or(Reason::Default),
        matched: h.matched,
        verdict: match h.verdict {
            w if w == Verdict::Drop as u32 => Verdict::Drop,
            w if w == Verdict::Audit as u32 => Verdict::Audit,
            _ => Verdict::Pass,
        },
        challenge: h.flags & HANDOFF_F_CHALLENGE != 0,
    };
    let is_ip = h.flags & HANDOFF_F_IP != 0;
    let (family, l4) = (pkt.family, pkt.l4);
    if is_ip && outcome.verdict != Verdict::Drop && !outcome.challenge && lb::is_vip(pkt) {
        // The LB program counts the packet and writes its flow record
        // once it knows the backend (and the final verdict); the packet
        // and verdict are in its slots already.
        observe::capture(ctx, &outcome, bytes);
        // SAFETY: JUMP holds XDP programs only.
        unsafe { JUMP.tail_call(ctx, JUMP_LB) };
        // No LB program (cannot happen once loaded): the stack decides.
    }
    account(
        ctx,
        if is_ip { Some(pkt) } else { None },
        family,
        l4,
        (outcome.verdict, outcome.reason),
        || outcome.matched,
        bytes,
        0,
    );
    observe::capture(ctx, &outcome, bytes);
    if outcome.challenge {
        // The rewrite runs as its own program (verified on its own, not
        // once per path through the pipeline); if the jump fails, drop.
        // SAFETY: JUMP holds XDP programs only.
        unsafe { JUMP.tail_call(ctx, JUMP_SYN_CHALLENGE) };
        return Action::Drop;
    }
    action(outcome.verdict)
}

/// `sluice_lb`, tail-called by `ingress` for an IP packet to a VIP that
/// the firewall let through: balances it, then counts and records it
/// with the LB's verdict (the firewall's where the LB adds none).
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // What the firewall decided (it left counting and the flow record to us).
    let (fw_reason, fw_matched, fw_audit) = match LB_VERDICT.get(0) {
        Some(h) => (h.reason, h.matched, h.verdict == Verdict::Audit as u32),
        None => (Reason::Default as u32, 0, false),
    };
    let fw_reason = Reason::from_u32(fw_reason).unwrap_or(Reason::Default);
    // The main program's parse, handed over with the tail call (parsing
    // again would cost time and more stack than the verifier allows).
    let Some(slot) = LB_PACKET.get_ptr(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the main program wrote a whole Packet into this CPU's slot
    // just before the tail call; the layout fits (checked at compile time).
    let pkt = unsafe { &*slot.cast::<Packet>() };
    if pkt.l3_off > MAX_L3_OFF || pkt.l4_off > MAX_L4_OFF {
        return xdp_action::XDP_PASS;
    }
    let d = lb::balance(ctx, pkt, bytes);
    let reason = match d.reason {
        Some(r) => r,
        None => fw_reason,
    };
    // Passed on in audit mode: the firewall would have dropped it.
    let verdict = if fw_audit && d.verdict == Verdict::Pass {
        Verdict::Audit
    } else {
        d.verdict
    };
    account(
        ctx,
        Some(pkt),
        pkt.family,
        pkt.l4,
        (verdict, reason),
        || if d.reason.is_none() { fw_matched } else { 0 },
        bytes,
        d.backend,
    );
    d.action
}

/// `sluice_syn_challenge`, tail-called by `ingress` for a SYN the firewall
/// decided to challenge: answers it.
#[inline(always)]
pub fn syn_challenge(ctx: &XdpContext) -> u32 {
    match parse(ctx) {
        Parsed::Ip(pkt) if pkt.is_syn() => ddos::challenge(ctx, &pkt),
        _ => xdp_action::XDP_DROP,
    }
}

/// `sluice_tc_egress`: NAT replies back to the VIP.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    tc::run(ctx)
}

/// Every packet's verdict is counted and (sampled) recorded here, once:
/// by `finish`, or by `balance` for packets handed to the LB. `matched`
/// is computed only after the counter bump: computed before, it stays live
/// across the helper call and `sluice_lb`'s frame grows past 96 bytes,
/// which with `icmp_error`'s 400 (each rounded up to 32) is the verifier's
/// 512-byte limit for a chain of calls.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one call per exit; a struct would cost stack"
)]
fn account(
    ctx: &XdpContext,
    pkt: Option<&Packet>,
    family: Family,
    l4: L4,
    (verdict, reason): (Verdict, Reason),
    matched: impl FnOnce() -> u32,
    bytes: u64,
    backend: u32,
) {
    count(counter_index(family, l4, verdict, reason), bytes);
    let out = Outcome {
        verdict,
        reason,
        matched: matched(),
        challenge: false,
    };
    observe::flow(ctx, pkt, family, l4, &out, bytes, backend);
    observe::explain(ctx, &out, backend);
}
