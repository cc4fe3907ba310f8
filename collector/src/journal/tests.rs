//! The journal with a real SQLite database behind its loader: records
//! loaded once, the bound and its drop count, a torn tail after a crash,
//! the cursor across restarts.

use super::frame::{encode_frame, FrameHead};
use super::*;
use crate::store::{spawn_writer, Sink};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;

fn rec(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: "10.0.0.1".parse().unwrap(),
        dst_addr: "10.0.0.2".parse().unwrap(),
        src_port: i as u16,
        packets: 1,
        bytes: 100 + i,
        start_ns: 1_000 + i,
        end_ns: 2_000 + i,
        class: (i % 2 == 0).then(|| "web".into()),
        ..FlowRecord::default()
    }
}

/// One frame of `n` records starting at record `first`.
fn frame_of(first: u64, n: u64) -> Vec<u8> {
    let head = FrameHead {
        name: "ipfix/udp/192.0.2.1:2055".into(),
        addr: "192.0.2.1:2055".into(),
        domain: 1,
        seq: first as u32,
    };
    let records: Vec<_> = (first..first + n).map(rec).collect();
    let mut buf = Vec::new();
    encode_frame(&mut buf, &head, &records);
    buf
}

async fn sqlite(dir: &Path) -> Db {
    let db = Db::connect(&format!("sqlite://{}", dir.join("j.db").display()))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    db
}

async fn totals(db: &Db) -> (i64, i64) {
    let Db::Sqlite(p) = db else { panic!() };
    sqlx::query_as("SELECT count(*), COALESCE(sum(bytes), 0) FROM flows")
        .fetch_one(p)
        .await
        .unwrap()
}

fn config(dir: &Path, max_bytes: u64, fsync_ms: u64) -> JournalConfig {
    let mut c = JournalConfig::new(
        dir.join("journal"),
        max_bytes,
        Duration::from_millis(fsync_ms),
    );
    c.segment_bytes = 64 << 10;
    c
}

/// Opens the journal and its loader over `db`, appends `frames` frames of
/// 100 records, closes, waits for the loader: the stats.
async fn run(db: &Db, c: JournalConfig, first: u64, frames: u64) -> JournalStats {
    let j = Journal::open(c).unwrap();
    let (writer, _tasks) = spawn_writer(Sink::Db(db.clone()), 16, 10_000, 1);
    let loader = spawn_loader(j.clone(), Sink::Db(db.clone()), writer);
    for f in 0..frames {
        j.append(&frame_of(first + f * 100, 100), 100);
    }
    j.close();
    tokio::time::timeout(Duration::from_secs(30), loader)
        .await
        .unwrap()
        .unwrap();
    j.stats()
}

fn sum_bytes(range: std::ops::Range<u64>) -> i64 {
    range.map(|i| (100 + i) as i64).sum()
}

#[tokio::test]
async fn every_record_is_loaded_once_and_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    // Every append synced (fsync 0), several segments of 64 KiB.
    let s = run(&db, config(dir.path(), 64 << 20, 0), 0, 60).await;
    assert_eq!(
        (s.appended_records, s.synced_records, s.loaded_records),
        (6000, 6000, 6000)
    );
    assert_eq!((s.dropped_full, s.dropped_io, s.corrupt_frames), (0, 0, 0));
    assert_eq!(totals(&db).await, (6000, sum_bytes(0..6000)));
    // Loaded segments are deleted; the last (active) one stays.
    let left = segments(&dir.path().join("journal")).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    // Reopened: nothing is loaded twice; new records are.
    let s = run(&db, config(dir.path(), 64 << 20, 20), 6000, 5).await;
    assert_eq!(s.loaded_records, 500);
    assert_eq!(totals(&db).await, (6500, sum_bytes(0..6500)));
}

#[tokio::test]
async fn the_bound_drops_and_counts_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let c = config(dir.path(), 1 << 20, 10);
    let frame_len = frame_of(0, 100).len() as u64;
    // No loader: the journal fills to its bound.
    let j = Journal::open(c.clone()).unwrap();
    let mut kept = 0;
    for f in 0..400 {
        if j.append(&frame_of(f * 100, 100), 100) {
            kept += 1;
        }
    }
    j.close();
    let s = j.stats();
    assert!(kept < 400 && kept > 0);
    assert_eq!(s.dropped_full, (400 - kept) * 100);
    assert!(
        s.disk_bytes <= 1 << 20 && s.disk_bytes + frame_len + 64 > 1 << 20,
        "{s:?}"
    );
    drop(j);
    // The next start loads what was kept.
    let s = run(&db, c, 1_000_000, 0).await;
    assert_eq!(s.loaded_records, kept * 100);
    assert_eq!(totals(&db).await.0 as u64, kept * 100);
}

#[tokio::test]
async fn a_torn_tail_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let c = config(dir.path(), 64 << 20, 0);
    let j = Journal::open(c.clone()).unwrap();
    for f in 0..3 {
        assert!(j.append(&frame_of(f * 100, 100), 100));
    }
    j.close();
    drop(j);
    // A crash in the middle of the fourth frame's write.
    let seg = segments(&c.dir).unwrap()[0].0;
    let torn = frame_of(300, 100);
    let mut f = OpenOptions::new()
        .append(true)
        .open(segment_path(&c.dir, seg))
        .unwrap();
    f.write_all(&torn[..torn.len() / 2]).unwrap();
    drop(f);
    let s = run(&db, c, 10_000, 1).await;
    assert_eq!(s.corrupt_frames, 1);
    assert_eq!(
        s.loaded_records, 400,
        "three frames before the crash, one after"
    );
    assert_eq!(
        totals(&db).await,
        (400, sum_bytes(0..300) + sum_bytes(10_000..10_100))
    );
}

#[test]
fn a_damaged_cursor_reads_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    write_cursor(dir.path(), Pos { seg: 7, off: 99 }).unwrap();
    assert_eq!(read_cursor(dir.path()), Some(Pos { seg: 7, off: 99 }));
    let p = dir.path().join(CURSOR);
    let mut b = fs::read(&p).unwrap();
    b[3] ^= 1;
    fs::write(&p, b).unwrap();
    assert_eq!(read_cursor(dir.path()), None);
}

/// While a receiving thread reports a backlog, the loader stands aside
/// (the records are durable in the journal); once the reports stop it
/// loads everything, once. Past half the bound it loads even while busy.
#[tokio::test]
async fn the_loader_yields_to_busy_receivers() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let j = Journal::open(config(dir.path(), 64 << 20, 0)).unwrap();
    assert!(!j.receivers_busy());
    j.note_busy();
    assert!(j.receivers_busy());
    // A receiving thread that keeps finding its socket backlogged.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (j, stop) = (j.clone(), stop.clone());
        std::thread::spawn(move || {
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                j.note_busy();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (writer, _tasks) = spawn_writer(Sink::Db(db.clone()), 16, 10_000, 1);
    let loader = spawn_loader(j.clone(), Sink::Db(db.clone()), writer);
    for f in 0..10 {
        assert!(j.append(&frame_of(f * 100, 100), 100));
    }
    // Synced at once (fsync 0), yet nothing is loaded while busy.
    assert_eq!(j.stats().synced_records, 1000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(j.stats().loaded_records, 0);
    assert_eq!(totals(&db).await.0, 0);
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    // No more reports: loaded without the journal being closed.
    for _ in 0..1000 {
        if j.stats().loaded_records == 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(j.stats().loaded_records, 1000);
    assert_eq!(totals(&db).await, (1000, sum_bytes(0..1000)));
    j.close();
    loader.await.unwrap();

    // A journal past half its bound is loaded even while busy.
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(dir.path()).await;
    let frame_len = frame_of(0, 100).len() as u64;
    let mut c = config(dir.path(), 64 << 20, 0);
    c.max_bytes = 6 * frame_len;
    let j = Journal::open(c).unwrap();
    for f in 0..4 {
        assert!(j.append(&frame_of(f * 100, 100), 100));
    }
    j.note_busy();
    let (writer, _tasks) = spawn_writer(Sink::Db(db.clone()), 16, 10_000, 1);
    let loader = spawn_loader(j.clone(), Sink::Db(db.clone()), writer);
    for _ in 0..1000 {
        j.note_busy();
        if j.stats().loaded_records == 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(j.stats().loaded_records, 400);
    j.close();
    loader.await.unwrap();
}
