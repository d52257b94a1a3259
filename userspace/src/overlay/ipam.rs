//! Container addresses from the node's subnet: the first host address is
//! the gateway (the host side of every container veth), containers get the
//! rest. A freed address goes to the back of the queue, so it is reused
//! only after every never-used one (late packets of the old container do
//! not reach a new one).

use std::collections::{BTreeSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::net::Prefix;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IpamError {
    #[error("{0} has no room for containers: use a prefix of /30 or shorter")]
    TooSmall(Prefix),
    #[error("{addr} is not a container address of {subnet} or is already in use")]
    NotAvailable { addr: Ipv4Addr, subnet: Prefix },
    #[error("subnet {0} is exhausted: every container address is in use (undeploy something or register a larger subnet)")]
    Exhausted(Prefix),
}

/// One container's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// Host number inside the subnet (the same for both families).
    host: u32,
}

#[derive(Debug)]
pub struct Ipam {
    subnet: Prefix,
    subnet_v6: Option<Prefix>,
    /// Host numbers never handed out yet start here.
    next: u32,
    last: u32,
    freed: VecDeque<u32>,
    used: BTreeSet<u32>,
}

impl Ipam {
    pub fn new(subnet: Prefix, subnet_v6: Option<Prefix>) -> Result<Self, IpamError> {
        let size = 1u64 << (32 - u32::from(subnet.len.min(32)));
        if size < 4 {
            return Err(IpamError::TooSmall(subnet));
        }
        // Network, gateway (1) ... broadcast excluded.
        let mut last = (size - 2) as u32;
        if let Some(v6) = subnet_v6 {
            let room = 128 - u32::from(v6.len.min(128));
            if room < 32 {
                last = last.min(((1u64 << room) - 1) as u32);
            }
        }
        Ok(Self {
            subnet,
            subnet_v6,
            next: 2,
            last,
            freed: VecDeque::new(),
            used: BTreeSet::new(),
        })
    }

    pub fn subnet(&self) -> Prefix {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.v4(1)
    }

    pub fn subnet_v6(&self) -> Option<Prefix> {
        self.subnet_v6
    }

    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.v6(1)
    }

    fn v4(&self, host: u32) -> Ipv4Addr {
        let std::net::IpAddr::V4(net) = self.subnet.network().addr else {
            unreachable!("checked IPv4 at registration")
        };
        Ipv4Addr::from(u32::from(net) + host)
    }

    fn v6(&self, host: u32) -> Option<Ipv6Addr> {
        let std::net::IpAddr::V6(net) = self.subnet_v6?.network().addr else {
            return None;
        };
        Some(Ipv6Addr::from(u128::from(net) + u128::from(host)))
    }

    pub fn allocate(&mut self) -> Result<Lease, IpamError> {
        let host = if self.next <= self.last {
            self.next += 1;
            self.next - 1
        } else {
            self.freed
                .pop_front()
                .ok_or(IpamError::Exhausted(self.subnet))?
        };
        self.used.insert(host);
        Ok(Lease {
            v4: self.v4(host),
            v6: self.v6(host),
            host,
        })
    }

    /// Takes a given container address again (state restored at start).
    pub fn reserve(&mut self, v4: Ipv4Addr) -> Result<Lease, IpamError> {
        let std::net::IpAddr::V4(net) = self.subnet.network().addr else {
            unreachable!("checked IPv4 at registration")
        };
        let host = u32::from(v4).wrapping_sub(u32::from(net));
        if host < 2 || host > self.last || self.used.contains(&host) {
            return Err(IpamError::NotAvailable {
                addr: v4,
                subnet: self.subnet,
            });
        }
        self.used.insert(host);
        self.freed.retain(|h| *h != host);
        if host >= self.next {
            // Host numbers skipped on the way are free, at the back of the queue.
            self.freed.extend(self.next..host);
            self.next = host + 1;
        }
        Ok(Lease {
            v4,
            v6: self.v6(host),
            host,
        })
    }

    pub fn release(&mut self, lease: Lease) {
        if self.used.remove(&lease.host) {
            self.freed.push_back(lease.host);
        }
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_start_after_the_gateway_and_freed_ones_wait_their_turn() {
        let mut ipam = Ipam::new(
            "192.0.2.0/29".parse().unwrap(),
            Some("2001:db8::/120".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(ipam.gateway(), Ipv4Addr::new(192, 0, 2, 1));
        let a = ipam.allocate().unwrap();
        assert_eq!(a.v4, Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(a.v6, Some("2001:db8::2".parse().unwrap()));
        let leases: Vec<Lease> = (0..4).map(|_| ipam.allocate().unwrap()).collect();
        assert_eq!(leases[3].v4, Ipv4Addr::new(192, 0, 2, 6));
        assert_eq!(ipam.allocate(), Err(IpamError::Exhausted(ipam.subnet())));
        ipam.release(leases[0]);
        ipam.release(a);
        // First freed, first reused.
        assert_eq!(ipam.allocate().unwrap().v4, Ipv4Addr::new(192, 0, 2, 3));
        assert_eq!(ipam.allocate().unwrap().v4, Ipv4Addr::new(192, 0, 2, 2));
        assert!(Ipam::new("192.0.2.0/31".parse().unwrap(), None).is_err());
    }

    #[test]
    fn restored_addresses_are_taken_and_skipped_ones_stay_free() {
        let mut ipam = Ipam::new("192.0.2.0/29".parse().unwrap(), None).unwrap();
        let b = ipam.reserve(Ipv4Addr::new(192, 0, 2, 4)).unwrap();
        assert_eq!((b.v4, b.v6), (Ipv4Addr::new(192, 0, 2, 4), None));
        assert_eq!(
            ipam.reserve(Ipv4Addr::new(192, 0, 2, 4)),
            Err(IpamError::NotAvailable {
                addr: Ipv4Addr::new(192, 0, 2, 4),
                subnet: ipam.subnet()
            })
        );
        for outside in [[192, 0, 2, 1], [192, 0, 2, 7], [198, 51, 100, 2]] {
            assert!(
                ipam.reserve(Ipv4Addr::from(outside)).is_err(),
                "{outside:?}"
            );
        }
        // Never-used addresses first (5, 6), then the ones skipped (2, 3).
        let next: Vec<Ipv4Addr> = (0..4).map(|_| ipam.allocate().unwrap().v4).collect();
        assert_eq!(
            next,
            [5, 6, 2, 3].map(|h| Ipv4Addr::new(192, 0, 2, h)).to_vec()
        );
        assert!(ipam.allocate().is_err());
        assert_eq!(ipam.in_use(), 5);
    }
}
