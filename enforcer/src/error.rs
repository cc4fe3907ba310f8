//! Why the enforcer refused or failed a decision; the text goes into the
//! RPT failure the PDP receives, so it names the object and the reason.

use crate::tc::KernelError;
use qosloop_schema::Kbps;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnforceError {
    #[error("unknown interface {0:?} (not present in this network namespace)")]
    UnknownInterface(String),
    #[error("interface name {0:?} cannot name an nftables table (use letters, digits, _ . -)")]
    UnusableInterfaceName(String),
    #[error("decision {id}: {reason}")]
    Invalid { id: u64, reason: String },
    #[error("decision {id}: flow {flow} is already the flow of decision {other} ({other_flow})")]
    Conflict {
        id: u64,
        flow: String,
        other: u64,
        other_flow: String,
    },
    #[error(
        "decision {id}: guaranteed rates would total {total} on a {capacity} link \
         (in-profile + shaped out-of-profile + {default} for other traffic)"
    )]
    Oversubscribed {
        id: u64,
        total: Kbps,
        capacity: Kbps,
        default: Kbps,
    },
    #[error("capability {capability} missing: {detail}")]
    Capability { capability: String, detail: String },
    #[error(
        "interface {interface} has a root qdisc {kind} {handle} that qosloop did not create; \
         not touching it (remove it or pick another qdisc handle)"
    )]
    ForeignQdisc {
        interface: String,
        kind: String,
        handle: String,
    },
    #[error("kernel refused {op}: {source}")]
    Tc {
        op: String,
        #[source]
        source: KernelError,
    },
    #[error("{0}")]
    Nft(String),
}
