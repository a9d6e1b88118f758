//! What the cluster keeps in etcd, as JSON, under `/vip/<cluster>/`:
//!
//! | key | written by | what |
//! |---|---|---|
//! | `nodes/<name>` | the node (its lease) | [`NodeRecord`]: state, ports, heartbeat addresses |
//! | `election/<name>` | the node (its lease) | candidacy; the lowest create revision leads |
//! | `members` | the leader | [`MembersRecord`]: the member list heartbeats count majorities in |
//! | `defs` | `vip-agent cluster apply` | [`Defs`]: the cluster's VIPs |
//! | `assign` | the leader | [`AssignRecord`]: who answers each group of VIPs |
//! | `fence/<name>` | the node | present while it answers on etcd's word rather than its peers' |
//! | `takeovers` | the leader | [`TakeoverRecord`]s, the last 64 |
//! | `rebalance` | `vip-agent cluster rebalance` | a request: its mod revision, once newer than [`AssignRecord::rebalanced`], has the leader even the load |
//!
//! Nothing read from etcd names a command, a path or a script: a node only ever applies
//! addresses to its own adapters.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The role a node is configured with (seed 003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Home to VIPs, and takes over.
    #[default]
    Active,
    /// Home to nothing; takes over the VIPs of failed nodes.
    Standby,
}

/// A node's own record (on its lease: it goes when the node's lease expires).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    /// Its first adapter's address (for status).
    pub address: String,
    /// Where its peers send heartbeats: one address per adapter.
    pub heartbeat: Vec<String>,
    pub ports: Vec<PortRecord>,
    /// It has stopped answering every cluster VIP (leaving, or no adapter left): its VIPs
    /// may move at once.
    pub fenced: bool,
    /// Unix time it registered.
    pub since: f64,
    /// The groups (by first address) it may answer: it says so before it starts
    /// answering one, and only after it stopped.
    #[serde(default)]
    pub holding: Vec<IpAddr>,
    /// The incarnation of its own this registration replaces, fenced before it registered
    /// (a restarted agent): that one's VIPs may move at once.
    #[serde(default)]
    pub replaces: Option<u64>,
    /// Groups it took from other nodes, when its data plane started answering them (the
    /// last few): the "first answer by the new owner" of a takeover.
    #[serde(default)]
    pub took: Vec<Took>,
    /// Its failover group and pair partner (seed 000), from its config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    /// Virtual servers that failed here (a hook said so): not to be given to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Took {
    pub from: String,
    pub groups: usize,
    /// Unix time its data plane answered them.
    pub at: f64,
    /// Of that, the time its virtual servers' `acquire` hooks took (ms).
    #[serde(default)]
    pub hooks_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortRecord {
    pub name: String,
    pub up: bool,
    /// Subnets it reaches (where it may take a VIP over).
    pub subnets: Vec<String>,
    #[serde(default)]
    pub vlans: Vec<u16>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The member list the leader wrote; its version is the etcd revision of the write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MembersRecord {
    /// (node name, incarnation = create revision of its node key).
    pub members: Vec<(String, u64)>,
}

/// How a group's VIPs are answered on the node that holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    All,
    Primary,
    #[default]
    Spread,
}

/// One `[[vip]]` of the cluster's definitions: `count` consecutive addresses from
/// `address`, held by one node at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDef {
    pub address: IpAddr,
    /// The prefix of its subnet (as written: `192.0.2.50/24`).
    pub prefix: u8,
    pub count: u32,
    #[serde(default)]
    pub vlan: u16,
    #[serde(default)]
    pub mode: Mode,
    /// The node it lives on while that node is up (None: placed by the leader).
    #[serde(default)]
    pub node: Option<String>,
    /// Adapters (by name, on whichever node holds it) that answer it; empty: all of the
    /// node's adapters that reach its subnet.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Moves to another node when its own fails.
    #[serde(default = "yes")]
    pub failover: bool,
    /// Goes back to its own node when that node returns (otherwise it stays put).
    #[serde(default)]
    pub rebalance: bool,
    /// The virtual server it belongs to (it then moves with it, and `node`, `failover`
    /// and `rebalance` are the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Its share of a node's load, for balancing (a server's groups count as the server).
    #[serde(default = "one")]
    pub weight: u32,
}

fn yes() -> bool {
    true
}

/// A virtual server (seed 004): a name for VIP groups that move together, exclusively
/// on one node, with a priority for takeovers. What it runs (hooks) is each node's own
/// configuration, never the cluster's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerDef {
    pub name: String,
    /// Its home node while that node is up (None: placed by the leader).
    #[serde(default)]
    pub node: Option<String>,
    /// Higher moves first.
    #[serde(default)]
    pub priority: i32,
    /// Moves to another node when its node fails (`false`: stays down with it; a port
    /// failure still moves it).
    #[serde(default = "yes")]
    pub migrate: bool,
    /// Goes back home when its home returns.
    #[serde(default)]
    pub rebalance: bool,
    #[serde(default = "one")]
    pub weight: u32,
}

/// The cluster's VIPs (what `vip-agent cluster apply` writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Defs {
    /// The file they came from, for status.
    #[serde(default)]
    pub source: String,
    pub groups: Vec<GroupDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerDef>,
}

impl GroupDef {
    /// The group's addresses, in order.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        (0..self.count).filter_map(move |i| add(self.address, i))
    }
}

/// `a + i`, None past the end of the family.
pub fn add(a: IpAddr, i: u32) -> Option<IpAddr> {
    match a {
        IpAddr::V4(v) => u32::from(v).checked_add(i).map(|x| IpAddr::V4(x.into())),
        IpAddr::V6(v) => u128::from(v).checked_add(i as u128).map(|x| IpAddr::V6(x.into())),
    }
}

/// A node's health as the leader sees it (seed 003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Active,
    Standby,
    /// Declared dead (or gone): its VIPs moved.
    Failed,
    /// Back after a failure: holds nothing until a rebalance gives it something.
    Recovered,
    /// Left on purpose (SIGTERM) or lost every adapter ("system down").
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub name: String,
    pub health: Health,
    pub since: f64,
}

/// Who holds each group (in the order of [`Defs::groups`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAssign {
    /// Its first address (groups are matched by it when the definitions change).
    pub address: IpAddr,
    pub owner: Option<String>,
    /// The owner's incarnation: a restarted node is a new one and holds nothing it is not
    /// given again.
    #[serde(default)]
    pub incarnation: u64,
    /// The node it was taken from, if it moved with this assignment.
    #[serde(default)]
    pub from: Option<String>,
    /// The new owner waits this long after reading the assignment before it answers:
    /// the previous owner may still answer on etcd's word until then.
    #[serde(default)]
    pub wait_ms: u64,
}

/// The leader's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AssignRecord {
    pub leader: String,
    /// The leader's election key's create revision: its fencing token.
    pub term: i64,
    /// The mod revision of the definitions it was made for.
    pub defs: i64,
    pub groups: Vec<GroupAssign>,
    pub nodes: Vec<NodeHealth>,
    /// Unix time.
    pub at: f64,
    /// The revision of the last `cluster rebalance` request carried out.
    #[serde(default)]
    pub rebalanced: i64,
}

/// One node's VIPs moving to others, with its timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TakeoverRecord {
    pub node: String,
    /// suspected (silent), left, down, lease expired, rebalance...
    pub reason: String,
    /// Unix times: last heard from by the leader (0: not known), suspected (or told),
    /// and the decision committed.
    #[serde(default)]
    pub silent_since: f64,
    pub suspected_at: f64,
    pub decided_at: f64,
    pub groups: usize,
    pub vips: usize,
    pub to: Vec<String>,
    pub leader: String,
    /// When the new owner first answered (unix time; filled in by `cluster status` from
    /// the new owner's record, 0 until then).
    #[serde(default)]
    pub answered_at: f64,
    /// Of the time to the first answer, what the new owners' `acquire` hooks took (ms).
    #[serde(default)]
    pub hooks_ms: f64,
}
