//! The counters in Redis: a standalone server (one connection, multiplexed, reconnecting) or a
//! Redis Cluster (the redis crate's cluster client, which follows slot moves). Every decision
//! is one Lua script over one key, so it is atomic on its own and lives in one slot.
//!
//! Rates use GCRA (the generic cell rate algorithm): one key holds the theoretical arrival time
//! (TAT) of the next request; a request is admitted if it arrives no earlier than `burst`
//! emission intervals before the TAT, and then moves it one interval on. One key of one number
//! per counter, no per-request entries (a sliding log would keep one per request), and exact
//! at any rate a 64-bit float of milliseconds resolves (intervals down to about a microsecond).
//! Quotas are counters per calendar window: the key names the window's start, so a new window
//! starts from zero at its boundary; the key expires a minute after the window ends.

use std::time::Duration;

use redis::{IntoConnectionInfo, Script, aio::ConnectionLike};
use std::sync::Arc;

/// Where the counters are.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `host:port`, or for a cluster the seed nodes.
    pub addresses: Vec<String>,
    pub cluster: bool,
    pub password: Option<String>,
    /// Each operation's bound (a decision that waits longer fails, and the proxy's failure
    /// mode applies).
    pub timeout: Duration,
    /// TLS to Redis, verified against these CA certificates (PEM); plaintext when unset.
    pub tls_ca: Option<Vec<u8>>,
}

enum Conn {
    Single(Box<Single>),
    /// Connected on first use (a cluster client connects eagerly), again after a failure.
    Cluster(Box<Cluster>),
}

/// A standalone Redis: the crate's manager reconnects when the connection drops, not when it
/// stops answering (a Redis gone from the network leaves the socket open until the kernel gives
/// up), so a decision that times out or fails on I/O replaces it, at most once a second.
struct Single {
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    manager: std::sync::Mutex<(redis::aio::ConnectionManager, std::time::Instant)>,
}

impl Single {
    fn get(&self) -> redis::aio::ConnectionManager {
        self.manager.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    fn renew(&self) {
        let mut m = self.manager.lock().unwrap_or_else(|e| e.into_inner());
        if m.1.elapsed() < Duration::from_secs(1) {
            return;
        }
        match redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => *m = (fresh, std::time::Instant::now()),
            Err(e) => tracing::warn!("redis: cannot make a new connection: {e}"),
        }
    }
}

fn not_connected(last_error: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        format!("cannot connect to the Redis Cluster: {last_error}"),
    ))
}

/// Whether an error says the connection, not the command, failed.
fn connection_failed(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// A Redis Cluster: connected in a task of its own (connecting reads the topology and reaches
/// every master, which may take longer than one decision may wait; a decision that gives up
/// does not abandon it), replaced after a failure or a timeout, at most once a second.
struct Cluster {
    client: redis::cluster::ClusterClient,
    state: Arc<std::sync::Mutex<ClusterState>>,
    connected: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct ClusterState {
    conn: Option<redis::cluster_async::ClusterConnection>,
    connecting: bool,
    /// When the connection was last replaced.
    forgotten: Option<std::time::Instant>,
    /// When connecting last failed: decisions meanwhile fail at once, not one connect each.
    failed_at: Option<std::time::Instant>,
    last_error: String,
}

/// Says a connect task has ended, however it ends (a panic included): the next decision may
/// start another, and those waiting for it stop waiting.
struct ConnectEnded(Arc<std::sync::Mutex<ClusterState>>, Arc<tokio::sync::Notify>);

impl Drop for ConnectEnded {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).connecting = false;
        self.1.notify_waiters();
    }
}

/// How long after a failed connect a decision fails without trying again.
const CONNECT_BACKOFF: Duration = Duration::from_millis(500);

pub struct Store {
    conn: Conn,
    timeout: Duration,
    gcra: Script,
    quota: Script,
    peek_gcra: Script,
}

/// What a script decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub admitted: bool,
    pub remaining: u64,
    /// Refused: until one would be admitted. A quota: until its window ends.
    pub retry_after_ms: u64,
    pub used: u64,
}

const GCRA: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, math.ceil(allow_at - now), math.ceil((tat - now) / interval)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, math.floor((now - allow_at) / interval), 0, math.ceil((new_tat - now) / interval)}
";

const PEEK_GCRA: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local left = math.floor((now + burst * interval - tat) / interval)
return {1, left, math.ceil(tat - now), math.ceil((tat - now) / interval)}
";

const QUOTA: &str = r"
local limit = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[3] == '0' then
  return {1, math.max(limit - used, 0), 0, used}
end
if used + 1 > limit then
  return {0, 0, 0, used}
end
used = redis.call('INCR', KEYS[1])
-- Every time, so that the key expires with its window whatever wrote it first.
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return {1, limit - used, 0, used}
";

impl Store {
    /// Within a Tokio runtime (the connection task is spawned at once, connected on first use).
    pub fn new(cfg: &RedisConfig) -> Result<Store, String> {
        let info = |a: &str| -> Result<redis::ConnectionInfo, String> {
            let scheme = if cfg.tls_ca.is_some() { "rediss" } else { "redis" };
            let url = if a.contains("://") { a.to_string() } else { format!("{scheme}://{a}") };
            let info =
                url.as_str().into_connection_info().map_err(|e| format!("redis address {a:?}: {e}"))?;
            Ok(match &cfg.password {
                Some(p) => {
                    let settings = info.redis_settings().clone().set_password(p);
                    info.set_redis_settings(settings)
                }
                None => info,
            })
        };
        let certs = cfg
            .tls_ca
            .as_ref()
            .map(|ca| redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) });
        let conn = if cfg.cluster {
            let nodes = cfg.addresses.iter().map(|a| info(a)).collect::<Result<Vec<_>, _>>()?;
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(|e| format!("redis cluster: {e}"))?;
            Conn::Cluster(Box::new(Cluster { client, state: Arc::default(), connected: Arc::default() }))
        } else {
            let [address] = cfg.addresses.as_slice() else {
                return Err("a standalone Redis has one address".into());
            };
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(info(address)?, certs),
                None => redis::Client::open(info(address)?),
            }
            .map_err(|e| format!("redis: {e}"))?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| format!("redis: {e}"))?;
            Conn::Single(Box::new(Single {
                client,
                config,
                manager: std::sync::Mutex::new((manager, std::time::Instant::now())),
            }))
        };
        Ok(Store {
            conn,
            timeout: cfg.timeout,
            gcra: Script::new(GCRA),
            quota: Script::new(QUOTA),
            peek_gcra: Script::new(PEEK_GCRA),
        })
    }

    /// A rate: `burst` at once, then one per `interval_ms`.
    pub async fn gcra(
        &self,
        key: &str,
        now_ms: f64,
        interval_ms: f64,
        burst: u64,
    ) -> Result<Outcome, String> {
        let mut inv = self.gcra.prepare_invoke();
        inv.key(key).arg(now_ms).arg(interval_ms).arg(burst);
        self.run(&inv).await
    }

    /// What is left of a rate, counting nothing.
    pub async fn peek_gcra(
        &self,
        key: &str,
        now_ms: f64,
        interval_ms: f64,
        burst: u64,
    ) -> Result<Outcome, String> {
        let mut inv = self.peek_gcra.prepare_invoke();
        inv.key(key).arg(now_ms).arg(interval_ms).arg(burst);
        self.run(&inv).await
    }

    /// A quota of `limit` in the window the key names, which ends at `expire_at_ms`;
    /// `count: false` only reads it.
    pub async fn quota(
        &self,
        key: &str,
        limit: u64,
        expire_at_ms: i64,
        count: bool,
    ) -> Result<Outcome, String> {
        let mut inv = self.quota.prepare_invoke();
        inv.key(key).arg(limit).arg(expire_at_ms).arg(if count { "1" } else { "0" });
        self.run(&inv).await
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), String> {
        let cmd = redis::cmd("PING");
        let run = async {
            match &self.conn {
                Conn::Single(s) => {
                    let r = s.get().req_packed_command(&cmd).await.map(drop);
                    if r.as_ref().is_err_and(connection_failed) {
                        s.renew();
                    }
                    r
                }
                Conn::Cluster(_) => {
                    let mut c = self.cluster().await?;
                    let r = c.req_packed_command(&cmd).await.map(drop);
                    // The client reconnects a node itself; a whole new one after a connection
                    // fails (it also finds a new topology after every seed was down).
                    if r.as_ref().is_err_and(connection_failed) {
                        self.forget_cluster();
                    }
                    r
                }
            }
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| e.to_string())
    }

    /// No answer in time: the connection may be dead without knowing it.
    fn timed_out(&self) -> String {
        match &self.conn {
            Conn::Single(s) => s.renew(),
            Conn::Cluster(_) => self.forget_cluster(),
        }
        format!("Redis did not answer within {:?}", self.timeout)
    }

    async fn run(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Outcome, String> {
        let run = async {
            let v: Vec<i64> = match &self.conn {
                Conn::Single(s) => {
                    let r = inv.invoke_async(&mut s.get()).await;
                    if r.as_ref().is_err_and(connection_failed) {
                        s.renew();
                    }
                    r?
                }
                Conn::Cluster(_) => {
                    let mut c = self.cluster().await?;
                    let r = inv.invoke_async(&mut c).await;
                    // The client reconnects a node itself; a whole new one after a connection
                    // fails (it also finds a new topology after every seed was down).
                    if r.as_ref().is_err_and(connection_failed) {
                        self.forget_cluster();
                    }
                    r?
                }
            };
            Ok::<_, redis::RedisError>(v)
        };
        let v = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| e.to_string())?;
        let [admitted, remaining, retry, used] = v.as_slice() else {
            return Err(format!("the script answered {v:?}"));
        };
        Ok(Outcome {
            admitted: *admitted == 1,
            remaining: (*remaining).max(0) as u64,
            retry_after_ms: (*retry).max(0) as u64,
            used: (*used).max(0) as u64,
        })
    }

    async fn cluster(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        let Conn::Cluster(c) = &self.conn else { unreachable!("called for a cluster") };
        let notified = {
            let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(conn) = &st.conn {
                return Ok(conn.clone());
            }
            if !st.connecting && st.failed_at.is_some_and(|t| t.elapsed() < CONNECT_BACKOFF) {
                return Err(not_connected(&st.last_error));
            }
            // Made before the task can say it is done, so that its word is not missed.
            let notified = c.connected.clone().notified_owned();
            if !st.connecting {
                st.connecting = true;
                let (client, state, connected) = (c.client.clone(), c.state.clone(), c.connected.clone());
                tokio::spawn(async move {
                    let _ended = ConnectEnded(state.clone(), connected);
                    let r =
                        tokio::time::timeout(Duration::from_secs(30), client.get_async_connection()).await;
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(Ok(conn)) => {
                            st.conn = Some(conn);
                            st.failed_at = None;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!("redis cluster: cannot connect: {e}");
                            (st.last_error, st.failed_at) = (e.to_string(), Some(std::time::Instant::now()));
                        }
                        Err(_) => {
                            tracing::warn!("redis cluster: connecting took over 30 s");
                            st.last_error = "connecting took over 30 s".into();
                            st.failed_at = Some(std::time::Instant::now());
                        }
                    }
                });
            }
            notified
        };
        notified.await;
        let st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        st.conn.clone().ok_or_else(|| not_connected(&st.last_error))
    }

    fn forget_cluster(&self) {
        if let Conn::Cluster(c) = &self.conn {
            // The cluster client reconnects nodes itself; a fresh one also finds a new topology
            // after every seed was down.
            let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.forgotten.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            st.conn = None;
            st.forgotten = Some(std::time::Instant::now());
        }
    }
}
