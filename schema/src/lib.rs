//! # qosloop-schema
//!
//! The contracts between qosloop's components, and nothing else: what a flow
//! record is and how it reads as JSON, which information elements exist
//! (IANA IPFIX ids where IANA has one), what a template is, the three-tier
//! policy model and the decisions and reports that flow from it, the SQL
//! migrations of both storage dialects, and the LDAP schema of the policy
//! repository (`schema/ldap/`).
//!
//! The crate is pure — it opens no socket and reads no file — but for
//! `guard`, the limits every listener of qosloop shares (connections per
//! peer, accept back-off, log throttling, bind policy). Wire codecs
//! (export protocol, COPS decisions) live here as `tokio_util` codecs so that
//! both ends of a connection share one implementation. TLS files and the
//! log set-up live in `qosloop-runtime`; the database and the code that
//! applies these migrations in `qosloop-store`.

pub mod bandwidth;
pub mod cops;
pub mod crane;
pub mod dpmi;
pub mod guard;
pub mod ie;
pub mod merge;
pub mod sql;

mod flow;
mod policy;
mod template;
mod units;

pub use flow::{flow_hash, FlowKey, FlowRecord};
pub use ie::{DataType, IeId, InformationElement, QOSLOOP_PEN};
pub use policy::{
    AccountingReport, BandBasis, BusinessRule, ClassCounters, Decision, DecisionCounters,
    DecisionKind, DecisionReason, DeviceRole, Direction, EnforcementReport, FlowSpec, Link,
    LoadBand, OutOfProfileAction, PolicySet, ReportOutcome, ServiceClass, TrafficProfile,
    UserMatch, UserRef, MAX_ACCOUNTED_CLASSES, MAX_ACCOUNTED_DECISIONS, MTU_BYTES,
};
pub use template::{Template, TemplateKey};
pub use units::{Dscp, IpPrefix, Kbps, ParseError, PortRange};

/// The LDAP schema of the policy repository, as an LDIF for
/// `cn=schema,cn=config` (slapd 2.5+).
pub const LDAP_SCHEMA_LDIF: &str = include_str!("../ldap/qosloop.ldif");

/// The sample policy: the reference experiment of DESIGN.md §1.
pub const SAMPLE_POLICY_LDIF: &str = include_str!("../ldap/sample-policy.ldif");

/// The per-user sample policy: users and a group limited on their own host.
pub const SAMPLE_PER_USER_LDIF: &str = include_str!("../ldap/sample-per-user.ldif");
