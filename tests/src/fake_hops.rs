//! The next hops of the TestRun labs: interface `if<n>` has index 100 + n,
//! our MAC there is [`our_mac`]`(n)`, and target n's MAC is [`target_mac`]`(n)`.

/// Target n's MAC (the destination MAC of what is redirected to it).
pub fn target_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xaa, n]
}

/// Our MAC on interface `if<n>` (the source MAC of what is redirected there).
pub fn our_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xee, n]
}

/// The fake resolver the LB writer is given: `if<n>` → (100 + n, [`our_mac`]`(n)`).
pub fn resolve(interface: &str) -> Result<(u32, [u8; 6]), String> {
    let n: u8 = interface
        .strip_prefix("if")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no interface {interface}"))?;
    Ok((100 + u32::from(n), our_mac(n)))
}
