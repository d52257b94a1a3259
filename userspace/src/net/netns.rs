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

/// Where named namespaces live (`ip netns`).
const NAMED: &str = "/run/netns";

/// Creates a named namespace as `ip netns add NAME` does: a new namespace
/// bind-mounted on /run/netns/NAME (that directory made a shared mount, so
/// other mount namespaces see it). Fails with `AlreadyExists` if the name is
/// taken. Returns its path.
pub fn add_named(name: &str) -> std::io::Result<PathBuf> {
    use std::ffi::CString;
    use std::io::{Error, ErrorKind};
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{name:?} is not a namespace name"),
        ));
    }
    std::fs::create_dir_all(NAMED)?;
    let dir = CString::new(NAMED).expect("no NUL");
    let shared = libc::MS_SHARED | libc::MS_REC;
    // SAFETY: valid C strings; null file system type and data are allowed here.
    let share = || unsafe {
        libc::mount(
            c"none".as_ptr(),
            dir.as_ptr(),
            std::ptr::null(),
            shared,
            std::ptr::null(),
        )
    };
    if share() != 0 {
        // Not a mount point yet: bind it on itself first (as iproute2).
        // SAFETY: as above.
        let bound = unsafe {
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                c"none".as_ptr(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if bound != 0 || share() != 0 {
            return Err(Error::last_os_error());
        }
    }
    let path = PathBuf::from(NAMED).join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
    // A thread of its own moves into a new namespace and pins it by the
    // bind mount; it ends there, the process's other threads never move.
    let made = std::thread::spawn(move || {
        // SAFETY: unshare on this thread only; mount with valid C strings.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(Error::last_os_error());
            }
            if libc::mount(
                c"/proc/thread-self/ns/net".as_ptr(),
                target.as_ptr(),
                c"none".as_ptr(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(Error::last_os_error());
            }
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(Error::other("namespace thread panicked")));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Deletes a named namespace (`ip netns delete NAME`): its links go with
/// it once nothing else holds it. A name that is not there is Ok.
pub fn delete_named(name: &str) -> std::io::Result<()> {
    let path = PathBuf::from(NAMED).join(name);
    if !path.exists() {
        return Ok(());
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    std::fs::remove_file(&path)
}
