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
    assert!(tap.wait_status("stream-a", S::Open, std::time::Duration::from_secs(30)));
    let admin = lab.daemon().socket.display().to_string();
    let node = lab.node_socket().display().to_string();
    let ambassador = lab.ambassadors[a].socket.display().to_string();
    let root = lab.daemon().bpffs_root.display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["bpf", "lb", "list", "--bpffs-root", &root],
        vec!["bpf", "overlay", "list", "--bpffs-root", &root],
        vec!["bpf", "mirror", "list", "--bpffs-root", &root],
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

/// `tapmesh <args>`: its standard output, after asserting it succeeded.
fn run(args: &[&str]) -> String {
    let out = Command::new(tapmesh_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The same command as text and as `-o json`: the JSON parses.
fn both(args: &[&str]) -> (String, serde_json::Value) {
    let text = run(args);
    assert_eq!(run(&[args, &["-o", "text"]].concat()), text, "{args:?}");
    let json = run(&[args, &["-o", "json"]].concat());
    let value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{args:?}: {e}: {json}"));
    (text, value)
}

fn str_of<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn json_output_carries_what_the_text_shows() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let mut tap = TapCaller::new(&lab.ambassadors[a].socket);
    tap.open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    assert!(tap.wait_status("stream-a", S::Open, std::time::Duration::from_secs(30)));
    let admin = lab.daemon().socket.display().to_string();
    let node = lab.node_socket().display().to_string();
    let admin_args = |args: &[&'static str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--admin-socket".to_string(), admin.clone()]);
        v
    };
    let call = |v: &[String]| both(&v.iter().map(String::as_str).collect::<Vec<_>>());
    // Loopback is no destination: its copies would be the node's own input.
    let lo = admin_args(&["tap-service", "create", "ts0", "--interface", "lo"]);
    let out = Command::new(tapmesh_bin()).args(&lo).output().unwrap();
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()),
        (
            Some(2),
            "tapmesh: tap service \"ts0\": \"lo\" is the loopback device: copies sent into it would be received by this node's own stack; choose another interface\n".to_string()
        )
    );
    lab.node.ip(&[
        "link", "add", "climir0", "type", "veth", "peer", "name", "climir1",
    ]);
    run(
        &admin_args(&["tap-service", "create", "ts1", "--interface", "climir0"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    // The uplink's traffic, direction in lower case.
    let uplink = lab.uplink.clone();
    let mut flow = admin_args(&["tap-flow", "create", "tf1", "--tap-service", "ts1"]);
    flow.extend([
        "--source".into(),
        uplink,
        "--direction".into(),
        "both".into(),
    ]);
    run(&flow.iter().map(String::as_str).collect::<Vec<_>>());

    let (text, json) = call(&admin_args(&["status"]));
    assert_eq!(
        text.lines().next().unwrap(),
        format!("tapmesh {}", str_of(&json, "version"))
    );
    let plugins = json["plugins"].as_array().unwrap();
    assert!(plugins.len() >= 5, "{json}");
    for p in plugins {
        let line = format!(
            "  {:<12} {:<10} {}",
            str_of(p, "name"),
            str_of(p, "state"),
            str_of(p, "detail")
        );
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
    let planes = json["control_planes"].as_array().unwrap();
    let nsp = planes
        .iter()
        .find(|p| p["name"] == "nsp")
        .expect("nsp plane");
    assert_eq!(nsp["synced"], true, "{json}");
    let line = format!("  {:<12} {:<10} {}", "nsp", "synced", str_of(nsp, "detail"));
    assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");

    let (text, json) = call(&admin_args(&["lb", "list"]));
    let vips = json["config"]["vips"].as_array().unwrap();
    assert!(!vips.is_empty(), "{json}");
    for v in vips {
        let line = format!("vip {} {}", str_of(v, "name"), str_of(v, "address"));
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }

    let (text, json) = call(&admin_args(&["catalog", "list"]));
    let services = json["services"].as_array().unwrap();
    assert!(!services.is_empty(), "{json}");
    for s in services {
        let line = format!(
            "{} (from {}) vip {}",
            str_of(s, "name"),
            str_of(s, "source"),
            str_of(s, "vip")
        );
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }

    let (text, json) = call(&admin_args(&["tap-service", "list"]));
    let services = json.as_array().unwrap();
    assert_eq!(services.len(), 1, "{json}");
    assert_eq!(services[0]["destination"]["Interface"], "climir0", "{json}");
    let line = format!(
        "{:<20} {:<7} interface climir0",
        "ts1",
        str_of(&services[0], "status")
    );
    assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");

    let (text, json) = call(&admin_args(&["tap-flow", "list"]));
    let flows = json.as_array().unwrap();
    assert_eq!(flows.len(), 1, "{json}");
    assert_eq!(flows[0]["direction"], "BOTH", "{json}");
    let row = text.lines().nth(1).unwrap();
    for key in ["id", "tap_service", "source", "direction", "status"] {
        assert!(row.contains(str_of(&flows[0], key)), "{key} not in {row}");
    }

    let (text, json) = both(&["registry", "list", "--node-socket", &node]);
    let targets = json["targets"].as_array().unwrap();
    assert_eq!(targets.len(), text.lines().count() - 1, "{json}\n{text}");
    for (t, row) in targets.iter().zip(text.lines().skip(1)) {
        assert!(row.contains(str_of(t, "status")), "{row}");
        assert!(row.contains(str_of(t, "type")), "{row}");
        assert!(row.contains(str_of(&t["context"], "identifier")), "{row}");
        for ip in t["ips"].as_array().unwrap() {
            assert!(row.contains(ip.as_str().unwrap()), "{row}");
        }
    }
}

#[test]
fn version_names_the_commit() {
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let commit = String::from_utf8(git.stdout).unwrap();
    // A build from the same tree; a commit since then would make it stale.
    let version = run(&["--version"]);
    assert!(version.starts_with(&format!("tapmesh {} (commit ", env!("CARGO_PKG_VERSION"))));
    let built = version
        .trim_end()
        .rsplit_once("(commit ")
        .unwrap()
        .1
        .trim_end_matches(')');
    assert_eq!(built.len(), 12, "{version}");
    assert!(
        Command::new("git")
            .args(["cat-file", "-e", &format!("{built}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap()
            .success(),
        "{version} (HEAD is {commit})"
    );
}

#[test]
fn help_completions_and_man_page() {
    let help = run(&["--help"]);
    assert!(help.contains("\nExamples:\n  tapmesh daemon --uplink eth0 --tc-interface veth1234\n"));
    assert!(help.contains("  -o, --output <OUTPUT>\n"), "{help}");
    assert!(help.contains("[default: text]"), "{help}");
    let lb = run(&["lb", "--help"]);
    assert!(
        lb.contains("\nExamples:\n  tapmesh lb apply lb.toml\n"),
        "{lb}"
    );
    assert!(lb.contains("[default: /run/tapmesh/admin.sock]"), "{lb}");
    let ambassador = run(&["ambassador", "--help"]);
    assert!(ambassador.contains("[default: INFO]"), "{ambassador}");

    let bash = run(&["completions", "bash"]);
    assert!(bash.starts_with("_tapmesh() {\n"), "{bash}");
    assert!(bash.contains("complete -F _tapmesh"), "{bash}");
    assert_eq!(run(&["completions", "BASH"]), bash);
    assert!(run(&["completions", "zsh"]).starts_with("#compdef tapmesh\n"));
    let man = run(&["man"]);
    let th = man.lines().find(|l| l.starts_with(".TH")).unwrap();
    assert_eq!(
        th,
        format!(
            ".TH tapmesh 1  \"tapmesh {}\" ",
            run(&["--version"])
                .trim_start_matches("tapmesh ")
                .trim_end()
        )
    );
    assert!(man.contains("tap\\-flow"), "{man}");
    // A page per command: the daemon's options, a subcommand's synopsis.
    let dir = tapmesh_tests::TempDir::new("tmman");
    run(&["man", "--dir", dir.0.to_str().unwrap()]);
    let page = |name: &str| std::fs::read_to_string(dir.0.join(name)).unwrap_or_default();
    assert!(page("tapmesh.1").contains(th), "{}", page("tapmesh.1"));
    assert!(page("tapmesh-daemon.1").contains("\\-\\-uplink"));
    assert!(
        page("tapmesh-tap-flow-create.1").contains(&format!(
            ".TH tapmesh-tap-flow-create 1  \"create {}\"",
            run(&["--version"])
                .trim_start_matches("tapmesh ")
                .trim_end()
        )),
        "{}",
        page("tapmesh-tap-flow-create.1")
    );
    assert!(page("tapmesh-config-check.1").contains("\\fBtapmesh config check\\fR"));

    // An enum value in any case; a wrong one is a usage error (exit 2).
    let out = Command::new(tapmesh_bin())
        .args([
            "tap-flow",
            "create",
            "f",
            "--tap-service",
            "s",
            "--source",
            "x",
            "--direction",
            "sideways",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: invalid value 'sideways' for '--direction <DIRECTION>'\n  [possible values: IN, OUT, BOTH]\n"),
        "{stderr}"
    );
}

/// `tapmesh daemon --help` names the value each option has when neither
/// the flag, its variable nor the configuration file sets it.
#[test]
fn daemon_help_shows_the_defaults() {
    let help = run(&["daemon", "--help"]);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for shown in [
        "Admin API socket [default: /run/tapmesh/admin.sock]",
        "Log filter (error, warn, info, debug, trace or a tracing directive) [default: info]",
        "Log format [default: text]",
        "bpffs directory for pins (a schema subdirectory is added) [default: /sys/fs/bpf/tapmesh]",
        "XDP attach mode [default: auto]",
        "UDP port of the node-to-node tunnel [default: 50103]",
        "Node API socket (target registry, configuration manager, conduits) [default: /run/tapmesh/node.sock]",
        "Registry keep-alive expiry, e.g. \"60s\" [default: 60s]",
        "Directory for state kept across restarts (every plugin's) [default: /var/lib/tapmesh]",
        "overrides the file) [default: false]",
        "Address of the health and metrics listener (\"\" = off) [default: 127.0.0.1:9842]",
    ] {
        assert!(flat.contains(shown), "{shown:?} not in: {help}");
    }
}

const LB_FILE: &str = r#"
[[streams]]
name = "s"
max_targets = 2

[[vips]]
name = "v"
address = "20.0.0.1"

[[flows]]
name = "f"
vips = ["v"]
stream = "s"
priority = 1
protocols = ["tcp"]

[[targets]]
stream = "s"
identifier = 1
via = { remote = { node = "198.18.2.2" } }
"#;

#[test]
fn config_check_validates_offline() {
    let dir = tapmesh_tests::TempDir::new("tmcheck");
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let daemon = write(
        "daemon.toml",
        "[daemon]\nlog_level = \"info\"\nlog_format = \"json\"\n",
    );
    let lb = write("lb.toml", LB_FILE);
    let meridio = write("nsp.toml", tapmesh_tests::tapa::NSP_CONFIG);
    let check = |files: &[&str]| {
        let out = Command::new(tapmesh_bin())
            .args([&["config", "check"], files].concat())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    assert_eq!(
        check(&[&daemon, &lb, &meridio]),
        (
            Some(0),
            format!("{daemon}: ok (daemon)\n{lb}: ok (lb)\n{meridio}: ok (meridio)\n"),
            String::new()
        )
    );

    let bad_mode = write("mode.toml", "[dataplane]\nxdp_mode = \"turbo\"\n");
    let bad_uplink = write("uplink.toml", "[dataplane]\nuplinks = [\"nope0\"]\n");
    let bad_format = write("format.toml", "[daemon]\nlog_format = \"xml\"\n");
    let bad_lb = write(
        "badlb.toml",
        &LB_FILE.replace(
            "stream = \"s\"\nidentifier = 1",
            "stream = \"s\"\nidentifier = 3",
        ),
    );
    let bad_meridio = write(
        "badnsp.toml",
        &tapmesh_tests::tapa::NSP_CONFIG.replace(
            "conduit = \"conduit-a\"\nmax_targets = 1",
            "conduit = \"conduit-x\"\nmax_targets = 1",
        ),
    );
    // A daemon file is checked with the files it names, as the daemon reads them.
    let names_bad_lb = write(
        "nameslb.toml",
        &format!("[lb]\nconfig_file = \"{bad_lb}\"\n"),
    );
    let names_good = write(
        "names.toml",
        &format!("[lb]\nconfig_file = \"{lb}\"\n[nsp]\nconfig_file = \"{meridio}\"\n"),
    );
    let (code, stdout, stderr) = check(&[
        &bad_mode,
        &bad_uplink,
        &bad_format,
        &daemon,
        &bad_lb,
        &bad_meridio,
        &names_bad_lb,
        &names_good,
    ]);
    assert_eq!(code, Some(2));
    assert_eq!(
        stdout,
        format!("{daemon}: ok (daemon)\n{names_good}: ok (daemon)\n")
    );
    assert_eq!(
        stderr,
        format!(
            "tapmesh: config file {bad_mode}: line 2: unknown variant `turbo`, expected one of `auto`, `native`, `generic`\n\
             tapmesh: config file {bad_uplink}: dataplane.uplinks: interface \"nope0\" does not exist\n\
             tapmesh: config file {bad_format}: line 2: unknown variant `xml`, expected `text` or `json`\n\
             tapmesh: LB config file {bad_lb}: target 3 of stream \"s\": identifier out of range; use 1..=2 (the stream's max_targets)\n\
             tapmesh: {bad_meridio}: stream \"stream-b\": conduit \"conduit-x\" is not defined in trench \"trench-a\"\n\
             tapmesh: config file {names_bad_lb}: lb.config_file: LB config file {bad_lb}: target 3 of stream \"s\": identifier out of range; use 1..=2 (the stream's max_targets)\n"
        )
    );

    // Node addresses inside a VIP: a remote target's (the LB file alone),
    // a named tunnel peer (the daemon file with the LB file it names).
    let node_in_vip = write(
        "nodevip.toml",
        &LB_FILE.replace("address = \"20.0.0.1\"", "address = \"198.18.2.0/24\""),
    );
    let peer_in_vip = write(
        "peervip.toml",
        &format!("[lb]\ntunnel_peers = [\"20.0.0.1\"]\nconfig_file = \"{lb}\"\n"),
    );
    let (code, stdout, stderr) = check(&[&node_in_vip, &peer_in_vip]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert_eq!(
        stderr,
        format!(
            "tapmesh: LB config file {node_in_vip}: target 1 of stream \"s\": its node 198.18.2.2 is inside VIP \"v\"; a node's address is no VIP (the tunnel would trust whoever sends from the VIP's address), name the node by its own address\n\
             tapmesh: config file {peer_in_vip}: lb.config_file: LB config file {lb}: tunnel peer 20.0.0.1 (lb.tunnel_peers) is inside VIP \"v\"; a node's address is no VIP (the tunnel would trust whoever sends from the VIP's address)\n"
        )
    );

    // An xDS server with nothing to subscribe to would be a wildcard.
    let no_clusters = write(
        "noclusters.toml",
        "[xds]\nserver = \"http://127.0.0.1:18000\"\n",
    );
    let no_server = write(
        "noserver.toml",
        "[[xds.clusters]]\nname = \"svc\"\nvip = \"203.0.113.9\"\n",
    );
    let (code, stdout, stderr) = check(&[&no_clusters, &no_server]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert_eq!(
        stderr,
        format!(
            "tapmesh: config file {no_clusters}: xds.clusters: none is set, but xds.server is: add a [[xds.clusters]] (name and vip or service_ip), or leave xds.server empty\n\
             tapmesh: config file {no_server}: xds.server: is empty, but [[xds.clusters]] are set: name the management server, or remove them\n"
        )
    );

    // -o json: every file's verdict in one document, the same exit code.
    let (code, stdout, stderr) = check(&[&lb, &bad_format, "-o", "json"]);
    assert_eq!((code, stderr.as_str()), (Some(2), ""));
    let verdicts: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(
        verdicts,
        serde_json::json!([
            {"file": lb, "kind": "lb", "ok": true},
            {"file": bad_format, "ok": false, "error": format!(
                "config file {bad_format}: line 2: unknown variant `xml`, expected `text` or `json`"
            )},
        ])
    );
}

/// `cleanup` without root refuses instead of saying it removed what it could
/// not touch (found by an independent tester); as root it removes the pins.
#[test]
fn cleanup_without_root_refuses_and_removes_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = tapmesh_tests::Netns::new("cl");
    let root =
        std::path::PathBuf::from("/sys/fs/bpf").join(tapmesh_tests::unique("tapmesh-test-cl"));
    let pins = root.join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    std::fs::create_dir_all(&pins).unwrap();
    let socket = std::env::temp_dir().join(tapmesh_tests::unique("tmclean.sock"));
    let cleanup = |as_nobody: bool| {
        let mut c = Command::new("setpriv");
        if as_nobody {
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
        }
        let out = c
            .arg(tapmesh_bin())
            .arg("cleanup")
            .arg("--bpffs-root")
            .arg(&root)
            .arg("--admin-socket")
            .arg(&socket)
            // (Entering a namespace needs root anyway.)
            .args(if as_nobody {
                vec![]
            } else {
                vec!["--netns", &node.name]
            })
            .output()
            .expect("setpriv");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = cleanup(true);
    let pins_left = pins.exists();
    let (root_code, root_stdout, _) = cleanup(false);
    let _ = std::fs::remove_dir(&pins);
    let _ = std::fs::remove_dir(&root);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("tapmesh: cleanup: needs root or CAP_BPF + CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert!(pins_left);
    assert_eq!(root_code, Some(0));
    assert_eq!(
        root_stdout,
        format!("pins under {} removed\n", pins.display())
    );
}

/// A daemon that cannot be reached is named with the cause (it said
/// "transport error" whatever the socket was: found by an independent tester).
#[test]
fn an_unreachable_daemon_is_named_with_the_cause() {
    let missing = std::env::temp_dir().join(tapmesh_tests::unique("tmnosock"));
    let out = Command::new(tapmesh_bin())
        .args(["status", "--admin-socket"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "tapmesh: cannot reach the daemon at {}: transport error: No such file or directory (os error 2) (is `tapmesh daemon` running? are you root?)\n",
            missing.display()
        )
    );
}

/// `--timeout` bounds a call to a daemon that accepts and never answers (it
/// was 60 s, fixed), and a zero or unreadable one is refused.
#[test]
fn the_call_timeout_is_the_callers() {
    let path = std::env::temp_dir().join(tapmesh_tests::unique("tmmute"));
    // Connections queue in the kernel; nothing ever answers them.
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(tapmesh_bin())
        .args(["status", "--timeout", "1s", "--admin-socket"])
        .arg(&path)
        .output()
        .unwrap();
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        took < std::time::Duration::from_secs(5),
        "took {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (value, why) in [
        ("0s", "must be more than 0"),
        ("soon", "e.g. 5s, 500ms, 2m"),
    ] {
        let out = Command::new(tapmesh_bin())
            .args(["status", "--timeout", value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{value}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&format!(
                "invalid value '{value}' for '--timeout <TIMEOUT>'"
            )) && text.contains(why),
            "{text}"
        );
    }
}

/// A file the daemon refuses exits 2 as one the CLI refuses, with one
/// clear line (it exited 1, and named the interface twice: found by an
/// independent tester).
#[test]
fn a_file_the_daemon_refuses_exits_2() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = tapmesh_tests::Netns::new("cla");
    let daemon = tapmesh_tests::daemon::Daemon::start(&node.name, &[]);
    let file = std::env::temp_dir().join(format!("{}.toml", tapmesh_tests::unique("tmlbf")));
    std::fs::write(
        &file,
        "[[vips]]\nname = \"v\"\naddress = \"203.0.113.10\"\n\
         [[streams]]\nname = \"s\"\nmax_targets = 4\n\
         [[flows]]\nname = \"f\"\nvips = [\"v\"]\nstream = \"s\"\nprotocols = [\"udp\"]\n\
         [[targets]]\nstream = \"s\"\nidentifier = 1\n\
         via = { local = { interface = \"tmnosuch0\", mac = \"02:00:00:00:00:01\" } }\n",
    )
    .unwrap();
    let out = Command::new(tapmesh_bin())
        .args(["lb", "apply"])
        .arg(&file)
        .arg("--admin-socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tapmesh: target 1 of stream \"s\": interface \"tmnosuch0\" does not exist\n"
    );
    assert_eq!(out.status.code(), Some(2));
}

/// `config check --netns` looks the named interfaces up where the daemon
/// would run, and an LB file's local targets are looked up too (the check
/// said "ok" to a file `lb apply` and the daemon then refused: found by an
/// independent tester).
#[test]
fn config_check_looks_interfaces_up_in_the_daemons_namespace() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = tapmesh_tests::Netns::new("clk");
    let peer = tapmesh_tests::Netns::new("clp");
    let (up, _) = tapmesh_tests::link(&node, "198.18.7.1/24", &peer, "198.18.7.2/24");
    let dir = std::env::temp_dir().join(tapmesh_tests::unique("tmchk"));
    std::fs::create_dir_all(&dir).unwrap();
    let daemon = dir.join("daemon.toml");
    std::fs::write(
        &daemon,
        format!("[dataplane]\nuplinks = [\"{}\"]\n", up.interface),
    )
    .unwrap();
    let lb = dir.join("lb.toml");
    std::fs::write(
        &lb,
        format!(
            "[[vips]]\nname = \"v\"\naddress = \"203.0.113.10\"\n\
             [[streams]]\nname = \"s\"\nmax_targets = 4\n\
             [[flows]]\nname = \"f\"\nvips = [\"v\"]\nstream = \"s\"\nprotocols = [\"udp\"]\n\
             [[targets]]\nstream = \"s\"\nidentifier = 1\n\
             via = {{ local = {{ interface = \"{}\", mac = \"02:00:00:00:00:01\" }} }}\n",
            up.interface
        ),
    )
    .unwrap();
    let check = |netns: Option<&str>| {
        let mut c = Command::new(tapmesh_bin());
        c.args(["config", "check"]).arg(&daemon).arg(&lb);
        if let Some(n) = netns {
            c.args(["--netns", n]);
        }
        let out = c.env_remove("TAPMESH_NETNS").output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let here = check(None);
    let there = check(Some(&node.name));
    let _ = std::fs::remove_dir_all(&dir);
    let (d, l) = (daemon.display(), lb.display());
    let name = &up.interface;
    assert_eq!(
        here,
        (
            Some(2),
            String::new(),
            format!(
                "tapmesh: config file {d}: dataplane.uplinks: interface \"{name}\" does not exist\n\
                 tapmesh: LB config file {l}: target 1 of stream \"s\": interface \"{name}\" does not exist\n"
            )
        )
    );
    assert_eq!(
        there,
        (
            Some(0),
            format!("{d}: ok (daemon)\n{l}: ok (lb)\n"),
            String::new()
        )
    );
}
