//! The verdicts on one burst of queued packets, planned as the fewest messages the kernel takes.
//! Sans I/O. A verdict per packet costs the kernel a message to parse and a walk of its queue
//! each; `NFQNL_MSG_VERDICT_BATCH` answers every waiting packet up to an id alike. So the
//! allowed packets of a burst leave in one batch, after the dropped ones, each of which needs a
//! message of its own and goes first (the batch would otherwise answer it too).
//!
//! A batch answers every packet up to its id that still waits, seen or not. Why that is never
//! a packet the agent did not decide: the kernel queues a packet only once its message is in
//! the socket (a message that cannot be delivered means the packet is not queued at all), and
//! the socket hands messages over in order, so every earlier packet has been read. Two cases
//! break that, and the planner guards against both: a read the agent could not use (truncated,
//! malformed: its packet then waits undecided) and verdicts that could not be sent (their
//! packets wait, some perhaps meant to be dropped). After either, it never batches again on that
//! socket. And as a check on the argument itself, it batches only a burst whose ids follow the
//! last id it answered one by one, as the kernel numbers them.

use super::msg;

/// What the chain decided for one queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub id: u32,
    pub allow: bool,
}

/// The messages planned for one burst.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Verdicts on one packet each.
    pub single: u32,
    /// Batch verdicts.
    pub batches: u32,
}

/// Plans the verdicts of one queue's bursts, in the order they were read.
#[derive(Debug)]
pub struct Planner {
    queue: u16,
    /// The mark an allowed packet carries back.
    allow_mark: u32,
    /// The last id answered, while every packet up to it was read and answered.
    last: Option<u32>,
    /// A read or a send failed: some packet may wait that no batch may answer.
    lost: bool,
}

impl Planner {
    /// A planner for `queue`, which this socket has just bound: the kernel creates the queue
    /// for the binding socket and numbers its packets from 1.
    pub fn bound(queue: u16, allow_mark: u32) -> Self {
        Planner {
            queue,
            allow_mark,
            last: Some(0),
            lost: false,
        }
    }

    /// A read could not be used or verdicts could not be sent: from now on every packet is
    /// answered on its own. True the first time, for the caller to say so once.
    pub fn lost(&mut self) -> bool {
        let first = !self.lost;
        self.lost = true;
        self.last = None;
        first
    }

    /// Appends to `out` the verdicts on `burst` (packets as read, in order).
    pub fn plan(&mut self, burst: &[Decided], out: &mut Vec<u8>) -> Planned {
        let allowed = burst.iter().filter(|d| d.allow).count();
        let batch = allowed > 1 && !self.lost && self.follows(burst);
        let mut planned = Planned::default();
        for d in burst {
            if !d.allow {
                msg::verdict(out, self.queue, d.id, msg::NF_DROP, None);
                planned.single += 1;
            } else if !batch {
                msg::verdict(out, self.queue, d.id, msg::NF_REPEAT, Some(self.allow_mark));
                planned.single += 1;
            }
        }
        if let Some(last_allowed) = burst.iter().rev().find(|d| d.allow).filter(|_| batch) {
            msg::verdict_batch(out, self.queue, last_allowed.id, msg::NF_REPEAT, Some(self.allow_mark));
            planned.batches += 1;
        }
        if !self.lost {
            self.last = burst.last().map(|d| d.id).or(self.last);
        }
        planned
    }

    /// Whether `burst`'s ids follow the last one answered without a gap (wrapping as the
    /// kernel's counter does).
    fn follows(&self, burst: &[Decided]) -> bool {
        let Some(mut prev) = self.last else {
            return false;
        };
        burst.iter().all(|d| {
            let next = d.id == prev.wrapping_add(1);
            prev = d.id;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfq::msg::read_verdicts as read;

    const MARK: u32 = 0x10_0000;

    fn d(id: u32, allow: bool) -> Decided {
        Decided { id, allow }
    }

    #[test]
    fn a_burst_of_allowed_packets_leaves_in_one_batch() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        let planned = p.plan(&[d(1, true), d(2, true), d(3, true)], &mut out);
        assert_eq!(planned, Planned { single: 0, batches: 1 });
        assert_eq!(read(&out), vec![(3, msg::NF_REPEAT, 3, Some(MARK))]);
    }

    #[test]
    fn drops_go_first_one_by_one_then_the_batch() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        let planned = p.plan(&[d(1, true), d(2, false), d(3, true), d(4, false)], &mut out);
        assert_eq!(planned, Planned { single: 2, batches: 1 });
        assert_eq!(
            read(&out),
            vec![
                (1, msg::NF_DROP, 2, None),
                (1, msg::NF_DROP, 4, None),
                (3, msg::NF_REPEAT, 3, Some(MARK)),
            ]
        );
    }

    #[test]
    fn one_allowed_packet_gets_a_plain_verdict() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        p.plan(&[d(1, false), d(2, true)], &mut out);
        assert_eq!(
            read(&out),
            vec![(1, msg::NF_DROP, 1, None), (1, msg::NF_REPEAT, 2, Some(MARK))]
        );
    }

    #[test]
    fn a_gap_in_the_ids_is_answered_packet_by_packet_then_batching_resumes() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        p.plan(&[d(1, true), d(2, true)], &mut out);
        out.clear();
        assert_eq!(
            p.plan(&[d(4, true), d(5, true)], &mut out).batches,
            0,
            "3 was never read"
        );
        out.clear();
        assert_eq!(p.plan(&[d(6, true), d(7, true)], &mut out).batches, 1);
        out.clear();
        assert_eq!(
            p.plan(&[d(8, true), d(10, true)], &mut out).batches,
            0,
            "a gap inside the burst"
        );
    }

    #[test]
    fn ids_wrap_as_the_kernels_counter_does() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        p.last = Some(u32::MAX - 1);
        assert_eq!(
            p.plan(&[d(u32::MAX, true), d(0, true), d(1, true)], &mut out).batches,
            1
        );
        assert_eq!(read(&out), vec![(3, msg::NF_REPEAT, 1, Some(MARK))]);
    }

    #[test]
    fn after_a_lost_read_or_send_nothing_is_batched_again() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        assert!(p.lost(), "the first loss is reported");
        assert!(!p.lost());
        for first in [1, 3, 5] {
            out.clear();
            let planned = p.plan(&[d(first, true), d(first + 1, true)], &mut out);
            assert_eq!(planned, Planned { single: 2, batches: 0 });
        }
        assert_eq!(read(&out).len(), 2);
    }

    #[test]
    fn an_empty_burst_sends_nothing_and_keeps_the_place() {
        let mut p = Planner::bound(5, MARK);
        let mut out = Vec::new();
        assert_eq!(p.plan(&[], &mut out), Planned::default());
        assert!(out.is_empty());
        assert_eq!(p.plan(&[d(1, true), d(2, true)], &mut out).batches, 1);
    }
}
