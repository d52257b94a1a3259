//! The command line with a standard output nobody reads any more
//! (`tapmesh catalog list | head`): every command ends without a panic.

use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};

use tapmesh::proto::ambassador::stream_status::Status as S;
use tapmesh_tests::{
    daemon::tapmesh_bin,
    kernel_tests_enabled,
    tapa::{stream, TapCaller, TapaLab},
};

/// The write end of a pipe whose read end is already closed: every write
/// fails with EPIPE, as after `head` exits.
fn closed_stdout() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own; the read end is closed
    // at once and the write end handed to Stdio, which closes it.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        Stdio::from_raw_fd(fds[1])
    }
}

#[test]
fn no_command_panics_when_its_reader_went_away() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let mut tap = TapCaller::new(&lab.ambassadors[a].socket);
    tap.open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    assert!(tap.wait_status("stream-a", S::Open, std::time::Duration::from_secs(10)));
    let admin = lab.daemon().socket.display().to_string();
    let node = lab.node_socket().display().to_string();
    let ambassador = lab.ambassadors[a].socket.display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["status", "--admin-socket", &admin],
        vec!["status", "--raw", "--admin-socket", &admin],
        vec!["lb", "list", "--admin-socket", &admin],
        vec!["catalog", "list", "--admin-socket", &admin],
        vec!["tap-service", "list", "--admin-socket", &admin],
        vec!["tap-flow", "list", "--admin-socket", &admin],
        vec!["registry", "list", "--node-socket", &node],
        vec!["stream", "watch", "--count", "1", "--socket", &ambassador],
        vec!["--help"],
    ];
    for args in commands {
        // Each prints something when someone reads it...
        let read = Command::new(tapmesh_bin()).args(&args).output().unwrap();
        assert!(read.status.success(), "{args:?}: {read:?}");
        assert!(!read.stdout.is_empty(), "{args:?} printed nothing");
        // ...and ends quietly when nobody does.
        let closed = Command::new(tapmesh_bin())
            .args(&args)
            .stdout(closed_stdout())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&closed.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(closed.status.code(), Some(0), "{args:?}: {stderr}");
    }
}
