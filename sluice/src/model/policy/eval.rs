//! Judges one hypothetical connection against a policy in user space, the
//! way the XDP program would (docs/dataplane.md §2). Used by the lock-out
//! guard: refuse a policy that would cut off the session applying it or the
//! agent's own listeners.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use sluice_common::{Reason, Verdict};

use super::{Action, Policy, RuleSpec};

/// A connection to check: the first packet of it, as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    /// What it is, for messages ("your SSH session", "the metrics endpoint").
    pub what: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub dport: Option<u16>,
    /// The client's port when known (an SSH session's); `None` = any port,
    /// so a rule with a source port range is taken to match when it would
    /// drop and not to when it would pass (the guard errs towards refusing).
    #[serde(default)]
    pub sport: Option<u16>,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            p => format!("proto {p}"),
        };
        match self.dport {
            Some(p) => write!(
                f,
                "{} ({proto} {} -> {} port {p})",
                self.what, self.src, self.dst
            ),
            None => write!(f, "{} ({proto} {} -> {})", self.what, self.src, self.dst),
        }
    }
}

impl Probe {
    /// The SSH session of the caller, from `$SSH_CONNECTION`
    /// ("client_ip client_port server_ip server_port").
    pub fn from_ssh_connection(value: &str) -> Option<Self> {
        let mut it = value.split_whitespace();
        let src = it.next()?.parse().ok()?;
        // A client port that does not parse only costs the guard its
        // knowledge of the port, not the whole probe.
        let sport = it.next()?.parse().ok();
        let dst = it.next()?.parse().ok()?;
        let dport = it.next()?.parse().ok()?;
        Some(Self {
            what: "your SSH session".into(),
            src,
            dst,
            proto: 6,
            dport: Some(dport),
            sport,
        })
    }
}

/// The longest prefix in `list` covering `addr`: one lookup per prefix
/// length, so a change to a million-entry list is judged as fast as to a
/// small one.
fn longest(list: &std::collections::BTreeSet<IpNet>, addr: &IpAddr) -> Option<IpNet> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (0..=max).rev().find_map(|plen| {
        let n = IpNet::new(*addr, plen).ok()?.trunc();
        list.contains(&n).then_some(n)
    })
}

/// The TCP packets of a connection the guard judges: its SYN, then the
/// ACKs (with or without data) that carry the rest of it. A connection is
/// cut off when any of them is dropped.
const CONNECTION_FLAGS: [u8; 3] = [0x02, 0x10, 0x18];

fn rule_matches(r: &RuleSpec, p: &Probe, tcp_flags: u8) -> bool {
    let same_family = |n: &IpNet| n.addr().is_ipv4() == p.src.is_ipv4();
    if r.src.iter().chain(r.dst.iter()).any(|n| !same_family(n)) {
        return false;
    }
    if r.proto.is_some_and(|proto| proto != p.proto) {
        return false;
    }
    if let Some((lo, hi)) = r.dport
        && !p.dport.is_some_and(|d| (lo..=hi).contains(&d))
    {
        return false;
    }
    if let Some((lo, hi)) = r.sport {
        let matches = match p.sport {
            Some(s) => (lo..=hi).contains(&s),
            // Unknown client port of a connection that has ports: a rule
            // that would drop may match it, one that would not may not.
            None if p.dport.is_some() => r.action == Verdict::Drop && !r.audit,
            None => false,
        };
        if !matches {
            return false;
        }
    }
    // SYN set, ACK and RST clear, as the kernel's `syn`.
    if r.syn && !(p.proto == 6 && tcp_flags & 0x16 == 0x02) {
        return false;
    }
    if let Some(f) = r.tcp_flags
        && !(p.proto == 6 && tcp_flags & f.mask == f.set)
    {
        return false;
    }
    r.src.is_none_or(|n| n.contains(&p.src)) && r.dst.is_none_or(|n| n.contains(&p.dst))
}

/// The verdict and reason, plus what decided it, for messages. For TCP,
/// the connection's packets are judged (its SYN, from any client port: a
/// reconnect gets a new one; then its ACKs, with or without data, from the
/// probe's port): the first that is dropped, else the first audited, else
/// the SYN's.
pub fn judge(policy: &Policy, p: &Probe) -> (Verdict, Reason, String) {
    if p.proto != 6 {
        return judge_packet(policy, p, 0);
    }
    let reconnect = Probe {
        sport: None,
        ..p.clone()
    };
    let verdicts: Vec<_> = CONNECTION_FLAGS
        .iter()
        .map(|f| judge_packet(policy, if *f == 0x02 { &reconnect } else { p }, *f))
        .collect();
    let first = |v: Verdict| verdicts.iter().find(|x| x.0 == v).cloned();
    first(Verdict::Drop)
        .or_else(|| first(Verdict::Audit))
        .unwrap_or_else(|| verdicts[0].clone())
}

/// One packet of the connection: `tcp_flags` is its TCP flags byte (0 for
/// other protocols).
pub fn judge_packet(policy: &Policy, p: &Probe, tcp_flags: u8) -> (Verdict, Reason, String) {
    let audited = |drop: bool, audit: bool| match (drop, audit) {
        (false, _) => Verdict::Pass,
        (true, false) => Verdict::Drop,
        (true, true) => Verdict::Audit,
    };
    if let Some(n) = longest(&policy.allow, &p.src) {
        return (Verdict::Pass, Reason::AllowList, format!("allow list {n}"));
    }
    if let Some(n) = longest(&policy.deny, &p.src) {
        return (
            audited(true, policy.audit),
            Reason::DenyList,
            format!("deny list {n}"),
        );
    }
    // `limit` and `syn-guard` rules only drop what is over their rate; one
    // connection is not, so they are passed over.
    if let Some(r) = policy
        .rules
        .iter()
        .filter(|r| r.rate.is_none())
        .find(|r| rule_matches(r, p, tcp_flags))
    {
        let drop = r.action == Verdict::Drop;
        return (
            audited(drop, policy.audit || r.audit),
            Reason::Rule,
            format!("rule '{r}'"),
        );
    }
    (
        audited(policy.default == Action::Drop, policy.audit),
        Reason::Default,
        format!("default {}", policy.default),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(src: &str, dport: u16) -> Probe {
        Probe {
            what: "test".into(),
            src: src.parse().unwrap(),
            dst: "198.18.0.2".parse().unwrap(),
            proto: 6,
            dport: Some(dport),
            sport: None,
        }
    }

    fn rule(text: &str) -> RuleSpec {
        RuleSpec::parse(
            &text
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn order_is_allow_deny_rules_default() {
        let mut p = Policy::default();
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Pass);
        p.default = Action::Drop;
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).1, Reason::Default);
        p.rules.push(rule("pass tcp dport 22"));
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Pass);
        assert_eq!(judge(&p, &probe("198.18.0.1", 23)).0, Verdict::Drop);
        p.deny.insert("198.18.0.0/24".parse().unwrap());
        let (v, r, why) = judge(&p, &probe("198.18.0.1", 22));
        assert_eq!((v, r), (Verdict::Drop, Reason::DenyList));
        assert!(why.contains("198.18.0.0/24"));
        p.allow.insert("198.18.0.1/32".parse().unwrap());
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).1, Reason::AllowList);
        p.audit = true;
        assert_eq!(judge(&p, &probe("198.18.0.9", 22)).0, Verdict::Audit);
    }

    #[test]
    fn every_packet_of_the_connection_counts() {
        let mut p = Policy::default();
        // Only the SYN passes: the session would be cut off after it.
        p.rules.push(rule("drop tcp flags ack dport 22"));
        let (v, _, why) = judge(&p, &probe("198.18.0.1", 22));
        assert_eq!(v, Verdict::Drop);
        assert!(why.contains("flags ack"), "{why}");
        // A SYN-only drop rule cuts off new sessions too.
        p.rules = vec![rule("drop tcp syn dport 22")];
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Drop);
        // Resets only: a connection's own packets pass.
        p.rules = vec![rule("drop tcp flags rst dport 22")];
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Pass);
        // An audited SYN does not hide the ACKs' drop.
        p.rules = vec![
            rule("audit drop tcp syn dport 22"),
            rule("drop tcp dport 22"),
        ];
        let (v, _, why) = judge(&p, &probe("198.18.0.1", 22));
        assert_eq!(v, Verdict::Drop, "{why}");
        assert!(why.contains("'drop tcp dport 22'"), "{why}");
    }

    #[test]
    fn unknown_client_ports_err_towards_refusing() {
        let mut p = Policy::default();
        p.rules.push(rule("drop tcp sport 1024-65535 dport 22"));
        // Any client port: the drop rule may match.
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Drop);
        // The session's own port outside the range: its packets pass, but a
        // reconnect (any port) would not.
        let mut known = probe("198.18.0.1", 22);
        known.sport = Some(1000);
        assert_eq!(judge_packet(&p, &known, 0x10).0, Verdict::Pass);
        assert_eq!(judge(&p, &known).0, Verdict::Drop);
        known.sport = Some(50022);
        assert_eq!(judge_packet(&p, &known, 0x10).0, Verdict::Drop);
        // An audit rule on any client port does not hide a drop after it.
        p.rules = vec![
            rule("audit drop tcp sport 1-65535 dport 22"),
            rule("drop tcp dport 22"),
        ];
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Drop);
        // A reconnect comes from a new port: a drop rule on other client
        // ports refuses even a known session port outside it.
        p.rules = vec![rule("drop tcp syn sport 1024-65535 dport 22")];
        let mut known = probe("198.18.0.1", 22);
        known.sport = Some(1000);
        assert_eq!(judge(&p, &known).0, Verdict::Drop);
        // A pass rule on some client ports does not save unknown ones.
        p.rules = vec![rule("pass tcp sport 1024-65535 dport 22")];
        p.default = Action::Drop;
        assert_eq!(judge(&p, &probe("198.18.0.1", 22)).0, Verdict::Drop);
    }

    #[test]
    fn ssh_connection_parses() {
        let p = Probe::from_ssh_connection("198.18.0.1 50022 198.18.0.2 22").unwrap();
        assert_eq!(p.dport, Some(22));
        assert_eq!(p.sport, Some(50022));
        let p = Probe::from_ssh_connection("198.18.0.1 x 198.18.0.2 22").unwrap();
        assert_eq!((p.sport, p.dport), (None, Some(22)));
        assert_eq!(p.src, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert!(Probe::from_ssh_connection("garbage").is_none());
    }
}
