//! Who answers each VIP, and why.
//!
//! The placement core is a pure function from state to assignment, after Pacemaker's
//! scheduler and CTDB's IP allocation: no I/O, no maps, no clock of its own, the same
//! answer for the same input, and sticky (nothing moves that need not move). The agent
//! feeds it the adapters (health, weight, load, capacity), the VIPs and the previous
//! assignment; it applies the [`Diff`] between two assignments to the data plane, the
//! host and the network, and does nothing else.
//!
//! Three steps:
//! 1. [`classify`]: VIPs that would be placed alike (same adapters in the same order, mode,
//!    failover, VLAN, and the same adapters fit to take them over) form one [`Class`].
//!    Placement works on classes, so its cost follows the number of distinct
//!    configurations, not the number of VIPs: 100,000 VIPs in one range are one class.
//! 2. [`place`]: each class gets one or more [`Run`]s (contiguous slices of its members)
//!    with the adapters allowed to answer, spread buckets and refusals. A class splits
//!    into several runs only when a takeover is limited by `max_vips`.
//! 3. [`diff`]: the segments whose placement or answering adapters changed, which is all
//!    the applier looks at.
//!
//! Nodes are one more input: an adapter answers only while its node is up, and the
//! adapters answering one VIP are always on one node.

mod classify;
mod diff;
mod nodes;
mod place;
mod spread;
mod subnet;

use std::{net::IpAddr, sync::Arc};

pub use classify::{classify, Class, ClassKey, Classes};
pub use diff::{diff, Diff, Segment};
pub use nodes::{place_nodes, ClusterNode, NodesDecision, NodesInput, Rule, Unit};
pub use place::{heir, place, up_mask, Decision, Input};
pub use spread::weighted_table;
pub use subnet::Subnet;

/// An adapter's index in the configuration: its bit in an allowed mask and its slot in
/// the data plane.
pub type Slot = u8;
/// Adapters are bits of a `u64` mask.
pub const MAX_SLOTS: usize = 64;
/// Buckets of a spread table: a client's bucket is a hash of its address. 240 divides
/// by 1..=6, 8, 10, 12, 15 and 16, so a weighted round robin repeats exactly around it.
pub const BUCKETS: usize = 240;
/// A bucket nobody owns (no adapter of the VIP is up).
pub const NO_SLOT: Slot = 0xff;

/// Which of a VIP's adapters answer for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Every healthy adapter answers (seed 001).
    All,
    /// The first healthy adapter in the VIP's list (seed 002's primary and secondary).
    Primary,
    /// One healthy adapter per client, by a hash of the client's address, weighted
    /// (seeds 001 and 004).
    #[default]
    Spread,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Primary => "primary",
            Mode::Spread => "spread",
        }
    }
}

/// A node: the host itself on a single node; the cluster layer adds the others.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub up: bool,
}

/// An adapter as placement sees it.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    /// Index into the nodes.
    pub node: usize,
    /// Answering now. The agent counts a link in hold-down as up and one in up-delay (or
    /// missing) as down.
    pub up: bool,
    /// Share of spread clients, relative to the VIP's other adapters (at least 1).
    pub weight: u32,
    /// VIP bytes per second through it, as last sampled: where moved clients go.
    pub load: f64,
    /// At most this many VIPs answered here (its own plus taken over); None: no limit.
    pub max_vips: Option<u32>,
    /// 802.1Q VLANs it carries (for takeover checks).
    pub vlans: Vec<u16>,
    /// Its addresses' and routes' subnets: where it may take a VIP over.
    pub subnets: Vec<Subnet>,
}

/// A VIP as placement sees it.
#[derive(Debug, Clone)]
pub struct Vip {
    pub addr: IpAddr,
    /// 0: untagged.
    pub vlan: u16,
    /// Its own adapters, in order of preference (shared by the VIPs of one range).
    pub homes: Arc<[Slot]>,
    pub mode: Mode,
    /// Taken over by other adapters when none of its own is up.
    pub failover: bool,
    /// Spread: clients that moved away go back to an adapter that returns.
    pub rebalance: bool,
    /// Taken over, it stays with its takers while they are up, even when its own
    /// adapters return (a cluster VIP a recovered node does not take back).
    pub stay: bool,
    /// The adapters that may take it over (besides its own); None: any that fit.
    pub takers: Option<Arc<[Slot]>>,
}

/// Where one run of a class's members is placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// First member (position in [`Class::members`]) and how many.
    pub start: u32,
    pub len: u32,
    /// Adapters that may answer (bit per slot). The data plane also requires each to be
    /// up, so a class at home keeps all its adapters here and a failure changes nothing.
    pub allowed: u64,
    /// Taken over: answered by adapters that are not its own.
    pub away: bool,
    /// Nobody may answer (its own are down, no takeover possible or allowed).
    pub stranded: bool,
    /// Spread mode: the owner of each bucket (`NO_SLOT`: nobody up).
    pub buckets: Option<Arc<[Slot; BUCKETS]>>,
}

impl Run {
    pub fn end(&self) -> u32 {
        self.start + self.len
    }
}

/// One class's placement: runs covering its members in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    pub runs: Vec<Run>,
}

impl Placement {
    /// The run holding member `pos`.
    pub fn run_at(&self, pos: u32) -> Option<&Run> {
        let i = self.runs.partition_point(|r| r.end() <= pos);
        self.runs.get(i).filter(|r| r.start <= pos)
    }
}

/// The decision: a placement per class, and an heir per adapter that is down.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// Parallel to [`Classes::list`].
    pub classes: Vec<Placement>,
    /// Per adapter: while it is down, the adapter that takes frames still sent to its MAC
    /// (stragglers, or all of them when its MAC moves).
    pub heirs: Vec<Option<Slot>>,
    /// Adapters counted as up (node up too) when this was decided.
    pub up: u64,
}

impl Assignment {
    /// The run placing VIP `vip` (an index into the VIPs).
    pub fn run_of<'a>(&'a self, classes: &Classes, vip: u32) -> Option<&'a Run> {
        let (c, pos) = *classes.of_vip.get(vip as usize)?;
        self.classes.get(c as usize)?.run_at(pos)
    }

    /// Adapters answering VIP `vip` now: allowed and up.
    pub fn answering(&self, classes: &Classes, vip: u32) -> u64 {
        self.run_of(classes, vip).map_or(0, |r| r.allowed & self.up)
    }
}

/// Why an adapter does not answer a VIP it might have taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// It does not carry the VIP's VLAN.
    Vlan(u16),
    /// None of its addresses or routes is in the VIP's subnet.
    Subnet,
    /// It already answers `max_vips` VIPs.
    MaxVips(u32),
    /// No adapter other than the VIP's own (all down) is up.
    NoOtherAdapter,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Vlan(v) => write!(f, "does not carry vlan {v}"),
            Reason::Subnet => f.write_str("has no address or route in the VIP's subnet"),
            Reason::MaxVips(n) => write!(f, "is at max_vips ({n})"),
            Reason::NoOtherAdapter => f.write_str("no other healthy adapter"),
        }
    }
}

/// A takeover refused: the run of VIPs, the adapter (None: no adapter at all) and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Refusal {
    pub class: u32,
    pub start: u32,
    pub len: u32,
    pub adapter: Option<Slot>,
    pub reason: Reason,
}

/// Bit of slot `s`.
#[inline]
pub fn bit(s: Slot) -> u64 {
    1u64 << s
}

/// The slots in `mask`, lowest first.
pub fn slots(mask: u64) -> impl Iterator<Item = Slot> {
    (0..MAX_SLOTS as u8).filter(move |s| mask & bit(*s) != 0)
}
