//! Verdicts a module returns, and how long the host may keep them.

use core::net::Ipv4Addr;

use crate::abi::{self, Word, CACHE_FLOW, CACHE_NONE};

/// A policy verdict: allow, drop or allow-and-log, with a cache lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    action: u8,
    scope: u8,
    cache: u16,
}

impl Decision {
    /// Let the flow through (cached for the flow's life).
    pub const fn allow() -> Self {
        Decision {
            action: abi::action::ALLOW,
            scope: abi::scope::FLOW,
            cache: CACHE_FLOW,
        }
    }

    /// Drop the flow (cached for the flow's life).
    pub const fn drop() -> Self {
        Decision {
            action: abi::action::DROP,
            scope: abi::scope::FLOW,
            cache: CACHE_FLOW,
        }
    }

    /// Let the flow through and have the host log it.
    pub const fn allow_and_log() -> Self {
        Decision {
            action: abi::action::ALLOW_LOG,
            scope: abi::scope::FLOW,
            cache: CACHE_FLOW,
        }
    }

    /// Ask again for the next packet of this flow.
    pub const fn no_cache(mut self) -> Self {
        self.cache = CACHE_NONE;
        self
    }

    /// Keep the verdict for `secs` seconds (at least 1, at most about 18 hours).
    pub const fn cache_secs(mut self, secs: u16) -> Self {
        self.cache = if secs == 0 {
            1
        } else if secs == CACHE_FLOW {
            CACHE_FLOW - 1
        } else {
            secs
        };
        self
    }

    /// The same verdict for every flow of this service from this source, whatever its source
    /// port: the module promises its answer does not depend on the source port. TCP and UDP
    /// flows only (the host keeps other protocols' verdicts per flow), and never a logged flow.
    pub const fn for_any_source_port(mut self) -> Self {
        self.scope = abi::scope::ANY_SOURCE_PORT;
        self
    }

    /// The same verdict for every flow of this service (direction, protocol, destination
    /// address and port) from any source: the module promises its answer depends on nothing
    /// of the source (address, port, node, subnet).
    pub const fn for_any_source(mut self) -> Self {
        self.scope = abi::scope::ANY_SOURCE;
        self
    }

    /// The scope byte ([`abi::scope`]).
    pub const fn scope(self) -> u8 {
        self.scope
    }

    /// True when the flow may pass.
    pub const fn allows(self) -> bool {
        self.action != abi::action::DROP
    }

    /// The action byte.
    pub const fn action(self) -> u8 {
        self.action
    }

    /// The cache field.
    pub const fn cache(self) -> u16 {
        self.cache
    }

    /// The verdict word returned to the host.
    pub const fn word(self) -> i64 {
        Word {
            action: self.action,
            scope: self.scope,
            cache: self.cache,
            addr: 0,
        }
        .pack()
    }
}

/// A routing verdict: deliver to the destination's owner, or through another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    via: Option<Ipv4Addr>,
    cache: u16,
}

impl Route {
    /// Deliver to the node leasing the destination (cached for the flow's life).
    pub const fn owner() -> Self {
        Route {
            via: None,
            cache: CACHE_FLOW,
        }
    }

    /// Send through the node with this underlay address (cached for the flow's life).
    pub const fn via(node: Ipv4Addr) -> Self {
        Route {
            via: Some(node),
            cache: CACHE_FLOW,
        }
    }

    /// Ask again for the next packet of this flow.
    pub const fn no_cache(mut self) -> Self {
        self.cache = CACHE_NONE;
        self
    }

    /// The node the flow goes through, if not the owner.
    pub const fn through(self) -> Option<Ipv4Addr> {
        self.via
    }

    /// The verdict word returned to the host.
    pub fn word(self) -> i64 {
        match self.via {
            None => Word {
                action: abi::route::OWNER,
                scope: abi::scope::FLOW,
                cache: self.cache,
                addr: 0,
            },
            Some(a) => Word {
                action: abi::route::VIA,
                scope: abi::scope::FLOW,
                cache: self.cache,
                addr: u32::from(a),
            },
        }
        .pack()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_widened_decision_keeps_its_action_and_lifetime() {
        let d = Decision::drop().cache_secs(30).for_any_source();
        let w = Word::unpack(d.word()).unwrap();
        assert_eq!(
            (w.action, w.scope, w.cache),
            (abi::action::DROP, abi::scope::ANY_SOURCE, 30)
        );
        let w = Word::unpack(Decision::allow().for_any_source_port().word()).unwrap();
        assert_eq!(
            (w.action, w.scope, w.cache),
            (abi::action::ALLOW, abi::scope::ANY_SOURCE_PORT, CACHE_FLOW)
        );
        assert_eq!(Decision::allow().scope(), abi::scope::FLOW, "one flow unless asked");
        assert_eq!(Word::unpack(Route::owner().word()).unwrap().scope, abi::scope::FLOW);
    }
}
