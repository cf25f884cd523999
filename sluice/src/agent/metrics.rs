//! The Prometheus endpoint (off unless `[agent] metrics` is set): every
//! dataplane counter with its reason label, list and map occupancy against
//! capacity, and the agent's own apply/drift/build figures. Dataplane values
//! are read from the maps at scrape time.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::core::{AgentMetrics, Core};
use crate::dataplane::{PolicyMaps, attach};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// Renders the exposition text for one scrape.
pub fn render(core: &Core, m: &AgentMetrics) -> String {
    let mut r = Registry::default();
    let build: Family<Labels, Gauge> = Family::default();
    build
        .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
        .set(1);
    r.register("sluice_build_info", "sluice build; always 1", build);
    gauge(
        &mut r,
        "sluice_agent_policy_version",
        "Applied policy version",
        i64::try_from(core.state.current_version()).unwrap_or(i64::MAX),
    );
    gauge(
        &mut r,
        "sluice_agent_runtime_changes",
        "Runtime changes kept on top of the last applied file",
        core.state.overlay.len() as i64,
    );
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    r.register(
        "sluice_agent_applies",
        "Changes applied",
        counter(core.applies),
    );
    r.register(
        "sluice_agent_apply_failures",
        "Changes refused or failed (nothing changed)",
        counter(core.apply_failures),
    );
    r.register(
        "sluice_agent_drift_corrections",
        "Times the pins differed from desired state and were corrected",
        counter(core.drift_corrections),
    );
    r.register(
        "sluice_agent_integrity_repairs",
        "Map pins that did not lead to the map the attached program reads, pinned again (each one \
         meant writes through the pin changed nothing packets see)",
        counter(core.integrity_repairs),
    );
    gauge(
        &mut r,
        "sluice_agent_integrity_problems",
        "Maps the live programs disagree about after the last check (0 when all is well)",
        core.integrity_problems as i64,
    );
    let (snapshot, journal) = core.store_sizes();
    gauge(
        &mut r,
        "sluice_agent_store_bytes",
        "Bytes of the state snapshot plus the journal of changes since",
        i64::try_from(snapshot + journal).unwrap_or(i64::MAX),
    );
    r.register(
        "sluice_agent_apply_duration_seconds",
        "Time to apply a change (kernel and store)",
        m.apply_seconds.clone(),
    );
    r.register(
        "sluice_agent_escalations",
        "Sources denied for a while because they stayed over a per-source limit",
        m.escalations.clone(),
    );
    r.register(
        "sluice_agent_deny_expirations",
        "Temporary deny entries removed when their time was up",
        m.expirations.clone(),
    );
    gauge(
        &mut r,
        "sluice_agent_temporary_denies",
        "Deny entries that expire (escalated sources, deny add --ttl)",
        core.desired.temp_deny.len() as i64,
    );

    let up = match attach::status(&core.root) {
        Ok(st) => {
            gauge(
                &mut r,
                "sluice_attachments",
                "Interfaces the XDP program is attached to",
                st.attachments.len() as i64,
            );
            if let Some(p) = &st.program {
                r.register(
                    "sluice_program_runs",
                    "XDP program runs (counted while kernel.bpf_stats_enabled=1)",
                    counter(p.run_count),
                );
                r.register(
                    "sluice_program_run_time_seconds",
                    "XDP program run time (counted while kernel.bpf_stats_enabled=1)",
                    {
                        let c: Counter<f64> = Counter::default();
                        c.inc_by(p.run_time_ns as f64 / 1e9);
                        c
                    },
                );
            }
            let entries: Family<Labels, Gauge> = Family::default();
            let capacity: Family<Labels, Gauge> = Family::default();
            for l in &st.lists {
                let lb = labels(&[("list", &l.list), ("family", &l.family)]);
                entries.get_or_create(&lb).set(i64::from(l.entries));
                capacity.get_or_create(&lb).set(i64::from(l.capacity));
            }
            if let Some(n) = st.rules {
                let lb = labels(&[("list", "rules"), ("family", "any")]);
                entries.get_or_create(&lb).set(i64::from(n));
                capacity.get_or_create(&lb).set(i64::from(st.rule_capacity));
            }
            r.register(
                "sluice_map_entries",
                "Entries in each policy table (lists per family, rules)",
                entries,
            );
            r.register(
                "sluice_map_capacity",
                "Capacity of each policy table; a full table refuses changes",
                capacity,
            );
            true
        }
        Err(_) => false,
    };
    gauge(
        &mut r,
        "sluice_dataplane_up",
        "1 when the pinned dataplane could be read",
        i64::from(up),
    );

    if let Ok(maps) = PolicyMaps::open(&core.root) {
        if let Ok(slots) = maps.counters() {
            let packets: Family<Labels, Counter> = Family::default();
            let bytes: Family<Labels, Counter> = Family::default();
            for (f, l, v, reason, c) in crate::dataplane::stats::nonzero(&slots) {
                let lb = labels(&[
                    ("family", f.name()),
                    ("protocol", l.name()),
                    ("verdict", v.name()),
                    ("reason", reason.name()),
                ]);
                packets.get_or_create(&lb).inc_by(c.packets);
                bytes.get_or_create(&lb).inc_by(c.bytes);
            }
            r.register(
                "sluice_packets",
                "Packets judged by the XDP program",
                packets,
            );
            r.register("sluice_bytes", "Bytes judged by the XDP program", bytes);
        }
        if let Ok(rules) = maps.rules() {
            let packets: Family<Labels, Counter> = Family::default();
            for row in rules {
                let spec = crate::model::policy::RuleSpec::from_rule(&row.rule).to_string();
                packets
                    .get_or_create(&labels(&[
                        ("id", &row.rule.id.to_string()),
                        ("rule", &spec),
                    ]))
                    .inc_by(row.packets);
            }
            r.register("sluice_rule_packets", "Packets each rule matched", packets);
        }
    }
    flow_metrics(&mut r, core, m);
    lb_metrics(&mut r, core);
    sock_metrics(&mut r, core);
    steer_metrics(&mut r, core);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Per workload: socket calls judged by hook, verdict and reason, and
/// whether every socket program is linked to its cgroup.
fn sock_metrics(r: &mut Registry, core: &Core) {
    if core.desired.workloads.is_empty() {
        return;
    }
    let decisions: Family<Labels, Counter> = Family::default();
    let attached: Family<Labels, Gauge> = Family::default();
    for w in core.workloads_view() {
        let name = w.workload.name.as_str();
        attached
            .get_or_create(&labels(&[("workload", name)]))
            .set(i64::from(w.attached));
        for c in &w.counts {
            decisions
                .get_or_create(&labels(&[
                    ("workload", name),
                    ("hook", &c.hook),
                    ("verdict", &c.verdict),
                    ("reason", &c.reason),
                ]))
                .inc_by(c.calls);
        }
    }
    r.register(
        "sluice_sock_decisions",
        "Socket calls (connect, sendmsg, bind) judged per workload",
        decisions,
    );
    r.register(
        "sluice_workload_attached",
        "1 when every socket program is linked to the workload's cgroup",
        attached,
    );
    let lost: Counter = Counter::default();
    lost.inc_by(crate::dataplane::sock::events_lost(&core.root));
    r.register(
        "sluice_sock_records_lost",
        "Socket records (denied or audited calls) lost because their ring was full",
        lost,
    );
}

/// Per steer: lookups by outcome, and whether a socket is registered.
fn steer_metrics(r: &mut Registry, core: &Core) {
    if core.desired.steers.is_empty() {
        return;
    }
    let events: Family<Labels, Counter> = Family::default();
    let socket: Family<Labels, Gauge> = Family::default();
    let view = core.steer_view();
    for s in &view.steers {
        let name = s.steer.name.as_str();
        socket
            .get_or_create(&labels(&[("steer", name)]))
            .set(i64::from(s.socket.is_some()));
        for (event, n) in &s.counters {
            events
                .get_or_create(&labels(&[("steer", name), ("event", event)]))
                .inc_by(*n);
        }
    }
    r.register(
        "sluice_steer_lookups",
        "sk_lookup lookups of steered traffic per steer, by outcome (steered, no_socket, incompatible, other_program)",
        events,
    );
    r.register(
        "sluice_steer_socket",
        "1 while a socket is registered for the steer",
        socket,
    );
    let lost: Counter = Counter::default();
    lost.inc_by(view.flows_lost);
    r.register(
        "sluice_steer_records_lost",
        "Steering flow records lost because their ring was full",
        lost,
    );
}

/// Per service and backend: packets, bytes, connections, active
/// connections, weight and health; and the LB event counters.
fn lb_metrics(r: &mut Registry, core: &Core) {
    if core.desired.services.is_empty() {
        return;
    }
    let Ok(view) = core.lb_view(true) else {
        return;
    };
    let svc_packets: Family<Labels, Counter> = Family::default();
    let svc_bytes: Family<Labels, Counter> = Family::default();
    let svc_conns: Family<Labels, Counter> = Family::default();
    let be_packets: Family<Labels, Counter> = Family::default();
    let be_bytes: Family<Labels, Counter> = Family::default();
    let be_conns: Family<Labels, Counter> = Family::default();
    let be_active: Family<Labels, Gauge> = Family::default();
    let be_up: Family<Labels, Gauge> = Family::default();
    let be_weight: Family<Labels, Gauge> = Family::default();
    let be_sockets: Family<Labels, Counter> = Family::default();
    for s in &view.services {
        let sl = labels(&[("service", &s.service), ("mode", &s.mode)]);
        svc_packets.get_or_create(&sl).inc_by(s.packets);
        svc_bytes.get_or_create(&sl).inc_by(s.bytes);
        svc_conns.get_or_create(&sl).inc_by(s.connections);
        for b in &s.backends {
            let bl = labels(&[("service", &s.service), ("backend", &b.backend)]);
            be_packets.get_or_create(&bl).inc_by(b.packets);
            be_bytes.get_or_create(&bl).inc_by(b.bytes);
            be_conns.get_or_create(&bl).inc_by(b.connections);
            be_sockets.get_or_create(&bl).inc_by(b.sockets);
            be_active
                .get_or_create(&bl)
                .set(i64::try_from(b.active).unwrap_or(i64::MAX));
            be_up.get_or_create(&bl).set(i64::from(b.health != "down"));
            be_weight.get_or_create(&bl).set(if b.state == "active" {
                i64::from(b.weight)
            } else {
                0
            });
        }
    }
    r.register(
        "sluice_lb_service_packets",
        "Packets balanced per service",
        svc_packets,
    );
    r.register(
        "sluice_lb_service_bytes",
        "Bytes balanced per service",
        svc_bytes,
    );
    r.register(
        "sluice_lb_service_connections",
        "Connections balanced per service",
        svc_conns,
    );
    r.register(
        "sluice_lb_backend_packets",
        "Packets sent to each backend",
        be_packets,
    );
    r.register(
        "sluice_lb_backend_bytes",
        "Bytes sent to each backend",
        be_bytes,
    );
    r.register(
        "sluice_lb_backend_connections",
        "Connections balanced to each backend",
        be_conns,
    );
    r.register(
        "sluice_lb_backend_active_connections",
        "Open connections in the connection table per backend",
        be_active,
    );
    r.register(
        "sluice_lb_backend_up",
        "1 unless health checks found the backend down",
        be_up,
    );
    r.register(
        "sluice_lb_backend_weight",
        "Weight in the Maglev table (0 while draining or down)",
        be_weight,
    );
    let events: Family<Labels, Counter> = Family::default();
    for (name, v) in &view.events {
        events.get_or_create(&labels(&[("event", name)])).inc_by(*v);
    }
    r.register(
        "sluice_lb_events",
        "Load balancer events (connection table, forwarding paths)",
        events,
    );
    r.register(
        "sluice_lb_backend_sockets",
        "Local sockets the socket LB gave each backend",
        be_sockets,
    );
    let on: Gauge = Gauge::default();
    on.set(i64::from(view.socket.on));
    r.register(
        "sluice_sock_lb_on",
        "1 while the socket LB is linked and on (local clients balanced at connect())",
        on,
    );
    let sock_events: Family<Labels, Counter> = Family::default();
    for (name, v) in &view.socket.events {
        sock_events
            .get_or_create(&labels(&[("event", name)]))
            .inc_by(*v);
    }
    r.register(
        "sluice_sock_lb_events",
        "Socket LB events (connect, sendmsg, no_backend, state_full, skipped, reversed, family_mismatch)",
        sock_events,
    );
    let remembered: Gauge = Gauge::default();
    remembered.set(i64::try_from(view.socket.sockets).unwrap_or(i64::MAX));
    r.register(
        "sluice_sock_lb_sockets",
        "Translated sockets the socket LB remembers now (capacity 262144)",
        remembered,
    );
}

/// The flow reader's figures and every `STATS` event counter.
fn flow_metrics(r: &mut Registry, core: &Core, m: &AgentMetrics) {
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    let events = if core.root.is_set_up() {
        crate::dataplane::runtime::named_stats(&core.root).ok()
    } else {
        None
    };
    if let Some(events) = &events {
        let family: Family<Labels, Counter> = Family::default();
        for (name, v) in events {
            family.get_or_create(&labels(&[("event", name)])).inc_by(*v);
        }
        r.register(
            "sluice_events",
            "Dataplane events that are not verdicts (per-source buckets, SYN challenges, \
             escalations, flow records, captures), by event",
            family,
        );
    }
    let Some(flows) = &m.flows else { return };
    let c = flows.counters();
    r.register(
        "sluice_flow_records_read",
        "Flow records the agent read from the ring",
        counter(c.records_read),
    );
    if let Some(events) = &events {
        let value = |index: u32| {
            let name = sluice_common::stat::NAMES[index as usize];
            events
                .iter()
                .find(|(e, _)| *e == name)
                .map_or(0, |(_, v)| *v)
        };
        let lost: Family<Labels, Counter> = Family::default();
        for (cause, index) in [
            ("ring-full", sluice_common::stat::FLOWS_LOST_RING),
            ("rate-cap", sluice_common::stat::FLOWS_LOST_CAP),
        ] {
            lost.get_or_create(&labels(&[("cause", cause)]))
                .inc_by(value(index));
        }
        r.register(
            "sluice_flow_records_lost",
            "Flow records the kernel could not write: ring full (reader too slow or away) \
             or over the per-CPU rate cap",
            lost,
        );
    }
    gauge(
        r,
        "sluice_flows_tracked",
        "Flows the agent keeps totals for",
        i64::try_from(c.flows_tracked).unwrap_or(i64::MAX),
    );
    r.register(
        "sluice_flow_evictions",
        "Flows dropped from the table (least recently seen) to make room",
        counter(c.evictions),
    );
    r.register(
        "sluice_flow_follower_lost",
        "Flow records followers lost by falling behind",
        counter(c.follower_lost),
    );
}

/// Serves GET /metrics on `addr` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    core: Arc<Mutex<Core>>,
    m: AgentMetrics,
) -> std::io::Result<()> {
    use axum::{Router, http::header, response::IntoResponse, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let core = core.clone();
            let m = m.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || {
                    let c = core
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    render(&c, &m)
                })
                .await
                .unwrap_or_default();
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app).await
}
