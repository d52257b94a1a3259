//! Network namespaces: entering one (`ip netns` style, /run/netns/NAME),
//! running a closure inside one, and naming one (device and inode).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// Moves the calling thread into the namespace. Call it before any other
/// thread starts, so the whole process lives there.
pub fn enter(name: &str) -> std::io::Result<()> {
    if let Ok(before) = File::open("/proc/thread-self/ns/net") {
        if let Ok(id) = NetnsId::of(&before) {
            let _ = STARTED_IN.set(id);
        }
    }
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

/// The namespace the process was started in, before [`enter`] (the host's).
static STARTED_IN: std::sync::OnceLock<NetnsId> = std::sync::OnceLock::new();

/// Runs `f` on a short-lived thread that has entered `netns`.
pub fn run_in<T: Send>(netns: &File, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let fd = netns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a descriptor the caller keeps open.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// A network namespace as the kernel names it (device and inode of its nsfs file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    pub fn of(file: &File) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The daemon's own namespace (its main thread's).
    pub fn own() -> Option<Self> {
        let file = File::open("/proc/self/ns/net").ok()?;
        Self::of(&file).ok()
    }

    pub fn describe(&self) -> String {
        format!("net:[{}]", self.ino)
    }

    /// The initial network namespace (pid 1's), as this process sees it.
    pub fn init() -> Option<Self> {
        let file = File::open("/proc/1/ns/net").ok()?;
        Self::of(&file).ok()
    }

    /// The namespace the process was started in, if [`enter`] left it.
    pub fn started_in() -> Option<Self> {
        STARTED_IN.get().copied()
    }

    /// The namespace of an open file, which must be a network namespace
    /// (an nsfs file of type net, not any file a caller names).
    pub fn of_namespace(file: &File) -> Result<Self, String> {
        const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: fstatfs into a zeroed struct on a descriptor we own.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if fs.f_type as libc::c_long != NSFS_MAGIC {
            return Err("it is not a namespace file (nsfs)".into());
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and returns the CLONE_NEW* type.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind != libc::CLONE_NEWNET {
            return Err("it is a namespace, but not a network namespace".into());
        }
        Self::of(file).map_err(|e| e.to_string())
    }
}

/// The network namespace of process `pid`, checked against `expect` if given.
pub fn of_pid(pid: i32, expect: Option<NetnsId>) -> std::io::Result<(File, NetnsId)> {
    let file = File::open(format!("/proc/{pid}/ns/net"))?;
    let id = NetnsId::of(&file)?;
    if expect.is_some_and(|e| e != id) {
        return Err(std::io::Error::other(format!(
            "process {pid} is no longer in that network namespace"
        )));
    }
    Ok((file, id))
}
