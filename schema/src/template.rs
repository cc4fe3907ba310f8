//! Templates: the ordered keys a data message's records carry.
//!
//! An exporter offers a template; the collector may disable keys it does not
//! want (CRANE, RFC 3423 §4: the low bit of a key's attributes), after which
//! data carries only the enabled keys, in order, without descriptors.

use crate::ie::{self, IeId, InformationElement};
use serde::{Deserialize, Serialize};

/// One key of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TemplateKey {
    pub ie: IeId,
    pub enabled: bool,
}

/// An ordered list of keys under an id that is unique within a session.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Template {
    pub id: u16,
    pub keys: Vec<TemplateKey>,
}

impl Template {
    pub fn new(id: u16, elements: &[InformationElement]) -> Template {
        Template {
            id,
            keys: elements
                .iter()
                .map(|e| TemplateKey {
                    ie: e.id,
                    enabled: true,
                })
                .collect(),
        }
    }

    /// The keys data records actually carry, in order.
    pub fn enabled(&self) -> impl Iterator<Item = IeId> + '_ {
        self.keys.iter().filter(|k| k.enabled).map(|k| k.ie)
    }

    /// Disables `id`; returns whether the template had it.
    pub fn disable(&mut self, id: IeId) -> bool {
        let mut found = false;
        for k in self.keys.iter_mut().filter(|k| k.ie == id) {
            k.enabled = false;
            found = true;
        }
        found
    }

    /// qosloop's flow template for IPv4 records: everything
    /// [`crate::FlowRecord`] holds.
    pub fn flow_v4(id: u16) -> Template {
        Template::new(
            id,
            &flow_elements(ie::SOURCE_IPV4_ADDRESS, ie::DESTINATION_IPV4_ADDRESS),
        )
    }

    /// The same for IPv6 records.
    pub fn flow_v6(id: u16) -> Template {
        Template::new(
            id,
            &flow_elements(ie::SOURCE_IPV6_ADDRESS, ie::DESTINATION_IPV6_ADDRESS),
        )
    }
}

fn flow_elements(src: InformationElement, dst: InformationElement) -> Vec<InformationElement> {
    vec![
        src,
        dst,
        ie::SOURCE_TRANSPORT_PORT,
        ie::DESTINATION_TRANSPORT_PORT,
        ie::PROTOCOL_IDENTIFIER,
        ie::PACKET_DELTA_COUNT,
        ie::OCTET_DELTA_COUNT,
        ie::FLOW_START_NANOSECONDS,
        ie::FLOW_END_NANOSECONDS,
        ie::VLAN_ID,
        ie::IP_DIFF_SERV_CODE_POINT,
        ie::TCP_CONTROL_BITS,
        ie::CLASS_LABEL,
        ie::USER_NAME,
        ie::PROCESS_NAME,
        ie::SAMPLING_PACKET_INTERVAL,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabling_removes_keys_from_data() {
        let mut t = Template::flow_v4(256);
        let before = t.enabled().count();
        assert!(t.disable(ie::PROCESS_NAME.id));
        assert!(!t.disable(ie::SOURCE_IPV6_ADDRESS.id));
        assert_eq!(t.enabled().count(), before - 1);
        assert!(t.enabled().all(|k| k != ie::PROCESS_NAME.id));
        assert!(t.keys.iter().all(|k| ie::by_id(k.ie).is_some()));
    }
}
