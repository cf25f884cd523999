//! The firewall stage: allow list, deny list, L4 rules, default action, and
//! the counters every verdict feeds.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::{bpf_ktime_get_boot_ns, bpf_loop},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use sluice_common::{
    EntryStats, Family, JUMP_LB, JUMP_SYN_CHALLENGE, L4, MAX_RULES, RULE_ACTION_LIMIT,
    RULE_ACTION_SYN_GUARD, RULE_F_AUDIT, RULE_F_DPORT, RULE_F_DST, RULE_F_FAMILY, RULE_F_SRC,
    RULE_F_SYN, Reason, Rule, SETTINGS_F_AUDIT, SETTINGS_F_SYN_GUARD, Verdict, counter_index,
    handoff::{HANDOFF_F_CHALLENGE, HANDOFF_F_IP, Handoff},
    lpm_prefix_len,
};

use crate::{
    ddos::{self, Limit},
    lb,
    maps::{
        ALLOW_V4, ALLOW_V6, COUNTERS, DENY_V4, DENY_V6, GENERATION, JUMP, LB_PACKET, LB_VERDICT,
        RULE_STATS, RULES, SETTINGS,
    },
    observe,
    parse::{Packet, Parsed, parse},
};

pub struct Outcome {
    pub verdict: Verdict,
    pub reason: Reason,
    /// Rule id, or the matched list entry's prefix length; 0 if none.
    pub matched: u32,
    /// Answer the packet with a SYN challenge instead of passing or dropping it.
    pub challenge: bool,
}

impl Outcome {
    const fn of(verdict: Verdict, reason: Reason) -> Self {
        Self {
            verdict,
            reason,
            matched: 0,
            challenge: false,
        }
    }
}

/// What the entry point does with the frame.
pub enum Action {
    Pass,
    Drop,
}

#[inline(always)]
pub fn run(ctx: &XdpContext) -> Action {
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
            Outcome::of(malformed_action(), Reason::Malformed)
        }
        Parsed::Ip(pkt) => {
            unsafe { slot.write(pkt) };
            flags |= HANDOFF_F_IP;
            // Read back through an opaque pointer: the optimiser must not
            // hand the judge the values it just wrote.
            // SAFETY: written just above.
            judge(unsafe { &*core::hint::black_box(slot) }, bytes)
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

/// The second half of the pipeline, on the handed-over verdict and packet:
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
        // The load balancer counts the packet and writes its flow record
        // once it knows the backend (and the final verdict); the packet
        // and verdict are in its slots already.
        observe::capture(ctx, &outcome, bytes);
        // SAFETY: JUMP holds XDP programs only.
        unsafe { JUMP.tail_call(ctx, JUMP_LB) };
        // No LB program (cannot happen once loaded): the stack decides.
    }
    count(
        counter_index(family, l4, outcome.verdict, outcome.reason),
        bytes,
    );
    observe::flow(
        ctx,
        if is_ip { Some(pkt) } else { None },
        family,
        l4,
        &outcome,
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

#[inline(always)]
fn generation() -> u32 {
    GENERATION.get(0).copied().unwrap_or(0) & 1
}

#[inline(always)]
fn verdict_of(v: u32) -> Verdict {
    if v == Verdict::Drop as u32 {
        Verdict::Drop
    } else {
        Verdict::Pass
    }
}

#[inline(always)]
fn malformed_action() -> Verdict {
    match SETTINGS.get(generation()) {
        Some(s) => verdict_of(s.malformed_action),
        // Unreachable for a 2-entry array; fail closed like the default setting.
        None => Verdict::Drop,
    }
}

#[inline(always)]
pub fn count(index: u32, bytes: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn hit(entry: &EntryStats, bytes: u64) {
    let p = core::ptr::from_ref(entry).cast_mut();
    // SAFETY: the value lives in the map while the program runs; entries are
    // shared between CPUs, so the updates are atomic.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*p).bytes, bytes);
        (*p).last_seen_ns = bpf_ktime_get_boot_ns();
    }
}

#[inline(always)]
fn list_hit(pkt: &Packet, g: u8, allow: bool) -> Option<&'static EntryStats> {
    let src = pkt.src;
    match pkt.family {
        Family::V4 => {
            let a = src[0].to_ne_bytes();
            let key = Key::new(lpm_prefix_len(32), [g, a[0], a[1], a[2], a[3], 0, 0, 0]);
            if allow {
                ALLOW_V4.get(&key)
            } else {
                DENY_V4.get(&key)
            }
        }
        Family::V6 => {
            let hi = src[0].to_ne_bytes();
            let lo = src[1].to_ne_bytes();
            let key = Key::new(
                lpm_prefix_len(128),
                [
                    g, hi[0], hi[1], hi[2], hi[3], hi[4], hi[5], hi[6], hi[7], lo[0], lo[1], lo[2],
                    lo[3], lo[4], lo[5], lo[6], lo[7], 0, 0, 0, 0, 0, 0, 0,
                ],
            );
            if allow {
                ALLOW_V6.get(&key)
            } else {
                DENY_V6.get(&key)
            }
        }
        Family::Other => None,
    }
}

#[inline(always)]
fn rule_matches(r: &Rule, pkt: &Packet) -> bool {
    let fam = match pkt.family {
        Family::V4 => 4,
        Family::V6 => 6,
        Family::Other => 0,
    };
    if r.flags & RULE_F_FAMILY != 0 && r.family != fam {
        return false;
    }
    if r.proto != 0 && r.proto != u32::from(pkt.proto) {
        return false;
    }
    if r.flags & RULE_F_SYN != 0 && !pkt.is_syn() {
        return false;
    }
    if r.flags & RULE_F_DPORT != 0
        && (!pkt.has_ports || pkt.dport < r.port_lo || pkt.dport > r.port_hi)
    {
        return false;
    }
    if r.flags & RULE_F_SRC != 0
        && (pkt.src[0] & r.src_mask[0] != r.src_net[0]
            || pkt.src[1] & r.src_mask[1] != r.src_net[1])
    {
        return false;
    }
    if r.flags & RULE_F_DST != 0
        && (pkt.dst[0] & r.dst_mask[0] != r.dst_net[0]
            || pkt.dst[1] & r.dst_mask[1] != r.dst_net[1])
    {
        return false;
    }
    true
}

const NO_HIT: u32 = u32::MAX;

/// How the rule that stopped the scan decided.
const BY_ACTION: u32 = 0;
const BY_RATE_LIMIT: u32 = 1;
const BY_MAP_FULL: u32 = 2;
const BY_SYN_GUARD: u32 = 3;

#[repr(C)]
struct RuleScan<'a> {
    pkt: &'a Packet,
    bytes: u64,
    base: u32,
    count: u32,
    hit: u32,
    by: u32,
}

/// One step of the rule scan: stops (returns 1) at the first rule that
/// decides. `limit` and `syn-guard` rules decide only for packets over
/// their rate; the others go on to the next rule.
extern "C" fn scan_rule(index: u32, ctx: *mut c_void) -> c_long {
    // SAFETY: ctx is the RuleScan judge() passed to bpf_loop.
    let scan = unsafe { &mut *ctx.cast::<RuleScan<'_>>() };
    if index >= scan.count {
        return 1;
    }
    let Some(r) = RULES.get(scan.base + index) else {
        return 1;
    };
    if !rule_matches(r, scan.pkt) {
        return 0;
    }
    let by = match r.action {
        RULE_ACTION_LIMIT => match ddos::limit(r, scan.pkt, scan.bytes) {
            Limit::Conform => return 0,
            Limit::Over => BY_RATE_LIMIT,
            Limit::MapFull => BY_MAP_FULL,
        },
        RULE_ACTION_SYN_GUARD => {
            if !scan.pkt.is_syn() || ddos::verified(scan.pkt) || ddos::syn_rate_ok(r) {
                return 0;
            }
            BY_SYN_GUARD
        }
        _ => BY_ACTION,
    };
    scan.hit = index;
    scan.by = by;
    1
}

#[inline(always)]
fn judge(pkt: &Packet, bytes: u64) -> Outcome {
    let g = generation();
    let Some(settings) = SETTINGS.get(g) else {
        return Outcome::of(Verdict::Drop, Reason::Default);
    };
    if let Some(e) = list_hit(pkt, g as u8, true) {
        hit(e, bytes);
        return Outcome {
            matched: e.prefix_len,
            ..Outcome::of(Verdict::Pass, Reason::AllowList)
        };
    }
    let audit = settings.flags & SETTINGS_F_AUDIT != 0;
    if let Some(e) = list_hit(pkt, g as u8, false) {
        hit(e, bytes);
        return Outcome {
            matched: e.prefix_len,
            ..Outcome::of(drop_or_audit(audit), Reason::DenyList)
        };
    }
    if settings.flags & SETTINGS_F_SYN_GUARD != 0
        && matches!(pkt.l4, L4::Tcp)
        && ddos::answer_verifies(pkt)
    {
        // Consumed: the server never sent the SYN-ACK it answers. In
        // audit mode it is passed (the stack ignores it).
        return Outcome::of(drop_or_audit(audit), Reason::SynDefence);
    }
    let mut scan = RuleScan {
        pkt,
        bytes,
        base: g * MAX_RULES,
        count: settings.rule_count,
        hit: NO_HIT,
        by: BY_ACTION,
    };
    if scan.count > 0 {
        // bpf_loop keeps verification cost independent of MAX_RULES: the
        // callback is verified once instead of once per unrolled iteration.
        // SAFETY: the callback and its context follow bpf_loop's contract.
        unsafe {
            bpf_loop(
                scan.count.min(MAX_RULES),
                scan_rule as *mut c_void,
                (&raw mut scan).cast(),
                0,
            );
        }
    }
    if scan.hit != NO_HIT
        && let Some(r) = RULES.get(scan.base + scan.hit)
    {
        if let Some(c) = RULE_STATS.get_ptr_mut(r.stats_slot) {
            // SAFETY: per-CPU slot.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
        let audit = audit || r.flags & RULE_F_AUDIT != 0;
        let (verdict, reason) = match scan.by {
            BY_RATE_LIMIT => (drop_or_audit(audit), Reason::RateLimit),
            BY_MAP_FULL => (drop_or_audit(audit), Reason::MapFull),
            BY_SYN_GUARD => (drop_or_audit(audit), Reason::SynDefence),
            _ => match verdict_of(r.action) {
                Verdict::Drop => (drop_or_audit(audit), Reason::Rule),
                v => (v, Reason::Rule),
            },
        };
        return Outcome {
            verdict,
            reason,
            matched: r.id,
            // In audit mode the SYN is passed, not answered.
            challenge: scan.by == BY_SYN_GUARD && !audit,
        };
    }
    Outcome::of(
        match verdict_of(settings.default_action) {
            Verdict::Drop => drop_or_audit(audit),
            v => v,
        },
        Reason::Default,
    )
}

#[inline(always)]
fn drop_or_audit(audit: bool) -> Verdict {
    if audit { Verdict::Audit } else { Verdict::Drop }
}
