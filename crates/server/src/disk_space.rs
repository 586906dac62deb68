//! Refusing new jobs while a local disk the service writes to is nearly full.
//!
//! An accepted job needs room for its init image, its outputs and its rows in the job database. When the data
//! folder's disk fills up, outputs fail to store and SQLite cannot grow its log (it then answers "database is
//! locked" or "database or disk is full" to every writer, even to the worker recording a finished job), so jobs
//! accepted or started then would only fail or hang. [`DiskGuard`] looks at the free space of every local folder
//! the service writes to (the data folder, the SQLite file's folder, a folder storage) and says when one has less
//! than the configured minimum: job-making routes then answer 503 with a retry hint, and workers claim no new job
//! (queued jobs wait, safe in the store, and run once there is room), so the minimum stays a reserve for the
//! outcomes of jobs already running. Buckets and PostgreSQL servers are not looked at: they report their own faults.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one look at the free space is trusted (a burst of requests costs one `statvfs` per folder).
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The free-space check in front of job-making routes.
#[derive(Debug)]
pub struct DiskGuard {
    folders: Vec<PathBuf>,
    min_free: u64,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl DiskGuard {
    /// A guard over `folders` (folders that do not exist yet are judged by their nearest existing parent) that
    /// wants at least `min_free` bytes free on each; zero turns it off.
    pub fn new(folders: Vec<PathBuf>, min_free: u64) -> Self {
        let mut folders = folders;
        folders.sort();
        folders.dedup();
        DiskGuard {
            folders,
            min_free,
            last: Mutex::new(None),
        }
    }

    /// `Ok` when every folder has the minimum free; otherwise a message naming the fullest one, fit to tell a
    /// client. A folder whose free space cannot be read does not block (the write itself will say what is wrong).
    pub fn check(&self) -> Result<(), String> {
        if self.min_free == 0 {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, verdict)) = last.as_ref() {
            if at.elapsed() < FRESH_FOR {
                return verdict.clone();
            }
        }
        let verdict = self.look();
        let was_low = last.as_ref().is_some_and(|(_, v)| v.is_err());
        match (&verdict, was_low) {
            (Err(message), false) => {
                tracing::warn!(message = %message, "disk nearly full: refusing new jobs and pausing workers")
            }
            (Ok(()), true) => {
                tracing::info!("disk space is back: accepting and running jobs again")
            }
            _ => {}
        }
        *last = Some((Instant::now(), verdict.clone()));
        verdict
    }

    fn look(&self) -> Result<(), String> {
        for folder in &self.folders {
            match free_bytes(folder) {
                Ok(free) if free < self.min_free => {
                    return Err(format!(
                        "the server's disk is full ({} MiB free in {}, new jobs need {} MiB); try again later",
                        free >> 20,
                        folder.display(),
                        self.min_free.div_ceil(1 << 20)
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(folder = %folder.display(), error = %e, "cannot read the free space")
                }
            }
        }
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest existing
/// parent).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut at = path;
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    let stat = rustix::fs::statvfs(at)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The local folder of a `sqlite:PATH` job-store URL (query string and `//` forms included); `None` for other
/// stores and in-memory databases.
pub fn sqlite_folder(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    let path = Path::new(path);
    Some(match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_free_space_of_a_folder_and_of_a_folder_not_made_yet() {
        let dir = tempfile::tempdir().unwrap();
        let here = free_bytes(dir.path()).unwrap();
        assert!(here > 0);
        let later = free_bytes(&dir.path().join("files/outputs")).unwrap();
        // The same file system: the two readings differ only by what others wrote in between.
        assert!(here.abs_diff(later) < 1 << 30, "{here} vs {later}");
    }

    #[test]
    fn refuses_below_the_minimum_and_names_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let roomy = DiskGuard::new(vec![dir.path().to_path_buf()], 1 << 20);
        assert_eq!(roomy.check(), Ok(()));
        let wanting = DiskGuard::new(vec![dir.path().to_path_buf()], free + (1 << 40));
        let message = wanting.check().unwrap_err();
        assert!(message.contains("disk is full"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        // Zero turns the guard off.
        assert_eq!(DiskGuard::new(vec![dir.path().into()], 0).check(), Ok(()));
    }

    #[test]
    fn finds_the_folder_of_a_sqlite_url() {
        assert_eq!(
            sqlite_folder("sqlite:/var/lib/pictor/jobs.db"),
            Some(PathBuf::from("/var/lib/pictor"))
        );
        assert_eq!(
            sqlite_folder("sqlite:///srv/jobs.db?mode=rwc"),
            Some(PathBuf::from("/srv"))
        );
        assert_eq!(sqlite_folder("sqlite:jobs.db"), Some(PathBuf::from(".")));
        assert_eq!(sqlite_folder("sqlite::memory:"), None);
        assert_eq!(sqlite_folder("postgres://u@h/db"), None);
    }
}
