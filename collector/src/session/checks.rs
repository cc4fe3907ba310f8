//! What a peer's START, TMPL_DATA and DATA are checked against before the
//! session acts on them: the exporter's name (bounds, certificate, a name
//! held by another connection), the template limits and the collector's
//! disabled keys, and a DATA message's config, template, sequence, record
//! count and memory bound.

use super::budget::Held;
use super::{printable, refuse, Refusal, SessionCtx, SessionLimits, Stream};
use crate::config::MAX_EXPORTER_NAME;
use crate::store::Sink;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{Data, ErrorCode, Start, TemplateSet, WireTemplate, DATA_FLAG_START};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// The name of a live session; dropping it frees the name.
pub(super) struct NameLease {
    live: Arc<Mutex<HashMap<String, (u64, SocketAddr)>>>,
    name: String,
    conn: u64,
}

impl Drop for NameLease {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(&self.name).is_some_and(|(c, _)| *c == self.conn) {
            live.remove(&self.name);
        }
    }
}

/// Checks the exporter's name and takes it for this connection.
pub(super) fn claim_name(
    ctx: &SessionCtx,
    s: &Start,
    identity: Option<&str>,
    peer: SocketAddr,
    conn: u64,
) -> Result<NameLease, Refusal> {
    let name = &s.exporter;
    if name.is_empty() || name.len() > MAX_EXPORTER_NAME || name.chars().any(|c| c.is_control()) {
        return Err(refuse(
            ErrorCode::Identity,
            "bad_exporter_name",
            format!(
                "exporter name \"{}\" ({} bytes): use 1 to {MAX_EXPORTER_NAME} bytes without control characters",
                printable(name, 64),
                name.len()
            ),
        ));
    }
    if let Some(cert) = identity {
        if cert != name {
            return Err(refuse(
                ErrorCode::Identity,
                "certificate_name_mismatch",
                format!(
                    "START names exporter \"{}\", the client certificate \"{}\"",
                    printable(name, 64),
                    printable(cert, 64)
                ),
            ));
        }
    }
    let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, holder)) = live.get(name.as_str()) {
        return Err(refuse(
            ErrorCode::Identity,
            "exporter_name_in_use",
            format!(
                "exporter \"{}\" has a live session from another connection ({holder})",
                printable(name, 64)
            ),
        ));
    }
    live.insert(name.clone(), (conn, peer));
    Ok(NameLease {
        live: ctx.live.clone(),
        name: name.clone(),
        conn,
    })
}

/// Checks a DATA message against the negotiated state and the memory
/// bounds; the message is then held until its memory is reserved.
pub(super) fn check_data(limits: &SessionLimits, s: &mut Stream, d: Data) -> Result<Held, Refusal> {
    if d.config_id != s.config_id {
        return Err(refuse(
            ErrorCode::ConfigMismatch,
            "config_mismatch",
            format!(
                "DATA seq {} names config {}, negotiated {}",
                d.seq, d.config_id, s.config_id
            ),
        ));
    }
    let Some(layout) = s.layouts.get(&d.template_id) else {
        return Err(refuse(
            ErrorCode::UnknownTemplate,
            "unknown_template",
            format!(
                "DATA seq {} names template {}, not negotiated",
                d.seq, d.template_id
            ),
        ));
    };
    if let Some(last) = s.last_seq {
        let ok = if d.flags & DATA_FLAG_START != 0 {
            d.seq > last
        } else {
            Some(d.seq) == last.checked_add(1)
        };
        if !ok {
            return Err(refuse(
                ErrorCode::Sequence,
                "sequence",
                format!("DATA seq {} after {} (flags {:#04x})", d.seq, last, d.flags),
            ));
        }
    }
    layout.check_count(d.records.len(), d.count).map_err(|e| {
        refuse(
            ErrorCode::Malformed,
            "record_count",
            format!("DATA seq {}: {e}", d.seq),
        )
    })?;
    let decoded_bytes = RecordLayout::decoded_size(d.count, d.records.len());
    let budget = limits
        .decoded_bytes_per_session
        .min(limits.decoded_bytes_total);
    if decoded_bytes > budget {
        return Err(refuse(
            ErrorCode::Oversized,
            "over_memory_budget",
            format!(
                "DATA seq {}: {} records in {} bytes would take {decoded_bytes} bytes decoded, above the session's budget of {budget}",
                d.seq,
                d.count,
                d.records.len()
            ),
        ));
    }
    s.last_seq = Some(d.seq);
    Ok(Held {
        data: d,
        decoded_bytes,
        acquire: None,
        _received: None,
    })
}

pub(super) async fn accept_templates(
    ctx: &SessionCtx,
    s: &mut Stream,
    mut set: TemplateSet,
) -> Result<TemplateSet, Refusal> {
    let limits = &ctx.limits;
    s.template_messages += 1;
    if s.template_messages > limits.max_template_messages {
        return Err(refuse(
            ErrorCode::Limit,
            "too_many_template_messages",
            format!(
                "more than {} TMPL_DATA messages in one session",
                limits.max_template_messages
            ),
        ));
    }
    if !s.layouts.is_empty() && set.config_id != s.config_id {
        return Err(refuse(
            ErrorCode::ConfigMismatch,
            "config_mismatch",
            format!(
                "TMPL_DATA for config {} after config {}",
                set.config_id, s.config_id
            ),
        ));
    }
    if set.templates.len() > limits.max_templates {
        return Err(refuse(
            ErrorCode::Limit,
            "too_many_templates",
            format!(
                "TMPL_DATA with {} templates, more than {}",
                set.templates.len(),
                limits.max_templates
            ),
        ));
    }
    // Everything is checked before anything is recorded.
    let mut layouts = Vec::with_capacity(set.templates.len().min(limits.max_templates));
    let mut ids: Vec<u16> = s.layouts.keys().copied().collect();
    for t in &mut set.templates {
        if t.keys.len() > limits.max_template_keys {
            return Err(refuse(
                ErrorCode::Limit,
                "too_many_template_keys",
                format!(
                    "template {} has {} keys, more than {}",
                    t.id,
                    t.keys.len(),
                    limits.max_template_keys
                ),
            ));
        }
        if !ids.contains(&t.id) {
            ids.push(t.id);
            if ids.len() > limits.max_templates {
                return Err(refuse(
                    ErrorCode::Limit,
                    "too_many_templates",
                    format!(
                        "more than {} templates in one session",
                        limits.max_templates
                    ),
                ));
            }
        }
        let mut disabled_here = Vec::new();
        for k in &mut t.keys {
            if !k.disabled && ctx.disabled_keys.contains(&k.ie) {
                k.disabled = true;
                disabled_here.push(k.ie);
            }
        }
        let layout = RecordLayout::checked(t, set.byte_order).map_err(|e| {
            let by_us = if disabled_here.is_empty() {
                String::new()
            } else {
                format!(
                    " once this collector disables {}",
                    disabled_here
                        .iter()
                        .map(|ie| qosloop_schema::ie::by_id(*ie)
                            .map_or_else(|| format!("{ie:?}"), |e| e.name.to_owned()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            refuse(ErrorCode::Malformed, "no_fixed_key", format!("{e}{by_us}"))
        })?;
        layouts.push((t.id, layout));
    }
    s.config_id = set.config_id;
    s.byte_order = set.byte_order;
    for (t, (id, layout)) in set.templates.iter().zip(layouts) {
        s.layouts.insert(id, layout);
        if let Sink::Db(db) = &ctx.sink {
            let definition =
                serde_json::to_string(&WireTemplate::to_template(t)).unwrap_or_default();
            db.store_template(
                s.exporter_id,
                s.session_id,
                t.id,
                set.config_id,
                &definition,
            )
            .await
            .map_err(|e| {
                refuse(
                    ErrorCode::Storage,
                    "storage",
                    format!("recording template {}: {e}", t.id),
                )
            })?;
        }
    }
    Ok(set)
}
