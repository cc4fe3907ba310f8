//! qosloop's payloads inside COPS objects, as JSON, and the constructors of
//! the messages that carry them.
//!
//! | message | object | JSON |
//! |---|---|---|
//! | OPN | ClientSI (signaled) | [`PepHello`] |
//! | REQ | ClientSI (signaled) | [`PepState`]: roles + installed decisions |
//! | DEC install | Decision C-Type 4 | [`crate::Decision`] |
//! | DEC remove | Decision C-Type 4 | [`DecisionRef`] |
//! | RPT | ClientSI (signaled) | [`crate::EnforcementReport`] |

use super::*;
use crate::policy::{AccountingReport, Decision, EnforcementReport, ReportOutcome};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// What a PEP says about itself when it opens a connection (OPN ClientSI).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepHello {
    /// The roles whose decisions the PEP enforces.
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Which traffic of the interface the PEP enforces (absent: egress);
    /// the PDP refuses a PEP whose direction contradicts its roles' device
    /// entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<crate::Direction>,
    /// Name and version of the PEP software.
    #[serde(default)]
    pub software: String,
}

/// A decision a PEP has installed, by id and version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstalledDecision {
    pub id: u64,
    pub version: u64,
}

/// A PEP's configuration request (REQ ClientSI): its roles and what it has
/// installed, so that the PDP answers with the difference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepState {
    pub roles: Vec<String>,
    #[serde(default)]
    pub installed: Vec<InstalledDecision>,
}

/// The decision a remove refers to (DEC remove, C-Type 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DecisionRef {
    pub id: u64,
    pub version: u64,
}

/// A qosloop decision as read from a [`DecisionEntry`].
#[derive(Clone, Debug, PartialEq)]
pub enum QosloopDecision {
    Install(Box<Decision>),
    Remove(DecisionRef),
    /// A NULL decision: nothing to change.
    Nothing,
}

/// Reads the JSON payload `what` of an object.
pub fn from_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CopsError> {
    serde_json::from_slice(bytes).map_err(|source| CopsError::Payload { what, source })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: no maps with non-string
    // keys, no failing Serialize impls.
    serde_json::to_vec(v).unwrap_or_default()
}

impl PepHello {
    pub fn from_client_si(si: &ClientSi) -> Result<PepHello, CopsError> {
        from_json("OPN ClientSI", &si.data)
    }
}

impl PepState {
    pub fn from_client_si(si: &ClientSi) -> Result<PepState, CopsError> {
        from_json("REQ ClientSI", &si.data)
    }
}

impl DecisionEntry {
    /// Install `d` (command Install, data C-Type 4 = the decision as JSON).
    pub fn install(d: &Decision) -> DecisionEntry {
        DecisionEntry {
            context: Context::configuration(),
            command: Command::Install,
            trigger_error: false,
            data: vec![DecisionData {
                c_type: DecisionData::CLIENT_SPECIFIC,
                bytes: to_json(d),
            }],
        }
    }

    /// Remove the decision `r` refers to.
    pub fn remove(r: DecisionRef) -> DecisionEntry {
        DecisionEntry {
            context: Context::configuration(),
            command: Command::Remove,
            trigger_error: false,
            data: vec![DecisionData {
                c_type: DecisionData::CLIENT_SPECIFIC,
                bytes: to_json(&r),
            }],
        }
    }

    /// A NULL decision: the answer to a REQ when nothing needs changing.
    pub fn null() -> DecisionEntry {
        DecisionEntry {
            context: Context::configuration(),
            command: Command::Null,
            trigger_error: false,
            data: Vec::new(),
        }
    }

    /// The qosloop decision this entry carries.
    pub fn qosloop(&self) -> Result<QosloopDecision, CopsError> {
        let data = || {
            self.client_data().ok_or(CopsError::Missing {
                op: OpCode::Dec,
                object: "Decision client-specific data",
            })
        };
        match self.command {
            Command::Install => Ok(QosloopDecision::Install(Box::new(from_json(
                "DEC install data",
                data()?,
            )?))),
            Command::Remove => Ok(QosloopDecision::Remove(from_json(
                "DEC remove data",
                data()?,
            )?)),
            Command::Null | Command::Other(_) => Ok(QosloopDecision::Nothing),
        }
    }
}

impl Message {
    /// OPN from a PEP named `pep_id`.
    pub fn opn(pep_id: &str, hello: &PepHello) -> Message {
        Message::new(Body::Opn {
            pep_id: pep_id.to_owned(),
            client_si: Some(ClientSi::signaled(to_json(hello))),
            last_pdp: None,
        })
    }

    /// CAT accepting a PEP, with the keepalive interval in seconds.
    pub fn cat(ka_timer_secs: u16) -> Message {
        Message::new(Body::Cat {
            ka_timer_secs,
            acct_timer_secs: None,
        })
    }

    /// A configuration REQ carrying the PEP's state.
    pub fn req(handle: Handle, state: &PepState) -> Message {
        Message::new(Body::Req {
            handle,
            context: Context::configuration(),
            in_interface: None,
            out_interface: None,
            client_si: vec![ClientSi::signaled(to_json(state))],
        })
    }

    /// A DEC with `decisions`; an empty list becomes one NULL decision.
    pub fn dec(handle: Handle, mut decisions: Vec<DecisionEntry>) -> Message {
        if decisions.is_empty() {
            decisions.push(DecisionEntry::null());
        }
        Message::new(Body::Dec {
            handle,
            outcome: DecOutcome::Decisions(decisions),
        })
    }

    /// A DEC installing `decisions`.
    pub fn dec_install<'a>(
        handle: Handle,
        decisions: impl IntoIterator<Item = &'a Decision>,
    ) -> Message {
        Message::dec(
            handle,
            decisions.into_iter().map(DecisionEntry::install).collect(),
        )
    }

    /// RPT of one enforcement: Success unless the outcome is Failed.
    pub fn rpt(handle: Handle, report: &EnforcementReport) -> Message {
        let report_type = match report.outcome {
            ReportOutcome::Failed { .. } => ReportType::Failure,
            _ => ReportType::Success,
        };
        Message::new(Body::Rpt {
            handle,
            report_type,
            client_si: Some(ClientSi::signaled(to_json(report))),
        })
    }

    /// RPT of the kernel's counters (Report-Type Accounting, RFC 2748
    /// §2.2.11), unsolicited, on the session's handle.
    pub fn rpt_accounting(handle: Handle, report: &AccountingReport) -> Message {
        Message::new(Body::Rpt {
            handle,
            report_type: ReportType::Accounting,
            client_si: Some(ClientSi::signaled(to_json(report))),
        })
    }

    pub fn ssq() -> Message {
        Message::new(Body::Ssq { handle: None })
    }

    pub fn ssc() -> Message {
        Message::new(Body::Ssc { handle: None })
    }

    pub fn ka() -> Message {
        Message::new(Body::Ka)
    }

    pub fn cc(code: ErrorCode) -> Message {
        Message::new(Body::Cc {
            error: ErrorObject::new(code),
            redirect: None,
        })
    }

    pub fn drq(handle: Handle) -> Message {
        Message::new(Body::Drq {
            handle,
            reason: Reason {
                code: Reason::MANAGEMENT,
                sub_code: 0,
            },
        })
    }

    /// The enforcement report of an RPT (Success or Failure; none for an
    /// accounting RPT, see [`Message::accounting`]).
    pub fn report(&self) -> Result<Option<EnforcementReport>, CopsError> {
        match &self.body {
            Body::Rpt {
                report_type: ReportType::Accounting,
                ..
            } => Ok(None),
            Body::Rpt {
                client_si: Some(si),
                ..
            } => from_json("RPT ClientSI", &si.data).map(Some),
            _ => Ok(None),
        }
    }

    /// The kernel counters of an accounting RPT; more than
    /// [`crate::MAX_ACCOUNTED_DECISIONS`] decisions is an error.
    pub fn accounting(&self) -> Result<Option<AccountingReport>, CopsError> {
        match &self.body {
            Body::Rpt {
                report_type: ReportType::Accounting,
                client_si: Some(si),
                ..
            } => {
                let r: AccountingReport = from_json("RPT accounting ClientSI", &si.data)?;
                if r.decisions.len() > crate::MAX_ACCOUNTED_DECISIONS {
                    // The message itself is bounded by the codec (1 MiB).
                    return Err(CopsError::Payload {
                        what: "RPT accounting ClientSI",
                        source: serde::de::Error::custom(format!(
                            "{} decisions, more than {}",
                            r.decisions.len(),
                            crate::MAX_ACCOUNTED_DECISIONS
                        )),
                    });
                }
                if r.classes.len() > crate::MAX_ACCOUNTED_CLASSES {
                    return Err(CopsError::Payload {
                        what: "RPT accounting ClientSI",
                        source: serde::de::Error::custom(format!(
                            "{} HTB classes, more than {}",
                            r.classes.len(),
                            crate::MAX_ACCOUNTED_CLASSES
                        )),
                    });
                }
                Ok(Some(r))
            }
            _ => Ok(None),
        }
    }
}
