//! Deterministic deny lists. Entry 0 of each list is the prefix the "drop"
//! frames hit; the rest is filler drawn uniformly (a fixed-seed generator) so
//! the tries have the shape of a real block list: IPv4 /32s over the whole
//! unicast space, IPv6 /64s over 2000::/3. Filler never covers the addresses
//! the "pass" frames come from, so those still pass.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Source of the frames that must pass (never covered by a list).
pub const PASS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const PASS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// Source of the frames that must be dropped, and the list entry covering it.
pub const DROP_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const DROP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
pub fn hit_v4() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 19, 0, 0), 24).expect("valid")
}
pub fn hit_v6() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0), 64).expect("valid")
}

/// SplitMix64: small, fast, good enough to spread prefixes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Where the benchmarks take prefixes they add one at a time (incremental
/// changes): filler never falls in here, so those are always new.
pub fn extra_space() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 19, 128, 0), 17).expect("valid")
}

/// `n` IPv4 filler /32s: unicast (1.0.0.0–223.255.255.255), distinct, never
/// [`PASS_V4`], inside the hit prefix, in [`extra_space`] or in `avoid`.
pub fn filler_v4(n: usize, seed: u64, avoid: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let hit = hit_v4();
    let extra = extra_space();
    while out.len() < n {
        let a = rng.next_u64() as u32;
        let first = a >> 24;
        if first == 0 || first >= 224 {
            continue;
        }
        let addr = Ipv4Addr::from(a);
        if addr == PASS_V4
            || hit.contains(&addr)
            || extra.contains(&addr)
            || avoid.iter().any(|p| p.contains(&addr))
        {
            continue;
        }
        if seen.insert(a) {
            out.push(Ipv4Net::new(addr, 32).expect("valid"));
        }
    }
    out
}

/// `n` IPv6 filler /64s inside 2000::/3, distinct, never covering
/// [`PASS_V6`] nor equal to the hit prefix.
pub fn filler_v6(n: usize, seed: u64) -> Vec<Ipv6Net> {
    let mut rng = Rng::new(seed ^ 0x6666);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let pass = Ipv6Net::new(PASS_V6, 64).expect("valid").trunc();
    while out.len() < n {
        let hi = (rng.next_u64() & 0x1fff_ffff_ffff_ffff) | 0x2000_0000_0000_0000;
        let net = Ipv6Net::new(Ipv6Addr::from(u128::from(hi) << 64), 64).expect("valid");
        if net == pass || net == hit_v6() {
            continue;
        }
        if seen.insert(hi) {
            out.push(net);
        }
    }
    out
}

/// A deny list of `n` prefixes per family: the hit prefix plus `n - 1` filler.
pub struct DenyList {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl DenyList {
    pub fn new(n: usize) -> Self {
        let mut v4 = vec![hit_v4()];
        v4.extend(filler_v4(n.saturating_sub(1), 0x5eed_0004, &[]));
        let mut v6 = vec![hit_v6()];
        v6.extend(filler_v6(n.saturating_sub(1), 0x5eed_0006));
        Self { v4, v6 }
    }

    pub fn all(&self) -> Vec<IpNet> {
        self.v4
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(self.v6.iter().map(|n| IpNet::V6(*n)))
            .collect()
    }

    /// Every prefix with the deny list of its family, as a sluice change
    /// adds them.
    pub fn entries(&self) -> Vec<(sluice_common::ListId, IpNet)> {
        self.all()
            .into_iter()
            .map(|p| (sluice::dataplane::policy::list_for(false, &p), p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_is_distinct_and_avoids_the_pass_sources() {
        let l = DenyList::new(5000);
        assert_eq!(l.v4.len(), 5000);
        assert_eq!(l.v6.len(), 5000);
        let s: HashSet<_> = l.v4.iter().collect();
        assert_eq!(s.len(), 5000);
        assert!(!l.v4.iter().any(|p| p.contains(&PASS_V4)));
        assert!(!l.v6.iter().any(|p| p.contains(&PASS_V6)));
        assert!(l.v4[0].contains(&DROP_V4) && l.v6[0].contains(&DROP_V6));
    }
}
