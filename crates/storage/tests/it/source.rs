//! A tiny HTTP/1.1 source server on loopback that misbehaves on request.
//!
//! It is written on raw TCP so a test controls every byte: exact Content-Length, short bodies
//! closed with a FIN, resets (RST) mid-body, stalls and close-delimited bodies. Every response
//! carries `Connection: close`. Query strings are ignored, so tests can append fake signatures.
//!
//! Paths (sizes and offsets in bytes):
//! - `/video/{size}`: 200 `video/mp4`, the deterministic MP4-ish body of [`video_byte`].
//! - `/octet/{size}`: the same as `application/octet-stream`.
//! - `/html/{size}`: the same as `text/html`.
//! - `/notmp4/{size}`: 200 `video/mp4` whose bytes 4..8 are `mdat`, not `ftyp`.
//! - `/unsized/{size}`: 200 `video/mp4` without Content-Length, delimited by closing.
//! - `/short/{size}/{sent}`: Content-Length `size`, then `sent` bytes and a FIN.
//! - `/reset/{size}/{sent}`: Content-Length `size`, then `sent` bytes and an RST.
//! - `/stall/{size}/{sent}`: Content-Length `size`, then `sent` bytes and silence until the
//!   client goes away.
//! - `/status/{code}`: that status with a short body; 503 and 429 add `Retry-After: 7`.
//! - `/redirect/{hops}/{path…}`: `302` to `/redirect/{hops - 1}/{path…}` on this server; with
//!   no hops left, `/{path…}` is served.
//! - `/to/{authority}/{path…}`: `302` to `http://{authority}/{path…}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const CHUNK: u64 = 64 * 1024;

/// The `ftyp` box our fake videos start with (32 bytes).
const FTYP_BOX: &[u8; 32] = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41";

/// Byte `index` of every fake video: an `ftyp` box, then pseudo-random filler.
pub(crate) fn video_byte(index: u64) -> u8 {
    match FTYP_BOX.get(index as usize) {
        Some(byte) => *byte,
        None => (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8,
    }
}

/// The fake video's bytes `start..end`.
pub(crate) fn video_bytes(start: u64, end: u64) -> Vec<u8> {
    (start..end).map(video_byte).collect()
}

/// Hex sha256 of the first `size` bytes of the fake video.
pub(crate) fn video_sha256(size: u64) -> String {
    let mut sha256 = Sha256::new();
    let mut start = 0;
    while start < size {
        let end = (start + CHUNK).min(size);
        sha256.update(video_bytes(start, end));
        start = end;
    }
    hex::encode(sha256.finalize())
}

pub(crate) struct SourceServer {
    addr: SocketAddr,
    accept_task: JoinHandle<()>,
    connections: Arc<AtomicUsize>,
}

impl SourceServer {
    pub(crate) async fn start() -> SourceServer {
        SourceServer::start_at("127.0.0.1").await
    }

    /// A server on `ip` (any of 127.0.0.0/8 works on Linux) and a free port.
    pub(crate) async fn start_at(ip: &str) -> SourceServer {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("binding the source server");
        let addr = listener.local_addr().expect("source server address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let accept_task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket));
            }
        });
        SourceServer {
            addr,
            accept_task,
            connections,
        }
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:port{path}`; `path` may carry a query string.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for SourceServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn serve(mut socket: TcpStream) {
    let Some(mut path) = read_request_path(&mut socket).await else {
        return;
    };
    if let Some(rest) = path.strip_prefix("/redirect/") {
        let (hops, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let hops: u64 = hops.parse().unwrap_or(0);
        if hops > 0 {
            let location = format!("/redirect/{}/{rest}", hops - 1);
            let _ = redirect(&mut socket, &location).await;
            return;
        }
        path = format!("/{rest}");
    }
    if let Some(rest) = path.strip_prefix("/to/") {
        let (authority, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let authority = authority.replace("%5B", "[").replace("%5D", "]");
        let _ = redirect(&mut socket, &format!("http://{authority}/{rest}")).await;
        return;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let number = |index: usize| {
        segments
            .get(index)
            .and_then(|segment| segment.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let _ = match segments[0] {
        "video" => respond_video(&mut socket, "video/mp4", number(1), true).await,
        "octet" => respond_video(&mut socket, "application/octet-stream", number(1), true).await,
        "html" => respond_video(&mut socket, "text/html", number(1), true).await,
        "unsized" => respond_video(&mut socket, "video/mp4", number(1), false).await,
        "notmp4" => {
            let size = number(1);
            let result = write_head(
                &mut socket,
                200,
                &[("Content-Type", "video/mp4".into()), length(size)],
            )
            .await;
            let mut body = video_bytes(0, size.min(CHUNK));
            body[4..8].copy_from_slice(b"mdat");
            match result {
                Ok(()) => socket.write_all(&body).await,
                Err(error) => Err(error),
            }
        }
        "short" | "reset" | "stall" => {
            let (size, sent) = (number(1), number(2));
            let written = async {
                write_head(
                    &mut socket,
                    200,
                    &[("Content-Type", "video/mp4".into()), length(size)],
                )
                .await?;
                write_video(&mut socket, sent).await
            }
            .await;
            match segments[0] {
                "reset" => {
                    // A zero linger makes close send an RST and never blocks.
                    #[allow(deprecated)]
                    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
                }
                "stall" => {
                    // Reading returns only when the client closes the connection.
                    let mut sink = [0u8; 1024];
                    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                }
                _ => {}
            }
            written
        }
        "status" => {
            let status = number(1) as u16;
            let body = b"<Error><Code>Test</Code></Error>";
            let mut headers = vec![
                ("Content-Type", "application/xml".to_owned()),
                length(body.len() as u64),
            ];
            if status == 503 || status == 429 {
                headers.push(("Retry-After", "7".to_owned()));
            }
            match write_head(&mut socket, status, &headers).await {
                Ok(()) => socket.write_all(body).await,
                Err(error) => Err(error),
            }
        }
        _ => write_head(&mut socket, 400, &[length(0)]).await,
    };
    let _ = socket.shutdown().await;
}

async fn redirect(socket: &mut TcpStream, location: &str) -> std::io::Result<()> {
    write_head(socket, 302, &[("Location", location.to_owned()), length(0)]).await?;
    socket.shutdown().await
}

fn length(size: u64) -> (&'static str, String) {
    ("Content-Length", size.to_string())
}

async fn respond_video(
    socket: &mut TcpStream,
    content_type: &str,
    size: u64,
    with_length: bool,
) -> std::io::Result<()> {
    let mut headers = vec![("Content-Type", content_type.to_owned())];
    if with_length {
        headers.push(length(size));
    }
    write_head(socket, 200, &headers).await?;
    write_video(socket, size).await
}

/// Writes the first `size` bytes of the fake video in chunks generated on the fly.
async fn write_video(socket: &mut TcpStream, size: u64) -> std::io::Result<()> {
    let mut start = 0;
    while start < size {
        let end = (start + CHUNK).min(size);
        socket.write_all(&video_bytes(start, end)).await?;
        start = end;
    }
    Ok(())
}

async fn write_head(
    socket: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} Test\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await
}

/// Reads the request head and returns its path without the query string.
async fn read_request_path(socket: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = socket.read(&mut buffer).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.lines().next()?.split(' ').nth(1)?;
    Some(target.split('?').next()?.to_owned())
}
