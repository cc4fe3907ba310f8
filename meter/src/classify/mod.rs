//! Classifiers: each assigns a class label to a packet, and the label is
//! part of the flow key.
//!
//! Three kinds, loaded from rule files and combinable; they are evaluated in
//! this order and the first kind that assigns a class wins:
//!
//! 1. field/mask rules (TOML, `seeds/003` §5), by ascending filter id;
//! 2. flow-key definitions (XML, `seeds/004` Fig. 4), the most specific
//!    matching FLOW first, document order breaking ties;
//! 3. byte patterns (regular expressions over packet bytes compiled into one
//!    multi-pattern DFA), first match by priority or all matches.
//!
//! A packet no rule matches is unclassified (no `class` in its records).

mod fields;
mod flowkeys;
mod patterns;
mod text;

pub use fields::{FieldRule, FieldRules};
pub use flowkeys::{FlowKeyDefs, FlowKeyWarning};
pub use patterns::{MatchMode, PatternRules};
pub use text::RuleError;

use crate::decode::Decoded;
use std::collections::HashMap;

/// What a classifier sees of a packet.
#[derive(Debug, Clone, Copy)]
pub struct PacketView<'a> {
    /// Name of the interface the packet was captured on ("" if unknown).
    pub interface: &'a str,
    /// The captured bytes (after the CAPLEN cut).
    pub frame: &'a [u8],
    pub decoded: &'a Decoded,
}

/// Class labels by index; 0 is "no class". Each meter pipeline owns one
/// copy, so that all-matches combinations can be added without locks.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    names: Vec<String>,
    index: HashMap<String, u16>,
}

impl Labels {
    pub fn new() -> Labels {
        Labels {
            names: vec![String::new()],
            index: HashMap::new(),
        }
    }

    /// The index of `name`, adding it when new. Beyond 65 535 labels new
    /// names share the last index (a rule set that large is a mistake).
    pub fn intern(&mut self, name: &str) -> u16 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = u16::try_from(self.names.len()).unwrap_or(u16::MAX);
        if i != u16::MAX {
            self.names.push(name.to_owned());
            self.index.insert(name.to_owned(), i);
        }
        i
    }

    /// The label of an index; `None` for 0.
    pub fn name(&self, i: u16) -> Option<&str> {
        if i == 0 {
            None
        } else {
            self.names.get(usize::from(i)).map(String::as_str)
        }
    }
}

/// Every classifier the meter runs, in evaluation order.
#[derive(Debug, Default)]
pub struct Classifier {
    fields: Option<FieldRules>,
    flow_keys: Option<FlowKeyDefs>,
    patterns: Option<PatternRules>,
    labels: Labels,
}

/// Per-pipeline scratch space for classification.
#[derive(Debug)]
pub struct Scratch {
    pub labels: Labels,
    patset: Option<regex_automata::PatternSet>,
}

impl Classifier {
    pub fn new(
        fields: Option<FieldRules>,
        flow_keys: Option<FlowKeyDefs>,
        patterns: Option<PatternRules>,
    ) -> Classifier {
        let mut labels = Labels::new();
        let mut fields = fields;
        let mut flow_keys = flow_keys;
        let mut patterns = patterns;
        if let Some(f) = fields.as_mut() {
            f.bind_labels(&mut labels);
        }
        if let Some(f) = flow_keys.as_mut() {
            f.bind_labels(&mut labels);
        }
        if let Some(p) = patterns.as_mut() {
            p.bind_labels(&mut labels);
        }
        Classifier {
            fields,
            flow_keys,
            patterns,
            labels,
        }
    }

    /// True when no rule of any kind is loaded.
    pub fn is_empty(&self) -> bool {
        self.fields.is_none() && self.flow_keys.is_none() && self.patterns.is_none()
    }

    /// Fresh scratch space (one per pipeline thread).
    pub fn scratch(&self) -> Scratch {
        Scratch {
            labels: self.labels.clone(),
            patset: self.patterns.as_ref().map(|p| p.pattern_set()),
        }
    }

    /// The class index of a packet (0 = none).
    #[inline]
    pub fn classify(&self, view: &PacketView<'_>, scratch: &mut Scratch) -> u16 {
        if let Some(f) = &self.fields {
            if let Some(c) = f.classify(view) {
                return c;
            }
        }
        if let Some(f) = &self.flow_keys {
            if let Some(c) = f.classify(view) {
                return c;
            }
        }
        if let (Some(p), Some(set)) = (&self.patterns, scratch.patset.as_mut()) {
            return p.classify(view, set, &mut scratch.labels);
        }
        0
    }
}
