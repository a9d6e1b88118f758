//! Loading the XDP program, attaching it, and reading and writing its maps.

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf,
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
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// The loaded data plane: both programs verified and loaded, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the object and both of its programs into the kernel (runs the verifier).
    pub fn load(object: &[u8]) -> Result<Self> {
        let mut ebpf = Ebpf::load(object)?;
        for name in [names::PROGRAM, names::PASS_PROGRAM] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Dataplane { ebpf })
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

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, map: &'static str) -> Result<HashMap<&mut MapData, K, V>> {
        let m = self.ebpf.map_mut(map).ok_or(DataplaneError::MissingMap(map))?;
        HashMap::try_from(m).map_err(|source| DataplaneError::Map { map, source })
    }

    fn per_cpu(&self, map: &'static str) -> Result<PerCpuArray<&MapData, u64>> {
        let m = self.ebpf.map(map).ok_or(DataplaneError::MissingMap(map))?;
        PerCpuArray::try_from(m).map_err(|source| DataplaneError::Map { map, source })
    }

    /// Adds or replaces the adapter with this ifindex (`< MAX_IFINDEX`).
    pub fn set_adapter(&mut self, ifindex: u32, info: AdapterInfo) -> Result<()> {
        let map = names::ADAPTERS;
        if ifindex >= MAX_IFINDEX {
            return Err(DataplaneError::IfindexTooLarge(ifindex));
        }
        let m = self.ebpf.map_mut(map).ok_or(DataplaneError::MissingMap(map))?;
        let mut arr: Array<&mut MapData, AdapterInfo> =
            Array::try_from(m).map_err(|source| DataplaneError::Map { map, source })?;
        arr.set(ifindex, info, 0).map_err(|source| DataplaneError::Map { map, source })
    }

    /// Forgets the adapter: frames arriving on it are passed as from an unknown adapter.
    pub fn remove_adapter(&mut self, ifindex: u32) -> Result<()> {
        self.set_adapter(ifindex, AdapterInfo::zeroed())
    }

    /// Adds or replaces a VIP.
    pub fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<()> {
        let map = names::VIPS;
        self.hash::<VipKey, VipInfo>(map)?.insert(key, info, 0).map_err(|source| DataplaneError::Map { map, source })
    }

    pub fn remove_vip(&mut self, key: VipKey) -> Result<()> {
        let map = names::VIPS;
        self.hash::<VipKey, VipInfo>(map)?.remove(&key).map_err(|source| DataplaneError::Map { map, source })
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
