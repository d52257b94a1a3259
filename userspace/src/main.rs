use std::process::ExitCode;

fn main() -> ExitCode {
    tapmesh::cli::run(tapmesh::cli::args::Cli::parse_with_defaults())
}
