//! Newtypes for domain values, each with its parse and format.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A value that did not parse, with what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {why}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub why: String,
}

impl ParseError {
    fn new(what: &'static str, input: &str, why: impl Into<String>) -> Self {
        ParseError {
            what,
            input: input.to_owned(),
            why: why.into(),
        }
    }
}

/// A rate in kilobits per second (1 kbit = 1000 bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Kbps(pub u64);

impl Kbps {
    /// Bytes per second at this rate.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 * 1000 / 8
    }
    /// The rate of `bytes` carried in `nanos` nanoseconds, rounded down.
    pub fn from_bytes_over(bytes: u64, nanos: u64) -> Kbps {
        if nanos == 0 {
            return Kbps(0);
        }
        Kbps((u128::from(bytes) * 8 * 1_000_000 / u128::from(nanos)) as u64)
    }
}

impl fmt::Display for Kbps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}kbit", self.0)
    }
}

impl FromStr for Kbps {
    type Err = ParseError;
    /// Accepts `875`, `875kbit`, `875kbps`, `10mbit`, `10Mbps`, `1gbit`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| ParseError::new("rate", s, "expected a whole number"))?;
        let mult = match unit.trim() {
            "" | "k" | "kbit" | "kbps" | "kbit/s" => 1,
            "m" | "mbit" | "mbps" | "mbit/s" => 1000,
            "g" | "gbit" | "gbps" | "gbit/s" => 1_000_000,
            other => {
                return Err(ParseError::new(
                    "rate",
                    s,
                    format!("unknown unit {other:?} (use kbit, mbit or gbit)"),
                ))
            }
        };
        n.checked_mul(mult)
            .map(Kbps)
            .ok_or_else(|| ParseError::new("rate", s, "too large"))
    }
}

/// A DiffServ code point (6 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "DscpRepr", into = "DscpRepr")]
pub struct Dscp(u8);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum DscpRepr {
    Num(u8),
    Name(String),
}

impl TryFrom<DscpRepr> for Dscp {
    type Error = ParseError;
    fn try_from(r: DscpRepr) -> Result<Self, ParseError> {
        match r {
            DscpRepr::Num(n) => Dscp::new(n),
            DscpRepr::Name(s) => s.parse(),
        }
    }
}

impl From<Dscp> for DscpRepr {
    fn from(d: Dscp) -> Self {
        DscpRepr::Name(d.to_string())
    }
}

const DSCP_NAMES: &[(&str, u8)] = &[
    ("be", 0),
    ("cs0", 0),
    ("cs1", 8),
    ("af11", 10),
    ("af12", 12),
    ("af13", 14),
    ("cs2", 16),
    ("af21", 18),
    ("af22", 20),
    ("af23", 22),
    ("cs3", 24),
    ("af31", 26),
    ("af32", 28),
    ("af33", 30),
    ("cs4", 32),
    ("af41", 34),
    ("af42", 36),
    ("af43", 38),
    ("cs5", 40),
    ("ef", 46),
    ("cs6", 48),
    ("cs7", 56),
];

impl Dscp {
    pub const BEST_EFFORT: Dscp = Dscp(0);
    pub const CS6: Dscp = Dscp(48);

    pub fn new(value: u8) -> Result<Dscp, ParseError> {
        if value < 64 {
            Ok(Dscp(value))
        } else {
            Err(ParseError::new(
                "DSCP",
                &value.to_string(),
                "must be 0..=63",
            ))
        }
    }
    pub const fn value(self) -> u8 {
        self.0
    }
    /// The DSCP of an IPv4 TOS / IPv6 traffic-class byte.
    pub const fn from_tos(tos: u8) -> Dscp {
        Dscp(tos >> 2)
    }
    /// The TOS byte carrying this DSCP with ECN bits clear.
    pub const fn tos(self) -> u8 {
        self.0 << 2
    }

    /// The code point's standard name (`cs0`…`cs7`, `af11`…`af43`, `ef`),
    /// or `None` for a code point without one.
    pub fn standard_name(self) -> Option<&'static str> {
        DSCP_NAMES
            .iter()
            .skip(1)
            .find(|(_, v)| *v == self.0)
            .map(|(n, _)| *n)
    }
}

impl fmt::Display for Dscp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DSCP_NAMES.iter().skip(1).find(|(_, v)| *v == self.0) {
            Some((name, _)) if self.0 != 0 => f.write_str(name),
            _ if self.0 == 0 => f.write_str("be"),
            _ => write!(f, "{}", self.0),
        }
    }
}

impl FromStr for Dscp {
    type Err = ParseError;
    /// Accepts a name (`cs6`, `ef`, `af41`, `be`) or a number `0..=63`
    /// (decimal or `0x…`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if let Some((_, v)) = DSCP_NAMES.iter().find(|(n, _)| *n == t) {
            return Ok(Dscp(*v));
        }
        let n = if let Some(hex) = t.strip_prefix("0x") {
            u8::from_str_radix(hex, 16)
        } else {
            t.parse()
        }
        .map_err(|_| ParseError::new("DSCP", s, "expected a name (cs6, ef, af41, be) or 0..=63"))?;
        Dscp::new(n).map_err(|_| ParseError::new("DSCP", s, "must be 0..=63"))
    }
}

/// An address prefix such as `172.20.1.0/24` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<IpPrefix, ParseError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(ParseError::new(
                "prefix",
                &format!("{addr}/{len}"),
                format!("length must be at most {max}"),
            ));
        }
        Ok(IpPrefix {
            addr: mask(addr, len),
            len,
        })
    }
    /// The prefix holding exactly one address.
    pub fn host(addr: IpAddr) -> IpPrefix {
        IpPrefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }
    pub const fn prefix_len(&self) -> u8 {
        self.len
    }
    pub const fn is_host(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => self.len == 32,
            IpAddr::V6(_) => self.len == 128,
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = ParseError;
    /// `ADDR/LEN`, or a bare address for a host prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (a, l) = match t.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| ParseError::new("prefix", s, "expected ADDR or ADDR/LEN"))?;
        match l {
            None => Ok(IpPrefix::host(addr)),
            Some(l) => {
                let len = l
                    .parse()
                    .map_err(|_| ParseError::new("prefix", s, "prefix length is not a number"))?;
                IpPrefix::new(addr, len)
            }
        }
    }
}

impl TryFrom<String> for IpPrefix {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<IpPrefix> for String {
    fn from(p: IpPrefix) -> String {
        p.to_string()
    }
}

/// An inclusive port range; a single port is `n..=n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }
    pub const fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = ParseError;
    /// `80` or `1024-65535`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| ParseError::new("port range", s, "ports are 0..=65535"))
        };
        let r = match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => PortRange::single(port(s)?),
        };
        if r.first > r.last {
            return Err(ParseError::new(
                "port range",
                s,
                "first port is above the last",
            ));
        }
        Ok(r)
    }
}

impl TryFrom<String> for PortRange {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(p: PortRange) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kbps_parses_units() {
        assert_eq!("875".parse::<Kbps>().unwrap(), Kbps(875));
        assert_eq!("10mbit".parse::<Kbps>().unwrap(), Kbps(10_000));
        assert_eq!("125 kbit".parse::<Kbps>().unwrap(), Kbps(125));
        assert!("12furlongs".parse::<Kbps>().is_err());
        assert!("".parse::<Kbps>().is_err());
        assert_eq!(Kbps(1000).bytes_per_sec(), 125_000);
        assert_eq!(Kbps::from_bytes_over(125_000, 1_000_000_000), Kbps(1000));
        assert_eq!(Kbps::from_bytes_over(1, 0), Kbps(0));
    }

    #[test]
    fn dscp_names_and_numbers() {
        assert_eq!("cs6".parse::<Dscp>().unwrap(), Dscp::CS6);
        assert_eq!("EF".parse::<Dscp>().unwrap().value(), 46);
        assert_eq!("0x30".parse::<Dscp>().unwrap(), Dscp::CS6);
        assert_eq!("be".parse::<Dscp>().unwrap(), Dscp::BEST_EFFORT);
        assert!("64".parse::<Dscp>().is_err());
        assert_eq!(Dscp::CS6.to_string(), "cs6");
        assert_eq!(Dscp::BEST_EFFORT.to_string(), "be");
        assert_eq!(Dscp::new(5).unwrap().to_string(), "5");
        assert_eq!(Dscp::CS6.tos(), 0xc0);
        assert_eq!(Dscp::from_tos(0xc1), Dscp::CS6);
        let json = serde_json::to_string(&Dscp::CS6).unwrap();
        assert_eq!(json, "\"cs6\"");
        assert_eq!(serde_json::from_str::<Dscp>("48").unwrap(), Dscp::CS6);
    }

    #[test]
    fn prefixes() {
        let p: IpPrefix = "172.20.1.7/24".parse().unwrap();
        assert_eq!(p.to_string(), "172.20.1.0/24");
        assert!(p.contains("172.20.1.200".parse().unwrap()));
        assert!(!p.contains("172.20.2.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        assert!("10.0.0.1".parse::<IpPrefix>().unwrap().is_host());
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert_eq!(
            "2001:db8::1/32".parse::<IpPrefix>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!("0.0.0.0/0"
            .parse::<IpPrefix>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn port_ranges() {
        assert_eq!("80".parse::<PortRange>().unwrap(), PortRange::single(80));
        let r: PortRange = "1024-65535".parse().unwrap();
        assert!(r.contains(4055) && !r.contains(80));
        assert!("90-80".parse::<PortRange>().is_err());
        assert!("70000".parse::<PortRange>().is_err());
    }
}
