//! The prepare queue (`prepareQueueLength`): at most that many of Ferry's CRs are Accepted or Prepared at
//! once, cluster-wide. The count comes from the watch caches ([`Caches`]), so a CR waiting for a place costs
//! no API request however many wait (with 500 DataUploads queued, listing every DU and DD per waiting CR
//! was hundreds of LISTs a second). The caches trail this replica's own writes by a moment, so the phases
//! it wrote count until the caches show them; and acceptances take one turn at a time, so concurrent
//! reconciles never overfill the queue.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_proto::velero::Phase;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::caches::Caches;
use crate::config::Config;
use crate::cr::MoverCr;
use crate::step::Step;

/// How soon a CR waiting for a place, or for the caches, is looked at again if no place frees before
/// (a freed place wakes the oldest waiting CR at once: [`crate::wake`]).
pub const REQUEUE: Duration = Duration::from_secs(10);
/// How long a phase this replica wrote overrides the caches' (after that, the caches are trusted).
const TRAIL: Duration = Duration::from_secs(30);

/// Phases this replica wrote, by uid, until the caches show them.
type Written = HashMap<String, (Phase, Instant)>;

/// The queue's turn and the phases this replica wrote that the caches may not show yet.
#[derive(Debug, Default)]
pub struct Admission {
    turn: tokio::sync::Mutex<()>,
    written: Mutex<Written>,
}

/// A place in the queue: the turn, held until the CR's move to Accepted is written (dropped after).
#[derive(Debug)]
pub struct Place<'a> {
    _turn: tokio::sync::MutexGuard<'a, ()>,
}

/// Whether a CR in `phase` holds a place.
pub fn holds_place(phase: Phase) -> bool {
    matches!(phase, Phase::Accepted | Phase::Prepared)
}

impl Admission {
    /// A place in the queue, or why not yet. Holds the queue's turn until the place is dropped.
    pub async fn place(&self, caches: Option<&Caches>, config: &Config) -> Step<Place<'_>> {
        let Some(caches) = caches.filter(|c| c.crs_filled()) else {
            return Step::wait("waiting for the controller's watch caches to fill", REQUEUE);
        };
        let turn = self.turn.lock().await;
        let held = {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            occupied(caches, config, &mut written, Instant::now())
        };
        if held >= config.prepare_queue_length {
            return Step::wait(
                format!(
                    "waiting for a prepare slot (prepareQueueLength {})",
                    config.prepare_queue_length
                ),
                REQUEUE,
            );
        }
        Step::Done(Place { _turn: turn })
    }

    /// This replica wrote `phase` on the CR with `uid`.
    pub fn wrote(&self, uid: &str, phase: Phase) {
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded without help from `place` (no CR may ask for a place for a long time).
        if written.len() >= 1024 {
            written.retain(|_, (_, at)| now.duration_since(*at) < TRAIL);
        }
        written.insert(uid.to_string(), (phase, now));
    }
}

/// Places held: Ferry's CRs Accepted or Prepared, each in the phase this replica last wrote if the caches
/// do not show it yet (for at most [`TRAIL`]), else in the caches' phase; CRs it wrote that the caches do
/// not hold at all count by the written phase. Entries the caches caught up with are dropped.
fn occupied(caches: &Caches, config: &Config, written: &mut Written, now: Instant) -> usize {
    let fresh = |(_, at): &(Phase, Instant)| now.duration_since(*at) < TRAIL;
    written.retain(|_, w| fresh(w));
    let mut seen = HashSet::new();
    let mut busy = 0;
    let mut count = |uid: Option<String>, cached: Phase| {
        let phase = match uid.as_ref().and_then(|u| written.get(u)) {
            Some((w, _)) if *w != cached => *w,
            _ => cached,
        };
        busy += usize::from(holds_place(phase));
        seen.extend(uid);
    };
    tally(&caches.uploads, config, &mut count);
    tally(&caches.downloads, config, &mut count);
    let unseen = written
        .iter()
        .filter(|(uid, (w, _))| !seen.contains(*uid) && holds_place(*w))
        .count();
    busy + unseen
}

/// Calls `f` with the uid and phase of each of Ferry's CRs in `store`.
fn tally<K: MoverCr>(store: &Store<K>, config: &Config, f: &mut impl FnMut(Option<String>, Phase)) {
    for cr in store.state() {
        if config.mover(cr.datamover()).is_some() {
            f(cr.uid(), cr.phase());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{caches, du};
    use serde_json::json;

    fn cr(uid: &str, phase: &str, mover: &str) -> ferry_proto::velero::DataUpload {
        du(json!({"phase": phase}), |v| {
            v["metadata"]["name"] = json!(uid);
            v["metadata"]["uid"] = json!(uid);
            v["spec"]["datamover"] = json!(mover);
        })
    }

    /// Accepted and Prepared CRs of Ferry's movers hold places; other phases and other movers do not.
    #[test]
    fn the_caches_busy_crs_hold_places() {
        let c = caches(vec![
            cr("a", "Accepted", "ferry"),
            cr("b", "Prepared", "ferry"),
            cr("c", "InProgress", "ferry"),
            cr("d", "New", "ferry"),
            cr("e", "Accepted", "velero"),
        ]);
        let mut written = Written::new();
        assert_eq!(
            occupied(&c, &Config::default(), &mut written, Instant::now()),
            2
        );
    }

    /// Phases this replica wrote count while the caches trail them: an acceptance the cache still shows
    /// New holds a place, a CR it moved on (InProgress) no longer does, one the cache does not hold yet
    /// counts by what was written; after a while the caches are trusted again.
    #[test]
    fn phases_written_here_count_until_the_caches_show_them() {
        let config = Config::default();
        let now = Instant::now();
        let mut written = Written::from([
            ("new".to_string(), (Phase::Accepted, now)),
            ("moved-on".to_string(), (Phase::InProgress, now)),
            ("not-cached".to_string(), (Phase::Accepted, now)),
            ("caught-up".to_string(), (Phase::Prepared, now)),
        ]);
        let trailing = caches(vec![
            cr("new", "New", "ferry"),
            cr("moved-on", "Prepared", "ferry"),
            cr("caught-up", "Prepared", "ferry"),
        ]);
        // new (written), not-cached (written), caught-up (both); moved-on frees its place at once.
        assert_eq!(occupied(&trailing, &config, &mut written, now), 3);
        let later = now + TRAIL;
        // Only the caches now: moved-on (Prepared) and caught-up.
        assert_eq!(occupied(&trailing, &config, &mut written, later), 2);
        assert!(written.is_empty());
    }

    /// A full queue waits with the reason in status; a free one hands out a place; caches not yet filled
    /// (or none: this replica does not lead) are waited for, never counted as empty.
    #[tokio::test]
    async fn a_place_is_given_only_below_the_queue_length_and_on_filled_caches() {
        let config = Config {
            prepare_queue_length: 2,
            ..Config::default()
        };
        let admission = Admission::default();
        let full = caches(vec![
            cr("a", "Accepted", "ferry"),
            cr("b", "Prepared", "ferry"),
        ]);
        assert_eq!(
            admission
                .place(Some(&full), &config)
                .await
                .done::<()>()
                .err(),
            Some(Step::wait(
                "waiting for a prepare slot (prepareQueueLength 2)",
                REQUEUE
            ))
        );
        let one = caches(vec![cr("a", "Accepted", "ferry"), cr("b", "New", "ferry")]);
        let place = admission.place(Some(&one), &config).await;
        assert!(matches!(place, Step::Done(_)), "{place:?}");
        drop(place);
        admission.wrote("b", Phase::Accepted);
        // b is New in the cache but was accepted here: the queue is full now.
        assert!(matches!(
            admission.place(Some(&one), &config).await,
            Step::Wait { .. }
        ));
        assert!(matches!(
            admission.place(None, &config).await,
            Step::Wait { reason, .. } if reason.contains("watch caches")
        ));
        let (unfilled, _writer) = kube::runtime::reflector::store();
        let c = Caches {
            uploads: unfilled,
            ..caches(vec![])
        };
        assert!(matches!(
            Admission::default().place(Some(&c), &config).await,
            Step::Wait { reason, .. } if reason.contains("watch caches")
        ));
    }
}
