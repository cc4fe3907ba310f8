//! DPMI on the meter side (`seeds/003` §2–4): a measurement point that
//! runs the filter list its controller (the policy server) merged from
//! users' requests and delivers to consumers ([`point`], [`deliver`]), the
//! consumers' re-filter ([`refilter`]) and TLS end ([`consumer`]), and prefix-preserving address
//! anonymisation ([`cryptopan`]). docs/dpmi.md.

mod anon_sink;
mod bpf;
pub mod cli;
pub mod consumer;
pub mod cryptopan;
pub mod deliver;
mod http;
pub mod point;
pub mod refilter;

pub use anon_sink::AnonymisingSink;
pub use cryptopan::CryptoPan;
pub use http::ControllerTls;
pub use point::{run_point, PointConfig, PointError, PointStats};
