//! Where outputs, stored init images and uploads live. Keys look like `generations/0-<uuid>.png`; the local
//! implementation keeps them under `DATA/files/` and the service serves them at `PUBLIC_URL/<key>`. An
//! S3-compatible store implements the same trait and hands out its own URLs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

/// Object storage for the service's files.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Writes `bytes` at `key`, replacing what was there.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), String>;
    /// Reads `key`; `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Removes `key` (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), String>;
    /// Keys under `prefix` (e.g. `temp/`) last written more than `age` ago.
    async fn older_than(&self, prefix: &str, age: Duration) -> Result<Vec<String>, String>;
    /// The public URL of `key`.
    fn url(&self, key: &str) -> String;
}

/// True for keys made of safe path segments (no `..`, no absolute paths, no odd characters).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Files in a local folder.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    public_url: String,
}

impl LocalStorage {
    /// Files under `root`, served at `public_url/<key>`.
    pub fn new(root: PathBuf, public_url: &str) -> Self {
        LocalStorage {
            root,
            public_url: public_url.trim_end_matches('/').to_string(),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, String> {
        if !valid_key(key) {
            return Err(format!("invalid storage key {key:?}"));
        }
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("partial");
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), String> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    async fn older_than(&self, prefix: &str, age: Duration) -> Result<Vec<String>, String> {
        let dir = self.root.join(prefix.trim_end_matches('/'));
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        let cutoff = SystemTime::now() - age;
        let mut keys = Vec::new();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            if meta.is_file() && meta.modified().map(|m| m <= cutoff).unwrap_or(false) {
                keys.push(format!(
                    "{}/{}",
                    prefix.trim_end_matches('/'),
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.public_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        assert!(valid_key("generations/0-abc.png"));
        for bad in [
            "",
            "../x",
            "a/../b",
            "/etc/passwd",
            "a//b",
            ".hidden",
            "a/b c",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn put_get_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path().into(), "http://h:1/");
        s.put("temp/a.png", b"abc".to_vec()).await.unwrap();
        assert_eq!(s.get("temp/a.png").await.unwrap().unwrap(), b"abc");
        assert_eq!(s.get("temp/b.png").await.unwrap(), None);
        assert_eq!(s.url("temp/a.png"), "http://h:1/temp/a.png");
        assert!(s
            .older_than("temp/", Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            s.older_than("temp/", Duration::ZERO).await.unwrap(),
            vec!["temp/a.png".to_string()]
        );
        s.delete("temp/a.png").await.unwrap();
        assert_eq!(s.get("temp/a.png").await.unwrap(), None);
        assert!(s.put("../x", vec![]).await.is_err());
    }
}
