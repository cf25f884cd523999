//! The load balancer at its advertised size: 512 services with 8 backends
//! each (4,096 backends) applied at once, every service balancing; one
//! service too many and one backend too many refused whole. Needs root.

use std::{collections::HashSet, net::Ipv4Addr, time::Instant};

use sluice::{
    dataplane::sandbox::XDP_PASS,
    model::lb::{BackendSpec, Mode, ServiceSpec},
};
use sluice_common::lb::{MAX_BACKENDS, MAX_SERVICES};

use crate::support::{frames::Frame, kernel::new_sandbox};

fn service(i: u32, backends: u32) -> ServiceSpec {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
    ServiceSpec {
        id: format!("{vip}:80/tcp").parse().unwrap(),
        mode: Mode::Nat,
        backends: (0..backends)
            .map(|b| BackendSpec {
                addr: format!(
                    "{}:{}",
                    Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8),
                    8000 + b
                )
                .parse()
                .unwrap(),
                weight: 1 + b % 3,
                draining: false,
            })
            .collect(),
    }
}

#[test]
fn five_hundred_twelve_services_with_four_thousand_backends() {
    let sb = new_sandbox();
    let services: Vec<ServiceSpec> = (0..512).map(|i| service(i, 8)).collect();
    let started = Instant::now();
    let r = sluice::engine::lb::apply(sb.root(), &services, &HashSet::new()).expect("512 x 8 fit");
    println!(
        "512 services, 4,096 backends applied in {:?}",
        started.elapsed()
    );
    assert_eq!(r.services_added, 512);
    assert_eq!(r.tables_rebuilt, 512);
    assert_eq!(r.backends_written, 4096);
    let state = sluice::engine::lb::read(sb.root()).unwrap();
    assert_eq!(state.len(), 512);
    for s in &state {
        assert_eq!(s.members.len(), 8, "{}", s.id);
        let slots: usize = s.members.iter().map(|m| m.table_slots).sum();
        assert_eq!(slots, 65_537, "{}: the whole table is filled", s.id);
    }
    // Every service balances: a SYN to each VIP comes out addressed to one
    // of that service's backends.
    for (i, s) in services.iter().enumerate() {
        let std::net::IpAddr::V4(vip) = s.id.vip else {
            unreachable!()
        };
        let frame = Frame::v4(Ipv4Addr::new(198, 18, 250, 1), vip)
            .tcp(40000 + i as u16, 80)
            .tcp_flags(0x02)
            .build();
        let (r, out) = sb.run_out(&frame).unwrap();
        assert_eq!(r.action, XDP_PASS);
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let port = u16::from_be_bytes([out[36], out[37]]);
        assert!(
            s.backends
                .iter()
                .any(|b| b.addr.addr == std::net::IpAddr::V4(dst) && b.addr.port == port),
            "{}: went to {dst}:{port}",
            s.id
        );
    }

    // One service too many: refused, nothing changed.
    let too_many: Vec<ServiceSpec> = (0..=MAX_SERVICES).map(|i| service(i, 0)).collect();
    let err = sluice::engine::lb::apply(sb.root(), &too_many, &HashSet::new()).unwrap_err();
    assert!(err.to_string().contains("too many services"), "{err}");
    // One backend too many (16 services x 1,025 backends = 16,400 > 16,384).
    let wide: Vec<ServiceSpec> = (0..16).map(|i| service(i, 1025)).collect();
    assert!(wide.iter().map(|s| s.backends.len()).sum::<usize>() > MAX_BACKENDS as usize);
    let err = sluice::engine::lb::apply(sb.root(), &wide, &HashSet::new()).unwrap_err();
    assert!(err.to_string().contains("too many backends"), "{err}");
    assert_eq!(
        sluice::engine::lb::read(sb.root()).unwrap().len(),
        512,
        "a refused apply changes nothing"
    );
}
