//! `tapmesh config check FILE…`: validation of daemon, LB and Meridio
//! files, with the errors the daemon would give at start or reload; the
//! only thing looked up is the named interfaces (in `--netns`'s namespace).

use std::{path::Path, process::ExitCode};

use super::json::{show, Output};
use crate::config::Config;

/// Which file a TOML document is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `tapmesh daemon --config`.
    Daemon,
    /// `[lb] config_file` or `tapmesh lb apply`: vips, streams, flows, targets.
    Lb,
    /// `[nsp] config_file`: Meridio's trenches, conduits, streams, flows, vips.
    Meridio,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Daemon => "daemon",
            Kind::Lb => "lb",
            Kind::Meridio => "meridio",
        }
    }
}

/// Guesses the kind from the top-level keys: trenches or conduits are
/// Meridio's, targets or the LB's lists an LB file, anything else the daemon's.
pub fn detect(text: &str) -> Kind {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Kind::Daemon;
    };
    let has = |key: &str| table.contains_key(key);
    if has("trenches") || has("conduits") {
        Kind::Meridio
    } else if ["vips", "streams", "flows", "targets"]
        .iter()
        .any(|k| has(k))
    {
        Kind::Lb
    } else {
        Kind::Daemon
    }
}

/// Validates one file; its kind, or the line the daemon would refuse it with.
pub fn check(path: &Path, kind: Option<Kind>) -> Result<Kind, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let kind = kind.unwrap_or_else(|| detect(&text));
    match kind {
        Kind::Daemon => {
            let config = Config::from_file(path).map_err(|e| e.to_string())?;
            config
                .validate()
                .map_err(|e| format!("config file {}: {e}", path.display()))?;
            crate::catalog::check_bindings(&config.xds.clusters)
                .map_err(|e| format!("config file {}: {e}", path.display()))?;
            // The files it names, as the daemon reads them at start (the LB
            // file against this configuration's map sizes).
            if let Some(lb) = &config.lb.config_file {
                crate::lb::service::read_spec(
                    lb,
                    crate::lb::model::Capacity::of(&config.dataplane),
                )
                .and_then(|spec| {
                    crate::lb::service::check_local_interfaces(lb, &spec)?;
                    crate::lb::service::check_with_settings(lb, &spec, &config.lb)
                })
                .map_err(|e| format!("config file {}: lb.config_file: {e}", path.display()))?;
            }
            if let Some(nsp) = &config.nsp.config_file {
                check(nsp, Some(Kind::Meridio))
                    .map_err(|e| format!("config file {}: nsp.config_file: {e}", path.display()))?;
            }
        }
        // Its local targets' interfaces too, as `lb apply` and the daemon do.
        Kind::Lb => {
            crate::lb::service::read_spec(path, crate::lb::model::Capacity::MAX)
                .and_then(|spec| crate::lb::service::check_local_interfaces(path, &spec))
                .map_err(|e| e.to_string())?;
        }
        Kind::Meridio => {
            // Its validation errors (the daemon's words on reload) name no file.
            crate::nsp::config::NspConfig::read(path).map_err(|e| match e {
                crate::nsp::config::NspConfigError::File { .. } => e.to_string(),
                e => format!("{}: {e}", path.display()),
            })?;
        }
    }
    Ok(kind)
}

/// One file's verdict in `-o json`.
#[derive(serde::Serialize)]
struct Verdict {
    file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `tapmesh config check`: one line per file (or one JSON list of
/// verdicts); exit 2 if any is refused.
pub fn run(files: &[std::path::PathBuf], kind: Option<Kind>, output: Output) -> ExitCode {
    let verdicts: Vec<Verdict> = files
        .iter()
        .map(|path| {
            let result = check(path, kind);
            Verdict {
                file: path.display().to_string(),
                kind: result.as_ref().ok().map(|k| k.name()),
                ok: result.is_ok(),
                error: result.err(),
            }
        })
        .collect();
    let failed = verdicts.iter().any(|v| !v.ok);
    if output == Output::Json {
        let _ = super::print(&show(output, &verdicts, |_| String::new()));
    } else {
        for v in &verdicts {
            if let Some(e) = &v.error {
                eprintln!("tapmesh: {e}");
            } else if super::print(&format!("{}: ok ({})\n", v.file, v.kind.unwrap_or("?")))
                .is_err()
            {
                break;
            }
        }
    }
    if failed {
        ExitCode::from(super::EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_top_level_keys() {
        assert_eq!(detect("[daemon]\nlog_level = \"info\"\n"), Kind::Daemon);
        assert_eq!(detect(""), Kind::Daemon);
        assert_eq!(detect("[[vips]]\nname = \"v\"\n"), Kind::Lb);
        assert_eq!(
            detect("[[trenches]]\nname = \"t\"\n[[vips]]\n"),
            Kind::Meridio
        );
    }
}
