//! One rule's statements as nf_tables expressions: the expression
//! builder, the dependencies `nft` adds (family, layer-4 protocol), and
//! each [`Stmt`]'s expressions.

use super::*;

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

pub(super) fn put_verdict(b: &mut Vec<u8>, code: u32, chain: Option<&str>) {
    let v = begin_nest(b, NFTA_DATA_VERDICT);
    put_be32(b, NFTA_VERDICT_CODE, code);
    if let Some(c) = chain {
        put_str(b, NFTA_VERDICT_CHAIN, c);
    }
    end_nest(b, v);
}

/// The register a key field at byte `offset` of a concatenation goes to.
pub(super) fn key_reg(offset: usize) -> u32 {
    if offset == 0 {
        NFT_REG_1
    } else {
        NFT_REG32_00 + (offset / 4) as u32
    }
}

pub(super) fn nfproto(f: IpFamily) -> u8 {
    match f {
        IpFamily::V4 => NFPROTO_IPV4,
        IpFamily::V6 => NFPROTO_IPV6,
    }
}

/// Encodes the expressions of `rule` and its comment into `b`.
pub(super) fn encode_rule(b: &mut Vec<u8>, rule: &Rule, netdev: bool) -> Result<(), EncodeError> {
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
