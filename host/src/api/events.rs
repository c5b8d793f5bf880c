//! `/events`: a Server-Sent Events stream for the dashboard. Lease changes arrive as they are
//! watched, module-chain changes within a second, and the data path counters every second, each
//! stream sent only the peers whose counters moved since its previous `stats` event.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast;

use super::cluster::stats_event;
use super::views::LeaseView;
use super::ApiState;

/// What the agent publishes to event streams.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ApiEvent {
    /// A lease appeared or changed.
    LeaseUpserted {
        /// The lease.
        lease: LeaseView,
    },
    /// A lease went away.
    LeaseRemoved {
        /// Its subnet.
        subnet: String,
    },
    /// The whole table was re-read (the first listing, a re-listing): read it again.
    Resync {
        /// Leases in the table now.
        leases: usize,
    },
}

/// Tells event streams what `u` changed: each lease of a delta, or one `resync` for a snapshot
/// (5,000 lease events would say less and cost more).
pub fn publish(events: &broadcast::Sender<ApiEvent>, u: &crate::lease::table::TableUpdate) {
    use crate::lease::table::Changes;
    // Nobody listening is fine: the send only fails when no stream is open.
    match &u.changes {
        Changes::Snapshot => {
            let _ = events.send(ApiEvent::Resync { leases: u.table.len() });
        }
        Changes::Delta(d) => {
            for c in d {
                let _ = events.send(match c.after() {
                    Some(l) => ApiEvent::LeaseUpserted {
                        lease: LeaseView::of(l, l.subnet == u.own),
                    },
                    None => ApiEvent::LeaseRemoved {
                        subnet: c.subnet().to_string(),
                    },
                });
            }
        }
    }
}

fn sse(kind: &str, body: &impl Serialize) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(body).unwrap_or_else(|_| "null".into()))
}

/// The event stream.
#[utoipa::path(get, path = "/events", tag = "cluster",
    responses((status = 200, content_type = "text/event-stream",
        description = "events `lease` (lease_upserted / lease_removed), `modules` (chain generation), `stats` (every second: the counters of /stats with `route_count` for `routes`, and in `peers` only the peers whose counters moved since the stream's previous `stats` event; all of them in its first, which says `all_peers`)")))]
pub async fn events(State(s): State<Arc<ApiState>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct St {
        s: Arc<ApiState>,
        rx: broadcast::Receiver<ApiEvent>,
        tick: tokio::time::Interval,
        generation: u64,
        first: bool,
        /// What the stream's last `stats` event said of each peer (empty before the first).
        sent: std::collections::HashMap<String, [u64; 4]>,
        /// Whether the stream has had its first `stats` event, the one with every peer.
        stats_sent: bool,
    }
    let rx = s.events.subscribe();
    let st = St {
        s,
        rx,
        tick: tokio::time::interval(Duration::from_millis(1000)),
        generation: 0,
        first: true,
        sent: std::collections::HashMap::new(),
        stats_sent: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.first {
            st.first = false;
            st.generation = st.s.agent.modules.chain().generation;
            return Some((Ok(sse("hello", &serde_json::json!({"generation": st.generation}))), st));
        }
        let event = tokio::select! {
            ev = st.rx.recv() => match ev {
                Ok(ev @ ApiEvent::Resync { .. }) => sse("resync", &ev),
                Ok(ev) => sse("lease", &ev),
                // A slow reader lost events: tell it to re-read everything.
                Err(broadcast::error::RecvError::Lagged(n)) => sse("resync", &serde_json::json!({"lost": n})),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = st.tick.tick() => {
                let g = st.s.agent.modules.chain().generation;
                if g != st.generation {
                    st.generation = g;
                    sse("modules", &serde_json::json!({"generation": g}))
                } else {
                    let all = !std::mem::replace(&mut st.stats_sent, true);
                    sse("stats", &stats_event(&st.s, all, &mut st.sent))
                }
            }
        };
        Some((Ok(event), st))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
