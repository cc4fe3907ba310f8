//! An ephemeral OpenLDAP server: a `cn=config` built with `slapadd -n0` in a
//! temporary directory (stock schemas core/cosine/inetorgperson, then
//! qosloop's own from [`qosloop_schema::LDAP_SCHEMA_LDIF`]), `back_mdb` and
//! `syncprov` loaded from /usr/lib/ldap, one mdb database for the base DN
//! with a root DN and password and the syncprov overlay on it, and `slapd`
//! in the foreground on a free loopback port and an ldapi socket in the
//! same directory. Reads are open to everyone; over ldapi, the current
//! user's SASL EXTERNAL identity is mapped to the root DN.
//!
//! Entries are written with the `ldap-utils` tools (`ldapmodify`,
//! `ldapdelete`, `ldapsearch`) so that tests exercise slapd through a
//! client that is not qosloop's own.

use super::{free_port, tail, wait_until, HarnessError};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Stock schemas loaded before qosloop's (in this order).
const STOCK_SCHEMAS: &[&str] = &["core", "cosine", "inetorgperson"];
const STOCK_SCHEMA_DIR: &str = "/etc/ldap/schema";
const MODULE_DIR: &str = "/usr/lib/ldap";
const PASSWORD: &str = "qosloop-test";

/// The binaries the harness runs and the Debian package of each.
const BINARIES: &[(&str, &str)] = &[
    ("slapd", "slapd"),
    ("slapadd", "slapd"),
    ("slapmodify", "slapd"),
    ("ldapmodify", "ldap-utils"),
    ("ldapdelete", "ldap-utils"),
    ("ldapsearch", "ldap-utils"),
];

/// A running slapd; stopped and deleted on drop (also when a test panics).
#[derive(Debug)]
pub struct Slapd {
    dir: tempfile::TempDir,
    base_dn: String,
    bind_dn: String,
    port: u16,
    /// `ldaps://` port when started with TLS (StartTLS then works on `port`).
    tls_port: Option<u16>,
    child: Option<Child>,
}

fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    let package = BINARIES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("slapd", |(_, p)| *p);
    super::require_binary(name, package).map_err(HarnessError::Missing)
}

impl Slapd {
    /// Whether slapd could be started here; the error names the Debian
    /// package to install (`slapd` or `ldap-utils`).
    pub fn available() -> Result<(), String> {
        for (name, package) in BINARIES {
            super::require_binary(name, package)?;
        }
        for module in ["back_mdb", "syncprov"] {
            let path = Path::new(MODULE_DIR).join(format!("{module}.la"));
            if !path.is_file() {
                return Err(format!(
                    "{} not found: install the Debian package slapd (apt-get install slapd)",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    /// Builds a fresh configuration for `base_dn` and starts slapd. The
    /// database is empty: not even the base entry exists.
    pub fn start(base_dn: &str) -> Result<Slapd, HarnessError> {
        Self::start_inner(base_dn, false)
    }

    /// Like [`Slapd::start`], with TLS: a throwaway PKI ([`super::test_pki`])
    /// in [`Slapd::tls_dir`], `ldaps://` on [`Slapd::ldaps_url`] and StartTLS
    /// on [`Slapd::url`]; clients check the server against `tls_dir()/ca.pem`.
    pub fn start_tls(base_dn: &str) -> Result<Slapd, HarnessError> {
        Self::start_inner(base_dn, true)
    }

    fn start_inner(base_dn: &str, tls: bool) -> Result<Slapd, HarnessError> {
        Self::available().map_err(HarnessError::Missing)?;
        let dir = tempfile::Builder::new()
            .prefix("qosloop-slapd-")
            .tempdir()
            .map_err(HarnessError::io("creating a directory for slapd"))?;
        let mut slapd = Slapd {
            dir,
            base_dn: base_dn.to_owned(),
            bind_dn: format!("cn=admin,{base_dn}"),
            port: 0,
            tls_port: None,
            child: None,
        };
        if tls {
            let pki = slapd.tls_dir();
            std::fs::create_dir(&pki).map_err(HarnessError::io("creating the PKI directory"))?;
            super::test_pki(&pki)?;
            slapd.tls_port = Some(free_port()?);
        }
        let config_dir = slapd.dir.path().join("slapd.d");
        let db_dir = slapd.dir.path().join("db");
        for d in [&config_dir, &db_dir] {
            std::fs::create_dir(d)
                .map_err(HarnessError::io(format!("creating {}", d.display())))?;
        }
        let ldif = slapd.config_ldif()?;
        let ldif_path = slapd.dir.path().join("config.ldif");
        std::fs::write(&ldif_path, ldif).map_err(HarnessError::io("writing config.ldif"))?;
        let mut slapadd = Command::new(binary("slapadd")?);
        slapadd
            .arg("-n0")
            .arg("-F")
            .arg(&config_dir)
            .arg("-l")
            .arg(&ldif_path);
        super::run(&mut slapadd, "slapadd -n0 (building cn=config)")?;
        slapd.launch()?;
        Ok(slapd)
    }

    fn config_ldif(&self) -> Result<String, HarnessError> {
        let dir = self.dir.path();
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let peer = format!("gidNumber={gid}+uidNumber={uid},cn=peercred,cn=external,cn=auth");
        let mut ldif = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            ldif,
            "dn: cn=config\n\
             objectClass: olcGlobal\n\
             cn: config\n\
             olcPidFile: {pid}\n\
             olcAuthzRegexp: {{0}}\"{peer_re}\" \"{bind}\"\n\
             {tls}\
             \n\
             dn: cn=module{{0}},cn=config\n\
             objectClass: olcModuleList\n\
             cn: module{{0}}\n\
             olcModulePath: {MODULE_DIR}\n\
             olcModuleLoad: {{0}}back_mdb\n\
             olcModuleLoad: {{1}}syncprov\n\
             \n\
             dn: cn=schema,cn=config\n\
             objectClass: olcSchemaConfig\n\
             cn: schema\n\n",
            pid = dir.join("slapd.pid").display(),
            peer_re = peer.replace('+', "\\+"),
            bind = self.bind_dn,
            tls = if self.tls_port.is_some() {
                let pki = self.tls_dir();
                format!(
                    "olcTLSCACertificateFile: {}\nolcTLSCertificateFile: {}\nolcTLSCertificateKeyFile: {}\n",
                    pki.join("ca.pem").display(),
                    pki.join("server.pem").display(),
                    pki.join("server.key").display()
                )
            } else {
                String::new()
            },
        );
        for name in STOCK_SCHEMAS {
            let path = Path::new(STOCK_SCHEMA_DIR).join(format!("{name}.ldif"));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                HarnessError::Missing(format!(
                    "{}: {e}: install the Debian package slapd (apt-get install slapd)",
                    path.display()
                ))
            })?;
            ldif.push_str(text.trim_end());
            ldif.push_str("\n\n");
        }
        ldif.push_str(qosloop_schema::LDAP_SCHEMA_LDIF.trim_end());
        ldif.push_str("\n\n");
        let _ = write!(
            ldif,
            "dn: olcDatabase={{-1}}frontend,cn=config\n\
             objectClass: olcDatabaseConfig\n\
             objectClass: olcFrontendConfig\n\
             olcDatabase: {{-1}}frontend\n\
             olcAccess: {{0}}to * by * read\n\
             \n\
             dn: olcDatabase={{0}}config,cn=config\n\
             objectClass: olcDatabaseConfig\n\
             olcDatabase: {{0}}config\n\
             olcAccess: {{0}}to * by dn.exact=\"{peer}\" manage by * none\n\
             \n\
             dn: olcDatabase={{1}}mdb,cn=config\n\
             objectClass: olcDatabaseConfig\n\
             objectClass: olcMdbConfig\n\
             olcDatabase: {{1}}mdb\n\
             olcSuffix: {base}\n\
             olcRootDN: {bind}\n\
             olcRootPW: {PASSWORD}\n\
             olcDbDirectory: {db}\n\
             olcDbMaxSize: 268435456\n\
             olcDbNoSync: TRUE\n\
             olcDbIndex: objectClass eq\n\
             olcDbIndex: entryCSN eq\n\
             olcDbIndex: entryUUID eq\n\
             olcAccess: {{0}}to * by * read\n\
             \n\
             dn: olcOverlay={{0}}syncprov,olcDatabase={{1}}mdb,cn=config\n\
             objectClass: olcOverlayConfig\n\
             objectClass: olcSyncProvConfig\n\
             olcOverlay: {{0}}syncprov\n\
             olcSpCheckpoint: 100 10\n\
             olcSpSessionlog: 1000\n",
            base = self.base_dn,
            bind = self.bind_dn,
            db = dir.join("db").display(),
        );
        Ok(ldif)
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        // Keep the port across restarts so URLs stay valid.
        if self.port == 0 {
            self.port = free_port()?;
        }
        let log = self.log_path();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(HarnessError::io("creating the slapd log"))?;
        let err_file = log_file
            .try_clone()
            .map_err(HarnessError::io("opening the slapd log"))?;
        let mut urls = format!("{} {}", self.url(), self.ldapi_url());
        if let Some(ldaps) = self.ldaps_url() {
            urls = format!("{urls} {ldaps}");
        }
        let mut cmd = Command::new(binary("slapd")?);
        cmd.args(["-d", "none", "-F"])
            .arg(self.dir.path().join("slapd.d"))
            .arg("-h")
            .arg(urls)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file);
        let child = cmd.spawn().map_err(HarnessError::io("starting slapd"))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let ready = wait_until(Duration::from_secs(30), || {
            if self.exited() {
                return true;
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.ldapi_path().exists()
                && self.root_dse_answers()
        });
        if !ready || self.exited() {
            let detail = tail(&log, 20);
            self.kill();
            return Err(HarnessError::Failed {
                what: "starting slapd".into(),
                detail,
            });
        }
        Ok(())
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn root_dse_answers(&self) -> bool {
        let Ok(bin) = binary("ldapsearch") else {
            return false;
        };
        Command::new(bin)
            .args([
                "-x",
                "-LLL",
                "-H",
                &self.url(),
                "-b",
                "",
                "-s",
                "base",
                "1.1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops slapd (SIGTERM, SIGKILL after 10 s); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts a stopped slapd again on the same port and socket, with the
    /// data it had.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.launch()
    }

    /// Stops and starts slapd.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.start_again()
    }

    pub fn is_running(&mut self) -> bool {
        !self.exited()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `ldap://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// `ldaps://127.0.0.1:PORT/` when started with [`Slapd::start_tls`].
    pub fn ldaps_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("ldaps://127.0.0.1:{p}/"))
    }

    /// The throwaway PKI of [`Slapd::start_tls`]: `ca.pem`, `server.pem`
    /// (for 127.0.0.1), `client.pem` and their keys.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// `ldapi://` URL of the Unix socket (path percent-encoded).
    pub fn ldapi_url(&self) -> String {
        format!("ldapi://{}/", percent_encode_path(&self.ldapi_path()))
    }

    /// The path of the ldapi socket.
    pub fn ldapi_path(&self) -> PathBuf {
        self.dir.path().join("ldapi")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_dn(&self) -> &str {
        &self.base_dn
    }

    /// The root DN, `cn=admin,BASE`.
    pub fn bind_dn(&self) -> &str {
        &self.bind_dn
    }

    /// The root DN's password (simple bind).
    pub fn password(&self) -> &str {
        PASSWORD
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// slapd's own output (stdout and stderr), for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("slapd.log")
    }

    /// Adds the entries of an LDIF (content records, no `changetype`
    /// needed) as the root DN.
    pub fn add_ldif(&self, ldif: &str) -> Result<(), HarnessError> {
        self.ldapmodify(&["-a"], ldif, "ldapmodify -a (adding entries)")
    }

    /// Applies LDIF change records (`changetype: add|modify|delete|modrdn`)
    /// as the root DN.
    pub fn modify_ldif(&self, ldif: &str) -> Result<(), HarnessError> {
        self.ldapmodify(&[], ldif, "ldapmodify (applying changes)")
    }

    /// Applies LDIF change records to the database of a stopped slapd
    /// (`slapmodify`), as an operator would while the server is down.
    pub fn modify_offline(&mut self, ldif: &str) -> Result<(), HarnessError> {
        if !self.exited() {
            return Err(HarnessError::Failed {
                what: "slapmodify".into(),
                detail: "slapd is running: stop it first".into(),
            });
        }
        let path = self.dir.path().join("offline-change.ldif");
        std::fs::write(&path, ldif).map_err(HarnessError::io("writing offline-change.ldif"))?;
        let mut cmd = Command::new(binary("slapmodify")?);
        cmd.arg("-F")
            .arg(self.dir.path().join("slapd.d"))
            .arg("-b")
            .arg(&self.base_dn)
            .arg("-l")
            .arg(&path);
        super::run(&mut cmd, "slapmodify (changing the stopped database)").map(|_| ())
    }

    /// Deletes one entry as the root DN.
    pub fn delete(&self, dn: &str) -> Result<(), HarnessError> {
        let mut cmd = Command::new(binary("ldapdelete")?);
        cmd.args([
            "-x",
            "-H",
            &self.url(),
            "-D",
            &self.bind_dn,
            "-w",
            PASSWORD,
            dn,
        ]);
        super::run(&mut cmd, &format!("ldapdelete {dn}")).map(|_| ())
    }

    /// `ldapsearch -LLL` under `base` (subtree) for `filter`; the LDIF it
    /// prints, unwrapped. `attrs` empty means all user attributes.
    pub fn search(&self, base: &str, filter: &str, attrs: &[&str]) -> Result<String, HarnessError> {
        self.search_scope(base, "sub", filter, attrs)
    }

    /// Like [`Slapd::search`] with a scope: `base`, `one`, `sub`.
    pub fn search_scope(
        &self,
        base: &str,
        scope: &str,
        filter: &str,
        attrs: &[&str],
    ) -> Result<String, HarnessError> {
        let mut cmd = Command::new(binary("ldapsearch")?);
        cmd.args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &self.url(),
            "-s",
            scope,
            "-b",
            base,
            filter,
        ])
        .args(attrs);
        super::run(&mut cmd, &format!("ldapsearch -b {base} {filter}"))
    }

    fn ldapmodify(&self, extra: &[&str], ldif: &str, what: &str) -> Result<(), HarnessError> {
        let mut cmd = Command::new(binary("ldapmodify")?);
        cmd.args(["-x", "-H", &self.url(), "-D", &self.bind_dn, "-w", PASSWORD])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(HarnessError::io(what.to_owned()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(ldif.as_bytes())
                .map_err(HarnessError::io(what.to_owned()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(HarnessError::io(what.to_owned()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HarnessError::Failed {
                what: what.to_owned(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }
}

/// Percent-encodes every byte of a path but unreserved URL characters, as
/// ldapi URLs need (`/` becomes `%2F`).
fn percent_encode_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldapi_paths_are_percent_encoded() {
        assert_eq!(
            percent_encode_path(Path::new("/tmp/a b/ldapi")),
            "%2Ftmp%2Fa%20b%2Fldapi"
        );
    }
}
