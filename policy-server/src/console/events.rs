//! Live updates: one bus of typed events (`rates`, `decisions`, and any
//! kind a later part of the server registers, e.g. knowledge-base events),
//! served as server-sent events at `/api/v1/events?types=a,b`.
//!
//! Each client has its own bounded queue. [`EventBus::publish`] never
//! waits: it offers the event to every queue with `try_send`; a client
//! whose queue is full (it reads slower than events come) loses that event,
//! counted, and is told so with a `lagged` event (`{"dropped": n}`) before
//! its next one; a client that is gone (its connection closed, so its
//! stream and queue were dropped) is removed at the next publish. So a slow
//! or vanished client costs the others nothing but one failed `try_send`.
//! A client that stops reading altogether is closed by the web server's
//! idle timeout once its socket buffers are full; keep-alive comments every
//! 15 s keep a quiet stream from looking idle.

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

use super::params::{ApiError, Params};

/// The kinds the server itself publishes.
pub const BUILTIN_KINDS: [&str; 2] = ["rates", "decisions"];

/// One published event.
#[derive(Debug)]
struct Item {
    seq: u64,
    kind: Arc<str>,
    data: String,
}

#[derive(Debug)]
struct Client {
    id: u64,
    /// `None`: every kind.
    kinds: Option<BTreeSet<Arc<str>>>,
    tx: mpsc::Sender<Arc<Item>>,
    lagged: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    /// Events a full client queue could not take.
    dropped_slow: AtomicU64,
    /// Clients removed because they were gone.
    clients_gone: AtomicU64,
    /// Subscriptions refused at the client limit.
    refused: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    kinds: Mutex<BTreeSet<Arc<str>>>,
    clients: Mutex<Vec<Client>>,
    next_id: AtomicU64,
    seq: AtomicU64,
    queue: usize,
    max_clients: usize,
    counters: Counters,
    closed: std::sync::atomic::AtomicBool,
}

/// The bus; clones share it.
#[derive(Clone, Debug)]
pub struct EventBus(Arc<Inner>);

/// The bus's counters now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EventStats {
    pub clients: usize,
    pub published: u64,
    pub dropped_slow: u64,
    pub clients_gone: u64,
    pub refused: u64,
}

/// One client's end: its queue, and its place on the bus until dropped.
#[derive(Debug)]
pub struct Subscription {
    bus: EventBus,
    id: u64,
    rx: mpsc::Receiver<Arc<Item>>,
    lagged: Arc<AtomicU64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut clients = self.bus.clients();
        clients.retain(|c| c.id != self.id);
    }
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Event {
        seq: u64,
        kind: String,
        data: String,
    },
    /// Events this client lost since the last one it got.
    Lagged(u64),
}

impl Subscription {
    /// The next event, or `None` when the bus is gone.
    pub async fn next(&mut self) -> Option<Received> {
        let n = self.lagged.swap(0, Ordering::Relaxed);
        if n > 0 {
            return Some(Received::Lagged(n));
        }
        let item = self.rx.recv().await?;
        Some(Received::Event {
            seq: item.seq,
            kind: item.kind.to_string(),
            data: item.data.clone(),
        })
    }
}

impl EventBus {
    /// A bus whose clients each queue at most `queue` events, at most
    /// `max_clients` at once, knowing [`BUILTIN_KINDS`].
    pub fn new(queue: usize, max_clients: usize) -> EventBus {
        EventBus(Arc::new(Inner {
            kinds: Mutex::new(BUILTIN_KINDS.iter().map(|k| Arc::from(*k)).collect()),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            seq: AtomicU64::new(0),
            queue: queue.max(1),
            max_clients,
            counters: Counters::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.0
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn kinds(&self) -> std::sync::MutexGuard<'_, BTreeSet<Arc<str>>> {
        self.0.kinds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `kind` known, so that clients may ask for it.
    pub fn register_kind(&self, kind: &str) {
        self.kinds().insert(Arc::from(kind));
    }

    /// The known kinds, sorted.
    pub fn known_kinds(&self) -> Vec<String> {
        self.kinds().iter().map(|k| k.to_string()).collect()
    }

    /// Offers an event to every client that asked for its kind; never
    /// waits. Returns the event's sequence number.
    pub fn publish(&self, kind: &str, data: &serde_json::Value) -> u64 {
        let seq = self.0.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.0.counters.published.fetch_add(1, Ordering::Relaxed);
        let item = Arc::new(Item {
            seq,
            kind: Arc::from(kind),
            data: data.to_string(),
        });
        let c = &self.0.counters;
        self.clients().retain(|client| {
            if client.kinds.as_ref().is_some_and(|k| !k.contains(kind)) {
                return true;
            }
            match client.tx.try_send(item.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    client.lagged.fetch_add(1, Ordering::Relaxed);
                    c.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    c.clients_gone.fetch_add(1, Ordering::Relaxed);
                    false
                }
            }
        });
        seq
    }

    /// A new client for `kinds` (`None`: all), or `None` at the client
    /// limit.
    pub fn subscribe(&self, kinds: Option<BTreeSet<String>>) -> Option<Subscription> {
        let mut clients = self.clients();
        if self.0.closed.load(Ordering::Relaxed) {
            return None;
        }
        if clients.len() >= self.0.max_clients {
            self.0.counters.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let (tx, rx) = mpsc::channel(self.0.queue);
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(AtomicU64::new(0));
        clients.push(Client {
            id,
            kinds: kinds.map(|k| k.into_iter().map(Arc::from).collect()),
            tx,
            lagged: lagged.clone(),
        });
        Some(Subscription {
            bus: self.clone(),
            id,
            rx,
            lagged,
        })
    }

    /// Ends every client's stream (after what it has queued) and refuses
    /// new ones: the server is stopping.
    pub fn close(&self) {
        let mut clients = self.clients();
        self.0.closed.store(true, Ordering::Relaxed);
        clients.clear();
    }

    pub fn stats(&self) -> EventStats {
        let c = &self.0.counters;
        EventStats {
            clients: self.clients().len(),
            published: c.published.load(Ordering::Relaxed),
            dropped_slow: c.dropped_slow.load(Ordering::Relaxed),
            clients_gone: c.clients_gone.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }

    /// The kinds a `types=` parameter names (absent or empty: all).
    fn parse_kinds(&self, p: &Params) -> Result<Option<BTreeSet<String>>, ApiError> {
        let Some(text) = p.get("types").filter(|t| !t.trim().is_empty()) else {
            return Ok(None);
        };
        let known = self.known_kinds();
        let mut kinds = BTreeSet::new();
        for k in text.split(',').map(str::trim) {
            if !known.iter().any(|x| x == k) {
                return Err(ApiError::bad(
                    "types",
                    format!("unknown event type {k:?} (known: {})", known.join(", ")),
                ));
            }
            kinds.insert(k.to_owned());
        }
        Ok(Some(kinds))
    }
}

/// `GET /api/v1/events?types=…`: the event stream.
pub async fn events(
    State(bus): State<EventBus>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["types"])?;
    let kinds = bus.parse_kinds(&p)?;
    let Some(sub) = bus.subscribe(kinds) else {
        let mut e = ApiError::bad("types", "too many event clients: try again later");
        e.status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
        return Err(e);
    };
    Ok(sse(sub))
}

/// A subscription as a server-sent-event stream: each event with its
/// sequence number as `id` and its kind as `event`; `lagged` when the
/// client lost some.
pub fn sse(sub: Subscription) -> Response {
    let stream = futures_util::stream::unfold(sub, |mut sub| async move {
        let event = match sub.next().await? {
            Received::Lagged(n) => Event::default()
                .event("lagged")
                .data(json!({ "dropped": n }).to_string()),
            Received::Event { seq, kind, data } => {
                Event::default().id(seq.to_string()).event(kind).data(data)
            }
        };
        Some((Ok::<_, std::convert::Infallible>(event), sub))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_loses_events_for_its_client_only_and_says_so() {
        let bus = EventBus::new(4, 10);
        let mut fast = bus.subscribe(None).unwrap();
        let mut slow = bus.subscribe(None).unwrap();
        let mut only_dec = bus
            .subscribe(Some(BTreeSet::from(["decisions".to_owned()])))
            .unwrap();
        let mut got = Vec::new();
        for i in 0..10 {
            bus.publish("rates", &json!({ "i": i }));
            match fast.next().await.unwrap() {
                Received::Event { seq, kind, .. } => got.push((seq, kind)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got.len(), 10);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (s, k))| *s == i as u64 + 1 && k == "rates"));
        // The slow client kept the first 4 and lost 6, and hears it first.
        assert_eq!(slow.next().await, Some(Received::Lagged(6)));
        for seq in 1..=4 {
            assert!(matches!(slow.next().await, Some(Received::Event { seq: s, .. }) if s == seq));
        }
        bus.publish("decisions", &json!([]));
        assert!(matches!(
            only_dec.next().await,
            Some(Received::Event { seq: 11, ref kind, .. }) if kind == "decisions"
        ));
        let stats = bus.stats();
        assert_eq!(
            (stats.published, stats.dropped_slow, stats.clients),
            (11, 6, 3)
        );
        // A client that is gone is removed.
        drop(slow);
        assert_eq!(bus.stats().clients, 2);
        // Closing ends every stream after what it holds.
        bus.publish("rates", &json!(1));
        bus.close();
        for seq in [11, 12] {
            assert!(matches!(fast.next().await, Some(Received::Event { seq: s, .. }) if s == seq));
        }
        assert_eq!(fast.next().await, None);
        assert!(bus.subscribe(None).is_none());
    }

    #[test]
    fn clients_over_the_limit_are_refused_and_kinds_can_be_added() {
        let bus = EventBus::new(4, 1);
        let _one = bus.subscribe(None).unwrap();
        assert!(bus.subscribe(None).is_none());
        assert_eq!(bus.stats().refused, 1);
        bus.register_kind("kb");
        assert_eq!(bus.known_kinds(), ["decisions", "kb", "rates"]);
    }
}
