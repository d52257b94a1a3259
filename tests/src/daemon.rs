//! Running `tapmesh daemon` in a namespace with its own pins and admin socket.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tapmesh::admin::proto::{StatusRequest, StatusResponse};

/// The tapmesh binary under test (`TAPMESH_BIN`, set by `cargo xtask test`).
pub fn tapmesh_bin() -> PathBuf {
    std::env::var_os("TAPMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tapmesh")
        })
}

/// A running daemon; stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub bpffs_root: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Pins and socket paths unique to this daemon.
    pub fn paths() -> (PathBuf, PathBuf) {
        let id = crate::unique("t");
        (
            PathBuf::from(format!("/sys/fs/bpf/tapmesh-test-{id}")),
            std::env::temp_dir().join(format!("tapmesh-test-{id}.sock")),
        )
    }

    /// Starts `tapmesh daemon --netns <netns> <args>` and waits until its admin API answers.
    pub fn start(netns: &str, args: &[&str]) -> Self {
        let (bpffs_root, _) = Self::paths();
        Self::start_at(netns, &bpffs_root, args)
    }

    /// Like [`Daemon::start`], pinning under a given bpffs root (to restart on the same pins).
    pub fn start_at(netns: &str, bpffs_root: &std::path::Path, args: &[&str]) -> Self {
        Self::start_wrapped(&[], netns, bpffs_root, args)
    }

    /// Like [`Daemon::start_at`], run by `wrapper` (a command that ends by
    /// running its arguments, e.g. `unshare --mount ...`).
    pub fn start_wrapped(
        wrapper: &[&str],
        netns: &str,
        bpffs_root: &std::path::Path,
        args: &[&str],
    ) -> Self {
        let (_, socket) = Self::paths();
        let bpffs_root = bpffs_root.to_path_buf();
        let log = socket.with_extension("log");
        // Its own node socket and state directory, unless the test names them.
        let mut own = Vec::new();
        if !args.contains(&"--node-socket") {
            own.push("--node-socket".to_string());
            own.push(socket.with_extension("node.sock").display().to_string());
        }
        if !args.contains(&"--state-dir") {
            own.push("--state-dir".to_string());
            own.push(socket.with_extension("state").display().to_string());
        }
        let log_file = std::fs::File::create(&log).expect("daemon log file");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(tapmesh_bin());
                c
            }
            None => Command::new(tapmesh_bin()),
        };
        let child = command
            .arg("daemon")
            .args(["--netns", netns])
            .arg("--bpffs-root")
            .arg(&bpffs_root)
            .arg("--admin-socket")
            .arg(&socket)
            .args(args)
            .args(&own)
            .env_remove("TAPMESH_CONFIG")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tapmesh_bin().display()));
        let mut daemon = Daemon {
            child: Some(child),
            socket,
            bpffs_root,
            log,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        // Generous: most of a start is the verifier, and parallel tests on
        // a loaded machine make it many times slower.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("daemon exited early ({status}): {}", self.log_text());
            }
            if self.socket.exists() && self.try_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon not ready after 60 s: {}", self.log_text());
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running daemon").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What `tapmesh <args> --admin-socket <this daemon's socket>` prints.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(tapmesh_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.socket)
            .output()
            .unwrap_or_else(|e| panic!("tapmesh {}: {e}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_status(&self) -> Option<StatusResponse> {
        let socket = self.socket.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?
            .block_on(async move {
                let mut client = tapmesh::admin::connect(&socket).await.ok()?;
                client
                    .status(StatusRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            })
    }

    /// Polls the status until `ready` holds (packets may still be in flight), or 30 s pass.
    pub fn status_when(&self, ready: impl Fn(&StatusResponse) -> bool) -> StatusResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status();
            if ready(&status) || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's status through the admin API.
    pub fn status(&self) -> StatusResponse {
        self.try_status()
            .unwrap_or_else(|| panic!("admin API did not answer: {}", self.log_text()))
    }

    /// SIGKILL, then waits: the daemon ends without any stop of its own.
    /// Its pins stay until this value is dropped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` and waits (30 s at most) for the daemon to exit.
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "daemon ignored signal {signal} for 30 s: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(self.socket.with_extension("node.sock"));
        let _ = std::fs::remove_dir_all(self.socket.with_extension("state"));
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
    }
}

fn verdict(status: &StatusResponse, program: &str, verdict: &str) -> tapmesh::admin::proto::Count {
    status
        .programs
        .iter()
        .find(|p| p.program == program)
        .unwrap_or_else(|| panic!("no program {program} in status"))
        .verdicts
        .iter()
        .find(|v| v.name == verdict)
        .unwrap_or_else(|| panic!("no verdict {verdict} for {program}"))
        .clone()
}

/// Packets of one verdict of one program in a status.
pub fn packets(status: &StatusResponse, program: &str, verdict_name: &str) -> u64 {
    verdict(status, program, verdict_name).packets
}

/// The count of a named drop reason or protocol of one program.
pub fn named(status: &StatusResponse, program: &str, name: &str) -> u64 {
    let p = status
        .programs
        .iter()
        .find(|p| p.program == program)
        .unwrap_or_else(|| panic!("no program {program} in status"));
    p.drops
        .iter()
        .chain(p.protocols.iter())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no counter {name} for {program}"))
        .packets
}

/// Bytes of one verdict of one program.
pub fn bytes(status: &StatusResponse, program: &str, verdict_name: &str) -> u64 {
    verdict(status, program, verdict_name).bytes
}
