//! `baton-migrate analyze FILE`: decode a snapshot or captured stream to JSON, using the
//! schema the stream carries.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, file] if cmd == "analyze" => {
            match baton_migration::stream::analyze_file(std::path::Path::new(file)) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("baton-migrate: {file}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: baton-migrate analyze FILE");
            ExitCode::from(2)
        }
    }
}
