//! A packet stream runs through the XDP program while the policy flips 1,000
//! times between two rule sets. Each set judges the probe packet with its own
//! (verdict, reason); a half-applied mix would show up as a third one
//! (nothing matched → default). The counters prove no packet saw a mix.
//! Needs root.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_common::{Family, L4, Reason, Verdict, counter_index};

use crate::support::{
    frames::Frame,
    kernel,
    model::{Policy, Rule},
};

const FLIPS: usize = 1_000;

#[test]
fn every_packet_sees_one_whole_policy_across_1000_flips() {
    let src = Ipv4Addr::new(198, 18, 40, 7);
    let dst = Ipv4Addr::new(198, 18, 41, 1);
    let frame = Frame::v4(src, dst).tcp(40000, 80).build();
    // Set 1: the source is denied, default pass, no rules.
    let set1 = Policy {
        deny: vec!["198.18.40.7/32".parse().unwrap()],
        malformed_drop: true,
        ..Policy::default()
    };
    // Set 2: no deny entry, default drop, a rule passes tcp/80.
    let set2 = Policy {
        rules: vec![Rule {
            drop: false,
            proto: Some(6),
            dport: Some((80, 80)),
            ..Rule::default()
        }],
        default_drop: true,
        malformed_drop: true,
        ..Policy::default()
    };

    let sandbox = Arc::new(kernel::new_sandbox());
    let mut maps = sandbox.policy().expect("policy maps");
    kernel::set_policy(&mut maps, &set1);
    let before = maps.counters().expect("counters");

    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let runner = {
        let (sandbox, stop, frame, batches) = (
            sandbox.clone(),
            stop.clone(),
            frame.clone(),
            batches.clone(),
        );
        std::thread::spawn(move || {
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Many runs per syscall keep the stream dense.
                sandbox.run_repeat(&frame, 64).expect("test_run");
                runs += 64;
                batches.fetch_add(1, Ordering::Release);
            }
            runs
        })
    };
    let wait_for_batch = |seen: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while batches.load(Ordering::Acquire) <= seen {
            assert!(Instant::now() < deadline, "the packet stream stalled");
            std::thread::yield_now();
        }
    };
    wait_for_batch(0);
    for i in 0..FLIPS {
        // Each flip is one commit, as one CLI command or agent apply would be.
        // Packets run during the flips, and at least one batch between every
        // fifth flip (alternately after each set) so both are covered.
        let seen = batches.load(Ordering::Acquire);
        kernel::set_policy(&mut maps, if i % 2 == 0 { &set2 } else { &set1 });
        if i % 10 == 4 || i % 10 == 9 {
            wait_for_batch(seen);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let runs = runner.join().expect("runner thread");
    drop(maps);
    let maps = sandbox.policy().expect("policy maps");
    let after = maps.counters().expect("counters");

    let delta = |v: Verdict, r: Reason| {
        let i = counter_index(Family::V4, L4::Tcp, v, r) as usize;
        after[i].packets - before[i].packets
    };
    let whole_set1 = delta(Verdict::Drop, Reason::DenyList);
    let whole_set2 = delta(Verdict::Pass, Reason::Rule);
    let mixed = delta(Verdict::Pass, Reason::Default) + delta(Verdict::Drop, Reason::Default);
    let total: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.packets - b.packets)
        .sum();
    eprintln!(
        "{runs} packets over {FLIPS} flips: set 1 {whole_set1}, set 2 {whole_set2}, mixed {mixed}"
    );
    assert_eq!(total, runs, "every packet is counted exactly once");
    assert_eq!(mixed, 0, "packets judged by a half-applied policy");
    assert_eq!(whole_set1 + whole_set2, runs);
    // Both sets were really in force during the stream.
    assert!(
        whole_set1 > 0 && whole_set2 > 0,
        "the stream did not overlap the flips"
    );
}
