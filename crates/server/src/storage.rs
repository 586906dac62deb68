//! Where outputs, stored init images and uploads live. Keys look like `generations/0-<uuid>.png`. Two kinds of
//! store sit behind one implementation over the `object_store` crate: a local folder (the default, `DATA/files/`)
//! and an S3-compatible bucket (`s3://BUCKET[/PREFIX]`, endpoint and credentials from the standard AWS variables),
//! which every node of a deployment shares. Either way the API serves a file at `PUBLIC_URL/<key>`, so its URLs
//! work from any API node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

/// Object storage for the service's files.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Writes `bytes` at `key`, replacing what was there (readers never see half a file).
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), String>;
    /// Reads `key`; `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Removes `key` (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), String>;
    /// Keys under `prefix` (e.g. `temp/`) last written more than `age` ago.
    async fn older_than(&self, prefix: &str, age: Duration) -> Result<Vec<String>, String>;
    /// Every key under `prefix`, with its size in bytes.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, String>;
    /// Writes the file at `path` to `key`, streaming it (model weights are gigabytes).
    async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<(), String>;
    /// Streams `key` into the file at `path` (written beside it, then renamed); `false` when absent.
    async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<bool, String>;
    /// The public URL of `key`.
    fn url(&self, key: &str) -> String;
}

/// Longest file name a key segment may have (what file systems allow).
const MAX_SEGMENT: usize = 255;
/// Longest key.
const MAX_KEY: usize = 1024;

/// True for keys made of safe path segments (no `..`, no absolute paths, no odd characters, no name longer than
/// a file system takes).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg.len() <= MAX_SEGMENT
                && !seg.starts_with('.')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// Where files live, as `--storage` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLocation {
    /// A local folder.
    Folder(PathBuf),
    /// An S3-compatible bucket, keys under `prefix` (empty for the bucket's root).
    S3 {
        /// The bucket.
        bucket: String,
        /// Key prefix, without slashes at either end.
        prefix: String,
    },
}

impl StorageLocation {
    /// Parses `s3://BUCKET[/PREFIX]` or a folder path.
    pub fn parse(spec: &str) -> Result<Self, String> {
        match spec.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let prefix = prefix.trim_matches('/');
                if bucket.is_empty() || !(prefix.is_empty() || valid_key(prefix)) {
                    return Err(format!(
                        "{spec:?} is not s3://BUCKET or s3://BUCKET/PREFIX (prefix of letters, digits, '-', '_', '.')"
                    ));
                }
                Ok(StorageLocation::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.to_string(),
                })
            }
            None if spec.contains("://") => Err(format!(
                "{spec:?}: storage is a folder or s3://BUCKET[/PREFIX]"
            )),
            None => Ok(StorageLocation::Folder(PathBuf::from(spec))),
        }
    }
}

/// Files in an `object_store` store (folder or bucket), served at `public_url/<key>`.
#[derive(Debug, Clone)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    public_url: String,
}

impl ObjectStorage {
    /// Opens `location`; an S3 bucket takes its endpoint and credentials from the environment
    /// (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP`).
    pub fn open(location: &StorageLocation, public_url: &str) -> Result<Self, String> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match location {
            StorageLocation::Folder(root) => {
                std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| format!("{}: {e}", root.display()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), String::new())
            }
            StorageLocation::S3 { bucket, prefix } => {
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| format!("S3 bucket {bucket}: {e}"))?;
                (Arc::new(s3), prefix.clone())
            }
        };
        Ok(ObjectStorage {
            store,
            prefix,
            public_url: public_url.trim_end_matches('/').to_string(),
        })
    }

    fn path(&self, key: &str) -> Result<ObjectPath, String> {
        if !valid_key(key) {
            return Err(format!("invalid storage key {key:?}"));
        }
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        })
    }

    /// Every object under `prefix` (a folder that was never written lists as missing: none).
    async fn objects(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, String> {
        let dir = self.path(prefix.trim_end_matches('/'))?;
        let mut listing = self.store.list(Some(&dir));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            match meta {
                Ok(meta) => found.push(meta),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(format!("listing {prefix}: {e}")),
            }
        }
        Ok(found)
    }

    /// The key of a stored path (the inverse of `path`).
    fn key_of(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(full)
                .to_string()
        }
    }
}

#[async_trait]
impl Storage for ObjectStorage {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        let path = self.path(key)?;
        self.store
            .put(&path, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| format!("storing {key}: {e}"))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.path(key)?;
        match self.store.get(&path).await {
            Ok(found) => found
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|e| format!("reading {key}: {e}")),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(format!("reading {key}: {e}")),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), String> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("deleting {key}: {e}")),
        }
    }

    async fn older_than(&self, prefix: &str, age: Duration) -> Result<Vec<String>, String> {
        let cutoff = chrono_cutoff(age);
        let mut keys: Vec<String> = self
            .objects(prefix)
            .await?
            .into_iter()
            .filter(|meta| meta.last_modified.timestamp_millis() <= cutoff)
            .map(|meta| self.key_of(&meta.location))
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, String> {
        let mut found: Vec<(String, u64)> = self
            .objects(prefix)
            .await?
            .into_iter()
            .map(|meta| (self.key_of(&meta.location), meta.size))
            .collect();
        found.sort();
        Ok(found)
    }

    async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let target = self.path(key)?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), target);
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        match copied {
            Ok(_) => writer
                .shutdown()
                .await
                .map_err(|e| format!("storing {key}: {e}")),
            Err(e) => {
                let _ = writer.abort().await;
                Err(format!("storing {key}: {e}"))
            }
        }
    }

    async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<bool, String> {
        use tokio::io::AsyncWriteExt;
        let source = self.path(key)?;
        let found = match self.store.get(&source).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(format!("reading {key}: {e}")),
        };
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let partial = path.with_file_name(format!(
            ".{}.{}.partial",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            uuid::Uuid::new_v4().simple()
        ));
        let written = async {
            let mut file = tokio::fs::File::create(&partial).await?;
            let mut chunks = found.into_stream();
            while let Some(chunk) = chunks.next().await {
                file.write_all(&chunk.map_err(std::io::Error::other)?)
                    .await?;
            }
            file.sync_all().await?;
            tokio::fs::rename(&partial, path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(format!("{}: {e}", path.display()));
        }
        Ok(true)
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.public_url)
    }
}

/// The time `age` ago, in milliseconds since the Unix epoch.
fn chrono_cutoff(age: Duration) -> i64 {
    (crate::jobs::now() * 1000.0) as i64 - age.as_millis() as i64
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
            &format!("generations/{}.png", "a".repeat(300)),
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn locations() {
        assert_eq!(
            StorageLocation::parse("s3://bucket/some/prefix/").unwrap(),
            StorageLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            StorageLocation::parse("s3://bucket").unwrap(),
            StorageLocation::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            StorageLocation::parse("data/files").unwrap(),
            StorageLocation::Folder("data/files".into())
        );
        for bad in ["s3://", "s3:///x", "s3://b/../x", "gs://b"] {
            assert!(StorageLocation::parse(bad).is_err(), "{bad}");
        }
    }

    /// What every storage does, run on a folder and on a real S3-protocol server.
    async fn contract(s: ObjectStorage) {
        s.put("temp/a.png", b"abc".to_vec()).await.unwrap();
        s.put("temp/a.png", b"abcd".to_vec()).await.unwrap();
        assert_eq!(s.get("temp/a.png").await.unwrap().unwrap(), b"abcd");
        assert_eq!(s.get("temp/b.png").await.unwrap(), None);
        assert_eq!(s.url("temp/a.png"), "http://h:1/temp/a.png");
        s.put("generations/0-x.png", vec![1; 70_000]).await.unwrap();
        assert_eq!(
            s.get("generations/0-x.png").await.unwrap().unwrap().len(),
            70_000
        );
        assert!(s
            .older_than("temp/", Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            s.older_than("temp/", Duration::ZERO).await.unwrap(),
            vec!["temp/a.png".to_string()]
        );
        assert!(s
            .older_than("never-written/", Duration::ZERO)
            .await
            .unwrap()
            .is_empty());
        s.delete("temp/a.png").await.unwrap();
        s.delete("temp/a.png").await.unwrap();
        assert_eq!(s.get("temp/a.png").await.unwrap(), None);
        assert!(s.put("../x", vec![]).await.is_err());
        assert!(s.get("a/../../x").await.is_err());

        // Files stream in and out; listings give sizes.
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("w.safetensors"), &big).unwrap();
        s.put_file(
            "models/checkpoints/m/w.safetensors",
            &dir.path().join("w.safetensors"),
        )
        .await
        .unwrap();
        s.put("models/checkpoints/m/config.json", b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(
            s.list("models/").await.unwrap(),
            vec![
                ("models/checkpoints/m/config.json".to_string(), 2),
                (
                    "models/checkpoints/m/w.safetensors".to_string(),
                    big.len() as u64
                ),
            ]
        );
        let copy = dir.path().join("copy/w.safetensors");
        assert!(s
            .get_file("models/checkpoints/m/w.safetensors", &copy)
            .await
            .unwrap());
        assert_eq!(std::fs::read(&copy).unwrap(), big);
        assert!(!s.get_file("models/none", &copy).await.unwrap());
        assert!(s.list("nothing/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn folder_storage() {
        let dir = tempfile::tempdir().unwrap();
        let location = StorageLocation::Folder(dir.path().join("files"));
        let s = ObjectStorage::open(&location, "http://h:1/").unwrap();
        contract(s).await;
        assert!(dir.path().join("files/generations/0-x.png").is_file());
    }

    #[tokio::test]
    async fn s3_storage() {
        let server = pictor_testkit::S3Server::start(&["outputs"]);
        for (k, v) in server.env() {
            std::env::set_var(k, v);
        }
        let location = StorageLocation::parse("s3://outputs/pictor/v1").unwrap();
        let s = ObjectStorage::open(&location, "http://h:1").unwrap();
        contract(s).await;
        assert!(
            server
                .root
                .path()
                .join("outputs/pictor/v1/generations/0-x.png")
                .is_file(),
            "the object is in the bucket under the prefix"
        );
    }
}
