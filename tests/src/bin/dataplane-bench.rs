//! The benchmark driver, run by `cargo xtask bench [--quick]`.

use std::path::PathBuf;
use std::process::ExitCode;

use dataplane_tests::bench::{self, Options};

fn main() -> ExitCode {
    let mut options = Options {
        quick: false,
        out: PathBuf::from("target/bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--out" => match args.next() {
                Some(dir) => options.out = PathBuf::from(dir),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    if !dataplane_tests::require_privileges("bench") {
        eprintln!("bench: needs root (network namespaces, eBPF)");
        return ExitCode::FAILURE;
    }
    match bench::main(&options) {
        Ok(_) => {
            println!("bench: report in {}", options.out.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench: FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: dataplane-bench [--quick] [--out <dir>]");
    ExitCode::from(2)
}
