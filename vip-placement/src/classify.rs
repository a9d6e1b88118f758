//! VIPs that would be placed alike form one class.

use std::collections::HashMap;

use crate::{bit, Adapter, Mode, Slot, Vip};

/// What placement needs to know of a VIP, besides its position: two VIPs with equal keys
/// are placed alike, whatever happens to the adapters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClassKey {
    pub homes: Vec<Slot>,
    pub mode: Mode,
    pub failover: bool,
    pub rebalance: bool,
    /// A takeover holds when its own adapters return.
    pub stay: bool,
    pub vlan: u16,
    /// Other adapters that pass the takeover checks of seed 002 that do not change while
    /// running: the VLAN is carried, and an address or route is in the VIP's subnet.
    pub fit: u64,
    /// Other adapters that do not carry the VIP's VLAN.
    pub unfit_vlan: u64,
    /// Other adapters with no address or route in the VIP's subnet.
    pub unfit_subnet: u64,
}

impl ClassKey {
    /// Mask of its own adapters.
    pub fn home_mask(&self) -> u64 {
        self.homes.iter().fold(0, |m, &s| m | bit(s))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Class {
    pub key: ClassKey,
    /// Indexes of its VIPs, ascending.
    pub members: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Classes {
    /// In order of their first member.
    pub list: Vec<Class>,
    /// Per VIP: its class and its position among the class's members.
    pub of_vip: Vec<(u32, u32)>,
}

impl Classes {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// The class key of one VIP against the adapters as they are now.
pub fn key_of(v: &Vip, adapters: &[Adapter]) -> ClassKey {
    let home = v.homes.iter().fold(0u64, |m, &s| m | bit(s));
    let (mut fit, mut unfit_vlan, mut unfit_subnet) = (0, 0, 0);
    for (j, a) in adapters.iter().enumerate() {
        let b = bit(j as Slot);
        if home & b != 0 || v.takers.as_ref().is_some_and(|t| !t.contains(&(j as Slot))) {
            continue;
        }
        if v.vlan != 0 && !a.vlans.contains(&v.vlan) {
            unfit_vlan |= b;
        } else if !a.subnets.iter().any(|s| s.contains(&v.addr)) {
            unfit_subnet |= b;
        } else {
            fit |= b;
        }
    }
    ClassKey {
        homes: v.homes.to_vec(),
        mode: v.mode,
        failover: v.failover,
        rebalance: v.rebalance,
        stay: v.stay,
        vlan: v.vlan,
        fit,
        unfit_vlan,
        unfit_subnet,
    }
}

/// Groups the VIPs `active` (indexes into `vips`, ascending) into classes. VIPs not in
/// `active` (refused at start) belong to no class. Runs once at start and again when the
/// adapters' addresses change; O(VIPs x adapters).
pub fn classify(vips: &[Vip], active: impl IntoIterator<Item = u32>, adapters: &[Adapter]) -> Classes {
    let mut index: HashMap<ClassKey, u32> = HashMap::new();
    let mut list: Vec<Class> = vec![];
    let mut of_vip = vec![(u32::MAX, u32::MAX); vips.len()];
    for i in active {
        let key = key_of(&vips[i as usize], adapters);
        let c = *index.entry(key.clone()).or_insert_with(|| {
            list.push(Class { key, members: vec![] });
            (list.len() - 1) as u32
        });
        let members = &mut list[c as usize].members;
        of_vip[i as usize] = (c, members.len() as u32);
        members.push(i);
    }
    Classes { list, of_vip }
}
