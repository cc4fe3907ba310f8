//! `--export crane://HOST:PORT[,HOST:PORT…]`: records go to collectors
//! through `qosloop-exporter` (acknowledged, failover by priority, disk
//! spool). The meter is synchronous; the exporter runs on a small tokio
//! runtime of its own, fed in batches.

use crate::sink::{RecordSink, SinkError};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;

/// Records handed to the exporter per call into its runtime.
const HANDOFF: usize = 1024;

/// The export sink.
pub struct ExportSink {
    runtime: tokio::runtime::Runtime,
    exporter: Option<Exporter>,
    pending: Vec<FlowRecord>,
    target: String,
}

impl std::fmt::Debug for ExportSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSink")
            .field("target", &self.target)
            .finish()
    }
}

fn failed(e: impl std::fmt::Display) -> SinkError {
    SinkError::Failed(format!("export: {e}"))
}

fn refused(why: &str) -> SinkError {
    SinkError::Refused(format!(
        "export refused, nothing is stored: {why} (check the collector's disable_keys)"
    ))
}

impl ExportSink {
    /// Starts exporting to `target` (`crane://…`), spooling under
    /// `spool_dir` while no collector answers, over TLS when `tls` is given.
    pub fn start(
        target: &str,
        spool_dir: std::path::PathBuf,
        tls: Option<qosloop_exporter::TlsFiles>,
        ack_timeout: std::time::Duration,
    ) -> Result<ExportSink, SinkError> {
        let mut cfg = ExporterConfig::from_url(target).map_err(failed)?;
        cfg.spool_dir = Some(spool_dir);
        cfg.tls = tls;
        cfg.ack_timeout = ack_timeout;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("qosloop-export")
            .enable_all()
            .build()
            .map_err(|e| failed(format!("starting the export runtime: {e}")))?;
        let exporter = runtime
            .block_on(async { Exporter::start(cfg) })
            .map_err(failed)?;
        Ok(ExportSink {
            runtime,
            exporter: Some(exporter),
            pending: Vec::with_capacity(HANDOFF),
            target: target.to_owned(),
        })
    }

    fn hand_off(&mut self, flush: bool) -> Result<(), SinkError> {
        let Some(ex) = self.exporter.as_mut() else {
            return Err(failed("already finished"));
        };
        // Every collector refused the templates: what would be sent could
        // not be stored (or only as empty rows). Stop now, not at the end.
        if let Some(why) = ex.stats().refused() {
            return Err(refused(&why));
        }
        let pending = std::mem::take(&mut self.pending);
        self.runtime
            .block_on(async {
                for r in &pending {
                    ex.send(r).await?;
                }
                if flush {
                    ex.flush().await?;
                }
                Ok::<_, qosloop_exporter::ExportError>(())
            })
            .map_err(failed)?;
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }
}

impl RecordSink for ExportSink {
    fn export_stats(&self) -> Vec<(String, std::sync::Arc<qosloop_exporter::Stats>)> {
        self.exporter
            .iter()
            .map(|e| (self.target.clone(), e.stats().clone()))
            .collect()
    }
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        self.pending.push(record.clone());
        if self.pending.len() >= HANDOFF {
            self.hand_off(false)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.hand_off(true)
    }

    /// Waits for every acknowledgement; without a collector, records stay
    /// in the spool and the line says so. Records dropped past the spool
    /// bound make the run fail.
    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        self.hand_off(true)?;
        let Some(ex) = self.exporter.take() else {
            return Err(failed("already finished"));
        };
        let spool = ex
            .spool_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let report = self.runtime.block_on(ex.finish()).map_err(failed)?;
        if let Some(why) = &report.refused {
            return Err(refused(why));
        }
        if report.dropped_records > 0 {
            return Err(failed(format!(
                "{} of {} records dropped (spool full); {} acknowledged",
                report.dropped_records, report.records, report.acked_records
            )));
        }
        if report.complete() {
            Ok(Some(format!(
                "exported {} records to {}, all acknowledged",
                report.records, self.target
            )))
        } else {
            Ok(Some(format!(
                "exported {} records to {}: {} acknowledged, {} NOT acknowledged and left in the spool {}",
                report.records, self.target, report.acked_records, report.unacked_records, spool
            )))
        }
    }

    fn describe(&self) -> String {
        self.target.clone()
    }
}
