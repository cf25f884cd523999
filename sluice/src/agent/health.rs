//! Backend health checking for the L4 load balancer: probes each backend on
//! its own schedule and reports Up/Down transitions for the Maglev tables.

use std::{
    collections::HashMap,
    fmt::Debug,
    hash::{DefaultHasher, Hash, Hasher as _},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Empty;
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::model::lb::health::{CheckSpec, Probe};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub health: Health,
    /// When `health` last changed (or the target was added).
    pub since_unix_ms: u64,
    /// When the last probe finished; `None` until the first one has.
    pub last_check_unix_ms: Option<u64>,
    /// Text of the most recent failure, kept after later successes so an
    /// operator can see why a flapping backend went down.
    pub last_error: Option<String>,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// Probes run under the current address and spec (reset on restart).
    pub checks: u64,
}

/// One health change; sent exactly once per change.
#[derive(Clone, Debug)]
pub struct Transition<K> {
    pub key: K,
    pub addr: SocketAddr,
    pub health: Health,
    /// The target's status right after the change.
    pub status: Status,
}

/// Why one probe failed; its text becomes `Status::last_error`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {}", io_reason(.source))]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("{source}")]
    Netns {
        #[source]
        source: crate::netns::NetnsError,
    },
    #[error("timeout after {after:?}")]
    Timeout { after: Duration },
    #[error("http status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    #[error("http: {source}")]
    Http {
        #[source]
        source: hyper::Error,
    },
    #[error("http request: {source}")]
    Request {
        #[source]
        source: hyper::http::Error,
    },
}

/// Status shared between a target's probe task and the checker.
struct Slot {
    status: Status,
    /// Bumped whenever the task is replaced or removed, so a task aborted
    /// mid-poll cannot record a result (or send a transition) afterwards.
    generation: u64,
}

struct Target {
    addr: SocketAddr,
    spec: CheckSpec,
    slot: Arc<Mutex<Slot>>,
    task: JoinHandle<()>,
}

/// Probes a set of backends, one tokio task each.
///
/// Transitions go to an unbounded channel so a probe never waits on the
/// agent; it cannot grow quickly, since each target sends at most one
/// transition per `min(rise, fall)` probes, and sends stop mattering once
/// the receiver is dropped.
pub struct Checker<K> {
    targets: Mutex<HashMap<K, Target>>,
    tx: mpsc::UnboundedSender<Transition<K>>,
    runtime: tokio::runtime::Handle,
}

impl<K: Clone + Eq + Hash + Debug + Send + Sync + 'static> Checker<K> {
    /// Creates an empty checker and the receiver of its transitions.
    ///
    /// # Panics
    /// Outside a tokio runtime: the probe tasks are spawned on the current
    /// one, which lets `set_targets` be called from any thread later.
    #[must_use]
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Transition<K>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let checker = Self {
            targets: Mutex::new(HashMap::new()),
            tx,
            runtime: tokio::runtime::Handle::current(),
        };
        (checker, rx)
    }

    /// Reconciles the checked targets with `targets`: starts new ones, stops
    /// removed ones, restarts those whose address or spec changed, and
    /// leaves unchanged ones running undisturbed.
    ///
    /// A new target starts Up with no probe run yet: a freshly added backend
    /// takes traffic at once, as it would with no health check, and `fall`
    /// failures take it out. A restarted target keeps its health (a Down
    /// backend stays out until `rise` successes under the new spec) but its
    /// counters restart at zero. Removal sends no transition: the caller
    /// already knows. If a key appears twice, the last entry wins.
    pub fn set_targets(&self, targets: Vec<(K, SocketAddr, CheckSpec)>) {
        let wanted: HashMap<K, (SocketAddr, CheckSpec)> = targets
            .into_iter()
            .map(|(key, addr, spec)| (key, (addr, spec)))
            .collect();
        let mut current = lock(&self.targets);
        current.retain(|key, target| {
            if wanted.contains_key(key) {
                return true;
            }
            stop(target);
            info!(key = ?key, addr = %target.addr, "health check removed");
            false
        });
        for (key, (addr, spec)) in wanted {
            if let Some(target) = current.get_mut(&key) {
                if target.addr == addr && target.spec == spec {
                    continue;
                }
                let generation = stop(target);
                {
                    let mut slot = lock(&target.slot);
                    slot.status.consecutive_ok = 0;
                    slot.status.consecutive_fail = 0;
                    slot.status.checks = 0;
                }
                info!(key = ?key, %addr, old_addr = %target.addr, ?spec, "health check changed");
                target.task = self.spawn(&key, addr, &spec, &target.slot, generation);
                target.addr = addr;
                target.spec = spec;
            } else {
                let slot = Arc::new(Mutex::new(Slot {
                    status: Status {
                        health: Health::Up,
                        since_unix_ms: now_unix_ms(),
                        last_check_unix_ms: None,
                        last_error: None,
                        consecutive_ok: 0,
                        consecutive_fail: 0,
                        checks: 0,
                    },
                    generation: 0,
                }));
                info!(key = ?key, %addr, ?spec, "health check added");
                let task = self.spawn(&key, addr, &spec, &slot, 0);
                current.insert(
                    key,
                    Target {
                        addr,
                        spec,
                        slot,
                        task,
                    },
                );
            }
        }
    }

    /// Every checked target's status, in no particular order.
    pub fn status(&self) -> Vec<(K, Status)> {
        lock(&self.targets)
            .iter()
            .map(|(key, target)| (key.clone(), lock(&target.slot).status.clone()))
            .collect()
    }

    /// One target's status, if it is checked.
    pub fn status_of(&self, key: &K) -> Option<Status> {
        lock(&self.targets)
            .get(key)
            .map(|target| lock(&target.slot).status.clone())
    }

    pub fn health(&self, key: &K) -> Option<Health> {
        lock(&self.targets)
            .get(key)
            .map(|target| lock(&target.slot).status.health)
    }

    fn spawn(
        &self,
        key: &K,
        addr: SocketAddr,
        spec: &CheckSpec,
        slot: &Arc<Mutex<Slot>>,
        generation: u64,
    ) -> JoinHandle<()> {
        if let Err(e) = spec.validate() {
            warn!(key = ?key, %addr, error = %e, "invalid health check spec; clamped to run");
        }
        self.runtime.spawn(run(
            key.clone(),
            addr,
            spec.sanitized(),
            Arc::clone(slot),
            generation,
            self.tx.clone(),
        ))
    }
}

impl<K> Drop for Checker<K> {
    fn drop(&mut self) {
        let targets = self
            .targets
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for target in targets.values() {
            stop(target);
        }
    }
}

/// Aborts the target's task and fences it off; returns the new generation.
fn stop(target: &Target) -> u64 {
    target.task.abort();
    let mut slot = lock(&target.slot);
    slot.generation += 1;
    slot.generation
}

/// A panicked holder leaves plain data behind, still fit to read.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fixed offset within the first tenth of the interval, so targets added
/// together do not probe in lockstep, yet the first probe comes promptly.
fn phase<K: Hash>(key: &K, addr: SocketAddr, interval: Duration) -> Duration {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    addr.hash(&mut hasher);
    let window = u64::try_from((interval / 10).as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(hasher.finish() % window.saturating_add(1))
}

/// The probe loop of one target; runs until aborted.
async fn run<K: Clone + Hash + Debug>(
    key: K,
    addr: SocketAddr,
    spec: CheckSpec,
    slot: Arc<Mutex<Slot>>,
    generation: u64,
    tx: mpsc::UnboundedSender<Transition<K>>,
) {
    let start = Instant::now() + phase(&key, addr, spec.interval);
    let mut ticker = tokio::time::interval_at(start, spec.interval);
    // A late probe shifts the schedule instead of bursting to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let began = Instant::now();
        let outcome = match tokio::time::timeout(
            spec.timeout,
            probe(&spec.probe, spec.netns.as_deref(), addr),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Timeout {
                after: spec.timeout,
            }),
        };
        debug!(
            key = ?key,
            %addr,
            ok = outcome.is_ok(),
            error = outcome.as_ref().err().map(tracing::field::display),
            elapsed_ms = began.elapsed().as_millis(),
            "health probe"
        );
        let mut guard = lock(&slot);
        if guard.generation != generation {
            return;
        }
        let status = &mut guard.status;
        if let Some(health) = record(status, &outcome, &spec, now_unix_ms()) {
            let reason = match (health, &outcome) {
                (Health::Down, Err(e)) => format!(
                    "{} consecutive failures, last: {e}",
                    status.consecutive_fail
                ),
                _ => format!("{} consecutive successes", status.consecutive_ok),
            };
            info!(key = ?key, %addr, ?health, %reason, "backend health changed");
            // Sent under the lock so transitions keep the order of the
            // status they describe; an unbounded send never waits.
            let _ = tx.send(Transition {
                key: key.clone(),
                addr,
                health,
                status: status.clone(),
            });
        }
    }
}

/// Applies one probe result; returns the new health if it changed.
fn record(
    status: &mut Status,
    outcome: &Result<(), ProbeError>,
    spec: &CheckSpec,
    now_ms: u64,
) -> Option<Health> {
    status.checks = status.checks.saturating_add(1);
    status.last_check_unix_ms = Some(now_ms);
    let changed = match outcome {
        Ok(()) => {
            status.consecutive_ok = status.consecutive_ok.saturating_add(1);
            status.consecutive_fail = 0;
            (status.health == Health::Down && status.consecutive_ok >= spec.rise)
                .then_some(Health::Up)
        }
        Err(e) => {
            status.consecutive_fail = status.consecutive_fail.saturating_add(1);
            status.consecutive_ok = 0;
            status.last_error = Some(e.to_string());
            (status.health == Health::Up && status.consecutive_fail >= spec.fall)
                .then_some(Health::Down)
        }
    };
    if let Some(health) = changed {
        status.health = health;
        status.since_unix_ms = now_ms;
    }
    changed
}

async fn probe(probe: &Probe, netns: Option<&str>, addr: SocketAddr) -> Result<(), ProbeError> {
    let stream = match netns {
        None => TcpStream::connect(addr).await,
        Some(name) => {
            let name = name.to_string();
            let v6 = addr.is_ipv6();
            let fd = tokio::task::spawn_blocking(move || crate::netns::tcp_socket_in(&name, v6))
                .await
                .map_err(|e| ProbeError::Connect {
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| ProbeError::Netns { source })?;
            tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
                .connect(addr)
                .await
        }
    }
    .map_err(|source| ProbeError::Connect { source })?;
    match probe {
        // Dropping the stream closes it: the handshake was the whole check.
        Probe::Tcp => Ok(()),
        Probe::Http {
            path,
            expect_status,
            host,
        } => http_probe(stream, addr, path, *expect_status, host.as_deref()).await,
    }
}

async fn http_probe(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    expect_status: u16,
    host: Option<&str>,
) -> Result<(), ProbeError> {
    let host = host.map_or_else(|| addr.to_string(), str::to_owned);
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", host)
        .header("connection", "close")
        .header("user-agent", "sluice-health")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ProbeError::Request { source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Http { source })?;
    // The connection is driven here rather than spawned, so the caller's
    // timeout (or returning) drops it along with the socket.
    let response = sender.send_request(req);
    tokio::pin!(conn, response);
    let result = tokio::select! {
        biased;
        r = &mut response => r,
        c = &mut conn => match c {
            Err(source) => return Err(ProbeError::Http { source }),
            // The connection may finish in the same poll that delivered the
            // response; the response future then resolves at once.
            Ok(()) => response.await,
        },
    };
    let got = result
        .map_err(|source| ProbeError::Http { source })?
        .status()
        .as_u16();
    if got == expect_status {
        Ok(())
    } else {
        Err(ProbeError::Status {
            got,
            expected: expect_status,
        })
    }
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text
        .find(" (os error")
        .map_or(text.as_str(), |i| &text[..i]);
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

    use tokio::{net::TcpListener, sync::mpsc::error::TryRecvError};

    use super::*;
    use crate::model::lb::health::HealthError;

    const INTERVAL: Duration = Duration::from_millis(40);
    const WAIT: Duration = Duration::from_secs(5);

    fn tcp_spec(rise: u32, fall: u32) -> CheckSpec {
        CheckSpec {
            probe: Probe::Tcp,
            interval: INTERVAL,
            timeout: INTERVAL,
            rise,
            fall,
            netns: None,
        }
    }

    fn http_spec(host: Option<&str>, rise: u32, fall: u32) -> CheckSpec {
        CheckSpec {
            probe: Probe::Http {
                path: "/healthz".into(),
                expect_status: 200,
                host: host.map(str::to_owned),
            },
            interval: INTERVAL,
            timeout: Duration::from_millis(30),
            rise,
            fall,
            netns: None,
        }
    }

    async fn next<K>(rx: &mut mpsc::UnboundedReceiver<Transition<K>>) -> Transition<K> {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no transition within 5 s")
            .expect("transition channel closed")
    }

    /// Asserts nothing arrives for `n` intervals.
    async fn quiet<K: Debug>(rx: &mut mpsc::UnboundedReceiver<Transition<K>>, n: u32) {
        tokio::time::sleep(INTERVAL * n).await;
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("unexpected transition: {other:?}"),
        }
    }

    /// Polls until `cond` holds on the key's status, or fails after 5 s.
    async fn wait_status<K: Clone + Eq + Hash + Debug + Send + Sync + 'static>(
        checker: &Checker<K>,
        key: &K,
        what: &str,
        cond: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = checker.status_of(key).expect("target not checked");
            if cond(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A listener that accepts and closes connections, counting them.
    struct TcpServer {
        addr: SocketAddr,
        accepted: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl TcpServer {
        async fn start(addr: SocketAddr) -> Self {
            let listener = TcpListener::bind(addr).await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let accepted = Arc::new(AtomicU64::new(0));
            let count = Arc::clone(&accepted);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                }
            });
            Self {
                addr,
                accepted,
                task,
            }
        }

        fn count(&self) -> u64 {
            self.accepted.load(Ordering::SeqCst)
        }

        /// Stops listening; the port is closed once this returns.
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    // The crate's tokio lacks io-util; readiness plus try_* does the same.
    async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            stream.readable().await?;
            match stream.try_read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }

    async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            stream.writable().await?;
            match stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A minimal HTTP server answering every request with `status`.
    struct HttpServer {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        last_head: Arc<Mutex<String>>,
        task: JoinHandle<()>,
    }

    impl HttpServer {
        async fn start(bind: &str) -> Self {
            let listener = TcpListener::bind(bind).await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let status = Arc::new(AtomicU16::new(200));
            let last_head = Arc::new(Mutex::new(String::new()));
            let (code, head) = (Arc::clone(&status), Arc::clone(&last_head));
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (code, head) = (Arc::clone(&code), Arc::clone(&head));
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                            match read_some(&stream, &mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        *lock(&head) = String::from_utf8_lossy(&buf).into_owned();
                        let reply = format!(
                            "HTTP/1.1 {} Whatever\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                            code.load(Ordering::SeqCst)
                        );
                        let _ = write_all(&stream, reply.as_bytes()).await;
                    });
                }
            });
            Self {
                addr,
                status,
                last_head,
                task,
            }
        }

        fn head(&self) -> String {
            lock(&self.last_head).to_ascii_lowercase()
        }
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[test]
    fn record_follows_rise_and_fall() {
        let spec = tcp_spec(2, 3);
        let mut status = Status {
            health: Health::Up,
            since_unix_ms: 0,
            last_check_unix_ms: None,
            last_error: None,
            consecutive_ok: 0,
            consecutive_fail: 0,
            checks: 0,
        };
        let fail = || {
            Err(ProbeError::Status {
                got: 503,
                expected: 200,
            })
        };
        // (outcome, expected transition, health after)
        let steps: Vec<(Result<(), ProbeError>, Option<Health>, Health)> = vec![
            (fail(), None, Health::Up),
            (fail(), None, Health::Up),
            (Ok(()), None, Health::Up), // resets the failure run
            (fail(), None, Health::Up),
            (fail(), None, Health::Up),
            (fail(), Some(Health::Down), Health::Down),
            (fail(), None, Health::Down),
            (Ok(()), None, Health::Down),
            (fail(), None, Health::Down), // resets the success run
            (Ok(()), None, Health::Down),
            (Ok(()), Some(Health::Up), Health::Up),
            (Ok(()), None, Health::Up),
        ];
        for (i, (outcome, want, after)) in steps.iter().enumerate() {
            let now = 1000 + i as u64;
            assert_eq!(record(&mut status, outcome, &spec, now), *want, "step {i}");
            assert_eq!(status.health, *after, "step {i}");
            assert_eq!(status.checks, i as u64 + 1);
            assert_eq!(status.last_check_unix_ms, Some(now));
            if want.is_some() {
                assert_eq!(status.since_unix_ms, now, "step {i}");
            }
        }
        assert_eq!(
            status.last_error.as_deref(),
            Some("http status 503, expected 200")
        );
        assert_eq!(status.since_unix_ms, 1010);
    }

    #[test]
    fn phase_is_stable_and_within_a_tenth() {
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        for key in 0..100u32 {
            let p = phase(&key, addr, Duration::from_secs(1));
            assert!(p <= Duration::from_millis(100), "{p:?}");
            assert_eq!(p, phase(&key, addr, Duration::from_secs(1)));
        }
        let distinct: std::collections::HashSet<_> = (0..100u32)
            .map(|k| phase(&k, addr, Duration::from_secs(1)))
            .collect();
        assert!(
            distinct.len() > 50,
            "phases barely spread: {}",
            distinct.len()
        );
    }

    #[tokio::test]
    async fn tcp_down_after_fall_and_up_after_rise() {
        let (rise, fall) = (2, 3);
        let server = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
        let addr = server.addr;
        let (checker, mut rx) = Checker::new();
        checker.set_targets(vec![("web", addr, tcp_spec(rise, fall))]);
        assert_eq!(checker.health(&"web"), Some(Health::Up));

        // A healthy backend produces no transition at all.
        wait_status(&checker, &"web", "three checks", |s| s.checks >= 3).await;
        quiet(&mut rx, 3).await;
        let s = checker.status_of(&"web").unwrap();
        assert_eq!(
            (s.health, s.consecutive_fail, s.last_error),
            (Health::Up, 0, None)
        );
        assert!(server.count() >= 3, "accepted {}", server.count());

        server.stop().await;
        let stopped = Instant::now();
        let t = next(&mut rx).await;
        let elapsed = stopped.elapsed();
        assert_eq!((t.key, t.addr, t.health), ("web", addr, Health::Down));
        assert_eq!(t.status.health, Health::Down);
        assert_eq!(t.status.consecutive_fail, fall, "{:?}", t.status);
        assert_eq!(
            t.status.last_error.as_deref(),
            Some("connect: connection refused")
        );
        // Ticks fire at their scheduled time or later, so only the first
        // failing tick's lateness can shorten the gap; allow half an interval.
        let earliest = (INTERVAL * (fall - 1)).saturating_sub(INTERVAL / 2);
        assert!(elapsed >= earliest, "Down after only {elapsed:?}");
        assert_eq!(checker.health(&"web"), Some(Health::Down));
        // Exactly one Down, however many more failures follow.
        quiet(&mut rx, 4).await;
        assert!(checker.status_of(&"web").unwrap().consecutive_fail > fall);

        let server = TcpServer::start(addr).await;
        let t = next(&mut rx).await;
        assert_eq!((t.key, t.health), ("web", Health::Up));
        assert_eq!(t.status.consecutive_ok, rise, "{:?}", t.status);
        assert_eq!(t.status.consecutive_fail, 0);
        assert!(server.count() >= u64::from(rise));
        quiet(&mut rx, 3).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn http_follows_the_status_code() {
        let server = HttpServer::start("127.0.0.1:0").await;
        let (checker, mut rx) = Checker::new();
        checker.set_targets(vec![(1u32, server.addr, http_spec(None, 2, 2))]);
        wait_status(&checker, &1, "three checks", |s| s.checks >= 3).await;
        quiet(&mut rx, 2).await;
        let s = checker.status_of(&1).unwrap();
        assert_eq!((s.health, s.last_error), (Health::Up, None));
        let head = server.head();
        assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("host: {}\r\n", server.addr)),
            "{head}"
        );
        assert!(head.contains("user-agent: sluice-health\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");

        server.status.store(503, Ordering::SeqCst);
        let t = next(&mut rx).await;
        assert_eq!(t.health, Health::Down);
        assert_eq!(
            t.status.last_error.as_deref(),
            Some("http status 503, expected 200")
        );
        quiet(&mut rx, 2).await;

        server.status.store(200, Ordering::SeqCst);
        let t = next(&mut rx).await;
        assert_eq!(t.health, Health::Up);
        assert_eq!(t.status.consecutive_ok, 2);
        // The last failure stays visible after recovery.
        assert!(t.status.last_error.unwrap().contains("503"));
    }

    #[tokio::test]
    async fn http_sends_the_configured_host() {
        let server = HttpServer::start("127.0.0.1:0").await;
        let (checker, _rx) = Checker::new();
        checker.set_targets(vec![(
            1u32,
            server.addr,
            http_spec(Some("backend.example"), 1, 1),
        )]);
        wait_status(&checker, &1, "a check", |s| s.checks >= 2).await;
        let head = server.head();
        assert!(head.contains("host: backend.example\r\n"), "{head}");
        assert_eq!(checker.health(&1), Some(Health::Up));
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        // Accepts and reads but never answers; holds only the latest socket.
        let hold = tokio::spawn(async move {
            let mut held = None;
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held = Some(stream);
            }
            drop(held);
        });
        let (checker, mut rx) = Checker::new();
        let spec = http_spec(None, 1, 2);
        checker.set_targets(vec![("slow", addr, spec.clone())]);
        let t = next(&mut rx).await;
        assert_eq!(t.health, Health::Down);
        assert_eq!(t.status.consecutive_fail, 2);
        assert_eq!(
            t.status.last_error.as_deref(),
            Some(format!("timeout after {:?}", spec.timeout).as_str())
        );
        assert!(accepted.load(Ordering::SeqCst) >= 2, "it did connect");
        hold.abort();
    }

    #[tokio::test]
    async fn http_connection_closed_without_answer_fails() {
        // Accepts then closes at once: connect succeeds, HTTP does not.
        let server = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
        let (checker, mut rx) = Checker::new();
        checker.set_targets(vec![("rude", server.addr, http_spec(None, 1, 1))]);
        let t = next(&mut rx).await;
        assert_eq!(t.health, Health::Down);
        let err = t.status.last_error.unwrap();
        assert!(err.starts_with("http: "), "{err}");
        server.stop().await;
    }

    #[tokio::test]
    async fn set_targets_reconciles() {
        let a = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
        let b = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
        // Nothing listens here once the probe server is gone.
        let dead = {
            let s = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
            let addr = s.addr;
            s.stop().await;
            addr
        };
        let (checker, mut rx) = Checker::new();
        let targets = |with_b: bool, c_addr: SocketAddr, c_spec: CheckSpec| {
            let mut t = vec![("a", a.addr, tcp_spec(1, 1)), ("c", c_addr, c_spec)];
            if with_b {
                t.push(("b", b.addr, tcp_spec(1, 1)));
            }
            t
        };
        checker.set_targets(targets(true, dead, tcp_spec(1, 1)));
        let t = next(&mut rx).await;
        assert_eq!((t.key, t.health), ("c", Health::Down));
        wait_status(&checker, &"a", "checks", |s| s.checks >= 3).await;
        wait_status(&checker, &"b", "checks", |s| s.checks >= 3).await;

        // The same list again disturbs nothing.
        let before = checker.status_of(&"a").unwrap();
        checker.set_targets(targets(true, dead, tcp_spec(1, 1)));
        let after = checker.status_of(&"a").unwrap();
        assert!(after.checks >= before.checks && after.consecutive_ok >= before.consecutive_ok);

        // Removing b stops its probes; a is untouched; c's spec changes.
        let a_before = checker.status_of(&"a").unwrap();
        let c_before = checker.status_of(&"c").unwrap();
        assert!(c_before.checks >= 1);
        let slower = CheckSpec {
            interval: INTERVAL * 2,
            ..tcp_spec(1, 1)
        };
        checker.set_targets(targets(false, dead, slower.clone()));
        let a_after = checker.status_of(&"a").unwrap();
        assert!(a_after.checks >= a_before.checks, "a was restarted");
        assert!(
            a_after.consecutive_ok >= a_before.consecutive_ok,
            "a was restarted"
        );
        let c_after = checker.status_of(&"c").unwrap();
        assert_eq!(
            (c_after.health, c_after.checks),
            (Health::Down, 0),
            "{c_after:?}"
        );
        assert_eq!(c_after.since_unix_ms, c_before.since_unix_ms);
        assert_eq!(checker.health(&"b"), None);
        assert_eq!(checker.status().len(), 2);

        // Let any probe in flight at removal land, then b must stay quiet.
        tokio::time::sleep(INTERVAL * 2).await;
        let b_count = b.count();
        tokio::time::sleep(INTERVAL * 5).await;
        assert_eq!(b.count(), b_count, "removed target still probed");
        // Meanwhile a kept going and c keeps being probed, still Down.
        let a_later = checker.status_of(&"a").unwrap();
        assert!(a_later.checks > a_after.checks + 2, "{a_later:?}");
        let c_later = checker.status_of(&"c").unwrap();
        assert!(c_later.checks >= 1 && c_later.health == Health::Down);
        match rx.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("unexpected transition: {other:?}"),
        }

        // Moving c to a live address: it stays Down until it rises there.
        checker.set_targets(targets(false, b.addr, slower));
        assert_eq!(checker.health(&"c"), Some(Health::Down));
        let b_count = b.count();
        let t = next(&mut rx).await;
        assert_eq!((t.key, t.addr, t.health), ("c", b.addr, Health::Up));
        assert!(b.count() > b_count);

        // Dropping the checker ends every task, which closes the channel.
        drop(checker);
        let closed = tokio::time::timeout(WAIT, async { while rx.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "probe tasks outlived the checker");
        tokio::time::sleep(INTERVAL * 2).await;
        let (a_count, b_count) = (a.count(), b.count());
        tokio::time::sleep(INTERVAL * 4).await;
        assert_eq!((a.count(), b.count()), (a_count, b_count));
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn ipv6_targets_work() {
        let tcp = TcpServer::start("[::1]:0".parse().unwrap()).await;
        let http = HttpServer::start("[::1]:0").await;
        let (checker, mut rx) = Checker::new();
        checker.set_targets(vec![
            ("tcp", tcp.addr, tcp_spec(1, 2)),
            ("http", http.addr, http_spec(None, 1, 2)),
        ]);
        wait_status(&checker, &"tcp", "checks", |s| s.checks >= 2).await;
        wait_status(&checker, &"http", "checks", |s| s.checks >= 2).await;
        quiet(&mut rx, 2).await;
        assert!(tcp.count() >= 2);
        let head = http.head();
        assert!(head.contains(&format!("host: {}\r\n", http.addr)), "{head}");
        assert!(head.contains("host: [::1]:"), "{head}");

        let addr = tcp.addr;
        tcp.stop().await;
        http.status.store(500, Ordering::SeqCst);
        let mut downs = [next(&mut rx).await, next(&mut rx).await];
        downs.sort_by_key(|t| t.key);
        assert_eq!(
            downs.iter().map(|t| (t.key, t.health)).collect::<Vec<_>>(),
            [("http", Health::Down), ("tcp", Health::Down)]
        );
        assert_eq!(downs[1].addr, addr);
        assert!(
            downs[0]
                .status
                .last_error
                .as_deref()
                .unwrap()
                .contains("500")
        );
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        let good = http_spec(Some("backend.example"), 2, 3);
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(tcp_spec(1, 1).validate(), Ok(()));
        let with_http = |path: &str, status: u16, host: Option<&str>| CheckSpec {
            probe: Probe::Http {
                path: path.into(),
                expect_status: status,
                host: host.map(str::to_owned),
            },
            ..good.clone()
        };
        let cases: Vec<(&str, CheckSpec, HealthError)> = vec![
            (
                "zero interval",
                CheckSpec {
                    interval: Duration::ZERO,
                    ..good.clone()
                },
                HealthError::ZeroInterval,
            ),
            (
                "zero timeout",
                CheckSpec {
                    timeout: Duration::ZERO,
                    ..good.clone()
                },
                HealthError::ZeroTimeout,
            ),
            (
                "timeout over interval",
                CheckSpec {
                    timeout: Duration::from_millis(41),
                    ..good.clone()
                },
                HealthError::TimeoutExceedsInterval {
                    timeout: Duration::from_millis(41),
                    interval: INTERVAL,
                },
            ),
            (
                "zero rise",
                CheckSpec {
                    rise: 0,
                    ..good.clone()
                },
                HealthError::ZeroRise,
            ),
            (
                "zero fall",
                CheckSpec {
                    fall: 0,
                    ..good.clone()
                },
                HealthError::ZeroFall,
            ),
            (
                "relative path",
                with_http("healthz", 200, None),
                HealthError::RelativePath {
                    path: "healthz".into(),
                },
            ),
            (
                "empty path",
                with_http("", 200, None),
                HealthError::RelativePath {
                    path: String::new(),
                },
            ),
            (
                "path with a space",
                with_http("/a b", 200, None),
                HealthError::InvalidPath {
                    path: "/a b".into(),
                },
            ),
            (
                "host with a newline",
                with_http("/", 200, Some("a\nb")),
                HealthError::InvalidHost {
                    host: "a\nb".into(),
                },
            ),
            (
                "empty host",
                with_http("/", 200, Some("")),
                HealthError::InvalidHost {
                    host: String::new(),
                },
            ),
            (
                "status below 100",
                with_http("/", 99, None),
                HealthError::InvalidStatus { status: 99 },
            ),
            (
                "status above 599",
                with_http("/", 600, None),
                HealthError::InvalidStatus { status: 600 },
            ),
        ];
        for (what, spec, want) in cases {
            assert_eq!(spec.validate(), Err(want), "{what}");
        }
        // Both ends of the status range and timeout == interval are fine.
        for status in [100, 599] {
            assert_eq!(with_http("/x?y=1", status, None).validate(), Ok(()));
        }
        let equal = CheckSpec {
            timeout: INTERVAL,
            ..good
        };
        assert_eq!(equal.validate(), Ok(()));
    }

    #[tokio::test]
    async fn invalid_spec_is_clamped_not_fatal() {
        let server = TcpServer::start("127.0.0.1:0".parse().unwrap()).await;
        let (checker, _rx) = Checker::new();
        let bad = CheckSpec {
            probe: Probe::Tcp,
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
            rise: 0,
            fall: 0,
            netns: None,
        };
        assert!(bad.validate().is_err());
        checker.set_targets(vec![(0u8, server.addr, bad)]);
        wait_status(&checker, &0, "checks", |s| s.checks >= 3).await;
        assert_eq!(checker.health(&0), Some(Health::Up));
        server.stop().await;
    }
}
