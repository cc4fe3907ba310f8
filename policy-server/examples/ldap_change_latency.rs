//! Benchmark: time from an LDAP change to the new policy in the policy
//! server's watch receiver (issue 5, "LDAP change to new decision").
//!
//! Starts a real slapd (testbed harness) with the sample policy, follows it
//! with `watch_ldap` (RFC 4533 refreshAndPersist), then changes the service
//! class's profile rate N times through a second LDAP connection and times
//! each change from sending the modify request to the watch receiver
//! holding a policy with the new rate. Also times the modify round trip
//! alone (slapd's own write), for comparison. Both with the default
//! settle window (10 ms) and with none.
//!
//! Run: `cargo run --release -p qosloop-policy-server --example ldap_change_latency [N]`

use ldap3::{LdapConnAsync, Mod};
use qosloop_policy_server::repo::{watch_ldap, LdapBind, LdapSource};
use qosloop_schema::{Kbps, SAMPLE_POLICY_LDIF};
use qosloop_testkit::harness::Slapd;
use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const BASE: &str = "dc=qosloop,dc=example";
const GOLD: &str = "cn=gold,ou=classes,dc=qosloop,dc=example";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<44} n={:<3} median {:>7.3} ms  p90 {:>7.3} ms  min {:>7.3} ms  max {:>7.3} ms",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.9)),
        ms(v[0]),
        ms(v[v.len() - 1]),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50);
    if let Err(why) = Slapd::available() {
        eprintln!("cannot run the benchmark: {why}");
        return Ok(ExitCode::FAILURE);
    }
    let slapd = Slapd::start(BASE)?;
    slapd.add_ldif(SAMPLE_POLICY_LDIF)?;
    let source = LdapSource::new(
        slapd.url(),
        BASE,
        LdapBind::Simple {
            dn: slapd.bind_dn().to_owned(),
            password: slapd.password().to_owned(),
        },
    );
    let (conn, mut ldap) = LdapConnAsync::new(&slapd.url()).await?;
    tokio::spawn(async move {
        let _ = conn.drive().await;
    });
    ldap.simple_bind(slapd.bind_dn(), slapd.password())
        .await?
        .success()?;
    println!(
        "slapd {} (syncprov), {n} changes of qosloopProfileRate each",
        slapd.url()
    );

    let mut rate = 2000;
    for settle in [source.settle, Duration::ZERO] {
        let mut s = source.clone();
        s.settle = settle;
        let mut watch = watch_ldap(s, Duration::from_secs(20)).await?;
        let mut to_policy = Vec::with_capacity(n);
        let mut modify_rtt = Vec::with_capacity(n);
        for i in 0..n {
            rate += 1;
            let value = rate.to_string();
            let change = vec![Mod::Replace(
                "qosloopProfileRate",
                HashSet::from([value.as_str()]),
            )];
            let start = Instant::now();
            let modify = async {
                let r = ldap.modify(GOLD, change).await;
                (r, start.elapsed())
            };
            let policy = async {
                let seen = tokio::time::timeout(
                    Duration::from_secs(10),
                    watch.policy.wait_for(|p| {
                        p.classes
                            .iter()
                            .any(|c| c.name == "gold" && c.profile.rate == Kbps(rate))
                    }),
                )
                .await;
                (seen.is_ok(), start.elapsed())
            };
            let ((result, rtt), (seen, latency)) = tokio::join!(modify, policy);
            result?.success()?;
            anyhow::ensure!(seen, "change {i} never reached the watch receiver");
            modify_rtt.push(rtt);
            to_policy.push(latency);
        }
        summary(
            &format!("modify sent -> new policy (settle {settle:?})"),
            to_policy,
        );
        summary(
            &format!("modify round trip, slapd write (settle {settle:?})"),
            modify_rtt,
        );
    }
    let _ = ldap.unbind().await;
    Ok(ExitCode::SUCCESS)
}
