//! Loading the XDP program, attaching it, and reading and writing its maps.

use std::path::{Path, PathBuf};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use bytemuck::Zeroable;
use vip_common::{answer_index, decision, names, AdapterInfo, VipInfo, VipKey, MAX_IFINDEX};

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
    #[error("pinning at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// The loaded data plane: both programs verified and loaded, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
    /// Taken out of `ebpf` once: a failover writes them without looking them up by name.
    adapters: AdapterMap,
    vips: VipMap,
}

/// The ADAPTERS array. Memory-mapped when the map allows it (BPF_F_MMAPABLE, as this
/// object declares it): 8-byte `AdapterInfo` entries indexed by ifindex, written with
/// single aligned stores (the XDP program never sees half an entry), so marking an
/// adapter down costs no syscall. A map without the flag (an older agent's pinned map) is
/// written through `bpf()`.
enum AdapterMap {
    Mapped {
        /// Keeps the map (and so the mapping's object) alive.
        _data: MapData,
        mem: *mut u64,
    },
    Syscall(aya::maps::Array<MapData, AdapterInfo>),
}

// The mapping is shared memory owned by this value; every access is an atomic load or
// store of one aligned entry.
unsafe impl Send for AdapterMap {}
unsafe impl Sync for AdapterMap {}

const ADAPTERS_LEN: usize = MAX_IFINDEX as usize * size_of::<u64>();

fn adapters_err(source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map { map: names::ADAPTERS, source }
}

impl AdapterMap {
    fn new(map: aya::maps::Map) -> Result<AdapterMap> {
        use std::os::fd::{AsFd, AsRawFd};
        const _: () = assert!(size_of::<AdapterInfo>() == size_of::<u64>());
        let aya::maps::Map::Array(data) = map else {
            return Err(DataplaneError::MissingMap(names::ADAPTERS));
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), ADAPTERS_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if mem == libc::MAP_FAILED {
            let array = aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(adapters_err)?;
            return Ok(AdapterMap::Syscall(array));
        }
        Ok(AdapterMap::Mapped { _data: data, mem: mem.cast() })
    }

    fn entry(mem: *mut u64, ifindex: u32) -> &'static std::sync::atomic::AtomicU64 {
        debug_assert!(ifindex < MAX_IFINDEX);
        unsafe { std::sync::atomic::AtomicU64::from_ptr(mem.add(ifindex as usize)) }
    }

    fn set(&mut self, ifindex: u32, info: AdapterInfo) -> Result<()> {
        match self {
            AdapterMap::Mapped { mem, .. } => {
                let v = u64::from_ne_bytes(bytemuck::bytes_of(&info).try_into().expect("8 bytes"));
                Self::entry(*mem, ifindex).store(v, std::sync::atomic::Ordering::Release);
                Ok(())
            }
            AdapterMap::Syscall(a) => a.set(ifindex, info, 0).map_err(adapters_err),
        }
    }

    fn get(&self, ifindex: u32) -> AdapterInfo {
        match self {
            AdapterMap::Mapped { mem, .. } => {
                let v = Self::entry(*mem, ifindex).load(std::sync::atomic::Ordering::Acquire);
                bytemuck::pod_read_unaligned(&v.to_ne_bytes())
            }
            AdapterMap::Syscall(a) => a.get(&ifindex, 0).unwrap_or(AdapterInfo::zeroed()),
        }
    }

    pub fn mapped(&self) -> bool {
        matches!(self, AdapterMap::Mapped { .. })
    }
}

impl Drop for AdapterMap {
    fn drop(&mut self) {
        if let AdapterMap::Mapped { mem, .. } = self {
            unsafe { libc::munmap(mem.cast(), ADAPTERS_LEN) };
        }
    }
}

type VipMap = HashMap<MapData, VipKey, VipInfo>;

fn take_maps(ebpf: &mut Ebpf) -> Result<(AdapterMap, VipMap)> {
    let a = ebpf.take_map(names::ADAPTERS).ok_or(DataplaneError::MissingMap(names::ADAPTERS))?;
    let a = AdapterMap::new(a)?;
    let v = ebpf.take_map(names::VIPS).ok_or(DataplaneError::MissingMap(names::VIPS))?;
    let v = HashMap::try_from(v).map_err(|source| DataplaneError::Map { map: names::VIPS, source })?;
    Ok((a, v))
}

impl Dataplane {
    /// Loads the object and both of its programs into the kernel (runs the verifier).
    pub fn load(object: &[u8]) -> Result<Self> {
        Self::finish(Ebpf::load(object)?)
    }

    /// Like [`Dataplane::load`], but the maps live under `pin_dir`: maps already pinned
    /// there (by an agent that was killed or is being replaced) are reused with their
    /// contents, so answering never stops; missing ones are created and pinned.
    pub fn load_pinned(object: &[u8], pin_dir: &Path) -> Result<Self> {
        let paths: Vec<(&'static str, PathBuf)> =
            [names::VIPS, names::ADAPTERS, names::DECISIONS, names::ANSWERS].iter().map(|n| (*n, pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        Self::finish(loader.load(object)?)
    }

    /// Loads both programs (the verifier runs here) and takes the maps the agent writes.
    fn finish(mut ebpf: Ebpf) -> Result<Self> {
        for name in [names::PROGRAM, names::PASS_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        let (adapters, vips) = take_maps(&mut ebpf)?;
        Ok(Dataplane { ebpf, adapters, vips })
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
        Ok(self.vips.keys().filter_map(|k| k.ok()).collect())
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

    fn attach_program(&mut self, program: &'static str, iface: &str, mode: XdpMode) -> Result<XdpLinkId> {
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
    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<()> {
        self.vips.insert(key, info, 0).map_err(|source| DataplaneError::Map { map: names::VIPS, source })
    }

    pub fn remove_vip(&mut self, key: VipKey) -> Result<()> {
        self.vips.remove(&key).map_err(|source| DataplaneError::Map { map: names::VIPS, source })
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

    /// Answers sent for VIP `vip_id` by the adapter in `slot`, summed over CPUs.
    pub fn answers(&self, vip_id: u32, slot: u8) -> Result<u64> {
        let map = names::ANSWERS;
        let arr = self.per_cpu(map)?;
        let v = arr.get(&answer_index(vip_id, slot), 0).map_err(|source| DataplaneError::Map { map, source })?;
        Ok(v.iter().sum())
    }
}

/// Independent handles on the pinned counter maps, so status and metrics can read them
/// without holding the agent's lock (a failover must never wait behind a status query).
pub struct Counters {
    decisions: PerCpuArray<MapData, u64>,
    answers: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub fn open(pin_dir: &Path) -> Result<Counters> {
        let open = |name: &'static str| -> Result<PerCpuArray<MapData, u64>> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(|source| DataplaneError::Map { map: name, source })?;
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|source| DataplaneError::Map { map: name, source })
        };
        Ok(Counters { decisions: open(names::DECISIONS)?, answers: open(names::ANSWERS)? })
    }

    pub fn decisions(&self) -> [u64; decision::COUNT as usize] {
        let mut out = [0u64; decision::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.decisions.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
        }
        out
    }

    pub fn answers(&self, vip_id: u32, slot: u8) -> u64 {
        self.answers.get(&answer_index(vip_id, slot), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}
