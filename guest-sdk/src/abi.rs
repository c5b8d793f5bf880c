//! The wire contract between the Weft host and a module, version 1: the flow record's layout and
//! the packing of verdicts. The host links this same module, so both sides agree by
//! construction. `ABI.md` is the prose version.

/// The ABI version this SDK speaks; a module exports it from `weft_abi_version`.
pub const ABI_VERSION: u32 = 1;

/// Size of the flow record the host writes before each decision.
pub const RECORD_SIZE: usize = 128;
/// Most L4 payload bytes a record carries.
pub const PAYLOAD_MAX: usize = 64;

/// Byte offsets of the fields of the version-1 flow record. Integers are little-endian;
/// addresses are four bytes in network order.
pub mod off {
    /// u16: record version (1).
    pub const VERSION: usize = 0;
    /// u16: record size in bytes (128).
    pub const SIZE: usize = 2;
    /// u8: 0 egress (leaving a local pod), 1 ingress (arriving for a local pod).
    pub const DIRECTION: usize = 4;
    /// u8: IP protocol number.
    pub const PROTOCOL: usize = 5;
    /// u8: TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10), 0 for other protocols.
    pub const TCP_FLAGS: usize = 6;
    /// u8: flow flags, see [`super::flag`].
    pub const FLAGS: usize = 7;
    /// [u8; 4]: source address.
    pub const SRC: usize = 8;
    /// [u8; 4]: destination address.
    pub const DST: usize = 12;
    /// u16: source port (TCP/UDP); for ICMP, type << 8 | code.
    pub const SRC_PORT: usize = 16;
    /// u16: destination port (TCP/UDP); for ICMP echo, the identifier.
    pub const DST_PORT: usize = 18;
    /// u32: the IP packet's total length.
    pub const PACKET_LEN: usize = 20;
    /// [u8; 4]: underlay address of the node leasing the source (0.0.0.0: none).
    pub const SRC_NODE: usize = 24;
    /// [u8; 4]: underlay address of the node leasing the destination (0.0.0.0: none).
    pub const DST_NODE: usize = 28;
    /// [u8; 4]: network address of the subnet holding the source.
    pub const SRC_SUBNET: usize = 32;
    /// [u8; 4]: network address of the subnet holding the destination.
    pub const DST_SUBNET: usize = 36;
    /// u8: prefix length of the source subnet (0: no lease covers the source).
    pub const SRC_PREFIX: usize = 40;
    /// u8: prefix length of the destination subnet (0: no lease covers the destination).
    pub const DST_PREFIX: usize = 41;
    /// u16: how many payload bytes follow at [`PAYLOAD`].
    pub const PAYLOAD_LEN: usize = 42;
    /// [u8; 4]: underlay address of the node making the decision.
    pub const LOCAL_NODE: usize = 44;
    /// [u8; 64]: the first bytes of the L4 payload.
    pub const PAYLOAD: usize = 64;
}

/// Bits of the record's flags byte.
pub mod flag {
    /// The host saw this flow before, under an earlier set of modules: the flow is in flight.
    pub const ESTABLISHED: u8 = 0x01;
    /// A non-first IP fragment: it carries no ports and no payload start.
    pub const FRAGMENT: u8 = 0x02;
}

/// Direction values of the record.
pub mod direction {
    /// A packet leaving a local pod for another node.
    pub const EGRESS: u8 = 0;
    /// A packet from another node for a local pod.
    pub const INGRESS: u8 = 1;
}

/// Policy actions (low byte of a `weft_policy` result).
pub mod action {
    /// Let the flow through.
    pub const ALLOW: u8 = 0;
    /// Drop the flow's packets.
    pub const DROP: u8 = 1;
    /// Let the flow through and log it.
    pub const ALLOW_LOG: u8 = 2;
}

/// Routing actions (low byte of a `weft_route` result).
pub mod route {
    /// Deliver to the node leasing the destination, as usual.
    pub const OWNER: u8 = 0;
    /// Send through the node whose underlay address is in the high 32 bits.
    pub const VIA: u8 = 1;
}

/// Cache field value: do not cache this verdict; ask again for the next packet.
pub const CACHE_NONE: u16 = 0;
/// Cache field value: the verdict holds for the flow's whole life (until it idles out or the
/// modules change).
pub const CACHE_FLOW: u16 = 0xFFFF;

/// Scope values (bits 8-15 of a verdict word): which flows besides this one the verdict holds
/// for. A module that widens the scope promises that its answer depends on none of the fields
/// the scope leaves out (the source port; with [`scope::ANY_SOURCE`] also the source address
/// and what the record derives from it: source node and subnet). The host then decides other
/// flows of the same service from the cache without calling the module, and on the kernel
/// paths (`vxlan`, `host-gw`) the kernel answers them without asking the agent.
pub mod scope {
    /// This flow only: direction and 5-tuple.
    pub const FLOW: u8 = 0;
    /// Every flow of the same direction, protocol, source and destination address and
    /// destination port, whatever its source port.
    pub const ANY_SOURCE_PORT: u8 = 1;
    /// Every flow of the same direction, protocol, destination address and destination port,
    /// whatever its source.
    pub const ANY_SOURCE: u8 = 2;
    /// The widest scope defined.
    pub const MAX: u8 = ANY_SOURCE;
}

/// A decoded verdict word. Layout: bits 0-7 action, bits 8-15 scope (see [`scope`]; values past
/// [`scope::MAX`] are refused), bits 16-31 cache (0 none, 0xFFFF the flow's life, otherwise
/// seconds), bits 32-63 an IPv4 address as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word {
    /// The action byte.
    pub action: u8,
    /// The scope byte.
    pub scope: u8,
    /// The cache field.
    pub cache: u16,
    /// The address field (route `VIA` only).
    pub addr: u32,
}

impl Word {
    /// Packs into the i64 a decision export returns.
    pub const fn pack(self) -> i64 {
        (self.action as u64 | (self.scope as u64) << 8 | (self.cache as u64) << 16 | (self.addr as u64) << 32) as i64
    }

    /// Unpacks a returned i64; `None` when the scope is not one this ABI defines.
    pub const fn unpack(v: i64) -> Option<Word> {
        let v = v as u64;
        let scope = ((v >> 8) & 0xFF) as u8;
        if scope > scope::MAX {
            return None;
        }
        Some(Word {
            action: (v & 0xFF) as u8,
            scope,
            cache: ((v >> 16) & 0xFFFF) as u16,
            addr: (v >> 32) as u32,
        })
    }
}

/// The fields of a flow record, as plain data; both sides encode and decode through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// [`direction::EGRESS`] or [`direction::INGRESS`].
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// TCP flags.
    pub tcp_flags: u8,
    /// [`flag`] bits.
    pub flags: u8,
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Source port (see [`off::SRC_PORT`]).
    pub src_port: u16,
    /// Destination port (see [`off::DST_PORT`]).
    pub dst_port: u16,
    /// IP total length.
    pub packet_len: u32,
    /// Node leasing the source.
    pub src_node: [u8; 4],
    /// Node leasing the destination.
    pub dst_node: [u8; 4],
    /// Subnet holding the source.
    pub src_subnet: [u8; 4],
    /// Subnet holding the destination.
    pub dst_subnet: [u8; 4],
    /// Source subnet prefix length (0: none).
    pub src_prefix: u8,
    /// Destination subnet prefix length (0: none).
    pub dst_prefix: u8,
    /// The deciding node.
    pub local_node: [u8; 4],
    /// Payload bytes valid in `payload`.
    pub payload_len: u16,
    /// The first bytes of the L4 payload.
    pub payload: [u8; PAYLOAD_MAX],
}

impl Default for Record {
    fn default() -> Self {
        Record {
            direction: 0,
            protocol: 0,
            tcp_flags: 0,
            flags: 0,
            src: [0; 4],
            dst: [0; 4],
            src_port: 0,
            dst_port: 0,
            packet_len: 0,
            src_node: [0; 4],
            dst_node: [0; 4],
            src_subnet: [0; 4],
            dst_subnet: [0; 4],
            src_prefix: 0,
            dst_prefix: 0,
            local_node: [0; 4],
            payload_len: 0,
            payload: [0; PAYLOAD_MAX],
        }
    }
}

impl Record {
    /// Writes the record in the version-1 layout.
    pub fn encode(&self, out: &mut [u8; RECORD_SIZE]) {
        let plen = (self.payload_len as usize).min(PAYLOAD_MAX);
        self.encode_with(&self.payload[..plen], out);
    }

    /// Writes the record with `payload` (its first [`PAYLOAD_MAX`] bytes) in place of the
    /// record's own: a host encodes straight from the packet, without copying it twice.
    #[inline]
    pub fn encode_with(&self, payload: &[u8], out: &mut [u8; RECORD_SIZE]) {
        let payload = &payload[..payload.len().min(PAYLOAD_MAX)];
        let plen = payload.len();
        out[off::VERSION..off::VERSION + 2].copy_from_slice(&(ABI_VERSION as u16).to_le_bytes());
        out[off::SIZE..off::SIZE + 2].copy_from_slice(&(RECORD_SIZE as u16).to_le_bytes());
        out[off::DIRECTION] = self.direction;
        out[off::PROTOCOL] = self.protocol;
        out[off::TCP_FLAGS] = self.tcp_flags;
        out[off::FLAGS] = self.flags;
        out[off::SRC..off::SRC + 4].copy_from_slice(&self.src);
        out[off::DST..off::DST + 4].copy_from_slice(&self.dst);
        out[off::SRC_PORT..off::SRC_PORT + 2].copy_from_slice(&self.src_port.to_le_bytes());
        out[off::DST_PORT..off::DST_PORT + 2].copy_from_slice(&self.dst_port.to_le_bytes());
        out[off::PACKET_LEN..off::PACKET_LEN + 4].copy_from_slice(&self.packet_len.to_le_bytes());
        out[off::SRC_NODE..off::SRC_NODE + 4].copy_from_slice(&self.src_node);
        out[off::DST_NODE..off::DST_NODE + 4].copy_from_slice(&self.dst_node);
        out[off::SRC_SUBNET..off::SRC_SUBNET + 4].copy_from_slice(&self.src_subnet);
        out[off::DST_SUBNET..off::DST_SUBNET + 4].copy_from_slice(&self.dst_subnet);
        out[off::SRC_PREFIX] = self.src_prefix;
        out[off::DST_PREFIX] = self.dst_prefix;
        out[off::PAYLOAD_LEN..off::PAYLOAD_LEN + 2].copy_from_slice(&(plen as u16).to_le_bytes());
        out[off::LOCAL_NODE..off::LOCAL_NODE + 4].copy_from_slice(&self.local_node);
        out[off::LOCAL_NODE + 4..off::PAYLOAD].fill(0);
        out[off::PAYLOAD..off::PAYLOAD + plen].copy_from_slice(payload);
        out[off::PAYLOAD + plen..].fill(0);
    }

    /// Reads a version-1 record; `None` if the version or size is not one this SDK knows.
    #[inline(always)]
    pub fn decode(b: &[u8; RECORD_SIZE]) -> Option<Record> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let a4 = |o: usize| [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if u16_at(off::VERSION) != ABI_VERSION as u16 || u16_at(off::SIZE) as usize != RECORD_SIZE {
            return None;
        }
        let mut payload = [0u8; PAYLOAD_MAX];
        payload.copy_from_slice(&b[off::PAYLOAD..off::PAYLOAD + PAYLOAD_MAX]);
        Some(Record {
            direction: b[off::DIRECTION],
            protocol: b[off::PROTOCOL],
            tcp_flags: b[off::TCP_FLAGS],
            flags: b[off::FLAGS],
            src: a4(off::SRC),
            dst: a4(off::DST),
            src_port: u16_at(off::SRC_PORT),
            dst_port: u16_at(off::DST_PORT),
            packet_len: u32::from_le_bytes(a4(off::PACKET_LEN)),
            src_node: a4(off::SRC_NODE),
            dst_node: a4(off::DST_NODE),
            src_subnet: a4(off::SRC_SUBNET),
            dst_subnet: a4(off::DST_SUBNET),
            src_prefix: b[off::SRC_PREFIX],
            dst_prefix: b[off::DST_PREFIX],
            local_node: a4(off::LOCAL_NODE),
            payload_len: u16_at(off::PAYLOAD_LEN).min(PAYLOAD_MAX as u16),
            payload,
        })
    }
}

/// Names of the exports a module provides and the imports the host offers (module `weft`).
pub mod names {
    /// `() -> i32`: the ABI version.
    pub const ABI_VERSION: &str = "weft_abi_version";
    /// `(len: i32) -> i32`: room for `len` bytes of config in guest memory.
    pub const ALLOC: &str = "weft_alloc";
    /// `(ptr: i32, len: i32) -> i64`: 0 accepts; otherwise ptr << 32 | len of a UTF-8 reason.
    pub const CONFIGURE: &str = "weft_configure";
    /// `() -> i32`: address of the 128-byte flow record buffer.
    pub const FLOW: &str = "weft_flow";
    /// `() -> i64`: policy verdict word for the record in the buffer.
    pub const POLICY: &str = "weft_policy";
    /// `() -> i64`: routing verdict word for the record in the buffer.
    pub const ROUTE: &str = "weft_route";
    /// The memory export.
    pub const MEMORY: &str = "memory";
    /// Import module name of every host function.
    pub const HOST_MODULE: &str = "weft";
    /// `(level: i32, ptr: i32, len: i32)`: log a UTF-8 message (0 error, 1 warn, 2 info, 3 debug).
    pub const LOG: &str = "log";
    /// `() -> i64`: monotonic nanoseconds.
    pub const NOW_NS: &str = "now_ns";
    /// `(ptr: i32, len: i32) -> i32`: id of the named counter (defined on first use), -1 if refused.
    pub const COUNTER: &str = "counter";
    /// `(id: i32, delta: i64)`: add to a counter.
    pub const COUNTER_ADD: &str = "counter_add";
    /// `(addr: i32) -> i64`: underlay address (as a u32) of the node leasing `addr`, -1 if none.
    pub const LEASE_OWNER: &str = "lease_owner";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_truncates_payload() {
        let mut r = Record {
            direction: direction::INGRESS,
            protocol: 6,
            tcp_flags: 0x12,
            flags: flag::ESTABLISHED,
            src: [10, 244, 1, 5],
            dst: [10, 244, 2, 7],
            src_port: 40000,
            dst_port: 443,
            packet_len: 1500,
            src_node: [198, 18, 0, 1],
            dst_node: [198, 18, 0, 2],
            src_subnet: [10, 244, 1, 0],
            dst_subnet: [10, 244, 2, 0],
            src_prefix: 24,
            dst_prefix: 24,
            local_node: [198, 18, 0, 2],
            payload_len: 3,
            payload: [0; PAYLOAD_MAX],
        };
        r.payload[..3].copy_from_slice(b"GET");
        let mut buf = [0xAAu8; RECORD_SIZE];
        r.encode(&mut buf);
        assert_eq!(Record::decode(&buf), Some(r));
        assert_eq!(buf[off::PAYLOAD + 3], 0, "bytes past the payload are zeroed");
        assert_eq!(&buf[off::SRC_PORT..off::SRC_PORT + 2], &40000u16.to_le_bytes());
    }

    #[test]
    fn records_of_another_version_are_refused() {
        let mut buf = [0u8; RECORD_SIZE];
        Record::default().encode(&mut buf);
        buf[off::VERSION] = 2;
        assert_eq!(Record::decode(&buf), None);
    }

    #[test]
    fn words_round_trip_and_unknown_scopes_are_refused() {
        let w = Word {
            action: route::VIA,
            scope: scope::ANY_SOURCE_PORT,
            cache: 30,
            addr: u32::from_be_bytes([198, 18, 0, 9]),
        };
        assert_eq!(Word::unpack(w.pack()), Some(w));
        assert_eq!(Word::unpack(0x0100).map(|w| w.scope), Some(scope::ANY_SOURCE_PORT));
        assert_eq!(Word::unpack(0x0200).map(|w| w.scope), Some(scope::ANY_SOURCE));
        for bad in [0x0300, 0x8000, 0xFF00] {
            assert_eq!(Word::unpack(bad), None, "{bad:#x}");
        }
        assert_eq!(
            Word::unpack(!0xFF00 | 0x0200),
            Some(Word {
                action: 0xFF,
                scope: scope::ANY_SOURCE,
                cache: 0xFFFF,
                addr: u32::MAX
            })
        );
    }
}
