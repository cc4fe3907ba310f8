//! The enforcer against the real kernel: three namespaces tx — router — rx
//! joined by veth, the enforcer on the router's rx-facing interface, real
//! UDP traffic from a bounded paced generator in tx, a raw-socket sink in rx
//! counting packets per DSCP and keeping each one's kernel receive time.
//! Every namespace goes with its guard.
//!
//! What the tests assert is the enforcer's contract, not the host's speed:
//! every packet sent is metered once (the decision's nftables counters);
//! every in-profile packet arrives, marked; in every window of `T` the
//! in-profile bytes stay within the token bucket's `rate × T + bucket`, and
//! the shaped out-of-profile bytes within the HTB class's `shape × T +
//! burst`, in kernel receive time; every out-of-profile packet is sent on,
//! dropped or still queued by its class. Rates per second are printed for
//! humans. A test waits for what must arrive (its sink stops when the
//! kernel's counts are met), never a fixed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::status::DecisionStatus;
use qosloop_enforcer::{EnforceError, Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, PortRange, TrafficProfile,
};
use qosloop_testkit::harness::{require_binary, require_root, HarnessError, Netns, VethPair};
use qosloop_testkit::inprofile::{wall_ns, Arrival, ProfileStep};
use qosloop_testkit::traffic::{
    self, FlowGen, FlowReceived, Schedule, SinkReport, StopWhen, TrafficError, BOUND_WINDOWS,
};
use std::net::SocketAddrV4;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PORT: u16 = 5001;
const PACKET_LEN: usize = 1000;
const AF11: u8 = 10;
const CS6: u8 = 48;
const BE: u8 = 0;
/// How long a test waits for what must happen (every packet metered, every
/// forwarded packet received, the daemon's rules installed): a bound for a
/// broken run, which a slow one does not reach.
const DEADLINE: Duration = Duration::from_secs(60);

struct Topo {
    tx: Netns,
    router: Netns,
    rx: Netns,
    /// The router's interface towards rx: where the enforcer works.
    out_if: String,
    /// rx's interface (ingress enforcement at the receiving host).
    in_if: String,
}

fn topo() -> Topo {
    let tx = Netns::create("etx").unwrap();
    let router = Netns::create("ert").unwrap();
    let rx = Netns::create("erx").unwrap();
    VethPair::connect(&tx, "10.1.0.1/24", &router, "10.1.0.2/24").unwrap();
    let out = VethPair::connect(&router, "10.2.0.1/24", &rx, "10.2.0.2/24").unwrap();
    tx.ip(&["route", "add", "default", "via", "10.1.0.2"])
        .unwrap();
    rx.ip(&["route", "add", "default", "via", "10.2.0.1"])
        .unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    Topo {
        tx,
        router,
        rx,
        out_if: out.a_if,
        in_if: out.b_if,
    }
}

fn prerequisites() -> Option<()> {
    qosloop_testkit::harness::prerequisite(require_root(
        "programs HTB and nftables in namespaces",
    ))?;
    qosloop_testkit::harness::prerequisite(require_binary("nft", "nftables"))?;
    Some(())
}

fn decision(id: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow: FlowSpec {
            src: Some("10.1.0.1".parse().unwrap()),
            dst: Some("10.2.0.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(PortRange::single(PORT + id as u16 - 1)),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 2000.0,
            avg_rate_kbps: 2000.0,
            link: "edge".into(),
            link_load_kbps: 0.0,
            band: "test".into(),
        },
        issued_ns: 0,
    }
}

fn config(t: &Topo) -> EnforcerConfig {
    EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: t.out_if.clone(),
        roles: vec!["edge".into()],
        capacity: Kbps(10_000),
        qdisc_major: 0xe5,
    }
}

fn start(t: &Topo) -> Enforcer<LinuxBackend> {
    let cfg = config(t);
    t.router
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
        .unwrap()
        .unwrap()
}

type SinkThread = JoinHandle<Result<Result<SinkReport, TrafficError>, HarnessError>>;

/// A sink in rx that keeps receiving until told what must have arrived.
struct Receiving {
    until: StopWhen,
    sink: SinkThread,
}

impl Receiving {
    /// Flow 1 as received once `done` holds for it (or the sink's limit,
    /// [`DEADLINE`] after the traffic, passed: then what the test asserts
    /// next fails, naming what is missing).
    fn finish(self, done: impl Fn(&FlowReceived) -> bool + Send + 'static) -> FlowReceived {
        self.until
            .set(move |r: &SinkReport| r.flows.get(&1).is_some_and(&done));
        let got = self.sink.join().unwrap().unwrap().unwrap();
        got.flows.get(&1).cloned().unwrap_or_default()
    }
}

/// Sends one flow at `kbps` (IP bytes) for `secs` while a timestamping
/// sink in rx receives; `during` runs (in the router namespace) while
/// traffic flows. Returns once the generator is done; the sink receives on
/// until [`Receiving::finish`].
fn traffic<R: Send>(
    t: &Topo,
    kbps: u64,
    secs: u64,
    during: impl FnOnce() -> R + Send,
) -> (traffic::GenReport, Receiving, R) {
    let until = StopWhen::new();
    let sink_until = until.clone();
    let limit = Duration::from_secs(secs) + DEADLINE;
    let sink =
        t.rx.spawn_in(move || traffic::sink_timestamped(&[PORT], &sink_until, limit))
            .unwrap();
    assert!(until.wait_ready(DEADLINE), "the sink did not start");
    let flow = FlowGen {
        id: 1,
        bind: "10.1.0.1:6001".parse::<SocketAddrV4>().unwrap(),
        dst: SocketAddrV4::new("10.2.0.2".parse().unwrap(), PORT),
        packet_len: PACKET_LEN,
        dscp: AF11,
        schedule: Schedule::constant(
            (kbps * 125) as f64 / PACKET_LEN as f64,
            Duration::from_secs(secs),
        ),
    };
    let gen_stop = traffic::stop_flag();
    let gen =
        t.tx.spawn_in(move || traffic::generate(&flow, &gen_stop))
            .unwrap();
    let during = t.router.run_in(during).unwrap();
    let sent = gen.join().unwrap().unwrap().unwrap();
    (sent, Receiving { until, sink }, during)
}

/// Decision 1 as the kernel holds it (counters, classes), read in `ns`.
fn decision_status(ns: &Netns, e: &mut Enforcer<LinuxBackend>) -> DecisionStatus {
    let layout = e.layout().clone();
    let status = ns
        .run_in(|| qosloop_enforcer::status::read(e.backend(), &layout))
        .unwrap()
        .unwrap();
    status
        .decisions
        .into_iter()
        .find(|d| d.id == 1)
        .expect("decision 1 installed")
}

/// Decision 1 once its meter has counted every packet the generator sent:
/// each one once, in or out of profile (none lost before the meter).
fn metered(ns: &Netns, e: &mut Enforcer<LinuxBackend>, sent: u64) -> DecisionStatus {
    let end = Instant::now() + DEADLINE;
    loop {
        let d = decision_status(ns, e);
        let counted = d.in_profile_packets + d.out_of_profile_packets;
        if counted >= sent || Instant::now() >= end {
            assert_eq!(
                counted, sent,
                "the meter counted {counted} packets (in + out of profile) of {sent} sent: {d:?}"
            );
            return d;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a class counted: sent, dropped, bytes queued.
fn class_counts(d: &DecisionStatus) -> Option<(u32, u32, u32)> {
    d.out_class
        .as_ref()
        .map(|c| (c.packets, c.drops, c.backlog_bytes))
}

/// Decision 1 read twice in a row with its out-of-profile class unchanged
/// in between: a read no dequeue split (sent and queued read apart).
fn settled(ns: &Netns, e: &mut Enforcer<LinuxBackend>) -> DecisionStatus {
    let end = Instant::now() + DEADLINE;
    let mut last = decision_status(ns, e);
    loop {
        let next = decision_status(ns, e);
        if class_counts(&next) == class_counts(&last) {
            return next;
        }
        assert!(
            Instant::now() < end,
            "the out-of-profile class never read the same twice: {next:?}"
        );
        last = next;
    }
}

/// Every packet the meter put out of profile is accounted for by its
/// class: sent on, dropped (its queue was full) or still queued (all of
/// one length, so queued bytes are whole packets).
fn assert_class_accounts_for_out_of_profile(d: &DecisionStatus) {
    let c = d.out_class.as_ref().expect("an out-of-profile class");
    let (sent, drops) = (u64::from(c.packets), u64::from(c.drops));
    assert!(sent > 0, "the out-of-profile class sent nothing: {d:?}");
    assert_eq!(
        c.bytes % sent,
        0,
        "packets of one length on the wire: {d:?}"
    );
    let frame = c.bytes / sent;
    let backlog = u64::from(c.backlog_bytes);
    assert_eq!(backlog % frame, 0, "{backlog} B queued, {frame} B each");
    let queued = backlog / frame;
    assert_eq!(
        sent + drops + queued,
        d.out_of_profile_packets,
        "out of profile: the class sent {sent}, dropped {drops}, holds {queued} of {} metered",
        d.out_of_profile_packets
    );
}

/// The token bucket of decision 1's profile, from `from_ns` on.
fn profile_bound(from_ns: u64) -> [ProfileStep; 1] {
    [ProfileStep::of(
        from_ns,
        &decision(1, OutOfProfileAction::Drop).profile,
    )]
}

/// The most an out-of-profile class with ceiling `shape` sends from
/// `from_ns` on: `shape × T` plus its ceil burst as the enforcer sizes it
/// (tc's default, rate / HZ + 1600 B: `buffer_ticks` in enforcer/src/tc.rs).
/// HTB counts frames (IP + Ethernet header), the sink IP bytes: the bound
/// is loose by 14 B a packet, never tight.
fn shape_bound(from_ns: u64, shape: Kbps) -> [ProfileStep; 1] {
    [ProfileStep {
        from_ns,
        rate_bytes_per_s: shape.bytes_per_sec() as f64,
        bucket_bytes: (shape.bytes_per_sec() / 1000 + 1600) as f64,
    }]
}

/// Slack for where a window's edge falls: one packet.
const EDGE: f64 = PACKET_LEN as f64;

fn assert_bounded(what: &str, arrivals: &[Arrival], steps: &[ProfileStep], tolerance: f64) {
    let misses = traffic::bound_misses(what, arrivals, steps, &BOUND_WINDOWS, tolerance);
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// Kbit/s per DSCP over the steady seconds of the flow, as the sink's
/// thread binned them: a figure for humans (left out: the first two
/// seconds, while the full bucket lets everything through in profile, and
/// the last).
fn print_figures(label: &str, flow: &FlowReceived) {
    let secs: Vec<_> = flow.seconds.values().collect();
    let steady = secs.get(2..secs.len().saturating_sub(1)).unwrap_or(&[]);
    let n = steady.len().max(1) as f64;
    let mut by_dscp = std::collections::BTreeMap::new();
    for s in steady {
        for d in s.bytes_by_dscp.keys() {
            *by_dscp.entry(*d).or_insert(0.0) += s.kbps_with_dscp(*d) / n;
        }
    }
    eprintln!(
        "{label}: received {} packets, by DSCP {:?}; steady kbit/s by DSCP {by_dscp:.0?} over {} s",
        flow.packets,
        flow.packets_by_dscp,
        steady.len()
    );
}

/// One run of Fig. 10: what was sent, what arrived, and decision 1 once
/// every packet was metered (`metered`) and once the sink had stopped
/// (`last`).
struct Fig10 {
    sent: traffic::GenReport,
    flow: FlowReceived,
    metered: DecisionStatus,
    last: DecisionStatus,
    installed_ns: u64,
}

/// After the generator: waits until every packet was metered, then until
/// rx has every in-profile packet and (with `out_dscp`) every
/// out-of-profile packet its class had sent by then.
fn measure(
    ns: &Netns,
    e: &mut Enforcer<LinuxBackend>,
    sent: traffic::GenReport,
    rx: Receiving,
    out_dscp: Option<u8>,
    installed_ns: u64,
) -> Fig10 {
    let metered = metered(ns, e, sent.packets);
    let class_sent = u64::from(settled(ns, e).out_class.map_or(0, |c| c.packets));
    let in_profile = metered.in_profile_packets;
    let flow = rx.finish(move |f| {
        f.packets_with_dscp(CS6) >= in_profile
            && out_dscp.is_none_or(|d| f.packets_with_dscp(d) >= class_sent)
    });
    let last = settled(ns, e);
    Fig10 {
        sent,
        flow,
        metered,
        last,
        installed_ns,
    }
}

/// Installs `action` for the flow and sends 2000 kbit/s for 6 s; the
/// out-of-profile packets arrive with `out_dscp` (none: dropped).
fn run_fig10(action: OutOfProfileAction, out_dscp: Option<u8>) -> Option<Fig10> {
    prerequisites()?;
    let t = topo();
    let mut e = start(&t);
    let installed_ns = wall_ns();
    t.router
        .run_in(|| e.install(decision(1, action)))
        .unwrap()
        .unwrap();
    let (sent, rx, ()) = traffic(&t, 2000, 6, || ());
    let run = measure(&t.router, &mut e, sent, rx, out_dscp, installed_ns);
    print_figures(&format!("{action:?}"), &run.flow);
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
    Some(run)
}

/// In profile: the meter passed some and put some out (the flow is twice
/// its profile), every packet it passed arrived marked CS6, and in every
/// window no more than the bucket allows.
fn assert_in_profile(run: &Fig10) {
    let d = &run.metered;
    assert!(
        d.in_profile_packets > 0 && d.out_of_profile_packets > 0,
        "both sides of the profile counted: {d:?}"
    );
    assert_eq!(
        run.flow.packets_with_dscp(CS6),
        d.in_profile_packets,
        "every in-profile packet arrives CS6 (received by DSCP {:?}, sent {})",
        run.flow.packets_by_dscp,
        run.sent.packets
    );
    assert_bounded(
        "in profile (CS6)",
        run.flow.arrivals_with_dscp(CS6),
        &profile_bound(run.installed_ns),
        EDGE,
    );
}

/// Out of profile, shaped to `shape`: arrives with `dscp`, every packet the
/// class sent arrives, the class accounts for every packet the meter put
/// out of profile, and in every window no more than `shape × T + burst`
/// (HTB sends a packet when its tokens are not negative and charges it
/// after: one packet more than the edge's).
fn assert_shaped(run: &Fig10, dscp: u8, shape: Kbps) {
    let got = run.flow.packets_with_dscp(dscp);
    let sent_by = |d: &DecisionStatus| u64::from(d.out_class.as_ref().map_or(0, |c| c.packets));
    assert!(
        got >= sent_by(&run.metered) && got <= sent_by(&run.last),
        "received {got} packets with DSCP {dscp}, the class had sent {} then {}",
        sent_by(&run.metered),
        sent_by(&run.last)
    );
    assert_class_accounts_for_out_of_profile(&run.last);
    assert_bounded(
        &format!("out of profile (DSCP {dscp}) shaped to {shape}"),
        run.flow.arrivals_with_dscp(dscp),
        &shape_bound(run.installed_ns, shape),
        2.0 * EDGE,
    );
}

/// Accept shaped to 875 kbit/s on a 2000 kbit/s flow with a 1000 kbit/s
/// profile: in profile within the bucket and CS6, out of profile kept AF11
/// within 875 kbit/s × T plus the class's burst, nothing unaccounted for.
fn assert_accepted_875(run: &Fig10) {
    assert_in_profile(run);
    assert_shaped(run, AF11, Kbps(875));
    let others = run.flow.packets - run.flow.packets_with_dscp(CS6);
    assert_eq!(
        others,
        run.flow.packets_with_dscp(AF11),
        "{:?}",
        run.flow.packets_by_dscp
    );
}

#[test]
fn accept_shapes_out_of_profile_to_875_and_marks_in_profile_cs6() {
    let action = OutOfProfileAction::Accept {
        shape: Some(Kbps(875)),
    };
    let Some(run) = run_fig10(action, Some(AF11)) else {
        return;
    };
    assert_accepted_875(&run);
}

#[test]
fn remark_sends_out_of_profile_best_effort_shaped_to_125() {
    let action = OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(125)),
    };
    let Some(run) = run_fig10(action, Some(BE)) else {
        return;
    };
    assert_in_profile(&run);
    assert_shaped(&run, BE, Kbps(125));
    assert_eq!(
        run.flow.packets_with_dscp(AF11),
        0,
        "nothing keeps its DSCP: {:?}",
        run.flow.packets_by_dscp
    );
}

#[test]
fn drop_delivers_at_most_one_percent_of_out_of_profile() {
    let Some(run) = run_fig10(OutOfProfileAction::Drop, None) else {
        return;
    };
    assert_in_profile(&run);
    let dropped_bytes = run.last.out_of_profile_bytes;
    let delivered_out: u64 = run
        .flow
        .seconds
        .values()
        .map(|s| {
            s.bytes_by_dscp
                .iter()
                .filter(|(d, _)| **d != CS6)
                .map(|(_, b)| *b)
                .sum::<u64>()
        })
        .sum();
    assert!(dropped_bytes > 0);
    assert!(
        delivered_out * 100 <= dropped_bytes + delivered_out,
        "delivered {delivered_out} B of out-of-profile traffic, dropped {dropped_bytes} B"
    );
}

/// The out-of-profile class's drops once its queue is empty again: after
/// that, every packet sent is either received or one of these.
fn drops_once_drained(ns: &Netns, e: &mut Enforcer<LinuxBackend>) -> u64 {
    let end = Instant::now() + DEADLINE;
    loop {
        let d = settled(ns, e);
        let c = d.out_class.as_ref().expect("an out-of-profile class");
        if c.backlog_bytes == 0 {
            return u64::from(c.drops);
        }
        assert!(
            Instant::now() < end,
            "the out-of-profile class never drained: {d:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn decision_changes_under_traffic_lose_no_in_profile_packets() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    t.router
        .run_in(|| {
            e.install(decision(
                1,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            ))
        })
        .unwrap()
        .unwrap();
    let meter_before = limit_handle(&t, "l1");
    // 800 kbit/s: all of it is within the 1000 kbit/s profile.
    let actions = [
        OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125)),
        },
        OutOfProfileAction::Drop,
        OutOfProfileAction::Accept {
            shape: Some(Kbps(500)),
        },
        OutOfProfileAction::Accept {
            shape: Some(Kbps(875)),
        },
        OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(250)),
        },
    ];
    let (sent, rx, changes) = traffic(&t, 800, 4, || {
        let mut n = 0;
        for (v, a) in actions.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(600));
            let mut d = decision(1, *a);
            d.version = v as u64 + 2;
            e.install(d).unwrap();
            n += 1;
        }
        n
    });
    assert_eq!(changes, actions.len());
    let want = sent.packets;
    let flow = rx.finish(move |f| f.packets >= want);
    print_figures("800 kbit/s under changes", &flow);
    assert_eq!(
        flow.packets, sent.packets,
        "sent {} received {}",
        sent.packets, flow.packets
    );
    assert_eq!(
        flow.packets_with_dscp(CS6),
        flow.packets,
        "every packet was in profile and marked CS6: {:?}",
        flow.packets_by_dscp
    );
    // The flow's meter is the same kernel object after five action changes:
    // its token bucket was never refilled by a change.
    assert_eq!(limit_handle(&t, "l1"), meter_before);
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}

/// The handle of limit object `name` in the enforcer's table (`nft -a`).
fn limit_handle(t: &Topo, name: &str) -> u64 {
    let table = format!("qosloop_{}", t.out_if);
    let out = t
        .router
        .command("nft")
        .args(["-a", "list", "table", "inet", &table])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let head = format!("limit {name} {{ # handle ");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&head)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no limit {name} in\n{text}"))
}

/// No leak at a change: a 2000 kbit/s flow against a 1000 kbit/s profile,
/// its out-of-profile action changed four times while it runs (the first
/// change after 2.5 s, when the bucket that starts full has long been
/// spent). The meter is the same limit object throughout, so no change
/// refills its bucket: in every window of 250 ms, 1 s and 4 s the CS6
/// bytes stay within the profile's `rate × T + bucket` in kernel receive
/// time. A refill at each change (1.1 s apart) would let about the whole
/// 2000 kbit/s through in profile: over 4 s, some 400 kB more than the
/// bound. Nothing is lost on the way: every packet sent arrives or was
/// dropped by the shaping class.
#[test]
fn decision_changes_do_not_refill_the_meter() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    let accept = OutOfProfileAction::Accept {
        shape: Some(Kbps(875)),
    };
    let remark = OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(875)),
    };
    let installed_ns = wall_ns();
    t.router
        .run_in(|| e.install(decision(1, accept)))
        .unwrap()
        .unwrap();
    let meter_before = limit_handle(&t, "l1");
    let (sent, rx, changes) = traffic(&t, 2000, 8, || {
        std::thread::sleep(Duration::from_millis(2500));
        let mut n = 0;
        for (v, a) in [remark, accept, remark, accept].iter().enumerate() {
            let mut d = decision(1, *a);
            d.version = v as u64 + 2;
            e.install(d).unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(1100));
        }
        n
    });
    assert_eq!(changes, 4);
    let drops = drops_once_drained(&t.router, &mut e);
    let want = sent.packets;
    let flow = rx.finish(move |f| f.packets + drops >= want);
    print_figures("accept/remark changes", &flow);
    assert_eq!(
        flow.packets + drops,
        sent.packets,
        "sent {}, received {} and {drops} dropped by the shaping class",
        sent.packets,
        flow.packets
    );
    assert!(
        flow.packets_with_dscp(CS6) > 0,
        "nothing in profile: {:?}",
        flow.packets_by_dscp
    );
    assert_eq!(limit_handle(&t, "l1"), meter_before, "the same meter");
    assert_bounded(
        "in profile (CS6) across four action changes",
        flow.arrivals_with_dscp(CS6),
        &profile_bound(installed_ns),
        EDGE,
    );
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}

fn kernel_objects(t: &Topo) -> (String, String, String) {
    let run = |prog: &str, args: &[&str]| {
        let out = t.router.command(prog).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (
        run("tc", &["qdisc", "show", "dev", &t.out_if]),
        run("tc", &["class", "show", "dev", &t.out_if]),
        run("nft", &["list", "ruleset"]),
    )
}

#[test]
fn refused_decisions_leave_the_kernel_as_it_was() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    t.router
        .run_in(|| e.install(decision(1, OutOfProfileAction::Drop)))
        .unwrap()
        .unwrap();
    // Something else takes the class the next decision would use: the kernel refuses.
    t.router
        .command("tc")
        .args([
            "class", "add", "dev", &t.out_if, "parent", "e500:1", "classid", "e500:101", "htb",
            "rate", "1mbit",
        ])
        .status()
        .unwrap();
    let before = kernel_objects(&t);
    let err = t
        .router
        .run_in(|| {
            e.install(decision(
                2,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            ))
        })
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, EnforceError::Tc { .. }), "{err}");
    assert!(
        err.to_string().contains("e500:101") && err.to_string().contains("exists"),
        "{err}"
    );
    assert_eq!(kernel_objects(&t), before);
    let mut too_fast = decision(2, OutOfProfileAction::Drop);
    too_fast.profile.rate = Kbps(20_000);
    let err = t
        .router
        .run_in(|| e.install(too_fast))
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("above the capacity"), "{err}");
    // Decision 1's flow again under another id (an overlap is fine: it
    // becomes an ordered fallback rule; the same flow twice is not).
    let mut twin = decision(3, OutOfProfileAction::Drop);
    twin.flow = decision(1, OutOfProfileAction::Drop).flow;
    let err = t.router.run_in(|| e.install(twin)).unwrap().unwrap_err();
    assert!(
        matches!(err, EnforceError::Conflict { other: 1, .. }),
        "{err}"
    );
    assert_eq!(kernel_objects(&t), before);
    // And it keeps working once the intruder is gone.
    t.router
        .command("tc")
        .args(["class", "del", "dev", &t.out_if, "classid", "e500:101"])
        .status()
        .unwrap();
    let mut ok = decision(4, OutOfProfileAction::Drop);
    ok.flow.dst_ports = Some(PortRange::single(7000));
    t.router.run_in(|| e.install(ok)).unwrap().unwrap();
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
    let unknown = config(&t);
    let err = t
        .router
        .run_in(move || {
            let mut c = unknown;
            c.interface = "nosuch0".into();
            Enforcer::start(LinuxBackend::open().unwrap(), c).map(|_| ())
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err, EnforceError::UnknownInterface("nosuch0".into()));
}

fn write_decisions(dir: &std::path::Path, name: &str, ds: &[Decision]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(ds).unwrap()).unwrap();
    p
}

fn enforcer_cmd(t: &Topo, args: &[&str]) -> Command {
    let mut cmd = t.router.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    cmd.args([
        "--interface",
        &t.out_if,
        "--capacity",
        "10mbit",
        "--roles",
        "edge",
    ])
    .args(args);
    cmd
}

#[test]
fn kill_9_then_restart_reconciles_and_cleanup_restores_the_namespace() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let pristine = kernel_objects(&t);
    let dir = tempfile::tempdir().unwrap();
    let ds: Vec<Decision> = (1..=3)
        .map(|i| {
            decision(
                i,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            )
        })
        .collect();
    let ds: Vec<Decision> = ds
        .into_iter()
        .map(|mut d| {
            d.profile.rate = Kbps(500);
            d.out_of_profile = OutOfProfileAction::Accept {
                shape: Some(Kbps(400)),
            };
            d
        })
        .collect();
    let file = write_decisions(dir.path(), "d.json", &ds);
    let mut daemon = enforcer_cmd(&t, &["--decisions", file.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until the daemon has installed all three (bounded: a daemon that
    // never does fails here, a slow one does not).
    let end = Instant::now() + DEADLINE;
    let installed = loop {
        if kernel_objects(&t).2.matches("jump d").count() == 3 {
            break true;
        }
        if Instant::now() >= end {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    assert!(
        installed,
        "the daemon did not install its decisions within {DEADLINE:?}"
    );
    let after_crash = kernel_objects(&t);
    // Restart with the same decisions: all adopted, nothing touched.
    let out = enforcer_cmd(&t, &["apply", "--decisions", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["start"]["adopted"], 3);
    assert_eq!(summary["apply"]["unchanged"], 3);
    assert_eq!(summary["apply"]["tc_messages"], 0);
    assert_eq!(kernel_objects(&t).1, after_crash.1);
    assert_eq!(kernel_objects(&t).2.matches("jump d").count(), 3);
    // Restart with one decision gone and one changed: no duplicates, no orphans.
    let mut changed = ds[..2].to_vec();
    changed[1].out_of_profile = OutOfProfileAction::Drop;
    let file2 = write_decisions(dir.path(), "d2.json", &changed);
    let out = enforcer_cmd(&t, &["apply", "--decisions", file2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, classes, rules) = kernel_objects(&t);
    assert_eq!(rules.matches("jump d").count(), 2, "{rules}");
    assert_eq!(rules.matches("chain d").count(), 2, "{rules}");
    // root, default, group e5:100 and its qdisc's root e500:1 and in-profile
    // class e500:2, one out-of-profile class per decision.
    assert_eq!(classes.lines().count(), 5 + 2, "{classes}");
    assert!(rules.contains("counter packets 0 bytes 0 drop"), "{rules}");
    let status = enforcer_cmd(&t, &["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["decisions"].as_array().unwrap().len(), 2);
    assert_eq!(status["orphan_classes"].as_array().unwrap().len(), 0);
    // --cleanup leaves the namespace as it was.
    let out = enforcer_cmd(&t, &["--cleanup"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kernel_objects(&t), pristine);
}

#[test]
fn cli_bad_input_exit_codes() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "interface = 3\n").unwrap();
    let out = enforcer_cmd(&t, &["--config", bad.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let junk = dir.path().join("d.json");
    std::fs::write(&junk, "[{\"id\": }]").unwrap();
    let out = enforcer_cmd(&t, &["apply", "--decisions", junk.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("d.json"));
    let mut cmd = t.router.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    let out = cmd
        .args(["--interface", "nosuch0", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch0"));
}

/// What the enforcer says its table will be (`--dry-run` prints it) is what
/// `nft list table` shows after the change, counters aside: decisions of
/// several map shapes (five-tuple, IPv4 and IPv6 destination only),
/// several elements per map, a fallback rule, then a change and a removal.
#[test]
fn listing_equals_nft_list_after_apply() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let mut e = start(&t);
    let mut ds = Vec::new();
    for id in 1..=4u64 {
        ds.push(decision(id, OutOfProfileAction::Drop));
    }
    for (id, dst) in [(5u64, "10.2.0.7"), (6, "10.2.0.3"), (7, "10.2.0.5")] {
        let mut d = decision(id, OutOfProfileAction::Drop);
        d.flow = FlowSpec {
            dst: Some(dst.parse().unwrap()),
            ..FlowSpec::default()
        };
        ds.push(d);
    }
    let mut v6 = decision(8, OutOfProfileAction::Drop);
    v6.flow = FlowSpec {
        dst: Some("2001:db8::9".parse().unwrap()),
        ..FlowSpec::default()
    };
    ds.push(v6);
    let mut wide = decision(10, OutOfProfileAction::Drop);
    wide.flow.dst = Some("10.3.0.0/24".parse().unwrap());
    ds.push(wide);
    for (id, dst) in [(11u64, "10.9.0.0/24"), (12, "2001:db8:1::/48")] {
        let mut d = decision(id, OutOfProfileAction::Drop);
        d.flow = FlowSpec {
            dst: Some(dst.parse().unwrap()),
            ..FlowSpec::default()
        };
        ds.push(d);
    }
    let table = format!("qosloop_{}", t.out_if);
    let listed = |t: &Topo| {
        let out = t
            .router
            .command("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Counters as the model prints them.
        let mut norm = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("counter packets ") {
            norm.push_str(&rest[..at]);
            norm.push_str("counter packets 0 bytes 0");
            let after = &rest[at..];
            let end = after.find(" bytes ").unwrap() + " bytes ".len();
            let digits = after[end..].find(|c: char| !c.is_ascii_digit()).unwrap();
            rest = &after[end + digits..];
        }
        norm.push_str(rest);
        norm
    };
    for d in &mut ds {
        d.profile.rate = Kbps(500);
    }
    t.router.run_in(|| e.sync(ds.clone())).unwrap().unwrap();
    assert_eq!(listed(&t), e.listing().to_string());
    // A restart reads all of it back (exact and interval map elements, v4
    // and v6, the fallback rule) and finds nothing to clean or restore.
    let cfg = config(&t);
    let report = t
        .router
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(_, r)| r))
        .unwrap()
        .unwrap();
    assert_eq!(report.adopted, ds.len());
    assert_eq!(
        (
            report.cleaned_chains,
            report.cleaned_elements,
            report.restored_elements
        ),
        (0, 0, 0)
    );
    assert_eq!(listed(&t), e.listing().to_string());
    // An action change and a removal: still the same.
    let mut changed = ds.clone();
    changed[1].out_of_profile = OutOfProfileAction::Accept {
        shape: Some(Kbps(500)),
    };
    changed.remove(2);
    t.router.run_in(|| e.sync(changed)).unwrap().unwrap();
    assert_eq!(listed(&t), e.listing().to_string());
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}

/// Ingress: the enforcer on the receiving host's interface, direction
/// ingress. Packets are metered, marked and steered in a `netdev` table on
/// the interface's ingress hook, forwarded to the enforcer's IFB device and
/// shaped there, then handed back to the host. Accept shaped to 875 kbit/s:
/// what the host receives holds the same contract as egress enforcement
/// (every packet metered; in profile all of it CS6, within the bucket; out
/// of profile AF11 within 875 kbit/s × T plus the class's burst, every
/// packet accounted for by the IFB's class); `cleanup` removes the table
/// and the IFB device.
#[test]
fn ingress_through_an_ifb_meters_marks_and_shapes_like_egress() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let cfg = EnforcerConfig {
        direction: qosloop_schema::Direction::Ingress,
        interface: t.in_if.clone(),
        ..config(&t)
    };
    let mut e =
        t.rx.run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
            .unwrap()
            .unwrap();
    let ifb = e.layout().ifb();
    let installed_ns = wall_ns();
    t.rx.run_in(|| {
        e.install(decision(
            1,
            OutOfProfileAction::Accept {
                shape: Some(Kbps(875)),
            },
        ))
    })
    .unwrap()
    .unwrap();
    let (sent, rx, ()) = traffic(&t, 2000, 6, || ());
    let run = measure(&t.rx, &mut e, sent, rx, Some(AF11), installed_ns);
    print_figures("ingress accept", &run.flow);
    assert_accepted_875(&run);
    let classes =
        t.rx.command("tc")
            .args(["-s", "class", "show", "dev", &ifb])
            .output()
            .unwrap();
    let classes = String::from_utf8_lossy(&classes.stdout).into_owned();
    assert!(classes.contains("e500:100"), "{classes}");
    t.rx.run_in(|| e.cleanup()).unwrap().unwrap();
    let links = t.rx.ip(&["link", "show"]).unwrap();
    assert!(!links.contains(&ifb), "{links}");
    let out =
        t.rx.command("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}
