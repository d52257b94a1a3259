//! gRPC behaviour clients act on (issue 20): a malformed protobuf request
//! is the caller's mistake (INVALID_ARGUMENT, not INTERNAL) on every unix
//! socket (admin API, node socket, ambassador), sent as raw bytes by grpcio;
//! and a stream opened on a conduit already connected goes to PENDING and
//! OPEN without a moment of UNAVAILABLE.

use tapmesh::proto::ambassador::{
    stream_status::Status as StreamStatus, tap_client::TapClient, Stream,
};
use tapmesh_tests::{
    kernel_tests_enabled,
    tapa::{status_of, stream, TapaLab, OPEN_WITHIN},
};

/// Calls `method` on `socket` with the raw `payload` (hex); prints the code.
const RAW_CLIENT: &str = r#"
import sys
import grpc

socket, method, payload = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
channel = grpc.insecure_channel("unix:" + socket)
try:
    channel.unary_unary(method)(payload, timeout=10)
    print("OK")
except grpc.RpcError as e:
    print(e.code().name, e.details())
"#;

#[test]
fn a_malformed_request_is_invalid_argument_on_every_socket() {
    if !kernel_tests_enabled() {
        return;
    }
    let python = tapmesh_tests::python::python();
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let dir = lab.dir.0.join("python-raw");
    std::fs::create_dir_all(&dir).unwrap();
    let admin = lab.daemon().socket.display().to_string();
    let node = lab.node_socket().display().to_string();
    let ambassador = lab.ambassadors[a].socket.display().to_string();
    let call = |socket: &str, method: &str, payload: &str| {
        tapmesh_tests::python::script(&python, &dir, RAW_CLIENT, &[socket, method, payload])
    };
    // Field 1, length-delimited, its length varint cut short.
    let malformed = "0aff";
    for (socket, method) in [
        (&admin, "/tapmesh.admin.v1.Admin/Status"),
        (&admin, "/tapmesh.admin.v1.Admin/SetVip"),
        (&node, "/nsp.v1.TargetRegistry/Register"),
        (&ambassador, "/ambassador.v1.Tap/Open"),
    ] {
        let answer = call(socket, method, malformed);
        assert!(
            answer.starts_with("INVALID_ARGUMENT malformed protobuf message"),
            "{method}: {answer}"
        );
    }
    // The same call well formed (an empty message) is answered.
    assert_eq!(
        call(&admin, "/tapmesh.admin.v1.Admin/Status", "").trim(),
        "OK"
    );
}

#[test]
fn a_new_stream_on_a_connected_conduit_is_never_unavailable() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let (a, _tap) = lab.open_stream_a(0, "30s");
    let socket = lab.ambassadors[a].socket.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen: Vec<Vec<StreamStatus>> = runtime.block_on(async move {
        let mut client = TapClient::new(tapmesh::uds::lazy_channel(&socket));
        let b: Stream = stream("stream-b", "conduit-a", "trench-a");
        let mut rounds = Vec::new();
        for _ in 0..10 {
            let mut updates = client
                .watch(Stream::default())
                .await
                .expect("watch")
                .into_inner();
            updates.message().await.expect("snapshot");
            client.open(b.clone()).await.expect("open");
            let mut states = Vec::new();
            let within = tokio::time::timeout(OPEN_WITHIN, async {
                while let Ok(Some(m)) = updates.message().await {
                    if let Some(s) = status_of(&m, "stream-b") {
                        states.push(s);
                        if s == StreamStatus::Open {
                            break;
                        }
                    }
                }
            })
            .await;
            assert!(within.is_ok(), "stream-b not OPEN: {states:?}");
            client.close(b.clone()).await.expect("close");
            rounds.push(states);
        }
        rounds
    });
    for states in &seen {
        assert_eq!(states.last(), Some(&StreamStatus::Open));
        assert!(
            !states.contains(&StreamStatus::Unavailable),
            "stream-b reported UNAVAILABLE on a connected conduit: {seen:?}"
        );
    }
}
