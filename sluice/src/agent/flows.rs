//! The flow reader: the agent is the one reader of the kernel's `FLOWS` ring
//! and of the socket layer's `SOCK_EVENTS` ring (workloads' denied and
//! audited calls). It keeps the newest records, per-flow totals for `flows
//! top`, and feeds followers.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Bytes;
use sluice_common::{FlowConfig, FlowRecord, L4, ip_from_bytes, stat};
use tokio::sync::{Notify, broadcast, mpsc};
use tracing::{info, warn};

use crate::{
    api::{flows::*, time::rfc3339},
    dataplane::{
        self, PinRoot, attach,
        flows::{
            FlowRing, Ring, SockRing, open_steer_ring, ring_identity, sock_ring_identity,
            steer_ring_identity,
        },
        runtime,
    },
    model::policy::config::FlowSettings,
};

/// Flows totalled for `GET /v1/flows/top`; past it the least recently seen goes.
pub const FLOW_CAPACITY: usize = 65_536;
/// Records a follower may fall behind before it loses some.
pub const FOLLOW_BUFFER: usize = 4096;
/// Records taken from the ring before other tasks get a turn.
const BATCH: usize = 4096;
/// How often the reader checks the ring, the kernel's sampling settings and
/// interface names (and drains, in case a wakeup was missed).
const TICK: Duration = Duration::from_millis(500);
/// Interface names are refreshed every this many ticks.
const NAME_TICKS: u32 = 4;

fn clock_ns(clock: nix::time::ClockId) -> i128 {
    nix::time::clock_gettime(clock).map_or(0, |ts| {
        i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
    })
}

fn log_settings(s: &FlowSettings, what: &str) {
    info!(
        sample_pass = s.sample_pass,
        sample_drop = s.sample_drop,
        sample_audit = s.sample_audit,
        rate_cap = s.rate_cap,
        burst = s.burst,
        "{what}"
    );
}

/// A flow: what the totals are kept by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    family: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

impl FlowKey {
    fn of(r: &FlowRecord) -> Self {
        let (src, dst) = if has_addrs(r) {
            (r.src, r.dst)
        } else {
            ([0; 16], [0; 16])
        };
        let (sport, dport) = ports(r).unwrap_or((0, 0));
        Self {
            family: if has_addrs(r) { r.family } else { 0 },
            proto: r.proto,
            sport,
            dport,
            src,
            dst,
        }
    }

    fn addrs(&self) -> Option<(IpAddr, IpAddr)> {
        Some((
            ip_from_bytes(self.family, &self.src)?,
            ip_from_bytes(self.family, &self.dst)?,
        ))
    }
}

/// A socket record in the flow records' form: no interface, no source, the
/// destination (or address bound) and port, one "packet" of no bytes.
fn sock_record(e: &sluice_common::sock::SockEvent) -> FlowRecord {
    let l4 = match e.proto {
        6 => L4::Tcp,
        17 => L4::Udp,
        _ => L4::Other,
    };
    let reason = if e.reason == sluice_common::sock::SockReason::Rule as u8 {
        sluice_common::Reason::Rule
    } else {
        sluice_common::Reason::Default
    };
    FlowRecord {
        ts_ns: e.ts_ns,
        dst: e.addr,
        dport: e.port,
        family: e.family,
        proto: e.proto,
        l4: l4 as u8,
        verdict: e.verdict,
        reason: reason as u8,
        matched: e.rule,
        sample: 1,
        ..FlowRecord::default()
    }
}

/// A kernel command name (NUL-padded) as text.
fn comm(c: &[u8; 16]) -> String {
    let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

fn flow_has_ports(k: &FlowKey, a: &FlowAgg) -> bool {
    k.addrs().is_some() && (a.l4 == L4::Tcp as u8 || a.l4 == L4::Udp as u8)
}

/// Totals of one flow, scaled by the sampling rate.
#[derive(Debug, Clone, Copy)]
struct FlowAgg {
    /// By verdict (pass, drop, audit).
    packets: [u64; 3],
    bytes: [u64; 3],
    records: u64,
    first_ns: u64,
    last_ns: u64,
    last_seq: u64,
    sampled: bool,
    tcp_flags: u8,
    l4: u8,
    ifindex: u32,
    reason: u8,
}

#[derive(Default)]
struct State {
    recent: VecDeque<FlowEvent>,
    flows: HashMap<FlowKey, FlowAgg>,
    /// Flows by the number of their newest record: the first is the least
    /// recently seen, evicted when the table is full.
    order: BTreeMap<u64, FlowKey>,
    evictions: u64,
    seq: u64,
}

/// The reader's shared state: the API, metrics and the reader task use it.
pub struct Flows {
    root: PinRoot,
    recent_capacity: usize,
    flow_capacity: usize,
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<FlowEvent>>,
    settings: Mutex<FlowSettings>,
    poke: Notify,
    ifnames: Mutex<HashMap<u32, Arc<str>>>,
    /// Backend slot -> backend, refreshed with the interface names.
    backends: Mutex<HashMap<u32, BackendTag>>,
    records_read: AtomicU64,
    follower_lost: AtomicU64,
    reading: AtomicBool,
    /// Workload cgroup id -> workload name, kept by the agent's core.
    workload_names: WorkloadNames,
    /// cgroup id -> path, found once per id (bounded).
    cgroup_paths: Mutex<HashMap<u64, Option<Arc<str>>>>,
    /// Steering slot -> steer name, read from the pinned slots (again when
    /// a record names a slot not known yet).
    steer_names: Mutex<HashMap<u32, Arc<str>>>,
}

/// Workload cgroup id -> (name, path), shared by the agent's core (which
/// writes it after every change to the workloads) and the flow reader.
pub type WorkloadNames = Arc<Mutex<HashMap<u64, (String, std::path::PathBuf)>>>;

/// cgroup paths remembered for socket records before the cache starts over.
const CGROUP_PATHS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Flows {
    /// `workload_names`: the agent core's, which names socket records.
    #[must_use]
    pub fn new(root: PinRoot, settings: FlowSettings, workload_names: WorkloadNames) -> Arc<Self> {
        Self::with_capacity(
            root,
            settings,
            workload_names,
            RECENT_CAPACITY,
            FLOW_CAPACITY,
        )
    }

    #[must_use]
    pub fn with_capacity(
        root: PinRoot,
        settings: FlowSettings,
        workload_names: WorkloadNames,
        recent_capacity: usize,
        flow_capacity: usize,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(FOLLOW_BUFFER);
        Arc::new(Self {
            root,
            recent_capacity: recent_capacity.max(1),
            flow_capacity: flow_capacity.max(1),
            state: Mutex::new(State::default()),
            tx,
            settings: Mutex::new(settings),
            poke: Notify::new(),
            ifnames: Mutex::new(HashMap::new()),
            backends: Mutex::new(HashMap::new()),
            records_read: AtomicU64::new(0),
            follower_lost: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            workload_names,
            cgroup_paths: Mutex::new(HashMap::new()),
            steer_names: Mutex::new(HashMap::new()),
        })
    }

    #[must_use]
    pub fn settings(&self) -> FlowSettings {
        *lock(&self.settings)
    }

    /// New `[flows]` settings (a reload): the reader writes them to the
    /// kernel at once.
    pub fn set_settings(&self, s: FlowSettings) {
        let old = std::mem::replace(&mut *lock(&self.settings), s);
        if old != s {
            log_settings(&s, "flow settings changed");
            self.poke.notify_one();
        }
    }

    /// Writes the settings to `FLOW_CONFIG` if the dataplane exists and they
    /// differ (blocking: map syscalls). `Ok(None)`: no dataplane yet.
    pub fn apply(&self) -> Result<Option<bool>, dataplane::DataplaneError> {
        let changed = apply_config(&self.root, &self.settings().to_kernel())?;
        if changed == Some(true) {
            self.log_applied();
        }
        Ok(changed)
    }

    fn log_applied(&self) {
        log_settings(&self.settings(), "flow sampling applied");
    }

    /// Takes records read from the ring.
    pub fn ingest(&self, records: &[FlowRecord]) {
        self.ingest_events(records.iter().map(|r| (*r, None)));
    }

    fn ingest_events(&self, records: impl ExactSizeIterator<Item = (FlowRecord, Option<SockTag>)>) {
        self.ingest_tagged(records.map(|(r, sock)| (r, sock, None)));
    }

    /// Takes steering records (reason `steer`, `matched` = the steer's
    /// slot), named by the slots pinned beside the rule table.
    pub fn ingest_steer(&self, records: &[FlowRecord]) {
        let known = {
            let names = lock(&self.steer_names);
            records.iter().all(|r| names.contains_key(&r.matched))
        };
        if !known {
            self.refresh_steer_names();
        }
        let names = lock(&self.steer_names).clone();
        self.ingest_tagged(
            records
                .iter()
                .map(|r| (*r, None, names.get(&r.matched).cloned())),
        );
    }

    /// Reads which steer holds which slot again (every check, and when a
    /// record names a slot not known yet).
    pub fn refresh_steer_names(&self) {
        let fresh: HashMap<u32, Arc<str>> = dataplane::steer::SteerMaps::open(&self.root)
            .and_then(|m| m.dests())
            .map(|d| {
                d.into_iter()
                    .map(|(slot, d)| (u32::from(slot), Arc::from(d.name.as_str())))
                    .collect()
            })
            .unwrap_or_default();
        *lock(&self.steer_names) = fresh;
    }

    /// Takes socket records read from the socket layer's ring.
    pub fn ingest_sock(&self, events: &[sluice_common::sock::SockEvent]) {
        // A copy (a few entries): no lock is held while paths are looked up.
        let workloads = lock(&self.workload_names).clone();
        let tagged: Vec<(FlowRecord, Option<SockTag>)> = events
            .iter()
            .map(|e| {
                let workload = workloads.get(&e.workload_cgroup);
                let cgroup = self.cgroup_path(e.cgroup, workload.map(|(_, p)| p.as_path()));
                let tag = SockTag {
                    workload: workload.map(|(n, _)| Arc::from(n.as_str())),
                    hook: sluice_common::sock::SockHook::ALL
                        .iter()
                        .find(|h| **h as u32 == e.hook)
                        .map_or("?", |h| h.name()),
                    pid: e.pid,
                    comm: Arc::from(comm(&e.comm)),
                    cgroup,
                };
                (sock_record(e), Some(tag))
            })
            .collect();
        self.ingest_events(tagged.into_iter());
    }

    /// The path of cgroup `id`, searched below its workload's cgroup (a
    /// process's cgroup is that one or a descendant), remembered per id.
    fn cgroup_path(&self, id: u64, under: Option<&std::path::Path>) -> Option<Arc<str>> {
        if let Some(p) = lock(&self.cgroup_paths).get(&id) {
            return p.clone();
        }
        let found = under
            .and_then(|base| dataplane::sock::cgroup_path_under(base, id))
            .map(|p| Arc::from(p.display().to_string()));
        let mut paths = lock(&self.cgroup_paths);
        if paths.len() >= CGROUP_PATHS {
            paths.clear();
        }
        paths.insert(id, found.clone());
        found
    }

    fn ingest_tagged(
        &self,
        records: impl ExactSizeIterator<Item = (FlowRecord, Option<SockTag>, Option<Arc<str>>)>,
    ) {
        if records.len() == 0 {
            return;
        }
        let n = records.len();
        let realtime = clock_ns(nix::time::ClockId::CLOCK_REALTIME);
        let boottime = clock_ns(nix::time::ClockId::CLOCK_BOOTTIME);
        let names = lock(&self.ifnames);
        let backends = lock(&self.backends);
        let mut st = lock(&self.state);
        let following = self.tx.receiver_count() > 0;
        for (r, sock, steer) in records {
            st.seq += 1;
            let wall = realtime - boottime + i128::from(r.ts_ns);
            let ev = FlowEvent {
                seq: st.seq,
                time_ns: u64::try_from(wall.max(0)).unwrap_or(u64::MAX),
                interface: names.get(&r.ifindex).cloned(),
                backend: r
                    .backend
                    .checked_sub(1)
                    .and_then(|slot| backends.get(&slot).cloned()),
                rec: r,
                sock,
                steer,
            };
            // Totals are of packet flows; a socket record sent no packet,
            // and a steering record is a socket lookup, not a packet seen.
            if ev.sock.is_none() && r.reason != sluice_common::Reason::Steer as u8 {
                self.total(&mut st, &ev);
            }
            if st.recent.len() >= self.recent_capacity {
                st.recent.pop_front();
            }
            st.recent.push_back(ev.clone());
            if following {
                // Nobody listening is not an error.
                let _ = self.tx.send(Arc::new(ev));
            }
        }
        self.records_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn total(&self, st: &mut State, ev: &FlowEvent) {
        let r = &ev.rec;
        let key = FlowKey::of(r);
        let v = usize::from(r.verdict).min(2);
        let sample = u64::from(r.sample.max(1));
        let State {
            flows,
            order,
            evictions,
            ..
        } = st;
        if let Some(a) = flows.get_mut(&key) {
            order.remove(&a.last_seq);
            a.packets[v] += sample;
            a.bytes[v] += u64::from(r.len) * sample;
            a.records += 1;
            a.last_ns = ev.time_ns;
            a.last_seq = ev.seq;
            a.sampled |= sample > 1;
            a.tcp_flags |= r.tcp_flags;
            a.l4 = r.l4;
            a.ifindex = r.ifindex;
            a.reason = r.reason;
        } else {
            while flows.len() >= self.flow_capacity {
                let Some((_, oldest)) = order.pop_first() else {
                    break;
                };
                flows.remove(&oldest);
                *evictions += 1;
            }
            let mut a = FlowAgg {
                packets: [0; 3],
                bytes: [0; 3],
                records: 1,
                first_ns: ev.time_ns,
                last_ns: ev.time_ns,
                last_seq: ev.seq,
                sampled: sample > 1,
                tcp_flags: r.tcp_flags,
                l4: r.l4,
                ifindex: r.ifindex,
                reason: r.reason,
            };
            a.packets[v] = sample;
            a.bytes[v] = u64::from(r.len) * sample;
            flows.insert(key, a);
        }
        order.insert(ev.seq, key);
    }

    /// The newest `limit` records that match, oldest first.
    #[must_use]
    pub fn recent(&self, f: &Filter, limit: usize) -> Vec<FlowView> {
        let picked: Vec<FlowEvent> = {
            let st = lock(&self.state);
            st.recent
                .iter()
                .rev()
                .filter(|e| f.matches(&e.rec))
                .take(limit)
                .cloned()
                .collect()
        };
        picked.iter().rev().map(FlowEvent::view).collect()
    }

    /// `GET /v1/flows` without `follow`.
    pub fn query_recent(&self, q: &FlowsQuery) -> Result<FlowsBody, FilterError> {
        let f = Filter::parse(q)?;
        let limit = parse_limit(q.limit.as_deref(), DEFAULT_LIMIT, self.recent_capacity)?;
        Ok(FlowsBody {
            records: self.recent(&f, limit),
        })
    }

    /// `GET /v1/flows/top`.
    pub fn query_top(&self, q: &FlowsQuery) -> Result<TopReport, FilterError> {
        let f = Filter::parse(q)?;
        if f.reason.is_some() {
            return Err(FilterError::NotForTop { what: "reason" });
        }
        if parse_bool(q.follow.as_deref())? {
            return Err(FilterError::NotForTop { what: "follow" });
        }
        let by = By::parse(q.by.as_deref())?;
        let limit = parse_limit(q.limit.as_deref(), DEFAULT_TOP, MAX_TOP)?;
        Ok(self.top(&f, by, limit))
    }

    /// Top flows, sources and destinations. With a verdict in `f`, only the
    /// packets and bytes of that verdict count.
    #[must_use]
    pub fn top(&self, f: &Filter, by: By, limit: usize) -> TopReport {
        let rank = |p: u64, b: u64| match by {
            By::Packets => (p, b),
            By::Bytes => (b, p),
        };
        let names = lock(&self.ifnames).clone();
        let st = lock(&self.state);
        let mut rows: Vec<(u64, u64, &FlowKey, &FlowAgg)> = Vec::new();
        let mut sources: HashMap<IpAddr, (u64, u64, u64)> = HashMap::new();
        let mut dests: HashMap<IpAddr, (u64, u64, u64)> = HashMap::new();
        for (k, a) in &st.flows {
            let (p, b) = match f.verdict {
                Some(v) => (a.packets[v as usize], a.bytes[v as usize]),
                None => (a.packets.iter().sum(), a.bytes.iter().sum()),
            };
            let ports = flow_has_ports(k, a).then_some((k.sport, k.dport));
            if p == 0 || !f.matches_tuple(k.addrs(), ports) {
                continue;
            }
            if let Some((s, d)) = k.addrs() {
                for (m, addr) in [(&mut sources, s), (&mut dests, d)] {
                    let e = m.entry(addr).or_default();
                    e.0 += p;
                    e.1 += b;
                    e.2 += 1;
                }
            }
            rows.push((p, b, k, a));
        }
        // Ties: the most recently seen first.
        rows.sort_by(|x, y| {
            rank(y.0, y.1)
                .cmp(&rank(x.0, x.1))
                .then(y.3.last_seq.cmp(&x.3.last_seq))
        });
        let flows = rows
            .iter()
            .take(limit)
            .map(|(p, b, k, a)| {
                let addrs = k.addrs();
                let has_ports = flow_has_ports(k, a);
                TopFlow {
                    family: family_name(k.family),
                    src: addrs.map(|x| x.0),
                    dst: addrs.map(|x| x.1),
                    sport: has_ports.then_some(k.sport),
                    dport: has_ports.then_some(k.dport),
                    proto: k.proto,
                    protocol: l4_name(a.l4),
                    packets: *p,
                    bytes: *b,
                    verdicts: VerdictPackets {
                        pass: a.packets[0],
                        drop: a.packets[1],
                        audit: a.packets[2],
                    },
                    tcp_flags: if a.l4 == L4::Tcp as u8 {
                        tcp_flag_names(a.tcp_flags)
                    } else {
                        Vec::new()
                    },
                    records: a.records,
                    sampled: a.sampled,
                    first_seen: rfc3339(a.first_ns),
                    last_seen: rfc3339(a.last_ns),
                    last_reason: reason_name(a.reason),
                    interface: names.get(&a.ifindex).map(|n| n.to_string()),
                }
            })
            .collect();
        let tracked = st.flows.len();
        drop(st);
        let ranked = |m: HashMap<IpAddr, (u64, u64, u64)>| {
            let mut v: Vec<TopAddr> = m
                .into_iter()
                .map(|(addr, (packets, bytes, flows))| TopAddr {
                    addr,
                    packets,
                    bytes,
                    flows,
                })
                .collect();
            v.sort_by(|x, y| {
                rank(y.packets, y.bytes)
                    .cmp(&rank(x.packets, x.bytes))
                    .then(x.addr.cmp(&y.addr))
            });
            v.truncate(limit);
            v
        };
        TopReport {
            by: by.name().to_string(),
            flows_tracked: tracked,
            flow_capacity: self.flow_capacity,
            flows,
            sources: ranked(sources),
            destinations: ranked(dests),
        }
    }

    #[must_use]
    pub fn counters(&self) -> FlowCounters {
        let st = lock(&self.state);
        FlowCounters {
            records_read: self.records_read.load(Ordering::Relaxed),
            flows_tracked: st.flows.len(),
            evictions: st.evictions,
            follower_lost: self.follower_lost.load(Ordering::Relaxed),
        }
    }

    /// Reader figures plus the kernel's record counters (blocking: reads maps).
    #[must_use]
    pub fn stats(&self) -> FlowStats {
        let c = self.counters();
        let (written, ring, cap) = if self.root.is_set_up() {
            runtime::stats(&self.root).map_or((0, 0, 0), |s| {
                (
                    s[stat::FLOWS as usize],
                    s[stat::FLOWS_LOST_RING as usize],
                    s[stat::FLOWS_LOST_CAP as usize],
                )
            })
        } else {
            (0, 0, 0)
        };
        let settings = self.settings();
        let applied = ring_identity(&self.root).is_some()
            && runtime::flow_config(&self.root).is_ok_and(|k| k == settings.to_kernel());
        FlowStats {
            reading: self.reading.load(Ordering::Relaxed),
            records_read: c.records_read,
            records_written: written,
            lost_ring_full: ring,
            lost_rate_cap: cap,
            sock_lost_ring_full: dataplane::sock::events_lost(&self.root),
            flows_tracked: c.flows_tracked,
            flow_capacity: self.flow_capacity,
            evictions: c.evictions,
            recent: lock(&self.state).recent.len(),
            recent_capacity: self.recent_capacity,
            followers: self.tx.receiver_count(),
            follower_lost: c.follower_lost,
            settings,
            applied,
        }
    }

    /// A streaming NDJSON body of the records that match `f` from now on.
    /// A follower that falls more than [`FOLLOW_BUFFER`] records behind
    /// loses the oldest and gets a `{"lost": N}` line saying how many.
    pub fn follow(self: &Arc<Self>, f: Filter) -> axum::body::Body {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let mut sub = self.tx.subscribe();
        let flows = self.clone();
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    () = tx.closed() => break,
                    r = sub.recv() => match r {
                        Ok(ev) => {
                            if !f.matches(&ev.rec) {
                                continue;
                            }
                            let mut v = serde_json::to_vec(&ev.view()).expect("a FlowView serialises");
                            v.push(b'\n');
                            v
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            flows.follower_lost.fetch_add(n, Ordering::Relaxed);
                            format!("{{\"lost\":{n}}}\n").into_bytes()
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                };
                if tx.send(Bytes::from(line)).await.is_err() {
                    break;
                }
            }
        });
        axum::body::Body::new(ChannelBody(rx))
    }

    fn set_backends(&self, services: &[crate::engine::lb::ServiceState]) {
        let map = services
            .iter()
            .flat_map(|s| s.members.iter())
            .map(|m| {
                (
                    m.slot,
                    BackendTag {
                        backend: Arc::from(m.backend.to_string()),
                        state: m.state_name(),
                    },
                )
            })
            .collect();
        *lock(&self.backends) = map;
    }

    fn set_names(&self, attachments: &[attach::Attachment]) {
        let mut by_index: HashMap<u32, Vec<&str>> = HashMap::new();
        for a in attachments {
            by_index.entry(a.ifindex).or_default().push(&a.interface);
        }
        // An index is a name only if one attachment has it (indexes are per
        // network namespace).
        let names = by_index
            .into_iter()
            .filter(|(_, v)| v.len() == 1)
            .map(|(i, v)| (i, Arc::from(v[0])))
            .collect();
        *lock(&self.ifnames) = names;
    }
}

/// Writes `want` to `FLOW_CONFIG` unless it holds it already. `Ok(None)`:
/// no dataplane; `Ok(Some(changed))` otherwise.
fn apply_config(
    root: &PinRoot,
    want: &FlowConfig,
) -> Result<Option<bool>, dataplane::DataplaneError> {
    if ring_identity(root).is_none() {
        return Ok(None);
    }
    if runtime::flow_config(root)? == *want {
        return Ok(Some(false));
    }
    runtime::set_flow_config(root, want)?;
    Ok(Some(true))
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// What the reader's periodic check found (map syscalls run off the async threads).
struct Check {
    identity: Option<u64>,
    applied: Result<Option<bool>, dataplane::DataplaneError>,
    attachments: Option<Vec<attach::Attachment>>,
    backends: Option<Vec<crate::engine::lb::ServiceState>>,
}

/// Starts the reader task: it opens the ring when the dataplane exists,
/// keeps the kernel's sampling in line with the settings, follows a ring
/// that was removed and made again, and never blocks the agent (reads are
/// batched; map syscalls run on the blocking pool).
pub fn spawn_reader(flows: Arc<Flows>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(read_loop(flows))
}

enum Wake {
    Records(std::io::Result<()>),
    SockRecords(std::io::Result<()>),
    SteerRecords(std::io::Result<()>),
    Check,
}

/// Reads a batch from `ring`, or waits forever when there is none.
async fn read_from<T: Copy>(ring: &mut Option<Ring<T>>, out: &mut Vec<T>) -> std::io::Result<()> {
    match ring {
        Some(r) => r.read(BATCH, out).await,
        None => std::future::pending().await,
    }
}

async fn read_loop(flows: Arc<Flows>) {
    let mut ring: Option<FlowRing> = None;
    let mut sock_ring: Option<SockRing> = None;
    let mut steer_ring: Option<FlowRing> = None;
    let mut steer_batch = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    let mut batch = Vec::with_capacity(BATCH);
    let mut sock_batch = Vec::new();
    // The (ring, settings) the kernel was last seen to hold: a difference
    // after that is drift, not a first application.
    let mut in_force: Option<(Option<u64>, FlowConfig)> = None;
    loop {
        let wake = tokio::select! {
            res = read_from(&mut ring, &mut batch) => Wake::Records(res),
            res = read_from(&mut sock_ring, &mut sock_batch) => Wake::SockRecords(res),
            res = read_from(&mut steer_ring, &mut steer_batch) => Wake::SteerRecords(res),
            _ = tick.tick() => Wake::Check,
            () = flows.poke.notified() => Wake::Check,
        };
        match wake {
            Wake::Records(Ok(())) | Wake::SockRecords(Ok(())) | Wake::SteerRecords(Ok(())) => {}
            Wake::SteerRecords(Err(e)) => {
                warn!(error = %e, "reading steering records failed; reopening the ring");
                steer_ring = None;
            }
            Wake::Records(Err(e)) => {
                warn!(error = %e, "reading flow records failed; reopening the ring");
                ring = None;
                flows.reading.store(false, Ordering::Relaxed);
            }
            Wake::SockRecords(Err(e)) => {
                warn!(error = %e, "reading socket records failed; reopening the ring");
                sock_ring = None;
            }
            Wake::Check => {
                ticks = ticks.wrapping_add(1);
                check(&flows, &mut ring, &mut in_force, ticks % NAME_TICKS == 1).await;
                check_sock(&flows, &mut sock_ring).await;
                check_steer(&flows, &mut steer_ring).await;
                if steer_ring.is_some() {
                    let f = flows.clone();
                    let _ = tokio::task::spawn_blocking(move || f.refresh_steer_names()).await;
                }
                if let Some(r) = steer_ring.as_mut() {
                    r.drain_now(BATCH, &mut steer_batch);
                }
                if let Some(r) = ring.as_mut() {
                    r.drain_now(BATCH, &mut batch);
                }
                if let Some(r) = sock_ring.as_mut() {
                    r.drain_now(BATCH, &mut sock_batch);
                }
            }
        }
        if !batch.is_empty() {
            flows.ingest(&batch);
            batch.clear();
            tokio::task::yield_now().await;
        }
        if !steer_batch.is_empty() {
            flows.ingest_steer(&steer_batch);
            steer_batch.clear();
            tokio::task::yield_now().await;
        }
        if !sock_batch.is_empty() {
            // Resolving cgroup paths walks the cgroup tree: off the async threads.
            let f = flows.clone();
            let events = std::mem::take(&mut sock_batch);
            let _ = tokio::task::spawn_blocking(move || f.ingest_sock(&events)).await;
            tokio::task::yield_now().await;
        }
    }
}

/// Opens the socket layer's ring when workloads made it, and lets go of
/// it when they are gone (or it was made again).
async fn check_sock(flows: &Arc<Flows>, ring: &mut Option<SockRing>) {
    let root = flows.root.clone();
    let Ok(identity) = tokio::task::spawn_blocking(move || sock_ring_identity(&root)).await else {
        return;
    };
    if identity.is_some() && ring.as_ref().and_then(Ring::identity) == identity {
        return;
    }
    if ring.take().is_some() {
        info!("the socket records ring went with the workloads; waiting for a new one");
    }
    if identity.is_some() {
        match SockRing::open(&flows.root) {
            Ok(r) => {
                info!("reading socket records (workloads' denied and audited calls)");
                *ring = Some(r);
            }
            Err(e) => warn!(error = %e, "cannot open the socket records ring; will retry"),
        }
    }
}

/// Opens steering's ring when the socket object exists, and lets go of it
/// when it is gone (or was made again).
async fn check_steer(flows: &Arc<Flows>, ring: &mut Option<FlowRing>) {
    let root = flows.root.clone();
    let Ok(identity) = tokio::task::spawn_blocking(move || steer_ring_identity(&root)).await else {
        return;
    };
    if identity.is_some() && ring.as_ref().and_then(Ring::identity) == identity {
        return;
    }
    ring.take();
    if identity.is_some() {
        match open_steer_ring(&flows.root) {
            Ok(r) => *ring = Some(r),
            Err(e) => warn!(error = %e, "cannot open the steering records ring; will retry"),
        }
    }
}

async fn check(
    flows: &Arc<Flows>,
    ring: &mut Option<FlowRing>,
    in_force: &mut Option<(Option<u64>, FlowConfig)>,
    names: bool,
) {
    let want = flows.settings().to_kernel();
    let root = flows.root.clone();
    let found = tokio::task::spawn_blocking(move || Check {
        identity: ring_identity(&root),
        applied: apply_config(&root, &want),
        attachments: names
            .then(|| attach::status(&root).ok().map(|s| s.attachments))
            .flatten(),
        backends: (names && root.is_set_up())
            .then(|| crate::engine::lb::read(&root).ok())
            .flatten(),
    })
    .await;
    let Ok(found) = found else { return };
    if let Some(a) = &found.attachments {
        flows.set_names(a);
    }
    if let Some(b) = &found.backends {
        flows.set_backends(b);
    }
    match &found.applied {
        Ok(Some(true)) => {
            if *in_force == Some((found.identity, want)) {
                warn!("flow sampling in the kernel differed from the [flows] settings; corrected");
            } else {
                flows.log_applied();
            }
            *in_force = Some((found.identity, want));
        }
        Ok(Some(false)) => *in_force = Some((found.identity, want)),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot write the flow sampling settings"),
    }
    let held = ring.as_ref().and_then(FlowRing::identity);
    if found.identity == held && ring.is_some() {
        return;
    }
    if ring.take().is_some() {
        info!("the flow ring was removed with the dataplane; waiting for a new one");
        flows.reading.store(false, Ordering::Relaxed);
    }
    if found.identity.is_some() {
        match FlowRing::open(&flows.root) {
            Ok(r) => {
                info!("reading flow records");
                *ring = Some(r);
                flows.reading.store(true, Ordering::Relaxed);
            }
            Err(e) => warn!(error = %e, "cannot open the flow ring; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::{Reason, Verdict};

    use super::*;

    fn rec(src: [u8; 4], sport: u16, verdict: Verdict, reason: Reason, len: u32) -> FlowRecord {
        let mut r = FlowRecord {
            ts_ns: 1,
            ifindex: 3,
            len,
            sport,
            dport: 53,
            family: sluice_common::Family::V4.version(),
            proto: 17,
            l4: L4::Udp as u8,
            verdict: verdict as u8,
            reason: reason as u8,
            matched: 24,
            sample: 1,
            ..FlowRecord::default()
        };
        r.src[..4].copy_from_slice(&src);
        r.dst[..4].copy_from_slice(&[198, 18, 1, 1]);
        r
    }

    fn flows(recent: usize, tracked: usize) -> Arc<Flows> {
        Flows::with_capacity(
            PinRoot::new("/nonexistent/sluice-flows-test"),
            FlowSettings::default(),
            WorkloadNames::default(),
            recent,
            tracked,
        )
    }

    #[test]
    fn recent_is_bounded_newest_last_and_filtered() {
        let f = flows(5, 100);
        let recs: Vec<FlowRecord> = (0..8u16)
            .map(|i| {
                let v = if i % 2 == 0 {
                    Verdict::Pass
                } else {
                    Verdict::Drop
                };
                rec([198, 18, 0, 2], 1000 + i, v, Reason::Default, 64)
            })
            .collect();
        f.ingest(&recs);
        let all = f.recent(&Filter::default(), 100);
        assert_eq!(
            all.iter().map(|v| v.sport.unwrap()).collect::<Vec<_>>(),
            [1003, 1004, 1005, 1006, 1007]
        );
        assert_eq!(all.last().unwrap().seq, 8);
        let q = FlowsQuery {
            verdict: Some("drop".into()),
            limit: Some("1".into()),
            ..FlowsQuery::default()
        };
        let drops = f.query_recent(&q).unwrap().records;
        assert_eq!(drops.len(), 1);
        assert_eq!(drops[0].sport, Some(1007));
        let port = FlowsQuery {
            port: Some("1004".into()),
            ..FlowsQuery::default()
        };
        assert_eq!(f.query_recent(&port).unwrap().records.len(), 1);
    }

    #[test]
    fn flows_are_totalled_by_sample_and_the_oldest_evicted() {
        let f = flows(10, 2);
        let mut a = rec([198, 18, 0, 2], 1, Verdict::Drop, Reason::DenyList, 100);
        a.sample = 10;
        let b = rec([198, 18, 0, 3], 2, Verdict::Pass, Reason::Default, 60);
        f.ingest(&[a, a, b]);
        let top = f.top(&Filter::default(), By::Packets, 10);
        assert_eq!(top.flows.len(), 2);
        assert_eq!(top.flows[0].packets, 20);
        assert_eq!(top.flows[0].bytes, 2000);
        assert!(top.flows[0].sampled);
        assert_eq!(top.flows[0].verdicts.drop, 20);
        assert_eq!(top.sources[0].addr, "198.18.0.2".parse::<IpAddr>().unwrap());
        // A third flow evicts the least recently seen (a; b was seen later).
        let c = rec([198, 18, 0, 4], 3, Verdict::Pass, Reason::Default, 60);
        f.ingest(&[c]);
        assert_eq!(f.counters().evictions, 1);
        let top = f.top(&Filter::default(), By::Packets, 10);
        let srcs: Vec<String> = top
            .flows
            .iter()
            .map(|x| x.src.unwrap().to_string())
            .collect();
        assert_eq!(srcs, ["198.18.0.4", "198.18.0.3"]);
        let drop_only = Filter {
            verdict: Some(Verdict::Drop),
            ..Filter::default()
        };
        assert!(f.top(&drop_only, By::Bytes, 10).flows.is_empty());
    }

    #[test]
    fn a_follower_that_falls_behind_is_told_how_many_it_lost() {
        use http_body_util::BodyExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let f = flows(10, 10);
            let drops = Filter {
                verdict: Some(Verdict::Drop),
                ..Filter::default()
            };
            let mut body = f.follow(drops);
            // More records than the follow buffer holds arrive before the
            // follower reads anything; every other one matches.
            let n = FOLLOW_BUFFER as u64 + 1000;
            let recs: Vec<FlowRecord> = (0..n)
                .map(|i| {
                    let v = if i % 2 == 0 {
                        Verdict::Drop
                    } else {
                        Verdict::Pass
                    };
                    rec([198, 18, 0, 2], 1, v, Reason::Default, 64)
                })
                .collect();
            f.ingest(&recs);
            let mut text = String::new();
            let want_records = FOLLOW_BUFFER / 2;
            while text.lines().count() < want_records + 1 {
                let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                    .await
                    .expect("the stream goes on")
                    .expect("a frame")
                    .unwrap();
                text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
            }
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some("{\"lost\":1000}"));
            let views: Vec<FlowView> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(views.len(), want_records);
            assert!(views.iter().all(|v| v.verdict == "drop"));
            assert_eq!(views.first().unwrap().seq, 1001);
            assert_eq!(views.last().unwrap().seq, n - 1);
            assert_eq!(f.counters().follower_lost, 1000);
            assert_eq!(f.stats().followers, 1);
            drop(body);
        });
    }

    #[test]
    fn bad_filters_name_the_valid_values() {
        let q = |k: &str, v: &str| {
            let mut q = FlowsQuery::default();
            match k {
                "verdict" => q.verdict = Some(v.into()),
                "reason" => q.reason = Some(v.into()),
                "src" => q.src = Some(v.into()),
                _ => q.port = Some(v.into()),
            }
            Filter::parse(&q).unwrap_err().to_string()
        };
        assert_eq!(
            q("verdict", "deny"),
            "unknown verdict 'deny' (valid: pass, drop, audit)"
        );
        assert!(q("reason", "x").contains("deny-list, rule, malformed"));
        assert!(q("src", "198.18.0.0/33").contains("is not a CIDR"));
        assert!(q("port", "70000").contains("is not a port"));
    }

    #[test]
    fn times_and_queries_render() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_795_325_267_123_456_789),
            "2026-11-22T05:27:47.123456Z"
        );
        let q = FlowsQuery {
            src: Some("2001:2::/48".into()),
            reason: Some("deny-list".into()),
            ..FlowsQuery::default()
        };
        assert_eq!(q.to_query(), "?reason=deny-list&src=2001:2::/48");
        assert_eq!(tcp_flag_names(0x12), ["SYN", "ACK"]);
    }
}
