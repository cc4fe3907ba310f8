//! A measurement point (`qosloop-meter --dpmi-point NAME
//! --dpmi-controller HOST:PORT --interface IF`): registers with the
//! controller, polls its filter list, installs it (a kernel socket filter
//! passing what some filter may match, cut to the largest caplen; exact
//! first-match in user space), delivers each frame once to every consumer
//! of the first filter it matches, and reports what it installed (or why
//! it could not) and each consumer's counters.

use super::bpf::compile;
use super::cryptopan::CryptoPan;
use super::deliver::{ConsumerReport, Output};
use super::http::{call, Controller, ControllerTls, HttpError};
use crate::afpacket::{if_index, FilterHandle, PacketRing, RingConfig};
use qosloop_schema::dpmi::{ConsumerSpec, FilterList, FrameFields};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a point keeps trying to register at start.
const REGISTER_FOR: Duration = Duration::from_secs(10);

/// A point's settings.
#[derive(Clone, Debug)]
pub struct PointConfig {
    pub name: String,
    pub controller: SocketAddr,
    /// The bearer token presented to the controller (an admin token when
    /// it has tokens configured).
    pub token: Option<String>,
    /// TLS to the controller (`https://` with `--dpmi-controller-ca`);
    /// `None`: plain HTTP.
    pub controller_tls: Option<ControllerTls>,
    pub interface: String,
    /// Filters the point runs at most (its capacity).
    pub max_filters: u32,
    /// The largest caplen the operator allows a consumer.
    pub max_caplen: u32,
    /// Frames queued per consumer before its frames are dropped.
    pub consumer_buffer: usize,
    /// How often the filter list is fetched and counters reported.
    pub poll: Duration,
    /// The anonymisation key (made up at start when none is given).
    pub key: Option<Arc<CryptoPan>>,
    /// TLS to the consumers (`--dpmi-consumer-ca`): their certificates
    /// checked against this configuration's CA, the point's own
    /// certificate presented when it has one (`--dpmi-tls-cert`); `None`:
    /// plain TCP.
    pub consumer_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// What stops a point.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("point {point}: {source}")]
    Controller {
        point: String,
        #[source]
        source: HttpError,
    },
    #[error("point {point}: the controller refused to register it ({status}): {body}")]
    Refused {
        point: String,
        status: u16,
        body: String,
    },
    #[error("point {point}: making up an anonymisation key: {source}")]
    Key {
        point: String,
        #[source]
        source: std::io::Error,
    },
    #[error("point {point}: capture on {interface}: {source}")]
    Capture {
        point: String,
        interface: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the point counted, at the end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PointStats {
    pub frames: u64,
    pub matched: u64,
    pub kernel_drops: u64,
    pub installs: u64,
    pub install_failures: u64,
    pub consumers: Vec<ConsumerReport>,
}

/// The point's own counters.
#[derive(Debug, Default)]
struct Counts {
    frames: AtomicU64,
    matched: AtomicU64,
    kernel_drops: AtomicU64,
}

#[derive(Debug, Default)]
struct Installed {
    list: FilterList,
    outputs: Vec<Arc<Output>>,
}

#[derive(Serialize)]
struct Report<'a> {
    version: Option<&'a str>,
    install_error: Option<&'a str>,
    frames: u64,
    matched: u64,
    kernel_drops: u64,
    consumers: Vec<ConsumerReport>,
}

fn same_output(a: &ConsumerSpec, b: &ConsumerSpec) -> bool {
    a.address == b.address
        && a.delivery == b.delivery
        && a.caplen == b.caplen
        && a.anonymise == b.anonymise
        && a.exact == b.exact
}

impl PointConfig {
    fn link(&self) -> Controller<'_> {
        Controller {
            addr: self.controller,
            token: self.token.as_deref(),
            tls: self.controller_tls.as_ref(),
        }
    }
}

/// Runs the point until `stop`.
pub fn run_point(cfg: PointConfig, stop: Arc<AtomicBool>) -> Result<PointStats, PointError> {
    let point = cfg.name.clone();
    let ctl = |source| PointError::Controller {
        point: point.clone(),
        source,
    };
    register(&cfg, &stop).map_err(|e| match e {
        RegisterError::Http(e) => ctl(e),
        RegisterError::Refused(status, body) => PointError::Refused {
            point: point.clone(),
            status,
            body,
        },
    })?;
    let capture_err = |source| PointError::Capture {
        point: point.clone(),
        interface: cfg.interface.clone(),
        source,
    };
    let ifindex = if_index(&cfg.interface).map_err(capture_err)?;
    let drop_all = compile(&[], 0);
    let ring = PacketRing::open(ifindex, RingConfig::default(), Some(&drop_all), None)
        .map_err(capture_err)?;
    let handle = ring.filter_handle().map_err(capture_err)?;
    // Without a key a consumer that asked for anonymised frames would get
    // real addresses: no key, no point.
    let key = match cfg.key.clone() {
        Some(k) => k,
        None => Arc::new(CryptoPan::random().map_err(|source| PointError::Key {
            point: point.clone(),
            source,
        })?),
    };
    let installed = Arc::new(RwLock::new(Arc::new(Installed::default())));
    let counts = Arc::new(Counts::default());
    let capture = {
        let (installed, stop, counts) = (installed.clone(), stop.clone(), counts.clone());
        let interface = cfg.interface.clone();
        std::thread::spawn(move || capture_loop(ring, &interface, &installed, &stop, &counts))
    };
    let mut stats = PointStats::default();
    let mut install_error: Option<String> = None;
    let mut refused_version = String::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match fetch(&cfg).or_else(|e| reregister(&cfg, &stop, e)) {
            Ok(list) => {
                let current = installed
                    .read()
                    .map(|i| i.list.version.clone())
                    .unwrap_or_default();
                if list.version != current && list.version != refused_version {
                    match install(&cfg, &handle, &installed, list, &key) {
                        Ok(version) => {
                            tracing::info!(point = %cfg.name, %version, "DPMI filters installed");
                            stats.installs += 1;
                            install_error = None;
                            refused_version.clear();
                        }
                        Err((version, e)) => {
                            tracing::warn!(point = %cfg.name, %version, error = %e, "DPMI filter install failed");
                            stats.install_failures += 1;
                            install_error = Some(e);
                            refused_version = version;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(point = %cfg.name, error = %e, "DPMI filter list not fetched"),
        }
        if let Err(e) = report(&cfg, &installed, &counts, install_error.as_deref()) {
            tracing::warn!(point = %cfg.name, error = %e, "DPMI report not sent");
        }
        let rest = cfg.poll.saturating_sub(started.elapsed());
        sleep_unless(&stop, rest);
    }
    let _ = capture.join();
    let last = installed.read().map(|i| i.clone()).ok();
    stats.consumers = last
        .iter()
        .flat_map(|i| i.outputs.iter().map(|o| o.report()))
        .collect();
    let _ = report(&cfg, &installed, &counts, install_error.as_deref());
    stats.frames = counts.frames.load(Ordering::Relaxed);
    stats.matched = counts.matched.load(Ordering::Relaxed);
    stats.kernel_drops = counts.kernel_drops.load(Ordering::Relaxed);
    if let Ok(mut slot) = installed.write() {
        *slot = Arc::new(Installed::default());
    }
    Ok(stats)
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

enum RegisterError {
    Http(HttpError),
    Refused(u16, String),
}

fn register(cfg: &PointConfig, stop: &AtomicBool) -> Result<(), RegisterError> {
    let body = serde_json::json!({
        "name": cfg.name,
        "interface": cfg.interface,
        "max_filters": cfg.max_filters,
        "max_caplen": cfg.max_caplen,
    })
    .to_string();
    let until = Instant::now() + REGISTER_FOR;
    loop {
        match call(cfg.link(), "POST", "/api/v1/points", Some(body.as_bytes())) {
            Ok((201, _)) => return Ok(()),
            Ok((status, b)) => {
                return Err(RegisterError::Refused(
                    status,
                    String::from_utf8_lossy(&b).chars().take(300).collect(),
                ))
            }
            // A certificate that does not verify will not verify later.
            Err(e @ HttpError::Tls { .. }) => return Err(RegisterError::Http(e)),
            Err(e) if Instant::now() >= until || stop.load(Ordering::Relaxed) => {
                return Err(RegisterError::Http(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A controller that no longer knows the point (its database was
/// replaced) answers 404: register again, then fetch.
fn reregister(cfg: &PointConfig, stop: &AtomicBool, e: String) -> Result<FilterList, String> {
    if !e.contains("status 404") {
        return Err(e);
    }
    tracing::warn!(point = %cfg.name, "DPMI controller forgot this point: registering again");
    match register(cfg, stop) {
        Ok(()) => fetch(cfg),
        Err(RegisterError::Http(h)) => Err(h.to_string()),
        Err(RegisterError::Refused(status, body)) => {
            Err(format!("re-registering: {status}: {body}"))
        }
    }
}

fn fetch(cfg: &PointConfig) -> Result<FilterList, String> {
    let path = format!("/api/v1/points/{}/filters", cfg.name);
    // A POST: the controller stores the list it hands out (a GET of the
    // same path only shows it).
    let (status, body) = call(cfg.link(), "POST", &path, None).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!(
            "{path}: status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let list: FilterList = serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))?;
    // The list is from the controller, but a point checks what it runs.
    if list.filters.len() > cfg.max_filters as usize {
        return Err(format!(
            "{path}: {} filters over the point's {}",
            list.filters.len(),
            cfg.max_filters
        ));
    }
    if list
        .filters
        .iter()
        .flat_map(|f| &f.consumers)
        .any(|&i| i >= list.consumers.len())
    {
        return Err(format!("{path}: a filter names a consumer not in the list"));
    }
    Ok(list)
}

/// Bytes of a frame the point reads itself: Ethernet, one 802.1Q tag in
/// the frame, an IPv4 header with the most options, the ports (for IPv6:
/// the fixed header, 20 bytes of extension headers, the ports).
const HEADERS: u32 = 14 + 4 + 60 + 4;

/// What the kernel copies of each frame: the largest caplen a consumer
/// gets, and never less than the headers the exact first match and a
/// flows consumer's key read (each consumer is cut to its own caplen).
fn kernel_snap(list: &FilterList, max_caplen: u32) -> u32 {
    list.consumers
        .iter()
        .map(|c| c.caplen.min(max_caplen))
        .max()
        .unwrap_or(0)
        .max(HEADERS)
}

/// Installs `list`: kernel filter first (nothing changes when it fails),
/// then the outputs, keeping the connections of consumers that stay.
fn install(
    cfg: &PointConfig,
    handle: &FilterHandle,
    installed: &RwLock<Arc<Installed>>,
    list: FilterList,
    key: &Arc<CryptoPan>,
) -> Result<String, (String, String)> {
    let snap = kernel_snap(&list, cfg.max_caplen);
    let filters: Vec<_> = list.filters.iter().map(|f| &f.filter).collect();
    let prog = compile(&filters, snap);
    if let Err(e) = handle.attach(&prog) {
        let hint = if prog.len() > 4096 {
            " (over BPF_MAXINSNS, 4096)"
        } else {
            ""
        };
        return Err((
            list.version.clone(),
            format!(
                "attaching {} instructions for {} filters (version {}): {e}{hint}",
                prog.len(),
                filters.len(),
                list.version
            ),
        ));
    }
    let old = installed.read().map(|i| i.clone()).unwrap_or_default();
    let outputs = list
        .consumers
        .iter()
        .map(|spec| {
            let mut spec = spec.clone();
            spec.caplen = spec.caplen.min(cfg.max_caplen);
            match old.outputs.iter().find(|o| same_output(&o.spec, &spec)) {
                Some(o) => o.clone(),
                None => Arc::new(Output::start(
                    spec,
                    cfg.consumer_buffer,
                    key.clone(),
                    cfg.consumer_tls.clone(),
                )),
            }
        })
        .collect();
    let version = list.version.clone();
    if let Ok(mut slot) = installed.write() {
        *slot = Arc::new(Installed { list, outputs });
    }
    // Outputs only the old list held end here (their threads close).
    drop(old);
    Ok(version)
}

fn report(
    cfg: &PointConfig,
    installed: &RwLock<Arc<Installed>>,
    counts: &Counts,
    install_error: Option<&str>,
) -> Result<(), String> {
    let current = installed.read().map(|i| i.clone()).unwrap_or_default();
    let body = Report {
        version: (!current.list.version.is_empty()).then_some(current.list.version.as_str()),
        install_error,
        frames: counts.frames.load(Ordering::Relaxed),
        matched: counts.matched.load(Ordering::Relaxed),
        kernel_drops: counts.kernel_drops.load(Ordering::Relaxed),
        consumers: current.outputs.iter().map(|o| o.report()).collect(),
    };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let path = format!("/api/v1/points/{}/report", cfg.name);
    match call(cfg.link(), "POST", &path, Some(&body)) {
        Ok((204, _)) => Ok(()),
        Ok((s, b)) => Err(format!(
            "{path}: status {s}: {}",
            String::from_utf8_lossy(&b)
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn capture_loop(
    mut ring: PacketRing,
    interface: &str,
    installed: &RwLock<Arc<Installed>>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // The list is read once a block is ready, not before the wait:
        // frames after an install never go through the list it replaced.
        let mut snapshot: Option<Arc<Installed>> = None;
        let r = ring.next_block(100, |pkt| {
            let current = snapshot
                .get_or_insert_with(|| installed.read().map(|i| i.clone()).unwrap_or_default());
            counts.frames.fetch_add(1, Ordering::Relaxed);
            let tci = pkt.vlan.map(|(_, tci)| tci);
            let Some(fields) = FrameFields::parse(pkt.data, tci) else {
                return;
            };
            let Some(entry) = current.list.first_match(interface, &fields) else {
                return;
            };
            counts.matched.fetch_add(1, Ordering::Relaxed);
            for &i in &entry.consumers {
                if let Some(o) = current.outputs.get(i) {
                    o.offer(pkt.ts_ns, pkt.wire_len, pkt.data, interface, &fields);
                }
            }
        });
        if let Err(e) = r {
            tracing::warn!(%interface, error = %e, "DPMI capture failed");
            return;
        }
        if last_stats.elapsed() >= Duration::from_secs(1) {
            if let Ok((_, drops)) = ring.statistics() {
                counts.kernel_drops.fetch_add(drops, Ordering::Relaxed);
            }
            last_stats = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qosloop_schema::dpmi::{Delivery, Filter, PointFilter};

    /// Consumers that all take the smallest caplen (34) still have their
    /// port filters matched: the kernel leaves the point the ports, also
    /// after a VLAN tag in the frame and the longest IPv4 header.
    #[test]
    fn the_kernel_leaves_the_point_the_ports_at_the_smallest_caplen() {
        let filter = Filter::from_json(&serde_json::json!({"dst_port": "53"})).unwrap();
        let list = FilterList {
            version: "1".into(),
            filters: vec![PointFilter {
                filter: filter.clone(),
                consumers: vec![0],
            }],
            consumers: vec![ConsumerSpec {
                address: "127.0.0.1:9".into(),
                delivery: Delivery::Flows,
                caplen: 34,
                anonymise: false,
                refilter: false,
                exact: Vec::new(),
            }],
        };
        let mut frame = [0u8; 18 + 60 + 8 + 100];
        frame[12..14].copy_from_slice(&[0x81, 0x00]);
        frame[16..18].copy_from_slice(&[0x08, 0x00]);
        frame[18] = 0x4f; // IHL 15: 60 bytes
        frame[27] = 17;
        frame[18 + 60 + 2..18 + 60 + 4].copy_from_slice(&53u16.to_be_bytes());
        let snap = kernel_snap(&list, 128) as usize;
        let fields = FrameFields::parse(&frame[..snap], None).unwrap();
        assert_eq!(fields.ports.map(|p| p.1), Some(53));
        assert!(list.first_match("eth0", &fields).is_some());
    }
}
