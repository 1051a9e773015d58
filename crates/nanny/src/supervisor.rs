//! The nanny's supervisor: a pure state machine (no processes, no clock, no IO), like the
//! scheduler's core. Events in ([`Event`]: the worker exited, registered, a restart or close was
//! asked, memory went over `terminate`, time passed), commands out ([`Command`]: spawn, signal,
//! report, exit). The shell (`crate::nanny`) runs the commands and feeds back what happens.
//!
//! ```text
//!            spawn                 registered
//!  (new) ----------> Starting -----------------> Running
//!                      |  ^                         |
//!        exited        |  | backoff over            | exited (crash, signal, lost scheduler)
//!   (before it         v  |                         v
//!    registered)     Backoff <--- lived < 10 s --- (decide) --- lived >= 10 s ---> Starting
//!                      |
//!                      +-- 5 exits in a row before registering --> Closed (give up, exit 1)
//!
//!  Running/Starting --restart asked / over memory--> Stopping{then: Restart} --exited--> Starting
//!  any --close asked--> Stopping{then: Close} --exited--> Closed (exit 0)
//!  a worker that exits 0 was closed on purpose (retired, the scheduler closed it): Closed
//!  a worker that exits 75 asks to be restarted (lifetime, removed by the scheduler): Starting
//! ```
use std::time::{Duration, Instant};

/// Exit code with which a worker asks its nanny for a fresh worker (`EX_TEMPFAIL`): its
/// lifetime ended with `--lifetime-restart`, or the scheduler removed it (worker-ttl) or went
/// away.
pub const EXIT_RESTART: i32 = 75;

/// Exit code with which a worker says it cannot run and trying again will not help
/// (`EX_CONFIG`): the scheduler refused it (a name already taken, say). The nanny gives up at
/// once.
pub const EXIT_FATAL: i32 = 78;

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s} ({})", signal_name(*s)),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        7 => "SIGBUS",
        9 => "SIGKILL, e.g. the kernel's OOM killer",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// How hard to stop a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: close cleanly (its spill directory is removed).
    Term,
    /// SIGKILL.
    Kill,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Start supervising: spawn the first worker.
    Start,
    /// The worker process could not even be started (no such program, ...).
    SpawnFailed { why: String },
    /// The worker registered with the scheduler.
    Registered,
    /// The worker process ended.
    Exited { status: ExitStatus },
    /// The scheduler (`Client::restart`) or a person asked for a fresh worker.
    RestartAsked { reason: String },
    /// Stop the worker and the nanny.
    CloseAsked { reason: String },
    /// Stop the worker and the nanny, which failed (it could not reach its scheduler in time).
    GiveUp { reason: String },
    /// The worker's resident memory passed `terminate`.
    OverMemory { rss: u64, limit: u64 },
    /// Time passed (the shell calls this at [`Supervisor::next_deadline`]).
    Tick,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start a worker process.
    Spawn,
    /// Signal the worker process.
    Signal(Signal),
    /// Tell the scheduler (and the log) why the worker ended, and whether a new one follows.
    Exited { reason: String, restarting: bool },
    /// Tell the scheduler, before the worker is signalled, why it is about to end (its stream
    /// may close before the exit is seen: the reason then reaches the scheduler first).
    Dying { reason: String },
    /// The nanny is done: exit with this code, saying why.
    Exit { code: i32, message: String },
}

/// Settings (dask's, where dask has them).
#[derive(Clone, Debug)]
pub struct Policy {
    /// A worker that lived this long is restarted at once after an exit.
    pub restart_after_uptime: Duration,
    /// The first backoff after a quick exit; it doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Exits in a row before the worker registered, after which the nanny gives up.
    pub max_failed_starts: u32,
    /// How long a worker asked to close (SIGTERM) may take before SIGKILL.
    pub kill_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            restart_after_uptime: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            max_failed_starts: 5,
            kill_grace: Duration::from_secs(5),
        }
    }
}

/// What to do once the worker being stopped has exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Restart,
    Close,
    /// Close, and exit 1.
    Fail,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Idle,
    /// Spawned, not registered yet.
    Starting {
        since: Instant,
    },
    Running {
        since: Instant,
    },
    /// Signalled; waiting for it to exit. `escalate_at`: when SIGKILL follows a SIGTERM.
    Stopping {
        then: Then,
        reason: String,
        escalate_at: Option<Instant>,
        since: Instant,
    },
    /// Waiting to spawn again.
    Backoff {
        until: Instant,
    },
    Closed,
}

/// The supervisor of one worker process.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    state: State,
    /// Exits in a row before the worker registered.
    failed_starts: u32,
    /// Quick exits in a row.
    quick_exits: u32,
    /// Backoffs in a row (each doubles the next).
    backoffs: u32,
    /// Workers started so far.
    pub spawned: u64,
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Supervisor { policy, state: State::Idle, failed_starts: 0, quick_exits: 0, backoffs: 0, spawned: 0 }
    }

    /// A short name of the state, for logs and `Info`.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Idle => "idle",
            State::Starting { .. } => "starting",
            State::Running { .. } => "running",
            State::Stopping { .. } => "stopping",
            State::Backoff { .. } => "waiting to restart",
            State::Closed => "closed",
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// When the shell must call [`Event::Tick`] next, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Backoff { until } => Some(*until),
            State::Stopping { escalate_at, .. } => *escalate_at,
            _ => None,
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant, out: &mut Vec<Command>) {
        match event {
            Event::Start => {
                if self.state == State::Idle {
                    self.spawn(now, out);
                }
            }
            Event::SpawnFailed { why } => {
                if matches!(self.state, State::Starting { .. }) {
                    self.state = State::Closed;
                    out.push(Command::Exit { code: 1, message: format!("failed to start the worker process: {why}") });
                }
            }
            Event::Registered => {
                if let State::Starting { since } = self.state {
                    self.state = State::Running { since };
                    self.failed_starts = 0;
                }
            }
            Event::Exited { status } => self.exited(status, now, out),
            Event::RestartAsked { reason } => match self.state {
                State::Starting { .. } | State::Running { .. } => {
                    // Fast: a restart throws the worker's state away anyway.
                    self.stop(Then::Restart, reason, Signal::Kill, now, out);
                }
                State::Backoff { .. } => {
                    // Asked for a worker now: no more waiting.
                    self.quick_exits = 0;
                    self.backoffs = 0;
                    self.spawn(now, out);
                }
                _ => {}
            },
            Event::CloseAsked { reason } => self.close(Then::Close, reason, now, out),
            Event::GiveUp { reason } => self.close(Then::Fail, reason, now, out),
            Event::OverMemory { rss, limit } => {
                if matches!(self.state, State::Starting { .. } | State::Running { .. }) {
                    let reason = format!(
                        "over memory limit: the worker used {} MB, past the terminate threshold of its {} MB limit \
                         (distributed.worker.memory.terminate)",
                        rss / 1_000_000,
                        limit / 1_000_000
                    );
                    out.push(Command::Dying { reason: reason.clone() });
                    self.stop(Then::Restart, reason, Signal::Term, now, out);
                }
            }
            Event::Tick => match self.state {
                State::Backoff { until } if now >= until => self.spawn(now, out),
                State::Stopping { escalate_at: Some(at), .. } if now >= at => {
                    if let State::Stopping { escalate_at, .. } = &mut self.state {
                        *escalate_at = None;
                    }
                    out.push(Command::Signal(Signal::Kill));
                }
                _ => {}
            },
        }
    }

    fn close(&mut self, then: Then, reason: String, now: Instant, out: &mut Vec<Command>) {
        match self.state {
            State::Starting { .. } | State::Running { .. } => self.stop(then, reason, Signal::Term, now, out),
            State::Stopping { then: ref mut t, reason: ref mut r, .. } => {
                *t = then;
                *r = reason;
            }
            State::Idle | State::Backoff { .. } => {
                self.state = State::Closed;
                out.push(Command::Exit { code: if then == Then::Fail { 1 } else { 0 }, message: reason });
            }
            State::Closed => {}
        }
    }

    /// Waits before the next spawn: `backoff_initial` doubled for each backoff in a row, at most
    /// `backoff_max`.
    fn back_off(&mut self, now: Instant) {
        let factor = 1u32 << self.backoffs.min(16);
        self.backoffs += 1;
        let delay = (self.policy.backoff_initial * factor).min(self.policy.backoff_max);
        self.state = State::Backoff { until: now + delay };
    }

    fn spawn(&mut self, now: Instant, out: &mut Vec<Command>) {
        self.state = State::Starting { since: now };
        self.spawned += 1;
        out.push(Command::Spawn);
    }

    fn stop(&mut self, then: Then, reason: String, signal: Signal, now: Instant, out: &mut Vec<Command>) {
        let escalate_at = (signal == Signal::Term).then(|| now + self.policy.kill_grace);
        self.state = State::Stopping { then, reason, escalate_at, since: now };
        out.push(Command::Signal(signal));
    }

    fn exited(&mut self, status: ExitStatus, now: Instant, out: &mut Vec<Command>) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Stopping { then: Then::Restart, reason, .. } => {
                out.push(Command::Exited { reason, restarting: true });
                self.quick_exits = 0;
                self.backoffs = 0;
                self.spawn(now, out);
            }
            State::Stopping { then, reason, .. } => {
                out.push(Command::Exited { reason: format!("closed: {reason}"), restarting: false });
                self.state = State::Closed;
                out.push(Command::Exit { code: if then == Then::Fail { 1 } else { 0 }, message: reason });
            }
            State::Starting { since } => self.unexpected_exit(status, since, false, now, out),
            State::Running { since } => self.unexpected_exit(status, since, true, now, out),
            other => self.state = other, // nothing of ours was running
        }
    }

    /// The worker exited on its own, or was killed from outside (a signal, the kernel's OOM
    /// killer).
    fn unexpected_exit(
        &mut self,
        status: ExitStatus,
        since: Instant,
        registered: bool,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        match status {
            ExitStatus::Code(0) => {
                // Closed on purpose: retired, or its scheduler closed it.
                out.push(Command::Exited { reason: "the worker closed (exit code 0)".into(), restarting: false });
                self.state = State::Closed;
                out.push(Command::Exit { code: 0, message: "the worker closed; nothing left to supervise".into() });
                return;
            }
            ExitStatus::Code(EXIT_FATAL) => {
                let reason = "the worker cannot run (exit code 78): its log above says why".to_string();
                out.push(Command::Exited { reason: reason.clone(), restarting: false });
                self.state = State::Closed;
                out.push(Command::Exit { code: 1, message: format!("{reason}; not starting it again") });
                return;
            }
            ExitStatus::Code(EXIT_RESTART) if registered => {
                out.push(Command::Exited { reason: "the worker asked for a fresh worker".into(), restarting: true });
                self.quick_exits = 0;
                self.backoffs = 0;
                self.spawn(now, out);
                return;
            }
            ExitStatus::Code(EXIT_RESTART) => {
                // Before it registered (its scheduler turned it away, say): a fresh one, after
                // the backoff of quick exits, so this cannot spin; not a failed start.
                out.push(Command::Exited {
                    reason: "the worker lost its scheduler before it registered".into(),
                    restarting: true,
                });
                self.back_off(now);
                return;
            }
            _ => {}
        }
        let reason = format!("the worker process ended with {status}");
        if !registered {
            self.failed_starts += 1;
            if self.failed_starts >= self.policy.max_failed_starts {
                out.push(Command::Exited { reason: reason.clone(), restarting: false });
                self.state = State::Closed;
                out.push(Command::Exit {
                    code: 1,
                    message: format!(
                        "the worker exited {} times in a row before it registered with the scheduler (last: {reason}); \
                         giving up: its log above says why (bad flags, an unreachable scheduler with --death-timeout, \
                         a name already taken)",
                        self.failed_starts
                    ),
                });
                return;
            }
        }
        out.push(Command::Exited { reason, restarting: true });
        if now.saturating_duration_since(since) >= self.policy.restart_after_uptime {
            self.quick_exits = 0;
            self.backoffs = 0;
            self.spawn(now, out);
        } else if self.quick_exits == 0 && registered {
            // One quick death of a worker that had started fine (a kill, an OOM) is not a crash
            // loop: a fresh worker at once. The next quick exit in a row waits.
            self.quick_exits = 1;
            self.spawn(now, out);
        } else {
            // Quick exits in a row wait longer and longer: 1 s, 2 s, ... 30 s. No restart storm.
            self.quick_exits += 1;
            self.back_off(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut Supervisor, e: Event, now: Instant) -> Vec<Command> {
        let mut out = Vec::new();
        s.handle(e, now, &mut out);
        out
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    #[test]
    fn a_worker_that_lived_long_is_restarted_at_once_a_quick_one_after_a_growing_backoff() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        assert_eq!(run(&mut s, Event::Start, t0), vec![Command::Spawn]);
        run(&mut s, Event::Registered, secs(t0, 0.1));
        // Killed after 20 s: at once.
        let out = run(&mut s, Event::Exited { status: ExitStatus::Signal(9) }, secs(t0, 20.0));
        assert!(matches!(&out[0], Command::Exited { reason, restarting: true } if reason.contains("signal 9")));
        assert_eq!(out[1], Command::Spawn);
        run(&mut s, Event::Registered, secs(t0, 20.1));
        // Killed after 1 s: at once the first time (it had started fine), then 1 s of backoff,
        // 2 s, 4 s for each quick death in a row.
        let out = run(&mut s, Event::Exited { status: ExitStatus::Signal(9) }, secs(t0, 21.0));
        assert_eq!(out.last(), Some(&Command::Spawn), "{out:?}");
        run(&mut s, Event::Registered, secs(t0, 21.1));
        let mut now = 22.0;
        for wait in [1.0, 2.0, 4.0] {
            let out = run(&mut s, Event::Exited { status: ExitStatus::Signal(9) }, secs(t0, now));
            assert!(!out.contains(&Command::Spawn), "{out:?}");
            assert_eq!(s.next_deadline(), Some(secs(t0, now + wait)));
            assert!(run(&mut s, Event::Tick, secs(t0, now + wait - 0.01)).is_empty());
            assert_eq!(run(&mut s, Event::Tick, secs(t0, now + wait)), vec![Command::Spawn]);
            run(&mut s, Event::Registered, secs(t0, now + wait + 0.1));
            now += wait + 1.0;
        }
        // Registered workers that die quickly never make it give up.
        assert!(!s.is_closed());
    }

    #[test]
    fn exits_before_registering_wait_one_second_doubling() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        let mut now = 0.0;
        for wait in [1.0, 2.0, 4.0, 8.0] {
            run(&mut s, Event::Exited { status: ExitStatus::Code(1) }, secs(t0, now));
            assert_eq!(s.next_deadline(), Some(secs(t0, now + wait)));
            now += wait;
            assert_eq!(run(&mut s, Event::Tick, secs(t0, now)), vec![Command::Spawn]);
        }
    }

    #[test]
    fn five_exits_in_a_row_before_registering_give_up_with_the_reason() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        let mut now = 0.0;
        for i in 1..=5 {
            let out = run(&mut s, Event::Exited { status: ExitStatus::Code(2) }, secs(t0, now));
            if i < 5 {
                assert!(!s.is_closed());
                now += 60.0;
                assert_eq!(run(&mut s, Event::Tick, secs(t0, now)), vec![Command::Spawn]);
            } else {
                let Some(Command::Exit { code: 1, message }) = out.last() else { panic!("{out:?}") };
                assert!(message.contains("5 times in a row") && message.contains("exit code 2"), "{message}");
                assert!(s.is_closed());
            }
        }
        // A registration in between resets the count.
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        for _ in 0..4 {
            run(&mut s, Event::Exited { status: ExitStatus::Code(1) }, t0);
            run(&mut s, Event::RestartAsked { reason: "now".into() }, t0);
        }
        run(&mut s, Event::Registered, t0);
        run(&mut s, Event::Exited { status: ExitStatus::Code(1) }, t0);
        assert!(!s.is_closed());
    }

    #[test]
    fn restart_close_and_memory_kills_say_why() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        run(&mut s, Event::Registered, t0);
        // Restart: killed at once, a new one at once, with the reason asked.
        let out = run(&mut s, Event::RestartAsked { reason: "Client.restart".into() }, t0);
        assert_eq!(out, vec![Command::Signal(Signal::Kill)]);
        let out = run(&mut s, Event::Exited { status: ExitStatus::Signal(9) }, secs(t0, 0.01));
        assert_eq!(out, vec![Command::Exited { reason: "Client.restart".into(), restarting: true }, Command::Spawn]);
        run(&mut s, Event::Registered, t0);
        // Over memory: SIGTERM, then SIGKILL after the grace, then a fresh worker.
        let out = run(&mut s, Event::OverMemory { rss: 960_000_000, limit: 1_000_000_000 }, secs(t0, 1.0));
        assert!(matches!(&out[0], Command::Dying { reason } if reason.contains("over memory limit")), "{out:?}");
        assert_eq!(out[1], Command::Signal(Signal::Term));
        assert_eq!(run(&mut s, Event::Tick, secs(t0, 6.0)), vec![Command::Signal(Signal::Kill)]);
        let out = run(&mut s, Event::Exited { status: ExitStatus::Signal(9) }, secs(t0, 6.1));
        assert!(
            matches!(&out[0], Command::Exited { reason, restarting: true } if reason.contains("over memory limit"))
        );
        assert_eq!(out[1], Command::Spawn);
        // Close: SIGTERM, then the nanny exits 0.
        run(&mut s, Event::Registered, t0);
        assert_eq!(
            run(&mut s, Event::CloseAsked { reason: "SIGTERM".into() }, t0),
            vec![Command::Signal(Signal::Term)]
        );
        let out = run(&mut s, Event::Exited { status: ExitStatus::Code(0) }, t0);
        assert_eq!(out.last(), Some(&Command::Exit { code: 0, message: "SIGTERM".into() }));
        assert!(s.is_closed());
    }

    #[test]
    fn a_worker_that_exits_0_closes_the_nanny_and_75_asks_for_a_fresh_one() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        run(&mut s, Event::Registered, t0);
        let out = run(&mut s, Event::Exited { status: ExitStatus::Code(EXIT_RESTART) }, t0);
        assert_eq!(out.last(), Some(&Command::Spawn), "at once, whatever its age");
        run(&mut s, Event::Registered, t0);
        let out = run(&mut s, Event::Exited { status: ExitStatus::Code(0) }, t0);
        assert!(matches!(out.last(), Some(Command::Exit { code: 0, .. })), "{out:?}");
        assert!(s.is_closed());
    }

    #[test]
    fn spawn_failures_give_up_and_give_up_and_close_end_a_backoff() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        let out = run(&mut s, Event::SpawnFailed { why: "no such program".into() }, t0);
        assert!(matches!(&out[..], [Command::Exit { code: 1, message }] if message.contains("no such program")));
        // Close during a backoff: the nanny exits 0 at once; GiveUp exits 1.
        for (event, code) in
            [(Event::CloseAsked { reason: "bye".into() }, 0), (Event::GiveUp { reason: "no scheduler".into() }, 1)]
        {
            let mut s = Supervisor::new(Policy::default());
            run(&mut s, Event::Start, t0);
            run(&mut s, Event::Exited { status: ExitStatus::Code(1) }, t0);
            assert!(s.next_deadline().is_some(), "in backoff");
            let out = run(&mut s, event, t0);
            assert!(matches!(out.last(), Some(Command::Exit { code: c, .. }) if *c == code), "{out:?}");
            assert!(s.is_closed());
            assert!(run(&mut s, Event::Tick, secs(t0, 100.0)).is_empty(), "nothing after closing");
        }
    }

    #[test]
    fn exit_75_before_registering_backs_off_and_is_not_a_failed_start() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy::default());
        run(&mut s, Event::Start, t0);
        let mut now = 0.0;
        for wait in [1.0, 2.0, 4.0, 8.0, 16.0, 30.0] {
            run(&mut s, Event::Exited { status: ExitStatus::Code(EXIT_RESTART) }, secs(t0, now));
            assert_eq!(s.next_deadline(), Some(secs(t0, now + wait)), "no spin");
            now += wait;
            assert_eq!(run(&mut s, Event::Tick, secs(t0, now)), vec![Command::Spawn]);
        }
        assert!(!s.is_closed(), "never given up: the scheduler may come back");
    }
}
