//! Address forms the control plane and the proxy must read alike: a CIDR as the injector admits
//! it in `mycel.io/exclude-outbound-cidrs` and the proxy's `init` step installs it.

use std::net::IpAddr;

/// An address block: `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of CIDRs, each checked.
pub fn parse_cidr_list(v: &str) -> Result<Vec<Cidr>, String> {
    v.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_has_its_own_longest_prefix() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix, 8);
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!("fd00::/128".parse::<Cidr>().unwrap().prefix, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err(), "an IPv4 prefix stops at /32");
        assert!("10.0.0.0/128".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("example.com/8".parse::<Cidr>().is_err());
        assert_eq!(parse_cidr_list("10.0.0.0/8, fd00::/8").unwrap().len(), 2);
        assert!(parse_cidr_list("10.0.0.0/8,nope").unwrap_err().contains("\"nope\""));
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("192.0.2.1".parse().unwrap()));
        let one: Cidr = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
    }
}
