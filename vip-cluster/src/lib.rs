//! vip's cluster layer.
//!
//! * [`wire`]: the peer heartbeat frame.
//! * [`peers`]: acks, votes and the answering deadline they prove (pure).

pub mod peers;
pub mod wire;
pub mod records;
pub mod store;

pub mod leader;
pub mod node;
