//! Compiles the gRPC protos and embeds the BPF object built by `cargo xtask build-ebpf`.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let protos = [
        "proto/tapmesh/admin/v1/admin.proto",
        "proto/tapmesh/node/v1/node.proto",
        "proto/ambassador/v1/tap.proto",
        "proto/api/nsp/v1/model.proto",
        "proto/api/nsp/v1/targetregistry.proto",
        "proto/api/nsp/v1/configurationmanager.proto",
    ];
    // `-o json` prints the admin and registry replies as they are on the wire.
    tonic_prost_build::configure()
        // A malformed request is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .type_attribute(".tapmesh.admin.v1", "#[derive(serde::Serialize)]")
        .type_attribute(".nsp.v1", "#[derive(serde::Serialize)]")
        .field_attribute(
            ".tapmesh.admin.v1.PluginStatus.state",
            "#[serde(serialize_with = \"crate::cli::json::plugin_state\")]",
        )
        .field_attribute(
            ".nsp.v1.Target.status",
            "#[serde(serialize_with = \"crate::cli::json::target_status\")]",
        )
        .field_attribute(
            ".nsp.v1.Target.type",
            "#[serde(serialize_with = \"crate::cli::json::target_type\")]",
        )
        .compile_protos(&protos, &["proto"])
        .unwrap_or_else(|e| {
            panic!("compiling protos (is protoc installed? run `cargo xtask setup`): {e}")
        });
    println!("cargo:rerun-if-changed=proto");
    git_commit();

    // TAPMESH_BPF_OBJECT (set by xtask), else the newer of the release and debug builds.
    let object = env::var_os("TAPMESH_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let built = |profile: &str| {
                manifest
                    .join("../ebpf/target/bpfel-unknown-none")
                    .join(profile)
                    .join("tapmesh")
            };
            let modified = |p: &PathBuf| fs::metadata(p).and_then(|m| m.modified()).ok();
            let (release, debug) = (built("release"), built("debug"));
            if modified(&debug) > modified(&release) {
                debug
            } else {
                release
            }
        });
    println!("cargo:rerun-if-env-changed=TAPMESH_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("tapmesh.bpf.o");
    if let Err(e) = fs::copy(&object, &out) {
        panic!(
            "the BPF object {} is missing ({e}): build it first with `cargo xtask build-ebpf`",
            object.display()
        );
    }
}

/// `--version` names the commit: TAPMESH_GIT_COMMIT if set (a build from a
/// source tree without `.git`, such as the image's), else git's, else "unknown".
fn git_commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = env::var("TAPMESH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TAPMESH_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=TAPMESH_GIT_COMMIT");
    // A new commit or checkout changes HEAD or the branch it names.
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
