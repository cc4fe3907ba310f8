//! The collector cluster's `stitch` analysis (`docs/cluster.md`): the owner
//! of a flow-hash bucket reads the bucket's records from `flows` by
//! `(bucket, id)` after a persisted per-bucket cursor, merges a flow's
//! per-packet parts from several DiCAP capture nodes
//! (`qosloop_schema::merge`) and stitches both directions of a flow into
//! one bidirectional row of `stitched_flows`; the cursor moves in the same
//! (fenced) transaction as the rows.
//!
//! This module is the pure arithmetic ([`stitch`]); `sql.rs` the reads,
//! the id horizon and the fenced write.

mod sql;

pub use sql::{Fence, Horizon, StitchStep, StitchedQuery, StitchedRow};

use qosloop_schema::{flow_hash, merge::merge, FlowRecord};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// One bidirectional flow in one interval: endpoint `a` is the lower
/// `(address, port)`, `ab` counts what went a → b, `ba` b → a. `parts_*`
/// are the stored records summed each way (several per interval when
/// several capture nodes each exported a per-packet share of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Biflow {
    /// The interval (of the analysis' width) the records started in.
    pub slot: i64,
    pub a_addr: IpAddr,
    pub a_port: u16,
    pub b_addr: IpAddr,
    pub b_port: u16,
    pub proto: u8,
    pub vlan: Option<u16>,
    /// The cluster bucket of the flow hash.
    pub bucket: u32,
    pub packets_ab: u64,
    pub bytes_ab: u64,
    pub parts_ab: u64,
    pub packets_ba: u64,
    pub bytes_ba: u64,
    pub parts_ba: u64,
    /// The earliest start and the latest end of every part, both ways.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Or of the parts' TCP flags (`None`: no part carried any).
    pub tcp_flags: Option<u16>,
}

/// A flow key with its interval: what [`merge`] groups by.
type PartKey = (IpAddr, IpAddr, u16, u16, u8, Option<u16>, u64);
/// A bidirectional key: slot, a, a port, b, b port, protocol, VLAN.
type BiKey = (i64, IpAddr, u16, IpAddr, u16, u8, Option<u16>);

/// Merges and stitches `records` (a batch of one owner's buckets): the
/// parts of one directed flow in one interval of `interval_ns` (by their
/// start, as [`merge`] groups them) are summed by [`merge`], then the two
/// directions of a flow (same protocol and VLAN, addresses and ports
/// swapped) become one row, the direction of each part known by which
/// endpoint sent it. The counters are the records' own (not scaled by a
/// sampling interval: DiCAP's per-packet parts are unsampled). Both
/// functions are sums, minima, maxima and ors, so stitching a flow's
/// records in several batches and adding the rows gives the same row as
/// stitching them at once: what lets the owner write a batch at a time.
/// `buckets` is the cluster's bucket count (for [`Biflow::bucket`]).
pub fn stitch(records: &[FlowRecord], interval_ns: u64, buckets: u32) -> Vec<Biflow> {
    let slot_of = |r: &FlowRecord| r.start_ns.checked_div(interval_ns).unwrap_or(0);
    let mut parts: BTreeMap<PartKey, u64> = BTreeMap::new();
    for r in records {
        let k = (
            r.src_addr,
            r.dst_addr,
            r.src_port,
            r.dst_port,
            r.proto,
            r.vlan,
            slot_of(r),
        );
        *parts.entry(k).or_default() += 1;
    }
    let mut out: BTreeMap<BiKey, Biflow> = BTreeMap::new();
    for m in merge(records, interval_ns) {
        let slot = slot_of(&m);
        let n = parts
            .get(&(
                m.src_addr, m.dst_addr, m.src_port, m.dst_port, m.proto, m.vlan, slot,
            ))
            .copied()
            .unwrap_or(1);
        let forward = (m.src_addr, m.src_port) <= (m.dst_addr, m.dst_port);
        let (a, ap, b, bp) = if forward {
            (m.src_addr, m.src_port, m.dst_addr, m.dst_port)
        } else {
            (m.dst_addr, m.dst_port, m.src_addr, m.src_port)
        };
        let slot = i64::try_from(slot).unwrap_or(i64::MAX);
        let row = out
            .entry((slot, a, ap, b, bp, m.proto, m.vlan))
            .or_insert_with(|| Biflow {
                slot,
                a_addr: a,
                a_port: ap,
                b_addr: b,
                b_port: bp,
                proto: m.proto,
                vlan: m.vlan,
                bucket: crate::flow_bucket(i64::from(flow_hash(a, b, ap, bp, m.proto)), buckets),
                packets_ab: 0,
                bytes_ab: 0,
                parts_ab: 0,
                packets_ba: 0,
                bytes_ba: 0,
                parts_ba: 0,
                first_ns: m.start_ns,
                last_ns: m.end_ns,
                tcp_flags: None,
            });
        if forward {
            row.packets_ab = row.packets_ab.saturating_add(m.packets);
            row.bytes_ab = row.bytes_ab.saturating_add(m.bytes);
            row.parts_ab += n;
        } else {
            row.packets_ba = row.packets_ba.saturating_add(m.packets);
            row.bytes_ba = row.bytes_ba.saturating_add(m.bytes);
            row.parts_ba += n;
        }
        row.first_ns = row.first_ns.min(m.start_ns);
        row.last_ns = row.last_ns.max(m.end_ns);
        row.tcp_flags = match (row.tcp_flags, m.tcp_flags) {
            (Some(x), Some(y)) => Some(x | y),
            (x, y) => x.or(y),
        };
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src: &str, sp: u16, dst: &str, dp: u16, packets: u64, start: u64) -> FlowRecord {
        FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            src_port: sp,
            dst_port: dp,
            proto: 6,
            packets,
            bytes: packets * 100,
            start_ns: start,
            end_ns: start + 10,
            ..Default::default()
        }
    }

    #[test]
    fn parts_merge_and_directions_stitch_into_one_row() {
        let recs = [
            // Two capture nodes' parts of 10.0.0.2:80 -> 10.0.0.1:5000.
            rec("10.0.0.2", 80, "10.0.0.1", 5000, 3, 120),
            rec("10.0.0.2", 80, "10.0.0.1", 5000, 4, 110),
            // The other direction, one part.
            rec("10.0.0.1", 5000, "10.0.0.2", 80, 5, 100),
            // Another flow; and the first flow in the next interval.
            rec("10.0.0.1", 5001, "10.0.0.2", 80, 1, 100),
            rec("10.0.0.1", 5000, "10.0.0.2", 80, 2, 1100),
        ];
        let rows = stitch(&recs, 1000, 64);
        assert_eq!(rows.len(), 3);
        let r = &rows[0];
        assert_eq!((r.slot, r.a_port, r.b_port), (0, 5000, 80));
        assert_eq!(r.a_addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((r.packets_ab, r.bytes_ab, r.parts_ab), (5, 500, 1));
        assert_eq!((r.packets_ba, r.bytes_ba, r.parts_ba), (7, 700, 2));
        assert_eq!((r.first_ns, r.last_ns), (100, 130));
        assert_eq!((rows[1].a_port, rows[1].packets_ab), (5001, 1));
        assert_eq!((rows[2].slot, rows[2].packets_ab), (1, 2));
        // Both directions fall in one bucket, the flow hash's.
        let h = i64::from(flow_hash(recs[0].src_addr, recs[0].dst_addr, 80, 5000, 6));
        assert_eq!(r.bucket, crate::flow_bucket(h, 64));
        // Stitching in two batches adds up to stitching at once.
        let (x, y) = (stitch(&recs[..2], 1000, 64), stitch(&recs[2..], 1000, 64));
        let ba: u64 = x.iter().chain(&y).map(|r| r.packets_ba).sum();
        let ab: u64 = x.iter().chain(&y).map(|r| r.packets_ab).sum();
        assert_eq!((ab, ba), (8, 7));
    }
}
