//! The control plane's TAPA path: Open → Watch reports OPEN through an
//! unprivileged ambassador and the daemon's embedded registry.

use std::fmt::Write as _;

use super::timing::percentile_ms;
use crate::tapa::{stream, TapCaller, TapaLab};

/// The TAPA control path: Open → Watch reports OPEN, with the embedded registry.
pub fn open_latency() -> String {
    const CYCLES: usize = 100;
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let mut tap = TapCaller::new(&lab.ambassadors[a].socket);
    let s = |name: &str| stream(name, "conduit-a", "trench-a");
    let cycle = |tap: &mut TapCaller| {
        let mut times = Vec::with_capacity(CYCLES);
        for _ in 0..CYCLES {
            times.push(tap.time_open(s("stream-a")));
            tap.close(s("stream-a")).expect("close");
        }
        times.sort();
        times
    };
    // Each Open also connects the conduit (veth, addresses, VIPs) and each Close removes it.
    let cold = cycle(&mut tap);
    // With stream-b keeping the conduit connected: registration only.
    tap.open(s("stream-b")).expect("open stream-b");
    let warm = cycle(&mut tap);
    let p99 = percentile_ms(&warm, 99).max(percentile_ms(&cold, 99));
    let verdict = if p99 <= 100.0 { "met" } else { "NOT met" };
    let mut out = String::new();
    let _ = writeln!(out, "## Control plane: TAPA Open → Watch OPEN\n");
    let _ = writeln!(
        out,
        "{CYCLES} Open/Close cycles per row through an unprivileged ambassador (uid 65534) and the \
         daemon's embedded registry; timed from the Open call to the Watch update that says OPEN. \
         Target: p99 ≤ 100 ms — {verdict} ({p99:.1} ms).\n"
    );
    let _ = writeln!(out, "| case | p50 ms | p99 ms | max ms |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (name, t) in [
        (
            "first stream of the conduit (conduit veth + VIPs + registration)",
            &cold,
        ),
        ("conduit already connected (registration only)", &warm),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.1} |",
            percentile_ms(t, 50),
            percentile_ms(t, 99),
            percentile_ms(t, 100)
        );
    }
    out
}
