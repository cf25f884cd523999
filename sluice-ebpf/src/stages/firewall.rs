//! The firewall stage: allow list, deny list, L4 rules (which consult the
//! DDoS stage for `limit` and `syn-guard`) and the default action. It only
//! judges; the pipeline counts, records and acts on what it decides.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::bpf_loop,
    maps::lpm_trie::Key,
};
use sluice_common::{
    EntryStats, Family, L4, MAX_RULES, RULE_ACTION_LIMIT, RULE_ACTION_SYN_GUARD, RULE_F_AUDIT,
    RULE_F_DPORT, RULE_F_DST, RULE_F_FAMILY, RULE_F_SPORT, RULE_F_SRC, RULE_F_SYN,
    RULE_F_TCP_FLAGS, Reason, Rule, SETTINGS_F_AUDIT, SETTINGS_F_SYN_GUARD, Verdict,
    lpm_prefix_len, rule_tcp_mask, rule_tcp_value,
};

use crate::{
    maps::{ALLOW_V4, ALLOW_V6, DENY_V4, DENY_V6, GENERATION, RULE_STATS, RULES, SETTINGS},
    net::parse::Packet,
    outcome::Outcome,
    stages::ddos::{self, Limit},
    time::now,
};

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

/// The verdict for a frame the parser could not make sense of.
#[inline(always)]
pub fn malformed_action() -> Verdict {
    match SETTINGS.get(generation()) {
        Some(s) => verdict_of(s.malformed_action),
        // Unreachable for a 2-entry array; fail closed like the default setting.
        None => Verdict::Drop,
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
        (*p).last_seen_ns = now();
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
    if r.flags & RULE_F_FAMILY != 0 && r.family != u32::from(pkt.family.version()) {
        return false;
    }
    if r.proto != 0 && r.proto != u32::from(pkt.proto) {
        return false;
    }
    if r.flags & RULE_F_SYN != 0 && !pkt.is_syn() {
        return false;
    }
    if r.flags & RULE_F_TCP_FLAGS != 0
        && (!matches!(pkt.l4, L4::Tcp)
            || pkt.tcp_flags & rule_tcp_mask(r.flags) != rule_tcp_value(r.flags))
    {
        return false;
    }
    if r.flags & RULE_F_DPORT != 0
        && (!pkt.has_ports || pkt.dport < r.port_lo || pkt.dport > r.port_hi)
    {
        return false;
    }
    if r.flags & RULE_F_SPORT != 0
        && (!pkt.has_ports || pkt.sport < r.sport_lo || pkt.sport > r.sport_hi)
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

/// The verdict for an IP packet: lists first, then the SYN guard's answers,
/// then the rules in order, then the default action.
#[inline(always)]
pub fn judge(pkt: &Packet, bytes: u64) -> Outcome {
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
