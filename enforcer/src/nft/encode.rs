//! The one encoder of the typed model into nf_tables netlink: a [`Batch`]
//! becomes one transaction — `NFNL_MSG_BATCH_BEGIN`, one message per
//! command (element lists split so that each nest stays below 64 KiB),
//! `NFNL_MSG_BATCH_END` — that the kernel commits whole or not at all.
//!
//! The expressions are the ones `nft` generates for the text that
//! `Display` prints (checked with `nft --debug=netlink`): the hidden
//! dependencies (`meta nfproto` / `meta protocol` before an `ip`/`ip6`
//! field, `meta l4proto` before a port), prefixes loaded by byte or masked,
//! the IPv4 checksum fix-up of `dscp set`, concatenated keys loaded into
//! consecutive 32-bit registers for a map lookup, and the rule comment and
//! map byte order as the user data `nft` reads back.

use super::model::{Batch, Command, Field, Hook, IpFamily, Rule, Shape, Stmt};
use crate::netlink::{
    begin_nest, end_nest, push_nlmsg, put_attr, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use std::net::IpAddr;

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_INET: u8 = 1;
const NFPROTO_NETDEV: u8 = 5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLM_F_APPEND: u16 = 0x800;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWOBJ: u16 = 18;
pub const NFT_MSG_DELOBJ: u16 = 20;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_HOOK_DEV: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
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
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_OBJREF_IMM_TYPE: u16 = 1;
const NFTA_OBJREF_IMM_NAME: u16 = 2;
const NFTA_FWD_SREG_DEV: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;

const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_CONCAT: u32 = 0x80;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFT_OBJECT_LIMIT: u32 = 4;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_00: u32 = 8;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: u32 = (-3i32) as u32;
const NFT_META_PROTOCOL: u32 = 1;
const NFT_META_PRIORITY: u32 = 2;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_IIF: u32 = 4;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_SKUID: u32 = 10;
const NFT_CT_MARK: u32 = 3;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_SREG: u16 = 4;
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
/// `NF_INET_LOCAL_IN`: packets delivered to a local socket.
const NF_INET_LOCAL_IN: u32 = 1;
const NF_NETDEV_INGRESS: u32 = 0;
pub const IFNAMSIZ: usize = 16;
/// `NFTNL_UDATA_RULE_COMMENT`: the TLV type `nft` stores a rule comment under.
const UDATA_RULE_COMMENT: u8 = 0;
/// Set user data TLVs: key byte order, data byte order, data interval.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
/// Elements per `NEWSETELEM` message: each nest's length is 16 bits.
pub const ELEMENTS_PER_MESSAGE: usize = 256;

/// Why a command cannot be encoded (a value the kernel could not take).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EncodeError(pub String);

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
    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            put_be32(b, NFTA_META_KEY, key);
            put_be32(b, NFTA_META_DREG, dreg);
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
    fn payload_load(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |b| {
            put_be32(b, NFTA_PAYLOAD_DREG, dreg);
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
            put_verdict(b, code, chain);
            end_nest(b, n);
        });
    }
}

fn put_verdict(b: &mut Vec<u8>, code: u32, chain: Option<&str>) {
    let v = begin_nest(b, NFTA_DATA_VERDICT);
    put_be32(b, NFTA_VERDICT_CODE, code);
    if let Some(c) = chain {
        put_str(b, NFTA_VERDICT_CHAIN, c);
    }
    end_nest(b, v);
}

/// The register a key field at byte `offset` of a concatenation goes to.
fn key_reg(offset: usize) -> u32 {
    if offset == 0 {
        NFT_REG_1
    } else {
        NFT_REG32_00 + (offset / 4) as u32
    }
}

fn nfproto(f: IpFamily) -> u8 {
    match f {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

/// Encodes the expressions of `rule` and its comment into `b`.
fn encode_rule(b: &mut Vec<u8>, rule: &Rule, netdev: bool) -> Result<(), EncodeError> {
    let exprs_at = begin_nest(b, NFTA_RULE_EXPRESSIONS);
    let mut e = Exprs { b };
    let mut family: Option<IpFamily> = None;
    let mut l4: Option<u8> = None;
    // The network-protocol dependency nft puts before an ip/ip6 field: the
    // netfilter family in an inet table, the ethertype in a netdev one.
    let need_family = |e: &mut Exprs, fam: IpFamily, family: &mut Option<IpFamily>| {
        if *family != Some(fam) {
            if netdev {
                e.meta_load(NFT_META_PROTOCOL, NFT_REG_1);
                let ethertype: u16 = if fam == IpFamily::V4 { 0x0800 } else { 0x86dd };
                e.cmp(NFT_CMP_EQ, &ethertype.to_be_bytes());
            } else {
                e.meta_load(NFT_META_NFPROTO, NFT_REG_1);
                e.cmp(NFT_CMP_EQ, &[nfproto(fam)]);
            }
            *family = Some(fam);
        }
    };
    for s in &rule.stmts {
        match s {
            Stmt::Family {
                netdev: nd,
                family: fam,
            } => {
                if *nd != netdev {
                    return Err(EncodeError(format!(
                        "`{s}` does not fit this table's family"
                    )));
                }
                family = None;
                need_family(&mut e, *fam, &mut family);
            }
            Stmt::L4proto(p) => {
                e.meta_load(NFT_META_L4PROTO, NFT_REG_1);
                e.cmp(NFT_CMP_EQ, &[*p]);
                l4 = Some(*p);
            }
            Stmt::Skuid(uid) => {
                e.meta_load(NFT_META_SKUID, NFT_REG_1);
                e.cmp(NFT_CMP_EQ, &uid.to_ne_bytes());
            }
            Stmt::CtMark(mark) => {
                e.expr("ct", |b| {
                    put_be32(b, NFTA_CT_DREG, NFT_REG_1);
                    put_be32(b, NFTA_CT_KEY, NFT_CT_MARK);
                });
                e.cmp(NFT_CMP_EQ, &mark.to_ne_bytes());
            }
            Stmt::CtMarkSet(mark) => {
                e.immediate_value(&mark.to_ne_bytes());
                e.expr("ct", |b| {
                    put_be32(b, NFTA_CT_KEY, NFT_CT_MARK);
                    put_be32(b, NFTA_CT_SREG, NFT_REG_1);
                });
            }
            Stmt::PriorityNotZero => {
                e.meta_load(NFT_META_PRIORITY, NFT_REG_1);
                e.cmp(NFT_CMP_NEQ, &[0; 4]);
            }
            Stmt::OifnameNot(name) => {
                if name.len() >= IFNAMSIZ {
                    return Err(EncodeError(format!(
                        "oifname {name}: longer than {} bytes",
                        IFNAMSIZ - 1
                    )));
                }
                let mut data = [0u8; IFNAMSIZ];
                data[..name.len()].copy_from_slice(name.as_bytes());
                e.meta_load(NFT_META_OIFNAME, NFT_REG_1);
                e.cmp(NFT_CMP_NEQ, &data);
            }
            Stmt::Received => {
                e.meta_load(NFT_META_IIF, NFT_REG_1);
                e.cmp(NFT_CMP_NEQ, &[0; 4]);
            }
            Stmt::Addr { src, prefix } => {
                let fam = IpFamily::of(prefix.addr());
                let off = match (fam, src) {
                    (IpFamily::V4, true) => 12,
                    (IpFamily::V4, false) => 16,
                    (IpFamily::V6, true) => 8,
                    (IpFamily::V6, false) => 24,
                };
                need_family(&mut e, fam, &mut family);
                let bytes = match prefix.addr() {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                // Like nft: a prefix on a byte boundary loads only its bytes;
                // any other loads the whole address and masks it.
                let plen = usize::from(prefix.prefix_len());
                if plen % 8 == 0 && plen > 0 {
                    e.payload_load(NFT_PAYLOAD_NETWORK, off, (plen / 8) as u32, NFT_REG_1);
                    e.cmp(NFT_CMP_EQ, &bytes[..plen / 8]);
                } else if plen > 0 {
                    let mask: Vec<u8> = (0..bytes.len())
                        .map(|k| match (plen.saturating_sub(8 * k)).min(8) {
                            0 => 0,
                            bits => 0xffu8 << (8 - bits),
                        })
                        .collect();
                    let value: Vec<u8> = bytes.iter().zip(&mask).map(|(v, m)| v & m).collect();
                    e.payload_load(NFT_PAYLOAD_NETWORK, off, bytes.len() as u32, NFT_REG_1);
                    e.bitwise(&mask, &vec![0; bytes.len()]);
                    e.cmp(NFT_CMP_EQ, &value);
                }
            }
            Stmt::Port {
                proto,
                src,
                first,
                last,
            } => {
                if !matches!(proto, 6 | 17 | 132) {
                    return Err(EncodeError(format!("protocol {proto} has no ports")));
                }
                if l4 != Some(*proto) {
                    e.meta_load(NFT_META_L4PROTO, NFT_REG_1);
                    e.cmp(NFT_CMP_EQ, &[*proto]);
                    l4 = Some(*proto);
                }
                e.payload_load(
                    NFT_PAYLOAD_TRANSPORT,
                    if *src { 0 } else { 2 },
                    2,
                    NFT_REG_1,
                );
                if first == last {
                    e.cmp(NFT_CMP_EQ, &first.to_be_bytes());
                } else {
                    e.cmp(NFT_CMP_GTE, &first.to_be_bytes());
                    e.cmp(NFT_CMP_LTE, &last.to_be_bytes());
                }
            }
            Stmt::Lookup(shape) => {
                if shape.has_address() {
                    need_family(&mut e, shape.family, &mut family);
                }
                let mut offset = 0;
                for f in &shape.fields {
                    let reg = key_reg(offset);
                    let addr_off = |src: bool| match (shape.family, src) {
                        (IpFamily::V4, true) => 12,
                        (IpFamily::V4, false) => 16,
                        (IpFamily::V6, true) => 8,
                        (IpFamily::V6, false) => 24,
                    };
                    let alen = shape.field_len(Field::Saddr) as u32;
                    match f {
                        Field::L4proto => e.meta_load(NFT_META_L4PROTO, reg),
                        Field::Saddr => {
                            e.payload_load(NFT_PAYLOAD_NETWORK, addr_off(true), alen, reg)
                        }
                        Field::Daddr => {
                            e.payload_load(NFT_PAYLOAD_NETWORK, addr_off(false), alen, reg)
                        }
                        Field::Sport => e.payload_load(NFT_PAYLOAD_TRANSPORT, 0, 2, reg),
                        Field::Dport => e.payload_load(NFT_PAYLOAD_TRANSPORT, 2, 2, reg),
                    }
                    offset += shape.field_len(*f);
                }
                let name = shape.map_name();
                e.expr("lookup", |b| {
                    put_be32(b, NFTA_LOOKUP_SREG, NFT_REG_1);
                    put_be32(b, NFTA_LOOKUP_DREG, NFT_REG_VERDICT);
                    put_str(b, NFTA_LOOKUP_SET, &name);
                });
            }
            Stmt::LimitRef(name) => e.expr("objref", |b| {
                put_be32(b, NFTA_OBJREF_IMM_TYPE, NFT_OBJECT_LIMIT);
                put_str(b, NFTA_OBJREF_IMM_NAME, name);
            }),
            Stmt::Counter => e.expr("counter", |_| {}),
            Stmt::LimitOver {
                bytes_per_sec,
                burst_bytes,
            } => {
                if *bytes_per_sec == 0 {
                    return Err(EncodeError("limit rate over 0 bytes/second".into()));
                }
                e.expr("limit", |b| {
                    put_attr(b, NFTA_LIMIT_RATE, &bytes_per_sec.to_be_bytes());
                    put_attr(b, NFTA_LIMIT_UNIT, &1u64.to_be_bytes());
                    put_be32(b, NFTA_LIMIT_BURST, *burst_bytes);
                    put_be32(b, NFTA_LIMIT_TYPE, NFT_LIMIT_PKT_BYTES);
                    put_be32(b, NFTA_LIMIT_FLAGS, NFT_LIMIT_F_INV);
                });
            }
            Stmt::DscpSet { family: fam, dscp } => {
                let dscp = *dscp;
                if dscp > 63 {
                    return Err(EncodeError(format!("dscp {dscp}: above 63")));
                }
                need_family(&mut e, *fam, &mut family);
                e.payload_load(NFT_PAYLOAD_NETWORK, 0, 2, NFT_REG_1);
                if *fam == IpFamily::V4 {
                    e.bitwise(&[0xff, 0x03], &[0, dscp << 2]);
                    e.payload_write(0, 2, NFT_PAYLOAD_CSUM_INET, 10);
                } else {
                    e.bitwise(&[0xf0, 0x3f], &[dscp >> 2, (dscp & 3) << 6]);
                    e.payload_write(0, 2, NFT_PAYLOAD_CSUM_NONE, 0);
                }
            }
            Stmt::PrioritySet(h) => {
                e.immediate_value(&h.0.to_ne_bytes());
                e.meta_set(NFT_META_PRIORITY);
            }
            Stmt::Accept => e.verdict(NF_ACCEPT, None),
            Stmt::Drop => e.verdict(NF_DROP, None),
            Stmt::Jump(c) => e.verdict(NFT_JUMP, Some(c)),
            Stmt::Fwd { device, ifindex } => {
                if !netdev {
                    return Err(EncodeError(format!(
                        "fwd to {device}: only in a netdev table"
                    )));
                }
                e.immediate_value(&ifindex.to_ne_bytes());
                e.expr("fwd", |b| put_be32(b, NFTA_FWD_SREG_DEV, NFT_REG_1));
            }
        }
    }
    let b = e.b;
    end_nest(b, exprs_at);
    if let Some(c) = &rule.comment {
        if c.len() > 254 {
            return Err(EncodeError("comment longer than 254 bytes".into()));
        }
        let mut ud = vec![UDATA_RULE_COMMENT, (c.len() + 1) as u8];
        ud.extend_from_slice(c.as_bytes());
        ud.push(0);
        put_attr(b, NFTA_RULE_USERDATA, &ud);
    }
    Ok(())
}

fn set_userdata(shape: &Shape) -> Vec<u8> {
    let mut ud = Vec::with_capacity(18);
    for (ty, v) in [
        (UDATA_SET_KEYBYTEORDER, shape.key_byteorder()),
        (UDATA_SET_DATABYTEORDER, 0),
        (UDATA_SET_DATA_INTERVAL, 0),
    ] {
        ud.extend_from_slice(&[ty, 4]);
        ud.extend_from_slice(&v.to_le_bytes());
    }
    ud
}

/// The key's start and, for an interval map, its end (register bytes).
type KeyBytes = (Vec<u8>, Option<Vec<u8>>);

fn check_key(shape: &Shape, key: &[super::model::KeyPart]) -> Result<KeyBytes, EncodeError> {
    use super::model::KeyPart;
    if key.len() != shape.fields.len() {
        return Err(EncodeError(format!(
            "key of {} fields for map {} of {}",
            key.len(),
            shape.map_name(),
            shape.fields.len()
        )));
    }
    let mut b = Vec::with_capacity(shape.key_len());
    for (f, k) in shape.fields.iter().zip(key) {
        let fits = match (f, k, shape.interval) {
            (Field::L4proto, KeyPart::Proto(_), false) => true,
            (Field::L4proto, KeyPart::Protos(a, b), true) => a <= b,
            (Field::Sport | Field::Dport, KeyPart::Port(_), false) => true,
            (Field::Sport | Field::Dport, KeyPart::Ports(a, b), true) => a <= b,
            (Field::Saddr | Field::Daddr, KeyPart::Addr(a), false) => {
                IpFamily::of(*a) == shape.family
            }
            (Field::Saddr | Field::Daddr, KeyPart::Prefix(p), true) => {
                IpFamily::of(p.addr()) == shape.family
            }
            _ => false,
        };
        if !fits {
            return Err(EncodeError(format!(
                "key part {k} does not fit field {f:?} of map {}",
                shape.map_name()
            )));
        }
        k.put(&mut b);
    }
    let end = shape.interval.then(|| {
        let mut e = Vec::with_capacity(b.len());
        for k in key {
            k.put_end(&mut e);
        }
        e
    });
    Ok((b, end))
}

fn put_key(b: &mut Vec<u8>, key: &KeyBytes) {
    let k = begin_nest(b, NFTA_SET_ELEM_KEY);
    put_attr(b, NFTA_DATA_VALUE, &key.0);
    end_nest(b, k);
    if let Some(end) = &key.1 {
        let k = begin_nest(b, NFTA_SET_ELEM_KEY_END);
        put_attr(b, NFTA_DATA_VALUE, end);
        end_nest(b, k);
    }
}

/// Encodes one command as one or more messages; `seq` is the next sequence
/// number and advances by the number of messages written.
fn encode_command(
    b: &mut Vec<u8>,
    table: &str,
    family: u8,
    cmd: &Command,
    seq: &mut u32,
    set_id: &mut u32,
) -> Result<usize, EncodeError> {
    let netdev = family == NFPROTO_NETDEV;
    let mut msg = |b: &mut Vec<u8>, ty: u16, flags: u16, attrs: &mut dyn FnMut(&mut Vec<u8>)| {
        push_msg(
            b,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            *seq,
            family,
            0,
            |b| attrs(b),
        );
        *seq = seq.wrapping_add(1);
    };
    let excl = NLM_F_CREATE | NLM_F_EXCL;
    match cmd {
        Command::AddTable => msg(b, NFT_MSG_NEWTABLE, NLM_F_CREATE, &mut |b| {
            put_str(b, NFTA_TABLE_NAME, table)
        }),
        Command::DeleteTable => msg(b, NFT_MSG_DELTABLE, 0, &mut |b| {
            put_str(b, NFTA_TABLE_NAME, table)
        }),
        Command::AddChain { name, hook } => {
            let (hooknum, dev) = match hook {
                None => (None, None),
                Some(Hook::Postrouting) if !netdev => (Some(NF_INET_POST_ROUTING), None),
                Some(Hook::Input) if !netdev => (Some(NF_INET_LOCAL_IN), None),
                Some(Hook::Ingress { device }) if netdev => (Some(NF_NETDEV_INGRESS), Some(device)),
                Some(h) => return Err(EncodeError(format!("hook `{h}` does not fit this table"))),
            };
            msg(b, NFT_MSG_NEWCHAIN, excl, &mut |b| {
                put_str(b, NFTA_CHAIN_TABLE, table);
                put_str(b, NFTA_CHAIN_NAME, name);
                if let Some(h) = hooknum {
                    let n = begin_nest(b, NFTA_CHAIN_HOOK);
                    put_be32(b, NFTA_HOOK_HOOKNUM, h);
                    put_be32(b, NFTA_HOOK_PRIORITY, 0);
                    if let Some(dev) = dev {
                        put_str(b, NFTA_HOOK_DEV, dev);
                    }
                    end_nest(b, n);
                    put_be32(b, NFTA_CHAIN_POLICY, NF_ACCEPT);
                    put_str(b, NFTA_CHAIN_TYPE, "filter");
                }
            });
        }
        Command::FlushChain(c) => msg(b, NFT_MSG_DELRULE, 0, &mut |b| {
            put_str(b, NFTA_RULE_TABLE, table);
            put_str(b, NFTA_RULE_CHAIN, c);
        }),
        Command::DeleteChain(c) => msg(b, NFT_MSG_DELCHAIN, 0, &mut |b| {
            put_str(b, NFTA_CHAIN_TABLE, table);
            put_str(b, NFTA_CHAIN_NAME, c);
        }),
        Command::AddRule { chain, rule } => {
            let mut err = None;
            msg(b, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &mut |b| {
                put_str(b, NFTA_RULE_TABLE, table);
                put_str(b, NFTA_RULE_CHAIN, chain);
                err = encode_rule(b, rule, netdev).err();
            });
            if let Some(e) = err {
                return Err(e);
            }
        }
        Command::AddMap(shape) => {
            if shape.fields.is_empty()
                || shape.key_len() > super::model::MAX_KEY_LEN
                || (shape.interval && shape.fields.len() < 2)
            {
                return Err(EncodeError(format!(
                    "map {}: key of {} bytes (1..={} allowed)",
                    shape.map_name(),
                    shape.key_len(),
                    super::model::MAX_KEY_LEN
                )));
            }
            *set_id += 1;
            let id = *set_id;
            msg(b, NFT_MSG_NEWSET, excl, &mut |b| {
                put_str(b, NFTA_SET_TABLE, table);
                put_str(b, NFTA_SET_NAME, &shape.map_name());
                let flags = if shape.interval {
                    NFT_SET_MAP | NFT_SET_INTERVAL | NFT_SET_CONCAT
                } else {
                    NFT_SET_MAP
                };
                put_be32(b, NFTA_SET_FLAGS, flags);
                put_be32(b, NFTA_SET_KEY_TYPE, shape.key_type());
                put_be32(b, NFTA_SET_KEY_LEN, shape.key_len() as u32);
                put_be32(b, NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                put_be32(b, NFTA_SET_DATA_LEN, 0);
                put_be32(b, NFTA_SET_ID, id);
                if shape.interval {
                    let d = begin_nest(b, NFTA_SET_DESC);
                    let c = begin_nest(b, NFTA_SET_DESC_CONCAT);
                    for f in &shape.fields {
                        let e = begin_nest(b, NFTA_LIST_ELEM);
                        put_be32(b, NFTA_SET_FIELD_LEN, shape.field_value_len(*f) as u32);
                        end_nest(b, e);
                    }
                    end_nest(b, c);
                    end_nest(b, d);
                }
                put_attr(b, NFTA_SET_USERDATA, &set_userdata(shape));
            });
        }
        Command::DeleteMap(shape) => msg(b, 11, 0, &mut |b| {
            put_str(b, NFTA_SET_TABLE, table);
            put_str(b, NFTA_SET_NAME, &shape.map_name());
        }),
        Command::AddElements { shape, elements } => {
            let name = shape.map_name();
            let keys = elements
                .iter()
                .map(|e| check_key(shape, &e.key))
                .collect::<Result<Vec<_>, _>>()?;
            let mut n = 0;
            for (chunk, kchunk) in elements
                .chunks(ELEMENTS_PER_MESSAGE)
                .zip(keys.chunks(ELEMENTS_PER_MESSAGE))
            {
                msg(b, NFT_MSG_NEWSETELEM, excl, &mut |b| {
                    put_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
                    put_str(b, NFTA_SET_ELEM_LIST_SET, &name);
                    let list = begin_nest(b, NFTA_SET_ELEM_LIST_ELEMENTS);
                    for (el, key) in chunk.iter().zip(kchunk) {
                        let item = begin_nest(b, NFTA_LIST_ELEM);
                        put_key(b, key);
                        let d = begin_nest(b, NFTA_SET_ELEM_DATA);
                        put_verdict(b, NFT_JUMP, Some(&el.chain));
                        end_nest(b, d);
                        end_nest(b, item);
                    }
                    end_nest(b, list);
                });
                n += 1;
            }
            return Ok(n);
        }
        Command::DeleteElements { shape, keys } => {
            let name = shape.map_name();
            let keys = keys
                .iter()
                .map(|k| check_key(shape, k))
                .collect::<Result<Vec<_>, _>>()?;
            let mut n = 0;
            for kchunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
                msg(b, NFT_MSG_DELSETELEM, 0, &mut |b| {
                    put_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
                    put_str(b, NFTA_SET_ELEM_LIST_SET, &name);
                    let list = begin_nest(b, NFTA_SET_ELEM_LIST_ELEMENTS);
                    for key in kchunk {
                        let item = begin_nest(b, NFTA_LIST_ELEM);
                        put_key(b, key);
                        end_nest(b, item);
                    }
                    end_nest(b, list);
                });
                n += 1;
            }
            return Ok(n);
        }
        Command::AddLimit(l) => {
            if l.bytes_per_sec == 0 {
                return Err(EncodeError(format!("limit {}: rate 0", l.name)));
            }
            msg(b, NFT_MSG_NEWOBJ, excl, &mut |b| {
                put_str(b, NFTA_OBJ_TABLE, table);
                put_str(b, NFTA_OBJ_NAME, &l.name);
                put_be32(b, NFTA_OBJ_TYPE, NFT_OBJECT_LIMIT);
                let d = begin_nest(b, NFTA_OBJ_DATA);
                put_attr(b, NFTA_LIMIT_RATE, &l.bytes_per_sec.to_be_bytes());
                put_attr(b, NFTA_LIMIT_UNIT, &1u64.to_be_bytes());
                put_be32(b, NFTA_LIMIT_BURST, l.burst_bytes);
                put_be32(b, NFTA_LIMIT_TYPE, NFT_LIMIT_PKT_BYTES);
                put_be32(b, NFTA_LIMIT_FLAGS, NFT_LIMIT_F_INV);
                end_nest(b, d);
            });
        }
        Command::DeleteLimit(name) => msg(b, NFT_MSG_DELOBJ, 0, &mut |b| {
            put_str(b, NFTA_OBJ_TABLE, table);
            put_str(b, NFTA_OBJ_NAME, name);
            put_be32(b, NFTA_OBJ_TYPE, NFT_OBJECT_LIMIT);
        }),
    }
    Ok(1)
}

/// Encodes `batch` into one transaction in `b`. Message `k` (after BEGIN)
/// gets sequence number `first_seq + 1 + k`; the last one asks for an ack.
/// Returns, per message, the index of the command it belongs to (an
/// element list spans several messages), for naming a refused command.
pub fn encode(batch: &Batch, first_seq: u32, b: &mut Vec<u8>) -> Result<Vec<usize>, EncodeError> {
    let family = if batch.table.netdev {
        NFPROTO_NETDEV
    } else {
        NFPROTO_INET
    };
    push_msg(
        b,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    let mut seq = first_seq.wrapping_add(1);
    let mut owners = Vec::new();
    let mut set_id = 0;
    let mut last_at = None;
    for (k, cmd) in batch.commands.iter().enumerate() {
        let at = b.len();
        let n = encode_command(b, &batch.table.name, family, cmd, &mut seq, &mut set_id)
            .map_err(|e| EncodeError(format!("`{}`: {e}", short(&cmd.text(&batch.table)))))?;
        if n > 0 {
            // The start of the command's last message.
            let mut pos = at;
            for _ in 1..n {
                let len = u32::from_ne_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
                pos += crate::netlink::align4(len as usize);
            }
            last_at = Some(pos);
        }
        owners.extend(std::iter::repeat_n(k, n));
    }
    if let Some(at) = last_at {
        // Ack the last message: its answer comes after every error.
        let flags = u16::from_ne_bytes([b[at + 6], b[at + 7]]) | NLM_F_ACK;
        b[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    push_msg(
        b,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    Ok(owners)
}

/// A command's text cut for an error message (element lists can be long).
pub fn short(text: &str) -> String {
    if text.len() <= 200 {
        return text.to_owned();
    }
    let mut end = 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}
