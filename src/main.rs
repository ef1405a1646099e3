//! The `ferry` binary: parse, run, map the error to an exit code once.

use std::process::ExitCode;

fn main() -> ExitCode {
    match ferry::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
