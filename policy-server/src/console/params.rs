//! Query parameters: unknown or repeated names, bad values, inverted or
//! unbounded time ranges and oversized pages are refused with a 400 that
//! names the parameter (and, for a filter, the offending token).

use super::filter::FilterError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use qosloop_store::now_ns;
use std::collections::BTreeMap;

/// An answer other than 200.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub parameter: Option<String>,
    pub message: String,
    /// For a malformed filter: where and what.
    pub filter: Option<FilterError>,
}

impl ApiError {
    pub fn bad(parameter: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            parameter: Some(parameter.to_owned()),
            message: message.into(),
            filter: None,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "console query failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            parameter: None,
            message: format!("database query failed: {e}"),
            filter: None,
        }
    }
}

impl From<FilterError> for ApiError {
    fn from(e: FilterError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            parameter: Some("filter".into()),
            message: e.to_string(),
            filter: Some(e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.message });
        if let Some(p) = &self.parameter {
            body["parameter"] = p.clone().into();
        }
        if let Some(f) = &self.filter {
            body["offset"] = f.offset.into();
            body["token"] = f.token.clone().into();
        }
        (self.status, Json(body)).into_response()
    }
}

/// The parameters of one request, checked against the names it accepts.
#[derive(Debug)]
pub struct Params {
    values: BTreeMap<String, String>,
}

/// The longest parameter value accepted, in bytes.
const MAX_VALUE_LEN: usize = 8192;

impl Params {
    /// `pairs` as given, refusing names not in `allowed` and repeats.
    /// `format` is accepted everywhere.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut values = BTreeMap::new();
        for (k, v) in pairs {
            if k != "format" && !allowed.contains(&k.as_str()) {
                let mut known: Vec<&str> = allowed.to_vec();
                known.push("format");
                return Err(ApiError::bad(
                    &k,
                    format!("unknown parameter (known: {})", known.join(", ")),
                ));
            }
            if v.len() > MAX_VALUE_LEN {
                return Err(ApiError::bad(
                    &k,
                    format!("longer than {MAX_VALUE_LEN} bytes"),
                ));
            }
            if values.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad(&k, "given more than once"));
            }
        }
        Ok(Params { values })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// An integer in `min..=max`, `default` when absent.
    pub fn int(&self, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let n: i64 = v
            .parse()
            .map_err(|_| ApiError::bad(name, format!("not an integer: {v:?}")))?;
        if n < min || n > max {
            return Err(ApiError::bad(name, format!("must be in {min}..={max}")));
        }
        Ok(n)
    }

    /// One of `choices`, `default` when absent.
    pub fn choice<'a>(
        &self,
        name: &str,
        choices: &[&'a str],
        default: &'a str,
    ) -> Result<&'a str, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices.iter().copied().find(|c| *c == v).ok_or_else(|| {
                ApiError::bad(name, format!("must be one of {}", choices.join(", ")))
            }),
        }
    }

    /// The required time range `[from, to)` in ns, at most `max_ns` long.
    pub fn range(&self, max_ns: i64) -> Result<(i64, i64), ApiError> {
        let now = now_ns();
        let from = self
            .get("from")
            .ok_or_else(|| {
                ApiError::bad("from", "required (ns since the epoch, now or now-DURATION)")
            })
            .and_then(|v| time("from", v, now))?;
        let to = match self.get("to") {
            Some(v) => time("to", v, now)?,
            None => {
                return Err(ApiError::bad(
                    "to",
                    "required (ns since the epoch, now or now-DURATION)",
                ))
            }
        };
        if from >= to {
            return Err(ApiError::bad("from", "must be before to"));
        }
        if to.saturating_sub(from) > max_ns {
            return Err(ApiError::bad(
                "from",
                format!(
                    "range longer than the configured limit of {} s",
                    max_ns / 1_000_000_000
                ),
            ));
        }
        Ok((from, to))
    }
}

/// A duration like `90s`, `15m`, `2h`, `7d` in ns.
pub fn duration_ns(s: &str) -> Option<i64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = digits.parse().ok()?;
    let per: i64 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return None,
    };
    n.checked_mul(per)
}

/// A point in time: ns since the epoch, `now`, or `now-DURATION`.
fn time(name: &str, v: &str, now: i64) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::bad(
            name,
            format!("not a time (ns since the epoch, now or now-DURATION): {v:?}"),
        )
    };
    if v == "now" {
        return Ok(now);
    }
    if let Some(d) = v.strip_prefix("now-") {
        // Before the epoch is refused, as an explicit negative time is:
        // the window arithmetic downstream counts on times >= 0.
        return duration_ns(d)
            .and_then(|d| now.checked_sub(d))
            .filter(|t| *t >= 0)
            .ok_or_else(bad);
    }
    v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Result<Params, ApiError> {
        Params::new(
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            &["from", "to", "limit"],
        )
    }

    #[test]
    fn unknown_repeated_and_bad_values_name_the_parameter() {
        assert_eq!(
            p(&[("form", "1")]).unwrap_err().parameter.as_deref(),
            Some("form")
        );
        assert_eq!(
            p(&[("to", "1"), ("to", "2")])
                .unwrap_err()
                .parameter
                .as_deref(),
            Some("to")
        );
        let ok = p(&[("limit", "1000000"), ("from", "5"), ("to", "3")]).unwrap();
        assert!(ok
            .int("limit", 10, 1, 10_000)
            .unwrap_err()
            .message
            .contains("1..=10000"));
        assert_eq!(
            ok.range(i64::MAX).unwrap_err().parameter.as_deref(),
            Some("from")
        );
        let open = p(&[("from", "now-1h")]).unwrap();
        assert_eq!(
            open.range(i64::MAX).unwrap_err().parameter.as_deref(),
            Some("to")
        );
        let long = p(&[("from", "now-40d"), ("to", "now")]).unwrap();
        assert!(long.range(31 * 86_400_000_000_000).is_err());
        let before_epoch = p(&[("from", "now-200000d"), ("to", "now")]).unwrap();
        assert_eq!(
            before_epoch
                .range(i64::MAX)
                .unwrap_err()
                .parameter
                .as_deref(),
            Some("from")
        );
        let fine = p(&[("from", "now-90m"), ("to", "now")]).unwrap();
        let (a, b) = fine.range(i64::MAX).unwrap();
        assert_eq!(b - a, 90 * 60_000_000_000);
    }
}
