//! The Redis store: counters, baselines, login addresses, freezes and AUTH-failure blocks
//! shared by every mailwarden instance using the same Redis and `redis_prefix`.
//!
//! Every update is one Lua script, so it is atomic however many instances count the same
//! account at once; the arithmetic is that of `window.rs`, `baseline.rs` and `state.rs`.
//! Keys (`P` = `redis_prefix`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P s:ACCOUNT` | string (JSON) | counters: rings, baseline, recent recipient domains (hashed), login addresses; expires after 30 days idle |
//! | `P accounts` | zset | account → last activity (s): the `tracked_accounts` LRU bound |
//! | `P f:ACCOUNT` | string (JSON) | the freeze in force; expires with it |
//! | `P h:ACCOUNT` | list (JSON) | freeze history, last 50 |
//! | `P frozen` | zset | frozen account → end (ms, `+inf`: none) |
//! | `P alert:ACCOUNT` | string | alert sent recently (expires after `alert_interval`) |
//! | `P af:IP`, `P au:IP` | zset | AUTH failures, distinct user names (hashed) in the window |
//! | `P ab:IP` | string | the client is blocked until (ms); expires with the block |
//!
//! All instances sharing Redis must use the same `[outbound]` windows (another layout
//! resets the window counters it finds).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use serde::Deserialize;

use super::baseline::{Baseline, Params};
use super::config::{Limits, Settings, redact_url};
use super::freeze::{Freeze, FreezeEvent, FreezeRecord, HISTORY};
use super::report::{self, AccountDetail, AccountSummary};
use super::state::{AccountState, FailLimits, KnownIp, Observation, secs};
use super::store::{AccountStatus, AlertKind, Failing, Message};
use super::window::{BUCKETS, RING_LEN, SLOTS};

/// Idle account counters expire after this long.
const STATE_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Accounts evicted per message at most, when over `tracked_accounts`.
const EVICT_BATCH: usize = 100;

/// Why a Redis call failed.
#[derive(Debug)]
pub enum RedisFailure {
    /// Unreachable (no connection, I/O error, timeout): fall back until reconnected.
    Down(String),
    /// The command failed (a bug, a full memory): this call falls back.
    Failed(String),
}

impl std::fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisFailure::Down(e) => write!(f, "redis unreachable: {e}"),
            RedisFailure::Failed(e) => write!(f, "redis command failed: {e}"),
        }
    }
}

impl From<redis::RedisError> for RedisFailure {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_unrecoverable_error()
        {
            RedisFailure::Down(e.to_string())
        } else {
            RedisFailure::Failed(e.to_string())
        }
    }
}

type R<T> = Result<T, RedisFailure>;

/// Lua shared by the scripts that update an account: the ring and baseline arithmetic
/// (see `window.rs` and `baseline.rs`), state loading and saving, the LRU bound.
const LUA_LIB: &str = r#"
local S = @SLOTS@
local B = @BUCKETS@
local function ring_new()
  local r = {}
  for j = 1, 1 + 2 * S do r[j] = 0 end
  return r
end
local function ring_add(r, now, bucket, a, b)
  local n = math.floor(now / bucket)
  local cur = n
  local h = r[1]
  if h == 0 then
    for j = 2, 1 + 2 * S do r[j] = 0 end
    r[1] = n + 1
  else
    h = h - 1
    if n <= h then
      cur = h
    else
      if n - h >= S then
        for j = 2, 1 + 2 * S do r[j] = 0 end
      else
        for x = h + 1, n do
          local s = x % S
          r[2 + s] = 0
          r[2 + S + s] = 0
        end
      end
      r[1] = n + 1
    end
  end
  local s = cur % S
  r[2 + s] = r[2 + s] + a
  r[2 + S + s] = r[2 + S + s] + b
end
local function ring_sums(r, now, bucket)
  local h = r[1]
  if h == 0 then return 0, 0 end
  h = h - 1
  local n = math.floor(now / bucket)
  local frac = (now % bucket) / bucket
  if n < h then n = h; frac = 0 end
  local oldest = n - B
  if oldest < 0 then oldest = 0 end
  local a, b = 0, 0
  for x = oldest, n do
    if x <= h and h - x < S then
      local w = 1
      if x + B == n then w = 1 - frac end
      local s = x % S
      a = a + r[2 + s] * w
      b = b + r[2 + S + s] * w
    end
  end
  return a, b
end
local function roll(bl, now, alpha, k, floor_m, floor_r)
  local hour = math.floor(now / 3600000)
  if hour <= bl[1] then return end
  local tm = math.max(floor_m, k * bl[6])
  local tr = math.max(floor_r, k * bl[7])
  local keep = 1 - alpha
  local m = alpha * math.min(bl[2], tm) + keep * bl[6]
  local r = alpha * math.min(bl[3], tr) + keep * bl[7]
  local idle = hour - bl[1] - 1
  if idle > 100000 then idle = 100000 end
  local decay = keep ^ idle
  bl[6] = m * decay
  bl[7] = r * decay
  if idle == 0 then bl[4] = bl[2]; bl[5] = bl[3] else bl[4] = 0; bl[5] = 0 end
  bl[2] = 0
  bl[3] = 0
  bl[1] = hour
end
local function load_state(key, now, layout, nrings, new_m, new_r)
  local raw = redis.call('GET', key)
  local old = nil
  if raw then old = cjson.decode(raw) end
  local nows = math.floor(now / 1000)
  local st
  if old and old.v == 1 and old.layout == layout then
    st = old
  else
    st = {v = 1, layout = layout, created = nows, seen = nows, msgs = 0, rings = {},
          bl = {math.floor(now / 3600000), 0, 0, 0, 0, new_m, new_r}, dom = {}, ips = {}}
    if old and old.v == 1 then
      st.created = old.created; st.msgs = old.msgs; st.bl = old.bl; st.dom = old.dom; st.ips = old.ips
    end
  end
  for i = 1, nrings do
    if not st.rings[i] then st.rings[i] = ring_new() end
  end
  return st
end
local function save_state(key, st, ttl, accounts, account, tracked, state_prefix, nows)
  redis.call('SET', key, cjson.encode(st), 'PX', ttl)
  redis.call('ZADD', accounts, nows, account)
  local over = redis.call('ZCARD', accounts) - tracked
  if over > 0 then
    if over > @EVICT@ then over = @EVICT@ end
    local gone = redis.call('ZPOPMIN', accounts, over)
    for i = 1, #gone, 2 do
      if gone[i] == account then
        redis.call('ZADD', accounts, nows, account)
      else
        redis.call('DEL', state_prefix .. gone[i])
      end
    end
  end
end
"#;

/// Counts one message; returns the observation as JSON.
const LUA_ASSESS: &str = r#"
local now = tonumber(ARGV[1])
local nows = math.floor(now / 1000)
local account, layout = ARGV[2], ARGV[3]
local rcpts, rej = tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, tracked, state_prefix = ARGV[6], tonumber(ARGV[7]), ARGV[8]
local ip, ipwin = ARGV[9], tonumber(ARGV[10])
local domwin, domcap = tonumber(ARGV[11]), tonumber(ARGV[12])
local alpha, k = tonumber(ARGV[13]), tonumber(ARGV[14])
local floor_m, floor_r = tonumber(ARGV[15]), tonumber(ARGV[16])
local new_m, new_r = tonumber(ARGV[17]), tonumber(ARGV[18])
local nrings = tonumber(ARGV[19])
local buckets = {}
for i = 1, nrings do buckets[i] = tonumber(ARGV[19 + i]) end
local first_dom = 20 + nrings

local st = load_state(KEYS[1], now, layout, nrings, new_m, new_r)
for i = 1, nrings - 1 do ring_add(st.rings[i], now, buckets[i], 1, rcpts) end
ring_add(st.rings[nrings], now, buckets[nrings], rcpts + rej, rej)
roll(st.bl, now, alpha, k, floor_m, floor_r)
st.bl[2] = st.bl[2] + 1
st.bl[3] = st.bl[3] + rcpts

local cutoff = nows - domwin
local count = 0
local dom = {}
for d, t in pairs(st.dom) do
  if t > cutoff then dom[d] = t; count = count + 1 end
end
for i = first_dom, #ARGV do
  local d = ARGV[i]
  if dom[d] then
    dom[d] = nows
  elseif count < domcap then
    dom[d] = nows
    count = count + 1
  end
end
st.dom = dom
if nows > st.seen then st.seen = nows end
st.msgs = st.msgs + 1

local age = -1
local e = st.ips[ip]
if e and e[3] == 1 and nows - e[1] <= ipwin then age = nows - e[1] end

local w = {}
for i = 1, nrings do
  local a, b = ring_sums(st.rings[i], now, buckets[i])
  w[#w + 1] = a
  w[#w + 1] = b
end
local hfrac = (now % 3600000) / 3600000
local rm = st.bl[2] + st.bl[4] * (1 - hfrac)
local rr = st.bl[3] + st.bl[5] * (1 - hfrac)
save_state(KEYS[1], st, ttl, KEYS[3], account, tracked, state_prefix, nows)
local f = redis.call('GET', KEYS[2])
return cjson.encode({w = w, dom = count, rate = {rm, rr}, base = {st.bl[6], st.bl[7]}, age = age, frozen = f or ''})
"#;

/// Records a successful login from an address.
const LUA_LOGIN: &str = r#"
local now = tonumber(ARGV[1])
local nows = math.floor(now / 1000)
local account, layout, ip = ARGV[2], ARGV[3], ARGV[4]
local remember, ttl, tracked, state_prefix = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
local nrings, new_m, new_r = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local st = load_state(KEYS[1], now, layout, nrings, new_m, new_r)
local e = st.ips[ip]
if e then
  e[2] = nows
else
  local n, oldest, oldest_t = 0, nil, nil
  for a, v in pairs(st.ips) do
    n = n + 1
    if oldest_t == nil or v[2] < oldest_t then oldest, oldest_t = a, v[2] end
  end
  local new = 0
  if n > 0 then new = 1 end
  if n >= remember and oldest then st.ips[oldest] = nil end
  st.ips[ip] = {nows, nows, new}
end
if nows > st.seen then st.seen = nows end
save_state(KEYS[1], st, ttl, KEYS[2], account, tracked, state_prefix, nows)
return 1
"#;

/// One AUTH failure: {blocked now (0/1), failures, distinct user names}.
const LUA_AUTH_FAIL: &str = r#"
local now, win = tonumber(ARGV[1]), tonumber(ARGV[2])
local cutoff = now - win
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], win)
redis.call('PEXPIRE', KEYS[2], win)
local f = redis.call('ZCARD', KEYS[1])
local u = redis.call('ZCARD', KEYS[2])
if f > tonumber(ARGV[5]) or u > tonumber(ARGV[6]) then
  local block = tonumber(ARGV[7])
  redis.call('SET', KEYS[3], tostring(now + block), 'PX', block)
  redis.call('DEL', KEYS[1], KEYS[2])
  return {1, f, u}
end
return {0, f, u}
"#;

/// Freezes an account unless frozen: 1 when it was not.
const LUA_FREEZE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
local until_ms = tonumber(ARGV[4])
if until_ms > 0 then
  redis.call('PEXPIREAT', KEYS[1], until_ms)
  redis.call('ZADD', KEYS[3], until_ms, ARGV[1])
else
  redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
return 1
"#;

/// Unfreezes an account: the freeze that was in force, or nil. Its window counters
/// (KEYS[4]) are cleared in the same step: they still hold the burst that caused the
/// freeze, and would freeze the account again at its next message.
const LUA_UNFREEZE: &str = r#"
local f = redis.call('GET', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if not f then return false end
redis.call('DEL', KEYS[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
local raw = redis.call('GET', KEYS[4])
if raw then
  local st = cjson.decode(raw)
  if type(st.rings) == 'table' then
    for _, r in ipairs(st.rings) do
      for j = 1, #r do r[j] = 0 end
    end
  end
  local ttl = redis.call('PTTL', KEYS[4])
  if ttl > 0 then
    redis.call('SET', KEYS[4], cjson.encode(st), 'PX', ttl)
  else
    redis.call('SET', KEYS[4], cjson.encode(st))
  end
end
return f
"#;

/// Records the freezes that ran out; returns {{account, freeze JSON}... in force},
/// {expired accounts}.
const LUA_SYNC: &str = r#"
local now = tonumber(ARGV[1])
local prefix = ARGV[2]
local cap = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES')
local gone = {}
for i = 1, #expired, 2 do
  local a = expired[i]
  if redis.call('ZREM', KEYS[1], a) == 1 then
    local at = math.floor(tonumber(expired[i + 1]) / 1000)
    redis.call('RPUSH', prefix .. 'h:' .. a,
      cjson.encode({at = at, action = 'expire', by = 'mailwarden', why = 'freeze expired'}))
    redis.call('LTRIM', prefix .. 'h:' .. a, -cap, -1)
    gone[#gone + 1] = a
  end
end
local active = {}
for _, a in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local f = redis.call('GET', prefix .. 'f:' .. a)
  if f then
    active[#active + 1] = a
    active[#active + 1] = f
  else
    redis.call('ZREM', KEYS[1], a)
  end
end
return {active, gone}
"#;

fn script(body: &str) -> Script {
    let lib = LUA_LIB
        .replace("@SLOTS@", &SLOTS.to_string())
        .replace("@BUCKETS@", &BUCKETS.to_string())
        .replace("@EVICT@", &EVICT_BATCH.to_string());
    Script::new(&format!("{lib}\n{body}"))
}

struct Scripts {
    assess: Script,
    login: Script,
    auth_fail: Script,
    freeze: Script,
    unfreeze: Script,
    sync: Script,
}

/// The account counters as stored in Redis.
#[derive(Debug, Deserialize)]
struct RedisState {
    created: f64,
    seen: f64,
    msgs: f64,
    rings: Vec<Vec<f64>>,
    bl: Vec<f64>,
    #[serde(default, deserialize_with = "map_or_empty")]
    dom: std::collections::HashMap<String, f64>,
    #[serde(default, deserialize_with = "map_or_empty")]
    ips: std::collections::HashMap<String, Vec<f64>>,
}

/// cjson writes an empty Lua table as `{}`, or as `[]` when configured so: accept both.
fn map_or_empty<'de, D, V>(d: D) -> Result<std::collections::HashMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<V> {
        Map(std::collections::HashMap<String, V>),
        Seq(#[allow(dead_code)] Vec<serde::de::IgnoredAny>),
    }
    Ok(match Either::<V>::deserialize(d)? {
        Either::Map(m) => m,
        Either::Seq(_) => Default::default(),
    })
}

impl RedisState {
    fn into_account(self, s: &Settings) -> AccountState {
        let mut st = AccountState::new(s, 0);
        st.created = self.created as u32;
        st.last_seen = self.seen as u32;
        st.messages = self.msgs as u64;
        for (i, ring) in self.rings.iter().enumerate().take(s.rings.len()) {
            for (j, v) in ring.iter().enumerate().take(RING_LEN) {
                st.rings[i * RING_LEN + j] = *v as u32;
            }
        }
        if let [hour, cm, cr, pm, pr, bm, br] = self.bl[..] {
            st.baseline = Baseline {
                hour: hour as u32,
                cur_messages: cm as u32,
                cur_recipients: cr as u32,
                prev_messages: pm as u32,
                prev_recipients: pr as u32,
                messages: bm as f32,
                recipients: br as f32,
            };
        }
        st.domains = self
            .dom
            .iter()
            .filter_map(|(d, t)| Some((u32::from_str_radix(d, 16).ok()?, *t as u32)))
            .collect();
        st.ips = self
            .ips
            .iter()
            .filter_map(|(ip, v)| {
                Some(KnownIp {
                    ip: ip.parse().ok()?,
                    first: *v.first()? as u32,
                    last: *v.get(1)? as u32,
                    new: *v.get(2)? == 1.0,
                })
            })
            .collect();
        st
    }
}

#[derive(Deserialize)]
struct RedisObservation {
    w: Vec<f64>,
    dom: f64,
    rate: Vec<f64>,
    base: Vec<f64>,
    age: f64,
    frozen: String,
}

pub struct RedisStore {
    s: Arc<Settings>,
    p: Params,
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    timeout: Duration,
    prefix: String,
    scripts: Scripts,
    seq: AtomicU64,
}

impl RedisStore {
    /// Parses the URL; connects only in [`connect`](Self::connect).
    pub fn new(s: Arc<Settings>) -> Result<RedisStore, String> {
        let client = redis::Client::open(s.cfg.redis_url.as_str())
            .map_err(|e| format!("outbound.redis_url {}: {e}", redact_url(&s.cfg.redis_url)))?;
        Ok(RedisStore {
            p: Params::from_settings(&s),
            client,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            timeout: s.cfg.redis_timeout,
            prefix: s.cfg.redis_prefix.clone(),
            scripts: Scripts {
                assess: script(LUA_ASSESS),
                login: script(LUA_LOGIN),
                auth_fail: script(LUA_AUTH_FAIL),
                freeze: script(LUA_FREEZE),
                unfreeze: script(LUA_UNFREEZE),
                sync: script(LUA_SYNC),
            },
            seq: AtomicU64::new(0),
            s,
        })
    }

    /// The URL with any password hidden, for logs.
    pub fn url(&self) -> String {
        redact_url(&self.s.cfg.redis_url)
    }

    /// Opens a connection (and checks it with PING); marks the store up.
    pub async fn connect(&self) -> R<()> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let fut = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let mut conn = tokio::time::timeout(self.timeout * 2, fut)
            .await
            .map_err(|_| RedisFailure::Down("connect timed out".into()))??;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        self.up.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Drops the connection; true when it was up.
    pub fn mark_down(&self) -> bool {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.up.swap(false, Ordering::SeqCst)
    }

    fn conn(&self) -> R<MultiplexedConnection> {
        if !self.is_up() {
            return Err(RedisFailure::Down("not connected".into()));
        }
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| RedisFailure::Down("not connected".into()))
    }

    /// Runs `f` with a connection under the timeout; an unreachable server marks the
    /// store down.
    async fn run<T, F, Fut>(&self, f: F) -> R<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn()?;
        let result = match tokio::time::timeout(self.timeout * 2, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RedisFailure::from(e)),
            Err(_) => Err(RedisFailure::Down("timed out".into())),
        };
        if let Err(e @ RedisFailure::Down(_)) = &result
            && self.mark_down()
        {
            tracing::warn!(redis = %self.url(), error = %e, "outbound: redis unreachable, using local counters until it is back");
        }
        result
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    fn accounts_key(&self) -> String {
        format!("{}accounts", self.prefix)
    }

    fn frozen_key(&self) -> String {
        format!("{}frozen", self.prefix)
    }

    /// Counts one message (atomically, for every instance) and returns what the limits
    /// look at.
    pub async fn record(&self, account: &str, m: &Message<'_>, limits: &Limits) -> R<Observation> {
        let (now_ms, ip) = (m.now_ms, m.ip);
        let s = &self.s;
        let mut inv = self.scripts.assess.prepare_invoke();
        inv.key(self.key("s", account))
            .key(self.key("f", account))
            .key(self.accounts_key())
            .arg(now_ms)
            .arg(account)
            .arg(&s.layout)
            .arg(m.rcpts)
            .arg(m.rejected)
            .arg(STATE_TTL.as_millis() as u64)
            .arg(s.cfg.tracked_accounts)
            .arg(format!("{}s:", self.prefix))
            .arg(ip.to_string())
            .arg(s.cfg.new_ip.window.as_secs())
            .arg(s.domains_window_secs)
            .arg(limits.distinct_cap())
            .arg(self.p.alpha)
            .arg(self.p.k)
            .arg(self.p.floor_messages)
            .arg(self.p.floor_recipients)
            .arg(s.cfg.adaptive.new_account_messages)
            .arg(s.cfg.adaptive.new_account_recipients)
            .arg(s.rings.len());
        for r in &s.rings {
            inv.arg(r.bucket_ms);
        }
        for d in m.distinct {
            inv.arg(format!("{d:08x}"));
        }
        let json: String = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let ro: RedisObservation = serde_json::from_str(&json)
            .map_err(|e| RedisFailure::Failed(format!("assess reply: {e}")))?;
        let mut o = Observation::empty();
        let nw = s.windows();
        for i in 0..nw {
            o.windows[i] = (
                ro.w.get(2 * i).copied().unwrap_or(0.0),
                ro.w.get(2 * i + 1).copied().unwrap_or(0.0),
            );
        }
        o.rejected = (
            ro.w.get(2 * nw).copied().unwrap_or(0.0),
            ro.w.get(2 * nw + 1).copied().unwrap_or(0.0),
        );
        o.domains = ro.dom as u32;
        o.rate = (
            ro.rate.first().copied().unwrap_or(0.0),
            ro.rate.get(1).copied().unwrap_or(0.0),
        );
        o.baseline = (
            ro.base.first().copied().unwrap_or(0.0),
            ro.base.get(1).copied().unwrap_or(0.0),
        );
        o.new_ip_age = (ro.age >= 0.0).then_some(ro.age as u32);
        // The freeze is JSON in Redis; past this point it is the typed status.
        let freeze = serde_json::from_str::<Freeze>(&ro.frozen).ok();
        o.status = AccountStatus::from_freeze(freeze, u64::from(secs(now_ms)));
        Ok(o)
    }

    pub async fn login(&self, account: &str, ip: IpAddr, now_ms: u64) -> R<()> {
        let s = &self.s;
        let mut inv = self.scripts.login.prepare_invoke();
        inv.key(self.key("s", account))
            .key(self.accounts_key())
            .arg(now_ms)
            .arg(account)
            .arg(&s.layout)
            .arg(ip.to_string())
            .arg(s.cfg.new_ip.remember)
            .arg(STATE_TTL.as_millis() as u64)
            .arg(s.cfg.tracked_accounts)
            .arg(format!("{}s:", self.prefix))
            .arg(s.rings.len())
            .arg(s.cfg.adaptive.new_account_messages)
            .arg(s.cfg.adaptive.new_account_recipients);
        let _: i64 = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Whether an alert of `kind` for `account` is due, across all instances (and
    /// records it).
    pub async fn alert_due(&self, account: &str, kind: AlertKind, interval: Duration) -> R<bool> {
        let key = self.key("alert", &format!("{}:{account}", kind.as_str()));
        let ms = interval.as_millis() as u64;
        let set: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(ms)
                    .arg("NX")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// One AUTH failure of `who` (`other`: the user name's hash for a client, the host's
    /// for a user name; the same script counts both): `Some((failures, distinct others))`
    /// when it blocks the client or locks the name.
    pub async fn failure(
        &self,
        who: Failing,
        other: u32,
        now_ms: u64,
        l: FailLimits,
    ) -> R<Option<(u32, u32)>> {
        let keys = match who {
            Failing::Client(ip) => {
                let ip = ip.to_string();
                [
                    self.key("af", &ip),
                    self.key("au", &ip),
                    self.key("ab", &ip),
                ]
            }
            Failing::User(user) => {
                let user = format!("{user:08x}");
                [
                    self.key("uf", &user),
                    self.key("uh", &user),
                    self.key("ub", &user),
                ]
            }
        };
        let member = format!(
            "{now_ms}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let mut inv = self.scripts.auth_fail.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        inv.arg(now_ms)
            .arg(u64::from(l.window) * 1000)
            .arg(member)
            .arg(format!("{other:08x}"))
            .arg(l.max_failures)
            .arg(l.max_usernames)
            .arg(u64::from(l.block) * 1000);
        let (blocked, f, u): (i64, u32, u32) = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok((blocked == 1).then_some((f, u)))
    }

    /// Until when (ms) the user name hashed `user` is locked, if it is.
    pub async fn user_locked(&self, user: u32, now_ms: u64) -> R<Option<u64>> {
        self.until(self.key("ub", &format!("{user:08x}")), now_ms)
            .await
    }

    /// Until when (ms) `ip` is blocked, if it is.
    pub async fn blocked(&self, ip: IpAddr, now_ms: u64) -> R<Option<u64>> {
        self.until(self.key("ab", &ip.to_string()), now_ms).await
    }

    /// The time (ms) a block key holds, if still ahead of `now_ms`.
    async fn until(&self, key: String, now_ms: u64) -> R<Option<u64>> {
        let v: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(v.and_then(|v| v.parse::<u64>().ok())
            .filter(|&until| until > now_ms))
    }

    /// Freezes `account`; false when it already was.
    pub async fn freeze(&self, account: &str, f: &Freeze) -> R<bool> {
        let event = FreezeEvent {
            at: f.since,
            action: "freeze".into(),
            by: f.by.clone(),
            why: f.why.clone(),
            until: f.until,
        };
        let mut inv = self.scripts.freeze.prepare_invoke();
        inv.key(self.key("f", account))
            .key(self.key("h", account))
            .key(self.frozen_key())
            .arg(account)
            .arg(serde_json::to_string(f).unwrap_or_default())
            .arg(serde_json::to_string(&event).unwrap_or_default())
            .arg(f.until.map_or(0, |u| u * 1000))
            .arg(HISTORY);
        let n: i64 = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(n == 1)
    }

    /// Unfreezes `account` and clears its window counters: the freeze that was in
    /// force, if any.
    pub async fn unfreeze(&self, account: &str, at: u64, by: &str, why: &str) -> R<Option<Freeze>> {
        let event = FreezeEvent {
            at,
            action: "unfreeze".into(),
            by: by.into(),
            why: why.into(),
            until: None,
        };
        let mut inv = self.scripts.unfreeze.prepare_invoke();
        inv.key(self.key("f", account))
            .key(self.key("h", account))
            .key(self.frozen_key())
            .key(self.key("s", account))
            .arg(account)
            .arg(serde_json::to_string(&event).unwrap_or_default())
            .arg(HISTORY);
        let f: Option<String> = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(f.and_then(|f| serde_json::from_str(&f).ok()))
    }

    /// Records expired freezes; returns the freezes in force and the accounts whose
    /// freeze just expired.
    pub async fn sync_freezes(&self, now_ms: u64) -> R<(Vec<(String, Freeze)>, Vec<String>)> {
        let mut inv = self.scripts.sync.prepare_invoke();
        inv.key(self.frozen_key())
            .arg(now_ms)
            .arg(&self.prefix)
            .arg(HISTORY);
        let (active, gone): (Vec<String>, Vec<String>) = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        let active = active
            .chunks(2)
            .filter_map(|p| match p {
                [a, f] => Some((a.clone(), serde_json::from_str::<Freeze>(f).ok()?)),
                _ => None,
            })
            .collect();
        Ok((active, gone))
    }

    /// Every member of the list or sorted set `key`, read with `cmd` (`LRANGE`,
    /// `ZREVRANGE`).
    async fn whole(&self, cmd: &'static str, key: String) -> R<Vec<String>> {
        self.run(|mut c| async move {
            redis::cmd(cmd)
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn history(&self, account: &str) -> R<Vec<FreezeEvent>> {
        let raw = self.whole("LRANGE", self.key("h", account)).await?;
        Ok(raw
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect())
    }

    async fn states(&self, accounts: &[String]) -> R<Vec<Option<AccountState>>> {
        if accounts.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = accounts.iter().map(|a| self.key("s", a)).collect();
        let raw: Vec<Option<String>> = self
            .run(|mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        Ok(raw
            .into_iter()
            .map(|r| {
                r.and_then(|j| serde_json::from_str::<RedisState>(&j).ok())
                    .map(|rs| rs.into_account(&self.s))
            })
            .collect())
    }

    pub async fn detail(&self, account: &str, now_ms: u64) -> R<Option<AccountDetail>> {
        let st = self.states(&[account.to_string()]).await?.pop().flatten();
        let key = self.key("f", account);
        let current: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        let history = self.history(account).await?;
        let current = current.and_then(|f| serde_json::from_str::<Freeze>(&f).ok());
        if st.is_none() && current.is_none() && history.is_empty() {
            return Ok(None);
        }
        let rec = FreezeRecord { current, history };
        Ok(Some(report::detail(
            &self.s,
            account,
            st.as_ref(),
            Some(&rec),
            now_ms,
        )))
    }

    pub async fn summaries(&self, now_ms: u64) -> R<Vec<AccountSummary>> {
        let names = self.whole("ZREVRANGE", self.accounts_key()).await?;
        let (frozen, _) = self.sync_freezes(now_ms).await?;
        let frozen: std::collections::HashMap<String, Freeze> = frozen.into_iter().collect();
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(500) {
            for (name, st) in chunk.iter().zip(self.states(chunk).await?) {
                if let Some(st) = st {
                    out.push(report::summary(
                        &self.s,
                        name,
                        Some(&st),
                        frozen.get(name),
                        now_ms,
                    ));
                }
            }
        }
        for (name, f) in &frozen {
            if !out.iter().any(|s| &s.account == name) {
                out.push(report::summary(&self.s, name, None, Some(f), now_ms));
            }
        }
        super::memory::sort_summaries(&mut out);
        Ok(out)
    }
}
