//! An ephemeral PostgreSQL server: `initdb` into a temporary directory,
//! `postgres` on a free loopback port, trust authentication for the
//! `postgres` role. As root (CI), both run as the `postgres` system user,
//! since PostgreSQL refuses to run as root.

use super::{free_port, run, tail, wait_until, HarnessError};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running PostgreSQL; stopped and deleted on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    settings: Vec<String>,
    child: Option<Child>,
}

/// The newest server binaries under /usr/lib/postgresql/*/bin.
fn server_bin_dir() -> Result<PathBuf, HarnessError> {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d).ok_or_else(|| {
        HarnessError::Missing(
            "PostgreSQL server not found under /usr/lib/postgresql/*/bin: install the Debian package postgresql".into(),
        )
    })
}

impl Postgres {
    /// Whether a server could be started here; the error names the package.
    pub fn available() -> Result<(), String> {
        server_bin_dir().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Starts a fresh server with durability traded for speed (`fsync=off`).
    pub fn start() -> Result<Postgres, HarnessError> {
        Self::start_with(&["-c", "fsync=off", "-c", "full_page_writes=off"])
    }

    /// Starts a fresh server with PostgreSQL's durable defaults.
    pub fn start_durable() -> Result<Postgres, HarnessError> {
        Self::start_with(&[])
    }

    fn start_with(settings: &[&str]) -> Result<Postgres, HarnessError> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("qosloop-pg-")
            .tempdir()
            .map_err(HarnessError::io("creating a directory for PostgreSQL"))?;
        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    HarnessError::Missing(
                        "no postgres system user to run PostgreSQL as (root is refused): install the Debian package postgresql".into(),
                    )
                })?;
            let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(HarnessError::io("handing the data directory to postgres"))?;
            Some((uid, gid))
        } else {
            None
        };
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(HarnessError::io("restricting the data directory"))?;
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]);
        as_owner(&mut initdb, owner);
        run(&mut initdb, "initdb")?;
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            owner,
            settings: Vec::new(),
            child: None,
        };
        pg.settings = settings.iter().map(|s| s.to_string()).collect();
        pg.launch()?;
        Ok(pg)
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let log_file =
            fs::File::create(&log).map_err(HarnessError::io("creating the PostgreSQL log"))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid))
                .map_err(HarnessError::io("handing the log to postgres"))?;
        }
        let err_file = log_file
            .try_clone()
            .map_err(HarnessError::io("opening the PostgreSQL log"))?;
        // Keep the port across restarts so URLs stay valid.
        if self.port == 0 {
            self.port = free_port()?;
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=100",
            ])
            .args(&self.settings)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file);
        as_owner(&mut cmd, self.owner);
        let child = cmd.spawn().map_err(HarnessError::io("starting postgres"))?;
        self.child = Some(child);
        let pid_file = data.join("postmaster.pid");
        // The 8th line of postmaster.pid reads "ready" once connections are accepted.
        let ready = wait_until(Duration::from_secs(60), || {
            fs::read_to_string(&pid_file)
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false)
        });
        if !ready {
            let detail = tail(&log, 20);
            self.kill();
            return Err(HarnessError::Failed {
                what: "starting postgres".into(),
                detail,
            });
        }
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a database (through `psql`'s sibling, `createdb`).
    pub fn create_database(&self, name: &str) -> Result<(), HarnessError> {
        let createdb = self.bin.join("createdb");
        let mut cmd = Command::new(createdb);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            name,
        ]);
        run(&mut cmd, "createdb").map(|_| ())
    }

    /// Stops the server (fast shutdown) and starts it again on the same port.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.launch()
    }

    /// Starts a stopped server again (same data, same port); a running
    /// one is left alone. With [`Postgres::stop`], an outage of chosen
    /// length.
    pub fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.launch()
    }

    /// Stops the server: SIGINT (fast shutdown), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
