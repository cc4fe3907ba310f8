//! Delivery to one consumer: a bounded queue in front of a thread that
//! connects to the consumer and writes either a pcap stream (frame
//! headers, cut to the consumer's caplen) or flow records (JSON Lines,
//! one line per flow and second). A consumer that is not connected or
//! reads too slowly loses frames — counted for it alone, by reason — and
//! holds up nobody else: the capture thread never waits on a consumer.

use super::cryptopan::{CachedPan, CryptoPan};
use qosloop_schema::dpmi::{ConsumerSpec, Delivery, FrameFields};
use serde::Serialize;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_rustls::rustls::{ClientConfig, ClientConnection, StreamOwned};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(300);
/// A write that makes no progress this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a point showing its certificate waits for the consumer's
/// verdict on it after the handshake.
const VERDICT_WAIT: Duration = Duration::from_millis(300);
const FLOW_INTERVAL: Duration = Duration::from_secs(1);
/// Flows one flows consumer may hold per interval; more are dropped (full).
const MAX_FLOWS: usize = 65_536;

/// What a point did for one consumer (reported to the controller).
#[derive(Debug, Default)]
pub struct OutputCounters {
    pub delivered: AtomicU64,
    pub bytes: AtomicU64,
    /// The queue was full: the consumer reads too slowly.
    pub dropped_full: AtomicU64,
    /// The consumer was not connected.
    pub dropped_disconnected: AtomicU64,
    pub connected: AtomicBool,
    pub error: Mutex<Option<String>>,
}

/// The counters of one consumer as numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ConsumerReport {
    pub address: String,
    pub delivered: u64,
    pub bytes: u64,
    pub dropped_full: u64,
    pub dropped_disconnected: u64,
    pub connected: bool,
    pub error: Option<String>,
}

struct Item {
    ts_ns: u64,
    wire_len: u32,
    payload: Payload,
}

/// What a consumer is sent of a frame: the frame cut to its caplen, or
/// for a flows consumer only the flow key (read from the whole frame).
enum Payload {
    Frame(Vec<u8>),
    Flow(FlowKey),
}

/// One consumer's queue and writer thread (which ends when this drops).
#[derive(Debug)]
pub struct Output {
    pub spec: ConsumerSpec,
    pub counters: Arc<OutputCounters>,
    tx: Option<SyncSender<Item>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.payload {
            Payload::Frame(d) => write!(f, "Item({} bytes)", d.len()),
            Payload::Flow(k) => write!(f, "Item({k:?})"),
        }
    }
}

impl Output {
    /// Starts delivering to `spec.address` through a queue of `capacity`
    /// frames; `key` anonymises addresses when the consumer asked for it
    /// (in the writer thread: the capture thread only copies).
    /// With `tls` the stream is TLS, the consumer's certificate checked
    /// for the IP address it is reached at.
    pub fn start(
        spec: ConsumerSpec,
        capacity: usize,
        key: Arc<CryptoPan>,
        tls: Option<Arc<ClientConfig>>,
    ) -> Output {
        let (tx, rx) = mpsc::sync_channel::<Item>(capacity.max(1));
        let counters = Arc::new(OutputCounters::default());
        let (c, s) = (counters.clone(), spec.clone());
        let anon = spec.anonymise.then(|| CachedPan::new(key));
        let thread = std::thread::Builder::new()
            .name(format!("dpmi-out-{}", spec.address))
            .spawn(move || writer(s, rx, c, anon, tls))
            .ok();
        if thread.is_none() {
            set_error(&counters, "cannot start its writer thread".into());
        }
        Output {
            spec,
            counters,
            tx: Some(tx),
            thread,
        }
    }

    /// Offers a frame (its header `fields` read once by the caller);
    /// never blocks.
    pub fn offer(
        &self,
        ts_ns: u64,
        wire_len: u32,
        frame: &[u8],
        interface: &str,
        fields: &FrameFields,
    ) {
        let Some(tx) = &self.tx else { return };
        if !self.spec.exact.is_empty()
            && !self.spec.exact.iter().any(|f| f.matches(interface, fields))
        {
            return;
        }
        if !self.counters.connected.load(Ordering::Relaxed) {
            self.counters
                .dropped_disconnected
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let payload = match self.spec.delivery {
            Delivery::Packets => {
                let cut = frame.len().min(self.spec.caplen as usize);
                Payload::Frame(frame[..cut].to_vec())
            }
            // IP frames make flows (IPv6: the upper-layer protocol after
            // the extension headers, 0 when the chain could not be walked).
            Delivery::Flows => {
                let (sp, dp) = fields.ports.unwrap_or((0, 0));
                match (fields.ip, fields.ip6) {
                    (Some((proto, src, dst)), _) => Payload::Flow((
                        Ipv4Addr::from(src).into(),
                        Ipv4Addr::from(dst).into(),
                        proto,
                        sp,
                        dp,
                    )),
                    (None, Some((src, dst))) => Payload::Flow((
                        Ipv6Addr::from(src).into(),
                        Ipv6Addr::from(dst).into(),
                        fields.ip6_proto.unwrap_or(0),
                        sp,
                        dp,
                    )),
                    (None, None) => return,
                }
            }
        };
        match tx.try_send(Item {
            ts_ns,
            wire_len,
            payload,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters
                    .dropped_disconnected
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn report(&self) -> ConsumerReport {
        let c = &self.counters;
        ConsumerReport {
            address: self.spec.address.clone(),
            delivered: c.delivered.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            dropped_full: c.dropped_full.load(Ordering::Relaxed),
            dropped_disconnected: c.dropped_disconnected.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
            error: c.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_error(c: &OutputCounters, e: String) {
    if let Ok(mut slot) = c.error.lock() {
        *slot = Some(e);
    }
}

/// The pcap file header: microsecond timestamps, Ethernet.
fn pcap_header(snaplen: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&snaplen.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// Writes one pcap record (header, then the frame); returns its length.
fn write_pcap_record(
    w: &mut impl Write,
    ts_ns: u64,
    wire_len: u32,
    data: &[u8],
) -> std::io::Result<usize> {
    let secs = (ts_ns / 1_000_000_000) as u32;
    let usecs = ((ts_ns % 1_000_000_000) / 1000) as u32;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&secs.to_le_bytes());
    h[4..8].copy_from_slice(&usecs.to_le_bytes());
    h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&wire_len.to_le_bytes());
    w.write_all(&h)?;
    w.write_all(data)?;
    Ok(h.len() + data.len())
}

/// A flow record as a flows consumer reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FlowLine {
    pub src_addr: String,
    pub dst_addr: String,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Addresses (IPv4 or IPv6), protocol, ports.
type FlowKey = (IpAddr, IpAddr, u8, u16, u16);

fn writer(
    spec: ConsumerSpec,
    rx: mpsc::Receiver<Item>,
    c: Arc<OutputCounters>,
    mut anon: Option<CachedPan>,
    tls: Option<Arc<ClientConfig>>,
) {
    let Ok(addr) = spec.address.parse::<SocketAddr>() else {
        set_error(&c, format!("{:?} is not IP:PORT", spec.address));
        return;
    };
    loop {
        let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                set_error(&c, format!("connect: {e}"));
                // Wait, but end at once when the output is dropped.
                match rx.recv_timeout(RETRY) {
                    Err(RecvTimeoutError::Disconnected) => return,
                    _ => continue,
                }
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Write + Send> = match &tls {
            None => Box::new(stream),
            Some(cfg) => match tls_connect(cfg, addr, stream) {
                Ok(s) => Box::new(s),
                Err(e) => {
                    set_error(&c, format!("TLS: {e}"));
                    match rx.recv_timeout(RETRY) {
                        Err(RecvTimeoutError::Disconnected) => return,
                        _ => continue,
                    }
                }
            },
        };
        let mut w = BufWriter::with_capacity(64 * 1024, stream);
        if spec.delivery == Delivery::Packets && w.write_all(&pcap_header(spec.caplen)).is_err() {
            continue;
        }
        c.connected.store(true, Ordering::Relaxed);
        let ended = serve(&spec, &rx, &c, &mut w, anon.as_mut());
        c.connected.store(false, Ordering::Relaxed);
        // What was queued for a connection that broke is lost.
        while rx.try_recv().is_ok() {
            c.dropped_disconnected.fetch_add(1, Ordering::Relaxed);
        }
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::info!(consumer = %spec.address, error = %e, "DPMI consumer connection ended");
                set_error(&c, format!("write: {e}"));
            }
        }
    }
}

/// A TLS client stream over `tcp`, its handshake done (bounded by the
/// socket's timeouts) and the consumer's certificate checked for `addr`'s IP.
fn tls_connect(
    cfg: &Arc<ClientConfig>,
    addr: SocketAddr,
    mut tcp: TcpStream,
) -> std::io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let name =
        qosloop_runtime::tls::server_name(&addr.ip().to_string()).map_err(std::io::Error::other)?;
    let mut conn = ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    let _ = tcp.set_read_timeout(Some(WRITE_TIMEOUT));
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    // Under TLS 1.3 the client's handshake ends before the server has
    // judged the client's certificate: when the point shows one, wait a
    // moment for the consumer's verdict (an alert, or its session tickets)
    // so that a refusal reads as one, not as a later write error.
    if cfg.client_auth_cert_resolver.has_certs() {
        let _ = tcp.set_read_timeout(Some(VERDICT_WAIT));
        match conn.read_tls(&mut tcp) {
            Ok(0) => {
                return Err(std::io::Error::other(
                    "the consumer closed the connection after the handshake",
                ))
            }
            Ok(_) => {
                conn.process_new_packets()
                    .map_err(|e| std::io::Error::other(format!("the consumer refused: {e}")))?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
        let _ = tcp.set_read_timeout(Some(WRITE_TIMEOUT));
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// Writes until the output is dropped (Ok) or the connection fails.
fn serve(
    spec: &ConsumerSpec,
    rx: &mpsc::Receiver<Item>,
    c: &OutputCounters,
    w: &mut BufWriter<Box<dyn Write + Send>>,
    mut anon: Option<&mut CachedPan>,
) -> std::io::Result<()> {
    let mut flows: HashMap<FlowKey, FlowLine> = HashMap::new();
    let mut flushed = Instant::now();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(it) => Some(it),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                write_flows(&mut flows, c, w)?;
                return w.flush();
            }
        };
        let items = first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(1024));
        for it in items {
            match it.payload {
                Payload::Frame(mut data) => {
                    if let Some(a) = anon.as_deref_mut() {
                        a.anonymise_frame(&mut data);
                    }
                    let n = write_pcap_record(w, it.ts_ns, it.wire_len, &data)?;
                    c.delivered.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Payload::Flow((src, dst, proto, sp, dp)) => {
                    let key = match anon.as_deref_mut() {
                        Some(a) => (a.anonymise_ip(src), a.anonymise_ip(dst), proto, sp, dp),
                        None => (src, dst, proto, sp, dp),
                    };
                    add_flow(&mut flows, key, it.ts_ns, it.wire_len, c);
                }
            }
        }
        if spec.delivery == Delivery::Flows && flushed.elapsed() >= FLOW_INTERVAL {
            write_flows(&mut flows, c, w)?;
            flushed = Instant::now();
        }
        w.flush()?;
        // A peer that closed its end: detected by the next write.
    }
}

fn add_flow(
    flows: &mut HashMap<FlowKey, FlowLine>,
    key: FlowKey,
    ts_ns: u64,
    wire_len: u32,
    c: &OutputCounters,
) {
    if !flows.contains_key(&key) && flows.len() >= MAX_FLOWS {
        c.dropped_full.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (src, dst, proto, sp, dp) = key;
    let e = flows.entry(key).or_insert_with(|| FlowLine {
        src_addr: src.to_string(),
        dst_addr: dst.to_string(),
        proto,
        src_port: sp,
        dst_port: dp,
        first_ns: ts_ns,
        ..FlowLine::default()
    });
    e.packets += 1;
    e.bytes += u64::from(wire_len);
    e.last_ns = ts_ns;
}

fn write_flows(
    flows: &mut HashMap<FlowKey, FlowLine>,
    c: &OutputCounters,
    w: &mut BufWriter<Box<dyn Write + Send>>,
) -> std::io::Result<()> {
    for (_, f) in flows.drain() {
        let mut line = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line)?;
        c.delivered.fetch_add(f.packets, Ordering::Relaxed);
        c.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f
    }

    /// A packets consumer that asked for anonymised frames reads each
    /// frame with both addresses replaced by their Crypto-PAn image, the
    /// same address always the same image.
    #[test]
    fn anonymised_packets_reach_the_consumer() {
        let key = Arc::new(CryptoPan::new(&[9u8; 32]));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = ConsumerSpec {
            address: listener.local_addr().unwrap().to_string(),
            delivery: Delivery::Packets,
            caplen: 64,
            anonymise: true,
            refilter: false,
            exact: Vec::new(),
        };
        let out = Output::start(spec, 16, key.clone(), None);
        let (mut peer, _) = listener.accept().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !out.counters.connected.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let frames = [
            frame([10, 0, 0, 1], [10, 0, 0, 2]),
            frame([10, 0, 0, 2], [10, 0, 0, 1]),
            frame([10, 0, 0, 1], [192, 168, 1, 1]),
        ];
        for (i, f) in frames.iter().enumerate() {
            let fields = FrameFields::parse(f, None).unwrap();
            out.offer(i as u64 * 1000, f.len() as u32, f, "eth0", &fields);
        }
        drop(out);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        let mut at = 24;
        for f in &frames {
            let len = u32::from_le_bytes(got[at + 8..at + 12].try_into().unwrap()) as usize;
            assert_eq!(len, f.len());
            let body = &got[at + 16..at + 16 + len];
            let mut want = f.clone();
            key.anonymise_frame(&mut want);
            assert_ne!(body[26..34], f[26..34]);
            assert_eq!(body, &want[..]);
            at += 16 + len;
        }
        assert_eq!(at, got.len());
    }

    /// A flows consumer's caplen cuts what it would be sent, not what the
    /// point reads for its flow key: at the smallest caplen (34, no room
    /// for the ports after the IP header) its flows still have their ports.
    #[test]
    fn a_flows_consumer_at_the_smallest_caplen_gets_the_ports() {
        let key = Arc::new(CryptoPan::new(&[9u8; 32]));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = ConsumerSpec {
            address: listener.local_addr().unwrap().to_string(),
            delivery: Delivery::Flows,
            caplen: 34,
            anonymise: false,
            refilter: false,
            exact: Vec::new(),
        };
        let out = Output::start(spec, 16, key, None);
        let (mut peer, _) = listener.accept().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !out.counters.connected.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut f = frame([10, 0, 0, 1], [10, 0, 0, 2]);
        f[34..36].copy_from_slice(&4000u16.to_be_bytes());
        f[36..38].copy_from_slice(&53u16.to_be_bytes());
        let fields = FrameFields::parse(&f, None).unwrap();
        out.offer(1000, 60, &f, "eth0", &fields);
        out.offer(2000, 60, &f, "eth0", &fields);
        drop(out);
        let mut got = String::new();
        peer.read_to_string(&mut got).unwrap();
        let lines: Vec<FlowLine> = got
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            vec![FlowLine {
                src_addr: "10.0.0.1".into(),
                dst_addr: "10.0.0.2".into(),
                proto: 17,
                src_port: 4000,
                dst_port: 53,
                packets: 2,
                bytes: 120,
                first_ns: 1000,
                last_ns: 2000,
            }]
        );
    }

    /// With `--dpmi-consumer-ca` the stream is TLS: a consumer whose
    /// certificate chains to the CA reads the pcap stream through it; one
    /// whose certificate does not gets nothing, the point says why and
    /// counts the frames it could not deliver.
    #[test]
    fn tls_consumers_read_the_stream_and_an_untrusted_one_gets_nothing() {
        use qosloop_testkit::harness::{require_binary, test_pki};
        use tokio_rustls::rustls::ServerConnection;
        qosloop_testkit::need!(require_binary("openssl", "openssl"));
        let (pki, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        test_pki(pki.path()).unwrap();
        test_pki(other.path()).unwrap();
        let server = qosloop_runtime::tls::server_config_with(
            &pki.path().join("server.pem"),
            &pki.path().join("server.key"),
            None,
        )
        .unwrap();
        let key = Arc::new(CryptoPan::new(&[9u8; 32]));
        let frames = [
            frame([10, 0, 0, 1], [10, 0, 0, 2]),
            frame([10, 0, 0, 3], [10, 0, 0, 4]),
        ];
        for (ca, trusted) in [(pki.path(), true), (other.path(), false)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let spec = ConsumerSpec {
                address: listener.local_addr().unwrap().to_string(),
                delivery: Delivery::Packets,
                caplen: 40,
                anonymise: false,
                refilter: false,
                exact: Vec::new(),
            };
            let tls = qosloop_runtime::tls::client_config_with(&ca.join("ca.pem"), None).unwrap();
            let out = Output::start(spec, 16, key.clone(), Some(tls));
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut s = StreamOwned::new(ServerConnection::new(server.clone()).unwrap(), tcp);
            let until = Instant::now() + Duration::from_secs(10);
            if !trusted {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                assert!(
                    got.is_empty(),
                    "an untrusted consumer read {} bytes",
                    got.len()
                );
                while out.report().error.is_none() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let r = out.report();
                let error = r.error.unwrap_or_default();
                assert!(error.starts_with("TLS: ") && !r.connected, "{error}");
                let fields = FrameFields::parse(&frames[0], None).unwrap();
                out.offer(0, 42, &frames[0], "eth0", &fields);
                assert_eq!(out.report().dropped_disconnected, 1);
                continue;
            }
            // The handshake needs the server's side before `connected`.
            let mut head = [0u8; 24];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head[..4], 0xa1b2_c3d4u32.to_le_bytes());
            while !out.counters.connected.load(Ordering::Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            for (i, f) in frames.iter().enumerate() {
                let fields = FrameFields::parse(f, None).unwrap();
                out.offer(i as u64 * 1000, f.len() as u32, f, "eth0", &fields);
            }
            drop(out);
            let mut got = Vec::new();
            // The point closes without close_notify: the data read stays.
            let _ = s.read_to_end(&mut got);
            let mut at = 0;
            for f in &frames {
                let len = u32::from_le_bytes(got[at + 8..at + 12].try_into().unwrap()) as usize;
                assert_eq!(&got[at + 16..at + 16 + len], &f[..40]);
                at += 16 + len;
            }
            assert_eq!(at, got.len());
        }
    }
}
