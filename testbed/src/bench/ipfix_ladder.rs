//! The rate ladder of `qosloop-testbed bench ipfix`: "records/s at equal
//! loss", measured rather than read off a flat-out burst. Flat out, the
//! sender on this machine is the bound (one thread sending loopback
//! datagrams as fast as it can, sharing the cores with the receiver), so
//! the flat-out figures compare receivers at whatever loss each happened
//! to show. The ladder offers the same stream at fixed rates, step by step,
//! to each receiver in the same run (the receivers alternate at each step,
//! so that they see the same machine load), and reports for each receiver
//! the highest offered rate it took with at most `--ladder-loss` percent
//! lost, beside the rate the sender actually reached at that step, and the
//! ratio to nfcapd's. A receiver stops climbing at its first step over the
//! limit. When a receiver passes the top step, its figure is a lower bound
//! (the ladder, or the sender, ended first), and so is the ratio against it.

use super::ipfix::{run_one, Args, Kind, Stream};
use std::path::Path;
use std::sync::Arc;

/// One receiver's highest step passed: offered rate, rate the sender
/// reached, loss in percent.
#[derive(Debug, Clone, Copy)]
struct Passed {
    offered: u64,
    achieved: f64,
    loss: f64,
}

/// Runs the ladder and prints it.
pub(super) async fn run(
    args: &Args,
    stream: Arc<Stream>,
    dir: &Path,
    first_phase: usize,
) -> anyhow::Result<()> {
    let mut rates = args.ladder.clone();
    rates.sort_unstable();
    rates.dedup();
    rates.retain(|r| *r > 0);
    if rates.is_empty() {
        return Ok(());
    }
    let kinds = [
        Kind::Decoder,
        Kind::CollectorSqlite,
        Kind::CollectorJournal,
        Kind::CollectorJournalOnly,
        Kind::Nfcapd,
        Kind::Nfacctd,
    ];
    println!(
        "  rate ladder: the stream at each offered rate; a receiver climbs while it loses at most {}%:",
        args.ladder_loss
    );
    println!(
        "    {:>10} {:<44} {:>12} {:>10} {:>10} {:>8}",
        "offered/s", "receiver", "sent at /s", "stored", "drops", "loss %"
    );
    let mut climbing: Vec<Kind> = kinds.to_vec();
    let mut best: Vec<(Kind, Option<Passed>, bool)> =
        kinds.iter().map(|k| (*k, None, false)).collect();
    let mut phase = first_phase;
    let top = *rates.last().unwrap_or(&0);
    for rate in &rates {
        let mut still = Vec::new();
        for kind in climbing {
            phase += 1;
            let row = run_one(kind, stream.clone(), Some(*rate), args, dir, None, phase).await;
            let entry = best.iter_mut().find(|(k, _, _)| *k == kind);
            match row {
                Ok(r) => {
                    let loss = 100.0 * stream.records.saturating_sub(r.stored) as f64
                        / stream.records as f64;
                    let achieved = stream.records as f64 / r.sent_secs.max(1e-9);
                    let pass = loss <= args.ladder_loss;
                    println!(
                        "    {:>10} {:<44} {:>12.0} {:>10} {:>10} {:>8.3}{}",
                        rate,
                        kind.label(),
                        achieved,
                        r.stored,
                        r.drops,
                        loss,
                        if pass { "" } else { "  (stops here)" }
                    );
                    if pass {
                        if let Some(e) = entry {
                            e.1 = Some(Passed {
                                offered: *rate,
                                achieved,
                                loss,
                            });
                            e.2 = *rate == top;
                        }
                        still.push(kind);
                    }
                }
                Err(e) => println!("    {:>10} {:<44} not measured: {e:#}", rate, kind.label()),
            }
        }
        climbing = still;
        if climbing.is_empty() {
            break;
        }
    }
    let nfcapd = best
        .iter()
        .find(|(k, _, _)| *k == Kind::Nfcapd)
        .and_then(|(_, p, top)| p.map(|p| (p, *top)));
    println!(
        "  rate ladder, highest offered rate taken with at most {}% lost (sent at: what the sender reached):",
        args.ladder_loss
    );
    println!(
        "    {:<44} {:>10} {:>12} {:>8} {:>10}",
        "receiver", "offered/s", "sent at /s", "loss %", "vs nfcapd"
    );
    for (kind, passed, at_top) in &best {
        let Some(p) = passed else {
            println!(
                "    {:<44} below the first step ({}/s)",
                kind.label(),
                rates[0]
            );
            continue;
        };
        // A receiver at the ladder's top has a lower bound only; against
        // nfcapd at the top the ratio is undetermined (both bounded).
        let ratio = match nfcapd {
            Some(_) if *kind == Kind::Nfcapd => "1.00x".to_owned(),
            Some((n, n_top)) => {
                let r = p.offered as f64 / n.offered as f64;
                match (*at_top, n_top) {
                    (true, true) => "top/top".to_owned(),
                    (true, false) => format!(">= {r:.2}x"),
                    (false, true) => format!("<= {r:.2}x"),
                    (false, false) => format!("{r:.2}x"),
                }
            }
            None => "-".to_owned(),
        };
        println!(
            "    {:<44} {:>9}{} {:>12.0} {:>8.3} {:>10}",
            kind.label(),
            p.offered,
            if *at_top { "+" } else { " " },
            p.achieved,
            p.loss,
            ratio
        );
    }
    println!("    (+: passed the ladder's top step; its figure is a lower bound)");
    Ok(())
}
