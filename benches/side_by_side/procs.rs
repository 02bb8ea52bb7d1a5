//! The processes under test: the Apollo simulator, nginx and creditmeter, each started on a free
//! loopback port, plus what Linux says about them (CPU time, resident memory).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The creditmeter binary cargo built for this benchmark.
pub const CREDITMETER: &str = env!("CARGO_BIN_EXE_creditmeter");

/// A child process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Service {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    /// The processes whose CPU and memory count for this service (nginx: master and workers).
    pub pids: Vec<u32>,
    pub log: PathBuf,
}

impl Service {
    fn spawn(name: &str, mut cmd: Command, addr: SocketAddr, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        let mut svc = Service {
            name: name.to_owned(),
            addr,
            child,
            pids: vec![pid],
            log,
        };
        svc.wait_listening(Duration::from_secs(30))?;
        Ok(svc)
    }

    fn wait_listening(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {}; its log ({}):\n{}",
                    self.name,
                    self.addr,
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} within {within:?}",
                    self.name,
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// CPU seconds (user + system) used so far by this service's processes.
    pub fn cpu_secs(&self) -> f64 {
        self.pids.iter().filter_map(|p| cpu_secs(*p)).sum()
    }

    /// Resident memory of this service's processes now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids
            .iter()
            .filter_map(|p| status_kib(*p, "VmRSS:"))
            .sum()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address nobody listens on (bound, then released).
pub fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

/// `creditmeter sim-apollo`, with rate limits high enough never to answer 429 under load
/// (their headers still come back, as Apollo sends them), and every identifier matching, so
/// answers have their full size.
pub fn start_sim(dir: &Path) -> Result<Service> {
    let addr = free_addr()?;
    let mut cmd = Command::new(CREDITMETER);
    cmd.args([
        "sim-apollo",
        "--listen",
        &addr.to_string(),
        "--rate-limit-minute",
        "1000000000",
        "--match-rate",
        "100",
    ])
    .env("RUST_LOG", "warn");
    Service::spawn("sim-apollo", cmd, addr, dir)
}

/// How a creditmeter under test is set up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    /// Defaults: metering on, durable ledger (row committed before the response ends).
    Durable,
    /// `proxy.metering = false`: a plain forwarder, to isolate metering's own cost.
    Off,
}

/// `creditmeter serve` in front of the simulator, on its defaults except the addresses.
/// `settings` are extra `section.key=value` lines (TOML values) for the metered creditmeter,
/// for trying a setting side by side with the defaults.
pub fn start_creditmeter(
    dir: &Path,
    upstream: SocketAddr,
    metering: Metering,
    settings: &[String],
) -> Result<Service> {
    let addr = free_addr()?;
    let admin = free_addr()?;
    let name = match metering {
        Metering::Durable => "creditmeter",
        Metering::Off => "creditmeter-nometer",
    };
    let ledger = dir.join(format!("{name}.db"));
    let mut config = format!(
        // No load balancer: stop at once on SIGTERM (shutdown.drain_delay would hold it 5s).
        "[proxy]\nlisten = \"{addr}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[upstream]\nbase_url = \"http://{upstream}\"\n\n[ledger]\npath = \"{}\"\n\n[shutdown]\ndrain_delay = \"0s\"\n",
        ledger.display()
    );
    if metering == Metering::Off {
        config = config.replacen("[proxy]\n", "[proxy]\nmetering = false\n", 1);
    } else {
        for setting in settings {
            let (path, value) = setting
                .split_once('=')
                .with_context(|| format!("--set {setting}: expected section.key=value"))?;
            let (section, key) = path
                .trim()
                .split_once('.')
                .with_context(|| format!("--set {setting}: expected section.key=value"))?;
            let header = format!("[{section}]\n");
            let line = format!("{key} = {}\n", value.trim());
            match config.find(&header) {
                Some(at) => config.insert_str(at + header.len(), &line),
                None => config.push_str(&format!("\n{header}{line}")),
            }
        }
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(CREDITMETER);
    cmd.arg("serve").arg("--config").arg(&path);
    Service::spawn(name, cmd, addr, dir)
}

/// The ledger file a metered creditmeter writes.
pub fn ledger_path(dir: &Path) -> PathBuf {
    dir.join("creditmeter.db")
}

/// Debian's nginx as a plain reverse proxy: `proxy_pass` to a keep-alive upstream pool, no
/// access log, worker count and keep-alive limits an operator would set for an API proxy.
pub fn start_nginx(dir: &Path, nginx: &str, upstream: SocketAddr) -> Result<Service> {
    let addr = free_addr()?;
    let temp = dir.join("nginx-temp");
    std::fs::create_dir_all(&temp)?;
    // Workers may run as another user: let them write their temp files.
    let _ = Command::new("chmod")
        .args(["-R", "a+rwx"])
        .arg(dir)
        .status();
    let conf = format!(
        r#"worker_processes auto;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream apollo {{
        server {upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://apollo;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#,
        dir = dir.display(),
        temp = temp.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    let mut svc = Service::spawn("nginx", cmd, addr, dir)?;
    // The master forks its workers; their CPU and memory are nginx's too.
    let master = svc.pids[0];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let workers = children(master);
        if !workers.is_empty() {
            svc.pids.extend(workers);
            break;
        }
        if Instant::now() > deadline {
            bail!("nginx (pid {master}) started no worker processes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(svc)
}

/// Whether `nginx` can be run, and its version line.
pub fn nginx_version(nginx: &str) -> Result<String> {
    let out = Command::new(nginx).arg("-v").output().with_context(|| {
        format!(
            "cannot run `{nginx}`: install Debian's nginx (bench/run.sh does) or pass --nginx PATH"
        )
    })?;
    Ok(String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Linux's USER_HZ, the unit of `/proc/*/stat` times.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (all its threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of stat; `f` starts at field 3.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// A `Vm*:` line of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Rows in the ledger's `calls` table (read while creditmeter writes: WAL allows it).
pub fn ledger_rows(path: &Path) -> Result<u64> {
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening the ledger {}", path.display()))?;
    db.busy_timeout(Duration::from_secs(5))?;
    let n: i64 = db.query_row("SELECT count(*) FROM calls", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// One line describing the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.0} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}
