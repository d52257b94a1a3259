//! The Kubernetes manifests in deploy/kubernetes: validated offline against
//! the API schemas of one pinned Kubernetes version (kubernetes-validate from
//! PyPI, which ships them), and the ConfigMap's files loaded with the
//! daemon's own parsers. No kernel, no root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use tapmesh::{config::Config, lb, nsp::config::NspConfig};
use tapmesh_tests::{daemon::tapmesh_bin, python, unique};

/// The Kubernetes version the manifests are written for.
const KUBERNETES: &str = "1.34.0";
const VALIDATOR: &[&str] = &["kubernetes-validate==1.37.0"];

fn manifests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every YAML file under deploy/kubernetes, sorted.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("deploy/kubernetes") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&manifests_dir(), &mut out);
    out.sort();
    out
}

fn validator() -> PathBuf {
    python::venv("tapmesh-k8s-venv", VALIDATOR)
}

/// kubernetes-validate --strict (unknown fields are errors) on `files`.
fn validate(files: &[PathBuf]) -> Output {
    Command::new(validator().with_file_name("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .args(files)
        .output()
        .expect("running kubernetes-validate")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every document of the manifests, as JSON (PyYAML from the validator's venv).
fn documents() -> Vec<serde_json::Value> {
    let out = Command::new(validator())
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        ])
        .args(manifests())
        .output()
        .expect("running python");
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("JSON")
        .as_array()
        .expect("a list")
        .clone()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("tapmesh-k8s-"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(manifests_dir())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "configmap.yaml",
            "daemonset.yaml",
            "example/app.yaml",
            "namespace.yaml"
        ]
    );
    let out = validate(&files);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let version = KUBERNETES.rsplit_once('.').unwrap().0;
    for resource in [
        "configmap/tapmesh-config",
        "daemonset/tapmesh",
        "pod/example-app",
        "namespace/tapmesh-system",
    ] {
        let line = format!("passed for resource {resource} against version {version}");
        assert!(report.contains(&line), "no \"{line}\" in:\n{report}");
    }
}

#[test]
fn a_wrong_field_or_type_fails_the_schema_check() {
    let scratch = Scratch::new();
    let daemonset = std::fs::read_to_string(manifests_dir().join("daemonset.yaml")).unwrap();
    for (from, to, expect) in [
        (
            "hostNetwork: true",
            "hostNetwrok: true",
            "'hostNetwrok' was unexpected",
        ),
        (
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: thirty",
            "'thirty' is not of type 'integer'",
        ),
        (
            "privileged: true",
            "privileged: always",
            "'always' is not of type 'boolean'",
        ),
    ] {
        assert!(daemonset.contains(from), "daemonset.yaml has no {from:?}");
        let bad = scratch.0.join("daemonset.yaml");
        std::fs::write(&bad, daemonset.replacen(from, to, 1)).unwrap();
        let out = validate(&[bad]);
        let report = text(&out);
        assert!(!out.status.success(), "{to:?} passed:\n{report}");
        assert!(
            report.contains(expect),
            "{to:?}: no {expect:?} in:\n{report}"
        );
    }
}

#[test]
fn the_configmap_files_load_with_the_daemons_parsers() {
    let docs = documents();
    let data = &find(&docs, "ConfigMap", "tapmesh-config")["data"];
    let scratch = Scratch::new();
    let file = |key: &str| {
        let path = scratch.0.join(key);
        let text = data[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in the ConfigMap"));
        std::fs::write(&path, text).unwrap();
        path
    };

    let config = Config::from_file(&file("tapmesh.toml")).unwrap_or_else(|e| panic!("{e}"));
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    // The files it names are the ConfigMap's, where the DaemonSet mounts it.
    assert_eq!(
        config.lb.config_file.as_deref(),
        Some(Path::new("/etc/tapmesh/lb.toml"))
    );
    assert_eq!(
        config.nsp.config_file.as_deref(),
        Some(Path::new("/etc/tapmesh/meridio.toml"))
    );
    assert!(
        config.dataplane.keep_dataplane,
        "the update strategy relies on keep_dataplane"
    );
    assert!(
        config.dataplane.uplinks.is_empty(),
        "uplinks come from the DaemonSet's env"
    );

    let spec = lb::service::read_spec(&file("lb.toml"), lb::model::Capacity::MAX)
        .unwrap_or_else(|e| panic!("{e}"));
    let meridio = NspConfig::read(&file("meridio.toml")).unwrap_or_else(|e| panic!("{e}"));
    // The daemon validates the union of both as one configuration.
    let mut all = spec.clone();
    let nsp = meridio.lb_spec();
    all.vips.extend(nsp.vips);
    all.streams.extend(nsp.streams);
    all.flows.extend(nsp.flows);
    all.targets.extend(nsp.targets);
    let valid = lb::model::validate(&all).unwrap_or_else(|e| panic!("lb.toml + meridio.toml: {e}"));
    assert_eq!(valid.vips.len(), 2);
}

/// The environment the manifests set is what the daemon and ambassador read.
#[test]
fn the_manifests_environment_is_what_tapmesh_reads() {
    let docs = documents();
    let help = |command: &str| {
        let out = Command::new(tapmesh_bin())
            .args([command, "--help"])
            .output()
            .expect("running tapmesh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let names = |containers: &serde_json::Value| -> Vec<String> {
        containers
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    let daemonset = &find(&docs, "DaemonSet", "tapmesh")["spec"]["template"]["spec"];
    let pod = &find(&docs, "Pod", "example-app")["spec"];
    for (command, env) in [
        ("daemon", names(&daemonset["containers"])),
        ("ambassador", names(&pod["initContainers"])),
        ("stream", names(&pod["containers"])),
    ] {
        assert!(!env.is_empty());
        let help = help(command);
        for name in env {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "tapmesh {command} does not read {name}:\n{help}"
            );
        }
    }
}
