//! The metadata a decision chain carries in its in-profile rule's comment
//! (id, version, slot, kind, fingerprint, profile, burst, flow): what a
//! restarted enforcer reads back to adopt its own objects.

use qosloop_schema::{FlowSpec, IpPrefix, Kbps, PortRange, UserRef};

/// Comment on the in-profile rule: what reconcile reads back after a restart.
pub fn meta_comment(
    id: u64,
    version: u64,
    slot: u32,
    kind: &str,
    fp: u64,
    profile: &qosloop_schema::TrafficProfile,
    flow: &FlowSpec,
) -> String {
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    // A per-user decision's uid (the name stays with the PDP: a restarted
    // enforcer knows the user as `uid N` until the PDP resends it).
    let user = match flow.user.as_ref().and_then(|u| u.uid) {
        Some(uid) => format!(" u={uid}"),
        None => String::new(),
    };
    format!(
        "in id={id} v={version} slot={slot} kind={kind} fp={fp:016x} p={} b={} f={},{},{},{},{}{user}",
        profile.rate.0,
        profile.burst_bytes,
        opt(flow.proto.map(|p| p.to_string())),
        opt(flow.src.map(|p| p.to_string())),
        opt(flow.dst.map(|p| p.to_string())),
        opt(flow.src_ports.map(|p| p.to_string())),
        opt(flow.dst_ports.map(|p| p.to_string())),
    )
}

/// What `meta_comment` wrote, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainMeta {
    pub id: u64,
    pub version: u64,
    pub slot: u32,
    pub kind: String,
    pub fingerprint: u64,
    /// The profile rate, kbit/s.
    pub profile: Kbps,
    /// The profile's burst, bytes.
    pub burst_bytes: u64,
    pub flow: FlowSpec,
}

fn parse_flow(v: &str) -> Option<FlowSpec> {
    let parts: Vec<&str> = v.split(',').collect();
    let [proto, src, dst, sp, dp] = parts.as_slice() else {
        return None;
    };
    fn opt<T: std::str::FromStr>(s: &str) -> Option<Option<T>> {
        if s == "-" {
            Some(None)
        } else {
            s.parse().ok().map(Some)
        }
    }
    Some(FlowSpec {
        proto: opt(proto)?,
        src: opt::<IpPrefix>(src)?,
        dst: opt::<IpPrefix>(dst)?,
        src_ports: opt::<PortRange>(sp)?,
        dst_ports: opt::<PortRange>(dp)?,
        user: None,
    })
}

pub fn parse_meta_comment(c: &str) -> Option<ChainMeta> {
    let mut words = c.split_whitespace();
    if words.next()? != "in" {
        return None;
    }
    let (mut id, mut version, mut slot, mut kind, mut fp) = (None, None, None, None, None);
    let (mut profile, mut burst, mut flow) = (None, None, None);
    let mut uid: Option<u32> = None;
    for w in words {
        let (k, v) = w.split_once('=')?;
        match k {
            "id" => id = v.parse().ok(),
            "v" => version = v.parse().ok(),
            "slot" => slot = v.parse().ok(),
            "kind" => kind = Some(v.to_owned()),
            "fp" => fp = u64::from_str_radix(v, 16).ok(),
            "p" => profile = v.parse().ok().map(Kbps),
            "b" => burst = v.parse().ok(),
            "f" => flow = parse_flow(v),
            "u" => uid = Some(v.parse::<u32>().ok()?),
            _ => {}
        }
    }
    Some(ChainMeta {
        id: id?,
        version: version?,
        slot: slot?,
        kind: kind?,
        fingerprint: fp?,
        profile: profile?,
        burst_bytes: burst?,
        flow: FlowSpec {
            user: uid.map(|uid| UserRef {
                name: format!("uid {uid}"),
                uid: Some(uid),
            }),
            ..flow?
        },
    })
}
