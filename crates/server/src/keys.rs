//! API keys: kept only as SHA-256 hashes, compared in constant time, never logged. Keys come from the command
//! line, `PICTOR_API_KEYS`, a keys file, or — on a fresh data folder with none of those — one key generated at
//! first start, printed once and stored hashed in `DATA/keys.json` (or, when the nodes share a PostgreSQL store,
//! in the database, so that every node accepts it). A key may be bound to a worker group (`KEY GROUP` in the keys
//! file): its jobs then run only on the workers of that `--server-name` unless the request says
//! `loadbalancer: yes`.

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
    /// The worker group its jobs are kept on (unless a request asks for the load balancer).
    pub group: Option<String>,
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
    group: Option<String>,
}

/// The set of accepted keys.
#[derive(Debug, Clone, Default)]
pub struct KeyStore {
    entries: Vec<Entry>,
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One line of a keys file: a key, and the worker group it is bound to when a second word follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLine {
    /// The key.
    pub key: String,
    /// `--server-name` of the workers its jobs stay on.
    pub group: Option<String>,
}

/// Reads a keys file: one key per line (`KEY` or `KEY GROUP`), `#` comments and blank lines ignored.
pub fn read_keys_file(path: &Path) -> std::io::Result<Vec<KeyLine>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default().to_string();
            let group = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a keys file line is KEY or KEY GROUP".to_string(),
                ));
            }
            Ok(KeyLine { key, group })
        })
        .collect()
}

/// A new random key and the hex SHA-256 under which it is stored.
pub fn new_key() -> (String, String) {
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    let key = format!("pk_{}", hex::encode(raw));
    let hashed = hex::encode(hash(&key));
    (key, hashed)
}

impl KeyStore {
    /// Keys from configuration; plus the generated keys stored in `data_dir`. When there are none at all and
    /// `generate` is set, generates one (an admin key), stores its hash and returns it in plain text so it can be
    /// printed once.
    pub fn load(
        api_keys: &[String],
        admin_keys: &[String],
        data_dir: &Path,
        generate: bool,
    ) -> std::io::Result<(KeyStore, Option<String>)> {
        let mut store = KeyStore::default();
        for k in api_keys.iter().filter(|k| !k.is_empty()) {
            store.entries.push(Entry {
                hash: hash(k),
                admin: false,
                group: None,
            });
        }
        for k in admin_keys.iter().filter(|k| !k.is_empty()) {
            store.entries.push(Entry {
                hash: hash(k),
                admin: true,
                group: None,
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
        if generate && store.entries.is_empty() && stored.is_empty() {
            let (key, sha256) = new_key();
            stored.push(StoredKey {
                sha256,
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
                    group: None,
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
            group: e.group.clone(),
        })
    }

    /// Binds `key` to the worker group `group` (adding it as an ordinary key if it was not known).
    pub fn bind(&mut self, key: &str, group: &str) {
        let h = hash(key);
        let mut bound = false;
        for e in self.entries.iter_mut().filter(|e| e.hash == h) {
            e.group = Some(group.to_string());
            bound = true;
        }
        if !bound {
            self.entries.push(Entry {
                hash: h,
                admin: false,
                group: Some(group.to_string()),
            });
        }
    }

    /// Accepts the admin key whose hex SHA-256 is `sha256` (a key generated by another node).
    pub fn add_admin_hash(&mut self, sha256: &str) {
        let mut h = [0u8; 32];
        if hex::decode_to_slice(sha256, &mut h).is_ok() {
            self.entries.push(Entry {
                hash: h,
                admin: true,
                group: None,
            });
        }
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
            KeyStore::load(&["user".into()], &["boss".into()], dir.path(), true).unwrap();
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
        let (store, generated) = KeyStore::load(&[], &[], dir.path(), true).unwrap();
        let key = generated.unwrap();
        assert!(store.check(&key).unwrap().admin);
        let text = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        assert!(!text.contains(&key), "the key itself is never stored");
        let (again, second) = KeyStore::load(&[], &[], dir.path(), true).unwrap();
        assert!(second.is_none(), "generated only at first start");
        assert!(again.check(&key).is_some());
        let (shared, none) =
            KeyStore::load(&[], &[], tempfile::tempdir().unwrap().path(), false).unwrap();
        assert!(
            none.is_none() && shared.is_empty(),
            "a shared store generates elsewhere"
        );
    }

    #[test]
    fn keys_file_lines_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team keys\nplain\n\n  bound   gpu-a  \n").unwrap();
        let lines = read_keys_file(&file).unwrap();
        assert_eq!(
            lines,
            vec![
                KeyLine {
                    key: "plain".into(),
                    group: None
                },
                KeyLine {
                    key: "bound".into(),
                    group: Some("gpu-a".into())
                },
            ]
        );
        std::fs::write(&file, "a b c\n").unwrap();
        assert!(read_keys_file(&file).is_err());

        let (mut store, _) =
            KeyStore::load(&["plain".into()], &["boss".into()], dir.path(), true).unwrap();
        store.bind("bound", "gpu-a");
        store.bind("boss", "gpu-b");
        assert_eq!(
            store.check("bound").unwrap().group.as_deref(),
            Some("gpu-a")
        );
        assert!(!store.check("bound").unwrap().admin);
        assert_eq!(store.check("boss").unwrap().group.as_deref(), Some("gpu-b"));
        assert!(store.check("boss").unwrap().admin);
        assert_eq!(store.check("plain").unwrap().group, None);
        let (other_key, other_hash) = new_key();
        store.add_admin_hash(&other_hash);
        assert!(store.check(&other_key).unwrap().admin);
    }
}
