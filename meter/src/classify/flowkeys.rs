//! Flow-key definitions in the XML of `seeds/004` Fig. 4:
//!
//! ```xml
//! <FLOWDATA>
//!   <FLOW FLOWNAME="FLOW1">
//!     <FLOWKEY NAME="IPProto" VALUE="6"/>
//!     <FLOWKEY NAME="IPSrcAddr" VALUE="172.20.1.2"/>
//!     …
//!   </FLOW>
//! </FLOWDATA>
//! ```
//!
//! Each FLOW is a class named by its FLOWNAME; a packet is in it when every
//! FLOWKEY matches. A blank VALUE or `{ANYBYTE}{n}` is a wildcard. Values
//! are decimal numbers, `\xHH` byte strings (as in the figure's
//! `Type="\x08\x00"`), dotted or colon addresses (optionally `/prefix`),
//! `aa:bb:cc:dd:ee:ff` MACs and `lo-hi` port ranges. When several FLOWs
//! match, the most specific (most non-wildcard keys) wins; document order
//! breaks ties. So the figure's FLOW1 (one host pair) wins over its DEFAULT
//! (any TCP 2000 → 80).
//!
//! The figure as printed has typographic quotes (`VALUE=”6"`). They are
//! accepted as attribute delimiters, and each one is reported as a
//! [`FlowKeyWarning`] with its line and column so the operator can fix the
//! file; the DOCTYPE's SYSTEM identifier is never fetched.
//!
//! The parser is a small, strict XML subset: declarations, DOCTYPE and
//! comments are skipped; elements, attributes and the five predefined
//! entities (plus numeric references) are understood; anything else is a
//! [`RuleError`] with line and column.

use super::text::{
    line_col, parse_escaped_bytes, parse_ip_match, parse_mac, parse_number, RuleError,
};
use super::{Labels, PacketView};
use crate::decode::{PROTO_TCP, PROTO_UDP};

/// A quirk that was accepted but deserves fixing in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowKeyWarning {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Mac {
        src: bool,
        value: [u8; 6],
    },
    EtherType(u16),
    Proto(u8),
    Ip {
        src: bool,
        m: (u8, u128, u128),
    },
    Port {
        src: bool,
        lo: u16,
        hi: u16,
        proto: Option<u8>,
    },
    Vlan(u16),
    Dscp(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FlowDef {
    name: String,
    class: u16,
    matchers: Vec<Matcher>,
}

/// The flow definitions of a flow-key XML file.
#[derive(Debug, Clone, Default)]
pub struct FlowKeyDefs {
    /// Most specific first.
    flows: Vec<FlowDef>,
    warnings: Vec<FlowKeyWarning>,
}

// ---- a minimal XML reader with positions --------------------------------

#[derive(Debug)]
struct Attr {
    name: String,
    value: String,
    value_at: usize,
}

#[derive(Debug)]
enum Event {
    Start {
        name: String,
        attrs: Vec<Attr>,
        at: usize,
        empty: bool,
    },
    End {
        name: String,
        at: usize,
    },
}

struct Lexer<'a> {
    file: &'a str,
    src: &'a str,
    pos: usize,
    warnings: Vec<FlowKeyWarning>,
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

impl<'a> Lexer<'a> {
    fn err(&self, at: usize, msg: impl Into<String>) -> RuleError {
        RuleError::at(self.file, self.src, at, msg)
    }

    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
    }

    fn skip_past(&mut self, end: &str, what: &str) -> Result<(), RuleError> {
        match self.rest().find(end) {
            Some(i) => {
                self.pos += i + end.len();
                Ok(())
            }
            None => Err(self.err(self.pos, format!("unterminated {what}"))),
        }
    }

    fn name(&mut self) -> Result<String, RuleError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if is_name_char(c) {
                self.pos += c.len_utf8();
            } else {
                break;
            }
        }
        if start == self.pos {
            return Err(self.err(start, "expected a name"));
        }
        Ok(self.src[start..self.pos].to_owned())
    }

    fn warn(&mut self, at: usize, message: String) {
        let (line, column) = line_col(self.src, at);
        self.warnings.push(FlowKeyWarning {
            line,
            column,
            message,
        });
    }

    fn attr_value(&mut self) -> Result<(String, usize), RuleError> {
        let at = self.pos;
        let open = self
            .peek()
            .ok_or_else(|| self.err(at, "expected a quoted attribute value"))?;
        let closers: &[char] = match open {
            '"' => &['"', '\u{201c}', '\u{201d}'],
            '\'' => &['\''],
            '\u{201c}' | '\u{201d}' => {
                self.warn(
                    at,
                    format!("typographic quote {open:?} used as an attribute quote; use '\"'"),
                );
                &['"', '\u{201c}', '\u{201d}']
            }
            _ => {
                return Err(self.err(
                    at,
                    format!("expected a quoted attribute value, found {open:?}"),
                ))
            }
        };
        self.pos += open.len_utf8();
        let start = self.pos;
        let Some(len) = self.rest().find(closers) else {
            return Err(self.err(at, "unterminated attribute value"));
        };
        let raw = &self.src[start..start + len];
        if raw.contains('<') {
            return Err(self.err(start, "'<' inside an attribute value"));
        }
        self.pos = start + len;
        let close = self.peek().unwrap_or('"');
        if close != '"' && close != '\'' {
            self.warn(
                self.pos,
                format!("typographic quote {close:?} used as an attribute quote; use '\"'"),
            );
        }
        self.pos += close.len_utf8();
        Ok((unescape(raw).map_err(|m| self.err(start, m))?, start))
    }

    fn next_event(&mut self) -> Result<Option<Event>, RuleError> {
        loop {
            self.skip_ws();
            let rest = self.rest();
            if rest.is_empty() {
                return Ok(None);
            }
            if !rest.starts_with('<') {
                let end = rest.find('<').unwrap_or(rest.len());
                let shown: String = rest[..end].chars().take(20).collect();
                return Err(self.err(self.pos, format!("unexpected text {shown:?}")));
            }
            if rest.starts_with("<?") {
                self.skip_past("?>", "processing instruction")?;
                continue;
            }
            if rest.starts_with("<!--") {
                self.skip_past("-->", "comment")?;
                continue;
            }
            if rest.starts_with("<!") {
                // DOCTYPE (no internal subset with '>' expected here).
                self.skip_past(">", "declaration")?;
                continue;
            }
            let at = self.pos;
            if rest.starts_with("</") {
                self.pos += 2;
                let name = self.name()?;
                self.skip_ws();
                if self.peek() != Some('>') {
                    return Err(self.err(self.pos, format!("expected '>' to close </{name}")));
                }
                self.pos += 1;
                return Ok(Some(Event::End { name, at }));
            }
            self.pos += 1;
            let name = self.name()?;
            let mut attrs = Vec::new();
            loop {
                self.skip_ws();
                match self.peek() {
                    Some('>') => {
                        self.pos += 1;
                        return Ok(Some(Event::Start {
                            name,
                            attrs,
                            at,
                            empty: false,
                        }));
                    }
                    Some('/') if self.rest().starts_with("/>") => {
                        self.pos += 2;
                        return Ok(Some(Event::Start {
                            name,
                            attrs,
                            at,
                            empty: true,
                        }));
                    }
                    Some(_) => {
                        let attr_at = self.pos;
                        let attr = self.name()?;
                        self.skip_ws();
                        if self.peek() != Some('=') {
                            return Err(
                                self.err(self.pos, format!("expected '=' after attribute {attr}"))
                            );
                        }
                        self.pos += 1;
                        self.skip_ws();
                        let (value, value_at) = self.attr_value()?;
                        if attrs.iter().any(|a: &Attr| a.name == attr) {
                            return Err(self.err(attr_at, format!("attribute {attr} given twice")));
                        }
                        attrs.push(Attr {
                            name: attr,
                            value,
                            value_at,
                        });
                    }
                    None => return Err(self.err(at, format!("element <{name}> is not closed"))),
                }
            }
        }
    }
}

fn unescape(raw: &str) -> Result<String, String> {
    if !raw.contains('&') {
        return Ok(raw.to_owned());
    }
    let mut out = String::new();
    let mut rest = raw;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';').ok_or("'&' without ';'")?;
        let ent = &after[..end];
        let ch = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = ent.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity &{ent};"))?
            }
        };
        out.push(ch);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---- FLOWKEY values --------------------------------------------------------

/// `None` for a wildcard.
fn is_wildcard(v: &str) -> bool {
    let t = v.trim();
    if t.is_empty() || t == "*" {
        return true;
    }
    // {ANYBYTE}{n}, {ANYBYTE}*, {ANYBYTE}+
    t.strip_prefix("{ANYBYTE}").is_some_and(|r| {
        r.is_empty()
            || r == "*"
            || r == "+"
            || (r.starts_with('{')
                && r.ends_with('}')
                && r[1..r.len() - 1].chars().all(|c| c.is_ascii_digit()))
    })
}

fn number_or_bytes(v: &str, width: usize) -> Result<u64, String> {
    match parse_escaped_bytes(v) {
        Some(bytes) => {
            let bytes = bytes?;
            if bytes.len() != width {
                return Err(format!(
                    "{v:?} has {} bytes, the field has {width}",
                    bytes.len()
                ));
            }
            Ok(bytes.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)))
        }
        None => parse_number(v),
    }
}

fn key_matcher(name: &str, v: &str) -> Result<Matcher, String> {
    let lname = name.to_ascii_lowercase();
    let port = |src: bool, proto: Option<u8>| -> Result<Matcher, String> {
        let (lo, hi) = match v.split_once('-') {
            Some((a, b)) if !v.starts_with('\\') => (parse_number(a)?, parse_number(b)?),
            _ => {
                let p = number_or_bytes(v, 2)?;
                (p, p)
            }
        };
        match (u16::try_from(lo), u16::try_from(hi)) {
            (Ok(lo), Ok(hi)) if lo <= hi => Ok(Matcher::Port { src, lo, hi, proto }),
            _ => Err(format!("{v:?} is not a port or port range")),
        }
    };
    let mac = |src: bool| -> Result<Matcher, String> {
        let value = match parse_escaped_bytes(v) {
            Some(b) => {
                let b = b?;
                <[u8; 6]>::try_from(b.as_slice()).map_err(|_| format!("{v:?} is not 6 bytes"))?
            }
            None => parse_mac(v)?,
        };
        Ok(Matcher::Mac { src, value })
    };
    let ip = |src: bool| -> Result<Matcher, String> {
        let m = match parse_escaped_bytes(v) {
            Some(b) => {
                let b = b?;
                match b.len() {
                    4 => (
                        4,
                        u128::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                        u128::from(u32::MAX),
                    ),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&b);
                        (6, u128::from_be_bytes(a), u128::MAX)
                    }
                    n => return Err(format!("{v:?} has {n} bytes, an address has 4 or 16")),
                }
            }
            None => parse_ip_match(v)?,
        };
        Ok(Matcher::Ip { src, m })
    };
    let small = |width: usize, max: u64| -> Result<u64, String> {
        let n = number_or_bytes(v, width)?;
        if n > max {
            return Err(format!("{v:?} exceeds {max}"));
        }
        Ok(n)
    };
    match lname.as_str() {
        "macdstaddr" => mac(false),
        "macsrcaddr" => mac(true),
        "type" | "ethertype" => Ok(Matcher::EtherType(small(2, 0xffff)? as u16)),
        "ipproto" => Ok(Matcher::Proto(small(1, 0xff)? as u8)),
        "ipsrcaddr" => ip(true),
        "ipdstaddr" => ip(false),
        "tcpsrcport" => port(true, Some(PROTO_TCP)),
        "tcpdstport" => port(false, Some(PROTO_TCP)),
        "udpsrcport" => port(true, Some(PROTO_UDP)),
        "udpdstport" => port(false, Some(PROTO_UDP)),
        "srcport" => port(true, None),
        "dstport" => port(false, None),
        "vlanid" => Ok(Matcher::Vlan(small(2, 0x0fff)? as u16)),
        "dscp" => Ok(Matcher::Dscp(small(1, 63)? as u8)),
        _ => Err(format!(
            "unknown flow key {name:?} (known: MacDstAddr, MacSrcAddr, Type, IPProto, IPSrcAddr, \
             IPDstAddr, TCPSrcPort, TCPDstPort, UDPSrcPort, UDPDstPort, SrcPort, DstPort, VlanId, DSCP)"
        )),
    }
}

impl FlowKeyDefs {
    /// Parses a flow-key XML file; `file` names it in errors.
    pub fn parse(file: &str, src: &str) -> Result<FlowKeyDefs, RuleError> {
        let mut lx = Lexer {
            file,
            src,
            pos: 0,
            warnings: Vec::new(),
        };
        let mut flows: Vec<FlowDef> = Vec::new();
        let mut stack: Vec<String> = Vec::new();
        let mut seen_root = false;
        while let Some(ev) = lx.next_event()? {
            match ev {
                Event::Start {
                    name,
                    attrs,
                    at,
                    empty,
                } => {
                    let parent = stack.last().map(String::as_str);
                    match (parent, name.as_str()) {
                        (None, "FLOWDATA") if !seen_root => seen_root = true,
                        (Some("FLOWDATA"), "FLOW") => {
                            let flowname = attrs
                                .iter()
                                .find(|a| a.name == "FLOWNAME")
                                .ok_or_else(|| lx.err(at, "FLOW without FLOWNAME"))?;
                            let fname = flowname.value.trim().to_owned();
                            if fname.is_empty() {
                                return Err(lx.err(flowname.value_at, "empty FLOWNAME"));
                            }
                            if flows.iter().any(|f| f.name == fname) {
                                return Err(lx.err(
                                    flowname.value_at,
                                    format!("FLOWNAME {fname:?} used twice"),
                                ));
                            }
                            flows.push(FlowDef {
                                name: fname,
                                class: 0,
                                matchers: Vec::new(),
                            });
                        }
                        (Some("FLOW"), "FLOWKEY") => {
                            let get = |n: &str| {
                                attrs
                                    .iter()
                                    .find(|a| a.name == n)
                                    .ok_or_else(|| lx.err(at, format!("FLOWKEY without {n}")))
                            };
                            let key = get("NAME")?;
                            let value = get("VALUE")?;
                            if !is_wildcard(&value.value) {
                                let m = key_matcher(&key.name_value(), value.value.trim())
                                    .map_err(|m| {
                                        lx.err(
                                            value.value_at,
                                            format!("FLOWKEY {}: {m}", key.value),
                                        )
                                    })?;
                                if let Some(f) = flows.last_mut() {
                                    f.matchers.push(m);
                                }
                            } else {
                                // Check the name even for wildcards.
                                key_matcher(&key.name_value(), "0")
                                    .or_else(|e| {
                                        if e.starts_with("unknown") {
                                            Err(e)
                                        } else {
                                            Ok(Matcher::Proto(0))
                                        }
                                    })
                                    .map_err(|m| lx.err(key.value_at, m))?;
                            }
                        }
                        (p, n) => {
                            return Err(lx.err(
                                at,
                                match p {
                                    None => format!("root element must be FLOWDATA, found <{n}>"),
                                    Some(p) => format!("<{n}> is not allowed inside <{p}>"),
                                },
                            ))
                        }
                    }
                    if !empty {
                        stack.push(name);
                    }
                }
                Event::End { name, at } => match stack.pop() {
                    Some(open) if open == name => {}
                    Some(open) => return Err(lx.err(at, format!("</{name}> closes <{open}>"))),
                    None => return Err(lx.err(at, format!("</{name}> without an open element"))),
                },
            }
        }
        if let Some(open) = stack.last() {
            return Err(lx.err(src.len(), format!("<{open}> is not closed at end of file")));
        }
        if !seen_root {
            return Err(lx.err(0, "no FLOWDATA element"));
        }
        // Most specific first; the sort is stable, so document order breaks ties.
        flows.sort_by_key(|f| std::cmp::Reverse(f.matchers.len()));
        Ok(FlowKeyDefs {
            flows,
            warnings: lx.warnings,
        })
    }

    /// Accepted quirks (typographic quotes), with positions.
    pub fn warnings(&self) -> &[FlowKeyWarning] {
        &self.warnings
    }

    /// Flow names, most specific first.
    pub fn names(&self) -> Vec<&str> {
        self.flows.iter().map(|f| f.name.as_str()).collect()
    }

    pub(super) fn bind_labels(&mut self, labels: &mut Labels) {
        for f in &mut self.flows {
            f.class = labels.intern(&f.name);
        }
    }

    #[inline]
    pub(super) fn classify(&self, v: &PacketView<'_>) -> Option<u16> {
        self.flows
            .iter()
            .find(|f| f.matchers.iter().all(|m| m.matches(v)))
            .map(|f| f.class)
    }
}

impl Attr {
    fn name_value(&self) -> String {
        self.value.trim().to_owned()
    }
}

impl Matcher {
    #[inline]
    fn matches(&self, v: &PacketView<'_>) -> bool {
        let d = v.decoded;
        match *self {
            Matcher::Mac { src, value } => (if src { d.src_mac } else { d.dst_mac }) == value,
            Matcher::EtherType(t) => d.ether_type == t,
            Matcher::Proto(p) => d.proto == p,
            Matcher::Ip { src, m } => {
                m.0 == d.ip_version && (if src { d.src } else { d.dst }) & m.2 == m.1
            }
            Matcher::Port { src, lo, hi, proto } => {
                let p = if src { d.src_port } else { d.dst_port };
                d.has_ports && proto.is_none_or(|x| x == d.proto) && (lo..=hi).contains(&p)
            }
            Matcher::Vlan(id) => d.vlan_id() == Some(id),
            Matcher::Dscp(x) => d.dscp == x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoded;

    const FIG4: &str = include_str!("../../examples/flowkeys-fig4.xml");

    fn tcp(src: u32, dst: u32, sport: u16, dport: u16) -> Decoded {
        Decoded {
            ether_type: 0x0800,
            ip_version: 4,
            src: u128::from(src),
            dst: u128::from(dst),
            proto: 6,
            src_port: sport,
            dst_port: dport,
            has_ports: true,
            ..Decoded::default()
        }
    }

    fn class_of(defs: &FlowKeyDefs, labels: &Labels, d: &Decoded) -> Option<String> {
        let v = PacketView {
            interface: "",
            frame: &[],
            decoded: d,
        };
        defs.classify(&v)
            .and_then(|c| labels.name(c).map(str::to_owned))
    }

    #[test]
    fn figure_4_loads_as_printed_and_classifies() {
        let mut defs = FlowKeyDefs::parse("fig4.xml", FIG4).unwrap();
        assert_eq!(defs.names(), vec!["FLOW1", "DEFAULT"]);
        let w = defs.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].message.contains("typographic"));
        let mut labels = Labels::new();
        defs.bind_labels(&mut labels);
        let h1 = 0xac14_0102; // 172.20.1.2
        let h3 = 0xac14_0303; // 172.20.3.3
        assert_eq!(
            class_of(&defs, &labels, &tcp(h1, h3, 2000, 80)).as_deref(),
            Some("FLOW1")
        );
        assert_eq!(
            class_of(&defs, &labels, &tcp(0x0a000001, h3, 2000, 80)).as_deref(),
            Some("DEFAULT")
        );
        assert_eq!(class_of(&defs, &labels, &tcp(h1, h3, 2001, 80)), None);
        let mut udp = tcp(h1, h3, 2000, 80);
        udp.proto = 17;
        assert_eq!(class_of(&defs, &labels, &udp), None);
    }

    #[test]
    fn malformed_xml_has_line_and_column() {
        let e = FlowKeyDefs::parse("f.xml", "<FLOWDATA>\n  <FLOW FLOWNAME=\"a\">\n  <FLOWKEY NAME=\"IPProto\" VALUE=\"x\"/>\n</FLOW></FLOWDATA>").unwrap_err();
        assert_eq!((e.line, e.column), (3, 34), "{e}");
        let e = FlowKeyDefs::parse("f.xml", "<FLOWDATA>\n<FLOW FLOWNAME=\"a\">\n</FLOWDATA>")
            .unwrap_err();
        assert!(e.message.contains("closes <FLOW>"), "{e}");
        let e = FlowKeyDefs::parse("f.xml", "<FLOWDATA><FLOW FLOWNAME=\"a\"><FLOWKEY NAME=\"Colour\" VALUE=\"\"/></FLOW></FLOWDATA>").unwrap_err();
        assert!(e.message.contains("unknown flow key"), "{e}");
        let e =
            FlowKeyDefs::parse("f.xml", "<FLOWDATA><FLOW FLOWNAME=\"a></FLOWDATA>").unwrap_err();
        assert!(
            e.message.contains("unterminated") || e.message.contains("'<'"),
            "{e}"
        );
        assert!(FlowKeyDefs::parse("f.xml", "").is_err());
    }

    #[test]
    fn values_and_wildcards() {
        assert!(is_wildcard(" ") && is_wildcard("{ANYBYTE}{6}") && !is_wildcard("6"));
        assert_eq!(
            key_matcher("Type", "\\x08\\x00"),
            Ok(Matcher::EtherType(0x0800))
        );
        assert_eq!(
            key_matcher("TCPDstPort", "\\x00\\x50"),
            Ok(Matcher::Port {
                src: false,
                lo: 80,
                hi: 80,
                proto: Some(6)
            })
        );
        assert!(key_matcher("Type", "\\x08").is_err());
        assert!(key_matcher("IPProto", "300").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = FlowKeyDefs::parse("p.xml", &s);
        }

        #[test]
        fn never_panics_on_xmlish(s in "[<>/=\"“”' A-Za-z{}\\\\x0-9\n]{0,200}") {
            let _ = FlowKeyDefs::parse("p.xml", &s);
        }
    }
}
