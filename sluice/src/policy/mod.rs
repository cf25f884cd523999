//! What users write: prefixes and rules, parsed and validated into the shapes
//! the dataplane stores, and rendered back for listing.

use std::{fmt, net::IpAddr, path::Path};

use ipnet::IpNet;
use sluice_common::{
    RULE_F_AUDIT, RULE_F_DPORT, RULE_F_DST, RULE_F_FAMILY, RULE_F_SRC, Rule, Verdict, addr_words,
};

use crate::dataplane::policy::UNASSIGNED;

pub mod config;
mod desired;
pub mod eval;

pub use desired::{
    Action, Desired, Interface, Op, Policy, PolicyDiff, change_to, compact_overlay, pinned_policy,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "invalid prefix '{input}': expected an IPv4 or IPv6 address or CIDR like 198.18.0.0/24 or 2001:2::/48"
    )]
    BadPrefix { input: String },
    #[error("{file}:{line}: invalid prefix '{input}'")]
    BadPrefixInFile {
        file: String,
        line: usize,
        input: String,
    },
    #[error("cannot read {file}: {reason}")]
    File { file: String, reason: String },
    #[error("invalid rule: {reason}")]
    BadRule { reason: String },
}

/// Parses `198.18.0.0/24`, `2001:2::/48` or a bare address (a host prefix).
/// Host bits beyond the prefix are cleared, as iptables and ipset do.
pub fn parse_prefix(input: &str) -> Result<IpNet, PolicyError> {
    let s = input.trim();
    let bad = || PolicyError::BadPrefix {
        input: input.to_string(),
    };
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if !s.contains('/')
        && let Ok(addr) = s.parse::<IpAddr>()
    {
        return Ok(IpNet::from(addr));
    }
    Err(bad())
}

/// Reads one prefix per line; blank lines and `#` comments are skipped.
pub fn read_prefix_file(path: &Path) -> Result<Vec<IpNet>, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::File {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        out.push(
            parse_prefix(line).map_err(|_| PolicyError::BadPrefixInFile {
                file: path.display().to_string(),
                line: n + 1,
                input: line.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// A rule as listed: its id, position, text and hit counters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RuleRow {
    pub id: u32,
    pub position: usize,
    pub rule: RuleSpec,
    pub packets: u64,
    pub bytes: u64,
}

impl RuleRow {
    pub fn from_view(v: &crate::dataplane::RuleView) -> Self {
        Self {
            id: v.rule.id,
            position: v.position,
            rule: RuleSpec::from_rule(&v.rule),
            packets: v.packets,
            bytes: v.bytes,
        }
    }
}

/// A rule as users write it: `drop udp dport 4444`, `pass tcp dport 1-1023 dst 198.18.0.0/24`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub action: Verdict,
    /// A drop rule in audit mode: matches are passed and counted as `audit`.
    pub audit: bool,
    pub proto: Option<u8>,
    pub dport: Option<(u16, u16)>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        IPPROTO_ICMP => Some("icmp"),
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok()
}

impl RuleSpec {
    /// Parses the words after `sluice rule add`.
    pub fn parse(words: &[String]) -> Result<Self, PolicyError> {
        let bad = |reason: String| PolicyError::BadRule { reason };
        let mut it = words.iter().map(String::as_str).peekable();
        let audit = it.next_if_eq(&"audit").is_some();
        let action = match it.next() {
            Some("drop") => Verdict::Drop,
            Some("pass" | "accept" | "allow") => Verdict::Pass,
            Some(other) => {
                return Err(bad(format!(
                    "expected 'drop' or 'pass' first, found '{other}'"
                )));
            }
            None => return Err(bad("expected 'drop' or 'pass'".into())),
        };
        let mut spec = Self {
            action,
            audit,
            proto: None,
            dport: None,
            src: None,
            dst: None,
        };
        while let Some(w) = it.next() {
            match w {
                "tcp" | "udp" | "icmp" | "icmpv6" | "proto" => {
                    let name = if w == "proto" {
                        it.next()
                            .ok_or_else(|| bad("'proto' needs a protocol name or number".into()))?
                    } else {
                        w
                    };
                    let p = match name {
                        "tcp" => IPPROTO_TCP,
                        "udp" => IPPROTO_UDP,
                        "icmp" => IPPROTO_ICMP,
                        "icmpv6" => IPPROTO_ICMPV6,
                        n => n.parse::<u8>().ok().filter(|p| *p != 0).ok_or_else(|| {
                            bad(format!(
                                "unknown protocol '{n}' (tcp, udp, icmp, icmpv6 or a number 1-255)"
                            ))
                        })?,
                    };
                    if spec.proto.replace(p).is_some() {
                        return Err(bad("protocol given twice".into()));
                    }
                }
                "dport" => {
                    let v = it
                        .next()
                        .ok_or_else(|| bad("'dport' needs a port or range".into()))?;
                    let range = match v.split_once('-') {
                        Some((a, b)) => (parse_port(a), parse_port(b)),
                        None => (parse_port(v), parse_port(v)),
                    };
                    let (Some(lo), Some(hi)) = range else {
                        return Err(bad(format!("invalid port '{v}' (0-65535 or LOW-HIGH)")));
                    };
                    if lo > hi {
                        return Err(bad(format!("port range '{v}' is backwards")));
                    }
                    if spec.dport.replace((lo, hi)).is_some() {
                        return Err(bad("dport given twice".into()));
                    }
                }
                "src" | "dst" => {
                    let v = it
                        .next()
                        .ok_or_else(|| bad(format!("'{w}' needs a prefix")))?;
                    let net = parse_prefix(v).map_err(|e| bad(e.to_string()))?;
                    let slot = if w == "src" {
                        &mut spec.src
                    } else {
                        &mut spec.dst
                    };
                    if slot.replace(net).is_some() {
                        return Err(bad(format!("{w} given twice")));
                    }
                }
                "any" => {}
                // A bare number is a protocol, as in `drop 47`.
                n if n.parse::<u8>().is_ok() && spec.proto.is_none() => {
                    let p = n.parse::<u8>().unwrap_or(0);
                    if p == 0 {
                        return Err(bad(
                            "protocol 0 is not a protocol; omit it to match any".into()
                        ));
                    }
                    spec.proto = Some(p);
                }
                other => {
                    return Err(bad(format!(
                        "unexpected '{other}' (expected tcp|udp|icmp|icmpv6|proto N, dport N[-M], src CIDR, dst CIDR)"
                    )));
                }
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    fn family(&self) -> Option<u32> {
        let f = |n: &IpNet| if n.addr().is_ipv4() { 4 } else { 6 };
        self.src.as_ref().map(f).or(self.dst.as_ref().map(f))
    }

    fn validate(&self) -> Result<(), PolicyError> {
        let bad = |reason: &str| PolicyError::BadRule {
            reason: reason.to_string(),
        };
        if let (Some(s), Some(d)) = (&self.src, &self.dst)
            && s.addr().is_ipv4() != d.addr().is_ipv4()
        {
            return Err(bad("src and dst are of different address families"));
        }
        if self.audit && self.action != Verdict::Drop {
            return Err(bad("audit applies to drop rules (audit drop ...)"));
        }
        if self.dport.is_some() && !matches!(self.proto, None | Some(IPPROTO_TCP | IPPROTO_UDP)) {
            return Err(bad("dport only applies to tcp and udp"));
        }
        match (self.proto, self.family()) {
            (Some(IPPROTO_ICMP), Some(6)) => {
                Err(bad("icmp is IPv4; use icmpv6 with IPv6 prefixes"))
            }
            (Some(IPPROTO_ICMPV6), Some(4)) => {
                Err(bad("icmpv6 is IPv6; use icmp with IPv4 prefixes"))
            }
            _ => Ok(()),
        }
    }

    /// The stored form (id and stats slot are assigned when committed).
    pub fn to_rule(&self) -> Rule {
        let mut r = Rule {
            action: self.action as u32,
            proto: self.proto.map_or(0, u32::from),
            stats_slot: UNASSIGNED,
            ..Rule::default()
        };
        if self.audit {
            r.flags |= RULE_F_AUDIT;
        }
        if let Some(f) = self.family() {
            r.flags |= RULE_F_FAMILY;
            r.family = f;
        }
        if let Some((lo, hi)) = self.dport {
            r.flags |= RULE_F_DPORT;
            r.port_lo = lo;
            r.port_hi = hi;
        }
        if let Some(n) = &self.src {
            r.flags |= RULE_F_SRC;
            (r.src_net, r.src_mask) = net_words(n);
        }
        if let Some(n) = &self.dst {
            r.flags |= RULE_F_DST;
            (r.dst_net, r.dst_mask) = net_words(n);
        }
        r
    }

    /// Reads a stored rule back.
    pub fn from_rule(r: &Rule) -> Self {
        let net = |net: [u64; 2], mask: [u64; 2]| -> IpNet {
            let bytes = words_bytes(net);
            let plen = mask.iter().map(|w| w.count_ones()).sum::<u32>() as u8;
            if r.family == 4 {
                IpNet::new(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]), plen)
            } else {
                IpNet::new(IpAddr::from(bytes), plen)
            }
            .expect("stored prefix length is valid")
        };
        Self {
            action: Verdict::from_u32(r.action).unwrap_or(Verdict::Pass),
            audit: r.flags & RULE_F_AUDIT != 0,
            proto: (r.proto != 0).then_some(r.proto as u8),
            dport: (r.flags & RULE_F_DPORT != 0).then_some((r.port_lo, r.port_hi)),
            src: (r.flags & RULE_F_SRC != 0).then(|| net(r.src_net, r.src_mask)),
            dst: (r.flags & RULE_F_DST != 0).then(|| net(r.dst_net, r.dst_mask)),
        }
    }
}

fn words_bytes(w: [u64; 2]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[0].to_ne_bytes());
    b[8..].copy_from_slice(&w[1].to_ne_bytes());
    b
}

fn net_words(n: &IpNet) -> ([u64; 2], [u64; 2]) {
    let mut addr = [0u8; 16];
    let mut mask = [0u8; 16];
    match n {
        IpNet::V4(v) => {
            addr[..4].copy_from_slice(&v.network().octets());
            mask[..4].copy_from_slice(&v.netmask().octets());
        }
        IpNet::V6(v) => {
            addr = v.network().octets();
            mask = v.netmask().octets();
        }
    }
    (addr_words(&addr), addr_words(&mask))
}

impl serde::Serialize for RuleSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RuleSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let words: Vec<String> = text.split_whitespace().map(String::from).collect();
        Self::parse(&words).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.audit {
            f.write_str("audit ")?;
        }
        f.write_str(self.action.name())?;
        match self.proto {
            Some(p) => match proto_name(p) {
                Some(n) => write!(f, " {n}")?,
                None => write!(f, " proto {p}")?,
            },
            None => f.write_str(" any")?,
        }
        if let Some((lo, hi)) = self.dport {
            if lo == hi {
                write!(f, " dport {lo}")?;
            } else {
                write!(f, " dport {lo}-{hi}")?;
            }
        }
        if let Some(s) = &self.src {
            write!(f, " src {s}")?;
        }
        if let Some(d) = &self.dst {
            write!(f, " dst {d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn prefixes_parse_and_normalise() {
        assert_eq!(
            parse_prefix("198.18.0.1").unwrap().to_string(),
            "198.18.0.1/32"
        );
        assert_eq!(
            parse_prefix("198.18.0.77/24").unwrap().to_string(),
            "198.18.0.0/24"
        );
        assert_eq!(
            parse_prefix("2001:2::1").unwrap().to_string(),
            "2001:2::1/128"
        );
        assert_eq!(
            parse_prefix("2001:2::/48").unwrap().to_string(),
            "2001:2::/48"
        );
        for bad in [
            "",
            "198.18.0.300/24",
            "198.18.0.0/33",
            "2001:2::/129",
            "foo",
            "1.2.3.4/",
            "/24",
        ] {
            assert!(parse_prefix(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn rules_round_trip_through_the_stored_form() {
        for text in [
            "drop udp dport 4444",
            "drop icmp",
            "drop tcp dport 1-1023 dst 198.18.0.0/24",
            "pass any src 2001:2::/48",
            "drop proto 47 src 198.18.1.0/24 dst 198.18.2.0/24",
            "drop icmpv6 dst 2001:2:0:1::/64",
            "audit drop tcp dport 22",
        ] {
            let spec = RuleSpec::parse(&words(text)).unwrap();
            let back = RuleSpec::from_rule(&spec.to_rule());
            assert_eq!(back, spec, "{text}");
            assert_eq!(back.to_string(), text);
        }
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for text in [
            "",
            "reject tcp",
            "drop icmp dport 80",
            "drop tcp dport 90-80",
            "drop tcp dport 70000",
            "drop icmp src 2001:2::/48",
            "drop icmpv6 dst 198.18.0.0/24",
            "drop src 198.18.0.0/24 dst 2001:2::/48",
            "drop tcp tcp",
            "drop tcp dport",
            "drop tcp sport 80",
            "drop proto 0",
            "drop 0",
            "audit pass tcp",
            "audit",
            "drop audit tcp",
        ] {
            assert!(
                RuleSpec::parse(&words(text)).is_err(),
                "{text:?} should be refused"
            );
        }
    }
}
