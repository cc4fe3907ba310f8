//! Where flow records go: the [`RecordSink`] trait and the sinks of this
//! crate. A run has one sink; [`MultiSink`] fans out to several.
//!
//! To add an output (the export client does): implement [`RecordSink`] in
//! its own module and add it where `Config::open_sinks` builds the list.

use qosloop_schema::FlowRecord;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

/// A sink that failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    /// The output cannot work as configured (e.g. every collector refuses
    /// the templates): exit code 64, like a bad configuration.
    #[error("{0}")]
    Refused(String),
}

/// A consumer of flow records.
///
/// `push` is called for every record in export order, `flush` at quiet
/// moments (and at least once a second in live operation), `finish` exactly
/// once at the end: a sink that must confirm delivery (acknowledgements)
/// blocks there and reports failure as an error, which makes the run fail.
pub trait RecordSink: Send {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError>;
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    /// Completes delivery; returns a line for the summary, if any.
    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        self.flush().map(|()| None)
    }
    /// What the sink writes to, for logs.
    fn describe(&self) -> String;
    /// The live counters of the acknowledged exports behind this sink
    /// (for `/metrics`), with their targets.
    fn export_stats(&self) -> Vec<(String, std::sync::Arc<qosloop_exporter::Stats>)> {
        Vec::new()
    }
}

/// JSON Lines (DESIGN.md §3): one [`FlowRecord::to_json_line`] per line.
#[derive(Debug)]
pub struct JsonlSink {
    out: BufWriter<File>,
    path: PathBuf,
    records: u64,
}

impl JsonlSink {
    pub fn create(path: &Path) -> Result<JsonlSink, SinkError> {
        let file = File::create(path).map_err(|source| SinkError::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(JsonlSink {
            out: BufWriter::with_capacity(1 << 16, file),
            path: path.to_owned(),
            records: 0,
        })
    }

    fn io(&self, source: std::io::Error) -> SinkError {
        SinkError::Io {
            what: format!("writing {}", self.path.display()),
            source,
        }
    }
}

impl RecordSink for JsonlSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        let line = record.to_json_line();
        self.out
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        self.out.write_all(b"\n").map_err(|e| self.io(e))?;
        self.records += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|e| self.io(e))
    }

    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        self.flush()?;
        self.out.get_ref().sync_all().map_err(|e| self.io(e))?;
        Ok(Some(format!(
            "{} records written to {}",
            self.records,
            self.path.display()
        )))
    }

    fn describe(&self) -> String {
        format!("jsonl:{}", self.path.display())
    }
}

/// Keeps records in memory (tests, embedding).
#[derive(Debug, Clone, Default)]
pub struct VecSink(pub Arc<Mutex<Vec<FlowRecord>>>);

impl VecSink {
    pub fn records(&self) -> Vec<FlowRecord> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl RecordSink for VecSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        self.0
            .lock()
            .map_err(|_| SinkError::Failed("record buffer poisoned".into()))?
            .push(record.clone());
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// The in-process stream of records: each record is sent on a bounded
/// channel (back-pressure, never loss); the receiver is the consumer.
#[derive(Debug)]
pub struct ChannelSink(pub mpsc::SyncSender<FlowRecord>);

impl RecordSink for ChannelSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        self.0
            .send(record.clone())
            .map_err(|_| SinkError::Failed("record stream consumer has gone".into()))
    }
    fn describe(&self) -> String {
        "stream".into()
    }
}

/// Counts records and drops them (benchmarks).
#[derive(Debug, Default)]
pub struct CountSink(pub u64);

impl RecordSink for CountSink {
    fn push(&mut self, _record: &FlowRecord) -> Result<(), SinkError> {
        self.0 += 1;
        Ok(())
    }
    fn describe(&self) -> String {
        "count".into()
    }
}

/// Sends every record to each of several sinks.
#[derive(Default)]
pub struct MultiSink(pub Vec<Box<dyn RecordSink>>);

impl std::fmt::Debug for MultiSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RecordSink for MultiSink {
    fn export_stats(&self) -> Vec<(String, std::sync::Arc<qosloop_exporter::Stats>)> {
        self.0.iter().flat_map(|s| s.export_stats()).collect()
    }
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        self.0.iter_mut().try_for_each(|s| s.push(record))
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        self.0.iter_mut().try_for_each(|s| s.flush())
    }
    /// Finishes every sink, even after one fails (so an acknowledged
    /// export still waits for its acknowledgements or spools); the first
    /// failure is the result.
    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        let mut lines = Vec::new();
        let mut first_err = None;
        for s in &mut self.0 {
            match s.finish() {
                Ok(Some(l)) => lines.push(l),
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((!lines.is_empty()).then(|| lines.join("; "))),
        }
    }
    fn describe(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|s| s.describe()).collect();
        parts.join(",")
    }
}
