//! Internet checksum (RFC 1071) over native-order words: the one's complement sum is
//! byte-order independent, so loads need no swapping and the folded result is stored as is.

#[inline(always)]
pub fn add16(sum: u64, b: [u8; 2]) -> u64 {
    sum + u16::from_ne_bytes(b) as u64
}

/// Adds `N` bytes of the frame at `p` 32 bits at a time (the one's complement sum of
/// 32-bit words folds to the 16-bit one) with one 32-bit load per word, as C programs read
/// headers. The frame's headers sit at 2-byte offsets: LLVM would split a load it is told
/// is unaligned into four byte loads (four times the instructions), and the BPF JIT and
/// verifier take unaligned packet loads on the machines vip runs on (x86-64, arm64).
#[inline(always)]
pub fn add_frame_words<const N: usize>(mut sum: u64, p: *const [u8; N]) -> u64 {
    let w = p as *const u32;
    let mut i = 0;
    while i < N / 4 {
        // SAFETY: within the N bytes the caller checked against the frame's end.
        sum += unsafe { w.add(i).read() } as u64;
        i += 1;
    }
    sum
}

#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
