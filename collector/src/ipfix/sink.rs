//! Where the decoder puts the records it makes: a vector of
//! `FlowRecord`s (the writer's batches, the tests, the benchmarks), or
//! straight into the journal's record encoding ([`EncodedRecords`]), so
//! that the UDP receive path with a journal keeps no vector of records:
//! each record goes from the datagram's fields to the bytes of its journal
//! frame.

use crate::journal::frame;
use qosloop_schema::FlowRecord;

/// Receives the decoder's records in order.
pub trait RecordSink {
    /// Takes one record.
    fn push(&mut self, record: FlowRecord);
    /// Records taken so far (since the last clear).
    fn len(&self) -> usize;
    /// True when no record was taken.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets the records after the first `len` (a message that must be
    /// discarded whole).
    fn truncate(&mut self, len: usize);
}

impl RecordSink for Vec<FlowRecord> {
    fn push(&mut self, record: FlowRecord) {
        Vec::push(self, record);
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }
}

/// Records encoded as a journal frame holds them
/// ([`frame::push_record`]), without the frame's head: the bytes are
/// appended to an open frame as they are.
#[derive(Debug, Default)]
pub struct EncodedRecords {
    bytes: Vec<u8>,
    /// Where each record starts in `bytes` (for `truncate`).
    starts: Vec<u32>,
}

impl EncodedRecords {
    /// The encoded records, back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Forgets every record, keeping the capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.starts.clear();
    }
}

impl RecordSink for EncodedRecords {
    fn push(&mut self, record: FlowRecord) {
        // A datagram is at most 64 KiB and a record at least 4 bytes on the
        // wire, so the offsets fit (the decoder caps records per message).
        self.starts.push(self.bytes.len() as u32);
        frame::push_record(&mut self.bytes, &record);
    }
    fn len(&self) -> usize {
        self.starts.len()
    }
    fn truncate(&mut self, len: usize) {
        if let Some(&at) = self.starts.get(len) {
            self.bytes.truncate(at as usize);
            self.starts.truncate(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::frame::{
        begin_frame, decode_payload, finish_frame, split_frame, FrameHead,
    };
    use std::net::{IpAddr, Ipv6Addr};

    fn rec(i: u16) -> FlowRecord {
        FlowRecord {
            src_port: i,
            class: (i % 2 == 0).then(|| format!("c{i}")),
            dst_addr: if i % 3 == 0 {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            } else {
                FlowRecord::default().dst_addr
            },
            ..FlowRecord::default()
        }
    }

    #[test]
    fn encoded_records_are_what_a_frame_of_records_holds() {
        let records: Vec<FlowRecord> = (0..7).map(rec).collect();
        let mut enc = EncodedRecords::default();
        for r in &records {
            RecordSink::push(&mut enc, r.clone());
        }
        let mut whole = Vec::new();
        frame::push_records(&mut whole, &records);
        assert_eq!(enc.bytes(), &whole[..]);
        let head = FrameHead {
            name: "n".into(),
            addr: "a".into(),
            domain: 3,
            seq: 9,
        };
        let mut buf = Vec::new();
        let open = begin_frame(&mut buf, &head);
        buf.extend_from_slice(enc.bytes());
        finish_frame(&mut buf, open, enc.len() as u32);
        let (payload, _) = split_frame(&buf).unwrap();
        assert_eq!(decode_payload(payload).unwrap(), (head, records.clone()));

        // Truncating drops exactly the later records.
        enc.truncate(3);
        let mut first = Vec::new();
        frame::push_records(&mut first, &records[..3]);
        assert_eq!((enc.len(), enc.bytes()), (3, &first[..]));
        enc.truncate(10);
        assert_eq!(enc.len(), 3);
        enc.clear();
        assert!(enc.is_empty() && enc.bytes().is_empty());
    }
}
