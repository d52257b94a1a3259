//! Backend addresses to LB targets: a backend on a directly connected
//! network with a resolved neighbour is a local target (its interface and
//! MAC); anything else cannot be reached from this node's XDP and is left out.

use std::collections::BTreeMap;

use crate::lb::model::{LbSpec, TargetVia};

async fn run(args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

fn word_after(text: &str, key: &str) -> Option<String> {
    text.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .map(str::to_string)
}

/// (interface, MAC) of a directly connected backend.
async fn local(address: &str) -> Result<(String, String), String> {
    let route = run(&["-o", "route", "get", address])
        .await
        .ok_or("no route")?;
    if route.contains(" via ") {
        return Err("not on a directly connected network".into());
    }
    if route.starts_with("local ") {
        return Err("an address of this node".into());
    }
    let dev = word_after(&route, "dev").ok_or("no interface in the route")?;
    let neigh = run(&["neigh", "show", address, "dev", &dev])
        .await
        .unwrap_or_default();
    let resolved = ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT"]
        .iter()
        .any(|s| neigh.contains(s));
    match word_after(&neigh, "lladdr").filter(|_| resolved) {
        Some(mac) => Ok((dev, mac)),
        None => Err(format!("no resolved neighbour on {dev}")),
    }
}

/// Turns the placeholder targets (`Remote { node: <backend address> }`) into
/// local ones, dropping those that cannot be reached.
pub async fn targets(spec: &mut LbSpec) {
    let mut cache: BTreeMap<String, Result<(String, String), String>> = BTreeMap::new();
    for t in &spec.targets {
        if let TargetVia::Remote { node } = &t.via {
            if !cache.contains_key(node) {
                cache.insert(node.clone(), local(node).await);
            }
        }
    }
    spec.targets.retain_mut(|t| {
        let TargetVia::Remote { node } = &t.via else {
            return true;
        };
        match &cache[node] {
            Ok((interface, mac)) => {
                t.via = TargetVia::Local {
                    interface: interface.clone(),
                    mac: mac.clone(),
                };
                true
            }
            Err(why) => {
                tracing::debug!(backend = %node, "left out: {why}");
                false
            }
        }
    });
}
