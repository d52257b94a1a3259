//! Who holds an address: every instance's namespace addresses and the
//! service IPs it carries. A deploy or a table that would give an address
//! two meanings is refused, naming the holder: the compiled tables would
//! otherwise keep whichever came first, and one job's traffic would reach
//! another's instance, or none.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::overlay::model::{InstanceRecord, IpType};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Namespace,
    Service(IpType),
}

impl Role {
    fn describe(self) -> String {
        match self {
            Role::Namespace => "the namespace address".into(),
            Role::Service(t) => format!("{t:?}"),
        }
    }
}

struct Holder<'a> {
    job: &'a str,
    number: u32,
    role: Role,
}

fn roles(r: &InstanceRecord) -> Vec<(IpAddr, Role)> {
    let mut out = vec![(IpAddr::V4(r.ns_addr), Role::Namespace)];
    out.extend(r.ns_addr_v6.map(|a| (IpAddr::V6(a), Role::Namespace)));
    for s in &r.service_ips {
        out.push((IpAddr::V4(s.address), Role::Service(s.ip_type)));
        out.extend(
            s.address_v6
                .map(|a| (IpAddr::V6(a), Role::Service(s.ip_type))),
        );
    }
    out
}

/// Two claims on one address can stand together only as one job's shared
/// RR or Closest address, or as one instance naming it twice alike.
fn compatible(a: &Holder, b: &Holder) -> bool {
    let same_instance = a.job == b.job && a.number == b.number;
    match (a.role, b.role) {
        (Role::Service(x), Role::Service(y)) if x == y => {
            same_instance || (a.job == b.job && x != IpType::InstanceNumber)
        }
        (Role::Namespace, Role::Namespace) => same_instance,
        _ => false,
    }
}

/// The first address an instance `concerned` picks shares with another
/// claim it cannot stand beside, as a message; the others' claims are
/// taken as they are (a conflict among them alone is not this change's).
pub fn conflict(
    records: &[InstanceRecord],
    concerned: impl Fn(&InstanceRecord) -> bool,
) -> Option<String> {
    let mut held: BTreeMap<IpAddr, Vec<Holder>> = BTreeMap::new();
    let (new, old): (Vec<&InstanceRecord>, Vec<&InstanceRecord>) =
        records.iter().partition(|r| concerned(r));
    for r in old {
        for (addr, role) in roles(r) {
            held.entry(addr).or_default().push(Holder {
                job: &r.job,
                number: r.number,
                role,
            });
        }
    }
    for r in new {
        for (addr, role) in roles(r) {
            let claim = Holder {
                job: &r.job,
                number: r.number,
                role,
            };
            let holders = held.entry(addr).or_default();
            if let Some(other) = holders.iter().find(|h| !compatible(&claim, h)) {
                let what = match role {
                    Role::Namespace => "namespace address",
                    Role::Service(_) => "service IP",
                };
                return Some(format!(
                    "{what} {addr} of {} instance {} is already {} of {} instance {}",
                    r.job,
                    r.number,
                    other.role.describe(),
                    other.job,
                    other.number
                ));
            }
            holders.push(claim);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::model::{Placement, ServiceIp};
    use std::net::Ipv4Addr;

    fn record(job: &str, number: u32, ns: [u8; 4], sips: &[(IpType, [u8; 4])]) -> InstanceRecord {
        InstanceRecord {
            job: job.into(),
            number,
            ns_addr: Ipv4Addr::from(ns),
            ns_addr_v6: None,
            placement: Placement::Remote {
                node: Ipv4Addr::new(198, 51, 100, 2),
                port: 50103,
            },
            service_ips: sips
                .iter()
                .map(|&(ip_type, a)| ServiceIp {
                    ip_type,
                    address: a.into(),
                    address_v6: None,
                    weight: 0,
                })
                .collect(),
            weight: 1,
        }
    }

    use IpType::{Closest, InstanceNumber as Inst, RoundRobin as Rr};

    #[test]
    fn an_address_keeps_one_meaning() {
        let base = vec![
            record(
                "web",
                0,
                [192, 0, 2, 2],
                &[(Rr, [10, 30, 0, 1]), (Inst, [10, 30, 0, 2])],
            ),
            record("db", 0, [192, 0, 2, 3], &[(Closest, [10, 30, 0, 9])]),
        ];
        let with = |r: InstanceRecord| {
            let mut all = base.clone();
            all.push(r);
            conflict(&all, |r| r.job == "new" || r.number == 1)
        };
        // Another instance of web sharing its RR address: fine.
        assert_eq!(
            with(record(
                "web",
                1,
                [192, 0, 2, 70],
                &[(Rr, [10, 30, 0, 1]), (Inst, [10, 30, 0, 3])]
            )),
            None
        );
        // web's instance IP again, for instance 1.
        assert_eq!(
            with(record("web", 1, [192, 0, 2, 70], &[(Inst, [10, 30, 0, 2])])).unwrap(),
            "service IP 10.30.0.2 of web instance 1 is already InstanceNumber of web instance 0"
        );
        // Another job's RR address, even with the same type.
        assert_eq!(
            with(record("new", 0, [192, 0, 2, 70], &[(Rr, [10, 30, 0, 1])])).unwrap(),
            "service IP 10.30.0.1 of new instance 0 is already RoundRobin of web instance 0"
        );
        // The own job's address with another type.
        assert!(with(record(
            "web",
            1,
            [192, 0, 2, 70],
            &[(Closest, [10, 30, 0, 1])]
        ))
        .is_some());
        // A container's namespace address as a service IP, and twice as a namespace address.
        assert_eq!(
            with(record("new", 0, [192, 0, 2, 70], &[(Inst, [192, 0, 2, 3])])).unwrap(),
            "service IP 192.0.2.3 of new instance 0 is already the namespace address of db instance 0"
        );
        assert_eq!(
            with(record("new", 0, [192, 0, 2, 2], &[])).unwrap(),
            "namespace address 192.0.2.2 of new instance 0 is already the namespace address of web instance 0"
        );
        assert_eq!(
            with(record("new", 0, [10, 30, 0, 9], &[])).unwrap(),
            "namespace address 10.30.0.9 of new instance 0 is already Closest of db instance 0"
        );
        // One instance naming its own address as a service IP, or one address with two types.
        assert!(with(record("new", 0, [192, 0, 2, 70], &[(Rr, [192, 0, 2, 70])])).is_some());
        assert!(with(record(
            "new",
            0,
            [192, 0, 2, 70],
            &[(Rr, [10, 30, 0, 7]), (Closest, [10, 30, 0, 7])]
        ))
        .is_some());
        assert_eq!(
            with(record(
                "new",
                0,
                [192, 0, 2, 70],
                &[(Rr, [10, 30, 0, 7]), (Rr, [10, 30, 0, 7])]
            )),
            None
        );
        // A conflict among the others alone is not the new instance's.
        let mut clashing = base.clone();
        clashing.push(record("old", 0, [192, 0, 2, 2], &[]));
        assert_eq!(conflict(&clashing, |r| r.job == "none"), None);
    }
}
