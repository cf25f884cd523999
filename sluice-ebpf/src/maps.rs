//! Every map of the XDP pipeline: key, value, capacity and what happens when full.
//! User space opens them by the names in `sluice_common::map_names` and pins them.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray},
};
use sluice_common::{
    COUNTER_SLOTS, Counter, EntryStats, GENERATIONS, KeyV4, KeyV6, LIST_CAPACITY, MAX_RULES, Rule,
    Settings,
};

/// Active policy generation (0 or 1). One u32; written only by the control
/// plane to flip between fully built generations. Never full.
#[map]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// `Settings` per generation. Fixed size (2); never full.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(GENERATIONS, 0);

/// L4 rules, `MAX_RULES` per generation. The control plane refuses a rule
/// beyond `MAX_RULES` with an error naming the limit.
#[map]
pub static RULES: Array<Rule> = Array::with_max_entries(GENERATIONS * MAX_RULES, 0);

/// Per-rule hit counters, indexed by `Rule::stats_slot`; one slot per possible
/// rule, so it cannot fill before `RULES` does.
#[map]
pub static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Per-CPU packet/byte counters by (family, l4, verdict, reason); fixed size.
#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

// Source-address lists: LPM tries keyed by (generation byte, address), sized
// for `LIST_CAPACITY` prefixes in each generation. Only user space inserts;
// an insert into a full trie fails with E2BIG and the whole change is rolled
// back and reported (nothing is half-applied).

#[map]
pub static DENY_V4: LpmTrie<KeyV4, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static DENY_V6: LpmTrie<KeyV6, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static ALLOW_V4: LpmTrie<KeyV4, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);

#[map]
pub static ALLOW_V6: LpmTrie<KeyV6, EntryStats> =
    LpmTrie::with_max_entries(GENERATIONS * LIST_CAPACITY, 0);
