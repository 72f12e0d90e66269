//! Idle next-hop connections, kept for the next client session instead of a new TCP
//! connection, greeting and EHLO (and TLS handshake) per session.
//!
//! A connection is parked when its session ends, if it is in no transaction at the next
//! hop (its last transaction ended with the answer to the end of data, or an `RSET` the
//! next hop answered with 250), it never carried a login and the pool has room;
//! otherwise it is closed with QUIT as before. It is taken back by a later
//! session of any client: the newest first (the least likely to have been closed by the
//! next hop), after checking the socket is quiet (no EOF, no stray 421), then re-bound to
//! the new client with XCLIENT (see [`super::client::SmtpConnection::rebind`]). Whatever
//! fails on a pooled connection before MAIL is accepted is retried on a fresh connection
//! by [`super::Relay`], so a connection the next hop closed meanwhile never costs a
//! message. Parked connections are closed with QUIT after `pool_idle_timeout`, before the
//! next hop's own idle timeout would close them.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::client::SmtpConnection;

/// The idle connections of one next hop, oldest first.
pub struct Pool {
    idle: Mutex<Idle>,
    max: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct Idle {
    conns: std::collections::VecDeque<(Instant, SmtpConnection)>,
    /// A task closes connections as they expire; it runs while any are parked.
    reaper: bool,
}

impl Pool {
    pub fn new(max: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(Idle::default()),
            max,
            idle_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether parking is possible at all (`pool_size` above 0).
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// The newest parked connection that is within its idle time and quiet; stale ones
    /// met on the way are closed.
    pub fn take(&self) -> Option<SmtpConnection> {
        loop {
            let (since, mut conn) = self.lock().conns.pop_back()?;
            if since.elapsed() >= self.idle_timeout {
                // The newest is expired: so are all older ones (the reaper closes them).
                retire(conn);
                continue;
            }
            if conn.is_quiet() {
                return Some(conn);
            }
            tracing::debug!(peer = %conn.peer(), "pooled next-hop connection closed or spoke while idle; dropped");
        }
    }

    /// Parks `conn` (in no transaction) for a later session, or closes it when the pool is
    /// full. Must be called inside the Tokio runtime (the reaper is a task).
    pub fn park(self: &Arc<Self>, conn: SmtpConnection) {
        let mut idle = self.lock();
        if idle.conns.len() >= self.max {
            drop(idle);
            retire(conn);
            return;
        }
        idle.conns.push_back((Instant::now(), conn));
        if !idle.reaper
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            idle.reaper = true;
            rt.spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Closes every parked connection with QUIT and waits for them (each bounded), so the
    /// next hop logs a clean end rather than a lost connection. At shutdown, and for the
    /// pool a reload replaced.
    pub async fn close_idle(&self) {
        let conns: Vec<SmtpConnection> = self.lock().conns.drain(..).map(|(_, c)| c).collect();
        let mut quits = tokio::task::JoinSet::new();
        for conn in conns {
            quits.spawn(conn.quit());
        }
        while quits.join_next().await.is_some() {}
    }

    /// Parked connections (tests, metrics).
    pub fn idle_count(&self) -> usize {
        self.lock().conns.len()
    }
}

/// Closes parked connections as they pass their idle time; ends when none is left (or
/// the pool itself is gone: a reload built a new one).
async fn reap(pool: Weak<Pool>) {
    loop {
        let wake = {
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = pool.lock();
            let now = Instant::now();
            while idle
                .conns
                .front()
                .is_some_and(|(since, _)| now.duration_since(*since) >= pool.idle_timeout)
            {
                if let Some((_, conn)) = idle.conns.pop_front() {
                    retire(conn);
                }
            }
            match idle.conns.front() {
                Some((since, _)) => *since + pool.idle_timeout,
                None => {
                    idle.reaper = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// Ends a connection politely (QUIT) without making anyone wait for it.
fn retire(conn: SmtpConnection) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(conn.quit());
        }
        Err(_) => drop(conn),
    }
}
