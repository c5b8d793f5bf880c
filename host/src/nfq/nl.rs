//! Netlink framing for the netfilter messages Weft speaks (nfnetlink_queue's in [`super::msg`],
//! nf_tables' set elements in [`super::nft`]): the message header with its netfilter header,
//! attributes and nests, and splitting a read into messages and attributes. Sans I/O. Netlink
//! headers are host-endian; what netfilter puts inside is mostly big-endian, and the callers
//! say which.

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct nfgenmsg`, which follows it in every netfilter message.
pub const NFGEN_LEN: usize = 4;
/// `NLMSG_ERROR`: an error, or with errno 0 an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// `NLM_F_CREATE`.
pub const NLM_F_CREATE: u16 = 0x400;
/// Set on the type of an attribute that holds attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// The bits of an attribute's type that are flags, not the type.
const NLA_TYPE_FLAGS: u16 = 0xc000;

/// Rounds up to netlink's four-byte alignment.
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why bytes from a netlink socket did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct Malformed(pub &'static str);

/// One message appended to a buffer that may hold others before it (a batch). Its length is
/// written when it is finished.
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Writer<'a> {
    /// Starts a message of type `kind` with a netfilter header: protocol `family`, version 0,
    /// `res_id` (a queue number, a subsystem) big-endian.
    pub fn begin(buf: &'a mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, 0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Writer { buf, start }
    }

    /// Appends an attribute.
    pub fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Appends a NUL-terminated string attribute.
    pub fn str(&mut self, kind: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(kind, &data);
    }

    /// Opens a nested attribute; the attributes appended until [`end`](Self::end) with what
    /// this returns are inside it.
    pub fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    /// Closes the nested attribute opened at `at`.
    pub fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Writes the message's length.
    pub fn finish(self) {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One message of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// What follows the netlink header.
    pub body: &'a [u8],
}

/// Splits a datagram from a netlink socket into its messages.
pub fn split(mut buf: &[u8]) -> Result<Vec<Raw<'_>>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(Malformed("length out of bounds"));
        }
        out.push(Raw {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            body: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// An `NLMSG_ERROR` body: the errno (positive; 0 acknowledges) and the sequence number of the
/// request it answers.
pub fn error(body: &[u8]) -> Result<(i32, u32), Malformed> {
    if body.len() < 4 + NLMSG_HDRLEN {
        return Err(Malformed("short error message"));
    }
    let errno = -i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
    let seq = u32::from_ne_bytes([body[12], body[13], body[14], body[15]]);
    Ok((errno, seq))
}

/// The attributes in `buf`, as (type without flag bits, data).
pub fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_TYPE_FLAGS;
        if len < 4 || len > buf.len() {
            return Err(Malformed("attribute length out of bounds"));
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_and_batches_frame_themselves() {
        let mut b = Vec::new();
        let mut w = Writer::begin(&mut b, 0x0a0c, NLM_F_REQUEST, 7, 2, 10);
        w.str(1, "weft");
        let n = w.nest(3);
        w.attr(1, &[1, 2, 3]);
        w.end(n);
        w.finish();
        let first = b.len();
        Writer::begin(&mut b, 17, NLM_F_REQUEST, 8, 0, 10).finish();
        let msgs = split(&b).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            (msgs[0].kind, msgs[0].seq, msgs[1].kind, msgs[1].seq),
            (0x0a0c, 7, 17, 8)
        );
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize, first);
        assert_eq!(
            &msgs[0].body[..NFGEN_LEN],
            &[2, 0, 0, 10],
            "family, version, res_id big-endian"
        );
        let top = attrs(&msgs[0].body[NFGEN_LEN..]).unwrap();
        assert_eq!(top[0], (1, &b"weft\0"[..]));
        assert_eq!(top[1].0, 3, "the nested flag is not part of the type");
        assert_eq!(attrs(top[1].1).unwrap(), vec![(1, &[1u8, 2, 3][..])]);
        assert_eq!(top[1].1.len(), 8, "a nest's length covers its padded attributes");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut b = Vec::new();
        let mut w = Writer::begin(&mut b, 1, 0, 0, 0, 0);
        w.attr(1, &[9; 5]);
        w.finish();
        for cut in 0..b.len() {
            for m in split(&b[..cut]).unwrap_or_default() {
                let _ = attrs(m.body);
            }
        }
        let mut bad = b.clone();
        bad[0] = 0xff;
        assert!(split(&bad).is_err());
        assert!(attrs(&[0xff, 0, 1, 0]).is_err());
        assert!(attrs(&[2, 0, 1, 0]).is_err(), "shorter than its own header");
        assert!(error(&[0; 19]).is_err());
    }
}
