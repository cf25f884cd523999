//! Drawing a `sluice top` frame: on the terminal with ratatui, or as a plain
//! text block (not a terminal, `--once`).

use std::fmt::Write as _;

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph, Row, Table},
};

use super::model::{Snapshot, Talker};

/// Packets (or events) per second: `-` when unknown.
#[must_use]
pub fn rate(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) => si(v, ""),
    }
}

/// Bits per second.
#[must_use]
pub fn bits(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) => format!("{}b/s", si(v, " ")),
    }
}

/// `999.0`, `1.2k`, `3.4M`, ... with `sep` between number and prefix.
fn si(v: f64, sep: &str) -> String {
    const PREFIX: [&str; 5] = ["k", "M", "G", "T", "P"];
    if v < 1000.0 {
        return format!("{v:.1}{sep}");
    }
    let mut v = v;
    let mut i = 0;
    while v >= 1000.0 && i < PREFIX.len() {
        v /= 1000.0;
        i += 1;
    }
    format!("{v:.1}{sep}{}", PREFIX[i - 1])
}

#[must_use]
pub fn bytes(b: u64) -> String {
    crate::cli::output::human_bytes(b)
}

/// Rows with columns padded to their widest cell, one string per line.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    for l in crate::cli::output::table_lines(header, rows) {
        out.push_str(&l);
        out.push('\n');
    }
}

fn traffic_rows(s: &Snapshot) -> Vec<Vec<String>> {
    std::iter::once(&s.total)
        .chain(&s.verdicts)
        .map(|t| {
            vec![
                t.name.clone(),
                rate(t.pps),
                bits(t.bps),
                t.packets.to_string(),
                bytes(t.bytes),
            ]
        })
        .collect()
}

fn reason_rows(s: &Snapshot) -> Vec<Vec<String>> {
    s.reasons
        .iter()
        .map(|r| {
            vec![
                r.verdict.clone(),
                r.reason.clone(),
                rate(r.pps),
                bits(r.bps),
                r.packets.to_string(),
                bytes(r.bytes),
            ]
        })
        .collect()
}

fn talker_rows(list: &[Talker]) -> Vec<Vec<String>> {
    list.iter()
        .map(|t| {
            vec![
                t.addr.to_string(),
                rate(t.pps),
                bits(t.bps),
                t.packets.to_string(),
                bytes(t.bytes),
                t.flows.to_string(),
            ]
        })
        .collect()
}

/// Each service, then its backends (indented), with rates.
fn service_rows(list: &[super::model::LbTraffic]) -> Vec<Vec<String>> {
    list.iter()
        .map(|t| {
            vec![
                match &t.backend {
                    None => t.service.clone(),
                    Some(b) => format!("  {b}"),
                },
                t.state.clone(),
                rate(t.pps),
                bits(t.bps),
                rate(t.cps),
                t.packets.to_string(),
                bytes(t.bytes),
                t.connections.to_string(),
            ]
        })
        .collect()
}

const SERVICE_HEADER: [&str; 8] = [
    "SERVICE / BACKEND",
    "STATE",
    "PPS",
    "BIT/S",
    "CONN/S",
    "PACKETS",
    "BYTES",
    "CONNS",
];

/// The LB in both directions: requests sent on to backends (XDP_TX,
/// redirect, the stack) and replies translated back to the VIP (TC
/// egress), with the drops that have a name.
fn lb_line(s: &Snapshot) -> Option<String> {
    if s.lb_events.is_empty() {
        return None;
    }
    let ev = |n: &str| {
        s.lb_events
            .iter()
            .find(|e| e.name == n)
            .map_or_else(|| "-".to_string(), |e| rate(e.per_sec))
    };
    Some(format!(
        "to backends: tx {}/s, redirect {}/s, to stack {}/s; replies back to clients (reverse NAT): {}/s; \
         dropped: no neighbour {}/s, egress not attached {}/s",
        ev("tx"),
        ev("redirect"),
        ev("to_stack"),
        ev("reverse_nat"),
        ev("no_neighbour"),
        ev("egress_not_attached"),
    ))
}

fn occupancy_rows(s: &Snapshot) -> Vec<Vec<String>> {
    s.occupancy
        .iter()
        .map(|o| {
            vec![
                o.table.clone(),
                o.entries.to_string(),
                o.capacity.to_string(),
                format!("{:.1}%", o.percent),
            ]
        })
        .collect()
}

fn event_rows(s: &Snapshot) -> Vec<Vec<String>> {
    s.events
        .iter()
        .map(|e| vec![e.name.clone(), e.total.to_string(), rate(e.per_sec)])
        .collect()
}

/// The flow-record line: how many were read, lost, tracked.
fn flow_line(s: &Snapshot) -> String {
    match &s.flow_records {
        None => "this agent keeps no flow records".into(),
        Some(f) => format!(
            "read {} ({}/s){}, lost {} (ring full {}, rate cap {}; {}/s), flows tracked {} of {}, evicted {}; \
             sampled {} (top's sources, destinations and flows are estimated from these)",
            f.records_read,
            rate(f.records_read_per_sec),
            if f.reading { "" } else { ", not reading" },
            f.lost_ring_full + f.lost_rate_cap,
            f.lost_ring_full,
            f.lost_rate_cap,
            rate(f.lost_per_sec),
            f.flows_tracked,
            f.flow_capacity,
            f.evictions,
            sampling(f)
        ),
    }
}

/// "pass 1 in 100, drop 1 in 1, audit none".
fn sampling(f: &super::model::FlowRecords) -> String {
    [
        ("pass", f.sample_pass),
        ("drop", f.sample_drop),
        ("audit", f.sample_audit),
    ]
    .iter()
    .map(|(v, n)| match n {
        0 => format!("{v} none"),
        n => format!("{v} 1 in {n}"),
    })
    .collect::<Vec<_>>()
    .join(", ")
}

fn agent_line(s: &Snapshot) -> Option<String> {
    s.agent_events.as_ref().map(|a| {
        format!(
            "escalated sources {}, deny expirations {}, temporary denies {}",
            a.escalated_sources, a.deny_expirations, a.temporary_denies
        )
    })
}

fn rates_over(s: &Snapshot) -> String {
    match s.interval_secs {
        Some(secs) => format!("rates over {secs:.2} s"),
        None => "no rates yet".into(),
    }
}

/// One frame as text: a timestamped block ending with an empty line.
#[must_use]
pub fn plain(s: &Snapshot, header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "=== sluice top {} ({}) ===", s.time, rates_over(s));
    let _ = writeln!(out, "{header}");
    if s.counters_reset {
        let _ = writeln!(
            out,
            "(the counters went down since the last reading: the dataplane was made anew; rates count from zero)"
        );
    }
    out.push('\n');
    table(
        &mut out,
        &["TRAFFIC", "PPS", "BIT/S", "PACKETS", "BYTES"],
        &traffic_rows(s),
    );
    out.push('\n');
    if s.reasons.is_empty() {
        let _ = writeln!(out, "no packets counted yet");
    } else {
        table(
            &mut out,
            &["VERDICT", "REASON", "PPS", "BIT/S", "PACKETS", "BYTES"],
            &reason_rows(s),
        );
    }
    for (title, list) in [
        ("TOP SOURCES", &s.sources),
        ("TOP DESTINATIONS", &s.destinations),
    ] {
        out.push('\n');
        let head = format!("{title} (by {})", s.top_by);
        match list {
            None => {
                let _ = writeln!(out, "{head}: this agent keeps no flow records");
            }
            Some(l) if l.is_empty() => {
                let _ = writeln!(out, "{head}: no flow records yet");
            }
            Some(l) => table(
                &mut out,
                &[&head, "PPS", "BIT/S", "PACKETS", "BYTES", "FLOWS"],
                &talker_rows(l),
            ),
        }
    }
    if let Some(services) = s.services.as_ref().filter(|l| !l.is_empty()) {
        out.push('\n');
        table(&mut out, &SERVICE_HEADER, &service_rows(services));
        if let Some(l) = lb_line(s) {
            let _ = writeln!(out, "lb: {l}");
        }
    }
    out.push('\n');
    table(
        &mut out,
        &["TABLE", "ENTRIES", "CAPACITY", "USED"],
        &occupancy_rows(s),
    );
    out.push('\n');
    let _ = writeln!(out, "flow records: {}", flow_line(s));
    if !s.events.is_empty() {
        out.push('\n');
        table(&mut out, &["EVENT", "TOTAL", "PER SEC"], &event_rows(s));
    }
    if let Some(a) = agent_line(s) {
        let _ = writeln!(out, "agent: {a}");
    }
    out.push('\n');
    out
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn tui_table<'a>(
    title: &'a str,
    header: &[&'a str],
    rows: Vec<Vec<String>>,
    widths: &[Constraint],
) -> Table<'a> {
    Table::new(rows.into_iter().map(Row::new), widths.to_vec())
        .header(Row::new(header.to_vec()).style(bold()))
        .block(Block::bordered().title(title))
}

/// Rows a bordered table with a header takes for `n` rows.
fn table_height(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX).saturating_add(3)
}

/// Draws the whole screen: `header` on top, then `error` (the last refresh
/// failed) or the frame, or a wait note before the first reading.
pub fn draw(f: &mut Frame, s: Option<&Snapshot>, header: &str, error: Option<&str>) {
    let [top, status, body] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(f.area());
    let title = match s {
        Some(s) => format!("sluice top  {}  {}", s.time, rates_over(s)),
        None => "sluice top".into(),
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(title, bold()),
            Span::styled("  (q: quit)", Style::default().fg(Color::DarkGray)),
        ])),
        top,
    );
    let note = match (error, s) {
        (Some(e), _) => Span::styled(format!("error: {e}"), Style::default().fg(Color::Red)),
        (None, Some(s)) if s.counters_reset => Span::styled(
            "the counters went down: the dataplane was made anew; rates count from zero",
            Style::default().fg(Color::Yellow),
        ),
        _ => Span::raw(header.to_string()),
    };
    f.render_widget(Paragraph::new(Line::from(note)), status);
    match s {
        Some(s) => draw_frame(f, s, body),
        None => f.render_widget(Paragraph::new("waiting for the first reading..."), body),
    }
}

fn draw_frame(f: &mut Frame, s: &Snapshot, area: Rect) {
    let mut traffic = traffic_rows(s);
    for r in reason_rows(s) {
        let mut r = r.into_iter();
        let what = format!(
            "  {} {}",
            r.next().unwrap_or_default(),
            r.next().unwrap_or_default()
        );
        traffic.push(std::iter::once(what).chain(r).collect());
    }
    let mut events = event_rows(s);
    if let Some(a) = &s.agent_events {
        for (name, v) in [
            ("agent: escalated sources", a.escalated_sources),
            ("agent: deny expirations", a.deny_expirations),
            ("agent: temporary denies", a.temporary_denies as u64),
        ] {
            events.push(vec![name.to_string(), v.to_string(), "-".into()]);
        }
    }
    let upper = table_height(traffic.len().max(events.len()));
    let talkers = table_height(
        [&s.sources, &s.destinations]
            .iter()
            .map(|l| l.as_ref().map_or(0, Vec::len))
            .max()
            .unwrap_or(0)
            .max(1),
    );
    let lower = table_height(s.occupancy.len()).max(5);
    let services = s.services.as_ref().filter(|l| !l.is_empty());
    // The services' table and the LB line, when there are services.
    // At most a third of the screen; what does not fit is summed up in a
    // last row.
    let lb = services.map_or(0, |l| {
        table_height(l.len()).min((area.height / 3).max(5)) + 1
    });
    let [upper_area, talkers_area, lb_area, lower_area, _] = Layout::vertical([
        Constraint::Length(upper),
        Constraint::Length(talkers),
        Constraint::Length(lb),
        Constraint::Length(lower),
        Constraint::Min(0),
    ])
    .areas(area);
    if let Some(list) = services {
        let [table_area, line_area] =
            Layout::vertical([Constraint::Min(0), Constraint::Length(1)]).areas(lb_area);
        let fit = usize::from(table_area.height.saturating_sub(3));
        let mut rows = service_rows(list);
        if rows.len() > fit && fit > 0 {
            let more = rows.len() - (fit - 1);
            rows.truncate(fit - 1);
            rows.push(vec![format!("... {more} more rows (sluice lb list)")]);
        }
        f.render_widget(
            tui_table(
                "Load balancer (towards the backends)",
                &SERVICE_HEADER,
                rows,
                &[
                    Constraint::Min(22),
                    Constraint::Length(8),
                    Constraint::Length(7),
                    Constraint::Length(10),
                    Constraint::Length(7),
                    Constraint::Length(10),
                    Constraint::Length(9),
                    Constraint::Length(8),
                ],
            ),
            table_area,
        );
        if let Some(l) = lb_line(s) {
            f.render_widget(Paragraph::new(l), line_area);
        }
    }

    let [traffic_area, events_area] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .areas(upper_area);
    f.render_widget(
        tui_table(
            "Traffic by verdict and reason",
            &["", "PPS", "BIT/S", "PACKETS", "BYTES"],
            traffic,
            &[
                Constraint::Min(16),
                Constraint::Length(7),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(9),
            ],
        ),
        traffic_area,
    );
    f.render_widget(
        tui_table(
            "Events",
            &["EVENT", "TOTAL", "PER SEC"],
            events,
            &[
                Constraint::Min(20),
                Constraint::Length(10),
                Constraint::Length(8),
            ],
        ),
        events_area,
    );

    let [src_area, dst_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .areas(talkers_area);
    // Sized for `999.9k`, `999.9 kb/s`, `99999999`, `999.9 KiB`; the
    // address takes the rest.
    let talker_widths = [
        Constraint::Min(15),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(5),
    ];
    for (title, list, area) in [
        ("Top sources", &s.sources, src_area),
        ("Top destinations", &s.destinations, dst_area),
    ] {
        let title = format!("{title} (by {})", s.top_by);
        match list {
            Some(l) if !l.is_empty() => f.render_widget(
                tui_table(
                    "",
                    &["ADDRESS", "PPS", "BIT/S", "PACKETS", "BYTES", "FLOWS"],
                    talker_rows(l),
                    &talker_widths,
                )
                .block(Block::bordered().title(title)),
                area,
            ),
            other => {
                let why = if other.is_some() {
                    "no flow records yet"
                } else {
                    "this agent keeps no flow records"
                };
                f.render_widget(
                    Paragraph::new(why).block(Block::bordered().title(title)),
                    area,
                );
            }
        }
    }

    let [maps_area, flows_area] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)])
            .areas(lower_area);
    f.render_widget(
        tui_table(
            "Maps",
            &["TABLE", "ENTRIES", "CAPACITY", "USED"],
            occupancy_rows(s),
            &[
                Constraint::Min(10),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(6),
            ],
        ),
        maps_area,
    );
    f.render_widget(
        Paragraph::new(flow_line(s))
            .wrap(ratatui::widgets::Wrap { trim: true })
            .block(Block::bordered().title("Flow records")),
        flows_area,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::cli::top::model::{
        AgentEvents, Event, FlowRecords, LbTraffic, Occupancy, ReasonTraffic, Traffic,
    };

    fn traffic(name: &str, pps: f64, packets: u64) -> Traffic {
        Traffic {
            name: name.into(),
            pps: Some(pps),
            bps: Some(pps * 800.0),
            packets,
            bytes: packets * 100,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            time: "2026-05-01T10:00:00.000000Z".into(),
            interval_secs: Some(1.0),
            counters_reset: false,
            total: traffic("total", 150.0, 3000),
            verdicts: vec![
                traffic("pass", 50.0, 1000),
                traffic("drop", 100.0, 2000),
                traffic("audit", 0.0, 0),
            ],
            reasons: vec![ReasonTraffic {
                verdict: "drop".into(),
                reason: "deny-list".into(),
                pps: Some(100.0),
                bps: Some(80_000.0),
                packets: 2000,
                bytes: 200_000,
            }],
            top_by: "packets".into(),
            sources: Some(vec![Talker {
                addr: "198.18.7.1".parse().unwrap(),
                packets: 2000,
                bytes: 200_000,
                flows: 3,
                pps: Some(100.0),
                bps: Some(80_000.0),
            }]),
            destinations: Some(Vec::new()),
            occupancy: vec![Occupancy {
                table: "deny ipv4".into(),
                entries: 1,
                capacity: 1_048_576,
                percent: 0.0,
            }],
            flow_records: Some(FlowRecords {
                reading: true,
                records_read: 2000,
                records_read_per_sec: Some(100.0),
                lost_ring_full: 7,
                lost_rate_cap: 0,
                lost_per_sec: Some(0.0),
                flows_tracked: 3,
                flow_capacity: 65_536,
                evictions: 0,
                sample_pass: 100,
                sample_drop: 1,
                sample_audit: 0,
            }),
            events: vec![Event {
                name: "syn_challenges".into(),
                total: 42,
                per_sec: Some(2.0),
            }],
            agent_events: Some(AgentEvents {
                escalated_sources: 1,
                deny_expirations: 0,
                temporary_denies: 1,
            }),
            services: Some(vec![
                LbTraffic {
                    service: "198.19.0.10:80/tcp".into(),
                    backend: None,
                    state: "nat".into(),
                    pps: Some(30.0),
                    bps: Some(24_000.0),
                    cps: Some(3.0),
                    packets: 300,
                    bytes: 30_000,
                    connections: 30,
                },
                LbTraffic {
                    service: "198.19.0.10:80/tcp".into(),
                    backend: Some("198.18.11.2:8080".into()),
                    state: "draining".into(),
                    pps: Some(30.0),
                    bps: Some(24_000.0),
                    cps: Some(3.0),
                    packets: 300,
                    bytes: 30_000,
                    connections: 30,
                },
            ]),
            lb_events: vec![
                Event {
                    name: "to_stack".into(),
                    total: 300,
                    per_sec: Some(30.0),
                },
                Event {
                    name: "reverse_nat".into(),
                    total: 250,
                    per_sec: Some(25.0),
                },
            ],
        }
    }

    fn screen(t: &Terminal<TestBackend>) -> String {
        let buf = t.backend().buffer();
        let mut s = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                s.push_str(buf[(x, y)].symbol());
            }
            s.push('\n');
        }
        s
    }

    #[test]
    fn the_screen_shows_rates_talkers_maps_and_events() {
        let mut t = Terminal::new(TestBackend::new(140, 40)).unwrap();
        let snap = snapshot();
        t.draw(|f| draw(f, Some(&snap), "agent /run/sluice/sluice.sock", None))
            .unwrap();
        let s = screen(&t);
        for want in [
            "sluice top",
            "rates over 1.00 s",
            "Traffic by verdict and reason",
            "drop deny-list",
            "100.0",
            "80.0 kb/s",
            "Top sources (by packets)",
            "198.18.7.1",
            "Top destinations",
            "no flow records yet",
            "deny ipv4",
            "1048576",
            "syn_challenges",
            "lost 7",
            "agent: escalated sources",
            "Load balancer (towards the backends)",
            "198.19.0.10:80/tcp",
            "  198.18.11.2:8080",
            "draining",
            "replies back to clients (reverse NAT): 25.0/s",
            "q: quit",
        ] {
            assert!(s.contains(want), "{want:?} missing from the screen:\n{s}");
        }
    }

    #[test]
    fn many_backends_leave_room_for_the_other_panels() {
        let mut snap = snapshot();
        let row = snap.services.as_ref().unwrap()[1].clone();
        snap.services
            .as_mut()
            .unwrap()
            .extend(std::iter::repeat_n(row, 60));
        let mut t = Terminal::new(TestBackend::new(140, 48)).unwrap();
        t.draw(|f| draw(f, Some(&snap), "agent", None)).unwrap();
        let s = screen(&t);
        assert!(s.contains("more rows (sluice lb list)"), "{s}");
        assert!(s.contains("Maps") && s.contains("deny ipv4"), "{s}");
    }

    #[test]
    fn the_screen_shows_errors_and_waits() {
        let mut t = Terminal::new(TestBackend::new(100, 12)).unwrap();
        t.draw(|f| draw(f, None, "agent X", Some("no agent is running at X")))
            .unwrap();
        let s = screen(&t);
        assert!(s.contains("error: no agent is running at X"), "{s}");
        assert!(s.contains("waiting for the first reading"), "{s}");
        // A tiny terminal must not panic.
        let mut t = Terminal::new(TestBackend::new(10, 3)).unwrap();
        let snap = snapshot();
        t.draw(|f| draw(f, Some(&snap), "agent X", None)).unwrap();
    }

    #[test]
    fn plain_frames_are_timestamped_blocks() {
        let text = plain(&snapshot(), "agent /run/sluice/sluice.sock");
        assert!(
            text.starts_with("=== sluice top 2026-05-01T10:00:00.000000Z (rates over 1.00 s) ===")
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("drop ") && l.contains("deny-list"))
            .unwrap_or_else(|| panic!("no deny-list row:\n{text}"));
        assert!(
            line.contains("100.0") && line.contains("80.0 kb/s"),
            "{line}"
        );
        assert!(text.contains("TOP SOURCES (by packets)"), "{text}");
        assert!(text.contains("198.18.7.1"), "{text}");
        assert!(
            text.contains("TOP DESTINATIONS (by packets): no flow records yet"),
            "{text}"
        );
        assert!(text.contains("flow records: read 2000"), "{text}");
        let backend = text
            .lines()
            .find(|l| l.starts_with("  198.18.11.2:8080"))
            .unwrap_or_else(|| panic!("no backend row:\n{text}"));
        assert!(
            backend.contains("draining")
                && backend.contains("3.0")
                && backend.contains("24.0 kb/s"),
            "{backend}"
        );
        assert!(
            text.contains("lb: to backends: tx -/s, redirect -/s, to stack 30.0/s; replies back to clients (reverse NAT): 25.0/s"),
            "{text}"
        );
        assert!(
            text.contains("sampled pass 1 in 100, drop 1 in 1, audit none"),
            "{text}"
        );
        assert!(text.ends_with("\n\n"));
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(12.34)), "12.3");
        assert_eq!(rate(Some(12_345.0)), "12.3k");
        assert_eq!(bits(Some(999.0)), "999.0 b/s");
        assert_eq!(bits(Some(1_500_000.0)), "1.5 Mb/s");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12), "12 B");
    }
}
