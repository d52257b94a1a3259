//! Installs only what is missing, and says what it does.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages the build, the tests, the demo and the benchmarks use.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",       // bpf-linker links against LLVM 22 (rustc's LLVM major)
    "libpolly-22-dev",   // needed by llvm-22-dev's cmake/link line
    "protobuf-compiler", // protoc for the gRPC protos
    "libprotobuf-dev",   // google/protobuf/*.proto, which etcd-client's build script imports
    "bpftool",
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "procps",      // sysctl, used by the namespace tests
    "ethtool",     // GRO on target veths (native XDP redirect needs the peer to run NAPI)
    "tshark",      // decodes the pcap files the mirror rings write
    "etcd-server", // the networking-spp contract tests run a real etcd on loopback
    "etcd-client", // etcdctl, to look at what the tests wrote
    "mosquitto",   // the MQTT broker of the Oakestra cluster tests
    "iptables",    // TEE, the kernel's mirror baseline in the benchmarks
    "nftables",
    "xdp-tools",              // xdpdump, beside tcpdump in the mirroring bench
    "dpdk-dev",               // dpdk-testpmd, a DPDK consumer of a mirror ring in the tests
    "librte-net-af-packet23", // its AF_PACKET driver (only recommended by Debian)
];

/// What `cargo xtask image` needs besides the above (only installed when it runs).
const IMAGE_PACKAGES: &[&str] = &[
    "mmdebstrap", // the build and runtime roots, from Debian's packages
    "podman",
    "buildah",
    "runc", // crun refuses the hybrid cgroup layout of these machines
    "git",  // the source archive
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn missing_packages(list: &[&'static str]) -> Vec<&'static str> {
    list.iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// The nightly that `ebpf/rust-toolchain.toml` pins.
fn bpf_toolchain() -> Result<String> {
    let path = crate::root().join("ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    table
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_string)
        .with_context(|| format!("{}: no [toolchain] channel", path.display()))
}

/// Some(true): installed with rust-src; Some(false): installed without; None: not installed.
fn has_rust_src(toolchain: &str) -> Option<bool> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src"))
    })
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        })
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Installs the Debian packages of `list` that are missing.
fn install_packages(list: &[&'static str], verbose: bool) -> Result<()> {
    let packages = missing_packages(list);
    if !packages.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {packages:?}: run `cargo xtask setup` as root");
        }
        println!("setup: installing Debian packages {}", packages.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("installing Debian packages")?;
    } else if verbose {
        println!("setup: Debian packages present ({})", list.join(" "));
    }
    Ok(())
}

/// What `cargo xtask image` needs on top of the usual set-up.
pub fn install_image_tools() -> Result<()> {
    install_packages(IMAGE_PACKAGES, false)
}

/// Checks everything cheaply; installs what is missing. `verbose` also
/// reports what is already there.
pub fn check_and_install(verbose: bool) -> Result<()> {
    install_packages(PACKAGES, verbose)?;

    let nightly = bpf_toolchain()?;
    match has_rust_src(&nightly) {
        Some(true) if verbose => println!("setup: {nightly} with rust-src present"),
        Some(true) => {}
        Some(false) => {
            println!("setup: adding rust-src to {nightly}");
            run(Command::new("rustup")
                .args(["component", "add", "rust-src", "--toolchain"])
                .arg(&nightly))?;
        }
        None => {
            println!("setup: installing {nightly} with rust-src (ebpf/rust-toolchain.toml)");
            run(Command::new("rustup")
                .args([
                    "toolchain",
                    "install",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ])
                .arg(&nightly))?;
        }
    }

    if !has_bpf_linker() {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            // --locked: the dependency versions bpf-linker was released with, not
            // the newest ones (which may want a newer rustc than a fresh machine has).
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"))
        .context("installing bpf-linker")?;
    } else if verbose {
        println!("setup: bpf-linker present");
    }

    if !bpffs_mounted() {
        if is_root() {
            println!("setup: mounting bpffs on /sys/fs/bpf");
            std::fs::create_dir_all("/sys/fs/bpf").ok();
            // Where mounting is not allowed (an image build, a container) the
            // build still works; only the kernel tests and the daemon need it.
            if let Err(e) = run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
                println!(
                    "setup: warning: no bpffs ({e}); the daemon and the kernel tests need one"
                );
            }
        } else if verbose {
            println!("setup: bpffs is not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)");
        }
    } else if verbose {
        println!("setup: bpffs mounted");
    }
    if verbose && !Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("setup: note: this kernel has no BTF (/sys/kernel/btf/vmlinux)");
    }
    Ok(())
}
