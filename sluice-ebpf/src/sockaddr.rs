//! The address a `sock_addr` program sees (`bpf_sock_addr`), read as the
//! rules and services compare it and written back after a translation.
//! Shared by the socket object's stages.

use aya_ebpf::programs::SockAddrContext;

/// A socket call's address, port and protocol.
pub struct Call {
    /// 4 or 6; an IPv4-mapped IPv6 address is 4 (`mapped` set).
    pub family: u32,
    pub proto: u32,
    /// Host order.
    pub port: u16,
    /// `addr_words` layout (IPv4 in the first 4 bytes).
    pub addr: [u64; 2],
    /// An IPv6 socket's IPv4-mapped address (`::ffff:a.b.c.d`).
    pub mapped: bool,
}

/// Reads the call's address (`v6`: the program is on an IPv6 hook).
#[inline(always)]
pub fn read(ctx: &SockAddrContext, v6: bool) -> Call {
    // SAFETY: the kernel hands every sock_addr program a valid context;
    // each field is read with one aligned 4-byte load, as the verifier asks.
    let (w, proto, port) = unsafe {
        let sa = ctx.sock_addr;
        let port = u16::from_be((*sa).user_port as u16);
        let proto = (*sa).protocol;
        let w = if v6 {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        } else {
            [(*sa).user_ip4, 0, 0, 0]
        };
        (w, proto, port)
    };
    // The words hold the address bytes in order (network order in memory).
    let b = |x: u32| x.to_ne_bytes();
    let mapped = v6 && w[0] == 0 && w[1] == 0 && b(w[2]) == [0, 0, 0xff, 0xff];
    if !v6 || mapped {
        let a = b(if v6 { w[3] } else { w[0] });
        return Call {
            family: 4,
            proto,
            port,
            addr: sluice_common::v4_words(a),
            mapped,
        };
    }
    let (w0, w1, w2, w3) = (b(w[0]), b(w[1]), b(w[2]), b(w[3]));
    let hi = [w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3]];
    let lo = [w2[0], w2[1], w2[2], w2[3], w3[0], w3[1], w3[2], w3[3]];
    Call {
        family: 6,
        proto,
        port,
        addr: [u64::from_ne_bytes(hi), u64::from_ne_bytes(lo)],
        mapped: false,
    }
}

/// Writes `addr` (`addr_words`, of `family`) and `port` (host order) as the
/// call's address. On an IPv6 hook an IPv4 address is written IPv4-mapped.
#[inline(always)]
pub fn write(ctx: &SockAddrContext, v6: bool, family: u32, addr: [u64; 2], port: u16) {
    let hi = addr[0].to_ne_bytes();
    let lo = addr[1].to_ne_bytes();
    let word = |b: &[u8; 8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    // SAFETY: as in `read`; the verifier allows 4-byte stores to these
    // fields in the hooks that call this (connect, sendmsg, recvmsg,
    // getpeername).
    unsafe {
        let sa = ctx.sock_addr;
        if !v6 {
            (*sa).user_ip4 = word(&hi, 0);
        } else if family == 4 {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            (*sa).user_ip6[3] = word(&hi, 0);
        } else {
            (*sa).user_ip6[0] = word(&hi, 0);
            (*sa).user_ip6[1] = word(&hi, 4);
            (*sa).user_ip6[2] = word(&lo, 0);
            (*sa).user_ip6[3] = word(&lo, 4);
        }
        (*sa).user_port = u32::from(port.to_be());
    }
}
