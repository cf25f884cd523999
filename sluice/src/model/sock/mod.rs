//! The socket layer's model: workloads (a cgroup v2 subtree named by its
//! path under the cgroup v2 mount) and their connect/sendmsg and bind
//! rules, as the user writes them, with the checks that need no kernel.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sluice_common::{
    Verdict,
    sock::{
        MAX_CGROUP_LEVEL, MAX_SOCK_RULES, MAX_WORKLOADS, SOCK_RULE_F_ADDR, SOCK_RULE_F_FAMILY,
        SOCK_RULE_F_PORT, SockRule, WORKLOAD_F_ACTIVE, WORKLOAD_F_AUDIT, WorkloadPolicy,
    },
};

use crate::model::lb::Proto;

/// What a socket rule or default does to a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SockAction {
    #[default]
    Allow,
    Deny,
}

impl SockAction {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }

    /// The kernel's verdict word.
    pub const fn verdict(self) -> u32 {
        match self {
            Self::Allow => Verdict::Pass as u32,
            Self::Deny => Verdict::Drop as u32,
        }
    }
}

impl FromStr for SockAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!("`{other}` is not an action (allow or deny)")),
        }
    }
}

impl fmt::Display for SockAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which list a rule is in: connect/sendmsg rules name a destination
/// (`to`), bind rules the address bound (`at`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    Connect,
    Bind,
}

impl RuleKind {
    const fn addr_word(self) -> &'static str {
        match self {
            Self::Connect => "to",
            Self::Bind => "at",
        }
    }
}

/// One socket rule: `allow|deny [tcp|udp] [to|at PREFIX] [port N[-M]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRuleSpec {
    pub action: SockAction,
    pub proto: Option<Proto>,
    pub addr: Option<IpNet>,
    pub ports: Option<(u16, u16)>,
    /// `to` (connect) or `at` (bind), as written; fixed by the list the
    /// rule is in.
    pub bind: bool,
}

impl SockRuleSpec {
    /// Parses a rule of the given list.
    pub fn parse(text: &str, kind: RuleKind) -> Result<Self, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let Some((first, mut rest)) = words.split_first() else {
            return Err("empty rule (expected `allow|deny ...`)".into());
        };
        let action: SockAction = first.parse()?;
        let mut rule = Self {
            action,
            proto: None,
            addr: None,
            ports: None,
            bind: kind == RuleKind::Bind,
        };
        while let Some((w, tail)) = rest.split_first() {
            rest = tail;
            match *w {
                "tcp" | "udp" if rule.proto.is_none() => {
                    rule.proto = Some(w.parse().map_err(|e| format!("{e}"))?);
                }
                "to" | "at" => {
                    if *w != kind.addr_word() {
                        return Err(match kind {
                            RuleKind::Connect => {
                                "connect rules name the destination with `to PREFIX` (`at` is for bind rules)".into()
                            }
                            RuleKind::Bind => {
                                "bind rules name the address bound with `at PREFIX` (`to` is for connect rules)".into()
                            }
                        });
                    }
                    if rule.addr.is_some() {
                        return Err(format!("`{w}` given twice"));
                    }
                    let Some((p, tail)) = rest.split_first() else {
                        return Err(format!("`{w}` needs a prefix (e.g. {w} 198.18.0.0/24)"));
                    };
                    rest = tail;
                    rule.addr = Some(parse_prefix(p)?);
                }
                "port" => {
                    if rule.ports.is_some() {
                        return Err("`port` given twice".into());
                    }
                    let Some((p, tail)) = rest.split_first() else {
                        return Err(
                            "`port` needs a port or range (e.g. port 80, port 8000-8099)".into(),
                        );
                    };
                    rest = tail;
                    rule.ports = Some(parse_ports(p)?);
                }
                other => {
                    return Err(format!(
                        "unexpected `{other}` (a rule is `allow|deny [tcp|udp] [{} PREFIX] [port N[-M]]`)",
                        kind.addr_word()
                    ));
                }
            }
        }
        Ok(rule)
    }

    /// The kernel's form; `id` is the rule's position from 1.
    pub fn to_kernel(&self, id: u32) -> SockRule {
        let mut r = SockRule {
            action: self.action.verdict(),
            proto: self.proto.map_or(0, |p| u32::from(p.number())),
            id,
            ..SockRule::default()
        };
        if let Some(n) = self.addr {
            let (family, net, mask) = match n {
                IpNet::V4(v) => (
                    4,
                    sluice_common::v4_words(v.network().octets()),
                    sluice_common::v4_words(v.netmask().octets()),
                ),
                IpNet::V6(v) => (
                    6,
                    sluice_common::addr_words(&v.network().octets()),
                    sluice_common::addr_words(&v.netmask().octets()),
                ),
            };
            r.flags |= SOCK_RULE_F_FAMILY | SOCK_RULE_F_ADDR;
            r.family = family;
            r.net = net;
            r.mask = mask;
        }
        if let Some((lo, hi)) = self.ports {
            r.flags |= SOCK_RULE_F_PORT;
            r.port_lo = lo;
            r.port_hi = hi;
        }
        r
    }

    /// Whether the rule matches a call (the kernel's test, for the model's
    /// own checks and tests).
    pub fn matches(&self, proto: Proto, addr: IpAddr, port: u16) -> bool {
        let addr = match addr {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            a => a,
        };
        self.proto.is_none_or(|p| p == proto)
            && self.addr.is_none_or(|n| n.contains(&addr))
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

fn parse_prefix(p: &str) -> Result<IpNet, String> {
    let net: IpNet = match p.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match p.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("`{p}` is not an address or prefix")),
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{p} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    // The programs judge IPv4-mapped addresses as IPv4: a rule on the
    // mapped range would never match.
    if let IpNet::V6(v) = net
        && v.prefix_len() >= 96
        && let Some(v4) = v.network().to_ipv4_mapped()
    {
        return Err(format!(
            "{p} is an IPv4-mapped prefix; write it as IPv4 ({v4}/{}): IPv4 rules also judge \
             IPv4-mapped addresses",
            v.prefix_len() - 96
        ));
    }
    Ok(net)
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("`{s}` is not a port (0-65535)"))
    };
    let (lo, hi) = match p.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let n = port(p)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("port range {p} runs backwards"));
    }
    Ok((lo, hi))
}

impl fmt::Display for SockRuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.action.name())?;
        if let Some(p) = self.proto {
            write!(f, " {}", p.name())?;
        }
        if let Some(n) = self.addr {
            write!(f, " {} {n}", if self.bind { "at" } else { "to" })?;
        }
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, " port {lo}")?,
            Some((lo, hi)) => write!(f, " port {lo}-{hi}")?,
            None => {}
        }
        Ok(())
    }
}

impl Serialize for SockRuleSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SockRuleSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let kind = if text.split_whitespace().any(|w| w == "at") {
            RuleKind::Bind
        } else {
            RuleKind::Connect
        };
        // A bind rule without an address reads like a connect rule; the
        // workload's `bind` list marks its rules (`bind_rules`).
        Self::parse(&text, kind).map_err(serde::de::Error::custom)
    }
}

/// Reads a workload's bind rules (`at PREFIX`; marked as bind rules even
/// when they name no address).
fn bind_rules<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SockRuleSpec>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| SockRuleSpec::parse(t, RuleKind::Bind).map_err(serde::de::Error::custom))
        .collect()
}

/// A workload: a cgroup subtree and the policy for its sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    /// The cgroup's path under the cgroup v2 mount, without a leading `/`.
    pub cgroup: String,
    #[serde(default)]
    pub audit: bool,
    #[serde(default)]
    pub connect_default: SockAction,
    #[serde(default)]
    pub bind_default: SockAction,
    #[serde(default)]
    pub connect: Vec<SockRuleSpec>,
    #[serde(default, deserialize_with = "bind_rules")]
    pub bind: Vec<SockRuleSpec>,
}

impl Workload {
    /// The kernel's policy entry and rules (connect rules, then bind rules).
    pub fn to_kernel(&self) -> (WorkloadPolicy, Vec<SockRule>) {
        let mut flags = WORKLOAD_F_ACTIVE;
        if self.audit {
            flags |= WORKLOAD_F_AUDIT;
        }
        let policy = WorkloadPolicy {
            flags,
            connect_default: self.connect_default.verdict(),
            bind_default: self.bind_default.verdict(),
            connect_rules: self.connect.len() as u32,
            bind_rules: self.bind.len() as u32,
            _pad: 0,
        };
        let rules = self
            .connect
            .iter()
            .enumerate()
            .chain(self.bind.iter().enumerate())
            .map(|(i, r)| r.to_kernel(i as u32 + 1))
            .collect();
        (policy, rules)
    }

    /// Checks what can be checked without the kernel.
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name)?;
        normalise_cgroup(&self.cgroup).map_err(|e| format!("workload {}: {e}", self.name))?;
        let n = self.connect.len() + self.bind.len();
        if n > MAX_SOCK_RULES as usize {
            return Err(format!(
                "workload {} has {n} rules; a workload holds at most {MAX_SOCK_RULES} (connect and bind together)",
                self.name
            ));
        }
        if let Some(r) = self.connect.iter().find(|r| r.bind) {
            return Err(format!(
                "workload {}: connect rule `{r}` names an address with `at` (use `to`)",
                self.name
            ));
        }
        if let Some(r) = self.bind.iter().find(|r| !r.bind && r.addr.is_some()) {
            return Err(format!(
                "workload {}: bind rule `{r}` names an address with `to` (use `at`)",
                self.name
            ));
        }
        Ok(())
    }
}

/// A workload name: 1-32 of `a-z 0-9 _ -`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with(['-', '_']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a workload name (1-32 of a-z, 0-9, _ and -, starting with a letter or digit)"
        ))
    }
}

/// A cgroup path as the config holds it: relative to the cgroup v2 mount,
/// no leading or trailing `/`, no `.`/`..`/empty components, not the root.
pub fn normalise_cgroup(path: &str) -> Result<String, String> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Err(format!(
            "cgroup `{path}` is the root cgroup: name a cgroup below it (sluice never attaches to the root)"
        ));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if let Some(bad) = parts
        .iter()
        .find(|p| p.is_empty() || **p == "." || **p == "..")
    {
        return Err(format!(
            "cgroup `{path}` has a `{bad}` component: give the path below the cgroup v2 mount plainly"
        ));
    }
    if parts.len() > MAX_CGROUP_LEVEL as usize {
        return Err(format!(
            "cgroup `{path}` is {} levels deep; sluice finds workloads up to {MAX_CGROUP_LEVEL} levels",
            parts.len()
        ));
    }
    Ok(parts.join("/"))
}

/// Checks a whole set of workloads: each valid, names and cgroups unique,
/// none inside another's cgroup, at most `MAX_WORKLOADS`.
pub fn validate(workloads: &[Workload]) -> Result<(), String> {
    if workloads.len() > MAX_WORKLOADS as usize {
        return Err(format!(
            "{} workloads; sluice holds at most {MAX_WORKLOADS}",
            workloads.len()
        ));
    }
    for (i, w) in workloads.iter().enumerate() {
        w.validate()?;
        let cg = normalise_cgroup(&w.cgroup)?;
        for other in &workloads[..i] {
            if other.name == w.name {
                return Err(format!("workload {} is named twice", w.name));
            }
            let oc = normalise_cgroup(&other.cgroup)?;
            if oc == cg {
                return Err(format!(
                    "workloads {} and {} name the same cgroup {cg}",
                    other.name, w.name
                ));
            }
            let (outer, inner) = if cg.len() < oc.len() {
                ((w, &cg), (other, &oc))
            } else {
                ((other, &oc), (w, &cg))
            };
            if inner.1.starts_with(&format!("{}/", outer.1)) {
                return Err(format!(
                    "workload {}'s cgroup {} is inside workload {}'s {}: nested workloads are not supported \
                     (a workload covers its cgroup's descendants already)",
                    inner.0.name, inner.1, outer.0.name, outer.1
                ));
            }
        }
    }
    Ok(())
}

/// A change to the workloads (`sluice workload ...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkloadOp {
    Add { workload: Workload },
    Del { name: String },
}

impl WorkloadOp {
    /// Applies the change. `strict` (a new request) refuses an add of an
    /// existing name and a delete of a missing one; replaying onto a new
    /// base skips them.
    pub fn apply(&self, workloads: &mut Vec<Workload>, strict: bool) -> Result<(), String> {
        match self {
            Self::Add { workload } => {
                let mut w = workload.clone();
                w.cgroup = normalise_cgroup(&w.cgroup)?;
                match workloads.iter().position(|x| x.name == w.name) {
                    Some(_) if strict => {
                        return Err(format!(
                            "workload {} exists already (delete it first, or change the config)",
                            w.name
                        ));
                    }
                    Some(i) => workloads[i] = w,
                    None => workloads.push(w),
                }
            }
            Self::Del { name } => match workloads.iter().position(|x| x.name == *name) {
                Some(i) => {
                    workloads.remove(i);
                }
                None if strict => return Err(format!("no workload {name}")),
                None => {}
            },
        }
        if strict {
            validate(workloads)?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Add { workload } => {
                format!(
                    "workload add {} (cgroup {})",
                    workload.name, workload.cgroup
                )
            }
            Self::Del { name } => format!("workload del {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(t: &str) -> SockRuleSpec {
        SockRuleSpec::parse(t, RuleKind::Connect).unwrap()
    }

    #[test]
    fn rules_parse_print_and_match() {
        let r = rule("deny tcp to 198.18.2.0/24 port 80");
        assert_eq!(r.to_string(), "deny tcp to 198.18.2.0/24 port 80");
        assert!(r.matches(Proto::Tcp, "198.18.2.9".parse().unwrap(), 80));
        assert!(r.matches(Proto::Tcp, "::ffff:198.18.2.9".parse().unwrap(), 80));
        assert!(!r.matches(Proto::Udp, "198.18.2.9".parse().unwrap(), 80));
        assert!(!r.matches(Proto::Tcp, "198.18.3.9".parse().unwrap(), 80));
        let b = SockRuleSpec::parse("allow at ::1 port 8080-8089", RuleKind::Bind).unwrap();
        assert_eq!(b.to_string(), "allow at ::1/128 port 8080-8089");
        assert_eq!(rule("deny").to_string(), "deny");
        for (bad, why) in [
            ("", "empty"),
            ("drop tcp", "not an action"),
            ("deny to 198.18.2.1/24", "host bits"),
            ("deny at 198.18.2.0/24", "`to PREFIX`"),
            ("deny port 90-80", "backwards"),
            ("deny port 70000", "not a port"),
            ("deny tcp tcp", "unexpected `tcp`"),
            ("deny to", "needs a prefix"),
            ("deny to ::ffff:198.18.5.0/120", "198.18.5.0/24"),
        ] {
            let e = SockRuleSpec::parse(bad, RuleKind::Connect).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn kernel_rules_compare_the_same_bits() {
        let r = rule("deny udp to 198.18.2.0/24 port 53").to_kernel(1);
        assert_eq!(r.family, 4);
        assert_eq!(r.proto, 17);
        assert_eq!((r.port_lo, r.port_hi), (53, 53));
        let a = sluice_common::v4_words([198, 18, 2, 77]);
        assert_eq!([a[0] & r.mask[0], a[1] & r.mask[1]], r.net);
    }

    fn wl(name: &str, cgroup: &str) -> Workload {
        Workload {
            name: name.into(),
            cgroup: cgroup.into(),
            audit: false,
            connect_default: SockAction::Allow,
            bind_default: SockAction::Allow,
            connect: vec![],
            bind: vec![],
        }
    }

    #[test]
    fn sets_of_workloads_are_checked() {
        assert!(validate(&[wl("a", "x/a"), wl("b", "x/b")]).is_ok());
        assert!(
            validate(&[wl("a", "x/a"), wl("a", "x/b")])
                .unwrap_err()
                .contains("named twice")
        );
        assert!(
            validate(&[wl("a", "x/a"), wl("b", "/x/a/")])
                .unwrap_err()
                .contains("same cgroup")
        );
        let e = validate(&[wl("a", "x"), wl("b", "x/a")]).unwrap_err();
        assert!(e.contains("nested"), "{e}");
        assert!(validate(&[wl("a", "xa"), wl("b", "x")]).is_ok());
        assert!(validate(&[wl("a", "/")]).unwrap_err().contains("root"));
        assert!(validate(&[wl("a", "x/../y")]).unwrap_err().contains("`..`"));
        assert!(
            validate(&[wl("A", "x")])
                .unwrap_err()
                .contains("not a workload name")
        );
    }

    #[test]
    fn ops_refuse_what_does_not_fit() {
        let mut v = vec![wl("a", "x/a")];
        let add = WorkloadOp::Add {
            workload: wl("a", "x/b"),
        };
        assert!(
            add.apply(&mut v, true)
                .unwrap_err()
                .contains("exists already")
        );
        add.apply(&mut v, false).unwrap();
        assert_eq!(v[0].cgroup, "x/b");
        let del = WorkloadOp::Del { name: "zz".into() };
        assert!(
            del.apply(&mut v, true)
                .unwrap_err()
                .contains("no workload zz")
        );
        let nested = WorkloadOp::Add {
            workload: wl("c", "x/b/c"),
        };
        assert!(nested.apply(&mut v, true).is_err());
    }
}
