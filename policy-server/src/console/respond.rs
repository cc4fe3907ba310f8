//! Every query endpoint answers JSON, or CSV with `?format=csv` or
//! `Accept: text/csv`: the endpoint gives its JSON body and the table
//! behind it.

use super::params::{ApiError, Params};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

/// The rows of an answer, for CSV.
#[derive(Debug, Default)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    pub fn new(columns: &[&str]) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// The rows as JSON objects keyed by column.
    pub fn objects(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|r| {
                Value::Object(
                    self.columns
                        .iter()
                        .cloned()
                        .zip(r.iter().cloned())
                        .collect(),
                )
            })
            .collect()
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        line(&mut out, self.columns.iter().map(|c| c.as_str().into()));
        for r in &self.rows {
            line(
                &mut out,
                r.iter().map(|v| match v {
                    Value::Null => String::new().into(),
                    Value::String(s) => s.as_str().into(),
                    other => other.to_string().into(),
                }),
            );
        }
        out
    }
}

fn line<'a>(out: &mut String, cells: impl Iterator<Item = std::borrow::Cow<'a, str>>) {
    for (i, c) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // RFC 4180 quoting; a leading = + - @ is prefixed so that a
        // spreadsheet does not run a value as a formula.
        let formula = c.starts_with(['=', '+', '-', '@']) && c.parse::<f64>().is_err();
        if formula || c.contains([',', '"', '\n', '\r']) {
            out.push('"');
            if formula {
                out.push('\'');
            }
            out.push_str(&c.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&c);
        }
    }
    out.push_str("\r\n");
}

/// Whether the client asked for CSV.
pub fn wants_csv(params: &Params, headers: &HeaderMap) -> Result<bool, ApiError> {
    match params.get("format") {
        Some("csv") => Ok(true),
        Some("json") => Ok(false),
        Some(_) => Err(ApiError::bad("format", "must be json or csv")),
        None => Ok(headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/csv"))),
    }
}

/// The answer in the format asked for.
pub fn answer(csv: bool, json: Value, table: &Table) -> Response {
    if csv {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            table.to_csv(),
        )
            .into_response()
    } else {
        Json(json).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let mut t = Table::new(&["a", "b"]);
        t.rows.push(vec!["x,y".into(), Value::Null]);
        t.rows.push(vec!["=cmd()".into(), (-3).into()]);
        t.rows.push(vec!["say \"hi\"".into(), 1.5.into()]);
        assert_eq!(
            t.to_csv(),
            "a,b\r\n\"x,y\",\r\n\"'=cmd()\",-3\r\n\"say \"\"hi\"\"\",1.5\r\n"
        );
    }
}
