//! Blind tunnels: bytes copied both ways, untouched, until either side closes, both go
//! quiet for the idle timeout, or shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Copies bytes both ways until either side closes, or neither sends anything for `idle`
/// or shutdown is requested. Returns bytes client→upstream and upstream→client.
pub async fn relay<A, B>(
    client: A,
    upstream: B,
    idle: Duration,
    shutdown: &CancellationToken,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut cr, &mut uw, &last, epoch, idle);
    let down = pump(&mut ur, &mut cw, &last, epoch, idle);
    tokio::select! {
        (a, b) = async { tokio::join!(up, down) } => (a, b),
        () = shutdown.cancelled() => (0, 0),
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, epoch: Instant, idle: Duration) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                // Idle in this direction; the tunnel lives while the other one is active.
                let quiet = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    break;
                }
                continue;
            }
        };
        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
    }
    let _ = w.shutdown().await;
    total
}
