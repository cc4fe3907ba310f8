//! The tests' side of the daemons' `/metrics`: [`scrape`] fetches it with
//! the kit's HTTP client and [`parse`] is a strict reader of the text exposition format
//! 0.0.4 (what `qosloop_runtime::metrics` writes): it refuses what Prometheus would refuse or what the
//! conventions forbid (a sample before its `# TYPE`, a family declared
//! twice or split, a duplicate series, a bad escape, a counter not ending
//! in `_total`, histogram buckets that shrink or do not end at `_count`).

use crate::http::Request;
use qosloop_runtime::metrics::{valid_label_name, valid_metric_name, Kind};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

/// Fetches `http://addr/metrics` with the kit's [`crate::http`] client:
/// the body of a 200 answer in the text exposition format, else an error
/// naming what came instead.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let answer = Request::get("/metrics")
        .timeout(timeout)
        .send(addr)
        .map_err(std::io::Error::other)?;
    if answer.status != 200 {
        return Err(std::io::Error::other(format!(
            "answer {}: {}",
            answer.status,
            answer.text()
        )));
    }
    let content_type = answer.header("content-type").unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("text/plain; version=0.0.4")
    {
        return Err(std::io::Error::other(format!(
            "not the text exposition format: {content_type:?}"
        )));
    }
    String::from_utf8(answer.body).map_err(std::io::Error::other)
}

/// One series: its labels (sorted by name) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A family with its samples in the order written.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub kind: Kind,
    pub help: String,
    pub samples: Vec<Sample>,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    pub families: BTreeMap<String, Family>,
}

impl Scrape {
    /// The value of the series `name` with exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples(name)
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// Every series of the sample name `name` (`…_bucket` included).
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .values()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| s.name == name)
    }

    /// The sum of every series of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).map(|s| s.value).sum()
    }
}

fn err(line_no: usize, why: impl std::fmt::Display) -> String {
    format!("line {line_no}: {why}")
}

fn family_of(sample: &str, kind: Kind) -> &str {
    if kind == Kind::Histogram {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                return base;
            }
        }
    }
    sample
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Splits `name{labels} value` into its parts.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed;
        loop {
            // Label name up to '=' (or '}' for the end).
            let start = match chars.peek() {
                Some((_, '}')) => {
                    let (i, _) = chars.next().ok_or("unterminated labels")?;
                    consumed = i + 1;
                    break;
                }
                Some((i, _)) => *i,
                None => return Err("unterminated labels".into()),
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without '='")?;
            let key = &after[start..eq];
            if !valid_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key}: value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => {
                            return Err(format!("label {key}: bad escape {other:?}"));
                        }
                    },
                    Some((_, '"')) => break,
                    Some((_, '\n')) => return Err(format!("label {key}: raw line feed")),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {key}: unterminated value")),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                other => return Err(format!("after label {key}: unexpected {other:?}")),
            }
        }
        rest = &after[consumed..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("{name}: no space before the value"))?;
    let mut parts = rest.split(' ');
    let value_text = parts.next().unwrap_or_default();
    let value =
        parse_value(value_text).ok_or_else(|| format!("{name}: bad value {value_text:?}"))?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("{name}: bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{name}: trailing text"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses and checks a whole scrape.
pub fn parse(text: &str) -> Result<Scrape, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line has no line feed".into());
    }
    let mut scrape = Scrape::default();
    let mut current: Option<String> = None;
    let mut closed: HashSet<String> = HashSet::new();
    let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let mut pending_help: Option<(String, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name.to_owned(), help.to_owned()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| err(n, "TYPE without a kind"))?;
            if !valid_metric_name(name) {
                return Err(err(n, format!("bad family name {name:?}")));
            }
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                other => return Err(err(n, format!("{name}: unexpected type {other:?}"))),
            };
            if kind == Kind::Counter && !name.ends_with("_total") {
                return Err(err(n, format!("counter {name} does not end in _total")));
            }
            if scrape.families.contains_key(name) {
                return Err(err(n, format!("family {name} declared twice")));
            }
            let help = match pending_help.take() {
                Some((h, text)) if h == name => text,
                _ => return Err(err(n, format!("{name}: no HELP line before TYPE"))),
            };
            if let Some(prev) = current.replace(name.to_owned()) {
                closed.insert(prev);
            }
            scrape.families.insert(
                name.to_owned(),
                Family {
                    kind,
                    help,
                    samples: Vec::new(),
                },
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|e| err(n, e))?;
        let family_name = current
            .as_deref()
            .ok_or_else(|| err(n, format!("{}: sample before any TYPE", sample.name)))?;
        let kind = scrape.families[family_name].kind;
        if family_of(&sample.name, kind) != family_name {
            let other = family_of(&sample.name, Kind::Histogram);
            if closed.contains(&sample.name) || closed.contains(other) {
                return Err(err(n, format!("{}: family split", sample.name)));
            }
            return Err(err(
                n,
                format!("{}: not of the family {family_name}", sample.name),
            ));
        }
        if kind == Kind::Histogram && sample.name.ends_with("_bucket") {
            if !sample.labels.contains_key("le") {
                return Err(err(n, format!("{}: bucket without le", sample.name)));
            }
        } else if sample.labels.contains_key("le") && kind == Kind::Histogram {
            return Err(err(n, format!("{}: le outside a bucket", sample.name)));
        }
        let key = (
            sample.name.clone(),
            sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        if !series.insert(key) {
            return Err(err(n, format!("{}: series twice", sample.name)));
        }
        if let Some(f) = scrape.families.get_mut(family_name) {
            f.samples.push(sample);
        }
    }
    for (name, f) in &scrape.families {
        if f.kind == Kind::Histogram {
            check_histogram(name, f)?;
        }
        if f.kind == Kind::Counter && f.samples.iter().any(|s| s.value < 0.0) {
            return Err(format!("counter {name} is negative"));
        }
    }
    Ok(scrape)
}

/// A series' labels without `le`, in name order.
type LabelSet = Vec<(String, String)>;

fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
    // Group buckets by their labels without `le`.
    let mut groups: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
    for s in f.samples.iter().filter(|s| s.name.ends_with("_bucket")) {
        let le = s.labels.get("le").and_then(|l| parse_value(l));
        let le = le.ok_or_else(|| format!("{name}: bad le"))?;
        let rest: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        groups.entry(rest).or_default().push((le, s.value));
    }
    for (labels, mut buckets) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return Err(format!("{name}{labels:?}: buckets not cumulative"));
        }
        let Some(&(last_le, last)) = buckets.last() else {
            continue;
        };
        if last_le != f64::INFINITY {
            return Err(format!("{name}{labels:?}: no +Inf bucket"));
        }
        let count = f
            .samples
            .iter()
            .find(|s| {
                s.name.ends_with("_count")
                    && s.labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Vec<_>>()
                        == labels
            })
            .ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        if count.value != last {
            return Err(format!("{name}{labels:?}: +Inf bucket is not _count"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "# HELP x_total X.\n# TYPE x_total counter\n";

    #[test]
    fn refuses_what_the_format_forbids() {
        for (text, why) in [
            ("x_total 1\n", "before any TYPE"),
            ("# HELP x X.\n# TYPE x counter\nx 1\n", "_total"),
            (&format!("{HEAD}x_total 1\nx_total 2\n"), "twice"),
            (&format!("{HEAD}x_total{{a=\"\\t\"}} 1\n"), "escape"),
            (&format!("{HEAD}x_total{{a=\"1\"}} 1\n# HELP y Y.\n# TYPE y gauge\ny 1\nx_total 2\n"), "split"),
            (&format!("{HEAD}{HEAD}"), "declared twice"),
            ("# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "cumulative"),
            ("# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", "_count"),
            (&format!("{HEAD}x_total one\n"), "bad value"),
            (&format!("{HEAD}x_total 1"), "line feed"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn reads_labels_and_values() {
        let s = parse(&format!("{HEAD}x_total{{a=\"1\",b=\"q\\\"\"}} 2.5\n")).unwrap();
        assert_eq!(s.value("x_total", &[("b", "q\""), ("a", "1")]), Some(2.5));
        assert_eq!(s.families["x_total"].help, "X.");
    }

    /// What the daemons' exposition writes, this reader reads back: an
    /// escaped label value, and a histogram's cumulative buckets.
    #[test]
    fn reads_back_what_the_runtime_writes() {
        use qosloop_runtime::metrics::{Exposition, Histogram};
        let mut e = Exposition::new();
        e.family("qosloop_test_things_total", Kind::Counter, "Things.\nMore")
            .sample(&[("peer", "a\"b\\c\nd")], 3.0);
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for v in [0.005, 0.05, 0.05, 5.0] {
            h.observe(v);
        }
        e.family("qosloop_test_seconds", Kind::Histogram, "Latency.")
            .histogram(&[], &h.snapshot());
        let scrape = parse(&e.finish()).unwrap();
        assert_eq!(
            scrape.value("qosloop_test_things_total", &[("peer", "a\"b\\c\nd")]),
            Some(3.0)
        );
        let le = |b| scrape.value("qosloop_test_seconds_bucket", &[("le", b)]);
        assert_eq!(le("0.01"), Some(1.0));
        assert_eq!(le("+Inf"), Some(4.0));
        assert_eq!(scrape.value("qosloop_test_seconds_count", &[]), Some(4.0));
    }
}
