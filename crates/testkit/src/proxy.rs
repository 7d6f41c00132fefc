//! A loopback TCP proxy that tests use to make a service unreachable for a while.
//!
//! [`TcpProxy`] listens on `127.0.0.1:0` and forwards every connection to a target address.
//! `set_down(true)` resets the connections it is forwarding and resets every new connection
//! right after accepting it, so clients see the service as unreachable. `set_down(false)`
//! forwards again. `hold_replies(true)` keeps forwarding requests but holds the service's
//! replies back until `hold_replies(false)`: a request the service has acted on, whose answer
//! the client has not seen. Point a client at [`TcpProxy::addr`] instead of the service itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A TCP forwarder on loopback that can be switched off and on.
///
/// Dropping it stops the listener and resets every forwarded connection.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: String,
    down: AtomicBool,
    /// While true, bytes from the target wait in the proxy.
    held: tokio::sync::watch::Sender<bool>,
    /// Cancelled (and replaced by a fresh token) to cut every connection open at that moment.
    cut: Mutex<CancellationToken>,
}

impl TcpProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `target` (`host:port`), resolved per connection.
    pub async fn start(target: impl Into<String>) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target: target.into(),
            down: AtomicBool::new(false),
            held: tokio::sync::watch::Sender::new(false),
            cut: Mutex::new(CancellationToken::new()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(TcpProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The loopback address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` plus [`TcpProxy::addr`], for HTTP clients.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes the target down (`true`: reset open and new connections) or brings it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            let mut cut = self
                .shared
                .cut
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }

    /// Holds the target's replies back (`true`) or lets them through again (`false`), on open
    /// and new connections; requests are forwarded all along.
    pub fn hold_replies(&self, hold: bool) {
        self.shared.held.send_replace(hold);
    }

    /// Whether the proxy currently refuses to forward.
    pub fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared
            .cut
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _peer)) = listener.accept().await else {
            // Accept errors (for example EMFILE) are transient; the next accept may succeed.
            tokio::task::yield_now().await;
            continue;
        };
        if shared.down.load(Ordering::SeqCst) {
            reset(client);
            continue;
        }
        let cut = shared
            .cut
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        tokio::spawn(forward(
            client,
            shared.target.clone(),
            cut,
            shared.held.subscribe(),
        ));
    }
}

async fn forward(
    mut client: TcpStream,
    target: String,
    cut: CancellationToken,
    held: tokio::sync::watch::Receiver<bool>,
) {
    let mut upstream = tokio::select! {
        connected = TcpStream::connect(&target) => match connected {
            Ok(upstream) => upstream,
            Err(_) => {
                reset(client);
                return;
            }
        },
        () = cut.cancelled() => {
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let was_cut = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        tokio::select! {
            _ = async {
                tokio::join!(
                    pipe(client_read, upstream_write, None),
                    pipe(upstream_read, client_write, Some(held)),
                )
            } => false,
            () = cut.cancelled() => true,
        }
    };
    if was_cut {
        reset(client);
        reset(upstream);
    }
}

/// Copies `from` to `to` until `from` ends, waiting while `held` says so before each chunk.
async fn pipe(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut held: Option<tokio::sync::watch::Receiver<bool>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Some(held) = held.as_mut() {
            // An error means the proxy is gone: forward what was read and end with it.
            let _ = held.wait_for(|held| !*held).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Closes `stream` with a TCP RST instead of a FIN, so the peer sees "connection reset".
fn reset(stream: TcpStream) {
    // SO_LINGER is deprecated in tokio because a non-zero linger blocks the thread on close;
    // a zero linger never blocks, it makes close send an RST at once.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::TcpProxy;

    async fn echo_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = socket.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn forwards_cuts_and_forwards_again() {
        let proxy = TcpProxy::start(echo_server().await.to_string())
            .await
            .unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"ping").await.unwrap(), b"ping");

        proxy.set_down(true);
        assert!(proxy.is_down());
        assert!(
            round_trip(&mut open, b"ping").await.is_err(),
            "an open connection survived set_down"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            round_trip(&mut fresh, b"ping").await.is_err(),
            "a new connection was forwarded while down"
        );

        proxy.set_down(false);
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, b"pong").await.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn held_replies_arrive_once_released() {
        let proxy = TcpProxy::start(echo_server().await.to_string())
            .await
            .unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.hold_replies(true);
        stream.write_all(b"held").await.unwrap();
        let mut reply = vec![0; 4];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            stream.read_exact(&mut reply),
        )
        .await;
        assert!(early.is_err(), "a reply came through while held");
        proxy.hold_replies(false);
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, b"held");
    }
}
