//! Per-exporter counters: what arrived, what was decoded, and every drop by
//! its reason.

use std::fmt;

/// Why a message, set or record was not turned into flow records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than its version's header.
    ShortHeader,
    /// A version other than 5, 9 and 10.
    UnknownVersion,
    /// The header's length disagrees with the datagram or is under the header.
    BadMessageLength,
    /// A set header under 4 bytes, or a set length under 4 or past the message.
    BadSetLength,
    /// A v5 record count over 30 or past the datagram.
    BadRecordCount,
    /// A template whose field count overruns its set.
    FieldCountOverrun,
    /// A template field whose length its element cannot have (an IPv4
    /// address of 3 bytes, a counter of 9).
    BadFieldLength,
    /// A template whose record would take no bytes (every field 0 long).
    ZeroLengthRecord,
    /// A template id under 256.
    BadTemplateId,
    /// An options template with no scope field.
    OptionsWithoutScope,
    /// A template over the per-exporter template limit.
    TooManyTemplates,
    /// A template with more fields than the limit.
    TooManyFields,
    /// A variable-length field longer than what is left of its set.
    VarLenOverrun,
    /// Data held for a template that never came within the age limit.
    PendingExpired,
    /// Data that found the pending buffer full (count or bytes).
    PendingOverflow,
    /// Data whose template was withdrawn (TCP) or expired (UDP) and did not
    /// come back.
    TemplateWithdrawn,
    /// Datagrams from a source not on the allow-list.
    NotAllowed,
    /// A new exporter while the decoder already tracks its maximum.
    TooManyExporters,
    /// A template withdrawal over UDP (RFC 7011 §8.4 forbids it).
    WithdrawalOverUdp,
    /// A sampling rate over `MAX_SAMPLING` (2^24) in a data or options
    /// record: the rate is ignored (the record itself is kept).
    BadSamplingRate,
    /// A data template with no address and no counter field (its records
    /// would be flows of nothing).
    NoFlowFields,
    /// Records of a message past `Limits::max_records_per_message`: the rest
    /// of the set is not decoded (counted once per set cut short).
    TooManyRecords,
    /// A TCP template redefined without a withdrawal first: the session is
    /// closed (RFC 7011 §8.1).
    TemplateRedefined,
}

impl DropReason {
    /// Every reason, in the order of [`Counters::drops`].
    pub const ALL: [DropReason; 23] = [
        DropReason::ShortHeader,
        DropReason::UnknownVersion,
        DropReason::BadMessageLength,
        DropReason::BadSetLength,
        DropReason::BadRecordCount,
        DropReason::FieldCountOverrun,
        DropReason::BadFieldLength,
        DropReason::ZeroLengthRecord,
        DropReason::BadTemplateId,
        DropReason::OptionsWithoutScope,
        DropReason::TooManyTemplates,
        DropReason::TooManyFields,
        DropReason::VarLenOverrun,
        DropReason::PendingExpired,
        DropReason::PendingOverflow,
        DropReason::TemplateWithdrawn,
        DropReason::NotAllowed,
        DropReason::TooManyExporters,
        DropReason::WithdrawalOverUdp,
        DropReason::BadSamplingRate,
        DropReason::NoFlowFields,
        DropReason::TooManyRecords,
        DropReason::TemplateRedefined,
    ];

    /// The name used in logs, SQL and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::ShortHeader => "short_header",
            DropReason::UnknownVersion => "unknown_version",
            DropReason::BadMessageLength => "bad_message_length",
            DropReason::BadSetLength => "bad_set_length",
            DropReason::BadRecordCount => "bad_record_count",
            DropReason::FieldCountOverrun => "field_count_overrun",
            DropReason::BadFieldLength => "bad_field_length",
            DropReason::ZeroLengthRecord => "zero_length_record",
            DropReason::BadTemplateId => "bad_template_id",
            DropReason::OptionsWithoutScope => "options_without_scope",
            DropReason::TooManyTemplates => "too_many_templates",
            DropReason::TooManyFields => "too_many_fields",
            DropReason::VarLenOverrun => "var_len_overrun",
            DropReason::PendingExpired => "pending_expired",
            DropReason::PendingOverflow => "pending_overflow",
            DropReason::TemplateWithdrawn => "template_withdrawn",
            DropReason::NotAllowed => "not_allowed",
            DropReason::TooManyExporters => "too_many_exporters",
            DropReason::WithdrawalOverUdp => "withdrawal_over_udp",
            DropReason::BadSamplingRate => "bad_sampling_rate",
            DropReason::NoFlowFields => "no_flow_fields",
            DropReason::TooManyRecords => "too_many_records",
            DropReason::TemplateRedefined => "template_redefined",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one exporter's observation domain (or of the exporter as a
/// whole, for what fails before a domain is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages (datagrams, TCP messages) accepted far enough to be parsed.
    pub messages: u64,
    /// Flow records decoded.
    pub records: u64,
    /// Records (IPFIX, v5) or messages (v9) the sequence numbers say were
    /// lost; a late message that fills a gap takes its part back.
    pub sequence_gaps: u64,
    /// Messages that arrived behind the expected sequence number.
    pub reordered: u64,
    /// Templates and options templates received (definitions, refreshes
    /// included).
    pub templates_received: u64,
    /// Records with total counters (85/86) whose flow could not be tracked
    /// because the totals table was full: stored with their whole total as
    /// the delta.
    pub totals_untracked: u64,
    /// Drops by reason, indexed like [`DropReason::ALL`]; each counts the
    /// unit the reason names (message, set, template or record).
    pub drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    pub fn drop_n(&mut self, reason: DropReason, n: u64) {
        self.drops[reason.index()] += n;
    }

    /// The count of one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Every reason with a non-zero count.
    pub fn nonzero_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.drops[r.index()]))
            .filter(|(_, n)| *n > 0)
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.messages += other.messages;
        self.records += other.records;
        self.sequence_gaps += other.sequence_gaps;
        self.reordered += other.reordered;
        self.templates_received += other.templates_received;
        self.totals_untracked += other.totals_untracked;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_once_in_index_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }
}
