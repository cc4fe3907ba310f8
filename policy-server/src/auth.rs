//! Who may use the HTTP API, and for what (issue 17 part 4).
//!
//! - **Tokens.** `api_tokens_file` names a TOML file of bearer tokens,
//!   each stored as its SHA-256 (never the token itself), with a role:
//!   `read` (every `GET`) or `admin` (everything). A request presents
//!   `Authorization: Bearer TOKEN`; the token is hashed and compared with
//!   every entry in constant time.
//! - **Tokens in the directory.** With `api_tokens_directory` the policy
//!   repository's `qosloopApiToken` entries ([`crate::repo::DirectoryToken`],
//!   the same name, role, SHA-256 and scope) are accepted too, as they are
//!   now: an entry added, changed or removed in LDAP takes effect with the
//!   policy's next version. The API then needs a token even while the
//!   directory holds none.
//! - **Admin by construction.** Every request whose method can change
//!   state (anything but `GET`, `HEAD`, `OPTIONS`) needs an admin token,
//!   whatever route it reaches: a route added later (measurement requests,
//!   decision overrides, enforcer clean-up, policy reload) is protected
//!   without doing anything. A `GET` that must be admin-only too takes the
//!   [`Admin`] extractor.
//! - **Scope.** A token may carry a scope: a filter expression in the
//!   console's language that the server adds to every query the token
//!   makes (a customer sees only its prefixes). It is applied by a
//!   [`ScopeHook`]; the default, [`FilterParamScope`], ANDs it into the
//!   `filter` parameter of the routes that take one and refuses the token
//!   (403) everywhere else, so a scoped token never reads unscoped data.
//! - **CORS** is off unless `cors_allowed_origins` lists origins.
//! - **Failures** (no token, unknown token, read token on an admin
//!   request, scope not applicable) are answered 401/403, logged with the
//!   peer (throttled) and counted ([`AuthStats`], in `/metrics`).
//!
//! With no token configured the API is open (as before this module), and
//! the server says so at start.

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use qosloop_runtime::digest::{constant_time_eq, parse_sha256_hex, sha256};
use qosloop_schema::guard::LogThrottle;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The repository's tokens as [`crate::repo::PolicyWatch::tokens`] carries them.
pub type DirectoryTokens = watch::Receiver<Arc<Vec<crate::repo::DirectoryToken>>>;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every read (`GET`, `HEAD`).
    Read,
    /// Everything.
    Admin,
}

/// One entry of the tokens file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    /// Who holds it (logs, never secret).
    name: String,
    role: Role,
    /// SHA-256 of the token, 64 hex digits (`printf %s TOKEN | sha256sum`).
    sha256: String,
    /// A filter expression added to every query of this token.
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A token the server accepts.
#[derive(Clone, Debug)]
struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
    scope: Option<String>,
}

/// The authenticated caller, in the request's extensions for handlers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name; `anonymous` when the API is open.
    pub name: String,
    pub role: Role,
    pub scope: Option<String>,
    /// Whether a token proved `name`; false for the open API's
    /// `anonymous`, which identifies nobody.
    pub authenticated: bool,
}

/// The peer of a connection, put in each request's extensions by the web
/// server for logging.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Applies a token's scope to a request (see the module doc).
pub trait ScopeHook: Send + Sync + std::fmt::Debug {
    /// Checks a scope expression at start: a token whose scope does not
    /// parse is a configuration error.
    fn check(&self, scope: &str) -> Result<(), String>;
    /// Rewrites `req` so that it reads only what `scope` allows, or says
    /// why the route cannot be scoped (the request is then refused, 403).
    fn apply(&self, scope: &str, req: &mut Request) -> Result<(), String>;
}

/// The default [`ScopeHook`]: `filter=(SCOPE) AND (FILTER)` on the routes
/// listed, refusal elsewhere. The console's filter compiler then applies
/// it with bound parameters, like any filter.
#[derive(Clone, Debug)]
pub struct FilterParamScope {
    /// Paths that take a `filter` parameter.
    pub paths: Vec<String>,
}

impl Default for FilterParamScope {
    fn default() -> Self {
        FilterParamScope {
            paths: ["flows", "top", "timeseries", "sankey"]
                .iter()
                .map(|p| format!("/api/v1/{p}"))
                .collect(),
        }
    }
}

impl ScopeHook for FilterParamScope {
    fn check(&self, scope: &str) -> Result<(), String> {
        if scope.trim().is_empty() {
            return Err("empty scope (omit the key for an unscoped token)".into());
        }
        crate::console::filter::parse(scope)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn apply(&self, scope: &str, req: &mut Request) -> Result<(), String> {
        let path = req.uri().path().to_owned();
        if !self.paths.contains(&path) {
            return Err(format!(
                "this token is scoped and {path} cannot be filtered by its scope"
            ));
        }
        // Decoded as the console's `Query` decodes it.
        let Query(mut pairs) = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
            .map_err(|e| format!("reading the query: {e}"))?;
        let mut scoped = false;
        for (k, v) in pairs.iter_mut() {
            if k == "filter" && !scoped {
                *v = if v.trim().is_empty() {
                    scope.to_owned()
                } else {
                    format!("({scope}) AND ({v})")
                };
                scoped = true;
            } else if k == "filter" {
                // A second filter would be refused by the console anyway;
                // never let one through unscoped.
                return Err("filter given twice".into());
            }
        }
        if !scoped {
            pairs.push(("filter".into(), scope.to_owned()));
        }
        let query = encode_query(&pairs);
        let uri = format!("{path}?{query}")
            .parse()
            .map_err(|e| format!("rewriting the query: {e}"))?;
        *req.uri_mut() = uri;
        Ok(())
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Failed authentications, by reason.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// No `Authorization: Bearer` header (401).
    pub missing: AtomicU64,
    /// A token no entry matches (401).
    pub invalid: AtomicU64,
    /// A read token on an admin request (403).
    pub forbidden: AtomicU64,
    /// A scoped token on a route its scope cannot apply to (403).
    pub out_of_scope: AtomicU64,
}

impl AuthStats {
    /// `(reason, count)` for `/metrics`.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("missing", n(&self.missing)),
            ("invalid", n(&self.invalid)),
            ("forbidden", n(&self.forbidden)),
            ("out_of_scope", n(&self.out_of_scope)),
        ]
    }
}

/// A configuration error of the access control.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {why}")]
pub struct AuthConfigError {
    pub key: &'static str,
    pub why: String,
}

fn bad(key: &'static str, why: impl Into<String>) -> AuthConfigError {
    AuthConfigError {
        key,
        why: why.into(),
    }
}

/// The API's access control, shared by every request.
#[derive(Clone, Debug)]
pub struct Auth {
    tokens: Arc<Vec<Token>>,
    /// Whether tokens from the directory are required (then the API is
    /// never open, even before they arrive or when there are none).
    directory_enforced: bool,
    directory: Option<DirectoryTokens>,
    cors_origins: Arc<Vec<String>>,
    hook: Arc<dyn ScopeHook>,
    pub stats: Arc<AuthStats>,
    log: Arc<LogThrottle>,
}

impl Default for Auth {
    /// Open: no token, no CORS.
    fn default() -> Self {
        Auth::open()
    }
}

impl Auth {
    /// No token configured: every request is admin.
    pub fn open() -> Auth {
        Auth {
            tokens: Arc::new(Vec::new()),
            directory_enforced: false,
            directory: None,
            cors_origins: Arc::new(Vec::new()),
            hook: Arc::new(FilterParamScope::default()),
            stats: Arc::new(AuthStats::default()),
            log: Arc::new(LogThrottle::new(Duration::from_secs(1))),
        }
    }

    /// Reads the tokens file (if any) and the allowed origins; every
    /// scope is checked by `hook`.
    pub fn load(
        tokens_file: Option<&Path>,
        cors_origins: Vec<String>,
        hook: Arc<dyn ScopeHook>,
    ) -> Result<Auth, AuthConfigError> {
        let mut tokens = Vec::new();
        if let Some(path) = tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad("api_tokens_file", format!("{}: {e}", path.display())))?;
            tokens = parse_tokens(&text, hook.as_ref())
                .map_err(|e| bad("api_tokens_file", format!("{}: {e}", path.display())))?;
        }
        for o in &cors_origins {
            let ok = (o.starts_with("https://") || o.starts_with("http://"))
                && !o.ends_with('/')
                && HeaderValue::from_str(o).is_ok();
            if !ok {
                return Err(bad(
                    "cors_allowed_origins",
                    format!("{o:?}: an origin is scheme://host[:port], no path"),
                ));
            }
        }
        Ok(Auth {
            tokens: Arc::new(tokens),
            cors_origins: Arc::new(cors_origins),
            hook,
            ..Auth::open()
        })
    }

    /// Whether any token is configured (else the API is open).
    pub fn is_enforced(&self) -> bool {
        !self.tokens.is_empty() || self.directory_enforced
    }

    /// Requires tokens, accepting those of the policy repository once
    /// [`Auth::with_directory_tokens`] gives them (`api_tokens_directory`).
    pub fn require_directory_tokens(mut self) -> Auth {
        self.directory_enforced = true;
        self
    }

    /// Whether `api_tokens_directory` asked for the repository's tokens.
    pub fn wants_directory_tokens(&self) -> bool {
        self.directory_enforced
    }

    /// Accepts the policy repository's tokens, as they are at each
    /// request (and requires a token from now on).
    pub fn with_directory_tokens(mut self, tokens: DirectoryTokens) -> Auth {
        self.directory_enforced = true;
        self.directory = Some(tokens);
        self
    }

    /// Logs at start what protects the API.
    pub fn announce(&self) {
        if self.is_enforced() {
            let admins = self.tokens.iter().filter(|t| t.role == Role::Admin).count();
            let directory = self.directory.as_ref().map_or(0, |d| d.borrow().len());
            tracing::info!(
                tokens = self.tokens.len(),
                admin_tokens = admins,
                directory_tokens = directory,
                from_directory = self.directory_enforced,
                "HTTP API: bearer tokens required"
            );
        } else {
            tracing::warn!("HTTP API is open: no api_tokens_file, so anyone who reaches the port reads everything and may change state");
        }
    }

    /// The token matching `presented`, comparing every entry (the file's,
    /// then the directory's).
    fn find(&self, presented: &str) -> Option<Token> {
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for t in self.tokens.iter() {
            if constant_time_eq(&t.digest, &digest) && found.is_none() {
                found = Some(t.clone());
            }
        }
        if let Some(directory) = &self.directory {
            for t in directory.borrow().iter() {
                if constant_time_eq(&t.digest, &digest) && found.is_none() {
                    found = Some(Token {
                        name: t.name.clone(),
                        role: t.role,
                        digest: t.digest,
                        scope: t.scope.clone(),
                    });
                }
            }
        }
        found
    }

    fn refuse(
        &self,
        status: StatusCode,
        counter: &AtomicU64,
        peer: Option<SocketAddr>,
        req: &Request,
        why: &str,
    ) -> Response {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.log.check() {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            tracing::warn!(%peer, method = %req.method(), path = %req.uri().path(), status = status.as_u16(), why, suppressed, "HTTP API request refused");
        }
        let mut r = (status, Json(serde_json::json!({ "error": why }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"qosloop\""),
            );
        }
        r
    }

    fn cors_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.cors_origins
            .iter()
            .any(|o| o == text)
            .then(|| origin.clone())
    }
}

fn parse_tokens(text: &str, hook: &dyn ScopeHook) -> Result<Vec<Token>, String> {
    let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
    let mut out: Vec<Token> = Vec::new();
    for e in file.token {
        let digest = parse_sha256_hex(&e.sha256)
            .ok_or_else(|| format!("token {:?}: sha256 must be 64 hex digits", e.name))?;
        if e.name.is_empty() {
            return Err("a token has an empty name".into());
        }
        if out.iter().any(|t| t.name == e.name) {
            return Err(format!("token {:?} twice", e.name));
        }
        if out.iter().any(|t| t.digest == digest) {
            return Err(format!("token {:?} has the hash of another token", e.name));
        }
        if let Some(scope) = &e.scope {
            hook.check(scope)
                .map_err(|why| format!("token {:?}: scope: {why}", e.name))?;
            if e.role == Role::Admin {
                return Err(format!(
                    "token {:?}: an admin token cannot be scoped (it can change what every scope sees)",
                    e.name
                ));
            }
        }
        out.push(Token {
            name: e.name,
            role: e.role,
            digest,
            scope: e.scope,
        });
    }
    Ok(out)
}

/// Whether `method` can change state.
fn needs_admin(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The live page's assets: public (they hold no data; the page asks for a
/// token and sends it with every API request it makes).
const PUBLIC_ASSETS: [&str; 3] = ["/live", "/live/live.js", "/live/live.css"];

/// Answers `GET /live/access`, whether the API wants a token, so that
/// the live page can ask for one before it makes a request.
pub const ACCESS_PATH: &str = "/live/access";

/// The middleware: CORS, authentication, admin for state changes, scope.
pub async fn guard(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        let path = req.uri().path();
        if path == ACCESS_PATH {
            return Json(serde_json::json!({ "token_required": auth.is_enforced() }))
                .into_response();
        }
        if PUBLIC_ASSETS.contains(&path) {
            return next.run(req).await;
        }
    }
    let origin = auth.cors_origin(req.headers());
    // A CORS preflight carries no credentials: answered here, before
    // authentication, and only for allowed origins.
    if req.method() == Method::OPTIONS {
        let Some(origin) = origin else {
            return StatusCode::FORBIDDEN.into_response();
        };
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return r;
    }
    let principal = if auth.is_enforced() {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .map(str::to_owned);
        let Some(presented) = presented else {
            return auth.refuse(
                StatusCode::UNAUTHORIZED,
                &auth.stats.missing,
                peer,
                &req,
                "a bearer token is required",
            );
        };
        let Some(token) = auth.find(&presented) else {
            return auth.refuse(
                StatusCode::UNAUTHORIZED,
                &auth.stats.invalid,
                peer,
                &req,
                "unknown token",
            );
        };
        Principal {
            name: token.name,
            role: token.role,
            scope: token.scope,
            authenticated: true,
        }
    } else {
        Principal {
            name: "anonymous".into(),
            role: Role::Admin,
            scope: None,
            authenticated: false,
        }
    };
    if needs_admin(req.method()) && principal.role != Role::Admin {
        let why = format!("{} needs an admin token", req.method());
        return auth.refuse(
            StatusCode::FORBIDDEN,
            &auth.stats.forbidden,
            peer,
            &req,
            &why,
        );
    }
    if let Some(scope) = principal.scope.clone() {
        if let Err(why) = auth.hook.apply(&scope, &mut req) {
            return auth.refuse(
                StatusCode::FORBIDDEN,
                &auth.stats.out_of_scope,
                peer,
                &req,
                &why,
            );
        }
    }
    req.extensions_mut().insert(principal);
    let mut r = next.run(req).await;
    if let Some(origin) = origin {
        r.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}

/// An extractor for handlers that must be admin-only even on `GET`:
/// refuses with 403 unless the caller's token is admin.
#[derive(Clone, Debug)]
pub struct Admin(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Principal>() {
            Some(p) if p.role == Role::Admin => Ok(Admin(p.clone())),
            _ => Err((
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({ "error": "this needs an admin token" })),
            )
                .into_response()),
        }
    }
}

/// Wraps `router` in [`guard`]: every route, present and future.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    auth: Auth,
) -> axum::Router<S> {
    router.layer(axum::middleware::from_fn_with_state(auth, guard))
}

/// The web server's access control and TLS from the configuration keys
/// (`api_tokens_file`, `cors_allowed_origins`, `http_tls_cert`/`_key`).
#[allow(clippy::type_complexity)]
pub fn web_security(
    tokens_file: Option<&Path>,
    cors_origins: Vec<String>,
    tls_cert: Option<&Path>,
    tls_key: Option<&Path>,
) -> Result<(Auth, Option<Arc<tokio_rustls::rustls::ServerConfig>>), AuthConfigError> {
    let auth = Auth::load(
        tokens_file,
        cors_origins,
        Arc::new(FilterParamScope::default()),
    )?;
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(
            qosloop_runtime::tls::server_config_with(cert, key, None)
                .map_err(|e| bad("http_tls_cert", e.to_string()))?,
        ),
        (None, None) => None,
        _ => {
            return Err(bad(
                "http_tls_cert",
                "http_tls_cert and http_tls_key go together",
            ))
        }
    };
    Ok((auth, tls))
}
