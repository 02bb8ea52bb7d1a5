//! A deadline on a connection's first bytes, until they say which protocol it speaks.
//!
//! hyper-util's auto builder reads the start of each connection to tell HTTP/1.1 from h2
//! prior knowledge before any of hyper's own timers exist, and it waits for those bytes without
//! a limit. A client that connected and sent nothing (or trickled a prefix of the h2 preface)
//! kept its connection, and a file descriptor, for as long as it liked: a slowloris that
//! `proxy.header_read_timeout` did not cover. [`FirstBytes`] fails reads with `TimedOut` once
//! its deadline passes, until the protocol is decided: a byte that differs from the h2 preface
//! (HTTP/1.1, where hyper's `header_read_timeout` takes over) or the whole preface (h2).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// What an h2 prior-knowledge connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O stream whose reads time out until its first bytes name the protocol.
pub struct FirstBytes<I> {
    inner: I,
    /// How many leading bytes matched the h2 preface so far.
    matched: usize,
    /// `None` once the protocol is decided: no deadline from then on.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<I> FirstBytes<I> {
    /// Wraps `inner`; its first bytes must decide the protocol within `limit`.
    pub fn new(inner: I, limit: Duration) -> Self {
        Self {
            inner,
            matched: 0,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }

    fn observe(&mut self, read: &[u8]) {
        if self.deadline.is_none() {
            return;
        }
        // End of stream decides too: there is nothing left to wait for.
        let mut decided = read.is_empty();
        for &b in read {
            if H2_PREFACE.get(self.matched) == Some(&b) {
                self.matched += 1;
                decided = self.matched == H2_PREFACE.len();
            } else {
                decided = true;
            }
            if decided {
                break;
            }
        }
        if decided {
            self.deadline = None;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.observe(buf.filled().get(before..).unwrap_or_default());
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within proxy.header_read_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_after(first: &[u8], limit: Duration) -> io::Result<usize> {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(first).await?;
        let mut io = FirstBytes::new(server, limit);
        let mut buf = vec![0u8; first.len()];
        io.read_exact(&mut buf).await?;
        tokio::time::sleep(limit * 2).await;
        // Nothing more arrives: only an undecided stream times out.
        let mut more = [0u8; 1];
        tokio::time::timeout(limit * 4, io.read(&mut more))
            .await
            .unwrap_or(Ok(usize::MAX))
    }

    #[tokio::test]
    async fn silence_and_a_partial_h2_preface_time_out() {
        let limit = Duration::from_millis(50);
        for first in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
            let err = read_after(first, limit).await.err();
            assert_eq!(
                err.map(|e| e.kind()),
                Some(io::ErrorKind::TimedOut),
                "{first:?}"
            );
        }
    }

    #[tokio::test]
    async fn once_decided_reads_wait_as_long_as_they_like() {
        let limit = Duration::from_millis(50);
        for first in [&b"G"[..], b"PRX", &H2_PREFACE[..]] {
            // Still waiting for more after the deadline: `usize::MAX` marks the outer timeout.
            assert_eq!(
                read_after(first, limit).await.ok(),
                Some(usize::MAX),
                "{first:?}"
            );
        }
    }
}
