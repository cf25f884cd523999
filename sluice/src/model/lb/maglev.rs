//! Weighted Maglev consistent hashing: turns a service's backends into the
//! lookup table the kernel indexes with `flow_hash % size`.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
};

use sluice_common::lb::{NO_BACKEND, mix};

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    /// Stable identity, the same on every node (e.g. `198.18.1.2:8080` or `[2001:2::5]:80`).
    pub name: &'a str,
    /// What the table holds for this member (the kernel's backend slot id).
    pub slot: u32,
    /// Relative weight; 0 = not in the table (drained / down).
    pub weight: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// A composite size leaves some permutations unable to reach every slot.
    #[error("Maglev table size {size} is not a prime")]
    SizeNotPrime { size: u32 },
    #[error("backend '{name}' is listed twice")]
    DuplicateName { name: String },
    /// Two members holding the same slot id could not be told apart in the table.
    #[error("backends '{first}' and '{second}' both use slot {slot}")]
    DuplicateSlot {
        slot: u32,
        first: String,
        second: String,
    },
    #[error("backend '{name}' uses slot {slot}, which means \"no backend\"")]
    ReservedSlot { name: String, slot: u32 },
    #[error("{members} backends with a weight do not fit in a table of {size} slots")]
    TooManyMembers { members: usize, size: u32 },
}

/// Seeds of the two name hashes; changing either reshuffles every table on
/// the nodes running the new code, so they are fixed forever.
const OFFSET_SEED: u64 = 0x5eed_0ff5_e7a1_b2c3;
const SKIP_SEED: u64 = 0x5eed_5c19_d4e6_f708;

/// Builds a table of `size` slots; `size` must be a prime so that every
/// member's permutation reaches every slot.
///
/// The same (name, slot, weight) set gives the same table on every node and
/// in every release, whatever the input order, so nodes behind one ECMP
/// route send a flow to the same backend without sharing state.
///
/// # Errors
///
/// A size that is not prime, a name or slot id given twice, a member using
/// `NO_BACKEND` as its slot, or more weighted members than slots.
pub fn build(members: &[Member<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    let mut sorted: Vec<Member<'_>> = members.to_vec();
    // Name order, not input order, decides who claims a contested slot first.
    sorted.sort_unstable_by(|a, b| a.name.cmp(b.name));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].name == p[1].name) {
        return Err(MaglevError::DuplicateName {
            name: pair[0].name.to_string(),
        });
    }
    check_slots(&sorted)?;
    sorted.retain(|m| m.weight > 0);
    if sorted.len() > size as usize {
        return Err(MaglevError::TooManyMembers {
            members: sorted.len(),
            size,
        });
    }

    let mut table = vec![NO_BACKEND; size as usize];
    let Some(max_weight) = sorted.iter().map(|m| m.weight).max() else {
        return Ok(table);
    };
    let size64 = u64::from(size);
    let mut walks: Vec<Walk> = sorted
        .iter()
        .map(|m| Walk {
            pos: name_hash(m.name, OFFSET_SEED) % size64,
            skip: name_hash(m.name, SKIP_SEED) % (size64 - 1) + 1,
            placed: 0,
        })
        .collect();

    // The weighted round loop (every round each member earns `weight` credit
    // and places one slot per `max_weight` earned; ties within a round go in
    // name order), replayed through a heap keyed by the round of each
    // member's next placement: a lone heavy member among thousands of light
    // ones would otherwise cost a pass over all of them for nearly every slot.
    let mut queue: BinaryHeap<Reverse<(u128, usize)>> = sorted
        .iter()
        .enumerate()
        .map(|(i, m)| Reverse((placement_round(1, max_weight, m.weight), i)))
        .collect();
    let mut filled = 0usize;
    while filled < table.len() {
        let Some(Reverse((_, i))) = queue.pop() else {
            break;
        };
        let walk = &mut walks[i];
        // A prime size makes each permutation visit every slot, so a free
        // one turns up while any remain.
        #[expect(clippy::cast_possible_truncation, reason = "pos < size <= u32::MAX")]
        while table[walk.pos as usize] != NO_BACKEND {
            walk.pos = (walk.pos + walk.skip) % size64;
        }
        #[expect(clippy::cast_possible_truncation, reason = "pos < size <= u32::MAX")]
        let at = walk.pos as usize;
        table[at] = sorted[i].slot;
        walk.pos = (walk.pos + walk.skip) % size64;
        walk.placed += 1;
        filled += 1;
        queue.push(Reverse((
            placement_round(walk.placed + 1, max_weight, sorted[i].weight),
            i,
        )));
    }
    Ok(table)
}

/// Slots per member slot id, for status output (how much of a service each
/// backend really gets, against its weight).
#[must_use]
pub fn slot_counts(table: &[u32]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for &slot in table.iter().filter(|&&s| s != NO_BACKEND) {
        *counts.entry(slot).or_insert(0) += 1;
    }
    counts
}

/// A member's progress along its permutation `(offset + j * skip) % size`,
/// kept as the current position so no `j * skip` product is ever formed.
struct Walk {
    pos: u64,
    skip: u64,
    placed: u64,
}

/// The round in which a member places its `k`-th slot: the first round `r`
/// with `r * weight >= k * max_weight`. u128 because `k * max_weight` can
/// pass u64 for a huge table of huge weights.
fn placement_round(k: u64, max_weight: u32, weight: u32) -> u128 {
    (u128::from(k) * u128::from(max_weight)).div_ceil(u128::from(weight))
}

fn check_slots(sorted: &[Member<'_>]) -> Result<(), MaglevError> {
    let mut seen: BTreeMap<u32, &str> = BTreeMap::new();
    for m in sorted {
        if m.slot == NO_BACKEND {
            return Err(MaglevError::ReservedSlot {
                name: m.name.to_string(),
                slot: m.slot,
            });
        }
        if let Some(first) = seen.insert(m.slot, m.name) {
            return Err(MaglevError::DuplicateSlot {
                slot: m.slot,
                first: first.to_string(),
                second: m.name.to_string(),
            });
        }
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// A fixed 64-bit hash of a member name. Spelled out here rather than taken
/// from std (whose `DefaultHasher` may change between Rust releases) so that
/// nodes built at different times still agree on every permutation.
fn name_hash(name: &str, seed: u64) -> u64 {
    let bytes = name.as_bytes();
    // The length goes in first so "a" and "a\0" differ despite the zero padding.
    let mut h = mix(seed ^ (bytes.len() as u64));
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    mix(h)
}

#[cfg(test)]
mod tests {
    use std::{sync::OnceLock, time::Instant};

    use sluice_common::{
        addr_words,
        lb::{TABLE_SIZE, flow_hash},
    };

    use super::*;

    const FLOWS: usize = 1_000_000;

    /// Seeded so a failure reproduces; inline so the flows do not change
    /// with a dependency's version.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix(self.0)
        }
    }

    /// Table indexes of 1,000,000 random TCP flows from `198.18.0.0/15` to the
    /// VIP `198.19.255.1:80`, generated once and shared (hashing them is most
    /// of the tests' time in a debug build).
    fn v4_flows() -> &'static [u32] {
        static FLOWS_V4: OnceLock<Vec<u32>> = OnceLock::new();
        FLOWS_V4.get_or_init(|| {
            let mut rng = SplitMix64(0x00c0_ffee);
            let vip = v4_words([198, 19, 255, 1]);
            (0..FLOWS)
                .map(|_| {
                    let r = rng.next();
                    let host = (r as u32) & 0x0001_ffff;
                    let src =
                        v4_words([198, 18 | (host >> 16) as u8, (host >> 8) as u8, host as u8]);
                    let sport = 1024 + ((r >> 32) as u16 % (65535 - 1024));
                    flow_hash(src, vip, sport, 80, 6) % TABLE_SIZE
                })
                .collect()
        })
    }

    /// The same for IPv6: clients in `2001:2::/48` to the VIP `[2001:2::ff]:80`.
    fn v6_flows() -> &'static [u32] {
        static FLOWS_V6: OnceLock<Vec<u32>> = OnceLock::new();
        FLOWS_V6.get_or_init(|| {
            let mut rng = SplitMix64(0xbead_5eed);
            let mut vip = [0u8; 16];
            vip[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x02]);
            vip[15] = 0xff;
            let vip = addr_words(&vip);
            (0..FLOWS)
                .map(|_| {
                    let mut src = [0u8; 16];
                    src[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x02]);
                    src[6..14].copy_from_slice(&rng.next().to_le_bytes());
                    let r = rng.next();
                    src[14..].copy_from_slice(&(r as u16).to_le_bytes());
                    let sport = 1024 + ((r >> 32) as u16 % (65535 - 1024));
                    flow_hash(addr_words(&src), vip, sport, 80, 6) % TABLE_SIZE
                })
                .collect()
        })
    }

    fn v4_words(a: [u8; 4]) -> [u64; 2] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a);
        addr_words(&b)
    }

    fn members<'a>(names: &'a [String], weights: &[u32]) -> Vec<Member<'a>> {
        names
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (name, &weight))| Member {
                name,
                slot: 100 + i as u32,
                weight,
            })
            .collect()
    }

    fn v4_names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("198.18.1.{}:8080", i + 2)).collect()
    }

    /// Share of the flows each slot id gets.
    fn shares(table: &[u32], flows: &[u32]) -> BTreeMap<u32, f64> {
        let mut hits: BTreeMap<u32, usize> = BTreeMap::new();
        for &f in flows {
            *hits.entry(table[f as usize]).or_insert(0) += 1;
        }
        hits.into_iter()
            .map(|(slot, n)| (slot, n as f64 / flows.len() as f64))
            .collect()
    }

    fn assert_distribution(case: &str, ms: &[Member<'_>], flows: &[u32]) {
        let table = build(ms, TABLE_SIZE).unwrap();
        let got = shares(&table, flows);
        let counts = slot_counts(&table);
        let total: u32 = ms.iter().map(|m| m.weight).sum();
        assert!(
            !got.contains_key(&NO_BACKEND),
            "{case}: flows with no backend"
        );
        for m in ms {
            let expected = f64::from(m.weight) / f64::from(total);
            let share = got.get(&m.slot).copied().unwrap_or(0.0);
            let slots = counts.get(&m.slot).copied().unwrap_or(0);
            println!(
                "{case}: {} weight {} slots {slots} share {share:.4} expected {expected:.4}",
                m.name, m.weight
            );
            assert!(
                (share - expected).abs() <= 0.01,
                "{case}: {} got {share:.4} of the flows, expected {expected:.4}",
                m.name
            );
        }
    }

    #[test]
    fn distribution_follows_weights() {
        let names = v4_names(3);
        assert_distribution("weights 1,2,3", &members(&names, &[1, 2, 3]), v4_flows());

        let names = v4_names(10);
        assert_distribution("10 equal", &members(&names, &[1; 10]), v4_flows());

        let names: Vec<String> = (0..5)
            .map(|i| format!("[2001:2::{:x}]:80", i + 5))
            .collect();
        assert_distribution(
            "ipv6 5,1,1,2,7",
            &members(&names, &[5, 1, 1, 2, 7]),
            v6_flows(),
        );
    }

    /// Fraction of flows whose backend differs between two tables, and the
    /// fraction of the flows `before` sent to a member still present in
    /// `after` that nonetheless moved.
    fn moved(before: &[u32], after: &[u32], survivors: &[u32], flows: &[u32]) -> (f64, f64) {
        let (mut changed, mut stayers, mut stayers_moved) = (0usize, 0usize, 0usize);
        for &f in flows {
            let (a, b) = (before[f as usize], after[f as usize]);
            if a != b {
                changed += 1;
            }
            if survivors.contains(&a) {
                stayers += 1;
                if a != b {
                    stayers_moved += 1;
                }
            }
        }
        (
            changed as f64 / flows.len() as f64,
            stayers_moved as f64 / stayers as f64,
        )
    }

    #[test]
    fn minimal_disruption() {
        let flows = v4_flows();
        let names = v4_names(11);
        let all = members(&names, &[1; 11]);
        let ten = &all[..10];
        let before = build(ten, TABLE_SIZE).unwrap();

        // Remove one of ten: about a tenth of the flows (its own) move.
        let removed = ten[3];
        let nine: Vec<Member<'_>> = ten
            .iter()
            .copied()
            .filter(|m| m.name != removed.name)
            .collect();
        let after = build(&nine, TABLE_SIZE).unwrap();
        let survivors: Vec<u32> = nine.iter().map(|m| m.slot).collect();
        let (changed, stayers_moved) = moved(&before, &after, &survivors, flows);
        println!(
            "remove 1 of 10: {changed:.4} of flows changed backend (bound {:.4}); \
             {stayers_moved:.4} of flows on surviving backends moved",
            0.1 + 0.02
        );
        assert!(
            changed <= 0.1 + 0.02,
            "removing one of ten moved {changed:.4}"
        );
        assert!(
            stayers_moved <= 0.02,
            "surviving backends lost {stayers_moved:.4}"
        );
        assert!(after.iter().all(|&s| s != removed.slot));

        // Draining (weight 0) is the same as removing.
        let mut drained = ten.to_vec();
        drained[3].weight = 0;
        assert_eq!(build(&drained, TABLE_SIZE).unwrap(), after);

        // Add an eleventh: about an eleventh of the flows move, onto it.
        let grown = build(&all, TABLE_SIZE).unwrap();
        let old: Vec<u32> = ten.iter().map(|m| m.slot).collect();
        let (changed, _) = moved(&before, &grown, &old, flows);
        let newcomer = all[10].slot;
        let sideways = flows
            .iter()
            .filter(|&&f| {
                let (a, b) = (before[f as usize], grown[f as usize]);
                a != b && b != newcomer
            })
            .count() as f64
            / flows.len() as f64;
        println!(
            "add an 11th to 10: {changed:.4} of flows changed backend (bound {:.4}); \
             {sideways:.4} moved between the old backends",
            1.0 / 11.0 + 0.02
        );
        assert!(
            changed <= 1.0 / 11.0 + 0.02,
            "adding an eleventh moved {changed:.4}"
        );
        assert!(sideways <= 0.02, "{sideways:.4} moved between old backends");
    }

    fn name_of<'a>(ms: &[Member<'a>], slot: u32) -> &'a str {
        ms.iter().find(|m| m.slot == slot).unwrap().name
    }

    #[test]
    fn independent_builds_agree() {
        let names = v4_names(20);
        let weights: Vec<u32> = (1..=20).map(|i| i % 4 + 1).collect();
        let ms = members(&names, &weights);
        let table = build(&ms, TABLE_SIZE).unwrap();

        let mut reordered = ms.clone();
        reordered.reverse();
        reordered.swap(2, 11);
        assert_eq!(build(&reordered, TABLE_SIZE).unwrap(), table);

        // Another node numbers its backend slots differently: the slot ids
        // differ, the names the flows go to do not.
        let renumbered: Vec<Member<'_>> = reordered
            .iter()
            .map(|m| Member {
                slot: 7_000 - m.slot * 3,
                ..*m
            })
            .collect();
        let other = build(&renumbered, TABLE_SIZE).unwrap();
        for &f in &v4_flows()[..100_000] {
            let f = f as usize;
            assert_eq!(name_of(&ms, table[f]), name_of(&renumbered, other[f]));
        }
    }

    #[test]
    fn name_hash_is_pinned() {
        // Every node must compute the same permutations, whatever release
        // it runs: a change here reshuffles every service's flows.
        assert_eq!(
            name_hash("198.18.1.2:8080", OFFSET_SEED),
            0x37f5_185d_404d_2932
        );
        assert_eq!(
            name_hash("198.18.1.2:8080", SKIP_SEED),
            0xd303_6211_8486_908b
        );
        assert_eq!(
            name_hash("[2001:2::5]:80", OFFSET_SEED),
            0xc380_cc82_beae_6e8c
        );
        assert_ne!(name_hash("a", OFFSET_SEED), name_hash("a\0", OFFSET_SEED));
        let names = v4_names(3);
        let table = build(&members(&names, &[1, 2, 3]), 13).unwrap();
        assert_eq!(
            table,
            [
                102, 101, 102, 102, 102, 102, 100, 102, 101, 101, 100, 101, 102
            ]
        );
    }

    #[test]
    fn weight_zero_and_empty() {
        let names = v4_names(3);
        let ms = members(&names, &[2, 0, 1]);
        let table = build(&ms, TABLE_SIZE).unwrap();
        let counts = slot_counts(&table);
        assert_eq!(counts.get(&ms[1].slot), None);
        assert_eq!(counts.values().sum::<usize>(), TABLE_SIZE as usize);
        // Within a slot or so of the weights.
        let expected = f64::from(TABLE_SIZE) * 2.0 / 3.0;
        assert!(
            (counts[&ms[0].slot] as f64 - expected).abs() <= 2.0,
            "{counts:?}"
        );

        assert!(
            build(&[], TABLE_SIZE)
                .unwrap()
                .iter()
                .all(|&s| s == NO_BACKEND)
        );
        let all_zero = members(&names, &[0, 0, 0]);
        let table = build(&all_zero, TABLE_SIZE).unwrap();
        assert_eq!(table.len(), TABLE_SIZE as usize);
        assert!(table.iter().all(|&s| s == NO_BACKEND));
        assert!(slot_counts(&table).is_empty());
    }

    #[test]
    fn bad_input_is_rejected() {
        let names = v4_names(3);
        let ms = members(&names, &[1, 1, 1]);
        assert_eq!(
            build(&ms, 65_536),
            Err(MaglevError::SizeNotPrime { size: 65_536 })
        );
        assert_eq!(build(&ms, 0), Err(MaglevError::SizeNotPrime { size: 0 }));
        assert_eq!(build(&ms, 1), Err(MaglevError::SizeNotPrime { size: 1 }));

        let mut dup = ms.clone();
        dup.push(Member {
            name: &names[1],
            slot: 999,
            weight: 0,
        });
        assert_eq!(
            build(&dup, TABLE_SIZE),
            Err(MaglevError::DuplicateName {
                name: names[1].clone()
            })
        );

        let mut same_slot = ms.clone();
        same_slot[2].slot = same_slot[0].slot;
        assert!(matches!(
            build(&same_slot, TABLE_SIZE),
            Err(MaglevError::DuplicateSlot { slot: 100, .. })
        ));

        let mut reserved = ms.clone();
        reserved[0].slot = NO_BACKEND;
        assert!(matches!(
            build(&reserved, TABLE_SIZE),
            Err(MaglevError::ReservedSlot { .. })
        ));

        assert_eq!(
            build(&ms, 2),
            Err(MaglevError::TooManyMembers {
                members: 3,
                size: 2
            })
        );
        // As many members as slots: one each.
        let table = build(&ms, 3).unwrap();
        assert_eq!(
            slot_counts(&table).values().copied().collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn many_members() {
        let names: Vec<String> = (0..4096)
            .map(|i| format!("198.18.{}.{}:8080", 16 + i / 256, i % 256))
            .collect();
        let ms = members(&names, &[1; 4096]);
        let start = Instant::now();
        let table = build(&ms, TABLE_SIZE).unwrap();
        println!(
            "4,096 members x {TABLE_SIZE} slots built in {:?}",
            start.elapsed()
        );
        let counts = slot_counts(&table);
        assert_eq!(counts.len(), 4096);
        let (min, max) = (
            counts.values().min().unwrap(),
            counts.values().max().unwrap(),
        );
        println!("slots per member: {min}..={max}");
        assert!(*min >= 1);
        // Equal weights: 65,537 / 4,096 is 16 and a bit.
        assert!(*min >= 16 && *max <= 17, "{min}..={max}");

        // One heavy member among many light ones: each light member is
        // within a slot of its share; the heavy one can be off by up to one
        // light member's period (the weight ratio, 100) because all the
        // light members place in the same round and the last round is cut
        // short.
        let mut skewed = ms.clone();
        skewed[0].weight = 100;
        let table = build(&skewed, TABLE_SIZE).unwrap();
        let counts = slot_counts(&table);
        let total = 100.0 + 4095.0;
        let heavy = counts[&skewed[0].slot] as f64;
        let expected = f64::from(TABLE_SIZE) * 100.0 / total;
        println!("weight 100 among 4,095 of weight 1: {heavy} slots, ideal {expected:.1}");
        assert!((heavy - expected).abs() <= 100.0);
        let light = f64::from(TABLE_SIZE) / total;
        for m in &skewed[1..] {
            assert!(
                (counts[&m.slot] as f64 - light).abs() < 1.0,
                "{}: {}",
                m.name,
                counts[&m.slot]
            );
        }

        // Costs no more with a huge weight ratio: the heap skips the rounds
        // in which the light members only earn credit.
        skewed[0].weight = 1_000_000;
        let start = Instant::now();
        let table = build(&skewed, TABLE_SIZE).unwrap();
        println!(
            "weight 1,000,000 among 4,095 of weight 1 built in {:?}",
            start.elapsed()
        );
        assert!(table.iter().all(|&s| s != NO_BACKEND));
        assert!(slot_counts(&table)[&skewed[0].slot] as f64 >= 0.99 * f64::from(TABLE_SIZE));
    }
}
