//! `cargo xtask demo`: a two-node lab of namespaces with the daemon on node 1,
//! real traffic from node 2 to a pod behind node 1, and the counters.
//!
//! ```text
//!  node2 ──(uplink veth)── node1 ──(pod veth)── pod
//!  198.18.0.2          198.18.0.1 | 198.18.1.1   198.18.1.2
//!                      XDP uplink   TC ingress/egress
//! ```

use std::process::Command;

use tapmesh_tests::{
    daemon::{named, packets, tapmesh_bin, Daemon},
    frames::{ethernet, ipv4, udp_v4, UDP},
    link, send_frames, Netns,
};

fn main() -> std::process::ExitCode {
    // Namespaces and the daemon are dropped (cleaned up) before the exit code is returned.
    if run() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("demo: something did not work as expected");
        std::process::ExitCode::FAILURE
    }
}

fn run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo builds network namespaces: run it as root");
        return false;
    }
    let node1 = Netns::new("node1");
    let node2 = Netns::new("node2");
    let pod = Netns::new("pod");
    let (uplink, remote) = link(&node1, "198.18.0.1/24", &node2, "198.18.0.2/24");
    let (pod_host, pod_if) = link(&node1, "198.18.1.1/24", &pod, "198.18.1.2/24");
    node1.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node2.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.0.1"]);
    pod.ip(&["route", "add", "default", "via", "198.18.1.1"]);

    println!("lab: node2 ({}) ── node1 ({} | {}) ── pod ({})", remote.ipv4, uplink.ipv4, pod_host.ipv4, pod_if.ipv4);
    println!("starting tapmesh on node1: XDP on {}, TC on {}", uplink.interface, pod_host.interface);
    let mut daemon = Daemon::start(&node1.name, &["--uplink", &uplink.interface, "--tc-interface", &pod_host.interface]);

    let ping = node2.try_exec(&["ping", "-c", "10", "-i", "0.05", "-W", "2", "-q", "198.18.1.2"]);
    let ping_text = String::from_utf8_lossy(&ping.stdout);
    let summary = ping_text.lines().find(|l| l.contains("transmitted")).unwrap_or("ping printed nothing");
    println!("node2 → pod ping: {summary}");

    // Three frames with a broken IPv4 header from node2: dropped in XDP, counted by reason.
    let (a, b) = ("198.18.0.2".parse().unwrap(), "198.18.1.2".parse().unwrap());
    let mut bad = ethernet(node1.mac(&uplink.interface), node2.mac(&remote.interface), &[], 0x0800, &ipv4(a, b, UDP, &[], &udp_v4(a, b, 1, 2, b"x")));
    bad[14] = 0x42;
    send_frames(&node2.name, &remote.interface, &[bad.clone(), bad.clone(), bad]);

    println!("\n$ tapmesh status");
    let status = Command::new(tapmesh_bin())
        .args(["status", "--admin-socket"])
        .arg(&daemon.socket)
        .output()
        .expect("tapmesh status");
    print!("{}", String::from_utf8_lossy(&status.stdout));

    let s = daemon.status();
    println!(
        "\nsummary: uplink XDP passed {} and dropped {} ({} with a bad IPv4 header length); \
         the pod's veth carried {} packets to the pod and {} from it",
        packets(&s, "xdp_uplink", "pass"),
        packets(&s, "xdp_uplink", "drop"),
        named(&s, "xdp_uplink", "bad_ipv4_header_length"),
        packets(&s, "tc_egress", "pass"),
        packets(&s, "tc_ingress", "pass"),
    );
    let ok = ping.status.success() && named(&s, "xdp_uplink", "bad_ipv4_header_length") == 3;
    let exit = daemon.stop();
    let attached = String::from_utf8_lossy(&node1.ip(&["link", "show", &uplink.interface]).stdout).contains("prog/xdp");
    println!("daemon stopped ({exit}); XDP still attached: {attached}");
    ok && !attached && exit.success()
}
