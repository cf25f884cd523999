//! The firewalls under test on the receiving end of a [`Lab`]: installing a
//! deny list of IPv4 prefixes with each tool (timed), reading how many
//! packets it dropped, one incremental change (timed), and tearing it down.
//! Every command runs inside the receiver namespace (`ip netns exec`).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::{IpNet, Ipv4Net};
use sluice::dataplane::{AttachMode, Change, PolicyMaps, attach};
use sluice_common::{Family, L4, ListId, Reason, Verdict, counter_index};

use crate::{
    netns::{Lab, PinDir},
    progs,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `bench_drop_all`, native: the ceiling.
    DropAll,
    SluiceNative,
    SluiceGeneric,
    /// `iptables` with the nf_tables backend (`iptables-nft`), raw PREROUTING.
    IptablesNft,
    /// `iptables-legacy` (x_tables), raw PREROUTING.
    IptablesLegacy,
    /// An ipset hash:net matched by one iptables-nft raw PREROUTING rule.
    Ipset,
    /// nftables: a netdev ingress chain on the veth with an interval set.
    Nft,
}

impl Tool {
    pub fn key(self) -> &'static str {
        match self {
            Self::DropAll => "xdp-drop-all",
            Self::SluiceNative => "sluice-native",
            Self::SluiceGeneric => "sluice-generic",
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Ipset => "ipset",
            Self::Nft => "nftables",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::DropAll => "trivial XDP program returning XDP_DROP (bench_drop_all), native mode",
            Self::SluiceNative => "sluice, XDP native (driver) mode, deny list",
            Self::SluiceGeneric => "sluice, XDP generic (skb) mode, deny list",
            Self::IptablesNft => {
                "iptables (nf_tables backend, iptables-nft), raw table PREROUTING, one `-s PREFIX -j DROP` rule per prefix, the matching rule last"
            }
            Self::IptablesLegacy => {
                "iptables-legacy (x_tables), raw table PREROUTING, one `-s PREFIX -j DROP` rule per prefix, the matching rule last"
            }
            Self::Ipset => {
                "ipset hash:net holding the prefixes, one iptables-nft raw PREROUTING `-m set --match-set S src -j DROP` rule"
            }
            Self::Nft => {
                "nftables netdev ingress chain on the receiving veth (priority -500), `ip saddr @deny counter drop` with an interval set of the prefixes"
            }
        }
    }

    /// The program that loads a whole list, for the scale section.
    pub fn loader(self) -> &'static str {
        match self {
            Self::DropAll => "-",
            Self::SluiceNative | Self::SluiceGeneric => {
                "PolicyMaps::commit (the code path of `sluice deny add --file`)"
            }
            Self::IptablesNft => "iptables-nft-restore",
            Self::IptablesLegacy => "iptables-legacy-restore",
            Self::Ipset => "ipset restore",
            Self::Nft => "nft -f",
        }
    }

    /// The iptables front end this tool's rules go through (ipset's match
    /// rule goes through iptables-nft).
    fn iptables(self) -> &'static str {
        if self == Self::IptablesLegacy {
            "iptables-legacy"
        } else {
            "iptables-nft"
        }
    }

    pub fn needs(self) -> &'static [&'static str] {
        match self {
            Self::DropAll | Self::SluiceNative | Self::SluiceGeneric => &[],
            Self::IptablesNft => &["iptables-nft", "iptables-nft-restore"],
            Self::IptablesLegacy => &["iptables-legacy", "iptables-legacy-restore"],
            Self::Ipset => &["ipset", "iptables-nft"],
            Self::Nft => &["nft"],
        }
    }
}

const SET: &str = "sbdeny";
const NFT_TABLE: &str = "sbench";

enum State {
    DropAll(progs::Attached),
    Sluice(Box<SluiceState>),
    Netfilter,
}

struct SluiceState {
    pins: PinDir,
    maps: Option<PolicyMaps>,
}

/// One firewall installed on a lab's receiver.
pub struct Installed<'a> {
    pub tool: Tool,
    lab: &'a Lab,
    state: State,
    /// How long loading the list took (None for the ceiling).
    pub load_time: Option<Duration>,
    torn_down: bool,
}

/// Loads of huge rule sets are bounded: past this they are reported as not
/// finished.
pub struct Limits {
    pub load_timeout: Duration,
    pub change_timeout: Duration,
}

fn prefixes_text(prefixes: &[Ipv4Net], line: impl Fn(&Ipv4Net) -> String) -> String {
    let mut s = String::with_capacity(prefixes.len() * 40);
    for p in prefixes {
        s.push_str(&line(p));
        s.push('\n');
    }
    s
}

/// Error for a command that did not finish in time; callers report it as
/// "did not finish".
#[derive(Debug)]
pub struct TimedOut(pub String, pub Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} did not finish within {} s", self.0, self.1.as_secs())
    }
}

impl std::error::Error for TimedOut {}

impl<'a> Installed<'a> {
    /// Installs `tool` on the lab's receiver with `prefixes` (IPv4) as its
    /// deny list. For iptables the rules keep the given order, so the caller
    /// puts the prefix the traffic matches last.
    pub fn install(
        lab: &'a Lab,
        tool: Tool,
        prefixes: &[Ipv4Net],
        limits: &Limits,
    ) -> Result<Self> {
        let ns = &lab.rx;
        let run_input = |argv: &[&str], input: String, what: &str| -> Result<Duration> {
            let f = ns.exec_timed(argv, Some(input.as_bytes()), limits.load_timeout)?;
            if f.timed_out {
                return Err(TimedOut(what.to_string(), limits.load_timeout).into());
            }
            if !f.ok() {
                bail!("{what} failed ({}): {}", f.output.status, f.stderr().trim());
            }
            Ok(f.elapsed)
        };
        let mut inst = Installed {
            tool,
            lab,
            state: State::Netfilter,
            load_time: None,
            torn_down: false,
        };
        match tool {
            Tool::DropAll => {
                let idx = ns.ifindex(&lab.rx_if)?;
                inst.state = State::DropAll(ns.run(move || progs::attach_drop_all(idx))?);
            }
            Tool::SluiceNative | Tool::SluiceGeneric => {
                let pins = PinDir::new();
                let mode = if tool == Tool::SluiceNative {
                    AttachMode::Native
                } else {
                    AttachMode::Generic
                };
                let (root, iface, label) =
                    (pins.root.clone(), lab.rx_if.clone(), ns.name().to_string());
                // The state owns the pins from here on, so a failure below
                // still removes them (Drop detaches).
                inst.state = State::Sluice(Box::new(SluiceState { pins, maps: None }));
                ns.run(move || {
                    attach::attach(&root, &iface, mode, &label)
                        .map_err(|e| anyhow!("sluice attach: {e}"))
                })?;
                let State::Sluice(st) = &mut inst.state else {
                    unreachable!()
                };
                let mut maps = PolicyMaps::open(&st.pins.root)?;
                let change = Change {
                    add: prefixes
                        .iter()
                        .map(|p| (ListId::DenyV4, IpNet::V4(*p)))
                        .collect(),
                    ..Change::default()
                };
                let t0 = Instant::now();
                maps.commit(change)
                    .map_err(|e| anyhow!("sluice commit: {e}"))?;
                inst.load_time = Some(t0.elapsed());
                st.maps = Some(maps);
            }
            Tool::IptablesNft | Tool::IptablesLegacy => {
                let restore = if tool == Tool::IptablesNft {
                    "iptables-nft-restore"
                } else {
                    "iptables-legacy-restore"
                };
                let mut input =
                    String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
                input.push_str(&prefixes_text(prefixes, |p| {
                    format!("-A PREROUTING -s {p} -j DROP")
                }));
                input.push_str("COMMIT\n");
                inst.load_time = Some(run_input(&[restore], input, restore)?);
            }
            Tool::Ipset => {
                let maxelem = (prefixes.len() * 2).max(65_536);
                let mut input = format!("create {SET} hash:net family inet maxelem {maxelem}\n");
                input.push_str(&prefixes_text(prefixes, |p| format!("add {SET} {p}")));
                inst.load_time = Some(run_input(&["ipset", "restore"], input, "ipset restore")?);
                ns.exec_ok(&[
                    "iptables-nft",
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-m",
                    "set",
                    "--match-set",
                    SET,
                    "src",
                    "-j",
                    "DROP",
                ])?;
            }
            Tool::Nft => {
                let mut input = format!(
                    "table netdev {NFT_TABLE} {{\n  set deny {{\n    type ipv4_addr\n    flags interval\n    elements = {{\n"
                );
                for (i, p) in prefixes.iter().enumerate() {
                    let _ = write!(input, "{}{p}", if i == 0 { "      " } else { ",\n      " });
                }
                let _ = write!(
                    input,
                    "\n    }}\n  }}\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n    ip saddr @deny counter drop\n  }}\n}}\n",
                    lab.rx_if
                );
                inst.load_time = Some(run_input(&["nft", "-f", "-"], input, "nft -f")?);
            }
        }
        Ok(inst)
    }

    /// Packets this firewall has dropped so far (its own counter); None
    /// when listing the counters takes longer than `timeout` (huge rule sets).
    pub fn dropped(&mut self, timeout: Duration) -> Result<Option<u64>> {
        let ns = &self.lab.rx;
        let list = |argv: &[&str]| -> Result<Option<String>> {
            let f = ns.exec_timed(argv, None, timeout)?;
            if f.timed_out {
                return Ok(None);
            }
            if !f.ok() {
                bail!("`{}` failed: {}", argv.join(" "), f.stderr().trim());
            }
            Ok(Some(f.stdout()))
        };
        match (&mut self.state, self.tool) {
            (State::DropAll(_), _) => Ok(Some(self.lab.rx_stats.sum("_xdp_drops")?)),
            (State::Sluice(st), _) => {
                let maps = st.maps.as_ref().context("sluice maps not open")?;
                let c = maps
                    .counters()
                    .map_err(|e| anyhow!("sluice counters: {e}"))?;
                let i = counter_index(Family::V4, L4::Udp, Verdict::Drop, Reason::DenyList);
                Ok(Some(c.get(i as usize).map_or(0, |c| c.packets)))
            }
            (State::Netfilter, t @ (Tool::IptablesNft | Tool::Ipset | Tool::IptablesLegacy)) => {
                list(&[
                    t.iptables(),
                    "-t",
                    "raw",
                    "-L",
                    "PREROUTING",
                    "-v",
                    "-x",
                    "-n",
                ])?
                .map(|l| iptables_drops(&l))
                .transpose()
            }
            (State::Netfilter, Tool::Nft) => {
                match list(&["nft", "-j", "list", "chain", "netdev", NFT_TABLE, "ingress"])? {
                    Some(out) => {
                        let v: serde_json::Value =
                            serde_json::from_str(&out).context("nft -j output")?;
                        Ok(Some(sum_counters(&v)))
                    }
                    None => Ok(None),
                }
            }
            (State::Netfilter, t) => bail!("no drop counter for {t:?}"),
        }
    }

    /// Adds one more prefix the way an operator would, and times it.
    pub fn add_one(&mut self, prefix: Ipv4Net, limits: &Limits) -> Result<Duration> {
        let ns = &self.lab.rx;
        let p = prefix.to_string();
        let argv: Vec<&str> = match (&mut self.state, self.tool) {
            (State::Sluice(st), _) => {
                let maps = st.maps.as_mut().context("sluice maps not open")?;
                let t0 = Instant::now();
                maps.commit(Change {
                    add: vec![(ListId::DenyV4, IpNet::V4(prefix))],
                    ..Change::default()
                })
                .map_err(|e| anyhow!("sluice commit: {e}"))?;
                return Ok(t0.elapsed());
            }
            (_, t @ (Tool::IptablesNft | Tool::IptablesLegacy)) => vec![
                t.iptables(),
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-s",
                &p,
                "-j",
                "DROP",
            ],
            (_, Tool::Ipset) => vec!["ipset", "add", SET, &p],
            (_, Tool::Nft) => vec![
                "nft", "add", "element", "netdev", NFT_TABLE, "deny", "{", &p, "}",
            ],
            (_, t) => bail!("no incremental change for {t:?}"),
        };
        let f = ns.exec_timed(&argv, None, limits.change_timeout)?;
        if f.timed_out {
            return Err(TimedOut(argv.join(" "), limits.change_timeout).into());
        }
        if !f.ok() {
            bail!("`{}` failed: {}", argv.join(" "), f.stderr().trim());
        }
        Ok(f.elapsed)
    }

    /// The pinned sluice program, for BPF_PROG_TEST_RUN on this instance.
    pub fn sluice_prog(&self) -> Result<aya::programs::Xdp> {
        let State::Sluice(st) = &self.state else {
            bail!("not a sluice instance");
        };
        aya::programs::Xdp::from_pin(
            st.pins.root.prog(),
            aya_obj::programs::XdpAttachType::Interface,
        )
        .map_err(|e| anyhow!("opening the pinned sluice program: {e}"))
    }

    /// Removes the firewall synchronously (a big rule set is freed here, not
    /// in the background of the next measurement).
    pub fn teardown(mut self, limit: Duration) -> Result<()> {
        self.torn_down = true;
        self.remove(limit)
    }

    fn remove(&mut self, limit: Duration) -> Result<()> {
        let ns = &self.lab.rx;
        let quiet = |argv: &[&str]| -> Result<()> {
            let _ = ns.exec_timed(argv, None, limit)?;
            Ok(())
        };
        match std::mem::replace(&mut self.state, State::Netfilter) {
            State::DropAll(a) => drop(a),
            State::Sluice(mut st) => {
                st.maps = None;
                let (root, iface, label) = (
                    st.pins.root.clone(),
                    self.lab.rx_if.clone(),
                    ns.name().to_string(),
                );
                let r = ns.run(move || {
                    attach::detach(&root, &iface, &label)
                        .map(|_| ())
                        .map_err(|e| anyhow!("sluice detach: {e}"))
                });
                drop(st);
                r?;
            }
            State::Netfilter => match self.tool {
                Tool::IptablesNft => {
                    quiet(&["iptables-nft", "-t", "raw", "-F", "PREROUTING"])?;
                    quiet(&["nft", "delete", "table", "ip", "raw"])?;
                }
                Tool::IptablesLegacy => {
                    quiet(&["iptables-legacy", "-t", "raw", "-F", "PREROUTING"])?
                }
                Tool::Ipset => {
                    quiet(&["iptables-nft", "-t", "raw", "-F", "PREROUTING"])?;
                    quiet(&["nft", "delete", "table", "ip", "raw"])?;
                    quiet(&["ipset", "destroy", SET])?;
                }
                Tool::Nft => quiet(&["nft", "delete", "table", "netdev", NFT_TABLE])?,
                _ => {}
            },
        }
        Ok(())
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if !self.torn_down {
            let _ = self.remove(Duration::from_secs(60));
        }
    }
}

/// Sum of the packet counts of the DROP rules in `iptables -L -v -x -n`.
fn iptables_drops(listing: &str) -> Result<u64> {
    let mut sum = 0u64;
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() > 2 && cols[2] == "DROP" {
            sum += cols[0]
                .parse::<u64>()
                .with_context(|| format!("parsing {line:?}"))?;
        }
    }
    Ok(sum)
}

/// Sum of every `"counter": {"packets": N}` in nft's JSON output.
fn sum_counters(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                if k == "counter" {
                    v.get("packets")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0)
                } else {
                    sum_counters(v)
                }
            })
            .sum(),
        serde_json::Value::Array(a) => a.iter().map(sum_counters).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iptables_counters() {
        let l = "Chain PREROUTING (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target     prot opt in     out     source               destination\n 3738636 186931800 DROP       0    --  *      *       198.18.0.0/16        0.0.0.0/0\n       5      300 DROP       0    --  *      *       1.2.3.4          0.0.0.0/0\n";
        assert_eq!(iptables_drops(l).unwrap(), 3_738_641);
    }

    #[test]
    fn sums_nft_counters() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},{"rule":{"expr":[{"match":{}},{"counter":{"packets":7,"bytes":9}},{"drop":null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(sum_counters(&v), 7);
    }
}
