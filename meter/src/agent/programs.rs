//! The agent's two eBPF programs, hand-assembled, and the byte layouts of
//! the maps they share with user space.
//!
//! `count` (cgroup_skb, ingress and egress): per packet, the socket cookie
//! and the packet's own 5-tuple (read from the IPv4/IPv6 header and the
//! first four bytes of TCP/UDP/SCTP/UDP-Lite, or ICMP type and code) make
//! the key; packets (GSO segments) and bytes (`skb->len`, IP bytes) are
//! added to the per-CPU value of the counter map the epoch cell selects.
//! A new entry records its first time (`bpf_ktime_get_ns`) and the socket's
//! uid (`bpf_get_socket_uid`), so an owner that vanishes still leaves its
//! uid. A full map counts the packet in the overflow cell instead. The
//! program always returns 1 (pass): it only counts.
//!
//! `owner` (cgroup_sock: `sock_create`, `post_bind4`, `post_bind6`): the
//! socket cookie → pid, uid and command of the process creating or binding
//! it.

use qosloop_bpf::{helper, reg, Alu, Asm, AsmError, Cond, Size};

/// Counter key: cookie u64 @0, source address @8 (16 bytes; IPv4 in the
/// first 4), destination @24, source port @40 and destination port @42
/// (network order; ICMP type and code in the destination port), protocol
/// @44, IP version @45.
pub const KEY_SIZE: u32 = 48;
/// Counter value (one CPU's slot): packets u64 @0, bytes u64 @8, first
/// monotonic ns u64 @16, socket uid u32 @24.
pub const VALUE_SIZE: u32 = 32;
/// Owner value: pid u32 @0, uid u32 @4, command [16] @8.
pub const OWNER_SIZE: u32 = 24;
/// Overflow cell: packets u64, bytes u64.
pub const OVERFLOW_SIZE: u32 = 16;

/// `struct __sk_buff` offsets.
const SKB_LEN: i16 = 0;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const SKB_GSO_SEGS: i16 = 164;

/// Cache slot (one CPU's copy of one cache cell): a counter key @0, then a
/// counter value @48 (the [`VALUE_SIZE`] layout, so a slot flushes into the
/// counter map as it is), and a claim word @80 (u64; 1 while a program run
/// owns the slot).
pub const CACHE_SLOT_SIZE: u32 = 88;
/// Cache cells per epoch and direction (a power of two): a socket's
/// packets go to cell `cookie % CACHE_WAYS`.
pub const CACHE_WAYS: u32 = 16;
/// Cache cells in all: epoch × direction × way.
pub const CACHE_CELLS: u32 = 4 * CACHE_WAYS;
const CACHE_VAL: i16 = KEY_SIZE as i16;
const CACHE_CLAIM: i16 = 80;

/// The first cache cell of `epoch` (both directions follow it).
pub fn cache_cells_of(epoch: u32) -> std::ops::Range<u32> {
    let first = (epoch & 1) * 2 * CACHE_WAYS;
    first..first + 2 * CACHE_WAYS
}

/// Map descriptors a program refers to.
#[derive(Debug, Clone, Copy)]
pub struct CountMaps {
    pub epoch: i32,
    pub counters: [i32; 2],
    pub overflow: i32,
    /// The per-CPU array of recent keys ([`CACHE_CELLS`] cells of
    /// [`CACHE_SLOT_SIZE`]).
    pub cache: i32,
}

/// How the counting program keys a packet into the counter map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountPath {
    /// Each socket's latest key and counts are kept in a per-CPU cache
    /// cell; only a packet with another key (or a cell in use by the run
    /// this one interrupted) goes through the hash map, flushing the cell.
    /// The epoch is read through a direct pointer into its map (no
    /// lookup), and a cache hit runs straight through to `exit` with the
    /// cell in a register; the misses are laid out after it.
    Cached,
    /// The same cache, as first written: the epoch by map lookup, the
    /// cell's pointer kept on the stack, the hit path jumping over the miss
    /// code (kept to measure against: feature `bench-programs`).
    #[cfg(any(test, feature = "bench-programs"))]
    CachedV1,
    /// Every packet looks its key up in the hash map (the first program;
    /// kept to measure against: feature `bench-programs`).
    #[cfg(any(test, feature = "bench-programs"))]
    Direct,
}

/// Which direction a counting program is attached to (its cache cells).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

const BPF_NOEXIST: i32 = 1;

/// Emits `r1 = counters[r7 & 1]`.
fn counter_map(a: &mut Asm, m: &CountMaps, n: &mut u32) {
    use reg::*;
    *n += 1;
    let (one, done) = (format!("cm1_{n}"), format!("cmd_{n}"));
    a.jump_imm(Cond::Ne, R7, 0, &one)
        .load_map_fd(R1, m.counters[0])
        .goto(&done)
        .label(&one)
        .load_map_fd(R1, m.counters[1])
        .label(&done);
}

/// The cgroup_skb counting program for one direction.
pub fn count_program(m: CountMaps, dir: Direction, path: CountPath) -> Result<Vec<u8>, AsmError> {
    use reg::*;
    const KEY: i16 = -48;
    const VAL: i16 = -80;
    const ZERO: i16 = -84;
    const IDX: i16 = -88;
    const SLOT: i16 = -96;
    let mut n = 0u32;
    let mut a = Asm::new();
    a.mov(R6, R1);
    for off in (KEY..0).step_by(8) {
        a.store_imm(Size::DW, FP, off, 0);
    }
    a.store_imm(Size::W, FP, ZERO, 0);
    // Which counter map: epoch 0 or 1 (user space flips it to drain).
    if path == CountPath::Cached {
        a.load_map_value(R1, m.epoch, 0);
    } else {
        a.load_map_fd(R1, m.epoch)
            .mov(R2, FP)
            .alu_imm(Alu::Add, R2, i32::from(ZERO))
            .call(helper::MAP_LOOKUP_ELEM)
            .jump_imm(Cond::Eq, R0, 0, "pass")
            .mov(R1, R0);
    }
    a.load(Size::W, R7, R1, 0).alu_imm(Alu::And, R7, 1);
    a.mov(R1, R6)
        .call(helper::GET_SOCKET_COOKIE)
        .store(Size::DW, FP, KEY, R0);
    // The header, by direct packet access.
    a.load(Size::W, R2, R6, SKB_DATA)
        .load(Size::W, R3, R6, SKB_DATA_END)
        .mov(R4, R2)
        .alu_imm(Alu::Add, R4, 1)
        .jump(Cond::Gt, R4, R3, "count")
        .load(Size::B, R4, R2, 0)
        .alu_imm(Alu::Rsh, R4, 4)
        .jump_imm(Cond::Eq, R4, 6, "v6")
        .jump_imm(Cond::Ne, R4, 4, "count");
    // IPv4.
    a.mov(R4, R2)
        .alu_imm(Alu::Add, R4, 20)
        .jump(Cond::Gt, R4, R3, "count")
        .load(Size::B, R8, R2, 9)
        .load(Size::W, R4, R2, 12)
        .store(Size::W, FP, KEY + 8, R4)
        .load(Size::W, R4, R2, 16)
        .store(Size::W, FP, KEY + 24, R4)
        .store_imm(Size::B, FP, KEY + 45, 4)
        .load(Size::B, R4, R2, 0)
        .alu_imm(Alu::And, R4, 15)
        .alu_imm(Alu::Lsh, R4, 2)
        .alu(Alu::Add, R2, R4)
        .goto("l4");
    // IPv6 (extension headers are not followed: ports stay 0).
    a.label("v6")
        .mov(R4, R2)
        .alu_imm(Alu::Add, R4, 40)
        .jump(Cond::Gt, R4, R3, "count")
        .load(Size::B, R8, R2, 6);
    for i in 0..8i16 {
        a.load(Size::W, R4, R2, 8 + 4 * i)
            .store(Size::W, FP, KEY + 8 + 4 * i, R4);
    }
    a.store_imm(Size::B, FP, KEY + 45, 6)
        .alu_imm(Alu::Add, R2, 40);
    a.label("l4").store(Size::B, FP, KEY + 44, R8);
    for proto in [6, 17, 132, 136] {
        a.jump_imm(Cond::Eq, R8, proto, "ports");
    }
    a.jump_imm(Cond::Eq, R8, 1, "icmp")
        .jump_imm(Cond::Eq, R8, 58, "icmp")
        .goto("count");
    a.label("ports")
        .mov(R4, R2)
        .alu_imm(Alu::Add, R4, 4)
        .jump(Cond::Gt, R4, R3, "count")
        .load(Size::H, R4, R2, 0)
        .store(Size::H, FP, KEY + 40, R4)
        .load(Size::H, R4, R2, 2)
        .store(Size::H, FP, KEY + 42, R4)
        .goto("count");
    a.label("icmp")
        .mov(R4, R2)
        .alu_imm(Alu::Add, R4, 2)
        .jump(Cond::Gt, R4, R3, "count")
        .load(Size::H, R4, R2, 0)
        .store(Size::H, FP, KEY + 42, R4);
    // Packets (GSO segments, at least 1) in r8, bytes in r9.
    a.label("count")
        .load(Size::W, R8, R6, SKB_GSO_SEGS)
        .jump_imm(Cond::Ne, R8, 0, "segs")
        .mov_imm(R8, 1)
        .label("segs")
        .load(Size::W, R9, R6, SKB_LEN);
    match path {
        CountPath::Cached => {
            cache_hit(&mut a, &m, dir, KEY, IDX, SLOT);
            cache_miss(&mut a, &m, &mut n, KEY, ZERO, SLOT);
        }
        #[cfg(any(test, feature = "bench-programs"))]
        CountPath::CachedV1 => {
            cache_hit_v1(&mut a, &m, dir, KEY, IDX, SLOT);
            cache_miss(&mut a, &m, &mut n, KEY, ZERO, SLOT);
        }
        #[cfg(any(test, feature = "bench-programs"))]
        CountPath::Direct => {}
    }
    // Direct: the hash map, with atomic adds (a run interrupted on its own
    // CPU by another run of this program on the same key loses nothing).
    a.label("direct");
    counter_map(&mut a, &m, &mut n);
    a.mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(KEY))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "new")
        .atomic_add(Size::DW, R0, 0, R8)
        .atomic_add(Size::DW, R0, 8, R9)
        .goto("pass");
    a.label("new")
        .store(Size::DW, FP, VAL, R8)
        .store(Size::DW, FP, VAL + 8, R9)
        .call(helper::KTIME_GET_NS)
        .store(Size::DW, FP, VAL + 16, R0)
        .mov(R1, R6)
        .call(helper::GET_SOCKET_UID)
        .store(Size::W, FP, VAL + 24, R0)
        .store_imm(Size::W, FP, VAL + 28, 0);
    counter_map(&mut a, &m, &mut n);
    a.mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(KEY))
        .mov(R3, FP)
        .alu_imm(Alu::Add, R3, i32::from(VAL))
        .mov_imm(R4, BPF_NOEXIST)
        .call(helper::MAP_UPDATE_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "pass");
    // Created meanwhile by an interrupting run, or the map is full.
    counter_map(&mut a, &m, &mut n);
    a.mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(KEY))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "full")
        .atomic_add(Size::DW, R0, 0, R8)
        .atomic_add(Size::DW, R0, 8, R9)
        .goto("pass");
    // The map is full: the packet is counted as overflow, not lost.
    a.label("full")
        .load_map_fd(R1, m.overflow)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(ZERO))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "pass")
        .atomic_add(Size::DW, R0, 0, R8)
        .atomic_add(Size::DW, R0, 8, R9);
    a.label("pass").mov_imm(R0, 1).exit();
    a.finish()
}

/// Emits the cache cell's index for this packet into the stack word
/// `idx`: `cookie % CACHE_WAYS`, in the epoch's and direction's block.
fn cell_index(a: &mut Asm, dir: Direction, key: i16, idx: i16) {
    use reg::*;
    let shift = (2 * CACHE_WAYS).trailing_zeros() as i32;
    a.load(Size::DW, R1, FP, key)
        .alu_imm(Alu::And, R1, (CACHE_WAYS - 1) as i32)
        .mov(R2, R7)
        .alu_imm(Alu::Lsh, R2, shift)
        .alu(Alu::Add, R1, R2)
        .alu_imm(Alu::Add, R1, (dir as u32 * CACHE_WAYS) as i32)
        .store(Size::W, FP, idx, R1);
}

/// The cache's hit path, straight through: look the cell up (the
/// verifier inlines a per-CPU array lookup), claim it (cmpxchg of the
/// claim word 0 → 1; a run that interrupted another one on this CPU finds
/// it claimed and goes to the hash map), compare the keys, add, release,
/// exit. The cell stays in r5 (no helper call on this path). Every other
/// case leaves to [`cache_miss`] with the cell's pointer on the stack.
fn cache_hit(a: &mut Asm, m: &CountMaps, dir: Direction, key: i16, idx: i16, slot: i16) {
    use reg::*;
    cell_index(a, dir, key, idx);
    a.load_map_fd(R1, m.cache)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(idx))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "direct")
        .mov(R5, R0)
        .mov_imm(R1, 1)
        .mov_imm(R0, 0)
        .atomic_cmpxchg(Size::DW, R5, CACHE_CLAIM, R1)
        .jump_imm(Cond::Ne, R0, 0, "direct")
        .load(Size::DW, R1, R5, CACHE_VAL)
        .jump_imm(Cond::Eq, R1, 0, "to_fill");
    for i in 0..6i16 {
        a.load(Size::DW, R2, R5, 8 * i)
            .load(Size::DW, R3, FP, key + 8 * i)
            .jump(Cond::Ne, R2, R3, "to_evict");
    }
    a.alu(Alu::Add, R1, R8)
        .store(Size::DW, R5, CACHE_VAL, R1)
        .load(Size::DW, R1, R5, CACHE_VAL + 8)
        .alu(Alu::Add, R1, R9)
        .store(Size::DW, R5, CACHE_VAL + 8, R1)
        .store_imm(Size::DW, R5, CACHE_CLAIM, 0)
        .mov_imm(R0, 1)
        .exit();
    a.label("to_fill")
        .store(Size::DW, FP, slot, R5)
        .goto("fill")
        .label("to_evict")
        .store(Size::DW, FP, slot, R5)
        .goto("evict");
}

/// The first cache program's hit path (kept to measure against): the
/// cell's pointer on the stack, reloaded for each use.
#[cfg(any(test, feature = "bench-programs"))]
fn cache_hit_v1(a: &mut Asm, m: &CountMaps, dir: Direction, key: i16, idx: i16, slot: i16) {
    use reg::*;
    cell_index(a, dir, key, idx);
    a.load_map_fd(R1, m.cache)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(idx))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "direct")
        .store(Size::DW, FP, slot, R0)
        .mov(R2, R0)
        .mov_imm(R1, 1)
        .mov_imm(R0, 0)
        .atomic_cmpxchg(Size::DW, R2, CACHE_CLAIM, R1)
        .jump_imm(Cond::Ne, R0, 0, "direct")
        .load(Size::DW, R0, FP, slot)
        .load(Size::DW, R1, R0, CACHE_VAL)
        .jump_imm(Cond::Eq, R1, 0, "fill");
    for i in 0..6i16 {
        a.load(Size::DW, R1, R0, 8 * i)
            .load(Size::DW, R2, FP, key + 8 * i)
            .jump(Cond::Ne, R1, R2, "evict");
    }
    a.load(Size::DW, R1, R0, CACHE_VAL)
        .alu(Alu::Add, R1, R8)
        .store(Size::DW, R0, CACHE_VAL, R1)
        .load(Size::DW, R1, R0, CACHE_VAL + 8)
        .alu(Alu::Add, R1, R9)
        .store(Size::DW, R0, CACHE_VAL + 8, R1)
        .goto("release");
}

/// The cache's misses, the cell claimed and its pointer on the stack:
/// "evict" flushes the cell's key and counts into the hash map (or the
/// overflow cell when the map is full), "fill" refills it with this
/// packet's key, counts, first time and uid; "release" frees the claim.
fn cache_miss(a: &mut Asm, m: &CountMaps, n: &mut u32, key: i16, zero: i16, slot: i16) {
    use reg::*;
    // Flush the cell's key and counts into the hash map.
    let add_cell = |a: &mut Asm| {
        a.load(Size::DW, R2, FP, slot)
            .load(Size::DW, R1, R2, CACHE_VAL)
            .atomic_add(Size::DW, R0, 0, R1)
            .load(Size::DW, R1, R2, CACHE_VAL + 8)
            .atomic_add(Size::DW, R0, 8, R1);
    };
    a.label("evict");
    counter_map(a, m, n);
    a.load(Size::DW, R2, FP, slot)
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "evict_new");
    add_cell(a);
    a.goto("fill").label("evict_new");
    counter_map(a, m, n);
    a.load(Size::DW, R2, FP, slot)
        .mov(R3, R2)
        .alu_imm(Alu::Add, R3, i32::from(CACHE_VAL))
        .mov_imm(R4, BPF_NOEXIST)
        .call(helper::MAP_UPDATE_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "fill");
    counter_map(a, m, n);
    a.load(Size::DW, R2, FP, slot)
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "evict_full");
    add_cell(a);
    a.goto("fill")
        .label("evict_full")
        .load_map_fd(R1, m.overflow)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(zero))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, "fill");
    add_cell(a);
    // Refill with this packet's key and counts, its first time and uid.
    a.label("fill").load(Size::DW, R0, FP, slot);
    for i in 0..6i16 {
        a.load(Size::DW, R1, FP, key + 8 * i)
            .store(Size::DW, R0, 8 * i, R1);
    }
    a.store(Size::DW, R0, CACHE_VAL, R8)
        .store(Size::DW, R0, CACHE_VAL + 8, R9)
        .call(helper::KTIME_GET_NS)
        .load(Size::DW, R1, FP, slot)
        .store(Size::DW, R1, CACHE_VAL + 16, R0)
        .mov(R1, R6)
        .call(helper::GET_SOCKET_UID)
        .load(Size::DW, R1, FP, slot)
        .store(Size::W, R1, CACHE_VAL + 24, R0)
        .store_imm(Size::W, R1, CACHE_VAL + 28, 0);
    a.label("release")
        .load(Size::DW, R1, FP, slot)
        .store_imm(Size::DW, R1, CACHE_CLAIM, 0)
        .goto("pass");
}

/// The cgroup_sock owner program.
pub fn owner_program(owners: i32) -> Result<Vec<u8>, AsmError> {
    use reg::*;
    let mut a = Asm::new();
    a.mov(R6, R1)
        .call(helper::GET_CURRENT_PID_TGID)
        .alu_imm(Alu::Rsh, R0, 32)
        .store(Size::W, FP, -24, R0)
        .call(helper::GET_CURRENT_UID_GID)
        .store(Size::W, FP, -20, R0)
        .mov(R1, FP)
        .alu_imm(Alu::Add, R1, -16)
        .mov_imm(R2, 16)
        .call(helper::GET_CURRENT_COMM)
        .mov(R1, R6)
        .call(helper::GET_SOCKET_COOKIE)
        .store(Size::DW, FP, -32, R0)
        .load_map_fd(R1, owners)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, -32)
        .mov(R3, FP)
        .alu_imm(Alu::Add, R3, -24)
        .mov_imm(R4, 0)
        .call(helper::MAP_UPDATE_ELEM)
        .mov_imm(R0, 1)
        .exit();
    a.finish()
}

/// One counter key, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub cookie: u64,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr(version: u8, b: &[u8]) -> std::net::IpAddr {
    if version == 6 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[..16]);
        std::net::IpAddr::from(a)
    } else {
        std::net::IpAddr::from([b[0], b[1], b[2], b[3]])
    }
}

impl CounterKey {
    /// Decodes a key of [`KEY_SIZE`] bytes (a shorter one is `None`).
    pub fn decode(b: &[u8]) -> Option<CounterKey> {
        if b.len() < KEY_SIZE as usize {
            return None;
        }
        let version = b[45];
        Some(CounterKey {
            cookie: u64_at(b, 0),
            src: addr(version, &b[8..24]),
            dst: addr(version, &b[24..40]),
            src_port: u16::from_be_bytes([b[40], b[41]]),
            dst_port: u16::from_be_bytes([b[42], b[43]]),
            proto: b[44],
        })
    }
}

/// A counter value summed over the CPUs' slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    /// Earliest first-packet time of the slots (monotonic ns; 0 unknown).
    pub first_mono_ns: u64,
    pub uid: Option<u32>,
}

impl Counts {
    /// Adds `other` (the same key counted elsewhere: another map, the
    /// cache): sums, the earliest first time, the first uid known.
    pub fn merge(&mut self, other: Counts) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        if other.first_mono_ns != 0
            && (self.first_mono_ns == 0 || other.first_mono_ns < self.first_mono_ns)
        {
            self.first_mono_ns = other.first_mono_ns;
        }
        if self.uid.is_none() {
            self.uid = other.uid;
        }
    }

    /// Sums a per-CPU value (`slot` bytes per CPU).
    pub fn sum(value: &[u8], slot: usize) -> Counts {
        let mut c = Counts::default();
        if slot < VALUE_SIZE as usize {
            return c;
        }
        for s in value.chunks_exact(slot) {
            let packets = u64_at(s, 0);
            if packets == 0 {
                continue;
            }
            c.packets += packets;
            c.bytes += u64_at(s, 8);
            // Only the slot of the CPU that created the entry holds the
            // first time and the uid; the others start zeroed.
            let first = u64_at(s, 16);
            if first != 0 {
                if c.first_mono_ns == 0 || first < c.first_mono_ns {
                    c.first_mono_ns = first;
                }
                c.uid.get_or_insert(u32_at(s, 24));
            }
        }
        c
    }
}

/// One owner entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerEntry {
    pub cookie: u64,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
}

impl OwnerEntry {
    pub fn decode(key: &[u8], value: &[u8]) -> Option<OwnerEntry> {
        if key.len() < 8 || value.len() < OWNER_SIZE as usize {
            return None;
        }
        let comm = &value[8..24];
        let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
        Some(OwnerEntry {
            cookie: u64_at(key, 0),
            pid: u32_at(value, 0),
            uid: u32_at(value, 4),
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn programs_assemble() {
        let maps = CountMaps {
            epoch: 3,
            counters: [4, 5],
            overflow: 6,
            cache: 7,
        };
        for path in [CountPath::Cached, CountPath::CachedV1, CountPath::Direct] {
            let c = count_program(maps, Direction::Egress, path).unwrap();
            assert_eq!(c.len() % 8, 0);
        }
        assert!(owner_program(3).unwrap().len() > 8);
    }

    #[test]
    fn keys_decode_both_families_and_icmp_type_code() {
        let mut k = [0u8; 48];
        k[0..8].copy_from_slice(&77u64.to_ne_bytes());
        k[8..12].copy_from_slice(&[10, 0, 0, 1]);
        k[24..28].copy_from_slice(&[10, 0, 0, 2]);
        k[40..42].copy_from_slice(&5000u16.to_be_bytes());
        k[42] = 8; // echo request, code 0
        k[44] = 1;
        k[45] = 4;
        let d = CounterKey::decode(&k).unwrap();
        assert_eq!(d.cookie, 77);
        assert_eq!(d.src.to_string(), "10.0.0.1");
        assert_eq!(d.dst_port, 8 * 256);
        k[45] = 6;
        k[8..24].copy_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(CounterKey::decode(&k).unwrap().src.to_string(), "::1");
        assert!(CounterKey::decode(&k[..40]).is_none());
    }

    #[test]
    fn per_cpu_slots_sum_and_keep_the_earliest_start() {
        let mut v = vec![0u8; 64];
        v[0..8].copy_from_slice(&2u64.to_ne_bytes());
        v[8..16].copy_from_slice(&200u64.to_ne_bytes());
        v[16..24].copy_from_slice(&50u64.to_ne_bytes());
        v[24..28].copy_from_slice(&1001u32.to_ne_bytes());
        v[32..40].copy_from_slice(&1u64.to_ne_bytes());
        v[40..48].copy_from_slice(&100u64.to_ne_bytes());
        v[48..56].copy_from_slice(&40u64.to_ne_bytes());
        let c = Counts::sum(&v, 32);
        assert_eq!(
            (c.packets, c.bytes, c.first_mono_ns, c.uid),
            (3, 300, 40, Some(1001))
        );
    }
}
