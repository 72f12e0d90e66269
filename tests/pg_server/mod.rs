//! A private PostgreSQL server for tests and benchmarks: `initdb` and `pg_ctl` from
//! Debian's `postgresql` (/usr/lib/postgresql/*/bin), a free loopback port, the data
//! directory under a tempdir, run as `nobody` when we are root (PostgreSQL refuses root).
//! The server default is `synchronous_commit = off`, so a test or benchmark shows that
//! the store turns it on for its own transactions. Stopped (immediate) on drop. Included with `#[path]` by tests/quarantine_cluster.rs and
//! benches/quarantine_cluster.rs.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql is missing: apt-get install -y postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().expect("no PostgreSQL server binaries found")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        if is_root() {
            // The tempdir is 0700 root: let nobody in, and own its data directory.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let nobody = nix_uid("nobody");
            std::os::unix::fs::chown(&data, Some(nobody.0), Some(nobody.1)).expect("chown");
        }
        let pg = Postgres {
            bin: pg_bin(),
            data,
            port: free_port(),
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data_str(),
                "-U",
                "mw",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        pg.pg_ctl_start();
        pg
    }

    fn data_str(&self) -> &str {
        self.data.to_str().expect("utf-8 path")
    }

    /// Runs a server binary, as nobody when we are root.
    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = c
            .args(args)
            .current_dir(&self.data)
            .stdin(Stdio::null())
            .output()
            .expect("run PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on -c synchronous_commit=off",
            self.port,
            self.data_str()
        );
        let log = format!("{}/server.log", self.data_str());
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data_str(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Fast shutdown: open transactions are rolled back, clients disconnected.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", self.data_str(), "-m", "fast", "-w", "stop"],
        );
    }

    pub fn url(&self) -> String {
        format!("postgresql://mw@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(if is_root() { "runuser" } else { "true" })
            .args(if is_root() {
                vec!["-u", "nobody", "--"]
            } else {
                vec![]
            })
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data_str(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// uid and gid of a system user, from /etc/passwd.
fn nix_uid(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .map(|f| (f[2].parse().expect("uid"), f[3].parse().expect("gid")))
        .unwrap_or_else(|| panic!("no user {name}"))
}
