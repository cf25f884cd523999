//! `sluice flows`: the flow records the agent reads from the dataplane's
//! ring, as one line per record (like `hubble observe`) or JSON lines.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;

use crate::api::{
    ErrorBody,
    client::{Client, ClientError},
    flows::{
        By, DEFAULT_LIMIT, DEFAULT_TOP, FilterError, FlowStats, FlowView, FlowsBody, FlowsQuery,
        MAX_TOP, RECENT_CAPACITY, TopAddr, TopReport, parse_limit,
    },
};

#[derive(Debug, Args)]
pub struct FlowsArgs {
    #[command(subcommand)]
    pub command: Option<FlowsCommand>,
    /// Keep printing new records as they come (Ctrl-C stops).
    #[arg(short, long)]
    pub follow: bool,
    /// Only this verdict: pass, drop or audit.
    #[arg(long, value_name = "VERDICT", global = true)]
    pub verdict: Option<String>,
    /// Only this reason: default, allow-list, deny-list, rule, malformed,
    /// not-ip, rate-limit, syn-defence, map-full, no-backend, vip-fragment
    /// or steer.
    #[arg(long, value_name = "REASON", global = true)]
    pub reason: Option<String>,
    /// Only sources in CIDR (an address is a host prefix).
    #[arg(long, value_name = "CIDR", global = true)]
    pub src: Option<String>,
    /// Only destinations in CIDR.
    #[arg(long, value_name = "CIDR", global = true)]
    pub dst: Option<String>,
    /// Only TCP and UDP with this source or destination port.
    #[arg(long, value_name = "PORT", global = true)]
    pub port: Option<String>,
    /// The newest N records (default 100, at most 10000); with `top`, N rows
    /// per table (default 10).
    #[arg(long, value_name = "N", global = true)]
    pub limit: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum FlowsCommand {
    /// Top talkers since the agent started: flows, sources and destinations
    /// by packets or bytes (the records times their sampling rate).
    Top {
        /// Rank by packets or bytes.
        #[arg(long, value_name = "packets|bytes", default_value = "packets")]
        by: String,
    },
    /// The flow reader's figures: records read and lost, flows tracked.
    Stats,
}

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(
        "no agent is running at {path}: flow records are read by the agent, the one reader of \
         the dataplane's flow ring (start one with `sluice agent --config FILE`)"
    )]
    NoAgent { path: PathBuf },
    #[error(
        "the agent at {socket} serves pin root {served}, not {wanted}: point --socket at the \
         agent of {wanted}"
    )]
    OtherRoot {
        socket: PathBuf,
        served: PathBuf,
        wanted: PathBuf,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("following flow records from the agent at {path}: {reason}")]
    Stream { path: PathBuf, reason: String },
    #[error("the agent at {path} ended the stream (did it stop?)")]
    Ended { path: PathBuf },
}

/// The query the options stand for, checked here so a bad value is
/// reported the same with or without an agent.
fn query(args: &FlowsArgs) -> Result<FlowsQuery, FilterError> {
    let q = FlowsQuery {
        verdict: args.verdict.clone(),
        reason: args.reason.clone(),
        src: args.src.clone(),
        dst: args.dst.clone(),
        port: args.port.clone(),
        limit: args.limit.clone(),
        follow: args.follow.then(|| "true".to_string()),
        by: match &args.command {
            Some(FlowsCommand::Top { by }) => Some(by.clone()),
            _ => None,
        },
    };
    let f = crate::api::flows::Filter::parse(&q)?;
    // Canonical forms travel: a CIDR with host bits is sent as its network.
    let q = FlowsQuery {
        src: f.src.map(|n| n.to_string()),
        dst: f.dst.map(|n| n.to_string()),
        port: f.port.map(|p| p.to_string()),
        ..q
    };
    match &args.command {
        Some(FlowsCommand::Top { by }) => {
            if f.reason.is_some() {
                return Err(FilterError::NotForTop { what: "--reason" });
            }
            By::parse(Some(by))?;
            parse_limit(q.limit.as_deref(), DEFAULT_TOP, MAX_TOP)?;
        }
        Some(FlowsCommand::Stats) => {}
        None => {
            parse_limit(q.limit.as_deref(), DEFAULT_LIMIT, RECENT_CAPACITY)?;
        }
    }
    Ok(q)
}

pub fn run(args: &FlowsArgs, socket: &Path, pin_root: &Path, json: bool) -> Result<(), FlowsError> {
    let q = query(args)?;
    let Some((client, info)) = Client::connect(socket)? else {
        return Err(FlowsError::NoAgent {
            path: socket.to_path_buf(),
        });
    };
    if info.pin_root != pin_root {
        return Err(FlowsError::OtherRoot {
            socket: socket.to_path_buf(),
            served: info.pin_root,
            wanted: pin_root.to_path_buf(),
        });
    }
    match &args.command {
        None if args.follow => follow(socket, &q, json),
        None => {
            let body: FlowsBody = client.call(
                Method::GET,
                &format!("/v1/flows{}", q.to_query()),
                None::<&()>,
            )?;
            for r in &body.records {
                if json {
                    println!("{}", serde_json::to_string(r).expect("serialisable"));
                } else {
                    println!("{}", line(r));
                }
            }
            if body.records.is_empty() && !json {
                eprintln!("(no flow records match; `sluice flows stats` shows the sampling)");
            }
            Ok(())
        }
        Some(FlowsCommand::Top { .. }) => {
            let top: TopReport = client.call(
                Method::GET,
                &format!("/v1/flows/top{}", q.to_query()),
                None::<&()>,
            )?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&top).expect("serialisable")
                );
            } else {
                print_top(&top);
            }
            Ok(())
        }
        Some(FlowsCommand::Stats) => {
            let s: FlowStats = client.call(Method::GET, "/v1/flows/stats", None::<&()>)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).expect("serialisable")
                );
            } else {
                print_stats(&s);
            }
            Ok(())
        }
    }
}

/// Streams `GET /v1/flows?follow=true...` and prints each record as it comes.
fn follow(socket: &Path, q: &FlowsQuery, json: bool) -> Result<(), FlowsError> {
    let err = |reason: String| FlowsError::Stream {
        path: socket.to_path_buf(),
        reason,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("/v1/flows{}", q.to_query()))
            .header("host", "sluice")
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| err(e.to_string()))?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                diagnostics: Vec::new(),
            });
            return Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            }
            .into());
        }
        if !json {
            eprintln!("(following flow records; Ctrl-C stops)");
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| err(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = buf.drain(..=end).collect();
                print_streamed(&l[..end], json);
            }
        }
        Err(FlowsError::Ended {
            path: socket.to_path_buf(),
        })
    })
}

/// One NDJSON line of the stream: a record, or `{"lost": N}`.
fn print_streamed(l: &[u8], json: bool) {
    if json {
        println!("{}", String::from_utf8_lossy(l));
        return;
    }
    if let Ok(r) = serde_json::from_slice::<FlowView>(l) {
        println!("{}", line(&r));
    } else if let Some(n) = serde_json::from_slice::<serde_json::Value>(l)
        .ok()
        .and_then(|v| v["lost"].as_u64())
    {
        eprintln!("({n} flow record(s) skipped: this reader fell behind)");
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Nov 22 05:41:07.123` in local time.
fn local_time(unix_ns: u64) -> String {
    let millis = (unix_ns % 1_000_000_000) / 1_000_000;
    let Ok(secs) = libc::time_t::try_from(unix_ns / 1_000_000_000) else {
        return crate::api::time::rfc3339(unix_ns);
    };
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&raw const secs, &raw mut tm) }.is_null() {
        return crate::api::time::rfc3339(unix_ns);
    }
    let month = usize::try_from(tm.tm_mon)
        .ok()
        .and_then(|m| MONTHS.get(m))
        .unwrap_or(&"???");
    format!(
        "{month} {:02} {:02}:{:02}:{:02}.{millis:03}",
        tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}

fn endpoint(addr: std::net::IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

fn protocol(protocol: &str, proto: u8, tcp_flags: &[String]) -> String {
    match protocol {
        "tcp" if !tcp_flags.is_empty() => format!("tcp {}", tcp_flags.join(",")),
        "other" => format!("proto {proto}"),
        "fragment" => format!("fragment proto {proto}"),
        "none" => "-".into(),
        p => p.into(),
    }
}

/// One record as a line: time, interface, endpoints, protocol (with TCP
/// flags), verdict, reason (with the list prefix length or rule id), length.
fn line(r: &FlowView) -> String {
    if let Some(hook) = &r.hook {
        return sock_line(r, hook);
    }
    let iface = r.interface.clone().unwrap_or_else(|| {
        if r.ifindex == 0 {
            "-".into()
        } else {
            format!("if{}", r.ifindex)
        }
    });
    let endpoints = match (r.src, r.dst) {
        (Some(s), Some(d)) => format!("{} -> {}", endpoint(s, r.sport), endpoint(d, r.dport)),
        _ if r.reason == "malformed" => format!("(malformed {})", r.family),
        _ => "(not IP)".into(),
    };
    let reason = match (r.prefix_len, r.rule) {
        _ if r.steer.is_some() => format!("steer {}", r.steer.as_deref().unwrap_or("?")),
        (Some(len), _) => format!("{} (/{len})", r.reason),
        (None, Some(id)) if r.reason == "rule" => format!("rule {id}"),
        (None, Some(id)) => format!("{} (rule {id})", r.reason),
        (None, None) => r.reason.clone(),
    };
    let sampled = if r.sample > 1 {
        format!("  (1 in {})", r.sample)
    } else {
        String::new()
    };
    let backend = match (&r.backend, &r.backend_state) {
        (Some(b), Some(state)) if state != "active" => format!("  -> {b} ({state})"),
        (Some(b), _) => format!("  -> {b}"),
        _ => String::new(),
    };
    format!(
        "{}  {iface}  {endpoints}  {}  {}  {reason}  {}B{sampled}{backend}",
        local_time(r.time_ns),
        protocol(&r.protocol, r.proto, &r.tcp_flags),
        r.verdict,
        r.len
    )
}

/// A socket record (a workload's denied or audited call; no packet): time,
/// workload, process, the call and its address, verdict and reason.
fn sock_line(r: &FlowView, hook: &str) -> String {
    let target = r.dst.map_or("?".to_string(), |d| endpoint(d, r.dport));
    let reason = match r.rule {
        Some(id) if r.reason == "rule" => format!("rule {id}"),
        _ => r.reason.clone(),
    };
    format!(
        "{}  workload {}  pid {} ({})  {hook} {target}  {}  {}  {reason}{}",
        local_time(r.time_ns),
        r.workload.as_deref().unwrap_or("?"),
        r.pid.unwrap_or(0),
        r.comm.as_deref().unwrap_or("?"),
        protocol(&r.protocol, r.proto, &r.tcp_flags),
        r.verdict,
        r.cgroup
            .as_deref()
            .map(|c| format!("  cgroup {c}"))
            .unwrap_or_default()
    )
}

fn addr_rows(rows: &[TopAddr]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|a| {
            vec![
                a.packets.to_string(),
                super::output::human_bytes(a.bytes),
                a.flows.to_string(),
                a.addr.to_string(),
            ]
        })
        .collect()
}

fn print_top(t: &TopReport) {
    println!(
        "Top flows by {} ({} flow(s) tracked, at most {}; ~ = estimated from samples)",
        t.by, t.flows_tracked, t.flow_capacity
    );
    let rows: Vec<Vec<String>> = t
        .flows
        .iter()
        .map(|f| {
            let mark = if f.sampled { "~" } else { "" };
            let ends = match (f.src, f.dst) {
                (Some(s), Some(d)) => (endpoint(s, f.sport), endpoint(d, f.dport)),
                _ => ("(not IP)".into(), String::new()),
            };
            let verdicts: Vec<String> = [
                ("pass", f.verdicts.pass),
                ("drop", f.verdicts.drop),
                ("audit", f.verdicts.audit),
            ]
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(v, n)| format!("{v} {mark}{n}"))
            .collect();
            vec![
                format!("{mark}{}", f.packets),
                format!("{mark}{}", super::output::human_bytes(f.bytes)),
                protocol(&f.protocol, f.proto, &f.tcp_flags),
                ends.0,
                ends.1,
                verdicts.join(", "),
                f.last_reason.clone(),
            ]
        })
        .collect();
    super::output::table(
        &[
            "PACKETS",
            "BYTES",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "VERDICTS",
            "LAST REASON",
        ],
        &rows,
    );
    println!();
    println!("Top sources by {}", t.by);
    super::output::table(
        &["PACKETS", "BYTES", "FLOWS", "SOURCE"],
        &addr_rows(&t.sources),
    );
    println!();
    println!("Top destinations by {}", t.by);
    super::output::table(
        &["PACKETS", "BYTES", "FLOWS", "DESTINATION"],
        &addr_rows(&t.destinations),
    );
}

fn rate(n: u32) -> String {
    match n {
        0 => "off".into(),
        1 => "every packet".into(),
        n => format!("1 in {n}"),
    }
}

fn print_stats(s: &FlowStats) {
    let cfg = &s.settings;
    let cap = if cfg.rate_cap == 0 {
        "no rate cap".to_string()
    } else {
        format!("at most {}/s per CPU, burst {}", cfg.rate_cap, cfg.burst)
    };
    let state = match (s.reading, s.applied) {
        (true, true) => "reading",
        (true, false) => "reading (sampling settings not in the kernel yet)",
        (false, _) => "waiting for the dataplane (nothing attached)",
    };
    let rows = vec![
        vec!["reader".to_string(), state.to_string()],
        vec![
            "sampling".into(),
            format!(
                "pass {}, drop {}, audit {}; {cap}",
                rate(cfg.sample_pass),
                rate(cfg.sample_drop),
                rate(cfg.sample_audit)
            ),
        ],
        vec!["records read".into(), s.records_read.to_string()],
        vec![
            "records written".into(),
            format!(
                "{} (by the kernel, since the maps were made)",
                s.records_written
            ),
        ],
        vec!["lost, ring full".into(), s.lost_ring_full.to_string()],
        vec!["lost, rate cap".into(), s.lost_rate_cap.to_string()],
        vec![
            "socket records lost".into(),
            format!("{} (workloads' ring full)", s.sock_lost_ring_full),
        ],
        vec![
            "flows tracked".into(),
            format!(
                "{} of {} ({} evicted)",
                s.flows_tracked, s.flow_capacity, s.evictions
            ),
        ],
        vec![
            "recent records".into(),
            format!("{} of {}", s.recent, s.recent_capacity),
        ],
        vec![
            "followers".into(),
            format!(
                "{} ({} record(s) lost by falling behind)",
                s.followers, s.follower_lost
            ),
        ],
    ];
    for r in rows {
        println!("{:<17} {}", format!("{}:", r[0]), r[1]);
    }
}
