//! A `redis-server` a test owns, so it can kill it and start it again on its files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Running, free_port, wait_until};

/// A `redis-server` of this scenario's own, on a fixed port and folder so it can restart.
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    pub process: Option<Running>,
}

impl Redis {
    pub fn start(dir: &Path) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: dir.join("redis"),
            process: None,
        };
        redis.spawn();
        redis
    }

    pub fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("create the redis folder");
        let server = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|path| Path::new(path).is_file())
            .expect("redis-server is missing (Debian package redis-server): run ./scripts/test, which installs it");
        let child = Command::new(server)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.process = Some(Running { child });
        let port = self.port;
        wait_until("redis answers PING", Duration::from_secs(20), || {
            redis_command(port, b"PING\r\n", b"+PONG\r\n")
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn signal(&self, name: &str) {
        self.process.as_ref().expect("redis runs").signal(name);
    }

    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("KILL");
            let _ = process.child.wait();
        }
    }

    pub fn flush(&self) {
        assert!(
            redis_command(self.port, b"FLUSHALL\r\n", b"+OK\r\n"),
            "FLUSHALL failed"
        );
    }

    /// Deletes the AOF and everything else Redis kept: a restart on a new, empty disk.
    pub fn lose_data(&self) {
        std::fs::remove_dir_all(&self.dir).expect("remove the redis folder");
    }

    /// Copies Redis's files as they are now (the AOF may be cut mid-command; Redis loads a
    /// truncated AOF by default).
    pub fn snapshot(&self, to: &Path) {
        let status = Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(to)
            .status()
            .expect("run cp");
        assert!(status.success(), "copy the redis folder");
    }

    /// Puts back the files [`Redis::snapshot`] copied.
    pub fn restore(&self, from: &Path) {
        self.lose_data();
        std::fs::rename(from, &self.dir).expect("restore the redis folder");
    }
}

/// Sends `command` (RESP inline) and says whether Redis answered `expect`.
pub fn redis_command(port: u16, command: &[u8], expect: &[u8]) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = vec![0u8; expect.len()];
    stream.write_all(command).is_ok() && stream.read_exact(&mut reply).is_ok() && reply == expect
}
