//! `--export ipfix://HOST:PORT` (UDP) and `ipfix+tcp://HOST:PORT`: records
//! go to any standard IPFIX collector through `qosloop-exporter`'s IPFIX
//! encoder (templates in `docs/protocol.md`).
//!
//! IPFIX has no acknowledgement, so the run's exit status says what the
//! meter could see: over UDP every datagram the kernel accepted counts as
//! sent (a send error is counted and reported, not fatal); over TCP records
//! still queued when the linger time ends make the run fail.

use crate::sink::{RecordSink, SinkError};
use qosloop_exporter::ipfix::tcp::TcpExporter;
use qosloop_exporter::ipfix::udp::UdpExporter;
use qosloop_exporter::ipfix::{IpfixConfig, IpfixReport, Transport};
use qosloop_schema::FlowRecord;

enum Inner {
    Udp(Box<UdpExporter>),
    Tcp(TcpExporter),
    Done,
}

/// The IPFIX export sink.
pub struct IpfixSink {
    inner: Inner,
    target: String,
}

impl std::fmt::Debug for IpfixSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpfixSink")
            .field("target", &self.target)
            .finish()
    }
}

fn failed(target: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Failed(format!("export {target}: {e}"))
}

impl IpfixSink {
    /// Opens the socket (UDP) or starts the sender thread (TCP).
    pub fn start(target: &str, cfg: &IpfixConfig) -> Result<IpfixSink, SinkError> {
        let inner = match cfg.transport {
            Transport::Udp => Inner::Udp(Box::new(
                UdpExporter::connect(cfg).map_err(|e| failed(target, e))?,
            )),
            Transport::Tcp => Inner::Tcp(TcpExporter::start(cfg).map_err(|e| failed(target, e))?),
        };
        Ok(IpfixSink {
            inner,
            target: target.to_owned(),
        })
    }

    fn line(&self, r: &IpfixReport) -> String {
        let mut s = format!(
            "exported {} records to {} as IPFIX: {} sent in {} messages",
            r.records, self.target, r.sent_records, r.messages
        );
        if r.dropped_records > 0 {
            s += &format!(", {} dropped", r.dropped_records);
        }
        if r.cut_records > 0 {
            s += &format!(", {} with strings cut to fit", r.cut_records);
        }
        if matches!(self.inner, Inner::Tcp(_)) || r.connections > 0 {
            s += &format!(", {} TCP connections", r.connections);
        }
        s
    }
}

impl RecordSink for IpfixSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        match &mut self.inner {
            Inner::Udp(u) => {
                u.push(record);
                Ok(())
            }
            Inner::Tcp(t) => t.push(record).map_err(|e| failed(&self.target, e)),
            Inner::Done => Err(failed(&self.target, "already finished")),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        match &mut self.inner {
            Inner::Udp(u) => {
                u.flush();
                Ok(())
            }
            Inner::Tcp(t) => t.flush().map_err(|e| failed(&self.target, e)),
            Inner::Done => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<Option<String>, SinkError> {
        let report = match std::mem::replace(&mut self.inner, Inner::Done) {
            Inner::Udp(u) => u.finish(),
            Inner::Tcp(t) => {
                let r = t.finish().map_err(|e| failed(&self.target, e))?;
                if r.unsent_records > 0 || r.dropped_records > 0 {
                    return Err(failed(
                        &self.target,
                        format!(
                            "{} of {} records NOT sent ({} still queued at the end, {} dropped from a full queue)",
                            r.unsent_records + r.dropped_records,
                            r.records,
                            r.unsent_records,
                            r.dropped_records
                        ),
                    ));
                }
                r
            }
            Inner::Done => return Err(failed(&self.target, "already finished")),
        };
        Ok(Some(self.line(&report)))
    }

    fn describe(&self) -> String {
        self.target.clone()
    }
}
