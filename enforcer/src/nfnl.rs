//! nftables without the `nft` process: the enforcer's nft statements (the
//! small, fixed language `nft.rs` and `render.rs` write) compiled into one
//! nf_tables netlink batch — `NFNL_MSG_BATCH_BEGIN`, one message per
//! statement, `NFNL_MSG_BATCH_END` — sent in one datagram, so the kernel
//! commits all of it or none of it, as `nft -f` would.
//!
//! The expressions are the ones `nft` itself generates for the same text
//! (checked with `nft --debug=netlink`), dependencies included (`meta nfproto`
//! before `ip …` in an `inet` table, `meta l4proto` before ports), so that
//! `nft list table` shows exactly the statements that were compiled.

use crate::sys::NetlinkSocket;
use crate::tc::{
    attrs, begin_nest, decode_error, end_nest, messages, push_nlmsg, put_attr, KernelError,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use std::net::IpAddr;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_INET: u8 = 1;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLM_F_APPEND: u16 = 0x800;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_PAYLOAD_SREG: u16 = 5;
const NFTA_PAYLOAD_CSUM_TYPE: u16 = 6;
const NFTA_PAYLOAD_CSUM_OFFSET: u16 = 7;
const NFTA_PAYLOAD_CSUM_FLAGS: u16 = 8;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: u32 = (-3i32) as u32;
const NFT_META_PROTOCOL: u32 = 1;
const NFT_META_PRIORITY: u32 = 2;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFT_PAYLOAD_NETWORK: u32 = 1;
const NFT_PAYLOAD_TRANSPORT: u32 = 2;
const NFT_PAYLOAD_CSUM_NONE: u32 = 0;
const NFT_PAYLOAD_CSUM_INET: u32 = 1;
const NFT_LIMIT_PKT_BYTES: u32 = 1;
const NFT_LIMIT_F_INV: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_NETDEV_INGRESS: u32 = 0;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_FWD_SREG_DEV: u16 = 1;
const IFNAMSIZ: usize = 16;
/// `NFTNL_UDATA_RULE_COMMENT`: the TLV type `nft` stores a rule comment under.
const UDATA_RULE_COMMENT: u8 = 0;

fn put_be32(b: &mut Vec<u8>, ty: u16, v: u32) {
    put_attr(b, ty, &v.to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    put_attr(b, ty, &v);
}

/// Appends one netlink message with a `struct nfgenmsg` and `attrs`.
fn push_msg(
    b: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: impl FnOnce(&mut Vec<u8>),
) {
    push_nlmsg(b, ty, flags, seq, |b| {
        b.extend_from_slice(&[family, 0]); // family, version
        b.extend_from_slice(&res_id.to_be_bytes());
        attrs(b);
    });
}

fn nft_msg(
    b: &mut Vec<u8>,
    family: u8,
    msg: u16,
    flags: u16,
    seq: u32,
    attrs: impl FnOnce(&mut Vec<u8>),
) {
    push_msg(
        b,
        (NFNL_SUBSYS_NFTABLES << 8) | msg,
        NLM_F_REQUEST | flags,
        seq,
        family,
        0,
        attrs,
    );
}

// ---- expressions --------------------------------------------------------------

/// The expression list of one rule, built expression by expression.
struct Exprs<'a> {
    b: &'a mut Vec<u8>,
}

impl Exprs<'_> {
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
        let elem = begin_nest(self.b, NFTA_LIST_ELEM);
        put_str(self.b, NFTA_EXPR_NAME, name);
        let d = begin_nest(self.b, NFTA_EXPR_DATA);
        data(self.b);
        end_nest(self.b, d);
        end_nest(self.b, elem);
    }
    fn meta_load(&mut self, key: u32) {
        self.expr("meta", |b| {
            put_be32(b, NFTA_META_KEY, key);
            put_be32(b, NFTA_META_DREG, NFT_REG_1);
        });
    }
    fn meta_set(&mut self, key: u32) {
        self.expr("meta", |b| {
            put_be32(b, NFTA_META_KEY, key);
            put_be32(b, NFTA_META_SREG, NFT_REG_1);
        });
    }
    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            put_be32(b, NFTA_CMP_SREG, NFT_REG_1);
            put_be32(b, NFTA_CMP_OP, op);
            let n = begin_nest(b, NFTA_CMP_DATA);
            put_attr(b, NFTA_DATA_VALUE, data);
            end_nest(b, n);
        });
    }
    fn payload_load(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |b| {
            put_be32(b, NFTA_PAYLOAD_DREG, NFT_REG_1);
            put_be32(b, NFTA_PAYLOAD_BASE, base);
            put_be32(b, NFTA_PAYLOAD_OFFSET, offset);
            put_be32(b, NFTA_PAYLOAD_LEN, len);
        });
    }
    fn payload_write(&mut self, offset: u32, len: u32, csum_type: u32, csum_offset: u32) {
        self.expr("payload", |b| {
            put_be32(b, NFTA_PAYLOAD_SREG, NFT_REG_1);
            put_be32(b, NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK);
            put_be32(b, NFTA_PAYLOAD_OFFSET, offset);
            put_be32(b, NFTA_PAYLOAD_LEN, len);
            put_be32(b, NFTA_PAYLOAD_CSUM_TYPE, csum_type);
            put_be32(b, NFTA_PAYLOAD_CSUM_OFFSET, csum_offset);
            put_be32(b, NFTA_PAYLOAD_CSUM_FLAGS, 0);
        });
    }
    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            put_be32(b, NFTA_BITWISE_SREG, NFT_REG_1);
            put_be32(b, NFTA_BITWISE_DREG, NFT_REG_1);
            put_be32(b, NFTA_BITWISE_LEN, mask.len() as u32);
            let n = begin_nest(b, NFTA_BITWISE_MASK);
            put_attr(b, NFTA_DATA_VALUE, mask);
            end_nest(b, n);
            let n = begin_nest(b, NFTA_BITWISE_XOR);
            put_attr(b, NFTA_DATA_VALUE, xor);
            end_nest(b, n);
        });
    }
    fn immediate_value(&mut self, value: &[u8]) {
        self.expr("immediate", |b| {
            put_be32(b, NFTA_IMMEDIATE_DREG, NFT_REG_1);
            let n = begin_nest(b, NFTA_IMMEDIATE_DATA);
            put_attr(b, NFTA_DATA_VALUE, value);
            end_nest(b, n);
        });
    }
    fn verdict(&mut self, code: u32, chain: Option<&str>) {
        self.expr("immediate", |b| {
            put_be32(b, NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            let n = begin_nest(b, NFTA_IMMEDIATE_DATA);
            let v = begin_nest(b, NFTA_DATA_VERDICT);
            put_be32(b, NFTA_VERDICT_CODE, code);
            if let Some(c) = chain {
                put_str(b, NFTA_VERDICT_CHAIN, c);
            }
            end_nest(b, v);
            end_nest(b, n);
        });
    }
    fn limit_over(&mut self, bytes_per_sec: u64, burst: u32) {
        self.expr("limit", |b| {
            put_attr(b, NFTA_LIMIT_RATE, &bytes_per_sec.to_be_bytes());
            put_attr(b, NFTA_LIMIT_UNIT, &1u64.to_be_bytes());
            put_be32(b, NFTA_LIMIT_BURST, burst);
            put_be32(b, NFTA_LIMIT_TYPE, NFT_LIMIT_PKT_BYTES);
            put_be32(b, NFTA_LIMIT_FLAGS, NFT_LIMIT_F_INV);
        });
    }
    fn counter(&mut self) {
        self.expr("counter", |_| {});
    }
    fn fwd(&mut self, ifindex: u32) {
        self.immediate_value(&ifindex.to_ne_bytes());
        self.expr("fwd", |b| put_be32(b, NFTA_FWD_SREG_DEV, NFT_REG_1));
    }
}

// ---- the statement language ---------------------------------------------------

/// Splits a statement into words; a double-quoted string is one word (quotes
/// kept, so that a quoted word is never mistaken for a keyword).
fn words(line: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            1 + quoted.find('"').ok_or("unterminated string")? + 1
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    Ok(out)
}

fn unquote(w: &str) -> Result<&str, String> {
    w.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| format!("expected a quoted string, found {w}"))
}

fn num<T: std::str::FromStr>(w: Option<&&str>, what: &str) -> Result<T, String> {
    let w = w.ok_or_else(|| format!("{what} missing"))?;
    w.parse()
        .map_err(|_| format!("{what}: {w} is not a number"))
}

/// Compiles the body of `add rule …` (after the chain name) into `b`:
/// the expressions, then the comment as rule user data.
fn compile_rule(b: &mut Vec<u8>, w: &[&str], netdev: bool) -> Result<(), String> {
    let exprs_at = begin_nest(b, NFTA_RULE_EXPRESSIONS);
    let mut e = Exprs { b };
    let mut family: Option<u8> = None;
    let mut l4: Option<u8> = None;
    let mut comment = None;
    // The network-protocol dependency nft puts before an ip/ip6 field: the
    // netfilter family in an inet table, the ethertype in a netdev one.
    let need_family = |e: &mut Exprs, fam: u8, family: &mut Option<u8>| {
        if *family != Some(fam) {
            if netdev {
                e.meta_load(NFT_META_PROTOCOL);
                let ethertype: u16 = if fam == NFPROTO_IPV4 { 0x0800 } else { 0x86dd };
                e.cmp(NFT_CMP_EQ, &ethertype.to_be_bytes());
            } else {
                e.meta_load(NFT_META_NFPROTO);
                e.cmp(NFT_CMP_EQ, &[fam]);
            }
            *family = Some(fam);
        }
    };
    let mut i = 0;
    while i < w.len() {
        let at = |k: usize| w.get(i + k).copied().unwrap_or("");
        match (at(0), at(1)) {
            ("meta", key @ ("nfproto" | "protocol")) => {
                let fam = match (key, at(2), netdev) {
                    ("nfproto", "ipv4", false) | ("protocol", "ip", true) => NFPROTO_IPV4,
                    ("nfproto", "ipv6", false) | ("protocol", "ip6", true) => NFPROTO_IPV6,
                    (_, other, _) => {
                        return Err(format!("meta {key} {other}: not for this table family"))
                    }
                };
                family = None;
                need_family(&mut e, fam, &mut family);
                i += 3;
            }
            ("meta", "l4proto") => {
                let p: u8 = num(w.get(i + 2), "meta l4proto")?;
                e.meta_load(NFT_META_L4PROTO);
                e.cmp(NFT_CMP_EQ, &[p]);
                l4 = Some(p);
                i += 3;
            }
            ("meta", "priority") if at(2) == "!=" && at(3) == "0" => {
                e.meta_load(NFT_META_PRIORITY);
                e.cmp(NFT_CMP_NEQ, &[0; 4]);
                i += 4;
            }
            ("fwd", "to") if netdev => {
                let dev = unquote(at(2))?;
                let ifindex = crate::sys::if_index(dev)
                    .ok_or_else(|| format!("fwd to {dev}: no such device"))?;
                e.fwd(ifindex);
                i += 3;
            }
            ("meta", "priority") if at(2) == "set" => {
                let (maj, min) = at(3)
                    .split_once(':')
                    .and_then(|(a, b)| {
                        Some((
                            u16::from_str_radix(a, 16).ok()?,
                            u16::from_str_radix(b, 16).ok()?,
                        ))
                    })
                    .ok_or_else(|| format!("meta priority set {}: not MAJ:MIN", at(3)))?;
                let prio = (u32::from(maj) << 16) | u32::from(min);
                e.immediate_value(&prio.to_ne_bytes());
                e.meta_set(NFT_META_PRIORITY);
                i += 4;
            }
            ("oifname", op) => {
                let (cmp_op, name) = if op == "!=" {
                    (NFT_CMP_NEQ, at(2))
                } else {
                    (NFT_CMP_EQ, op)
                };
                let name = unquote(name)?;
                if name.len() >= IFNAMSIZ {
                    return Err(format!(
                        "oifname {name}: longer than {} bytes",
                        IFNAMSIZ - 1
                    ));
                }
                let mut data = [0u8; IFNAMSIZ];
                data[..name.len()].copy_from_slice(name.as_bytes());
                e.meta_load(NFT_META_OIFNAME);
                e.cmp(cmp_op, &data);
                i += if op == "!=" { 3 } else { 2 };
            }
            (ip @ ("ip" | "ip6"), field @ ("saddr" | "daddr")) => {
                let (addr, plen) = parse_prefix(at(2))?;
                let (fam, off) = match (ip, field, addr) {
                    ("ip", "saddr", IpAddr::V4(_)) => (NFPROTO_IPV4, 12),
                    ("ip", "daddr", IpAddr::V4(_)) => (NFPROTO_IPV4, 16),
                    ("ip6", "saddr", IpAddr::V6(_)) => (NFPROTO_IPV6, 8),
                    ("ip6", "daddr", IpAddr::V6(_)) => (NFPROTO_IPV6, 24),
                    _ => return Err(format!("{ip} {field} {}: wrong address family", at(2))),
                };
                need_family(&mut e, fam, &mut family);
                let bytes = match addr {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                // Like nft: a prefix on a byte boundary loads only its bytes;
                // any other loads the whole address and masks it.
                let plen = usize::from(plen);
                if plen % 8 == 0 && plen > 0 {
                    e.payload_load(NFT_PAYLOAD_NETWORK, off, (plen / 8) as u32);
                    e.cmp(NFT_CMP_EQ, &bytes[..plen / 8]);
                } else if plen > 0 {
                    let mask: Vec<u8> = (0..bytes.len())
                        .map(|k| match (plen.saturating_sub(8 * k)).min(8) {
                            0 => 0,
                            bits => 0xffu8 << (8 - bits),
                        })
                        .collect();
                    let value: Vec<u8> = bytes.iter().zip(&mask).map(|(v, m)| v & m).collect();
                    e.payload_load(NFT_PAYLOAD_NETWORK, off, bytes.len() as u32);
                    e.bitwise(&mask, &vec![0; bytes.len()]);
                    e.cmp(NFT_CMP_EQ, &value);
                }
                i += 3;
            }
            (ip @ ("ip" | "ip6"), "dscp") if at(2) == "set" => {
                let dscp: u8 = num(w.get(i + 3), "dscp")?;
                if dscp > 63 {
                    return Err(format!("dscp {dscp}: above 63"));
                }
                if ip == "ip" {
                    need_family(&mut e, NFPROTO_IPV4, &mut family);
                    e.payload_load(NFT_PAYLOAD_NETWORK, 0, 2);
                    e.bitwise(&[0xff, 0x03], &[0, dscp << 2]);
                    e.payload_write(0, 2, NFT_PAYLOAD_CSUM_INET, 10);
                } else {
                    need_family(&mut e, NFPROTO_IPV6, &mut family);
                    e.payload_load(NFT_PAYLOAD_NETWORK, 0, 2);
                    e.bitwise(&[0xf0, 0x3f], &[dscp >> 2, (dscp & 3) << 6]);
                    e.payload_write(0, 2, NFT_PAYLOAD_CSUM_NONE, 0);
                }
                i += 4;
            }
            (proto @ ("tcp" | "udp" | "sctp"), field @ ("sport" | "dport")) => {
                let p = match proto {
                    "tcp" => 6,
                    "udp" => 17,
                    _ => 132,
                };
                if l4 != Some(p) {
                    e.meta_load(NFT_META_L4PROTO);
                    e.cmp(NFT_CMP_EQ, &[p]);
                    l4 = Some(p);
                }
                let (lo, hi) = match at(2).split_once('-') {
                    Some((a, b)) => (num(Some(&a), "port")?, num(Some(&b), "port")?),
                    None => {
                        let v: u16 = num(w.get(i + 2), "port")?;
                        (v, v)
                    }
                };
                e.payload_load(
                    NFT_PAYLOAD_TRANSPORT,
                    if field == "sport" { 0 } else { 2 },
                    2,
                );
                if lo == hi {
                    e.cmp(NFT_CMP_EQ, &lo.to_be_bytes());
                } else {
                    e.cmp(NFT_CMP_GTE, &lo.to_be_bytes());
                    e.cmp(NFT_CMP_LTE, &hi.to_be_bytes());
                }
                i += 3;
            }
            ("limit", "rate") => {
                // limit rate over N bytes/second [burst B bytes]
                if at(2) != "over" || at(4) != "bytes/second" {
                    return Err("limit: only `limit rate over N bytes/second` is spoken".into());
                }
                let rate: u64 = num(w.get(i + 3), "limit rate")?;
                let mut burst = 0u32;
                i += 5;
                if w.get(i) == Some(&"burst") {
                    burst = num(w.get(i + 1), "burst")?;
                    if w.get(i + 2) != Some(&"bytes") {
                        return Err("burst: expected `bytes`".into());
                    }
                    i += 3;
                }
                e.limit_over(rate, burst);
            }
            ("counter", _) => {
                e.counter();
                i += 1;
            }
            ("accept", _) => {
                e.verdict(NF_ACCEPT, None);
                i += 1;
            }
            ("drop", _) => {
                e.verdict(NF_DROP, None);
                i += 1;
            }
            ("jump", chain) if !chain.is_empty() => {
                e.verdict(NFT_JUMP, Some(chain));
                i += 2;
            }
            ("comment", c) if !c.is_empty() => {
                comment = Some(unquote(c)?);
                i += 2;
            }
            (other, _) => {
                return Err(format!(
                    "cannot compile `{other}` (not a statement qosloop writes)"
                ))
            }
        }
    }
    let b = e.b;
    end_nest(b, exprs_at);
    if let Some(c) = comment {
        if c.len() > 254 {
            return Err("comment longer than 254 bytes".into());
        }
        let mut ud = vec![UDATA_RULE_COMMENT, (c.len() + 1) as u8];
        ud.extend_from_slice(c.as_bytes());
        ud.push(0);
        put_attr(b, NFTA_RULE_USERDATA, &ud);
    }
    Ok(())
}

fn parse_prefix(w: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = match w.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (w, None),
    };
    let addr: IpAddr = a.parse().map_err(|_| format!("{w}: not an address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let plen = match p {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| format!("{w}: bad prefix length"))?,
        None => max,
    };
    Ok((addr, plen))
}

/// Compiles one statement into one message with sequence number `seq`.
fn compile_statement(b: &mut Vec<u8>, line: &str, seq: u32) -> Result<(), String> {
    let w = words(line)?;
    let word = |k: usize| w.get(k).copied().unwrap_or("");
    let family = match word(2) {
        "inet" => NFPROTO_INET,
        "netdev" => NFPROTO_NETDEV,
        _ => return Err("only tables of family inet or netdev are spoken".into()),
    };
    let netdev = family == NFPROTO_NETDEV;
    let table = word(3);
    if table.is_empty() {
        return Err("table name missing".into());
    }
    match (word(0), word(1)) {
        ("add", "table") => nft_msg(b, family, NFT_MSG_NEWTABLE, NLM_F_CREATE, seq, |b| {
            put_str(b, NFTA_TABLE_NAME, table)
        }),
        ("delete", "table") => nft_msg(b, family, NFT_MSG_DELTABLE, 0, seq, |b| {
            put_str(b, NFTA_TABLE_NAME, table)
        }),
        ("add", "chain") => {
            let chain = word(4);
            let hook = if word(5) == "{" {
                Some(base_chain_spec(&w[6..], netdev)?)
            } else if w.len() > 5 {
                return Err(format!("unexpected `{}` after the chain name", word(5)));
            } else {
                None
            };
            nft_msg(b, family, NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq, |b| {
                put_str(b, NFTA_CHAIN_TABLE, table);
                put_str(b, NFTA_CHAIN_NAME, chain);
                if let Some((hooknum, prio, policy, dev)) = &hook {
                    let n = begin_nest(b, NFTA_CHAIN_HOOK);
                    put_be32(b, NFTA_HOOK_HOOKNUM, *hooknum);
                    put_be32(b, NFTA_HOOK_PRIORITY, *prio as u32);
                    if let Some(dev) = dev {
                        put_str(b, NFTA_HOOK_DEV, dev);
                    }
                    end_nest(b, n);
                    put_be32(b, NFTA_CHAIN_POLICY, *policy);
                    put_str(b, NFTA_CHAIN_TYPE, "filter");
                }
            });
        }
        ("delete", "chain") => nft_msg(b, family, NFT_MSG_DELCHAIN, 0, seq, |b| {
            put_str(b, NFTA_CHAIN_TABLE, table);
            put_str(b, NFTA_CHAIN_NAME, word(4));
        }),
        ("flush", "chain") => nft_msg(b, family, NFT_MSG_DELRULE, 0, seq, |b| {
            put_str(b, NFTA_RULE_TABLE, table);
            put_str(b, NFTA_RULE_CHAIN, word(4));
        }),
        ("delete", "rule") => {
            if word(5) != "handle" {
                return Err("delete rule: expected `handle N`".into());
            }
            let handle: u64 = num(w.get(6), "handle")?;
            nft_msg(b, family, NFT_MSG_DELRULE, 0, seq, |b| {
                put_str(b, NFTA_RULE_TABLE, table);
                put_str(b, NFTA_RULE_CHAIN, word(4));
                put_attr(b, NFTA_RULE_HANDLE, &handle.to_be_bytes());
            });
        }
        ("add", "rule") => {
            let chain = word(4);
            let mut err = None;
            nft_msg(
                b,
                family,
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                seq,
                |b| {
                    put_str(b, NFTA_RULE_TABLE, table);
                    put_str(b, NFTA_RULE_CHAIN, chain);
                    err = compile_rule(b, w.get(5..).unwrap_or(&[]), netdev).err();
                },
            );
            if let Some(e) = err {
                return Err(e);
            }
        }
        (a, o) => return Err(format!("cannot compile `{a} {o}`")),
    }
    Ok(())
}

/// `type filter hook postrouting priority filter; policy accept; }` (inet)
/// or `type filter hook ingress device "IF" priority filter; …` (netdev).
fn base_chain_spec(w: &[&str], netdev: bool) -> Result<(u32, i32, u32, Option<String>), String> {
    let toks: Vec<&str> = w
        .iter()
        .map(|t| t.trim_end_matches(';'))
        .filter(|t| !t.is_empty() && *t != "}")
        .collect();
    let get = |key: &str| {
        toks.iter()
            .position(|t| *t == key)
            .and_then(|p| toks.get(p + 1).copied())
    };
    if get("type") != Some("filter") {
        return Err("base chain: only `type filter` is spoken".into());
    }
    let hook = match (get("hook"), netdev) {
        (Some("postrouting"), false) => NF_INET_POST_ROUTING,
        (Some("ingress"), true) => NF_NETDEV_INGRESS,
        (other, _) => return Err(format!("base chain: hook {other:?} is not spoken here")),
    };
    let dev = match (get("device"), netdev) {
        (Some(d), true) => Some(unquote(d)?.to_owned()),
        (None, false) => None,
        _ => return Err("base chain: a device goes with a netdev ingress hook".into()),
    };
    let prio = match get("priority") {
        Some("filter") => 0,
        Some(n) => n.parse().map_err(|_| format!("base chain: priority {n}"))?,
        None => return Err("base chain: priority missing".into()),
    };
    let policy = match get("policy") {
        Some("accept") | None => NF_ACCEPT,
        Some("drop") => NF_DROP,
        Some(p) => return Err(format!("base chain: policy {p}")),
    };
    Ok((hook, prio, policy, dev))
}

/// Compiles `script` (one statement a line) into one batch datagram in `b`.
/// Statement `k` gets sequence number `first_seq + 1 + k`; the last one asks
/// for an ack. Returns the statements, for naming a refused one.
pub fn compile<'s>(
    script: &'s str,
    first_seq: u32,
    b: &mut Vec<u8>,
) -> Result<Vec<&'s str>, String> {
    let lines: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    push_msg(
        b,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    for (k, line) in lines.iter().enumerate() {
        let seq = first_seq.wrapping_add(1 + k as u32);
        let at = b.len();
        compile_statement(b, line, seq).map_err(|e| format!("`{line}`: {e}"))?;
        if k + 1 == lines.len() {
            // Ack the last statement: its answer comes after every error.
            let flags = u16::from_ne_bytes([b[at + 6], b[at + 7]]) | NLM_F_ACK;
            b[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
        }
    }
    push_msg(
        b,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        first_seq.wrapping_add(1 + lines.len() as u32),
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    Ok(lines)
}

// ---- the client -----------------------------------------------------------------

/// An nf_tables netlink client, in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Nftnl {
    sock: NetlinkSocket,
    seq: u32,
    sndbuf: usize,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl Nftnl {
    pub fn open() -> Result<Nftnl, KernelError> {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER).map_err(|e| KernelError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(format!("nf_tables netlink socket: {e}")),
        })?;
        Ok(Nftnl {
            sock,
            seq: 0x5105_0000,
            sndbuf: 0,
            tx: Vec::with_capacity(1 << 16),
            rx: vec![0; 1 << 16],
        })
    }

    /// Applies `script` as one transaction: all of it, or nothing and the
    /// kernel's reason naming the first refused statement.
    pub fn apply(&mut self, script: &str) -> Result<(), String> {
        let first = self.seq.wrapping_add(1);
        self.tx.clear();
        let lines = compile(script, first, &mut self.tx)?;
        if lines.is_empty() {
            return Ok(());
        }
        self.seq = first.wrapping_add(1 + lines.len() as u32);
        let last = first.wrapping_add(lines.len() as u32);
        // The whole batch is one datagram: the socket's send buffer must hold it.
        if self.tx.len() + 4096 > self.sndbuf {
            let want = (self.tx.len() + 4096).next_power_of_two().max(1 << 20);
            let want_c = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
            if self
                .sock
                .set_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want_c)
                .is_err()
            {
                let _ = self.sock.set_int(libc::SOL_SOCKET, libc::SO_SNDBUF, want_c);
            }
            self.sndbuf = want;
        }
        self.sock
            .send(&self.tx)
            .map_err(|e| format!("sending the nf_tables batch ({} bytes): {e}", self.tx.len()))?;
        let mut first_error: Option<(usize, KernelError)> = None;
        let mut batch_error: Option<KernelError> = None;
        loop {
            let n = self
                .sock
                .recv(&mut self.rx)
                .map_err(|e| format!("reading the nf_tables answer: {e}"))?;
            let mut done = false;
            for msg in messages(&self.rx[..n]) {
                let Ok((ty, flags, seq, payload)) = msg else {
                    continue;
                };
                if ty != NLMSG_ERROR {
                    continue;
                }
                let k = seq.wrapping_sub(first).wrapping_sub(1) as usize;
                if let Err(e) = decode_error(flags, payload) {
                    if k >= lines.len() {
                        // The batch itself was refused (its BEGIN or END):
                        // no statement was processed, no ack will follow.
                        batch_error = Some(e);
                        done = true;
                    } else if first_error.as_ref().is_none_or(|(j, _)| k < *j) {
                        first_error = Some((k, e));
                    }
                }
                if seq == last {
                    done = true;
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = batch_error {
            return Err(format!("nftables refused the batch: {e}"));
        }
        match first_error {
            None => Ok(()),
            Some((k, e)) => Err(format!(
                "nftables refused the transaction: `{}`: {e}",
                lines[k]
            )),
        }
    }
}

/// The `(type, flags, seq)` of each message of a batch datagram and the
/// expression names of each rule message (for tests and `--dry-run`).
pub fn describe(batch: &[u8]) -> Vec<(u16, u16, u32, Vec<String>)> {
    messages(batch)
        .filter_map(Result::ok)
        .map(|(ty, flags, seq, payload)| {
            let mut names = Vec::new();
            for (at, v) in attrs(payload.get(4..).unwrap_or(&[])) {
                if at != NFTA_RULE_EXPRESSIONS || ty & 0xff != NFT_MSG_NEWRULE {
                    continue;
                }
                for (_, elem) in attrs(v) {
                    for (et, ev) in attrs(elem) {
                        if et == NFTA_EXPR_NAME {
                            let s = ev.split(|&c| c == 0).next().unwrap_or(&[]);
                            names.push(String::from_utf8_lossy(s).into_owned());
                        }
                    }
                }
            }
            (ty, flags, seq, names)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(script: &str) -> Vec<Vec<String>> {
        let mut b = Vec::new();
        compile(script, 100, &mut b).unwrap();
        describe(&b).into_iter().map(|m| m.3).collect()
    }

    #[test]
    fn batch_frames_the_statements() {
        let mut b = Vec::new();
        let lines = compile(
            "add table inet qosloop_qa\n\nadd chain inet qosloop_qa d1\ndelete rule inet qosloop_qa postrouting handle 7\n",
            100,
            &mut b,
        )
        .unwrap();
        assert_eq!(lines.len(), 3);
        let msgs = describe(&b);
        let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            types,
            vec![16, 0x0a00, 0x0a03, 0x0a08, 17],
            "begin, newtable, newchain, delrule, end"
        );
        let seqs: Vec<u32> = msgs.iter().map(|m| m.2).collect();
        assert_eq!(seqs, vec![100, 101, 102, 103, 104]);
        // Only the last statement asks for an ack.
        let acks: Vec<bool> = msgs.iter().map(|m| m.1 & NLM_F_ACK != 0).collect();
        assert_eq!(acks, vec![false, false, false, true, false]);
    }

    #[test]
    fn rules_compile_to_the_expressions_nft_generates() {
        let n = names(
            "add rule inet t d42 limit rate over 125000 bytes/second burst 15000 bytes counter ip dscp set 0 meta priority set e5:107 accept comment \"out\"\n\
             add rule inet t postrouting ip saddr 10.1.0.1 ip daddr 10.2.0.0/16 udp dport 5001 jump d42 comment \"id=42\"\n\
             add rule inet t postrouting ip6 daddr 2001:db8::/33 tcp sport 1024-2048 jump d42\n\
             add rule inet t postrouting oifname != \"qa\" accept comment \"guard\"",
        );
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            n[1],
            s(&[
                "limit",
                "counter",
                "meta",
                "cmp",
                "payload",
                "bitwise",
                "payload",
                "immediate",
                "meta",
                "immediate"
            ])
        );
        assert_eq!(
            n[2],
            s(&[
                "meta",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "immediate"
            ])
        );
        // /33: the whole address loaded and masked; a port range is two compares.
        assert_eq!(
            n[3],
            s(&[
                "meta",
                "cmp",
                "payload",
                "bitwise",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "cmp",
                "immediate"
            ])
        );
        assert_eq!(n[4], s(&["meta", "cmp", "immediate"]));
    }

    #[test]
    fn what_it_cannot_say_is_an_error_naming_the_statement() {
        let mut b = Vec::new();
        for bad in [
            "add rule inet t c ct state established accept",
            "add table ip t",
            "add rule inet t c ip saddr 10.0.0.0/40 accept",
            "add rule inet t c ip saddr ::1 accept",
            "add rule inet t c comment \"unterminated",
            "add chain inet t c { type nat hook postrouting priority 0; }",
            "delete rule inet t c 7",
            "add rule inet t c ip dscp set 64",
        ] {
            b.clear();
            let e = compile(bad, 1, &mut b).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,120}") {
            let mut b = Vec::new();
            let _ = compile(&s, 1, &mut b);
        }
    }
}
