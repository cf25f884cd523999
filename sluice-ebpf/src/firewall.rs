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
    EntryStats, Family, L4, MAX_RULES, RULE_F_AUDIT, RULE_F_DPORT, RULE_F_DST, RULE_F_FAMILY,
    RULE_F_SRC, Reason, Rule, SETTINGS_F_AUDIT, Verdict, counter_index, lpm_prefix_len,
};

use crate::{
    maps::{
        ALLOW_V4, ALLOW_V6, COUNTERS, DENY_V4, DENY_V6, GENERATION, RULE_STATS, RULES, SETTINGS,
    },
    parse::{Packet, Parsed, parse},
};

pub struct Outcome {
    pub verdict: Verdict,
    pub reason: Reason,
}

#[inline(always)]
pub fn run(ctx: &XdpContext) -> Verdict {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (family, l4, outcome) = match parse(ctx) {
        Parsed::NotIp => (
            Family::Other,
            L4::None,
            Outcome {
                verdict: Verdict::Pass,
                reason: Reason::NotIp,
            },
        ),
        Parsed::Malformed(family) => (
            family,
            L4::None,
            Outcome {
                verdict: malformed_action(),
                reason: Reason::Malformed,
            },
        ),
        Parsed::Ip(pkt) => (pkt.family, pkt.l4, judge(&pkt, bytes)),
    };
    count(
        counter_index(family, l4, outcome.verdict, outcome.reason),
        bytes,
    );
    outcome.verdict
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
fn count(index: u32, bytes: u64) {
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

#[repr(C)]
struct RuleScan<'a> {
    pkt: &'a Packet,
    base: u32,
    count: u32,
    hit: u32,
}

/// One step of the rule scan: stops (returns 1) at the first matching rule.
extern "C" fn scan_rule(index: u32, ctx: *mut c_void) -> c_long {
    // SAFETY: ctx is the RuleScan judge() passed to bpf_loop.
    let scan = unsafe { &mut *ctx.cast::<RuleScan<'_>>() };
    if index >= scan.count {
        return 1;
    }
    let Some(r) = RULES.get(scan.base + index) else {
        return 1;
    };
    if rule_matches(r, scan.pkt) {
        scan.hit = index;
        return 1;
    }
    0
}

#[inline(always)]
fn judge(pkt: &Packet, bytes: u64) -> Outcome {
    let g = generation();
    let Some(settings) = SETTINGS.get(g) else {
        return Outcome {
            verdict: Verdict::Drop,
            reason: Reason::Default,
        };
    };
    if let Some(e) = list_hit(pkt, g as u8, true) {
        hit(e, bytes);
        return Outcome {
            verdict: Verdict::Pass,
            reason: Reason::AllowList,
        };
    }
    let audit = settings.flags & SETTINGS_F_AUDIT != 0;
    if let Some(e) = list_hit(pkt, g as u8, false) {
        hit(e, bytes);
        return Outcome {
            verdict: drop_or_audit(audit),
            reason: Reason::DenyList,
        };
    }
    let mut scan = RuleScan {
        pkt,
        base: g * MAX_RULES,
        count: settings.rule_count,
        hit: NO_HIT,
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
    if scan.hit != NO_HIT {
        if let Some(r) = RULES.get(scan.base + scan.hit) {
            if let Some(c) = RULE_STATS.get_ptr_mut(r.stats_slot) {
                // SAFETY: per-CPU slot.
                unsafe {
                    (*c).packets += 1;
                    (*c).bytes += bytes;
                }
            }
            let verdict = match verdict_of(r.action) {
                Verdict::Drop => drop_or_audit(audit || r.flags & RULE_F_AUDIT != 0),
                v => v,
            };
            return Outcome {
                verdict,
                reason: Reason::Rule,
            };
        }
    }
    Outcome {
        verdict: match verdict_of(settings.default_action) {
            Verdict::Drop => drop_or_audit(audit),
            v => v,
        },
        reason: Reason::Default,
    }
}

#[inline(always)]
fn drop_or_audit(audit: bool) -> Verdict {
    if audit { Verdict::Audit } else { Verdict::Drop }
}
