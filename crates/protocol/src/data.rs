//! Moving values between processes: data connections on a worker's port.
//!
//! A data connection starts with [`MAGIC`] and then carries requests one at a time: a
//! length-prefixed [`pb::DataMessage`] header, followed by the values' bytes, raw. The bytes
//! of a value go from its `Bytes` to the socket, and from the socket into the one buffer that
//! becomes the received `Bytes`: the kernel's copies are the only ones. (Over gRPC, tonic
//! copies each message into its encode buffer and again out of its decode buffer, and a value
//! spanning many messages had to be reassembled: 3 copies more of every byte.)
//!
//! A value of [`SMALL`] bytes or more is read into a buffer of its own size; smaller ones are
//! read together into a scratch buffer and copied out, each into its own allocation, so that
//! keeping one small value never keeps its neighbours' memory alive.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::{Security, Stream};

use crate::codec::{Value, codec_name};
use crate::pb::{self, data_message::Kind};

/// The first bytes of a data connection. (HTTP/2 connections start with `PRI * HTTP/2.0`.)
pub const MAGIC: &[u8; 8] = b"DASKDATA";
/// A header longer than this is refused as malformed.
pub const MAX_HEADER: usize = crate::MAX_MESSAGE;
/// A peer that sends nothing for this long in the middle of a message is given up on.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long connecting to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Values smaller than this are read in batches and copied out.
pub const SMALL: usize = 64 * 1024;
/// Size of one read (and one write) of a batch of small values.
const BATCH: usize = 1 << 20;
/// Large values are written in pieces of this size, each under the [`IDLE`] limit.
const WRITE_PIECE: usize = 4 << 20;
/// The most one read asks of the socket. A read of many megabytes keeps the receive window from
/// reopening until it returns, and the sender stalls meanwhile: reads of 128 KiB move a 1 GB
/// value over loopback about a quarter faster than reads of all of it (docs/benchmarks.md).
pub const READ_PIECE: usize = 128 << 10;
/// Idle connections kept per peer.
const POOL_PER_PEER: usize = 4;

/// A value received, or `None` when the peer does not hold the key.
pub type Received = (String, Option<Value>);

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no data came from the peer for {0:?}; it is hung or unreachable")]
    Timeout(Duration),
    #[error("malformed data message: {0}")]
    Protocol(String),
    #[error("the peer refused the request: {0}")]
    Remote(String),
    #[error("value {key:?} of {len} bytes does not fit in memory here")]
    TooBig { key: String, len: u64 },
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error("bad peer address: {0}")]
    Address(String),
}

// ------------------------------------------------------------------ framing

async fn idle<T>(
    f: impl std::future::Future<Output = std::io::Result<T>>,
    limit: Option<Duration>,
) -> Result<T, DataError> {
    match limit {
        None => Ok(f.await?),
        Some(d) => tokio::time::timeout(d, f).await.map_err(|_| DataError::Timeout(d))?.map_err(DataError::Io),
    }
}

/// Reads into `buf` until it holds `n` bytes, straight into its spare capacity.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, n: usize) -> Result<(), DataError> {
    while buf.len() < n {
        let mut limited = (&mut *r).take((n - buf.len()).min(READ_PIECE) as u64);
        let got = idle(limited.read_buf(buf), Some(IDLE)).await?;
        if got == 0 {
            return Err(DataError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(())
}

/// Reads one header. `Ok(None)` at a clean end of the connection (before a header). With
/// `wait`, the first byte may take any time (an idle connection waiting for its next request).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, wait: bool) -> Result<Option<pb::DataMessage>, DataError> {
    let mut len = [0u8; 4];
    let first = idle(r.read(&mut len), if wait { None } else { Some(IDLE) }).await?;
    if first == 0 {
        return Ok(None);
    }
    if first < 4 {
        idle(r.read_exact(&mut len[first..]), Some(IDLE)).await?;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(DataError::Protocol(format!("a header of {len} bytes (at most {MAX_HEADER})")));
    }
    let mut buf = Vec::with_capacity(len);
    fill(r, &mut buf, len).await?;
    let msg = pb::DataMessage::decode(&buf[..]).map_err(|e| DataError::Protocol(e.to_string()))?;
    Ok(Some(msg))
}

fn frame(msg: &pb::DataMessage) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut out).expect("a Vec grows");
    out
}

/// Writes `data`; a peer that takes nothing for [`IDLE`] is given up on.
async fn write<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<(), DataError> {
    for piece in data.chunks(WRITE_PIECE) {
        idle(w.write_all(piece), Some(IDLE)).await?;
    }
    Ok(())
}

/// Writes one header, and sends it (TLS may hold written bytes until flushed; on plain TCP the
/// flush costs nothing).
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &pb::DataMessage) -> Result<(), DataError> {
    write(w, &frame(msg)).await?;
    idle(w.flush(), Some(IDLE)).await
}

/// The header describing `values`.
fn headers(values: &[Received]) -> pb::ValueList {
    pb::ValueList {
        values: values
            .iter()
            .map(|(key, v)| match v {
                Some(v) => pb::ValueHeader {
                    key: key.clone(),
                    codec: v.codec.to_string(),
                    len: v.len() as u64,
                    missing: false,
                    ..Default::default()
                },
                None => pb::ValueHeader { key: key.clone(), missing: true, ..Default::default() },
            })
            .collect(),
    }
}

/// Writes `header` and then the bytes of `values`: small ones copied together into batches,
/// large ones straight from their buffers.
async fn write_with_values<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &pb::DataMessage,
    values: &[Received],
) -> Result<(), DataError> {
    let mut batch = frame(header);
    for (_, v) in values {
        let Some(v) = v else { continue };
        if v.len() < SMALL && batch.len() + v.len() <= BATCH {
            batch.extend_from_slice(&v.data);
            continue;
        }
        if !batch.is_empty() {
            write(w, &batch).await?;
            batch.clear();
        }
        if v.len() < SMALL {
            batch.extend_from_slice(&v.data);
        } else {
            write(w, &v.data).await?;
        }
    }
    if !batch.is_empty() {
        write(w, &batch).await?;
    }
    idle(w.flush(), Some(IDLE)).await
}

/// Reads and drops `n` bytes.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> Result<(), DataError> {
    let mut sink = (&mut *r).take(n);
    let got = idle(tokio::io::copy(&mut sink, &mut tokio::io::sink()), Some(IDLE)).await?;
    if got < n {
        return Err(DataError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Allocates a receive buffer, refusing sizes this process cannot hold instead of aborting.
fn buffer(key: &str, len: u64) -> Result<Vec<u8>, DataError> {
    let too_big = || DataError::TooBig { key: key.to_string(), len };
    let n = usize::try_from(len).map_err(|_| too_big())?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_big())?;
    Ok(v)
}

/// Reads the bytes of the values `list` announces.
async fn read_values<R: AsyncRead + Unpin>(r: &mut R, list: pb::ValueList) -> Result<Vec<Received>, DataError> {
    read_values_to(r, list, &[], &mut Vec::new()).await
}

/// Reads one value's bytes straight into a file, a piece at a time.
async fn read_to_file<R: AsyncRead + Unpin>(r: &mut R, path: &std::path::Path, len: u64) -> Result<(), DataError> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut left = len;
    while left > 0 {
        buf.clear();
        let n = left.min(1 << 20) as usize;
        fill(r, &mut buf, n).await?;
        file.write_all(&buf).await?;
        left -= n as u64;
    }
    file.flush().await?;
    Ok(())
}

/// Reads the bytes of the values `list` announces; those whose place (by index) is a file are
/// read into it and listed in `files` instead (with `None` in the result).
async fn read_values_to<R: AsyncRead + Unpin>(
    r: &mut R,
    list: pb::ValueList,
    places: &[Admit],
    files: &mut Vec<(pb::ValueHeader, std::path::PathBuf)>,
) -> Result<Vec<Received>, DataError> {
    let mut out: Vec<Received> = Vec::with_capacity(list.values.len());
    let headers = list.values;
    let to_file = |i: usize| match places.get(i) {
        Some(Admit::File(p)) => Some(p.clone()),
        _ => None,
    };
    let mut i = 0;
    while i < headers.len() {
        let h = &headers[i];
        if h.missing {
            out.push((h.key.clone(), None));
            i += 1;
            continue;
        }
        if let Some(path) = to_file(i) {
            if let Err(e) = read_to_file(r, &path, h.len).await {
                let _ = std::fs::remove_file(&path);
                for (_, p) in files.drain(..) {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
            files.push((h.clone(), path));
            out.push((h.key.clone(), None));
            i += 1;
            continue;
        }
        if h.len >= SMALL as u64 {
            let mut buf = buffer(&h.key, h.len)?;
            fill(r, &mut buf, h.len as usize).await?;
            out.push((h.key.clone(), Some(Value { codec: codec_name(&h.codec)?, data: Bytes::from(buf) })));
            i += 1;
            continue;
        }
        // A run of small values, read into one buffer and shared.
        let start = i;
        let mut total = 0usize;
        while i < headers.len()
            && !headers[i].missing
            && (headers[i].len as usize) < SMALL
            && total < BATCH
            && to_file(i).is_none()
        {
            total += headers[i].len as usize;
            i += 1;
        }
        let mut scratch = Vec::with_capacity(total);
        fill(r, &mut scratch, total).await?;
        let mut at = 0;
        for h in &headers[start..i] {
            let data = Bytes::copy_from_slice(&scratch[at..at + h.len as usize]);
            at += h.len as usize;
            out.push((h.key.clone(), Some(Value { codec: codec_name(&h.codec)?, data })));
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ the serving side

/// Where an announced value of a put is read to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    Memory,
    /// Straight into this file (a value too large for memory, spilled as it arrives).
    File(std::path::PathBuf),
}

/// What a data connection serves: a worker's store.
pub trait DataStore: Send + Sync {
    /// The values of `keys`; `None` for keys not held.
    fn get(&self, keys: Vec<String>) -> Vec<Received>;
    /// Decides, before a byte of it is read, where each value a put announces goes (one entry
    /// per header); `Err` refuses the whole put and says why.
    fn admit(&self, headers: &[pb::ValueHeader]) -> Result<Vec<Admit>, String> {
        Ok(vec![Admit::Memory; headers.len()])
    }
    /// Stores put values; `Err` says why they cannot be taken.
    fn put(&self, values: Vec<(String, Value)>) -> Result<(), String>;
    /// Stores a value that was read into the file [`admit`](Self::admit) named.
    fn put_file(&self, key: String, codec: &'static str, file: std::path::PathBuf, len: u64) -> Result<(), String> {
        let _ = (codec, len, std::fs::remove_file(&file));
        Err(format!("value {key:?}: this store takes no values on disk"))
    }
}

/// A refused put announcing more than this is not read and thrown away: the connection is
/// closed after the reason (the sender reads it while it writes, see `send_and_read`).
const DISCARD_AT_MOST: u64 = 64 << 20;

/// Accepts data connections on `listener` and serves each from `store`, until `shutdown`.
///
/// With `security`, connections are TLS with mutual authentication: a peer without a
/// certificate signed by the cluster's CA is refused in the handshake and reads nothing.
pub async fn serve<D: DataStore + 'static>(
    listener: tokio::net::TcpListener,
    store: std::sync::Arc<D>,
    shutdown: tokio_util::sync::CancellationToken,
    security: Option<Security>,
) {
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a data connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (store, shutdown, security) = (store.clone(), shutdown.clone(), security.clone());
        tokio::spawn(async move {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if conn.set_nodelay(true).is_err() {
                return;
            }
            keepalive(&conn);
            let conn = match &security {
                Some(s) => s.accept(conn, "data"),
                None => Stream::Plain(conn),
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = serve_connection(conn, &*store) => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "data connection closed");
                }
            }
        });
    }
}

/// Serves one data connection until the peer closes it.
pub async fn serve_connection<S, D>(mut stream: S, store: &D) -> Result<(), DataError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: DataStore + ?Sized,
{
    let mut magic = [0u8; 8];
    idle(stream.read_exact(&mut magic), Some(IDLE)).await?;
    if &magic != MAGIC {
        return Err(DataError::Protocol("the connection does not start with DASKDATA".into()));
    }
    while let Some(msg) = read_message(&mut stream, true).await? {
        match msg.kind {
            Some(Kind::Get(req)) => {
                let values = store.get(req.keys);
                let header = pb::DataMessage { kind: Some(Kind::Values(headers(&values))) };
                write_with_values(&mut stream, &header, &values).await?;
            }
            Some(Kind::Put(list)) => {
                // Refuse what cannot be stored before reading (or allocating for) any of it.
                // A small refused put is read and thrown away so the connection stays usable;
                // a large one is not read at all: the reason goes out and the connection closes.
                let announced = list.values.iter().fold(0u64, |a, h| a.saturating_add(h.len));
                let refused = match list.values.iter().find(|h| !h.missing && codec_name(&h.codec).is_err()) {
                    Some(bad) => Err(format!("value {:?}: {}", bad.key, codec_name(&bad.codec).unwrap_err())),
                    None => store.admit(&list.values),
                };
                let places = match refused {
                    Ok(places) => places,
                    Err(why) => {
                        let reply = pb::DataMessage { kind: Some(Kind::Error(why.clone())) };
                        if announced <= DISCARD_AT_MOST {
                            discard(&mut stream, announced).await?;
                            write_message(&mut stream, &reply).await?;
                            continue;
                        }
                        write_message(&mut stream, &reply).await?;
                        return Err(DataError::Remote(why));
                    }
                };
                let mut stored_files = Vec::new();
                let values = match read_values_to(&mut stream, list, &places, &mut stored_files).await {
                    Ok(v) => v,
                    Err(e) => {
                        // Nothing of a failed put stays on disk.
                        for place in &places {
                            if let Admit::File(path) = place {
                                let _ = std::fs::remove_file(path);
                            }
                        }
                        // Say why before hanging up, if the peer still listens.
                        let why = pb::DataMessage { kind: Some(Kind::Error(e.to_string())) };
                        let _ = write_message(&mut stream, &why).await;
                        return Err(e);
                    }
                };
                let mut nbytes: u64 = values.iter().filter_map(|(_, v)| v.as_ref()).map(|v| v.len() as u64).sum();
                let values: Vec<(String, Value)> = values.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
                let mut keys = values.len() as u32;
                let mut result = store.put(values);
                for (h, path) in stored_files {
                    nbytes += h.len;
                    keys += 1;
                    let codec = codec_name(&h.codec).expect("checked above");
                    if let Err(why) = store.put_file(h.key, codec, path, h.len) {
                        result = Err(why);
                    }
                }
                let reply = match result {
                    Ok(()) => Kind::PutReply(pb::PutReply { nbytes, keys }),
                    Err(why) => Kind::Error(why),
                };
                write_message(&mut stream, &pb::DataMessage { kind: Some(reply) }).await?;
            }
            other => {
                let why = format!("expected a get or put request, got {other:?}");
                write_message(&mut stream, &pb::DataMessage { kind: Some(Kind::Error(why.clone())) }).await?;
                return Err(DataError::Protocol(why));
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ the requesting side

/// Data connections to peers, reused between requests. Shared by a worker's fetches and by a
/// client's gathers and scatters.
#[derive(Default)]
pub struct DataPool {
    idle: Mutex<HashMap<String, Vec<Stream>>>,
    /// Credentials for `tls://` peers.
    security: Option<Security>,
}

impl std::fmt::Debug for DataPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPool").finish_non_exhaustive()
    }
}

impl DataPool {
    /// A pool that reaches `tls://` peers with these credentials.
    pub fn with_security(security: Option<Security>) -> DataPool {
        DataPool { idle: Default::default(), security }
    }

    /// Fetches `keys` from the worker at `address`: one entry per key, in the order asked, with
    /// `None` for keys it lacks. Keys a peer sends unasked are dropped (a peer cannot plant
    /// values), and keys it leaves out count as lacking.
    pub async fn get_data(&self, address: &str, keys: Vec<String>) -> Result<Vec<Received>, DataError> {
        let request = pb::DataMessage { kind: Some(Kind::Get(pb::DataRequest { keys })) };
        let (mut conn, reply) = self.exchange(address, &request, &[]).await?;
        match reply.kind {
            Some(Kind::Values(list)) => {
                let values = read_values(&mut conn, list).await?;
                self.give_back(address, conn);
                let Some(Kind::Get(pb::DataRequest { keys })) = request.kind else { unreachable!("a get") };
                Ok(as_asked(keys, values))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Puts `values` on the worker at `address`, each with its ticket from the scheduler
    /// (`dask_protocol::ticket`), good until `expires_s`.
    pub async fn put_data(
        &self,
        address: &str,
        values: Vec<(String, Value)>,
        tickets: Vec<Vec<u8>>,
        expires_s: u64,
    ) -> Result<pb::PutReply, DataError> {
        let values: Vec<Received> = values.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let mut list = headers(&values);
        for (h, t) in list.values.iter_mut().zip(tickets) {
            h.ticket = t.into();
            h.expires_s = expires_s;
        }
        let request = pb::DataMessage { kind: Some(Kind::Put(list)) };
        let (conn, reply) = self.exchange(address, &request, &values).await?;
        match reply.kind {
            Some(Kind::PutReply(r)) => {
                self.give_back(address, conn);
                Ok(r)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Closes the idle connections to a peer (after it failed).
    pub fn forget(&self, address: &str) {
        self.idle.lock().expect("pool lock").remove(address);
    }

    /// Sends a request and reads the reply's header; an idle connection that turns out to be
    /// closed (the peer restarted) is replaced by a fresh one, once.
    async fn exchange(
        &self,
        address: &str,
        request: &pb::DataMessage,
        values: &[Received],
    ) -> Result<(Stream, pb::DataMessage), DataError> {
        let pooled = self.idle.lock().expect("pool lock").get_mut(address).and_then(Vec::pop);
        if let Some(mut conn) = pooled {
            match send_and_read(&mut conn, request, values).await {
                Ok(Some(reply)) => return Ok((conn, reply)),
                // Closed while idle (the peer restarted or dropped it): try a fresh one.
                Ok(None) => {}
                Err(DataError::Io(e)) if is_stale(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let mut conn = connect(address, self.security.as_ref()).await?;
        match send_and_read(&mut conn, request, values).await? {
            Some(reply) => Ok((conn, reply)),
            None => Err(DataError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    fn give_back(&self, address: &str, conn: Stream) {
        let mut idle = self.idle.lock().expect("pool lock");
        let conns = idle.entry(address.to_string()).or_default();
        if conns.len() < POOL_PER_PEER {
            conns.push(conn);
        }
    }
}

/// `values` lined up with `keys` (see [`DataPool::get_data`]). A peer answers in the order
/// asked, so matching by name is only the fallback.
fn as_asked(keys: Vec<String>, values: Vec<Received>) -> Vec<Received> {
    if keys.len() == values.len() && keys.iter().zip(&values).all(|(k, (v, _))| k == v) {
        return values;
    }
    let mut by_key: HashMap<String, Value> = values.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
    keys.into_iter()
        .map(|k| {
            let v = by_key.remove(&k);
            (k, v)
        })
        .collect()
}

/// Errors of an idle connection the peer has closed.
fn is_stale(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted | NotConnected)
}

fn unexpected(kind: Option<Kind>) -> DataError {
    match kind {
        Some(Kind::Error(why)) => DataError::Remote(why),
        other => DataError::Protocol(format!("unexpected reply {other:?}")),
    }
}

/// Sends a request and reads the reply's header. The reply is listened for while the values
/// are still being written: a peer that refuses a put says why at once and hangs up, and that
/// reason (not a broken pipe) is what the caller gets.
async fn send_and_read(
    conn: &mut Stream,
    request: &pb::DataMessage,
    values: &[Received],
) -> Result<Option<pb::DataMessage>, DataError> {
    match conn {
        // Plain TCP splits for free; TLS through tokio's split (one state for both halves).
        Stream::Plain(tcp) => {
            let (rd, wr) = tcp.split();
            send_and_read_on(rd, wr, request, values).await
        }
        tls => {
            let (rd, wr) = tokio::io::split(tls);
            send_and_read_on(rd, wr, request, values).await
        }
    }
}

async fn send_and_read_on<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: W,
    request: &pb::DataMessage,
    values: &[Received],
) -> Result<Option<pb::DataMessage>, DataError> {
    let write = write_with_values(&mut wr, request, values);
    let reply = read_message(&mut rd, true);
    tokio::pin!(write, reply);
    tokio::select! {
        biased;
        written = &mut write => {
            match written {
                Ok(()) => {}
                // Hung up on: if it said why first, that is the error.
                Err(e) => return match tokio::time::timeout(Duration::from_secs(1), &mut reply).await {
                    Ok(Ok(Some(msg @ pb::DataMessage { kind: Some(Kind::Error(_)) }))) => Ok(Some(msg)),
                    _ => Err(e),
                },
            }
            match tokio::time::timeout(IDLE, reply).await {
                Ok(r) => r,
                Err(_) => Err(DataError::Timeout(IDLE)),
            }
        }
        early = &mut reply => match early? {
            // Answered before it had everything: only a refusal can be.
            Some(msg @ pb::DataMessage { kind: Some(Kind::Error(_)) }) => Ok(Some(msg)),
            Some(other) => Err(DataError::Protocol(format!("a reply before the request was sent: {other:?}"))),
            None => Err(DataError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        },
    }
}

/// Opens a data connection to `address` (`tcp://host:port`, `host:port`, or `tls://host:port`
/// with `security`'s credentials).
pub async fn connect(address: &str, security: Option<&Security>) -> Result<Stream, DataError> {
    let addr = crate::addr::Address::parse(address, None).map_err(|e| DataError::Address(e.to_string()))?;
    let target = format!("{}:{}", addr.host, addr.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target))
        .await
        .map_err(|_| DataError::Timeout(CONNECT_TIMEOUT))??;
    tcp.set_nodelay(true)?;
    keepalive(&tcp);
    let mut conn = match (addr.tls, security) {
        (false, _) => Stream::Plain(tcp),
        (true, Some(s)) => tokio::time::timeout(CONNECT_TIMEOUT, s.connect(tcp, &addr.host))
            .await
            .map_err(|_| DataError::Timeout(CONNECT_TIMEOUT))??,
        (true, None) => {
            return Err(DataError::Address(format!(
                "{address} is a tls:// address and no TLS credentials were given (--tls-ca-file, --tls-cert, --tls-key)"
            )));
        }
    };
    conn.write_all(MAGIC).await?;
    conn.flush().await?;
    Ok(conn)
}

/// Idle time before the kernel probes a data connection's peer, and between probes.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(30), Duration::from_secs(10), 3);

/// Lets the kernel find a peer that vanished without closing (power loss, a partition): a
/// connection idle for 30 s is probed, and reset after 3 probes 10 s apart go unanswered.
/// Without it, a worker would keep a task and a socket waiting for each such peer's next
/// request forever.
fn keepalive(conn: &TcpStream) {
    let (time, interval, retries) = KEEPALIVE;
    let ka = socket2::TcpKeepalive::new().with_time(time).with_interval(interval).with_retries(retries);
    if let Err(e) = socket2::SockRef::from(conn).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "could not set TCP keepalive on a data connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a map, for tests.
    #[derive(Default)]
    struct MapStore(Mutex<HashMap<String, Value>>);

    impl DataStore for MapStore {
        fn get(&self, keys: Vec<String>) -> Vec<Received> {
            let m = self.0.lock().unwrap();
            keys.into_iter().map(|k| (k.clone(), m.get(&k).cloned())).collect()
        }
        fn put(&self, values: Vec<(String, Value)>) -> Result<(), String> {
            if values.iter().any(|(k, _)| k == "refused") {
                return Err("no room for refused".into());
            }
            self.0.lock().unwrap().extend(values);
            Ok(())
        }
    }

    async fn server() -> (String, std::sync::Arc<MapStore>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("tcp://{}", listener.local_addr().unwrap());
        let store = std::sync::Arc::new(MapStore::default());
        tokio::spawn(serve(listener, store.clone(), Default::default(), None));
        (addr, store)
    }

    #[tokio::test]
    async fn values_of_every_size_round_trip_and_connections_are_reused() {
        let (addr, store) = server().await;
        let pool = DataPool::default();
        let big: Bytes = (0..(3 * BATCH + 17)).map(|i| i as u8).collect::<Vec<_>>().into();
        let mut values = vec![
            ("a".to_string(), Value::raw(Bytes::from_static(b"\x01"))),
            ("big".to_string(), Value::raw(big.clone())),
            ("empty".to_string(), Value::encode(&()).unwrap()),
            ("mid".to_string(), Value::raw(Bytes::from(vec![3u8; SMALL]))),
        ];
        for i in 0..3000 {
            values.push((format!("s{i}"), Value::encode(&i).unwrap()));
        }
        let reply = pool.put_data(&addr, values.clone(), Vec::new(), 0).await.unwrap();
        assert_eq!(reply.keys as usize, values.len());
        assert_eq!(store.0.lock().unwrap().len(), values.len());
        let mut keys: Vec<String> = values.iter().map(|(k, _)| k.clone()).collect();
        keys.push("gone".into());
        let got = pool.get_data(&addr, keys).await.unwrap();
        assert_eq!(got.len(), values.len() + 1);
        for ((k, v), (gk, gv)) in values.iter().zip(&got) {
            assert_eq!((k, Some(v)), (gk, gv.as_ref()));
        }
        assert_eq!(got.last().unwrap(), &("gone".to_string(), None));
        assert_eq!(pool.idle.lock().unwrap()[&addr].len(), 1, "one connection, reused");
        // Refusals come back as errors with the worker's reason; the connection stays usable.
        let e =
            pool.put_data(&addr, vec![("refused".into(), Value::raw(Bytes::new()))], Vec::new(), 0).await.unwrap_err();
        assert!(e.to_string().contains("no room for refused"), "{e}");
        assert_eq!(pool.get_data(&addr, vec!["a".into()]).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn values_too_big_to_hold_are_refused_with_the_reason() {
        // More than any allocation can be: the receiver says so instead of aborting.
        let huge = u64::MAX / 2;
        let list = move || pb::ValueList {
            values: vec![pb::ValueHeader {
                key: "huge".into(),
                codec: "bytes".into(),
                len: huge,
                missing: false,
                ..Default::default()
            }],
        };
        // A put of it: the worker replies why and hangs up, and goes on serving others.
        let (addr, store) = server().await;
        let mut c = connect(&addr, None).await.unwrap();
        write_message(&mut c, &pb::DataMessage { kind: Some(Kind::Put(list())) }).await.unwrap();
        let reply = read_message(&mut c, false).await.unwrap().unwrap();
        assert!(
            matches!(reply.kind, Some(Kind::Error(ref e)) if e.contains("\"huge\"") && e.contains("does not fit in memory")),
            "{reply:?}"
        );
        assert!(read_message(&mut c, false).await.unwrap().is_none(), "the worker hangs up");
        assert!(store.0.lock().unwrap().is_empty());
        let got = DataPool::default().get_data(&addr, vec!["huge".into()]).await.unwrap();
        assert_eq!(got, vec![("huge".to_string(), None)]);

        // A peer answering a get with it: the fetch fails with TooBig, naming the key.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = format!("tcp://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut magic = [0u8; 8];
            conn.read_exact(&mut magic).await.unwrap();
            read_message(&mut conn, true).await.unwrap().unwrap();
            write_message(&mut conn, &pb::DataMessage { kind: Some(Kind::Values(list())) }).await.unwrap();
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest).await;
        });
        let e = DataPool::default().get_data(&peer, vec!["huge".into()]).await.unwrap_err();
        assert!(matches!(e, DataError::TooBig { ref key, len } if key == "huge" && len == huge), "{e:?}");
        assert!(e.to_string().contains("does not fit in memory here"), "{e}");
    }

    #[test]
    fn a_reply_is_lined_up_with_the_keys_asked() {
        let v = |b: &'static [u8]| Some(Value::raw(Bytes::from_static(b)));
        let keys = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        // In order: kept as is.
        let sent = vec![("a".to_string(), v(b"1")), ("b".to_string(), None), ("c".to_string(), v(b"3"))];
        assert_eq!(as_asked(keys(), sent.clone()), sent);
        // Out of order, one left out, one never asked: by name, the missing one None.
        let sent = vec![("c".to_string(), v(b"3")), ("x".to_string(), v(b"planted")), ("a".to_string(), v(b"1"))];
        let want = vec![("a".to_string(), v(b"1")), ("b".to_string(), None), ("c".to_string(), v(b"3"))];
        assert_eq!(as_asked(keys(), sent), want);
    }

    #[tokio::test]
    async fn data_connections_probe_a_silent_peer() {
        let (addr, _) = server().await;
        let conn = connect(&addr, None).await.unwrap();
        let s = socket2::SockRef::from(conn.tcp().expect("a TCP connection"));
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE.0);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE.1);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE.2);
        // The connection works as before.
        let mut conn = conn;
        let get = pb::DataMessage { kind: Some(Kind::Get(pb::DataRequest { keys: vec!["k".into()] })) };
        let reply = send_and_read(&mut conn, &get, &[]).await.unwrap().unwrap();
        assert!(matches!(reply.kind, Some(Kind::Values(ref l)) if l.values[0].missing), "{reply:?}");
    }

    #[tokio::test]
    async fn malformed_input_is_refused() {
        let (addr, _) = server().await;
        let target = addr.trim_start_matches("tcp://").to_string();
        // A header longer than allowed.
        let mut c = TcpStream::connect(&target).await.unwrap();
        c.write_all(MAGIC).await.unwrap();
        c.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).await.unwrap(), 0, "the worker hangs up");
        // A reply where a request belongs gets an error message.
        let mut c = connect(&addr, None).await.unwrap();
        let msg = pb::DataMessage { kind: Some(Kind::PutReply(pb::PutReply::default())) };
        write_message(&mut c, &msg).await.unwrap();
        let reply = read_message(&mut c, false).await.unwrap().unwrap();
        assert!(matches!(reply.kind, Some(Kind::Error(ref e)) if e.contains("expected a get or put")), "{reply:?}");
        // An unknown codec.
        let mut c = connect(&addr, None).await.unwrap();
        let list = pb::ValueList {
            values: vec![pb::ValueHeader {
                key: "k".into(),
                codec: "pickle".into(),
                len: 3 << 20,
                missing: false,
                ..Default::default()
            }],
        };
        let big = [("k".to_string(), Some(Value::raw(Bytes::from(vec![1u8; 3 << 20]))))];
        let reply = send_and_read(&mut c, &pb::DataMessage { kind: Some(Kind::Put(list)) }, &big).await.unwrap();
        assert!(matches!(reply.unwrap().kind, Some(Kind::Error(ref e)) if e.contains("\"pickle\"")));
        // ... and the connection still serves the next request.
        let get = pb::DataMessage { kind: Some(Kind::Get(pb::DataRequest { keys: vec!["k".into()] })) };
        let reply = send_and_read(&mut c, &get, &[]).await.unwrap().unwrap();
        assert!(matches!(reply.kind, Some(Kind::Values(ref l)) if l.values[0].missing), "{reply:?}");
        // Nothing listening.
        let e = DataPool::default().get_data("tcp://127.0.0.1:1", vec!["k".into()]).await.unwrap_err();
        assert!(matches!(e, DataError::Io(_)), "{e:?}");
        let e = DataPool::default().get_data("nonsense:::", vec![]).await.unwrap_err();
        assert!(matches!(e, DataError::Address(_)), "{e:?}");
    }
}
