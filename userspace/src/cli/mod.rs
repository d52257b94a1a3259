//! Command-line front ends that talk to the daemon.

pub mod catalog;
pub mod lb;
pub mod mirror;
pub mod nsp;
pub mod status;

use std::io::Write;

/// Standard output was closed by its reader (`tapmesh … | head`).
#[derive(Debug)]
pub struct Closed;

/// Writes `text` to standard output, as `print!` would, but a reader that
/// went away (EPIPE) is [`Closed`] rather than a panic: every command
/// prints through this and ends quietly then. Other write errors are
/// reported on stderr and also end the command.
pub fn print(text: &str) -> Result<(), Closed> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Closed),
        Err(e) => {
            eprintln!("tapmesh: writing to stdout: {e}");
            Err(Closed)
        }
    }
}
