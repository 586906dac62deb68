//! Models shared between the nodes of a deployment through its file storage: the models folder is mirrored under
//! the `models/` prefix (same relative paths: `checkpoints/<id>/…`, `checkpoints/<id>.safetensors`, `vae/…`,
//! `loras/…`, `embeddings/…`). A node that adds models (`load_model`, `load_vae`, `sync_models`) publishes the
//! files the storage lacks; a worker pulls the files it lacks into its own models folder, its local cache, before
//! it runs a job (and an API node before it refuses a model it does not know). Only deployments on a shared job
//! store do this: on one machine the models folder is the only copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::storage::{valid_key, Storage};

/// Where the mirror lives in the storage.
pub const PREFIX: &str = "models/";

/// What a publish or pull moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    /// Relative paths copied.
    pub files: Vec<String>,
    /// Bytes copied.
    pub bytes: u64,
}

/// Every regular file under `root` as (path relative to `root` with `/` separators, size), skipping hidden and
/// partial files.
fn local_files(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".partial") {
                continue;
            }
            let path = rel.join(&name);
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.to_string_lossy().replace('\\', "/");
                out.push((rel, meta.len()));
            }
        }
    }
    out.sort();
    out
}

/// Both sides of the mirror: the shared files and the local ones, each as (path relative to the models folder,
/// size).
async fn listings(
    storage: &dyn Storage,
    root: &Path,
) -> Result<(Vec<(String, u64)>, Vec<(String, u64)>), String> {
    let shared = storage
        .list(PREFIX)
        .await?
        .into_iter()
        .filter_map(|(key, size)| Some((key.strip_prefix(PREFIX)?.to_string(), size)))
        .collect();
    let root = root.to_path_buf();
    let local = tokio::task::spawn_blocking(move || local_files(&root))
        .await
        .map_err(|e| e.to_string())?;
    Ok((shared, local))
}

/// The files of `from` that `to` lacks or holds with another size.
fn lacking(from: Vec<(String, u64)>, to: &[(String, u64)]) -> Vec<(String, u64)> {
    let to: HashMap<&str, u64> = to.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    from.into_iter()
        .filter(|(path, size)| to.get(path.as_str()) != Some(size))
        .collect()
}

impl Synced {
    fn add(&mut self, path: String, size: u64) {
        self.bytes += size;
        self.files.push(path);
    }

    fn logged(self, what: &str) -> Self {
        if !self.files.is_empty() {
            tracing::info!(files = self.files.len(), bytes = self.bytes, "{what}");
        }
        self
    }
}

/// Uploads every file of the models folder `root` that the storage lacks (or holds with another size).
pub async fn publish(storage: &dyn Storage, root: &Path) -> Result<Synced, String> {
    let (shared, local) = listings(storage, root).await?;
    let mut synced = Synced::default();
    for (rel, size) in lacking(local, &shared) {
        let key = format!("{PREFIX}{rel}");
        if !valid_key(&key) {
            tracing::warn!(
                file = rel,
                "not shared: the name has characters storage keys refuse"
            );
            continue;
        }
        storage.put_file(&key, &root.join(&rel)).await?;
        synced.add(rel, size);
    }
    Ok(synced.logged("models published to the shared storage"))
}

/// Downloads every shared model file the models folder `root` lacks (or holds with another size).
pub async fn pull(storage: &dyn Storage, root: &Path) -> Result<Synced, String> {
    let (shared, local) = listings(storage, root).await?;
    let mut synced = Synced::default();
    for (rel, size) in lacking(shared, &local) {
        if storage
            .get_file(&format!("{PREFIX}{rel}"), &root.join(&rel))
            .await?
        {
            synced.add(rel, size);
        }
    }
    Ok(synced.logged("models pulled from the shared storage"))
}

/// Removes model `id` (its folder `checkpoints/<id>/` or file `checkpoints/<id>.<ext>`) from the shared storage.
/// Workers that already pulled it keep their copy until it is deleted there too.
pub async fn unpublish_checkpoint(storage: &dyn Storage, id: &str) -> Result<usize, String> {
    let folder = format!("{PREFIX}checkpoints/{id}/");
    let file = format!("{PREFIX}checkpoints/{id}.");
    let mut removed = 0;
    for (key, _) in storage.list(&format!("{PREFIX}checkpoints/")).await? {
        if key.starts_with(&folder) || key.starts_with(&file) {
            storage.delete(&key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ObjectStorage, StorageLocation};

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[tokio::test]
    async fn publish_then_pull_into_another_folder() {
        let store_dir = tempfile::tempdir().unwrap();
        let storage = ObjectStorage::open(
            &StorageLocation::Folder(store_dir.path().join("files")),
            "http://h",
        )
        .unwrap();
        let a = tempfile::tempdir().unwrap();
        write(a.path(), "checkpoints/m/unet/w.safetensors", &[1; 5000]);
        write(a.path(), "checkpoints/m/model_index.json", b"{}");
        write(a.path(), "checkpoints/single.safetensors", &[2; 100]);
        write(a.path(), "loras/style.safetensors", &[3; 10]);
        write(a.path(), "checkpoints/m/.hidden", b"x");
        write(a.path(), "checkpoints/m/half.partial", b"x");

        let sent = publish(&storage, a.path()).await.unwrap();
        assert_eq!(sent.files.len(), 4, "{sent:?}");
        assert_eq!(sent.bytes, 5000 + 2 + 100 + 10);
        assert_eq!(
            publish(&storage, a.path()).await.unwrap(),
            Synced::default(),
            "nothing twice"
        );

        let b = tempfile::tempdir().unwrap();
        write(b.path(), "loras/style.safetensors", &[3; 10]);
        write(b.path(), "checkpoints/single.safetensors", &[9; 7]);
        let got = pull(&storage, b.path()).await.unwrap();
        assert_eq!(
            got.files,
            vec![
                "checkpoints/m/model_index.json".to_string(),
                "checkpoints/m/unet/w.safetensors".to_string(),
                "checkpoints/single.safetensors".to_string(),
            ],
            "what it lacked, and the file of another size"
        );
        assert_eq!(
            std::fs::read(b.path().join("checkpoints/m/unet/w.safetensors")).unwrap(),
            vec![1; 5000]
        );
        assert_eq!(pull(&storage, b.path()).await.unwrap(), Synced::default());

        assert_eq!(unpublish_checkpoint(&storage, "m").await.unwrap(), 2);
        assert_eq!(unpublish_checkpoint(&storage, "single").await.unwrap(), 1);
        assert_eq!(storage.list(PREFIX).await.unwrap().len(), 1);
    }
}
