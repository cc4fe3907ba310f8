//! The DPMI controller (`seeds/003` §2–5; the MArC): users' measurement
//! requests, the measurement points and the filter list each point runs.
pub mod merge;
