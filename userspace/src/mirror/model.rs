//! Tap services and tap flows as the API takes them (TaaS semantics), their
//! validation, and the interface the etcd contract drives.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// TaaS directions, relative to the source port: IN = to the port, OUT = from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Direction {
    In,
    Out,
    Both,
}

impl Direction {
    pub fn parse(text: &str) -> Result<Self, MirrorError> {
        match text {
            "IN" => Ok(Self::In),
            "OUT" => Ok(Self::Out),
            "BOTH" => Ok(Self::Both),
            other => Err(MirrorError::BadDirection(other.into())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "IN",
            Self::Out => "OUT",
            Self::Both => "BOTH",
        }
    }

    /// The kernel's direction bits.
    pub fn bits(self) -> u8 {
        use tapmesh_common::mirror::{DIRECTION_IN, DIRECTION_OUT};
        match self {
            Self::In => DIRECTION_IN,
            Self::Out => DIRECTION_OUT,
            Self::Both => DIRECTION_IN | DIRECTION_OUT,
        }
    }
}

/// Where a tap service's copies go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// Sent out of this interface.
    Interface(String),
    /// Into an AF_XDP mirror ring, fanned out to its consumers.
    Ring(RingSpec),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSpec {
    /// Write every copy to this pcap file.
    pub pcap: Option<String>,
    /// Send every copy out of this interface.
    pub forward: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapService {
    pub id: String,
    pub name: String,
    pub destination: Destination,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFlow {
    pub id: String,
    pub name: String,
    pub tap_service: String,
    /// The source port's interface (host side).
    pub source: String,
    pub direction: Direction,
    /// TaaS syntax, e.g. "10,20-30"; `None` = every VLAN and untagged.
    pub vlan_filter: Option<String>,
}

/// TaaS statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Down,
    Active,
    Error,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MirrorError {
    #[error("direction {0:?} is not IN, OUT or BOTH")]
    BadDirection(String),
    #[error("vlan_filter {value:?}: {reason}; use ids 0-4095 and ranges a-b with a <= b, comma-separated (e.g. \"10,20-30\")")]
    BadVlanFilter { value: String, reason: String },
    #[error("{kind} {id:?} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id:?} already exists")]
    Exists { kind: &'static str, id: String },
    #[error("{field}: bad name {value:?}; use 1-253 characters from [A-Za-z0-9-+_.]")]
    BadName { field: &'static str, value: String },
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the dataplane refused the change: {0}")]
    Dataplane(String),
    #[error("tap flow {flow:?} was plugged by the networking-spp agent; unplug it through Neutron (the driver writes tap_action \"unplug\"), which frees its mirror slots and etcd keys")]
    PluggedBySpp { flow: String },
}

/// Parses a TaaS VLAN filter strictly: ids 0..=4095, ranges a-b with a <= b.
pub fn parse_vlan_filter(text: &str) -> Result<Vec<(u16, u16)>, MirrorError> {
    let bad = |reason: &str| MirrorError::BadVlanFilter {
        value: text.into(),
        reason: reason.into(),
    };
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let id = |s: &str| -> Result<u16, MirrorError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 4 {
            return Err(bad(&format!("{s:?} is not a VLAN id")));
        }
        let v: u16 = s
            .parse()
            .map_err(|_| bad(&format!("{s:?} is not a VLAN id")))?;
        if v > 4095 {
            return Err(bad(&format!("{v} is above 4095")));
        }
        Ok(v)
    };
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (id(a)?, id(b)?);
                if a > b {
                    return Err(bad(&format!("range {a}-{b} is reversed")));
                }
                Ok((a, b))
            }
            None => id(part).map(|v| (v, v)),
        })
        .collect()
}

/// What a control plane (the etcd contract, the admin API) asks of the mirror plugin.
#[async_trait::async_trait]
pub trait TapBackend: Send + Sync {
    /// Creates the tap service, or succeeds if an identical one exists.
    async fn ensure_service(&self, service: TapService) -> Result<(), MirrorError>;
    /// Creates the tap flow, or succeeds if an identical one exists; returns
    /// once the kernel copies (status ACTIVE) or with the reason it could not.
    async fn ensure_flow(&self, flow: TapFlow) -> Result<(), MirrorError>;
    /// Names the flows the agent plugged before (its saved state), so they
    /// are known as its own before etcd answers.
    async fn claim_flows(&self, _ids: &[String]) {}
    /// Deletes a tap flow; deleting one that does not exist is Ok.
    async fn delete_flow(&self, id: &str) -> Result<(), MirrorError>;
    /// Deletes a tap service and its flows; one that does not exist is Ok.
    async fn delete_service(&self, id: &str) -> Result<(), MirrorError>;
    /// Whether a tap service with this id exists (the agent deletes only
    /// services it created).
    async fn service_exists(&self, _id: &str) -> bool {
        false
    }
    /// Whether any tap flow uses the service.
    async fn service_in_use(&self, _id: &str) -> bool {
        false
    }
    /// Ids of tap flows the backend removed on its own (their port went away).
    fn removed_flows(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_filters_are_strict() {
        assert_eq!(
            parse_vlan_filter("10,20-30").unwrap(),
            vec![(10, 10), (20, 30)]
        );
        assert_eq!(parse_vlan_filter("0-4095").unwrap(), vec![(0, 4095)]);
        for bad in [
            "", "5000", "20-10", "10,", "a", "1 -2", "-1", "10--20", "00004",
        ] {
            assert!(parse_vlan_filter(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_vlan_filter("20-10").unwrap_err().to_string();
        assert!(e.contains("reversed"), "{e}");
    }

    #[test]
    fn directions() {
        assert_eq!(Direction::parse("BOTH").unwrap().bits(), 3);
        assert!(Direction::parse("both").is_err());
    }
}
