//! Prefix-preserving address anonymisation (Crypto-PAn; Xu, Fan, Ammar,
//! Moon, ICNP 2002), keyed with 32 bytes: the first 16 are an AES-128 key,
//! the second 16 encrypted under it give the pad. Bit `i` of the output is
//! bit `i` of the input flipped by the first bit of
//! `AES(input's first i bits ‖ pad's remaining bits)`, so two addresses
//! sharing a prefix of `n` bits map to two sharing exactly `n` bits.
//!
//! AES-128 (FIPS-197, encryption only) is written here rather than taken
//! as a dependency: one block per address bit is all it has to do, and its
//! S-box is computed from the field inverse so that no table is typed in.
//! It is not constant-time; the key stays on the node holding it (the
//! measurement point reads it from a file or makes one up at start and
//! never sends it), and only outputs leave.

use std::net::Ipv4Addr;

/// AES-128, encryption of single blocks.
#[derive(Clone)]
struct Aes128 {
    round_keys: [[u8; 16]; 11],
    sbox: [u8; 256],
}

impl std::fmt::Debug for Aes128 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aes128 { .. }")
    }
}

fn xtime(b: u8) -> u8 {
    (b << 1) ^ if b & 0x80 != 0 { 0x1b } else { 0 }
}

fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        a = xtime(a);
        b >>= 1;
    }
    p
}

/// The S-box: the multiplicative inverse in GF(2^8), then the affine map.
fn sbox() -> [u8; 256] {
    let mut s = [0u8; 256];
    for (x, out) in s.iter_mut().enumerate() {
        let x = x as u8;
        // x^254 = x^-1 (and 0 for 0).
        let mut inv = 1u8;
        for _ in 0..254 {
            inv = gmul(inv, x);
        }
        if x == 0 {
            inv = 0;
        }
        let mut r = inv;
        for shift in 1..5 {
            r ^= inv.rotate_left(shift);
        }
        *out = r ^ 0x63;
    }
    s
}

impl Aes128 {
    fn new(key: &[u8; 16]) -> Aes128 {
        let sbox = sbox();
        let mut w = [[0u8; 4]; 44];
        for (i, word) in w.iter_mut().take(4).enumerate() {
            word.copy_from_slice(&key[4 * i..4 * i + 4]);
        }
        let mut rcon = 1u8;
        for i in 4..44 {
            let mut t = w[i - 1];
            if i % 4 == 0 {
                t = [
                    sbox[usize::from(t[1])],
                    sbox[usize::from(t[2])],
                    sbox[usize::from(t[3])],
                    sbox[usize::from(t[0])],
                ];
                t[0] ^= rcon;
                rcon = xtime(rcon);
            }
            for j in 0..4 {
                w[i][j] = w[i - 4][j] ^ t[j];
            }
        }
        let mut round_keys = [[0u8; 16]; 11];
        for (r, rk) in round_keys.iter_mut().enumerate() {
            for c in 0..4 {
                rk[4 * c..4 * c + 4].copy_from_slice(&w[4 * r + c]);
            }
        }
        Aes128 { round_keys, sbox }
    }

    fn encrypt(&self, block: &[u8; 16]) -> [u8; 16] {
        let mut s = *block;
        let add = |s: &mut [u8; 16], k: &[u8; 16]| s.iter_mut().zip(k).for_each(|(a, b)| *a ^= b);
        add(&mut s, &self.round_keys[0]);
        for round in 1..11 {
            for b in s.iter_mut() {
                *b = self.sbox[usize::from(*b)];
            }
            // ShiftRows: row r of column c moves to column c - r.
            let t = s;
            for c in 0..4 {
                for r in 0..4 {
                    s[4 * c + r] = t[4 * ((c + r) % 4) + r];
                }
            }
            if round != 10 {
                for c in 0..4 {
                    let col = [s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]];
                    for r in 0..4 {
                        s[4 * c + r] = xtime(col[r])
                            ^ (xtime(col[(r + 1) % 4]) ^ col[(r + 1) % 4])
                            ^ col[(r + 2) % 4]
                            ^ col[(r + 3) % 4];
                    }
                }
            }
            add(&mut s, &self.round_keys[round]);
        }
        s
    }
}

/// A Crypto-PAn key, ready to anonymise.
#[derive(Clone, Debug)]
pub struct CryptoPan {
    aes: Aes128,
    pad: [u8; 16],
}

impl CryptoPan {
    /// From the 32-byte key (AES key ‖ pad seed).
    pub fn new(key: &[u8; 32]) -> CryptoPan {
        let mut k = [0u8; 16];
        k.copy_from_slice(&key[..16]);
        let mut seed = [0u8; 16];
        seed.copy_from_slice(&key[16..]);
        let aes = Aes128::new(&k);
        let pad = aes.encrypt(&seed);
        CryptoPan { aes, pad }
    }

    /// A fresh random key from the kernel (never written anywhere).
    pub fn random() -> std::io::Result<CryptoPan> {
        let mut key = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
        Ok(CryptoPan::new(&key))
    }

    /// Anonymises an IPv4 address given as an integer.
    pub fn anonymise_u32(&self, addr: u32) -> u32 {
        let pad_word = u32::from_be_bytes([self.pad[0], self.pad[1], self.pad[2], self.pad[3]]);
        let mut flips = 0u32;
        let mut input = self.pad;
        for pos in 0..32 {
            let word = if pos == 0 {
                pad_word
            } else {
                let keep = u32::MAX << (32 - pos);
                (addr & keep) | (pad_word & !keep)
            };
            input[..4].copy_from_slice(&word.to_be_bytes());
            let out = self.aes.encrypt(&input);
            flips |= u32::from(out[0] >> 7) << (31 - pos);
        }
        addr ^ flips
    }

    pub fn anonymise(&self, addr: Ipv4Addr) -> Ipv4Addr {
        Ipv4Addr::from(self.anonymise_u32(u32::from(addr)))
    }

    /// Anonymises an address of up to 128 bits given as bytes (IPv6: the
    /// same construction over 128 bits, the address in place of the pad's
    /// leading bits).
    pub fn anonymise_bytes(&self, addr: &[u8; 16]) -> [u8; 16] {
        let mut flips = [0u8; 16];
        let mut input = self.pad;
        for pos in 0..128usize {
            // The first `pos` bits from the address, the rest from the pad.
            for (i, byte) in input.iter_mut().enumerate() {
                let keep_bits = pos.saturating_sub(8 * i).min(8);
                let keep = if keep_bits == 0 {
                    0
                } else {
                    0xffu8 << (8 - keep_bits)
                };
                *byte = (addr[i] & keep) | (self.pad[i] & !keep);
            }
            let out = self.aes.encrypt(&input);
            flips[pos / 8] |= (out[0] >> 7) << (7 - pos % 8);
        }
        std::array::from_fn(|i| addr[i] ^ flips[i])
    }

    /// Anonymises either family.
    pub fn anonymise_ip(&self, addr: std::net::IpAddr) -> std::net::IpAddr {
        match addr {
            std::net::IpAddr::V4(a) => self.anonymise(a).into(),
            std::net::IpAddr::V6(a) => {
                std::net::Ipv6Addr::from(self.anonymise_bytes(&a.octets())).into()
            }
        }
    }

    /// [`CryptoPan::anonymise_bytes`] of an IPv6 address as an integer.
    pub fn anonymise_u128(&self, addr: u128) -> u128 {
        u128::from_be_bytes(self.anonymise_bytes(&addr.to_be_bytes()))
    }

    /// Rewrites the IPv4 or IPv6 source and destination addresses of an
    /// Ethernet frame in place (after an 802.1Q tag, if any). Checksums
    /// (IPv4 header, TCP/UDP pseudo-header) are left as they were: a
    /// consumer of anonymised headers must not trust them.
    pub fn anonymise_frame(&self, frame: &mut [u8]) {
        map_frame_addresses(frame, |a| self.anonymise_u32(a));
        map_frame_addresses6(frame, |a| self.anonymise_u128(a));
    }
}

/// A key with the images of the addresses it met lately, for a stream of
/// frames (a flow's addresses recur in every frame; each fresh address
/// costs 32 AES blocks). Holds at most its capacity of addresses and
/// starts over when full.
#[derive(Debug)]
pub struct CachedPan {
    key: std::sync::Arc<CryptoPan>,
    seen: std::collections::HashMap<u32, u32>,
    seen6: std::collections::HashMap<u128, u128>,
    capacity: usize,
}

impl CachedPan {
    /// Addresses a cache holds unless told otherwise.
    pub const CAPACITY: usize = 65_536;

    pub fn new(key: std::sync::Arc<CryptoPan>) -> CachedPan {
        CachedPan::with_capacity(key, Self::CAPACITY)
    }

    pub fn with_capacity(key: std::sync::Arc<CryptoPan>, capacity: usize) -> CachedPan {
        CachedPan {
            key,
            seen: std::collections::HashMap::new(),
            seen6: std::collections::HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// [`CryptoPan::anonymise_u32`], through the cache.
    pub fn anonymise_u32(&mut self, a: u32) -> u32 {
        if let Some(&x) = self.seen.get(&a) {
            return x;
        }
        if self.seen.len() >= self.capacity {
            self.seen.clear();
        }
        let x = self.key.anonymise_u32(a);
        self.seen.insert(a, x);
        x
    }

    /// [`CryptoPan::anonymise_u128`], through the cache (IPv6 addresses
    /// cost 128 AES blocks each; the cache holds its capacity of them too).
    pub fn anonymise_u128(&mut self, a: u128) -> u128 {
        if let Some(&x) = self.seen6.get(&a) {
            return x;
        }
        if self.seen6.len() >= self.capacity {
            self.seen6.clear();
        }
        let x = self.key.anonymise_u128(a);
        self.seen6.insert(a, x);
        x
    }

    /// Either family, through the cache.
    pub fn anonymise_ip(&mut self, a: std::net::IpAddr) -> std::net::IpAddr {
        match a {
            std::net::IpAddr::V4(v4) => {
                std::net::Ipv4Addr::from(self.anonymise_u32(v4.into())).into()
            }
            std::net::IpAddr::V6(v6) => {
                std::net::Ipv6Addr::from(self.anonymise_u128(v6.into())).into()
            }
        }
    }

    /// [`CryptoPan::anonymise_frame`], through the cache.
    pub fn anonymise_frame(&mut self, frame: &mut [u8]) {
        map_frame_addresses(frame, |a| self.anonymise_u32(a));
        map_frame_addresses6(frame, |a| self.anonymise_u128(a));
    }
}

/// Replaces the IPv4 source and destination addresses of an Ethernet frame
/// (after an 802.1Q tag, if any) by `map` of each; other frames are left.
pub fn map_frame_addresses(frame: &mut [u8], mut map: impl FnMut(u32) -> u32) {
    let mut off = 12;
    if frame.len() >= 18 && frame[12..14] == [0x81, 0x00] {
        off = 16;
    }
    if frame.len() < off + 2 + 20 || frame[off..off + 2] != [0x08, 0x00] {
        return;
    }
    let ip = off + 2;
    if frame[ip] >> 4 != 4 {
        return;
    }
    for at in [ip + 12, ip + 16] {
        let a = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
        frame[at..at + 4].copy_from_slice(&map(a).to_be_bytes());
    }
}

/// Replaces the IPv6 source and destination addresses of an Ethernet
/// frame (after an 802.1Q tag, if any) by `map` of each; other frames are
/// left. Addresses inside extension headers (a routing header's, a home
/// address option) are not rewritten.
pub fn map_frame_addresses6(frame: &mut [u8], mut map: impl FnMut(u128) -> u128) {
    let mut off = 12;
    if frame.len() >= 18 && frame[12..14] == [0x81, 0x00] {
        off = 16;
    }
    if frame.len() < off + 2 + 40 || frame[off..off + 2] != [0x86, 0xdd] {
        return;
    }
    let ip = off + 2;
    if frame[ip] >> 4 != 6 {
        return;
    }
    for at in [ip + 8, ip + 24] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&frame[at..at + 16]);
        frame[at..at + 16].copy_from_slice(&map(u128::from_be_bytes(a)).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of the sample trace in the Crypto-PAn reference
    /// distribution, and pairs from its raw and sanitised traces.
    const REFERENCE_KEY: [u8; 32] = [
        21, 34, 23, 141, 51, 164, 207, 128, 19, 10, 91, 22, 73, 144, 125, 16, 216, 152, 143, 131,
        121, 121, 101, 39, 98, 87, 76, 45, 42, 132, 34, 2,
    ];
    const REFERENCE: &[(&str, &str)] = &[
        ("128.11.68.132", "135.242.180.132"),
        ("129.118.74.4", "134.136.186.123"),
        ("130.132.252.244", "133.68.164.234"),
        ("141.223.7.43", "141.167.8.160"),
        ("141.233.145.108", "141.129.237.235"),
        ("152.163.225.39", "151.140.114.167"),
        ("156.29.3.236", "147.225.12.42"),
        ("165.247.96.84", "162.9.99.234"),
        ("166.107.77.190", "160.132.178.185"),
        ("192.102.249.13", "252.138.62.131"),
        ("192.215.32.125", "252.43.47.189"),
        ("192.233.80.103", "252.25.108.8"),
        ("192.41.57.43", "252.222.221.184"),
        ("193.150.244.223", "253.169.52.216"),
        ("195.205.63.100", "255.186.223.5"),
    ];

    #[test]
    fn aes_fips_197_appendix_c1() {
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let pt: [u8; 16] = std::array::from_fn(|i| (i as u8) * 0x11);
        let ct = Aes128::new(&key).encrypt(&pt);
        let want = [
            0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
            0xc5, 0x5a,
        ];
        assert_eq!(ct, want);
    }

    #[test]
    fn reference_vectors() {
        let c = CryptoPan::new(&REFERENCE_KEY);
        for (raw, sanitised) in REFERENCE {
            let raw: Ipv4Addr = raw.parse().unwrap();
            assert_eq!(c.anonymise(raw).to_string(), *sanitised, "{raw}");
        }
    }

    #[test]
    fn frame_addresses_are_rewritten() {
        let c = CryptoPan::new(&REFERENCE_KEY);
        let mut frame = vec![0u8; 14 + 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[26..30].copy_from_slice(&[128, 11, 68, 132]);
        frame[30..34].copy_from_slice(&[129, 118, 74, 4]);
        c.anonymise_frame(&mut frame);
        assert_eq!(frame[26..30], [135, 242, 180, 132]);
        assert_eq!(frame[30..34], [134, 136, 186, 123]);
    }

    #[test]
    fn the_cache_gives_what_the_key_gives() {
        let c = std::sync::Arc::new(CryptoPan::new(&REFERENCE_KEY));
        let mut cached = CachedPan::with_capacity(c.clone(), 16);
        let mut frame = vec![0u8; 14 + 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        // Addresses that recur, and more of them than the cache holds (it
        // starts over several times).
        for i in 0..200u32 {
            let (a, b) = (i % 7 * 7919, i % 23);
            frame[26..30].copy_from_slice(&a.to_be_bytes());
            frame[30..34].copy_from_slice(&b.to_be_bytes());
            let mut want = frame.clone();
            c.anonymise_frame(&mut want);
            cached.anonymise_frame(&mut frame);
            assert_eq!(frame, want, "{i}");
        }
    }

    #[test]
    fn the_128_bit_form_agrees_with_ipv4_on_its_leading_bits() {
        // An IPv4 address is the 32-bit form: the same flips as the first
        // 32 bits of the 128-bit construction.
        let c = CryptoPan::new(&REFERENCE_KEY);
        let mut wide = [0u8; 16];
        wide[..4].copy_from_slice(&[128, 11, 68, 132]);
        assert_eq!(c.anonymise_bytes(&wide)[..4], [135, 242, 180, 132]);
    }

    fn shared_prefix(a: u32, b: u32) -> u32 {
        (a ^ b).leading_zeros()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        #[test]
        fn prefix_preserved_stable_and_keyed(k1 in proptest::array::uniform32(0u8..), k2 in proptest::array::uniform32(0u8..), a: u32, b: u32) {
            let c1 = CryptoPan::new(&k1);
            let (x, y) = (c1.anonymise_u32(a), c1.anonymise_u32(b));
            proptest::prop_assert_eq!(shared_prefix(x, y), shared_prefix(a, b));
            // Stable: the same key gives the same mapping, also rebuilt.
            proptest::prop_assert_eq!(CryptoPan::new(&k1).anonymise_u32(a), x);
            if k1 != k2 {
                // Another key: a different mapping (over a few addresses;
                // one address may coincide by chance, 2^-32 each).
                let c2 = CryptoPan::new(&k2);
                let differs = [a, b, a ^ 1, !a].iter().any(|&v| c1.anonymise_u32(v) != c2.anonymise_u32(v));
                proptest::prop_assert!(differs);
            }
        }

        /// IPv6 over 128 bits: `b` shares exactly `n` leading bits with
        /// `a` (random pairs almost never share long prefixes); the images
        /// share exactly `n`, the same key rebuilt gives the same images,
        /// another key other ones.
        #[test]
        fn ipv6_prefix_preserved_stable_and_keyed(
            k1 in proptest::array::uniform32(0u8..),
            k2 in proptest::array::uniform32(0u8..),
            a: u128,
            tail: u128,
            n in 0u32..=128,
        ) {
            let b = if n == 128 {
                a
            } else {
                // Same first n bits, bit n flipped, the rest from `tail`.
                let keep = if n == 0 { 0 } else { u128::MAX << (128 - n) };
                let flip = 1u128 << (127 - n);
                (a & keep) | ((a ^ flip) & flip) | (tail & !(keep | flip))
            };
            proptest::prop_assert_eq!((a ^ b).leading_zeros(), n);
            let c1 = CryptoPan::new(&k1);
            let (x, y) = (c1.anonymise_u128(a), c1.anonymise_u128(b));
            proptest::prop_assert_eq!((x ^ y).leading_zeros(), n);
            proptest::prop_assert_eq!(CryptoPan::new(&k1).anonymise_u128(b), y);
            let mut cached = CachedPan::with_capacity(std::sync::Arc::new(c1.clone()), 1);
            proptest::prop_assert_eq!(cached.anonymise_u128(a), x);
            proptest::prop_assert_eq!(cached.anonymise_u128(b), y);
            if k1 != k2 {
                let c2 = CryptoPan::new(&k2);
                let differs = [a, b, !a].iter().any(|&v| c1.anonymise_u128(v) != c2.anonymise_u128(v));
                proptest::prop_assert!(differs);
            }
        }
    }

    /// IPv6 frames (plain and tagged) have both addresses replaced by
    /// their 128-bit images; the rest of the frame is untouched.
    #[test]
    fn ipv6_frame_addresses_are_rewritten() {
        let c = std::sync::Arc::new(CryptoPan::new(&REFERENCE_KEY));
        let src: u128 = "2001:db8:88:0:1::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .into();
        let dst: u128 = "2001:db8:88::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .into();
        for tagged in [false, true] {
            let ip = if tagged { 18 } else { 14 };
            let mut frame = vec![0u8; ip + 40 + 8];
            if tagged {
                frame[12..14].copy_from_slice(&[0x81, 0x00]);
                frame[14..16].copy_from_slice(&[0x00, 0x64]);
            }
            frame[ip - 2..ip].copy_from_slice(&[0x86, 0xdd]);
            frame[ip] = 0x60;
            frame[ip + 6] = 17;
            frame[ip + 8..ip + 24].copy_from_slice(&src.to_be_bytes());
            frame[ip + 24..ip + 40].copy_from_slice(&dst.to_be_bytes());
            frame[ip + 40..].copy_from_slice(&[0x13, 0x89, 0x13, 0x8a, 0, 16, 0xab, 0xcd]);
            let before = frame.clone();
            c.anonymise_frame(&mut frame);
            assert_eq!(frame[ip + 8..ip + 24], c.anonymise_u128(src).to_be_bytes());
            assert_eq!(frame[ip + 24..ip + 40], c.anonymise_u128(dst).to_be_bytes());
            assert_ne!(frame[ip + 8..ip + 24], before[ip + 8..ip + 24]);
            assert_eq!(frame[..ip + 8], before[..ip + 8]);
            assert_eq!(frame[ip + 40..], before[ip + 40..]);
            let mut cached_frame = before.clone();
            CachedPan::new(c.clone()).anonymise_frame(&mut cached_frame);
            assert_eq!(cached_frame, frame);
        }
        // A frame cut inside the IPv6 header is left alone.
        let mut short = vec![0u8; 14 + 30];
        short[12..14].copy_from_slice(&[0x86, 0xdd]);
        short[14] = 0x60;
        let before = short.clone();
        c.anonymise_frame(&mut short);
        assert_eq!(short, before);
    }
}
