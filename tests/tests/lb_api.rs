//! The LB admin API: every bad change is refused with a status that names the
//! problem, and the maps stay exactly as they were.

use std::process::Command;

use tapmesh::admin::proto::{
    self, admin_client::AdminClient, target::Via, ListLbRequest, LocalTarget, Name, RemoteTarget,
    TargetId,
};
use tapmesh_tests::{
    daemon::Daemon,
    kernel_tests_enabled, link,
    maps::{differences, dump_pinned, Dump},
    Netns,
};
use tonic::{transport::Channel, Code};

fn flow(name: &str, stream: &str, ports: &[&str]) -> proto::Flow {
    proto::Flow {
        name: name.into(),
        vips: vec!["vip".into()],
        stream: stream.into(),
        protocols: vec!["tcp".into()],
        destination_port_ranges: ports.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn local(stream: &str, identifier: u32, interface: &str) -> proto::Target {
    proto::Target {
        stream: stream.into(),
        identifier,
        via: Some(Via::Local(LocalTarget {
            interface: interface.into(),
            mac: "02:00:00:00:00:07".into(),
        })),
    }
}

/// Stream "s" with `max_targets` and `table_size` (0: the default size).
fn stream_s(max_targets: u32, table_size: u32) -> proto::Stream {
    proto::Stream {
        name: "s".into(),
        max_targets,
        table_size,
    }
}

/// Every pinned LB map, dumped by bpftool: what "the maps" hold.
fn dump_maps(daemon: &Daemon) -> String {
    let mut all = String::new();
    // (tm_flows, tm_maglev and tm_targets are large arrays; the entries
    // pointing into them are compared.)
    for map in [
        "tm_vip_hosts",
        "tm_vips",
        "tm_vip_configs",
        "tm_dst_ports",
        "tm_sources",
        "tm_streams",
    ] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(
                daemon
                    .bpffs_root
                    .join(format!("v{}", tapmesh_common::SCHEMA_VERSION))
                    .join(map),
            )
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool map dump {map}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all
}

async fn listing(client: &mut AdminClient<Channel>) -> proto::LbConfig {
    client
        .list_lb(ListLbRequest {})
        .await
        .expect("list")
        .into_inner()
        .config
        .expect("config")
}

#[test]
fn bad_changes_are_refused_with_a_clear_status_and_change_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("n");
    let peer = Netns::new("p");
    let (up, _) = link(&node, "198.18.0.1/24", &peer, "198.18.0.2/24");
    let (tif, _) = link(&node, "198.18.9.1/24", &peer, "198.18.9.2/24");
    let daemon = Daemon::start(
        &node.name,
        &["--uplink", &up.interface, "--node-address", "198.18.0.1"],
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = tapmesh::admin::connect(&daemon.socket)
                .await
                .expect("admin socket");
            // A good configuration first.
            c.set_vip(proto::Vip {
                name: "vip".into(),
                address: "203.0.113.30".into(),
            })
            .await
            .unwrap();
            c.set_stream(stream_s(10, 0)).await.unwrap();
            c.set_flow(flow("web", "s", &["80", "8000-8080"]))
                .await
                .unwrap();
            c.set_target(local("s", 1, &tif.interface)).await.unwrap();
            c.set_target(proto::Target {
                stream: "s".into(),
                identifier: 2,
                via: Some(Via::Remote(RemoteTarget {
                    node: "198.18.0.9".into(),
                })),
            })
            .await
            .unwrap();
            let before = listing(&mut c).await;
            let maps = dump_maps(&daemon);
            let pins = daemon
                .bpffs_root
                .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
            let every_map = dump_pinned(&pins);
            assert!(
                maps.contains("\"table_size\": 1009"),
                "the stream's Maglev table is published: {maps}"
            );
            // The local target's interface may answer from the VIP (index
            // 0); the remote target has none here.
            let sender = [node.interface_index(&tif.interface), 0u32]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect::<Vec<u8>>();
            assert_eq!(
                every_map["tm_vip_senders"],
                Dump::Entries([(sender, vec![1])].into())
            );

            type Call = std::pin::Pin<
                Box<
                    dyn std::future::Future<
                        Output = Result<tonic::Response<proto::LbReply>, tonic::Status>,
                    >,
                >,
            >;
            let cases: Vec<(&str, Code, &str, Call)> = vec![
                ("invalid prefix", Code::InvalidArgument, "300.0.0.1", {
                    let mut c = c.clone();
                    Box::pin(async move {
                        c.set_vip(proto::Vip {
                            name: "bad".into(),
                            address: "300.0.0.1/33".into(),
                        })
                        .await
                    })
                }),
                ("port range a > b", Code::InvalidArgument, "9000-80", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_flow(flow("web", "s", &["9000-80"])).await })
                }),
                ("port beyond 65535", Code::InvalidArgument, "70000", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_flow(flow("web2", "s", &["70000"])).await })
                }),
                ("unknown stream", Code::InvalidArgument, "nosuch", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_flow(flow("web3", "nosuch", &["80"])).await })
                }),
                ("identifier outside 1..N", Code::InvalidArgument, "11", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_target(local("s", 11, "lo")).await })
                }),
                ("identifier 0", Code::InvalidArgument, "identifier", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_target(local("s", 0, "lo")).await })
                }),
                ("duplicate flow name", Code::InvalidArgument, "web", {
                    let mut c = c.clone();
                    let mut config = before.clone();
                    config.flows.push(flow("web", "s", &["443"]));
                    Box::pin(async move { c.apply_lb(config).await })
                }),
                ("max_targets 0", Code::InvalidArgument, "max_targets", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_stream(stream_s(0, 0)).await })
                }),
                ("table size not prime", Code::InvalidArgument, "prime", {
                    let mut c = c.clone();
                    Box::pin(async move { c.set_stream(stream_s(10, 1010)).await })
                }),
                (
                    "a stream that flows still use",
                    Code::FailedPrecondition,
                    "stream \"s\" is in use by flow \"web\" and targets \"s/1\", \"s/2\";",
                    {
                        let mut c = c.clone();
                        Box::pin(async move { c.delete_stream(Name { name: "s".into() }).await })
                    },
                ),
                (
                    "a VIP that a flow uses",
                    Code::FailedPrecondition,
                    "VIP \"vip\" is in use by flow \"web\"",
                    {
                        let mut c = c.clone();
                        Box::pin(async move { c.delete_vip(Name { name: "vip".into() }).await })
                    },
                ),
                ("unknown VIP", Code::NotFound, "nope", {
                    let mut c = c.clone();
                    Box::pin(async move {
                        c.delete_vip(Name {
                            name: "nope".into(),
                        })
                        .await
                    })
                }),
                ("unknown target", Code::NotFound, "s/9", {
                    let mut c = c.clone();
                    Box::pin(async move {
                        c.delete_target(TargetId {
                            stream: "s".into(),
                            identifier: 9,
                        })
                        .await
                    })
                }),
                ("bad MAC", Code::InvalidArgument, "mac", {
                    let mut c = c.clone();
                    Box::pin(async move {
                        c.set_target(proto::Target {
                            stream: "s".into(),
                            identifier: 3,
                            via: Some(Via::Local(LocalTarget {
                                interface: "lo".into(),
                                mac: "01:00:5e:00:00:01".into(),
                            })),
                        })
                        .await
                    })
                }),
                (
                    "target without a way to reach it",
                    Code::InvalidArgument,
                    "local or remote",
                    {
                        let mut c = c.clone();
                        Box::pin(async move {
                            c.set_target(proto::Target {
                                stream: "s".into(),
                                identifier: 3,
                                via: None,
                            })
                            .await
                        })
                    },
                ),
            ];
            for (what, code, needle, call) in cases {
                let status = call.await.expect_err(what);
                assert_eq!(status.code(), code, "{what}: {}", status.message());
                assert!(
                    status
                        .message()
                        .to_lowercase()
                        .contains(&needle.to_lowercase()),
                    "{what}: the message should name {needle:?}: {}",
                    status.message()
                );
                assert_eq!(
                    listing(&mut c).await,
                    before,
                    "{what}: the configuration changed"
                );
                assert_eq!(dump_maps(&daemon), maps, "{what}: the maps changed");
                let diff = differences(&every_map, &dump_pinned(&pins));
                assert!(diff.is_empty(), "{what}: maps changed: {diff:?}");
            }

            // A good change still works afterwards and does change the maps.
            c.delete_target(TargetId {
                stream: "s".into(),
                identifier: 2,
            })
            .await
            .unwrap();
            assert_ne!(dump_maps(&daemon), maps);
            assert_eq!(listing(&mut c).await.targets.len(), 1);
            // Without its local target, no interface answers from the VIP.
            c.delete_target(TargetId {
                stream: "s".into(),
                identifier: 1,
            })
            .await
            .unwrap();
            assert_eq!(
                dump_pinned(&pins)["tm_vip_senders"],
                Dump::Entries(Default::default())
            );
        });
}
