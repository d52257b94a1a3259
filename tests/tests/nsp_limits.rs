//! Per-caller limits of the node socket (`[nsp.limits]`): one user cannot
//! take every conduit, register a target with megabytes of context or
//! thousands of IPs, or send oversized messages. A denial names the limit.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tapmesh::proto::nsp::{target, target_registry_client::TargetRegistryClient, Target};
use tapmesh_tests::{
    kernel_tests_enabled,
    tapa::{stream, TapaLab, OPEN_WITHIN, UNPRIVILEGED},
};

fn target_with(ips: Vec<String>, context: Vec<(String, String)>) -> Target {
    Target {
        ips,
        context: context.into_iter().collect(),
        status: target::Status::Disabled as i32,
        r#type: target::Type::Default as i32,
        stream: Some(tapmesh::proto::nsp::Stream {
            name: "stream-a".into(),
            conduit: Some(tapmesh::proto::nsp::Conduit {
                name: "conduit-a".into(),
                trench: Some(tapmesh::proto::nsp::Trench {
                    name: "trench-a".into(),
                }),
                destination_port_nats: vec![],
            }),
            max_targets: 0,
        }),
    }
}

/// Registers `t` on the node socket from application namespace `app`.
fn register_from(lab: &TapaLab, app: usize, t: Target) -> tonic::Status {
    let socket = lab.node_socket();
    tapmesh_tests::net::run_in(&lab.apps[app].name, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut client = TargetRegistryClient::new(tapmesh::uds::lazy_channel(&socket));
                client.register(t).await.expect_err("refused")
            })
    })
}

#[test]
fn a_caller_past_a_limit_is_refused_with_its_name_and_value() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new_with(3, "60s", "[nsp.limits]\nconduits_per_uid = 2\n");
    let ips = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("198.19.{}.{}/32", i / 250, i % 250 + 1))
            .collect()
    };
    // IPs per target (default 8): 150 000 was enough to break `registry list`.
    let e = register_from(&lab, 0, target_with(ips(9), vec![]));
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::ResourceExhausted,
            "limit nsp.limits.ips_per_target = 8 reached: the target has 9 ips"
        )
    );
    // Context bytes (default 4096).
    let big = vec![
        ("identifier".into(), "1".into()),
        ("k".into(), "v".repeat(4090)),
    ];
    let e = register_from(&lab, 0, target_with(ips(1), big));
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::ResourceExhausted,
            "limit nsp.limits.context_bytes = 4096 reached: the target's context has 4102 bytes"
        )
    );
    // Message size (default 64 KiB): refused by the decoder before any work.
    let huge = vec![("k".into(), "v".repeat(100_000))];
    let e = register_from(&lab, 0, target_with(ips(1), huge));
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("the limit is: 65536 bytes"), "{e}");
    assert_eq!(
        lab.registry_list().lines().count(),
        1,
        "{}",
        lab.registry_list()
    );

    // Conduits per uid (2 here): the third application of uid 65534 gets
    // none, and its ambassador says which limit.
    for app in 0..2 {
        lab.open_stream_a(app, "30s");
    }
    let a = lab.start_ambassador(2, "30s");
    let mut tap = tapmesh_tests::tapa::TapCaller::new(&lab.ambassadors[a].socket);
    tap.open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    let said = tapmesh_tests::net::wait_until(OPEN_WITHIN, || {
        lab.ambassadors[a].log_text().contains(&format!(
            "limit nsp.limits.conduits_per_uid = 2 reached: uid {UNPRIVILEGED} has 2 conduits"
        ))
    });
    assert!(said, "{}", lab.ambassadors[a].log_text());
    assert!(!tap.wait_status(
        "stream-a",
        tapmesh::proto::ambassador::stream_status::Status::Open,
        std::time::Duration::from_secs(3)
    ));
    let links = lab.node.ip(&["-o", "link", "show"]);
    let conduits = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter(|l| l.contains(": tmc"))
        .count();
    assert_eq!(conduits, 2);
}

/// `n` connections to `socket` made as `uid` (the ambassadors' uid is not
/// used, so their connections do not count here).
fn connect_as(uid: u32, socket: &Path, n: usize) -> Vec<UnixStream> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: the raw syscall changes this thread's ids only (glibc's
        // wrapper would change every thread's); the thread ends here.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
        (0..n)
            .map(|_| UnixStream::connect(&socket).expect("connecting"))
            .collect()
    })
    .join()
    .expect("connecting thread")
}

/// How the server answers on `conn` after the client preface and SETTINGS:
/// served (its SETTINGS, then nothing that ends the connection within
/// 500 ms), or refused with the GOAWAY's debug text (empty if it closed
/// without one).
fn answer(conn: &mut UnixStream) -> Result<(), String> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    // A refused connection may be closed before this write: what the
    // server sent can still be read.
    let _ = conn.write_all(&[PREFACE, &EMPTY_SETTINGS].concat());
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut frames = 0;
    loop {
        let mut header = [0u8; 9];
        match conn.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && frames > 0 => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(String::new()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(String::new()),
            Err(e) => panic!("no answer and no close within 5 s: {e}"),
        }
        if frames == 0 {
            assert_eq!(header[3], 4, "the server's first frame is not SETTINGS");
        }
        frames += 1;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).expect("a whole frame");
        if header[3] == 7 {
            // GOAWAY: last stream id, error code (ENHANCE_YOUR_CALM), debug data.
            assert_eq!(&body[4..8], &[0, 0, 0, 0xb], "{body:?}");
            return Err(String::from_utf8_lossy(&body[8..]).into_owned());
        }
        // Served: the rest comes as calls need it.
        conn.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
    }
}

fn served(conn: &mut UnixStream) -> bool {
    answer(conn).is_ok()
}

/// Open connections per uid (idle ones included): one past the limit is
/// told why (HTTP/2 GOAWAY) and closed at once, and the log names the limit; closing one makes room;
/// root is not counted.
#[test]
fn connections_past_the_limit_of_a_uid_are_closed() {
    if !kernel_tests_enabled() {
        return;
    }
    const UID: u32 = 65533;
    let lab = TapaLab::new_with(0, "60s", "[nsp.limits]\nconnections_per_uid = 2\n");
    let socket = lab.node_socket();
    let mut held = connect_as(UID, &socket, 3);
    let answers: Vec<Result<(), String>> = held.iter_mut().map(answer).collect();
    // The refused one is told why, in the GOAWAY that gRPC clients report.
    let why =
        format!("limit nsp.limits.connections_per_uid = 2 reached: uid {UID} has 2 connections");
    assert_eq!(answers, [Ok(()), Ok(()), Err(why)]);
    let said = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        lab.daemon().log_text().contains(&format!(
            "limit nsp.limits.connections_per_uid = 2 reached: uid {UID} has 2 connections; closed a new one"
        ))
    });
    assert!(said, "{}", lab.daemon().log_text());
    // The two served ones stay open while idle; the third is gone.
    held.truncate(2);
    assert!(!served(&mut connect_as(UID, &socket, 1).remove(0)));
    // Closing one makes room for exactly one more.
    held.pop();
    let room = tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        served(&mut connect_as(UID, &socket, 1).remove(0))
    });
    assert!(room, "no room after a connection closed");
    // Root is not counted.
    let mut root: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    assert!(root.iter_mut().all(served));
}
