//! Batched map operations (BPF_MAP_*_BATCH), which aya 0.14 does not offer: writing
//! 100,000 VIPs or reading 65,536 clients one `bpf()` call at a time costs a syscall each
//! (about 1 µs); a batch moves thousands per call.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytemuck::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, size_of::<BatchAttr>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Inserts or replaces every `(key, value)`, in chunks.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd, keys: &[K], values: &[V]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    const CHUNK: usize = 4096;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut done = 0;
        while done < k.len() {
            let mut a = BatchAttr {
                keys: k[done..].as_ptr() as u64,
                values: v[done..].as_ptr() as u64,
                count: (k.len() - done) as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_UPDATE_BATCH, &mut a);
            // On error `count` says how many went in before it.
            done += a.count as usize;
            r?;
        }
    }
    Ok(())
}

/// Deletes every key (missing keys are an error only if nothing else went wrong).
pub fn delete<K: Pod>(fd: BorrowedFd, keys: &[K]) -> io::Result<usize> {
    let mut done = 0;
    while done < keys.len() {
        let mut a = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut a);
        done += a.count as usize;
        match r {
            Ok(()) => {}
            // A key gone meanwhile (the LRU evicted it): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Every entry of a hash map (`V` is the whole value as the syscall returns it; per-CPU
/// maps are not supported here).
pub fn dump<K: Pod, V: Pod>(fd: BorrowedFd) -> io::Result<Vec<(K, V)>> {
    const CHUNK: usize = 1024;
    let mut out = vec![];
    let mut keys = vec![K::zeroed(); CHUNK];
    let mut values = vec![V::zeroed(); CHUNK];
    // The batch token is opaque; the kernel writes at most the key size (a bucket index
    // for hash maps).
    let mut token_in = vec![0u8; size_of::<K>().max(8)];
    let mut token_out = vec![0u8; size_of::<K>().max(8)];
    let mut first = true;
    loop {
        let mut a = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_mut_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        let n = a.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => {}
            // The end of the map.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}

/// Every value of a per-CPU array of `entries` elements: `entries × cpus` values, element
/// by element (the kernel's own order), in batches.
pub fn dump_per_cpu<V: Pod>(fd: BorrowedFd, entries: u32, cpus: usize) -> io::Result<Vec<V>> {
    let mut keys = vec![0u32; entries as usize];
    let mut values = vec![V::zeroed(); entries as usize * cpus];
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut done = 0usize;
    while done < entries as usize {
        let mut a = BatchAttr {
            in_batch: if done == 0 { 0 } else { &mut token_in as *mut u32 as u64 },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done * cpus..].as_mut_ptr() as u64,
            count: entries - done as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        done += a.count as usize;
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        token_in = token_out;
    }
    values.truncate(done * cpus);
    Ok(values)
}
