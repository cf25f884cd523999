//! Running commands with a deadline, stopping cleanly on SIGINT/SIGTERM, and
//! the names every resource the benchmarks make carries.

use std::{
    ffi::OsStr,
    io::{Read as _, Write as _},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prefix of every network namespace and bpffs pin root the benchmarks make.
pub const PREFIX: &str = "sluice-bench-";

static STOP: AtomicBool = AtomicBool::new(false);
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `sluice-bench-<pid>-<n>-<tag>`: unique in this process, and tells a later
/// run which process made it (see [`crate::netns::sweep_stale`]).
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if tag.is_empty() {
        format!("{PREFIX}{}-{n}", std::process::id())
    } else {
        format!("{PREFIX}{}-{n}-{tag}", std::process::id())
    }
}

/// The pid in `sluice-bench-<pid>-...`, if the name has one.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing the process, so the
/// benchmark returns an error from where it is and every guard is dropped.
pub fn install_signal_handlers() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Keeps one run's sample, or its error so the configuration is skipped
/// from then on and reported; a stop request ends the section instead.
pub fn keep<T>(r: Result<T>, samples: &mut Vec<T>, error: &mut Option<String>) -> Result<()> {
    match r {
        Ok(s) => samples.push(s),
        Err(e) => {
            if stopping() {
                return Err(e);
            }
            eprintln!("    error: {e:#}");
            *error = Some(format!("{e:#}"));
        }
    }
    Ok(())
}

/// Fails when a stop was requested; called between steps.
pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// What a command did within its time limit.
pub struct Finished {
    pub output: Output,
    pub elapsed: Duration,
    /// Killed at the deadline (or on a stop request).
    pub timed_out: bool,
}

impl Finished {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn ok(&self) -> bool {
        !self.timed_out && self.output.status.success()
    }
}

/// Runs `argv` with `input` on stdin, killing it at `timeout` (or on a stop
/// request). Output is captured on threads so a chatty child never blocks.
pub fn run_timed<S: AsRef<OsStr>>(
    argv: &[S],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Finished> {
    let desc: Vec<String> = argv
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", desc.join(" ")))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let in_t = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                let _ = stdin.write_all(&data);
            }))
        }
        _ => None,
    };
    let deadline = start + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline || stopping() {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    if let Some(t) = in_t {
        let _ = t.join();
    }
    Ok(Finished {
        output: Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        },
        elapsed,
        timed_out,
    })
}

/// Runs `argv` (30 s limit) and fails, with its stderr, unless it succeeds.
pub fn run_ok<S: AsRef<OsStr>>(argv: &[S]) -> Result<String> {
    let f = run_timed(argv, None, Duration::from_secs(30))?;
    if !f.ok() {
        bail!(
            "{} failed ({}{}): {}",
            argv.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            f.output.status,
            if f.timed_out { ", timed out" } else { "" },
            f.stderr().trim()
        );
    }
    Ok(f.stdout())
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Closes a TCP stream with RST (SO_LINGER 0): no TIME_WAIT, so tens of
/// thousands of connects do not run out of ephemeral ports.
pub fn close_now(s: std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this function owns, with a valid struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
