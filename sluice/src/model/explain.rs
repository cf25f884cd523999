//! The packet `sluice explain` asks about, as users describe it — the rule
//! vocabulary: `tcp src 198.18.0.2 sport 40000 dst 198.18.0.1 dport 22
//! flags syn` — and the frame that carries it.

use std::{fmt, net::IpAddr};

use super::{
    frame::{self, L4, Spec},
    policy::{PolicyError, TcpFlags},
};

/// A described packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub l4: L4,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// Frame length in bytes (at least the headers).
    pub len: usize,
    pub vlan: Option<u16>,
}

/// The source port when none is given.
pub const DEFAULT_SPORT: u16 = 40000;

/// The longest frame a test run hands the program whole: its linear area
/// is a page less headroom and tail room (4096 - 256 - 320 on x86_64), and
/// the metadata comes out of it; the rest would be fragments, which the
/// program does not see.
pub const MAX_LEN: usize = 3500;

impl Described {
    /// Parses the words after `sluice explain`.
    pub fn parse(words: &[String]) -> Result<Self, PolicyError> {
        let bad = |reason: String| PolicyError::BadPacket { reason };
        let mut it = words.iter().map(String::as_str);
        let mut l4 = None;
        let (mut src, mut dst, mut sport, mut dport, mut flags, mut len, mut vlan) =
            (None, None, None, None, None, None, None);
        fn set<T>(slot: &mut Option<T>, v: T, w: &str) -> Result<(), PolicyError> {
            if slot.replace(v).is_some() {
                return Err(PolicyError::BadPacket {
                    reason: format!("{w} given twice"),
                });
            }
            Ok(())
        }
        while let Some(w) = it.next() {
            let mut value =
                |what: &str| it.next().ok_or_else(|| bad(format!("'{w}' needs {what}")));
            match w {
                "tcp" => set(&mut l4, L4::Tcp, "protocol")?,
                "udp" => set(&mut l4, L4::Udp, "protocol")?,
                "icmp" | "icmpv6" => set(&mut l4, L4::Icmp, "protocol")?,
                "proto" => {
                    let v = value("a protocol number")?;
                    let p = match v {
                        "tcp" => L4::Tcp,
                        "udp" => L4::Udp,
                        "icmp" | "icmpv6" => L4::Icmp,
                        n => match n.parse::<u8>() {
                            Ok(6) => L4::Tcp,
                            Ok(17) => L4::Udp,
                            // ICMP or ICMPv6 by number: which one is known
                            // once the addresses are (below).
                            Ok(p) if p != 0 => L4::Other(p),
                            _ => {
                                return Err(bad(format!(
                                    "unknown protocol '{n}' (tcp, udp, icmp, icmpv6 or a number 1-255)"
                                )));
                            }
                        },
                    };
                    set(&mut l4, p, "protocol")?;
                }
                "src" | "dst" => {
                    let v = value("an address")?;
                    let a: IpAddr = v.parse().map_err(|_| {
                        bad(format!(
                            "invalid address '{v}' (an IPv4 or IPv6 address, no prefix length)"
                        ))
                    })?;
                    set(if w == "src" { &mut src } else { &mut dst }, a, w)?;
                }
                "sport" | "dport" => {
                    let v = value("a port")?;
                    let p: u16 = v
                        .parse()
                        .map_err(|_| bad(format!("invalid {w} '{v}' (a port 0-65535)")))?;
                    set(if w == "sport" { &mut sport } else { &mut dport }, p, w)?;
                }
                "flags" => {
                    let v = value("TCP flags like syn or ack,psh")?;
                    if v == "none" {
                        set(&mut flags, 0, w)?;
                        continue;
                    }
                    let f = TcpFlags::parse(v).map_err(bad)?;
                    if f.set != f.mask {
                        return Err(bad(format!(
                            "'flags {v}': a packet has flags, not a mask: list the flags set, e.g. syn,ack"
                        )));
                    }
                    set(&mut flags, f.set, w)?;
                }
                "len" => {
                    let v = value("a frame length in bytes")?;
                    let n: usize = v
                        .parse()
                        .ok()
                        .filter(|n| (14..=MAX_LEN).contains(n))
                        .ok_or_else(|| bad(format!("invalid len '{v}' (14-{MAX_LEN} bytes)")))?;
                    set(&mut len, n, w)?;
                }
                "vlan" => {
                    let v = value("a VLAN id")?;
                    let n: u16 = v
                        .parse()
                        .ok()
                        .filter(|n| (1..4095).contains(n))
                        .ok_or_else(|| bad(format!("invalid vlan '{v}' (1-4094)")))?;
                    set(&mut vlan, n, w)?;
                }
                other => {
                    return Err(bad(format!(
                        "unexpected '{other}' (expected tcp|udp|icmp|icmpv6|proto N, src ADDR, dst ADDR, sport N, dport N, flags F[,F...], len N, vlan N)"
                    )));
                }
            }
        }
        let (Some(src), Some(dst)) = (src, dst) else {
            return Err(bad("a packet needs src ADDR and dst ADDR".into()));
        };
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(bad("src and dst are of different address families".into()));
        }
        let l4 = match l4.unwrap_or(L4::Tcp) {
            // The family's own ICMP by number is an echo request; the other
            // family's is a bare payload of that protocol.
            L4::Other(1) if src.is_ipv4() => L4::Icmp,
            L4::Other(58) if src.is_ipv6() => L4::Icmp,
            other => other,
        };
        let ports = matches!(l4, L4::Tcp | L4::Udp);
        if !ports && (sport.is_some() || dport.is_some()) {
            return Err(bad("ports apply to tcp and udp".into()));
        }
        if ports && dport.is_none() {
            return Err(bad("a tcp or udp packet needs dport N".into()));
        }
        if l4 != L4::Tcp && flags.is_some() {
            return Err(bad("flags apply to tcp".into()));
        }
        let icmp_word = words.iter().any(|w| w == "icmp" || w == "icmpv6");
        if icmp_word {
            let v6_word = words.iter().any(|w| w == "icmpv6");
            if v6_word != src.is_ipv6() {
                return Err(bad(if v6_word {
                    "icmpv6 is IPv6; use icmp with IPv4 addresses".into()
                } else {
                    "icmp is IPv4; use icmpv6 with IPv6 addresses".into()
                }));
            }
        }
        Ok(Self {
            l4,
            src,
            dst,
            sport: sport.unwrap_or(DEFAULT_SPORT),
            dport: dport.unwrap_or(0),
            // A TCP packet is a connection's first unless told otherwise.
            tcp_flags: flags.unwrap_or(if l4 == L4::Tcp { 0x02 } else { 0 }),
            len: len.unwrap_or(64),
            vlan,
        })
    }

    /// The frame, addressed to `dst_mac` (the interface's own address, so
    /// the stack would take it).
    #[must_use]
    pub fn frame(&self, dst_mac: [u8; 6]) -> Vec<u8> {
        frame::build(&Spec {
            src: self.src,
            dst: self.dst,
            l4: self.l4,
            sport: self.sport,
            dport: self.dport,
            tcp_flags: self.tcp_flags,
            vlan: self.vlan,
            src_mac: frame::SRC_MAC,
            dst_mac,
            min_len: self.len,
        })
    }
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = self.src.is_ipv6();
        let ep = |a: IpAddr, p: u16| {
            if a.is_ipv6() {
                format!("[{a}]:{p}")
            } else {
                format!("{a}:{p}")
            }
        };
        match self.l4 {
            L4::Tcp | L4::Udp => {
                let name = if self.l4 == L4::Tcp { "tcp" } else { "udp" };
                write!(
                    f,
                    "{name} {} -> {}",
                    ep(self.src, self.sport),
                    ep(self.dst, self.dport)
                )?;
                if self.l4 == L4::Tcp {
                    let flags = TcpFlags {
                        set: self.tcp_flags,
                        mask: self.tcp_flags,
                    };
                    if self.tcp_flags == 0 {
                        f.write_str(" flags none")?;
                    } else {
                        write!(f, " flags {flags}")?;
                    }
                }
            }
            L4::Icmp => write!(
                f,
                "{} echo request {} -> {}",
                if v6 { "icmpv6" } else { "icmp" },
                self.src,
                self.dst
            )?,
            L4::Other(p) => write!(f, "proto {p} {} -> {}", self.src, self.dst)?,
        }
        if let Some(v) = self.vlan {
            write!(f, " vlan {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn descriptions_parse_with_defaults() {
        let d = Described::parse(&words("tcp src 198.18.0.2 dst 198.18.0.1 dport 22")).unwrap();
        assert_eq!(
            (d.sport, d.dport, d.tcp_flags, d.len),
            (40000, 22, 0x02, 64)
        );
        assert_eq!(
            d.to_string(),
            "tcp 198.18.0.2:40000 -> 198.18.0.1:22 flags syn"
        );
        let d = Described::parse(&words(
            "src 2001:2::1 dst 2001:2::2 udp sport 53 dport 9999 len 200",
        ))
        .unwrap();
        assert_eq!(d.to_string(), "udp [2001:2::1]:53 -> [2001:2::2]:9999");
        assert_eq!(d.frame(frame::DST_MAC).len(), 200);
        let d = Described::parse(&words(
            "tcp src 198.18.0.2 dst 198.18.0.1 dport 80 flags ack,psh",
        ))
        .unwrap();
        assert_eq!(d.tcp_flags, 0x18);
        let d = Described::parse(&words("icmpv6 src 2001:2::1 dst 2001:2::2")).unwrap();
        assert_eq!(d.frame(frame::DST_MAC)[20], 58);
        let d = Described::parse(&words("proto 47 src 198.18.0.2 dst 198.18.0.1")).unwrap();
        assert_eq!(d.l4, L4::Other(47));
        // ICMP by number: the family's own is an echo request.
        let d = Described::parse(&words("proto 1 src 198.18.0.2 dst 198.18.0.1")).unwrap();
        assert_eq!(d.l4, L4::Icmp);
        let d = Described::parse(&words("proto 58 src 198.18.0.2 dst 198.18.0.1")).unwrap();
        assert_eq!(d.l4, L4::Other(58));
        assert_eq!(d.frame(frame::DST_MAC)[23], 58);
        // A TCP packet without flags (a null scan) is described and shown.
        let d = Described::parse(&words(
            "tcp src 198.18.0.2 dst 198.18.0.1 dport 1 flags none",
        ))
        .unwrap();
        assert_eq!(d.tcp_flags, 0);
        assert!(d.to_string().ends_with("flags none"), "{d}");
    }

    #[test]
    fn bad_descriptions_are_refused_with_a_reason() {
        for (text, want) in [
            ("tcp dst 198.18.0.1 dport 22", "needs src ADDR and dst ADDR"),
            ("tcp src 198.18.0.2 dst 198.18.0.1", "needs dport"),
            (
                "tcp src 198.18.0.2 dst 2001:2::1 dport 1",
                "different address families",
            ),
            ("icmp src 2001:2::1 dst 2001:2::2", "icmp is IPv4"),
            (
                "icmp src 198.18.0.2 dst 198.18.0.1 dport 3",
                "ports apply to tcp and udp",
            ),
            (
                "udp src 198.18.0.2 dst 198.18.0.1 dport 3 flags syn",
                "flags apply to tcp",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport 3 flags syn/syn,ack",
                "not a mask",
            ),
            (
                "tcp src 198.18.0.0/24 dst 198.18.0.1 dport 3",
                "invalid address",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport 70000",
                "invalid dport",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport 1 len 9",
                "invalid len",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport 1 len 9000",
                "invalid len",
            ),
            (
                "tcp udp src 198.18.0.2 dst 198.18.0.1 dport 1",
                "protocol given twice",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport 1 bogus",
                "unexpected 'bogus'",
            ),
            (
                "tcp src 198.18.0.2 dst 198.18.0.1 dport",
                "'dport' needs a port",
            ),
        ] {
            let err = Described::parse(&words(text)).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
