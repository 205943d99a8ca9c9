//! IPv4 CIDRs and pod IP allocation (pure).
//!
//! Invariants: a pod IP is the lowest address of the node's pod CIDR, from `.2` (network + 2)
//! up to the last address before the broadcast address, that is not in use; an address in use
//! is never handed out again until it is released.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network `a.b.c.d/len` (the address is normalised to the network address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a CIDR string is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not an IPv4 CIDR (a.b.c.d/0-32)")]
pub struct ParseCidrError(String);

impl FromStr for Cidr {
    type Err = ParseCidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseCidrError(text.to_owned());
        let (addr, len) = text.split_once('/').ok_or_else(error)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| error())?;
        let prefix_len: u8 = len.parse().map_err(|_| error())?;
        if prefix_len > 32 {
            return Err(error());
        }
        Ok(Self::new(addr, prefix_len))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl Cidr {
    /// The network of `addr` with `prefix_len` bits (`prefix_len` is clamped to 32).
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = prefix_len.min(32);
        let network = Ipv4Addr::from(u32::from(addr) & Self::mask(prefix_len));
        Self {
            network,
            prefix_len,
        }
    }

    fn mask(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `addr` is inside the network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix_len) == u32::from(self.network)
    }

    /// The broadcast (last) address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask(self.prefix_len))
    }
}

/// The lowest free pod address of `cidr`: from network + 2 to broadcast − 1, skipping `in_use`.
pub fn lowest_free(cidr: Cidr, in_use: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(cidr.network()).checked_add(2)?;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|addr| !in_use.contains(addr))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn cidrs_parse_normalise_and_contain() {
        let cidr: Cidr = "10.240.1.7/24".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.240.1.0/24");
        assert!(cidr.contains("10.240.1.255".parse().unwrap()));
        assert!(!cidr.contains("10.240.2.1".parse().unwrap()));
        assert_eq!(cidr.broadcast(), Ipv4Addr::new(10, 240, 1, 255));
        assert!("10.240.1.0".parse::<Cidr>().is_err());
        assert!("10.240.1.0/33".parse::<Cidr>().is_err());
        assert!("x/24".parse::<Cidr>().is_err());
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().broadcast(),
            Ipv4Addr::BROADCAST
        );
    }

    #[test]
    fn allocation_starts_at_dot_two_and_fills_holes_first() {
        let cidr: Cidr = "10.240.1.0/24".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(lowest_free(cidr, &used), Some(Ipv4Addr::new(10, 240, 1, 2)));
        used.extend([Ipv4Addr::new(10, 240, 1, 2), Ipv4Addr::new(10, 240, 1, 4)]);
        assert_eq!(lowest_free(cidr, &used), Some(Ipv4Addr::new(10, 240, 1, 3)));
    }

    #[test]
    fn a_full_range_has_no_free_address_and_the_broadcast_is_never_given() {
        let cidr: Cidr = "10.0.0.0/30".parse().unwrap();
        let used: BTreeSet<_> = [Ipv4Addr::new(10, 0, 0, 2)].into();
        assert_eq!(lowest_free(cidr, &used), None);
        assert_eq!(
            lowest_free("10.0.0.0/32".parse().unwrap(), &BTreeSet::new()),
            None
        );
    }
}
