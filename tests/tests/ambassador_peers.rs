//! The ambassador's socket is for its own uid and root: another local user
//! is refused, by the file's mode and by the peer's credentials
//! (SO_PEERCRED) on every call, unless listed with --allow-uid/--allow-gid.

use std::{os::unix::fs::PermissionsExt, process::Command};

use tapmesh_tests::{
    kernel_tests_enabled,
    tapa::{TapaLab, UNPRIVILEGED},
};

/// Another local user: neither the ambassador's uid (65534) nor root.
const STRANGER: u32 = 4242;

/// `tapmesh stream watch --count 1` as uid/gid `uid`: (exit code, stdout, stderr).
fn watch_as(lab: &TapaLab, socket: &std::path::Path, uid: u32) -> (i32, String, String) {
    let id = uid.to_string();
    let out = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(lab.bin())
        .args(["stream", "watch", "--count", "1", "--socket"])
        .arg(socket)
        .output()
        .expect("setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn only_its_own_uid_and_root_may_call_the_ambassador_unless_listed() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(3, "60s");
    // Default: the socket is 0600, so the stranger cannot even connect; its
    // own uid and root are served.
    let a = lab.start_ambassador(0, "30s");
    let socket = lab.ambassadors[a].socket.clone();
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (code, stdout, stderr) = watch_as(&lab, &socket, STRANGER);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(
        watch_as(&lab, &socket, UNPRIVILEGED).1,
        "(no streams)\n--\n"
    );
    assert_eq!(watch_as(&lab, &socket, 0).1, "(no streams)\n--\n");

    // Another gid listed: the file is open, the peer check refuses the stranger.
    let b = lab.start_ambassador_with(1, "30s", &[("TAPMESH_AMBASSADOR_ALLOW_GIDS", "4343")]);
    let socket = lab.ambassadors[b].socket.clone();
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666);
    let (code, _, stderr) = watch_as(&lab, &socket, STRANGER);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "tapmesh: uid {STRANGER} (gid {STRANGER}) may not use this ambassador: only uid {UNPRIVILEGED} and root may, or those given with --allow-uid/--allow-gid (ambassador at {})\n",
            socket.display()
        )
    );
    assert_eq!(watch_as(&lab, &socket, 4343).1, "(no streams)\n--\n");
    assert_eq!(watch_as(&lab, &socket, 0).1, "(no streams)\n--\n");

    // The stranger's uid listed: served.
    let c = lab.start_ambassador_with(
        2,
        "30s",
        &[("TAPMESH_AMBASSADOR_ALLOW_UIDS", &STRANGER.to_string())],
    );
    let socket = lab.ambassadors[c].socket.clone();
    assert_eq!(
        watch_as(&lab, &socket, STRANGER),
        (0, "(no streams)\n--\n".into(), String::new())
    );
}
