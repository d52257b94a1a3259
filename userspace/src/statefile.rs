//! State kept across daemon restarts: JSON files replaced atomically, so a
//! crash mid-write leaves the previous version.

use std::path::Path;

/// Writes `bytes` to a sibling temporary file and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Serializes `value` (pretty JSON) and writes it with [`write_atomically`].
pub fn save<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomically(path, &bytes)
}

/// Moves a state file the daemon cannot read to `<name>.refused.json`
/// (replacing an older one), so the next save does not overwrite what it
/// held; that path, or `None` if it could not be moved (said in the log).
pub fn set_aside(path: &Path) -> Option<std::path::PathBuf> {
    let stem = path.file_stem()?.to_string_lossy();
    let aside = path.with_file_name(format!("{stem}.refused.json"));
    match std::fs::rename(path, &aside) {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::warn!("moving {} aside: {e}", path.display());
            None
        }
    }
}

/// What the log says of an unreadable state file set aside.
pub fn refused(path: &Path, error: &dyn std::fmt::Display) -> String {
    match set_aside(path) {
        Some(aside) => format!(
            "{} is not readable ({error}); starting without it, and it is kept as {}",
            path.display(),
            aside.display()
        ),
        None => format!(
            "{} is not readable ({error}); starting without it",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreadable_file_is_set_aside_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("tapmesh-aside-{}", std::process::id()));
        let path = dir.join("x-state.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, b"{garbage").unwrap();
        let said = super::refused(&path, &"bad JSON");
        let aside = dir.join("x-state.refused.json");
        assert_eq!(std::fs::read(&aside).unwrap(), b"{garbage");
        assert!(!path.exists());
        assert!(
            said.ends_with(&format!("kept as {}", aside.display())),
            "{said}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_save_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("tapmesh-statefile-{}", std::process::id()));
        let path = dir.join("sub/state.json");
        super::save(&path, &[1, 2]).unwrap();
        super::save(&path, &[3]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[\n  3\n]");
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
