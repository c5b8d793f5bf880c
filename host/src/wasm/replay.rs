//! The offline test bench behind `weft module test`: flows described in JSON lines, or taken
//! from a packet capture, are decided by the same code the agent runs (runtime, chain, worker,
//! flow records, host functions, failure policies), one decision per flow, so a policy can be
//! tested in its author's CI before it reaches a cluster. What is read here (flow lines,
//! captures, expectations) is parsed without I/O; the caller reads the files.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::cache::Verdict;
use super::chain::{Pipeline, WorkerChain};
use super::flow::{Direction, FlowKey, Scope};
use super::limit::thread_cpu;
use super::runtime::Runtime;
use super::spec::{ModuleSpec, ModuleStatus};
use super::stats::VerdictKind;
use crate::packet::{self, route::RouteTable, tcp_flag};

/// Why flows or expectations could not be read, or the bench not set up.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("flows line {line}: {why}")]
    FlowLine { line: usize, why: String },
    #[error("capture: {0}")]
    Capture(String),
    #[error("expectations line {line}: {why}")]
    Expect { line: usize, why: String },
    #[error("leases: {0}")]
    Leases(String),
    #[error("module {name} did not load: {error}")]
    NotLoaded { name: String, error: String },
    #[error("{0}")]
    Wasm(#[from] super::WasmError),
}

/// A flow as its first packet, and which way it crosses the node.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Egress (from this node's pods) or ingress (to them).
    pub direction: Direction,
    /// The packet, from its IPv4 header on.
    pub packet: Vec<u8>,
}

impl Flow {
    /// `egress tcp 10.244.1.5:40000 -> 10.244.2.7:80`, as the bench prints it.
    pub fn describe(&self) -> String {
        let Ok(m) = packet::parse_ipv4(&self.packet) else {
            return "unparsable packet".into();
        };
        let dir = match self.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let proto = match m.protocol {
            1 => "icmp".to_string(),
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            p => format!("proto {p}"),
        };
        if matches!(m.protocol, 6 | 17) {
            format!("{dir} {proto} {}:{} -> {}:{}", m.src, m.src_port, m.dst, m.dst_port)
        } else {
            format!("{dir} {proto} {} -> {}", m.src, m.dst)
        }
    }
}

/// One line of a flows file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowLine {
    /// `egress` or `ingress`; by default, egress when `src` is in the node's subnet.
    direction: Option<String>,
    /// `tcp`, `udp` or `icmp`.
    protocol: String,
    /// `addr:port` (`addr` for icmp).
    src: String,
    dst: String,
    /// TCP flags, e.g. `S` (the default), `SA`, `A`, `F`, `R`.
    #[serde(default)]
    flags: Option<String>,
    /// Payload text (what the module sees of the payload).
    #[serde(default)]
    payload: Option<String>,
}

fn endpoint(s: &str, icmp: bool) -> Result<(Ipv4Addr, u16), String> {
    if icmp {
        return s
            .parse()
            .map(|a| (a, 0))
            .map_err(|_| format!("{s:?} is not an IPv4 address"));
    }
    s.parse::<SocketAddrV4>()
        .map(|a| (*a.ip(), a.port()))
        .map_err(|_| format!("{s:?} is not addr:port"))
}

fn tcp_flags(s: &str) -> Result<u8, String> {
    s.chars().try_fold(0u8, |f, c| {
        Ok(f | match c.to_ascii_uppercase() {
            'S' => tcp_flag::SYN,
            'A' => tcp_flag::ACK,
            'F' => tcp_flag::FIN,
            'R' => tcp_flag::RST,
            _ => return Err(format!("unknown TCP flag {c:?} (use S, A, F, R)")),
        })
    })
}

fn direction_of(d: Option<&str>, src: Ipv4Addr, own: Ipv4Net) -> Result<Direction, String> {
    match d {
        Some("egress") => Ok(Direction::Egress),
        Some("ingress") => Ok(Direction::Ingress),
        Some(other) => Err(format!("direction must be egress or ingress, not {other:?}")),
        None if own.contains(&src) => Ok(Direction::Egress),
        None => Ok(Direction::Ingress),
    }
}

fn flow_of_line(l: FlowLine, own: Ipv4Net) -> Result<Flow, String> {
    let icmp = l.protocol == "icmp";
    let (src, sport) = endpoint(&l.src, icmp)?;
    let (dst, dport) = endpoint(&l.dst, icmp)?;
    let data = l.payload.unwrap_or_default().into_bytes();
    let packet = match l.protocol.as_str() {
        "tcp" => packet::build_tcp(
            src,
            sport,
            dst,
            dport,
            tcp_flags(l.flags.as_deref().unwrap_or("S"))?,
            64,
            &data,
        ),
        "udp" => packet::build_udp(src, sport, dst, dport, 64, &data),
        "icmp" => packet::build_icmp_echo(src, dst, 1, 1, 64),
        other => return Err(format!("protocol must be tcp, udp or icmp, not {other:?}")),
    };
    Ok(Flow {
        direction: direction_of(l.direction.as_deref(), src, own)?,
        packet,
    })
}

/// Reads flows, one JSON object per line (blank lines and `#` comments skipped), e.g.
/// `{"protocol":"tcp","src":"10.244.1.5:40000","dst":"10.244.2.7:80"}`.
pub fn flows_from_json_lines(text: &str, own: Ipv4Net) -> Result<Vec<Flow>, ReplayError> {
    let mut flows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why: String| ReplayError::FlowLine { line: i + 1, why };
        let l: FlowLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        flows.push(flow_of_line(l, own).map_err(err)?);
    }
    Ok(flows)
}

/// Link types a capture may have (tcpdump's `-i any` writes Linux cooked captures).
const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// The IPv4 packet inside one captured frame, if it holds one.
fn ipv4_in_frame(link: u32, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype, rest) = match link {
        LINKTYPE_RAW | LINKTYPE_IPV4 => return (frame.first()? >> 4 == 4).then_some(frame),
        LINKTYPE_ETHERNET => {
            let mut t = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
            let mut at = 14;
            // 802.1Q tags.
            while t == 0x8100 || t == 0x88a8 {
                t = u16::from_be_bytes([*frame.get(at + 2)?, *frame.get(at + 3)?]);
                at += 4;
            }
            (t, frame.get(at..)?)
        }
        LINKTYPE_LINUX_SLL => (u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]), frame.get(16..)?),
        LINKTYPE_LINUX_SLL2 => (u16::from_be_bytes([*frame.first()?, *frame.get(1)?]), frame.get(20..)?),
        _ => return None,
    };
    (ethertype == 0x0800).then_some(rest)
}

/// What reading a capture found.
#[derive(Debug, Default)]
pub struct Captured {
    /// The first packet of each flow (per direction), in capture order.
    pub flows: Vec<Flow>,
    /// Frames read.
    pub frames: usize,
    /// Frames without an IPv4 packet the chain decides (other link types, IPv6, ARP, truncated).
    pub skipped: usize,
}

/// Reads a pcap or pcapng capture. A packet from the node's subnet `own` is egress, one to it
/// ingress; packets neither from nor to it are skipped (the node decides none of them).
pub fn flows_from_capture(bytes: &[u8], own: Ipv4Net) -> Result<Captured, ReplayError> {
    let mut out = Captured::default();
    let mut seen = std::collections::HashSet::<FlowKey>::new();
    let mut take = |link: u32, frame: &[u8], out: &mut Captured| {
        out.frames += 1;
        let Some(ip) = ipv4_in_frame(link, frame) else {
            out.skipped += 1;
            return;
        };
        let Ok(m) = packet::parse_ipv4(ip) else {
            out.skipped += 1;
            return;
        };
        let direction = if own.contains(&m.src) {
            Direction::Egress
        } else if own.contains(&m.dst) {
            Direction::Ingress
        } else {
            out.skipped += 1;
            return;
        };
        if seen.insert(super::flow::key(&m, direction)) {
            out.flows.push(Flow {
                direction,
                packet: ip[..m.total_len].to_vec(),
            });
        }
    };
    let cap = |e: pcap_file::PcapError| ReplayError::Capture(e.to_string());
    if bytes.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let mut r = pcap_file::pcapng::PcapNgReader::new(bytes).map_err(cap)?;
        while let Some(block) = r.next_block() {
            let packet = match block.map_err(cap)? {
                pcap_file::pcapng::Block::EnhancedPacket(p) => (p.interface_id, p.data.into_owned()),
                _ => continue,
            };
            let link = r
                .interfaces()
                .get(packet.0 as usize)
                .map_or(u32::MAX, |i| u32::from(i.linktype));
            take(link, &packet.1, &mut out);
        }
    } else {
        let mut r = pcap_file::pcap::PcapReader::new(bytes).map_err(cap)?;
        let link = u32::from(r.header().datalink);
        while let Some(p) = r.next_packet() {
            take(link, &p.map_err(cap)?.data, &mut out);
        }
    }
    Ok(out)
}

/// What a flow is expected to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Forwarded as usual.
    Allow,
    /// Dropped.
    Drop,
    /// Sent through this node.
    Via(Ipv4Addr),
}

impl Expected {
    /// Whether `v` is what was expected.
    pub fn matches(self, v: Verdict) -> bool {
        match self {
            Expected::Allow => !v.drop && v.via.is_none(),
            Expected::Drop => v.drop,
            Expected::Via(a) => !v.drop && v.via == Some(a),
        }
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Allow => f.write_str("allow"),
            Expected::Drop => f.write_str("drop"),
            Expected::Via(a) => write!(f, "via {a}"),
        }
    }
}

/// The verdict as the bench prints it and expectations name it.
pub fn verdict_name(v: Verdict) -> String {
    match (v.drop, v.via) {
        (true, _) => "drop".into(),
        (false, Some(a)) => format!("via {a}"),
        (false, None) => "allow".into(),
    }
}

/// Reads expectations: one per flow, in order: `allow`, `drop` or `via ADDR` (blank lines and
/// `#` comments skipped; anything after a second `#` is a comment too).
pub fn expectations(text: &str) -> Result<Vec<Expected>, ReplayError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let e = match (words.next(), words.next(), words.next()) {
            (Some("allow"), None, _) => Expected::Allow,
            (Some("drop"), None, _) => Expected::Drop,
            (Some("via"), Some(a), None) => Expected::Via(a.parse().map_err(|_| ReplayError::Expect {
                line: i + 1,
                why: format!("{a:?} is not an IPv4 address"),
            })?),
            _ => {
                return Err(ReplayError::Expect {
                    line: i + 1,
                    why: format!("{line:?}: use allow, drop or via ADDR"),
                })
            }
        };
        out.push(e);
    }
    Ok(out)
}

/// Reads a lease table as `weft lease ls -o json` or `GET /api/v1/leases` give it (objects with
/// `subnet` and `public_ip`): the peers the modules see through `lease_owner`.
pub fn leases_from_json(text: &str) -> Result<Vec<(Ipv4Net, Ipv4Addr)>, ReplayError> {
    #[derive(Deserialize)]
    struct L {
        subnet: String,
        public_ip: Ipv4Addr,
    }
    let ls: Vec<L> = serde_json::from_str(text).map_err(|e| ReplayError::Leases(e.to_string()))?;
    ls.into_iter()
        .map(|l| {
            let s: Ipv4Net = l
                .subnet
                .parse()
                .map_err(|_| ReplayError::Leases(format!("{:?} is not a subnet", l.subnet)))?;
            Ok((s.trunc(), l.public_ip))
        })
        .collect()
}

/// What one module said about a flow.
#[derive(Debug, Clone)]
pub struct Said {
    /// The module.
    pub module: String,
    /// Its verdict.
    pub kind: VerdictKind,
    /// Why (answered, failed and how, routed via).
    pub reason: String,
}

/// One flow's decision.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The chain's verdict.
    pub verdict: Verdict,
    /// Each module's part, in chain order.
    pub modules: Vec<Said>,
    /// How long the whole chain took.
    pub took: Duration,
    /// CPU time this thread spent in it: what the module really ran, apart from time the
    /// thread waited for a core (on a saturated machine the wall time is mostly that).
    pub cpu: Duration,
    /// Which flows the verdict holds for, as the modules said.
    pub scope: Scope,
    /// A flow the scope covers that the modules answered otherwise: the scope is a false
    /// promise, and agents would give that flow the first flow's verdict.
    pub broken_scope: Option<String>,
}

/// How the bench names a scope.
pub fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Flow => "this flow",
        Scope::AnySourcePort => "any source port",
        Scope::AnySource => "any source",
    }
}

/// `f` from another source port (and, for [`Scope::AnySource`], another source address that
/// could send such a flow to a node holding `own`: another local pod for egress, a pod of
/// another subnet for ingress): a flow `scope` says gets `f`'s verdict. The IPv4 header
/// checksum is made right again.
fn sibling(f: &Flow, scope: Scope, own: Option<Ipv4Net>) -> Option<Flow> {
    let m = packet::parse_ipv4(&f.packet).ok()?;
    let mut p = f.packet.clone();
    let sport = m.src_port.wrapping_add(1).max(1);
    p.get_mut(m.header_len..m.header_len + 2)?
        .copy_from_slice(&sport.to_be_bytes());
    if scope == Scope::AnySource {
        let src = u32::from(m.src);
        let other = match f.direction {
            Direction::Egress => src ^ 1,
            Direction::Ingress => [src ^ 0x100, src ^ 0x200]
                .into_iter()
                .find(|a| own.is_none_or(|o| !o.contains(&Ipv4Addr::from(*a))))
                .unwrap_or(src ^ 0x100),
        };
        p[12..16].copy_from_slice(&other.to_be_bytes());
        p[10..12].fill(0);
        let c = packet::checksum(&p[..m.header_len]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    Some(Flow {
        direction: f.direction,
        packet: p,
    })
}

/// The bench: one node's chain, as an agent would load it, and one worker.
pub struct Bench {
    worker: WorkerChain,
    pipeline: Arc<Pipeline>,
}

/// Where the bench's node stands in the network.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// Its PublicIP.
    pub ip: Ipv4Addr,
    /// Its subnet.
    pub subnet: Ipv4Net,
    /// The cluster network.
    pub network: Ipv4Net,
}

impl Bench {
    /// Loads `specs` on a node `node` that sees `peers`; every module must load.
    pub fn new(
        rt: Arc<Runtime>,
        specs: Vec<ModuleSpec>,
        node: Node,
        peers: &[(Ipv4Net, Ipv4Addr)],
    ) -> Result<Bench, ReplayError> {
        let mut t = RouteTable::new(node.network, node.subnet.prefix_len(), None);
        t.set_local(node.subnet, node.ip);
        for (s, ip) in peers {
            if *s != node.subnet {
                t.insert(*s, *ip);
            }
        }
        let pipeline = Pipeline::new(rt, node.ip, Arc::new(arc_swap::ArcSwap::from_pointee(t)))?;
        pipeline.set_own(node.subnet);
        let statuses: Vec<ModuleStatus> = pipeline.load(specs);
        if let Some(s) = statuses.into_iter().find(|s| s.state != super::spec::LOADED) {
            return Err(ReplayError::NotLoaded {
                name: s.name,
                error: s.error.unwrap_or_default(),
            });
        }
        let worker = WorkerChain::new(pipeline.clone());
        Ok(Bench { worker, pipeline })
    }

    /// Decides `f` afresh (no cached verdict), as the agent decides a flow's first packet.
    pub fn decide(&mut self, f: &Flow) -> Outcome {
        let now = self.worker.now_ms();
        let (t, cpu) = (Instant::now(), thread_cpu());
        let (verdict, life, trail) = self.worker.explain(f.direction, &f.packet, now);
        let (took, cpu) = (t.elapsed(), thread_cpu().saturating_sub(cpu));
        let chain = self.pipeline.chain();
        let modules = trail
            .into_iter()
            .map(|(i, kind, reason)| Said {
                module: chain.modules.get(i).map_or_else(String::new, |m| m.name.to_string()),
                kind,
                reason: reason.to_string(),
            })
            .collect();
        self.settle();
        let broken_scope = self.check_scope(f, verdict, life.scope);
        Outcome {
            verdict,
            modules,
            took,
            cpu,
            scope: life.scope,
            broken_scope,
        }
    }

    /// Asks about a flow `scope` covers besides `f`: what agents would answer from the first
    /// verdict must be what the modules answer.
    fn check_scope(&mut self, f: &Flow, verdict: Verdict, scope: Scope) -> Option<String> {
        if scope == Scope::Flow {
            return None;
        }
        let s = sibling(f, scope, self.pipeline.chain().own)?;
        let now = self.worker.now_ms();
        let (v, _, _) = self.worker.explain(s.direction, &s.packet, now);
        self.settle();
        (v != verdict).then(|| {
            format!(
                "the verdict was given for {}, but {} got {}",
                scope_name(scope),
                s.describe(),
                verdict_name(v)
            )
        })
    }

    /// Waits until every module has an instance ready again (after a failure the next one is
    /// being prepared), so each flow meets the chain as a steady agent would.
    fn settle(&self) {
        let until = Instant::now() + Duration::from_secs(5);
        let now = self.worker.now_ms();
        for m in self.pipeline.chain().modules.iter() {
            while m.compiled.is_ok() && m.spares.is_empty() && !m.stats.quarantined(now) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Log lines each module's rate limit held back (the agent's limit: 10 a second).
    pub fn logs_suppressed(&self) -> Vec<(String, u64)> {
        self.pipeline
            .module_stats()
            .into_iter()
            .map(|(n, s)| (n, s.logs_suppressed.load(std::sync::atomic::Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Ipv4Net {
        "10.244.1.0/24".parse().unwrap()
    }

    #[test]
    fn flow_lines_become_packets_the_parser_reads_back() {
        let text = r#"
# a comment
{"protocol":"tcp","src":"10.244.1.5:40000","dst":"10.244.2.7:80"}
{"protocol":"udp","src":"10.244.2.7:53","dst":"10.244.1.5:5353","payload":"hi"}
{"protocol":"icmp","src":"10.244.1.5","dst":"10.244.3.1","direction":"egress"}
{"protocol":"tcp","src":"10.244.1.5:40000","dst":"10.244.2.7:80","flags":"SA"}
"#;
        let f = flows_from_json_lines(text, own()).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0].describe(), "egress tcp 10.244.1.5:40000 -> 10.244.2.7:80");
        assert_eq!(f[1].describe(), "ingress udp 10.244.2.7:53 -> 10.244.1.5:5353");
        assert_eq!(f[2].describe(), "egress icmp 10.244.1.5 -> 10.244.3.1");
        let m = packet::parse_ipv4(&f[0].packet).unwrap();
        assert_eq!(m.tcp_flags, tcp_flag::SYN);
        assert!(packet::parse_ipv4(&f[0].packet).is_ok_and(|m| m.header_len == 20));
        let m = packet::parse_ipv4(&f[3].packet).unwrap();
        assert_eq!(m.tcp_flags, tcp_flag::SYN | tcp_flag::ACK);
    }

    #[test]
    fn bad_flow_lines_name_their_line_and_fault() {
        for (text, needle) in [
            (
                r#"{"protocol":"sctp","src":"1.2.3.4:1","dst":"1.2.3.4:2"}"#,
                "protocol must be",
            ),
            (
                r#"{"protocol":"tcp","src":"1.2.3.4","dst":"1.2.3.4:2"}"#,
                "is not addr:port",
            ),
            (
                r#"{"protocol":"tcp","src":"1.2.3.4:1","dst":"1.2.3.4:2","flags":"X"}"#,
                "unknown TCP flag",
            ),
            (
                r#"{"protocol":"tcp","src":"1.2.3.4:1","dst":"1.2.3.4:2","direction":"up"}"#,
                "direction must be",
            ),
            (
                r#"{"protocol":"tcp","src":"1.2.3.4:1","dst":"1.2.3.4:2","extra":1}"#,
                "unknown field",
            ),
            ("not json", "line 2"),
        ] {
            let e = flows_from_json_lines(&format!("\n{text}"), own())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.starts_with("flows line 2"), "{text}: {e}");
        }
    }

    #[test]
    fn siblings_differ_only_where_their_scope_allows_and_could_be_real() {
        let flow = |src: &str, dst: &str, direction| Flow {
            direction,
            packet: packet::build_udp(src.parse().unwrap(), 4000, dst.parse().unwrap(), 53, 64, b"x"),
        };
        let parsed = |f: &Flow| packet::parse_ipv4(&f.packet).expect("the sibling parses");
        let out = flow("10.244.1.5", "10.244.2.7", Direction::Egress);
        let s = sibling(&out, Scope::AnySourcePort, Some(own())).unwrap();
        let m = parsed(&s);
        assert_eq!(
            (m.src.to_string(), m.src_port, m.dst_port),
            ("10.244.1.5".into(), 4001, 53)
        );
        let m = parsed(&sibling(&out, Scope::AnySource, Some(own())).unwrap());
        assert_eq!(m.src.to_string(), "10.244.1.4", "another pod of this node");
        // 10.244.0.9 ^ 0x100 is in this node's subnet: an ingress sibling comes from elsewhere.
        let inward = flow("10.244.0.9", "10.244.1.5", Direction::Ingress);
        let m = parsed(&sibling(&inward, Scope::AnySource, Some(own())).unwrap());
        assert_eq!(m.src.to_string(), "10.244.2.9");
    }

    #[test]
    fn expectations_parse_and_match() {
        let e = expectations("allow\n# c\ndrop  # why\nvia 198.18.0.3\n").unwrap();
        assert_eq!(
            e,
            vec![
                Expected::Allow,
                Expected::Drop,
                Expected::Via("198.18.0.3".parse().unwrap())
            ]
        );
        assert!(Expected::Drop.matches(Verdict::DROP));
        assert!(!Expected::Allow.matches(Verdict::DROP));
        assert!(Expected::Allow.matches(Verdict::PASS));
        assert!(expectations("deny").unwrap_err().to_string().contains("line 1"));
        assert!(expectations("via x").is_err());
    }

    #[test]
    fn frames_of_each_link_type_yield_their_ipv4_packet() {
        let ip = packet::build_udp(
            "10.244.1.5".parse().unwrap(),
            1,
            "10.244.2.7".parse().unwrap(),
            2,
            64,
            b"x",
        );
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x81, 0x00, 0, 1, 0x08, 0x00]);
        eth.extend_from_slice(&ip);
        assert_eq!(ipv4_in_frame(LINKTYPE_ETHERNET, &eth), Some(&ip[..]));
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        assert_eq!(ipv4_in_frame(LINKTYPE_LINUX_SLL, &sll), Some(&ip[..]));
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(&ip);
        assert_eq!(ipv4_in_frame(LINKTYPE_LINUX_SLL2, &sll2), Some(&ip[..]));
        assert_eq!(ipv4_in_frame(LINKTYPE_RAW, &ip), Some(&ip[..]));
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 0, 0]);
        assert_eq!(ipv4_in_frame(LINKTYPE_ETHERNET, &arp), None);
        assert_eq!(ipv4_in_frame(LINKTYPE_ETHERNET, &[0u8; 5]), None);
        assert_eq!(ipv4_in_frame(9999, &ip), None);
    }

    #[test]
    fn a_truncated_or_foreign_capture_is_an_error_not_a_panic() {
        assert!(flows_from_capture(b"", own()).is_err());
        assert!(flows_from_capture(b"\xd4\xc3\xb2\xa1\x02\x00", own()).is_err());
        assert!(flows_from_capture(b"\x0a\x0d\x0d\x0a\x00\x00", own()).is_err());
        assert!(flows_from_capture(b"GIF89a", own()).is_err());
    }
}
