use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tapmesh::cli::run(tapmesh::cli::args::Cli::parse())
}
