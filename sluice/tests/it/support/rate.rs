//! Rate plumbing for the DDoS tests: a pacer that offers traffic at a steady
//! rate by absolute deadlines, and a reference token bucket (GCRA) written
//! from the rule's words, to judge a limit against the very send times.

use std::{
    thread,
    time::{Duration, Instant},
};

use nix::time::{ClockId, clock_gettime};

/// CLOCK_BOOTTIME, the clock the kernel program reads, in nanoseconds.
pub fn boot_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("clock_gettime");
    u64::try_from(t.tv_sec()).expect("time") * 1_000_000_000
        + u64::try_from(t.tv_nsec()).expect("time")
}

/// Calls `send` `rate` times per second, each call at its own absolute
/// deadline (start + i/rate) so the rate does not drift with the time the
/// calls take, until `limit` has passed or `send` returns false. A thread
/// that wakes up several slots late (it was descheduled) skips the missed
/// slots rather than sending them back to back: the offered load stays
/// smooth. Returns the number of calls and the time from the first call to
/// the last.
pub fn pace(rate: u64, limit: Duration, mut send: impl FnMut() -> bool) -> (u64, Duration) {
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    let end = start + limit;
    let mut next = start;
    let mut calls = 0;
    let mut last = start;
    loop {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now > next + interval * 4 {
            let behind = (now - next).as_nanos() / interval.as_nanos();
            next += interval * u32::try_from(behind).expect("slots behind");
        }
        if !send() {
            break;
        }
        calls += 1;
        last = Instant::now();
        next += interval;
    }
    (calls, last - start)
}

/// A rate limit as specified (GCRA), written from the rule's words and run
/// on the test's clock: a packet conforms while the bucket's theoretical
/// arrival time is at most `tolerance` ahead of now, and each conforming
/// packet moves it on by its cost (1/rate, or length/rate for byte rates).
pub struct Gcra {
    tat: u64,
    tolerance: u64,
}

impl Gcra {
    /// `rate` packets per second, `burst` packets back to back.
    pub fn packets(rate: u64, burst: u64) -> (Self, u64) {
        let interval = 1_000_000_000 / rate;
        let g = Gcra {
            tat: 0,
            tolerance: interval * (burst - 1),
        };
        (g, interval)
    }

    /// `rate` bytes per second, `burst` bytes back to back, `len`-byte
    /// frames: a frame conforms if the bucket is at most `burst` ahead once
    /// it is counted.
    pub fn bytes(rate: u64, burst: u64, len: u64) -> (Self, u64) {
        let cost = len * 1_000_000_000 / rate;
        let g = Gcra {
            tat: 0,
            tolerance: (burst * 1_000_000_000 / rate).saturating_sub(cost),
        };
        (g, cost)
    }

    pub fn admit(&mut self, now: u64, cost: u64) -> bool {
        let tat = self.tat.max(now);
        if tat - now > self.tolerance {
            return false;
        }
        self.tat = tat + cost;
        true
    }
}

/// How many of the packets sent at `times` the bucket `(g, cost)` passes.
pub fn model_passes((mut g, cost): (Gcra, u64), times: &[u64]) -> u64 {
    times.iter().filter(|t| g.admit(**t, cost)).count() as u64
}
