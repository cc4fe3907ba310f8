//! A writer frozen inside a COPY (its process stopped mid-batch, its host
//! hung) holds the keys of the messages it was storing, and PostgreSQL
//! waits for its client without end. The writer that took those messages
//! over ends it (`Db::end_frozen_copies`) and stores them once; nothing else
//! is ended.

use qosloop_schema::FlowRecord;
use qosloop_store::{Batch, Db, Outcome, APPLICATION_NAME};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection as _;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

/// A session named `app` that stored message 1's key and then began a
/// COPY it sends nothing to: a collector stopped mid-batch.
async fn frozen_writer(url: &str, app: &str, exporter: i64) -> (PgConnection, i32) {
    let opts = PgConnectOptions::from_str(url)
        .unwrap()
        .application_name(app);
    let mut c = PgConnection::connect_with(&opts).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("INSERT INTO data_messages VALUES ($1, 1, $2, 1, 0)")
        .bind(exporter)
        .bind(i64::from(pid))
        .execute(&mut c)
        .await
        .unwrap();
    // The COPY is left open: the server now waits for the client's data.
    std::mem::forget(
        c.copy_in_raw("COPY flows (exporter_id) FROM STDIN")
            .await
            .unwrap(),
    );
    (c, pid)
}

async fn alive(db: &Db, pid: i32) -> bool {
    let Db::Postgres(p) = db else { unreachable!() };
    sqlx::query_scalar::<_, bool>("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(p)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_frozen_inside_a_copy_is_ended_and_its_message_stored_once() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let ex = db.register_exporter("m", "127.0.0.1:1", 1).await.unwrap();
    let (_frozen, frozen_pid) = frozen_writer(&pg.url(), APPLICATION_NAME, ex).await;
    // Another program's COPY waiting for its client is not qosloop's to end.
    let (_other, other_pid) = frozen_writer(&pg.url(), "psql", ex).await;
    let since = Instant::now();

    // The writer that took message 1 over (seq = the frozen pid) waits.
    let batch = Batch {
        exporter_id: ex,
        session_id: 1,
        seq: frozen_pid as u32,
        records: vec![FlowRecord::default(); 3],
        dedup: true,
    };
    let writer = {
        let db = db.clone();
        tokio::spawn(async move { db.commit_batches(&[&batch]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the key is held by the frozen writer"
    );

    // Silent for less than asked: nothing ended.
    assert_eq!(
        db.end_frozen_copies(Duration::from_secs(3600))
            .await
            .unwrap(),
        Vec::<i32>::new()
    );
    let silent_for = Duration::from_millis(200);
    tokio::time::sleep(silent_for.saturating_sub(since.elapsed())).await;
    let ended = db.end_frozen_copies(silent_for).await.unwrap();
    assert_eq!(
        ended,
        vec![frozen_pid],
        "only qosloop's frozen COPY is ended"
    );
    assert!(alive(&db, other_pid).await);

    // The waiting writer now stores the message, once.
    let outcome = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer is free once the frozen one is ended")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, vec![Outcome::Stored]);
    let Db::Postgres(p) = &db else { unreachable!() };
    let (messages, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM data_messages WHERE seq = $1), \
                (SELECT count(*) FROM flows WHERE seq = $1)",
    )
    .bind(i64::from(frozen_pid))
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!((messages, rows), (1, 3));
}
