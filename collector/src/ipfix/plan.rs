//! Templates compiled into field plans: each field of a template becomes
//! one step that knows its length and where its value goes, so decoding a
//! record is one pass over the plan with no lookup and no allocation
//! (strings aside, which `FlowRecord` holds as `String`s).

use super::stats::DropReason;
use super::wire::{be_uint, var_len, FieldSpec, TemplateDef, VARLEN};
use qosloop_schema::ie::QOSLOOP_PEN;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where one field's value goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Skip,
    SrcV4,
    DstV4,
    SrcV6,
    DstV6,
    SrcPort,
    DstPort,
    Proto,
    Tos,
    Dscp,
    TcpFlags,
    Vlan,
    IcmpTypeCode,
    IcmpType,
    IcmpCode,
    OctetDelta,
    PacketDelta,
    OctetTotal,
    PacketTotal,
    PostOctetDelta,
    PostPacketDelta,
    InitiatorOctets,
    ResponderOctets,
    InitiatorPackets,
    ResponderPackets,
    StartSecs,
    EndSecs,
    StartMillis,
    EndMillis,
    StartMicros,
    EndMicros,
    StartNanos,
    EndNanos,
    StartUptime,
    EndUptime,
    StartDeltaMicros,
    EndDeltaMicros,
    SystemInitMillis,
    SamplingInterval,
    SamplingPacketInterval,
    SamplingPacketSpace,
    SamplerRandomInterval,
    SamplerId,
    SelectorId,
    UserName,
    UserId,
    ProcessName,
    ClassLabel,
}

/// The lengths an action accepts: an unsigned integer of 1..=`max` bytes
/// (reduced-size encoding), exactly `n` bytes, or any (strings).
#[derive(Clone, Copy)]
enum Width {
    Uint(u16),
    Exact(u16),
    Any,
}

fn action_of(f: &FieldSpec) -> Action {
    use Action::*;
    if f.enterprise == QOSLOOP_PEN {
        return match f.id {
            1 => UserId,
            2 => ProcessName,
            3 => ClassLabel,
            _ => Skip,
        };
    }
    if f.enterprise != 0 {
        return Skip;
    }
    match f.id {
        1 => OctetDelta,
        2 => PacketDelta,
        4 => Proto,
        5 => Tos,
        6 => TcpFlags,
        7 => SrcPort,
        8 => SrcV4,
        11 => DstPort,
        12 => DstV4,
        21 => EndUptime,
        22 => StartUptime,
        23 => PostOctetDelta,
        24 => PostPacketDelta,
        27 => SrcV6,
        28 => DstV6,
        32 | 139 => IcmpTypeCode,
        34 => SamplingInterval,
        48 => SamplerId,
        50 => SamplerRandomInterval,
        58 | 243 => Vlan,
        85 => OctetTotal,
        86 => PacketTotal,
        150 => StartSecs,
        151 => EndSecs,
        152 => StartMillis,
        153 => EndMillis,
        154 => StartMicros,
        155 => EndMicros,
        156 => StartNanos,
        157 => EndNanos,
        158 => StartDeltaMicros,
        159 => EndDeltaMicros,
        160 => SystemInitMillis,
        176 | 178 => IcmpType,
        177 | 179 => IcmpCode,
        195 => Dscp,
        231 => InitiatorOctets,
        232 => ResponderOctets,
        298 => InitiatorPackets,
        299 => ResponderPackets,
        302 => SelectorId,
        305 => SamplingPacketInterval,
        306 => SamplingPacketSpace,
        371 => UserName,
        _ => Skip,
    }
}

fn width_of(a: Action) -> Width {
    use Action::*;
    match a {
        Skip | UserName | ProcessName | ClassLabel => Width::Any,
        SrcV4 | DstV4 => Width::Exact(4),
        SrcV6 | DstV6 => Width::Exact(16),
        Proto | Tos | Dscp | IcmpType | IcmpCode => Width::Uint(1),
        SrcPort | DstPort | TcpFlags | Vlan | IcmpTypeCode => Width::Uint(2),
        StartSecs | EndSecs | StartUptime | EndUptime | StartDeltaMicros | EndDeltaMicros
        | UserId | SelectorId | SamplerId => Width::Uint(8),
        StartMillis | EndMillis | SystemInitMillis => Width::Uint(8),
        StartMicros | EndMicros | StartNanos | EndNanos => Width::Exact(8),
        _ => Width::Uint(8),
    }
}

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// The field's length, or [`VARLEN`].
    pub len: u16,
}

/// A template compiled for decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The fewest bytes a record takes (a variable-length field counts its
    /// 1-byte prefix). Never 0: such templates are refused.
    pub min_len: usize,
    /// Whether every field has a fixed length (then every record is
    /// `min_len` long).
    pub fixed: bool,
}

impl Plan {
    /// Compiles `def`; a field whose length its element cannot have, or a
    /// record of no bytes, refuses the template.
    /// `v9_scope`: the template is a NetFlow v9 options template, whose
    /// scope fields are scope types (system, interface, …), not elements.
    pub fn compile(def: &TemplateDef, v9_scope: bool) -> Result<Plan, DropReason> {
        let mut steps: Vec<Step> = Vec::with_capacity(def.fields.len());
        let mut min_len = 0usize;
        let mut fixed = true;
        for (i, f) in def.fields.iter().enumerate() {
            let mut action = if v9_scope && i < usize::from(def.scope_count) {
                Action::Skip
            } else {
                action_of(f)
            };
            if f.len == VARLEN {
                fixed = false;
                min_len += 1;
                if !matches!(width_of(action), Width::Any) {
                    // A number sent as variable-length: nothing standard
                    // does that; skip it by its length.
                    action = Action::Skip;
                }
            } else {
                min_len += usize::from(f.len);
                let ok = match width_of(action) {
                    Width::Any => true,
                    Width::Exact(n) => f.len == n,
                    Width::Uint(max) => f.len >= 1 && f.len <= max,
                };
                if !ok {
                    return Err(DropReason::BadFieldLength);
                }
            }
            // Adjacent fixed skips merge into one step.
            if let (Action::Skip, Some(last)) = (action, steps.last_mut()) {
                if last.action == Action::Skip
                    && last.len != VARLEN
                    && f.len != VARLEN
                    && u32::from(last.len) + u32::from(f.len) < u32::from(VARLEN)
                {
                    last.len += f.len;
                    continue;
                }
            }
            steps.push(Step { action, len: f.len });
        }
        if min_len == 0 {
            return Err(DropReason::ZeroLengthRecord);
        }
        Ok(Plan {
            steps,
            min_len,
            fixed,
        })
    }

    /// True when a record of this plan can say something about a flow: it
    /// has an address or a counter. A data template without either would
    /// turn every byte of a message into a record of 0.0.0.0 (review
    /// finding 4); it is refused ([`DropReason::NoFlowFields`]).
    pub fn makes_flows(&self) -> bool {
        use Action::*;
        self.steps.iter().any(|s| {
            matches!(
                s.action,
                SrcV4
                    | DstV4
                    | SrcV6
                    | DstV6
                    | OctetDelta
                    | PacketDelta
                    | OctetTotal
                    | PacketTotal
                    | PostOctetDelta
                    | PostPacketDelta
                    | InitiatorOctets
                    | ResponderOctets
                    | InitiatorPackets
                    | ResponderPackets
            )
        })
    }

    /// Decodes one record at `*at` of `b` into `acc` (reset first),
    /// advancing `*at`. The caller guarantees `b.len() - *at >= min_len`;
    /// a variable-length field that runs past `b` is an error.
    #[inline]
    pub fn read(&self, b: &[u8], at: &mut usize, acc: &mut Fields) -> Result<(), DropReason> {
        *acc = Fields::default();
        for step in &self.steps {
            let len = if step.len == VARLEN {
                var_len(b, at).ok_or(DropReason::VarLenOverrun)?
            } else {
                usize::from(step.len)
            };
            let end = at.checked_add(len).ok_or(DropReason::VarLenOverrun)?;
            let v = b.get(*at..end).ok_or(DropReason::VarLenOverrun)?;
            *at = end;
            acc.set(step.action, v);
        }
        Ok(())
    }
}

/// The raw values of one decoded record, before the exporter's context
/// (times, sampling, totals) turns them into a `FlowRecord`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub tos: Option<u8>,
    pub dscp: Option<u8>,
    pub tcp_flags: Option<u16>,
    pub vlan: Option<u16>,
    pub icmp_type_code: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub octet_delta: Option<u64>,
    pub packet_delta: Option<u64>,
    pub octet_total: Option<u64>,
    pub packet_total: Option<u64>,
    pub post_octet_delta: Option<u64>,
    pub post_packet_delta: Option<u64>,
    pub initiator_octets: Option<u64>,
    pub responder_octets: Option<u64>,
    pub initiator_packets: Option<u64>,
    pub responder_packets: Option<u64>,
    /// Absolute times in ns since the epoch.
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
    /// sysUpTime-relative times in ms.
    pub start_uptime_ms: Option<u64>,
    pub end_uptime_ms: Option<u64>,
    /// Microseconds before the export time.
    pub start_delta_us: Option<u64>,
    pub end_delta_us: Option<u64>,
    pub system_init_ms: Option<u64>,
    pub sampling_interval: Option<u64>,
    pub packet_interval: Option<u64>,
    pub packet_space: Option<u64>,
    pub sampler_random_interval: Option<u64>,
    pub sampler_id: Option<u64>,
    pub selector_id: Option<u64>,
    pub user: Option<String>,
    pub user_id: Option<u64>,
    pub process: Option<String>,
    pub class: Option<String>,
}

/// The largest 1-in-N sampling rate believed (2^24): above it a rate is
/// refused and counted ([`DropReason::BadSamplingRate`]).
pub const MAX_SAMPLING: u32 = 1 << 24;

/// Seconds between the NTP era 0 (1900) and the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// An RFC 7011 §6.1.9/10 NTP-format timestamp (seconds since 1900, binary
/// fraction) in ns since the Unix epoch; times before 1970 become 0.
fn ntp_ns(v: &[u8], micros: bool) -> u64 {
    let secs = be_uint(&v[..4]);
    let mut frac = be_uint(&v[4..8]);
    if micros {
        // dateTimeMicroseconds: the low 11 bits of the fraction are ignored.
        frac &= !0x7ff;
    }
    let ns = (frac * 1_000_000_000) >> 32;
    secs.saturating_sub(NTP_UNIX_OFFSET) * 1_000_000_000 + ns
}

fn text(v: &[u8]) -> Option<String> {
    // Strings end at a NUL when an exporter pads them.
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    (end > 0).then(|| String::from_utf8_lossy(&v[..end]).into_owned())
}

impl Fields {
    #[inline]
    fn set(&mut self, action: Action, v: &[u8]) {
        use Action::*;
        match action {
            Skip => {}
            SrcV4 => self.src = Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
            DstV4 => self.dst = Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
            SrcV6 | DstV6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(v);
                let a = Some(IpAddr::V6(Ipv6Addr::from(o)));
                if action == SrcV6 {
                    self.src = a;
                } else {
                    self.dst = a;
                }
            }
            SrcPort => self.src_port = be_uint(v) as u16,
            DstPort => self.dst_port = be_uint(v) as u16,
            Proto => self.proto = be_uint(v) as u8,
            Tos => self.tos = Some(be_uint(v) as u8),
            Dscp => self.dscp = Some(be_uint(v) as u8 & 0x3f),
            TcpFlags => self.tcp_flags = Some(be_uint(v) as u16),
            Vlan => self.vlan = Some(be_uint(v) as u16 & 0x0fff),
            IcmpTypeCode => self.icmp_type_code = Some(be_uint(v) as u16),
            IcmpType => self.icmp_type = Some(be_uint(v) as u8),
            IcmpCode => self.icmp_code = Some(be_uint(v) as u8),
            OctetDelta => self.octet_delta = Some(be_uint(v)),
            PacketDelta => self.packet_delta = Some(be_uint(v)),
            OctetTotal => self.octet_total = Some(be_uint(v)),
            PacketTotal => self.packet_total = Some(be_uint(v)),
            PostOctetDelta => self.post_octet_delta = Some(be_uint(v)),
            PostPacketDelta => self.post_packet_delta = Some(be_uint(v)),
            InitiatorOctets => self.initiator_octets = Some(be_uint(v)),
            ResponderOctets => self.responder_octets = Some(be_uint(v)),
            InitiatorPackets => self.initiator_packets = Some(be_uint(v)),
            ResponderPackets => self.responder_packets = Some(be_uint(v)),
            StartSecs => self.start_ns = Some(be_uint(v).saturating_mul(1_000_000_000)),
            EndSecs => self.end_ns = Some(be_uint(v).saturating_mul(1_000_000_000)),
            StartMillis => self.start_ns = Some(be_uint(v).saturating_mul(1_000_000)),
            EndMillis => self.end_ns = Some(be_uint(v).saturating_mul(1_000_000)),
            StartMicros => self.start_ns = Some(ntp_ns(v, true)),
            EndMicros => self.end_ns = Some(ntp_ns(v, true)),
            StartNanos => self.start_ns = Some(ntp_ns(v, false)),
            EndNanos => self.end_ns = Some(ntp_ns(v, false)),
            StartUptime => self.start_uptime_ms = Some(be_uint(v)),
            EndUptime => self.end_uptime_ms = Some(be_uint(v)),
            StartDeltaMicros => self.start_delta_us = Some(be_uint(v)),
            EndDeltaMicros => self.end_delta_us = Some(be_uint(v)),
            SystemInitMillis => self.system_init_ms = Some(be_uint(v)),
            SamplingInterval => self.sampling_interval = Some(be_uint(v)),
            SamplingPacketInterval => self.packet_interval = Some(be_uint(v)),
            SamplingPacketSpace => self.packet_space = Some(be_uint(v)),
            SamplerRandomInterval => self.sampler_random_interval = Some(be_uint(v)),
            SamplerId => self.sampler_id = Some(be_uint(v)),
            SelectorId => self.selector_id = Some(be_uint(v)),
            UserName => self.user = text(v),
            UserId => self.user_id = Some(be_uint(v)),
            ProcessName => self.process = text(v),
            ClassLabel => self.class = text(v),
        }
    }

    /// The 1-in-N rate this record carries itself, if any: samplingInterval
    /// (34), the v9 sampler's random interval (50), or
    /// (samplingPacketInterval + samplingPacketSpace) / samplingPacketInterval
    /// (305/306, RFC 5477).
    /// Rates above [`MAX_SAMPLING`] are not believed: `None` (see
    /// [`Fields::sampling_out_of_range`]).
    pub fn own_sampling(&self) -> Option<u32> {
        let n = self.raw_sampling()?;
        (n > 1 && n <= u64::from(MAX_SAMPLING)).then_some(n as u32)
    }

    /// True when the record carries a sampling rate over [`MAX_SAMPLING`]
    /// (a forged or broken options record would otherwise scale every flow
    /// of the exporter by up to 2^32).
    pub fn sampling_out_of_range(&self) -> bool {
        self.raw_sampling()
            .is_some_and(|n| n > u64::from(MAX_SAMPLING))
    }

    fn raw_sampling(&self) -> Option<u64> {
        if let Some(n) = self.sampling_interval.or(self.sampler_random_interval) {
            return Some(n);
        }
        let interval = self.packet_interval?;
        if interval == 0 {
            return None;
        }
        // Both are up to 8 bytes from the wire: the sum can overflow.
        let period = interval.saturating_add(self.packet_space.unwrap_or(0));
        Some(period / interval)
    }

    /// The key of the sampler this record names (selectorId first).
    pub fn sampler_key(&self) -> Option<u64> {
        self.selector_id.or(self.sampler_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Plan {
        fn compile_test(d: &TemplateDef) -> Result<Plan, DropReason> {
            Plan::compile(d, false)
        }
    }

    fn def(fields: &[(u16, u16)]) -> TemplateDef {
        TemplateDef {
            id: 256,
            scope_count: 0,
            options: false,
            fields: fields
                .iter()
                .map(|&(id, len)| FieldSpec {
                    id,
                    len,
                    enterprise: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn reduced_size_counters_and_bad_lengths() {
        let p = Plan::compile_test(&def(&[(1, 4), (2, 2)])).unwrap();
        let mut f = Fields::default();
        let mut at = 0;
        p.read(&[0, 0, 1, 0, 0, 7], &mut at, &mut f).unwrap();
        assert_eq!((f.octet_delta, f.packet_delta, at), (Some(256), Some(7), 6));
        assert_eq!(
            Plan::compile_test(&def(&[(8, 3)])),
            Err(DropReason::BadFieldLength)
        );
        assert_eq!(
            Plan::compile_test(&def(&[(1, 9)])),
            Err(DropReason::BadFieldLength)
        );
        assert_eq!(
            Plan::compile_test(&def(&[(1, 0)])),
            Err(DropReason::BadFieldLength)
        );
        assert_eq!(
            Plan::compile_test(&def(&[(999, 0)])),
            Err(DropReason::ZeroLengthRecord)
        );
    }

    #[test]
    fn skips_merge_and_var_len_overruns_are_errors() {
        let p = Plan::compile_test(&def(&[(999, 4), (998, 2), (371, VARLEN)])).unwrap();
        assert_eq!(p.steps.len(), 2);
        assert_eq!((p.min_len, p.fixed), (7, false));
        let mut f = Fields::default();
        let mut at = 0;
        p.read(&[0, 0, 0, 0, 0, 0, 3, b'b', b'o', b'b'], &mut at, &mut f)
            .unwrap();
        assert_eq!(f.user.as_deref(), Some("bob"));
        let mut at = 0;
        assert_eq!(
            p.read(&[0, 0, 0, 0, 0, 0, 9, b'b'], &mut at, &mut f),
            Err(DropReason::VarLenOverrun)
        );
    }

    #[test]
    fn ntp_times_convert_to_unix_ns() {
        // 2208988800 + 1 s and half a second.
        let v = [0x83, 0xaa, 0x7e, 0x81, 0x80, 0, 0, 0];
        assert_eq!(ntp_ns(&v, false), 1_500_000_000);
    }

    #[test]
    fn sampling_from_packet_interval_and_space() {
        let f = Fields {
            packet_interval: Some(1),
            packet_space: Some(99),
            ..Fields::default()
        };
        assert_eq!(f.own_sampling(), Some(100));
        let f = Fields {
            sampling_interval: Some(1),
            ..Fields::default()
        };
        assert_eq!(f.own_sampling(), None);
    }

    /// Review finding 5: 305 = 1 and 306 = 2^64-1 overflowed the sum (a
    /// panic with overflow checks); finding 6: absurd rates are refused.
    #[test]
    fn huge_packet_space_and_rates_are_refused_not_a_panic() {
        let f = Fields {
            packet_interval: Some(1),
            packet_space: Some(u64::MAX),
            ..Fields::default()
        };
        assert_eq!(f.own_sampling(), None);
        assert!(f.sampling_out_of_range());
        let f = Fields {
            sampling_interval: Some(0xFFFF_FFFF),
            ..Fields::default()
        };
        assert_eq!(f.own_sampling(), None);
        assert!(f.sampling_out_of_range());
        let f = Fields {
            sampling_interval: Some(u64::from(MAX_SAMPLING)),
            ..Fields::default()
        };
        assert_eq!(f.own_sampling(), Some(MAX_SAMPLING));
        assert!(!f.sampling_out_of_range());
    }
}
