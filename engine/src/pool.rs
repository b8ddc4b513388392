//! A fixed set of reusable items shared by threads: take one, waiting while all are out, and give it back.
//! The backup bounds two things with it: the pack buffers (a pool of `Vec<u8>`, so packs filling, queued
//! and uploading never hold more than that many), and with pools of `()` (counting semaphores) the readers
//! working on file segments and the chunks on their way from the readers to the workers.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

/// How often a waiting [`Pool::take_unless`] asks whether to give up.
const STOP_POLL: Duration = Duration::from_millis(100);

/// A pool of items; every item is in the pool or with one taker.
pub(crate) struct Pool<T> {
    free: Receiver<T>,
    back: Sender<T>,
}

/// An item taken with [`Pool::lease`] or [`Pool::lease_unless`], given back when dropped, on any thread.
pub(crate) struct Lease<T: Send> {
    back: Sender<T>,
    item: Option<T>,
}

impl<T: Send> Pool<T> {
    /// A pool of `items`; there must be at least one, or every take would wait forever.
    pub(crate) fn new(items: impl IntoIterator<Item = T>) -> Self {
        let items: Vec<T> = items.into_iter().collect();
        assert!(!items.is_empty(), "a pool needs at least one item");
        let (back, free) = bounded(items.len());
        for item in items {
            back.send(item).expect("room for every item");
        }
        Pool { free, back }
    }

    /// Takes an item until the lease is dropped, waiting while all are out.
    pub(crate) fn lease(&self) -> Lease<T> {
        // The pool holds a sender itself, so the channel never disconnects.
        let item = self.free.recv().expect("the pool outlives its takers");
        self.leased(item)
    }

    /// [`Pool::lease`], or `None` once `stopped()` says none will come back (as [`Pool::take_unless`]).
    pub(crate) fn lease_unless(&self, stopped: impl Fn() -> bool) -> Option<Lease<T>> {
        self.take_unless(stopped).map(|item| self.leased(item))
    }

    fn leased(&self, item: T) -> Lease<T> {
        Lease {
            back: self.back.clone(),
            item: Some(item),
        }
    }

    /// Takes an item to keep until given back (through [`Pool::returner`]), waiting while all are out.
    /// `None` once `stopped()` says none will come back (asked every 100 ms while waiting).
    pub(crate) fn take_unless(&self, stopped: impl Fn() -> bool) -> Option<T> {
        loop {
            match self.free.recv_timeout(STOP_POLL) {
                Ok(item) => return Some(item),
                Err(_) if stopped() => return None,
                Err(_) => {}
            }
        }
    }

    /// Gives an item back from anywhere, later: for what outlives a borrow of the pool (the owner of a
    /// pack's bytes, which the uploads share).
    pub(crate) fn returner(&self) -> impl FnOnce(T) + Send + 'static
    where
        T: 'static,
    {
        let back = self.back.clone();
        move |item| {
            // Never blocks: the pool has room for every item it started with.
            let _ = back.try_send(item);
        }
    }

    /// How many items the pool was made with.
    pub(crate) fn size(&self) -> usize {
        self.back.capacity().expect("a pool's channel is bounded")
    }

    /// How many items are in the pool now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }
}

impl<T: Send> Drop for Lease<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            // Never blocks: the pool has room for every item it started with.
            let _ = self.back.try_send(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takers_wait_while_all_items_are_out_and_leases_give_theirs_back() {
        let pool = Pool::new([1u8, 2]);
        let (a, b) = (pool.lease(), pool.lease());
        assert_eq!(pool.free(), 0);
        assert!(
            pool.take_unless(|| true).is_none(),
            "a third taker waits, and gives up when told"
        );
        drop(a);
        assert_eq!(pool.free(), 1, "a dropped lease gives its item back");
        let back = pool.take_unless(|| false).expect("the item given back");
        assert_eq!(back, 1, "the first lease's item");
        pool.returner()(back);
        drop(b);
        assert_eq!(pool.free(), 2);
        assert_eq!(pool.size(), 2);
    }

    #[test]
    fn a_lease_taken_unless_stopped_goes_back_from_another_thread() {
        let pool = Pool::new([()]);
        let lease = pool.lease_unless(|| false).expect("the one item");
        assert!(pool.lease_unless(|| true).is_none(), "all out, and stopped");
        std::thread::spawn(move || drop(lease))
            .join()
            .expect("no panic");
        assert_eq!(pool.free(), 1, "dropped on another thread, given back");
    }

    #[test]
    fn a_waiting_taker_gets_the_item_another_thread_gives_back() {
        let pool = Pool::new([7u8]);
        let item = pool.take_unless(|| false).expect("the one item");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.take_unless(|| false));
            std::thread::sleep(Duration::from_millis(50));
            pool.returner()(item);
            assert_eq!(waiter.join().expect("no panic"), Some(7));
        });
    }
}
