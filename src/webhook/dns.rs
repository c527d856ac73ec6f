//! Name lookups for webhook targets, on threads of their own.
//!
//! `getaddrinfo` blocks, and against a DNS server that never answers it
//! blocks for its whole retry schedule. tokio's `lookup_host` runs it on the
//! runtime's blocking pool — the pool the spool's claims, takeovers and
//! lease deletions run on — so a few hanging lookups would stall the spool.
//! Here lookups run on a small pool of their own: a hanging resolver delays
//! webhooks only, and lookups beyond the pool wait in its queue.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::sync::oneshot;

/// Lookups at once; more wait in the queue.
const THREADS: usize = 4;

type Request = (
    String,
    u16,
    oneshot::Sender<std::io::Result<Vec<SocketAddr>>>,
);

fn pool() -> &'static Mutex<mpsc::Sender<Request>> {
    static POOL: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ttspool-dns-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().expect("dns queue").recv();
                    let Ok((host, port, reply)) = next else {
                        return;
                    };
                    if reply.is_closed() {
                        continue; // the caller gave up while it waited
                    }
                    let res = (host.as_str(), port)
                        .to_socket_addrs()
                        .map(Iterator::collect);
                    let _ = reply.send(res);
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a DNS lookup thread: {e}");
            }
        }
        Mutex::new(tx)
    })
}

/// Resolves `host` on the lookup pool.
pub async fn lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let (tx, rx) = oneshot::channel();
    pool()
        .lock()
        .expect("dns pool")
        .send((host.to_string(), port, tx))
        .map_err(|_| std::io::Error::other("the DNS lookup threads are gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the DNS lookup thread stopped"))?
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn localhost_resolves() {
        let a = super::lookup("localhost", 80).await.unwrap();
        assert!(a.iter().any(|a| a.ip().is_loopback()), "{a:?}");
    }
}
