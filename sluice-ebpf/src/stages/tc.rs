//! TC egress: replies from NAT backends leave with the VIP (and service
//! port) as their source, so clients only ever see the VIP. Checksums are
//! updated with the skb helpers, which also handle offloaded (partial) sums.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use sluice_common::{
    Family, addr_words,
    lb::{BackendKey, LB_F_ENABLED, Vip, lb_stat},
    v4_words, words_bytes, words_v4,
};

use crate::{
    counters::bump_lb as bump,
    maps::{LB_CONFIG, LB_REVERSE},
    net::csum::{delta, fold},
    net::proto::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_PARAMETERPROB, ICMP_TIME_EXCEEDED,
        ICMPV6_ERROR_MAX, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    },
};

/// Difference of two equal-length buffers for `l4_csum_replace` (diff mode).
#[inline(always)]
fn diff<const N: usize>(old: &mut [u8; N], new: &mut [u8; N]) -> Option<u64> {
    // SAFETY: both buffers are N bytes on the stack (N a multiple of 4).
    let d = unsafe {
        bpf_csum_diff(
            old.as_mut_ptr().cast(),
            N as u32,
            new.as_mut_ptr().cast(),
            N as u32,
            0,
        )
    };
    u64::try_from(d).ok()
}

/// An ICMP error a NAT backend sends a client about a translated
/// connection ("port unreachable", ...): its source and the quoted
/// packet's destination become the VIP (and service port), so the client
/// can match it to its connection. Checksums: the outer IP header's, the
/// quoted IPv4 header's, and the ICMP checksum over all of it.
#[inline(always)]
fn icmp_error(ctx: &TcContext, l3: usize, l4: usize, v6: bool) -> Option<()> {
    let ty = ctx.load::<u8>(l4).ok()?;
    let error = if v6 {
        (1..=ICMPV6_ERROR_MAX).contains(&ty)
    } else {
        matches!(
            ty,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
    };
    if !error {
        return None;
    }
    let i3 = l4 + 8;
    let (proto, idst_off, i4) = if v6 {
        (ctx.load::<u8>(i3 + 6).ok()?, i3 + 24, i3 + 40)
    } else {
        let vihl = ctx.load::<u8>(i3).ok()?;
        (
            ctx.load::<u8>(i3 + 9).ok()?,
            i3 + 16,
            i3 + usize::from(vihl & 0x0f) * 4,
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let dport = u16::from_be(ctx.load::<u16>(i4 + 2).ok()?);
    let check = l4 + 2;
    let vip = if v6 {
        let mut idst = ctx.load::<[u8; 16]>(idst_off).ok()?;
        let mut osrc = ctx.load::<[u8; 16]>(l3 + 8).ok()?;
        // Only errors the backend itself sends.
        if osrc != idst {
            return None;
        }
        let vip = lookup(addr_words(&idst), dport, proto, Family::V6)?;
        let mut new = words_bytes(vip.addr);
        let mut new2 = new;
        let d_outer = diff(&mut osrc, &mut new)?;
        ctx.l4_csum_replace(check, 0, d_outer, u64::from(BPF_F_PSEUDO_HDR))
            .ok()?;
        ctx.store(l3 + 8, &new, 0).ok()?;
        let d_inner = diff(&mut idst, &mut new2)?;
        ctx.l4_csum_replace(check, 0, d_inner, 0).ok()?;
        ctx.store(idst_off, &new2, 0).ok()?;
        vip
    } else {
        let idst = ctx.load::<[u8; 4]>(idst_off).ok()?;
        let osrc = ctx.load::<[u8; 4]>(l3 + 12).ok()?;
        if osrc != idst {
            return None;
        }
        let vip = lookup(v4_words(idst), dport, proto, Family::V4)?;
        let new = words_v4(vip.addr);
        let from = u64::from(u32::from_ne_bytes(idst));
        let to = u64::from(u32::from_ne_bytes(new));
        // Outer source: the IP checksum (ICMPv4 has no pseudo-header).
        ctx.l3_csum_replace(l3 + 10, from, to, 4).ok()?;
        ctx.store(l3 + 12, &new, 0).ok()?;
        // Quoted destination: its own header checksum, and the ICMP
        // checksum for both changes.
        let old_ck = ctx.load::<u16>(i3 + 10).ok()?;
        let new_ck = fold(u64::from(!u16::from_be(old_ck)) + delta(&idst, &new)).to_be();
        ctx.store(i3 + 10, &new_ck, 0).ok()?;
        ctx.store(idst_off, &new, 0).ok()?;
        ctx.l4_csum_replace(check, from, to, 4).ok()?;
        ctx.l4_csum_replace(check, u64::from(old_ck), u64::from(new_ck), 2)
            .ok()?;
        vip
    };
    // The quoted destination port (the quoted L4 checksum is left alone:
    // receivers do not check it).
    if vip.port != 0 && vip.port != dport {
        ctx.l4_csum_replace(
            check,
            u64::from(dport.to_be()),
            u64::from(vip.port.to_be()),
            2,
        )
        .ok()?;
        ctx.store(i4 + 2, &vip.port.to_be(), 0).ok()?;
    }
    bump(lb_stat::ICMP_TRANSLATED);
    Some(())
}

/// Always lets the packet go on (TCX_NEXT): this program only rewrites.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let _ = translate(ctx);
    TC_ACT_UNSPEC
}

/// The VIP a NAT backend's `addr`:`port` (`proto`) answers for: the
/// service port's entry, else the whole-VIP one (port 0).
#[inline(always)]
fn lookup(addr: [u64; 2], port: u16, proto: u8, family: Family) -> Option<Vip> {
    let mut key = BackendKey {
        addr,
        port,
        proto,
        family: family.version(),
        _pad: 0,
    };
    // SAFETY: read-only lookups of plain values, copied out.
    unsafe {
        if let Some(v) = LB_REVERSE.get(&key) {
            return Some(*v);
        }
        key.port = 0;
        LB_REVERSE.get(&key).copied()
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
            let l4 = l3 + usize::from(vihl & 0x0f) * 4;
            if proto == IPPROTO_ICMP {
                return icmp_error(ctx, l3, l4, false);
            }
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return None;
            }
            let src = ctx.load::<[u8; 4]>(l3 + 12).ok()?;
            let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
            let vip = lookup(v4_words(src), sport, proto, Family::V4)?;
            let new = words_v4(vip.addr);
            let check = if proto == IPPROTO_TCP {
                l4 + 16
            } else {
                l4 + 6
            };
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
            let l4 = l3 + 40;
            if proto == IPPROTO_ICMPV6 {
                return icmp_error(ctx, l3, l4, true);
            }
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return None;
            }
            let mut src = ctx.load::<[u8; 16]>(l3 + 8).ok()?;
            let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
            let vip = lookup(addr_words(&src), sport, proto, Family::V6)?;
            let mut new = words_bytes(vip.addr);
            let diff = diff(&mut src, &mut new)?;
            let check = if proto == IPPROTO_TCP {
                l4 + 16
            } else {
                l4 + 6
            };
            // A UDP checksum over IPv6 is never 0: a computed 0 is sent as
            // 0xffff (the original is never 0 either).
            let mangled = if proto == IPPROTO_UDP {
                u64::from(BPF_F_MARK_MANGLED_0)
            } else {
                0
            };
            ctx.l4_csum_replace(check, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | mangled)
                .ok()?;
            ctx.store(l3 + 8, &new, 0).ok()?;
            rewrite_port(ctx, l4, check, sport, vip.port, mangled)?;
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
