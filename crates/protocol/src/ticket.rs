//! Put tickets: a worker takes a put only for a key the scheduler announced to it.
//!
//! The scheduler draws a secret when it starts and gives it to each worker with its
//! registration (on the control stream, which TLS protects where it is on). A client that
//! scatters asks the scheduler for a ticket per key and worker (`ScatterTickets`): an
//! HMAC-SHA256 of the key, the worker's address and an expiry time. The worker checks each put's
//! tickets before reading a byte of its values. So a stranger who reaches a worker's data port
//! cannot put anything, and a client cannot put a key on a worker other than the one it was
//! announced for. Tickets are good for [`TICKET_TTL`] (hosts' clocks may differ by less).
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a ticket is good for, from when the scheduler gave it.
pub const TICKET_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// The scheduler's secret.
pub type Secret = [u8; 32];

/// A new secret from the operating system's random source.
pub fn new_secret() -> Secret {
    let mut s = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut s) {
        // Without one, no put could ever be checked: better to stop than to run open.
        panic!("no random source to make the scheduler's put secret: {e}");
    }
    s
}

fn mac(secret: &Secret, key: &str, worker: &str, expires_s: u64) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(&(key.len() as u64).to_le_bytes());
    m.update(key.as_bytes());
    m.update(&(worker.len() as u64).to_le_bytes());
    m.update(worker.as_bytes());
    m.update(&expires_s.to_le_bytes());
    m
}

/// The ticket to put `key` on `worker` until `expires_s` (seconds since the Unix epoch).
pub fn ticket(secret: &Secret, key: &str, worker: &str, expires_s: u64) -> Vec<u8> {
    mac(secret, key, worker, expires_s).finalize().into_bytes().to_vec()
}

/// Whether `ticket` lets `key` be put on `worker` now (`now_s`: seconds since the epoch).
pub fn check(secret: &Secret, key: &str, worker: &str, expires_s: u64, ticket: &[u8], now_s: u64) -> bool {
    now_s <= expires_s && mac(secret, key, worker, expires_s).verify_slice(ticket).is_ok()
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_good_for_its_key_worker_and_time_only() {
        let s = new_secret();
        let t = ticket(&s, "x", "tcp://a:1", 100);
        assert!(check(&s, "x", "tcp://a:1", 100, &t, 99));
        assert!(check(&s, "x", "tcp://a:1", 100, &t, 100));
        assert!(!check(&s, "x", "tcp://a:1", 100, &t, 101), "expired");
        assert!(!check(&s, "y", "tcp://a:1", 100, &t, 99), "another key");
        assert!(!check(&s, "x", "tcp://b:1", 100, &t, 99), "another worker");
        assert!(!check(&s, "x", "tcp://a:1", 200, &t, 99), "another expiry");
        assert!(!check(&new_secret(), "x", "tcp://a:1", 100, &t, 99), "another scheduler");
        assert!(!check(&s, "x", "tcp://a:1", 100, b"", 99), "no ticket");
        // Fields are length-prefixed: moving bytes between key and worker changes the ticket.
        assert_ne!(ticket(&s, "ab", "c", 1), ticket(&s, "a", "bc", 1));
    }
}
