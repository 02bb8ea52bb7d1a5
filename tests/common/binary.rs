//! The real `creditmeter` binary as a child process: `serve` with a config file written here,
//! stderr captured to a file, ready when `/readyz` answers. Used where a test must measure or
//! grep the process itself (its peak memory, every byte it wrote).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_creditmeter");

/// A free port on 127.0.0.1 (bound, read, released: the child binds it a moment later).
///
/// Never the same port twice in this process: the integration tests are one binary, and two
/// tests (or a proxy and an admin port of one test) asking in quick succession could otherwise
/// be handed a port the kernel just freed.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `creditmeter serve` in a directory of its own.
pub struct Served {
    pub child: Child,
    pub dir: PathBuf,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub ledger: PathBuf,
    pub stderr_log: PathBuf,
}

impl Served {
    /// Writes `dir/creditmeter.toml` (listeners on free ports, `ledger.db` in `dir`, then
    /// `settings` as `("section.key", "toml value")`) and starts `serve` with `env` set,
    /// waiting until `/readyz` says ready.
    pub fn start(dir: &Path, settings: &[(&str, String)], env: &[(&str, &str)]) -> Served {
        let (proxy_port, admin_port) = (free_port(), free_port());
        let ledger = dir.join("ledger.db");
        let cfg = dir.join("creditmeter.toml");
        let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        sections
            .entry("proxy")
            .or_default()
            .push(format!("listen = \"127.0.0.1:{proxy_port}\""));
        sections
            .entry("admin")
            .or_default()
            .push(format!("listen = \"127.0.0.1:{admin_port}\""));
        sections
            .entry("ledger")
            .or_default()
            .push("path = \"ledger.db\"".to_owned());
        // No load balancer polls these: stop at once on SIGTERM unless a test says otherwise.
        if !settings.iter().any(|(k, _)| *k == "shutdown.drain_delay") {
            sections
                .entry("shutdown")
                .or_default()
                .push("drain_delay = \"0s\"".to_owned());
        }
        for (key, value) in settings {
            let (section, name) = key.split_once('.').expect("section.key");
            sections
                .entry(section)
                .or_default()
                .push(format!("{name} = {value}"));
        }
        let text: String = sections
            .iter()
            .map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n")))
            .collect();
        std::fs::write(&cfg, text).unwrap();
        let stderr_log = dir.join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.join("stdout.log")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&stderr_log).unwrap()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut served = Served {
            child,
            dir: dir.to_owned(),
            proxy_port,
            admin_port,
            ledger,
            stderr_log,
        };
        served.wait_ready();
        served
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "creditmeter exited early ({status}):\n{}",
                    std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
                );
            }
            if let Ok((200, _)) = http_get(self.admin_port, "/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "creditmeter did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:<proxy port>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy_port)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").unwrap().1
    }

    /// SIGTERM, then waits (30 s at most) for a clean exit.
    pub fn stop(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0), "SIGTERM is a clean exit");
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("creditmeter did not exit within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A blocking `GET` over a fresh connection: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
