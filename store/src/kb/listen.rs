//! Waking up on new knowledge-base events: `LISTEN qosloop_kb` on
//! PostgreSQL, and in every process the in-process channel its own writes
//! signal (the only wake-up on SQLite). A wake-up carries nothing: the
//! listener then reads `kb_events` after the last id it saw, so nothing is
//! lost between wake-ups and order is the ids'.

use crate::Db;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::broadcast;

/// The process's channel.
pub(super) fn local() -> &'static broadcast::Sender<()> {
    static CHANNEL: OnceLock<broadcast::Sender<()>> = OnceLock::new();
    CHANNEL.get_or_init(|| broadcast::channel(16).0)
}

/// A subscriber's wake-ups.
#[derive(Debug)]
pub struct KbListener {
    pg: Option<sqlx::postgres::PgListener>,
    local: broadcast::Receiver<()>,
}

impl Db {
    /// A listener for knowledge-base events (on PostgreSQL it holds one
    /// connection of its own).
    pub async fn kb_listener(&self) -> Result<KbListener, sqlx::Error> {
        let local = local().subscribe();
        let pg = match self {
            Db::Postgres(pool) => {
                let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
                l.listen(super::KB_CHANNEL).await?;
                Some(l)
            }
            Db::Sqlite(_) => None,
        };
        Ok(KbListener { pg, local })
    }
}

impl KbListener {
    /// Waits for a wake-up or `timeout`; says whether one came. A lost
    /// PostgreSQL connection is an error (the caller reconnects).
    pub async fn wait(&mut self, timeout: Duration) -> Result<bool, sqlx::Error> {
        let KbListener { pg, local } = self;
        let local = async {
            match local.recv().await {
                Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                    false
                }
            }
        };
        let pg = async {
            match pg {
                Some(l) => l.recv().await.map(|_| true),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            woke = local => Ok(woke),
            r = pg => r,
            _ = tokio::time::sleep(timeout) => Ok(false),
        }
    }
}
