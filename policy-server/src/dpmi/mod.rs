//! The DPMI controller (`seeds/003` §2–5, the MArC): users submit
//! measurement requests ([`request`]), measurement points register and
//! poll for the filter list merged from the requests active at them
//! ([`merge`]), and report what they delivered to each consumer; all of
//! it in SQL (`dpmi_*`) and under `/api/v1` ([`api`]). docs/dpmi.md.

pub mod api;
pub mod merge;
pub mod request;

pub use api::{router, USER_HEADER};
