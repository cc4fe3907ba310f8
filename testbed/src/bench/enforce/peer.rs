//! The peer of the install and removal benchmarks: the LibreQoS way of
//! building the same kernel objects — `tc -batch` of the same qdiscs,
//! classes and steering filter, then `nft -f` of the same nftables
//! statements — derived from what the enforcer's dry-run backend logs, and
//! the removal of the same objects the same way.

/// The `tc -batch` line doing what a dry-run netlink line describes.
pub fn tc_line(op: &str, interface: &str) -> String {
    let w: Vec<&str> = op.split_whitespace().collect();
    let field = |k: &str| {
        w.iter()
            .position(|x| *x == k)
            .and_then(|i| w.get(i + 1))
            .copied()
            .unwrap_or("")
    };
    if op.starts_with("RTM_NEWQDISC") {
        let at = match field("parent") {
            "" => "root".to_owned(),
            p => format!("parent {p}"),
        };
        format!(
            "qdisc add dev {interface} {at} handle {} htb default {}\n",
            field("handle"),
            field("default")
        )
    } else if op.starts_with("RTM_NEWTCLASS") {
        let parent = match field("parent") {
            "0:0" => "root".to_owned(),
            p => format!("parent {p}"),
        };
        // The quantum the enforcer sets (rate / r2q, clamped), so that both
        // sides build identical classes and tc prints no warnings.
        let rate_bytes = field("rate")
            .trim_end_matches("kbit")
            .parse::<u64>()
            .unwrap_or(0)
            * 125;
        let quantum = (rate_bytes / 10).clamp(1600, 200_000);
        format!(
            "class add dev {interface} {parent} classid {} htb rate {} ceil {} prio {} quantum {quantum}\n",
            field("classid"),
            field("rate"),
            field("ceil"),
            field("prio")
        )
    } else if op.starts_with("RTM_NEWTFILTER") {
        steer_line(op, interface)
    } else {
        String::new()
    }
}

/// The `tc` filter doing the enforcer's steering, so that both sides do the
/// same work. The enforcer's eBPF program (cls_bpf on the root) sends a
/// packet whose priority's major is `first_major + g` (g < groups) to class
/// `root:first_minor + g`. The peer installs a cls_bpf filter on the root
/// too, with the same seven instructions in classic BPF (what `tc … bpf
/// bytecode` loads) — keyed on the skb mark, since classic BPF has no
/// ancillary load of the priority; the benchmark sends no traffic, and
/// tc's `flow` classifier, which could read the priority, is not in every
/// kernel (not in this one).
fn steer_line(op: &str, interface: &str) -> String {
    let after = |k: &str| {
        op.split_once(k)
            .map(|(_, rest)| rest.trim_start())
            .unwrap_or("")
    };
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    let root = after(" parent ").split(':').next().and_then(hex);
    let first_major = after("priority major ").split('+').next().and_then(hex);
    let groups = after("g < ")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|g| g.parse::<u32>().ok());
    let first_minor = after("-> classid ")
        .split(':')
        .nth(1)
        .and_then(|m| m.split('+').next())
        .and_then(hex);
    match (root, first_major, groups, first_minor) {
        (Some(root), Some(first_major), Some(groups), Some(first_minor)) => {
            // ld mark; rsh 16; sub first_major; jge groups → none;
            // add root<<16|first_minor; ret a; none: ret 0.
            const SKF_AD_MARK: u32 = 0xffff_f000 + 20;
            let class = (root << 16) | first_minor;
            format!(
                "filter add dev {interface} parent {root:x}: prio 1 protocol all bpf bytecode \
                 \"7,32 0 0 {SKF_AD_MARK},116 0 0 16,20 0 0 {first_major},53 2 0 {groups},\
                 4 0 0 {class},22 0 0 0,6 0 0 0\"\n"
            )
        }
        // The line's format changed: the caller refuses to measure less work.
        _ => format!("# unparsed steering filter: {op}\n"),
    }
}

/// What the peer runs to remove every decision it installed with
/// `tc_batch` and `nft_script`, keeping the root qdisc, its root and
/// default classes, the steering filter and the table's base objects:
/// `tc -batch` of `class del` / `qdisc del` in the reverse order of
/// creation, and two `nft -f` scripts: the first deletes each decision's
/// map element (and flushes the fallback chain of decisions that are
/// rules), the second its chain and limit object — a chain a map element
/// jumps to stays busy until the transaction deleting the element commits.
pub fn removal(tc_batch: &str, nft_script: &str, interface: &str) -> (String, [String; 2]) {
    let mut tc = Vec::new();
    for line in tc_batch.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let field = |k: &str| {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1))
                .copied()
                .unwrap_or("")
        };
        if line.starts_with("class add ") {
            let classid = field("classid");
            // The root's own classes (MAJ:1, MAJ:2) stay.
            if is_decision_class(classid) {
                tc.push(format!("class del dev {interface} classid {classid}\n"));
            }
        } else if line.starts_with("qdisc add ") && line.contains(" parent ") {
            tc.push(format!(
                "qdisc del dev {interface} parent {} handle {}\n",
                field("parent"),
                field("handle")
            ));
        }
    }
    tc.reverse();
    let mut nft = String::new();
    let mut flush_fallback = None;
    let (mut chains, mut limits) = (Vec::new(), Vec::new());
    for line in nft_script.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["add", "element", family, table, map, rest @ ..] => {
                // `{ K1 : jump d1, K2 : jump d2 }` → `{ K1, K2 }`.
                let list = rest.join(" ");
                let keys: Vec<&str> = list
                    .trim_start_matches('{')
                    .trim_end_matches('}')
                    .split(", ")
                    .filter_map(|e| e.split(" : ").next())
                    .map(str::trim)
                    .collect();
                nft.push_str(&format!(
                    "delete element {family} {table} {map} {{ {} }}\n",
                    keys.join(", ")
                ));
            }
            ["add", "rule", family, table, "fallback", ..] if line.contains(" jump d") => {
                flush_fallback = Some(format!("flush chain {family} {table} fallback\n"));
            }
            ["add", "chain", family, table, chain, ..] if is_decision(chain, 'd') => {
                chains.push(format!(
                    "flush chain {family} {table} {chain}\ndelete chain {family} {table} {chain}\n"
                ));
            }
            ["add", "limit", family, table, name, ..] if is_decision(name, 'l') => {
                limits.push(format!("delete limit {family} {table} {name}\n"));
            }
            _ => {}
        }
    }
    nft.extend(flush_fallback);
    let objects = chains.concat() + &limits.concat();
    (tc.concat(), [nft, objects])
}

/// `dID` / `lID`: a decision's chain or limit object.
fn is_decision(name: &str, prefix: char) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// A class a decision brought: a group class on the root qdisc
/// (`MAJ:100` and up) or anything inside a group qdisc (`MAJB:MIN`, a major
/// of two bytes).
fn is_decision_class(classid: &str) -> bool {
    match classid.split_once(':') {
        Some((major, minor)) => {
            major.len() > 2 || u16::from_str_radix(minor, 16).is_ok_and(|m| m >= 0x100)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_undoes_the_decisions_and_keeps_the_root() {
        let tc = "qdisc add dev v0 root handle e5:0 htb default 2
class add dev v0 root classid e5:1 htb rate 10000kbit ceil 10000kbit prio 0 quantum 1600
class add dev v0 parent e5:1 classid e5:2 htb rate 1000kbit ceil 10000kbit prio 7 quantum 1600
filter add dev v0 parent e5: prio 1 protocol all bpf bytecode \"7,0 0 0 0\"
class add dev v0 parent e5:1 classid e5:100 htb rate 2016kbit ceil 10000kbit prio 1 quantum 1600
qdisc add dev v0 parent e5:100 handle e500:0 htb default 0
class add dev v0 root classid e500:1 htb rate 10000kbit ceil 10000kbit prio 0 quantum 1600
class add dev v0 parent e500:1 classid e500:2 htb rate 2000kbit ceil 10000kbit prio 1 quantum 1600
class add dev v0 parent e500:1 classid e500:100 htb rate 8kbit ceil 875kbit prio 2 quantum 1600
";
        let nft = "add table inet qosloop_v0
add chain inet qosloop_v0 postrouting { type filter hook postrouting priority filter; policy accept; }
add chain inet qosloop_v0 fallback
add map inet qosloop_v0 v4 { type inet_proto . ipv4_addr : verdict; }
add limit inet qosloop_v0 l1 { rate over 125000 bytes/second burst 15000 bytes; }
add chain inet qosloop_v0 d1
add rule inet qosloop_v0 d1 limit name \"l1\" counter accept
add chain inet qosloop_v0 d2
add element inet qosloop_v0 v4 { udp . 10.2.0.2 : jump d1, udp . 10.2.0.3 : jump d3 }
add rule inet qosloop_v0 fallback ip daddr 10.3.0.0/24 jump d2 comment \"id=2\"
";
        let (tc, nft) = removal(tc, nft, "v0");
        assert_eq!(
            tc,
            "class del dev v0 classid e500:100
class del dev v0 classid e500:2
class del dev v0 classid e500:1
qdisc del dev v0 parent e5:100 handle e500:0
class del dev v0 classid e5:100
"
        );
        assert_eq!(
            nft[0],
            "delete element inet qosloop_v0 v4 { udp . 10.2.0.2, udp . 10.2.0.3 }
flush chain inet qosloop_v0 fallback
"
        );
        assert_eq!(
            nft[1],
            "flush chain inet qosloop_v0 d1
delete chain inet qosloop_v0 d1
flush chain inet qosloop_v0 d2
delete chain inet qosloop_v0 d2
delete limit inet qosloop_v0 l1
"
        );
    }
}
