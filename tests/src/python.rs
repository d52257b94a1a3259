//! Independent test peers in Python: a virtualenv with grpcio and grpcio-tools
//! (from PyPI, created once under target/ and shared by the tests), and
//! stubs generated from a proto file the test writes itself. Other tools from
//! PyPI get venvs of their own ([`venv`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Pinned versions of the peers (toolchain.md).
const PACKAGES: &[&str] = &[
    "grpcio==1.85.1",
    "grpcio-tools==1.85.1",
    "xds-protos==1.85.0",
];

/// The grpc venv's python, creating the venv if needed.
pub fn python() -> PathBuf {
    venv("tapmesh-pyvenv", PACKAGES)
}

/// The python of venv `target/<name>` holding exactly `packages`, creating it
/// if needed (under a file lock, so parallel tests create it once).
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(name);
    let python = dir.join("bin/python");
    let ready = dir.join(".ready");
    std::fs::create_dir_all(dir.parent().expect("target dir")).expect("target dir");
    let lock = std::fs::File::create(dir.with_extension("lock")).expect("venv lock file");
    // SAFETY: flock on a file we hold open; released when it is closed.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    // The marker holds the package list it was made with; another list remakes the venv.
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(packages.join("\n").as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir));
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(packages));
        std::fs::write(&ready, packages.join("\n")).expect("marking the venv ready");
    }
    python
}

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `proto` as `dir/name` and generates its Python modules into `dir`.
pub fn generate(python: &Path, dir: &Path, name: &str, proto: &str) {
    std::fs::write(dir.join(name), proto).expect("writing the proto");
    run(Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(dir)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(dir.join(name)));
}

/// Runs a Python script with `dir` on its path; returns its stdout.
pub fn script(python: &Path, dir: &Path, code: &str, args: &[&str]) -> String {
    let path = dir.join("peer.py");
    std::fs::write(&path, code).expect("writing the script");
    let out = run(Command::new(python)
        .arg(&path)
        .args(args)
        .env("PYTHONPATH", dir));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates the Python modules of `files` (paths under `include`, e.g.
/// "api/nsp/v1/model.proto") into `dir`, packages following the paths.
pub fn generate_from(python: &Path, include: &Path, files: &[&str], dir: &Path) {
    run(Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(include)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .args(files));
}

/// The repository's own proto files (`userspace/proto`).
pub fn repo_protos() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../userspace/proto")
}
