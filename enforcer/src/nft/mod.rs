//! nftables, typed: the model of what the enforcer writes ([`model`]), its
//! one netlink encoder ([`encode`]), the table read back ([`read`]) and the
//! in-memory kernel that executes the model for unit tests ([`fake`]).

pub mod encode;
pub mod fake;
pub mod model;
pub mod read;

pub use read::{parse_table, ChainState, TableState, BASE_CHAIN};

#[cfg(test)]
mod tests;
