//! Counters of IPFIX-over-TCP exporters, summed per address. A TCP
//! exporter has one `exporters` row per address (`ipfix/tcp/ADDR`) while
//! each connection has its own decoder; written as they are, two sessions
//! of one address would overwrite each other's counter rows. Here the
//! latest counters of each live session and the totals of closed ones are
//! kept per address, and what is stored is their sum.

use super::decoder::{ExporterKey, ExporterStats};
use super::wire::Version;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Addresses whose closed-session totals are remembered; beyond, one with
/// no live session is forgotten (its rows in SQL keep their last values).
const MAX_ADDRS: usize = 4096;
/// (version, domain) rows of closed sessions kept per address; beyond,
/// counters go to the address's row without a domain.
const MAX_CLOSED_ROWS: usize = 256;

type RowKey = (Option<Version>, Option<u32>);

#[derive(Debug, Default)]
struct PerAddr {
    live: HashMap<u64, Vec<ExporterStats>>,
    closed: HashMap<RowKey, ExporterStats>,
}

/// Shared by the sessions of one TCP listener.
#[derive(Clone, Debug, Default)]
pub struct TcpStats(Arc<Mutex<HashMap<IpAddr, PerAddr>>>);

impl TcpStats {
    /// Records `stats` as the latest of `session` (or its last, when
    /// `closing`) and returns the rows to store for its address: every
    /// session of the address summed, under the address with port 0.
    pub fn summed(
        &self,
        ip: IpAddr,
        session: u64,
        stats: Vec<ExporterStats>,
        closing: bool,
    ) -> Vec<ExporterStats> {
        let Ok(mut map) = self.0.lock() else {
            return stats;
        };
        if !map.contains_key(&ip) && map.len() >= MAX_ADDRS {
            let idle = map.iter().find(|(_, a)| a.live.is_empty()).map(|(k, _)| *k);
            match idle {
                Some(k) => {
                    map.remove(&k);
                }
                None => return stats,
            }
        }
        let a = map.entry(ip).or_default();
        if closing {
            a.live.remove(&session);
            for s in stats {
                let mut key = (s.version, s.domain);
                if !a.closed.contains_key(&key) && a.closed.len() >= MAX_CLOSED_ROWS {
                    key = (None, None);
                }
                let row = a.closed.entry(key).or_insert_with(|| empty(ip, key));
                row.counters.add(&s.counters);
            }
        } else {
            a.live.insert(session, stats);
        }
        let mut sum: HashMap<RowKey, ExporterStats> = a.closed.clone();
        for s in a.live.values().flatten() {
            let key = (s.version, s.domain);
            let row = sum.entry(key).or_insert_with(|| empty(ip, key));
            row.counters.add(&s.counters);
            row.templates += s.templates;
            row.pending_sets += s.pending_sets;
        }
        let mut rows: Vec<_> = sum.into_values().collect();
        rows.sort_by_key(|r| (r.version, r.domain));
        rows
    }
}

fn empty(ip: IpAddr, (version, domain): RowKey) -> ExporterStats {
    ExporterStats {
        exporter: ExporterKey {
            addr: SocketAddr::new(ip, 0),
            session: None,
        },
        version,
        domain,
        counters: Default::default(),
        templates: 0,
        pending_sets: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(session: u64, messages: u64, templates: usize) -> ExporterStats {
        let mut r = empty(
            "192.0.2.1".parse().unwrap(),
            (Some(Version::Ipfix), Some(1)),
        );
        r.exporter = ExporterKey {
            addr: "192.0.2.1:40000".parse().unwrap(),
            session: Some(session),
        };
        r.counters.messages = messages;
        r.templates = templates;
        r
    }

    /// Review finding 10: two sessions of one address overwrote each
    /// other's counter rows; they are summed, closed sessions included.
    #[test]
    fn sessions_of_one_address_are_summed() {
        let t = TcpStats::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        t.summed(ip, 1, vec![row(1, 10, 2)], false);
        let rows = t.summed(ip, 2, vec![row(2, 5, 1)], false);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].counters.messages, rows[0].templates), (15, 3));
        assert_eq!(rows[0].exporter.addr, SocketAddr::new(ip, 0));
        // Session 1 ends: its messages stay counted, its templates go.
        let rows = t.summed(ip, 1, vec![row(1, 12, 0)], true);
        assert_eq!((rows[0].counters.messages, rows[0].templates), (17, 1));
        let rows = t.summed(ip, 2, vec![row(2, 6, 1)], false);
        assert_eq!(rows[0].counters.messages, 18);
    }
}
