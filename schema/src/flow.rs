//! Flow keys and flow records, and their JSON form (DESIGN.md §3).

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// What makes packets one flow: the 5-tuple, the VLAN and the class the
/// meter's classifiers assigned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

/// One flow record as the meter exports it and the collector stores it.
///
/// `packets` and `bytes` are deltas since the flow's previous record
/// (IPFIX `packetDeltaCount`/`octetDeltaCount`), so the records of one flow,
/// interim updates included, sum to its totals. `bytes` counts IP bytes
/// (IP header included, link layer excluded). Timestamps are capture times in
/// nanoseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowRecord {
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub packets: u64,
    pub bytes: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// 1-in-N sampling interval the counters were taken at; absent when every
    /// packet was counted (the default: CRANE forbids sampling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_interval: Option<u32>,
}

impl Default for FlowRecord {
    fn default() -> Self {
        FlowRecord {
            src_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            src_port: 0,
            dst_port: 0,
            proto: 0,
            packets: 0,
            bytes: 0,
            start_ns: 0,
            end_ns: 0,
            vlan: None,
            dscp: None,
            tcp_flags: None,
            class: None,
            user: None,
            process: None,
            sampling_interval: None,
        }
    }
}

impl FlowRecord {
    /// The key of the flow this record belongs to.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            vlan: self.vlan,
            class: self.class.clone(),
        }
    }

    /// One line of the `--records-out` JSONL contract (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one JSONL line.
    pub fn from_json_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// A stable 32-bit hash of a flow key's 5-tuple, independent of direction.
///
/// It is the distribution column of the `flows` table and the input of the
/// collector cluster's routing function (SCRIPT, `seeds/000`), so it must be
/// the same on every machine and every build: FNV-1a over a canonical
/// encoding, never `std`'s randomised hasher. Both directions of a
/// conversation hash alike, so one node sees both halves.
pub fn flow_hash(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let (a, ap, b, bp) = if (src, src_port) <= (dst, dst_port) {
        (src, src_port, dst, dst_port)
    } else {
        (dst, dst_port, src, src_port)
    };
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            h ^= u32::from(byte);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    for addr in [a, b] {
        match addr {
            IpAddr::V4(v4) => feed(&v4.octets()),
            IpAddr::V6(v6) => feed(&v6.octets()),
        }
    }
    feed(&ap.to_be_bytes());
    feed(&bp.to_be_bytes());
    feed(&[proto]);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FlowRecord {
        FlowRecord {
            src_addr: "172.20.1.2".parse().unwrap(),
            dst_addr: "172.20.3.3".parse().unwrap(),
            src_port: 2000,
            dst_port: 80,
            proto: 6,
            packets: 3,
            bytes: 180,
            start_ns: 1_700_000_000_000_000_000,
            end_ns: 1_700_000_000_500_000_000,
            tcp_flags: Some(0x12),
            class: Some("web".into()),
            ..FlowRecord::default()
        }
    }

    #[test]
    fn json_has_the_contract_keys() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json_line()).unwrap();
        for key in [
            "src_addr",
            "dst_addr",
            "src_port",
            "dst_port",
            "proto",
            "packets",
            "bytes",
            "start_ns",
            "end_ns",
            "tcp_flags",
            "class",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["src_addr"], "172.20.1.2");
        assert_eq!(v["proto"], 6);
        assert!(v.get("vlan").is_none(), "absent optionals are omitted");
    }

    #[test]
    fn json_round_trips() {
        let r = sample();
        assert_eq!(FlowRecord::from_json_line(&r.to_json_line()).unwrap(), r);
    }

    #[test]
    fn hash_is_direction_independent_and_stable() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(flow_hash(a, b, 1, 2, 17), flow_hash(b, a, 2, 1, 17));
        assert_ne!(flow_hash(a, b, 1, 2, 17), flow_hash(a, b, 1, 3, 17));
        // Pinned: changing the function re-routes every stored flow.
        assert_eq!(flow_hash(a, b, 1, 2, 17), 0x7326_6b40);
    }
}
