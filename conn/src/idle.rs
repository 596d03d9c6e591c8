//! [`Idle`]: idle connections by key (a peer), at most a cap per key and none older than an idle
//! timeout; the storage under [`crate::Shelf`], the balancer's forwarding connections and the
//! executor's connections to runtimes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Idle<K, C> {
    rack: Mutex<Rack<K, C>>,
    idle_timeout: Duration,
    max_per_key: usize,
}

struct Rack<K, C> {
    conns: HashMap<K, Vec<(C, Instant)>>,
    /// When connections past their time were last closed (and the keys of peers that went).
    swept: Option<Instant>,
}

impl<K: Hash + Eq + Clone, C> Idle<K, C> {
    pub fn new(idle_timeout: Duration, max_per_key: usize) -> Self {
        Self {
            rack: Mutex::new(Rack {
                conns: HashMap::new(),
                swept: None,
            }),
            idle_timeout,
            max_per_key,
        }
    }

    /// The newest idle connection of `key` within its time that `usable` accepts; the others
    /// taken out on the way are closed.
    pub fn take(&self, key: &K, mut usable: impl FnMut(&mut C) -> bool) -> Option<C> {
        loop {
            let (mut conn, since) = {
                let mut rack = self.rack.lock().unwrap_or_else(|p| p.into_inner());
                rack.conns.get_mut(key)?.pop()?
            };
            if since.elapsed() < self.idle_timeout && usable(&mut conn) {
                return Some(conn);
            }
        }
    }

    /// Shelves `conn` under `key` if there is room; closes those past their time now and then.
    pub fn put(&self, key: &K, conn: C) {
        let mut rack = self.rack.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if rack.swept.is_none_or(|at| now - at >= self.idle_timeout) {
            rack.swept = Some(now);
            let timeout = self.idle_timeout;
            rack.conns.retain(|_, conns| {
                conns.retain(|(_, since)| now - *since < timeout);
                !conns.is_empty()
            });
        }
        let conns = match rack.conns.get_mut(key) {
            Some(conns) => conns,
            None => rack.conns.entry(key.clone()).or_default(),
        };
        if conns.len() < self.max_per_key {
            conns.push((conn, now));
        }
    }
}
