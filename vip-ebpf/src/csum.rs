//! Internet checksum (RFC 1071) over native-order words: the one's complement sum is
//! byte-order independent, so loads need no swapping and the folded result is stored as is.

#[inline(always)]
pub fn add16(sum: u64, b: [u8; 2]) -> u64 {
    sum + u16::from_ne_bytes(b) as u64
}

#[inline(always)]
pub fn add_bytes<const N: usize>(mut sum: u64, b: &[u8; N]) -> u64 {
    let mut i = 0;
    while i + 1 < N {
        sum = add16(sum, [b[i], b[i + 1]]);
        i += 2;
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
