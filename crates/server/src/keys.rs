//! API keys: kept only as SHA-256 hashes, compared in constant time, never logged. Keys come from the command
//! line, `PICTOR_API_KEYS`, a keys file, or — on a fresh data folder with none of those — one key generated at
//! first start, printed once and stored hashed in `DATA/keys.json`.

use std::path::Path;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Hex SHA-256 of the key: the owner recorded on jobs.
    pub id: String,
    /// May use the enterprise management routes.
    pub admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    sha256: String,
    admin: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    hash: [u8; 32],
    admin: bool,
}

/// The set of accepted keys.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    entries: Vec<Entry>,
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Reads a keys file: one key per line, `#` comments and blank lines ignored.
pub fn read_keys_file(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

impl KeyStore {
    /// Keys from configuration; plus the generated keys stored in `data_dir`. When there are none at all, generates
    /// one (an admin key), stores its hash and returns it in plain text so it can be printed once.
    pub fn load(
        api_keys: &[String],
        admin_keys: &[String],
        data_dir: &Path,
    ) -> std::io::Result<(KeyStore, Option<String>)> {
        let mut store = KeyStore::default();
        for k in api_keys.iter().filter(|k| !k.is_empty()) {
            store.entries.push(Entry {
                hash: hash(k),
                admin: false,
            });
        }
        for k in admin_keys.iter().filter(|k| !k.is_empty()) {
            store.entries.push(Entry {
                hash: hash(k),
                admin: true,
            });
        }
        let file = data_dir.join("keys.json");
        let mut stored: Vec<StoredKey> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", file.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut generated = None;
        if store.entries.is_empty() && stored.is_empty() {
            let mut raw = [0u8; 24];
            rand::rng().fill_bytes(&mut raw);
            let key = format!("pk_{}", hex::encode(raw));
            stored.push(StoredKey {
                sha256: hex::encode(hash(&key)),
                admin: true,
            });
            std::fs::create_dir_all(data_dir)?;
            std::fs::write(&file, serde_json::to_vec_pretty(&stored)?)?;
            generated = Some(key);
        }
        for s in &stored {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(&s.sha256, &mut h).is_ok() {
                store.entries.push(Entry {
                    hash: h,
                    admin: s.admin,
                });
            }
        }
        Ok((store, generated))
    }

    /// The caller `key` identifies, if any. Every stored hash is compared, so timing does not reveal which one
    /// matched or how much of it.
    pub fn check(&self, key: &str) -> Option<Caller> {
        let presented = hash(key);
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&presented)) && found.is_none_or(|f| !f.admin) {
                found = Some(e);
            }
        }
        found.map(|e| Caller {
            id: hex::encode(e.hash),
            admin: e.admin,
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (store, generated) =
            KeyStore::load(&["user".into()], &["boss".into()], dir.path()).unwrap();
        assert!(generated.is_none());
        assert!(!dir.path().join("keys.json").exists());
        assert!(!store.check("user").unwrap().admin);
        assert!(store.check("boss").unwrap().admin);
        assert!(store.check("nobody").is_none());
        assert!(store.check("").is_none());
    }

    #[test]
    fn generated_once_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, generated) = KeyStore::load(&[], &[], dir.path()).unwrap();
        let key = generated.unwrap();
        assert!(store.check(&key).unwrap().admin);
        let text = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        assert!(!text.contains(&key), "the key itself is never stored");
        let (again, second) = KeyStore::load(&[], &[], dir.path()).unwrap();
        assert!(second.is_none(), "generated only at first start");
        assert!(again.check(&key).is_some());
    }
}
