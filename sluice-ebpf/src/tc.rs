//! TC egress: replies from NAT backends leave with the VIP (and service
//! port) as their source, so clients only ever see the VIP. Checksums are
//! updated with the skb helpers, which also handle offloaded (partial) sums.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use sluice_common::lb::{BackendKey, LB_F_ENABLED, Vip, lb_stat};

use crate::maps::{LB_CONFIG, LB_REVERSE, LB_STATS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Always lets the packet go on (TCX_NEXT): this program only rewrites.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let _ = translate(ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = LB_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn lookup(key: &mut BackendKey) -> Option<Vip> {
    // SAFETY: read-only lookups of plain values, copied out.
    unsafe {
        if let Some(v) = LB_REVERSE.get(&*key) {
            return Some(*v);
        }
        key.port = 0;
        LB_REVERSE.get(&*key).copied()
    }
}

#[inline(always)]
fn translate(ctx: &TcContext) -> Option<()> {
    let cfg = LB_CONFIG.get(0)?;
    if cfg.flags & LB_F_ENABLED == 0 {
        return None;
    }
    let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    let l3 = ETH_HLEN;
    match ether_type {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(l3).ok()?;
            let frags = u16::from_be(ctx.load::<u16>(l3 + 6).ok()?);
            if frags & 0x1fff != 0 {
                return None;
            }
            let proto = ctx.load::<u8>(l3 + 9).ok()?;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return None;
            }
            let l4 = l3 + usize::from(vihl & 0x0f) * 4;
            let src = ctx.load::<[u8; 4]>(l3 + 12).ok()?;
            let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&src);
            let mut key = BackendKey {
                addr: sluice_common::addr_words(&a),
                port: sport,
                proto,
                family: 4,
                _pad: 0,
            };
            let vip = lookup(&mut key)?;
            let v = vip.addr[0].to_ne_bytes();
            let new = [v[0], v[1], v[2], v[3]];
            let check = if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 };
            let from = u64::from(u32::from_ne_bytes(src));
            let to = u64::from(u32::from_ne_bytes(new));
            let mangled = if proto == IPPROTO_UDP {
                u64::from(BPF_F_MARK_MANGLED_0)
            } else {
                0
            };
            ctx.l4_csum_replace(check, from, to, u64::from(BPF_F_PSEUDO_HDR) | mangled | 4)
                .ok()?;
            ctx.l3_csum_replace(l3 + 10, from, to, 4).ok()?;
            ctx.store(l3 + 12, &new, 0).ok()?;
            rewrite_port(ctx, l4, check, sport, vip.port, mangled)?;
        }
        ETH_P_IPV6 => {
            // Replies carry no extension headers in practice; ones that do are
            // left alone (documented).
            let proto = ctx.load::<u8>(l3 + 6).ok()?;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return None;
            }
            let l4 = l3 + 40;
            let mut src = ctx.load::<[u8; 16]>(l3 + 8).ok()?;
            let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
            let mut key = BackendKey {
                addr: sluice_common::addr_words(&src),
                port: sport,
                proto,
                family: 6,
                _pad: 0,
            };
            let vip = lookup(&mut key)?;
            let mut new = [0u8; 16];
            new[..8].copy_from_slice(&vip.addr[0].to_ne_bytes());
            new[8..].copy_from_slice(&vip.addr[1].to_ne_bytes());
            // SAFETY: both buffers are 16 bytes on the stack.
            let diff = unsafe {
                bpf_csum_diff(
                    src.as_mut_ptr().cast(),
                    16,
                    new.as_mut_ptr().cast(),
                    16,
                    0,
                )
            };
            if diff < 0 {
                return None;
            }
            let check = if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 };
            ctx.l4_csum_replace(check, 0, diff as u64, u64::from(BPF_F_PSEUDO_HDR))
                .ok()?;
            ctx.store(l3 + 8, &new, 0).ok()?;
            rewrite_port(ctx, l4, check, sport, vip.port, 0)?;
        }
        _ => return None,
    }
    bump(lb_stat::REVERSE_NAT);
    Some(())
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    l4: usize,
    check: usize,
    old: u16,
    new: u16,
    flags: u64,
) -> Option<()> {
    if new == 0 || new == old {
        return Some(());
    }
    ctx.l4_csum_replace(
        check,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        flags | 2,
    )
    .ok()?;
    ctx.store(l4, &new.to_be(), 0).ok()
}
