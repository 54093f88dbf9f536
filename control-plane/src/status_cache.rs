//! The public status as rendered last on this thread, answered again while it is current.
//!
//! A website's visitors ask the same queue's status many times a second, and rendering it
//! (routing figures, the day in the time zone, JSON) was a third of the route's time in
//! user space. An answer is current while it was rendered from the directory view and the
//! figures generation that are current now, and for [`STATUS_REUSE`] at most: so a change
//! shows in the next answer, and the parts that move with time alone (`longest_wait_ms`,
//! an agent whose wrap-up ends) are never older than that. Each connection thread keeps
//! its own, so answering from it takes no lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// How long a rendered status is answered again while nothing it was rendered from
/// changed: a tenth of the `max-age=1` the answer allows caches in front.
pub const STATUS_REUSE: Duration = Duration::from_millis(100);

/// Answers rendered from one source (a directory view) and one figures generation.
#[derive(Debug)]
pub struct Rendered<S> {
    /// A `Weak`, so that the source's address is not reused by another while this holds
    /// it: the address alone identifies it (and so the control plane it belongs to).
    source: Weak<S>,
    figures: u64,
    answers: HashMap<String, (Instant, Bytes)>,
}

impl<S> Default for Rendered<S> {
    fn default() -> Self {
        Self {
            source: Weak::new(),
            figures: 0,
            answers: HashMap::new(),
        }
    }
}

impl<S> Rendered<S> {
    /// `queue`'s answer, rendered from `source` and `figures` less than [`STATUS_REUSE`]
    /// before `now`, or else the one `render` gives (kept when it is one).
    pub fn answer<E>(
        &mut self,
        source: &Arc<S>,
        figures: u64,
        queue: &str,
        now: Instant,
        render: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        if !std::ptr::eq(self.source.as_ptr(), Arc::as_ptr(source)) || self.figures != figures {
            *self = Self {
                source: Arc::downgrade(source),
                figures,
                answers: HashMap::new(),
            };
        }
        if let Some((at, body)) = self.answers.get(queue)
            && now.saturating_duration_since(*at) < STATUS_REUSE
        {
            return Ok(body.clone());
        }
        let body = render()?;
        self.answers.insert(queue.to_owned(), (now, body.clone()));
        Ok(body)
    }
}

thread_local! {
    /// This thread's answers from the directory view.
    pub static RENDERED: RefCell<Rendered<crate::service::View>> = RefCell::new(Rendered::default());
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Asks `rendered` for `queue`, rendering `fresh` if it must; says which it got.
    fn ask(
        rendered: &mut Rendered<u8>,
        source: &Arc<u8>,
        figures: u64,
        queue: &str,
        now: Instant,
        fresh: &'static str,
    ) -> Bytes {
        rendered
            .answer(source, figures, queue, now, || {
                Ok::<_, Infallible>(Bytes::from_static(fresh.as_bytes()))
            })
            .expect("renders")
    }

    #[test]
    fn an_answer_is_reused_until_its_view_or_figures_change_or_it_is_100_ms_old() {
        let mut rendered = Rendered::default();
        let (view, next_view) = (Arc::new(1), Arc::new(2));
        let t0 = Instant::now();
        assert_eq!(ask(&mut rendered, &view, 7, "sales", t0, "a"), "a");
        let just_before = t0 + STATUS_REUSE - Duration::from_nanos(1);
        assert_eq!(ask(&mut rendered, &view, 7, "sales", just_before, "b"), "a");
        // Another queue has an answer of its own.
        assert_eq!(ask(&mut rendered, &view, 7, "support", t0, "s"), "s");
        // 100 ms old: rendered again, and that answer is the one reused next.
        let t1 = t0 + STATUS_REUSE;
        assert_eq!(ask(&mut rendered, &view, 7, "sales", t1, "c"), "c");
        assert_eq!(ask(&mut rendered, &view, 7, "sales", t1, "d"), "c");
        // The figures moved: rendered again, however young the answer.
        assert_eq!(ask(&mut rendered, &view, 8, "sales", t1, "e"), "e");
        // Another view (a new directory read, or another control plane): the same.
        assert_eq!(ask(&mut rendered, &next_view, 8, "sales", t1, "f"), "f");
        assert_eq!(ask(&mut rendered, &next_view, 8, "support", t1, "g"), "g");
        // A clock read that went backwards (another thread's `now`) reuses, as if 0 ms.
        assert_eq!(ask(&mut rendered, &next_view, 8, "sales", t0, "h"), "f");
    }

    #[test]
    fn a_failed_render_is_not_kept() {
        let mut rendered = Rendered::<u8>::default();
        let view = Arc::new(1);
        let now = Instant::now();
        let failed: Result<Bytes, &str> = rendered.answer(&view, 0, "nope", now, || Err("unknown"));
        assert_eq!(failed, Err("unknown"));
        let second: Result<Bytes, &str> =
            rendered.answer(&view, 0, "nope", now, || Ok(Bytes::from_static(b"x")));
        assert_eq!(second, Ok(Bytes::from_static(b"x")));
    }
}
