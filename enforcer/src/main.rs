//! `qosloop-enforcer`: see the library for what it does.
fn main() -> std::process::ExitCode {
    qosloop_enforcer::cli::main()
}
