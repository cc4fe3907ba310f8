//! DiCAP's per-packet shares (`seeds/000` §IV, the meter's `dicap`) split a
//! flow over several capture nodes: each node exports its part of the
//! flow. [`merge`] sums those parts by flow key and interval, so that a
//! collector-side analysis gets the flow's exact totals. Pure, and here at
//! the bottom of the dependency arrows so that the meter (which re-exports
//! it as `dicap::merge`) and the storage layer's `stitch` analysis share it.

use crate::FlowRecord;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A flow key and the interval (of `interval_ns`) its record started in.
type Key = (IpAddr, IpAddr, u16, u16, u8, Option<u16>, u64);

/// Sums records of the same flow (addresses, ports, protocol, VLAN) whose
/// start falls in the same interval of `interval_ns` (0: one interval for
/// all): packets and bytes add, the time span is the union, TCP flags are
/// or-ed. Other fields come from the first record of the group. Output is
/// ordered by key.
pub fn merge(records: &[FlowRecord], interval_ns: u64) -> Vec<FlowRecord> {
    let mut out: BTreeMap<Key, FlowRecord> = BTreeMap::new();
    for r in records {
        let slot = r.start_ns.checked_div(interval_ns).unwrap_or(0);
        let key = (
            r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto, r.vlan, slot,
        );
        match out.get_mut(&key) {
            None => {
                out.insert(key, r.clone());
            }
            Some(m) => {
                m.packets = m.packets.saturating_add(r.packets);
                m.bytes = m.bytes.saturating_add(r.bytes);
                m.start_ns = m.start_ns.min(r.start_ns);
                m.end_ns = m.end_ns.max(r.end_ns);
                m.tcp_flags = match (m.tcp_flags, r.tcp_flags) {
                    (Some(a), Some(b)) => Some(a | b),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sport: u16, packets: u64, start_ns: u64, flags: Option<u16>) -> FlowRecord {
        FlowRecord {
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "10.0.0.2".parse().unwrap(),
            src_port: sport,
            dst_port: 80,
            proto: 6,
            packets,
            bytes: packets * 100,
            start_ns,
            end_ns: start_ns + 10,
            tcp_flags: flags,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn parts_of_a_flow_add_up_and_other_flows_stay_apart() {
        let parts = [
            rec(1000, 3, 100, Some(0x02)),
            rec(1000, 4, 50, Some(0x10)),
            rec(1001, 5, 70, None),
        ];
        let m = merge(&parts, 0);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].packets, m[0].bytes), (7, 700));
        assert_eq!((m[0].start_ns, m[0].end_ns), (50, 110));
        assert_eq!(m[0].tcp_flags, Some(0x12));
        assert_eq!(m[1].packets, 5);
        // Intervals keep successive interim records apart.
        assert_eq!(
            merge(&[rec(1, 1, 100, None), rec(1, 1, 1100, None)], 1000).len(),
            2
        );
        let total: u64 = merge(&parts, 1).iter().map(|r| r.packets).sum();
        assert_eq!(total, 12);
    }
}
