//! The DDoS stage: token buckets of `limit` rules (shared or per source),
//! escalation reports, and the SYN guard's challenge/answer exchange.
//! Decisions here are called from the rule scan in the firewall stage; the
//! challenge is written by its own program (`sluice_syn_challenge`).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use sluice_common::{
    AddrKey, Bucket, Escalation, Family, OVER_GAP_NS, REPORT_INTERVAL_NS, RULE_F_BYTES,
    RULE_F_ESCALATE, RULE_F_PER_SOURCE, Rule, SrcKey, stat, words_bytes, words_v4,
};

use crate::{
    counters::bump,
    maps::{
        DDOS_CONFIG, EVENTS, NEW_SOURCES, OVERFLOW_BKTS, RULE_BUCKETS, SRC_BUCKETS, SYN_VERIFIED,
    },
    net::{
        csum::{fold, sum16},
        parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN},
        proto::{IPPROTO_TCP, IPV4_HDR, IPV6_HDR, TCP_HDR},
        ptr::ptr_at,
    },
    time::{conform, now},
};

/// What one packet costs in a rule's bucket, in nanoseconds.
#[inline(always)]
fn cost(r: &Rule, bytes: u64) -> u64 {
    if r.flags & RULE_F_BYTES != 0 {
        // interval is picoseconds per byte.
        bytes * r.interval / 1000
    } else {
        r.interval
    }
}

/// Network-order prefix mask of `bits` bits for the 64-bit word `word`
/// (0 or 1) of an address stored with `addr_words`.
#[inline(always)]
fn word_mask(bits: u32, word: u32) -> u64 {
    let start = word * 64;
    if bits <= start {
        return 0;
    }
    let k = bits - start;
    if k >= 64 {
        return u64::MAX;
    }
    (u64::MAX << (64 - k)).to_be()
}

pub enum Limit {
    Conform,
    Over,
    /// The source had no bucket of its own and the shared overflow bucket was empty.
    MapFull,
}

/// Checks a `limit` rule's bucket for this packet.
#[inline(always)]
pub fn limit(r: &Rule, pkt: &Packet, bytes: u64) -> Limit {
    let now = now();
    let c = cost(r, bytes);
    // A byte rule's burst is the bytes that may come back to back, so this
    // packet must fit in it: the bucket may be at most the burst ahead once
    // the packet is counted. (A packet rule's tolerance already leaves room
    // for the one packet.)
    let tolerance = if r.flags & RULE_F_BYTES != 0 {
        r.tolerance_ns.saturating_sub(c)
    } else {
        r.tolerance_ns
    };
    if r.flags & RULE_F_PER_SOURCE == 0 {
        let Some(b) = RULE_BUCKETS.get_ptr_mut(r.stats_slot) else {
            return Limit::Conform;
        };
        return if conform(b, now, c, tolerance) {
            Limit::Conform
        } else {
            Limit::Over
        };
    }
    let fam = u32::from(pkt.family.version());
    let bits = if fam == 4 {
        u32::from(r.per_source_v4)
    } else {
        u32::from(r.per_source_v6)
    };
    let key = SrcKey {
        rule_id: r.id,
        family: fam,
        addr: [
            pkt.src[0] & word_mask(bits, 0),
            pkt.src[1] & word_mask(bits, 1),
        ],
    };
    let own = match SRC_BUCKETS.get_ptr_mut(&key) {
        Some(b) => Some(b),
        None => new_bucket(&key, now),
    };
    let Some(b) = own else {
        let Some(shared) = OVERFLOW_BKTS.get_ptr_mut(r.stats_slot) else {
            return Limit::MapFull;
        };
        return if conform(shared, now, c, tolerance) {
            Limit::Conform
        } else {
            Limit::MapFull
        };
    };
    if conform(b, now, c, tolerance) {
        return Limit::Conform;
    }
    // SAFETY: b is a live map value; the bookkeeping below tolerates races
    // between CPUs (at worst a report is sent twice or a second late).
    unsafe {
        // `now` was read before the lookup: another CPU may have stored a
        // later time meanwhile, so every difference saturates.
        let last = (*b).last_over_ns;
        let mut since = (*b).over_since_ns;
        if since == 0 || now.saturating_sub(last) > OVER_GAP_NS {
            since = now;
            (*b).over_since_ns = now;
        }
        if now > last {
            (*b).last_over_ns = now;
        }
        let over_for = now.saturating_sub(since);
        if r.flags & RULE_F_ESCALATE != 0
            && over_for >= u64::from(r.escalate_after_ms) * 1_000_000
            && now.saturating_sub((*b).reported_ns) >= REPORT_INTERVAL_NS
        {
            (*b).reported_ns = now;
            report(r, &key, bits, now, over_for);
        }
    }
    Limit::Over
}

static FRESH_BUCKET: Bucket = Bucket {
    tat_ns: 0,
    over_since_ns: 0,
    last_over_ns: 0,
    reported_ns: 0,
};

/// A bucket for a source seen for the first time, unless the new-source
/// rate cap says no (then the source shares the overflow bucket).
#[inline(always)]
fn new_bucket(key: &SrcKey, now: u64) -> Option<*mut Bucket> {
    if let Some(cfg) = DDOS_CONFIG.get(0)
        && cfg.new_source_interval_ns != 0
    {
        let b = NEW_SOURCES.get_ptr_mut(0)?;
        if !conform(
            b,
            now,
            cfg.new_source_interval_ns,
            cfg.new_source_tolerance_ns,
        ) {
            bump(stat::SRC_CAPPED);
            return None;
        }
    }
    const BPF_NOEXIST: u64 = 1;
    // The new bucket's value comes from read-only data rather than the
    // stack: the rule scan's stack frame adds to the pipeline's.
    match SRC_BUCKETS.insert(key, &FRESH_BUCKET, BPF_NOEXIST) {
        Ok(()) => bump(stat::SRC_INSERTED),
        // Another CPU inserted it first: use that one.
        Err(-17) => {}
        Err(_) => {
            bump(stat::SRC_INSERT_FAILED);
            return None;
        }
    }
    SRC_BUCKETS.get_ptr_mut(key)
}

#[inline(always)]
fn report(r: &Rule, key: &SrcKey, bits: u32, now: u64, over_for: u64) {
    let Some(mut entry) = EVENTS.reserve::<Escalation>(0) else {
        bump(stat::ESCALATIONS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: ev points at the reserved record; every field is written.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).rule_id = r.id;
        (*ev).family = key.family;
        (*ev).addr = words_bytes(key.addr);
        (*ev).prefix_len = bits;
        (*ev).ttl_s = r.escalate_ttl_s;
        (*ev).over_for_ms = (over_for / 1_000_000) as u32;
        (*ev)._pad = 0;
    }
    entry.submit(0);
    bump(stat::ESCALATIONS);
}

// SYN guard.

#[inline(always)]
fn src_key(pkt: &Packet) -> AddrKey {
    AddrKey {
        family: u32::from(pkt.family.version()),
        _pad: 0,
        addr: pkt.src,
    }
}

/// The source answered a challenge recently.
#[inline(always)]
pub fn verified(pkt: &Packet) -> bool {
    match SYN_VERIFIED.get_ptr(&src_key(pkt)) {
        // SAFETY: live map value.
        Some(exp) => (unsafe { *exp }) > now(),
        None => false,
    }
}

/// SYN-guard rule bucket check (shared per rule).
#[inline(always)]
pub fn syn_rate_ok(r: &Rule) -> bool {
    let Some(b) = RULE_BUCKETS.get_ptr_mut(r.stats_slot) else {
        return true;
    };
    conform(b, now(), r.interval, r.tolerance_ns)
}

#[inline(always)]
fn rotl(x: u64, b: u32) -> u64 {
    x.rotate_left(b)
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = rotl(v[1], 13) ^ v[0];
    v[0] = rotl(v[0], 32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = rotl(v[3], 16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = rotl(v[3], 21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = rotl(v[1], 17) ^ v[2];
    v[2] = rotl(v[2], 32);
}

/// SipHash-1-3 of five words under the cookie key: unpredictable without
/// the key, so a spoofing sender cannot forge an answer it never received.
#[inline(always)]
fn keyed_hash(k: [u64; 2], m: [u64; 5]) -> u64 {
    let mut v = [
        k[0] ^ 0x736f_6d65_7073_6575,
        k[1] ^ 0x646f_7261_6e64_6f6d,
        k[0] ^ 0x6c79_6765_6e65_7261,
        k[1] ^ 0x7465_6462_7974_6573,
    ];
    for w in m {
        v[3] ^= w;
        sip_round(&mut v);
        v[0] ^= w;
    }
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Challenge cookies change every 64 s; an answer is accepted for the
/// current and the previous period.
const COOKIE_PERIOD_SHIFT: u32 = 36;

#[inline(always)]
fn cookie(pkt: &Packet, period: u64) -> u32 {
    let key = match DDOS_CONFIG.get(0) {
        Some(c) => c.secret,
        None => [0, 0],
    };
    let ports = (u64::from(pkt.sport) << 16) | u64::from(pkt.dport);
    keyed_hash(
        key,
        [
            pkt.src[0],
            pkt.src[1],
            pkt.dst[0],
            pkt.dst[1],
            ports | (period << 32),
        ],
    ) as u32
}

/// A reset that answers our challenge: the client's stack sends RST with
/// seq = the (deliberately wrong) acknowledgement number of our SYN-ACK.
/// A correct answer verifies the source.
#[inline(always)]
pub fn answer_verifies(pkt: &Packet) -> bool {
    // Only a bare RST can be an answer: everything else costs one test.
    if pkt.tcp_flags & (TCP_RST | TCP_ACK | TCP_SYN) != TCP_RST {
        return false;
    }
    let ttl_ns = DDOS_CONFIG.get(0).map_or(0, |c| c.verified_ttl_ns);
    let now = now();
    let period = now >> COOKIE_PERIOD_SHIFT;
    if pkt.tcp_seq != cookie(pkt, period) && pkt.tcp_seq != cookie(pkt, period.wrapping_sub(1)) {
        return false;
    }
    let expiry = now + ttl_ns;
    if SYN_VERIFIED.insert(src_key(pkt), expiry, 0).is_ok() {
        bump(stat::SYN_VERIFIED);
    } else {
        bump(stat::SYN_VERIFY_FAILED);
    }
    true
}

/// Turns the SYN in `ctx` into the challenge: a SYN-ACK back to the sender
/// whose acknowledgement number is the cookie, which a real TCP stack
/// answers with a reset carrying it. Returns the XDP action (`XDP_TX`, or
/// `XDP_DROP` when the frame has a shape sluice does not answer: IPv4
/// options, IPv6 extension headers).
#[inline(always)]
pub fn challenge(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let is_v4 = matches!(pkt.family, Family::V4);
    let ip_len = if is_v4 { IPV4_HDR } else { IPV6_HDR };
    if pkt.l4_off != pkt.l3_off + ip_len {
        return xdp_action::XDP_DROP;
    }
    let ck = cookie(pkt, now() >> COOKIE_PERIOD_SHIFT);
    let new_len = pkt.l4_off + TCP_HDR;
    let old_len = ctx.data_end() - ctx.data();
    if old_len > new_len {
        // SAFETY: shrinking the frame by a positive amount.
        let r = unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((old_len - new_len) as i32)) };
        if r != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    let Some(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let e = &mut *eth;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&e[6..12]);
        macs[6..].copy_from_slice(&e[..6]);
        *e = macs;
    }
    let src = pkt.src;
    let dst = pkt.dst;
    let mut pseudo: u64;
    if is_v4 {
        let Some(ip) = ptr_at::<[u8; IPV4_HDR]>(ctx, pkt.l3_off) else {
            return xdp_action::XDP_DROP;
        };
        let s = words_v4(src);
        let d = words_v4(dst);
        let tot = ((IPV4_HDR + TCP_HDR) as u16).to_be_bytes();
        let mut h = [
            0x45,
            0,
            tot[0],
            tot[1],
            0,
            0,
            0x40,
            0,
            64,
            IPPROTO_TCP,
            0,
            0,
            d[0],
            d[1],
            d[2],
            d[3],
            s[0],
            s[1],
            s[2],
            s[3],
        ];
        let c = fold(sum16(&h)).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        // SAFETY: bounds checked by ptr_at.
        unsafe { *ip = h };
        pseudo = sum16(&[d[0], d[1], d[2], d[3], s[0], s[1], s[2], s[3]]);
    } else {
        let Some(ip) = ptr_at::<[u8; IPV6_HDR]>(ctx, pkt.l3_off) else {
            return xdp_action::XDP_DROP;
        };
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &mut *ip };
        h[4] = 0;
        h[5] = TCP_HDR as u8;
        h[6] = IPPROTO_TCP;
        h[7] = 64;
        let (d, s) = (words_bytes(dst), words_bytes(src));
        h[8..24].copy_from_slice(&d);
        h[24..40].copy_from_slice(&s);
        pseudo = sum16(&d) + sum16(&s);
    }
    pseudo += u64::from(IPPROTO_TCP) + TCP_HDR as u64;
    let Some(tcp) = ptr_at::<[u8; TCP_HDR]>(ctx, pkt.l4_off) else {
        return xdp_action::XDP_DROP;
    };
    let sp = pkt.dport.to_be_bytes();
    let dp = pkt.sport.to_be_bytes();
    // Our sequence number is irrelevant (the client resets); the
    // acknowledgement number carries the cookie.
    let seq = (ck ^ 0x5eed_5eed).to_be_bytes();
    let ack = ck.to_be_bytes();
    let mut t = [
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        seq[0],
        seq[1],
        seq[2],
        seq[3],
        ack[0],
        ack[1],
        ack[2],
        ack[3],
        0x50,
        TCP_SYN | TCP_ACK,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ];
    let c = fold(pseudo + sum16(&t)).to_be_bytes();
    t[16] = c[0];
    t[17] = c[1];
    // SAFETY: bounds checked by ptr_at.
    unsafe { *tcp = t };
    bump(stat::SYN_CHALLENGES);
    xdp_action::XDP_TX
}
