//! Wasm policy on the kernel's data paths (`vxlan`, `host-gw`), where packets never reach
//! userspace on their own: netfilter rules ([`rules`]) queue the first packet of each new flow
//! (conntrack state NEW) to the agent over nfnetlink_queue ([`msg`]); the module chain decides
//! as it does for the userspace path (same [`WorkerChain`], same verdict cache); the verdict is
//! applied and, for allowed flows, remembered in the connection mark, so the rest of the flow
//! stays in the kernel.
//!
//! When the agent is not running, the kernel follows the chain's failure policy: with every
//! module fail-open the rules carry `--queue-bypass` (packets pass), otherwise new flows are
//! dropped until the agent is back. The rules stay in place across restarts for that reason.
//! With no module loaded there are no rules at all, so the path pays nothing for this.
//!
//! What the kernel offers is checked at start (the queue socket binds, the rules load); when
//! either fails, the agent says so once, clearly, and reports the path as unavailable in
//! `weft_kernel_policy_available`: flows on this path are then not filtered.

pub mod known;
pub mod msg;
pub mod nft;
pub mod nl;
pub mod rules;
pub mod socket;
pub mod verdicts;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::wasm::chain::Chain;
use crate::wasm::{Direction, Pipeline, WorkerChain};

use known::Known;
use socket::Socket;

/// The default queue number (any of 0..=65535 not used by another program on the node).
pub const DEFAULT_QUEUE: u16 = 8472;
/// Bytes of each queued packet copied to the agent: headers are all a flow key needs.
const COPY_RANGE: u32 = 128;
/// Packets the kernel may hold waiting for verdicts.
const QUEUE_MAXLEN: u32 = 4096;

/// Counters of the kernel-path policy.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Whether the queue is bound and the rules loaded.
    pub available: AtomicBool,
    /// Packets the kernel handed over.
    pub queued: AtomicU64,
    /// Packets allowed (their flow is then marked).
    pub allowed: AtomicU64,
    /// Packets dropped by a verdict.
    pub denied: AtomicU64,
    /// Verdict messages sent on one packet each.
    pub single_verdicts: AtomicU64,
    /// Batch verdicts sent, each on every allowed packet of a burst.
    pub batch_verdicts: AtomicU64,
    /// Messages that did not parse or verdicts that could not be sent.
    pub errors: AtomicU64,
    /// What the kernel was told of services decided for more than one flow.
    pub known: known::KnownStats,
}

/// Why the kernel path cannot be filtered.
#[derive(Debug, thiserror::Error)]
pub enum NfqError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot bind NFQUEUE {queue}: {reason}")]
    Bind { queue: u16, reason: String },
    #[error("cannot load the policy rules: {0}")]
    Rules(#[from] rules::RulesError),
}

/// A netfilter socket bound to one queue.
struct QueueSocket {
    sock: Socket,
    queue: u16,
}

impl QueueSocket {
    fn open(queue: u16, fail_open: bool) -> Result<QueueSocket, NfqError> {
        // A burst of new flows must not kill the loop with ENOBUFS; a big buffer absorbs it.
        let sock = Socket::open(8 << 20).map_err(NfqError::Socket)?;
        let flags = msg::CFG_F_GSO | if fail_open { msg::CFG_F_FAIL_OPEN } else { 0 };
        let bind_error = |reason: String| NfqError::Bind { queue, reason };
        sock.send(&msg::bind(queue, 1, COPY_RANGE, flags, QUEUE_MAXLEN))
            .map_err(|e| bind_error(e.to_string()))?;
        let mut b = vec![0u8; 8192];
        let n = sock.recv(&mut b, false).map_err(|e| bind_error(e.to_string()))?;
        let reply = msg::parse(&b[..n]).map_err(|e| bind_error(e.to_string()))?;
        match reply.first() {
            Some(msg::Message::Ack { errno: 0, .. }) => Ok(QueueSocket { sock, queue }),
            Some(msg::Message::Ack { errno, .. }) => Err(bind_error(match *errno {
                // The kernel answers EPERM both for a queue another socket holds and for a
                // process without CAP_NET_ADMIN.
                libc::EBUSY | libc::EPERM => {
                    "another program already listens on this queue, or the agent lacks CAP_NET_ADMIN".to_string()
                }
                e => std::io::Error::from_raw_os_error(e).to_string(),
            })),
            _ => Err(bind_error("no acknowledgement from the kernel".into())),
        }
    }
}

/// Which way a queued packet goes, seen from this node: out of its subnet or into it.
pub fn direction(own: Option<Ipv4Net>, src: Ipv4Addr) -> Direction {
    match own {
        Some(n) if n.contains(&src) => Direction::Egress,
        _ => Direction::Ingress,
    }
}

/// The rules `chain` calls for.
fn wanted(chain: &Chain, network: Ipv4Net, queue: u16, queues: u16) -> rules::RuleSet {
    rules::RuleSet {
        network,
        queue: (!chain.modules.is_empty()).then_some(queue),
        queues,
        bypass: chain
            .modules
            .iter()
            .all(|m| m.failure == crate::wasm::FailurePolicy::Open),
    }
}

/// Queues (and threads) for the kernel path: one per two CPUs, at most four. Measured on two
/// CPUs, one queue answered new connections faster than two (BENCHMARKS.md): the queue thread
/// competes with the connections' own processing for the cores.
pub fn default_queues() -> u16 {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).clamp(1, 4) as u16
}

/// How long a verdict thread keeps polling after a packet before it sleeps: new connections
/// come in bursts, and a thread that is awake answers the next one without a wake-up.
const SPIN: Duration = Duration::from_micros(500);

/// Starts the kernel-path policy: binds `queues` queues from `queue` on, loads the rules and
/// keeps them matching the module chain. Errors mean the path cannot be filtered; the caller
/// reports them.
pub fn start(
    pipeline: Arc<Pipeline>,
    network: Ipv4Net,
    queue: u16,
    queues: u16,
    stats: Arc<PolicyStats>,
) -> Result<(), NfqError> {
    let queues = queues.clamp(1, 8).min(u16::MAX - queue + 1);
    // Listening before the first look: a chain loaded from here on wakes the rules thread.
    let (wake, changes) = std::sync::mpsc::sync_channel::<()>(1);
    pipeline.on_change(move |_| {
        // Full means a pass is already due, which will see this change too.
        let _ = wake.try_send(());
    });
    let chain = pipeline.chain();
    let first = wanted(&chain, network, queue, queues);
    // Fail-open also means "pass when the queue is full", never a drop the policy did not ask for.
    let sockets = (0..queues)
        .map(|k| QueueSocket::open(queue + k, first.bypass))
        .collect::<Result<Vec<_>, _>>()?;
    rules::install(&first)?;
    pipeline.enforcer().applied(chain.generation);
    stats.available.store(true, Ordering::Relaxed);
    tracing::info!(queue, queues, %network, modules_active = first.queue.is_some(), bypass = first.bypass,
        "Wasm policy on the kernel path: first packets of new flows go through NFQUEUE");
    let known = match Known::start(pipeline.clone(), stats.clone()) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a socket for the kernel's maps of known services: every new flow is asked of the agent");
            None
        }
    };
    let mut loaded = None;
    if let Some(k) = &known {
        k.follow(first.queue.is_some(), chain.own, &mut loaded);
    }
    for (k, socket) in sockets.into_iter().enumerate() {
        let (pipeline, stats, known) = (pipeline.clone(), stats.clone(), known.clone());
        std::thread::Builder::new()
            .name(format!("weft-nfq{k}"))
            .spawn(move || serve(socket, pipeline, stats, known))
            .map_err(NfqError::Socket)?;
    }
    let follower = RulesFollower {
        pipeline,
        network,
        queue,
        queues,
        known,
        loaded,
        current: first,
        settled: chain.generation,
    };
    std::thread::Builder::new()
        .name("weft-nfq-rules".into())
        .spawn(move || follower.run(changes))
        .map_err(NfqError::Socket)?;
    Ok(())
}

/// How often the rules thread looks at the chain without being woken: the retry period of a
/// failed install, and what the maps of known services are checked at.
const RULES_PASS: Duration = Duration::from_millis(250);

/// The rules thread's state: the rules follow the chain (loading the first module starts
/// queueing, removing the last stops it, the failure policies decide the bypass), and each
/// pass tells the pipeline which chain is then in force.
struct RulesFollower {
    pipeline: Arc<Pipeline>,
    network: Ipv4Net,
    queue: u16,
    queues: u16,
    known: Option<Known>,
    loaded: Option<Option<Ipv4Net>>,
    current: rules::RuleSet,
    /// The chain generation the maps of known services were last emptied for.
    settled: u64,
}

impl RulesFollower {
    fn run(mut self, changes: std::sync::mpsc::Receiver<()>) {
        loop {
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) = changes.recv_timeout(RULES_PASS) {
                // Nobody can wake it any more (the pipeline is gone): keep the period.
                std::thread::sleep(RULES_PASS);
            }
            self.pass();
        }
    }

    fn pass(&mut self) {
        let chain = self.pipeline.chain();
        let want = wanted(&chain, self.network, self.queue, self.queues);
        if let Some(k) = &self.known {
            k.follow(want.queue.is_some(), chain.own, &mut self.loaded);
        }
        if want != self.current {
            if let Err(e) = rules::install(&want) {
                tracing::error!(error = %e, "cannot update the kernel-path policy rules; retrying");
                self.pipeline.enforcer().failed(e.to_string());
                return;
            }
            tracing::info!(
                modules_active = want.queue.is_some(),
                bypass = want.bypass,
                "kernel-path policy rules updated"
            );
            self.current = want;
        }
        // Verdicts the kernel remembers of the last chain would answer for this one.
        if chain.generation != self.settled {
            if let Some(Err(e)) = self.known.as_ref().map(Known::settle) {
                self.pipeline.enforcer().failed(e);
                return;
            }
            self.settled = chain.generation;
        }
        self.pipeline.enforcer().applied(chain.generation);
    }
}

/// Bytes read per queued packet: its message holds [`COPY_RANGE`] bytes of the packet and
/// about a hundred of attributes, so a slot this size never cuts one.
const SLOT: usize = 2048;

/// The verdict loop of one queue: every packet waiting is read in one `recvmmsg` (up to
/// [`socket::MAX_READS`]), decided (from the chain's cache or its modules) and answered in one
/// send, its allowed packets by one batch verdict ([`verdicts`]); the thread polls a moment
/// longer before it sleeps.
fn serve(socket: QueueSocket, pipeline: Arc<Pipeline>, stats: Arc<PolicyStats>, known: Option<Known>) {
    let planner = verdicts::Planner::bound(socket.queue, rules::ALLOW);
    Server {
        chain: WorkerChain::new(pipeline.clone()),
        socket,
        pipeline,
        stats,
        known,
        planner,
        buf: vec![0u8; SLOT * socket::MAX_READS],
        lens: [None; socket::MAX_READS],
        burst: Vec::with_capacity(socket::MAX_READS),
        replies: Vec::with_capacity(64 * socket::MAX_READS),
    }
    .run()
}

/// One queue's verdict loop and what it reuses from burst to burst.
struct Server {
    socket: QueueSocket,
    pipeline: Arc<Pipeline>,
    stats: Arc<PolicyStats>,
    known: Option<Known>,
    chain: WorkerChain,
    planner: verdicts::Planner,
    buf: Vec<u8>,
    lens: [Option<usize>; socket::MAX_READS],
    burst: Vec<verdicts::Decided>,
    replies: Vec<u8>,
}

impl Server {
    fn run(mut self) {
        let mut failures = 0u32;
        let mut spin = crate::tunnel::spin::Spin::new(SPIN);
        loop {
            let n = match self.socket.sock.recv_many(&mut self.buf, SLOT, &mut self.lens) {
                Ok(n) => {
                    failures = 0;
                    n
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if spin.keep_spinning(std::time::Instant::now()) {
                        // Polite: whatever else wants this core runs first.
                        std::thread::yield_now();
                    } else {
                        self.socket.sock.wait();
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    failures += 1;
                    if self.gives_up(&e, failures) {
                        return;
                    }
                    continue;
                }
            };
            spin.traffic(std::time::Instant::now());
            self.decide(n);
            self.reply();
        }
    }

    /// Counts a failed receive; true once the socket has failed too often to go on.
    fn gives_up(&self, e: &std::io::Error, failures: u32) -> bool {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if failures == 1 {
            tracing::warn!(error = %e, "NFQUEUE receive failed");
        }
        if failures > 10_000 {
            self.stats.available.store(false, Ordering::Relaxed);
            tracing::error!(error = %e, "NFQUEUE socket keeps failing; kernel-path policy stopped");
            return true;
        }
        false
    }

    /// Decides every packet of the `n` messages just read, in order, into `burst`.
    fn decide(&mut self, n: usize) {
        self.burst.clear();
        self.chain.refresh();
        let now = self.chain.now_ms();
        let own = self.pipeline.chain().own;
        for k in 0..n {
            let parsed = match self.lens[k] {
                Some(len) => msg::parse(&self.buf[k * SLOT..k * SLOT + len]).map_err(|e| e.to_string()),
                None => Err("a message longer than the read".to_string()),
            };
            let msgs = match parsed {
                Ok(msgs) => msgs,
                Err(why) => {
                    unusable(&self.stats, &mut self.planner, &why);
                    continue;
                }
            };
            for m in msgs {
                if let msg::Message::Packet { id, payload, .. } = m {
                    let allow = decide_packet(&mut self.chain, self.known.as_ref(), own, payload, now);
                    self.burst.push(verdicts::Decided { id, allow });
                }
            }
        }
        self.chain.flush_stats();
    }

    /// Sends the verdicts on the burst just decided, in one message batch.
    fn reply(&mut self) {
        let allowed = self.burst.iter().filter(|d| d.allow).count() as u64;
        let stats = &self.stats;
        stats.queued.fetch_add(self.burst.len() as u64, Ordering::Relaxed);
        stats.allowed.fetch_add(allowed, Ordering::Relaxed);
        stats
            .denied
            .fetch_add(self.burst.len() as u64 - allowed, Ordering::Relaxed);
        self.replies.clear();
        let planned = self.planner.plan(&self.burst, &mut self.replies);
        if self.replies.is_empty() {
            return;
        }
        match self.socket.sock.send(&self.replies) {
            Ok(()) => {
                stats
                    .single_verdicts
                    .fetch_add(u64::from(planned.single), Ordering::Relaxed);
                stats
                    .batch_verdicts
                    .fetch_add(u64::from(planned.batches), Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "NFQUEUE verdicts failed");
                if self.planner.lost() {
                    tracing::warn!(error = %e, "NFQUEUE verdicts could not be sent; their packets wait unanswered, and verdicts go one packet at a time from now on");
                }
            }
        }
    }
}

/// A message read from the queue that could not be used: its packet waits unanswered.
fn unusable(stats: &PolicyStats, planner: &mut verdicts::Planner, why: &str) {
    stats.errors.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(error = why, "unreadable NFQUEUE message");
    if planner.lost() {
        tracing::warn!(error = why, "an NFQUEUE message could not be read; its packet waits unanswered, and verdicts go one packet at a time from now on");
    }
}

/// The chain's verdict on one queued packet: whether it may pass. A verdict for a whole
/// service is offered to the kernel's maps of known services.
fn decide_packet(
    chain: &mut WorkerChain,
    known: Option<&Known>,
    own: Option<Ipv4Net>,
    payload: &[u8],
    now: u64,
) -> bool {
    // One parse answers both the direction and the decision.
    let verdict = match crate::packet::parse_ipv4(payload) {
        Ok(meta) => {
            let dir = direction(own, meta.src);
            let d = chain.decide_flow(dir, &meta, payload, now);
            if let (Some(k), Some((scope, ttl))) = (known, d.wide) {
                if let Some(key) = known::ServiceKey::of(&meta, dir, scope) {
                    let (epoch, allow) = (chain.epoch(), !d.verdict.drop);
                    k.offer(known::Offer { epoch, key, allow, ttl });
                }
            }
            d.verdict
        }
        Err(_) => chain.decide(Direction::Ingress, payload, now),
    };
    !verdict.drop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_is_seen_from_the_node() {
        let own = Some("10.244.1.0/24".parse().unwrap());
        assert_eq!(direction(own, "10.244.1.7".parse().unwrap()), Direction::Egress);
        assert_eq!(direction(own, "10.244.2.7".parse().unwrap()), Direction::Ingress);
    }
}
