//! The process clock: time since the process first asked, from one base that the verdict
//! caches, the quarantine, the epoch ticker and the forwarding threads' sleep marks all share,
//! so their readings compare.

use std::sync::OnceLock;
use std::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since the base.
#[inline]
pub fn ms() -> u64 {
    base().elapsed().as_millis() as u64
}

/// Microseconds since the base.
#[inline]
pub fn us() -> u64 {
    base().elapsed().as_micros() as u64
}

/// Microseconds since the base at `t`, for a caller that already read the clock.
#[inline]
pub fn us_at(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_micros() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_units_count_from_the_same_base() {
        let (u0, m0) = (super::us(), super::ms());
        std::thread::sleep(std::time::Duration::from_millis(3));
        let (m1, u1) = (super::ms(), super::us());
        assert!(u0 / 1000 <= m0 && m0 <= m1 && m1 <= u1 / 1000, "{u0} {m0} {m1} {u1}");
        assert!(u1 - u0 >= 3_000, "slept 3 ms: {}", u1 - u0);
    }
}
