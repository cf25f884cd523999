//! sk_lookup steering's model: a steer names a service's one socket and the
//! (protocol, prefixes, port range) delivered to it, as the user writes it;
//! the checks that need no kernel, and the rule table the kernel reads.

use std::{collections::BTreeMap, fmt, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sluice_common::steer::{
    MAX_STEER_DESTS, STEER_F_PASS_MISSING, STEER_KEY_HEAD_BITS, STEER_PREFIXES, STEER_RANGES,
    SteerEntry, SteerKey, SteerRange,
};

use crate::model::lb::Proto;

/// What happens to steered traffic while no socket is registered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Refused (TCP: a reset; UDP: dropped), so steered traffic never
    /// reaches another listener.
    #[default]
    Drop,
    /// The normal socket lookup runs.
    Pass,
}

impl OnMissing {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Pass => "pass",
        }
    }
}

/// An inclusive port range, written `N` or `N-M` (or a bare integer in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ALL: Self = Self { lo: 1, hi: 65535 };

    fn overlaps(self, o: Self) -> bool {
        self.lo <= o.hi && o.lo <= self.hi
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::ALL
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port range (N or N-M, 1-65535)");
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || hi < lo {
            return Err(bad());
        }
        Ok(Self { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string().parse(),
            Raw::Str(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A steer: traffic of `proto` to `prefixes` on `ports` goes to the one
/// socket registered under `name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steer {
    pub name: String,
    pub proto: Proto,
    pub prefixes: Vec<IpNet>,
    #[serde(default)]
    pub ports: PortRange,
    #[serde(default)]
    pub on_missing: OnMissing,
}

impl Steer {
    /// The checks one steer needs on its own.
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name)?;
        if self.prefixes.is_empty() {
            return Err(format!("steer {}: no prefix", self.name));
        }
        for (i, p) in self.prefixes.iter().enumerate() {
            crate::model::policy::exact_prefix(p)
                .map_err(|e| format!("steer {}: {e}", self.name))?;
            if self.prefixes[..i].contains(p) {
                return Err(format!("steer {}: {p} is listed twice", self.name));
            }
            if let IpNet::V6(v6) = p
                && v6.prefix_len() >= 96
                && v6.network().to_ipv4_mapped().is_some()
            {
                return Err(format!(
                    "steer {}: {p} is IPv4-mapped; write the IPv4 prefix (IPv4 traffic is looked up as IPv4)",
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// The prefixes without host bits, as the kernel holds them.
    fn networks(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.prefixes.iter().map(IpNet::trunc)
    }
}

impl fmt::Display for Steer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefixes: Vec<String> = self.prefixes.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} {} ports {}",
            self.proto.name(),
            prefixes.join(","),
            self.ports
        )?;
        if self.on_missing == OnMissing::Pass {
            f.write_str(" (no socket: pass)")?;
        }
        Ok(())
    }
}

/// 1-32 of a-z, 0-9, _ and -, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    crate::model::sock::check_name(name)
        .map_err(|_| format!("`{name}` is not a steer name (1-32 of a-z, 0-9, _ and -, starting with a letter or digit)"))
}

/// The checks a whole set of steers needs: names unique, room for them,
/// no port claimed twice for one prefix, a table the kernel can hold.
pub fn validate(steers: &[Steer]) -> Result<(), String> {
    if steers.len() > MAX_STEER_DESTS as usize {
        return Err(format!(
            "{} steers; sluice holds at most {MAX_STEER_DESTS}",
            steers.len()
        ));
    }
    for (i, s) in steers.iter().enumerate() {
        s.validate()?;
        for o in &steers[..i] {
            if o.name == s.name {
                return Err(format!("steer {} is defined twice", s.name));
            }
            if o.proto == s.proto
                && o.ports.overlaps(s.ports)
                && let Some(p) = s.networks().find(|p| o.networks().any(|q| q == *p))
            {
                return Err(format!(
                    "steers {} and {} both claim {} {p} ports {} and {} (one socket per port of a prefix)",
                    o.name,
                    s.name,
                    s.proto.name(),
                    o.ports,
                    s.ports
                ));
            }
        }
    }
    compile(steers, |i| i as u16).map(|_| ())
}

/// One `STEER_RULES` entry: the key without its generation, its prefix
/// length (head bits included) and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub prefix_len: u32,
    pub key: SteerKey,
    pub entry: SteerEntry,
}

/// The kernel's rule table for `steers`, the destination slot of steer `i`
/// given by `slot(i)`. Each (protocol, prefix) entry holds its own ranges,
/// then those of every shorter steered prefix covering it (longest first),
/// so the longest match alone decides: a longer prefix wins, and a port it
/// does not steer falls to the covering prefix.
pub fn compile(steers: &[Steer], slot: impl Fn(usize) -> u16) -> Result<Vec<TableEntry>, String> {
    // (proto, prefix) -> its own ranges, in steer order.
    let mut own: BTreeMap<(u8, IpNet), Vec<SteerRange>> = BTreeMap::new();
    for (i, s) in steers.iter().enumerate() {
        for p in s.networks() {
            own.entry((s.proto.number(), p))
                .or_default()
                .push(SteerRange {
                    lo: s.ports.lo,
                    hi: s.ports.hi,
                    dest: slot(i),
                    flags: if s.on_missing == OnMissing::Pass {
                        STEER_F_PASS_MISSING
                    } else {
                        0
                    },
                });
        }
    }
    if own.len() > STEER_PREFIXES as usize {
        return Err(format!(
            "steers name {} (protocol, prefix) pairs; sluice holds at most {STEER_PREFIXES}",
            own.len()
        ));
    }
    let mut out = Vec::with_capacity(own.len());
    for ((proto, p), ranges) in &own {
        let mut all = ranges.clone();
        let mut covering: Vec<(&IpNet, &Vec<SteerRange>)> = own
            .iter()
            .filter(|((q_proto, q), _)| {
                q_proto == proto && q.prefix_len() < p.prefix_len() && q.contains(&p.network())
            })
            .map(|((_, q), r)| (q, r))
            .collect();
        covering.sort_by_key(|(q, _)| std::cmp::Reverse(q.prefix_len()));
        for (_, r) in covering {
            all.extend_from_slice(r);
        }
        if all.len() > STEER_RANGES {
            return Err(format!(
                "{} {p}: {} port ranges apply (its own and those of the prefixes covering it); at most {STEER_RANGES}",
                if *proto == 6 { "tcp" } else { "udp" },
                all.len()
            ));
        }
        // Unused ranges hold no port (1-0), whatever reads them.
        let mut entry = SteerEntry {
            n: all.len() as u32,
            ranges: [SteerRange {
                lo: 1,
                hi: 0,
                dest: 0,
                flags: 0,
            }; STEER_RANGES],
        };
        entry.ranges[..all.len()].copy_from_slice(&all);
        let mut key = SteerKey {
            proto: *proto,
            ..SteerKey::default()
        };
        match p {
            IpNet::V4(v4) => {
                key.family = 4;
                key.addr[..4].copy_from_slice(&v4.network().octets());
            }
            IpNet::V6(v6) => {
                key.family = 6;
                key.addr.copy_from_slice(&v6.network().octets());
            }
        }
        out.push(TableEntry {
            prefix_len: STEER_KEY_HEAD_BITS + u32::from(p.prefix_len()),
            key,
            entry,
        });
    }
    Ok(out)
}

/// A change to the steers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SteerOp {
    Add { steer: Steer },
    Del { name: String },
}

impl SteerOp {
    /// Applies the change. `strict` (a new request) refuses an add of an
    /// existing name and a delete of a missing one; replaying onto a new
    /// base skips them.
    pub fn apply(&self, steers: &mut Vec<Steer>, strict: bool) -> Result<(), String> {
        match self {
            Self::Add { steer } => match steers.iter().position(|x| x.name == steer.name) {
                Some(_) if strict => {
                    return Err(format!(
                        "steer {} exists already (delete it first, or change the config)",
                        steer.name
                    ));
                }
                Some(i) => steers[i] = steer.clone(),
                None => steers.push(steer.clone()),
            },
            Self::Del { name } => match steers.iter().position(|x| x.name == *name) {
                Some(i) => {
                    steers.remove(i);
                }
                None if strict => return Err(format!("no steer {name}")),
                None => {}
            },
        }
        if strict {
            validate(steers)?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Add { steer } => format!("steer add {} ({steer})", steer.name),
            Self::Del { name } => format!("steer del {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steer(name: &str, proto: Proto, prefixes: &[&str], ports: &str) -> Steer {
        Steer {
            name: name.into(),
            proto,
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            ports: ports.parse().unwrap(),
            on_missing: OnMissing::Drop,
        }
    }

    /// What the kernel does with the table: longest matching entry, first
    /// range holding the port.
    fn lookup(table: &[TableEntry], proto: u8, addr: std::net::IpAddr, port: u16) -> Option<u16> {
        let (family, bytes, bits) = match addr {
            std::net::IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (4, b, 32)
            }
            std::net::IpAddr::V6(a) => (6, a.octets(), 128),
        };
        let best = table
            .iter()
            .filter(|e| e.key.proto == proto && e.key.family == family)
            .filter(|e| {
                let len = (e.prefix_len - STEER_KEY_HEAD_BITS).min(bits) as usize;
                (0..len).all(|i| {
                    let m = 0x80u8 >> (i % 8);
                    bytes[i / 8] & m == e.key.addr[i / 8] & m
                })
            })
            .max_by_key(|e| e.prefix_len)?;
        // As the kernel: every range up to `n` (the unused ones hold no port).
        best.entry
            .ranges
            .iter()
            .take(best.entry.n as usize)
            .find(|r| r.lo <= port && port <= r.hi)
            .map(|r| r.dest)
    }

    #[test]
    fn the_longest_prefix_wins_and_unsteered_ports_fall_to_the_covering_one() {
        let steers = vec![
            steer("wide", Proto::Tcp, &["198.19.0.0/16"], "1-65535"),
            steer(
                "web",
                Proto::Tcp,
                &["198.19.5.0/24", "2001:2:0:5::/64"],
                "80-89",
            ),
            steer("dns", Proto::Udp, &["198.19.5.0/24"], "53"),
        ];
        validate(&steers).unwrap();
        let t = compile(&steers, |i| i as u16 + 10).unwrap();
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(lookup(&t, 6, ip("198.19.5.7"), 80), Some(11));
        assert_eq!(lookup(&t, 6, ip("198.19.5.7"), 443), Some(10));
        assert_eq!(lookup(&t, 6, ip("198.19.6.7"), 80), Some(10));
        assert_eq!(lookup(&t, 6, ip("198.18.5.7"), 80), None);
        assert_eq!(lookup(&t, 17, ip("198.19.5.7"), 53), Some(12));
        assert_eq!(lookup(&t, 17, ip("198.19.5.7"), 54), None);
        assert_eq!(lookup(&t, 6, ip("2001:2:0:5::9"), 85), Some(11));
        assert_eq!(lookup(&t, 6, ip("2001:2:0:6::9"), 85), None);
        // Port 0 is in no range, and the unused ranges hold no port.
        assert_eq!(lookup(&t, 17, ip("198.19.5.7"), 0), None);
        for e in &t {
            for r in &e.entry.ranges[e.entry.n as usize..] {
                assert!(r.lo > r.hi, "{r:?}");
            }
        }
    }

    #[test]
    fn bad_sets_are_refused_with_the_problem_named() {
        let a = steer("a", Proto::Tcp, &["198.19.5.0/24"], "80-90");
        let b = steer("b", Proto::Tcp, &["198.19.5.0/24"], "90-95");
        let e = validate(&[a.clone(), b]).unwrap_err();
        assert!(e.contains("both claim tcp 198.19.5.0/24"), "{e}");
        // Other protocol or disjoint ports: fine.
        validate(&[a.clone(), steer("u", Proto::Udp, &["198.19.5.0/24"], "80")]).unwrap();
        let e = steer("h", Proto::Tcp, &["198.19.5.1/24"], "1")
            .validate()
            .unwrap_err();
        assert!(e.contains("bits set beyond"), "{e}");
        let e = steer("d", Proto::Tcp, &["198.19.5.0/24", "198.19.5.0/24"], "1")
            .validate()
            .unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = validate(&[a.clone(), a.clone()]).unwrap_err();
        assert!(e.contains("defined twice"), "{e}");
        let e = steer("m", Proto::Tcp, &["::ffff:198.19.0.0/112"], "1")
            .validate()
            .unwrap_err();
        assert!(e.contains("IPv4-mapped"), "{e}");
        assert!(
            steer("Bad", Proto::Tcp, &["198.19.0.0/16"], "1")
                .validate()
                .is_err()
        );
        for bad in ["0", "9-8", "x", "1-70000", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        // Too many ranges for one entry.
        let many: Vec<Steer> = (0..9)
            .map(|i| {
                steer(
                    &format!("s{i}"),
                    Proto::Tcp,
                    &["198.19.5.0/24"],
                    &format!("{}", 100 + i),
                )
            })
            .collect();
        let e = validate(&many).unwrap_err();
        assert!(e.contains("9 port ranges"), "{e}");
    }

    #[test]
    fn port_ranges_read_from_text_or_integers() {
        #[derive(Deserialize)]
        struct T {
            p: PortRange,
        }
        let t: T = toml::from_str("p = 80").unwrap();
        assert_eq!(t.p, PortRange { lo: 80, hi: 80 });
        let t: T = toml::from_str("p = \"1000-1999\"").unwrap();
        assert_eq!(t.p.to_string(), "1000-1999");
        assert!(toml::from_str::<T>("p = 0").is_err());
    }
}
