//! vip's cluster layer.
//!
//! * [`wire`]: the peer heartbeat frame.
//! * [`peers`]: acks, votes and the answering deadline they prove (pure).
//! * [`records`], [`store`]: what lives in etcd, and the guarded writes.
//! * [`leader`]: the leader's decision (pure, over the placement core).
//! * [`hooks`]: a virtual server's acquire / release / check executables.
//! * [`node`]: the runtime that ties them together on one node.

pub mod peers;
pub mod wire;
pub mod records;
pub mod store;

pub mod hooks;
pub mod leader;
pub mod node;
