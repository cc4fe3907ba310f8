//! Wire parsing of NetFlow v5, NetFlow v9 (RFC 3954) and IPFIX (RFC 7011):
//! message headers, set headers and template records. Every length and
//! count read here is checked against the bytes actually present before it
//! is used, and nothing is allocated in proportion to a count from the wire
//! beyond what the checked bytes can hold.

use super::stats::DropReason;

/// The variable-length marker of a field length (RFC 7011 §7).
pub const VARLEN: u16 = 0xFFFF;
/// The enterprise bit of an IPFIX field id.
const ENTERPRISE_BIT: u16 = 0x8000;

/// Reads big-endian unsigned integers of 1 to 8 bytes (reduced-size
/// encoding, RFC 7011 §6.2). Longer slices keep their last 8 bytes.
#[inline]
pub fn be_uint(bytes: &[u8]) -> u64 {
    let mut v = 0u64;
    for &b in bytes {
        v = (v << 8) | u64::from(b);
    }
    v
}

#[inline]
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

#[inline]
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// The flow protocol of a message, from its first two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    V5,
    V9,
    Ipfix,
}

impl Version {
    pub const fn number(self) -> u16 {
        match self {
            Version::V5 => 5,
            Version::V9 => 9,
            Version::Ipfix => 10,
        }
    }

    pub fn from_number(n: u16) -> Option<Version> {
        match n {
            5 => Some(Version::V5),
            9 => Some(Version::V9),
            10 => Some(Version::Ipfix),
            _ => None,
        }
    }
}

/// The header fields every version shares after normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// IPFIX observation domain, v9 source id, v5 engine type·256 + id.
    pub domain: u32,
    pub sequence: u32,
    /// Export time, seconds since the epoch.
    pub export_secs: u32,
    /// v5/v9: the exporter's uptime in ms at export; 0 for IPFIX.
    pub sys_uptime_ms: u32,
    /// v5 only: the nanoseconds of the export time.
    pub export_nsecs: u32,
    /// v5 only: the record count; v9: the header's count (not trusted).
    pub count: u16,
    /// v5 only: the sampling interval of the header (0 = none).
    pub v5_sampling: u16,
    /// Length of the header in bytes: where the sets (or v5 records) begin.
    pub header_len: usize,
    /// The bytes of the message this header covers (IPFIX: its length
    /// field; v5: header + records; v9: the whole datagram).
    pub message_len: usize,
}

pub const V5_HEADER: usize = 24;
pub const V5_RECORD: usize = 48;
pub const V5_MAX_RECORDS: u16 = 30;
pub const V9_HEADER: usize = 20;
pub const IPFIX_HEADER: usize = 16;

/// Parses the header of one message at the start of `b`.
pub fn parse_header(b: &[u8]) -> Result<Header, DropReason> {
    let version = be16(b, 0).ok_or(DropReason::ShortHeader)?;
    let version = Version::from_number(version).ok_or(DropReason::UnknownVersion)?;
    match version {
        Version::V5 => {
            if b.len() < V5_HEADER {
                return Err(DropReason::ShortHeader);
            }
            let count = be16(b, 2).ok_or(DropReason::ShortHeader)?;
            if count == 0 || count > V5_MAX_RECORDS {
                return Err(DropReason::BadRecordCount);
            }
            let message_len = V5_HEADER + usize::from(count) * V5_RECORD;
            if message_len > b.len() {
                return Err(DropReason::BadRecordCount);
            }
            let sampling = be16(b, 22).ok_or(DropReason::ShortHeader)?;
            Ok(Header {
                version,
                count,
                sys_uptime_ms: be32(b, 4).ok_or(DropReason::ShortHeader)?,
                export_secs: be32(b, 8).ok_or(DropReason::ShortHeader)?,
                export_nsecs: be32(b, 12).ok_or(DropReason::ShortHeader)?,
                sequence: be32(b, 16).ok_or(DropReason::ShortHeader)?,
                domain: u32::from(be16(b, 20).ok_or(DropReason::ShortHeader)?),
                v5_sampling: sampling,
                header_len: V5_HEADER,
                message_len,
            })
        }
        Version::V9 => {
            if b.len() < V9_HEADER {
                return Err(DropReason::ShortHeader);
            }
            Ok(Header {
                version,
                count: be16(b, 2).ok_or(DropReason::ShortHeader)?,
                sys_uptime_ms: be32(b, 4).ok_or(DropReason::ShortHeader)?,
                export_secs: be32(b, 8).ok_or(DropReason::ShortHeader)?,
                export_nsecs: 0,
                sequence: be32(b, 12).ok_or(DropReason::ShortHeader)?,
                domain: be32(b, 16).ok_or(DropReason::ShortHeader)?,
                v5_sampling: 0,
                header_len: V9_HEADER,
                message_len: b.len(),
            })
        }
        Version::Ipfix => {
            if b.len() < IPFIX_HEADER {
                return Err(DropReason::ShortHeader);
            }
            let len = usize::from(be16(b, 2).ok_or(DropReason::ShortHeader)?);
            if len < IPFIX_HEADER || len > b.len() {
                return Err(DropReason::BadMessageLength);
            }
            Ok(Header {
                version,
                count: 0,
                sys_uptime_ms: 0,
                export_secs: be32(b, 4).ok_or(DropReason::ShortHeader)?,
                export_nsecs: 0,
                sequence: be32(b, 8).ok_or(DropReason::ShortHeader)?,
                domain: be32(b, 12).ok_or(DropReason::ShortHeader)?,
                v5_sampling: 0,
                header_len: IPFIX_HEADER,
                message_len: len,
            })
        }
    }
}

/// One set of a v9 or IPFIX message: its id and its body (header excluded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Set<'a> {
    pub id: u16,
    pub body: &'a [u8],
}

/// Iterates over the sets of a v9/IPFIX message body; stops with an error
/// at the first set whose length does not fit.
#[derive(Debug)]
pub struct Sets<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Sets<'a> {
    pub fn new(body: &'a [u8]) -> Sets<'a> {
        Sets {
            rest: body,
            failed: false,
        }
    }
}

impl<'a> Iterator for Sets<'a> {
    type Item = Result<Set<'a>, DropReason>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        // v9 allows padding after the last flowset; fewer than 4 bytes
        // cannot be a set, so they are padding.
        if self.rest.len() < 4 {
            if self.rest.iter().all(|&b| b == 0) {
                return None;
            }
            self.failed = true;
            return Some(Err(DropReason::BadSetLength));
        }
        let id = u16::from_be_bytes([self.rest[0], self.rest[1]]);
        let len = usize::from(u16::from_be_bytes([self.rest[2], self.rest[3]]));
        if len < 4 || len > self.rest.len() {
            self.failed = true;
            return Some(Err(DropReason::BadSetLength));
        }
        let body = &self.rest[4..len];
        self.rest = &self.rest[len..];
        Some(Ok(Set { id, body }))
    }
}

/// One field specifier of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FieldSpec {
    pub id: u16,
    /// [`VARLEN`] for a variable-length field.
    pub len: u16,
    /// 0 for IANA's elements.
    pub enterprise: u32,
}

/// What a template record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateRecord {
    /// A (data or options) template definition.
    Define(TemplateDef),
    /// IPFIX withdrawal of one template id (field count 0).
    Withdraw(u16),
    /// IPFIX withdrawal of every template of the set's kind (template id =
    /// the set id, 2 or 3, field count 0).
    WithdrawAll { options: bool },
}

/// A template or options template as defined on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TemplateDef {
    pub id: u16,
    /// The leading fields that are scope fields (0 for a data template).
    pub scope_count: u16,
    pub options: bool,
    pub fields: Vec<FieldSpec>,
}

/// Parses the template records of one template (`options == false`) or
/// options template set body. `max_fields` bounds the fields of one
/// template. Each record is returned or its error; after an error that
/// loses the position (an overrun) parsing stops.
pub fn parse_template_set(
    version: Version,
    set_id: u16,
    body: &[u8],
    options: bool,
    max_fields: usize,
) -> Vec<Result<TemplateRecord, DropReason>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    // A template record is at least 4 bytes; fewer left is padding.
    while body.len().saturating_sub(at) >= 4 {
        let parsed = match (version, options) {
            (Version::V9, true) => parse_v9_options(body, &mut at, max_fields),
            (Version::Ipfix, true) => parse_ipfix_template(set_id, body, &mut at, true, max_fields),
            _ => parse_ipfix_template(set_id, body, &mut at, false, max_fields),
        };
        let stop = matches!(
            parsed,
            Err(DropReason::FieldCountOverrun) | Err(DropReason::TooManyFields)
        );
        out.push(parsed);
        if stop {
            break;
        }
        if version == Version::V9 && options {
            // One v9 options template per flowset, followed by padding.
            break;
        }
    }
    out
}

/// Reads one field specifier at `*at`, advancing it.
fn field_spec(version: Version, b: &[u8], at: &mut usize) -> Option<FieldSpec> {
    let raw = be16(b, *at)?;
    let len = be16(b, *at + 2)?;
    *at += 4;
    if version == Version::Ipfix && raw & ENTERPRISE_BIT != 0 {
        let pen = be32(b, *at)?;
        *at += 4;
        Some(FieldSpec {
            id: raw & !ENTERPRISE_BIT,
            len,
            enterprise: pen,
        })
    } else {
        Some(FieldSpec {
            id: raw,
            len,
            enterprise: 0,
        })
    }
}

/// An IPFIX template or options template record, or a v9 template record
/// (the same shape, no enterprise bit and no options).
fn parse_ipfix_template(
    set_id: u16,
    b: &[u8],
    at: &mut usize,
    options: bool,
    max_fields: usize,
) -> Result<TemplateRecord, DropReason> {
    let version = if set_id == 0 {
        Version::V9
    } else {
        Version::Ipfix
    };
    let id = be16(b, *at).ok_or(DropReason::FieldCountOverrun)?;
    let count = be16(b, *at + 2).ok_or(DropReason::FieldCountOverrun)?;
    *at += 4;
    if count == 0 {
        if version == Version::V9 {
            return Err(DropReason::ZeroLengthRecord);
        }
        if id == set_id {
            return Ok(TemplateRecord::WithdrawAll { options });
        }
        if id < 256 {
            return Err(DropReason::BadTemplateId);
        }
        return Ok(TemplateRecord::Withdraw(id));
    }
    let scope_count = if options {
        let s = be16(b, *at).ok_or(DropReason::FieldCountOverrun)?;
        *at += 2;
        s
    } else {
        0
    };
    // Each field specifier takes at least 4 bytes: a count the set cannot
    // hold is refused before anything is allocated for it.
    let count = usize::from(count);
    if count > max_fields {
        return Err(DropReason::TooManyFields);
    }
    if count * 4 > b.len().saturating_sub(*at) {
        return Err(DropReason::FieldCountOverrun);
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        fields.push(field_spec(version, b, at).ok_or(DropReason::FieldCountOverrun)?);
    }
    if id < 256 {
        return Err(DropReason::BadTemplateId);
    }
    if options && (scope_count == 0 || usize::from(scope_count) > count) {
        return Err(DropReason::OptionsWithoutScope);
    }
    Ok(TemplateRecord::Define(TemplateDef {
        id,
        scope_count: if options { scope_count } else { 0 },
        options,
        fields,
    }))
}

/// A v9 options template (RFC 3954 §6.1): id, scope length and option
/// length in bytes, then the specifiers.
fn parse_v9_options(
    b: &[u8],
    at: &mut usize,
    max_fields: usize,
) -> Result<TemplateRecord, DropReason> {
    let id = be16(b, *at).ok_or(DropReason::FieldCountOverrun)?;
    let scope_bytes = usize::from(be16(b, *at + 2).ok_or(DropReason::FieldCountOverrun)?);
    let option_bytes = usize::from(be16(b, *at + 4).ok_or(DropReason::FieldCountOverrun)?);
    *at += 6;
    if scope_bytes % 4 != 0 || option_bytes % 4 != 0 {
        return Err(DropReason::FieldCountOverrun);
    }
    if scope_bytes + option_bytes > b.len().saturating_sub(*at) {
        return Err(DropReason::FieldCountOverrun);
    }
    let count = (scope_bytes + option_bytes) / 4;
    if count > max_fields {
        return Err(DropReason::TooManyFields);
    }
    if scope_bytes == 0 {
        *at += option_bytes;
        return Err(DropReason::OptionsWithoutScope);
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        fields.push(field_spec(Version::V9, b, at).ok_or(DropReason::FieldCountOverrun)?);
    }
    if id < 256 {
        return Err(DropReason::BadTemplateId);
    }
    Ok(TemplateRecord::Define(TemplateDef {
        id,
        scope_count: (scope_bytes / 4) as u16,
        options: true,
        fields,
    }))
}

/// Reads one variable-length field's length prefix at `*at` (RFC 7011 §7:
/// one byte, or 255 followed by two bytes), advancing past it.
#[inline]
pub fn var_len(b: &[u8], at: &mut usize) -> Option<usize> {
    let first = *b.get(*at)?;
    if first < 255 {
        *at += 1;
        Some(usize::from(first))
    } else {
        let l = be16(b, *at + 1)?;
        *at += 3;
        Some(usize::from(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_size_integers_read_big_endian() {
        assert_eq!(be_uint(&[0x01, 0x02]), 0x0102);
        assert_eq!(be_uint(&[0xff; 8]), u64::MAX);
        assert_eq!(be_uint(&[]), 0);
    }

    #[test]
    fn var_len_reads_one_and_three_byte_prefixes() {
        let mut at = 0;
        assert_eq!(var_len(&[5, 0, 0], &mut at), Some(5));
        assert_eq!(at, 1);
        let mut at = 0;
        assert_eq!(var_len(&[255, 0x01, 0x00], &mut at), Some(256));
        assert_eq!(at, 3);
        let mut at = 0;
        assert_eq!(var_len(&[255, 0x01], &mut at), None);
    }

    #[test]
    fn a_set_longer_than_the_message_is_refused() {
        let body = [1, 0, 0, 9, 0, 0, 0];
        let sets: Vec<_> = Sets::new(&body).collect();
        assert_eq!(sets, vec![Err(DropReason::BadSetLength)]);
        let body = [1, 0, 0, 3];
        let sets: Vec<_> = Sets::new(&body).collect();
        assert_eq!(sets, vec![Err(DropReason::BadSetLength)]);
    }

    #[test]
    fn a_field_count_that_overruns_the_set_allocates_nothing() {
        // id 256, 65535 fields, one field present.
        let body = [1, 0, 0xff, 0xff, 0, 8, 0, 4];
        let r = parse_template_set(Version::Ipfix, 2, &body, false, 1 << 16);
        assert_eq!(r, vec![Err(DropReason::FieldCountOverrun)]);
    }

    #[test]
    fn withdrawals_are_recognised() {
        let one = [1, 0, 0, 0];
        assert_eq!(
            parse_template_set(Version::Ipfix, 2, &one, false, 64),
            vec![Ok(TemplateRecord::Withdraw(256))]
        );
        let all = [0, 3, 0, 0];
        assert_eq!(
            parse_template_set(Version::Ipfix, 3, &all, true, 64),
            vec![Ok(TemplateRecord::WithdrawAll { options: true })]
        );
    }

    #[test]
    fn options_without_scope_are_refused() {
        // IPFIX: id 256, 1 field, scope count 0.
        let body = [1, 0, 0, 1, 0, 0, 0, 34, 0, 4];
        assert_eq!(
            parse_template_set(Version::Ipfix, 3, &body, true, 64),
            vec![Err(DropReason::OptionsWithoutScope)]
        );
        // v9: scope length 0.
        let body = [1, 0, 0, 0, 0, 4, 0, 34, 0, 4];
        assert_eq!(
            parse_template_set(Version::V9, 1, &body, true, 64),
            vec![Err(DropReason::OptionsWithoutScope)]
        );
    }

    #[test]
    fn enterprise_specifiers_take_their_number() {
        let body = [1, 0, 0, 1, 0x80, 3, 0xff, 0xff, 0, 0, 0x7e, 0xd9];
        let r = parse_template_set(Version::Ipfix, 2, &body, false, 64);
        let Ok(TemplateRecord::Define(t)) = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(
            t.fields,
            vec![FieldSpec {
                id: 3,
                len: VARLEN,
                enterprise: 32473
            }]
        );
    }
}
