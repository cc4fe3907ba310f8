//! The policy repository: where the three-tier policy (DESIGN.md §5) comes
//! from, validated, and kept current.
//!
//! Two sources hold the same entries (schema/ldap/qosloop.ldif,
//! docs/policy.md):
//! - an LDIF file ([`load_ldif_file`], [`watch_ldif_file`]) — the embedded
//!   default, so that no LDAP server is needed to try qosloop;
//! - an LDAP directory ([`load_ldap`], [`watch_ldap`]), followed with RFC 4533
//!   refreshAndPersist against slapd's syncprov: changes arrive without
//!   polling, a lost connection is retried with backoff.
//!
//! Either way the server gets a [`PolicyWatch`]: a
//! `tokio::sync::watch::Receiver<Arc<PolicySet>>` carrying the newest valid
//! policy, and a channel of [`AuditEvent`]s (add / modify / delete / reject
//! with the DN) for the `policy_audit` table. Validation ([`build`]) names
//! the DN and attribute of every problem; an invalid object keeps its last
//! good version, so one bad entry never takes the rest of the policy down.
//! [`describe`] prints what was understood (`--check`). The HTTP API's
//! bearer tokens kept in the same directory (`qosloopApiToken` entries,
//! [`DirectoryToken`]) are published beside the policy, on
//! [`PolicyWatch::tokens`]; static user ↔ address mappings
//! (`qosloopUserMapping` entries, [`StaticMapping`]) on
//! [`PolicyWatch::mappings`], for the knowledge base.

mod attributes;
mod base64;
mod describe;
mod dn;
mod file;
mod ldap;
mod ldif;
mod mappings;
mod model;
mod publish;
mod tokens;

pub use describe::describe;
pub use dn::normalize as normalize_dn;
pub use file::{load_ldif_file, parse_policy_ldif, watch_ldif_file, DEFAULT_POLL};
pub use ldap::{load_ldap, watch_ldap, LdapBind, LdapSource};
pub use ldif::{parse as parse_ldif, write as write_ldif, Entry, LdifError};
pub use mappings::{StaticMapping, MAPPING_CLASS};
pub use model::{build, build_strict, intersect, Build, PolicyError, PolicyErrors};
pub use publish::{
    AuditChange, AuditEvent, PolicyStatus, PolicyWatch, Refusal, ALLOW_DROP_KEYWORD,
};
pub use tokens::{DirectoryToken, TOKEN_CLASS};

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Ldif {
        path: String,
        #[source]
        source: LdifError,
    },
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
    #[error("LDAP {url}: {message}")]
    Ldap { url: String, message: String },
}
