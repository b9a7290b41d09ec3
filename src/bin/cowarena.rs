//! `cowarena`: command-line helper for the cowarena library.
//!
//! `cowarena doctor` reports what this machine or container offers (kernel, userfaultfd
//! access path, features, seccomp, THP), runs a tiny fork/write/read round trip through the
//! library, says what to do, and exits non-zero when the library cannot work here.

use std::process::ExitCode;

const USAGE: &str = "usage: cowarena doctor [--quiet]
  doctor    report the kernel, the userfaultfd access path, features, seccomp and THP,
            try a fork/write/read round trip, and say what to do.
            Exit status: 0 cowarena works here, 1 it cannot, 2 usage error.
  --quiet   print only the verdict line (and what to do, when it cannot work)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        "-V" | "--version" => {
            println!("cowarena {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "doctor" => {
            let mut quiet = false;
            for a in rest {
                match a.as_str() {
                    "-q" | "--quiet" => quiet = true,
                    other => {
                        eprintln!("cowarena doctor: unknown argument {other:?}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            let report = cowarena::probe::probe();
            if quiet {
                let verdict = if report.works() { "cowarena works here" } else { "cowarena CANNOT work here" };
                println!("verdict: {verdict}");
                if !report.works() {
                    for a in &report.advice {
                        println!("  - {a}");
                    }
                }
            } else {
                println!("{report}");
            }
            if report.works() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        other => {
            eprintln!("cowarena: unknown command {other:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
