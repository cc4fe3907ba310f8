//! Anonymised stored flows (`--flows-anonymise-key FILE`): every record
//! the meter exports or writes has its addresses replaced by their
//! Crypto-PAn image under the node's key before it leaves the process, so
//! what the collector stores keeps subnets together (prefixes are
//! preserved) without naming hosts. The key stays in this process.

use super::cryptopan::CryptoPan;
use crate::sink::{RecordSink, SinkError};
use qosloop_schema::FlowRecord;

/// A sink that anonymises each record's addresses, then passes it on.
pub struct AnonymisingSink {
    inner: Box<dyn RecordSink>,
    key: CryptoPan,
}

impl std::fmt::Debug for AnonymisingSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnonymisingSink({})", self.inner.describe())
    }
}

impl AnonymisingSink {
    pub fn new(inner: Box<dyn RecordSink>, key: CryptoPan) -> AnonymisingSink {
        AnonymisingSink { inner, key }
    }
}

impl RecordSink for AnonymisingSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        let mut r = record.clone();
        r.src_addr = self.key.anonymise_ip(r.src_addr);
        r.dst_addr = self.key.anonymise_ip(r.dst_addr);
        self.inner.push(&r)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        self.inner.flush()
    }
    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        self.inner.finish()
    }
    fn describe(&self) -> String {
        format!("{} (addresses anonymised)", self.inner.describe())
    }
    fn export_stats(&self) -> Vec<(String, std::sync::Arc<qosloop_exporter::Stats>)> {
        self.inner.export_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::VecSink;

    #[test]
    fn addresses_are_replaced_prefixes_kept() {
        let key = CryptoPan::new(&[7u8; 32]);
        let r = FlowRecord {
            src_addr: "10.1.2.3".parse().unwrap(),
            dst_addr: "10.1.2.4".parse().unwrap(),
            packets: 3,
            ..FlowRecord::default()
        };
        let vec = VecSink::default();
        let mut sink = AnonymisingSink::new(Box::new(vec.clone()), key.clone());
        sink.push(&r).unwrap();
        let got = vec.records()[0].clone();
        assert_eq!(got.src_addr, key.anonymise_ip(r.src_addr));
        assert_ne!(got.src_addr, r.src_addr);
        assert_eq!(got.packets, 3);
        let (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) = (got.src_addr, got.dst_addr)
        else {
            panic!("IPv4 stays IPv4");
        };
        assert_eq!((u32::from(a) ^ u32::from(b)).leading_zeros(), 29);
    }

    /// A sink with one export behind it, as `ExportSink` reports it.
    #[derive(Debug, Default)]
    struct Exporting(std::sync::Arc<qosloop_exporter::Stats>);

    impl RecordSink for Exporting {
        fn push(&mut self, _: &FlowRecord) -> Result<(), SinkError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "exporting".into()
        }
        fn export_stats(&self) -> Vec<(String, std::sync::Arc<qosloop_exporter::Stats>)> {
            vec![("ipfix://127.0.0.1:4739".into(), self.0.clone())]
        }
    }

    /// `/metrics` reads the export counters through the outermost sink:
    /// anonymising must not hide them.
    #[test]
    fn export_counters_are_seen_through_it() {
        let inner = Exporting::default();
        let stats = inner.0.clone();
        let sink = AnonymisingSink::new(Box::new(inner), CryptoPan::new(&[7u8; 32]));
        let got = sink.export_stats();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "ipfix://127.0.0.1:4739");
        assert!(std::sync::Arc::ptr_eq(&got[0].1, &stats));
    }
}
