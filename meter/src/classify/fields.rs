//! Field/mask rules (`seeds/003` §5): interface, VLAN TCI, ether type, MAC
//! source/destination, IP protocol, IP source/destination (prefix or mask),
//! transport ports (single or range), checked in ascending filter id.
//!
//! ```toml
//! [[filter]]
//! id = 0                       # FilterID: checked from zero upwards
//! class = "voice"
//! interface = "eth0"
//! vlan_tci = 100               # with vlan_tci_mask (default 0x0fff: the VLAN id)
//! ether_type = 0x0800
//! eth_src = "00:11:22:33:44:55" # with eth_src_mask (default ff:ff:ff:ff:ff:ff)
//! ip_proto = 17
//! ip_src = "10.0.0.0/8"        # or "10.0.0.0/255.0.0.0", IPv6 too
//! dst_port = "5000-5100"       # or a single number
//! ```

use super::text::{parse_ip_match, parse_mac, parse_number, RuleError};
use super::{Labels, PacketView};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    filter: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: u32,
    class: String,
    interface: Option<String>,
    vlan_tci: Option<Spanned<NumOrText>>,
    vlan_tci_mask: Option<Spanned<NumOrText>>,
    ether_type: Option<Spanned<NumOrText>>,
    eth_src: Option<Spanned<String>>,
    eth_src_mask: Option<Spanned<String>>,
    eth_dst: Option<Spanned<String>>,
    eth_dst_mask: Option<Spanned<String>>,
    ip_proto: Option<Spanned<NumOrText>>,
    ip_src: Option<Spanned<String>>,
    ip_dst: Option<Spanned<String>>,
    src_port: Option<Spanned<NumOrText>>,
    dst_port: Option<Spanned<NumOrText>>,
}

/// A MAC address (already masked) and its mask.
type MacMask = ([u8; 6], [u8; 6]);

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRule {
    pub id: u32,
    pub class_name: String,
    class: u16,
    interface: Option<String>,
    vlan_tci: Option<(u16, u16)>,
    ether_type: Option<u16>,
    eth_src: Option<MacMask>,
    eth_dst: Option<MacMask>,
    ip_proto: Option<u8>,
    ip_src: Option<(u8, u128, u128)>,
    ip_dst: Option<(u8, u128, u128)>,
    src_port: Option<(u16, u16)>,
    dst_port: Option<(u16, u16)>,
}

/// The rules of one or more field/mask rule files, in filter id order.
#[derive(Debug, Clone, Default)]
pub struct FieldRules {
    rules: Vec<FieldRule>,
}

fn num_in<T: TryFrom<u64>>(
    file: &str,
    src: &str,
    v: &Spanned<NumOrText>,
    what: &str,
) -> Result<T, RuleError> {
    let n = match v.get_ref() {
        NumOrText::Num(n) => Ok(*n),
        NumOrText::Text(t) => parse_number(t),
    };
    n.and_then(|n| T::try_from(n).map_err(|_| format!("{what} {n} is out of range")))
        .map_err(|m| RuleError::at(file, src, v.span().start, format!("{what}: {m}")))
}

fn port_range(
    file: &str,
    src: &str,
    v: &Spanned<NumOrText>,
    what: &str,
) -> Result<(u16, u16), RuleError> {
    let err = |m: String| RuleError::at(file, src, v.span().start, format!("{what}: {m}"));
    match v.get_ref() {
        NumOrText::Num(n) => {
            let p = u16::try_from(*n).map_err(|_| err(format!("port {n} is out of range")))?;
            Ok((p, p))
        }
        NumOrText::Text(t) => {
            let (a, b) = t.split_once('-').unwrap_or((t, t));
            let a = parse_number(a).map_err(&err)?;
            let b = parse_number(b).map_err(&err)?;
            match (u16::try_from(a), u16::try_from(b)) {
                (Ok(a), Ok(b)) if a <= b => Ok((a, b)),
                _ => Err(err(format!(
                    "{t:?} is not a port range lo-hi within 0-65535"
                ))),
            }
        }
    }
}

fn mac_mask(
    file: &str,
    src: &str,
    v: &Option<Spanned<String>>,
    mask: &Option<Spanned<String>>,
    what: &str,
) -> Result<Option<MacMask>, RuleError> {
    let Some(v) = v else { return Ok(None) };
    let at = |s: &Spanned<String>, m: String| {
        RuleError::at(file, src, s.span().start, format!("{what}: {m}"))
    };
    let value = parse_mac(v.get_ref()).map_err(|m| at(v, m))?;
    let mask = match mask {
        Some(m) => parse_mac(m.get_ref()).map_err(|e| at(m, e))?,
        None => [0xff; 6],
    };
    let mut masked = value;
    for (b, m) in masked.iter_mut().zip(mask) {
        *b &= m;
    }
    Ok(Some((masked, mask)))
}

impl FieldRules {
    /// Parses a TOML rule file; `file` names it in errors.
    pub fn parse(file: &str, src: &str) -> Result<FieldRules, RuleError> {
        let raw: RawFile = toml::from_str(src).map_err(|e| RuleError::from_toml(file, src, &e))?;
        let mut rules = Vec::new();
        for spanned in raw.filter {
            let at = spanned.span().start;
            let r = spanned.into_inner();
            if r.class.trim().is_empty() {
                return Err(RuleError::at(file, src, at, "filter has an empty class"));
            }
            let ip = |v: &Option<Spanned<String>>, what: &str| {
                v.as_ref()
                    .map(|s| {
                        parse_ip_match(s.get_ref()).map_err(|m| {
                            RuleError::at(file, src, s.span().start, format!("{what}: {m}"))
                        })
                    })
                    .transpose()
            };
            let vlan_tci = match &r.vlan_tci {
                Some(v) => {
                    let value: u16 = num_in(file, src, v, "vlan_tci")?;
                    let mask: u16 = match &r.vlan_tci_mask {
                        Some(m) => num_in(file, src, m, "vlan_tci_mask")?,
                        None => 0x0fff,
                    };
                    Some((value & mask, mask))
                }
                None => None,
            };
            let ip_src = ip(&r.ip_src, "ip_src")?;
            let ip_dst = ip(&r.ip_dst, "ip_dst")?;
            if let (Some(a), Some(b)) = (ip_src, ip_dst) {
                if a.0 != b.0 {
                    return Err(RuleError::at(
                        file,
                        src,
                        at,
                        "ip_src and ip_dst are of different IP versions",
                    ));
                }
            }
            rules.push(FieldRule {
                id: r.id,
                class_name: r.class,
                class: 0,
                interface: r.interface,
                vlan_tci,
                ether_type: r
                    .ether_type
                    .as_ref()
                    .map(|v| num_in(file, src, v, "ether_type"))
                    .transpose()?,
                eth_src: mac_mask(file, src, &r.eth_src, &r.eth_src_mask, "eth_src")?,
                eth_dst: mac_mask(file, src, &r.eth_dst, &r.eth_dst_mask, "eth_dst")?,
                ip_proto: r
                    .ip_proto
                    .as_ref()
                    .map(|v| num_in(file, src, v, "ip_proto"))
                    .transpose()?,
                ip_src,
                ip_dst,
                src_port: r
                    .src_port
                    .as_ref()
                    .map(|v| port_range(file, src, v, "src_port"))
                    .transpose()?,
                dst_port: r
                    .dst_port
                    .as_ref()
                    .map(|v| port_range(file, src, v, "dst_port"))
                    .transpose()?,
            });
        }
        let mut ids: Vec<u32> = rules.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(RuleError {
                file: file.to_owned(),
                line: 1,
                column: 1,
                message: format!("filter id {} is used twice", w[0]),
            });
        }
        rules.sort_by_key(|r| r.id);
        Ok(FieldRules { rules })
    }

    /// Appends another file's rules (ids stay the order).
    pub fn extend(&mut self, other: FieldRules) {
        self.rules.extend(other.rules);
        self.rules.sort_by_key(|r| r.id);
    }

    pub fn rules(&self) -> &[FieldRule] {
        &self.rules
    }

    pub(super) fn bind_labels(&mut self, labels: &mut Labels) {
        for r in &mut self.rules {
            r.class = labels.intern(&r.class_name);
        }
    }

    #[inline]
    pub(super) fn classify(&self, v: &PacketView<'_>) -> Option<u16> {
        self.rules.iter().find(|r| r.matches(v)).map(|r| r.class)
    }
}

#[inline]
fn ip_matches(m: &(u8, u128, u128), version: u8, addr: u128) -> bool {
    m.0 == version && addr & m.2 == m.1
}

#[inline]
fn mac_matches(m: &MacMask, mac: &[u8; 6]) -> bool {
    (0..6).all(|i| mac[i] & m.1[i] == m.0[i])
}

impl FieldRule {
    #[inline]
    fn matches(&self, v: &PacketView<'_>) -> bool {
        let d = v.decoded;
        if let Some(p) = self.ip_proto {
            if d.proto != p {
                return false;
            }
        }
        if let Some((lo, hi)) = self.dst_port {
            if !d.has_ports || d.dst_port < lo || d.dst_port > hi {
                return false;
            }
        }
        if let Some((lo, hi)) = self.src_port {
            if !d.has_ports || d.src_port < lo || d.src_port > hi {
                return false;
            }
        }
        if let Some(m) = &self.ip_dst {
            if !ip_matches(m, d.ip_version, d.dst) {
                return false;
            }
        }
        if let Some(m) = &self.ip_src {
            if !ip_matches(m, d.ip_version, d.src) {
                return false;
            }
        }
        if let Some(t) = self.ether_type {
            if d.ether_type != t {
                return false;
            }
        }
        if let Some((value, mask)) = self.vlan_tci {
            match d.vlan_tci {
                Some(tci) if tci & mask == value => {}
                _ => return false,
            }
        }
        if let Some(m) = &self.eth_src {
            if !mac_matches(m, &d.src_mac) {
                return false;
            }
        }
        if let Some(m) = &self.eth_dst {
            if !mac_matches(m, &d.dst_mac) {
                return false;
            }
        }
        if let Some(i) = &self.interface {
            if i != v.interface {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoded;

    fn view(d: &Decoded) -> PacketView<'_> {
        PacketView {
            interface: "eth0",
            frame: &[],
            decoded: d,
        }
    }

    fn pkt() -> Decoded {
        Decoded {
            ether_type: 0x0800,
            ip_version: 4,
            src: 0x0a00_0001,
            dst: 0xac14_0303,
            proto: 17,
            src_port: 6055,
            dst_port: 4055,
            has_ports: true,
            vlan_tci: Some(0x2064),
            src_mac: [0, 0x11, 0x22, 0x33, 0x44, 0x55],
            ..Decoded::default()
        }
    }

    #[test]
    fn rules_match_in_id_order() {
        let src = r#"
[[filter]]
id = 5
class = "any-udp"
ip_proto = 17

[[filter]]
id = 1
class = "voice"
interface = "eth0"
vlan_tci = 100
ether_type = "0x0800"
eth_src = "00:11:22:00:00:00"
eth_src_mask = "ff:ff:ff:00:00:00"
ip_src = "10.0.0.0/255.0.0.0"
ip_dst = "172.20.3.0/24"
src_port = "6000-6100"
dst_port = 4055
"#;
        let mut rules = FieldRules::parse("r.toml", src).unwrap();
        let mut labels = Labels::new();
        rules.bind_labels(&mut labels);
        let d = pkt();
        assert_eq!(
            labels.name(rules.classify(&view(&d)).unwrap()),
            Some("voice")
        );
        let mut other = pkt();
        other.dst_port = 9;
        assert_eq!(
            labels.name(rules.classify(&view(&other)).unwrap()),
            Some("any-udp")
        );
        other.vlan_tci = None;
        other.dst_port = 4055;
        assert_eq!(
            labels.name(rules.classify(&view(&other)).unwrap()),
            Some("any-udp")
        );
        other.proto = 6;
        assert_eq!(rules.classify(&view(&other)), None);
    }

    #[test]
    fn errors_have_line_and_column() {
        let e = FieldRules::parse(
            "r.toml",
            "[[filter]]\nid = 1\nclass = \"x\"\nip_src = \"10.0.0.0/40\"\n",
        )
        .unwrap_err();
        assert_eq!((e.line, e.file.as_str()), (4, "r.toml"));
        assert!(e.message.contains("prefix length 40"), "{e}");
        let e = FieldRules::parse("r.toml", "[[filter]]\nid = 1\nclass = \"x\"\nbogus = 1\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("r.toml:"), "{e}");
        let e = FieldRules::parse("r.toml", "[[filter]\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = FieldRules::parse(
            "r.toml",
            "[[filter]]\nid=1\nclass=\"a\"\n[[filter]]\nid=1\nclass=\"b\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("twice"));
    }
}
