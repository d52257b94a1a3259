//! Scraping the daemon's health and metrics listener from inside a namespace,
//! parsed by the Prometheus project's own OpenMetrics parser (the Python
//! `prometheus_client`, from PyPI).

use std::collections::BTreeMap;

/// The parser's version (toolchain.md: PyPI's current one on 2026-12-02).
const PACKAGES: &[&str] = &["prometheus-client==0.26.0"];

const SCRIPT: &str = r#"
import json, sys, urllib.request, urllib.error
from prometheus_client.openmetrics.parser import text_string_to_metric_families

base = sys.argv[1]
out = {}
for path in ("healthz", "readyz"):
    try:
        r = urllib.request.urlopen(base + "/" + path, timeout=30)
        out[path] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[path] = [e.code, e.read().decode()]
r = urllib.request.urlopen(base + "/metrics", timeout=30)
out["content_type"] = r.headers["Content-Type"]
families = list(text_string_to_metric_families(r.read().decode()))
out["samples"] = [[s.name, s.labels, s.value] for f in families for s in f.samples]
out["helps"] = {f.name: f.documentation for f in families}
print(json.dumps(out))
"#;

/// One scrape: the probes' answers and every sample.
#[derive(Debug)]
pub struct Scrape {
    pub healthz: (u16, String),
    pub readyz: (u16, String),
    pub content_type: String,
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
    /// Each family's HELP text.
    pub helps: BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; None if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v as u64)
    }

    /// Like [`Scrape::get`], panicking when the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {:#?}", self.samples))
    }
}

/// Scrapes `http://<address>` from inside `netns`.
pub fn scrape(netns: &str, address: &str) -> Scrape {
    let python = crate::python::venv("tapmesh-promvenv", PACKAGES);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&python)
        .args(["-c", SCRIPT, &format!("http://{address}")])
        .output()
        .expect("running the scraper");
    assert!(
        out.status.success(),
        "scrape failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("scraper output");
    let probe = |name: &str| {
        (
            v[name][0].as_u64().expect("status code") as u16,
            v[name][1].as_str().expect("body").to_string(),
        )
    };
    Scrape {
        healthz: probe("healthz"),
        readyz: probe("readyz"),
        content_type: v["content_type"].as_str().unwrap_or_default().to_string(),
        helps: v["helps"]
            .as_object()
            .expect("helps")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect(),
        samples: v["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|s| {
                let labels = s[1]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                (
                    s[0].as_str().expect("name").to_string(),
                    labels,
                    s[2].as_f64().expect("value"),
                )
            })
            .collect(),
    }
}
