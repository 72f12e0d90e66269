//! Connection limits per listener: a cap on concurrent sessions, and a cap per client
//! address (Postfix anvil's `smtpd_client_connection_count_limit`), so one host cannot
//! take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::wire::reply::Reply;

pub struct ConnectionLimits {
    sessions: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_client: usize,
}

/// Held for the life of a session; releases its slots when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

/// Groups IPv6 clients by /64 (one customer's allocation) so a single host cannot
/// dodge the limit by rotating through its own addresses.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut seg = v6.segments();
            seg[4..].fill(0);
            IpAddr::V6(seg.into())
        }
        v4 => v4,
    }
}

impl ConnectionLimits {
    pub fn new(max_sessions: usize, max_per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            sessions: Arc::new(Semaphore::new(max_sessions)),
            per_client: Arc::new(Mutex::new(HashMap::new())),
            max_per_client,
        }
    }

    /// Takes a slot for `client`, or returns the reply that refuses it.
    pub fn admit(&self, client: IpAddr) -> Result<Slot, Reply> {
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Reply::too_many_connections())?;
        let key = client_key(client);
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(key).or_insert(0);
        if *count >= self.max_per_client {
            return Err(Reply::too_many_connections_from_address());
        }
        *count += 1;
        Ok(Slot {
            _permit: permit,
            per_client: self.per_client.clone(),
            client: key,
        })
    }

    /// Clients currently holding slots.
    #[cfg(test)]
    fn tracked_clients(&self) -> usize {
        self.per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reply::Enhanced;

    #[test]
    fn caps_and_releases() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = limits.admit(a).unwrap();
        let _s2 = limits.admit(a).unwrap();
        assert_eq!(
            limits.admit(a).unwrap_err().enhanced,
            Some(Enhanced(4, 7, 0))
        );
        let _s3 = limits.admit(b).unwrap();
        assert_eq!(
            limits.admit(b).unwrap_err().enhanced,
            Some(Enhanced(4, 3, 2))
        );
        drop(s1);
        assert!(limits.admit(a).is_ok());
        drop(_s3);
        assert_eq!(limits.tracked_clients(), 1, "counters return to zero");
    }

    #[test]
    fn ipv6_grouped_by_64() {
        let limits = ConnectionLimits::new(10, 1);
        let _s = limits.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(limits.admit("2001:db8::2".parse().unwrap()).is_err());
        assert!(limits.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }
}
