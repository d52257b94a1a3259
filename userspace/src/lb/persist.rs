//! The admin/file part of the LB configuration across restarts
//! (`<state_dir>/lb-state.json`), beside the file it started from: a
//! restart with the same file takes back the admin API's changes; a changed
//! file replaces them (the operator edited it since).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::LbSpec;

pub const FILE_NAME: &str = "lb-state.json";
/// Where a saved part that no longer applies is kept.
pub const REFUSED_NAME: &str = "lb-state.refused.json";

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Saved {
    /// The LB file's content when the daemon started (None: no file).
    file: Option<LbSpec>,
    /// The admin/file part last applied.
    spec: LbSpec,
}

/// Where the part is kept, and the file's content it started from.
#[derive(Debug, Default)]
pub struct Store {
    path: Option<PathBuf>,
    file: Option<LbSpec>,
}

/// Whether `spec` holds something `file` does not (what the admin API
/// added or changed), in any order. Only removals (a target left out at a
/// start, say) lose nothing the file does not give back.
fn adds_to(spec: &LbSpec, file: Option<&LbSpec>) -> bool {
    fn texts<T: Serialize>(items: &[T]) -> std::collections::BTreeSet<String> {
        items
            .iter()
            .filter_map(|i| serde_json::to_string(i).ok())
            .collect()
    }
    let empty = LbSpec::default();
    let file = file.unwrap_or(&empty);
    !texts(&spec.vips).is_subset(&texts(&file.vips))
        || !texts(&spec.streams).is_subset(&texts(&file.streams))
        || !texts(&spec.flows).is_subset(&texts(&file.flows))
        || !texts(&spec.targets).is_subset(&texts(&file.targets))
}

impl Store {
    pub fn new(state_dir: &Path, file: Option<LbSpec>) -> Self {
        Self {
            path: Some(state_dir.join(FILE_NAME)),
            file,
        }
    }

    /// What to apply at start: the saved part when it started from this
    /// same file content, else the file (or nothing).
    pub fn initial(&self) -> (LbSpec, bool) {
        let file = self.file.clone().unwrap_or_default();
        let Some(path) = &self.path else {
            return (file, false);
        };
        let saved: Saved = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(saved) => saved,
                Err(e) => {
                    tracing::warn!("LB state {}", crate::statefile::refused(path, &e));
                    return (file, false);
                }
            },
            Err(_) => return (file, false),
        };
        if saved.file == self.file {
            (saved.spec, true)
        } else if !adds_to(&saved.spec, saved.file.as_ref()) {
            // No admin change was made on top of the old file: nothing is lost.
            (file, false)
        } else {
            // The admin API's changes go with the old file: kept for the operator.
            let kept = self
                .copy_aside()
                .map_or(String::new(), |p| format!(" (kept as {})", p.display()));
            tracing::warn!(
                "the LB file changed since {} was written: its content replaces the admin API's changes{kept}",
                path.display()
            );
            (file, false)
        }
    }

    /// Moves the saved part aside (to `lb-state.refused.json`, replacing an
    /// older one) when it no longer applies, so that the next save does not
    /// overwrite the operator's changes; its new path.
    pub fn set_aside(&self) -> Option<PathBuf> {
        let path = self.path.as_ref()?;
        let aside = path.with_file_name(REFUSED_NAME);
        match std::fs::rename(path, &aside) {
            Ok(()) => Some(aside),
            Err(e) => {
                tracing::warn!("moving {} aside: {e}", path.display());
                None
            }
        }
    }

    /// Copies the saved part aside (as [`Self::set_aside`], the saved file
    /// staying) before a start applies only some of it: the next save
    /// would lose the rest. Its copy's path.
    pub fn copy_aside(&self) -> Option<PathBuf> {
        let path = self.path.as_ref()?;
        let aside = path.with_file_name(REFUSED_NAME);
        match std::fs::copy(path, &aside) {
            Ok(_) => Some(aside),
            Err(e) => {
                tracing::warn!("copying {} aside: {e}", path.display());
                None
            }
        }
    }

    /// The file's content, for when a saved part no longer applies.
    pub fn file(&self) -> LbSpec {
        self.file.clone().unwrap_or_default()
    }

    /// Keeps `spec` (the part just applied).
    pub fn save(&self, spec: &LbSpec) {
        let Some(path) = &self.path else { return };
        let saved = Saved {
            file: self.file.clone(),
            spec: spec.clone(),
        };
        if let Err(e) = crate::statefile::save(path, &saved) {
            tracing::error!("persisting the LB configuration to {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::flows::VipSpec;

    #[test]
    fn only_what_the_file_lacks_counts_as_an_admin_change() {
        let mut two = spec("203.0.113.1");
        two.vips.push(VipSpec {
            name: "w".into(),
            address: "203.0.113.2".into(),
        });
        let mut reordered = two.clone();
        reordered.vips.reverse();
        assert!(!adds_to(&reordered, Some(&two)), "order is no change");
        assert!(
            !adds_to(&spec("203.0.113.1"), Some(&two)),
            "a removal loses nothing"
        );
        assert!(adds_to(&two, Some(&spec("203.0.113.1"))), "an addition");
        assert!(
            adds_to(&spec("203.0.113.9"), Some(&spec("203.0.113.1"))),
            "a change"
        );
        assert!(adds_to(&two, None));
        assert!(!adds_to(&LbSpec::default(), None));
    }

    fn spec(address: &str) -> LbSpec {
        LbSpec {
            vips: vec![VipSpec {
                name: "v".into(),
                address: address.into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_saved_part_comes_back_while_the_file_is_the_same() {
        let dir = std::env::temp_dir().join(format!("tapmesh-lbstate-{}", std::process::id()));
        let file = Some(spec("192.0.2.1"));
        let store = Store::new(&dir, file.clone());
        assert_eq!(store.initial(), (spec("192.0.2.1"), false), "nothing saved");
        store.save(&spec("192.0.2.2"));
        let again = Store::new(&dir, file);
        assert_eq!(again.initial(), (spec("192.0.2.2"), true));
        let edited = Store::new(&dir, Some(spec("192.0.2.3")));
        assert_eq!(edited.initial(), (spec("192.0.2.3"), false));
        let no_file = Store::new(&dir, None);
        assert_eq!(no_file.initial(), (LbSpec::default(), false));
        no_file.save(&spec("192.0.2.4"));
        assert_eq!(Store::new(&dir, None).initial(), (spec("192.0.2.4"), true));
        // Set aside, it is no longer what a start applies, and is kept whole.
        let saved = std::fs::read(dir.join(FILE_NAME)).unwrap();
        let aside = no_file.set_aside().expect("moved");
        assert_eq!(aside, dir.join(REFUSED_NAME));
        assert_eq!(std::fs::read(&aside).unwrap(), saved);
        assert_eq!(Store::new(&dir, None).initial(), (LbSpec::default(), false));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
