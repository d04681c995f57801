//! `husk`: the command-line interface of husk.
//!
//! `husk run [OPTIONS] -- CMD` boots a micro-VM directly (no daemon needed); the other verbs
//! are a gRPC client of huskd (see `remote`).

mod opts;
mod output;
mod quick_launch;
mod remote;
mod run_args;
mod snapshot_cmd;
mod tty;

fn usage() -> String {
    format!(
        "usage: husk [--host ADDR] <command> [ARGS...]

quick launch (no daemon):
  run [OPTIONS] -- CMD [ARGS...]     boot a micro-VM, run CMD, exit with its exit code
                                     (`husk run --help` lists the options)
{}
other:
  version                            print the version
  help                               this text",
        remote::USAGE
    )
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut host = std::env::var("HUSK_HOST").unwrap_or_else(|_| remote::DEFAULT_HOST.into());
    while let Some(first) = args.first() {
        if let Some(h) = first.strip_prefix("--host=") {
            host = h.to_string();
            args.remove(0);
        } else if first == "--host" && args.len() > 1 {
            host = args[1].clone();
            args.drain(..2);
        } else {
            break;
        }
    }
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
            println!("{}", usage());
            0
        }
        Some(
            verb @ ("create" | "start" | "stop" | "rm" | "ps" | "inspect" | "exec" | "logs"
            | "pause" | "resume" | "events" | "snapshot" | "restore"),
        ) => match remote::run_verb(&host, verb, &args[1..]) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("husk: error: {e}");
                remote::EXIT_API_ERROR
            }
        },
        Some(other) => fail(format!("unknown command {other:?}\n{}", usage())),
        None => fail(usage()),
    };
    std::process::exit(code);
}

fn fail(message: String) -> i32 {
    eprintln!("husk: error: {message}");
    quick_launch::EXIT_HUSK_ERROR
}
