//! Byte-pattern rules: regular expressions over packet bytes, all compiled
//! into one multi-pattern DFA (regex-automata's dense DFA, every pattern
//! reported), with the two modes of `seeds/004`'s regex agent: the first
//! match by priority ("parsing mode") or all matches ("pattern matching
//! mode", the class then being the matching classes joined by `+`).
//!
//! Patterns are byte-oriented: `.` is any byte, `\xHH` a byte, no Unicode.
//! Like the Tarari template of Fig. 5, a `[definitions]` table names
//! sub-patterns that `{NAME}` splices in (a `{3}` repetition is untouched).
//!
//! ```toml
//! mode = "priority"   # or "all"
//! start = "ip"        # bytes searched start at: "frame", "ip" or "transport"
//! anchored = true     # patterns match only at that start
//! [definitions]
//! ANYBYTE = "."
//! [[pattern]]
//! class = "web"
//! priority = 1        # lower first; default: file order after prioritised ones
//! regex = "{ANYBYTE}{9}\\x06"
//! ```

use super::text::{line_col, RuleError};
use super::{Labels, PacketView};
use regex_automata::dfa::{dense, Automaton};
use regex_automata::nfa::thompson;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind, PatternSet};
use serde::Deserialize;
use std::collections::HashMap;
use toml::Spanned;

/// How matches become a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchMode {
    /// The matching pattern with the best (lowest) priority.
    #[default]
    Priority,
    /// Every matching pattern: classes joined by `+`.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Start {
    Frame,
    #[default]
    Ip,
    Transport,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    mode: MatchMode,
    #[serde(default)]
    start: Start,
    #[serde(default)]
    anchored: bool,
    #[serde(default)]
    definitions: HashMap<String, Spanned<String>>,
    #[serde(default)]
    pattern: Vec<RawPattern>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    class: String,
    priority: Option<u32>,
    regex: Spanned<String>,
}

/// The compiled pattern rules.
#[derive(Debug, Clone)]
pub struct PatternRules {
    dfa: dense::DFA<Vec<u32>>,
    mode: MatchMode,
    start: Start,
    anchored: bool,
    /// Class name of each pattern, by DFA pattern id (= priority rank).
    class_names: Vec<String>,
    classes: Vec<u16>,
    /// Expanded regex of each pattern (for `--check`-style listings).
    expanded: Vec<String>,
}

const MAX_EXPANSION_DEPTH: usize = 32;
const MAX_EXPANDED_LEN: usize = 64 * 1024;

/// Splices `{NAME}` definitions into `re`.
fn expand(
    re: &str,
    defs: &HashMap<String, Spanned<String>>,
    depth: usize,
) -> Result<String, String> {
    if depth > MAX_EXPANSION_DEPTH {
        return Err("definitions nest too deep (a cycle?)".into());
    }
    let mut out = String::with_capacity(re.len());
    let mut rest = re;
    while let Some(i) = rest.find('{') {
        let escaped = rest[..i].ends_with('\\') && !rest[..i].ends_with("\\\\");
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let is_ref = !escaped
            && after[name_len..].starts_with('}')
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if is_ref {
            let def = defs
                .get(name)
                .ok_or_else(|| format!("{{{name}}} is not defined in [definitions]"))?;
            let inner = expand(def.get_ref(), defs, depth + 1)?;
            out.push_str("(?:");
            out.push_str(&inner);
            out.push(')');
            rest = &after[name_len + 1..];
        } else {
            out.push('{');
            rest = after;
        }
        if out.len() > MAX_EXPANDED_LEN {
            return Err("pattern expands beyond 64 KiB".into());
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn syntax_config() -> syntax::Config {
    syntax::Config::new()
        .unicode(false)
        .utf8(false)
        .dot_matches_new_line(true)
}

impl PatternRules {
    /// Parses and compiles a pattern rule file; `file` names it in errors.
    pub fn parse(file: &str, src: &str) -> Result<PatternRules, RuleError> {
        let raw: RawFile = toml::from_str(src).map_err(|e| RuleError::from_toml(file, src, &e))?;
        if raw.pattern.is_empty() {
            return Err(RuleError::at(file, src, 0, "no [[pattern]] entries"));
        }
        let mut entries: Vec<(u32, usize, RawPattern)> = raw
            .pattern
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p.priority.unwrap_or(u32::MAX), i, p))
            .collect();
        entries.sort_by_key(|(prio, i, _)| (*prio, *i));
        let mut expanded = Vec::with_capacity(entries.len());
        let mut class_names = Vec::with_capacity(entries.len());
        for (_, _, p) in &entries {
            let at = p.regex.span().start;
            if p.class.trim().is_empty() {
                return Err(RuleError::at(file, src, at, "pattern has an empty class"));
            }
            let re = expand(p.regex.get_ref(), &raw.definitions, 0)
                .map_err(|m| RuleError::at(file, src, at, m))?;
            syntax::parse_with(&re, &syntax_config()).map_err(|e| {
                // The parser's own message names the position in the
                // expanded pattern; keep its first line.
                let msg = e.to_string();
                let detail = msg.lines().last().unwrap_or("").trim().to_owned();
                RuleError::at(file, src, at, format!("invalid regex {re:?}: {detail}"))
            })?;
            expanded.push(re);
            class_names.push(p.class.clone());
        }
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .dfa_size_limit(Some(512 << 20))
                    .determinize_size_limit(Some(512 << 20)),
            )
            .syntax(syntax_config())
            .thompson(thompson::Config::new().utf8(false))
            .build_many(&expanded)
            .map_err(|e| {
                let (line, column) = line_col(src, 0);
                RuleError {
                    file: file.to_owned(),
                    line,
                    column,
                    message: format!("compiling {} patterns into one DFA: {e}", expanded.len()),
                }
            })?;
        Ok(PatternRules {
            dfa,
            mode: raw.mode,
            start: raw.start,
            anchored: raw.anchored,
            classes: vec![0; class_names.len()],
            class_names,
            expanded,
        })
    }

    pub fn mode(&self) -> MatchMode {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.class_names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.class_names.is_empty()
    }

    /// The expanded regexes, in priority order.
    pub fn expanded(&self) -> &[String] {
        &self.expanded
    }

    /// Memory the DFA takes.
    pub fn dfa_bytes(&self) -> usize {
        self.dfa.memory_usage()
    }

    pub(super) fn pattern_set(&self) -> PatternSet {
        PatternSet::new(self.dfa.pattern_len())
    }

    pub(super) fn bind_labels(&mut self, labels: &mut Labels) {
        for (c, name) in self.classes.iter_mut().zip(&self.class_names) {
            *c = labels.intern(name);
        }
    }

    /// The bytes a packet's search covers.
    #[inline]
    fn haystack<'a>(&self, v: &PacketView<'a>) -> &'a [u8] {
        let from = match self.start {
            Start::Frame => 0,
            Start::Ip => usize::from(v.decoded.l3_offset),
            Start::Transport => usize::from(v.decoded.l4_offset),
        };
        v.frame.get(from..).unwrap_or(&[])
    }

    /// Runs the DFA over bytes, filling `set` with every matching pattern.
    #[inline]
    pub fn matches_into(&self, bytes: &[u8], set: &mut PatternSet) {
        set.clear();
        let mut input = Input::new(bytes);
        if self.anchored {
            input = input.anchored(Anchored::Yes);
        }
        // Errors only arise from quit bytes or unsupported look-arounds,
        // neither of which this configuration has; treat as no match.
        let _ = self.dfa.try_which_overlapping_matches(&input, set);
    }

    pub(super) fn classify(
        &self,
        v: &PacketView<'_>,
        set: &mut PatternSet,
        labels: &mut Labels,
    ) -> u16 {
        self.matches_into(self.haystack(v), set);
        match self.mode {
            MatchMode::Priority => set.iter().next().map_or(0, |p| self.classes[p.as_usize()]),
            MatchMode::All => {
                let mut it = set.iter();
                let Some(first) = it.next() else { return 0 };
                let mut combined: Vec<&str> = vec![&self.class_names[first.as_usize()]];
                let mut more = false;
                for p in it {
                    let name = self.class_names[p.as_usize()].as_str();
                    if !combined.contains(&name) {
                        combined.push(name);
                        more = true;
                    }
                }
                if more {
                    labels.intern(&combined.join("+"))
                } else {
                    self.classes[first.as_usize()]
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoded;

    const FIG5: &str = include_str!("../../examples/patterns-fig5.toml");

    #[test]
    fn definitions_expand_but_repetitions_stay() {
        let mut defs = HashMap::new();
        defs.insert("A".to_owned(), Spanned::new(0..0, ".".to_owned()));
        defs.insert("B".to_owned(), Spanned::new(0..0, "{A}{2}x".to_owned()));
        assert_eq!(expand("{B}{3}", &defs, 0).unwrap(), "(?:(?:.){2}x){3}");
        assert!(expand("{C}", &defs, 0).unwrap_err().contains("not defined"));
        defs.insert("L".to_owned(), Spanned::new(0..0, "{L}".to_owned()));
        assert!(expand("{L}", &defs, 0).is_err());
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 8;
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, proto, 0xab, 0xcd];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 16]);
        f
    }

    fn class(rules: &PatternRules, labels: &mut Labels, frame: &[u8]) -> Option<String> {
        let d = Decoded {
            l3_offset: 14,
            l4_offset: 34,
            ..Decoded::default()
        };
        let v = PacketView {
            interface: "",
            frame,
            decoded: &d,
        };
        let mut set = rules.pattern_set();
        let c = rules.classify(&v, &mut set, labels);
        labels.name(c).map(str::to_owned)
    }

    #[test]
    fn figure_5_intent() {
        let mut rules = PatternRules::parse("fig5.toml", FIG5).unwrap();
        let mut labels = Labels::new();
        rules.bind_labels(&mut labels);
        let h1 = [172, 20, 1, 2];
        let h3 = [172, 20, 3, 3];
        assert_eq!(
            class(&rules, &mut labels, &ipv4(6, h1, h3, 2000, 80)).as_deref(),
            Some("fig5-tcp-2000-80")
        );
        assert_eq!(
            class(&rules, &mut labels, &ipv4(17, h1, h3, 6055, 4055)).as_deref(),
            Some("fig5-udp-6055-4055")
        );
        assert_eq!(
            class(&rules, &mut labels, &ipv4(6, h1, h3, 8000, 9001)).as_deref(),
            Some("fig5-tcp-8000-9001")
        );
        assert_eq!(class(&rules, &mut labels, &ipv4(6, h1, h3, 2000, 81)), None);
        assert_eq!(class(&rules, &mut labels, &ipv4(6, h3, h1, 2000, 80)), None);
    }

    #[test]
    fn priority_and_all_modes() {
        let src = |mode: &str| {
            format!(
            "mode = \"{mode}\"\nstart = \"frame\"\n[[pattern]]\nclass = \"late\"\nregex = \"abc\"\n\
             [[pattern]]\nclass = \"first\"\npriority = 1\nregex = \"b\"\n\
             [[pattern]]\nclass = \"never\"\nregex = \"zzz\"\n"
        )
        };
        let mut p = PatternRules::parse("p.toml", &src("priority")).unwrap();
        let mut labels = Labels::new();
        p.bind_labels(&mut labels);
        assert_eq!(class(&p, &mut labels, b"xxabcxx").as_deref(), Some("first"));
        assert_eq!(class(&p, &mut labels, b"xxxx"), None);
        let mut a = PatternRules::parse("p.toml", &src("all")).unwrap();
        let mut labels = Labels::new();
        a.bind_labels(&mut labels);
        assert_eq!(
            class(&a, &mut labels, b"xxabcxx").as_deref(),
            Some("first+late")
        );
        assert_eq!(class(&a, &mut labels, b"b").as_deref(), Some("first"));
    }

    #[test]
    fn invalid_regex_is_located() {
        let e = PatternRules::parse("p.toml", "[[pattern]]\nclass = \"x\"\nregex = \"a(b\"\n")
            .unwrap_err();
        assert_eq!((e.file.as_str(), e.line, e.column), ("p.toml", 3, 9), "{e}");
        assert!(e.message.contains("invalid regex"), "{e}");
        let e = PatternRules::parse("p.toml", "[[pattern]]\nclass = \"x\"\nregex = \"{NOPE}\"\n")
            .unwrap_err();
        assert!(e.message.contains("not defined"), "{e}");
        let e = PatternRules::parse("p.toml", "mode = \"some\"\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,120}") {
            let _ = PatternRules::parse("p.toml", &s);
        }

        #[test]
        fn regex_field_never_panics(re in "[\\\\x0-9a-f{}()\\[\\]*+?.|^$A-Z]{0,30}") {
            let src = format!("[definitions]\nA = \"b\"\n[[pattern]]\nclass = \"x\"\nregex = '{re}'\n");
            let _ = PatternRules::parse("p.toml", &src);
        }
    }
}
