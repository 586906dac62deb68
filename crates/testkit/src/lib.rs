//! Test-only helpers shared by the server's and the binary's tests: a real S3-protocol server on loopback
//! ([`S3Server`], s3s-fs over a temporary folder, run in the test process) and fresh PostgreSQL databases on the
//! server `PICTOR_TEST_DATABASE_URL` names (`scripts/test.sh` starts one), or a private PostgreSQL server a test
//! can restart ([`PgCluster`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// Access key id the test S3 server accepts.
pub const S3_ACCESS_KEY: &str = "pictor-test";
/// Secret key the test S3 server accepts.
pub const S3_SECRET_KEY: &str = "pictor-test-secret";
/// Region the clients sign for.
pub const S3_REGION: &str = "us-east-1";

/// An S3-protocol server on a loopback port, storing into a temporary folder; stops when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The folder behind it (one subfolder per bucket).
    pub root: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3Server {
    /// Starts a server with the given buckets, on its own threads (so sync and async tests alike can use it).
    pub fn start(buckets: &[&str]) -> Self {
        let root = tempfile::tempdir().expect("temp dir for S3");
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b)).expect("bucket folder");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("S3 server runtime");
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the temp dir");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(S3_ACCESS_KEY, S3_SECRET_KEY));
        let service = builder.build();
        // Bound here with std (a caller may be inside a runtime, where block_on is not allowed).
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the S3 server");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr: SocketAddr = std_listener.local_addr().expect("S3 address");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        S3Server {
            endpoint: format!("http://{addr}"),
            root,
            runtime: Some(runtime),
        }
    }

    /// The environment a client (object_store, or a `pictor` process) needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.into()),
            ("AWS_REGION", S3_REGION.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A private PostgreSQL server (Debian's `postgresql` binaries) in a temporary folder on a free loopback port,
/// for tests that stop and restart the database; stopped and deleted when dropped.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

impl PgCluster {
    /// Creates and starts the server.
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .flatten()
                    .map(|v| v.path().join("bin"))
                    .filter(|b| b.join("initdb").is_file())
                    .max()
            })
            .expect("PostgreSQL binaries under /usr/lib/postgresql (Debian package postgresql)");
        let dir = tempfile::Builder::new()
            .prefix("pictor-pg")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            run(Command::new("chown").arg("postgres").arg(dir.path()));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let cluster = PgCluster { bin, dir, port };
        run(cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", "postgres", "-A", "trust", "--no-sync"]));
        cluster.pg_ctl("start");
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command for one of the server's programs, run as the `postgres` user when the tests run as root
    /// (the server refuses to run as root).
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "-m", "fast", "-o", &options, action]));
    }

    /// The admin URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (closing every connection) and starts it again on the same port.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    /// Runs one SQL statement with psql; returns its rows, one per line, columns separated by `|`.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.trim_ascii() == b"0")
            .unwrap_or(false)
}

fn run(command: &mut Command) {
    let out = command.output().expect("command starts");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PostgreSQL server the tests use (an admin URL), from `PICTOR_TEST_DATABASE_URL`. Panics with what to do
/// when it is not set: the tests fail rather than skip, so a green run always covered PostgreSQL.
pub fn postgres_server() -> String {
    std::env::var("PICTOR_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "PICTOR_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts a throwaway \
             PostgreSQL, or point it at a server where this user may create databases"
        )
    })
}

/// Creates a new, empty database on the test server and returns its URL.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let server = postgres_server();
    let name = format!("pictor_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {server}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    let mut url = url::Url::parse(&server).expect("PICTOR_TEST_DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// [`fresh_postgres_database`] for tests without a runtime of their own.
pub fn fresh_postgres_database_blocking() -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(fresh_postgres_database())
}
