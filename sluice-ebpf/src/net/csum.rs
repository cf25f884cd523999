//! Internet checksums: full sums for headers sluice builds, RFC 1624
//! incremental updates for fields it rewrites.

/// One's-complement of the folded sum: the checksum of what was summed.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Sum of the 16-bit big-endian words of `b`.
#[inline(always)]
pub fn sum16(b: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < b.len() {
        s += u64::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

/// The sum that turns a checksum over `old` into one over `new` (RFC 1624:
/// add ~m + m' for every changed word). `old` and `new` have the same length.
#[inline(always)]
pub fn delta(old: &[u8], new: &[u8]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        s += u64::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        s += u64::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    s
}

/// Applies a `delta` to the checksum stored big-endian at `field`:
/// HC' = ~(~HC + delta).
#[inline(always)]
pub fn apply(field: *mut [u8; 2], delta: u64) {
    // SAFETY: the caller bounds-checked `field` inside the frame.
    unsafe {
        let hc = u16::from_be_bytes(*field);
        *field = fold(u64::from(!hc) + delta).to_be_bytes();
    }
}

/// As `apply`, for a UDP checksum over IPv6, which is never 0: a computed 0
/// is sent as 0xffff.
#[inline(always)]
pub fn apply_udp6(field: *mut [u8; 2], delta: u64) {
    // SAFETY: the caller bounds-checked `field` inside the frame.
    unsafe {
        let hc = u16::from_be_bytes(*field);
        let mut c = fold(u64::from(!hc) + delta);
        if c == 0 {
            c = 0xffff;
        }
        *field = c.to_be_bytes();
    }
}

/// As `apply`, for a UDP checksum over IPv4, where 0 means "none" (left
/// as is) and a computed 0 is sent as 0xffff.
#[inline(always)]
pub fn apply_udp4(field: *mut [u8; 2], delta: u64) {
    // SAFETY: the caller bounds-checked `field` inside the frame.
    unsafe {
        let hc = u16::from_be_bytes(*field);
        if hc == 0 {
            return;
        }
        let mut c = fold(u64::from(!hc) + delta);
        if c == 0 {
            c = 0xffff;
        }
        *field = c.to_be_bytes();
    }
}
