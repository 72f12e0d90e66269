//! A bounded map that forgets its least recently used entry when full: the entries live
//! in a slab, linked into a recency list by index, and a `HashMap` finds them by key.
//! Every operation is O(1); nothing is allocated per entry beyond the key and the value.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

const NIL: u32 = u32::MAX;

struct Node<K, V> {
    key: K,
    value: V,
    /// Towards the most recently used end.
    newer: u32,
    /// Towards the least recently used end.
    older: u32,
}

pub struct Lru<K, V> {
    map: HashMap<K, u32>,
    nodes: Vec<Node<K, V>>,
    newest: u32,
    oldest: u32,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new(cap: usize) -> Self {
        Lru {
            map: HashMap::new(),
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
            cap: cap.max(1),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The entry for `key`, marked as the most recently used.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = *self.map.get(key)?;
        self.touch(i);
        Some(&mut self.nodes[i as usize].value)
    }

    /// The entry for `key` without changing its recency.
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|&i| &self.nodes[i as usize].value)
    }

    /// The entry for `key` (created by `make` when absent, evicting the least recently
    /// used entry when full), marked as the most recently used.
    pub fn get_or_insert_with<Q>(&mut self, key: &Q, make: impl FnOnce() -> (K, V)) -> &mut V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(&i) = self.map.get(key) {
            self.touch(i);
            return &mut self.nodes[i as usize].value;
        }
        let (k, v) = make();
        self.insert_new(k, v)
    }

    /// Inserts or replaces, as the most recently used entry.
    pub fn insert(&mut self, key: K, value: V) {
        if let Some(&i) = self.map.get(&key) {
            self.nodes[i as usize].value = value;
            self.touch(i);
        } else {
            self.insert_new(key, value);
        }
    }

    fn insert_new(&mut self, key: K, value: V) -> &mut V {
        let i = if self.nodes.len() >= self.cap {
            // Reuse the least recently used slot.
            let i = self.oldest;
            self.unlink(i);
            let node = &mut self.nodes[i as usize];
            self.map.remove(&node.key);
            node.key = key.clone();
            node.value = value;
            i
        } else {
            self.nodes.push(Node {
                key: key.clone(),
                value,
                newer: NIL,
                older: NIL,
            });
            (self.nodes.len() - 1) as u32
        };
        self.map.insert(key, i);
        self.link_newest(i);
        &mut self.nodes[i as usize].value
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let i = self.oldest;
        if i == NIL {
            return None;
        }
        self.unlink(i);
        let last = (self.nodes.len() - 1) as u32;
        if i != last {
            // The last node moves into slot `i`: repoint its neighbours and its key.
            let (newer, older) = (
                self.nodes[last as usize].newer,
                self.nodes[last as usize].older,
            );
            if newer == NIL {
                self.newest = i;
            } else {
                self.nodes[newer as usize].older = i;
            }
            if older == NIL {
                self.oldest = i;
            } else {
                self.nodes[older as usize].newer = i;
            }
            if let Some(slot) = self.map.get_mut(&self.nodes[last as usize].key) {
                *slot = i;
            }
        }
        let node = self.nodes.swap_remove(i as usize);
        self.map.remove(&node.key);
        Some((node.key, node.value))
    }

    fn touch(&mut self, i: u32) {
        if self.newest != i {
            self.unlink(i);
            self.link_newest(i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let (newer, older) = {
            let n = &self.nodes[i as usize];
            (n.newer, n.older)
        };
        if newer == NIL {
            self.newest = older;
        } else {
            self.nodes[newer as usize].older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.nodes[older as usize].newer = newer;
        }
    }

    fn link_newest(&mut self, i: u32) {
        let old_newest = self.newest;
        {
            let n = &mut self.nodes[i as usize];
            n.newer = NIL;
            n.older = old_newest;
        }
        if old_newest != NIL {
            self.nodes[old_newest as usize].newer = i;
        }
        self.newest = i;
        if self.oldest == NIL {
            self.oldest = i;
        }
    }

    /// Entries from the least to the most recently used.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let mut i = self.oldest;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let n = &self.nodes[i as usize];
            i = n.newer;
            Some((&n.key, &n.value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_evicts_the_least_recently_used() {
        let mut l: Lru<String, u32> = Lru::new(3);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            l.insert(k.to_string(), i as u32);
        }
        // Touch "a": "b" is now the oldest.
        assert_eq!(l.get_mut("a"), Some(&mut 0));
        l.insert("d".into(), 3);
        assert_eq!(l.len(), 3);
        assert!(l.peek("b").is_none());
        let keys: Vec<&String> = l.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["c", "a", "d"]);
        *l.get_or_insert_with("e", || ("e".into(), 9)) += 1;
        assert_eq!(l.peek("e"), Some(&10));
        assert!(l.peek("c").is_none());
        for i in 0..1000u32 {
            l.insert(format!("k{i}"), i);
        }
        assert_eq!(l.len(), 3);
        let keys: Vec<&String> = l.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["k997", "k998", "k999"]);
    }

    #[test]
    fn pop_oldest_keeps_the_rest_consistent() {
        let mut l: Lru<u32, u32> = Lru::new(usize::MAX);
        for i in 0..6 {
            l.insert(i, i * 10);
        }
        l.get_mut(&0);
        assert_eq!(l.pop_oldest(), Some((1, 10)));
        assert_eq!(l.pop_oldest(), Some((2, 20)));
        l.insert(9, 90);
        assert_eq!(l.get_mut(&5), Some(&mut 50));
        let keys: Vec<u32> = l.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [3, 4, 0, 9, 5]);
        while l.pop_oldest().is_some() {}
        assert_eq!(l.len(), 0);
        l.insert(1, 1);
        assert_eq!(l.peek(&1), Some(&1));
    }
}
