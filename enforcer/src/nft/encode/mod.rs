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

mod rule;
use rule::{encode_rule, put_verdict};

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
