//! The consumer's side (`seeds/003` §2.3, §3): a point may send a
//! consumer frames outside its request (its filter was widened), so the
//! consumer applies its own exact request to what it reads.

use qosloop_schema::dpmi::{Filter, FrameFields};

/// A consumer's exact request, applied to the frames it receives.
#[derive(Clone, Debug)]
pub struct Refilter {
    filter: Filter,
    interface: String,
    pub kept: u64,
    pub discarded: u64,
}

impl Refilter {
    /// `interface`: the capture interface of the point the stream comes
    /// from (the stream does not carry it).
    pub fn new(filter: Filter, interface: impl Into<String>) -> Refilter {
        Refilter {
            filter,
            interface: interface.into(),
            kept: 0,
            discarded: 0,
        }
    }

    /// Whether the frame is one the request covers (and counts it).
    pub fn keep(&mut self, frame: &[u8]) -> bool {
        let keep = FrameFields::parse(frame, None)
            .is_some_and(|f| self.filter.matches(&self.interface, &f));
        if keep {
            self.kept += 1;
        } else {
            self.discarded += 1;
        }
        keep
    }
}
