//! The peer heartbeat, on the wire: one UDP datagram, little-endian, sent every
//! `heartbeat_ms` to every peer over every healthy adapter.
//!
//! ```text
//! 0   magic "VIPH" | version u8 | flags u8 | n_acks u8 | n_votes u8
//! 8   cluster u64        (hash of the cluster name: other clusters' frames are ignored)
//! 16  from u64           (hash of the sender's node name)
//! 24  incarnation u64    (the sender's membership key's create revision)
//! 32  seq u64            (this heartbeat's number; the same on every path)
//! 40  members u64        (the version of the member list the sender goes by)
//! 48  acks:  n_acks  x { node u64, incarnation u64, seq u64 }   newest seq heard
//!     votes: n_votes x { node u64, incarnation u64 }            will never ack again
//! ```
//!
//! A frame that is short, long, of another version or cluster, or lists more than
//! [`MAX_ENTRIES`] of either is rejected whole.

use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"VIPH";
pub const VERSION: u8 = 1;
/// The sender is leaving (SIGTERM, or every adapter down) and has stopped answering.
pub const FLAG_LEAVING: u8 = 1;
/// Acks and votes per frame: a cluster has at most this many nodes.
pub const MAX_ENTRIES: usize = 64;
const HEADER: usize = 48;

/// Who a node is: its name's hash, and which registration of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Incarnation {
    pub node: u64,
    pub incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub cluster: u64,
    pub from: Incarnation,
    pub seq: u64,
    pub members: u64,
    pub flags: u8,
    /// Per peer heard: the newest sequence number heard from it.
    pub acks: Vec<(Incarnation, u64)>,
    /// Peers the sender stopped acking at least `suspect_ms` ago, for good.
    pub votes: Vec<Incarnation>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is too short")]
    Short(usize),
    #[error("not a heartbeat (magic)")]
    Magic,
    #[error("heartbeat version {0}, this node speaks {VERSION}")]
    Version(u8),
    #[error("{0} entries (at most {MAX_ENTRIES})")]
    TooMany(usize),
    #[error("frame of {got} bytes, its counts say {want}")]
    Length { got: usize, want: usize },
}

/// FNV-1a, 64 bits: node and cluster names on the wire.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        let acks = &self.acks[..self.acks.len().min(MAX_ENTRIES)];
        let votes = &self.votes[..self.votes.len().min(MAX_ENTRIES)];
        let mut b = Vec::with_capacity(HEADER + acks.len() * 24 + votes.len() * 16);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[VERSION, self.flags, acks.len() as u8, votes.len() as u8]);
        for v in [self.cluster, self.from.node, self.from.incarnation, self.seq, self.members] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for (who, seq) in acks {
            for v in [who.node, who.incarnation, *seq] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        for who in votes {
            for v in [who.node, who.incarnation] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Heartbeat, WireError> {
        if b.len() < HEADER {
            return Err(WireError::Short(b.len()));
        }
        if b[0..4] != MAGIC {
            return Err(WireError::Magic);
        }
        if b[4] != VERSION {
            return Err(WireError::Version(b[4]));
        }
        let (flags, n_acks, n_votes) = (b[5], b[6] as usize, b[7] as usize);
        if n_acks > MAX_ENTRIES || n_votes > MAX_ENTRIES {
            return Err(WireError::TooMany(n_acks.max(n_votes)));
        }
        let want = HEADER + n_acks * 24 + n_votes * 16;
        if b.len() != want {
            return Err(WireError::Length { got: b.len(), want });
        }
        let mut o = HEADER;
        let mut acks = Vec::with_capacity(n_acks);
        for _ in 0..n_acks {
            acks.push((Incarnation { node: u64_at(b, o), incarnation: u64_at(b, o + 8) }, u64_at(b, o + 16)));
            o += 24;
        }
        let mut votes = Vec::with_capacity(n_votes);
        for _ in 0..n_votes {
            votes.push(Incarnation { node: u64_at(b, o), incarnation: u64_at(b, o + 8) });
            o += 16;
        }
        Ok(Heartbeat {
            cluster: u64_at(b, 8),
            from: Incarnation { node: u64_at(b, 16), incarnation: u64_at(b, 24) },
            seq: u64_at(b, 32),
            members: u64_at(b, 40),
            flags,
            acks,
            votes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(n: u64, i: u64) -> Incarnation {
        Incarnation { node: n, incarnation: i }
    }

    fn sample() -> Heartbeat {
        Heartbeat {
            cluster: name_hash("lab"),
            from: inc(name_hash("n1"), 7),
            seq: 1234,
            members: 99,
            flags: FLAG_LEAVING,
            acks: vec![(inc(2, 8), 55), (inc(3, 9), 66)],
            votes: vec![inc(3, 9)],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(b.len(), 48 + 2 * 24 + 16);
        assert_eq!(Heartbeat::decode(&b), Ok(h));
    }

    #[test]
    fn bad_frames_are_rejected_whole() {
        let good = sample().encode();
        let cases: Vec<(&str, Vec<u8>, WireError)> = vec![
            ("empty", vec![], WireError::Short(0)),
            ("header cut", good[..47].to_vec(), WireError::Short(47)),
            ("magic", [b"XIPH".as_slice(), &good[4..]].concat(), WireError::Magic),
            ("version", { let mut b = good.clone(); b[4] = 2; b }, WireError::Version(2)),
            ("one byte short", good[..good.len() - 1].to_vec(), WireError::Length { got: good.len() - 1, want: good.len() }),
            ("one byte long", [good.as_slice(), &[0]].concat(), WireError::Length { got: good.len() + 1, want: good.len() }),
            ("acks overstated", { let mut b = good.clone(); b[6] = 3; b }, WireError::Length { got: good.len(), want: good.len() + 24 }),
            ("too many", { let mut b = good.clone(); b[7] = 65; b }, WireError::TooMany(65)),
        ];
        for (what, frame, want) in cases {
            assert_eq!(Heartbeat::decode(&frame), Err(want), "{what}");
        }
    }

    #[test]
    fn every_truncation_and_byte_flip_is_decoded_or_rejected_without_panic() {
        let good = sample().encode();
        for n in 0..good.len() {
            assert!(Heartbeat::decode(&good[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let _ = Heartbeat::decode(&b);
            }
        }
    }

    #[test]
    fn names_hash_apart() {
        assert_ne!(name_hash("n1"), name_hash("n2"));
        assert_eq!(name_hash(""), 0xcbf2_9ce4_8422_2325);
    }
}
