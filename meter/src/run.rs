//! Running the meter over a capture file, with a progress bar on a terminal
//! and a summary at the end.

use crate::classify::Classifier;
use crate::pcap::{CaptureError, CaptureReader};
use crate::pipeline::{Pipeline, PipelineConfig, Stats};
use crate::sink::{RecordSink, SinkError};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("output: {0}")]
    Sink(#[from] SinkError),
}

/// Whether to draw a progress bar on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Never,
    Always,
}

/// The end-of-run summary.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stats: Stats,
    pub elapsed: Duration,
    /// What the sink said at the end (records written, acknowledged…).
    pub sink: Option<String>,
}

impl Summary {
    pub fn packets_per_second(&self) -> f64 {
        self.stats.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; elapsed {:.3} s, {:.0} packets/s",
            self.stats,
            self.elapsed.as_secs_f64(),
            self.packets_per_second()
        )?;
        if let Some(s) = &self.sink {
            write!(f, "; {s}")?;
        }
        Ok(())
    }
}

fn draw_progress(done: u64, total: u64, packets: u64, started: Instant) {
    let frac = if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let width = 30;
    let filled = (frac * width as f64) as usize;
    let rate = packets as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {:5.1}% {} packets {:.2} Mpkt/s ",
        "#".repeat(filled),
        " ".repeat(width - filled),
        frac * 100.0,
        packets,
        rate / 1e6
    );
    let _ = err.flush();
}

/// Meters a pcap or pcapng file into `sink` and finishes the sink.
pub fn run_file(
    path: &Path,
    config: PipelineConfig,
    classifier: Arc<Classifier>,
    sink: &mut dyn RecordSink,
    progress: Progress,
) -> Result<Summary, RunError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| CaptureError::Io {
        file: name.clone(),
        source,
    })?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = CaptureReader::new(BufReader::with_capacity(1 << 20, file), name)?;
    let mut pipeline = Pipeline::new(config, classifier);
    let started = Instant::now();
    let mut next_draw = started;
    let mut n = 0u64;
    while reader.next_packet()?.is_some() {
        let Some(pkt) = reader.current() else { break };
        // pcapng files may name the interface (if_name), for field rules.
        let interface = reader.interface_name(pkt.interface);
        pipeline.packet(&pkt, interface, sink)?;
        n += 1;
        if progress == Progress::Always && n % 4096 == 0 && Instant::now() >= next_draw {
            draw_progress(reader.bytes_read(), total, n, started);
            next_draw = Instant::now() + Duration::from_millis(200);
        }
    }
    if progress == Progress::Always {
        draw_progress(total, total, n, started);
        eprintln!();
    }
    let stats = pipeline.finish(sink)?;
    let sink_line = sink.finish()?;
    Ok(Summary {
        stats,
        elapsed: started.elapsed(),
        sink: sink_line,
    })
}
