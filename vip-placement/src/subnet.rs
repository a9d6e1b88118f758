//! An address with a prefix: an adapter's subnet, a route's destination, a VIP's network.

use std::{fmt, net::IpAddr, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subnet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Subnet {
    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// Whether `ip` lies in this subnet; never true across address families.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        let (net, ip, width) = match (self.addr, *ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n).into(), u32::from(a).into(), 32),
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        // A shift by the full width (prefix 0) is None: everything matches.
        let shift = width - u32::from(self.prefix).min(width);
        net.checked_shr(shift).unwrap_or(0) == ip.checked_shr(shift).unwrap_or(0)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `ADDR/PREFIX`, the prefix within the family's width (0 allowed, as in a default route).
impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(format!("{s:?} has no prefix length (write e.g. {:?})", format!("{s}/24")));
        };
        let bad = || format!("{s:?} is not an IP address with a prefix");
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let width = if addr.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(prefix) if prefix <= width => Ok(Subnet { addr, prefix }),
            _ => Err(format!("{s:?}: the prefix must be 0 to {width}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains() {
        let s = |a: &str, p| Subnet { addr: a.parse().unwrap(), prefix: p };
        let ip = |a: &str| -> IpAddr { a.parse().unwrap() };
        assert!(s("192.0.2.0", 24).contains(&ip("192.0.2.10")));
        assert!(!s("192.0.2.0", 24).contains(&ip("192.0.3.10")));
        assert!(s("0.0.0.0", 0).contains(&ip("198.51.100.1")));
        assert!(s("2001:db8::1", 64).contains(&ip("2001:db8::10")));
        assert!(!s("2001:db8::1", 64).contains(&ip("2001:db9::10")));
        assert!(!s("192.0.2.0", 24).contains(&ip("2001:db8::10")));
    }
}
