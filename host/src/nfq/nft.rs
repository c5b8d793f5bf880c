//! nf_tables set elements, sans I/O: the batch that adds elements (a key, a verdict, a timeout)
//! to maps of a table and empties maps, and the keys of concatenated types. Layouts follow
//! `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`: every change to nf_tables
//! travels in a batch (begin, messages, end) that the kernel applies whole or not at all.

use super::nl::{Writer, NLM_F_CREATE, NLM_F_REQUEST};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
/// The `ip` family of nf_tables.
const NFPROTO_IPV4: u8 = 2;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NF_DROP: i32 = 0;

/// What a verdict map's element does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Jump to the named chain.
    Jump(&'static str),
    /// Drop it.
    Drop,
}

/// One element of a verdict map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element<'a> {
    /// The key, as [`concat`] lays it out.
    pub key: &'a [u8],
    /// The verdict.
    pub action: Action,
    /// Milliseconds until the kernel removes it.
    pub timeout_ms: u64,
}

/// The key of a concatenated type (`ipv4_addr . inet_proto . inet_service`, say): each field in
/// network order, padded to a whole 32-bit register, as nf_tables lays concatenations out.
pub fn concat(fields: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(fields.len() * 4);
    for f in fields {
        k.extend_from_slice(f);
        k.resize(super::nl::align4(k.len()), 0);
    }
    k
}

/// A batch of changes to one table's maps, ready to send in one write.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    table: String,
}

impl Batch {
    /// A batch of changes to `table` (family `ip`), its messages numbered from `seq`.
    pub fn new(table: &str, seq: u32) -> Batch {
        let mut buf = Vec::with_capacity(4096);
        Writer::begin(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish();
        Batch {
            buf,
            seq: seq.wrapping_add(1),
            table: table.to_string(),
        }
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    /// Adds `elements` to `map` (an element already there stays as it is); returns the
    /// message's sequence number, which an error about it names.
    pub fn add(&mut self, map: &str, elements: &[Element]) -> u32 {
        let seq = self.next_seq();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        let mut w = Writer::begin(&mut self.buf, kind, NLM_F_REQUEST | NLM_F_CREATE, seq, NFPROTO_IPV4, 0);
        w.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
        w.str(NFTA_SET_ELEM_LIST_SET, map);
        let list = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elements {
            let el = w.nest(NFTA_LIST_ELEM);
            let key = w.nest(NFTA_SET_ELEM_KEY);
            w.attr(NFTA_DATA_VALUE, e.key);
            w.end(key);
            let data = w.nest(NFTA_SET_ELEM_DATA);
            let verdict = w.nest(NFTA_DATA_VERDICT);
            match e.action {
                Action::Jump(chain) => {
                    w.attr(NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                    w.str(NFTA_VERDICT_CHAIN, chain);
                }
                Action::Drop => w.attr(NFTA_VERDICT_CODE, &NF_DROP.to_be_bytes()),
            }
            w.end(verdict);
            w.end(data);
            w.attr(NFTA_SET_ELEM_TIMEOUT, &e.timeout_ms.to_be_bytes());
            w.end(el);
        }
        w.end(list);
        w.finish();
        seq
    }

    /// Removes every element of `map`; returns the message's sequence number.
    pub fn flush(&mut self, map: &str) -> u32 {
        let seq = self.next_seq();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM;
        let mut w = Writer::begin(&mut self.buf, kind, NLM_F_REQUEST, seq, NFPROTO_IPV4, 0);
        w.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
        w.str(NFTA_SET_ELEM_LIST_SET, map);
        w.finish();
        seq
    }

    /// The batch's bytes, closed; and the next free sequence number.
    pub fn finish(mut self) -> (Vec<u8>, u32) {
        let seq = self.next_seq();
        Writer::begin(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish();
        (self.buf, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::super::nl;
    use super::*;

    #[test]
    fn concatenations_pad_every_field_to_a_register() {
        let k = concat(&[&[10, 244, 2, 7], &[6], &8080u16.to_be_bytes()]);
        assert_eq!(k, [10, 244, 2, 7, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
    }

    /// The bytes libnftnl would send for `nft add element ip t m { 10.0.0.1 . tcp . 80 timeout
    /// 120s : jump allowed }`, attribute by attribute.
    #[test]
    fn a_batch_has_the_kernels_layout() {
        let key = concat(&[&[10, 0, 0, 1], &[6], &80u16.to_be_bytes()]);
        let mut b = Batch::new("t", 100);
        let e = Element {
            key: &key,
            action: Action::Jump("allowed"),
            timeout_ms: 120_000,
        };
        let add = b.add(
            "m",
            &[
                e,
                Element {
                    action: Action::Drop,
                    ..e
                },
            ],
        );
        let flush = b.flush("m");
        let (bytes, next) = b.finish();
        assert_eq!((add, flush, next), (101, 102, 104));
        let msgs = nl::split(&bytes).unwrap();
        let kinds: Vec<u16> = msgs.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [16, 0x0a0c, 0x0a0e, 17]);
        assert_eq!(&msgs[0].body[2..4], &10u16.to_be_bytes(), "the batch names nf_tables");
        assert_eq!(msgs[1].body[0], 2, "family ip");
        let top = nl::attrs(&msgs[1].body[nl::NFGEN_LEN..]).unwrap();
        assert_eq!(top[0], (1, &b"t\0"[..]));
        assert_eq!(top[1], (2, &b"m\0"[..]));
        let elements = nl::attrs(top[2].1).unwrap();
        assert_eq!(elements.len(), 2);
        let first = nl::attrs(elements[0].1).unwrap();
        assert_eq!(nl::attrs(first[0].1).unwrap(), vec![(1, &key[..])]);
        let verdict = nl::attrs(nl::attrs(first[1].1).unwrap()[0].1).unwrap();
        assert_eq!(verdict[0], (1, &(-3i32).to_be_bytes()[..]), "jump");
        assert_eq!(verdict[1], (2, &b"allowed\0"[..]));
        assert_eq!(first[2], (4, &120_000u64.to_be_bytes()[..]), "timeout, ms, big-endian");
        let second = nl::attrs(elements[1].1).unwrap();
        let verdict = nl::attrs(nl::attrs(second[1].1).unwrap()[0].1).unwrap();
        assert_eq!(verdict, vec![(1, &0i32.to_be_bytes()[..])], "drop");
        let flushed = nl::attrs(&msgs[2].body[nl::NFGEN_LEN..]).unwrap();
        assert_eq!(flushed.len(), 2, "no element list: every element");
    }
}
