//! The cluster's keys in etcd (see [`crate::records`]) and the few operations on them.
//! Every write the leader makes is a transaction guarded by its election key's create
//! revision, so a deposed leader's writes fail.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue, PutOptions, TlsOptions, Txn, TxnOp,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{key}: {source}")]
    Json { key: String, source: serde_json::Error },
    #[error("reading {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Where to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub urls: Vec<String>,
    /// PEM files: the CA to check the servers with, and this node's client certificate.
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Per request.
    pub timeout: Duration,
}

/// The key layout of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys { prefix: format!("/vip/{cluster}/") }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    pub fn node(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.prefix)
    }
    pub fn elections(&self) -> String {
        format!("{}election/", self.prefix)
    }
    pub fn election(&self, name: &str) -> String {
        format!("{}election/{name}", self.prefix)
    }
    pub fn fence(&self, name: &str) -> String {
        format!("{}fence/{name}", self.prefix)
    }
    pub fn fences(&self) -> String {
        format!("{}fence/", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}members", self.prefix)
    }
    pub fn defs(&self) -> String {
        format!("{}defs", self.prefix)
    }
    pub fn assign(&self) -> String {
        format!("{}assign", self.prefix)
    }
    pub fn takeovers(&self) -> String {
        format!("{}takeovers", self.prefix)
    }
    pub fn rebalance(&self) -> String {
        format!("{}rebalance", self.prefix)
    }
    /// `nodes/n1` -> `n1` for keys under `under` (one of the prefixes above).
    pub fn name_in<'a>(&self, key: &'a str, under: &str) -> Option<&'a str> {
        key.strip_prefix(under)
    }
}

fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| StoreError::File { path: path.into(), source })
}

/// Connects (lazily: the first request dials).
pub async fn connect(e: &Endpoints) -> Result<Client> {
    let mut opts = ConnectOptions::new().with_connect_timeout(e.timeout).with_timeout(e.timeout).with_keep_alive(
        Duration::from_secs(2),
        Duration::from_secs(2),
    );
    if e.ca.is_some() || e.cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &e.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&e.cert, &e.key) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        opts = opts.with_tls(tls);
    }
    let fut = Client::connect(e.urls.clone(), Some(opts));
    match tokio::time::timeout(e.timeout, fut).await {
        Ok(c) => Ok(c?),
        Err(_) => Err(StoreError::Timeout(e.timeout)),
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value()).map_err(|source| StoreError::Json { key: String::from_utf8_lossy(kv.key()).into(), source })
}

pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Records are plain data: serializing them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Everything under the cluster's prefix at one revision.
pub async fn snapshot(c: &mut Client, keys: &Keys) -> Result<(i64, Vec<KeyValue>)> {
    let r = c.get(keys.prefix(), Some(GetOptions::new().with_prefix())).await?;
    let rev = r.header().map_or(0, |h| h.revision());
    Ok((rev, r.kvs().to_vec()))
}

/// Puts `key` on `lease` if it does not exist; returns its create revision, or None if
/// it exists.
pub async fn create(c: &mut Client, key: &str, value: Vec<u8>, lease: i64) -> Result<Option<i64>> {
    let t = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))), TxnOp::get(key, None)]);
    let r = c.txn(t).await?;
    if !r.succeeded() {
        return Ok(None);
    }
    let rev = r.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.create_revision()),
        _ => None,
    });
    Ok(rev)
}

/// Replaces `key` (whatever holds it) with a fresh key on `lease`: a new create revision.
pub async fn recreate(c: &mut Client, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
    c.delete(key, None).await?;
    loop {
        if let Some(rev) = create(c, key, value.clone(), lease).await? {
            return Ok(rev);
        }
        c.delete(key, None).await?;
    }
}

/// Updates a key this node created, only while it is still that key (same create
/// revision): false if it is gone or was replaced.
pub async fn update_own(c: &mut Client, key: &str, created: i64, value: Vec<u8>, lease: i64) -> Result<bool> {
    let t = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, created)])
        .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
    Ok(c.txn(t).await?.succeeded())
}

/// The leader's write: `ops` only if its election key is still the one it created (and
/// every extra compare holds). Returns the revision it committed at, None if refused.
pub async fn leader_txn(c: &mut Client, election_key: &str, term: i64, mut compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Option<i64>> {
    compares.insert(0, Compare::create_revision(election_key, CompareOp::Equal, term));
    let r = c.txn(Txn::new().when(compares).and_then(ops)).await?;
    Ok(r.succeeded().then(|| r.header().map_or(0, |h| h.revision())))
}

/// A linearizable read of this node's own keys: whether `nodes/<me>` is still the key it
/// created (and, if asked, `fence/<me>` exists too).
pub async fn still_mine(c: &mut Client, keys: &Keys, me: &str, created: i64, with_fence: bool) -> Result<bool> {
    let mut compares = vec![Compare::create_revision(keys.node(me), CompareOp::Equal, created)];
    if with_fence {
        compares.push(Compare::create_revision(keys.fence(me), CompareOp::Greater, 0));
    }
    // A read-only transaction is linearizable: it goes through the etcd leader.
    Ok(c.txn(Txn::new().when(compares)).await?.succeeded())
}
