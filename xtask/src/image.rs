//! `cargo xtask image`: the tapmesh container image, built from nothing but
//! package registries (deploy/image/Containerfile says what each stage holds).
//!
//! Every build makes both Debian roots anew with mmdebstrap, installs Rust
//! with rustup-init and runs `cargo xtask setup` and the release build inside,
//! so it proves the README's set-up on a fresh machine. Only downloads are
//! kept between builds (Debian packages and crates, both checked by digest
//! when used); `--fresh-downloads` fetches those again too.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

const SUITE: &str = "bookworm";
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// What a new machine needs before `cargo xtask setup` can run: a C
/// toolchain for the linker and curl for rustup-init.
const BUILD_ROOT_PACKAGES: &str = "ca-certificates,curl,gcc,libc6-dev";
/// The runtime: bpftool, `ip` and `nft` for operators to inspect maps, links and
/// the NetManager's port mappings (the daemon itself uses netlink, never these).
const RUNTIME_PACKAGES: &str = "libc6,libgcc-s1,bpftool,iproute2,nftables";
/// What the runtime root does without: documentation, locales, headers, iconv
/// modules (apt's own files are mmdebstrap's to clean up).
const RUNTIME_PRUNE: &str = "usr/share/doc usr/share/man usr/share/info usr/share/locale \
     usr/share/lintian usr/share/bug usr/include usr/lib/x86_64-linux-gnu/gconv";
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The stable toolchain of the build stage (the nightly comes from ebpf/rust-toolchain.toml).
const RUST_VERSION: &str = "1.95.0";

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Name and tag of the image.
    #[arg(long, default_value = concat!("localhost/tapmesh:", env!("CARGO_PKG_VERSION")))]
    pub tag: String,
    /// Build the last commit (git archive HEAD) instead of the working tree.
    #[arg(long)]
    pub head: bool,
    /// Where the build context, the download caches and containers.conf live.
    #[arg(long, default_value = "target/image")]
    pub cache_dir: PathBuf,
    /// Download every Debian package and crate again instead of reusing the
    /// cache (the roots, toolchains, set-up and build are fresh either way).
    #[arg(long)]
    pub fresh_downloads: bool,
    /// Then run the image check: the daemon in a container in a test network
    /// namespace, `tapmesh status` from the host, a second container adopting
    /// the programs while a UDP stream through a VIP runs.
    #[arg(long)]
    pub check: bool,
    /// Skip the build and check the image that has the tag (with --check).
    #[arg(long, requires = "check")]
    pub no_build: bool,
}

/// podman with the settings these machines need (toolchain.md).
pub fn podman(conf: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf).args(["--runtime", "runc"]);
    cmd
}

/// containers.conf: no default ulimits (no CAP_SYS_RESOURCE here), cgroupfs
/// (hybrid cgroups), runc (crun refuses hybrid cgroups).
fn write_containers_conf(cache: &Path) -> Result<PathBuf> {
    let path = cache.join("containers.conf");
    std::fs::write(
        &path,
        "[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n",
    )?;
    Ok(path)
}

fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let began = Instant::now();
    println!("image: {what}");
    let value = f().with_context(|| what.to_string())?;
    println!("image: {what}: {:.0} s", began.elapsed().as_secs_f64());
    Ok(value)
}

/// mmdebstrap with the Debian mirrors and, unless `debs` is None, the
/// downloaded packages synced in from and back out to that directory.
/// `finish` runs in the root once it is complete.
fn mmdebstrap(
    variant: &str,
    include: &str,
    debs: Option<&Path>,
    finish: &[String],
    out: &Path,
) -> Command {
    // The extract variant runs no customize hooks; its root is complete after extraction.
    let last = if variant == "extract" {
        "--extract-hook"
    } else {
        "--customize-hook"
    };
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--variant={variant}"))
        .arg(format!("--include={include}"))
        .arg("--quiet");
    if variant == "extract" {
        // Bookworm's /bin, /lib … are links into /usr; extract does not make them itself.
        cmd.arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr");
    }
    if let Some(debs) = debs {
        let debs = debs.display();
        cmd.arg("--skip=essential/unlink")
            // sync-in/sync-out are mmdebstrap's own hook commands: one per hook.
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives")
            .arg(format!(
                "--setup-hook=sync-in {debs} /var/cache/apt/archives"
            ))
            .arg(format!("{last}=sync-out /var/cache/apt/archives {debs}"))
            .arg(format!("{last}=rm -f \"$1\"/var/cache/apt/archives/*.deb"));
    }
    for hook in finish {
        cmd.arg(format!("{last}={hook}"));
    }
    cmd.arg(SUITE).arg(out).args(MIRRORS);
    cmd
}

/// The source as a tar: HEAD, or the working tree (tracked and untracked,
/// ignored files such as target/ left out).
fn source_tar(head: bool, out: &Path) -> Result<()> {
    let repo = root();
    if head {
        return run(Command::new("git")
            .current_dir(&repo)
            .args(["archive", "--format=tar", "-o"])
            .arg(out)
            .arg("HEAD"));
    }
    let listed = Command::new("git")
        .current_dir(&repo)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .context("git ls-files")?;
    if !listed.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let mut files: Vec<&str> = listed
        .stdout
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok())
        .filter(|f| !f.is_empty() && repo.join(f).is_file())
        .collect();
    files.sort_unstable();
    files.dedup();
    let list = out.with_extension("list");
    std::fs::write(&list, files.join("\0"))?;
    run(Command::new("tar")
        .current_dir(&repo)
        .args(["--null", "--no-recursion", "-cf"])
        .arg(out)
        .arg("-T")
        .arg(&list))
}

/// The commit the image is built from, with "-dirty" for a changed working tree.
fn revision(head: bool) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = !head && git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

fn build(args: &ImageArgs, cache: &Path, conf: &Path) -> Result<()> {
    let context = cache.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    let debs = cache.join("debs");
    let registry = cache.join("cargo-registry");
    for dir in [&debs, &registry] {
        std::fs::create_dir_all(dir)?;
    }
    let debs_cache = (!args.fresh_downloads).then_some(debs.as_path());

    step("build root (mmdebstrap)", || {
        run(&mut mmdebstrap(
            "apt",
            BUILD_ROOT_PACKAGES,
            debs_cache,
            &[],
            &context.join("build-root.tar"),
        ))
    })?;
    step("runtime root (mmdebstrap)", || {
        let finish = [format!(
            "cd \"$1\" && rm -rf {RUNTIME_PRUNE} && mkdir -p -m 1777 tmp && mkdir -p var/lib/tapmesh"
        )];
        run(&mut mmdebstrap(
            "extract",
            RUNTIME_PACKAGES,
            debs_cache,
            &finish,
            &context.join("runtime-root.tar"),
        ))
    })?;
    step("source archive", || {
        source_tar(args.head, &context.join("source.tar"))
    })?;
    std::fs::copy(
        root().join("deploy/image/Containerfile"),
        context.join("Containerfile"),
    )?;

    let revision = revision(args.head);
    step(
        "podman build (rustup, cargo xtask setup, cargo xtask build --release)",
        || {
            let mut cmd = podman(conf);
            cmd.args([
                "build",
                "--network",
                "host",
                "--layers=false",
                "--pull=never",
            ])
            .args(["--build-arg", &format!("RUST_VERSION={RUST_VERSION}")])
            .args([
                "--label",
                &format!("org.opencontainers.image.revision={revision}"),
            ])
            .args([
                "--label",
                concat!(
                    "org.opencontainers.image.version=",
                    env!("CARGO_PKG_VERSION")
                ),
            ])
            .args(["-t", &args.tag, "-f"])
            .arg(context.join("Containerfile"));
            // The machine's trust store is lent to the build (where TLS goes through a
            // proxy with its own CA, a fresh root cannot reach the registries without
            // it); the image does not keep it.
            let bundle = Path::new(HOST_CA_BUNDLE);
            if bundle.is_file() {
                cmd.arg("--volume")
                    .arg(format!("{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"));
            }
            if !args.fresh_downloads {
                cmd.arg("--volume")
                    .arg(format!("{}:/root/.cargo/registry", registry.display()))
                    .arg("--volume")
                    .arg(format!("{}:/var/cache/apt/archives", debs.display()));
            }
            run(cmd.arg(&context))
        },
    )?;
    Ok(())
}

/// Runs the image's programs once each: they start, so their libraries are there.
fn smoke(conf: &Path, tag: &str) -> Result<()> {
    for (entrypoint, arg) in [
        ("/usr/bin/tapmesh", "--version"),
        ("bpftool", "version"),
        ("ip", "-V"),
        ("nft", "--version"),
    ] {
        let out = podman(conf)
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                entrypoint,
                tag,
                arg,
            ])
            .output()
            .context("podman run")?;
        if !out.status.success() {
            bail!(
                "{entrypoint} {arg} does not run in {tag}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "image: {entrypoint}: {}",
            text.lines().next().unwrap_or("").trim()
        );
    }
    Ok(())
}

fn size(conf: &Path, tag: &str) -> Result<u64> {
    let out = podman(conf)
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()?;
    if !out.status.success() {
        bail!(
            "no image {tag}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

pub fn image(args: ImageArgs) -> Result<()> {
    let began = Instant::now();
    crate::setup::install_image_tools()?;
    let cache = if args.cache_dir.is_absolute() {
        args.cache_dir.clone()
    } else {
        root().join(&args.cache_dir)
    };
    std::fs::create_dir_all(&cache)?;
    let conf = write_containers_conf(&cache)?;
    if !args.no_build {
        build(&args, &cache, &conf)?;
    }
    smoke(&conf, &args.tag)?;
    let bytes = size(&conf, &args.tag)?;
    println!(
        "image: {} is {:.1} MB ({bytes} bytes)",
        args.tag,
        bytes as f64 / 1e6
    );
    if args.check {
        step("image check", || check(&conf, &args.tag))?;
    }
    println!("image: done in {:.0} s", began.elapsed().as_secs_f64());
    Ok(())
}

/// The check runs from the host: the daemon's CLI of a host build talks to
/// the daemon in the image.
fn check(conf: &Path, tag: &str) -> Result<()> {
    crate::setup::check_and_install(false)?;
    let object = crate::build(false)?;
    run(crate::cargo(&object)
        .args([
            "run",
            "--quiet",
            "-p",
            "tapmesh-tests",
            "--bin",
            "tapmesh-image-check",
            "--",
        ])
        .arg(tag)
        .env("TAPMESH_BIN", crate::binary(false))
        .env("CONTAINERS_CONF", conf))
}
