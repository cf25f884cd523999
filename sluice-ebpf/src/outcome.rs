//! What a stage decided for a packet, as the pipeline counts and records it.

use sluice_common::{Reason, Verdict};

pub struct Outcome {
    pub verdict: Verdict,
    pub reason: Reason,
    /// Rule id, or the matched list entry's prefix length; 0 if none.
    pub matched: u32,
    /// Answer the packet with a SYN challenge instead of passing or dropping it.
    pub challenge: bool,
}

impl Outcome {
    #[inline(always)]
    pub const fn of(verdict: Verdict, reason: Reason) -> Self {
        Self {
            verdict,
            reason,
            matched: 0,
            challenge: false,
        }
    }
}
