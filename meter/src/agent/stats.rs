//! The agent's running totals and its summary line (the line tests and
//! operators read at exit: records, map-full and conntrack drops by reason).

/// What the agent counted, for the summary line and the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    pub records: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Packets and bytes a full counter map could not key (counted, not
    /// attributed); each rise triggers an early drain.
    pub map_full_packets: u64,
    pub map_full_bytes: u64,
    /// Records whose process could not be resolved (uid kept).
    pub unknown_process: u64,
    pub drains: u64,
    /// Fallback: packets conntrack dropped since the start (a full table
    /// drops new connections' packets; they are not accounted).
    pub conntrack_dropped: u64,
    /// Fallback: times ctnetlink dropped DESTROY events (entries that ended
    /// then keep only what the last dump saw).
    pub events_lost: u64,
}

impl std::fmt::Display for AgentStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent: {} records, {} packets, {} bytes in {} drains; {} records of unknown process; map full: {} packets, {} bytes not attributed",
            self.records,
            self.packets,
            self.bytes,
            self.drains,
            self.unknown_process,
            self.map_full_packets,
            self.map_full_bytes
        )?;
        if self.conntrack_dropped > 0 || self.events_lost > 0 {
            write!(
                f,
                "; conntrack: {} packets dropped (table full), {} event overruns",
                self.conntrack_dropped, self.events_lost
            )?;
        }
        Ok(())
    }
}
