//! The nftables objects qosloop writes, as types: the table, its chains
//! (the base chain with its hook), verdict maps keyed on a concatenation of
//! flow fields and their elements, named `limit` objects, and rules made of
//! the statements the enforcer uses. A change is a [`Batch`] of
//! [`Command`]s.
//!
//! Two renderings, one model: [`encode`](super::encode) turns a batch into
//! one nf_tables netlink transaction; `Display` gives the `nft -f` text of a
//! command (the dry run prints it) and of a whole [`Listing`] (exactly what
//! `nft list table` prints for the table, counters at zero). Dependencies
//! that `nft` adds and hides (`meta nfproto` before an `ip` field, `meta
//! l4proto` before a `udp` port) are added by the encoder, not stored here.

use crate::tc::TcHandle;
use qosloop_schema::IpPrefix;
use std::fmt;
use std::net::IpAddr;

/// The table: `inet NAME` (egress) or `netdev NAME` (ingress).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableId {
    pub netdev: bool,
    pub name: String,
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = if self.netdev { "netdev" } else { "inet" };
        write!(f, "{family} {}", self.name)
    }
}

/// The hook of a base chain (type filter, priority filter, policy accept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    Postrouting,
    /// Local delivery (an egress table's `replies` chain: the inbound
    /// packets of the connections per-user decisions tagged).
    Input,
    Ingress {
        device: String,
    },
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Postrouting => {
                f.write_str("type filter hook postrouting priority filter; policy accept;")
            }
            Hook::Input => f.write_str("type filter hook input priority filter; policy accept;"),
            Hook::Ingress { device } => write!(
                f,
                "type filter hook ingress device \"{device}\" priority filter; policy accept;"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> IpFamily {
        if addr.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
    fn ip(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }
    fn addr_len(self) -> usize {
        match self {
            IpFamily::V4 => 4,
            IpFamily::V6 => 16,
        }
    }
}

/// A flow field that can be part of a map key, in key order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    L4proto,
    Saddr,
    Daddr,
    Sport,
    Dport,
}

/// Which fields a map is keyed on, for one address family: the fields a
/// decision's flow names. Decisions of one shape share one map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    pub family: IpFamily,
    /// Non-empty, in [`Field`] order, without repeats.
    pub fields: Vec<Field>,
    /// Keys are ranges (prefixes, port ranges): `flags interval`, a
    /// concatenation of at least two fields (the kernel's pipapo set).
    pub interval: bool,
}

/// nft's datatype ids (`TYPE_BITS` = 6 per field in a concatenation).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// The longest key nf_tables takes (`NFT_REG32_COUNT` × 4 bytes).
pub const MAX_KEY_LEN: usize = 64;

impl Shape {
    /// The map's name: `v4_proto_saddr_daddr_dport` and so on.
    pub fn map_name(&self) -> String {
        let mut s = String::from(match (self.family, self.interval) {
            (IpFamily::V4, false) => "v4",
            (IpFamily::V6, false) => "v6",
            (IpFamily::V4, true) => "v4iv",
            (IpFamily::V6, true) => "v6iv",
        });
        for f in &self.fields {
            s.push('_');
            s.push_str(match f {
                Field::L4proto => "proto",
                Field::Saddr => "saddr",
                Field::Daddr => "daddr",
                Field::Sport => "sport",
                Field::Dport => "dport",
            });
        }
        s
    }
    /// The shape a map name stands for (reading a table back).
    pub fn from_map_name(name: &str) -> Option<Shape> {
        let mut parts = name.split('_');
        let (family, interval) = match parts.next()? {
            "v4" => (IpFamily::V4, false),
            "v6" => (IpFamily::V6, false),
            "v4iv" => (IpFamily::V4, true),
            "v6iv" => (IpFamily::V6, true),
            _ => return None,
        };
        let mut fields = Vec::new();
        for p in parts {
            let f = match p {
                "proto" => Field::L4proto,
                "saddr" => Field::Saddr,
                "daddr" => Field::Daddr,
                "sport" => Field::Sport,
                "dport" => Field::Dport,
                _ => return None,
            };
            if fields.last().is_some_and(|l| *l >= f) {
                return None;
            }
            fields.push(f);
        }
        let s = Shape {
            family,
            fields,
            interval,
        };
        (!s.fields.is_empty() && s.map_name() == name).then_some(s)
    }
    /// Bytes one field takes in the key (its register share, rounded to 4).
    pub fn field_len(&self, f: Field) -> usize {
        match f {
            Field::L4proto | Field::Sport | Field::Dport => 4,
            Field::Saddr | Field::Daddr => self.family.addr_len(),
        }
    }
    /// Bytes of one field's value (`NFTA_SET_FIELD_LEN` of a concatenation).
    pub fn field_value_len(&self, f: Field) -> usize {
        match f {
            Field::L4proto => 1,
            Field::Sport | Field::Dport => 2,
            Field::Saddr | Field::Daddr => self.family.addr_len(),
        }
    }
    pub fn key_len(&self) -> usize {
        self.fields.iter().map(|f| self.field_len(*f)).sum()
    }
    fn type_id(&self, f: Field) -> u32 {
        match (f, self.family) {
            (Field::L4proto, _) => TYPE_INET_PROTO,
            (Field::Sport | Field::Dport, _) => TYPE_INET_SERVICE,
            (_, IpFamily::V4) => TYPE_IPV4_ADDR,
            (_, IpFamily::V6) => TYPE_IPV6_ADDR,
        }
    }
    /// `NFTA_SET_KEY_TYPE`: one field's type, or the concatenation's.
    pub fn key_type(&self) -> u32 {
        self.fields
            .iter()
            .fold(0, |acc, f| (acc << 6) | self.type_id(*f))
    }
    /// The byte order nft records for the key (set user data): big endian
    /// for one address or port, none for a protocol or a concatenation.
    pub fn key_byteorder(&self) -> u32 {
        match self.fields.as_slice() {
            [Field::L4proto] => 0,
            [_] => 2,
            _ => 0,
        }
    }
    fn type_name(&self, f: Field) -> &'static str {
        match self.type_id(f) {
            TYPE_INET_PROTO => "inet_proto",
            TYPE_INET_SERVICE => "inet_service",
            TYPE_IPV4_ADDR => "ipv4_addr",
            _ => "ipv6_addr",
        }
    }
    /// The key expression as nft writes it: `meta l4proto . ip saddr . th dport`.
    pub fn key_expr(&self) -> String {
        let ip = self.family.ip();
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|f| match f {
                Field::L4proto => "meta l4proto".to_owned(),
                Field::Saddr => format!("{ip} saddr"),
                Field::Daddr => format!("{ip} daddr"),
                Field::Sport => "th sport".to_owned(),
                Field::Dport => "th dport".to_owned(),
            })
            .collect();
        parts.join(" . ")
    }
    /// The map's type line: `inet_proto . ipv4_addr : verdict`.
    pub fn type_line(&self) -> String {
        let parts: Vec<&str> = self.fields.iter().map(|f| self.type_name(*f)).collect();
        format!("{} : verdict", parts.join(" . "))
    }
    /// True when the key names an address (nft then adds and hides the
    /// network-protocol dependency).
    pub fn has_address(&self) -> bool {
        self.fields
            .iter()
            .any(|f| matches!(f, Field::Saddr | Field::Daddr))
    }
}

/// One field's value in a map key: exact values in an exact map; in an
/// interval map, addresses are prefixes and ports ranges (a host or a
/// single port is the range of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPart {
    Proto(u8),
    Addr(IpAddr),
    Port(u16),
    Prefix(IpPrefix),
    Ports(u16, u16),
    /// A protocol range of an interval map (`0-255`: any).
    Protos(u8, u8),
}

fn put_addr(b: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
    }
}

fn put_port(b: &mut Vec<u8>, p: u16) {
    b.extend_from_slice(&p.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
}

/// The last address of `p`.
fn prefix_end(p: IpPrefix) -> IpAddr {
    let len = u32::from(p.prefix_len());
    match p.addr() {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(len).unwrap_or(0);
            IpAddr::V4((u32::from(a) | host).into())
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(len).unwrap_or(0);
            IpAddr::V6((u128::from(a) | host).into())
        }
    }
}

impl KeyPart {
    /// Appends the field's register bytes (padded to 4); for a range, its start.
    pub fn put(&self, b: &mut Vec<u8>) {
        match self {
            KeyPart::Proto(p) | KeyPart::Protos(p, _) => b.extend_from_slice(&[*p, 0, 0, 0]),
            KeyPart::Port(p) | KeyPart::Ports(p, _) => put_port(b, *p),
            KeyPart::Addr(a) => put_addr(b, *a),
            KeyPart::Prefix(p) => put_addr(b, p.addr()),
        }
    }
    /// Appends the end of the field's range (the value itself if exact).
    pub fn put_end(&self, b: &mut Vec<u8>) {
        match self {
            KeyPart::Ports(_, last) => put_port(b, *last),
            KeyPart::Protos(_, last) => b.extend_from_slice(&[*last, 0, 0, 0]),
            KeyPart::Prefix(p) => put_addr(b, prefix_end(*p)),
            other => other.put(b),
        }
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::Proto(p) => f.write_str(&proto_name(*p)),
            KeyPart::Addr(a) => write!(f, "{a}"),
            KeyPart::Port(p) => write!(f, "{p}"),
            KeyPart::Prefix(p) if p.is_host() => write!(f, "{}", p.addr()),
            KeyPart::Prefix(p) => write!(f, "{p}"),
            KeyPart::Ports(a, b) if a == b => write!(f, "{a}"),
            KeyPart::Ports(a, b) => write!(f, "{a}-{b}"),
            KeyPart::Protos(a, b) if a == b => f.write_str(&proto_name(*a)),
            KeyPart::Protos(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// How nft prints a protocol number (the names of `/etc/protocols` it knows).
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// A map element: the key, and the chain it jumps to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub key: Vec<KeyPart>,
    pub chain: String,
}

/// A key as nft writes it: `udp . 10.1.0.1 . 5001`.
#[derive(Debug)]
pub struct Key<'a>(pub &'a [KeyPart]);

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" . ")?;
            }
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} : jump {}", Key(&self.key), self.chain)
    }
}

/// A named `limit` object: `rate over RATE bytes/second burst BURST bytes`
/// — a token bucket that lives as long as the object, whatever the rules
/// referring to it become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub name: String,
    pub bytes_per_sec: u64,
    pub burst_bytes: u32,
}

impl Limit {
    fn spec(&self) -> String {
        if self.burst_bytes == 0 {
            format!("rate over {} bytes/second", self.bytes_per_sec)
        } else {
            format!(
                "rate over {} bytes/second burst {} bytes",
                self.bytes_per_sec, self.burst_bytes
            )
        }
    }
}

/// One statement of a rule, as the enforcer writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `meta nfproto ipv4` (inet) / `meta protocol ip` (netdev).
    Family {
        netdev: bool,
        family: IpFamily,
    },
    /// `meta l4proto N`.
    L4proto(u8),
    /// `ip saddr PREFIX` / `ip6 daddr PREFIX` (a host: the address alone).
    Addr {
        src: bool,
        prefix: IpPrefix,
    },
    /// `udp dport 5001` / `tcp sport 1024-2048`.
    Port {
        proto: u8,
        src: bool,
        first: u16,
        last: u16,
    },
    /// `oifname != "IF"`.
    OifnameNot(String),
    /// `iif != 0`: the packet was received (a locally generated one has no
    /// input interface: index 0).
    Received,
    /// `meta priority != 0`.
    PriorityNotZero,
    /// `meta skuid UID`: the packet's socket belongs to the local user
    /// `UID` (locally generated packets: output and postrouting hooks).
    Skuid(u32),
    /// `ct mark set MARK`: tag the packet's connection (a per-user
    /// decision tags its user's connections on the way out).
    CtMarkSet(u32),
    /// `ct mark MARK`: the connection carries the tag (replies on the way
    /// in).
    CtMark(u32),
    /// `KEY vmap @MAP`: classify by the map of `shape`.
    Lookup(Shape),
    /// `limit name "L"`: the named limit object (matches over the rate).
    LimitRef(String),
    /// `limit rate over R bytes/second burst B bytes`: a bucket of the
    /// rule's own (it restarts when the rule is rewritten).
    LimitOver {
        bytes_per_sec: u64,
        burst_bytes: u32,
    },
    Counter,
    /// `ip dscp set D` / `ip6 dscp set D`.
    DscpSet {
        family: IpFamily,
        dscp: u8,
    },
    /// `meta priority set MAJ:MIN`.
    PrioritySet(TcHandle),
    Accept,
    Drop,
    Jump(String),
    /// `fwd to "DEV"`; the index is resolved when the batch is built.
    Fwd {
        device: String,
        ifindex: u32,
    },
}

/// nft's names for DSCP values (`ip dscp set cs6`): the standard names,
/// hex for a code point without one.
pub fn dscp_name(d: u8) -> String {
    qosloop_schema::Dscp::new(d)
        .ok()
        .and_then(|d| d.standard_name())
        .map_or_else(|| format!("0x{d:02x}"), str::to_owned)
}

fn port_proto(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        _ => "sctp",
    }
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stmt::Family {
                netdev: false,
                family: IpFamily::V4,
            } => f.write_str("meta nfproto ipv4"),
            Stmt::Family {
                netdev: false,
                family: IpFamily::V6,
            } => f.write_str("meta nfproto ipv6"),
            Stmt::Family {
                netdev: true,
                family: IpFamily::V4,
            } => f.write_str("meta protocol ip"),
            Stmt::Family {
                netdev: true,
                family: IpFamily::V6,
            } => f.write_str("meta protocol ip6"),
            Stmt::L4proto(p) => write!(f, "meta l4proto {}", proto_name(*p)),
            Stmt::Addr { src, prefix } => {
                let ip = IpFamily::of(prefix.addr()).ip();
                let field = if *src { "saddr" } else { "daddr" };
                if prefix.is_host() {
                    write!(f, "{ip} {field} {}", prefix.addr())
                } else {
                    write!(f, "{ip} {field} {prefix}")
                }
            }
            Stmt::Port {
                proto,
                src,
                first,
                last,
            } => {
                let field = if *src { "sport" } else { "dport" };
                if first == last {
                    write!(f, "{} {field} {first}", port_proto(*proto))
                } else {
                    write!(f, "{} {field} {first}-{last}", port_proto(*proto))
                }
            }
            Stmt::OifnameNot(name) => write!(f, "oifname != \"{name}\""),
            Stmt::Received => f.write_str("iif != 0"),
            Stmt::PriorityNotZero => f.write_str("meta priority != none"),
            Stmt::Skuid(uid) => write!(f, "meta skuid {uid}"),
            Stmt::CtMarkSet(m) => write!(f, "ct mark set 0x{m:08x}"),
            Stmt::CtMark(m) => write!(f, "ct mark 0x{m:08x}"),
            Stmt::Lookup(shape) => write!(f, "{} vmap @{}", shape.key_expr(), shape.map_name()),
            Stmt::LimitRef(name) => write!(f, "limit name \"{name}\""),
            Stmt::LimitOver {
                bytes_per_sec,
                burst_bytes,
            } => write!(
                f,
                "limit rate over {bytes_per_sec} bytes/second burst {burst_bytes} bytes"
            ),
            Stmt::Counter => f.write_str("counter packets 0 bytes 0"),
            Stmt::DscpSet { family, dscp } => {
                write!(f, "{} dscp set {}", family.ip(), dscp_name(*dscp))
            }
            Stmt::PrioritySet(h) => write!(f, "meta priority set {h}"),
            Stmt::Accept => f.write_str("accept"),
            Stmt::Drop => f.write_str("drop"),
            Stmt::Jump(c) => write!(f, "jump {c}"),
            Stmt::Fwd { device, .. } => write!(f, "fwd to \"{device}\""),
        }
    }
}

/// A rule: statements and an optional comment (stored as rule user data).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.stmts.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        if let Some(c) = &self.comment {
            write!(f, " comment \"{c}\"")?;
        }
        Ok(())
    }
}

/// One statement of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    AddTable,
    DeleteTable,
    /// A chain; `hook` makes it a base chain. Refused if it exists.
    AddChain {
        name: String,
        hook: Option<Hook>,
    },
    FlushChain(String),
    /// Refused unless empty and unreferenced.
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// A verdict map keyed on `shape` (named [`Shape::map_name`]).
    AddMap(Shape),
    DeleteMap(Shape),
    /// Refused if the map is missing, a key exists, or a chain is missing.
    AddElements {
        shape: Shape,
        elements: Vec<Element>,
    },
    /// Refused if the map or a key is missing.
    DeleteElements {
        shape: Shape,
        keys: Vec<Vec<KeyPart>>,
    },
    AddLimit(Limit),
    /// Refused while a rule refers to it.
    DeleteLimit(String),
}

impl Command {
    /// The statement as `nft -f` reads it, in `table`.
    pub fn text(&self, table: &TableId) -> String {
        let t = table;
        match self {
            Command::AddTable => format!("add table {t}"),
            Command::DeleteTable => format!("delete table {t}"),
            Command::AddChain { name, hook: None } => format!("add chain {t} {name}"),
            Command::AddChain {
                name,
                hook: Some(h),
            } => format!("add chain {t} {name} {{ {h} }}"),
            Command::FlushChain(c) => format!("flush chain {t} {c}"),
            Command::DeleteChain(c) => format!("delete chain {t} {c}"),
            Command::AddRule { chain, rule } => format!("add rule {t} {chain} {rule}"),
            Command::AddMap(s) => format!(
                "add map {t} {} {{ type {};{} }}",
                s.map_name(),
                s.type_line(),
                if s.interval { " flags interval;" } else { "" }
            ),
            Command::DeleteMap(s) => format!("delete map {t} {}", s.map_name()),
            Command::AddElements { shape, elements } => {
                let list: Vec<String> = elements.iter().map(ToString::to_string).collect();
                format!(
                    "add element {t} {} {{ {} }}",
                    shape.map_name(),
                    list.join(", ")
                )
            }
            Command::DeleteElements { shape, keys } => {
                let list: Vec<String> = keys.iter().map(|k| Key(k).to_string()).collect();
                format!(
                    "delete element {t} {} {{ {} }}",
                    shape.map_name(),
                    list.join(", ")
                )
            }
            Command::AddLimit(l) => format!("add limit {t} {} {{ {}; }}", l.name, l.spec()),
            Command::DeleteLimit(n) => format!("delete limit {t} {n}"),
        }
    }
}

/// One nftables transaction on one table: all of it or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub table: TableId,
    pub commands: Vec<Command>,
}

impl Batch {
    pub fn new(table: TableId) -> Batch {
        Batch {
            table,
            commands: Vec::new(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
    pub fn push(&mut self, c: Command) {
        self.commands.push(c);
    }
}

/// The `nft -f` script: one statement a line.
impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.commands {
            writeln!(f, "{}", c.text(&self.table))?;
        }
        Ok(())
    }
}

/// A whole table as `nft list table` prints it (counters at zero, map
/// elements sorted like nft sorts them): limits, then maps, then chains,
/// each in the order given (the kernel lists them in creation order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub table: TableId,
    pub limits: Vec<Limit>,
    pub maps: Vec<(Shape, Vec<Element>)>,
    pub chains: Vec<(String, Option<Hook>, Vec<Rule>)>,
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {} {{", self.table)?;
        let mut first = true;
        let mut gap = |f: &mut fmt::Formatter<'_>| {
            if !std::mem::take(&mut first) {
                writeln!(f)?;
            }
            Ok::<(), fmt::Error>(())
        };
        for l in &self.limits {
            gap(f)?;
            writeln!(f, "\tlimit {} {{\n\t\t{}\n\t}}", l.name, l.spec())?;
        }
        for (shape, elements) in &self.maps {
            gap(f)?;
            writeln!(f, "\tmap {} {{", shape.map_name())?;
            writeln!(f, "\t\ttype {}", shape.type_line())?;
            if shape.interval {
                writeln!(f, "\t\tflags interval")?;
            }
            if !elements.is_empty() {
                // nft sorts the elements and puts as many on a line as the
                // key's size allows: one for a concatenation or an IPv6
                // address, two IPv4 addresses, five protocols.
                // (An interval map lists them in the order they were added.)
                let mut sorted: Vec<&Element> = elements.iter().collect();
                if !shape.interval {
                    sorted.sort();
                }
                let per_line = match shape.fields.as_slice() {
                    [Field::L4proto | Field::Sport | Field::Dport] => 5,
                    [_] if shape.family == IpFamily::V4 => 2,
                    _ => 1,
                };
                f.write_str("\t\telements = { ")?;
                for (i, e) in sorted.iter().enumerate() {
                    if i > 0 {
                        f.write_str(if i % per_line == 0 {
                            ",\n\t\t\t     "
                        } else {
                            ", "
                        })?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_str(" }\n")?;
            }
            writeln!(f, "\t}}")?;
        }
        for (name, hook, rules) in &self.chains {
            gap(f)?;
            writeln!(f, "\tchain {name} {{")?;
            if let Some(h) = hook {
                writeln!(f, "\t\t{h}")?;
            }
            for r in rules {
                writeln!(f, "\t\t{r}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}
