//! The decoder: per-exporter template state, budgets and the exporter
//! table; the walk over one message is in [`walk`](super::walk).
//! Pure (no sockets, no clock): the receivers hand it bytes, the source and
//! the receive time, and store what it appends.

use super::domain::{Domain, Template};
use super::persist::{self, TemplateChange};
use super::plan::Plan;
use super::sink::RecordSink;
use super::stats::{Counters, DropReason};
use super::walk::Walk;
use super::wire::{be16, parse_header, Version};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// The bounds of everything an exporter can make the decoder hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// UDP templates not refreshed for this long are forgotten (ns).
    pub template_expiry_ns: u64,
    /// Templates (data and options) per exporter and domain.
    pub max_templates: usize,
    /// Fields in one template.
    pub max_fields: usize,
    /// Data sets held for a missing template, per exporter and domain.
    pub pending_sets: usize,
    /// Bytes of those sets, per exporter and domain.
    pub pending_bytes: usize,
    /// Bytes of held sets over all exporters of the decoder (each set is
    /// charged its length plus [`PENDING_SET_OVERHEAD`], so that empty sets
    /// are not free).
    pub pending_total_bytes: usize,
    /// How long a held set waits for its template (ns).
    pub pending_age_ns: u64,
    /// Exporters tracked at once (a UDP exporter is address + port; a TCP
    /// one is a session).
    pub max_exporters: usize,
    /// UDP exporters (source ports) tracked at once from one address.
    pub max_exporters_per_addr: usize,
    /// Observation domains per exporter.
    pub max_domains: usize,
    /// Samplers remembered per domain.
    pub max_samplers: usize,
    /// Flows with total counters tracked per domain (to turn totals into
    /// deltas), and how long one is kept without a report (ns).
    pub max_totals: usize,
    pub totals_idle_ns: u64,
    /// Budgets of the whole decoder, over all its exporters and domains:
    /// template fields (summed over every template), flows tracked for
    /// their totals, and observation domains. Use never shrinks between
    /// sweeps (freed state is given back at the next [`Decoder::sweep`]).
    pub max_template_fields_total: usize,
    pub max_totals_total: usize,
    pub max_domains_total: usize,
    /// Flow records one message may produce (data that waited for its
    /// template included); the rest is dropped and counted.
    pub max_records_per_message: usize,
    /// Only these source addresses are decoded, when set.
    pub allow: Option<HashSet<IpAddr>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            template_expiry_ns: 1_800 * 1_000_000_000,
            max_templates: 1024,
            max_fields: 512,
            pending_sets: 1024,
            pending_bytes: 4 << 20,
            pending_total_bytes: 64 << 20,
            pending_age_ns: 120 * 1_000_000_000,
            max_exporters: 4096,
            max_exporters_per_addr: 16,
            max_domains: 64,
            max_samplers: 256,
            max_totals: 1 << 18,
            totals_idle_ns: 3_600 * 1_000_000_000,
            max_records_per_message: 4096,
            max_template_fields_total: 1 << 20,
            max_totals_total: 1 << 19,
            max_domains_total: 8192,
            allow: None,
        }
    }
}

/// What a held set costs beyond its bytes (its bookkeeping).
pub const PENDING_SET_OVERHEAD: usize = 64;

impl Limits {
    /// These limits for one of `n` decoders that share a process-wide
    /// budget (the UDP threads of a listener, the TCP sessions): the
    /// decoder-wide budgets are divided by `n` (at least 1 each).
    pub fn share(&self, n: usize) -> Limits {
        let n = n.max(1);
        let part = |v: usize| (v / n).max(1);
        Limits {
            pending_total_bytes: part(self.pending_total_bytes),
            max_template_fields_total: part(self.max_template_fields_total),
            max_totals_total: part(self.max_totals_total),
            max_domains_total: part(self.max_domains_total),
            ..self.clone()
        }
    }
}

/// What a decoder holds against its decoder-wide budgets.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Usage {
    pub(super) template_fields: usize,
    pub(super) totals: usize,
    pub(super) domains: usize,
}

/// Who sent a message: a UDP source (address and port) or one TCP session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExporterKey {
    pub addr: SocketAddr,
    /// `None` over UDP; the collector's id of the connection over TCP.
    pub session: Option<u64>,
}

/// What one decoded message was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub version: Version,
    /// IPFIX observation domain, v9 source id, v5 engine type·256 + id.
    pub domain: u32,
    pub sequence: u32,
    /// Flow records appended to the output (data of earlier messages that
    /// waited for a template included).
    pub records: usize,
    /// Bytes of the message (the rest of a datagram is ignored).
    pub len: usize,
}

/// Counters of one exporter and domain; `domain: None` holds what failed
/// before a domain was known (headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExporterStats {
    pub exporter: ExporterKey,
    pub version: Option<Version>,
    pub domain: Option<u32>,
    pub counters: Counters,
    pub templates: usize,
    pub pending_sets: usize,
}

#[derive(Debug, Default)]
struct Exporter {
    counters: Counters,
    domains: HashMap<(Version, u32), Domain>,
    last_seen_ns: u64,
}

/// Decodes NetFlow v5, v9 and IPFIX messages into flow records, keeping
/// the template state of each exporter and observation domain.
///
/// One `Decoder` owns the state of the exporters it is given; a receiver
/// that spreads work over threads sends each exporter to the same decoder
/// (by a hash of its address), so an exporter's templates live in one
/// place.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    exporters: HashMap<ExporterKey, Exporter>,
    /// Drops not charged to a tracked exporter (not allowed; too many).
    unattributed: Counters,
    pending_total: usize,
    usage: Usage,
    changes: Changes,
}

/// Template changes waiting to be stored, one per exporter, domain and id
/// (a redefinition replaces the waiting change of its id), at most
/// [`MAX_CHANGES`]: a message of thousands of redefinitions of one id is
/// one write, not thousands.
#[derive(Debug, Default)]
pub(super) struct Changes(HashMap<(SocketAddr, Version, u32, u16), TemplateChange>);

/// Template changes held between two writes.
const MAX_CHANGES: usize = 1 << 16;

impl Changes {
    /// False when the change could not be kept (too many waiting).
    pub(super) fn push(&mut self, c: TemplateChange) -> bool {
        let key = (c.exporter, c.version, c.domain, c.template_id);
        if self.0.len() >= MAX_CHANGES && !self.0.contains_key(&key) {
            return false;
        }
        self.0.insert(key, c);
        true
    }
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            exporters: HashMap::new(),
            unattributed: Counters::default(),
            pending_total: 0,
            usage: Usage::default(),
            changes: Changes::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes one UDP datagram from `from`, received at `received_ns` (ns
    /// since the epoch), appending its flow records to `out`. A datagram
    /// holds one message; the version is read from its first two bytes.
    /// Problems inside the message (a bad set, a template that does not
    /// compile, data without a template) are counted and the rest decoded;
    /// an `Err` means the whole datagram was dropped, and is counted too.
    pub fn decode_udp<S: RecordSink>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        received_ns: u64,
        out: &mut S,
    ) -> Result<Message, DropReason> {
        self.decode(
            ExporterKey {
                addr: from,
                session: None,
            },
            datagram,
            received_ns,
            out,
        )
    }

    /// Decodes one IPFIX message of TCP session `session` (framed with
    /// [`ipfix_message_len`]); templates are scoped to the session.
    pub fn decode_tcp<S: RecordSink>(
        &mut self,
        from: SocketAddr,
        session: u64,
        message: &[u8],
        received_ns: u64,
        out: &mut S,
    ) -> Result<Message, DropReason> {
        self.decode(
            ExporterKey {
                addr: from,
                session: Some(session),
            },
            message,
            received_ns,
            out,
        )
    }

    /// Forgets a closed TCP session: its templates die with it. Its
    /// counters are returned for the record.
    pub fn close_session(&mut self, from: SocketAddr, session: u64) -> Vec<ExporterStats> {
        let key = ExporterKey {
            addr: from,
            session: Some(session),
        };
        let stats = self.stats_of(&key);
        if let Some(e) = self.exporters.remove(&key) {
            for d in e.domains.values() {
                self.pending_total -= d.pending_bytes;
            }
            self.recount();
        }
        stats
    }

    /// Templates defined, refreshed (now and then, not at every refresh),
    /// withdrawn or expired since the last call: what to write to (or
    /// delete from) the `templates` table. UDP templates only.
    pub fn take_template_changes(&mut self) -> Vec<TemplateChange> {
        std::mem::take(&mut self.changes.0).into_values().collect()
    }

    /// Installs a template loaded from storage for the UDP exporter `from`,
    /// as if it had arrived at `seen_ns`. Returns false (and installs
    /// nothing) when the definition does not parse or compile, or a limit
    /// is reached.
    pub fn restore_template(
        &mut self,
        from: SocketAddr,
        domain: u32,
        template_id: u16,
        definition: &str,
        seen_ns: u64,
    ) -> bool {
        let Some((version, def)) =
            persist::from_text(template_id, definition, self.limits.max_fields)
        else {
            return false;
        };
        let Ok(plan) = Plan::compile(&def, version == Version::V9 && def.options) else {
            return false;
        };
        if !def.options && !plan.makes_flows() {
            return false;
        }
        let key = ExporterKey {
            addr: from,
            session: None,
        };
        let Some(exporter) = exporter_entry(
            &mut self.exporters,
            &self.limits,
            &mut self.unattributed,
            &mut self.usage,
            key,
            seen_ns,
        ) else {
            return false;
        };
        let max_domains = self.limits.max_domains;
        let new_domain = !exporter.domains.contains_key(&(version, domain));
        if new_domain
            && (exporter.domains.len() >= max_domains
                || self.usage.domains >= self.limits.max_domains_total)
        {
            return false;
        }
        if self.usage.template_fields + def.fields.len() > self.limits.max_template_fields_total {
            return false;
        }
        if new_domain {
            self.usage.domains += 1;
        }
        let d = exporter.domains.entry((version, domain)).or_default();
        if d.templates.len() >= self.limits.max_templates && !d.templates.contains_key(&template_id)
        {
            return false;
        }
        self.usage.template_fields += def.fields.len();
        d.templates.insert(
            template_id,
            Template {
                def,
                plan: Arc::new(plan),
                last_seen_ns: seen_ns,
                persisted_ns: seen_ns,
            },
        );
        true
    }

    /// Expires UDP templates, held data and flow totals past their age, and
    /// forgets exporters with nothing left; call about once a second.
    pub fn sweep(&mut self, now_ns: u64) {
        let limits = &self.limits;
        let changes = &mut self.changes;
        let mut freed_total = 0;
        for (key, e) in self.exporters.iter_mut() {
            let expiry = key.session.is_none().then_some(limits.template_expiry_ns);
            for (&(version, domain), d) in e.domains.iter_mut() {
                let (expired, freed) =
                    d.sweep(now_ns, expiry, limits.pending_age_ns, limits.totals_idle_ns);
                freed_total += freed;
                for (template_id, last_seen_ns) in expired {
                    changes.push(TemplateChange {
                        exporter: key.addr,
                        version,
                        domain,
                        template_id,
                        definition: None,
                        // Deleted only if nobody stored it since.
                        seen_ns: last_seen_ns,
                    });
                }
            }
        }
        self.pending_total -= freed_total;
        // A UDP exporter silent past the template expiry, with no template
        // left, is forgotten (its counters were written out before).
        let idle = self.limits.template_expiry_ns;
        let pending_total = &mut self.pending_total;
        self.exporters.retain(|key, e| {
            let keep = key.session.is_some()
                || now_ns.saturating_sub(e.last_seen_ns) <= idle
                || e.domains.values().any(|d| !d.templates.is_empty());
            if !keep {
                // Data it still held (the pending age may exceed the
                // template expiry) gives its bytes back.
                for d in e.domains.values() {
                    *pending_total -= d.pending_bytes;
                }
            }
            keep
        });
        self.recount();
    }

    /// Counts again what the decoder holds against its budgets (what was
    /// freed since the last count is given back).
    fn recount(&mut self) {
        let mut u = Usage::default();
        for e in self.exporters.values() {
            u.domains += e.domains.len();
            for d in e.domains.values() {
                u.totals += d.totals_len();
                u.template_fields += d
                    .templates
                    .values()
                    .map(|t| t.def.fields.len())
                    .sum::<usize>();
            }
        }
        self.usage = u;
    }

    /// Counters of every exporter and domain, and of what was dropped
    /// before an exporter could be tracked (`exporter.addr` unspecified).
    pub fn stats(&self) -> Vec<ExporterStats> {
        let mut out: Vec<ExporterStats> = self
            .exporters
            .keys()
            .flat_map(|k| self.stats_of(k))
            .collect();
        if self.unattributed != Counters::default() {
            out.push(ExporterStats {
                exporter: ExporterKey {
                    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                    session: None,
                },
                version: None,
                domain: None,
                counters: self.unattributed.clone(),
                templates: 0,
                pending_sets: 0,
            });
        }
        out
    }

    fn stats_of(&self, key: &ExporterKey) -> Vec<ExporterStats> {
        let Some(e) = self.exporters.get(key) else {
            return Vec::new();
        };
        let mut out = vec![ExporterStats {
            exporter: *key,
            version: None,
            domain: None,
            counters: e.counters.clone(),
            templates: 0,
            pending_sets: 0,
        }];
        for (&(version, domain), d) in &e.domains {
            out.push(ExporterStats {
                exporter: *key,
                version: Some(version),
                domain: Some(domain),
                counters: d.counters.clone(),
                templates: d.templates.len(),
                pending_sets: d.pending.len(),
            });
        }
        out
    }

    fn decode<S: RecordSink>(
        &mut self,
        key: ExporterKey,
        bytes: &[u8],
        now_ns: u64,
        out: &mut S,
    ) -> Result<Message, DropReason> {
        if let Some(allow) = &self.limits.allow {
            // On a dual-stack socket an IPv4 exporter is ::ffff:a.b.c.d.
            if !allow.contains(&key.addr.ip().to_canonical()) {
                self.unattributed.drop(DropReason::NotAllowed);
                return Err(DropReason::NotAllowed);
            }
        }
        let max_domains = self.limits.max_domains;
        // No state for a source before it has sent a valid header: what
        // fails here is charged to it only when it is already tracked.
        let header = match parse_header(bytes) {
            Ok(h) => h,
            Err(reason) => {
                match self.exporters.get_mut(&key) {
                    Some(e) => e.counters.drop(reason),
                    None => self.unattributed.drop(reason),
                }
                return Err(reason);
            }
        };
        let Some(exporter) = exporter_entry(
            &mut self.exporters,
            &self.limits,
            &mut self.unattributed,
            &mut self.usage,
            key,
            now_ns,
        ) else {
            return Err(DropReason::TooManyExporters);
        };
        if header.version == Version::V5 && key.session.is_some() {
            exporter.counters.drop(DropReason::UnknownVersion);
            return Err(DropReason::UnknownVersion);
        }
        let dkey = (header.version, header.domain);
        if !exporter.domains.contains_key(&dkey) {
            if exporter.domains.len() >= max_domains
                || self.usage.domains >= self.limits.max_domains_total
            {
                exporter.counters.drop(DropReason::TooManyExporters);
                return Err(DropReason::TooManyExporters);
            }
            self.usage.domains += 1;
        }
        let domain = exporter.domains.entry(dkey).or_default();
        domain.last_seen_ns = now_ns;
        domain.counters.messages += 1;
        let before = out.len();
        let mut walk = Walk {
            record_cap: before.saturating_add(self.limits.max_records_per_message),
            abort: None,
            limits: &self.limits,
            pending_total: &mut self.pending_total,
            usage: &mut self.usage,
            changes: &mut self.changes,
            key,
            header,
            now_ns,
            out,
        };
        let units = match header.version {
            Version::V5 => {
                walk.v5(domain, &bytes[..header.message_len]);
                Some(u32::from(header.count))
            }
            Version::V9 => {
                walk.sets(domain, &bytes[header.header_len..header.message_len]);
                Some(1)
            }
            Version::Ipfix => walk.sets(domain, &bytes[header.header_len..header.message_len]),
        };
        domain.track_sequence(header.sequence, units);
        if let Some(reason) = walk.abort {
            // The session must be reset (RFC 7011 §8.1); nothing of this
            // message is kept.
            domain.counters.drop(reason);
            out.truncate(before);
            return Err(reason);
        }
        let records = out.len() - before;
        domain.counters.records += records as u64;
        Ok(Message {
            version: header.version,
            domain: header.domain,
            sequence: header.sequence,
            records,
            len: header.message_len,
        })
    }
}

/// The tracked exporter of `key`, created when there is room.
fn exporter_entry<'a>(
    exporters: &'a mut HashMap<ExporterKey, Exporter>,
    limits: &Limits,
    unattributed: &mut Counters,
    usage: &mut Usage,
    key: ExporterKey,
    now_ns: u64,
) -> Option<&'a mut Exporter> {
    if exporters.contains_key(&key) {
        let e = exporters.get_mut(&key)?;
        e.last_seen_ns = now_ns;
        return Some(e);
    }
    // One address holds at most `max_exporters_per_addr` UDP exporters
    // (source ports), so that one host cannot fill the table.
    let same_addr = |k: &ExporterKey| k.session.is_none() && k.addr.ip() == key.addr.ip();
    let addr_full = key.session.is_none()
        && exporters.keys().filter(|k| same_addr(k)).count() >= limits.max_exporters_per_addr;
    if addr_full || exporters.len() >= limits.max_exporters {
        // Full: the exporter that holds no template and no data, and was
        // heard from longest ago, makes room (its counters go to the
        // unattributed ones); when the address is at its own limit, one of
        // that address. Sources that only ever sent empty messages cannot
        // keep a real exporter out; ones holding templates are kept.
        let victim = exporters
            .iter()
            .filter(|(k, _)| !addr_full || same_addr(k))
            .filter(|(_, e)| {
                e.domains
                    .values()
                    .all(|d| d.templates.is_empty() && d.pending.is_empty())
            })
            .min_by_key(|(_, e)| e.last_seen_ns)
            .map(|(k, _)| *k);
        match victim.and_then(|k| exporters.remove(&k)) {
            Some(gone) => {
                unattributed.add(&gone.counters);
                // Its budget is given back now, not at the next sweep, so
                // that churning sources cannot use up the domains budget.
                usage.domains = usage.domains.saturating_sub(gone.domains.len());
                for d in gone.domains.values() {
                    unattributed.add(&d.counters);
                    usage.totals = usage.totals.saturating_sub(d.totals_len());
                }
            }
            None => {
                unattributed.drop(DropReason::TooManyExporters);
                return None;
            }
        }
    }
    let e = exporters.entry(key).or_default();
    e.last_seen_ns = now_ns;
    Some(e)
}

/// The length of the IPFIX message at the start of a TCP stream buffer,
/// once its header is there: `Ok(None)` wants more bytes, `Err` is a
/// stream that is not IPFIX (the session should close).
pub fn ipfix_message_len(buf: &[u8]) -> Result<Option<usize>, DropReason> {
    let Some(version) = be16(buf, 0) else {
        return Ok(None);
    };
    if version != 10 {
        return Err(DropReason::UnknownVersion);
    }
    let Some(len) = be16(buf, 2) else {
        return Ok(None);
    };
    if usize::from(len) < super::wire::IPFIX_HEADER {
        return Err(DropReason::BadMessageLength);
    }
    Ok(Some(usize::from(len)))
}
