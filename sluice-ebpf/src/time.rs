//! The clock and the GCRA test every rate limit shares (DDoS buckets, the
//! LB's new-connection cap).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use sluice_common::Bucket;

/// `CLOCK_BOOTTIME` nanoseconds (the clock user space reads timestamps with).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// GCRA test-and-update. Reads the bucket once; a conforming packet moves
/// the bucket's time on with an atomic add (or a plain store when the bucket
/// had gone idle — two CPUs racing there can each admit one extra packet).
#[inline(always)]
pub fn conform(b: *mut Bucket, now: u64, cost: u64, tolerance: u64) -> bool {
    // SAFETY: b points at a live map value.
    unsafe {
        let tat = core::ptr::read_volatile(&raw const (*b).tat_ns);
        if tat <= now {
            core::ptr::write_volatile(&raw mut (*b).tat_ns, now + cost);
            return true;
        }
        if tat - now > tolerance {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*b).tat_ns, cost);
        true
    }
}
