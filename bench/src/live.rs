//! The live traffic machinery: a lab (two namespaces and a veth pair), the
//! generator threads (one per CPU, each in the sender namespace, pinned),
//! and one timed flood measured against a receiver-side drop counter.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    frames,
    netns::{self, Lab},
    progs::Generator,
    util,
};

/// Distinct IPv4 sources the generator cycles through: 198.18.0.0/16.
pub const GEN_SOURCES: u32 = 65_536;
pub const GEN_SOURCE_NET: &str = "198.18.0.0/16";

/// The 64-byte frame the generator starts from: UDP from 198.18.0.0 to the
/// receiver, addressed to the receiver's MAC so its stack takes it as its own.
pub fn flood_frame(lab: &Lab) -> Vec<u8> {
    let mut s = frames::Spec::new(
        "198.18.0.0".parse().expect("valid"),
        std::net::Ipv4Addr::from(netns::RX_V4).into(),
        frames::L4::Udp,
    );
    s.src_mac = lab.tx_mac;
    s.dst_mac = lab.rx_mac;
    s.dport = 9;
    s.min_len = 64;
    frames::build(&s)
}

/// How long one generator call aims to send for.
const CALL_TARGET: Duration = Duration::from_millis(200);

/// What one flood did.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// Frames the generator produced.
    pub sent: u64,
    /// The generator's own running time.
    pub gen_elapsed: Duration,
    /// Frames the receiver's veth took off its rings (NAPI), whole flood.
    pub arrived: u64,
    /// Arrivals inside the measurement window (after the warm-up), and the
    /// window's length: the rate is their quotient.
    pub window_arrivals: u64,
    pub window: Duration,
    /// The receiver had not drained its rings within the drain limit.
    pub drain_timed_out: bool,
    /// From the generator's first frame until the receiver went idle
    /// (its arrivals stopped growing after the generator stopped).
    pub busy: Duration,
}

/// Below this many arrivals in the window the receiver is so slow that
/// its NAPI polls (whose counts land when a poll ends) are coarser than the
/// window: the rate is then taken over the whole flood, drain included.
pub const MIN_WINDOW_FRAMES: u64 = 5_000;

impl Flood {
    /// Frames per second the receiver took in (Mpps): over the window, or
    /// for very slow receivers over the whole flood.
    pub fn mpps(&self) -> f64 {
        if self.whole_flood() {
            self.arrived as f64 / self.busy.as_secs_f64() / 1e6
        } else {
            self.window_arrivals as f64 / self.window.as_secs_f64() / 1e6
        }
    }

    pub fn whole_flood(&self) -> bool {
        self.window_arrivals < MIN_WINDOW_FRAMES
    }

    /// Frames per second the generator produced (Mpps).
    pub fn offered_mpps(&self) -> f64 {
        self.sent as f64 / self.gen_elapsed.as_secs_f64() / 1e6
    }
}

/// (instant, arrivals): the counter read between two clock reads, stamped
/// at their midpoint.
fn sample(lab: &Lab) -> Result<(Instant, u64)> {
    let a = Instant::now();
    let v = lab.rx_stats.sum("_xdp_packets")?;
    let b = Instant::now();
    Ok((a + (b - a) / 2, v))
}

/// Floods the receiver with the plan's generator threads: its warm-up, then
/// a measurement window, then stops and waits (at most the plan's drain
/// limit) until the receiver has taken every queued frame.
pub fn flood(lab: &Lab, plan: &crate::Plan) -> Result<Flood> {
    let (threads, warmup, window, drain_limit) = (
        plan.gen_threads,
        plan.live_warmup,
        plan.live_window,
        plan.live_drain,
    );
    util::check_stop()?;
    let frame = Arc::new(flood_frame(lab));
    let (_, arr0) = sample(lab)?;
    let cpus = available_cpus();
    let ncpus = cpus.len().max(1);
    // Loading a generator takes a while (and longer on a busy machine): the
    // clock starts when every generator is ready, or a short window could
    // be over before the first frame is sent.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let mut handles = Vec::new();
    for t in 0..threads {
        let frame = frame.clone();
        let ifindex = lab.tx_ifindex;
        let cpu = cpus.get(t % cpus.len().max(1)).copied();
        let ready = ready_tx.clone();
        handles.push(lab.tx.spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu);
            }
            let mut generator = Generator::new(GEN_SOURCES)?;
            let _ = ready.send(());
            drop(ready);
            let deadline = Instant::now() + warmup + window;
            let mut sent = 0u64;
            // Each call has a fixed set-up cost (page pool; tens of ms here,
            // mostly asleep, which the other thread on the CPU fills). Calls
            // are sized from the kernel's time per frame of the last call
            // (which includes the receiver's softirq work on this CPU), times
            // the threads sharing the CPU, to last ~CALL_TARGET, the last one
            // ending near the deadline. The first call is one kernel batch:
            // against a receiver that needs milliseconds per packet even that
            // blocks for a while.
            let share = threads.div_ceil(ncpus).max(1) as f64;
            let mut chunk: u32 = crate::progs::GEN_BATCH;
            let first = Instant::now();
            while !util::stopping() && Instant::now() < deadline {
                let d = generator.send(&frame, ifindex, chunk)?;
                sent += u64::from(chunk);
                let per_frame = (d.as_nanos() as f64 * share).max(1.0);
                let left = deadline.saturating_duration_since(Instant::now());
                let target = left.min(CALL_TARGET).as_nanos() as f64;
                // Grow at most 64x per call, so one odd call cannot mislead.
                let grow = f64::from(chunk) * 64.0;
                chunk = (target / per_frame)
                    .min(grow)
                    .clamp(64.0, f64::from(1u32 << 24)) as u32;
            }
            Ok((sent, first, Instant::now()))
        })?);
    }
    // Wait for every generator (a thread that failed drops its sender; the
    // join below reports why).
    drop(ready_tx);
    for _ in 0..threads {
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            break;
        }
    }
    // Sample the window while the generators run; errors wait for the join.
    let window_result = (|| -> Result<((Instant, u64), (Instant, u64))> {
        sleep_checked(warmup)?;
        let s1 = sample(lab)?;
        sleep_checked(window)?;
        let s2 = sample(lab)?;
        Ok((s1, s2))
    })();
    let mut sent = 0;
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut err = None;
    for h in handles {
        match h.join() {
            Ok(Ok((s, f, l))) => {
                sent += s;
                first = Some(first.map_or(f, |x: Instant| x.min(f)));
                last = Some(last.map_or(l, |x: Instant| x.max(l)));
            }
            Ok(Err(e)) => err = Some(e),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    if let Some(e) = err {
        return Err(e.context("generator"));
    }
    let ((t1, a1), (t2, a2)) = window_result?;
    let (first, last) = (
        first.context("no generator thread ran")?,
        last.context("no generator thread ran")?,
    );
    // Let the receiver drain what is still queued on its rings.
    // A slow receiver may sit in one NAPI poll for a long time, so "idle"
    // means no change for STABLE after the last change.
    const STABLE: Duration = Duration::from_millis(100);
    let drain_deadline = Instant::now() + drain_limit;
    let (mut idle_at, mut prev) = sample(lab)?;
    idle_at = idle_at.min(last);
    let mut drain_timed_out = false;
    loop {
        thread::sleep(Duration::from_millis(5));
        let (at, now) = sample(lab)?;
        if now != prev {
            idle_at = at;
            prev = now;
        } else if at - idle_at.max(last) >= STABLE {
            break;
        }
        if Instant::now() > drain_deadline || util::stopping() {
            drain_timed_out = true;
            break;
        }
    }
    let (_, arr1) = sample(lab)?;
    Ok(Flood {
        sent,
        gen_elapsed: last - first,
        arrived: arr1 - arr0,
        window_arrivals: a2 - a1,
        window: t2 - t1,
        drain_timed_out,
        busy: idle_at.max(last) - first,
    })
}

fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        util::check_stop()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    Ok(())
}

/// Fails if the receiver's stack took more than a ring's worth of the
/// frames that arrived (delivered to L4 or forwarded): then the firewall
/// did not drop them.
pub fn check_not_delivered(what: &str, f: &Flood, delivered: u64) -> Result<()> {
    let slack = 1024 + f.arrived / 100;
    if f.arrived == 0 {
        bail!("{what}: no frames arrived (sent {})", f.sent);
    }
    if delivered > slack {
        bail!(
            "{what}: {delivered} of {} arrived frames got past the firewall into the stack",
            f.arrived
        );
    }
    Ok(())
}

/// (Ip InDelivers + Ip ForwDatagrams) of the calling thread's namespace.
pub fn stack_delivered_here() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no Ip lines in /proc/net/snmp");
    };
    let mut sum = 0u64;
    for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
        if n == "InDelivers" || n == "ForwDatagrams" {
            sum += v.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(sum)
}

/// CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|c| set.is_set(*c).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Fails unless frames arrived and the firewall under test dropped them
/// (its own counter agrees with the arrivals, within a ring's worth).
pub fn check_drops(what: &str, f: &Flood, dropped: u64) -> Result<()> {
    let slack = 1024 + f.arrived / 100;
    if f.arrived == 0 {
        bail!("{what}: no frames arrived (sent {})", f.sent);
    }
    if dropped + slack < f.arrived || dropped > f.arrived + slack {
        bail!(
            "{what}: the firewall's counter says {dropped} dropped but {} arrived (sent {})",
            f.arrived,
            f.sent
        );
    }
    Ok(())
}
