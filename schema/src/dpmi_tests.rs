//! Tests of `dpmi.rs`: parsing, matching (IPv4, IPv6 with extension
//! headers), overlap/contains/cover against brute force.

use super::*;
use serde_json::json;

fn f(v: serde_json::Value) -> Filter {
    Filter::from_json(&v).unwrap()
}

#[test]
fn the_seed_example_widens_to_the_network() {
    let r1 = f(json!({"ip_proto": "6", "ip_src": "10.1.0.5"}));
    let r2 = f(json!({"ip_src": "10.1.0.0/24"}));
    assert!(r1.overlaps(&r2));
    assert!(r2.contains(&r1));
    assert!(!r1.contains(&r2));
    assert_eq!(r1.cover(&r2), r2);
    let other = f(json!({"ip_src": "10.2.0.0/16"}));
    assert!(!other.overlaps(&r2));
    assert_eq!(
        r2.cover(&other).to_json(),
        json!({"ip_src": "10.0.0.0/255.252.0.0"})
    );
}

#[test]
fn bad_fields_are_named() {
    let e = |v| Filter::from_json(&v).unwrap_err().field;
    assert_eq!(e(json!({"ip_src": "10.1.0.1/24"})), "filter.ip_src");
    assert_eq!(e(json!({"ip_srcx": "10.1.0.1"})), "filter.ip_srcx");
    assert_eq!(e(json!({"dst_port": "70000"})), "filter.dst_port");
    assert_eq!(e(json!({"eth_src": "02:00:00:00:00"})), "filter.eth_src");
    assert_eq!(e(json!({"ip_dst": "10.0.0.0/33"})), "filter.ip_dst");
    assert_eq!(e(json!({"ip_proto": 6})), "filter.ip_proto");
    assert_eq!(e(json!([1])), "filter");
}

#[test]
fn json_round_trip() {
    let a = f(
        json!({"interface": "eth0", "vlan_tci": "0x0064/0x0fff", "ether_type": "0x0800",
        "eth_dst": "02:00:00:00:00:00/ff:00:00:00:00:00", "ip_dst": "192.0.2.0/24", "dst_port": "443"}),
    );
    assert_eq!(f(a.to_json()), a);
}

#[test]
fn matches_a_udp_frame() {
    let mut frame = vec![0u8; 14 + 20 + 8];
    frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame[14] = 0x45;
    frame[23] = 17;
    frame[26..30].copy_from_slice(&[10, 1, 0, 5]);
    frame[30..34].copy_from_slice(&[10, 2, 0, 1]);
    frame[34..36].copy_from_slice(&5000u16.to_be_bytes());
    frame[36..38].copy_from_slice(&53u16.to_be_bytes());
    let ff = FrameFields::parse(&frame, None).unwrap();
    assert!(
        f(json!({"ip_proto": "17", "ip_src": "10.1.0.0/16", "dst_port": "53"})).matches("x", &ff)
    );
    assert!(!f(json!({"ip_proto": "6"})).matches("x", &ff));
    assert!(!f(json!({"interface": "y"})).matches("x", &ff));
    assert!(!f(json!({"vlan_tci": "1"})).matches("x", &ff));
    assert!(f(json!({"eth_src": "02:00:00:00:00:01"})).matches("x", &ff));
}

fn v6_frame(src: &str, dst: &str, nh: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
    let mut fr = vec![0u8; 14];
    fr[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[6] = nh;
    ip[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
    ip[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
    fr.extend(ip);
    fr.extend(ext);
    fr.extend(l4);
    fr
}

#[test]
fn ipv6_prefixes_parse_match_and_widen() {
    let a = f(json!({"ip_src": "2001:db8:1::/48", "ip_proto": "17"}));
    assert_eq!(a.family(), Some(Family::V6));
    assert_eq!(f(a.to_json()), a);
    assert_eq!(
        f(json!({"ip_dst": "2001:db8::/ffff:ffff::"})).to_json(),
        json!({"ip_dst": "2001:db8::/ffff:ffff::"})
    );
    // The cover of two v6 prefixes is their common prefix.
    let x = f(json!({"ip_src": "2001:db8:1::/48"}));
    let y = f(json!({"ip_src": "2001:db8:3::/48"}));
    assert_eq!(x.cover(&y), f(json!({"ip_src": "2001:db8::/46"})));
    assert!(x.cover(&y).contains(&x) && x.cover(&y).contains(&y));
    let far = f(json!({"ip_src": "8000::/1"}));
    assert!(x.cover(&far).fields.is_empty());
    // v4 and v6 filters share no frame.
    let v4 = f(json!({"ip_src": "10.0.0.0/8"}));
    assert!(!v4.overlaps(&x) && !x.overlaps(&v4) && v4.intersect(&x).is_none());
    assert!(!f(json!({"ether_type": "0x0800"})).overlaps(&x));
    // ip_proto and ports alone match both families.
    let udp53 = f(json!({"ip_proto": "17", "dst_port": "53"}));
    assert!(udp53.overlaps(&x) && udp53.overlaps(&v4));

    let udp = [0x13, 0x88, 0, 53, 0, 8, 0, 0];
    let plain = v6_frame("2001:db8:1::5", "2001:db8:9::1", 17, &[], &udp);
    let ff = FrameFields::parse(&plain, None).unwrap();
    assert_eq!(ff.ports, Some((5000, 53)));
    assert!(a.matches("x", &ff) && udp53.matches("x", &ff));
    assert!(!y.matches("x", &ff) && !v4.matches("x", &ff));
    assert!(f(json!({"ip_dst": "2001:db8:9::1"})).matches("x", &ff));
    // Behind a hop-by-hop and a destination options header, and in a
    // first fragment: the upper layer is still found.
    let ext = [
        60, 0, 0, 0, 0, 0, 0, 0, 44, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 1, 0, 0, 0, 7,
    ];
    let ff = FrameFields::parse(&v6_frame("2001:db8:1::5", "::1", 0, &ext, &udp), None).unwrap();
    assert_eq!((ff.ip6_proto, ff.ports), (Some(17), Some((5000, 53))));
    assert!(a.matches("x", &ff) && udp53.matches("x", &ff));
    // A later fragment has a protocol, no ports.
    let mut later = ext;
    later[18..20].copy_from_slice(&[0x05, 0x00]);
    let ff = FrameFields::parse(&v6_frame("2001:db8:1::5", "::1", 0, &later, &udp), None).unwrap();
    assert_eq!((ff.ip6_proto, ff.ports), (Some(17), None));
    assert!(a.matches("x", &ff) && !udp53.matches("x", &ff));
    // A chain cut short by the capture: no protocol, no ports.
    let ff =
        FrameFields::parse(&v6_frame("2001:db8:1::5", "::1", 0, &ext[..12], &[]), None).unwrap();
    assert_eq!((ff.ip6_proto, ff.ports), (None, None));
    assert!(!a.matches("x", &ff) && x.matches("x", &ff));
}

#[test]
fn bad_ipv6_fields_are_named() {
    let e = |v| Filter::from_json(&v).unwrap_err();
    assert_eq!(
        e(json!({"ip_src": "2001:db8::/129"})).field,
        "filter.ip_src"
    );
    assert_eq!(
        e(json!({"ip_dst": "2001:db8::1/64"})).field,
        "filter.ip_dst"
    );
    assert_eq!(e(json!({"ip_src": "2001:db8:::1"})).field, "filter.ip_src");
    let mixed = e(json!({"ip_src": "10.0.0.1", "ip_dst": "2001:db8::1"}));
    assert_eq!(mixed.field, "filter.ip_dst");
    assert!(mixed.reason.contains("IPv4 and an IPv6"), "{mixed}");
    let mixed = e(json!({"ip_src": "2001:db8::1", "ip_dst": "10.0.0.1"}));
    assert_eq!(mixed.field, "filter.ip_dst");
    assert_eq!(
        e(json!({"ip_src": "2001:db8::1", "ether_type": "0x0800"})).field,
        "filter.ether_type"
    );
}

proptest::proptest! {
    /// cover contains both; overlaps and contains agree with a
    /// brute-force check on one small field.
    #[test]
    fn cover_and_overlap_are_exact(a in 0u128..16, am in 0u128..16, b in 0u128..16, bm in 0u128..16) {
        let x = Masked { value: a & am, mask: am };
        let y = Masked { value: b & bm, mask: bm };
        let c = x.cover(y);
        let both = (0..16).any(|v| x.matches(v) && y.matches(v));
        proptest::prop_assert_eq!(x.overlaps(y), both);
        let within = (0..16).all(|v| !y.matches(v) || x.matches(v));
        proptest::prop_assert_eq!(x.contains(y), within);
        proptest::prop_assert!(c.contains(x) && c.contains(y));
    }
}
