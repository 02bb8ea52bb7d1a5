//! The metering tap: wraps the upstream response body on its way to the caller.
//!
//! Frames pass through unchanged. The tap keeps a capped copy of the data (shared `Bytes`, no
//! copying) for pricing and counts the bytes. Credits are known only at the end of the body, and
//! the ledger row must be committed before the caller sees that end, so the tap holds back the
//! *last* frame (the one after which upstream's body reports end-of-stream, or the end itself),
//! finishes the call's meter, waits for the commit acknowledgement (polled, never blocking), and
//! only then releases the frame and the end of stream.
//!
//! It finalises exactly once: at the end of the stream, on an upstream error, on the upstream
//! deadline, or on drop. Dropped before the end means the caller went away: upstream has billed
//! anyway, so the rest of the body is read in a background task (bounded in bytes and time),
//! priced, and recorded as `client_cancelled`.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ledger::writer::Ack;
use crate::ledger::Outcome;
use crate::meter::{CallMeter, Captured, Finish};

/// Error type of the tapped body, as hyper wants it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the tap needs for the background drain after a caller leaves.
#[derive(Clone)]
pub struct DrainSettings {
    pub tracker: TaskTracker,
    /// Cancelled when shutdown's deadline has passed.
    pub hard_stop: CancellationToken,
    pub max_bytes: u64,
}

enum State {
    Streaming,
    /// The call is finished; waiting for its ledger commit before releasing the held frame.
    Committing(Option<Ack>),
    Flushing,
    Done,
}

/// The tapped response body.
pub struct TapBody {
    inner: Option<Incoming>,
    call: Option<CallMeter>,
    capture: Captured,
    inspect: bool,
    cap: usize,
    bytes: u64,
    held: Option<Frame<Bytes>>,
    state: State,
    deadline: Pin<Box<Sleep>>,
    drain: DrainSettings,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream did not finish its response within upstream.timeout")]
struct DeadlineExceeded;

impl TapBody {
    /// Wraps `inner`; `deadline` is the end of the whole upstream exchange.
    pub fn new(inner: Incoming, call: CallMeter, deadline: Instant, drain: DrainSettings) -> Self {
        let inspect = call.inspects_body();
        let cap = call.max_inspect();
        Self {
            inner: Some(inner),
            call: Some(call),
            capture: Captured::default(),
            inspect,
            cap,
            bytes: 0,
            held: None,
            state: State::Streaming,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            drain,
        }
    }

    fn observe(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.bytes += data.len() as u64;
            if self.inspect {
                self.capture.push(data, self.cap);
            }
        }
    }

    fn finish(&mut self, outcome: Outcome, error: Option<String>) -> Option<Ack> {
        let mut body = std::mem::take(&mut self.capture);
        if outcome != Outcome::Ok {
            body.mark_truncated();
        }
        let mut call = self.call.take()?;
        call.finish(Finish {
            outcome,
            body,
            response_bytes: self.bytes,
            error,
        })
    }
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Flushing => {
                    return match this.held.take() {
                        Some(frame) => Poll::Ready(Some(Ok(frame))),
                        None => {
                            this.state = State::Done;
                            Poll::Ready(None)
                        }
                    };
                }
                State::Committing(ack) => {
                    if let Some(rx) = ack {
                        // A failed commit was already logged with the full row; the caller
                        // still gets Apollo's response.
                        let _ = ready!(Pin::new(rx).poll(cx));
                    }
                    this.state = State::Flushing;
                }
                State::Streaming => {
                    let Some(inner) = this.inner.as_mut() else {
                        this.state = State::Done;
                        continue;
                    };
                    match Pin::new(&mut *inner).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            let last = inner.is_end_stream();
                            this.observe(&frame);
                            if !last {
                                return Poll::Ready(Some(Ok(frame)));
                            }
                            // The last frame: hold it until the row is committed.
                            this.held = Some(frame);
                            this.inner = None;
                            let ack = this.finish(Outcome::Ok, None);
                            this.state = State::Committing(ack);
                        }
                        Poll::Ready(None) => {
                            this.inner = None;
                            let ack = this.finish(Outcome::Ok, None);
                            this.state = State::Committing(ack);
                        }
                        Poll::Ready(Some(Err(e))) => {
                            this.inner = None;
                            this.finish(
                                Outcome::UpstreamError,
                                Some(format!("upstream response body: {}", error_chain(&e))),
                            );
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                        Poll::Pending => {
                            if this.deadline.as_mut().poll(cx).is_ready() {
                                this.inner = None;
                                this.finish(
                                    Outcome::UpstreamTimeout,
                                    Some("upstream response body did not finish within upstream.timeout".into()),
                                );
                                this.state = State::Done;
                                return Poll::Ready(Some(Err(DeadlineExceeded.into())));
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.state {
            State::Done => true,
            State::Flushing => self.held.is_none(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.inner) {
            (State::Streaming, Some(inner)) => inner.size_hint(),
            (State::Streaming, None) | (State::Done, _) => SizeHint::with_exact(0),
            _ => match self.held.as_ref().and_then(|f| f.data_ref()) {
                Some(d) => SizeHint::with_exact(d.len() as u64),
                None => SizeHint::with_exact(0),
            },
        }
    }
}

impl Drop for TapBody {
    fn drop(&mut self) {
        let (Some(inner), Some(call)) = (self.inner.take(), self.call.take()) else {
            return;
        };
        // The caller went away mid-body. Read the rest in the background and record it.
        let job = Drain {
            inner,
            call,
            capture: std::mem::take(&mut self.capture),
            inspect: self.inspect,
            cap: self.cap,
            bytes: self.bytes,
            deadline: self.deadline.deadline(),
            settings: self.drain.clone(),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let tracker = job.settings.tracker.clone();
                tracker.spawn_on(job.run(), &handle);
            }
            // No runtime (process teardown): record what we have now.
            Err(_) => job.record(Some(
                "the runtime is stopping, so the body was not drained".into(),
            )),
        }
    }
}

struct Drain {
    inner: Incoming,
    call: CallMeter,
    capture: Captured,
    inspect: bool,
    cap: usize,
    bytes: u64,
    deadline: Instant,
    settings: DrainSettings,
}

impl Drain {
    async fn run(mut self) {
        let cut_short = loop {
            if self.bytes > self.settings.max_bytes {
                break Some(format!(
                    "stopped reading after proxy.cancelled_drain_max ({} bytes)",
                    self.settings.max_bytes
                ));
            }
            tokio::select! {
                frame = self.inner.frame() => match frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            self.bytes += data.len() as u64;
                            if self.inspect {
                                self.capture.push(data, self.cap);
                            }
                        }
                    }
                    None => break None,
                    Some(Err(e)) => break Some(format!("upstream body then failed: {}", error_chain(&e))),
                },
                _ = tokio::time::sleep_until(self.deadline) => {
                    break Some("upstream body did not finish within upstream.timeout".into())
                }
                _ = self.settings.hard_stop.cancelled() => break Some("drain cut short by shutdown".into()),
            }
        };
        self.record(cut_short);
    }

    /// Records the call; `cut_short` says why the rest of the body was not read, if it wasn't.
    fn record(mut self, cut_short: Option<String>) {
        let error = match cut_short {
            None => "caller disconnected before the end of the response".to_owned(),
            Some(why) => {
                self.capture.mark_truncated();
                format!("caller disconnected before the end of the response; {why}")
            }
        };
        self.call.finish(Finish {
            outcome: Outcome::ClientCancelled,
            body: self.capture,
            response_bytes: self.bytes,
            error: Some(error),
        });
    }
}

pub use crate::upstream::error_chain;
