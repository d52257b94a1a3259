//! Each VIP address belongs to one source (LB file or admin API, Meridio,
//! EDS). Issue 20: the README's LB file and Meridio example share
//! 203.0.113.10; the Meridio VIP silently won and the file's targets got
//! nothing. Two VIPs with one address in one file were accepted, and
//! `lb delete` did not take the names `lb list` shows.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    daemon::tapmesh_bin,
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{flow, lb_toml, stream, vip, LbLab},
    unique, TempDir,
};

const SHARED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Meridio's example: VIP "vip1" of trench-a on 203.0.113.10.
const MERIDIO: &str = r#"
[[trenches]]
name = "trench-a"
[[conduits]]
name = "load-balancer"
[[streams]]
name = "stream-a"
conduit = "load-balancer"
max_targets = 100
[[vips]]
name = "vip1"
address = "203.0.113.10/32"
[[flows]]
name = "web"
stream = "stream-a"
vips = ["vip1"]
protocols = ["tcp"]
destination_port_ranges = ["80", "443"]
priority = 1
"#;

/// An LB configuration with VIP `name` on `address` and target 1 of the lab.
fn lb_spec(lab: &LbLab, name: &str, address: &str) -> LbSpec {
    LbSpec {
        vips: vec![vip(name, address)],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &[name], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    }
}

/// `tapmesh <args>` against the lab's daemon: (exit code, stdout, stderr).
fn cli(lab: &LbLab, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tapmesh_bin())
        .args(args)
        .arg("--admin-socket")
        .arg(&lab.daemon().socket)
        .output()
        .expect("running tapmesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_names(text: &str, needles: &[&str]) {
    // A tonic status shows its message with quotes escaped.
    let text = text.replace("\\\"", "\"");
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} is named in: {text}");
    }
}

#[test]
fn a_vip_address_belongs_to_one_source() {
    if !kernel_tests_enabled() {
        return;
    }
    let dir = TempDir::new("owners");
    let meridio = dir.0.join("meridio.toml");
    std::fs::write(&meridio, MERIDIO).unwrap();
    let mut lab = LbLab::new(1, &[SHARED]);
    let good = lb_spec(&lab, "other", "198.51.100.10");
    lab.start_with(
        Some(&good),
        &["--nsp-config".into(), meridio.display().to_string()],
    );
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let maps = dump_pinned(&pins);
    let before = lab.list().config;

    // The LB file's VIP on the Meridio VIP's address: refused, naming both.
    let clash = lb_spec(&lab, "vip1", "203.0.113.10");
    let message = lab.apply(&clash).expect_err("the address is Meridio's");
    assert_names(
        &message,
        &[
            "vip1.trench-a",
            "\"vip1\"",
            "the Meridio configuration (nsp)",
            "the LB file or admin API (lb)",
        ],
    );
    let diff = differences(&maps, &dump_pinned(&pins));
    assert!(diff.is_empty(), "maps changed: {diff:?}");
    assert_eq!(lab.list().config, before, "the configuration changed");

    // Two VIPs with one address in one file: refused before it is sent,
    // and by the daemon.
    let mut twice = good.clone();
    twice.vips.push(vip("again", "198.51.100.10/32"));
    twice.flows[0].vips.push("again".into());
    let file = dir.0.join("twice.toml");
    std::fs::write(&file, lb_toml(&twice)).unwrap();
    let (code, _, err) = cli(&lab, &["lb", "apply", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_names(&err, &["\"other\"", "\"again\"", "198.51.100.10/32"]);
    let (code, out, _) = cli(&lab, &["config", "check", file.to_str().unwrap()]);
    assert_eq!(code, 2, "config check: {out}");
    let message = lab.apply(&twice).expect_err("two VIPs, one address");
    assert_names(&message, &["\"other\"", "\"again\""]);
    assert!(differences(&maps, &dump_pinned(&pins)).is_empty());

    // `lb delete` takes the names `lb list` shows.
    let (_, listed, _) = cli(&lab, &["lb", "list"]);
    let target = listed
        .lines()
        .find_map(|l| l.strip_prefix("target "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a target in lb list")
        .to_string();
    assert_eq!(target, "s/1");
    let (code, _, err) = cli(&lab, &["lb", "delete", "target", &target]);
    assert_eq!(code, 0, "lb delete target {target}: {err}");
    assert!(lab.list().config.unwrap().targets.is_empty());
    assert!(cli(&lab, &["lb", "list"]).1.contains("vip vip1.trench-a"));
    let (code, _, err) = cli(&lab, &["lb", "delete", "vip", "vip1.trench-a"]);
    assert_ne!(code, 0);
    assert_names(&err, &["vip1.trench-a", "the Meridio configuration (nsp)"]);
}

/// The README's two examples as they were (one VIP address in both) in one
/// daemon: it does not start, and says why.
#[test]
fn the_readme_examples_together_are_refused_at_start() {
    if !kernel_tests_enabled() {
        return;
    }
    let dir = TempDir::new("owners");
    let meridio = dir.0.join("meridio.toml");
    std::fs::write(&meridio, MERIDIO).unwrap();
    let lab = LbLab::new(1, &[SHARED]);
    let spec = lb_spec(&lab, "vip1", "203.0.113.10");
    let file = dir.0.join("lb.toml");
    std::fs::write(&file, lb_toml(&spec)).unwrap();
    let id = unique("o");
    let bpffs = format!("/sys/fs/bpf/tapmesh-test-{id}");
    let socket = dir.0.join("admin.sock");
    let child = Command::new(tapmesh_bin())
        .args(["daemon", "--netns", &lab.node.name, "--bpffs-root", &bpffs])
        .args(["--uplink", &lab.uplink, "--xdp-mode", "native"])
        .arg("--admin-socket")
        .arg(&socket)
        .arg("--node-socket")
        .arg(dir.0.join("node.sock"))
        .arg("--state-dir")
        .arg(dir.0.join("state"))
        .arg("--lb-config")
        .arg(&file)
        .arg("--nsp-config")
        .arg(&meridio)
        .env_remove("TAPMESH_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the daemon");
    // The refusal comes after the programs are verified: a whole start.
    let deadline = Instant::now() + Duration::from_secs(90);
    let pid = child.id() as i32;
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !waiter.is_finished() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let out = waiter.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(Path::new(&bpffs));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon ran: {err}");
    assert_names(
        &err,
        &[
            "vip1.trench-a",
            "\"vip1\"",
            "the Meridio configuration (nsp)",
            "the LB file or admin API (lb)",
        ],
    );
}
