//! The network sysctls the daemon changes, through `/proc/sys/net` (which
//! shows the calling thread's namespace; no `sysctl` process).

use super::NetError;

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Whether IPv4 forwarding is on (`net.ipv4.ip_forward`).
pub fn ipv4_forwarding() -> Result<bool, NetError> {
    let text = std::fs::read_to_string(IPV4_FORWARD)
        .map_err(NetError::kernel(format!("reading {IPV4_FORWARD}")))?;
    Ok(text.trim() != "0")
}

/// Turns IPv4 forwarding on or off (on every interface, as the kernel does
/// for this key).
pub fn set_ipv4_forwarding(on: bool) -> Result<(), NetError> {
    std::fs::write(IPV4_FORWARD, if on { "1\n" } else { "0\n" }).map_err(NetError::kernel(format!(
        "writing {} to {IPV4_FORWARD} (net.ipv4.ip_forward)",
        u8::from(on)
    )))
}

/// Turns IPv6 off on `interface` (`net.ipv6.conf.<interface>.disable_ipv6`),
/// so the kernel sends nothing of its own there (router solicitations,
/// MLD reports, DAD). A kernel without IPv6 has no such key: nothing to do.
pub fn disable_ipv6(interface: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    match std::fs::write(&path, "1\n") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(NetError::kernel(format!("writing 1 to {path}"))),
    }
}
