//! ICMP errors about load-balanced connections, byte for byte: an error a
//! router sends the VIP (XDP: to the backend of the connection it quotes)
//! and an error a NAT backend sends the client (TC egress: from the VIP).
//! IPv4 and IPv6. Needs root.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use sluice::{
    dataplane::sandbox::{Sandbox, XDP_PASS},
    model::lb::{BackendSpec, Mode, ServiceSpec},
};
use sluice_common::{lb::lb_stat, map_names};

use crate::support::{
    frames::{Frame, checksum},
    kernel::{hex, new_sandbox},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 5);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const BE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 5);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);
const BE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 9, 0, 0, 0, 9);

fn setup(vip: IpAddr, backend: &str) -> Sandbox {
    let sb = new_sandbox();
    let id = match vip {
        IpAddr::V4(v) => format!("{v}:80/udp"),
        IpAddr::V6(v) => format!("[{v}]:80/udp"),
    };
    let spec = ServiceSpec {
        id: id.parse().unwrap(),
        mode: Mode::Nat,
        backends: vec![BackendSpec {
            addr: backend.parse().unwrap(),
            weight: 1,
            draining: false,
        }],
    };
    sluice::engine::lb::apply(sb.root(), &[spec], &HashSet::new()).unwrap();
    sb
}

fn stat(sb: &Sandbox, index: u32) -> u64 {
    let data = MapData::from_pin(sb.root().map(map_names::LB_STATS)).unwrap();
    let m: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
    m.get(&index, 0).unwrap().iter().sum()
}

/// The IP packet (no Ethernet header) of a frame, cut to its IP header
/// plus 8 bytes: what an ICMP error quotes.
fn quote(frame: &[u8], ip_header: usize) -> Vec<u8> {
    frame[14..14 + ip_header + 8].to_vec()
}

fn icmp4(ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quoted);
    let c = checksum(&m).to_be_bytes();
    m[2] = c[0];
    m[3] = c[1];
    m
}

fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quoted);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&m);
    let c = checksum(&pseudo).to_be_bytes();
    m[2] = c[0];
    m[3] = c[1];
    m
}

fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}: output differs\n got:\n{}\nwant:\n{}",
        hex(got),
        hex(want)
    );
}

fn run_tc(sb: &Sandbox, frame: &[u8]) -> (i32, Vec<u8>) {
    let prog = SchedClassifier::from_pin(sb.root().prog_dir().join("sluice_tc_egress")).unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let r = prog.test_run(opts).expect("tc test_run");
    out.truncate(r.data_size_out as usize);
    (r.return_value as i32, out)
}

#[test]
fn frag_needed_to_the_vip_goes_to_the_backend_ipv4() {
    let sb = setup(VIP4.into(), "198.18.1.2:8080");
    // The connection: client:5000 -> VIP:80, balanced to the backend.
    let (r, _) = sb
        .run_out(&Frame::v4(CLIENT4, VIP4).udp(5000, 80).payload(b"q").build())
        .unwrap();
    assert_eq!(r.action, XDP_PASS);
    // A router says the VIP's reply (VIP:80 -> client:5000) was too big.
    let reply = Frame::v4(VIP4, CLIENT4)
        .udp(80, 5000)
        .payload(&[7; 1400])
        .build();
    let error = Frame::v4(ROUTER4, VIP4)
        .proto(1, icmp4(3, 4, [0, 0, 0x05, 0xdc], &quote(&reply, 20)))
        .build();
    // To the backend, quoting what the backend sent (backend:8080 -> client).
    let backend_reply = Frame::v4(BE4, CLIENT4)
        .udp(8080, 5000)
        .payload(&[7; 1400])
        .build();
    let mut backend_quote = quote(&backend_reply, 20);
    // The quoted UDP checksum is left as it was.
    backend_quote[26..28].copy_from_slice(&quote(&reply, 20)[26..28]);
    let want = Frame::v4(ROUTER4, BE4)
        .proto(1, icmp4(3, 4, [0, 0, 0x05, 0xdc], &backend_quote))
        .build();
    let (r, out) = sb.run_out(&error).unwrap();
    assert_eq!(
        r.action, XDP_PASS,
        "no route in the test namespace: to the stack"
    );
    assert_frame("ICMPv4 frag-needed to the VIP", &out, &want);
    assert_eq!(stat(&sb, lb_stat::ICMP_TRANSLATED), 1);

    // An error about a connection sluice never saw: untouched.
    let other = Frame::v4(VIP4, CLIENT4)
        .udp(80, 5001)
        .payload(&[7; 100])
        .build();
    let error = Frame::v4(ROUTER4, VIP4)
        .proto(1, icmp4(3, 4, [0, 0, 0x05, 0xdc], &quote(&other, 20)))
        .build();
    let (r, out) = sb.run_out(&error).unwrap();
    assert_eq!(r.action, XDP_PASS);
    assert_frame("ICMP about an unknown connection", &out, &error);
    // Echo requests to the VIP are not errors: untouched.
    let ping = Frame::v4(CLIENT4, VIP4).icmp_echo(1, 1).build();
    let (_, out) = sb.run_out(&ping).unwrap();
    assert_frame("ping to the VIP", &out, &ping);
    assert_eq!(stat(&sb, lb_stat::ICMP_TRANSLATED), 1);
}

#[test]
fn packet_too_big_to_the_vip_goes_to_the_backend_ipv6() {
    let sb = setup(VIP6.into(), "[2001:2:0:1::2]:8080");
    let (r, _) = sb
        .run_out(&Frame::v6(CLIENT6, VIP6).udp(5000, 80).payload(b"q").build())
        .unwrap();
    assert_eq!(r.action, XDP_PASS);
    let reply = Frame::v6(VIP6, CLIENT6)
        .udp(80, 5000)
        .payload(&[7; 1400])
        .build();
    let error = Frame::v6(ROUTER6, VIP6)
        .proto(
            58,
            icmp6(ROUTER6, VIP6, 2, 0, [0, 0, 0x05, 0x00], &quote(&reply, 40)),
        )
        .build();
    let backend_reply = Frame::v6(BE6, CLIENT6)
        .udp(8080, 5000)
        .payload(&[7; 1400])
        .build();
    let mut backend_quote = quote(&backend_reply, 40);
    backend_quote[46..48].copy_from_slice(&quote(&reply, 40)[46..48]);
    let want = Frame::v6(ROUTER6, BE6)
        .proto(
            58,
            icmp6(ROUTER6, BE6, 2, 0, [0, 0, 0x05, 0x00], &backend_quote),
        )
        .build();
    let (r, out) = sb.run_out(&error).unwrap();
    assert_eq!(r.action, XDP_PASS);
    assert_frame("ICMPv6 packet-too-big to the VIP", &out, &want);
    assert_eq!(stat(&sb, lb_stat::ICMP_TRANSLATED), 1);
}

#[test]
fn backend_errors_leave_from_the_vip() {
    // IPv4: the backend says port unreachable about client:5000 -> backend:8080.
    let sb = setup(VIP4.into(), "198.18.1.2:8080");
    let sent = Frame::v4(CLIENT4, BE4)
        .udp(5000, 8080)
        .payload(b"hello")
        .build();
    let error = Frame::v4(BE4, CLIENT4)
        .proto(1, icmp4(3, 3, [0; 4], &quote(&sent, 20)))
        .build();
    let as_sent = Frame::v4(CLIENT4, VIP4)
        .udp(5000, 80)
        .payload(b"hello")
        .build();
    let mut q = quote(&as_sent, 20);
    q[26..28].copy_from_slice(&quote(&sent, 20)[26..28]);
    let want = Frame::v4(VIP4, CLIENT4)
        .proto(1, icmp4(3, 3, [0; 4], &q))
        .build();
    let (rc, out) = run_tc(&sb, &error);
    assert_eq!(rc, -1, "TC always lets packets go on");
    assert_frame("ICMPv4 port unreachable from the backend", &out, &want);
    assert_eq!(stat(&sb, lb_stat::ICMP_TRANSLATED), 1);
    // From a router between (not the backend itself): untouched.
    let transit = Frame::v4(ROUTER4, CLIENT4)
        .proto(1, icmp4(3, 3, [0; 4], &quote(&sent, 20)))
        .build();
    let (_, out) = run_tc(&sb, &transit);
    assert_frame("ICMP from a router", &out, &transit);

    // IPv6.
    let sb = setup(VIP6.into(), "[2001:2:0:1::2]:8080");
    let sent = Frame::v6(CLIENT6, BE6)
        .udp(5000, 8080)
        .payload(b"hello")
        .build();
    let error = Frame::v6(BE6, CLIENT6)
        .proto(58, icmp6(BE6, CLIENT6, 1, 4, [0; 4], &quote(&sent, 40)))
        .build();
    let as_sent = Frame::v6(CLIENT6, VIP6)
        .udp(5000, 80)
        .payload(b"hello")
        .build();
    let mut q = quote(&as_sent, 40);
    q[46..48].copy_from_slice(&quote(&sent, 40)[46..48]);
    let want = Frame::v6(VIP6, CLIENT6)
        .proto(58, icmp6(VIP6, CLIENT6, 1, 4, [0; 4], &q))
        .build();
    let (rc, out) = run_tc(&sb, &error);
    assert_eq!(rc, -1);
    assert_frame("ICMPv6 port unreachable from the backend", &out, &want);
    assert_eq!(stat(&sb, lb_stat::ICMP_TRANSLATED), 1);
}
