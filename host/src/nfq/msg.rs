//! nfnetlink_queue messages, sans I/O: the config requests that bind a queue, the packets the
//! kernel hands over and the verdicts sent back. Layouts follow
//! `include/uapi/linux/netfilter/nfnetlink_queue.h`; netlink headers are host-endian, the
//! netfilter payloads big-endian.

use super::nl::{self, Writer, NFGEN_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST};

pub use super::nl::Malformed;

/// `NETLINK_NETFILTER`.
pub const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
/// Accept (instead of drop) packets that find the queue full.
pub const CFG_F_FAIL_OPEN: u32 = 1;
/// Hand over GSO packets whole: only their headers are read.
pub const CFG_F_GSO: u32 = 4;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_PAYLOAD: u16 = 10;

/// Drop the packet.
pub const NF_DROP: u32 = 0;
/// Let it continue.
pub const NF_ACCEPT: u32 = 1;
/// Run the hook again (with the mark the verdict set).
pub const NF_REPEAT: u32 = 4;

/// A queue message's header: the queue subsystem, protocol family unspecified, the queue
/// number as the resource.
fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, queue: u16) -> Writer<'_> {
    Writer::begin(buf, (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0, queue)
}

/// A request binding this socket to `queue`, copying `copy_range` bytes of each packet, with
/// the `CFG_F_*` `flags` and at most `max_len` packets waiting.
pub fn bind(queue: u16, seq: u32, copy_range: u32, flags: u32, max_len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    let mut w = header(&mut b, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue);
    // nfqnl_msg_config_cmd: command, pad, pf (unused since 3.8).
    w.attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
    let mut params = copy_range.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_PACKET);
    w.attr(NFQA_CFG_PARAMS, &params);
    w.attr(NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes());
    w.attr(NFQA_CFG_FLAGS, &flags.to_be_bytes());
    w.attr(NFQA_CFG_MASK, &(CFG_F_FAIL_OPEN | CFG_F_GSO).to_be_bytes());
    w.finish();
    b
}

/// Appends a verdict on packet `id` of `queue`, setting the packet mark to `mark` when given.
pub fn verdict(out: &mut Vec<u8>, queue: u16, id: u32, verdict: u32, mark: Option<u32>) {
    verdict_message(out, NFQNL_MSG_VERDICT, queue, id, verdict, mark);
}

/// Appends one verdict on every packet of `queue` still waiting whose id is `id` or earlier
/// (`NFQNL_MSG_VERDICT_BATCH`): the kernel walks its queue and answers them all alike.
pub fn verdict_batch(out: &mut Vec<u8>, queue: u16, id: u32, verdict: u32, mark: Option<u32>) {
    verdict_message(out, NFQNL_MSG_VERDICT_BATCH, queue, id, verdict, mark);
}

fn verdict_message(out: &mut Vec<u8>, kind: u16, queue: u16, id: u32, verdict: u32, mark: Option<u32>) {
    let mut w = header(out, kind, NLM_F_REQUEST, 0, queue);
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&verdict.to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    w.attr(NFQA_VERDICT_HDR, &hdr);
    if let Some(m) = mark {
        w.attr(NFQA_MARK, &m.to_be_bytes());
    }
    w.finish();
}

/// One message read from the socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A queued packet: its id and its first bytes.
    Packet { id: u32, mark: u32, payload: &'a [u8] },
    /// An acknowledgement (`errno` 0) or an error for request `seq`.
    Ack { seq: u32, errno: i32 },
    /// Anything else (done markers, other subsystems).
    Other,
}

/// Splits a datagram from the socket into its messages.
pub fn parse(buf: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    nl::split(buf)?
        .into_iter()
        .map(|m| match m.kind {
            NLMSG_ERROR => nl::error(m.body).map(|(errno, seq)| Message::Ack { seq, errno }),
            NLMSG_DONE => Ok(Message::Other),
            k if k == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET => packet(m.body),
            _ => Ok(Message::Other),
        })
        .collect()
}

fn packet(body: &[u8]) -> Result<Message<'_>, Malformed> {
    if body.len() < NFGEN_LEN {
        return Err(Malformed("short packet message"));
    }
    let (mut id, mut mark, mut payload) = (None, 0, None);
    for (kind, data) in nl::attrs(&body[NFGEN_LEN..])? {
        match kind {
            NFQA_PACKET_HDR if data.len() >= 4 => id = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
            NFQA_MARK if data.len() >= 4 => mark = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            NFQA_PAYLOAD => payload = Some(data),
            _ => {}
        }
    }
    Ok(Message::Packet {
        id: id.ok_or(Malformed("packet without a header"))?,
        mark,
        payload: payload.unwrap_or(&[]),
    })
}

/// Verdict messages read back as the kernel reads them: (message type, verdict, packet id,
/// mark), for tests of what is sent.
#[cfg(test)]
pub(crate) fn read_verdicts(buf: &[u8]) -> Vec<(u16, u32, u32, Option<u32>)> {
    let be = |d: &[u8], at: usize| {
        d.get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    nl::split(buf)
        .expect("verdicts split")
        .into_iter()
        .map(|m| {
            let (mut verdict, mut id, mut mark) = (0, 0, None);
            for (kind, data) in nl::attrs(&m.body[NFGEN_LEN..]).expect("verdict attributes") {
                match kind {
                    NFQA_VERDICT_HDR => (verdict, id) = (be(data, 0), be(data, 4)),
                    NFQA_MARK => mark = Some(be(data, 0)),
                    _ => {}
                }
            }
            (m.kind & 0xff, verdict, id, mark)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel builds it.
    fn kernel_packet(id: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        let mut w = header(&mut b, NFQNL_MSG_PACKET, 0, 0, 7);
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 2]);
        w.attr(NFQA_PACKET_HDR, &hdr);
        w.attr(NFQA_MARK, &0x10_0000u32.to_be_bytes());
        w.attr(NFQA_PAYLOAD, payload);
        w.finish();
        b
    }

    #[test]
    fn packets_parse_back_to_back() {
        let mut two = kernel_packet(41, &[0x45, 1, 2]);
        two.extend(kernel_packet(42, &[0x45; 20]));
        let msgs = parse(&two).unwrap();
        assert_eq!(
            msgs[0],
            Message::Packet {
                id: 41,
                mark: 0x10_0000,
                payload: &[0x45, 1, 2]
            }
        );
        assert!(matches!(msgs[1], Message::Packet { id: 42, payload, .. } if payload.len() == 20));
    }

    #[test]
    fn verdicts_and_binds_have_the_kernels_layout() {
        let mut v = Vec::new();
        verdict(&mut v, 7, 0x0102_0304, NF_REPEAT, Some(0x10_0000));
        assert_eq!(u32::from_ne_bytes(v[..4].try_into().unwrap()) as usize, v.len());
        assert_eq!(u16::from_ne_bytes([v[4], v[5]]), 0x0301, "queue subsystem, verdict");
        assert_eq!(&v[18..20], &7u16.to_be_bytes(), "queue number, big-endian");
        assert_eq!(&v[24..28], &NF_REPEAT.to_be_bytes());
        assert_eq!(&v[28..32], &0x0102_0304u32.to_be_bytes());
        assert_eq!(&v[36..40], &0x10_0000u32.to_be_bytes());
        let mut both = v.clone();
        verdict_batch(&mut both, 7, 9, NF_DROP, None);
        let b = &both[v.len()..];
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(
            u16::from_ne_bytes([b[4], b[5]]),
            0x0303,
            "queue subsystem, verdict batch"
        );
        assert_eq!(
            (&b[24..28], &b[28..32]),
            (&NF_DROP.to_be_bytes()[..], &9u32.to_be_bytes()[..])
        );
        assert_eq!(b.len(), 32, "no mark attribute when none is set");
        let b = bind(7, 9, 128, CFG_F_FAIL_OPEN, 4096);
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(b.len() % 4, 0);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_REQUEST | NLM_F_ACK);
    }

    #[test]
    fn acks_and_errors_are_read() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-1i32).to_ne_bytes()); // EPERM
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&77u32.to_ne_bytes()); // the request's seq
        m.extend_from_slice(&[0; 4]);
        assert_eq!(parse(&m).unwrap(), vec![Message::Ack { seq: 77, errno: 1 }]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = kernel_packet(1, &[1, 2, 3]);
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        let mut bad = good.clone();
        bad[nl::NLMSG_HDRLEN + NFGEN_LEN] = 0xff; // first attribute's length
        assert!(parse(&bad).is_err());
        let mut huge = good;
        huge[0] = 0xff;
        assert!(parse(&huge).is_err());
        assert_eq!(parse(&[]).unwrap(), vec![]);
    }
}
