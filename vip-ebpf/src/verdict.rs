//! A path's decision in one register. A BPF function returns one 64-bit value; a
//! `Result<u32, u32>` comes back through a pointer to the caller's stack (a store, a load
//! and one of the five argument registers), so the out-of-line paths return it packed.

/// Set for `Err` (pass or drop): above every decision.
const PASSED: u64 = 1 << 32;

#[inline(always)]
pub fn pack(r: Result<u32, u32>) -> u64 {
    match r {
        Ok(d) => d as u64,
        Err(d) => d as u64 | PASSED,
    }
}

#[inline(always)]
pub fn unpack(v: u64) -> Result<u32, u32> {
    if v & PASSED != 0 {
        Err(v as u32)
    } else {
        Ok(v as u32)
    }
}
