//! Request and response bodies.
//!
//! The response body of an executed request is *teed*: each frame goes to the
//! client as the service produces it, and a copy goes into the record. When
//! the stream ends (trailers included) the record is completed (or, when the
//! record policy reads the end and says "not done", the key released) before
//! the client sees the end, so a retry that follows the response always
//! finds it (or finds the key free).
//! If the client goes away first, the rest of the body is drained and recorded
//! in the background.

use std::{
    any::Any,
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{
    claim::{BoxFuture, Finish, HeldClaim},
    policy::RecordPolicy,
    record::RecordBuilder,
};

/// Bytes known in full, and trailers: a buffered request or a replayed
/// response.
#[derive(Debug, Default)]
struct Buffered {
    data: Option<Bytes>,
    /// Boxed: rare, and a `HeaderMap` would triple the size of every body.
    trailers: Option<Box<HeaderMap>>,
}

impl Buffered {
    fn new(data: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
        Buffered {
            data: Some(data).filter(|d| !d.is_empty()),
            trailers,
        }
    }

    fn next_frame(&mut self) -> Option<Frame<Bytes>> {
        if let Some(data) = self.data.take() {
            return Some(Frame::data(data));
        }
        self.trailers.take().map(|t| Frame::trailers(*t))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len = self.data.as_ref().map_or(0, |d| d.len() as u64);
        if self.trailers.is_some() {
            // Not exact, so HTTP/1 uses chunked encoding and can carry them.
            let mut hint = SizeHint::new();
            hint.set_lower(len);
            hint
        } else {
            SizeHint::with_exact(len)
        }
    }
}

fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

pin_project! {
    /// The request body the inner service receives: the original stream for
    /// requests the layer passes through, the buffered bytes (and trailers)
    /// for requests it fingerprinted.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Streaming { #[pin] body: B },
        Buffered {
            buffered: Buffered,
            // The layer's hold on buffered bytes, given back once the data
            // is handed over (or the body dropped).
            reserved: Option<crate::budget::Reservation>,
        },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn streaming(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { body },
        }
    }

    pub(crate) fn buffered(
        data: Bytes,
        trailers: Option<Box<HeaderMap>>,
        reserved: Option<crate::budget::Reservation>,
    ) -> Self {
        RequestBody {
            kind: RequestKind::Buffered {
                buffered: Buffered::new(data, trailers),
                reserved,
            },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
            RequestKind::Buffered { buffered, .. } => f
                .debug_tuple("RequestBody::Buffered")
                .field(&buffered.data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map(|f| f.map_data(into_bytes)))),
            RequestKindProj::Buffered { buffered, reserved } => {
                let frame = buffered.next_frame();
                if buffered.data.is_none() {
                    reserved.take();
                }
                Poll::Ready(frame.map(Ok))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { buffered, .. } => buffered.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { buffered, .. } => buffered.size_hint(),
        }
    }
}

pin_project! {
    /// The response body the layer returns: the service's own body (passed
    /// through, or teed into the record), or bytes the layer made (a replay
    /// or a rejection).
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Teed { tee: Tee<B> },
        Buffered { buffered: Buffered },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn teed(tee: Tee<B>) -> Self {
        ResponseBody {
            kind: ResponseKind::Teed { tee },
        }
    }

    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            kind: ResponseKind::Buffered {
                buffered: Buffered::new(data, trailers.map(Box::new)),
            },
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            ResponseKind::Inner { .. } => "ResponseBody::Inner",
            ResponseKind::Teed { .. } => "ResponseBody::Teed",
            ResponseKind::Buffered { .. } => "ResponseBody::Buffered",
        })
    }
}

impl<B: Body> Body for ResponseBody<B>
where
    B::Error: Send + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map(|f| f.map_data(into_bytes)))),
            ResponseKindProj::Teed { tee } => tee.poll_frame(cx),
            ResponseKindProj::Buffered { buffered } => Poll::Ready(buffered.next_frame().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            // Not over until the record is complete, even after the last
            // frame: the server must poll once more to let it finish.
            ResponseKind::Teed { tee } => tee.is_end_stream(),
            ResponseKind::Buffered { buffered } => buffered.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Teed { tee } => tee.size_hint(),
            ResponseKind::Buffered { buffered } => buffered.size_hint(),
        }
    }
}

/// The state of a response on its way into the record.
pub(crate) struct Recording {
    claim: Box<dyn HeldClaim>,
    builder: Option<RecordBuilder>,
    record: Option<Bytes>,
    completing: Option<BoxFuture<()>>,
    /// The policy that decides at the end of the body, with the response's
    /// status, when its head left the decision there.
    deferred: Option<(Arc<dyn RecordPolicy>, StatusCode)>,
    /// That decision was to release the claim rather than record.
    release: bool,
    /// The response's status, for the audit entry.
    status: StatusCode,
    /// The digest of the body so far, when the claim is audited; `None` once
    /// the body did not end.
    digest: Option<sha2::Sha256>,
    /// Cut short by the layer (past the maximum execution time, or after a
    /// panic), not ended by its body.
    settled: bool,
}

impl Recording {
    pub(crate) fn new(
        claim: Box<dyn HeldClaim>,
        builder: RecordBuilder,
        deferred: Option<(Arc<dyn RecordPolicy>, StatusCode)>,
        status: StatusCode,
    ) -> Self {
        let digest = claim.audited().then(<sha2::Sha256 as sha2::Digest>::new);
        Recording {
            claim,
            builder: Some(builder),
            record: None,
            completing: None,
            deferred,
            release: false,
            status,
            digest,
            settled: false,
        }
    }

    /// Makes a deferred decision, once, from the trailers the body ended
    /// with. A policy that panics is taken to record: the work ran.
    fn decide(&mut self, trailers: Option<&HeaderMap>) {
        let Some((policy, status)) = self.deferred.take() else {
            return;
        };
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            policy.should_record_at_end(status, trailers)
        }));
        self.release = match decided {
            Ok(record) => !record,
            Err(_) => {
                tracing::error!(
                    "the record policy panicked at the end of a response; recording it"
                );
                false
            }
        };
        if self.release {
            let grpc_status = trailers
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok());
            tracing::debug!(
                ?grpc_status,
                "the response's end says not done; releasing the key"
            );
        }
    }

    /// The body was cut short on purpose (its client gone and the body past
    /// the response limit): record status and headers, without asking the
    /// policy about an end it never saw.
    fn cut(&mut self) {
        self.deferred = None;
        self.release = false;
        self.digest = None;
    }

    fn push(&mut self, chunk: &[u8]) {
        if let Some(builder) = &mut self.builder {
            builder.push(chunk);
        }
        if let Some(digest) = &mut self.digest {
            sha2::Digest::update(digest, chunk);
        }
    }

    /// Whether the body is past the response limit and no longer kept.
    fn gave_up_body(&self) -> bool {
        self.builder.as_ref().is_some_and(|b| !b.is_retained())
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        self.decide(Some(trailers));
        if self.release {
            return;
        }
        if let Some(builder) = self.builder.take() {
            self.record = Some(builder.finish(Some(trailers)));
        }
    }

    /// The body failed midway: what the client got is unknown, so keep the
    /// status and headers only. A retry learns the outcome and nothing runs
    /// twice.
    fn body_failed(&mut self) {
        self.deferred = None;
        self.release = false;
        self.digest = None;
        if let Some(builder) = &mut self.builder {
            builder.give_up_body();
        }
        self.finish();
    }

    /// Starts completing the record (once).
    fn finish(&mut self) {
        if self.completing.is_some() {
            return;
        }
        self.decide(None);
        if self.release {
            // The policy read the end of the response and said "not done,
            // try again": free the key for the retry.
            self.builder = None;
            self.record = None;
            self.completing = Some(self.claim.release(Some(self.status.as_u16())));
            return;
        }
        let record = match (self.record.take(), self.builder.take()) {
            (Some(record), _) => record,
            (None, Some(builder)) => builder.finish(None),
            (None, None) => return,
        };
        let finish = Finish {
            settled: self.settled,
            status: self.status.as_u16(),
            response: self
                .digest
                .take()
                .map(|digest| sha2::Digest::finalize(digest).into()),
        };
        self.completing = Some(self.claim.complete(record, finish));
    }
}

pin_project! {
    /// The service's body and what is being recorded of it. Lives in one
    /// box, so that an unfinished tee can move into a background task.
    pub(crate) struct TeeState<B> {
        #[pin]
        body: Source<B>,
        recording: Option<Recording>,
        // The last frame, held back until the record is complete (or the
        // key released).
        held_back: Option<Frame<Bytes>>,
        // A frame read ahead of the response head (see `poll_prefetch`), to
        // go out first.
        first: Option<Frame<Bytes>>,
        // An error read ahead of the response head: the body's own error
        // type, boxed because this struct does not name it.
        failed: Option<Box<dyn Any + Send>>,
        // Set once the client has gone and the tee is being drained.
        detached: bool,
        // Set while the service's body, or the store's completion, is
        // polled: still set when the tee is dropped, that one panicked
        // (even if the panic was caught and the tee dropped later), and it
        // is never polled again.
        in_body: bool,
        in_store: bool,
    }
}

pin_project! {
    #[project = SourceProj]
    enum Source<B> {
        Streaming { #[pin] body: B },
        Ended,
    }
}

/// Moves an unfinished tee into a background task.
type Detach<B> = fn(Pin<Box<TeeState<B>>>);

/// The teed inner body.
pub(crate) struct Tee<B> {
    state: Option<Pin<Box<TeeState<B>>>>,
    /// Moves an unfinished tee into a background task.
    detach: Detach<B>,
}

impl<B> Tee<B> {
    pub(crate) fn new(body: B, recording: Recording, detach: Detach<B>) -> Self {
        Tee {
            state: Some(Box::pin(TeeState {
                body: Source::Streaming { body },
                recording: Some(recording),
                held_back: None,
                first: None,
                failed: None,
                detached: false,
                in_body: false,
                in_store: false,
            })),
            detach,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.as_ref().is_none_or(|state| {
            state.recording.is_none()
                && state.held_back.is_none()
                && state.first.is_none()
                && state.failed.is_none()
        })
    }

    /// The boxed state, for reading ahead before the response goes out.
    pub(crate) fn state(&mut self) -> Option<Pin<&mut TeeState<B>>> {
        self.state.as_mut().map(|state| state.as_mut())
    }
}

fn data_len(frame: &Option<Frame<Bytes>>) -> Option<u64> {
    match frame {
        None => Some(0),
        Some(frame) => frame.data_ref().map(|d| d.len() as u64),
    }
}

impl<B: Body> Tee<B>
where
    B::Error: Send + 'static,
{
    fn size_hint(&self) -> SizeHint {
        let Some(state) = self.state.as_ref() else {
            return SizeHint::with_exact(0);
        };
        if state.failed.is_some() {
            // An error follows what was read: no length is exact.
            return SizeHint::default();
        }
        // Frames read ahead count too; trailers make the length unknown.
        let (Some(first), Some(last)) = (data_len(&state.first), data_len(&state.held_back)) else {
            return SizeHint::default();
        };
        let ahead = first + last;
        match &state.body {
            Source::Streaming { body } => {
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + ahead);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
            Source::Ended => SizeHint::with_exact(ahead),
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.state {
            Some(state) => state.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

/// What the service's body just gave.
enum Step<E> {
    Frame(Frame<Bytes>),
    /// The last frame (or the end): the record is completed before it goes
    /// out, so a retry that follows the response always finds the record.
    Last(Option<Frame<Bytes>>),
    Failed(E),
}

impl<B: Body> TeeState<B>
where
    B::Error: Send + 'static,
{
    /// Reads the service's body once (twice when the record policy waits for
    /// the trailers, so that a message and its trailers ready together are
    /// both read), before the response head goes out, without waiting on it.
    /// A body that is complete at once (most responses of known length, a
    /// unary gRPC response) is then recorded first, and head and body leave
    /// together; otherwise what was read goes out first and the rest streams
    /// as usual.
    pub(crate) fn poll_prefetch(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(recording) = this.recording.as_mut() else {
            return Poll::Ready(());
        };
        if recording.completing.is_none() {
            // One frame; two when the decision waits for the trailers, so
            // that a message and its trailers ready together (a unary gRPC
            // response) are both recorded before the head.
            let reads = if recording.deferred.is_some() { 2 } else { 1 };
            let mut ahead: Option<Bytes> = None;
            let mut ended = false;
            for _ in 0..reads {
                let SourceProj::Streaming { mut body } = this.body.as_mut().project() else {
                    return Poll::Ready(());
                };
                *this.in_body = true;
                let polled = body.as_mut().poll_frame(cx);
                *this.in_body = false;
                ended = true;
                match polled {
                    Poll::Pending => {
                        ended = false;
                        break;
                    }
                    Poll::Ready(None) => {
                        this.body.set(Source::Ended);
                        *this.held_back = ahead.take().map(Frame::data);
                        recording.finish();
                    }
                    Poll::Ready(Some(Err(err))) => {
                        this.body.set(Source::Ended);
                        recording.body_failed();
                        *this.failed = Some(Box::new(err));
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            let data = into_bytes(data);
                            recording.push(&data);
                            let data = match ahead.take() {
                                None => data,
                                // Two ready messages: one frame, joined.
                                Some(earlier) => {
                                    let mut joined =
                                        bytes::BytesMut::with_capacity(earlier.len() + data.len());
                                    joined.extend_from_slice(&earlier);
                                    joined.extend_from_slice(&data);
                                    joined.freeze()
                                }
                            };
                            if body.is_end_stream() {
                                this.body.set(Source::Ended);
                                *this.held_back = Some(Frame::data(data));
                                recording.finish();
                            } else {
                                ahead = Some(data);
                                ended = false;
                            }
                        }
                        Err(frame) => match frame.into_trailers() {
                            Ok(trailers) => {
                                recording.trailers(&trailers);
                                this.body.set(Source::Ended);
                                *this.held_back = Some(Frame::trailers(trailers));
                                recording.finish();
                            }
                            // A frame kind this crate does not know:
                            // nothing to forward or record.
                            Err(_) => ended = false,
                        },
                    },
                }
                if ended {
                    break;
                }
            }
            // What was read goes out first, the rest (if any) streams.
            *this.first = ahead.map(Frame::data);
            if !ended {
                recording.claim.keep_alive();
                return Poll::Ready(());
            }
        }
        if let Some(completing) = &mut recording.completing {
            *this.in_store = true;
            let completed = completing.as_mut().poll(cx);
            *this.in_store = false;
            ready!(completed);
            *this.recording = None;
        }
        Poll::Ready(())
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        // What was read ahead goes out first, in the order it was read.
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(failed) = this.failed.take() {
            // Boxed from this very type by `poll_prefetch`.
            if let Ok(err) = failed.downcast::<B::Error>() {
                return Poll::Ready(Some(Err(*err)));
            }
        }
        loop {
            let Some(recording) = this.recording.as_mut() else {
                return Poll::Ready(this.held_back.take().map(Ok));
            };
            if let Some(completing) = &mut recording.completing {
                *this.in_store = true;
                let completed = completing.as_mut().poll(cx);
                *this.in_store = false;
                ready!(completed);
                *this.recording = None;
                continue;
            }
            let SourceProj::Streaming { mut body } = this.body.as_mut().project() else {
                recording.finish();
                continue;
            };
            *this.in_body = true;
            let polled = body.as_mut().poll_frame(cx);
            *this.in_body = false;
            let step = match polled {
                Poll::Pending => {
                    recording.claim.keep_alive();
                    return Poll::Pending;
                }
                Poll::Ready(None) => Step::Last(None),
                Poll::Ready(Some(Err(err))) => Step::Failed(err),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let data = into_bytes(data);
                        recording.push(&data);
                        if body.is_end_stream() {
                            Step::Last(Some(Frame::data(data)))
                        } else if *this.detached && recording.gave_up_body() {
                            // Nobody reads it and it is not kept: stop here
                            // rather than drain a long or endless stream.
                            recording.cut();
                            Step::Last(None)
                        } else {
                            recording.claim.keep_alive();
                            Step::Frame(Frame::data(data))
                        }
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            recording.trailers(&trailers);
                            Step::Last(Some(Frame::trailers(trailers)))
                        }
                        // A frame kind this crate does not know: neither
                        // data nor trailers. Nothing to forward or record.
                        Err(_) => continue,
                    },
                },
            };
            match step {
                Step::Frame(frame) => return Poll::Ready(Some(Ok(frame))),
                Step::Last(frame) => {
                    this.body.set(Source::Ended);
                    *this.held_back = frame;
                    recording.finish();
                }
                Step::Failed(err) => {
                    this.body.set(Source::Ended);
                    recording.body_failed();
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

impl<B> TeeState<B> {
    /// Ends the recording early: after a panic in the body or the store
    /// (nothing here is polled again), or once a detached body runs past the
    /// maximum execution time. The body's status and headers become the
    /// record (the head went out; a retry learns the outcome, and nothing
    /// runs twice), and the completion is returned to be run; one already
    /// under way goes on. A panicked store completion is dropped, and the
    /// claim ends with its lease.
    fn settle_unfinished(self: Pin<&mut Self>) -> Option<BoxFuture<()>> {
        let this = self.project();
        let mut recording = this.recording.take()?;
        if *this.in_store {
            return None;
        }
        recording.settled = true;
        recording.body_failed();
        recording.completing.take()
    }

    fn panicked(&self) -> bool {
        self.in_body || self.in_store
    }
}

/// Drives a tee the client abandoned to its end, in the background, until
/// the request's maximum execution time (or a drain's deadline).
pub(crate) fn detach_tee<B>(mut state: Pin<Box<TeeState<B>>>)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send + 'static,
{
    let Some(recording) = state.recording.as_ref() else {
        return;
    };
    let (background, deadline) = (
        recording.claim.background().clone(),
        recording.claim.deadline(),
    );
    *state.as_mut().project().detached = true;
    let shared = background.clone();
    let work = async move {
        // Every frame is copied into the record inside `poll_frame`. A
        // panic is caught here, so that the tee settles as it would in the
        // client's connection, rather than dropping (and releasing) the
        // claim of work that was done.
        let drained = std::future::poll_fn(|cx| {
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                state.as_mut().poll_frame(cx)
            }));
            match polled {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(Some(_))) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Ok(Poll::Ready(None)) => Poll::Ready(true),
                Err(_) => Poll::Ready(false),
            }
        });
        let finished = tokio::select! {
            biased;
            finished = drained => finished,
            () = tokio::time::sleep_until(deadline) => false,
            () = shared.abandoned() => false,
        };
        if !finished && let Some(completing) = state.as_mut().settle_unfinished() {
            completing.await;
        }
    };
    if !background.spawn_detached(work) {
        tracing::warn!("response dropped outside a tokio runtime; its claim ends with its lease");
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        if state.recording.is_none() {
            return;
        }
        if state.panicked() || std::thread::panicking() {
            // The service's body (or the store) panicked: never poll it
            // again.
            if let (Some(completing), Ok(handle)) = (
                state.as_mut().settle_unfinished(),
                tokio::runtime::Handle::try_current(),
            ) {
                handle.spawn(completing);
            }
            return;
        }
        (self.detach)(state);
    }
}
