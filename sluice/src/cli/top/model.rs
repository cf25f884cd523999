//! `sluice top`'s model: what one refresh reads from the agent, and what a
//! frame shows (rates from two readings, top lists, occupancy). Pure functions.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::Serialize;
use sluice_common::{Reason, Verdict};

use crate::{
    api::{
        EventsBody,
        flows::{FlowStats, TopAddr, TopReport},
    },
    dataplane::{Status, stats::Stats},
    engine::lb_view::LbView,
};

/// What to rank the top sources and destinations by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Packets,
    Bytes,
}

impl By {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Packets => "packets",
            Self::Bytes => "bytes",
        }
    }
}

/// What one refresh read from the agent.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the counters were read, on a monotonic clock from any fixed
    /// origin: rates divide by differences of it.
    pub at: Duration,
    /// The same moment as Unix nanoseconds (shown, never subtracted).
    pub unix_ns: u64,
    pub stats: Stats,
    pub status: Status,
    /// `None`: the agent keeps no flow records (an agent without them).
    pub top: Option<TopReport>,
    /// How many sources and destinations `top` was asked for: a list
    /// shorter than this holds every address the agent knows.
    pub top_limit: usize,
    pub flow_stats: Option<FlowStats>,
    /// `None`: the agent does not serve its event counters.
    pub events: Option<EventsBody>,
    /// The load balancer's services and events (`None`: not served).
    pub lb: Option<LbView>,
}

/// A load-balanced service, or one of its backends, with rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbTraffic {
    pub service: String,
    /// `None` on the service's own row.
    pub backend: Option<String>,
    /// The service's mode (`nat`, `dsr`, `vxlan`), or the backend's state
    /// (`active`, `draining`, `down`).
    pub state: String,
    pub pps: Option<f64>,
    pub bps: Option<f64>,
    /// New connections per second.
    pub cps: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// Packets and bytes of one row, with their rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Traffic {
    pub name: String,
    /// Packets per second; `None` until there are two readings.
    pub pps: Option<f64>,
    /// Bits per second.
    pub bps: Option<f64>,
    /// Totals since the counters started.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReasonTraffic {
    pub verdict: String,
    pub reason: String,
    pub pps: Option<f64>,
    pub bps: Option<f64>,
    pub packets: u64,
    pub bytes: u64,
}

/// A top source or destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Talker {
    pub addr: IpAddr,
    /// Totals over the flows the agent holds for it (estimates where sampled).
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
    /// From the change since the last reading; `None` when it cannot be
    /// told (first reading, or it was past the previous list's end).
    pub pps: Option<f64>,
    pub bps: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Occupancy {
    /// `deny ipv4`, `allow ipv6`, ..., `rules`.
    pub table: String,
    pub entries: u64,
    pub capacity: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecords {
    /// The agent holds the kernel's ring.
    pub reading: bool,
    pub records_read: u64,
    pub records_read_per_sec: Option<f64>,
    /// Lost in the kernel: the ring was full, or a CPU was over the rate cap.
    pub lost_ring_full: u64,
    pub lost_rate_cap: u64,
    pub lost_per_sec: Option<f64>,
    pub flows_tracked: usize,
    pub flow_capacity: usize,
    pub evictions: u64,
    /// One record per this many packets, by verdict (pass, drop, audit;
    /// 0 = none): top sources, destinations and flows are estimated from
    /// the records times these.
    pub sample_pass: u32,
    pub sample_drop: u32,
    pub sample_audit: u32,
}

/// One event counter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub name: String,
    pub total: u64,
    pub per_sec: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentEvents {
    pub escalated_sources: u64,
    pub deny_expirations: u64,
    pub temporary_denies: usize,
}

/// One frame of `sluice top` (also its `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// When the counters were read (UTC).
    pub time: String,
    /// Seconds between the two readings the rates come from; `None` for the
    /// first reading.
    pub interval_secs: Option<f64>,
    /// The counters went down since the last reading (the dataplane was
    /// made anew): the rates count from zero.
    pub counters_reset: bool,
    pub total: Traffic,
    /// pass, drop, audit: always all three, in that order.
    pub verdicts: Vec<Traffic>,
    /// Every verdict and reason that counted a packet, verdicts in the order
    /// above and reasons in the kernel's order.
    pub reasons: Vec<ReasonTraffic>,
    /// What the top lists are ranked by: `packets` or `bytes`.
    pub top_by: String,
    /// `None` when the agent keeps no flow records.
    pub sources: Option<Vec<Talker>>,
    pub destinations: Option<Vec<Talker>>,
    pub occupancy: Vec<Occupancy>,
    pub flow_records: Option<FlowRecords>,
    /// The dataplane's event counters, in the kernel's order.
    pub events: Vec<Event>,
    pub agent_events: Option<AgentEvents>,
    /// Each service, then its backends: traffic towards the backends
    /// (`None`: the agent does not serve the LB view).
    pub services: Option<Vec<LbTraffic>>,
    /// The LB's events with rates, both directions: requests sent on (`tx`,
    /// `redirect`, `to_stack`), replies translated back to the VIP at TC
    /// egress (`reverse_nat`), drops (`no_neighbour`, ...).
    pub lb_events: Vec<Event>,
}

/// The services' and backends' rows, with rates against `prev`.
fn lb_rows(prev: Option<&LbView>, cur: &LbView, secs: Option<f64>) -> Vec<LbTraffic> {
    let mut rows = Vec::new();
    let rate = |before: Option<u64>, now: u64, scale: u64| {
        secs.zip(before)
            .map(|(s, b)| per_sec(delta(b, now) * scale, s))
    };
    for s in &cur.services {
        let ps = prev.and_then(|p| p.services.iter().find(|x| x.service == s.service));
        rows.push(LbTraffic {
            service: s.service.clone(),
            backend: None,
            state: s.mode.clone(),
            pps: rate(ps.map(|p| p.packets), s.packets, 1),
            bps: rate(ps.map(|p| p.bytes), s.bytes, 8),
            cps: rate(ps.map(|p| p.connections), s.connections, 1),
            packets: s.packets,
            bytes: s.bytes,
            connections: s.connections,
        });
        for b in &s.backends {
            let pb = ps.and_then(|p| p.backends.iter().find(|x| x.backend == b.backend));
            rows.push(LbTraffic {
                service: s.service.clone(),
                backend: Some(b.backend.clone()),
                state: b.state.clone(),
                pps: rate(pb.map(|p| p.packets), b.packets, 1),
                bps: rate(pb.map(|p| p.bytes), b.bytes, 8),
                cps: rate(pb.map(|p| p.connections), b.connections, 1),
                packets: b.packets,
                bytes: b.bytes,
                connections: b.connections,
            });
        }
    }
    rows
}

fn lb_events(prev: Option<&LbView>, cur: &LbView, secs: Option<f64>) -> Vec<Event> {
    cur.events
        .iter()
        .map(|(name, total)| Event {
            name: name.clone(),
            total: *total,
            per_sec: secs.zip(prev).map(|(s, p)| {
                let before = p
                    .events
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, v)| *v);
                per_sec(delta(before, *total), s)
            }),
        })
        .collect()
}

/// The change of a counter, counting from zero if it went down (a reset).
#[must_use]
pub fn delta(prev: u64, cur: u64) -> u64 {
    if cur >= prev { cur - prev } else { cur }
}

fn per_sec(d: u64, secs: f64) -> f64 {
    d as f64 / secs
}

/// Rates of one row: `None` without an earlier reading.
struct Rater {
    secs: Option<f64>,
    /// Every counter restarted: deltas are the current values.
    reset: bool,
}

impl Rater {
    fn rates(
        &self,
        prev: Option<(u64, u64)>,
        packets: u64,
        bytes: u64,
    ) -> (Option<f64>, Option<f64>) {
        let Some(secs) = self.secs else {
            return (None, None);
        };
        let (pp, pb) = if self.reset {
            (0, 0)
        } else {
            prev.unwrap_or((0, 0))
        };
        (
            Some(per_sec(delta(pp, packets), secs)),
            Some(per_sec(delta(pb, bytes) * 8, secs)),
        )
    }

    fn per_sec(&self, prev: Option<u64>, cur: u64) -> Option<f64> {
        let secs = self.secs?;
        let p = if self.reset { 0 } else { prev.unwrap_or(0) };
        Some(per_sec(delta(p, cur), secs))
    }
}

fn totals_of(m: &BTreeMap<String, crate::dataplane::stats::Totals>, key: &str) -> (u64, u64) {
    m.get(key).map_or((0, 0), |t| (t.packets, t.bytes))
}

/// Orders talkers as the agent does: by the ranking value, then the other,
/// both descending, then by address.
pub fn rank(talkers: &mut [Talker], by: By) {
    let key = |t: &Talker| match by {
        By::Packets => (t.packets, t.bytes),
        By::Bytes => (t.bytes, t.packets),
    };
    talkers.sort_by(|a, b| key(b).cmp(&key(a)).then(a.addr.cmp(&b.addr)));
}

/// The top `show` talkers of `cur`, with rates from `prev` (the same list
/// one reading earlier) where they can be told.
fn talkers(
    cur: &[TopAddr],
    prev: Option<(&[TopAddr], usize)>,
    secs: Option<f64>,
    by: By,
    show: usize,
) -> Vec<Talker> {
    let mut out: Vec<Talker> = cur
        .iter()
        .map(|a| {
            let before = match (prev, secs) {
                (Some((list, limit)), Some(_)) => match list.iter().find(|p| p.addr == a.addr) {
                    Some(p) => Some((p.packets, p.bytes)),
                    // The previous list held every address: this one is new.
                    None if list.len() < limit => Some((0, 0)),
                    None => None,
                },
                _ => None,
            };
            // Totals that went down lost flows to eviction: no rate to tell.
            let before = before.filter(|(p, b)| *p <= a.packets && *b <= a.bytes);
            let (pps, bps) = match (before, secs) {
                (Some((p, b)), Some(s)) => (
                    Some(per_sec(a.packets - p, s)),
                    Some(per_sec((a.bytes - b) * 8, s)),
                ),
                _ => (None, None),
            };
            Talker {
                addr: a.addr,
                packets: a.packets,
                bytes: a.bytes,
                flows: a.flows,
                pps,
                bps,
            }
        })
        .collect();
    rank(&mut out, by);
    out.truncate(show);
    out
}

fn occupancy(status: &Status) -> Vec<Occupancy> {
    let row = |table: String, entries: u64, capacity: u64| Occupancy {
        table,
        entries,
        capacity,
        percent: if capacity == 0 {
            0.0
        } else {
            entries as f64 * 100.0 / capacity as f64
        },
    };
    let mut out: Vec<Occupancy> = status
        .lists
        .iter()
        .map(|l| {
            row(
                format!("{} {}", l.list, l.family),
                u64::from(l.entries),
                u64::from(l.capacity),
            )
        })
        .collect();
    if let Some(rules) = status.rules {
        out.push(row(
            "rules".into(),
            u64::from(rules),
            u64::from(status.rule_capacity),
        ));
    }
    out
}

/// The frame for reading `cur`, with rates against `prev` (the reading
/// before it, if any); top lists cut to `show` rows.
#[must_use]
pub fn compute(prev: Option<&Sample>, cur: &Sample, by: By, show: usize) -> Snapshot {
    let secs = prev
        .map(|p| cur.at.saturating_sub(p.at).as_secs_f64())
        .filter(|s| *s > 0.0);
    let prev = prev.filter(|_| secs.is_some());
    let reset = prev.is_some_and(|p| {
        cur.stats.total.packets < p.stats.total.packets
            || cur.stats.total.bytes < p.stats.total.bytes
    });
    let r = Rater { secs, reset };

    let traffic = |name: &str, before: Option<(u64, u64)>, now: (u64, u64)| {
        let (pps, bps) = r.rates(before, now.0, now.1);
        Traffic {
            name: name.to_string(),
            pps,
            bps,
            packets: now.0,
            bytes: now.1,
        }
    };
    let total = traffic(
        "total",
        prev.map(|p| (p.stats.total.packets, p.stats.total.bytes)),
        (cur.stats.total.packets, cur.stats.total.bytes),
    );
    let verdicts = Verdict::ALL
        .iter()
        .map(|v| {
            traffic(
                v.name(),
                prev.map(|p| totals_of(&p.stats.by_verdict, v.name())),
                totals_of(&cur.stats.by_verdict, v.name()),
            )
        })
        .collect();
    let mut reasons = Vec::new();
    for v in Verdict::ALL {
        for reason in Reason::ALL {
            let key = format!("{}/{}", v.name(), reason.name());
            let (packets, bytes) = totals_of(&cur.stats.by_reason, &key);
            if packets == 0 {
                continue;
            }
            let (pps, bps) = r.rates(
                prev.map(|p| totals_of(&p.stats.by_reason, &key)),
                packets,
                bytes,
            );
            reasons.push(ReasonTraffic {
                verdict: v.name().to_string(),
                reason: reason.name().to_string(),
                pps,
                bps,
                packets,
                bytes,
            });
        }
    }

    let prev_top = prev.and_then(|p| p.top.as_ref().map(|t| (t, p.top_limit)));
    let list = |pick: fn(&TopReport) -> &Vec<TopAddr>| {
        cur.top.as_ref().map(|t| {
            talkers(
                pick(t),
                prev_top.map(|(p, limit)| (pick(p).as_slice(), limit)),
                secs,
                by,
                show,
            )
        })
    };
    let sources = list(|t| &t.sources);
    let destinations = list(|t| &t.destinations);

    let flow_records = cur.flow_stats.as_ref().map(|f| {
        let before = prev.and_then(|p| p.flow_stats.as_ref());
        // The agent's own count restarts with the agent, not with the
        // dataplane: it has its own reset.
        let read_rate = secs.map(|s| {
            per_sec(
                delta(before.map_or(0, |b| b.records_read), f.records_read),
                s,
            )
        });
        let lost = f.lost_ring_full + f.lost_rate_cap;
        FlowRecords {
            reading: f.reading,
            records_read: f.records_read,
            records_read_per_sec: read_rate.filter(|_| before.is_some()),
            lost_ring_full: f.lost_ring_full,
            lost_rate_cap: f.lost_rate_cap,
            lost_per_sec: r
                .per_sec(before.map(|b| b.lost_ring_full + b.lost_rate_cap), lost)
                .filter(|_| before.is_some()),
            flows_tracked: f.flows_tracked,
            flow_capacity: f.flow_capacity,
            evictions: f.evictions,
            sample_pass: f.settings.sample_pass,
            sample_drop: f.settings.sample_drop,
            sample_audit: f.settings.sample_audit,
        }
    });

    let events = cur.events.as_ref().map_or_else(Vec::new, |e| {
        let before = prev.and_then(|p| p.events.as_ref());
        let ordered = sluice_common::stat::NAMES
            .iter()
            .filter(|n| !n.is_empty())
            .filter_map(|n| e.dataplane.get(*n).map(|v| ((*n).to_string(), *v)));
        // Names this build does not know come last, in name order.
        let others = e
            .dataplane
            .iter()
            .filter(|(n, _)| !sluice_common::stat::NAMES.contains(&n.as_str()))
            .map(|(n, v)| (n.clone(), *v));
        ordered
            .chain(others)
            .map(|(name, total)| Event {
                per_sec: before.and_then(|b| {
                    // Each event counter resets with the dataplane.
                    secs.map(|s| {
                        per_sec(
                            delta(b.dataplane.get(&name).copied().unwrap_or(0), total),
                            s,
                        )
                    })
                }),
                name,
                total,
            })
            .collect()
    });
    let agent_events = cur.events.as_ref().map(|e| AgentEvents {
        escalated_sources: e.escalated_sources,
        deny_expirations: e.deny_expirations,
        temporary_denies: e.temporary_denies,
    });

    Snapshot {
        time: crate::api::time::rfc3339(cur.unix_ns),
        interval_secs: secs,
        counters_reset: reset,
        total,
        verdicts,
        reasons,
        top_by: by.name().to_string(),
        sources,
        destinations,
        occupancy: occupancy(&cur.status),
        flow_records,
        events,
        agent_events,
        services: cur
            .lb
            .as_ref()
            .map(|l| lb_rows(prev.and_then(|p| p.lb.as_ref()), l, secs)),
        lb_events: cur.lb.as_ref().map_or_else(Vec::new, |l| {
            lb_events(prev.and_then(|p| p.lb.as_ref()), l, secs)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::stats::Totals;

    fn totals(packets: u64, bytes: u64) -> Totals {
        Totals { packets, bytes }
    }

    /// Counters: `(verdict/reason, packets, bytes)`.
    fn stats(rows: &[(&str, u64, u64)]) -> Stats {
        let mut s = Stats::default();
        for (key, p, b) in rows {
            let verdict = key.split('/').next().unwrap();
            s.total.packets += p;
            s.total.bytes += b;
            let v = s.by_verdict.entry(verdict.to_string()).or_default();
            v.packets += p;
            v.bytes += b;
            s.by_reason.insert((*key).to_string(), totals(*p, *b));
        }
        s
    }

    fn status() -> Status {
        Status {
            pin_root: "/sys/fs/bpf/sluice-test".into(),
            attachments: Vec::new(),
            program: None,
            generation: Some(1),
            default_action: Some("pass".into()),
            malformed_action: Some("drop".into()),
            audit: Some(false),
            rules: Some(64),
            rule_capacity: 256,
            syn_guard: Some(false),
            lists: vec![crate::dataplane::attach::ListStatus {
                list: "deny".into(),
                family: "ipv4".into(),
                entries: 3,
                capacity: 1_048_576,
            }],
            services: Vec::new(),
            integrity: None,
            programs: Vec::new(),
            cgroups: Vec::new(),
            socket_lb: None,
            steer: None,
        }
    }

    fn addr(s: &str, packets: u64, bytes: u64) -> TopAddr {
        TopAddr {
            addr: s.parse().unwrap(),
            packets,
            bytes,
            flows: 1,
        }
    }

    fn report(sources: Vec<TopAddr>) -> TopReport {
        TopReport {
            by: "packets".into(),
            flows_tracked: sources.len(),
            flow_capacity: 65_536,
            flows: Vec::new(),
            destinations: vec![addr("198.18.1.2", 1, 1)],
            sources,
        }
    }

    fn events(pairs: &[(&str, u64)]) -> EventsBody {
        EventsBody {
            dataplane: pairs.iter().map(|(n, v)| ((*n).to_string(), *v)).collect(),
            escalated_sources: 2,
            deny_expirations: 1,
            temporary_denies: 1,
        }
    }

    fn sample(secs: u64, st: Stats) -> Sample {
        Sample {
            at: Duration::from_secs(secs),
            unix_ns: 1_700_000_000_000_000_000 + secs * 1_000_000_000,
            stats: st,
            status: status(),
            top: None,
            top_limit: 10,
            flow_stats: None,
            events: None,
            lb: None,
        }
    }

    fn verdict<'a>(s: &'a Snapshot, name: &str) -> &'a Traffic {
        s.verdicts.iter().find(|v| v.name == name).unwrap()
    }

    fn lb(packets: u64, conns: u64, reverse: u64) -> LbView {
        use crate::engine::lb_view::{BackendRow, ServiceRow};
        LbView {
            services: vec![ServiceRow {
                service: "198.19.0.10:80/tcp".into(),
                mode: "nat".into(),
                health_check: None,
                packets,
                bytes: packets * 100,
                connections: conns,
                socket: false,
                backends: vec![BackendRow {
                    backend: "198.18.11.2:8080".into(),
                    weight: 1,
                    state: "active".into(),
                    health: "unchecked".into(),
                    health_error: None,
                    table_slots: 65537,
                    packets,
                    bytes: packets * 100,
                    connections: conns,
                    active: 0,
                    sockets: 0,
                }],
            }],
            events: vec![("reverse_nat".into(), reverse)],
            ..LbView::default()
        }
    }

    #[test]
    fn services_and_backends_get_rates_and_replies_their_own() {
        let mut a = sample(10, stats(&[]));
        a.lb = Some(lb(100, 10, 80));
        let mut b = sample(12, stats(&[]));
        b.lb = Some(lb(300, 30, 280));
        let first = compute(None, &a, By::Packets, 10);
        let rows = first.services.as_ref().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].pps, None, "no rates from one reading");
        let s = compute(Some(&a), &b, By::Packets, 10);
        let rows = s.services.as_ref().unwrap();
        assert_eq!(rows[0].backend, None);
        assert_eq!(rows[1].backend.as_deref(), Some("198.18.11.2:8080"));
        assert_eq!(rows[1].pps, Some(100.0));
        assert_eq!(rows[1].bps, Some(100.0 * 100.0 * 8.0));
        assert_eq!(rows[1].cps, Some(10.0));
        let replies = s
            .lb_events
            .iter()
            .find(|e| e.name == "reverse_nat")
            .unwrap();
        assert_eq!(replies.per_sec, Some(100.0));
        // An agent without the LB view: no services at all.
        let none = compute(None, &sample(1, stats(&[])), By::Packets, 10);
        assert!(none.services.is_none() && none.lb_events.is_empty());
    }

    #[test]
    fn first_reading_has_totals_but_no_rates() {
        let s = compute(
            None,
            &sample(0, stats(&[("drop/deny-list", 10, 1000)])),
            By::Packets,
            5,
        );
        assert_eq!(s.interval_secs, None);
        assert_eq!(s.total.packets, 10);
        assert_eq!(s.total.pps, None);
        assert_eq!(verdict(&s, "drop").packets, 10);
        assert_eq!(s.reasons.len(), 1);
        assert_eq!(s.reasons[0].pps, None);
        assert!(!s.counters_reset);
    }

    #[test]
    fn rates_come_from_the_change_over_the_interval() {
        let a = sample(
            10,
            stats(&[("drop/deny-list", 100, 10_000), ("pass/default", 50, 5_000)]),
        );
        let b = sample(
            12,
            stats(&[("drop/deny-list", 300, 30_000), ("pass/default", 50, 5_000)]),
        );
        let s = compute(Some(&a), &b, By::Packets, 5);
        assert_eq!(s.interval_secs, Some(2.0));
        assert_eq!(verdict(&s, "drop").pps, Some(100.0));
        // 20,000 bytes in 2 s = 80,000 bit/s.
        assert_eq!(verdict(&s, "drop").bps, Some(80_000.0));
        assert_eq!(verdict(&s, "pass").pps, Some(0.0));
        assert_eq!(verdict(&s, "audit").pps, Some(0.0));
        assert_eq!(s.total.pps, Some(100.0));
        let deny = s
            .reasons
            .iter()
            .find(|r| r.verdict == "drop" && r.reason == "deny-list")
            .unwrap();
        assert_eq!(deny.pps, Some(100.0));
        assert_eq!(deny.packets, 300);
        // Verdicts in order pass, drop, audit; reasons within them in the kernel's order.
        let order: Vec<_> = s.verdicts.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(order, ["pass", "drop", "audit"]);
        let order: Vec<_> = s
            .reasons
            .iter()
            .map(|r| format!("{}/{}", r.verdict, r.reason))
            .collect();
        assert_eq!(order, ["pass/default", "drop/deny-list"]);
    }

    #[test]
    fn a_reason_that_appears_counts_from_zero() {
        let a = sample(0, stats(&[("pass/default", 5, 500)]));
        let b = sample(1, stats(&[("pass/default", 5, 500), ("drop/rule", 7, 700)]));
        let s = compute(Some(&a), &b, By::Packets, 5);
        let rule = s.reasons.iter().find(|r| r.reason == "rule").unwrap();
        assert_eq!(rule.pps, Some(7.0));
    }

    #[test]
    fn counters_that_went_down_were_reset() {
        let a = sample(
            0,
            stats(&[
                ("drop/deny-list", 1000, 100_000),
                ("pass/default", 10, 1000),
            ]),
        );
        // The dataplane was made anew: every counter restarted and grew again.
        let b = sample(
            1,
            stats(&[("drop/deny-list", 40, 4000), ("pass/default", 20, 2000)]),
        );
        let s = compute(Some(&a), &b, By::Packets, 5);
        assert!(s.counters_reset);
        assert_eq!(verdict(&s, "drop").pps, Some(40.0));
        // pass/default went up, but counted from zero after the reset too.
        assert_eq!(verdict(&s, "pass").pps, Some(20.0));
        assert_eq!(s.total.pps, Some(60.0));
        assert_eq!(delta(1000, 40), 40);
        assert_eq!(delta(40, 1000), 960);
    }

    #[test]
    fn same_moment_gives_no_rates() {
        let a = sample(3, stats(&[("pass/default", 5, 500)]));
        let s = compute(Some(&a), &a, By::Packets, 5);
        assert_eq!(s.interval_secs, None);
        assert_eq!(s.total.pps, None);
    }

    #[test]
    fn top_lists_are_ranked_and_cut() {
        let mut a = sample(0, stats(&[]));
        a.top = Some(report(vec![
            addr("198.18.1.1", 100, 10_000),
            addr("198.18.1.3", 10, 99_000),
        ]));
        a.top_limit = 3;
        let mut b = sample(1, stats(&[]));
        // Out of order on purpose; a tie on packets is broken by bytes, then address.
        b.top = Some(report(vec![
            addr("198.18.1.3", 20, 100_000),
            addr("198.18.1.1", 150, 15_000),
            addr("198.18.1.9", 150, 15_000),
            addr("198.18.1.5", 150, 20_000),
        ]));
        b.top_limit = 3;
        let s = compute(Some(&a), &b, By::Packets, 3);
        let src = s.sources.as_ref().unwrap();
        let order: Vec<String> = src.iter().map(|t| t.addr.to_string()).collect();
        assert_eq!(order, ["198.18.1.5", "198.18.1.1", "198.18.1.9"]);
        // .1 was in the previous list: its rate is the change.
        assert_eq!(src[1].pps, Some(50.0));
        assert_eq!(src[1].bps, Some(40_000.0));
        // The previous list was not full (2 < 3): addresses not in it are new.
        assert_eq!(src[0].pps, Some(150.0));
        let by_bytes = compute(Some(&a), &b, By::Bytes, 2);
        let order: Vec<String> = by_bytes
            .sources
            .unwrap()
            .iter()
            .map(|t| t.addr.to_string())
            .collect();
        assert_eq!(order, ["198.18.1.3", "198.18.1.5"]);
        assert_eq!(by_bytes.top_by, "bytes");
    }

    #[test]
    fn talkers_past_a_full_previous_list_have_no_rate() {
        let mut a = sample(0, stats(&[]));
        a.top = Some(report(vec![addr("198.18.1.1", 100, 10_000)]));
        a.top_limit = 1;
        let mut b = sample(1, stats(&[]));
        b.top = Some(report(vec![
            addr("198.18.1.1", 100, 10_000),
            addr("198.18.1.2", 90, 10_000),
        ]));
        let s = compute(Some(&a), &b, By::Packets, 5);
        let src = s.sources.unwrap();
        assert_eq!(src[0].pps, Some(0.0));
        assert_eq!(
            src[1].pps, None,
            "it may have been there, just not in the top 1"
        );
        // Totals that went down (flows evicted): no rate either.
        let mut c = sample(2, stats(&[]));
        c.top = Some(report(vec![addr("198.18.1.1", 60, 6_000)]));
        let s = compute(Some(&b), &c, By::Packets, 5);
        assert_eq!(s.sources.unwrap()[0].pps, None);
    }

    #[test]
    fn no_flow_records_means_no_top_lists() {
        let s = compute(None, &sample(0, stats(&[])), By::Packets, 5);
        assert!(s.sources.is_none() && s.destinations.is_none());
        assert!(s.flow_records.is_none());
    }

    #[test]
    fn occupancy_lists_and_rules() {
        let s = compute(None, &sample(0, stats(&[])), By::Packets, 5);
        assert_eq!(s.occupancy.len(), 2);
        assert_eq!(s.occupancy[0].table, "deny ipv4");
        assert_eq!(s.occupancy[0].entries, 3);
        assert_eq!(s.occupancy[1].table, "rules");
        assert!((s.occupancy[1].percent - 25.0).abs() < 1e-9);
    }

    #[test]
    fn events_in_kernel_order_with_rates() {
        let mut a = sample(0, stats(&[]));
        a.events = Some(events(&[
            ("syn_challenges", 10),
            ("flow_records_lost_ring_full", 4),
        ]));
        let mut b = sample(2, stats(&[]));
        b.events = Some(events(&[
            ("flow_records_lost_ring_full", 8),
            ("syn_challenges", 30),
            ("zz_new_counter", 1),
        ]));
        let s = compute(Some(&a), &b, By::Packets, 5);
        let names: Vec<_> = s.events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "syn_challenges",
                "flow_records_lost_ring_full",
                "zz_new_counter"
            ]
        );
        assert_eq!(s.events[0].per_sec, Some(10.0));
        assert_eq!(s.events[1].per_sec, Some(2.0));
        assert_eq!(s.agent_events.unwrap().escalated_sources, 2);
    }
}
