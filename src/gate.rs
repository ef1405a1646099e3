//! Who may start a handshake with the server: the number of connections is capped, each
//! address may have only a few handshakes in flight, and an address that keeps failing to
//! authenticate is shut out for a while. Held by the accept loop; no I/O here.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed handshakes an address may have within `WINDOW`...
pub const MAX_FAILURES: u32 = 10;
/// ...this window...
pub const WINDOW: Duration = Duration::from_secs(60);
/// ...before it is refused for this long.
pub const BLOCK: Duration = Duration::from_secs(60);
/// Handshakes one address may have in flight at once.
pub const PENDING_PER_ADDR: usize = 8;
/// Addresses with failures remembered at most; beyond it the oldest records are dropped
/// (memory stays bounded whatever the number of sources).
const MAX_TRACKED: usize = 10_000;

/// Why a connection was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` are open.
    Full(usize),
    /// This address already has `PENDING_PER_ADDR` handshakes in flight.
    Busy(IpAddr),
    /// This address failed too often; refused until then.
    Blocked(IpAddr, Duration),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Full(max) => write!(
                f,
                "{max} connections are open (--max-connections); refusing more"
            ),
            Refusal::Busy(ip) => write!(
                f,
                "{ip} already has {PENDING_PER_ADDR} handshakes in flight; refusing more"
            ),
            Refusal::Blocked(ip, left) => write!(
                f,
                "{ip} failed to authenticate {MAX_FAILURES} times within {} s; refused for another {} s",
                WINDOW.as_secs(),
                left.as_secs().max(1)
            ),
        }
    }
}

#[derive(Debug)]
struct Failures {
    count: u32,
    /// Start of the current window.
    since: Instant,
    blocked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    pending: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, Failures>,
    /// When a refusal was last logged (refusals come in floods; the log should not).
    logged: Option<Instant>,
}

/// The server's admission policy.
#[derive(Debug)]
pub struct Gate {
    max_connections: usize,
    state: Mutex<State>,
}

impl Gate {
    /// A gate admitting at most `max_connections` at once.
    pub fn new(max_connections: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max_connections,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, or says why not. The ticket keeps its place until
    /// dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let mut s = self.lock();
        if let Some(f) = s.failures.get(&ip) {
            if let Some(until) = f.blocked_until.filter(|u| *u > now) {
                return Err(Refusal::Blocked(ip, until - now));
            }
        }
        if s.open >= self.max_connections {
            return Err(Refusal::Full(self.max_connections));
        }
        let pending = s.pending.entry(ip).or_insert(0);
        if *pending >= PENDING_PER_ADDR {
            return Err(Refusal::Busy(ip));
        }
        *pending += 1;
        s.open += 1;
        Ok(Ticket {
            gate: self.clone(),
            ip,
            pending: true,
        })
    }

    /// True if a refusal should be logged now: at most one line every 10 s.
    pub fn should_log(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let due = s
            .logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10));
        if due {
            s.logged = Some(now);
        }
        due
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().open
    }
}

/// One admitted connection's place.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    ip: IpAddr,
    /// Still in its handshake.
    pending: bool,
}

impl Ticket {
    fn end_pending(&mut self, s: &mut State) {
        if std::mem::take(&mut self.pending) {
            if let Some(n) = s.pending.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    s.pending.remove(&self.ip);
                }
            }
        }
    }

    /// The handshake succeeded. The address's failures are not forgiven: an honest client
    /// behind the same NAT must not reset a guesser's count.
    pub fn authenticated(&mut self) {
        let gate = self.gate.clone();
        let mut s = gate.lock();
        self.end_pending(&mut s);
    }

    /// The handshake failed. Returns how long the address is now refused, if this failure
    /// was the one too many.
    pub fn failed(&mut self, now: Instant) -> Option<Duration> {
        let gate = self.gate.clone();
        let mut s = gate.lock();
        self.end_pending(&mut s);
        if s.failures.len() >= MAX_TRACKED && !s.failures.contains_key(&self.ip) {
            s.failures
                .retain(|_, f| f.blocked_until.is_some_and(|u| u > now));
            if s.failures.len() >= MAX_TRACKED {
                s.failures.clear();
            }
        }
        let f = s.failures.entry(self.ip).or_insert(Failures {
            count: 0,
            since: now,
            blocked_until: None,
        });
        if now.duration_since(f.since) > WINDOW {
            *f = Failures {
                count: 0,
                since: now,
                blocked_until: None,
            };
        }
        f.count += 1;
        if f.count >= MAX_FAILURES && f.blocked_until.is_none_or(|u| u <= now) {
            f.blocked_until = Some(now + BLOCK);
            f.count = 0;
            f.since = now;
            return Some(BLOCK);
        }
        None
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let gate = self.gate.clone();
        let mut s = gate.lock();
        self.end_pending(&mut s);
        s.open -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn caps_open_connections_and_frees_places_on_drop() {
        let gate = Gate::new(2);
        let now = Instant::now();
        let a = gate.admit(ip(1), now).unwrap();
        let _b = gate.admit(ip(2), now).unwrap();
        assert_eq!(gate.admit(ip(3), now).unwrap_err(), Refusal::Full(2));
        drop(a);
        assert_eq!(gate.open(), 1);
        assert!(gate.admit(ip(3), now).is_ok());
    }

    #[test]
    fn limits_handshakes_in_flight_per_address() {
        let gate = Gate::new(100);
        let now = Instant::now();
        let mut tickets: Vec<Ticket> = (0..PENDING_PER_ADDR)
            .map(|_| gate.admit(ip(1), now).unwrap())
            .collect();
        assert_eq!(gate.admit(ip(1), now).unwrap_err(), Refusal::Busy(ip(1)));
        assert!(
            gate.admit(ip(2), now).is_ok(),
            "other addresses are not affected"
        );
        tickets[0].authenticated();
        assert!(
            gate.admit(ip(1), now).is_ok(),
            "an authenticated one frees its slot"
        );
    }

    #[test]
    fn repeated_failures_block_an_address_for_a_while() {
        let gate = Gate::new(100);
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES {
            let blocked = gate.admit(ip(1), t0).unwrap().failed(t0);
            assert_eq!(blocked.is_some(), i + 1 == MAX_FAILURES, "failure {i}");
        }
        match gate.admit(ip(1), t0 + Duration::from_secs(1)) {
            Err(Refusal::Blocked(_, left)) => assert_eq!(left, BLOCK - Duration::from_secs(1)),
            other => panic!("not blocked: {other:?}"),
        }
        let text = gate.admit(ip(1), t0).unwrap_err().to_string();
        assert!(text.contains("failed to authenticate"), "{text}");
        assert!(
            gate.admit(ip(2), t0).is_ok(),
            "other addresses are not affected"
        );
        assert!(gate.admit(ip(1), t0 + BLOCK).is_ok(), "the block ends");
    }

    #[test]
    fn failures_spread_out_do_not_block() {
        let gate = Gate::new(100);
        let t0 = Instant::now();
        for i in 0..3 * MAX_FAILURES {
            let t = t0 + WINDOW / (MAX_FAILURES - 2) * i;
            assert_eq!(gate.admit(ip(1), t).unwrap().failed(t), None, "failure {i}");
        }
    }
}
