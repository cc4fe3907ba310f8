//! DPMI filters (`seeds/003` §3, §5): which frames a measurement request
//! wants, as masked header fields, shared by the controller (validation,
//! merging, widening), the measurement point (matching) and the consumer
//! (re-filtering with its exact request).
//!
//! A [`Filter`] is a conjunction of masked fields; a field left out matches
//! everything. A field matches a frame when `frame_value & mask == value`.
//! Because every field is independent, whether two filters can match one
//! frame ([`Filter::overlaps`]), whether one holds all frames of the other
//! ([`Filter::contains`]) and the narrowest filter holding both
//! ([`Filter::cover`]) are exact per-field bit operations.
//!
//! In JSON a field is a string `VALUE` (all bits) or `VALUE/MASK`, the mask
//! a prefix length or written like the value: `"10.1.0.0/16"`,
//! `"10.1.0.0/255.255.0.0"`, `"6"`, `"0x0800/0xffff"`,
//! `"02:00:00:00:00:00/ff:00:00:00:00:00"`, `"2001:db8::/32"`. A value
//! with bits outside its mask is refused (it could never match, or the
//! user meant another mask).
//!
//! IPv6 addresses (written under `ip_src`/`ip_dst`, kept as `ip6_src`/
//! `ip6_dst`) and IPv4 ones never share a filter; filters of different
//! families never overlap, and IPv6 addresses widen to their common prefix.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The filter fields of `seeds/003` §5, by their JSON names.
pub const FIELDS: &[&str] = &[
    "interface",
    "vlan_tci",
    "ether_type",
    "eth_src",
    "eth_dst",
    "ip_proto",
    "ip_src",
    "ip_dst",
    "src_port",
    "dst_port",
];

/// A value and the bits of it that count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Masked {
    pub value: u128,
    pub mask: u128,
}

impl Masked {
    fn matches(self, v: u128) -> bool {
        v & self.mask == self.value
    }
    fn overlaps(self, o: Masked) -> bool {
        let both = self.mask & o.mask;
        self.value & both == o.value & both
    }
    /// Whether every value `o` matches, `self` matches.
    fn contains(self, o: Masked) -> bool {
        self.mask & o.mask == self.mask && o.value & self.mask == self.value
    }
    /// The narrowest masked value matching all that either matches.
    fn cover(self, o: Masked) -> Masked {
        let mask = self.mask & o.mask & !(self.value ^ o.value);
        Masked {
            value: self.value & mask,
            mask,
        }
    }
}

/// Which kind of field, for parsing and printing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int { bits: u32 },
    Mac,
    Ipv4,
    Ipv6,
}

fn kind_of(field: &str) -> Option<Kind> {
    Some(match field {
        "vlan_tci" | "ether_type" | "src_port" | "dst_port" => Kind::Int { bits: 16 },
        "ip_proto" => Kind::Int { bits: 8 },
        "eth_src" | "eth_dst" => Kind::Mac,
        "ip_src" | "ip_dst" => Kind::Ipv4,
        "ip6_src" | "ip6_dst" => Kind::Ipv6,
        _ => return None,
    })
}

impl Kind {
    fn bits(self) -> u32 {
        match self {
            Kind::Int { bits } => bits,
            Kind::Mac => 48,
            Kind::Ipv4 => 32,
            Kind::Ipv6 => 128,
        }
    }
    fn all(self) -> u128 {
        u128::MAX >> (128 - self.bits())
    }
    fn parse_value(self, s: &str) -> Option<u128> {
        match self {
            Kind::Int { .. } => {
                let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(h) => u128::from_str_radix(h, 16).ok()?,
                    None => s.parse().ok()?,
                };
                (v <= self.all()).then_some(v)
            }
            Kind::Mac => {
                let parts: Vec<&str> = s.split(':').collect();
                if parts.len() != 6 {
                    return None;
                }
                let mut v = 0u128;
                for p in parts {
                    if p.is_empty() || p.len() > 2 {
                        return None;
                    }
                    v = v << 8 | u128::from(u8::from_str_radix(p, 16).ok()?);
                }
                Some(v)
            }
            Kind::Ipv4 => s.parse::<Ipv4Addr>().ok().map(|a| u128::from(u32::from(a))),
            Kind::Ipv6 => s.parse::<Ipv6Addr>().ok().map(u128::from),
        }
    }
    fn parse(self, s: &str) -> Result<Masked, String> {
        let (v, m) = match s.split_once('/') {
            Some((v, m)) => (v.trim(), Some(m.trim())),
            None => (s.trim(), None),
        };
        let value = self
            .parse_value(v)
            .ok_or_else(|| format!("{v:?} is not a valid value"))?;
        let mask = match m {
            None => self.all(),
            // A prefix length, unless the field is written as plain
            // integers (then `/N` is the mask itself).
            Some(m) if !matches!(self, Kind::Int { .. }) && !m.contains(['.', ':']) => {
                let len: u32 = m
                    .parse()
                    .ok()
                    .filter(|&l| l <= self.bits())
                    .ok_or_else(|| {
                        format!("mask {m:?} is not a prefix length 0..={}", self.bits())
                    })?;
                if len == 0 {
                    0
                } else {
                    (self.all() << (self.bits() - len)) & self.all()
                }
            }
            Some(m) => self
                .parse_value(m)
                .ok_or_else(|| format!("mask {m:?} is not a valid mask"))?,
        };
        if value & !mask != 0 {
            return Err(format!(
                "value {v} has bits outside its mask {}",
                self.show(mask)
            ));
        }
        Ok(Masked { value, mask })
    }
    fn show(self, v: u128) -> String {
        match self {
            Kind::Int { bits } => format!("0x{v:0w$x}", w = (bits / 4) as usize),
            Kind::Mac => (0..6)
                .rev()
                .map(|i| format!("{:02x}", (v >> (8 * i)) & 0xff))
                .collect::<Vec<_>>()
                .join(":"),
            Kind::Ipv4 => Ipv4Addr::from(v as u32).to_string(),
            Kind::Ipv6 => Ipv6Addr::from(v).to_string(),
        }
    }
}

/// The IP version a filter's addresses name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A field the filter could not take, by name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A conjunction of masked header fields (absent = any).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter {
    /// The capture interface (`CI`), exact.
    pub interface: Option<String>,
    /// Masked fields by name (see [`FIELDS`]); a zero mask is left out.
    pub fields: BTreeMap<&'static str, Masked>,
}

/// The header fields of one frame a filter can look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameFields {
    pub vlan_tci: Option<u16>,
    pub ether_type: u16,
    pub eth_src: u64,
    pub eth_dst: u64,
    /// IPv4: protocol, addresses.
    pub ip: Option<(u8, u32, u32)>,
    /// IPv6: addresses.
    pub ip6: Option<(u128, u128)>,
    /// IPv6: the upper-layer protocol, after the extension headers
    /// (`None` when they run past the bytes read or past [`MAX_EXT_HEADERS`]).
    pub ip6_proto: Option<u8>,
    /// TCP/UDP/SCTP ports of a first fragment (or an unfragmented packet),
    /// IPv4 or IPv6.
    pub ports: Option<(u16, u16)>,
}

/// IPv6 extension headers walked to find the upper-layer protocol.
pub const MAX_EXT_HEADERS: usize = 8;

/// The IPv6 next-header values the reader walks over: hop-by-hop options,
/// routing, fragment, destination options, authentication header,
/// mobility, HIP, shim6.
pub const IPV6_EXT_HEADERS: [u8; 8] = [0, 43, 44, 60, 51, 135, 139, 140];

/// Walks the extension headers of the IPv6 payload `rest` starting with
/// next header `nh`: the upper-layer protocol and, for a first fragment
/// (or none), the offset of its header in `rest`.
fn ipv6_upper(mut nh: u8, rest: &[u8]) -> Option<(u8, Option<usize>)> {
    let mut off = 0usize;
    let mut first_fragment = true;
    for _ in 0..=MAX_EXT_HEADERS {
        if !IPV6_EXT_HEADERS.contains(&nh) {
            return Some((nh, first_fragment.then_some(off)));
        }
        let h = rest.get(off..off + 2)?;
        let len = match nh {
            44 => {
                let fo = rest.get(off + 2..off + 4)?;
                if u16::from_be_bytes([fo[0], fo[1]]) & 0xfff8 != 0 {
                    first_fragment = false;
                }
                8
            }
            51 => (usize::from(h[1]) + 2) * 4,
            _ => (usize::from(h[1]) + 1) * 8,
        };
        nh = h[0];
        off += len;
    }
    None
}

impl FrameFields {
    /// Reads an Ethernet frame (an 802.1Q tag in the frame, or the tag the
    /// kernel stripped in `vlan_tci`). Returns `None` for a frame shorter
    /// than an Ethernet header.
    pub fn parse(frame: &[u8], stripped_tci: Option<u16>) -> Option<FrameFields> {
        let mac = |b: &[u8]| b.iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
        if frame.len() < 14 {
            return None;
        }
        let mut f = FrameFields {
            eth_dst: mac(&frame[0..6]),
            eth_src: mac(&frame[6..12]),
            vlan_tci: stripped_tci,
            ..FrameFields::default()
        };
        let mut off = 12;
        let mut et = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if et == 0x8100 && frame.len() >= 18 {
            f.vlan_tci = Some(u16::from_be_bytes([frame[14], frame[15]]));
            off = 16;
            et = u16::from_be_bytes([frame[off], frame[off + 1]]);
        }
        f.ether_type = et;
        let ip = &frame[off + 2..];
        if et == 0x0800 && ip.len() >= 20 && ip[0] >> 4 == 4 {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let proto = ip[9];
            let src = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
            let dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
            f.ip = Some((proto, src, dst));
            let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            if matches!(proto, 6 | 17 | 132) && frag_off == 0 && ihl >= 20 && ip.len() >= ihl + 4 {
                let l4 = &ip[ihl..];
                f.ports = Some((
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                ));
            }
        } else if et == 0x86dd && ip.len() >= 40 && ip[0] >> 4 == 6 {
            let addr = |b: &[u8]| b.iter().fold(0u128, |a, &x| a << 8 | u128::from(x));
            f.ip6 = Some((addr(&ip[8..24]), addr(&ip[24..40])));
            if let Some((proto, at)) = ipv6_upper(ip[6], &ip[40..]) {
                f.ip6_proto = Some(proto);
                if let Some(l4) = at
                    .filter(|_| matches!(proto, 6 | 17 | 132))
                    .and_then(|at| ip[40..].get(at..at + 4))
                {
                    f.ports = Some((
                        u16::from_be_bytes([l4[0], l4[1]]),
                        u16::from_be_bytes([l4[2], l4[3]]),
                    ));
                }
            }
        }
        Some(f)
    }

    fn get(&self, field: &str) -> Option<u128> {
        Some(match field {
            "vlan_tci" => u128::from(self.vlan_tci?),
            "ether_type" => u128::from(self.ether_type),
            "eth_src" => u128::from(self.eth_src),
            "eth_dst" => u128::from(self.eth_dst),
            "ip_proto" => u128::from(self.ip.map(|i| i.0).or(self.ip6_proto)?),
            "ip_src" => u128::from(self.ip?.1),
            "ip_dst" => u128::from(self.ip?.2),
            "ip6_src" => self.ip6?.0,
            "ip6_dst" => self.ip6?.1,
            "src_port" => u128::from(self.ports?.0),
            "dst_port" => u128::from(self.ports?.1),
            _ => return None,
        })
    }
}

impl Filter {
    /// Reads a filter from a JSON object of fields; an unknown field, a
    /// value that is not a string, a bad value or mask is an error naming
    /// the field (`filter.NAME`).
    pub fn from_json(v: &serde_json::Value) -> Result<Filter, FieldError> {
        let obj = v
            .as_object()
            .ok_or_else(|| FieldError::new("filter", "must be an object of fields"))?;
        let mut f = Filter::default();
        for (name, val) in obj {
            let field = format!("filter.{name}");
            let Some(&known) = FIELDS.iter().find(|&&k| k == name) else {
                return Err(FieldError::new(
                    field,
                    format!("unknown field (known: {})", FIELDS.join(", ")),
                ));
            };
            let s = val
                .as_str()
                .ok_or_else(|| FieldError::new(&field, "must be a string"))?;
            if known == "interface" {
                if s.is_empty() || s.len() > 15 {
                    return Err(FieldError::new(
                        field,
                        "must be an interface name (1-15 bytes)",
                    ));
                }
                f.interface = Some(s.to_owned());
                continue;
            }
            // An address with a ':' is IPv6, kept under its own key.
            let known = match known {
                "ip_src" if s.contains(':') => "ip6_src",
                "ip_dst" if s.contains(':') => "ip6_dst",
                k => k,
            };
            let kind = kind_of(known).ok_or_else(|| FieldError::new(&field, "unknown field"))?;
            let m = kind
                .parse(s)
                .map_err(|reason| FieldError::new(&field, reason))?;
            if m.mask != 0 {
                f.fields.insert(known, m);
            }
        }
        let has = |k: &[&str]| k.iter().any(|k| f.fields.contains_key(*k));
        // Two address fields of different families: ip_src and ip_dst.
        if has(&["ip_src", "ip_dst"]) && has(&["ip6_src", "ip6_dst"]) {
            return Err(FieldError::new(
                "filter.ip_dst",
                "an IPv4 and an IPv6 address in one filter (make one request per family)",
            ));
        }
        if let (Some(fam), Some(et)) = (f.family(), f.fields.get("ether_type")) {
            let want = if fam == Family::V4 { 0x0800 } else { 0x86dd };
            if et.value != want & et.mask {
                return Err(FieldError::new(
                    "filter.ether_type",
                    format!("does not match the {fam:?} addresses of the filter"),
                ));
            }
        }
        Ok(f)
    }

    /// Whether a frame with `fields`, seen on `interface`, matches.
    pub fn matches(&self, interface: &str, fields: &FrameFields) -> bool {
        if self.interface.as_deref().is_some_and(|i| i != interface) {
            return false;
        }
        self.fields
            .iter()
            .all(|(name, m)| fields.get(name).is_some_and(|v| m.matches(v)))
    }

    /// The address family the filter's addresses (or a full
    /// `ether_type` of IPv4 or IPv6) pin, if any.
    pub fn family(&self) -> Option<Family> {
        if ["ip_src", "ip_dst"]
            .iter()
            .any(|k| self.fields.contains_key(k))
        {
            return Some(Family::V4);
        }
        if ["ip6_src", "ip6_dst"]
            .iter()
            .any(|k| self.fields.contains_key(k))
        {
            return Some(Family::V6);
        }
        match self.fields.get("ether_type") {
            Some(m) if m.mask == 0xffff && m.value == 0x0800 => Some(Family::V4),
            Some(m) if m.mask == 0xffff && m.value == 0x86dd => Some(Family::V6),
            _ => None,
        }
    }

    /// Whether some frame can match both.
    pub fn overlaps(&self, o: &Filter) -> bool {
        if let (Some(a), Some(b)) = (&self.interface, &o.interface) {
            if a != b {
                return false;
            }
        }
        if let (Some(a), Some(b)) = (self.family(), o.family()) {
            if a != b {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|(k, m)| o.fields.get(k).is_none_or(|n| m.overlaps(*n)))
    }

    /// Whether every frame `o` matches, `self` matches.
    pub fn contains(&self, o: &Filter) -> bool {
        let iface = match (&self.interface, &o.interface) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        iface
            && self
                .fields
                .iter()
                .all(|(k, m)| o.fields.get(k).is_some_and(|n| m.contains(*n)))
    }

    /// The narrowest filter matching every frame either matches (the
    /// widening of `seeds/003` §3: `tcp host A.a` + `net A` → `net A`).
    pub fn cover(&self, o: &Filter) -> Filter {
        let interface = match (&self.interface, &o.interface) {
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => None,
        };
        let fields = self
            .fields
            .iter()
            .filter_map(|(k, m)| {
                let mut c = m.cover(*o.fields.get(k)?);
                if k.starts_with("ip6_") {
                    // IPv6 addresses widen to their common prefix.
                    let len = c.mask.leading_ones();
                    c.mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                    c.value &= c.mask;
                }
                (c.mask != 0).then_some((*k, c))
            })
            .collect();
        Filter { interface, fields }
    }

    /// The frames both match, as a filter (`None`: no frame matches both).
    pub fn intersect(&self, o: &Filter) -> Option<Filter> {
        if !self.overlaps(o) {
            return None;
        }
        let mut out = self.clone();
        if out.interface.is_none() {
            out.interface = o.interface.clone();
        }
        for (k, n) in &o.fields {
            let m = out.fields.entry(k).or_insert(Masked { value: 0, mask: 0 });
            *m = Masked {
                value: m.value | n.value,
                mask: m.mask | n.mask,
            };
        }
        Some(out)
    }

    /// How many header bits the filter pins down (its specificity).
    pub fn mask_bits(&self) -> u32 {
        self.fields
            .values()
            .map(|m| m.mask.count_ones())
            .sum::<u32>()
            + u32::from(self.interface.is_some()) * 16
    }

    /// The filter as the JSON object [`Filter::from_json`] reads.
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        if let Some(i) = &self.interface {
            obj.insert("interface".into(), i.clone().into());
        }
        for (k, m) in &self.fields {
            if let Some(kind) = kind_of(k) {
                let k = match *k {
                    "ip6_src" => "ip_src",
                    "ip6_dst" => "ip_dst",
                    k => k,
                };
                let s = if m.mask == kind.all() {
                    kind.show(m.value)
                } else {
                    format!("{}/{}", kind.show(m.value), kind.show(m.mask))
                };
                obj.insert(k.into(), s.into());
            }
        }
        serde_json::Value::Object(obj)
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

impl Serialize for Filter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Filter, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Filter::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// What a consumer receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// Frame headers as a pcap stream.
    Packets,
    /// Flow records, one JSON object a line.
    Flows,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Packets => "packets",
            Delivery::Flows => "flows",
        }
    }
}

/// The bytes of a frame a consumer gets by default: Ethernet, a VLAN tag,
/// IPv4 or IPv6 and TCP headers with options — headers, not payload.
pub const DEFAULT_CAPLEN: u32 = 128;

/// One consumer of a point's filter: where the frames go and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    /// `HOST:PORT` the point connects to.
    pub address: String,
    pub delivery: Delivery,
    pub caplen: u32,
    /// Addresses anonymised (prefix-preserving, the point's key).
    pub anonymise: bool,
    /// The consumer gets frames outside its own request and must apply
    /// its request as a re-filter.
    pub refilter: bool,
    /// For a consumer of anonymised frames the point applies the exact
    /// requests itself, before anonymising (the consumer could not match
    /// its real addresses against scrambled ones): a frame goes to it only
    /// if one of these matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exact: Vec<Filter>,
}

/// One entry of a point's ordered filter list: the first entry a frame
/// matches sends it to each of `consumers` once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointFilter {
    pub filter: Filter,
    /// Indices into [`FilterList::consumers`].
    pub consumers: Vec<usize>,
}

/// What a measurement point runs, as the controller sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterList {
    /// Changes whenever the list does.
    pub version: String,
    pub filters: Vec<PointFilter>,
    pub consumers: Vec<ConsumerSpec>,
}

impl FilterList {
    /// The entry the frame goes through (first match), if any.
    pub fn first_match(&self, interface: &str, f: &FrameFields) -> Option<&PointFilter> {
        self.filters.iter().find(|p| p.filter.matches(interface, f))
    }
}

#[cfg(test)]
#[path = "dpmi_tests.rs"]
mod tests;
