//! `husk`: the command-line interface of husk.
//!
//! Today: the quick launch `husk run [OPTIONS] -- CMD`, which needs no daemon. The docker-like
//! verbs against huskd arrive with the control plane.

mod net;
mod quick_launch;
mod run_args;

const USAGE: &str = "\
usage: husk <command> [ARGS...]

commands:
  run [OPTIONS] -- CMD [ARGS...]   boot a micro-VM, run CMD, exit with its exit code
  version                          print the version
  help                             this text

`husk run --help` lists the options of run.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("run") => match run_args::RunArgs::parse(&args[1..]) {
            _ if args[1..]
                .first()
                .is_some_and(|a| a == "--help" || a == "-h") =>
            {
                print!("{}", run_args::USAGE);
                0
            }
            Ok(run) => quick_launch::run(&run).unwrap_or_else(fail),
            Err(e) => fail(e),
        },
        Some("version" | "--version") => {
            println!("husk {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            0
        }
        Some(other) => fail(format!("unknown command {other:?}\n{USAGE}")),
        None => fail(USAGE.to_string()),
    };
    std::process::exit(code);
}

fn fail(message: String) -> i32 {
    eprintln!("husk: error: {message}");
    quick_launch::EXIT_HUSK_ERROR
}
