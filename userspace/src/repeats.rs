//! Warnings that repeat: a reconnect loop against an unreachable server fails
//! the same way every few seconds. Each distinct reason is logged once, then
//! as one summary line with a count per period while it keeps happening.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often a reason that keeps happening is summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(600);

struct Seen {
    /// Repeats since the last line.
    count: u64,
    logged: Instant,
}

pub struct Repeats {
    every: Duration,
    seen: HashMap<String, Seen>,
}

impl Default for Repeats {
    fn default() -> Self {
        Self::new(SUMMARY_EVERY)
    }
}

impl Repeats {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            seen: HashMap::new(),
        }
    }

    /// Counts one occurrence of `reason`; the line to log now, if any.
    pub fn note(&mut self, reason: &str, now: Instant) -> Option<String> {
        let Some(seen) = self.seen.get_mut(reason) else {
            self.seen.insert(
                reason.to_string(),
                Seen {
                    count: 0,
                    logged: now,
                },
            );
            return Some(reason.to_string());
        };
        seen.count += 1;
        if now.duration_since(seen.logged) < self.every {
            return None;
        }
        let line = format!(
            "{reason} (again {} times in the last {})",
            seen.count,
            humantime::format_duration(now.duration_since(seen.logged))
        );
        seen.count = 0;
        seen.logged = now;
        Some(line)
    }

    /// Forgets every reason (the condition cleared: the next failure is news).
    pub fn clear(&mut self) {
        self.seen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_hour_of_the_same_failure_is_seven_lines() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let mut repeats = Repeats::new(Duration::from_secs(600));
        let start = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            // One failure every 3.6 s for an hour, as a reconnect loop does.
            for i in 0..1000u64 {
                let now = start + Duration::from_millis(3600 * i);
                let reason = "transport error: connection refused";
                if let Some(line) = repeats.note(reason, now) {
                    tracing::warn!("xDS stream ended: {line}");
                }
                if i == 500 {
                    // A second reason is logged at once, and only once.
                    if let Some(line) = repeats.note("status: unavailable", now) {
                        tracing::warn!("xDS stream ended: {line}");
                    }
                }
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<&str> = text.lines().collect();
        // The first, one summary per 10 minutes (at 601.2 s, 1202.4 s, … 3006 s:
        // the sixth would be at 3607.2 s, past the last failure at 3596.4 s)
        // and the other reason once.
        assert_eq!(logged.len(), 7, "{text}");
        assert!(logged[0].ends_with("xDS stream ended: transport error: connection refused"));
        assert_eq!(
            logged
                .iter()
                .filter(|l| l.contains("status: unavailable"))
                .count(),
            1
        );
        let summaries: Vec<&&str> = logged.iter().filter(|l| l.contains("again")).collect();
        assert_eq!(summaries.len(), 5);
        assert!(
            summaries[0].ends_with("(again 167 times in the last 10m 1s 200ms)"),
            "{}",
            summaries[0]
        );
    }
}
