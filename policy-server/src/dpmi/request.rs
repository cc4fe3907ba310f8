//! A measurement request as a user submits it, validated field by field:
//! every refusal names the field (`filter.ip_src`, `points[1]`, `stop_s`).

use qosloop_schema::dpmi::{Delivery, FieldError, Filter, DEFAULT_CAPLEN};
use qosloop_store::{PointRow, RequestRow};
use std::net::SocketAddr;

/// The keys a request may have.
const KEYS: &[&str] = &[
    "points",
    "filter",
    "consumer",
    "delivery",
    "caplen",
    "anonymise",
    "start_s",
    "stop_s",
];

/// The most points one request may name.
const MAX_POINTS: usize = 64;

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub points: Vec<String>,
    pub filter: Filter,
    pub consumer: SocketAddr,
    pub delivery: Delivery,
    pub caplen: u32,
    pub anonymise: bool,
    pub start_ns: i64,
    pub stop_ns: i64,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError::new(field, reason)
}

fn seconds_to_ns(field: &str, v: &serde_json::Value) -> Result<i64, FieldError> {
    let s = v
        .as_f64()
        .filter(|s| s.is_finite() && (0.0..1e11).contains(s))
        .ok_or_else(|| err(field, "must be a time in seconds since 1970"))?;
    Ok((s * 1e9) as i64)
}

impl Request {
    /// Reads and checks a request against the registered `points` at
    /// `now_ns`. Checks against other requests are [`Request::check_against`].
    pub fn parse(
        body: &serde_json::Value,
        points: &[PointRow],
        now_ns: i64,
    ) -> Result<Request, FieldError> {
        let obj = body
            .as_object()
            .ok_or_else(|| err("body", "must be a JSON object"))?;
        if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(err(
                k.as_str(),
                format!("unknown field (known: {})", KEYS.join(", ")),
            ));
        }
        let list = obj
            .get("points")
            .and_then(|p| p.as_array())
            .filter(|p| !p.is_empty() && p.len() <= MAX_POINTS)
            .ok_or_else(|| {
                err(
                    "points",
                    format!("must be a list of 1..={MAX_POINTS} point names"),
                )
            })?;
        let mut names = Vec::new();
        let mut rows = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let field = format!("points[{i}]");
            let name = p.as_str().ok_or_else(|| err(&field, "must be a string"))?;
            let row = points
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(|| err(&field, format!("unknown measurement point {name:?}")))?;
            if names.iter().any(|n| n == name) {
                return Err(err(field, format!("{name:?} named twice")));
            }
            names.push(name.to_owned());
            rows.push(row);
        }
        let filter = Filter::from_json(obj.get("filter").unwrap_or(&serde_json::json!({})))?;
        if let Some(i) = &filter.interface {
            if let Some(r) = rows.iter().find(|r| &r.interface != i) {
                return Err(err(
                    "filter.interface",
                    format!(
                        "point {:?} captures on {:?}, not {i:?}",
                        r.name, r.interface
                    ),
                ));
            }
        }
        let consumer = obj
            .get("consumer")
            .and_then(|c| c.as_str())
            .ok_or_else(|| err("consumer", "must be \"IP:PORT\""))?;
        let consumer: SocketAddr = consumer
            .parse()
            .map_err(|_| err("consumer", format!("{consumer:?} is not IP:PORT")))?;
        if consumer.port() == 0 || consumer.ip().is_unspecified() {
            return Err(err("consumer", "needs an address and a port"));
        }
        let delivery = match obj.get("delivery").map(|d| d.as_str()) {
            None | Some(Some("packets")) => Delivery::Packets,
            Some(Some("flows")) => Delivery::Flows,
            _ => return Err(err("delivery", "must be \"packets\" or \"flows\"")),
        };
        let caplen = match obj.get("caplen") {
            None => DEFAULT_CAPLEN,
            Some(v) => v
                .as_u64()
                .filter(|c| (34..=65_535).contains(c))
                .ok_or_else(|| err("caplen", "must be an integer 34..=65535"))?
                as u32,
        };
        if let Some(r) = rows.iter().find(|r| i64::from(caplen) > r.max_caplen) {
            return Err(err(
                "caplen",
                format!(
                    "{caplen} exceeds the {} bytes point {:?} allows (headers only unless its operator allows more)",
                    r.max_caplen, r.name
                ),
            ));
        }
        let anonymise = match obj.get("anonymise") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| err("anonymise", "must be true or false"))?,
        };
        let start_ns = match obj.get("start_s") {
            None => now_ns,
            Some(v) => seconds_to_ns("start_s", v)?,
        };
        let stop_ns = seconds_to_ns(
            "stop_s",
            obj.get("stop_s")
                .ok_or_else(|| err("stop_s", "is required"))?,
        )?;
        if stop_ns <= start_ns {
            return Err(err("stop_s", "must be after start_s"));
        }
        if stop_ns <= now_ns {
            return Err(err("stop_s", "is in the past"));
        }
        Ok(Request {
            points: names,
            filter,
            consumer,
            delivery,
            caplen,
            anonymise,
            start_ns,
            stop_ns,
        })
    }

    /// Checks the request of `owner` against the `live` ones: one consumer
    /// belongs to one user and receives one kind of stream; the same user
    /// asking for the same frames to the same consumer at one point in an
    /// overlapping window is refused.
    pub fn check_against(&self, owner: &str, live: &[RequestRow]) -> Result<(), FieldError> {
        let consumer = self.consumer.to_string();
        for r in live.iter().filter(|r| r.consumer == consumer) {
            if r.owner != owner {
                return Err(err("consumer", "in use by another user's request"));
            }
            if r.delivery != self.delivery.as_str()
                || r.caplen != i64::from(self.caplen)
                || r.anonymise != self.anonymise
            {
                return Err(err(
                    "consumer",
                    format!(
                        "already receives {} (caplen {}, anonymise {}) from request {}",
                        r.delivery, r.caplen, r.anonymise, r.id
                    ),
                ));
            }
            let same_points = serde_json::from_str::<Vec<String>>(&r.points)
                .is_ok_and(|p| p.iter().any(|n| self.points.contains(n)));
            let same_filter = Filter::from_json(
                &serde_json::from_str(&r.filter).unwrap_or(serde_json::Value::Null),
            )
            .is_ok_and(|f| f == self.filter);
            let overlaps = self.start_ns < r.stop_ns && r.start_ns < self.stop_ns;
            if same_points && same_filter && overlaps {
                return Err(err(
                    "start_s",
                    format!("the window overlaps request {} for the same frames", r.id),
                ));
            }
        }
        Ok(())
    }

    /// The row to store for `owner`.
    pub fn row(&self, owner: &str, now_ns: i64) -> RequestRow {
        RequestRow {
            id: 0,
            owner: owner.to_owned(),
            points: serde_json::to_string(&self.points).unwrap_or_default(),
            filter: self.filter.to_json().to_string(),
            consumer: self.consumer.to_string(),
            delivery: self.delivery.as_str().to_owned(),
            caplen: i64::from(self.caplen),
            anonymise: self.anonymise,
            start_ns: self.start_ns,
            stop_ns: self.stop_ns,
            created_ns: now_ns,
            ended_ns: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_000 * 1_000_000_000;

    fn points() -> Vec<PointRow> {
        vec![PointRow {
            name: "mp1".into(),
            interface: "eth0".into(),
            max_filters: 1,
            max_caplen: 128,
            registered_ns: 0,
            seen_ns: 0,
            installed_version: None,
            install_error: None,
            frames: 0,
            matched: 0,
            kernel_drops: 0,
        }]
    }

    fn good() -> serde_json::Value {
        json!({"points": ["mp1"], "filter": {"ip_proto": "6"}, "consumer": "127.0.0.1:9000",
               "start_s": 1000, "stop_s": 1060})
    }

    fn field_of(change: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = good();
        change(&mut v);
        Request::parse(&v, &points(), NOW).unwrap_err().field
    }

    #[test]
    fn a_good_request_has_defaults() {
        let r = Request::parse(&good(), &points(), NOW).unwrap();
        assert_eq!(r.caplen, DEFAULT_CAPLEN);
        assert_eq!(r.delivery, Delivery::Packets);
        assert!(!r.anonymise);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(
            field_of(|v| v["filter"]["ip_src"] = json!("10.0.0.1/8")),
            "filter.ip_src"
        );
        assert_eq!(field_of(|v| v["filter"]["tos"] = json!("1")), "filter.tos");
        assert_eq!(field_of(|v| v["colour"] = json!("red")), "colour");
        assert_eq!(field_of(|v| v["points"] = json!(["mp9"])), "points[0]");
        assert_eq!(field_of(|v| v["points"] = json!([])), "points");
        assert_eq!(field_of(|v| v["stop_s"] = json!(999)), "stop_s");
        assert_eq!(field_of(|v| v["start_s"] = json!(1100)), "stop_s");
        assert_eq!(field_of(|v| v["caplen"] = json!(1500)), "caplen");
        assert_eq!(field_of(|v| v["consumer"] = json!("host")), "consumer");
        assert_eq!(field_of(|v| v["delivery"] = json!("frames")), "delivery");
        assert_eq!(
            field_of(|v| v["filter"]["interface"] = json!("eth9")),
            "filter.interface"
        );
    }

    #[test]
    fn ipv6_filters_are_taken_and_bad_ones_named() {
        let mut v = good();
        v["filter"] = json!({"ip_src": "2001:db8:1::/48", "ip_dst": "2001:db8::/ffff:ffff::"});
        let r = Request::parse(&v, &points(), NOW).unwrap();
        assert_eq!(r.filter.family(), Some(qosloop_schema::dpmi::Family::V6));
        assert_eq!(
            field_of(|v| v["filter"]["ip_src"] = json!("2001:db8:1::/129")),
            "filter.ip_src"
        );
        assert_eq!(
            field_of(|v| v["filter"]["ip_dst"] = json!("2001:db8:1::1/64")),
            "filter.ip_dst"
        );
        let e = |v: serde_json::Value| Request::parse(&v, &points(), NOW).unwrap_err();
        let mut mixed = good();
        mixed["filter"] = json!({"ip_src": "10.0.0.1", "ip_dst": "2001:db8::1"});
        let mixed = e(mixed);
        assert_eq!(mixed.field, "filter.ip_dst");
        assert!(
            mixed.reason.contains("IPv4 and an IPv6"),
            "{}",
            mixed.reason
        );
        // IPv6 with anonymised frames and with flow records: taken (the
        // point scrambles both families and makes flows of both).
        let mut anon = good();
        anon["filter"] = json!({"ip_src": "2001:db8::/32"});
        anon["anonymise"] = json!(true);
        assert!(Request::parse(&anon, &points(), NOW).unwrap().anonymise);
        let mut flows = good();
        flows["filter"] = json!({"ip_dst": "2001:db8::/32"});
        flows["delivery"] = json!("flows");
        assert_eq!(
            Request::parse(&flows, &points(), NOW).unwrap().delivery,
            Delivery::Flows
        );
        let mut bad = good();
        bad["anonymise"] = json!("yes");
        assert_eq!(e(bad).field, "anonymise");
    }

    #[test]
    fn overlapping_windows_of_the_same_request_are_refused() {
        let r = Request::parse(&good(), &points(), NOW).unwrap();
        let mut stored = r.row("alice", NOW);
        stored.id = 7;
        assert_eq!(
            r.check_against("alice", &[stored.clone()])
                .unwrap_err()
                .field,
            "start_s"
        );
        assert_eq!(
            r.check_against("bob", &[stored.clone()]).unwrap_err().field,
            "consumer"
        );
        let mut later = good();
        later["start_s"] = json!(1060);
        later["stop_s"] = json!(1100);
        let later = Request::parse(&later, &points(), NOW).unwrap();
        later.check_against("alice", &[stored]).unwrap();
    }
}
