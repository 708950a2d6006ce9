//! Starts and stops a private ClickHouse server: the collector's default store, and the
//! isolated server each test process gets.
//!
//! The server runs as a child process on 127.0.0.1 with free ports, its own data folder and a
//! generated config (zstd compression). It is stopped when the handle drops, and because the
//! child is also told to die with its parent (Linux `PR_SET_PDEATHSIG`), a crashed or killed
//! collector never leaves a server behind.

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Binary names searched for, in order; a bare `clickhouse` is the single-binary build that
/// runs the server as `clickhouse server`.
const SERVER_BINARIES: [&str; 2] = ["clickhouse-server", "clickhouse"];
/// Where Debian and the official packages put them, beside `PATH`.
const EXTRA_DIRS: [&str; 3] = ["/usr/sbin", "/usr/bin", "/usr/local/bin"];
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClickHouseServer {
    child: Option<Child>,
    binary: PathBuf,
    http_port: u16,
    tcp_port: u16,
    data_dir: PathBuf,
    log_queries: bool,
}

impl ClickHouseServer {
    /// Starts a server whose data lives in `data_dir` (created if missing; existing data is
    /// kept, so a restart finds it again). `binary` overrides the search when non-empty.
    pub fn start(data_dir: &Path, binary: &str) -> anyhow::Result<Self> {
        Self::start_with(data_dir, binary, false)
    }

    /// [`Self::start`], with every query recorded in `system.query_log` (for tests that check
    /// which queries ran).
    pub fn start_logging_queries(data_dir: &Path, binary: &str) -> anyhow::Result<Self> {
        Self::start_with(data_dir, binary, true)
    }

    fn start_with(data_dir: &Path, binary: &str, log_queries: bool) -> anyhow::Result<Self> {
        let binary = find_binary(binary)?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create ClickHouse data folder {}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
        // A port can be taken between choosing and binding it; try a few times.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::spawn(&binary, &data_dir, free_port()?, free_port()?, log_queries) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Stops the server and starts it again on the same ports and data, as after a crash or
    /// an upgrade: clients configured with [`Self::url`] find it again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        *self = Self::spawn(
            &self.binary,
            &self.data_dir,
            self.http_port,
            self.tcp_port,
            self.log_queries,
        )?;
        Ok(())
    }

    fn spawn(binary: &Path, data_dir: &Path, http_port: u16, tcp_port: u16, log_queries: bool) -> anyhow::Result<Self> {
        let config_path = data_dir.join("config.xml");
        std::fs::write(&config_path, server_config(data_dir, http_port, tcp_port))?;
        let log = if log_queries {
            "\n      <log_queries>1</log_queries>"
        } else {
            ""
        };
        std::fs::write(data_dir.join("users.xml"), USERS_XML.replace("{log_queries}", log))?;
        let _ = std::fs::remove_file(data_dir.join("server.err.log"));
        let stderr = std::fs::File::create(data_dir.join("stderr.log"))?;

        let mut command = Command::new(binary);
        if binary.file_name().is_some_and(|n| n == "clickhouse") {
            command.arg("server");
        }
        command
            .arg(format!("--config-file={}", config_path.display()))
            .current_dir(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = spawn_tied_to_process(command).with_context(|| format!("cannot run {}", binary.display()))?;
        let mut server = Self {
            child: Some(child),
            binary: binary.to_path_buf(),
            http_port,
            tcp_port,
            data_dir: data_dir.to_path_buf(),
            log_queries,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`, for the `clickhouse` client.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.http_port) {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait()? {
                let stderr = std::fs::read_to_string(self.data_dir.join("stderr.log")).unwrap_or_default();
                let log = std::fs::read_to_string(self.data_dir.join("server.err.log")).unwrap_or_default();
                self.child = None;
                bail!(
                    "ClickHouse exited during start-up ({status}):\n{}\n{}",
                    tail(&stderr, 2000),
                    tail(&log, 2000)
                );
            }
            if Instant::now() > deadline {
                bail!("ClickHouse did not answer SELECT 1 within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds the server binary: `explicit` if given, else the first of [`SERVER_BINARIES`] in
/// `PATH` or the usual system folders.
pub fn find_binary(explicit: &str) -> anyhow::Result<PathBuf> {
    if !explicit.is_empty() {
        let path = PathBuf::from(explicit);
        if path.is_file() {
            return Ok(path);
        }
        bail!("clickhouse.binary {explicit:?} is not a file");
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path_var)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .collect();
    for name in SERVER_BINARIES {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "no ClickHouse server binary found (looked for clickhouse-server or clickhouse in PATH \
         and {}). Install one (Debian/Ubuntu: `apt-get install clickhouse-server`), set \
         clickhouse.binary to its path, or point the collector at an existing server with \
         clickhouse.url (SIGHTLINE_CLICKHOUSE__URL=http://host:8123).",
        EXTRA_DIRS.join(", ")
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// ClickHouse's `/ping` answers "Ok." once the server accepts queries.
fn ping(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut stream) =
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = "GET /?query=SELECT%201 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// Spawns from a thread that lives as long as the process, so that `PR_SET_PDEATHSIG` (which
/// fires when the *spawning thread* exits) fires only when the whole process is gone.
fn spawn_tied_to_process(mut command: Command) -> std::io::Result<Child> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("clickhouse-parent".into())
        .spawn(move || {
            let _ = tx.send(command.spawn());
            loop {
                std::thread::park();
            }
        })?;
    rx.recv().map_err(|_| std::io::Error::other("spawner thread died"))?
}

fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

fn server_config(data_dir: &Path, http_port: u16, tcp_port: u16) -> String {
    let dir = data_dir.display();
    format!(
        r#"<?xml version="1.0"?>
<!-- Generated by sightline for its private server; rewritten at every start. -->
<yandex>
  <logger>
    <level>warning</level>
    <log>{dir}/server.log</log>
    <errorlog>{dir}/server.err.log</errorlog>
    <size>50M</size>
    <count>2</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>200</max_concurrent_queries>
  <query_log>
    <database>system</database>
    <table>query_log</table>
    <flush_interval_milliseconds>7500</flush_interval_milliseconds>
  </query_log>
  <compression>
    <case><method>zstd</method></case>
  </compression>
</yandex>
"#
    )
}

const USERS_XML: &str = r#"<?xml version="1.0"?>
<yandex>
  <profiles>
    <default>
      <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>{log_queries}
    </default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default></default></quotas>
</yandex>
"#;
