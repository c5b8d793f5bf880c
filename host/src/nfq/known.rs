//! Services the module chain answered for more than one flow, remembered in the kernel.
//!
//! On the kernel paths every new flow's first packet waits for the agent: a queue, a thread to
//! wake, two crossings of the user boundary. A verdict the modules gave for every source port of
//! a source, or for every source of a service (the ABI's scope), lets the kernel answer the
//! service's next flows itself. Such verdicts go into the verdict maps of Weft's table
//! `ip weft_policy`, whose chain runs at the forward hook just before the queue rules
//! ([`super::rules`]): an allowed flow's connection is marked as the agent's verdict would mark
//! it (so the queue rule never sees it), a denied flow is dropped. `nft list table ip
//! weft_policy` shows what the kernel knows.
//!
//! The maps forget with the chain: they are emptied when the chain changes (the agent is told
//! at once) or a subnet changes hands in the lease table (looked at every 100 ms while
//! anything is remembered), and each element lapses with its verdict, after two minutes at
//! most. A map holds [`MAP_SIZE`] services; past that, services are answered by the agent as
//! before. While the agent is down, services it decided keep their verdicts until those lapse;
//! others follow the failure policy.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::nft::{self, Action, Batch, Element};
use super::socket::Socket;
use super::{nl, rules, PolicyStats};
use crate::wasm::cache::{Ttl, IDLE_MS};
use crate::wasm::flow::{Direction, FlowMeta, Scope};
use crate::wasm::Pipeline;

/// Weft's table of known services.
pub const TABLE: &str = "weft_policy";
/// Elements a map holds at most.
pub const MAP_SIZE: u32 = 65_536;
/// The chain an allowed element jumps to.
const ALLOWED: &str = "allowed";
/// Offers waiting for the thread, at most: past that the verdict loops drop them (the flows are
/// answered, only not remembered).
const BACKLOG: usize = 4096;
/// Elements written in one batch, at most.
const BATCH: usize = 256;
/// How often the lease table is looked at while the kernel may remember something.
const LEASE_LOOK: Duration = Duration::from_millis(100);

/// The key of one remembered service, by the map it goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKey {
    /// Any source port: source, destination, protocol, destination port (map `peers`; the
    /// direction follows from the source).
    Peer {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        port: u16,
    },
    /// Any source: destination, protocol, destination port (map `egress` or `ingress`).
    Service {
        dir: Direction,
        dst: Ipv4Addr,
        protocol: u8,
        port: u16,
    },
}

impl ServiceKey {
    /// The key of `m`'s service under `scope`; none for the flow scope.
    pub fn of(m: &FlowMeta, dir: Direction, scope: Scope) -> Option<ServiceKey> {
        let (dst, protocol, port) = (m.dst, m.protocol, m.dst_port);
        match scope {
            Scope::Flow => None,
            Scope::AnySourcePort => Some(ServiceKey::Peer {
                src: m.src,
                dst,
                protocol,
                port,
            }),
            Scope::AnySource => Some(ServiceKey::Service {
                dir,
                dst,
                protocol,
                port,
            }),
        }
    }

    /// The map the key belongs in.
    pub fn map(&self) -> &'static str {
        match self {
            ServiceKey::Peer { .. } => "peers",
            ServiceKey::Service {
                dir: Direction::Egress, ..
            } => "egress",
            ServiceKey::Service { .. } => "ingress",
        }
    }

    /// The key as the map's concatenated type lays it out.
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            ServiceKey::Peer {
                src,
                dst,
                protocol,
                port,
            } => nft::concat(&[&src.octets(), &dst.octets(), &[protocol], &port.to_be_bytes()]),
            ServiceKey::Service {
                dst, protocol, port, ..
            } => nft::concat(&[&dst.octets(), &[protocol], &port.to_be_bytes()]),
        }
    }
}

/// The maps, in the order they are flushed.
const MAPS: [&str; 3] = ["peers", "egress", "ingress"];

/// The table (for `nft -f`) for a node holding `own`; loading it replaces any earlier version
/// atomically, empty maps included.
pub fn render(own: Option<Ipv4Net>) -> String {
    let (mask, allow) = (rules::MASK, rules::ALLOW);
    let map =
        |name: &str, key: &str| format!("  map {name} {{ type {key} : verdict; flags timeout; size {MAP_SIZE}; }}\n");
    let mut s = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s += &map("peers", "ipv4_addr . ipv4_addr . inet_proto . inet_service");
    s += &map("egress", "ipv4_addr . inet_proto . inet_service");
    s += &map("ingress", "ipv4_addr . inet_proto . inet_service");
    // The mark the agent's NF_REPEAT verdict would have left in the connection.
    s += &format!(
        "  chain {ALLOWED} {{\n    ct mark set ct mark & {:#010x} | {allow:#010x}\n    accept\n  }}\n",
        !mask
    );
    s += "  chain known {\n    type filter hook forward priority filter - 1; policy accept;\n";
    s += "    ct state != new return\n    meta l4proto != { tcp, udp } return\n";
    s += "    ip saddr . ip daddr . meta l4proto . th dport vmap @peers\n";
    if let Some(own) = own {
        s += &format!("    ip saddr {own} ip daddr . meta l4proto . th dport vmap @egress\n");
        s += &format!("    ip saddr != {own} ip daddr {own} ip daddr . meta l4proto . th dport vmap @ingress\n");
    }
    s += "  }\n}\n";
    s
}

/// Loads the table for a node holding `own` (empty).
pub fn install(own: Option<Ipv4Net>) -> Result<(), rules::RulesError> {
    rules::run("nft", &["-f", "-"], Some(&render(own))).map(|_| ())
}

/// Removes the table, if it is there.
pub fn remove() -> Result<(), rules::RulesError> {
    let script = format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n");
    rules::run("nft", &["-f", "-"], Some(&script)).map(|_| ())
}

/// Counters of what the kernel was told.
#[derive(Debug, Default)]
pub struct KnownStats {
    /// Whether the table is loaded (offers are taken only then).
    pub ready: std::sync::atomic::AtomicBool,
    /// Services handed to the kernel.
    pub added: AtomicU64,
    /// Times the maps were emptied (chain or lease table changed).
    pub flushes: AtomicU64,
    /// Services the kernel refused (a full map, say), and offers dropped for a full backlog.
    pub refused: AtomicU64,
}

/// A verdict for a service, offered to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The chain and lease table generations the verdict was made under.
    pub epoch: (u64, u64),
    /// The service.
    pub key: ServiceKey,
    /// Allowed (else dropped).
    pub allow: bool,
    /// How long the verdict holds.
    pub ttl: Ttl,
}

enum Msg {
    Offer(Offer),
    /// The chain changed, or the table was reloaded: look now.
    Look,
    Reloaded,
    /// Look now and answer whether the maps hold no verdict of an older chain.
    Settle(SyncSender<Result<(), String>>),
}

/// How long the rules thread waits for the maps to be emptied before it reports the chain as
/// not in force (an answer normally takes one netlink round trip).
const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// The verdict loops' handle on the kernel's memory of services.
#[derive(Clone)]
pub struct Known {
    tx: SyncSender<Msg>,
    stats: Arc<PolicyStats>,
}

impl Known {
    /// Starts the thread that writes the maps of a table [`install`]ed already.
    pub fn start(pipeline: Arc<Pipeline>, stats: Arc<PolicyStats>) -> std::io::Result<Known> {
        let sock = Socket::open(1 << 20)?;
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        let on_change = tx.clone();
        pipeline.on_change(move |_| {
            // A full backlog is being worked through, and each offer makes the thread look.
            let _ = on_change.try_send(Msg::Look);
        });
        let writer = Writer::new(sock, pipeline, stats.clone());
        std::thread::Builder::new()
            .name("weft-nfq-known".into())
            .spawn(move || writer.run(rx))?;
        Ok(Known { tx, stats })
    }

    /// Offers a verdict; never waits.
    pub fn offer(&self, o: Offer) {
        if !self.stats.known.ready.load(Ordering::Relaxed) {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Offer(o)) {
            self.stats.known.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once the maps hold no verdict of a chain older than the current one, so a
    /// chain reported in force is not overruled by what the kernel remembers of the last.
    pub fn settle(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::sync_channel(1);
        // Blocks only while a full backlog of offers is worked through.
        self.tx
            .send(Msg::Settle(tx))
            .map_err(|_| "the writer of the kernel's maps of known services is gone".to_string())?;
        match rx.recv_timeout(SETTLE_WAIT) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the kernel's maps of known services were not emptied within {SETTLE_WAIT:?}"
            )),
        }
    }

    /// Makes the kernel's table follow the chain: loaded (empty) for a node holding `own`
    /// while modules are `active`, gone otherwise. `current` is what is loaded now.
    pub fn follow(&self, active: bool, own: Option<Ipv4Net>, current: &mut Option<Option<Ipv4Net>>) {
        let ready = &self.stats.known.ready;
        if active && *current != Some(own) {
            ready.store(false, Ordering::Relaxed);
            match install(own) {
                Ok(()) => {
                    let _ = self.tx.send(Msg::Reloaded);
                    *current = Some(own);
                    ready.store(true, Ordering::Relaxed);
                    tracing::info!(
                        table = TABLE,
                        "the kernel answers the new flows of services decided for more than one flow"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, table = TABLE, "cannot load the table of known services: every new flow is asked of the agent")
                }
            }
        } else if !active && current.is_some() {
            ready.store(false, Ordering::Relaxed);
            match remove() {
                Ok(()) => *current = None,
                Err(e) => tracing::warn!(error = %e, table = TABLE, "cannot remove the table of known services"),
            }
        }
    }
}

/// The thread's state: what it told the kernel under which epoch.
struct Writer {
    sock: Socket,
    pipeline: Arc<Pipeline>,
    stats: Arc<PolicyStats>,
    /// The epoch the maps hold verdicts of.
    epoch: (u64, u64),
    /// Keys written under it, with when they lapse (lapsed ones are swept now and then).
    written: HashMap<ServiceKey, Instant>,
    /// When the last element written lapses.
    remembered_until: Option<Instant>,
    /// No element was written before this (the maps were full).
    full_until: Option<Instant>,
    seq: u32,
    buf: Vec<u8>,
}

impl Writer {
    fn new(sock: Socket, pipeline: Arc<Pipeline>, stats: Arc<PolicyStats>) -> Writer {
        let epoch = (pipeline.generation(), pipeline.lease_generation());
        Writer {
            sock,
            pipeline,
            stats,
            epoch,
            written: HashMap::new(),
            remembered_until: None,
            full_until: None,
            seq: 1,
            buf: vec![0u8; 1 << 16],
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let msg = if self.remembers(Instant::now()) {
                match rx.recv_timeout(LEASE_LOOK) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            };
            let mut offers = Vec::new();
            let mut settles = Vec::new();
            for m in msg.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match m {
                    Msg::Offer(o) => offers.push(o),
                    Msg::Look => {}
                    Msg::Reloaded => self.forget(),
                    Msg::Settle(answer) => settles.push(answer),
                }
                if offers.len() == BATCH {
                    break;
                }
            }
            let looked = self.look();
            for answer in settles {
                let _ = answer.try_send(looked.clone());
            }
            self.write(&offers);
        }
    }

    /// True while some element written may still be in the kernel.
    fn remembers(&self, now: Instant) -> bool {
        self.remembered_until.is_some_and(|t| now < t)
    }

    fn forget(&mut self) {
        self.written.clear();
        self.remembered_until = None;
        self.full_until = None;
    }

    /// Empties the maps if the chain or the lease table moved on since they were written; Ok
    /// when they then hold no verdict of an older epoch.
    fn look(&mut self) -> Result<(), String> {
        let now = (self.pipeline.generation(), self.pipeline.lease_generation());
        if now == self.epoch {
            return Ok(());
        }
        if !self.remembers(Instant::now()) {
            // Nothing written is left to take back.
            self.epoch = now;
            self.forget();
            return Ok(());
        }
        let mut b = Batch::new(TABLE, self.seq);
        for m in MAPS {
            b.flush(m);
        }
        match self.send(b) {
            Ok(()) => {
                self.epoch = now;
                self.stats.known.flushes.fetch_add(1, Ordering::Relaxed);
                self.forget();
                Ok(())
            }
            // The epoch stays: the next look tries again (offers of the new chain are not
            // written until it succeeds), while the old verdicts at least lapse on their own.
            Err(e) => {
                tracing::error!(error = %e, table = TABLE, "cannot empty the kernel's maps of known services after a change");
                Err(format!("cannot empty the kernel's maps of known services: {e}"))
            }
        }
    }

    /// Writes the offers of the current epoch the kernel does not have yet.
    fn write(&mut self, offers: &[Offer]) {
        let now = Instant::now();
        if self.full_until.is_some_and(|t| now < t) {
            self.stats
                .known
                .refused
                .fetch_add(offers.len() as u64, Ordering::Relaxed);
            return;
        }
        let mut fresh: Vec<(Offer, Duration)> = Vec::new();
        for o in offers.iter().filter(|o| o.epoch == self.epoch) {
            if self.written.get(&o.key).is_some_and(|l| *l > now) || fresh.iter().any(|(f, _)| f.key == o.key) {
                continue;
            }
            fresh.push((*o, Duration::from_millis(o.ttl.min(IDLE_MS))));
        }
        if fresh.is_empty() {
            return;
        }
        if self.send(batch(self.seq, &fresh)).is_err() {
            // One bad element sinks its whole batch: write them one by one.
            fresh.retain(|one| self.send(batch(self.seq, std::slice::from_ref(one))).is_ok());
        }
        if self.written.len() > 4 * MAP_SIZE as usize {
            // Swept once per so many writes: the cost of an offer stays what it wrote.
            self.written.retain(|_, lapses| *lapses > now);
        }
        for (o, life) in &fresh {
            let lapses = now + *life;
            self.written.insert(o.key, lapses);
            self.remembered_until = Some(self.remembered_until.map_or(lapses, |t| t.max(lapses)));
        }
        self.stats.known.added.fetch_add(fresh.len() as u64, Ordering::Relaxed);
    }

    /// Sends a batch and reads what the kernel said of it: an error names the first message it
    /// refused (and nothing of the batch was applied).
    fn send(&mut self, b: Batch) -> Result<(), KnownError> {
        let (bytes, next) = b.finish();
        self.seq = next;
        self.sock.send(&bytes).map_err(KnownError::Send)?;
        // The kernel applies a batch within the send: any error is already waiting.
        let mut refused = None;
        while let Ok(n) = self.sock.recv(&mut self.buf, true) {
            let Ok(msgs) = nl::split(&self.buf[..n]) else { continue };
            for m in msgs.iter().filter(|m| m.kind == nl::NLMSG_ERROR) {
                if let Ok((errno, _)) = nl::error(m.body) {
                    if errno != 0 {
                        refused.get_or_insert(errno);
                    }
                }
            }
        }
        let Some(errno) = refused else { return Ok(()) };
        self.stats.known.refused.fetch_add(1, Ordering::Relaxed);
        if errno == libc::ENFILE || errno == libc::ENOSPC {
            self.full_until = Some(Instant::now() + Duration::from_secs(1));
            tracing::warn!(
                size = MAP_SIZE,
                "a map of known services is full: further services are asked of the agent"
            );
        } else {
            tracing::debug!(errno, "the kernel refused a change to the maps of known services");
        }
        Err(KnownError::Refused(errno))
    }
}

/// The batch adding `offers` (a map's elements in one message), numbered from `seq`.
fn batch(seq: u32, offers: &[(Offer, Duration)]) -> Batch {
    let mut b = Batch::new(TABLE, seq);
    let keys: Vec<Vec<u8>> = offers.iter().map(|(o, _)| o.key.bytes()).collect();
    for map in MAPS {
        let elements: Vec<Element> = offers
            .iter()
            .zip(&keys)
            .filter(|((o, _), _)| o.key.map() == map)
            .map(|((o, life), key)| Element {
                key,
                action: if o.allow { Action::Jump(ALLOWED) } else { Action::Drop },
                timeout_ms: (life.as_millis() as u64).max(1),
            })
            .collect();
        if !elements.is_empty() {
            b.add(map, &elements);
        }
    }
    b
}

/// Why a change to the maps did not take.
#[derive(Debug, thiserror::Error)]
enum KnownError {
    #[error("cannot write to the netfilter socket: {0}")]
    Send(std::io::Error),
    #[error("the kernel refused it: {}", std::io::Error::from_raw_os_error(*.0))]
    Refused(i32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build_udp, parse_ipv4};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_table_answers_new_flows_before_the_queue_and_marks_as_the_agent_would() {
        let t = render(Some("10.244.1.0/24".parse().unwrap()));
        assert!(
            t.starts_with("table ip weft_policy {}\ndelete table ip weft_policy\n"),
            "replaces atomically"
        );
        assert!(t.contains("priority filter - 1;"), "before the queue rules: {t}");
        assert!(t.contains("ct mark set ct mark & 0xffcfffff | 0x00100000"), "{t}");
        assert!(t.contains("ct state != new return"));
        assert!(
            t.contains("meta l4proto != { tcp, udp } return"),
            "only protocols with ports"
        );
        assert!(t.contains("ip saddr 10.244.1.0/24 ip daddr . meta l4proto . th dport vmap @egress"));
        assert!(t.contains(
            "ip saddr != 10.244.1.0/24 ip daddr 10.244.1.0/24 ip daddr . meta l4proto . th dport vmap @ingress"
        ));
        let none = render(None);
        assert!(none.contains("vmap @peers") && !none.contains("vmap @egress"), "{none}");
    }

    #[test]
    fn keys_name_their_map_and_lay_out_as_the_maps_types() {
        let p = build_udp(a("10.244.1.5"), 4000, a("10.244.2.7"), 53, 64, b"");
        let m = parse_ipv4(&p).unwrap();
        assert_eq!(ServiceKey::of(&m, Direction::Egress, Scope::Flow), None);
        let peer = ServiceKey::of(&m, Direction::Egress, Scope::AnySourcePort).unwrap();
        assert_eq!(peer.map(), "peers");
        assert_eq!(peer.bytes(), [10, 244, 1, 5, 10, 244, 2, 7, 17, 0, 0, 0, 0, 53, 0, 0]);
        let svc = ServiceKey::of(&m, Direction::Ingress, Scope::AnySource).unwrap();
        assert_eq!(svc.map(), "ingress");
        assert_eq!(svc.bytes(), [10, 244, 2, 7, 17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(
            ServiceKey::of(&m, Direction::Egress, Scope::AnySource).unwrap().map(),
            "egress"
        );
    }

    #[test]
    fn a_batch_puts_each_map_s_elements_in_one_message() {
        let p = build_udp(a("10.244.1.5"), 4000, a("10.244.2.7"), 53, 64, b"");
        let m = parse_ipv4(&p).unwrap();
        let offer = |scope, allow| Offer {
            epoch: (1, 0),
            key: ServiceKey::of(&m, Direction::Egress, scope).unwrap(),
            allow,
            ttl: Ttl::MAX,
        };
        let offers = [
            (offer(Scope::AnySourcePort, true), Duration::from_secs(120)),
            (offer(Scope::AnySource, false), Duration::from_secs(5)),
        ];
        let (bytes, next) = batch(10, &offers).finish();
        let msgs = nl::split(&bytes).unwrap();
        assert_eq!(msgs.len(), 4, "begin, peers, egress, end");
        let maps: Vec<Vec<u8>> = msgs[1..3]
            .iter()
            .map(|m| nl::attrs(&m.body[nl::NFGEN_LEN..]).unwrap()[1].1.to_vec())
            .collect();
        assert_eq!(maps, [b"peers\0".to_vec(), b"egress\0".to_vec()]);
        assert_eq!(next, 14, "sequence numbers move on");
    }
}
