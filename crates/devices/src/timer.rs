//! A stoppable thread that fires a device's timed events.
//!
//! bhyve drives its in-kernel RTC and HPET with callouts; here each such
//! device gets one thread that sleeps on a condition variable until the
//! device's earliest deadline, calls [`Timed::fire`] with the device lock
//! held, and re-reads the deadline. A guest reprogramming the device wakes the
//! thread through the same condition variable ([`TimerWaker`]). Dropping the
//! [`TimerThread`] stops and joins it, so VM teardown never leaves a thread
//! touching a dead device.

use crate::clock::Clock;
use rhyve_sandbox::ThreadRole;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A device with timed events.
pub trait Timed: Send + 'static {
    /// The clock time (ns) of the next event, if one is pending.
    fn next_deadline(&self) -> Option<u64>;
    /// Handle every event due at or before `now_ns` and schedule the next.
    fn fire(&mut self, now_ns: u64);
}

/// Wakes a device's timer thread after its registers changed.
#[derive(Clone, Default)]
pub struct TimerWaker(Arc<Condvar>);

impl std::fmt::Debug for TimerWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TimerWaker")
    }
}

impl TimerWaker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn wake(&self) {
        self.0.notify_all();
    }
}

/// The running thread; stops on drop.
pub struct TimerThread {
    stop: Arc<AtomicBool>,
    stopper: Box<dyn Fn() + Send + Sync>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TimerThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerThread").finish_non_exhaustive()
    }
}

/// Smallest sleep when a device keeps reporting a deadline in the past, so a
/// device bug can never turn into a busy loop.
const MIN_SLEEP: Duration = Duration::from_micros(50);

impl TimerThread {
    /// Start the thread for `device`; `waker` must be the one the device
    /// calls when its deadlines change.
    pub fn spawn<T: Timed>(
        name: &str,
        device: Arc<Mutex<T>>,
        waker: TimerWaker,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, cv, stop_flag) = (device.clone(), waker.0.clone(), stop.clone());
        let handle = rhyve_sandbox::spawn(ThreadRole::Timer, name, move || {
            run(dev, cv, stop_flag, clock)
        })?;
        let stopper = {
            let stop = stop.clone();
            move || {
                stop.store(true, Ordering::SeqCst);
                // Taking the lock orders this with the thread's check of
                // `stop`, so the notify cannot be lost.
                drop(device.lock().unwrap_or_else(|e| e.into_inner()));
                waker.wake();
            }
        };
        Ok(Self {
            stop,
            stopper: Box::new(stopper),
            handle: Some(handle),
        })
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        (self.stopper)();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        debug_assert!(self.stop.load(Ordering::SeqCst));
    }
}

fn run<T: Timed>(
    dev: Arc<Mutex<T>>,
    cv: Arc<Condvar>,
    stop: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
) {
    let mut guard = dev.lock().unwrap_or_else(|e| e.into_inner());
    let mut last_fire: Option<u64> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let now = clock.now_ns();
        guard = match guard.next_deadline() {
            Some(d) if d <= now && last_fire != Some(now) => {
                guard.fire(now);
                last_fire = Some(now);
                continue;
            }
            Some(d) => {
                let wait = Duration::from_nanos(d.saturating_sub(now)).max(MIN_SLEEP);
                cv.wait_timeout(guard, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => cv.wait(guard).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MonotonicClock;

    struct Ticker {
        clock: Arc<dyn Clock>,
        next: Option<u64>,
        period: u64,
        fired: u32,
    }

    impl Timed for Ticker {
        fn next_deadline(&self) -> Option<u64> {
            self.next
        }
        fn fire(&mut self, now: u64) {
            self.fired += 1;
            self.next = Some(now + self.period);
        }
    }

    #[test]
    fn fires_periodically_and_stops_on_drop() {
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let dev = Arc::new(Mutex::new(Ticker {
            clock: clock.clone(),
            next: None,
            period: 1_000_000,
            fired: 0,
        }));
        let waker = TimerWaker::new();
        let t = TimerThread::spawn("t", dev.clone(), waker.clone(), clock).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(dev.lock().unwrap().fired, 0, "idle without a deadline");
        {
            let mut d = dev.lock().unwrap();
            d.next = Some(d.clock.now_ns());
            waker.wake();
        }
        std::thread::sleep(Duration::from_millis(50));
        let fired = dev.lock().unwrap().fired;
        assert!(fired >= 5, "fired {fired}");
        assert!(t.is_running());
        drop(t);
        let after = dev.lock().unwrap().fired;
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(dev.lock().unwrap().fired, after);
    }
}
