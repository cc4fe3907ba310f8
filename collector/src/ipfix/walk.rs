//! The walk over one message: its sets in order — templates defined,
//! replaced or withdrawn, data sets decoded through their template's plan
//! or held until the template comes, v5 records — within the decoder's
//! budgets ([`Decoder`](super::Decoder) owns the state, a `Walk` borrows it
//! for one message).

use super::decoder::{Changes, ExporterKey, Limits, Usage, PENDING_SET_OVERHEAD};
use super::domain::{Domain, MsgCtx, PendingSet, Template};
use super::persist::{self, TemplateChange};
use super::plan::{Fields, Plan};
use super::sink::RecordSink;
use super::stats::DropReason;
use super::wire::{
    be16, be32, parse_template_set, Header, Sets, TemplateDef, TemplateRecord, Version, V5_RECORD,
};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// One message being decoded.
pub(super) struct Walk<'a, S: RecordSink> {
    /// `out.len()` at which this message stops producing records.
    pub(super) record_cap: usize,
    /// Set when the message must end the session (TCP).
    pub(super) abort: Option<DropReason>,
    pub(super) limits: &'a Limits,
    pub(super) pending_total: &'a mut usize,
    pub(super) usage: &'a mut Usage,
    pub(super) changes: &'a mut Changes,
    pub(super) key: ExporterKey,
    pub(super) header: Header,
    pub(super) now_ns: u64,
    pub(super) out: &'a mut S,
}

impl<S: RecordSink> Walk<'_, S> {
    fn ctx(&self) -> MsgCtx {
        MsgCtx {
            version: self.header.version,
            export_secs: self.header.export_secs,
            export_nsecs: self.header.export_nsecs,
            sys_uptime_ms: self.header.sys_uptime_ms,
        }
    }

    /// One record's fields into flow records, the flows tracked for their
    /// totals held within the per-domain and the decoder-wide budget.
    fn build(&mut self, domain: &mut Domain, f: Fields, ctx: &MsgCtx, sampling: Option<u32>) {
        let before = domain.totals_len();
        let room = self
            .limits
            .max_totals_total
            .saturating_sub(self.usage.totals);
        let max = self.limits.max_totals.min(before.saturating_add(room));
        domain.build(f, ctx, sampling, max, self.now_ns, self.out);
        self.usage.totals += domain.totals_len().saturating_sub(before);
    }

    /// NetFlow v5: fixed 48-byte records after the 24-byte header.
    pub(super) fn v5(&mut self, domain: &mut Domain, msg: &[u8]) {
        let ctx = self.ctx();
        // Top two bits: mode; low 14: the 1-in-N interval.
        let interval = u32::from(self.header.v5_sampling & 0x3fff);
        let sampling = (interval > 1).then_some(interval);
        for r in msg[self.header.header_len..].chunks_exact(V5_RECORD) {
            let word = |at: usize| be32(r, at).unwrap_or(0);
            let half = |at: usize| be16(r, at).unwrap_or(0);
            let f = Fields {
                src: Some(IpAddr::V4(Ipv4Addr::from(word(0)))),
                dst: Some(IpAddr::V4(Ipv4Addr::from(word(4)))),
                packet_delta: Some(u64::from(word(16))),
                octet_delta: Some(u64::from(word(20))),
                start_uptime_ms: Some(u64::from(word(24))),
                end_uptime_ms: Some(u64::from(word(28))),
                src_port: half(32),
                dst_port: half(34),
                tcp_flags: Some(u16::from(r[37])),
                proto: r[38],
                tos: Some(r[39]),
                ..Fields::default()
            };
            self.build(domain, f, &ctx, sampling);
        }
    }

    /// The sets of a v9 or IPFIX message. Returns the data records it
    /// held, or `None` when some could not be counted (unknown template).
    pub(super) fn sets(&mut self, domain: &mut Domain, body: &[u8]) -> Option<u32> {
        let ipfix = self.header.version == Version::Ipfix;
        let (tmpl_set, opt_set) = if ipfix { (2, 3) } else { (0, 1) };
        let mut units: Option<u32> = Some(0);
        for set in Sets::new(body) {
            if self.abort.is_some() {
                break;
            }
            let set = match set {
                Ok(s) => s,
                Err(reason) => {
                    domain.counters.drop(reason);
                    break;
                }
            };
            if set.id == tmpl_set || set.id == opt_set {
                self.templates(domain, set.id, set.body, set.id == opt_set);
            } else if set.id >= 256 {
                match self.data(domain, set.id, set.body) {
                    Some(n) => units = units.map(|u| u.wrapping_add(n)),
                    None => units = None,
                }
            } else {
                // Reserved set ids (IPFIX 0, 1, 4–255; v9 2–255).
                domain.counters.drop(DropReason::BadTemplateId);
            }
        }
        if ipfix {
            units
        } else {
            Some(1)
        }
    }

    fn templates(&mut self, domain: &mut Domain, set_id: u16, body: &[u8], options: bool) {
        let version = self.header.version;
        let udp = self.key.session.is_none();
        for rec in parse_template_set(version, set_id, body, options, self.limits.max_fields) {
            if self.abort.is_some() {
                break;
            }
            match rec {
                Err(reason) => domain.counters.drop(reason),
                Ok(TemplateRecord::Withdraw(id)) => {
                    if udp {
                        domain.counters.drop(DropReason::WithdrawalOverUdp);
                    } else {
                        domain.templates.remove(&id);
                    }
                }
                Ok(TemplateRecord::WithdrawAll { options }) => {
                    if udp {
                        domain.counters.drop(DropReason::WithdrawalOverUdp);
                    } else {
                        domain.templates.retain(|_, t| t.def.options != options);
                    }
                }
                Ok(TemplateRecord::Define(def)) => self.define(domain, def),
            }
        }
    }

    fn define(&mut self, domain: &mut Domain, def: TemplateDef) {
        domain.counters.templates_received += 1;
        let version = self.header.version;
        let udp = self.key.session.is_none();
        let id = def.id;
        if let Some(t) = domain.templates.get_mut(&id) {
            if t.def == def {
                // A refresh: keeps it alive; persisted again now and then so
                // that a restart does not find it expired.
                t.last_seen_ns = self.now_ns;
                if udp
                    && self.now_ns.saturating_sub(t.persisted_ns)
                        > self.limits.template_expiry_ns / 4
                {
                    t.persisted_ns = self.now_ns;
                    self.changes.push(TemplateChange {
                        exporter: self.key.addr,
                        version,
                        domain: self.header.domain,
                        template_id: id,
                        definition: Some(persist::to_text(version, &def)),
                        seen_ns: self.now_ns,
                    });
                }
                return;
            }
            if !udp {
                // RFC 7011 §8.1: over TCP an id is redefined only after its
                // withdrawal; otherwise the session is reset.
                self.abort = Some(DropReason::TemplateRedefined);
                return;
            }
        } else if domain.templates.len() >= self.limits.max_templates {
            domain.counters.drop(DropReason::TooManyTemplates);
            return;
        }
        if self.usage.template_fields + def.fields.len() > self.limits.max_template_fields_total {
            domain.counters.drop(DropReason::TooManyTemplates);
            return;
        }
        let compiled = Plan::compile(&def, version == Version::V9 && def.options).and_then(|p| {
            if def.options || p.makes_flows() {
                Ok(p)
            } else {
                Err(DropReason::NoFlowFields)
            }
        });
        let plan = match compiled {
            Ok(p) => p,
            Err(reason) => {
                // A redefinition that does not compile removes the old one:
                // its data would be read with the wrong layout (and so does
                // its stored copy, or a restart would bring it back).
                if let Some(old) = domain.templates.remove(&id) {
                    if udp {
                        self.changes.push(TemplateChange {
                            exporter: self.key.addr,
                            version,
                            domain: self.header.domain,
                            template_id: id,
                            definition: None,
                            seen_ns: self.now_ns.max(old.last_seen_ns),
                        });
                    }
                }
                domain.counters.drop(reason);
                return;
            }
        };
        if udp {
            self.changes.push(TemplateChange {
                exporter: self.key.addr,
                version,
                domain: self.header.domain,
                template_id: id,
                definition: Some(persist::to_text(version, &def)),
                seen_ns: self.now_ns,
            });
        }
        self.usage.template_fields += def.fields.len();
        domain.templates.insert(
            id,
            Template {
                def,
                plan: Arc::new(plan),
                last_seen_ns: self.now_ns,
                persisted_ns: self.now_ns,
            },
        );
        // Data that waited for this template is decoded now, with the
        // context of the message that brought it.
        for p in domain.take_pending(id) {
            *self.pending_total -= p.cost();
            self.decode_set(domain, id, &p.body, &p.ctx);
        }
    }

    /// A data set: decoded, or held until its template comes. Returns the
    /// records it held when known.
    fn data(&mut self, domain: &mut Domain, set_id: u16, body: &[u8]) -> Option<u32> {
        let ctx = self.ctx();
        if let Some(t) = domain.templates.get(&set_id) {
            let expired = self.key.session.is_none()
                && self.now_ns.saturating_sub(t.last_seen_ns) > self.limits.template_expiry_ns;
            if !expired {
                return Some(self.decode_set(domain, set_id, body, &ctx));
            }
            let last_seen_ns = t.last_seen_ns;
            domain.templates.remove(&set_id);
            self.changes.push(TemplateChange {
                exporter: self.key.addr,
                version: ctx.version,
                domain: self.header.domain,
                template_id: set_id,
                definition: None,
                seen_ns: last_seen_ns,
            });
        }
        self.hold(domain, set_id, body, ctx);
        None
    }

    fn hold(&mut self, domain: &mut Domain, set_id: u16, body: &[u8], ctx: MsgCtx) {
        if self.key.session.is_some() {
            // Over TCP templates come before their data (RFC 7011 §8.1), and
            // a withdrawn one does not come back in the same session.
            domain.counters.drop(DropReason::TemplateWithdrawn);
            return;
        }
        let cost = body.len() + PENDING_SET_OVERHEAD;
        if cost > self.limits.pending_bytes {
            domain.counters.drop(DropReason::PendingOverflow);
            return;
        }
        // Room is made by letting the oldest sets go, each counted.
        while domain.pending.len() >= self.limits.pending_sets
            || domain.pending_bytes + cost > self.limits.pending_bytes
            || *self.pending_total + cost > self.limits.pending_total_bytes
        {
            match domain.pending.pop_front() {
                Some(old) => {
                    domain.pending_bytes -= old.cost();
                    *self.pending_total -= old.cost();
                    domain.counters.drop(DropReason::PendingOverflow);
                }
                None => {
                    domain.counters.drop(DropReason::PendingOverflow);
                    return;
                }
            }
        }
        domain.pending_bytes += cost;
        *self.pending_total += cost;
        domain.pending.push_back(PendingSet {
            template_id: set_id,
            ctx,
            received_ns: self.now_ns,
            body: body.into(),
        });
    }

    /// Decodes the records of one data set with a known template; the
    /// bytes after the last whole record are padding. Returns the records.
    fn decode_set(&mut self, domain: &mut Domain, id: u16, body: &[u8], ctx: &MsgCtx) -> u32 {
        let Some(t) = domain.templates.get(&id) else {
            return 0;
        };
        // The plan is shared, so the domain's other state can change while
        // it is read.
        let options = t.def.options;
        let plan = Arc::clone(&t.plan);
        let mut at = 0;
        let mut n = 0u32;
        let mut f = Fields::default();
        while body.len() - at >= plan.min_len {
            // Records with variable-length fields only can be as short as
            // padding: up to 3 trailing zero bytes are padding (RFC 7011
            // §3.3.1 pads to 4-byte boundaries), not records.
            if !plan.fixed && body.len() - at < 4 && body[at..].iter().all(|&b| b == 0) {
                break;
            }
            if !options && self.out.len() >= self.record_cap {
                domain.counters.drop(DropReason::TooManyRecords);
                break;
            }
            if let Err(reason) = plan.read(body, &mut at, &mut f) {
                // The rest of the set cannot be delimited.
                domain.counters.drop(reason);
                break;
            }
            n += 1;
            if options {
                if let Some((sampler, rate)) = domain.apply_options(&f, self.limits.max_samplers) {
                    // Rates scale every flow of the exporter: a change is
                    // logged (at most once a minute per domain).
                    if self.now_ns.saturating_sub(domain.rate_logged_ns) >= 60_000_000_000 {
                        domain.rate_logged_ns = self.now_ns;
                        tracing::info!(exporter = %self.key.addr, domain = self.header.domain,
                            sampler = ?sampler, rate, "IPFIX sampling rate changed");
                    }
                }
            } else {
                self.build(domain, std::mem::take(&mut f), ctx, None);
            }
        }
        n
    }
}
