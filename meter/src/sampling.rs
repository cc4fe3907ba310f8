//! Packet sampling, off by default (`seeds/004`: CRANE forbids it). When
//! enabled — count-based 1-in-N, time-based (spacing and interval, as in
//! `seeds/004`), or hash-based selection over invariant packet content
//! (RFC 5475 §6.2.3) — every record carries the interval in
//! `sampling_interval` so consumers can scale the counters.

use crate::decode::Decoded;
use std::fmt;
use std::str::FromStr;

/// Which packets are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampling {
    /// Every packet (the default).
    #[default]
    Off,
    /// Every N-th packet (systematic count-based).
    Count { n: u32 },
    /// Every packet within `interval_ms` after each trigger, triggers every
    /// `spacing_ms` (systematic time-based).
    Time { spacing_ms: u32, interval_ms: u32 },
    /// Packets whose content hash falls in 1/N of the hash range.
    Hash { n: u32 },
}

impl FromStr for Sampling {
    type Err = String;
    /// `off`, `count:N`, `time:SPACING_MS/INTERVAL_MS`, `hash:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("sampling {s:?}: use off, count:N, time:SPACING_MS/INTERVAL_MS or hash:N");
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(bad)
        };
        match s.split_once(':') {
            None if s.trim() == "off" => Ok(Sampling::Off),
            Some(("count", n)) => Ok(Sampling::Count { n: num(n)? }),
            Some(("hash", n)) => Ok(Sampling::Hash { n: num(n)? }),
            Some(("time", st)) => {
                let (a, b) = st.split_once('/').ok_or_else(bad)?;
                let (spacing_ms, interval_ms) = (num(a)?, num(b)?);
                if interval_ms > spacing_ms {
                    return Err(format!("sampling {s:?}: interval exceeds spacing"));
                }
                Ok(Sampling::Time {
                    spacing_ms,
                    interval_ms,
                })
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Sampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sampling::Off => write!(f, "off"),
            Sampling::Count { n } => write!(f, "count:{n}"),
            Sampling::Time {
                spacing_ms,
                interval_ms,
            } => write!(f, "time:{spacing_ms}/{interval_ms}"),
            Sampling::Hash { n } => write!(f, "hash:{n}"),
        }
    }
}

impl Sampling {
    /// The 1-in-N interval records carry; `None` when off.
    pub fn interval(&self) -> Option<u32> {
        match *self {
            Sampling::Off => None,
            Sampling::Count { n } | Sampling::Hash { n } => Some(n),
            Sampling::Time {
                spacing_ms,
                interval_ms,
            } => Some((spacing_ms + interval_ms / 2) / interval_ms.max(1)).map(|n| n.max(1)),
        }
    }
}

/// The per-pipeline selection state.
#[derive(Debug, Clone)]
pub struct Sampler {
    mode: Sampling,
    counter: u32,
}

impl Sampler {
    pub fn new(mode: Sampling) -> Sampler {
        Sampler { mode, counter: 0 }
    }

    /// True when the packet is to be counted.
    #[inline]
    pub fn select(&mut self, ts_ns: u64, d: &Decoded, frame: &[u8]) -> bool {
        match self.mode {
            Sampling::Off => true,
            Sampling::Count { n } => {
                self.counter += 1;
                if self.counter >= n {
                    self.counter = 0;
                    true
                } else {
                    false
                }
            }
            Sampling::Time {
                spacing_ms,
                interval_ms,
            } => {
                let spacing = u64::from(spacing_ms) * 1_000_000;
                ts_ns % spacing < u64::from(interval_ms) * 1_000_000
            }
            Sampling::Hash { n } => {
                let h = content_hash(d, frame);
                // Selection range [0, 2^32 / N).
                u64::from(h) < (1u64 << 32) / u64::from(n)
            }
        }
    }
}

/// A hash over fields that stay the same along a packet's path (RFC 5475
/// §6.2.3: addresses, IPv4 identification, the first transport bytes), so
/// that meters at several points select the same packets.
fn content_hash(d: &Decoded, frame: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(&d.src.to_be_bytes());
    feed(&d.dst.to_be_bytes());
    let l3 = usize::from(d.l3_offset);
    if d.ip_version == 4 {
        feed(frame.get(l3 + 4..l3 + 6).unwrap_or(&[]));
    }
    let l4 = usize::from(d.l4_offset);
    feed(frame.get(l4..(l4 + 8).min(frame.len())).unwrap_or(&[]));
    // Final avalanche (murmur3 fmix32): FNV's low bits are weak.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_interval() {
        assert_eq!("off".parse::<Sampling>().unwrap(), Sampling::Off);
        assert_eq!("count:10".parse::<Sampling>().unwrap().interval(), Some(10));
        assert_eq!(
            "time:100/10".parse::<Sampling>().unwrap().interval(),
            Some(10)
        );
        assert!("time:10/100".parse::<Sampling>().is_err());
        assert!("count:0".parse::<Sampling>().is_err());
        assert!("bogus".parse::<Sampling>().is_err());
        assert_eq!("hash:4".parse::<Sampling>().unwrap().to_string(), "hash:4");
    }

    #[test]
    fn count_and_hash_select_about_one_in_n() {
        let mut s = Sampler::new(Sampling::Count { n: 4 });
        let d = Decoded::default();
        assert_eq!((0..400).filter(|_| s.select(0, &d, &[])).count(), 100);
        let mut s = Sampler::new(Sampling::Hash { n: 4 });
        let mut picked = 0;
        for i in 0u128..4000 {
            let d = Decoded {
                src: i,
                ..Decoded::default()
            };
            picked += usize::from(s.select(0, &d, &[]));
        }
        assert!((800..1200).contains(&picked), "{picked}");
        let mut s = Sampler::new(Sampling::Time {
            spacing_ms: 100,
            interval_ms: 10,
        });
        assert!(s.select(5_000_000, &d, &[]));
        assert!(!s.select(50_000_000, &d, &[]));
    }
}
