//! The collector's export session, stateful: the fuzzer's bytes choose a
//! START, a TMPL_DATA (how many templates, their keys — element, type,
//! disabled bit), FINAL_TMPL_DATA, then DATA messages whose template, count
//! and records come from the input, sent to `Collector::serve_stream` over
//! an in-memory pipe with a discard sink. The combinations of issue 11 —
//! a keyless template then a count of 0xFFFFFFFF (item 1), a 1-byte key
//! then megabytes of 1-byte records (item 2) — are a few mutations away;
//! memory blow-ups are crashes (`cap_alloc.rs`), time is paused so the
//! session's deadlines pass at once, and the session must end.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qosloop_collector::{Collector, Config, Sink};
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, Frame, Message, Start, TemplateSet, WireKey, WireTemplate,
    CAP_KEEPALIVE, CAP_LITTLE_ENDIAN, DATA_FLAG_START,
};
use qosloop_schema::ie::{self, DataType, IeId};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Encoder;

/// Reads the input front to back; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

const TYPES: &[DataType] = &[
    DataType::Boolean,
    DataType::Unsigned8,
    DataType::Unsigned16,
    DataType::Unsigned32,
    DataType::Unsigned64,
    DataType::Signed64,
    DataType::Float64,
    DataType::MacAddress,
    DataType::Ipv4Address,
    DataType::Ipv6Address,
    DataType::DateTimeMilliseconds,
    DataType::DateTimeNanoseconds,
    DataType::String,
    DataType::OctetArray,
];

fn key(input: &mut Input<'_>) -> WireKey {
    let pick = input.u8();
    let flags = input.u8();
    // Every element qosloop knows, or (one value in ALL.len() + 1) one nobody knows.
    let (id, own) = match ie::ALL.get(usize::from(pick) % (ie::ALL.len() + 1)) {
        Some(e) => (e.id, e.data_type),
        None => (
            IeId {
                enterprise: 0,
                id: u16::from(pick) + 1000,
            },
            DataType::Unsigned32,
        ),
    };
    // Mostly the element's own type; sometimes another one.
    let data_type = if flags & 0x06 == 0x06 {
        TYPES[usize::from(flags >> 4) % TYPES.len()]
    } else {
        own
    };
    WireKey {
        ie: id,
        data_type,
        disabled: flags & 1 == 1,
    }
}

/// The messages an input stands for.
fn session(input: &mut Input<'_>) -> Vec<Message> {
    let mode = input.u8();
    let byte_order = if mode & 1 == 1 {
        ByteOrder::Big
    } else {
        ByteOrder::Little
    };
    let mut out = vec![Message::Start(Start {
        max_version: 1,
        capabilities: if mode & 2 == 2 {
            CAP_KEEPALIVE | CAP_LITTLE_ENDIAN
        } else {
            0
        },
        boot_ns: 1,
        stream_id: u64::from(input.u16()),
        exporter: "fuzz".into(),
    })];
    let n_templates = 1 + usize::from(input.u8() % 4);
    let templates: Vec<WireTemplate> = (0..n_templates)
        .map(|i| {
            let n_keys = usize::from(input.u8() % 9);
            WireTemplate {
                id: 256 + i as u16,
                keys: (0..n_keys).map(|_| key(input)).collect(),
            }
        })
        .collect();
    out.push(Message::TemplateData(TemplateSet {
        config_id: 1,
        byte_order,
        templates,
    }));
    out.push(Message::FinalTemplateData { config_id: 1 });
    let n_data = usize::from(input.u8() % 8);
    for seq in 0..n_data as u32 {
        let template_id = 256 + u16::from(input.u8() % n_templates as u8);
        let count = input.u32();
        let len = usize::from(input.u16());
        // A short piece of the input, repeated: a few bytes of input stand
        // for megabytes of records (up to 255 × 64 KiB).
        let repeat = usize::from(input.u8()).max(1);
        let piece = input.bytes(len).to_vec();
        let records = piece.repeat(repeat);
        out.push(Message::Data(Data {
            template_id,
            config_id: 1,
            flags: if seq == 0 { DATA_FLAG_START } else { 0 },
            seq,
            count,
            records: records.into(),
        }));
    }
    if mode & 4 == 4 {
        out.push(Message::StatusReq);
    }
    if mode & 8 == 8 {
        out.push(Message::Stop);
    }
    out
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let messages = session(&mut input);
    let mut wire = BytesMut::new();
    let mut codec = CraneCodec::default();
    for message in messages {
        // A message over the 16 MiB limit is left out, as an exporter would.
        let _ = codec.encode(Frame { session: 1, message }, &mut wire);
    }
    runtime().block_on(async move {
        let config = Config {
            db: "discard:".into(),
            ..Config::default()
        };
        let collector = match Collector::new(Sink::Discard, &config) {
            Ok(c) => c,
            Err(_) => return,
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = "127.0.0.1:1".parse().expect("an address");
        let session = tokio::spawn(async move {
            collector.serve_stream(Box::new(server), peer, None).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = wr.write_all(&wire).await;
        let _ = wr.shutdown().await;
        drop(wr);
        // Time is paused: this passes at once unless the session works. A
        // panic in the session task is the target's panic.
        match tokio::time::timeout(Duration::from_secs(600), session).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("session task: {e}"),
            Err(_) => panic!("the session did not end within 600 s"),
        }
        drain.abort();
    });
});
