//! Rendering: aligned tables for people, JSON (`--json`) for programs.

use serde_json::json;

use crate::{
    dataplane::{
        self, AttachReport, DetachReport, Status,
        policy::ChangeReport,
        stats::{Stats, Totals},
    },
    model::policy::RuleRow,
};

pub struct Out {
    pub json: bool,
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values always serialise")
    );
}

/// Rows with columns padded to their widest cell, one string per line.
pub(crate) fn table_lines(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let s: Vec<String> = cells
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(&mut header.iter().copied())];
    for r in rows {
        out.push(line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// Prints rows with columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    for l in table_lines(header, rows) {
        println!("{l}");
    }
}

pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(last_seen_ns: u64) -> String {
    if last_seen_ns == 0 {
        return "never".into();
    }
    let secs = dataplane::boottime_ns().saturating_sub(last_seen_ns) / 1_000_000_000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC from Unix seconds.
pub(crate) fn format_time(secs: u64) -> String {
    let t = crate::api::time::rfc3339(secs.saturating_mul(1_000_000_000));
    t[..19].replace('T', " ")
}

impl Out {
    pub fn attach(&self, r: &AttachReport) {
        if !self.json {
            for f in &r.repaired {
                println!("repaired: {f}; pinned the program's own map again");
            }
        }
        if self.json {
            print_json(&serde_json::to_value(r).expect("serialisable"));
        } else if r.readopted {
            println!(
                "{} (netns {}) already attached in {} mode: re-adopted program {} link {}",
                r.interface,
                r.netns,
                r.mode.name(),
                r.program_id,
                r.link_id
            );
        } else {
            let note = if r.fell_back {
                " (native refused by the driver)"
            } else {
                ""
            };
            println!(
                "attached to {} (netns {}) in {} mode{note}: program {} link {}",
                r.interface,
                r.netns,
                r.mode.name(),
                r.program_id,
                r.link_id
            );
        }
        if !self.json
            && let Some(tc) = &r.tc
        {
            println!("tc egress: {}", tc_summary(tc));
        }
    }

    pub fn detach(&self, r: &DetachReport) {
        if self.json {
            print_json(&serde_json::to_value(r).expect("serialisable"));
        } else if r.removed_all {
            println!(
                "detached from {} (netns {}); that was the last attachment: program and maps removed",
                r.interface, r.netns
            );
        } else {
            println!("detached from {} (netns {})", r.interface, r.netns);
        }
    }

    pub fn done(&self, message: &str, r: &ChangeReport) {
        if self.json {
            let mut v = serde_json::to_value(r).expect("serialisable");
            v["message"] = json!(message);
            print_json(&v);
        } else {
            if r.repaired {
                println!("note: an interrupted earlier change was repaired first");
            }
            println!("{message}");
            if let Some(why) = &r.resync_pending {
                println!(
                    "note: the change is in force; copying it into the standby generation \
                     failed ({why}); the next change repairs it"
                );
            }
        }
    }

    pub fn applied(&self, message: &str, a: &crate::api::Applied) {
        if self.json {
            let mut v = serde_json::to_value(a).expect("serialisable");
            v["message"] = json!(message);
            print_json(&v);
        } else {
            if a.unchanged {
                println!(
                    "{message} (nothing to change: no new version, {} stays)",
                    a.version
                );
                return;
            }
            let mut parts = vec![format!("version {}", a.version)];
            if a.reconcile.changes > 0
                || (a.reconcile.lb.is_none()
                    && a.reconcile.sock.is_none()
                    && a.reconcile.steer.is_none())
            {
                parts.push(format!("{} change(s) in the maps", a.reconcile.changes));
            }
            if let Some(r) = &a.reconcile.lb {
                parts.push(format!(
                    "{} table(s) rebuilt, {} backend slot(s) written, {} freed",
                    r.tables_rebuilt, r.backends_written, r.backends_freed
                ));
            }
            if let Some(r) = &a.reconcile.sock {
                parts.push(format!(
                    "{} workload(s) in force, {} cgroup link(s) made, {} removed",
                    r.workloads, r.linked, r.unlinked
                ));
            }
            if let Some(r) = &a.reconcile.steer {
                parts.push(format!(
                    "{} steer(s) in force, {} rule table entr{}{}",
                    r.steers,
                    r.entries,
                    if r.entries == 1 { "y" } else { "ies" },
                    match (r.linked, r.unlinked) {
                        (true, _) => ", sk_lookup linked",
                        (_, true) => ", sk_lookup unlinked",
                        _ => "",
                    }
                ));
            }
            println!("{message} ({})", parts.join(", "));
        }
    }

    pub fn explain(&self, e: &crate::engine::explain::Explanation) {
        if self.json {
            print_json(&serde_json::to_value(e).expect("an explanation serialises"));
            return;
        }
        println!(
            "packet:   {} ({} bytes) on {}",
            e.packet, e.frame_len, e.interface
        );
        let xdp = format!("XDP_{}", e.action.to_uppercase());
        println!(
            "verdict:  {} ({}), reason {} ({xdp})",
            e.verdict, e.stage, e.reason
        );
        println!("why:      {}", e.why);
        if let Some(n) = &e.note {
            println!("note:     {n}");
        }
    }

    pub fn upgrade(&self, r: &crate::dataplane::attach::UpgradeReport) {
        if !self.json {
            for f in &r.repaired {
                println!("repaired: {f}; pinned the program's own map again");
            }
            for f in &r.reloaded_for {
                println!("reloading every program with the pinned maps: {f}");
            }
        }
        if !self.json
            && let Some(sock) = &r.sock
        {
            println!(
                "socket programs: {} replaced on {} cgroup link(s); maps kept",
                sock.programs, sock.links
            );
            if r.old_program_id == 0 {
                return;
            }
        }
        if self.json {
            print_json(&serde_json::to_value(r).expect("serialisable"));
        } else if r.unchanged {
            println!(
                "program {} (tag {}) is this build's already; nothing to do",
                r.old_program_id, r.old_tag
            );
        } else {
            println!(
                "program {} (tag {}) replaced by {} (tag {}) on {} interface(s); maps kept",
                r.old_program_id, r.old_tag, r.new_program_id, r.new_tag, r.links
            );
        }
        if !self.json && !r.skipped.is_empty() {
            println!(
                "skipped (interface gone; detach them): {}",
                r.skipped.join(", ")
            );
        }
    }

    pub fn diff(&self, d: &crate::model::policy::PolicyDiff) {
        if self.json {
            print_json(&serde_json::to_value(d).expect("serialisable"));
        } else {
            print!("{d}");
        }
    }

    /// `export`: the config file's text, or the desired state as JSON.
    pub fn export(&self, desired: &crate::model::policy::Desired, header: &str) {
        if self.json {
            print_json(&serde_json::to_value(desired).expect("serialisable"));
        } else {
            print!("{}", crate::model::policy::export::to_toml(desired, header));
        }
    }

    pub fn checked(&self, cfg: &crate::model::policy::config::Config) {
        let p = &cfg.desired.policy;
        if self.json {
            print_json(&json!({
                "ok": true,
                "file": cfg.path,
                "interfaces": cfg.desired.interfaces.len(),
                "deny": p.deny.len(),
                "allow": p.allow.len(),
                "rules": p.rules.len(),
                "services": cfg.desired.services.len(),
                "backends": cfg.desired.services.iter().map(|s| s.spec.backends.len()).sum::<usize>(),
                "workloads": cfg.desired.workloads.len(),
                "steers": cfg.desired.steers.len(),
            }));
        } else {
            let services = match cfg.desired.services.len() {
                0 => String::new(),
                n => format!(
                    ", {n} service(s) with {} backend(s)",
                    cfg.desired
                        .services
                        .iter()
                        .map(|s| s.spec.backends.len())
                        .sum::<usize>()
                ),
            };
            let workloads = match (cfg.desired.workloads.len(), cfg.desired.steers.len()) {
                (0, 0) => String::new(),
                (n, 0) => format!(", {n} workload(s)"),
                (0, s) => format!(", {s} steer(s)"),
                (n, s) => format!(", {n} workload(s), {s} steer(s)"),
            };
            println!(
                "{}: ok ({} interface(s), {} deny, {} allow, {} rule(s), default {}, malformed {}{services}{workloads})",
                cfg.path.display(),
                cfg.desired.interfaces.len(),
                p.deny.len(),
                p.allow.len(),
                p.rules.len(),
                p.default,
                p.malformed
            );
        }
    }

    pub fn history(&self, h: &[crate::api::HistoryEntry]) {
        if self.json {
            print_json(&serde_json::to_value(h).expect("serialisable"));
            return;
        }
        // A SERVICES column once any kept version has services.
        let services = h.iter().any(|v| v.services > 0);
        let rows: Vec<Vec<String>> = h
            .iter()
            .map(|v| {
                let mut row = vec![
                    format!("{}{}", v.version, if v.current { "*" } else { "" }),
                    format_time(v.time),
                    v.author.clone(),
                    format!("{}/{}/{}", v.deny, v.allow, v.rules),
                ];
                if services {
                    row.push(v.services.to_string());
                }
                row.push(v.cause.clone());
                row
            })
            .collect();
        let mut head = vec!["VERSION", "TIME (UTC)", "AUTHOR", "DENY/ALLOW/RULES"];
        if services {
            head.push("SERVICES");
        }
        head.push("CAUSE");
        table(&head, &rows);
    }

    /// `history show N`.
    pub fn version(&self, v: &crate::api::VersionDetail) {
        if self.json {
            print_json(&serde_json::to_value(v).expect("serialisable"));
            return;
        }
        let e = &v.entry;
        println!(
            "version {}{}  {} UTC  {}{}",
            e.version,
            if e.current { " (current)" } else { "" },
            format_time(e.time),
            e.author,
            e.request
                .as_ref()
                .map(|r| format!("  request {r}"))
                .unwrap_or_default()
        );
        println!("cause:   {}", e.cause);
        println!(
            "policy:  {} deny, {} allow, {} rules, default {}, malformed {}",
            e.deny, e.allow, e.rules, e.default, e.malformed
        );
        for (changed, what) in [
            (
                v.temporary_changes > 0,
                format!("{} temporary deny entries changed", v.temporary_changes),
            ),
            (
                v.services_changed,
                "load-balanced services changed".to_string(),
            ),
            (v.interfaces_changed, "interfaces changed".to_string()),
        ] {
            if changed {
                println!("also:    {what}");
            }
        }
        print!("{}", v.diff);
    }

    pub fn status(&self, s: &Status) {
        if self.json {
            print_json(&serde_json::to_value(s).expect("serialisable"));
            return;
        }
        println!("pin root: {}", s.pin_root);
        for c in &s.cgroups {
            println!(
                "cgroup:   {} (id {}): {}",
                c.path.as_deref().unwrap_or("(cgroup gone)"),
                c.cgroup_id,
                c.hooks.join(" ")
            );
        }
        if let Some(l) = &s.socket_lb {
            println!(
                "sock lb:  {} (cgroup {}): {}; {} socket(s) remembered",
                if l.on { "on" } else { "linked, off" },
                l.cgroup.as_deref().unwrap_or("?"),
                l.hooks.join(" "),
                l.sockets
            );
        }
        if let Some(st) = &s.steer {
            println!(
                "steer:    sk_lookup on netns {} (inode {}): {} steer(s), {} with a socket",
                st.netns.as_deref().unwrap_or("?"),
                st.netns_ino,
                st.steers,
                st.sockets
            );
        }
        let Some(p) = &s.program else {
            if s.cgroups.is_empty() && s.steer.is_none() {
                println!("not attached anywhere");
            } else {
                println!("xdp:      not attached to any interface");
            }
            return;
        };
        if let Some(i) = &s.integrity {
            if i.is_ok() {
                println!(
                    "maps:     the pinned maps are the ones the {} live program(s) read ({} checked)",
                    i.programs.len(),
                    i.maps_checked
                );
            } else {
                println!(
                    "maps:     MISMATCH: what the pins hold is not what packets are judged by"
                );
                for f in &i.findings {
                    println!("          - {f}");
                }
                println!(
                    "          `sluice upgrade` pins the programs' own maps again (a running agent \
                     does this itself); policy not shown"
                );
                return;
            }
        }
        println!(
            "program:  {} id {} tag {} ({} bytes JITed{})",
            p.name,
            p.id,
            p.tag,
            p.jited_bytes,
            p.verified_insns
                .map(|n| format!(", {n} insns verified"))
                .unwrap_or_default()
        );
        if !s.programs.is_empty() {
            let each: Vec<String> = s
                .programs
                .iter()
                .map(|p| match p.verified_insns {
                    Some(n) => format!("{} ({n} insns verified)", p.name),
                    None => p.name.clone(),
                })
                .collect();
            println!("programs: {}", each.join(", "));
        }
        if p.bpf_stats_enabled {
            let avg = if p.run_count > 0 {
                p.run_time_ns as f64 / p.run_count as f64
            } else {
                0.0
            };
            println!(
                "runs:     {} packets, {} ns total, {avg:.1} ns/packet",
                p.run_count, p.run_time_ns
            );
        } else {
            println!("runs:     not counted (enable with `sysctl kernel.bpf_stats_enabled=1`)");
        }
        println!(
            "policy:   generation {}, default {}, malformed {}{}, {}/{} rules",
            s.generation.unwrap_or(0),
            s.default_action.as_deref().unwrap_or("?"),
            s.malformed_action.as_deref().unwrap_or("?"),
            if s.audit == Some(true) {
                ", AUDIT MODE (would-be drops are passed; malformed frames are still dropped)"
            } else {
                ""
            },
            s.rules.unwrap_or(0),
            s.rule_capacity
        );
        println!();
        let rows: Vec<Vec<String>> = s
            .attachments
            .iter()
            .map(|a| {
                vec![
                    a.interface.clone(),
                    a.netns.clone(),
                    a.mode.name().to_string(),
                    a.program_id.to_string(),
                    a.link_id.to_string(),
                    if a.ifindex == 0 {
                        "interface gone".into()
                    } else {
                        "attached".into()
                    },
                    a.tc.as_ref().map_or_else(|| "-".to_string(), tc_summary),
                ]
            })
            .collect();
        table(
            &[
                "INTERFACE",
                "NETNS",
                "MODE",
                "PROG",
                "LINK",
                "STATE",
                "TC EGRESS",
            ],
            &rows,
        );
        if s.syn_guard == Some(true) {
            for a in s
                .attachments
                .iter()
                .filter(|a| a.peer_native_xdp == Some(false))
            {
                println!(
                    "hint: {} is a veth whose peer runs no XDP program in native mode: the SYN \
                     guard's challenges (XDP_TX) are lost on the way, so no client can verify \
                     itself. Attach any XDP program that passes everything to the peer \
                     (docs/ddos.md).",
                    a.interface
                );
            }
        }
        println!();
        let rows: Vec<Vec<String>> = s
            .lists
            .iter()
            .map(|l| {
                vec![
                    l.list.to_string(),
                    l.family.to_string(),
                    l.entries.to_string(),
                    l.capacity.to_string(),
                ]
            })
            .collect();
        table(&["LIST", "FAMILY", "ENTRIES", "CAPACITY"], &rows);
        if !s.services.is_empty() {
            println!();
            let rows: Vec<Vec<String>> = s
                .services
                .iter()
                .map(|v| {
                    vec![
                        v.service.clone(),
                        v.mode.clone(),
                        v.backends.to_string(),
                        v.active.to_string(),
                        v.draining.to_string(),
                        v.down.to_string(),
                    ]
                })
                .collect();
            table(
                &["SERVICE", "MODE", "BACKENDS", "ACTIVE", "DRAINING", "DOWN"],
                &rows,
            );
        }
    }

    pub fn stats_reset(&self, r: &crate::dataplane::stats::ResetReport) {
        if self.json {
            print_json(&serde_json::to_value(r).expect("serialisable"));
            return;
        }
        println!(
            "counters reset at {} (classes, rules and {} list entr{}); the policy is unchanged",
            crate::api::time::rfc3339(r.reset_unix_ns),
            r.entries,
            if r.entries == 1 { "y" } else { "ies" }
        );
    }

    pub fn stats(&self, s: &Stats) {
        if self.json {
            print_json(&serde_json::to_value(s).expect("serialisable"));
            return;
        }
        let totals = |name: &str, t: &Totals| {
            vec![
                name.to_string(),
                t.packets.to_string(),
                human_bytes(t.bytes),
            ]
        };
        if let Some(t) = s.reset_unix_ns {
            println!(
                "counters since {} (stats --reset)",
                crate::api::time::rfc3339(t)
            );
        }
        println!(
            "total: {} packets, {}",
            s.total.packets,
            human_bytes(s.total.bytes)
        );
        println!();
        let rows: Vec<Vec<String>> = s.by_reason.iter().map(|(k, t)| totals(k, t)).collect();
        table(&["VERDICT/REASON", "PACKETS", "BYTES"], &rows);
        println!();
        let rows: Vec<Vec<String>> = s
            .by_family
            .iter()
            .map(|(k, t)| totals(&format!("family {k}"), t))
            .chain(
                s.by_protocol
                    .iter()
                    .map(|(k, t)| totals(&format!("protocol {k}"), t)),
            )
            .collect();
        table(&["FAMILY/PROTOCOL", "PACKETS", "BYTES"], &rows);
        if !s.top_entries.is_empty() {
            println!();
            let rows: Vec<Vec<String>> = s
                .top_entries
                .iter()
                .map(|e| {
                    vec![
                        e.list.to_string(),
                        e.entry.prefix.to_string(),
                        e.entry.packets.to_string(),
                        human_bytes(e.entry.bytes),
                        ago(e.entry.last_seen_ns),
                    ]
                })
                .collect();
            table(&["LIST", "PREFIX", "PACKETS", "BYTES", "LAST SEEN"], &rows);
        }
        if !s.top_rules.is_empty() {
            println!();
            let rows: Vec<Vec<String>> = s
                .top_rules
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.position.to_string(),
                        r.packets.to_string(),
                        human_bytes(r.bytes),
                    ]
                })
                .collect();
            table(&["RULE", "POS", "PACKETS", "BYTES"], &rows);
        }
    }

    pub fn list(&self, kind: &str, entries: &[crate::api::ListedEntry]) {
        if self.json {
            let v: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| {
                    let mut v = json!({
                        "prefix": e.prefix.to_string(),
                        "packets": e.packets,
                        "bytes": e.bytes,
                        "last_seen_secs_ago": e.last_seen_secs_ago,
                    });
                    if let Some(t) = &e.temporary {
                        v["reason"] = json!(t.reason);
                        v["expires_unix"] = json!(t.expires_unix);
                    }
                    v
                })
                .collect();
            print_json(&json!({ "list": kind, "entries": v }));
            return;
        }
        if entries.is_empty() {
            println!("{kind} list is empty");
            return;
        }
        let temporary = entries.iter().any(|e| e.temporary.is_some());
        let now = crate::api::time::unix_now();
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                let mut row = vec![
                    e.prefix.to_string(),
                    e.packets.to_string(),
                    human_bytes(e.bytes),
                    ago(e.last_seen_ns),
                ];
                if temporary {
                    match &e.temporary {
                        Some(t) => {
                            row.push(format!(
                                "in {}",
                                crate::model::policy::format_duration_ms(
                                    t.expires_unix.saturating_sub(now) * 1000
                                )
                            ));
                            row.push(t.reason.clone());
                        }
                        None => {
                            row.push("never".into());
                            row.push(String::new());
                        }
                    }
                }
                row
            })
            .collect();
        if temporary {
            table(
                &[
                    "PREFIX",
                    "PACKETS",
                    "BYTES",
                    "LAST SEEN",
                    "EXPIRES",
                    "REASON",
                ],
                &rows,
            );
        } else {
            table(&["PREFIX", "PACKETS", "BYTES", "LAST SEEN"], &rows);
        }
    }

    pub fn rules(&self, rules: &[RuleRow]) {
        if self.json {
            let v: Vec<serde_json::Value> = rules
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "position": r.position,
                        "rule": r.rule.to_string(),
                        "action": r.rule.action.name(),
                        "audit": r.rule.audit,
                        "proto": r.rule.proto,
                        "dport": r.rule.dport.map(|(lo, hi)| json!([lo, hi])),
                        "sport": r.rule.sport.map(|(lo, hi)| json!([lo, hi])),
                        "tcp_flags": r.rule.tcp_flags.map(|t| json!({ "set": t.set, "mask": t.mask })),
                        "src": r.rule.src.map(|n| n.to_string()),
                        "dst": r.rule.dst.map(|n| n.to_string()),
                        "packets": r.packets,
                        "bytes": r.bytes,
                    })
                })
                .collect();
            print_json(&json!({ "rules": v }));
            return;
        }
        if rules.is_empty() {
            println!("no rules");
            return;
        }
        let rows: Vec<Vec<String>> = rules
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    r.position.to_string(),
                    r.rule.to_string(),
                    r.packets.to_string(),
                    human_bytes(r.bytes),
                ]
            })
            .collect();
        table(&["ID", "POS", "RULE", "PACKETS", "BYTES"], &rows);
    }

    pub fn steers(&self, v: &crate::engine::steer::SteerView) {
        if self.json {
            print_json(&serde_json::to_value(v).expect("serialisable"));
            return;
        }
        if v.steers.is_empty() {
            println!("no steers");
            return;
        }
        match v.netns_ino {
            Some(ino) => println!(
                "sk_lookup linked to network namespace {} (inode {ino})\n",
                v.netns.as_deref().unwrap_or("?")
            ),
            None => println!("sk_lookup NOT LINKED (steers are not in force)\n"),
        }
        let count = |s: &crate::engine::steer::SteerState, n: &str| {
            s.counters.get(n).copied().unwrap_or(0).to_string()
        };
        let rows: Vec<Vec<String>> = v
            .steers
            .iter()
            .map(|s| {
                let prefixes: Vec<String> =
                    s.steer.prefixes.iter().map(ToString::to_string).collect();
                vec![
                    s.steer.name.clone(),
                    s.steer.proto.name().to_string(),
                    prefixes.join(","),
                    s.steer.ports.to_string(),
                    match (s.slot, s.socket) {
                        (None, _) => "not in force".to_string(),
                        (Some(_), Some(c)) => format!("cookie {c}"),
                        (Some(_), None) => format!("none ({})", s.steer.on_missing.name()),
                    },
                    count(s, "steered"),
                    count(s, "no_socket"),
                    count(s, "incompatible"),
                ]
            })
            .collect();
        table(
            &[
                "STEER",
                "PROTO",
                "PREFIXES",
                "PORTS",
                "SOCKET",
                "STEERED",
                "NO SOCKET",
                "INCOMPATIBLE",
            ],
            &rows,
        );
        if v.flows_lost > 0 {
            println!("{} flow records lost to a full ring", v.flows_lost);
        }
    }

    pub fn steer_registered(&self, r: &crate::engine::steer::Registered) {
        if self.json {
            print_json(&serde_json::to_value(r).expect("serialisable"));
            return;
        }
        println!(
            "steer {}: socket fd {} of process {} ({}, cookie {}) registered{}",
            r.steer,
            r.fd,
            r.pid,
            r.local.as_deref().unwrap_or("unbound"),
            r.cookie,
            if r.replaced {
                ", replacing the previous one"
            } else {
                ""
            }
        );
    }

    pub fn steer_unregistered(&self, name: &str, had: bool) {
        if self.json {
            print_json(&json!({ "steer": name, "unregistered": had }));
            return;
        }
        if had {
            println!(
                "steer {name}: socket let go (its traffic is refused until one is registered, unless on_missing is pass)"
            );
        } else {
            println!("steer {name} had no socket");
        }
    }

    pub fn workloads(&self, v: &[crate::engine::sock::WorkloadState]) {
        if self.json {
            print_json(&serde_json::to_value(v).expect("serialisable"));
            return;
        }
        if v.is_empty() {
            println!("no workloads");
            return;
        }
        for (i, w) in v.iter().enumerate() {
            if i > 0 {
                println!();
            }
            let wl = &w.workload;
            let state = match (&w.problem, w.attached) {
                (Some(p), _) => format!("NOT IN FORCE: {p}"),
                (None, true) => format!("attached ({})", w.hooks.join(" ")),
                (None, false) if w.hooks.is_empty() => "NOT ATTACHED".to_string(),
                (None, false) => format!("PARTLY ATTACHED ({})", w.hooks.join(" ")),
            };
            println!(
                "{}  cgroup {}  id {}  {state}{}",
                wl.name,
                w.path,
                w.cgroup_id.map_or("-".to_string(), |i| i.to_string()),
                if wl.audit { "  AUDIT MODE" } else { "" }
            );
            println!("  connect (default {}):", wl.connect_default);
            for (n, r) in wl.connect.iter().enumerate() {
                println!("    {:>2}  {r}", n + 1);
            }
            println!("  bind (default {}):", wl.bind_default);
            for (n, r) in wl.bind.iter().enumerate() {
                println!("    {:>2}  {r}", n + 1);
            }
            if w.counts.is_empty() {
                println!("  calls: none judged yet");
            } else {
                let each: Vec<String> = w
                    .counts
                    .iter()
                    .map(|c| format!("{} {} by {} {}", c.hook, c.verdict, c.reason, c.calls))
                    .collect();
                println!("  calls: {}", each.join(", "));
            }
        }
    }

    pub fn lb(&self, v: &crate::engine::lb_view::LbView) {
        if self.json {
            print_json(&serde_json::to_value(v).expect("serialisable"));
            return;
        }
        if v.services.is_empty() {
            println!("no services");
            return;
        }
        let table_size = f64::from(sluice_common::lb::TABLE_SIZE);
        let sl = &v.socket;
        if sl.on {
            let count = |name: &str| {
                sl.events
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, c)| *c)
            };
            println!(
                "socket LB: on (cgroup {}): {} connect, {} sendmsg, {} no backend; {} of {} sockets remembered{}\n",
                sl.cgroup.as_deref().unwrap_or("?"),
                count("connect"),
                count("sendmsg"),
                count("no_backend"),
                sl.sockets,
                sl.capacity,
                match count("state_full") {
                    0 => String::new(),
                    n => format!(", {n} not remembered (full)"),
                }
            );
        } else {
            println!("socket LB: off (local clients reach services through the packet LB)\n");
        }
        for (i, s) in v.services.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!(
                "{} {}{}  packets {}  bytes {}  connections {}{}",
                s.service,
                s.mode,
                if s.socket { "" } else { " (socket LB off)" },
                s.packets,
                human_bytes(s.bytes),
                s.connections,
                s.health_check
                    .as_ref()
                    .map(|h| format!("  health: {h}"))
                    .unwrap_or_default()
            );
            if s.backends.is_empty() {
                println!("  no backends: packets to it are dropped (reason no-backend)");
                continue;
            }
            let rows: Vec<Vec<String>> = s
                .backends
                .iter()
                .map(|b| {
                    vec![
                        format!("  {}", b.backend),
                        b.weight.to_string(),
                        b.state.clone(),
                        match &b.health_error {
                            Some(e) => format!("{} ({e})", b.health),
                            None => b.health.clone(),
                        },
                        format!("{:.1}%", b.table_slots as f64 * 100.0 / table_size),
                        b.packets.to_string(),
                        human_bytes(b.bytes),
                        b.connections.to_string(),
                        b.active.to_string(),
                        b.sockets.to_string(),
                    ]
                })
                .collect();
            table(
                &[
                    "  BACKEND",
                    "WEIGHT",
                    "STATE",
                    "HEALTH",
                    "TABLE",
                    "PACKETS",
                    "BYTES",
                    "CONNS",
                    "ACTIVE",
                    "SOCKETS",
                ],
                &rows,
            );
        }
    }

    pub fn lb_applied(&self, message: &str, r: &crate::engine::lb::ApplyReport) {
        if self.json {
            let mut v = serde_json::to_value(r).expect("serialisable");
            v["message"] = json!(message);
            print_json(&v);
        } else {
            println!(
                "{message} ({} table(s) rebuilt, {} backend slot(s) written, {} freed)",
                r.tables_rebuilt, r.backends_written, r.backends_freed
            );
        }
    }
}

/// "tcx", or "clsact pref 20942 handle 0x51ce (fallback: ...)", and
/// "not live" when the kernel no longer has it.
fn tc_summary(tc: &crate::dataplane::tc::TcStatus) -> String {
    let mut out = tc.mode.name().to_string();
    if let (Some(p), Some(h)) = (tc.priority, tc.handle) {
        out.push_str(&format!(" pref {p} handle {h:#x}"));
    }
    if let Some(why) = &tc.fallback {
        out.push_str(&format!(" (fallback: {why})"));
    }
    if !tc.live {
        out.push_str(", not live");
    }
    out
}
