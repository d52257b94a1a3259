//! Per-caller limits of the node socket (`[nsp.limits]`): one user cannot
//! take every conduit, register a target with megabytes of context or
//! thousands of IPs, or send oversized messages. A denial names the limit.

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
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
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
