//! `sluice explain`: what the attached program does with a described
//! packet, and why — run by the program itself (dataplane::explain), then
//! named from the policy the maps hold: the list entry, the rule, the
//! service and backend.

use serde::{Deserialize, Serialize};
use sluice_common::{Reason, Verdict};

use crate::{
    dataplane::{DataplaneError, PinRoot, PolicyMaps, attach, explain},
    engine::lb::{self, ServiceState},
    model::{explain::Described, frame, policy::RuleSpec},
};

/// The rule that decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHit {
    pub id: u32,
    pub position: usize,
    pub rule: String,
}

/// The load balancer's part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbHit {
    pub service: String,
    pub mode: String,
    /// The backend chosen (`null`: none could be).
    pub backend: Option<String>,
    /// active, draining or down.
    pub backend_state: Option<String>,
}

/// What the program did with the packet and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The packet as described, normalised.
    pub packet: String,
    pub frame_len: usize,
    /// The interface the frame was run as received on.
    pub interface: String,
    /// The XDP action: drop, pass, tx (sent back out), redirect, aborted.
    pub action: String,
    pub verdict: String,
    pub reason: String,
    /// parser, firewall, ddos or lb.
    pub stage: String,
    /// One line: what in the policy decided.
    pub why: String,
    /// The list entry that matched (allow-list, deny-list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleHit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbHit>,
    /// The program rewrote the frame (NAT, DSR, a SYN challenge).
    pub rewritten: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(
        "no interface is attached in netns {netns}: name one with --interface (or use -n NETNS)"
    )]
    NoInterface { netns: String },
    #[error("interface {name} does not exist in netns {netns}")]
    UnknownInterface { name: String, netns: String },
    #[error(
        "the program returned {action} without saying why: this sluice binary and the attached \
         program disagree (run `sluice upgrade`)"
    )]
    NoAnswer { action: String },
}

fn action_name(a: u32) -> &'static str {
    match a {
        0 => "aborted",
        1 => "drop",
        2 => "pass",
        3 => "tx",
        4 => "redirect",
        _ => "unknown",
    }
}

/// The service a packet to `d.dst` is for: its exact port first, then the
/// VIP's every-port service.
fn service_for<'a>(services: &'a [ServiceState], d: &Described) -> Option<&'a ServiceState> {
    let proto = d.l4.proto(d.src.is_ipv6());
    let of = |port: u16| {
        services
            .iter()
            .find(|s| s.id.vip == d.dst && s.id.port == port && s.id.proto.number() == proto)
    };
    of(d.dport).or_else(|| of(0))
}

/// Runs the attached program on the packet `d` as received on `interface`
/// (default: the first interface attached in this namespace, `netns`
/// being its label).
pub fn explain(
    root: &PinRoot,
    d: &Described,
    interface: Option<&str>,
    netns: &str,
) -> Result<Explanation, ExplainError> {
    if !root.is_set_up() {
        return Err(DataplaneError::NotAttached {
            root: root.root.clone(),
        }
        .into());
    }
    let attached = attach::attached_in(root, netns)?;
    let name = match interface {
        Some(n) => n.to_string(),
        None => attached
            .first()
            .cloned()
            .ok_or_else(|| ExplainError::NoInterface {
                netns: netns.to_string(),
            })?,
    };
    let ifindex =
        crate::dataplane::sys::ifindex(&name).ok_or_else(|| ExplainError::UnknownInterface {
            name: name.clone(),
            netns: netns.to_string(),
        })?;
    let mac = crate::dataplane::sys::mac_address(&name).unwrap_or(frame::DST_MAC);
    let input = d.frame(mac);
    let run = explain::run(root, &input, ifindex)?;
    let action = action_name(run.action).to_string();
    if run.meta.answered != 1 {
        return Err(ExplainError::NoAnswer { action });
    }
    let verdict = Verdict::from_u32(run.meta.verdict).unwrap_or(Verdict::Pass);
    let reason = Reason::from_u32(run.meta.reason).unwrap_or(Reason::Default);
    let maps = PolicyMaps::open(root)?;
    let rule_hit = || -> Result<Option<RuleHit>, DataplaneError> {
        Ok(maps
            .rules()?
            .into_iter()
            .find(|r| r.rule.id == run.meta.matched)
            .map(|r| RuleHit {
                id: r.rule.id,
                position: r.position,
                rule: RuleSpec::from_rule(&r.rule).to_string(),
            }))
    };
    let rule_text = |r: &Option<RuleHit>| match r {
        Some(r) => format!("rule {} (position {}) '{}'", r.id, r.position, r.rule),
        None => format!("rule {}", run.meta.matched),
    };
    let mut out = Explanation {
        packet: d.to_string(),
        frame_len: input.len(),
        interface: name.clone(),
        action: action.clone(),
        verdict: verdict.name().to_string(),
        reason: reason.name().to_string(),
        stage: String::new(),
        why: String::new(),
        entry: None,
        rule: None,
        lb: None,
        rewritten: run.frame != input,
        note: (!attached.contains(&name)).then(|| {
            format!(
                "{name} is not attached in netns {netns}: run as if the program received it there"
            )
        }),
    };
    let audit = if verdict == Verdict::Audit {
        " (audit: passed and counted, would drop)"
    } else {
        ""
    };
    match reason {
        Reason::NotIp => {
            out.stage = "parser".into();
            out.why = "not IP: passed untouched".into();
        }
        Reason::Malformed => {
            out.stage = "parser".into();
            out.why = format!(
                "the frame cannot be parsed: malformed action {}",
                verdict.name()
            );
        }
        Reason::AllowList | Reason::DenyList => {
            let prefix = ipnet::IpNet::new(d.src, run.meta.matched as u8)
                .map(|n| n.trunc().to_string())
                .unwrap_or_else(|_| format!("{}/{}", d.src, run.meta.matched));
            let list = if reason == Reason::AllowList {
                "allow"
            } else {
                "deny"
            };
            out.stage = "firewall".into();
            out.why = format!("{list} list entry {prefix}{audit}");
            out.entry = Some(prefix);
        }
        Reason::Rule => {
            out.stage = "firewall".into();
            out.rule = rule_hit()?;
            out.why = format!("{}{audit}", rule_text(&out.rule));
        }
        Reason::RateLimit | Reason::MapFull => {
            out.stage = "ddos".into();
            out.rule = rule_hit()?;
            out.why = if reason == Reason::RateLimit {
                format!("over the rate of {}{audit}", rule_text(&out.rule))
            } else {
                format!(
                    "{}: no bucket of its own for this source (new-source cap reached){audit}",
                    rule_text(&out.rule)
                )
            };
        }
        Reason::SynDefence if run.meta.matched == 0 => {
            out.stage = "ddos".into();
            out.why = format!(
                "a reset answering a SYN challenge: verifies its source and is consumed{audit}"
            );
        }
        Reason::SynDefence => {
            out.stage = "ddos".into();
            out.rule = rule_hit()?;
            out.why = if run.action == 3 {
                format!(
                    "SYN over the rate of {} from an unverified source: answered with a \
                     challenge (SYN-ACK cookie) and dropped",
                    rule_text(&out.rule)
                )
            } else {
                format!(
                    "SYN over the rate of {} from an unverified source{audit}",
                    rule_text(&out.rule)
                )
            };
        }
        Reason::Default => {
            out.stage = "firewall".into();
            out.why = format!("nothing matched: default action{audit}");
        }
        Reason::NoBackend | Reason::VipFragment | Reason::Steer => {
            out.stage = "lb".into();
            out.why = match reason {
                Reason::NoBackend => "the service has no backend that can take it".into(),
                Reason::VipFragment => {
                    "a non-first fragment to a VIP: no ports to balance on".into()
                }
                _ => "steered".into(),
            };
        }
    }
    // The load balancer's part: a packet to a VIP it balanced (or could not).
    if run.meta.backend != 0 || matches!(reason, Reason::NoBackend | Reason::VipFragment) {
        let services = lb::read(root)?;
        if let Some(s) = service_for(&services, d) {
            let member = run
                .meta
                .backend
                .checked_sub(1)
                .and_then(|slot| s.members.iter().find(|m| m.slot == slot));
            out.lb = Some(LbHit {
                service: s.id.to_string(),
                mode: s.mode.name().to_string(),
                backend: member.map(|m| m.backend.to_string()),
                backend_state: member.map(|m| m.state_name().to_string()),
            });
        }
        let lb = out.lb.clone();
        let service = lb
            .as_ref()
            .map_or("?".to_string(), |l| format!("{} ({})", l.service, l.mode));
        let backend = lb
            .as_ref()
            .and_then(|l| l.backend.clone())
            .unwrap_or_else(|| "?".to_string());
        match (run.meta.backend != 0, reason) {
            (false, Reason::NoBackend) => {
                out.why = format!(
                    "service {service} has no backend that can take it (all down, draining or removed)"
                );
            }
            (true, Reason::NoBackend) => {
                out.stage = "lb".into();
                out.why = format!(
                    "service {service} -> backend {backend}, but the frame cannot be sent there: \
                     the backend's (or next hop's) MAC is not known yet, or the route to it leaves \
                     by an interface sluice is not attached to (`sluice lb list`: no_neighbour, \
                     egress_not_attached)"
                );
            }
            (true, Reason::Malformed) => {
                out.stage = "lb".into();
                out.why = format!(
                    "service {service} -> backend {backend}: the frame could not be rewritten for it"
                );
            }
            (true, _) => {
                let sent = match (run.action, out.rewritten) {
                    (3, _) => "rewritten and sent back out of the interface (XDP_TX)",
                    (4, _) => "rewritten and redirected to another interface (XDP_REDIRECT)",
                    (2, true) => {
                        "rewritten to the backend and passed to the stack, which routes it"
                    }
                    (2, false) => "passed to the stack",
                    _ => "dropped",
                };
                out.stage = format!("{} + lb", out.stage);
                out.why = format!(
                    "{}; then service {service} -> backend {backend}: {sent}",
                    out.why
                );
            }
            (false, _) => {}
        }
    }
    Ok(out)
}
