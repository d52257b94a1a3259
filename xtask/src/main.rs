//! `cargo xtask …`: set up the machine, build the BPF object and the daemon,
//! run the tests, the demo and the benchmarks.

mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tapmesh build and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Build the BPF object (nightly, bpfel-unknown-none).
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Build the BPF object and the workspace.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the daemon with the given arguments.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Unit tests, golden-packet tests and namespace tests (root for the kernel ones).
    Test {
        /// Extra arguments for `cargo test` (a test name filter, for instance).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Longer fuzzing than `test` does: the differential packet fuzzer for
    /// `--seconds` from a new seed (printed; `--seed` replays one), then the
    /// property tests of the parsers with `--cases` cases each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 20_000)]
        cases: u64,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// A small lab of namespaces with the daemon running and real traffic.
    Demo,
    /// BPF_PROG_TEST_RUN ns/packet per program path; writes BENCHMARKS.md.
    Bench,
    /// The container image, from a fresh Debian root (mmdebstrap, rustup-init,
    /// `cargo xtask setup`, release build) into a small runtime root; `--check` tests it.
    Image(image::ImageArgs),
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn bpf_object(release: bool) -> PathBuf {
    root()
        .join("ebpf/target/bpfel-unknown-none")
        .join(if release { "release" } else { "debug" })
        .join("tapmesh")
}

fn build_ebpf(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root().join("ebpf"))
        // Let ebpf/rust-toolchain.toml pick nightly, and keep host flags out.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--quiet"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building the BPF object")?;
    Ok(bpf_object(release))
}

/// `cargo` for the host workspace, pointed at the BPF object just built.
fn cargo(object: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).env("TAPMESH_BPF_OBJECT", object);
    cmd
}

fn build(release: bool) -> Result<PathBuf> {
    let object = build_ebpf(true)?;
    let mut cmd = cargo(&object);
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(object)
}

fn binary(release: bool) -> PathBuf {
    root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("tapmesh")
}

/// Builds for release, then runs the tapmesh-tests binary `bin` with `args`
/// against that daemon (the bench: timings of a dev build would mislead).
fn run_tests_bin(bin: &str, args: &[PathBuf]) -> Result<()> {
    let object = build(true)?;
    run(cargo(&object)
        .env("TAPMESH_BIN", binary(true))
        .args(["run", "--quiet", "--release", "-p", "tapmesh-tests"])
        .args(["--bin", bin, "--"])
        .args(args))
}

/// The fuzz targets with bounds of their own (see `Task::Fuzz`).
fn fuzz(seconds: u64, cases: u64, seed: Option<u64>) -> Result<()> {
    let object = build(false)?;
    let seed = seed.unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(1, |d| d.as_nanos() as u64)
    });
    // `--workspace` as in `cargo xtask test`: the same features, so nothing is built twice.
    println!("fuzz: packets for {seconds} s from seed {seed:#x} (replay: cargo xtask fuzz --seed {seed})");
    run(cargo(&object)
        .args(["test", "--workspace", "--test", "fuzz_packets"])
        .env("TAPMESH_BIN", binary(false))
        .env("TAPMESH_REQUIRE_KERNEL_TESTS", "1")
        .env("TAPMESH_FUZZ_SECONDS", seconds.to_string())
        .env("TAPMESH_FUZZ_CASES", u64::MAX.to_string())
        .env("TAPMESH_FUZZ_SEED", seed.to_string())
        .args(["--", "--nocapture"]))?;
    println!("fuzz: property tests, {cases} cases each");
    run(cargo(&object)
        .args(["test", "--workspace", "--test", "fuzz_parsers"])
        .args(["--test", "fuzz_resources"])
        .env("PROPTEST_CASES", cases.to_string()))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The image task installs its own tools; the usual set-up runs inside the image.
    if !matches!(cli.command, Task::Setup | Task::Image(_)) {
        setup::check_and_install(false)?;
    }
    match cli.command {
        Task::Setup => setup::check_and_install(true)?,
        Task::BuildEbpf { release } => {
            let object = build_ebpf(release)?;
            println!("BPF object: {}", object.display());
        }
        Task::Build { release } => {
            build(release)?;
            println!("built {}", binary(release).display());
        }
        Task::Run { release, args } => {
            build(release)?;
            run(Command::new(binary(release)).arg("daemon").args(args))?;
        }
        Task::Test { args } => {
            let object = build(false)?;
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
            let mut cmd = cargo(&object);
            cmd.args(["test", "--workspace", "--no-fail-fast"])
                .env("TAPMESH_BIN", binary(false))
                .args(&args);
            if ci {
                cmd.env("TAPMESH_REQUIRE_KERNEL_TESTS", "1");
            }
            run(&mut cmd)?;
        }
        Task::Fuzz {
            seconds,
            cases,
            seed,
        } => fuzz(seconds, cases, seed)?,
        // The dev profile: the build `cargo xtask test` already made (CI runs the demo after
        // it), and a fresh machine's first demo compiles in about half a release build's time.
        Task::Demo => {
            let object = build(false)?;
            run(Command::new(root().join("target/debug/tapmesh-demo"))
                .env("TAPMESH_BPF_OBJECT", &object)
                .env("TAPMESH_BIN", binary(false)))?
        }
        Task::Image(args) => image::image(args)?,
        Task::Bench => run_tests_bin("tapmesh-bench", &[root().join("BENCHMARKS.md")])?,
    }
    Ok(())
}
