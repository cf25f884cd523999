//! Per-CPU counter bumps: verdict counters (`COUNTERS`), event counters
//! (`STATS`) and the LB's event counters (`LB_STATS`).

use crate::maps::{COUNTERS, LB_STATS, STATS};

/// One packet of `bytes` under `COUNTERS[index]` (`sluice_common::counter_index`).
#[inline(always)]
pub fn count(index: u32, bytes: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// One event under `STATS[index]` (`sluice_common::stat`).
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// One event under `LB_STATS[index]` (`sluice_common::lb::lb_stat`).
#[inline(always)]
pub fn bump_lb(index: u32) {
    if let Some(c) = LB_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}
