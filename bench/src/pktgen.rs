//! The fallback traffic generator for kernels that refuse
//! BPF_F_TEST_XDP_LIVE_FRAMES (some hosts' kernels answer every live-frames
//! run with EPERM): an AF_PACKET socket bound to the sender veth with
//! PACKET_QDISC_BYPASS, sending batches with sendmmsg(2). It produces the
//! same frames as `bench_trafficgen` (the IPv4 source's low 16 bits cycle
//! through the sources, header checksum fixed the same way), so the
//! receivers see the same traffic; only the sending path differs (an skb
//! through the veth's xmit instead of an xdp_frame).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// Frames one sendmmsg call carries.
const BATCH: usize = 64;

pub struct PacketGen {
    fd: OwnedFd,
    template: Vec<u8>,
    /// `sources` copies of the template, each with its own source address.
    frames: Vec<u8>,
    sources: usize,
    next: usize,
}

/// The frame `bench_trafficgen` makes of `frame` for sequence number `n`:
/// IPv4 source low 16 bits = n, header checksum updated (RFC 1624).
pub fn rewrite(frame: &mut [u8], n: u16) {
    if frame.len() < 14 + 16 {
        return;
    }
    let check = u16::from_be_bytes([frame[24], frame[25]]);
    let old = u16::from_be_bytes([frame[28], frame[29]]);
    let sum = u32::from(!check) + u32::from(!old) + u32::from(n);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame[28..30].copy_from_slice(&n.to_be_bytes());
}

impl PacketGen {
    /// A socket sending on `ifindex` (in the calling thread's namespace).
    pub fn new(ifindex: u32, sources: u32) -> Result<Self> {
        // Protocol 0: the socket sends only, it never receives a frame.
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        // Protocol 0: bound for sending only (a protocol here would also
        // hook the socket into reception and queue every IPv4 frame).
        sll.sll_protocol = 0;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!(
                "binding the AF_PACKET socket to ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            fd,
            template: Vec::new(),
            frames: Vec::new(),
            sources: sources.clamp(1, 65_536) as usize,
            next: 0,
        })
    }

    fn prepare(&mut self, frame: &[u8]) {
        if self.template == frame {
            return;
        }
        self.template = frame.to_vec();
        self.frames = Vec::with_capacity(frame.len() * self.sources);
        for n in 0..self.sources {
            let mut f = frame.to_vec();
            rewrite(&mut f, n as u16);
            self.frames.extend_from_slice(&f);
        }
        self.next = 0;
    }

    /// Sends `count` frames made from `frame`; returns the time per frame.
    pub fn send(&mut self, frame: &[u8], count: u32) -> Result<Duration> {
        self.prepare(frame);
        let len = self.template.len();
        let start = Instant::now();
        let mut sent = 0usize;
        let total = count as usize;
        let mut iov: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain data; zero is a valid start.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut full_rounds = 0u32;
        while sent < total {
            let n = (total - sent).min(BATCH);
            for i in 0..n {
                let at = ((self.next + i) % self.sources) * len;
                iov[i].iov_base = self.frames[at..].as_ptr() as *mut libc::c_void;
                iov[i].iov_len = len;
                msgs[i].msg_hdr.msg_iov = &raw mut iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: msgs[..n] point at live iovecs over self.frames.
            let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // The device queue is full: let it drain (at most
                    // 10,000 tries in a row without progress).
                    Some(libc::ENOBUFS | libc::EAGAIN) if full_rounds < 10_000 => {
                        full_rounds += 1;
                        std::thread::yield_now();
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => bail!("sendmmsg on the AF_PACKET socket: {e}"),
                }
            }
            let r = r as usize;
            full_rounds = 0;
            sent += r;
            self.next = (self.next + r) % self.sources;
        }
        Ok(start.elapsed() / count.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header_checksum_ok(f: &[u8]) -> bool {
        let h = &f[14..34];
        let mut s = 0u32;
        for c in h.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    }

    #[test]
    fn rewrite_keeps_the_header_checksum_valid() {
        let mut s = crate::frames::Spec::new(
            "198.18.0.0".parse().unwrap(),
            "198.19.0.1".parse().unwrap(),
            crate::frames::L4::Udp,
        );
        s.min_len = 64;
        let base = crate::frames::build(&s);
        assert!(ipv4_header_checksum_ok(&base));
        for n in [0u16, 1, 0x1234, 0xfffe, 0xffff] {
            let mut f = base.clone();
            rewrite(&mut f, n);
            assert_eq!(u16::from_be_bytes([f[28], f[29]]), n);
            assert!(ipv4_header_checksum_ok(&f), "source low bits {n:#x}");
        }
    }
}
