//! The desired state written back as a configuration file (`sluice export`,
//! like `iptables-save`): interfaces, `[policy]`, `[deny]`, `[allow]` and
//! `[[service]]`, `[[workload]]` and `[[steer]]` tables that `sluice check` accepts and `sluice apply`
//! takes back unchanged. Temporary deny entries (`--ttl`, escalations) are
//! left out: a config file has no expiry, and they expire by themselves.

use toml::{Table, Value};

use super::Desired;
use crate::model::lb::{CheckKind, LbService, Mode};

fn strings<I: IntoIterator<Item = String>>(items: I) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn service(s: &LbService) -> Table {
    let mut t = Table::new();
    t.insert("vip".into(), Value::String(s.spec.id.to_string()));
    let mode = match s.spec.mode {
        Mode::Nat => "nat",
        Mode::Dsr => "dsr",
        Mode::Vxlan { vni } => {
            t.insert("vni".into(), Value::Integer(i64::from(vni)));
            "vxlan"
        }
    };
    t.insert("mode".into(), Value::String(mode.into()));
    let backends = s
        .spec
        .backends
        .iter()
        .map(|b| {
            let mut bt = Table::new();
            bt.insert("addr".into(), Value::String(b.addr.to_string()));
            bt.insert("weight".into(), Value::Integer(i64::from(b.weight)));
            if b.draining {
                bt.insert("drain".into(), Value::Boolean(true));
            }
            Value::Table(bt)
        })
        .collect();
    t.insert("backends".into(), Value::Array(backends));
    if !s.socket {
        t.insert("socket".into(), Value::Boolean(false));
    }
    if let Some(h) = &s.health {
        let mut ht = Table::new();
        let check = match h.check {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
        };
        ht.insert("check".into(), Value::String(check.into()));
        // An HTTP check's path and status always; a TCP check's only when
        // set (the parser keeps them either way).
        let defaults = crate::model::lb::HealthConf::new(h.check);
        if h.check == CheckKind::Http || h.path != defaults.path {
            ht.insert("path".into(), Value::String(h.path.clone()));
        }
        if h.check == CheckKind::Http || h.expect != defaults.expect {
            ht.insert("expect".into(), Value::Integer(i64::from(h.expect)));
        }
        if let Some(p) = h.port {
            ht.insert("port".into(), Value::Integer(i64::from(p)));
        }
        if let Some(n) = &h.netns {
            ht.insert("netns".into(), Value::String(n.clone()));
        }
        ht.insert(
            "interval".into(),
            Value::String(format!("{}ms", h.interval_ms)),
        );
        ht.insert(
            "timeout".into(),
            Value::String(format!("{}ms", h.timeout_ms)),
        );
        ht.insert("rise".into(), Value::Integer(i64::from(h.rise)));
        ht.insert("fall".into(), Value::Integer(i64::from(h.fall)));
        t.insert("health".into(), Value::Table(ht));
    }
    t
}

/// The desired state as a config file's text; `header` becomes its first
/// comment lines.
#[must_use]
pub fn to_toml(desired: &Desired, header: &str) -> String {
    let mut root = Table::new();
    if !desired.interfaces.is_empty() {
        let ifaces = desired
            .interfaces
            .iter()
            .map(|i| {
                let mut t = Table::new();
                t.insert("name".into(), Value::String(i.name.clone()));
                if let Some(n) = &i.netns {
                    t.insert("netns".into(), Value::String(n.clone()));
                }
                t.insert("mode".into(), Value::String(i.mode.name().into()));
                Value::Table(t)
            })
            .collect();
        root.insert("interface".into(), Value::Array(ifaces));
    }
    let p = &desired.policy;
    let mut policy = Table::new();
    policy.insert("default".into(), Value::String(p.default.to_string()));
    policy.insert("malformed".into(), Value::String(p.malformed.to_string()));
    policy.insert("audit".into(), Value::Boolean(p.audit));
    policy.insert(
        "rules".into(),
        strings(p.rules.iter().map(ToString::to_string)),
    );
    root.insert("policy".into(), Value::Table(policy));
    let deny = p
        .deny
        .iter()
        .filter(|n| !desired.temp_deny.contains_key(n))
        .map(ToString::to_string);
    let mut t = Table::new();
    t.insert("prefixes".into(), strings(deny));
    root.insert("deny".into(), Value::Table(t));
    let mut t = Table::new();
    t.insert(
        "prefixes".into(),
        strings(p.allow.iter().map(ToString::to_string)),
    );
    root.insert("allow".into(), Value::Table(t));
    if !desired.services.is_empty() {
        root.insert(
            "service".into(),
            Value::Array(
                desired
                    .services
                    .iter()
                    .map(|s| Value::Table(service(s)))
                    .collect(),
            ),
        );
    }
    if !desired.workloads.is_empty() {
        let w = desired
            .workloads
            .iter()
            .map(|w| {
                let mut t = Table::new();
                t.insert("name".into(), Value::String(w.name.clone()));
                t.insert("cgroup".into(), Value::String(w.cgroup.clone()));
                t.insert("audit".into(), Value::Boolean(w.audit));
                t.insert(
                    "connect_default".into(),
                    Value::String(w.connect_default.to_string()),
                );
                t.insert(
                    "connect".into(),
                    strings(w.connect.iter().map(ToString::to_string)),
                );
                t.insert(
                    "bind_default".into(),
                    Value::String(w.bind_default.to_string()),
                );
                t.insert(
                    "bind".into(),
                    strings(w.bind.iter().map(ToString::to_string)),
                );
                Value::Table(t)
            })
            .collect();
        root.insert("workload".into(), Value::Array(w));
    }
    if !desired.steers.is_empty() {
        let w = desired
            .steers
            .iter()
            .map(|s| {
                let mut t = Table::new();
                t.insert("name".into(), Value::String(s.name.clone()));
                t.insert("proto".into(), Value::String(s.proto.name().into()));
                t.insert(
                    "prefixes".into(),
                    strings(s.prefixes.iter().map(ToString::to_string)),
                );
                t.insert("ports".into(), Value::String(s.ports.to_string()));
                t.insert(
                    "on_missing".into(),
                    Value::String(s.on_missing.name().into()),
                );
                Value::Table(t)
            })
            .collect();
        root.insert("steer".into(), Value::Array(w));
    }
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&toml::to_string(&root).expect("a TOML table serialises"));
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::policy::config;

    const FULL: &str = r#"
[[interface]]
name = "veth0"
netns = "lab"
mode = "native"

[[interface]]
name = "eth1"
mode = "auto"

[policy]
default = "drop"
malformed = "pass"
audit = true
rules = [
    "limit 200/s burst 50 per-source escalate 30s ttl 10m udp dport 53",
    "syn-guard 500/s tcp dport 443",
    "drop udp dport 4444",
    "audit drop tcp dport 1-1023 dst 198.18.0.0/24",
    "pass icmp src 198.19.0.0/16",
]

[deny]
prefixes = ["198.18.7.0/24", "2001:2:0:7::/64", "198.18.9.9"]

[allow]
prefixes = ["198.18.7.10"]

[[service]]
vip = "198.19.0.10:80"
backends = ["198.18.11.2:8080", { addr = "198.18.12.2:8080", weight = 3, drain = true }]
health = { check = "http", path = "/healthz", expect = 204, port = 9000, netns = "lb", interval = "500ms", timeout = "200ms", rise = 1, fall = 4 }

[[service]]
vip = "[2001:2:0:ff::10]:*/udp"
mode = "dsr"
socket = false
backends = ["[2001:2::5]"]

[[service]]
vip = "198.19.0.11:4789"
mode = "vxlan"
vni = 7
backends = ["198.18.13.2"]

[[workload]]
name = "web"
cgroup = "system.slice/nginx.service"
connect_default = "deny"
connect = ["allow tcp to 198.18.0.0/24 port 443", "allow udp to 2001:2::/48 port 53", "deny"]
bind = ["deny port 1-1023", "allow tcp at 198.18.0.1/32 port 80"]

[[workload]]
name = "batch"
cgroup = "/batch.slice/"
audit = true
bind_default = "deny"
bind = ["allow port 8080-8089"]

[[steer]]
name = "web"
proto = "tcp"
prefixes = ["198.19.1.0/24", "2001:2:0:105::/64"]

[[steer]]
name = "dns"
proto = "udp"
prefixes = ["198.19.1.0/24"]
ports = 53
on_missing = "pass"
"#;

    #[test]
    fn an_export_parses_back_to_the_same_desired_state() {
        let path = Path::new("/etc/sluice/full.toml");
        let cfg = config::parse(path, FULL).expect("the test config is valid");
        let text = to_toml(&cfg.desired, "exported\nsecond line");
        assert!(text.starts_with("# exported\n# second line\n"), "{text}");
        let back = config::parse(Path::new("/tmp/export.toml"), &text)
            .unwrap_or_else(|e| panic!("the export does not parse: {e}\n{text}"));
        assert_eq!(back.desired, cfg.desired, "{text}");
        // Exporting the result again gives the same text.
        assert_eq!(to_toml(&back.desired, "exported\nsecond line"), text);
    }

    #[test]
    fn temporary_entries_are_left_out_and_an_empty_state_exports() {
        let path = Path::new("/etc/sluice/t.toml");
        let mut cfg =
            config::parse(path, "[deny]\nprefixes = [\"198.18.1.0/24\"]\n").expect("valid");
        let temp: ipnet::IpNet = "198.18.2.0/24".parse().expect("net");
        cfg.desired.policy.deny.insert(temp);
        cfg.desired.temp_deny.insert(
            temp,
            crate::model::policy::TempDeny {
                reason: "escalated".into(),
                expires_unix: 1,
            },
        );
        let text = to_toml(&cfg.desired, "x");
        assert!(
            text.contains("198.18.1.0/24") && !text.contains("198.18.2.0/24"),
            "{text}"
        );
        let empty = to_toml(&Desired::default(), "x");
        let back = config::parse(path, &empty).expect("an empty export parses");
        assert_eq!(back.desired, Desired::default(), "{empty}");
    }
}
