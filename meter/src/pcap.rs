//! pcap and pcapng files: a reader that walks both formats packet by packet,
//! and small writers (classic pcap and pcapng) that tests and benchmarks use
//! to make their own captures.
//!
//! The reader never trusts a length from the file: every record is checked
//! against the bytes that are really there and against a size ceiling, and a
//! corrupt file is one [`CaptureError`] naming the file, the packet number
//! and what is wrong.

use std::io::{self, Read, Write};

/// Link-layer header types (tcpdump.org LINKTYPE_ values) the decoder knows.
pub mod linktype {
    pub const ETHERNET: u32 = 1;
    pub const RAW: u32 = 101;
    pub const LINUX_SLL: u32 = 113;
    pub const IPV4: u32 = 228;
    pub const IPV6: u32 = 229;
    pub const LINUX_SLL2: u32 = 276;
}

/// Ceiling on one captured packet; larger claims are corruption, not data.
const MAX_PACKET: usize = 256 * 1024;
/// Ceiling on one pcapng block.
const MAX_BLOCK: usize = MAX_PACKET + 64 * 1024;

/// A packet as read from a file or a ring: its capture time, the captured
/// bytes and the length it had on the wire.
#[derive(Debug, Clone, Copy)]
pub struct PacketRef<'a> {
    pub ts_ns: u64,
    pub data: &'a [u8],
    pub orig_len: u32,
    pub linktype: u32,
    /// Interface index in the file (pcapng) or 0.
    pub interface: u32,
}

/// What went wrong reading a capture file.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: not a pcap or pcapng file (first bytes {magic:08x})")]
    NotACapture { file: String, magic: u32 },
    #[error("{file}: packet {packet}: {what}")]
    Corrupt {
        file: String,
        packet: u64,
        what: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Pcap { swapped: bool, nanos: bool },
    Pcapng { swapped: bool },
}

#[derive(Debug, Clone)]
struct Interface {
    linktype: u32,
    /// `if_name` option, if the file names the interface.
    name: String,
    /// Timestamp units per second.
    units_per_sec: u64,
    snaplen: u32,
}

/// Reads packets from a pcap or pcapng stream.
#[derive(Debug)]
pub struct CaptureReader<R> {
    inner: R,
    file: String,
    format: Format,
    linktype: u32,
    snaplen: u32,
    interfaces: Vec<Interface>,
    buf: Vec<u8>,
    packet_no: u64,
    bytes_read: u64,
    last_ts_ns: u64,
    /// Where the packet last read lies in `buf`, and its metadata.
    last: Option<Last>,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    ts_ns: u64,
    start: usize,
    len: usize,
    orig_len: u32,
    linktype: u32,
    interface: u32,
}

fn u16_at(b: &[u8], at: usize, swapped: bool) -> u16 {
    let v = u16::from_le_bytes([b[at], b[at + 1]]);
    if swapped {
        v.swap_bytes()
    } else {
        v
    }
}

fn u32_at(b: &[u8], at: usize, swapped: bool) -> u32 {
    let v = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if swapped {
        v.swap_bytes()
    } else {
        v
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of file
/// before the first byte, an error when the file ends part-way.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> CaptureReader<R> {
    /// Reads the file header; `file` names the source in errors.
    pub fn new(mut inner: R, file: impl Into<String>) -> Result<Self, CaptureError> {
        let file = file.into();
        let mut head = [0u8; 24];
        let got = read_full(&mut inner, &mut head[..4]).map_err(|source| CaptureError::Io {
            file: file.clone(),
            source,
        })?;
        if got < 4 {
            return Err(CaptureError::Corrupt {
                file,
                packet: 0,
                what: "file is shorter than a capture file header".into(),
            });
        }
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let mut reader = CaptureReader {
            inner,
            file,
            format: Format::Pcap {
                swapped: false,
                nanos: false,
            },
            linktype: 0,
            snaplen: 0,
            interfaces: Vec::new(),
            buf: Vec::with_capacity(2048),
            packet_no: 0,
            bytes_read: 4,
            last_ts_ns: 0,
            last: None,
        };
        let (swapped, nanos) = match magic {
            0xa1b2_c3d4 => (false, false),
            0xd4c3_b2a1 => (true, false),
            0xa1b2_3c4d => (false, true),
            0x4d3c_b2a1 => (true, true),
            0x0a0d_0d0a => {
                reader.format = Format::Pcapng { swapped: false };
                reader.read_shb_rest()?;
                return Ok(reader);
            }
            _ => {
                return Err(CaptureError::NotACapture {
                    file: reader.file,
                    magic: u32::from_be_bytes(head[..4].try_into().unwrap_or([0; 4])),
                })
            }
        };
        reader.fill(&mut head[4..24], "file header")?;
        let (major, snaplen, network) = (
            u16_at(&head, 4, swapped),
            u32_at(&head, 16, swapped),
            u32_at(&head, 20, swapped),
        );
        if major != 2 {
            return Err(reader.corrupt(format!("unsupported pcap version {major}")));
        }
        reader.format = Format::Pcap { swapped, nanos };
        reader.snaplen = snaplen;
        // The upper bits may carry FCS information (pcap-linktype(7)).
        reader.linktype = network & 0x0fff_ffff;
        Ok(reader)
    }

    /// Bytes consumed so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Number of packets returned so far.
    pub fn packets_read(&self) -> u64 {
        self.packet_no
    }

    /// The packet the last [`CaptureReader::next_packet`] returned, again
    /// (so that it can be used beside other reader methods).
    pub fn current(&self) -> Option<PacketRef<'_>> {
        self.last.map(|l| PacketRef {
            ts_ns: l.ts_ns,
            data: &self.buf[l.start..l.start + l.len],
            orig_len: l.orig_len,
            linktype: l.linktype,
            interface: l.interface,
        })
    }

    /// The name a pcapng file gives interface `id` (`if_name`), or "".
    pub fn interface_name(&self, id: u32) -> &str {
        self.interfaces
            .get(id as usize)
            .map_or("", |i| i.name.as_str())
    }

    /// The link type of the file's first interface (pcap: the only one).
    pub fn linktype(&self) -> u32 {
        match self.format {
            Format::Pcap { .. } => self.linktype,
            Format::Pcapng { .. } => self.interfaces.first().map_or(0, |i| i.linktype),
        }
    }

    fn corrupt(&self, what: String) -> CaptureError {
        CaptureError::Corrupt {
            file: self.file.clone(),
            packet: self.packet_no + 1,
            what,
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), CaptureError> {
        let got = read_full(&mut self.inner, buf).map_err(|source| CaptureError::Io {
            file: self.file.clone(),
            source,
        })?;
        self.bytes_read += got as u64;
        if got < buf.len() {
            return Err(self.corrupt(format!(
                "file ends inside the {what} ({got} of {} bytes)",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Reads `len` bytes into the internal buffer.
    fn fill_buf(&mut self, len: usize, what: &str) -> Result<(), CaptureError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(len, 0);
        let r = self.fill(&mut buf, what);
        self.buf = buf;
        r
    }

    /// The next packet, `None` at a clean end of file.
    pub fn next_packet(&mut self) -> Result<Option<PacketRef<'_>>, CaptureError> {
        self.last = None;
        match self.format {
            Format::Pcap { swapped, nanos } => self.next_pcap(swapped, nanos),
            Format::Pcapng { .. } => self.next_pcapng(),
        }
    }

    fn next_pcap(
        &mut self,
        swapped: bool,
        nanos: bool,
    ) -> Result<Option<PacketRef<'_>>, CaptureError> {
        let mut rec = [0u8; 16];
        let got = read_full(&mut self.inner, &mut rec).map_err(|source| CaptureError::Io {
            file: self.file.clone(),
            source,
        })?;
        self.bytes_read += got as u64;
        if got == 0 {
            return Ok(None);
        }
        if got < 16 {
            return Err(self.corrupt(format!(
                "file ends inside the packet record header ({got} of 16 bytes)"
            )));
        }
        let sec = u64::from(u32_at(&rec, 0, swapped));
        let frac = u64::from(u32_at(&rec, 4, swapped));
        let incl = u32_at(&rec, 8, swapped) as usize;
        let orig = u32_at(&rec, 12, swapped);
        if incl > MAX_PACKET {
            return Err(self.corrupt(format!(
                "captured length {incl} exceeds the {MAX_PACKET}-byte ceiling"
            )));
        }
        let limit = if nanos { 1_000_000_000 } else { 1_000_000 };
        if frac >= limit {
            return Err(self.corrupt(format!("timestamp fraction {frac} is not below {limit}")));
        }
        self.fill_buf(incl, "packet data")?;
        self.packet_no += 1;
        let ts_ns = sec * 1_000_000_000 + if nanos { frac } else { frac * 1000 };
        self.last_ts_ns = ts_ns;
        self.last = Some(Last {
            ts_ns,
            start: 0,
            len: incl,
            orig_len: orig.max(incl as u32),
            linktype: self.linktype,
            interface: 0,
        });
        Ok(self.current())
    }

    /// The section header block after its 4-byte type.
    fn read_shb_rest(&mut self) -> Result<(), CaptureError> {
        let mut head = [0u8; 8];
        self.fill(&mut head, "section header block")?;
        let bom = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let swapped = match bom {
            0x1a2b_3c4d => false,
            0x4d3c_2b1a => true,
            other => {
                return Err(self.corrupt(format!(
                    "section header byte-order magic {other:08x} is not 1a2b3c4d"
                )))
            }
        };
        let total = u32_at(&head, 0, swapped) as usize;
        if !(28..=MAX_BLOCK).contains(&total) || total % 4 != 0 {
            return Err(self.corrupt(format!("section header block length {total} is invalid")));
        }
        self.format = Format::Pcapng { swapped };
        self.interfaces.clear();
        self.fill_buf(total - 12, "section header block")?;
        let trailer = u32_at(&self.buf, total - 16, swapped) as usize;
        if trailer != total {
            return Err(self.corrupt(format!(
                "section header block length {total} and trailer {trailer} differ"
            )));
        }
        Ok(())
    }

    fn next_pcapng(&mut self) -> Result<Option<PacketRef<'_>>, CaptureError> {
        loop {
            let mut head = [0u8; 8];
            let got = read_full(&mut self.inner, &mut head).map_err(|source| CaptureError::Io {
                file: self.file.clone(),
                source,
            })?;
            self.bytes_read += got as u64;
            if got == 0 {
                return Ok(None);
            }
            if got < 8 {
                return Err(self.corrupt(format!(
                    "file ends inside a block header ({got} of 8 bytes)"
                )));
            }
            let block_type = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            if block_type == 0x0a0d_0d0a {
                // A new section: its byte order may differ.
                let mut rest = [0u8; 4];
                self.fill(&mut rest, "section header block")?;
                let bom = u32::from_le_bytes(rest);
                let swapped = bom == 0x4d3c_2b1a;
                if !swapped && bom != 0x1a2b_3c4d {
                    return Err(self.corrupt(format!(
                        "section header byte-order magic {bom:08x} is not 1a2b3c4d"
                    )));
                }
                let total = u32_at(&head, 4, swapped) as usize;
                if !(28..=MAX_BLOCK).contains(&total) || total % 4 != 0 {
                    return Err(
                        self.corrupt(format!("section header block length {total} is invalid"))
                    );
                }
                self.format = Format::Pcapng { swapped };
                self.interfaces.clear();
                self.fill_buf(total - 12, "section header block")?;
                continue;
            }
            let Format::Pcapng { swapped } = self.format else {
                return Ok(None);
            };
            let block_type = if swapped {
                block_type.swap_bytes()
            } else {
                block_type
            };
            let total = u32_at(&head, 4, swapped) as usize;
            if !(12..=MAX_BLOCK).contains(&total) || total % 4 != 0 {
                return Err(self.corrupt(format!(
                    "block of type {block_type:#x} has invalid length {total}"
                )));
            }
            self.fill_buf(total - 8, "block body")?;
            let body_len = total - 12;
            let trailer = u32_at(&self.buf, body_len, swapped) as usize;
            if trailer != total {
                return Err(self.corrupt(format!(
                    "block of type {block_type:#x}: length {total} and trailer {trailer} differ"
                )));
            }
            match block_type {
                1 => self.read_idb(body_len, swapped)?,
                6 | 2 => return self.read_epb(block_type, body_len, swapped),
                3 => return self.read_spb(body_len, swapped),
                _ => {} // name resolution, statistics, custom: not needed
            }
        }
    }

    fn read_idb(&mut self, body_len: usize, swapped: bool) -> Result<(), CaptureError> {
        if body_len < 8 {
            return Err(self.corrupt("interface description block is too short".into()));
        }
        let b = &self.buf;
        let linktype = u32::from(u16_at(b, 0, swapped));
        let snaplen = u32_at(b, 4, swapped);
        let mut units_per_sec = 1_000_000u64;
        let mut name = String::new();
        let mut at = 8;
        while at + 4 <= body_len {
            let code = u16_at(b, at, swapped);
            let len = usize::from(u16_at(b, at + 2, swapped));
            let value_at = at + 4;
            if value_at + len > body_len {
                return Err(self.corrupt(format!("interface option {code} runs past its block")));
            }
            if code == 0 {
                break;
            }
            if code == 2 {
                name = String::from_utf8_lossy(&b[value_at..value_at + len])
                    .trim_end_matches('\0')
                    .to_owned();
            }
            if code == 9 && len >= 1 {
                let v = b[value_at];
                let exp = u32::from(v & 0x7f);
                units_per_sec = if v & 0x80 == 0 {
                    if exp > 19 {
                        return Err(self.corrupt(format!("if_tsresol 10^-{exp} is too fine")));
                    }
                    10u64.pow(exp)
                } else {
                    if exp > 63 {
                        return Err(self.corrupt(format!("if_tsresol 2^-{exp} is too fine")));
                    }
                    1u64 << exp
                };
            }
            at = value_at + len.div_ceil(4) * 4;
        }
        self.interfaces.push(Interface {
            linktype,
            name,
            units_per_sec,
            snaplen,
        });
        Ok(())
    }

    fn interface(&self, id: u32) -> Result<Interface, CaptureError> {
        self.interfaces
            .get(id as usize)
            .cloned()
            .ok_or_else(|| self.corrupt(format!("packet names interface {id}, which is undefined")))
    }

    fn read_epb(
        &mut self,
        block_type: u32,
        body_len: usize,
        swapped: bool,
    ) -> Result<Option<PacketRef<'_>>, CaptureError> {
        if body_len < 20 {
            return Err(self.corrupt("packet block is too short".into()));
        }
        let b = &self.buf;
        let id = if block_type == 6 {
            u32_at(b, 0, swapped)
        } else {
            u32::from(u16_at(b, 0, swapped))
        };
        let ts = (u64::from(u32_at(b, 4, swapped)) << 32) | u64::from(u32_at(b, 8, swapped));
        let caplen = u32_at(b, 12, swapped) as usize;
        let orig = u32_at(b, 16, swapped);
        if 20 + caplen > body_len {
            return Err(self.corrupt(format!(
                "captured length {caplen} runs past its block ({} bytes of data)",
                body_len - 20
            )));
        }
        let iface = self.interface(id)?;
        let ts_ns = (u128::from(ts) * 1_000_000_000 / u128::from(iface.units_per_sec.max(1)))
            .min(u128::from(u64::MAX)) as u64;
        self.packet_no += 1;
        self.last_ts_ns = ts_ns;
        self.last = Some(Last {
            ts_ns,
            start: 20,
            len: caplen,
            orig_len: orig.max(caplen as u32),
            linktype: iface.linktype,
            interface: id,
        });
        Ok(self.current())
    }

    fn read_spb(
        &mut self,
        body_len: usize,
        swapped: bool,
    ) -> Result<Option<PacketRef<'_>>, CaptureError> {
        if body_len < 4 {
            return Err(self.corrupt("simple packet block is too short".into()));
        }
        let orig = u32_at(&self.buf, 0, swapped);
        let iface = self.interface(0)?;
        let mut caplen = (orig as usize).min(body_len - 4);
        if iface.snaplen != 0 {
            caplen = caplen.min(iface.snaplen as usize);
        }
        self.packet_no += 1;
        self.last = Some(Last {
            // A simple packet block has no timestamp: keep time where it was.
            ts_ns: self.last_ts_ns,
            start: 4,
            len: caplen,
            orig_len: orig.max(caplen as u32),
            linktype: iface.linktype,
            interface: 0,
        });
        Ok(self.current())
    }
}

/// Writes a classic pcap file (little-endian, nanosecond timestamps).
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W, linktype: u32, snaplen: u32) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_3c4du32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&snaplen.to_le_bytes());
        h.extend_from_slice(&linktype.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter { out })
    }

    /// Writes one packet; `data` is what was captured, `orig_len` its length
    /// on the wire.
    pub fn write_packet(&mut self, ts_ns: u64, data: &[u8], orig_len: u32) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&((ts_ns / 1_000_000_000) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&((ts_ns % 1_000_000_000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&orig_len.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(data)
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Writes a pcapng file: one section, one interface with nanosecond
/// timestamps, enhanced packet blocks.
#[derive(Debug)]
pub struct PcapngWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapngWriter<W> {
    pub fn new(out: W, linktype: u32, snaplen: u32) -> io::Result<Self> {
        Self::with_interface_name(out, linktype, snaplen, "")
    }

    /// Like [`PcapngWriter::new`], naming the interface (`if_name`).
    pub fn with_interface_name(
        mut out: W,
        linktype: u32,
        snaplen: u32,
        name: &str,
    ) -> io::Result<Self> {
        let mut shb = Vec::new();
        shb.extend_from_slice(&0x0a0d_0d0au32.to_le_bytes());
        shb.extend_from_slice(&28u32.to_le_bytes());
        shb.extend_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        shb.extend_from_slice(&1u16.to_le_bytes());
        shb.extend_from_slice(&0u16.to_le_bytes());
        shb.extend_from_slice(&u64::MAX.to_le_bytes());
        shb.extend_from_slice(&28u32.to_le_bytes());
        out.write_all(&shb)?;
        let mut opts = Vec::new();
        if !name.is_empty() {
            opts.extend_from_slice(&2u16.to_le_bytes());
            opts.extend_from_slice(&(name.len() as u16).to_le_bytes());
            opts.extend_from_slice(name.as_bytes());
            opts.resize(opts.len().div_ceil(4) * 4, 0);
        }
        // if_tsresol = 9 (nanoseconds), then opt_endofopt.
        opts.extend_from_slice(&9u16.to_le_bytes());
        opts.extend_from_slice(&1u16.to_le_bytes());
        opts.extend_from_slice(&[9, 0, 0, 0]);
        opts.extend_from_slice(&[0, 0, 0, 0]);
        let total = (20 + opts.len()) as u32;
        let mut idb = Vec::new();
        idb.extend_from_slice(&1u32.to_le_bytes());
        idb.extend_from_slice(&total.to_le_bytes());
        idb.extend_from_slice(&(linktype as u16).to_le_bytes());
        idb.extend_from_slice(&0u16.to_le_bytes());
        idb.extend_from_slice(&snaplen.to_le_bytes());
        idb.extend_from_slice(&opts);
        idb.extend_from_slice(&total.to_le_bytes());
        out.write_all(&idb)?;
        Ok(PcapngWriter { out })
    }

    pub fn write_packet(&mut self, ts_ns: u64, data: &[u8], orig_len: u32) -> io::Result<()> {
        let padded = data.len().div_ceil(4) * 4;
        let total = (32 + padded) as u32;
        let mut b = Vec::with_capacity(total as usize);
        b.extend_from_slice(&6u32.to_le_bytes());
        b.extend_from_slice(&total.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&((ts_ns >> 32) as u32).to_le_bytes());
        b.extend_from_slice(&(ts_ns as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&orig_len.to_le_bytes());
        b.extend_from_slice(data);
        b.resize(28 + padded, 0);
        b.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(&b)
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>, u32)>, CaptureError> {
        let mut r = CaptureReader::new(bytes, "mem")?;
        let mut out = Vec::new();
        while let Some(p) = r.next_packet()? {
            out.push((p.ts_ns, p.data.to_vec(), p.orig_len));
        }
        Ok(out)
    }

    #[test]
    fn pcap_round_trips() {
        let mut w = PcapWriter::new(Vec::new(), linktype::ETHERNET, 65535).unwrap();
        w.write_packet(1_700_000_000_123_456_789, &[1, 2, 3], 3)
            .unwrap();
        w.write_packet(1_700_000_001_000_000_000, &[4; 10], 1500)
            .unwrap();
        let got = read_all(&w.into_inner()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (1_700_000_000_123_456_789, vec![1, 2, 3], 3));
        assert_eq!(got[1].2, 1500);
    }

    #[test]
    fn pcapng_round_trips() {
        let mut w = PcapngWriter::new(Vec::new(), linktype::ETHERNET, 65535).unwrap();
        w.write_packet(1_700_000_000_123_456_789, &[1, 2, 3, 4, 5], 5)
            .unwrap();
        let got = read_all(&w.into_inner()).unwrap();
        assert_eq!(
            got,
            vec![(1_700_000_000_123_456_789, vec![1, 2, 3, 4, 5], 5)]
        );
    }

    #[test]
    fn pcapng_interface_names_are_read() {
        let mut w =
            PcapngWriter::with_interface_name(Vec::new(), linktype::ETHERNET, 65535, "eth7")
                .unwrap();
        w.write_packet(5, &[1, 2, 3], 3).unwrap();
        let bytes = w.into_inner();
        let mut r = CaptureReader::new(&bytes[..], "mem").unwrap();
        assert!(r.next_packet().unwrap().is_some());
        let p = r.current().unwrap();
        assert_eq!((p.ts_ns, p.data), (5, &[1u8, 2, 3][..]));
        assert_eq!(r.interface_name(p.interface), "eth7");
        assert!(r.next_packet().unwrap().is_none());
        assert!(r.current().is_none());
    }

    #[test]
    fn microsecond_big_endian_pcap_is_read() {
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2_c3d4u32.to_be_bytes());
        f.extend_from_slice(&2u16.to_be_bytes());
        f.extend_from_slice(&4u16.to_be_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&10u32.to_be_bytes());
        f.extend_from_slice(&5u32.to_be_bytes());
        f.extend_from_slice(&2u32.to_be_bytes());
        f.extend_from_slice(&2u32.to_be_bytes());
        f.extend_from_slice(&[9, 9]);
        let got = read_all(&f).unwrap();
        assert_eq!(got, vec![(10_000_005_000, vec![9, 9], 2)]);
    }

    #[test]
    fn truncated_file_names_the_packet() {
        let mut w = PcapWriter::new(Vec::new(), linktype::ETHERNET, 65535).unwrap();
        w.write_packet(1, &[0; 60], 60).unwrap();
        w.write_packet(2, &[0; 60], 60).unwrap();
        let mut bytes = w.into_inner();
        bytes.truncate(bytes.len() - 10);
        let err = read_all(&bytes).unwrap_err().to_string();
        assert!(err.contains("packet 2"), "{err}");
        assert!(err.contains("ends inside the packet data"), "{err}");
    }

    #[test]
    fn absurd_length_is_corrupt() {
        let mut w = PcapWriter::new(Vec::new(), linktype::ETHERNET, 65535).unwrap();
        w.write_packet(1, &[0; 4], 4).unwrap();
        let mut bytes = w.into_inner();
        bytes[24 + 8..24 + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_all(&bytes).unwrap_err().to_string();
        assert!(err.contains("packet 1") && err.contains("ceiling"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_capture() {
        let err = read_all(b"hello world, not pcap").unwrap_err().to_string();
        assert!(err.contains("not a pcap"), "{err}");
    }
}
