//! The etcd leases this node granted for writes whose outcome it never learnt. A write's answer
//! can be lost after etcd applied it (a member dies or loses quorum mid-request, the connection
//! breaks): the lease key then rides on the grant made for that write. Revoking the grant at
//! once, as if the write had failed, would delete the key (every peer drops this node's routes)
//! and make the next renewal's compare fail on this node's own write, so the node would take its
//! lease as lost and acquire it again. Instead such grants are remembered here: a key found
//! riding on one of them is this node's own write (nobody else can attach a key to a lease this
//! node was granted), and the grants are revoked once a later write settles where the key is.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Grants remembered at most: one per failed write in an outage that lets grants through but
/// loses writes. Older ones are forgotten and simply expire with their TTL.
pub const MAX_UNSETTLED: usize = 32;

/// Grants whose write's outcome is unknown, shared by every clone of a store.
#[derive(Debug, Clone, Default)]
pub struct Unsettled {
    ids: Arc<Mutex<VecDeque<i64>>>,
}

impl Unsettled {
    /// Remembers the grant of a write whose answer never came.
    pub fn note(&self, id: i64) {
        if id == 0 {
            return;
        }
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if ids.contains(&id) {
            return;
        }
        if ids.len() == MAX_UNSETTLED {
            ids.pop_front();
        }
        ids.push_back(id);
    }

    /// Whether a key riding on etcd lease `id` holds one of this node's unanswered writes.
    pub fn holds(&self, id: i64) -> bool {
        id != 0 && self.ids.lock().unwrap_or_else(PoisonError::into_inner).contains(&id)
    }

    /// A write just settled on grant `kept`: every other remembered grant holds nothing this
    /// node still needs, and is returned to be revoked.
    pub fn settle(&self, kept: i64) -> Vec<i64> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        ids.drain(..).filter(|&id| id != kept).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_held_until_a_write_settles() {
        let u = Unsettled::default();
        assert!(!u.holds(7));
        u.note(7);
        u.note(7);
        u.note(9);
        assert!(u.holds(7) && u.holds(9));
        assert!(!u.holds(0), "no lease is never ours");
        assert_eq!(u.settle(9), vec![7], "the grant the key now rides on is kept");
        assert!(!u.holds(7) && !u.holds(9));
        assert!(u.settle(1).is_empty());
    }

    #[test]
    fn clones_share_what_they_remember() {
        let u = Unsettled::default();
        u.clone().note(3);
        assert!(u.holds(3));
    }

    #[test]
    fn a_long_outage_forgets_the_oldest_grants() {
        let u = Unsettled::default();
        for id in 1..=(MAX_UNSETTLED as i64 + 5) {
            u.note(id);
        }
        assert!(!u.holds(5), "forgotten: it expires by itself");
        assert!(u.holds(6) && u.holds(MAX_UNSETTLED as i64 + 5));
        assert_eq!(u.settle(0).len(), MAX_UNSETTLED);
    }
}
