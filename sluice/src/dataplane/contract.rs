//! The map contract: every map user space opens by name exists in the
//! embedded kernel object with the key and value sizes of the Rust types user
//! space reads and writes it with, so a renamed map or a changed layout on
//! one side fails here, not on a live host.

use std::mem::size_of;

use aya::maps::lpm_trie::Key;
use sluice_common::{
    Bucket, CaptureConfig, Counter, DdosConfig, EntryStats, FlowConfig, KeyV4, KeyV6, Rule,
    Settings,
    lb::{Backend, BackendKey, Conn, FlowKey, LbConfig, LbCounter, Service, ServiceKey, Vip},
    map_names as n,
};

/// (map, key size, value size) as user space uses each map. Ring buffers
/// have neither; maps of maps and program arrays hold 4-byte ids/fds;
/// per-CPU maps give the size of one CPU's value.
fn contract() -> Vec<(&'static str, usize, usize)> {
    let u32s = size_of::<u32>();
    vec![
        (n::GENERATION, u32s, size_of::<u32>()),
        (n::SETTINGS, u32s, size_of::<Settings>()),
        (n::RULES, u32s, size_of::<Rule>()),
        (n::RULE_STATS, u32s, size_of::<Counter>()),
        (n::COUNTERS, u32s, size_of::<Counter>()),
        (n::DENY_V4, size_of::<Key<KeyV4>>(), size_of::<EntryStats>()),
        (n::DENY_V6, size_of::<Key<KeyV6>>(), size_of::<EntryStats>()),
        (
            n::ALLOW_V4,
            size_of::<Key<KeyV4>>(),
            size_of::<EntryStats>(),
        ),
        (
            n::ALLOW_V6,
            size_of::<Key<KeyV6>>(),
            size_of::<EntryStats>(),
        ),
        (n::RULE_BUCKETS, u32s, size_of::<Bucket>()),
        (n::OVERFLOW_BKTS, u32s, size_of::<Bucket>()),
        (n::DDOS_CONFIG, u32s, size_of::<DdosConfig>()),
        (n::STATS, u32s, size_of::<u64>()),
        (n::FLOW_CONFIG, u32s, size_of::<FlowConfig>()),
        (n::CAPTURE_CONFIG, u32s, size_of::<CaptureConfig>()),
        (n::EVENTS, 0, 0),
        (n::FLOWS, 0, 0),
        (n::CAPTURE, 0, 0),
        (n::JUMP, u32s, u32s),
        (
            n::LB_SERVICES,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
        ),
        (n::LB_BACKENDS, u32s, size_of::<Backend>()),
        (n::LB_MAGLEV, u32s, u32s),
        (n::LB_CONNS, size_of::<FlowKey>(), size_of::<Conn>()),
        (n::LB_REVERSE, size_of::<BackendKey>(), size_of::<Vip>()),
        (n::LB_CONFIG, u32s, size_of::<LbConfig>()),
        (n::LB_NEW_CONNS, u32s, size_of::<Bucket>()),
        (n::LB_STATS, u32s, size_of::<u64>()),
        (n::LB_SVC_STATS, u32s, size_of::<LbCounter>()),
        (n::LB_BE_STATS, u32s, size_of::<LbCounter>()),
        // aya's DevMapHash writes `bpf_devmap_val`: target ifindex, program fd.
        (n::LB_TX_PORTS, u32s, size_of::<[u32; 2]>()),
    ]
}

/// The socket object's maps (`sluice-sock-ebpf`).
fn sock_contract() -> Vec<(&'static str, usize, usize)> {
    use sluice_common::sock::{SockRule, WorkloadPolicy, sock_map_names as s};
    let u32s = size_of::<u32>();
    vec![
        (s::SOCK_GENERATION, u32s, u32s),
        (s::WORKLOADS, size_of::<u64>(), u32s),
        (s::SOCK_POLICY, u32s, size_of::<WorkloadPolicy>()),
        (s::SOCK_RULES, u32s, size_of::<SockRule>()),
        (s::SOCK_STATS, u32s, size_of::<u64>()),
        (s::SOCK_EVENTS, 0, 0),
        (s::SOCK_LOST, u32s, size_of::<u64>()),
    ]
}

#[test]
fn every_map_user_space_opens_is_in_the_object_with_its_types_sizes() {
    check(super::OBJECT, contract());
}

#[test]
fn every_socket_map_user_space_opens_is_in_the_socket_object() {
    check(super::sock::SOCK_OBJECT, sock_contract());
}

fn check(object: &[u8], contract: Vec<(&'static str, usize, usize)>) {
    let obj = aya_obj::Object::parse(object).expect("the embedded object parses");
    let mut wrong = Vec::new();
    for (name, key, value) in contract {
        match obj.maps.get(name) {
            None => wrong.push(format!("{name}: not in the kernel object")),
            Some(m) => {
                let got = (m.key_size() as usize, m.value_size() as usize);
                if got != (key, value) {
                    wrong.push(format!(
                        "{name}: kernel key/value {got:?} bytes, user space {:?}",
                        (key, value)
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "map contract broken:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_contract_fails_on_a_wrong_size() {
    // The check itself: a wrong size or name is caught.
    let obj = aya_obj::Object::parse(super::OBJECT).expect("the embedded object parses");
    let m = &obj.maps[n::SETTINGS];
    assert_ne!(m.value_size() as usize, size_of::<Settings>() + 1);
    assert!(!obj.maps.contains_key("NO_SUCH_MAP"));
}
