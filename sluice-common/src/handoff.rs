//! What one program (or call frame) of the XDP pipeline leaves for the next
//! in a per-CPU scratch map: the firewall's verdict for the LB program
//! after the tail call, and the service an ICMP error was matched to.
//! Kernel-only: user space never reads these maps.

/// `LB_VERDICT[0]`: what the firewall decided for the packet in hand.
/// Written for every packet by the main program (whose second half reads
/// it back from memory) and read by the LB program after the tail call.
/// Fields are plain words, not enums: they come back from map memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    /// `Reason` value.
    pub reason: u32,
    /// Rule id, or the matched list entry's prefix length; 0 if none.
    pub matched: u32,
    /// `Verdict` value.
    pub verdict: u32,
    /// `HANDOFF_F_*` bits.
    pub flags: u32,
}

// SAFETY: repr(C), Copy, u32s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Handoff {}

/// `Handoff::flags`: the packet is IP (`LB_PACKET` holds its parse;
/// otherwise only its family).
pub const HANDOFF_F_IP: u32 = 1 << 0;
/// `Handoff::flags`: the SYN is to be answered with a challenge.
pub const HANDOFF_F_CHALLENGE: u32 = 1 << 1;

/// `LB_ICMP_SVC[0]`: the service an ICMP error was matched to, for the
/// forwarding that follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpService {
    /// `lb::MODE_*`.
    pub mode: u32,
    /// `lb::MODE_VXLAN`: the service's VNI.
    pub vni: u32,
}

// SAFETY: repr(C), Copy, u32s only.
#[cfg(feature = "user")]
unsafe impl aya::Pod for IcmpService {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_words_they_replace() {
        // The per-CPU slots were `[u32; 4]` and `[u32; 2]`.
        assert_eq!(core::mem::size_of::<Handoff>(), 16);
        assert_eq!(core::mem::align_of::<Handoff>(), 4);
        assert_eq!(core::mem::size_of::<IcmpService>(), 8);
    }
}
