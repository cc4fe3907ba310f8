//! The export server: accepts exporters, runs a session per connection and
//! one storage writer for all of them.

use crate::config::Config;
use crate::session::{self, SessionCtx};
use crate::store::{spawn_writer, Sink};
use crate::Db;
use qosloop_schema::ie;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] crate::DbError),
    #[error(transparent)]
    Tls(#[from] qosloop_exporter::TlsError),
}

/// The TLS acceptor the configuration asks for (all three files, or none).
pub fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, ServerError> {
    match (&config.tls_cert, &config.tls_key, &config.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(tokio_rustls::TlsAcceptor::from(
            qosloop_exporter::tls::server_config(cert, key, ca)?,
        ))),
        _ => Ok(None),
    }
}

/// Opens the storage named by `config.db` (`discard:` stores nothing).
pub async fn open_sink(url: &str) -> Result<Sink, crate::DbError> {
    if url == "discard:" || url == "discard://" {
        return Ok(Sink::Discard);
    }
    let db = Db::connect(url).await?;
    db.migrate().await?;
    Ok(Sink::Db(db))
}

/// Binds `config.listen` and serves until the task is dropped or aborted.
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen.clone(),
            source,
        })
}

/// Serves exporters on `listener`, storing into `sink`; over TLS with
/// mutual authentication when the configuration names the files.
pub async fn serve(listener: TcpListener, sink: Sink, config: &Config) -> Result<(), ServerError> {
    let tls = tls_acceptor(config)?;
    let (writer, _writer_task) = spawn_writer(
        sink.clone(),
        config.queue_messages,
        config.group_records,
        config.writers,
    );
    let disabled_keys = config
        .disable_keys
        .iter()
        .filter_map(|n| ie::by_name(n).map(|e| e.id))
        .collect();
    let ctx = Arc::new(SessionCtx {
        sink,
        writer,
        window: config.window,
        max_message: config.max_message,
        keepalive_s: config.keepalive_s,
        disabled_keys,
    });
    tracing::info!(listen = ?listener.local_addr().ok(), tls = tls.is_some(), "accepting exporters");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tracing::debug!(%peer, "exporter connected");
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        match &tls {
            None => {
                tokio::spawn(session::serve(Box::new(stream), peer, ctx));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(tls)) => session::serve(Box::new(tls), peer, ctx).await,
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}
