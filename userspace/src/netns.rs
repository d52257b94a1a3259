//! Entering a named network namespace (`ip netns` style, /run/netns/NAME).

use std::{fs::File, os::fd::AsRawFd, path::PathBuf};

/// Moves the calling thread into the namespace. Call it before any other
/// thread starts, so the whole process lives there.
pub fn enter(name: &str) -> std::io::Result<()> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    };
    let file = File::open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: a valid namespace file descriptor.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("entering {}: {e}", path.display()),
        ));
    }
    Ok(())
}
