//! What users write: prefixes and rules, parsed and validated into the shapes
//! the dataplane stores, and rendered back for listing.

use std::{fmt, net::IpAddr, path::Path};

use ipnet::IpNet;
use sluice_common::{
    RULE_ACTION_LIMIT, RULE_ACTION_SYN_GUARD, RULE_F_AUDIT, RULE_F_BYTES, RULE_F_DPORT, RULE_F_DST,
    RULE_F_ESCALATE, RULE_F_FAMILY, RULE_F_PER_SOURCE, RULE_F_SPORT, RULE_F_SRC, RULE_F_SYN,
    RULE_F_TCP_FLAGS, Rule, TCP_FLAG_NAMES, Verdict, addr_words, rule_tcp_flags, rule_tcp_mask,
    rule_tcp_value, words_bytes,
};

pub mod config;
pub mod delta;
mod desired;
pub mod eval;
pub mod export;

pub use delta::Delta;
pub use desired::{
    Action, Desired, Interface, Op, Policy, PolicyDiff, TempDeny, compact_overlay, exact_prefix,
    overlay_for_base,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "invalid prefix '{input}': expected an IPv4 or IPv6 address or CIDR like 198.18.0.0/24 or 2001:2::/48"
    )]
    BadPrefix { input: String },
    #[error(
        "'{input}' has bits set beyond its prefix length: write the network ({network}) or \
         the host ({host})"
    )]
    HostBits {
        input: String,
        network: String,
        host: String,
    },
    #[error("{file}:{line}: {reason}")]
    BadPrefixInFile {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("cannot read {file}: {reason}")]
    File { file: String, reason: String },
    #[error("invalid rule: {reason}")]
    BadRule { reason: String },
    #[error("invalid packet description: {reason}")]
    BadPacket { reason: String },
}

/// Parses `198.18.0.0/24`, `2001:2::/48` or a bare address (a host prefix).
/// A prefix with bits set beyond its length (`198.18.1.0/8`) is refused:
/// whether the network or the host was meant cannot be told.
pub fn parse_prefix(input: &str) -> Result<IpNet, PolicyError> {
    let net = parse_prefix_lenient(input)?;
    let s = input.trim();
    if let Ok(given) = s.parse::<IpNet>()
        && given != net
    {
        return Err(PolicyError::HostBits {
            input: s.to_string(),
            network: net.to_string(),
            host: IpNet::from(given.addr()).to_string(),
        });
    }
    Ok(net)
}

/// Like [`parse_prefix`] but clears host bits: for filters (`flows --src`),
/// where `198.18.0.77/24` can only mean the network.
pub fn parse_prefix_lenient(input: &str) -> Result<IpNet, PolicyError> {
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

/// Reads one prefix per line; blank lines and `#` comments are skipped. The
/// file must be a regular file of at most `limit` bytes.
pub fn read_prefix_file(path: &Path, limit: u64) -> Result<Vec<IpNet>, PolicyError> {
    let text = crate::files::read_text(path, limit).map_err(|e| PolicyError::File {
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
            parse_prefix(line).map_err(|e| PolicyError::BadPrefixInFile {
                file: path.display().to_string(),
                line: n + 1,
                reason: e.to_string(),
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

/// A rule as users write it: `drop udp dport 4444`, `pass tcp dport 1-1023 dst 198.18.0.0/24`,
/// `limit 1000/s per-source tcp dport 80`, `syn-guard 500/s dport 443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// What a match does: pass or drop; for `limit` / `syn-guard` rules
    /// (`rate` set) the verdict of packets over the rate: drop.
    pub action: Verdict,
    /// A drop rule in audit mode: matches are passed and counted as `audit`.
    pub audit: bool,
    pub proto: Option<u8>,
    pub dport: Option<(u16, u16)>,
    pub sport: Option<(u16, u16)>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    /// Match only TCP SYNs without ACK (connection attempts).
    pub syn: bool,
    /// Match only TCP packets with these flags: (set, mask) — of the flags
    /// in `mask`, exactly those in `set` are set (`flags syn/syn,ack`).
    pub tcp_flags: Option<TcpFlags>,
    /// Makes this a `limit` or `syn-guard` rule.
    pub rate: Option<RateSpec>,
}

/// A TCP flags test as written: `flags SET/MASK` (pf's form), or `flags
/// SET` for "these set, the others any" (the mask is then the set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpFlags {
    pub set: u8,
    pub mask: u8,
}

fn flag_names(bits: u8) -> String {
    TCP_FLAG_NAMES
        .iter()
        .filter(|(_, b)| bits & b != 0)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

impl TcpFlags {
    /// Parses `syn/syn,ack`, `rst`, `/syn` (SYN clear), `fin,ack/fin,ack,rst`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let names = |part: &str| -> Result<u8, String> {
            let mut bits = 0u8;
            for name in part.split(',').filter(|n| !n.is_empty()) {
                let lower = name.to_ascii_lowercase();
                let bit = TCP_FLAG_NAMES
                    .iter()
                    .find(|(n, _)| *n == lower)
                    .map(|(_, b)| *b)
                    .ok_or_else(|| {
                        format!(
                            "unknown TCP flag '{name}' (fin, syn, rst, psh, ack, urg, ece, cwr)"
                        )
                    })?;
                if bits & bit != 0 {
                    return Err(format!("TCP flag '{name}' given twice in '{s}'"));
                }
                bits |= bit;
            }
            Ok(bits)
        };
        let (set, mask) = match s.split_once('/') {
            Some((set, mask)) => (names(set)?, names(mask)?),
            None => {
                let set = names(s)?;
                (set, set)
            }
        };
        if mask == 0 {
            return Err(format!(
                "'flags {s}' looks at no flag (write SET/MASK, e.g. syn/syn,ack)"
            ));
        }
        if set & !mask != 0 {
            return Err(format!(
                "'flags {s}': {} is set but not in the mask {}",
                flag_names(set & !mask),
                flag_names(mask)
            ));
        }
        Ok(Self { set, mask })
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.set == self.mask {
            f.write_str(&flag_names(self.set))
        } else {
            write!(f, "{}/{}", flag_names(self.set), flag_names(self.mask))
        }
    }
}

fn parse_port_range(v: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match v.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => (parse_port(v)?, parse_port(v)?),
    };
    Some((lo, hi))
}

/// Which rate-based rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    /// Packets over the rate are dropped (reason `rate-limit`); the rest go
    /// on to the next rule.
    Limit,
    /// SYNs over the rate from sources that have not answered a challenge
    /// are answered with one and dropped (reason `syn-defence`).
    SynGuard,
}

/// The rate of a `limit` / `syn-guard` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub kind: RateKind,
    /// Per second: packets, or bytes when `bytes`.
    pub rate: u64,
    pub bytes: bool,
    /// Packets (or bytes) allowed back to back.
    pub burst: u32,
    /// One bucket per source prefix of these lengths (v4, v6) instead of
    /// one shared bucket.
    pub per_source: Option<(u8, u8)>,
    /// Report a source over its limit this long (ms) to the agent, which
    /// denies it for `ttl_s` seconds.
    pub escalate: Option<Escalate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalate {
    pub after_ms: u32,
    pub ttl_s: u32,
}

/// Default time a source escalated by a `limit` rule stays denied.
pub const DEFAULT_ESCALATE_TTL_S: u32 = 600;

/// Parses `1000/s` (packets) or `10mbit/s`, `500kB/s`, `1gbit/s` (bytes).
fn parse_rate(s: &str) -> Option<(u64, bool)> {
    let v = s.strip_suffix("/s")?;
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok().filter(|n| *n > 0)?;
    let (mul, bytes) = match unit {
        "" => (1, false),
        "B" => (1, true),
        "kB" => (1_000, true),
        "MB" => (1_000_000, true),
        "GB" => (1_000_000_000, true),
        "bit" if n.is_multiple_of(8) => return Some((n / 8, true)),
        "kbit" => {
            return n
                .checked_mul(1_000)
                .filter(|bits| bits.is_multiple_of(8))
                .map(|bits| (bits / 8, true));
        }
        "mbit" => (125_000, true),
        "gbit" => (125_000_000, true),
        _ => return None,
    };
    Some((n.checked_mul(mul)?, bytes))
}

/// Parses a burst: a count, or with a byte rate `1500`, `64kB`, `1MB`.
fn parse_burst(s: &str, bytes: bool) -> Option<u32> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok().filter(|n| *n > 0)?;
    let mul = match (unit, bytes) {
        ("", _) => 1,
        ("B", true) => 1,
        ("kB", true) => 1_000,
        ("MB", true) => 1_000_000,
        _ => return None,
    };
    u32::try_from(n.checked_mul(mul)?).ok()
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Writes milliseconds back in the largest unit that divides them.
pub fn format_duration_ms(ms: u64) -> String {
    for (unit, div) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= div && ms.is_multiple_of(div) {
            return format!("{}{unit}", ms / div);
        }
    }
    format!("{ms}ms")
}

fn format_rate(rate: u64, bytes: bool) -> String {
    if !bytes {
        return format!("{rate}/s");
    }
    for (unit, div) in [("GB", 1_000_000_000), ("MB", 1_000_000), ("kB", 1_000)] {
        if rate >= div && rate.is_multiple_of(div) {
            return format!("{}{unit}/s", rate / div);
        }
    }
    format!("{rate}B/s")
}

/// Default burst: a tenth of a second at the rate (at least one packet,
/// or one full-size frame for byte rates).
fn default_burst(rate: u64, bytes: bool) -> u32 {
    let b = rate / 10;
    let floor = if bytes { 1514 } else { 1 };
    u32::try_from(b.max(floor)).unwrap_or(u32::MAX)
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
        let mut kind = None;
        let action = match it.next() {
            Some("drop") => Verdict::Drop,
            Some("pass" | "accept" | "allow") => Verdict::Pass,
            Some("limit") => {
                kind = Some(RateKind::Limit);
                Verdict::Drop
            }
            Some("syn-guard") => {
                kind = Some(RateKind::SynGuard);
                Verdict::Drop
            }
            Some(other) => {
                return Err(bad(format!(
                    "expected 'drop', 'pass', 'limit' or 'syn-guard' first, found '{other}'"
                )));
            }
            None => return Err(bad("expected 'drop', 'pass', 'limit' or 'syn-guard'".into())),
        };
        let mut spec = Self {
            action,
            audit,
            proto: None,
            dport: None,
            sport: None,
            src: None,
            dst: None,
            syn: false,
            tcp_flags: None,
            rate: None,
        };
        let mut burst_given = false;
        if let Some(kind) = kind {
            let what = if kind == RateKind::Limit {
                "limit"
            } else {
                "syn-guard"
            };
            let r = it.next().ok_or_else(|| {
                bad(format!(
                    "'{what}' needs a rate like 1000/s, 10mbit/s or 500kB/s"
                ))
            })?;
            let (rate, bytes) = parse_rate(r).ok_or_else(|| {
                bad(format!(
                    "invalid rate '{r}' (N/s packets, or N with B, kB, MB, GB, bit, kbit, mbit, gbit before /s)"
                ))
            })?;
            if kind == RateKind::SynGuard && bytes {
                return Err(bad(
                    "syn-guard counts SYNs: give a packet rate like 500/s".into()
                ));
            }
            if !bytes && rate > 1_000_000_000 {
                return Err(bad(format!("rate '{r}' is above 1,000,000,000 packets/s")));
            }
            if bytes && rate > 1_000_000_000_000 {
                return Err(bad(format!("rate '{r}' is above 1 TB/s")));
            }
            spec.rate = Some(RateSpec {
                kind,
                rate,
                bytes,
                burst: default_burst(rate, bytes),
                per_source: None,
                escalate: None,
            });
            if kind == RateKind::SynGuard {
                spec.syn = true;
            }
        }
        while let Some(w) = it.next() {
            match w {
                "burst" | "per-source" | "escalate" if spec.rate.is_none() => {
                    return Err(bad(format!("'{w}' applies to limit rules")));
                }
                "burst" => {
                    let rate = spec.rate.as_mut().expect("checked above");
                    let v = it
                        .next()
                        .ok_or_else(|| bad("'burst' needs a number".into()))?;
                    rate.burst = parse_burst(v, rate.bytes).ok_or_else(|| {
                        bad(format!(
                            "invalid burst '{v}' (a count of 1 or more{})",
                            if rate.bytes {
                                ", or bytes like 64kB"
                            } else {
                                ""
                            }
                        ))
                    })?;
                    if std::mem::replace(&mut burst_given, true) {
                        return Err(bad("burst given twice".into()));
                    }
                }
                "per-source" => {
                    let rate = spec.rate.as_mut().expect("checked above");
                    if rate.kind != RateKind::Limit {
                        return Err(bad("per-source applies to limit rules".into()));
                    }
                    if rate.per_source.is_some() {
                        return Err(bad("per-source given twice".into()));
                    }
                    let mut lens = Vec::new();
                    while let Some(l) = it.next_if(|w| w.starts_with('/')) {
                        lens.push(l);
                    }
                    rate.per_source = Some(match lens.as_slice() {
                        [] => (32, 128),
                        [v4, v6] => {
                            let p = |s: &str, max: u8| {
                                s[1..].parse::<u8>().ok().filter(|p| (1..=max).contains(p))
                            };
                            match (p(v4, 32), p(v6, 128)) {
                                (Some(a), Some(b)) => (a, b),
                                _ => {
                                    return Err(bad(format!(
                                        "invalid per-source prefix lengths '{v4} {v6}' (/1-/32 for IPv4, then /1-/128 for IPv6)"
                                    )));
                                }
                            }
                        }
                        _ => {
                            return Err(bad(
                                "per-source takes no prefix lengths (one bucket per address) or two: /V4LEN /V6LEN, e.g. per-source /24 /64".into(),
                            ));
                        }
                    });
                }
                "escalate" => {
                    let rate = spec.rate.as_mut().expect("checked above");
                    let v = it
                        .next()
                        .ok_or_else(|| bad("'escalate' needs a duration like 10s".into()))?;
                    let after = parse_duration_ms(v)
                        .filter(|ms| (100..=86_400_000).contains(ms))
                        .ok_or_else(|| {
                            bad(format!(
                                "invalid escalate duration '{v}' (100ms to 1d, e.g. 500ms, 10s, 5m)"
                            ))
                        })?;
                    let mut ttl_s = DEFAULT_ESCALATE_TTL_S;
                    if it.next_if_eq(&"ttl").is_some() {
                        let t = it
                            .next()
                            .ok_or_else(|| bad("'ttl' needs a duration like 10m".into()))?;
                        ttl_s = parse_duration_ms(t)
                            .filter(|ms| ms % 1000 == 0 && (1_000..=30 * 86_400_000).contains(ms))
                            .map(|ms| (ms / 1000) as u32)
                            .ok_or_else(|| {
                                bad(format!(
                                    "invalid ttl '{t}' (whole seconds, 1s to 30d, e.g. 90s, 10m, 1h)"
                                ))
                            })?;
                    }
                    if rate.escalate.is_some() {
                        return Err(bad("escalate given twice".into()));
                    }
                    rate.escalate = Some(Escalate {
                        after_ms: after as u32,
                        ttl_s,
                    });
                }
                "syn" => {
                    if spec.syn && spec.rate.is_none_or(|r| r.kind != RateKind::SynGuard) {
                        return Err(bad("syn given twice".into()));
                    }
                    spec.syn = true;
                }
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
                "dport" | "sport" => {
                    let v = it
                        .next()
                        .ok_or_else(|| bad(format!("'{w}' needs a port or range")))?;
                    let Some((lo, hi)) = parse_port_range(v) else {
                        return Err(bad(format!(
                            "invalid {w} '{v}' (a port 0-65535 or LOW-HIGH)"
                        )));
                    };
                    if lo > hi {
                        return Err(bad(format!("port range '{v}' is backwards")));
                    }
                    let slot = if w == "dport" {
                        &mut spec.dport
                    } else {
                        &mut spec.sport
                    };
                    if slot.replace((lo, hi)).is_some() {
                        return Err(bad(format!("{w} given twice")));
                    }
                }
                "flags" => {
                    let v = it.next().ok_or_else(|| {
                        bad("'flags' needs TCP flags like syn/syn,ack or rst".into())
                    })?;
                    let flags = TcpFlags::parse(v).map_err(bad)?;
                    if spec.tcp_flags.replace(flags).is_some() {
                        return Err(bad("flags given twice".into()));
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
                        "unexpected '{other}' (expected tcp|udp|icmp|icmpv6|proto N, syn, flags SET[/MASK], dport N[-M], sport N[-M], src CIDR, dst CIDR{})",
                        if spec.rate.is_some() {
                            ", burst N, per-source [/V4 /V6], escalate DURATION [ttl DURATION]"
                        } else {
                            ""
                        }
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
        if self.syn && !matches!(self.proto, None | Some(IPPROTO_TCP)) {
            return Err(bad("syn only applies to tcp"));
        }
        if self.tcp_flags.is_some() && !matches!(self.proto, None | Some(IPPROTO_TCP)) {
            return Err(bad("flags only applies to tcp"));
        }
        if self.tcp_flags.is_some() && self.rate.is_some_and(|r| r.kind == RateKind::SynGuard) {
            return Err(bad("syn-guard matches SYNs: flags do not apply"));
        }
        if self.tcp_flags.is_some() && self.syn {
            return Err(bad(
                "syn and flags do not mix: syn is flags syn/syn,ack,rst; write that instead",
            ));
        }
        if let Some(r) = &self.rate {
            if r.escalate.is_some() && r.per_source.is_none() {
                return Err(bad(
                    "escalate needs per-source (it denies the sources over the limit)",
                ));
            }
            if r.escalate.is_some() && self.audit {
                return Err(bad(
                    "audit and escalate do not mix: escalation puts sources on the deny list, which drops",
                ));
            }
            // Buckets count in whole nanoseconds: refuse rates whose cost per
            // packet (or per byte, in picoseconds) would be more than 1% off.
            let (unit, scale) = if r.bytes {
                (1_000_000_000_000u128, "picosecond per byte")
            } else {
                (1_000_000_000u128, "nanosecond per packet")
            };
            let per = unit / u128::from(r.rate);
            if per == 0 || per * u128::from(r.rate) * 100 < unit * 99 {
                return Err(bad(&format!(
                    "rate {} is too high to hold to 1% at {scale} resolution",
                    format_rate(r.rate, r.bytes)
                )));
            }
            if r.bytes && r.rate > 1_000_000_000 {
                return Err(bad(
                    "byte rates above 1GB/s (8gbit/s) are not held to 1% for small packets; use a packet rate",
                ));
            }
            // The burst, as time at the rate, must fit the kernel's clock words.
            let tolerance = if r.bytes {
                u128::from(r.burst) * per / 1000
            } else {
                per * u128::from(r.burst.saturating_sub(1))
            };
            if tolerance > 86_400 * 1_000_000_000 {
                return Err(bad("burst is more than a day's worth at this rate"));
            }
        }
        if self.dport.is_some() && !matches!(self.proto, None | Some(IPPROTO_TCP | IPPROTO_UDP)) {
            return Err(bad("dport only applies to tcp and udp"));
        }
        if self.sport.is_some() && !matches!(self.proto, None | Some(IPPROTO_TCP | IPPROTO_UDP)) {
            return Err(bad("sport only applies to tcp and udp"));
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
            stats_slot: sluice_common::UNASSIGNED_SLOT,
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
        if let Some((lo, hi)) = self.sport {
            r.flags |= RULE_F_SPORT;
            r.sport_lo = lo;
            r.sport_hi = hi;
        }
        if let Some(t) = self.tcp_flags {
            r.flags |= rule_tcp_flags(t.mask, t.set);
        }
        if let Some(n) = &self.src {
            r.flags |= RULE_F_SRC;
            (r.src_net, r.src_mask) = net_words(n);
        }
        if let Some(n) = &self.dst {
            r.flags |= RULE_F_DST;
            (r.dst_net, r.dst_mask) = net_words(n);
        }
        if self.syn {
            // The kernel's SYN test implies TCP; proto stays as written.
            r.flags |= RULE_F_SYN;
        }
        if let Some(rate) = &self.rate {
            r.action = match rate.kind {
                RateKind::Limit => RULE_ACTION_LIMIT,
                RateKind::SynGuard => RULE_ACTION_SYN_GUARD,
            };
            r.rate = rate.rate;
            r.burst = rate.burst;
            if rate.bytes {
                r.flags |= RULE_F_BYTES;
                // Picoseconds per byte; the burst is that many bytes of credit.
                r.interval = (1_000_000_000_000 / rate.rate).max(1);
                r.tolerance_ns = u64::from(rate.burst) * r.interval / 1000;
            } else {
                r.interval = (1_000_000_000 / rate.rate).max(1);
                r.tolerance_ns = r.interval * u64::from(rate.burst.max(1) - 1);
            }
            if let Some((v4, v6)) = rate.per_source {
                r.flags |= RULE_F_PER_SOURCE;
                r.per_source_v4 = u16::from(v4);
                r.per_source_v6 = u16::from(v6);
            }
            if let Some(e) = rate.escalate {
                r.flags |= RULE_F_ESCALATE;
                r.escalate_after_ms = e.after_ms;
                r.escalate_ttl_s = e.ttl_s;
            }
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
        let kind = match r.action {
            RULE_ACTION_LIMIT => Some(RateKind::Limit),
            RULE_ACTION_SYN_GUARD => Some(RateKind::SynGuard),
            _ => None,
        };
        let syn = r.flags & RULE_F_SYN != 0;
        Self {
            action: if kind.is_some() {
                Verdict::Drop
            } else {
                Verdict::from_u32(r.action).unwrap_or(Verdict::Pass)
            },
            audit: r.flags & RULE_F_AUDIT != 0,
            proto: (r.proto != 0).then_some(r.proto as u8),
            dport: (r.flags & RULE_F_DPORT != 0).then_some((r.port_lo, r.port_hi)),
            sport: (r.flags & RULE_F_SPORT != 0).then_some((r.sport_lo, r.sport_hi)),
            tcp_flags: (r.flags & RULE_F_TCP_FLAGS != 0).then(|| TcpFlags {
                set: rule_tcp_value(r.flags),
                mask: rule_tcp_mask(r.flags),
            }),
            src: (r.flags & RULE_F_SRC != 0).then(|| net(r.src_net, r.src_mask)),
            dst: (r.flags & RULE_F_DST != 0).then(|| net(r.dst_net, r.dst_mask)),
            syn,
            rate: kind.map(|kind| RateSpec {
                kind,
                rate: r.rate,
                bytes: r.flags & RULE_F_BYTES != 0,
                burst: r.burst,
                per_source: (r.flags & RULE_F_PER_SOURCE != 0)
                    .then_some((r.per_source_v4 as u8, r.per_source_v6 as u8)),
                escalate: (r.flags & RULE_F_ESCALATE != 0).then_some(Escalate {
                    after_ms: r.escalate_after_ms,
                    ttl_s: r.escalate_ttl_s,
                }),
            }),
        }
    }
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
        match &self.rate {
            Some(r) => {
                let what = match r.kind {
                    RateKind::Limit => "limit",
                    RateKind::SynGuard => "syn-guard",
                };
                write!(f, "{what} {}", format_rate(r.rate, r.bytes))?;
                if r.burst != default_burst(r.rate, r.bytes) {
                    if r.bytes {
                        write!(f, " burst {}B", r.burst)?;
                    } else {
                        write!(f, " burst {}", r.burst)?;
                    }
                }
                if let Some((v4, v6)) = r.per_source {
                    if (v4, v6) == (32, 128) {
                        f.write_str(" per-source")?;
                    } else {
                        write!(f, " per-source /{v4} /{v6}")?;
                    }
                }
                if let Some(e) = r.escalate {
                    write!(f, " escalate {}", format_duration_ms(u64::from(e.after_ms)))?;
                    if e.ttl_s != DEFAULT_ESCALATE_TTL_S {
                        write!(f, " ttl {}", format_duration_ms(u64::from(e.ttl_s) * 1000))?;
                    }
                }
            }
            None => f.write_str(self.action.name())?,
        }
        let syn_guard = self.rate.is_some_and(|r| r.kind == RateKind::SynGuard);
        match self.proto {
            Some(p) => match proto_name(p) {
                Some(n) => write!(f, " {n}")?,
                None => write!(f, " proto {p}")?,
            },
            None if self.syn || self.tcp_flags.is_some() || self.rate.is_some() => {}
            None => f.write_str(" any")?,
        }
        if self.syn && !syn_guard {
            f.write_str(" syn")?;
        }
        if let Some(t) = self.tcp_flags {
            write!(f, " flags {t}")?;
        }
        for (word, range) in [("dport", self.dport), ("sport", self.sport)] {
            match range {
                Some((lo, hi)) if lo == hi => write!(f, " {word} {lo}")?,
                Some((lo, hi)) => write!(f, " {word} {lo}-{hi}")?,
                None => {}
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
        assert!(matches!(
            parse_prefix("198.18.0.77/24"),
            Err(PolicyError::HostBits { .. })
        ));
        assert!(matches!(
            parse_prefix("198.18.1.0/8"),
            Err(PolicyError::HostBits { .. })
        ));
        assert_eq!(
            parse_prefix_lenient("198.18.0.77/24").unwrap().to_string(),
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
            "drop tcp syn dport 25",
            "drop tcp sport 53",
            "pass udp dport 53 sport 1024-65535",
            "drop tcp flags syn/syn,ack dport 22",
            "drop tcp flags rst",
            "drop tcp flags /syn,rst,ack",
            "drop flags fin,psh,urg",
            "limit 100/s per-source tcp flags rst",
            "limit 1000/s",
            "limit 100/s burst 5 per-source tcp dport 80",
            "limit 20/s per-source /24 /64 escalate 10s ttl 1h udp",
            "limit 50/s per-source escalate 500ms syn",
            "limit 10MB/s burst 64000B dst 198.18.0.0/24",
            "limit 125kB/s per-source src 2001:2::/48",
            "syn-guard 500/s dport 443",
            "syn-guard 200/s burst 50 tcp dport 80 dst 198.18.0.1/32",
            "audit limit 10/s icmp",
        ] {
            let spec = RuleSpec::parse(&words(text)).unwrap();
            let back = RuleSpec::from_rule(&spec.to_rule());
            assert_eq!(back, spec, "{text}");
            assert_eq!(back.to_string(), text);
        }
    }

    #[test]
    fn tcp_flags_and_source_ports_are_stored_as_the_kernel_reads_them() {
        let r = RuleSpec::parse(&words("drop tcp flags SYN/syn,ACK sport 1000-2000"))
            .unwrap()
            .to_rule();
        assert_eq!(rule_tcp_mask(r.flags), 0x12);
        assert_eq!(rule_tcp_value(r.flags), 0x02);
        assert_ne!(r.flags & RULE_F_TCP_FLAGS, 0);
        assert_ne!(r.flags & RULE_F_SPORT, 0);
        assert_eq!((r.sport_lo, r.sport_hi), (1000, 2000));
        // The flags' half of the word leaves every RULE_F_* bit alone.
        assert_eq!(r.flags & 0xffff & !(RULE_F_TCP_FLAGS | RULE_F_SPORT), 0);
        let err = RuleSpec::parse(&words("drop tcp flags syn/ack")).unwrap_err();
        assert!(
            err.to_string()
                .contains("syn is set but not in the mask ack"),
            "{err}"
        );
        let err = RuleSpec::parse(&words("drop tcp flags nope")).unwrap_err();
        assert!(err.to_string().contains("unknown TCP flag 'nope'"), "{err}");
    }

    #[test]
    fn rates_are_stored_as_costs() {
        let r = RuleSpec::parse(&words("limit 1000/s burst 10"))
            .unwrap()
            .to_rule();
        assert_eq!(r.action, RULE_ACTION_LIMIT);
        assert_eq!(r.interval, 1_000_000);
        assert_eq!(r.tolerance_ns, 9_000_000);
        let r = RuleSpec::parse(&words("limit 8mbit/s burst 1500B"))
            .unwrap()
            .to_rule();
        assert_eq!(r.rate, 1_000_000);
        assert_eq!(r.interval, 1_000_000, "ps per byte at 1 MB/s");
        assert_eq!(r.tolerance_ns, 1_500_000);
        assert_ne!(r.flags & RULE_F_BYTES, 0);
        let r = RuleSpec::parse(&words("syn-guard 100/s dport 80"))
            .unwrap()
            .to_rule();
        assert_eq!(r.action, RULE_ACTION_SYN_GUARD);
        assert_ne!(r.flags & RULE_F_SYN, 0);
        assert_eq!(
            RuleSpec::parse(&words("limit 1mbit/s"))
                .unwrap()
                .to_string(),
            "limit 125kB/s"
        );
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
            "drop tcp sport",
            "drop tcp sport 80 sport 81",
            "drop tcp sport 90-80",
            "drop icmp sport 80",
            "drop tcp flags",
            "drop tcp flags bogus",
            "drop tcp flags syn,syn",
            "drop tcp flags syn/ack",
            "drop tcp flags /",
            "drop udp flags syn",
            "drop tcp syn flags syn",
            "syn-guard 10/s flags rst",
            "drop tcp flags rst flags fin",
            "drop proto 0",
            "drop 0",
            "audit pass tcp",
            "audit",
            "drop audit tcp",
            "limit",
            "limit 0/s",
            "limit 10",
            "limit 10/m",
            "limit 10/s burst 0",
            "limit 10/s burst 10kB",
            "limit 3bit/s",
            "limit 150000000/s",
            "limit 2GB/s",
            "limit 8bit/s burst 20MB",
            "limit 1/s burst 4000000000",
            "audit limit 10/s per-source escalate 10s",
            "limit 99999999999999999999kbit/s",
            "limit 18446744073709551615kbit/s",
            "limit 10/s per-source /24",
            "limit 10/s per-source /33 /64",
            "limit 10/s escalate 10s",
            "limit 10/s per-source escalate 10",
            "limit 10/s per-source escalate 10s ttl 500ms",
            "limit 10/s per-source escalate 10ms",
            "syn-guard 10mbit/s",
            "syn-guard 10/s per-source",
            "drop udp syn",
            "drop tcp burst 5",
            "drop tcp syn syn",
        ] {
            assert!(
                RuleSpec::parse(&words(text)).is_err(),
                "{text:?} should be refused"
            );
        }
    }
}
