//! The outcome of one reconcile step, typed: done (with what it produced), waiting (why, and when to look
//! again), or failed for good (why). Steps never say "waiting" in a string or an error.

use std::time::Duration;

/// What a step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Step<T = ()> {
    /// Done; go on with `T`.
    Done(T),
    /// Not yet: `reason` (for `status.message` where the phase shows it) and when to look again.
    Wait {
        /// Why, for people.
        reason: String,
        /// When to reconcile again.
        requeue: Duration,
    },
    /// Cannot work: the CR ends `Failed` with this message.
    Fail(String),
}

impl<T> Step<T> {
    /// [`Step::Wait`].
    pub fn wait(reason: impl Into<String>, requeue: Duration) -> Self {
        Step::Wait {
            reason: reason.into(),
            requeue,
        }
    }

    /// [`Step::Fail`].
    pub fn fail(message: impl Into<String>) -> Self {
        Step::Fail(message.into())
    }

    /// The value of a [`Step::Done`]; any other outcome, carried over to a step of another type.
    pub fn done<U>(self) -> Result<T, Step<U>> {
        match self {
            Step::Done(v) => Ok(v),
            Step::Wait { reason, requeue } => Err(Step::Wait { reason, requeue }),
            Step::Fail(m) => Err(Step::Fail(m)),
        }
    }
}

/// The value of a done step, or returns `Ok` of the waiting or failed outcome from the enclosing function
/// (which returns `Result<Step<_>>`): `let pvc = proceed!(target_pvc(..).await?);`.
#[macro_export]
macro_rules! proceed {
    ($step:expr) => {
        match $step.done() {
            Ok(v) => v,
            Err(other) => return Ok(other),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_carry_over_to_other_step_types() {
        let w: Step<u8> = Step::wait("slot", Duration::from_secs(2));
        assert_eq!(
            w.done::<String>(),
            Err(Step::wait("slot", Duration::from_secs(2)))
        );
        assert_eq!(Step::<u8>::fail("no").done::<()>(), Err(Step::fail("no")));
        assert_eq!(Step::Done(7).done::<()>(), Ok(7));
    }
}
