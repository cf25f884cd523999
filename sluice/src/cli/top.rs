//! `sluice top`: a live view of rates by verdict and reason, top talkers, map
//! occupancy and event counters, read from the agent every interval.

pub mod model;
pub mod render;

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use hyper::Method;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use self::model::{By, Sample, Snapshot};
use crate::api::client::{Client, ClientError};

/// Sources and destinations asked of the agent at least: more than are shown,
/// so a talker that climbs into the shown rows usually has a rate at once.
const FETCH_AT_LEAST: usize = 50;
/// The agent's largest top list.
const FETCH_AT_MOST: usize = crate::api::flows::MAX_TOP;
/// How often the terminal view looks for keys and signals.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes (0.1 to 3600).
    #[arg(long, default_value = "1", value_name = "SECS", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one frame (rates over one interval) as text, or JSON with
    /// --json, and exit.
    #[arg(long)]
    pub once: bool,
    /// Stop after N frames (without --once).
    #[arg(long, value_name = "N", conflicts_with = "once")]
    pub count: Option<u64>,
    /// Rows of the top sources and destinations (1 to 1000).
    #[arg(
        long,
        default_value_t = 10,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000)
    )]
    pub top: usize,
    /// Rank the top sources and destinations by packets or bytes.
    #[arg(long, value_enum, default_value = "packets")]
    pub by: By,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a number of seconds from 0.1 to 3600")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the terminal: {source}")]
    Terminal { source: std::io::Error },
    #[error("writing to stdout: {source}")]
    Stdout { source: std::io::Error },
}

/// Reads samples from the agent.
struct Reader {
    client: Client,
    origin: Instant,
    limit: usize,
    by: By,
}

/// `Ok(None)` for a route the agent does not serve (an older agent).
fn optional<T>(r: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::Refused { status: 404, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Reader {
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.client.call(Method::GET, path, None::<&()>)
    }

    fn sample(&self) -> Result<Sample, ClientError> {
        let stats = self.get("/v1/stats?top=0")?;
        let at = self.origin.elapsed();
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let events = optional(self.get("/v1/events"))?;
        let status = self.get("/v1/status")?;
        let top = optional(self.get(&format!(
            "/v1/flows/top?limit={}&by={}",
            self.limit,
            self.by.name()
        )))?;
        let flow_stats = optional(self.get("/v1/flows/stats"))?;
        // Without the walk of the connection table (too slow to repeat).
        let lb = optional(self.get("/v1/lb?active=false"))?;
        Ok(Sample {
            at,
            unix_ns,
            stats,
            status,
            top,
            top_limit: self.limit,
            flow_stats,
            events,
            lb,
        })
    }
}

/// Runs `sluice top` against the agent at `socket`.
pub fn run(socket: &Path, args: &TopArgs, json: bool) -> Result<(), TopError> {
    let Some((client, info)) = Client::connect(socket)? else {
        return Err(ClientError::NoAgent {
            path: socket.to_path_buf(),
            reason:
                "`sluice top` reads from the agent; start one with `sluice agent --config FILE`"
                    .into(),
        }
        .into());
    };
    let reader = Reader {
        client,
        origin: Instant::now(),
        limit: args.top.clamp(FETCH_AT_LEAST, FETCH_AT_MOST),
        by: args.by,
    };
    let header = format!(
        "agent {} (pin root {}, policy version {})",
        socket.display(),
        info.pin_root.display(),
        info.policy_version
    );
    if args.once {
        let first = reader.sample()?;
        std::thread::sleep(args.interval);
        let second = reader.sample()?;
        let snap = model::compute(Some(&first), &second, args.by, args.top);
        let text = if json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&snap).expect("a snapshot serialises")
            )
        } else {
            render::plain(&snap, &header)
        };
        return write_out(&text);
    }
    if json || !std::io::stdout().is_terminal() {
        return stream(&reader, args, json, &header);
    }
    tui(reader, args, &header)
}

fn write_out(text: &str) -> Result<(), TopError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| TopError::Stdout { source })
}

/// Frames as text blocks (or JSON lines), one per interval, the first after
/// one interval so that every frame has rates. A failed reading is reported
/// on stderr and the next one tried.
fn stream(reader: &Reader, args: &TopArgs, json: bool, header: &str) -> Result<(), TopError> {
    let mut prev = reader.sample().map_err(|e| warn(&e)).ok();
    let mut frames = 0;
    let mut next = Instant::now() + args.interval;
    while args.count.is_none_or(|n| frames < n) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += args.interval;
        let cur = match reader.sample() {
            Ok(s) => s,
            Err(e) => {
                warn(&e);
                continue;
            }
        };
        let snap = model::compute(prev.as_ref(), &cur, args.by, args.top);
        let text = if json {
            format!(
                "{}\n",
                serde_json::to_string(&snap).expect("a snapshot serialises")
            )
        } else {
            render::plain(&snap, header)
        };
        write_out(&text)?;
        prev = Some(cur);
        frames += 1;
    }
    Ok(())
}

fn warn(e: &ClientError) {
    eprintln!("sluice: top: {e}");
}

/// Set by SIGTERM, SIGHUP and SIGINT while the terminal view runs, so that
/// it restores the terminal before exiting.
static STOP: AtomicBool = AtomicBool::new(false);
/// How long the view may take to stop after a signal before the watchdog
/// ends the process.
const STOP_GRACE: Duration = Duration::from_secs(1);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The terminal in raw mode on the alternate screen; put back on drop (any
/// return, error or unwinding panic) and by ratatui's panic hook.
struct Screen {
    terminal: ratatui::DefaultTerminal,
}

impl Screen {
    fn enter() -> Result<Self, TopError> {
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe {
                libc::signal(
                    sig,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
        // After a hang-up crossterm's read spins on the dead terminal and
        // never returns to the loop that would see the signal: end the
        // process from here if the view has not stopped in time.
        std::thread::spawn(|| {
            while !STOP.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
            }
            std::thread::sleep(STOP_GRACE);
            let _ = ratatui::try_restore();
            std::process::exit(1);
        });
        match ratatui::try_init() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(source) => {
                // Half-way (raw mode on, no alternate screen): undo it.
                let _ = ratatui::try_restore();
                Err(TopError::Terminal { source })
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = ratatui::try_restore();
    }
}

fn terminal_err(source: std::io::Error) -> TopError {
    TopError::Terminal { source }
}

/// The live view. Readings come from a thread of their own, so keys are
/// answered while the agent is slow to reply.
fn tui(reader: Reader, args: &TopArgs, header: &str) -> Result<(), TopError> {
    let (tx, rx) = mpsc::channel::<Result<Sample, String>>();
    let interval = args.interval;
    std::thread::spawn(move || {
        let mut next = Instant::now();
        loop {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += interval;
            if tx.send(reader.sample().map_err(|e| e.to_string())).is_err() {
                break;
            }
        }
    });
    let mut screen = Screen::enter()?;
    let mut prev: Option<Sample> = None;
    let mut snap: Option<Snapshot> = None;
    let mut error: Option<String> = None;
    let mut frames = 0u64;
    let mut dirty = true;
    loop {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        loop {
            match rx.try_recv() {
                Ok(Ok(cur)) => {
                    snap = Some(model::compute(prev.as_ref(), &cur, args.by, args.top));
                    prev = Some(cur);
                    error = None;
                    frames += 1;
                }
                Ok(Err(e)) => error = Some(e),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    error = Some("the reader stopped".into());
                    break;
                }
            }
            dirty = true;
        }
        if dirty {
            screen
                .terminal
                .draw(|f| render::draw(f, snap.as_ref(), header, error.as_deref()))
                .map_err(terminal_err)?;
            dirty = false;
        }
        if args.count.is_some_and(|n| frames >= n) {
            break;
        }
        if event::poll(POLL).map_err(terminal_err)? {
            match event::read().map_err(terminal_err)? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        break;
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    drop(screen);
    Ok(())
}
