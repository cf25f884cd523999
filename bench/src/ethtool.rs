//! Reading an interface's `ethtool -S` counters with the SIOCETHTOOL ioctl:
//! microseconds per read, so a counter can be sampled at a known instant
//! while a flood is running (a subprocess would take milliseconds and
//! compete for the CPUs the flood is using).

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Result, bail};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut u8,
    _pad: [u8; 16],
}

#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The statistics of one interface, read through a socket made in the
/// interface's namespace (the socket keeps that namespace wherever it is used).
pub struct Stats {
    sock: OwnedFd,
    name: [u8; 16],
    names: Vec<String>,
}

impl Stats {
    /// Must run on a thread that is in the interface's namespace.
    pub fn open_here(iface: &str) -> Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(iface)?;
        let bytes = c.as_bytes_with_nul();
        if bytes.len() > 16 {
            bail!("interface name {iface} too long");
        }
        let mut name = [0u8; 16];
        name[..bytes.len()].copy_from_slice(bytes);
        let mut s = Self {
            sock,
            name,
            names: Vec::new(),
        };
        // SAFETY: DrvInfo is plain data; all-zero is valid.
        let mut info: DrvInfo = unsafe { std::mem::zeroed() };
        info.cmd = ETHTOOL_GDRVINFO;
        s.ioctl((&raw mut info).cast())?;
        let n = info.n_stats as usize;
        let mut buf = vec![0u8; 12 + n * ETH_GSTRING_LEN];
        buf[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
        buf[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
        buf[8..12].copy_from_slice(&(n as u32).to_ne_bytes());
        s.ioctl(buf.as_mut_ptr())?;
        s.names = (0..n)
            .map(|i| {
                let raw = &buf[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                String::from_utf8_lossy(&raw[..end]).into_owned()
            })
            .collect();
        Ok(s)
    }

    fn ioctl(&self, data: *mut u8) -> Result<()> {
        let mut req = IfReq {
            name: self.name,
            data,
            _pad: [0; 16],
        };
        // SAFETY: SIOCETHTOOL with an ifreq whose data points at a buffer
        // sized for the command.
        let rc = unsafe { libc::ioctl(self.sock.as_raw_fd(), SIOCETHTOOL, &raw mut req) };
        if rc < 0 {
            bail!("SIOCETHTOOL: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every counter, by name.
    pub fn read(&self) -> Result<Vec<(String, u64)>> {
        let n = self.names.len();
        let mut buf = vec![0u64; 1 + n];
        // struct ethtool_stats { u32 cmd; u32 n_stats; u64 data[]; }
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&ETHTOOL_GSTATS.to_ne_bytes());
        head[4..].copy_from_slice(&(n as u32).to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        self.ioctl(buf.as_mut_ptr().cast())?;
        Ok(self
            .names
            .iter()
            .cloned()
            .zip(buf[1..].iter().copied())
            .collect())
    }

    /// Sum of the counters whose names end with `suffix`.
    pub fn sum(&self, suffix: &str) -> Result<u64> {
        Ok(self
            .read()?
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| *v)
            .sum())
    }
}
