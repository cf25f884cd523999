//! Wire numbers the programs test against: EtherTypes, IP protocols,
//! header lengths and the ICMP error types.

pub const ETH_HLEN: usize = 14;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// Header lengths without options or extension headers.
pub const IPV4_HDR: usize = 20;
pub const IPV6_HDR: usize = 40;
pub const TCP_HDR: usize = 20;

/// ICMP (v4) error types.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETERPROB: u8 = 12;
/// ICMPv6 errors are types 1 (unreachable) to 4 (parameter problem).
pub const ICMPV6_ERROR_MAX: u8 = 4;
