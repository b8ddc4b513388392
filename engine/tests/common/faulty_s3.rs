//! A fault-injecting S3 proxy on loopback: plain HTTP/1.1 in front of the test's S3 server, with a script
//! of faults chosen by request count, method and path. Each client request is read whole, matched
//! against the rules, and then answered, failed or forwarded (one upstream connection per request, the
//! response read whole and sent back with a `Content-Length`). The faults are the ones real networks and
//! S3 servers produce: error bursts (500, 503 SlowDown), a connection reset before or in the middle of a
//! response, a response lost after the server applied the request, a body cut short (`Content-Length`
//! larger than what is sent, then a normal close), slow answers, a stall (no answer at all, or half a
//! body and then nothing), and a request body corrupted on its way to the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do to a matched request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and S3 error code without forwarding (500 InternalError, 503 SlowDown).
    Status(u16, &'static str),
    /// Reset the connection (RST) without forwarding: the request never reached the server.
    Reset,
    /// Forward, then reset the connection instead of answering: the server applied the request but the
    /// client never hears back.
    LoseResponse,
    /// Forward, send the head and half the body, then reset the connection.
    ResetMidBody,
    /// Forward, send the head (full `Content-Length`) and half the body, then close normally.
    TruncateBody,
    /// Wait this long, then forward.
    Delay(Duration),
    /// Forward, then send the response slowly: in pieces of `chunk` bytes, `pause` apart.
    SlowBody {
        /// Bytes per piece.
        chunk: usize,
        /// Pause between pieces.
        pause: Duration,
    },
    /// Never answer (until the client gives up and closes).
    Stall,
    /// Forward, send the head and half the body, then nothing more.
    StallMidBody,
    /// Flip one byte in the middle of the request body before forwarding.
    CorruptRequest,
    /// Forward, then answer with a `Content-Length` of 4 EiB (a broken or hostile server), the real body,
    /// and close.
    HugeLength,
}

/// When a fault applies: to matching requests number `skip + 1` to `skip + times` (counting matches).
#[derive(Debug, Clone)]
pub struct Rule {
    /// HTTP method to match (`GET`, `PUT`, …); any when `None`.
    pub method: Option<&'static str>,
    /// A substring of the request path (path-style: `/bucket/prefix/key`); any when `None`.
    pub path_contains: Option<String>,
    /// Matching requests let through before the fault starts.
    pub skip: u64,
    /// How many matching requests get the fault (`u64::MAX`: all).
    pub times: u64,
    /// The fault.
    pub fault: Fault,
}

impl Rule {
    /// `fault` on the next `times` requests of `method` (any when `None`) whose path contains `path`.
    pub fn new(method: Option<&'static str>, path: Option<&str>, times: u64, fault: Fault) -> Rule {
        Rule {
            method,
            path_contains: path.map(str::to_string),
            skip: 0,
            times,
            fault,
        }
    }

    /// Lets the first `n` matching requests through first.
    pub fn after(mut self, n: u64) -> Rule {
        self.skip = n;
        self
    }
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    matched: u64,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Mutex<Vec<RuleState>>,
    requests: AtomicU64,
    injected: AtomicU64,
    log: Mutex<Vec<String>>,
}

/// The proxy; stops when dropped.
pub struct FaultyS3 {
    /// `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub endpoint: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultyS3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultyS3 {
    /// A proxy in front of `upstream` (`http://HOST:PORT`) with no faults yet.
    pub async fn start(upstream: &str) -> FaultyS3 {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("the fault proxy forwards to plain HTTP")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                conns.spawn(serve(client, upstream.clone(), s.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        FaultyS3 {
            endpoint,
            shared,
            task,
        }
    }

    /// Replaces the script of faults.
    pub fn set(&self, rules: Vec<Rule>) {
        *self.shared.rules.lock().unwrap() = rules
            .into_iter()
            .map(|rule| RuleState { rule, matched: 0 })
            .collect();
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.set(Vec::new())
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::Relaxed)
    }

    /// One line per injected fault: `METHOD PATH -> FAULT`.
    pub fn log(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Shared {
    fn pick(&self, method: &str, path: &str) -> Option<Fault> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut rules = self.rules.lock().unwrap();
        for st in rules.iter_mut() {
            let r = &st.rule;
            if r.method.is_some_and(|m| m != method)
                || r.path_contains
                    .as_deref()
                    .is_some_and(|p| !path.contains(p))
            {
                continue;
            }
            st.matched += 1;
            if st.matched > r.skip && st.matched - r.skip <= r.times {
                self.injected.fetch_add(1, Ordering::Relaxed);
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path} -> {:?}", r.fault));
                return Some(r.fault.clone());
            }
        }
        None
    }
}

/// A parsed HTTP/1.1 message head: first line and headers, kept as text.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads until the blank line ending a head; `buf` keeps whatever was read past it. `None` on a clean
/// end of stream before any byte.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let first = lines.next().unwrap_or_default().to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .collect();
            return Ok(Some(Head { first, headers }));
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads exactly `len` body bytes (some may already be in `buf`).
async fn read_exact_body(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    while buf.len() < len {
        let mut chunk = vec![0u8; (len - buf.len()).min(256 * 1024)];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf.drain(..len).collect())
}

/// Reads a response body framed by `Transfer-Encoding: chunked`, `Content-Length` or end of stream.
async fn read_response_body(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &Head,
) -> std::io::Result<Vec<u8>> {
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let line = loop {
                if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 2);
                    break line;
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers (none expected) end with a blank line; the connection closes anyway.
                return Ok(body);
            }
            body.extend(read_exact_body(s, buf, size + 2).await?.drain(..size));
        }
    }
    if let Some(len) = head.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other("bad content-length"))?;
        return read_exact_body(s, buf, len).await;
    }
    let mut body = std::mem::take(buf);
    s.read_to_end(&mut body).await?;
    Ok(body)
}

/// A whole response from the server.
struct Response {
    head: Head,
    body: Vec<u8>,
}

impl Response {
    fn encode_head(&self) -> Vec<u8> {
        self.encode_head_claiming(self.body.len() as u64)
    }

    /// The head with `Content-Length: length`, whatever the body is.
    fn encode_head_claiming(&self, length: u64) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.head.first);
        for (n, v) in &self.head.headers {
            if [
                "content-length",
                "transfer-encoding",
                "connection",
                "keep-alive",
            ]
            .iter()
            .any(|h| n.eq_ignore_ascii_case(h))
            {
                continue;
            }
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {length}\r\n\r\n"));
        out.into_bytes()
    }
}

async fn forward(
    upstream: &str,
    head: &Head,
    body: &[u8],
    is_head: bool,
) -> std::io::Result<Response> {
    let mut up = TcpStream::connect(upstream).await?;
    let mut req = format!("{}\r\n", head.first);
    for (n, v) in &head.headers {
        if n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes()).await?;
    up.write_all(body).await?;
    up.flush().await?;
    let mut buf = Vec::new();
    let rhead = read_head(&mut up, &mut buf)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    let status: u16 = rhead
        .first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if is_head || status == 204 || status == 304 {
        Vec::new()
    } else {
        read_response_body(&mut up, &mut buf, &rhead).await?
    };
    Ok(Response { head: rhead, body })
}

/// Waits until the client closes its side (what a stalled server sees).
async fn drain_until_closed(mut client: TcpStream) {
    let mut sink = [0u8; 16 * 1024];
    while let Ok(n) = client.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

fn reset(client: TcpStream) {
    // SO_LINGER 0: closing sends RST instead of FIN.
    let _ = client.set_zero_linger();
    drop(client);
}

async fn serve(mut client: TcpStream, upstream: String, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        let head = match read_head(&mut client, &mut buf).await {
            Ok(Some(h)) => h,
            _ => return,
        };
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let Ok(mut body) = read_exact_body(&mut client, &mut buf, len).await else {
            return;
        };
        let mut parts = head.first.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let fault = shared.pick(&method, &path);
        match &fault {
            Some(Fault::Status(code, s3code)) => {
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3code}</Code>\
                     <Message>injected by the fault proxy</Message><Resource>{path}</Resource>\
                     <RequestId>faulty</RequestId></Error>"
                );
                let reason = if *code == 503 {
                    "Service Unavailable"
                } else {
                    "Internal Server Error"
                };
                let resp = format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                    xml.len()
                );
                if client.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::Reset) => return reset(client),
            Some(Fault::Stall) => return drain_until_closed(client).await,
            Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
            Some(Fault::CorruptRequest) if !body.is_empty() => {
                let mid = body.len() / 2;
                body[mid] ^= 0x01;
            }
            _ => {}
        }
        let resp = match forward(&upstream, &head, &body, method == "HEAD").await {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("fault proxy: upstream failed: {e}");
                let resp = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\n\r\n{msg}",
                    msg.len()
                );
                let _ = client.write_all(resp.as_bytes()).await;
                return;
            }
        };
        let head_bytes = resp.encode_head();
        let half = resp.body.len() / 2;
        match fault {
            Some(Fault::LoseResponse) => return reset(client),
            Some(Fault::ResetMidBody) => {
                let _ = client.write_all(&head_bytes).await;
                let _ = client.write_all(&resp.body[..half]).await;
                let _ = client.flush().await;
                // Let the client read what was sent before the reset discards it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return reset(client);
            }
            Some(Fault::HugeLength) => {
                let _ = client.write_all(&resp.encode_head_claiming(1 << 62)).await;
                let _ = client.write_all(&resp.body).await;
                let _ = client.shutdown().await;
                return;
            }
            Some(Fault::TruncateBody) => {
                let _ = client.write_all(&head_bytes).await;
                let _ = client.write_all(&resp.body[..half]).await;
                let _ = client.shutdown().await;
                return;
            }
            Some(Fault::StallMidBody) => {
                let _ = client.write_all(&head_bytes).await;
                let _ = client.write_all(&resp.body[..half]).await;
                let _ = client.flush().await;
                return drain_until_closed(client).await;
            }
            Some(Fault::SlowBody { chunk, pause }) => {
                if client.write_all(&head_bytes).await.is_err() {
                    return;
                }
                for piece in resp.body.chunks(chunk.max(1)) {
                    if client.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
            _ => {
                if client.write_all(&head_bytes).await.is_err()
                    || client.write_all(&resp.body).await.is_err()
                {
                    return;
                }
            }
        }
    }
}
