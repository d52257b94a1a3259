//! Checks the daemon makes before it loads or attaches anything, so that a
//! machine it cannot work on is refused with one line (exit 2) and nothing
//! to undo: privileges, the BPF JIT, the host's bpffs, uplinks another XDP
//! program holds.

use std::path::Path;

use thiserror::Error;

use crate::config::Config;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error("needs root or CAP_BPF + CAP_NET_ADMIN (missing {0}); run it with sudo, or give the container those capabilities (the DaemonSet runs privileged)")]
    Capabilities(String),
    #[error("{root} is not on the host's bpffs: this process does not see the host's mounts ({why}); pins made here would vanish with it. Run it in the host's mount namespace (nsenter --net=/run/netns/NAME, or `tapmesh daemon --netns NAME`, not `ip netns exec`), or mount the host's /sys/fs/bpf into the container (hostPath, -v /sys/fs/bpf:/sys/fs/bpf); --private-bpffs mounts a private one anyway")]
    NotHostBpffs { root: String, why: &'static str },
    #[error("dataplane.uplinks: {interface} already has an XDP program ({program}, id {id}) this daemon did not leave there; {how}, or choose another uplink")]
    XdpTaken {
        interface: String,
        program: String,
        id: u32,
        /// How to detach it: a BPF link cannot be replaced through `ip`.
        how: String,
    },
    #[error("{dir} is in use by another process (pid {pids}), a tapmesh daemon on the same pins: two daemons there would undo each other's maps, and one's stop would remove the other's pins; give this one its own dataplane.bpffs_root (--bpffs-root), or stop that one first")]
    PinsTaken { dir: String, pids: String },
    #[error("net.core.bpf_jit_enable is {0}: the uplink program tail-calls port NAT's program and has subprograms, which the kernel allows only JIT-compiled; turn the JIT on (sysctl -w net.core.bpf_jit_enable=1)")]
    JitOff(String),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The effective capability set, from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// CAP_NET_ADMIN, and CAP_BPF (or CAP_SYS_ADMIN, which allows bpf() too).
pub fn capabilities() -> Result<(), PreflightError> {
    missing_capabilities(effective_capabilities())
}

fn missing_capabilities(effective: u64) -> Result<(), PreflightError> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities(missing.join(" and ")))
    }
}

fn fs_type(path: &Path) -> Option<i64> {
    let c =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).ok()?;
    // SAFETY: a valid C string and a zeroed statfs the call fills.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0).then_some(buf.f_type as i64)
}

/// Why this process's mounts may not be the host's, if they may not.
fn foreign_mounts() -> Option<&'static str> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if std::process::id() == 1 {
        return Some("it is the first process of its own PID namespace, a container");
    }
    if Path::new("/run/.containerenv").exists() || Path::new("/.dockerenv").exists() {
        return Some("it runs in a container");
    }
    match (ns("self"), ns("1")) {
        (Some(own), Some(init)) if own == init => None,
        (Some(_), Some(_)) => Some("its mount namespace is not PID 1's, as under `ip netns exec`"),
        _ => Some("PID 1's mount namespace cannot be read to compare"),
    }
}

/// Refuses a bpffs root that is not on a bpffs when a bpffs mounted here
/// would not be the host's (a private one: `status` would show pins the host
/// does not have, and a kept dataplane would be gone with the process).
pub fn host_bpffs(root: &Path, allow_private: bool) -> Result<(), PreflightError> {
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if allow_private || fs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    match foreign_mounts() {
        None => Ok(()),
        Some(why) => Err(PreflightError::NotHostBpffs {
            root: root.display().to_string(),
            why,
        }),
    }
}

/// The BPF JIT is on (the uplink mixes a tail call and subprograms, which
/// the interpreter refuses). A kernel built with the JIT always on has no
/// such file or says 1.
pub fn jit() -> Result<(), PreflightError> {
    match std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
        Ok(value) => jit_on(&value),
        Err(_) => Ok(()),
    }
}

fn jit_on(value: &str) -> Result<(), PreflightError> {
    match value.trim() {
        "0" => Err(PreflightError::JitOff("0".into())),
        _ => Ok(()),
    }
}

/// Refuses pins another process holds maps of: a daemon running on the
/// same bpffs root (a kept dataplane's pins, left by a daemon that is gone,
/// are free).
pub fn pins_free(config: &Config) -> Result<(), PreflightError> {
    let dir = config
        .dataplane
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let pids = crate::dataplane::cleanup::holders(&dir);
    if pids.is_empty() {
        return Ok(());
    }
    Err(PreflightError::PinsTaken {
        dir: dir.display().to_string(),
        pids: pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Refuses an uplink that holds an XDP program, unless it is the link a
/// kept dataplane left under this daemon's pins (that one is replaced).
pub fn uplinks_free(config: &Config) -> Result<(), PreflightError> {
    let pins = config
        .dataplane
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
        .join("links");
    for interface in &config.dataplane.uplinks {
        let Ok(link) = crate::net::link::by_name(interface) else {
            continue;
        };
        let Some(id) = link.xdp_program else {
            continue;
        };
        if pins.join(format!("xdp_{interface}")).exists() {
            continue;
        }
        // This root's kept link, pinned under the interface's old name (it
        // was renamed while no daemon ran): the pin takes the new name.
        if let Some(pin) = kept_link_of(&pins, id) {
            if std::fs::rename(&pin, pins.join(format!("xdp_{interface}"))).is_ok() {
                continue;
            }
        }
        let program = aya::programs::loaded_programs()
            .flatten()
            .find(|p| p.id() == id)
            .and_then(|p| p.name_as_str().map(str::to_string))
            .unwrap_or_else(|| "unnamed".into());
        let how = detach_advice(interface, &program, id);
        return Err(PreflightError::XdpTaken {
            interface: interface.clone(),
            program,
            id,
            how,
        });
    }
    Ok(())
}

/// How to detach XDP program `id` from `interface`: through its BPF link if
/// it has one (`ip` cannot replace a link's program); a tapmesh program is
/// a dataplane kept under another bpffs root or pin schema, which that
/// version's `tapmesh cleanup` removes whole.
fn detach_advice(interface: &str, program: &str, id: u32) -> String {
    let link = aya::programs::loaded_links()
        .flatten()
        .find(|l| l.program_id() == id)
        .map(|l| l.id());
    let detach = match link {
        Some(link) => format!("detach it (bpftool link detach id {link}; `ip link set dev {interface} xdp off` cannot, it is held by a BPF link)"),
        None => format!("detach it (ip link set dev {interface} xdp off)"),
    };
    if program.starts_with("tm_") {
        format!("it is tapmesh's, of a daemon on another bpffs root or a dataplane kept under another root or pin schema (the `tapmesh cleanup --bpffs-root ROOT` of the version that left it removes that whole); {detach}")
    } else {
        detach
    }
}

/// The pin under `links` of the XDP link that runs program `id`, if any.
fn kept_link_of(links: &std::path::Path, id: u32) -> Option<std::path::PathBuf> {
    std::fs::read_dir(links).ok()?.flatten().find_map(|entry| {
        let path = entry.path();
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("xdp_") {
            return None;
        }
        let pinned = aya::programs::links::PinnedLink::from_pin(&path).ok()?;
        let program = aya::programs::links::FdLink::from(pinned)
            .info()
            .ok()?
            .program_id();
        (program == id).then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interpreter_only_kernel_is_refused_by_name() {
        assert_eq!(jit_on("1\n"), Ok(()));
        assert_eq!(jit_on("2\n"), Ok(()), "on, with debug output");
        let e = jit_on("0\n").unwrap_err().to_string();
        assert!(e.starts_with("net.core.bpf_jit_enable is 0:"), "{e}");
        assert!(e.contains("sysctl -w net.core.bpf_jit_enable=1"), "{e}");
    }

    #[test]
    fn capabilities_name_what_is_missing() {
        let all = u64::MAX;
        assert_eq!(missing_capabilities(all), Ok(()));
        assert_eq!(
            missing_capabilities(0).unwrap_err().to_string(),
            "needs root or CAP_BPF + CAP_NET_ADMIN (missing CAP_BPF and CAP_NET_ADMIN); run it \
             with sudo, or give the container those capabilities (the DaemonSet runs privileged)"
        );
        let sys_admin_and_net = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert_eq!(missing_capabilities(sys_admin_and_net), Ok(()));
        let bpf_only = 1 << CAP_BPF;
        assert_eq!(
            missing_capabilities(bpf_only),
            Err(PreflightError::Capabilities("CAP_NET_ADMIN".into()))
        );
    }
}
