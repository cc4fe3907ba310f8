//! The loop's state: rates, policies, decisions, enforcers, collectors and
//! exporters. Each answers JSON or CSV.

use super::params::{ApiError, Params};
use super::respond::{answer, wants_csv, Table};
use super::Console;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use qosloop_store::{now_ns, Bind, Col};
use serde_json::{json, Value};

type Pairs = Query<Vec<(String, String)>>;

/// A table read by `sql`: its rows as objects and for CSV.
async fn table(
    c: &Console,
    sql: &str,
    binds: &[Bind],
    columns: &[(&str, Col)],
) -> Result<Table, ApiError> {
    let cols: Vec<Col> = columns.iter().map(|(_, c)| *c).collect();
    let rows = c.db.fetch_cells(sql, binds, &cols).await?;
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    let mut t = Table::new(&names);
    t.rows = rows;
    Ok(t)
}

pub async fn rates(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["from", "to", "subject", "name", "limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let (from, to) = p.range(c.limits.max_range_ns())?;
    let limit = p.int("limit", 1000, 1, c.limits.max_page)?;
    let mut binds = vec![Bind::Int(from), Bind::Int(to)];
    let mut w = "at_ns >= $1 AND at_ns < $2".to_owned();
    if p.get("subject").is_some() {
        binds.push(Bind::Text(
            p.choice("subject", &["flow", "link", "user"], "")?
                .to_owned(),
        ));
        w.push_str(&format!(" AND subject = ${}", binds.len()));
    }
    if let Some(name) = p.get("name") {
        binds.push(Bind::Text(name.to_owned()));
        w.push_str(&format!(" AND name = ${}", binds.len()));
    }
    binds.push(Bind::Int(limit));
    let sql = format!(
        "SELECT at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records FROM rates \
         WHERE {w} ORDER BY at_ns, subject, name LIMIT ${}",
        binds.len()
    );
    use Col::*;
    let t = table(
        &c,
        &sql,
        &binds,
        &[
            ("at_ns", Int),
            ("interval_ns", Int),
            ("subject", Text),
            ("name", Text),
            ("rate_kbps", Float),
            ("avg_rate_kbps", Float),
            ("records", Int),
        ],
    )
    .await?;
    Ok(answer(csv, json!({ "rows": t.objects() }), &t))
}

pub async fn policies(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &[])?;
    let csv = wants_csv(&p, &headers)?;
    let policy = c.policy.borrow().clone();
    let status = c.policy_status.as_ref().map(|s| s.borrow().clone());
    let mut t = Table::new(&[
        "dn",
        "name",
        "priority",
        "enabled",
        "roles",
        "service_class",
        "users",
        "flows",
    ]);
    for r in &policy.rules {
        t.rows.push(vec![
            r.dn.clone().into(),
            r.name.clone().into(),
            r.priority.into(),
            r.enabled.into(),
            r.roles.join(" ").into(),
            r.service_class.clone().into(),
            r.users.join(" ").into(),
            serde_json::to_string(&r.flows).unwrap_or_default().into(),
        ]);
    }
    use Col::*;
    let rejected = table(&c,
        "SELECT at_ns, source, dn, detail FROM policy_audit WHERE change = 'reject' ORDER BY at_ns DESC, id DESC LIMIT 100",
        &[], &[("at_ns", Int), ("source", Text), ("dn", Text), ("detail", Text)]).await?;
    let body = json!({
        "policy": &*policy,
        "status": status,
        "validation_errors": rejected.objects(),
    });
    Ok(answer(csv, body, &t))
}

pub async fn decisions(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["from", "to", "kind", "role", "limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let (from, to) = p.range(c.limits.max_range_ns())?;
    let limit = p.int("limit", 100, 1, c.limits.max_page)?;
    let mut binds = vec![Bind::Int(from), Bind::Int(to)];
    let mut w = "issued_ns >= $1 AND issued_ns < $2".to_owned();
    if p.get("kind").is_some() {
        let kind = p.choice("kind", &["accept", "remark", "drop", "remove"], "")?;
        binds.push(Bind::Text(kind.to_owned()));
        w.push_str(&format!(" AND kind = ${}", binds.len()));
    }
    if let Some(role) = p.get("role") {
        binds.push(Bind::Text(role.to_owned()));
        w.push_str(&format!(" AND role = ${}", binds.len()));
    }
    binds.push(Bind::Int(limit));
    let sql = format!(
        "SELECT issued_ns, CAST(decision_id AS BIGINT), CAST(version AS BIGINT), kind, band, role, policy_dn, flow, \
         rate_kbps, avg_rate_kbps, link, link_load_kbps FROM decisions WHERE {w} \
         ORDER BY issued_ns DESC, id DESC LIMIT ${}",
        binds.len()
    );
    use Col::*;
    let t = table(
        &c,
        &sql,
        &binds,
        &[
            ("issued_ns", Int),
            ("decision_id", Int),
            ("version", Int),
            ("kind", Text),
            ("band", Text),
            ("role", Text),
            ("policy_dn", Text),
            ("flow", Text),
            ("rate_kbps", Float),
            ("avg_rate_kbps", Float),
            ("link", Text),
            ("link_load_kbps", Float),
        ],
    )
    .await?;
    let table_now = c.decisions.borrow().clone();
    let mut current: Vec<Value> = table_now
        .all()
        .filter_map(|d| serde_json::to_value(&**d).ok())
        .collect();
    current.sort_by_key(|d| (d["role"].to_string(), d["id"].as_u64()));
    Ok(answer(
        csv,
        json!({ "current": current, "history": t.objects() }),
        &t,
    ))
}

/// The kernel counters' sums an enforcer row carries (CSV and JSON).
const COUNTER_SUMS: [&str; 4] = [
    "in_profile_packets",
    "in_profile_bytes",
    "out_of_profile_packets",
    "out_of_profile_bytes",
];

pub async fn enforcers(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &[])?;
    let csv = wants_csv(&p, &headers)?;
    use Col::*;
    let sums: String = COUNTER_SUMS
        .iter()
        .map(|col| format!(", (SELECT CAST(SUM(k.{col}) AS BIGINT) FROM enforcer_counters k WHERE k.enforcer = e.name)"))
        .collect();
    let sql = format!(
        "SELECT e.name, e.roles, e.address, e.state, e.connected_ns, e.last_seen_ns, \
         (SELECT MAX(r.at_ns) FROM enforcement_reports r WHERE r.enforcer = e.name), \
         (SELECT CAST(COUNT(*) AS BIGINT) FROM enforcement_reports r WHERE r.enforcer = e.name AND r.outcome = 'installed'), \
         (SELECT CAST(COUNT(*) AS BIGINT) FROM enforcement_reports r WHERE r.enforcer = e.name AND r.outcome = 'removed'), \
         (SELECT CAST(COUNT(*) AS BIGINT) FROM enforcement_reports r WHERE r.enforcer = e.name AND r.outcome = 'failed'), \
         (SELECT CAST(MAX(r.reconfig_ns) AS BIGINT) FROM enforcement_reports r WHERE r.enforcer = e.name), \
         e.counters_at_ns, e.counters_omitted, \
         (SELECT CAST(COUNT(*) AS BIGINT) FROM enforcer_counters k WHERE k.enforcer = e.name){sums}, \
         e.classes_omitted FROM enforcers e ORDER BY e.name"
    );
    let mut columns = vec![
        ("name", Text),
        ("roles", Text),
        ("address", Text),
        ("state", Text),
        ("connected_ns", Int),
        ("last_seen_ns", Int),
        ("last_report_ns", Int),
        ("installed", Int),
        ("removed", Int),
        ("failed", Int),
        ("max_reconfig_ns", Int),
        ("counters_at_ns", Int),
        ("counters_omitted", Int),
        ("counted_decisions", Int),
    ];
    columns.extend(COUNTER_SUMS.iter().map(|c| (*c, Int)));
    columns.push(("classes_omitted", Int));
    let t = table(&c, &sql, &[], &columns).await?;
    if csv {
        return Ok(answer(true, Value::Null, &t));
    }
    // JSON: each enforcer's counters per decision and its HTB classes'
    // statistics too, as last reported (at most
    // qosloop_schema::MAX_ACCOUNTED_DECISIONS and MAX_ACCOUNTED_CLASSES).
    let mut rows = t.objects();
    for row in &mut rows {
        let name = row["name"].as_str().unwrap_or_default().to_owned();
        let counters = c.db.counters(&name).await.map_err(ApiError::from)?;
        row["kernel_counters"] = Value::Array(
            counters
                .into_iter()
                .map(|(id, version, kind, ip, ib, op, ob)| {
                    json!({
                        "decision_id": id, "version": version, "kind": kind,
                        "in_profile_packets": ip, "in_profile_bytes": ib,
                        "out_of_profile_packets": op, "out_of_profile_bytes": ob,
                    })
                })
                .collect(),
        );
        let classes = c.db.class_counters(&name).await.map_err(ApiError::from)?;
        row["htb_classes"] = Value::Array(
            classes
                .into_iter()
                .map(
                    |(classid, parent, bytes, packets, drops, overlimits, backlog)| {
                        json!({
                            "classid": classid, "parent": parent, "bytes": bytes,
                            "packets": packets, "drops": drops, "overlimits": overlimits,
                            "backlog_bytes": backlog,
                        })
                    },
                )
                .collect(),
        );
    }
    Ok(answer(false, json!({ "rows": rows }), &t))
}

pub async fn collectors(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &[])?;
    let csv = wants_csv(&p, &headers)?;
    use Col::*;
    let t = table(&c,
        "SELECT node, address, lease_until_ns, joined_ns, CAST(CASE WHEN lease_until_ns > $1 THEN 1 ELSE 0 END AS BIGINT) \
         FROM cluster_members ORDER BY node",
        &[Bind::Int(now_ns())],
        &[("node", Text), ("address", Text), ("lease_until_ns", Int), ("joined_ns", Int), ("alive", Int)],
    ).await?;
    let listeners = table(&c,
        "SELECT listen, datagrams, bytes, kernel_drops, rcvbuf, not_allowed, too_many_exporters, updated_ns \
         FROM ipfix_listeners ORDER BY listen", &[],
        &[("listen", Text), ("datagrams", Int), ("bytes", Int), ("kernel_drops", Int), ("rcvbuf", Int),
          ("not_allowed", Int), ("too_many_exporters", Int), ("updated_ns", Int)]).await?;
    Ok(answer(
        csv,
        json!({ "members": t.objects(), "ipfix_listeners": listeners.objects() }),
        &t,
    ))
}

pub async fn exporters(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &[])?;
    let csv = wants_csv(&p, &headers)?;
    use Col::*;
    let sum = |col: &str| {
        format!("(SELECT CAST(SUM(s.{col}) AS BIGINT) FROM ipfix_exporter_stats s WHERE s.exporter_id = x.id)")
    };
    let sql = format!(
        "SELECT x.name, x.address, x.first_seen_ns, x.last_seen_ns, CAST($1 - x.last_seen_ns AS BIGINT), \
         (SELECT CAST(COUNT(*) AS BIGINT) FROM sessions s WHERE s.exporter_id = x.id AND s.stopped_ns IS NULL), \
         (SELECT CAST(SUM(s.records) AS BIGINT) FROM sessions s WHERE s.exporter_id = x.id), \
         {}, {}, {}, {}, \
         (SELECT CAST(SUM(d.count) AS BIGINT) FROM ipfix_drops d WHERE d.exporter_id = x.id) \
         FROM exporters x ORDER BY x.name",
        sum("messages"), sum("records"), sum("sequence_gaps"), sum("dropped")
    );
    let t = table(
        &c,
        &sql,
        &[Bind::Int(now_ns())],
        &[
            ("name", Text),
            ("address", Text),
            ("first_seen_ns", Int),
            ("last_seen_ns", Int),
            ("lag_ns", Int),
            ("open_sessions", Int),
            ("session_records", Int),
            ("ipfix_messages", Int),
            ("ipfix_records", Int),
            ("ipfix_sequence_gaps", Int),
            ("ipfix_dropped", Int),
            ("drops", Int),
        ],
    )
    .await?;
    let drops = table(&c,
        "SELECT x.name, d.reason, CAST(SUM(d.count) AS BIGINT) FROM ipfix_drops d JOIN exporters x ON x.id = d.exporter_id \
         GROUP BY x.name, d.reason ORDER BY x.name, d.reason", &[],
        &[("exporter", Text), ("reason", Text), ("count", Int)]).await?;
    Ok(answer(
        csv,
        json!({ "rows": t.objects(), "drops_by_reason": drops.objects() }),
        &t,
    ))
}
