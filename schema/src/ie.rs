//! Information elements: the vocabulary of flow records and templates.
//!
//! Where IANA's IPFIX registry has an element, qosloop uses its id
//! (enterprise 0). What IANA lacks lives under [`QOSLOOP_PEN`], the private
//! enterprise number RFC 5612 reserves for documentation; a deployment that
//! owns a PEN can change it in one place.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Private enterprise number of qosloop's own elements (RFC 5612's
/// documentation PEN, 32473).
pub const QOSLOOP_PEN: u32 = 32473;

/// The abstract data type of an element (RFC 7012 §3.1), which fixes its
/// encoding on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataType {
    Boolean,
    Unsigned8,
    Unsigned16,
    Unsigned32,
    Unsigned64,
    Signed64,
    Float64,
    MacAddress,
    Ipv4Address,
    Ipv6Address,
    DateTimeMilliseconds,
    DateTimeNanoseconds,
    String,
    OctetArray,
}

impl DataType {
    /// Encoded length in bytes, or `None` for variable-length types.
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            DataType::Boolean | DataType::Unsigned8 => Some(1),
            DataType::Unsigned16 => Some(2),
            DataType::Unsigned32 => Some(4),
            DataType::Unsigned64
            | DataType::Signed64
            | DataType::Float64
            | DataType::DateTimeMilliseconds
            | DataType::DateTimeNanoseconds => Some(8),
            DataType::MacAddress => Some(6),
            DataType::Ipv4Address => Some(4),
            DataType::Ipv6Address => Some(16),
            DataType::String | DataType::OctetArray => None,
        }
    }
}

/// Identifies an element: `(enterprise, id)`, enterprise 0 being IANA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IeId {
    pub enterprise: u32,
    pub id: u16,
}

impl IeId {
    pub const fn iana(id: u16) -> Self {
        IeId { enterprise: 0, id }
    }
    pub const fn qosloop(id: u16) -> Self {
        IeId {
            enterprise: QOSLOOP_PEN,
            id,
        }
    }
}

impl fmt::Display for IeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enterprise == 0 {
            write!(f, "{}", self.id)
        } else {
            write!(f, "{}/{}", self.enterprise, self.id)
        }
    }
}

/// One information element: id, name and type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InformationElement {
    pub id: IeId,
    pub name: &'static str,
    pub data_type: DataType,
}

macro_rules! elements {
    ($( $const:ident = $ctor:ident($id:expr), $name:expr, $ty:ident; )*) => {
        $(
            #[doc = concat!("`", $name, "`")]
            pub const $const: InformationElement = InformationElement {
                id: IeId::$ctor($id),
                name: $name,
                data_type: DataType::$ty,
            };
        )*
        /// Every element qosloop knows, IANA's first.
        pub const ALL: &[InformationElement] = &[$($const),*];
    };
}

elements! {
    OCTET_DELTA_COUNT = iana(1), "octetDeltaCount", Unsigned64;
    PACKET_DELTA_COUNT = iana(2), "packetDeltaCount", Unsigned64;
    PROTOCOL_IDENTIFIER = iana(4), "protocolIdentifier", Unsigned8;
    IP_CLASS_OF_SERVICE = iana(5), "ipClassOfService", Unsigned8;
    TCP_CONTROL_BITS = iana(6), "tcpControlBits", Unsigned16;
    SOURCE_TRANSPORT_PORT = iana(7), "sourceTransportPort", Unsigned16;
    SOURCE_IPV4_ADDRESS = iana(8), "sourceIPv4Address", Ipv4Address;
    INGRESS_INTERFACE = iana(10), "ingressInterface", Unsigned32;
    DESTINATION_TRANSPORT_PORT = iana(11), "destinationTransportPort", Unsigned16;
    DESTINATION_IPV4_ADDRESS = iana(12), "destinationIPv4Address", Ipv4Address;
    EGRESS_INTERFACE = iana(14), "egressInterface", Unsigned32;
    SOURCE_IPV6_ADDRESS = iana(27), "sourceIPv6Address", Ipv6Address;
    DESTINATION_IPV6_ADDRESS = iana(28), "destinationIPv6Address", Ipv6Address;
    ICMP_TYPE_CODE_IPV4 = iana(32), "icmpTypeCodeIPv4", Unsigned16;
    SOURCE_MAC_ADDRESS = iana(56), "sourceMacAddress", MacAddress;
    VLAN_ID = iana(58), "vlanId", Unsigned16;
    IP_VERSION = iana(60), "ipVersion", Unsigned8;
    DESTINATION_MAC_ADDRESS = iana(80), "destinationMacAddress", MacAddress;
    FLOW_END_REASON = iana(136), "flowEndReason", Unsigned8;
    ICMP_TYPE_CODE_IPV6 = iana(139), "icmpTypeCodeIPv6", Unsigned16;
    FLOW_START_MILLISECONDS = iana(152), "flowStartMilliseconds", DateTimeMilliseconds;
    FLOW_END_MILLISECONDS = iana(153), "flowEndMilliseconds", DateTimeMilliseconds;
    FLOW_START_NANOSECONDS = iana(156), "flowStartNanoseconds", DateTimeNanoseconds;
    FLOW_END_NANOSECONDS = iana(157), "flowEndNanoseconds", DateTimeNanoseconds;
    IP_DIFF_SERV_CODE_POINT = iana(195), "ipDiffServCodePoint", Unsigned8;
    SAMPLING_PACKET_INTERVAL = iana(305), "samplingPacketInterval", Unsigned32;
    SAMPLING_PACKET_SPACE = iana(306), "samplingPacketSpace", Unsigned32;
    USER_NAME = iana(371), "userName", String;
    USER_ID = qosloop(1), "qosloopUserId", Unsigned32;
    PROCESS_NAME = qosloop(2), "qosloopProcessName", String;
    CLASS_LABEL = qosloop(3), "qosloopClassLabel", String;
    POLICY_ID = qosloop(4), "qosloopPolicyId", String;
    PROCESS_ID = qosloop(5), "qosloopProcessId", Unsigned32;
}

/// Looks an element up by id.
pub fn by_id(id: IeId) -> Option<&'static InformationElement> {
    ALL.iter().find(|ie| ie.id == id)
}

/// Looks an element up by its registry name (`octetDeltaCount`, …).
pub fn by_name(name: &str) -> Option<&'static InformationElement> {
    ALL.iter().find(|ie| ie.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_and_names_are_unique() {
        let ids: HashSet<_> = ALL.iter().map(|ie| ie.id).collect();
        let names: HashSet<_> = ALL.iter().map(|ie| ie.name).collect();
        assert_eq!(ids.len(), ALL.len());
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn iana_ids_match_the_registry() {
        // Spot checks against IANA's IPFIX registry.
        assert_eq!(
            by_name("octetDeltaCount").map(|i| i.id),
            Some(IeId::iana(1))
        );
        assert_eq!(by_name("vlanId").map(|i| i.id), Some(IeId::iana(58)));
        assert_eq!(
            by_name("flowEndNanoseconds").map(|i| i.id),
            Some(IeId::iana(157))
        );
        assert_eq!(
            by_name("destinationIPv6Address").map(|i| i.id),
            Some(IeId::iana(28))
        );
        assert_eq!(
            by_id(IeId::iana(7)).map(|i| i.name),
            Some("sourceTransportPort")
        );
        assert_eq!(
            by_id(IeId::qosloop(3)).map(|i| i.name),
            Some("qosloopClassLabel")
        );
        assert!(by_id(IeId::iana(9999)).is_none());
    }
}
