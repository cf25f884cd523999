//! The socket stage: judges a workload's connect(), sendmsg() and bind()
//! by its rules (first match wins) and its default, counts the decision,
//! and returns 1 (allow) or 0 (deny: the call fails with EPERM before any
//! packet exists). Part of the socket object (`sock_main.rs`), not of the
//! XDP pipeline.
//!
//! The workload is the nearest ancestor cgroup of the calling process that
//! is in `WORKLOADS` (the programs are attached only to workload cgroups,
//! and nested workloads are refused by the control plane, so there is at
//! most one). A call from a process in no workload is allowed, uncounted.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    },
    programs::SockAddrContext,
};
use sluice_common::{
    Verdict,
    sock::{
        MAX_CGROUP_LEVEL, MAX_SOCK_RULES, MAX_WORKLOADS, SOCK_RULE_F_ADDR, SOCK_RULE_F_FAMILY,
        SOCK_RULE_F_PORT, SockEvent, SockHook, SockReason, SockRule, WORKLOAD_F_ACTIVE,
        WORKLOAD_F_AUDIT, sock_counter_slot,
    },
    words_bytes,
};

use crate::{
    sock_maps::{
        SOCK_EVENTS, SOCK_GENERATION, SOCK_LOST, SOCK_POLICY, SOCK_RULES, SOCK_STATS, WORKLOADS,
    },
    sockaddr::{self, Call},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// The workload slot and cgroup id of the calling process, if it is in a workload.
#[inline(always)]
fn workload() -> Option<(u32, u64)> {
    // Level 0 is the root cgroup, never a workload.
    for level in 1..=MAX_CGROUP_LEVEL {
        // SAFETY: plain helper call.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return None;
        }
        // SAFETY: the value is read at once.
        if let Some(slot) = unsafe { WORKLOADS.get(&id) } {
            return Some((*slot, id));
        }
    }
    None
}

#[inline(always)]
fn matches(r: &SockRule, c: &Call) -> bool {
    if r.flags & SOCK_RULE_F_FAMILY != 0 && r.family != c.family {
        return false;
    }
    if r.proto != 0 && r.proto != c.proto {
        return false;
    }
    if r.flags & SOCK_RULE_F_PORT != 0 && (c.port < r.port_lo || c.port > r.port_hi) {
        return false;
    }
    if r.flags & SOCK_RULE_F_ADDR != 0
        && (c.addr[0] & r.mask[0] != r.net[0] || c.addr[1] & r.mask[1] != r.net[1])
    {
        return false;
    }
    true
}

/// The verdict of the calling workload's policy on this call (1 allow, 0 deny).
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: SockHook, v6: bool) -> i32 {
    let Some((slot, workload_cgroup)) = workload() else {
        return ALLOW;
    };
    if slot >= MAX_WORKLOADS {
        return ALLOW;
    }
    let g = SOCK_GENERATION.get(0).copied().unwrap_or(0) & 1;
    let index = g * MAX_WORKLOADS + slot;
    let Some(policy) = SOCK_POLICY.get(index) else {
        return ALLOW;
    };
    if policy.flags & WORKLOAD_F_ACTIVE == 0 {
        return ALLOW;
    }
    let c = sockaddr::read(ctx, v6);
    let (first, count, default) = match hook {
        SockHook::Bind => (policy.connect_rules, policy.bind_rules, policy.bind_default),
        _ => (0, policy.connect_rules, policy.connect_default),
    };
    let base = index * MAX_SOCK_RULES + first;
    let mut verdict = default;
    let mut reason = SockReason::Default;
    let mut rule = 0;
    for i in 0..MAX_SOCK_RULES {
        if i >= count {
            break;
        }
        let Some(r) = SOCK_RULES.get(base + i) else {
            break;
        };
        if matches(r, &c) {
            verdict = r.action;
            reason = SockReason::Rule;
            rule = r.id;
            break;
        }
    }
    let verdict = if verdict == Verdict::Drop as u32 {
        if policy.flags & WORKLOAD_F_AUDIT != 0 {
            Verdict::Audit
        } else {
            Verdict::Drop
        }
    } else {
        Verdict::Pass
    };
    let counter = sock_counter_slot(slot, hook as u32, verdict as u32, reason as u32);
    if let Some(n) = SOCK_STATS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
    if verdict != Verdict::Pass {
        report(&c, hook, verdict, reason, rule, workload_cgroup);
    }
    if verdict == Verdict::Drop {
        DENY
    } else {
        ALLOW
    }
}

/// Writes a denied or audited call to `SOCK_EVENTS` (counted in
/// `SOCK_LOST` when the ring is full).
#[inline(always)]
fn report(
    c: &Call,
    hook: SockHook,
    verdict: Verdict,
    reason: SockReason,
    rule: u32,
    workload_cgroup: u64,
) {
    let Some(mut entry) = SOCK_EVENTS.reserve::<SockEvent>(0) else {
        if let Some(n) = SOCK_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe { *n += 1 };
        }
        return;
    };
    // SAFETY: plain helper calls.
    let (ts_ns, cgroup) = unsafe { (bpf_ktime_get_boot_ns(), bpf_get_current_cgroup_id()) };
    entry.write(SockEvent {
        ts_ns,
        workload_cgroup,
        cgroup,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        hook: hook as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        addr: words_bytes(c.addr),
        port: c.port,
        family: c.family as u8,
        proto: c.proto as u8,
        verdict: verdict as u8,
        reason: reason as u8,
        _pad: 0,
        rule,
        _pad2: 0,
    });
    entry.submit(0);
}
