//! Loading the XDP program, attaching it, and reading and writing its maps.

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use bytemuck::Zeroable;
use vip_common::{
    decision, egress, mac_key, names, AdapterInfo, FlowInfo, FlowKey, MacKey, Traffic, VipInfo, VipKey, ANSWERS_LEN,
    BUCKETS_LEN, BUCKET_WORDS, MAX_ADAPTERS, MAX_IFINDEX, MAX_POLICIES, SPREAD_BUCKETS,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} not found in the XDP object")]
    MissingProgram(&'static str),
    #[error("map {0} not found in the XDP object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("attaching {program} to {iface} in {mode:?} mode: {source}")]
    Attach { program: &'static str, iface: String, mode: XdpMode, source: aya::programs::ProgramError },
    #[error("ifindex {0} is too large for the adapter map (limit {MAX_IFINDEX})")]
    IfindexTooLarge(u32),
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("map {map}: {reason}")]
    DevMap { map: &'static str, reason: String },
    #[error("pinning at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("map {0} cannot be memory-mapped (pinned by an older agent? stop it with SIGTERM first)")]
    NotMappable(&'static str),
    #[error("map {map}: {source}")]
    Batch { map: &'static str, source: std::io::Error },
    #[error("policy {0} is out of range (the data plane holds {MAX_POLICIES})")]
    PolicyOutOfRange(u32),
    #[error(
        "the maps pinned in {dir} have layout {found} (0: before versions), this agent's have {want}: \
         reusing them would misread them. Stop the agent that pinned them (SIGTERM) or run `vip-agent cleanup`, then start again"
    )]
    Layout { dir: String, found: u32, want: u32 },
    #[error("the data plane's log ring: {0}")]
    Logs(String),
}

/// The programs' log level, a constant the loader sets (aya-log-ebpf's global).
const LOG_LEVEL: &str = "AYA_LOG_LEVEL";

type Result<T> = std::result::Result<T, DataplaneError>;

/// The loaded data plane: both programs verified and loaded, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
    /// Taken out of `ebpf` once: a failover writes them without looking them up by name.
    adapters: AdapterMap,
    vips: VipMap,
    /// The VIP map's fd, for batched writes.
    vips_fd: std::os::fd::OwnedFd,
    policies: MmapArray,
    buckets: MmapArray,
    answers: MmapArray,
    fence: MmapArray,
    flows: FlowMap,
    flows_fd: std::os::fd::OwnedFd,
    macs: HashMap<MapData, MacKey, u32>,
    events: Option<aya::maps::RingBuf<MapData>>,
    settings: Array<MapData, u32>,
    /// VIP_FILTER: a bit per VIP key hash, set before an entry is written.
    filter: MmapArray,
    /// VIP_TABLE, and what the agent knows of it (`crate::viptable`).
    table: MmapArray,
    vip_table: crate::viptable::Table,
    /// RECENT (per CPU): counts of clients' frames not yet added to their entries.
    recent_fd: std::os::fd::OwnedFd,
    /// The programs' own log records (aya-log), when loaded with a level.
    logs: Option<EbpfLog>,
}

/// Reads the data plane's log records (aya-log's ring buffer) into `tracing`: poll its fd,
/// then [`EbpfLog::flush`].
pub type EbpfLog = aya_log::EbpfLogger<TracingLog>;

/// aya-log hands records to a `log::Log`; this one passes them on to `tracing`, target
/// `vip_ebpf`, at their own level.
pub struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, r: &log::Record) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "vip_ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "vip_ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "vip_ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "vip_ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "vip_ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// An array map mapped into our memory (BPF_F_MMAPABLE): entries are whole 8-byte words,
/// written and read with aligned atomic stores and loads, so no syscall is needed and the
/// data plane never sees a torn word.
struct MmapArray {
    /// Keeps the map (and so the mapping's object) alive.
    _data: MapData,
    mem: *mut u64,
    bytes: usize,
}

// The mapping is shared memory owned by this value; every access is an atomic load or
// store of one aligned word.
unsafe impl Send for MmapArray {}
unsafe impl Sync for MmapArray {}

impl MmapArray {
    /// Maps `data` (`entries` values of `value_size` bytes, a multiple of 8), or gives it
    /// back when the map was not created mmapable.
    #[allow(clippy::result_large_err)] // the map itself comes back, to be used another way
    fn open(data: MapData, entries: u32, value_size: usize) -> std::result::Result<MmapArray, MapData> {
        use std::os::fd::{AsFd, AsRawFd};
        debug_assert!(value_size.is_multiple_of(8));
        let bytes = entries as usize * value_size;
        let fd = data.fd().as_fd().as_raw_fd();
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if mem == libc::MAP_FAILED {
            return Err(data);
        }
        Ok(MmapArray { _data: data, mem: mem.cast(), bytes })
    }

    /// Maps an array map that this object declares mmapable; an error names the map.
    fn require(map: aya::maps::Map, name: &'static str, entries: u32, value_size: usize) -> Result<MmapArray> {
        let aya::maps::Map::Array(data) = map else {
            return Err(DataplaneError::MissingMap(name));
        };
        MmapArray::open(data, entries, value_size).map_err(|_| DataplaneError::NotMappable(name))
    }

    fn word32(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < self.bytes / 4);
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.mem.cast::<u32>().add(i)) }
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < self.bytes / 8);
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.mem.add(i)) }
    }

    fn store(&self, i: usize, v: u64) {
        self.word(i).store(v, std::sync::atomic::Ordering::Release)
    }

    fn load(&self, i: usize) -> u64 {
        self.word(i).load(std::sync::atomic::Ordering::Acquire)
    }
}

impl crate::viptable::Words for MmapArray {
    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        self.word32(i)
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.mem.cast(), self.bytes) };
    }
}

/// Tells every CPU's `RECENT` that the agent changed the client table: what a CPU
/// remembers writing may no longer be there.
fn bump_flows_gen(fence: &MmapArray) {
    let i = vip_common::FENCE_FLOWS_GEN as usize;
    fence.store(i, fence.load(i).wrapping_add(1));
}

/// Adds to `flows` the frames the data plane counted in RECENT and has not yet added to
/// their entries (at most `RECENT_NS` of a client's traffic per CPU; see `vip-ebpf`'s
/// `steer::seen`), so per-client counters read exact.
fn add_pending(flows: &mut [(FlowKey, FlowInfo)], recent: std::os::fd::BorrowedFd) {
    let Ok(cpus) = aya::util::nr_cpus() else { return };
    let Ok(slots) = crate::bpfsys::dump_per_cpu::<vip_common::Recent>(recent, vip_common::RECENT_SLOTS, cpus) else { return };
    let mut pending: std::collections::HashMap<FlowKey, (u64, u64)> = std::collections::HashMap::new();
    for r in slots.iter().filter(|r| r.packets != 0) {
        let p = pending.entry(r.flow).or_default();
        p.0 += r.packets as u64;
        p.1 += r.bytes;
    }
    if pending.is_empty() {
        return;
    }
    for (k, f) in flows.iter_mut() {
        if let Some((p, b)) = pending.get(k) {
            f.packets += p;
            f.bytes += b;
        }
    }
}

fn word(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b.try_into().expect("8 bytes"))
}

/// The ADAPTERS array, memory-mapped when the map allows it (as this object declares it):
/// marking an adapter down is one store. A map without the flag (an older agent's pinned
/// map) is written through `bpf()`.
enum AdapterMap {
    Mapped(MmapArray),
    Syscall(aya::maps::Array<MapData, AdapterInfo>),
}

fn adapters_err(source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map { map: names::ADAPTERS, source }
}

impl AdapterMap {
    fn new(map: aya::maps::Map) -> Result<AdapterMap> {
        const _: () = assert!(size_of::<AdapterInfo>() == 2 * size_of::<u64>());
        let aya::maps::Map::Array(data) = map else {
            return Err(DataplaneError::MissingMap(names::ADAPTERS));
        };
        match MmapArray::open(data, MAX_IFINDEX, size_of::<AdapterInfo>()) {
            Ok(m) => Ok(AdapterMap::Mapped(m)),
            Err(data) => Ok(AdapterMap::Syscall(aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(adapters_err)?)),
        }
    }

    fn set(&mut self, ifindex: u32, info: AdapterInfo) -> Result<()> {
        match self {
            AdapterMap::Mapped(m) => {
                let b = bytemuck::bytes_of(&info);
                // The heir first, then the state: a frame that sees "down" sees its heir.
                m.store(ifindex as usize * 2 + 1, word(&b[8..16]));
                m.store(ifindex as usize * 2, word(&b[0..8]));
                Ok(())
            }
            AdapterMap::Syscall(a) => a.set(ifindex, info, 0).map_err(adapters_err),
        }
    }

    fn get(&self, ifindex: u32) -> AdapterInfo {
        match self {
            AdapterMap::Mapped(m) => {
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&m.load(ifindex as usize * 2).to_ne_bytes());
                b[8..16].copy_from_slice(&m.load(ifindex as usize * 2 + 1).to_ne_bytes());
                bytemuck::pod_read_unaligned(&b)
            }
            AdapterMap::Syscall(a) => a.get(&ifindex, 0).unwrap_or(AdapterInfo::zeroed()),
        }
    }

    pub fn mapped(&self) -> bool {
        matches!(self, AdapterMap::Mapped(_))
    }
}

/// Writes one spread table (`SPREAD_BUCKETS` owner slots) at table `index` of BUCKETS,
/// storing only the words that change.
fn write_buckets(m: &MmapArray, index: u32, slots: &[u8]) {
    assert_eq!(slots.len(), SPREAD_BUCKETS as usize);
    for (w, chunk) in slots.chunks(8).enumerate() {
        let i = (index * BUCKET_WORDS) as usize + w;
        let v = u64::from_ne_bytes(chunk.try_into().expect("8 slots"));
        if m.load(i) != v {
            m.store(i, v);
        }
    }
}

type VipMap = HashMap<MapData, VipKey, VipInfo>;

type FlowMap = HashMap<MapData, FlowKey, FlowInfo>;

/// A second fd on a map (for the batched syscalls aya does not offer).
fn map_fd(map: &aya::maps::Map, name: &'static str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let data = match map {
        aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) | aya::maps::Map::PerCpuArray(d) => d,
        _ => return Err(DataplaneError::MissingMap(name)),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(|source| DataplaneError::Batch { map: name, source })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

impl Dataplane {
    /// Loads the object and both of its programs into the kernel (runs the verifier),
    /// without logging.
    pub fn load(object: &[u8]) -> Result<Self> {
        Self::load_with_log(object, 0)
    }

    /// [`Dataplane::load`] with the programs' log records at `level` and up (aya-log's
    /// levels: 0 none, 1 error ... 5 trace), read by [`Dataplane::take_logs`].
    pub fn load_with_log(object: &[u8], level: u8) -> Result<Self> {
        let ebpf = EbpfLoader::new().override_global(LOG_LEVEL, &level, true).load(object)?;
        Self::finish(ebpf, level)
    }

    /// Like [`Dataplane::load`], but the maps live under `pin_dir`: maps already pinned
    /// there (by an agent that was killed or is being replaced) are reused with their
    /// contents, so answering never stops; missing ones are created and pinned.
    /// `log_level` as for [`Dataplane::load_with_log`].
    pub fn load_pinned(object: &[u8], pin_dir: &Path, log_level: u8) -> Result<Self> {
        // Pins of another layout are refused before anything reuses them.
        let others = names::PINNED_MAPS.iter().any(|n| *n != names::LAYOUT && pin_dir.join(n).exists());
        if others {
            let found = Self::read_layout(&pin_dir.join(names::LAYOUT));
            if found != Some(vip_common::LAYOUT_VERSION) {
                return Err(DataplaneError::Layout { dir: pin_dir.display().to_string(), found: found.unwrap_or(0), want: vip_common::LAYOUT_VERSION });
            }
        }
        let paths: Vec<(&'static str, PathBuf)> = names::PINNED_MAPS.iter().map(|n| (*n, pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.override_global(LOG_LEVEL, &log_level, true);
        let mut ebpf = loader.load(object)?;
        let mut layout: Array<_, u32> = Array::try_from(ebpf.map_mut(names::LAYOUT).ok_or(DataplaneError::MissingMap(names::LAYOUT))?)
            .map_err(map_err(names::LAYOUT))?;
        layout.set(0, vip_common::LAYOUT_VERSION, 0).map_err(map_err(names::LAYOUT))?;
        let dp = Self::finish(ebpf, log_level)?;
        // The filter and the table as the adopted entries need them (no change when they
        // were pinned with them).
        let mut dp = dp;
        dp.filter_rebuild()?;
        dp.table_rebuild()?;
        Ok(dp)
    }

    /// The layout version pinned at `path` (None: no such pin, or unreadable).
fn read_layout(path: &Path) -> Option<u32> {
    let data = MapData::from_pin(path).ok()?;
    let arr: Array<_, u32> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    arr.get(&0, 0).ok()
}

/// Loads every program (the verifier runs here) and takes the maps the agent writes.
    fn finish(mut ebpf: Ebpf, log_level: u8) -> Result<Self> {
        for name in [names::PROGRAM, names::PASS_PROGRAM, names::SINK_PROGRAM, names::BOUNCE_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        for name in [names::EGRESS_PROGRAM, names::INGRESS_PROGRAM, names::TC_PASS_PROGRAM] {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            tc.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        let adapters = AdapterMap::new(take(&mut ebpf, names::ADAPTERS)?)?;
        let vips_map = take(&mut ebpf, names::VIPS)?;
        let vips_fd = map_fd(&vips_map, names::VIPS)?;
        let vips = HashMap::try_from(vips_map).map_err(map_err(names::VIPS))?;
        let policies = MmapArray::require(take(&mut ebpf, names::POLICIES)?, names::POLICIES, MAX_POLICIES, 8)?;
        let buckets = MmapArray::require(take(&mut ebpf, names::BUCKETS)?, names::BUCKETS, BUCKETS_LEN, 8)?;
        let answers = MmapArray::require(take(&mut ebpf, names::ANSWERS)?, names::ANSWERS, ANSWERS_LEN, 8)?;
        let fence = MmapArray::require(take(&mut ebpf, names::FENCE)?, names::FENCE, vip_common::FENCE_LEN, 8)?;
        let flows_map = take(&mut ebpf, names::FLOWS)?;
        let flows_fd = map_fd(&flows_map, names::FLOWS)?;
        let flows = HashMap::try_from(flows_map).map_err(map_err(names::FLOWS))?;
        let macs = HashMap::try_from(take(&mut ebpf, names::MACS)?).map_err(map_err(names::MACS))?;
        let events = Some(aya::maps::RingBuf::try_from(take(&mut ebpf, names::EVENTS)?).map_err(map_err(names::EVENTS))?);
        let settings = Array::try_from(take(&mut ebpf, names::SETTINGS)?).map_err(map_err(names::SETTINGS))?;
        let filter = MmapArray::require(take(&mut ebpf, names::VIP_FILTER)?, names::VIP_FILTER, vip_common::FILTER_WORDS, 8)?;
        let table = MmapArray::require(take(&mut ebpf, names::VIP_TABLE)?, names::VIP_TABLE, vip_common::TABLE_BUCKETS, 64)?;
        let recent_map = take(&mut ebpf, names::RECENT)?;
        let recent_fd = map_fd(&recent_map, names::RECENT)?;
        // Without a level the ring stays empty: nobody needs to read it.
        let logs = if log_level > 0 { Some(aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog).map_err(|e| DataplaneError::Logs(e.to_string()))?) } else { None };
        let vip_table = crate::viptable::Table::default();
        Ok(Dataplane {
            ebpf, adapters, vips, vips_fd, policies, buckets, answers, fence, flows, flows_fd, macs, events, settings, filter, table, vip_table,
            recent_fd, logs,
        })
    }

    /// `[steering] learn_from_traffic` (`vip_common::SETTING_LEARN_TRAFFIC`).
    pub fn set_learn_from_traffic(&mut self, on: bool) -> Result<()> {
        self.settings.set(vip_common::SETTING_LEARN_TRAFFIC, u32::from(on), 0).map_err(map_err(names::SETTINGS))
    }

    /// Attaches a TC program (`names::EGRESS_PROGRAM` on egress, `names::INGRESS_PROGRAM`
    /// on ingress) to `iface` with TCX (kernel 6.6+) and pins the link at `link_path`; with
    /// a pin already there (an adopted agent), keeps it, or with `reload` swaps this
    /// object's program into it.
    pub fn attach_tc_pinned(&mut self, name: &'static str, iface: &str, link_path: &Path, reload: bool) -> Result<()> {
        let attach_type = if name == names::INGRESS_PROGRAM { TcAttachType::Ingress } else { TcAttachType::Egress };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let pin_err = |e: &dyn std::fmt::Display| DataplaneError::Pin { path: link_path.into(), reason: e.to_string() };
        if link_path.exists() {
            match PinnedLink::from_pin(link_path) {
                Ok(p) if reload => {
                    let link: SchedClassifierLink = FdLink::from(p).try_into().map_err(|e| pin_err(&e))?;
                    let id = prog.attach_to_link(link).map_err(|source| DataplaneError::Program { name, source })?;
                    let link = prog.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
                    std::mem::forget(link);
                    return Ok(());
                }
                Ok(_) => return Ok(()),
                Err(_) => {
                    let _ = std::fs::remove_file(link_path);
                }
            }
        }
        let id = prog
            .attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|source| DataplaneError::Attach { program: name, iface: iface.into(), mode: XdpMode::default(), source })?;
        let link = prog.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
        let fd: FdLink = link.try_into().map_err(|e| pin_err(&e))?;
        fd.pin(link_path).map_err(|e| pin_err(&e))?;
        Ok(())
    }

    /// Points virtual server `idx` at the interface `ifindex` (its `VSERVERS` entry).
    pub fn set_vserver(&mut self, idx: u32, ifindex: u32) -> Result<()> {
        let m = self.ebpf.map_mut(names::VSERVERS).ok_or(DataplaneError::MissingMap(names::VSERVERS))?;
        let mut d: aya::maps::DevMap<&mut MapData> = aya::maps::DevMap::try_from(m).map_err(map_err(names::VSERVERS))?;
        d.set(idx, ifindex, None, 0).map_err(|e| DataplaneError::DevMap { map: names::VSERVERS, reason: e.to_string() })
    }

    /// Virtual server `idx`'s MAC, once the data plane has learned it from its frames.
    pub fn vserver_mac(&self, idx: u32) -> Option<[u8; 6]> {
        let m = self.ebpf.map(names::VS_MACS)?;
        let a: aya::maps::Array<&MapData, [u8; 8]> = aya::maps::Array::try_from(m).ok()?;
        let v = a.get(&idx, 0).ok()?;
        (v[6] == 1).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])
    }

    /// A loaded TC program, for BPF_PROG_TEST_RUN.
    pub fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier> {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Writes policy `policy`'s spread table (one owner slot per bucket).
    pub fn set_buckets(&mut self, policy: u32, slots: &[u8]) -> Result<()> {
        if policy >= MAX_POLICIES {
            return Err(DataplaneError::PolicyOutOfRange(policy));
        }
        write_buckets(&self.buckets, policy, slots);
        Ok(())
    }

    /// Sets who may answer the VIPs of `policy`: one store, seen by the next frame.
    pub fn set_policy(&mut self, policy: u32, allowed: u64) -> Result<()> {
        if policy >= MAX_POLICIES {
            return Err(DataplaneError::PolicyOutOfRange(policy));
        }
        self.policies.store(policy as usize, allowed);
        Ok(())
    }

    /// The cluster's answering deadline (boot clock ns; 0: cluster VIPs are not answered).
    /// The cluster runtime keeps it through its own [`Fence`] mapping; this one is for
    /// tests and tools.
    pub fn set_fence(&self, until_ns: u64) {
        self.fence.store(vip_common::FENCE_DEADLINE as usize, until_ns);
    }

    /// The data plane's clock for the client table (`vip_common::FENCE_CLOCK`).
    pub fn set_clock(&self, monotonic_ns: u64) {
        self.fence.store(vip_common::FENCE_CLOCK as usize, monotonic_ns);
    }

    /// The allowed mask of `policy`.
    pub fn policy(&self, policy: u32) -> u64 {
        if policy >= MAX_POLICIES {
            return 0;
        }
        self.policies.load(policy as usize)
    }

    /// Registers an adapter's MAC so frames sent to it after it fails can be recognised.
    pub fn set_mac(&mut self, mac: [u8; 6], ifindex: u32) -> Result<()> {
        self.macs.insert(mac_key(&mac), ifindex, 0).map_err(map_err(names::MACS))
    }

    pub fn remove_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        match self.macs.remove(&mac_key(&mac)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MACS)(e)),
        }
    }

    /// Every client-table entry (batched reads).
    pub fn flows(&self) -> Vec<(FlowKey, FlowInfo)> {
        use std::os::fd::AsFd;
        let mut flows = crate::bpfsys::dump(self.flows_fd.as_fd()).unwrap_or_default();
        add_pending(&mut flows, self.recent_fd.as_fd());
        flows
    }

    pub fn flow(&self, k: &FlowKey) -> Option<FlowInfo> {
        use std::os::fd::AsFd;
        let mut one = vec![(*k, self.flows.get(k, 0).ok()?)];
        add_pending(&mut one, self.recent_fd.as_fd());
        Some(one[0].1)
    }

    pub fn set_flow(&mut self, k: FlowKey, v: FlowInfo) -> Result<()> {
        self.flows.insert(k, v, 0).map_err(map_err(names::FLOWS))?;
        bump_flows_gen(&self.fence);
        Ok(())
    }

    pub fn remove_flow(&mut self, k: &FlowKey) -> Result<()> {
        bump_flows_gen(&self.fence);
        match self.flows.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// The straggler event ring, taken once by whoever polls it.
    /// The reader of the programs' log records (when loaded with a level).
    pub fn take_logs(&mut self) -> Option<EbpfLog> {
        self.logs.take()
    }

    /// The log level the attached programs were loaded with, as the agent that attached
    /// them recorded it (0 when none did).
    pub fn attached_log_level(&self) -> u8 {
        self.settings.get(&vip_common::SETTING_LOG_LEVEL, 0).unwrap_or(0) as u8
    }

    /// Records the log level of the programs now attached (see above).
    pub fn set_attached_log_level(&mut self, level: u8) -> Result<()> {
        self.settings.set(vip_common::SETTING_LOG_LEVEL, u32::from(level), 0).map_err(map_err(names::SETTINGS))
    }

    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }

    /// Attaches the responder to `ifindex` and pins the link at `link_path`, so that it
    /// stays attached when the agent dies. Only bpf_link attachments can be pinned.
    pub fn attach_pinned(&mut self, ifindex: u32, mode: XdpMode, link_path: &Path) -> Result<PinnedLink> {
        let program = names::PROGRAM;
        let prog = self.xdp_mut(program)?;
        let id = prog.attach_to_if_index(ifindex, mode).map_err(|source| DataplaneError::Attach {
            program,
            iface: format!("ifindex {ifindex}"),
            mode,
            source,
        })?;
        let link = prog.take_link(id).map_err(|source| DataplaneError::Program { name: program, source })?;
        let fd: FdLink = link.try_into().map_err(|e| DataplaneError::Pin {
            path: link_path.into(),
            reason: format!("attachment is not a bpf_link (kernel too old?): {e}"),
        })?;
        fd.pin(link_path).map_err(|e| DataplaneError::Pin { path: link_path.into(), reason: e.to_string() })
    }

    /// Swaps this object's responder into a pinned link atomically (`--reload`): no frame
    /// sees an adapter without a program.
    pub fn replace_in_link(&mut self, pinned: PinnedLink) -> Result<()> {
        let program = names::PROGRAM;
        let fd: FdLink = pinned.into();
        let link: XdpLink = fd.try_into().map_err(|e| DataplaneError::Pin { path: PathBuf::new(), reason: format!("{e}") })?;
        let prog = self.xdp_mut(program)?;
        let id = prog.attach_to_link(link).map_err(|source| DataplaneError::Program { name: program, source })?;
        // The pin still holds the link; dropping our fd must not detach it.
        let link = prog.take_link(id).map_err(|source| DataplaneError::Program { name: program, source })?;
        std::mem::forget(link);
        Ok(())
    }

    /// The VIP keys in the map, for reconciling an adopted map with the config.
    pub fn vip_keys(&self) -> Result<Vec<VipKey>> {
        Ok(self.vip_entries()?.into_iter().map(|e| e.0).collect())
    }

    /// Whether adapter entries are written through shared memory (no syscall).
    pub fn adapters_mapped(&self) -> bool {
        self.adapters.mapped()
    }

    /// Non-empty adapter entries by ifindex.
    pub fn adapters(&self) -> Result<Vec<(u32, AdapterInfo)>> {
        Ok((0..MAX_IFINDEX).map(|i| (i, self.adapters.get(i))).filter(|(_, a)| a.state != 0).collect())
    }

    fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// The responder program, for attaching or BPF_PROG_TEST_RUN.
    pub fn responder(&self) -> Result<&Xdp> {
        self.xdp(names::PROGRAM)
    }

    /// The pass-everything program (benchmark baseline, veth peers).
    pub fn pass_program(&self) -> Result<&Xdp> {
        self.xdp(names::PASS_PROGRAM)
    }

    /// Attaches the responder to `iface` (in the calling thread's network namespace).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        self.attach_program(names::PROGRAM, iface, mode)
    }

    /// Attaches the pass program to `iface`: a veth whose peer answers with XDP_TX needs it.
    pub fn attach_pass(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        self.attach_program(names::PASS_PROGRAM, iface, mode)
    }

    /// Attaches the drop-everything program to `iface` (the veth benchmark's client).
    pub fn attach_sink(&mut self, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        self.attach_program(names::SINK_PROGRAM, iface, mode)
    }

    /// Detaches an attachment made by [`Dataplane::attach_program`].
    pub fn detach_program(&mut self, program: &'static str, link: XdpLinkId) -> Result<()> {
        self.xdp_mut(program)?.detach(link).map_err(|source| DataplaneError::Program { name: program, source })
    }

    /// Attaches the XDP program named `program` (one of [`names`]) to `iface`.
    pub fn attach_program(&mut self, program: &'static str, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        self.xdp_mut(program)?.attach(iface, mode).map_err(|source| DataplaneError::Attach {
            program,
            iface: iface.to_string(),
            mode,
            source,
        })
    }

    /// Detaches one attachment made by [`Dataplane::attach`].
    pub fn detach(&mut self, link: XdpLinkId) -> Result<()> {
        let name = names::PROGRAM;
        self.xdp_mut(name)?.detach(link).map_err(|source| DataplaneError::Program { name, source })
    }


    fn per_cpu(&self, map: &'static str) -> Result<PerCpuArray<&MapData, u64>> {
        let m = self.ebpf.map(map).ok_or(DataplaneError::MissingMap(map))?;
        PerCpuArray::try_from(m).map_err(|source| DataplaneError::Map { map, source })
    }

    /// Adds or replaces the adapter with this ifindex (`< MAX_IFINDEX`).
    pub fn set_adapter(&mut self, ifindex: u32, info: AdapterInfo) -> Result<()> {
        if ifindex >= MAX_IFINDEX {
            return Err(DataplaneError::IfindexTooLarge(ifindex));
        }
        self.adapters.set(ifindex, info)
    }

    /// Forgets the adapter: frames arriving on it are passed as from an unknown adapter.
    pub fn remove_adapter(&mut self, ifindex: u32) -> Result<()> {
        self.set_adapter(ifindex, AdapterInfo::zeroed())
    }

    /// Adds or replaces a VIP.
    /// Sets the filter bits of `keys` (before their entries are written: a frame never
    /// finds an entry behind a clear bit).
    fn filter_add(&self, keys: &[VipKey]) {
        for k in keys {
            let b = vip_common::filter_bit(k);
            let (i, m) = ((b >> 6) as usize, 1u64 << (b & 63));
            let w = self.filter.load(i);
            if w & m == 0 {
                self.filter.store(i, w | m);
            }
        }
    }

    /// Recomputes the filter from the entries in VIPS (after removals): clears the bits no
    /// entry needs, never one an entry needs.
    fn filter_rebuild(&self) -> Result<()> {
        let mut words = vec![0u64; vip_common::FILTER_WORDS as usize];
        for k in self.vip_keys()? {
            let b = vip_common::filter_bit(&k);
            words[(b >> 6) as usize] |= 1u64 << (b & 63);
        }
        for (i, w) in words.into_iter().enumerate() {
            if self.filter.load(i) != w {
                self.filter.store(i, w);
            }
        }
        Ok(())
    }

    /// Whether `key`'s bit is set in VIP_FILTER (false: certainly not a VIP).
    pub fn maybe_vip(&self, key: &VipKey) -> bool {
        let b = vip_common::filter_bit(key);
        self.filter.load((b >> 6) as usize) & (1u64 << (b & 63)) != 0
    }

    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<()> {
        self.filter_add(&[key]);
        self.vips.insert(key, info, 0).map_err(|source| DataplaneError::Map { map: names::VIPS, source })?;
        self.vip_table.set(&self.table, &key, &info);
        Ok(())
    }

    /// Makes VIP_TABLE hold exactly the entries of VIPS.
    fn table_rebuild(&mut self) -> Result<()> {
        let entries = self.vip_entries()?;
        self.vip_table.rebuild(&self.table, &entries);
        Ok(())
    }

    /// VIPs that did not fit VIP_TABLE (the data plane finds them in VIPS).
    pub fn table_overflowed(&self) -> usize {
        self.vip_table.overflowed()
    }

    /// What the data plane finds for `key` in VIP_TABLE (see `viptable::Table::lookup`).
    pub fn table_lookup(&self, key: &VipKey) -> Option<Option<VipInfo>> {
        crate::viptable::Table::lookup(&self.table, key)
    }

    /// Adds or replaces many VIPs, thousands per syscall.
    pub fn set_vips(&mut self, keys: &[VipKey], infos: &[VipInfo]) -> Result<()> {
        use std::os::fd::AsFd;
        self.filter_add(keys);
        crate::bpfsys::update(self.vips_fd.as_fd(), keys, infos).map_err(|source| DataplaneError::Batch { map: names::VIPS, source })?;
        for (k, v) in keys.iter().zip(infos) {
            self.vip_table.set(&self.table, k, v);
        }
        Ok(())
    }

    /// Removes many VIPs.
    pub fn remove_vips(&mut self, keys: &[VipKey]) -> Result<()> {
        use std::os::fd::AsFd;
        for k in keys {
            self.vip_table.remove(&self.table, k);
        }
        crate::bpfsys::delete(self.vips_fd.as_fd(), keys).map_err(|source| DataplaneError::Batch { map: names::VIPS, source })?;
        self.filter_rebuild()
    }

    /// Every VIP entry (batched reads), for reconciling an adopted map.
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>> {
        use std::os::fd::AsFd;
        crate::bpfsys::dump(self.vips_fd.as_fd()).map_err(|source| DataplaneError::Batch { map: names::VIPS, source })
    }

    pub fn remove_vip(&mut self, key: VipKey) -> Result<()> {
        self.vip_table.remove(&self.table, &key);
        self.vips.remove(&key).map_err(|source| DataplaneError::Map { map: names::VIPS, source })?;
        self.filter_rebuild()
    }

    /// Decision counters summed over CPUs, indexed by `vip_common::decision`.
    pub fn decisions(&self) -> Result<[u64; decision::COUNT as usize]> {
        let map = names::DECISIONS;
        let arr = self.per_cpu(map)?;
        let mut out = [0u64; decision::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = arr.get(&(i as u32), 0).map_err(|source| DataplaneError::Map { map, source })?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// Answers sent for VIP `vip_id` (by any adapter).
    pub fn answers(&self, vip_id: u32) -> u64 {
        if vip_id >= ANSWERS_LEN {
            return 0;
        }
        self.answers.load(vip_id as usize)
    }

    /// VIP traffic and answers of the adapter in `slot`, summed over CPUs.
    pub fn traffic(&self, slot: u8) -> Result<Traffic> {
        let map = names::TRAFFIC;
        let m = self.ebpf.map(map).ok_or(DataplaneError::MissingMap(map))?;
        let arr: PerCpuArray<&MapData, Traffic> = PerCpuArray::try_from(m).map_err(|source| DataplaneError::Map { map, source })?;
        let v = arr.get(&(slot as u32), 0).map_err(|source| DataplaneError::Map { map, source })?;
        Ok(sum_traffic(v.iter()))
    }
}

fn sum_traffic<'a>(v: impl Iterator<Item = &'a Traffic>) -> Traffic {
    let mut t = Traffic::default();
    for c in v {
        t.rx_packets += c.rx_packets;
        t.rx_bytes += c.rx_bytes;
        t.tx_packets += c.tx_packets;
        t.tx_bytes += c.tx_bytes;
        t.answers += c.answers;
    }
    t
}

/// The cluster's answering deadline (`FENCE`), mapped on its own by the cluster runtime's
/// thread: extending it is one store, and nothing else shares it.
pub struct Fence(MmapArray);

impl Fence {
    pub fn open(pin_dir: &Path) -> Result<Fence> {
        let data = MapData::from_pin(pin_dir.join(names::FENCE)).map_err(map_err(names::FENCE))?;
        Ok(Fence(MmapArray::require(aya::maps::Map::Array(data), names::FENCE, vip_common::FENCE_LEN, 8)?))
    }

    /// Cluster VIPs are answered until `until_ns` (boot clock); 0: not at all.
    pub fn set(&self, until_ns: u64) {
        self.0.store(vip_common::FENCE_DEADLINE as usize, until_ns);
    }

    pub fn get(&self) -> u64 {
        self.0.load(vip_common::FENCE_DEADLINE as usize)
    }

    /// The data plane's clock for the client table (`vip_common::FENCE_CLOCK`).
    pub fn set_clock(&self, monotonic_ns: u64) {
        self.0.store(vip_common::FENCE_CLOCK as usize, monotonic_ns);
    }

    pub fn clock(&self) -> u64 {
        self.0.load(vip_common::FENCE_CLOCK as usize)
    }
}

/// Independent handles on the pinned counter maps and client table, so status, metrics
/// and housekeeping read them without ever waiting on the agent's event loop.
pub struct Counters {
    decisions: PerCpuArray<MapData, u64>,
    egress: PerCpuArray<MapData, u64>,
    traffic: PerCpuArray<MapData, Traffic>,
    answers: MmapArray,
    vs_macs: aya::maps::Array<MapData, [u8; 8]>,
    flows_fd: std::os::fd::OwnedFd,
    recent_fd: std::os::fd::OwnedFd,
    fence: MmapArray,
}

impl Counters {
    pub fn open(pin_dir: &Path) -> Result<Counters> {
        use std::os::fd::AsFd;
        let data = |name: &'static str| MapData::from_pin(pin_dir.join(name)).map_err(map_err(name));
        let per_cpu = |name: &'static str| -> Result<PerCpuArray<MapData, u64>> {
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data(name)?)).map_err(map_err(name))
        };
        let traffic = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data(names::TRAFFIC)?)).map_err(map_err(names::TRAFFIC))?;
        let answers = MmapArray::require(aya::maps::Map::Array(data(names::ANSWERS)?), names::ANSWERS, ANSWERS_LEN, 8)?;
        let vs_macs = aya::maps::Array::try_from(aya::maps::Map::Array(data(names::VS_MACS)?)).map_err(map_err(names::VS_MACS))?;
        let flows = data(names::FLOWS)?;
        let flows_fd = flows.fd().as_fd().try_clone_to_owned().map_err(|source| DataplaneError::Batch { map: names::FLOWS, source })?;
        let recent = data(names::RECENT)?;
        let recent_fd = recent.fd().as_fd().try_clone_to_owned().map_err(|source| DataplaneError::Batch { map: names::RECENT, source })?;
        let fence = MmapArray::require(aya::maps::Map::Array(data(names::FENCE)?), names::FENCE, vip_common::FENCE_LEN, 8)?;
        Ok(Counters {
            recent_fd,
            fence,
            decisions: per_cpu(names::DECISIONS)?,
            egress: per_cpu(names::EGRESS)?,
            traffic,
            answers,
            vs_macs,
            flows_fd,
        })
    }

    pub fn egress(&self) -> [u64; egress::COUNT as usize] {
        let mut out = [0u64; egress::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.egress.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        }
        out
    }

    /// VIP traffic and answers of the adapter in `slot`, summed over CPUs.
    pub fn traffic(&self, slot: u8) -> Traffic {
        self.traffic.get(&(slot as u32), 0).map(|v| sum_traffic(v.iter())).unwrap_or_default()
    }

    /// Traffic of slots `0..n`.
    pub fn traffic_all(&self, n: usize) -> Vec<Traffic> {
        (0..n.min(MAX_ADAPTERS as usize) as u8).map(|s| self.traffic(s)).collect()
    }

    /// Every client-table entry (batched reads).
    pub fn flows(&self) -> Vec<(FlowKey, FlowInfo)> {
        use std::os::fd::AsFd;
        let mut flows = crate::bpfsys::dump(self.flows_fd.as_fd()).unwrap_or_default();
        add_pending(&mut flows, self.recent_fd.as_fd());
        flows
    }

    /// Removes these client-table entries; returns how many went.
    pub fn remove_flows(&self, keys: &[FlowKey]) -> usize {
        use std::os::fd::AsFd;
        let n = crate::bpfsys::delete(self.flows_fd.as_fd(), keys).unwrap_or(0);
        bump_flows_gen(&self.fence);
        n
    }

    pub fn decisions(&self) -> [u64; decision::COUNT as usize] {
        let mut out = [0u64; decision::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.decisions.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        }
        out
    }

    /// Answers sent for VIP `vip_id` by any adapter.
    pub fn answers(&self, vip_id: u32) -> u64 {
        if vip_id >= ANSWERS_LEN {
            return 0;
        }
        self.answers.load(vip_id as usize)
    }

    /// Virtual server `idx`'s MAC, once the data plane has learned it.
    pub fn vserver_mac(&self, idx: u32) -> Option<[u8; 6]> {
        let v = self.vs_macs.get(&idx, 0).ok()?;
        (v[6] == 1).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])
    }
}
