//! The one prefix type: an address with a prefix length ("198.18.0.2/24").
//! The address is kept as written (an interface address keeps its host
//! bits); [`Prefix::network`] clears them. The LB's maps work in the 16-byte
//! space where IPv4 is `::ffff:a.b.c.d`: [`Prefix::mapped`] goes there.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Prefix {
    pub addr: IpAddr,
    /// The prefix length (named `prefix` in saved state).
    #[serde(rename = "prefix")]
    pub len: u8,
}

/// Why a text is not a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("missing \"/length\"")]
    NoLength,
    #[error("prefix length is not a number")]
    LengthNotANumber,
    #[error("prefix length too large")]
    LengthTooLarge,
    #[error("IPv4 prefix length above 32")]
    V4TooLong,
    #[error("IPv6 prefix length above 128")]
    V6TooLong,
    #[error("not an IPv4 or IPv6 address")]
    NotAnAddress,
}

impl PrefixError {
    /// The reason as a static text (what validation errors carry).
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoLength => "missing \"/length\"",
            Self::LengthNotANumber => "prefix length is not a number",
            Self::LengthTooLarge => "prefix length too large",
            Self::V4TooLong => "IPv4 prefix length above 32",
            Self::V6TooLong => "IPv6 prefix length above 128",
            Self::NotAnAddress => "not an IPv4 or IPv6 address",
        }
    }
}

fn max_len_of(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl Prefix {
    /// `addr/len`, the address kept as given; `len` is capped at the
    /// family's longest prefix.
    pub fn new(addr: impl Into<IpAddr>, len: u8) -> Self {
        let addr = addr.into();
        Self {
            len: len.min(max_len_of(&addr)),
            addr,
        }
    }

    /// The address alone: /32 or /128.
    pub fn host(addr: impl Into<IpAddr>) -> Self {
        Self::new(addr, 128)
    }

    /// The longest prefix of the address family (32 or 128).
    pub fn max_len(&self) -> u8 {
        max_len_of(&self.addr)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Refuses a length beyond the family's (possible when built by hand).
    pub fn check(&self) -> Result<(), PrefixError> {
        match self.addr {
            IpAddr::V4(_) if self.len > 32 => Err(PrefixError::V4TooLong),
            IpAddr::V6(_) if self.len > 128 => Err(PrefixError::V6TooLong),
            _ => Ok(()),
        }
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Self {
        let len = u32::from(self.len.min(self.max_len()));
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Self {
            addr,
            len: len as u8,
        }
    }

    /// True if the address has no host bits set.
    pub fn is_network(&self) -> bool {
        self.network() == *self
    }

    /// True if `addr` (of the same family) is inside this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.is_ipv4() && Self::new(addr, self.len).network() == self.network()
    }

    /// True if `other` is equal to or nested inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// The prefix in the 16-byte space the LB maps use (IPv4 as
    /// `::ffff:a.b.c.d`, length + 96); IPv6 stays as it is.
    pub fn mapped(&self) -> Self {
        match self.addr {
            IpAddr::V4(a) => Self {
                addr: IpAddr::V6(a.to_ipv6_mapped()),
                len: self.len + 96,
            },
            IpAddr::V6(_) => *self,
        }
    }

    /// The address's 16 bytes in that space.
    pub fn octets(&self) -> [u8; 16] {
        match self.addr {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        }
    }

    /// True for prefixes inside `::ffff:0:0/96`.
    pub fn is_v4_mapped(&self) -> bool {
        let octets = self.octets();
        !self.is_ipv4()
            && self.len >= 96
            && octets[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
    }

    /// Parses a host address ("20.0.0.1", "2001:db8::1") as /32 or /128, or
    /// a prefix ("20.0.0.0/24").
    pub fn parse_host_or_prefix(s: &str) -> Result<Self, PrefixError> {
        if s.contains('/') {
            s.parse()
        } else {
            let addr = s.parse::<IpAddr>().map_err(|_| PrefixError::NotAnAddress)?;
            Ok(Self::host(addr))
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// "a.b.c.d/n" or "x::y/n", nothing around them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or(PrefixError::NoLength)?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PrefixError::LengthNotANumber);
        }
        let len: u8 = len.parse().map_err(|_| PrefixError::LengthTooLarge)?;
        let addr: IpAddr = addr.parse().map_err(|_| PrefixError::NotAnAddress)?;
        let prefix = Self { addr, len };
        prefix.check()?;
        Ok(prefix)
    }
}

/// Parses a pool prefix: the network address and length (at most /30 or /126).
pub fn parse_pool(text: &str) -> Result<Prefix, String> {
    let prefix: Prefix = text
        .parse()
        .map_err(|_| format!("{text:?} is not a prefix such as \"169.254.100.0/22\""))?;
    if prefix.len <= prefix.max_len() - 2 && prefix.is_network() {
        Ok(prefix)
    } else {
        Err(format!(
            "{text:?} must be a network address with a length up to /30 (IPv4) or /126 (IPv6)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_prints_and_keeps_the_address_as_written() {
        for s in ["198.18.0.2/24", "2001:db8:1::2/64", "192.0.2.10/32", "::/0"] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(
            p("198.18.0.2/24").addr,
            "198.18.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(p("198.18.0.2/24").network(), p("198.18.0.0/24"));
        assert!(!p("198.18.0.2/24").is_network());
        assert!(p("2001:db8::/32").is_network());
        assert_eq!(p("10.1.2.3/0").network(), p("0.0.0.0/0"));
        assert_eq!(
            Prefix::parse_host_or_prefix("20.0.0.1").unwrap(),
            p("20.0.0.1/32")
        );
        assert_eq!(
            Prefix::parse_host_or_prefix("2001:db8::1").unwrap(),
            p("2001:db8::1/128")
        );
    }

    #[test]
    fn bad_text_says_why() {
        let e = |s: &str| s.parse::<Prefix>().unwrap_err();
        assert_eq!(e("10.0.0.0"), PrefixError::NoLength);
        assert_eq!(e("10.0.0.0/33"), PrefixError::V4TooLong);
        assert_eq!(e("2001::/129"), PrefixError::V6TooLong);
        assert_eq!(e("10.0.0.0/+8"), PrefixError::LengthNotANumber);
        assert_eq!(e("10.0.0.0/ 8"), PrefixError::LengthNotANumber);
        assert_eq!(e("10.0.0.0/1000"), PrefixError::LengthNotANumber);
        assert_eq!(e("10.0.0.0/999"), PrefixError::LengthTooLarge);
        assert_eq!(e("host/8"), PrefixError::NotAnAddress);
        assert_eq!(e(" 10.0.0.0/8"), PrefixError::NotAnAddress);
        assert_eq!(e("198.18.0.2/-1"), PrefixError::LengthNotANumber);
    }

    #[test]
    fn containment_stays_within_a_family() {
        assert!(p("10.0.0.0/8").contains("10.9.9.9".parse().unwrap()));
        assert!(!p("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(!p("::/0").contains("10.0.0.1".parse().unwrap()));
        assert!(p("::/0").contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(p("10.0.0.0/8").covers(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").covers(&p("10.0.0.0/8")));
    }

    #[test]
    fn mapped_space_is_where_the_lb_maps_live() {
        let v4 = p("124.0.0.7/24").mapped().network();
        assert_eq!(v4.len, 120);
        assert_eq!(
            v4.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 124, 0, 0, 0]
        );
        assert!(v4.is_v4_mapped());
        assert_eq!(p("0.0.0.0/0").mapped().len, 96);
        assert_eq!(p("2001::/32").mapped(), p("2001::/32"));
        assert!(!p("2001::/32").is_v4_mapped());
    }

    #[test]
    fn saved_state_keeps_its_field_names() {
        let json = serde_json::to_string(&p("198.18.0.2/30")).unwrap();
        assert_eq!(json, r#"{"addr":"198.18.0.2","prefix":30}"#);
        assert_eq!(
            serde_json::from_str::<Prefix>(&json).unwrap(),
            p("198.18.0.2/30")
        );
    }

    #[test]
    fn pools_must_be_network_prefixes() {
        assert!(parse_pool("198.18.0.0/24").is_ok());
        assert!(parse_pool("198.18.0.1/24").is_err());
        assert!(parse_pool("198.18.0.0/31").is_err());
        assert!(parse_pool("2001:db8::/64").is_ok());
        assert!(parse_pool("2001:db8::1/64").is_err());
        assert!(parse_pool("2001:db8::/96").is_ok());
        assert!(parse_pool("nonsense").is_err());
    }
}
