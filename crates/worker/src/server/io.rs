//! The worker loop's IO beside its state machine: binding its port, reaching the scheduler,
//! fetching values from peers, spilling to disk.
use super::*;

/// Binds `host:port`, or the first free port of `port..=port_to`.
pub(super) async fn bind_in_range(
    host: &str,
    port: u16,
    port_to: Option<u16>,
) -> Result<(TcpListener, String), WorkerError> {
    let last = port_to.unwrap_or(port).max(port);
    let mut error = None;
    for p in port..=last {
        let bind = format!("{host}:{p}");
        match TcpListener::bind(&bind).await {
            Ok(l) => return Ok((l, bind)),
            Err(e) => error = Some((bind, e)),
        }
    }
    let (bind, source) = error.expect("the range has a port");
    let addr = if last > port { format!("{host}:{port}-{last} (no port of the range is free)") } else { bind };
    Err(WorkerError::Bind { addr, source })
}

pub(super) async fn connect_scheduler(config: &WorkerConfig) -> Result<Channel, WorkerError> {
    let started = Instant::now();
    let endpoint = dask_protocol::serve::endpoint(&config.scheduler, Duration::from_secs(5)).map_err(|e| {
        WorkerError::SchedulerUnreachable {
            addr: config.scheduler.to_string(),
            waited: Duration::ZERO,
            why: e.to_string(),
        }
    })?;
    let mut delay = Duration::from_millis(50);
    loop {
        match dask_protocol::serve::connect(&endpoint, &config.scheduler, config.security.as_ref()).await {
            Ok(ch) => return Ok(ch),
            // Missing or refused credentials do not come right with time.
            Err(e) if e.is_fatal() => {
                return Err(WorkerError::SchedulerUnreachable {
                    addr: config.scheduler.to_string(),
                    waited: started.elapsed(),
                    why: e.to_string(),
                });
            }
            Err(e) => {
                let waited = started.elapsed();
                if config.death_timeout.is_some_and(|t| waited >= t) {
                    return Err(WorkerError::SchedulerUnreachable {
                        addr: config.scheduler.to_string(),
                        waited,
                        why: error_chain(&e),
                    });
                }
                tracing::warn!(scheduler = %config.scheduler, error = %error_chain(&e), "scheduler not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Spills least recently used values until this process's memory is below `until` (dask's
/// `_spill`): one value at a time, measuring again after each, and giving freed memory back to
/// the system when spilling alone did not bring the figure down.
pub(super) fn spill_until(store: &Store, until: u64) {
    let mut sampler = ProcessMemory::this_process();
    let Some(mut rss) = sampler.sample() else { return };
    let need = rss.saturating_sub(until);
    let mut spilled = 0;
    while rss > until {
        match store.spill_one() {
            Ok(Some(n)) => spilled += n,
            Ok(None) => {
                tracing::warn!(
                    "unmanaged memory use is high: process memory {} MB is over the spill target {} MB and \
                     nothing is left to spill (a task holds much memory, or the allocator keeps freed memory)",
                    rss / 1_000_000,
                    until / 1_000_000
                );
                break;
            }
            Err(e) => {
                tracing::warn!("{e}; values stay in memory");
                break;
            }
        }
        rss = sampler.sample().unwrap_or(0);
        if spilled > need && rss > until {
            dask_protocol::sys::release_free_memory();
            rss = sampler.sample().unwrap_or(0);
        }
    }
}

pub(super) async fn fetch(
    from: Arc<str>,
    keys: Vec<Key>,
    peers: Arc<data::DataPool>,
    store: Arc<Store>,
    events: mpsc::UnboundedSender<Event>,
) {
    let start_s = dask_protocol::sys::epoch_secs();
    let result = peers.get_data(&from, keys.iter().map(|k| k.to_string()).collect()).await;
    let stop_s = dask_protocol::sys::epoch_secs();
    let (mut got, mut missing) = (Vec::new(), Vec::new());
    match result {
        Ok(values) => {
            // One entry per key asked, in order (`get_data`).
            for (key, (_, v)) in keys.into_iter().zip(values) {
                match v {
                    Some(v) => {
                        let n = v.data.len() as u64;
                        put_value(&store, key.clone(), v);
                        got.push((key, n));
                    }
                    None => missing.push(key),
                }
            }
        }
        Err(e) => {
            tracing::warn!(peer = %from, error = %e, "fetching dependencies failed");
            peers.forget(&from);
            missing = keys;
        }
    }
    let _ = events.send(Event::FetchDone { from, got, missing, span: (start_s, stop_s) });
}
