//! The asynchronous form of a merge, modelled on `CIM_ConcreteJob` (§6.1): a job runs on a
//! worker thread and exposes its state, percent complete, error code and description, and a
//! cancel request that takes effect between two units.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::{MergeOptions, MergeReport, ProgressFn, execute};
use crate::error::{Error, Result, ReturnCode};

/// `CIM_ConcreteJob.JobState` values a merge job goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum JobState {
    /// Created, not started yet (2).
    New = 2,
    /// Opening the chain, checking, planning (3).
    Starting = 3,
    /// Copying data (4).
    Running = 4,
    /// Finished without error (7).
    Completed = 7,
    /// Stopped by [`Job::cancel`] (8); re-running the merge finishes it.
    Terminated = 8,
    /// Stopped by an error (10); see [`Job::error_code`] and [`Job::error_description`].
    Exception = 10,
}

impl JobState {
    /// The numeric `JobState` value.
    pub fn value(self) -> u16 {
        self as u16
    }

    /// The name `CIM_ConcreteJob` gives the value.
    pub fn name(self) -> &'static str {
        match self {
            JobState::New => "New",
            JobState::Starting => "Starting",
            JobState::Running => "Running",
            JobState::Completed => "Completed",
            JobState::Terminated => "Terminated",
            JobState::Exception => "Exception",
        }
    }

    /// True for the final states (Completed, Terminated, Exception).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Terminated | JobState::Exception
        )
    }

    fn from_value(v: u16) -> JobState {
        match v {
            2 => JobState::New,
            3 => JobState::Starting,
            4 => JobState::Running,
            7 => JobState::Completed,
            8 => JobState::Terminated,
            _ => JobState::Exception,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.value(), self.name())
    }
}

/// A snapshot of a merge's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The job state.
    pub state: JobState,
    /// Bytes of merged sectors written so far.
    pub bytes_done: u64,
    /// Bytes to write in all (known once planning is done; 0 before).
    pub bytes_total: u64,
    /// `bytes_done` as a percentage of `bytes_total`, 0 to 100, never decreasing.
    pub percent_complete: u16,
}

/// State shared between the thread running a merge and the handles watching it.
#[derive(Debug)]
pub(crate) struct Shared {
    state: AtomicU16,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    percent: AtomicU16,
    cancel: Arc<AtomicBool>,
    error: Mutex<Option<(ReturnCode, String)>>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            state: AtomicU16::new(JobState::New.value()),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            percent: AtomicU16::new(0),
            cancel: Arc::new(AtomicBool::new(false)),
            error: Mutex::new(None),
        }
    }

    fn snapshot(&self) -> Progress {
        Progress {
            state: JobState::from_value(self.state.load(Ordering::SeqCst)),
            bytes_done: self.bytes_done.load(Ordering::SeqCst),
            bytes_total: self.bytes_total.load(Ordering::SeqCst),
            percent_complete: self.percent.load(Ordering::SeqCst),
        }
    }
}

/// What the engine reports progress to: the job's shared state, the caller's callback, and the
/// cancel flags.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    callback: Option<ProgressFn>,
    external_cancel: Option<Arc<AtomicBool>>,
    /// Last progress step (in thousandths) the callback saw.
    last_step: AtomicU64,
}

impl Tracker {
    pub(crate) fn new(shared: Option<Arc<Shared>>, options: &MergeOptions) -> Tracker {
        Tracker {
            shared: shared.unwrap_or_else(|| Arc::new(Shared::new())),
            callback: options.progress.clone(),
            external_cancel: options.cancel.clone(),
            last_step: AtomicU64::new(u64::MAX),
        }
    }

    fn notify(&self) {
        if let Some(cb) = &self.callback {
            cb(&self.shared.snapshot());
        }
    }

    pub(crate) fn set_state(&self, state: JobState) {
        let old = self.shared.state.swap(state.value(), Ordering::SeqCst);
        if old != state.value() {
            self.notify();
        }
    }

    pub(crate) fn set_total(&self, total: u64) {
        self.shared.bytes_total.store(total, Ordering::SeqCst);
    }

    /// Count `bytes` more as done; calls the callback when the thousandth changes.
    pub(crate) fn advance(&self, bytes: u64) {
        let s = &self.shared;
        let done = s.bytes_done.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let total = s.bytes_total.load(Ordering::SeqCst);
        let (percent, step) = if total == 0 {
            (0, 0)
        } else {
            let d = u128::from(done.min(total));
            (
                (d * 100 / u128::from(total)) as u16,
                (d * 1000 / u128::from(total)) as u64,
            )
        };
        s.percent.fetch_max(percent, Ordering::SeqCst);
        if self.last_step.swap(step, Ordering::SeqCst) != step {
            self.notify();
        }
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
            || self
                .external_cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// Record the outcome: Completed (100 %), Terminated or Exception with the error.
    pub(crate) fn finish<T>(&self, res: &Result<T>) {
        let state = match res {
            Ok(_) => {
                self.shared.percent.store(100, Ordering::SeqCst);
                JobState::Completed
            }
            Err(e) => {
                let mut slot = self
                    .shared
                    .error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                *slot = Some((e.return_code(), e.to_string()));
                if matches!(e, Error::Cancelled(_)) {
                    JobState::Terminated
                } else {
                    JobState::Exception
                }
            }
        };
        self.set_state(state);
    }
}

/// Starts merges as jobs (the asynchronous form of [`super::merge`]).
#[derive(Debug)]
pub struct MergeJob;

impl MergeJob {
    /// Start merging `source` into `destination` (an ancestor; the immediate parent when
    /// `None`) on a worker thread and return the job at once, in state New or later.
    ///
    /// Like `MergeVirtualHardDisk` answering 4096 (Job Started), this only fails when the job
    /// cannot be created (the thread cannot be spawned); every failure of the merge itself is
    /// reported by the job: state Exception, [`Job::error_code`], [`Job::error_description`],
    /// and the error from [`Job::wait`].
    pub fn start(
        source: impl AsRef<Path>,
        destination: Option<&Path>,
        options: MergeOptions,
    ) -> Result<Job> {
        let source = source.as_ref().to_path_buf();
        let destination = destination.map(Path::to_path_buf);
        let shared = Arc::new(Shared::new());
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("vhd-merge".into())
            .spawn(move || {
                let tracker = Tracker::new(Some(thread_shared), &options);
                let res = execute::run(&source, destination.as_deref(), &options, &tracker);
                tracker.finish(&res);
                res
            })
            .map_err(|e| Error::io("starting the merge thread", e))?;
        Ok(Job {
            shared,
            handle: Mutex::new(Some(handle)),
        })
    }
}

/// A merge running on a worker thread. `Send + Sync`: share it (for example in an `Arc`) to
/// watch or cancel it from several threads.
#[derive(Debug)]
pub struct Job {
    shared: Arc<Shared>,
    handle: Mutex<Option<JoinHandle<Result<MergeReport>>>>,
}

impl Job {
    /// The current state.
    pub fn state(&self) -> JobState {
        self.progress().state
    }

    /// State, bytes done and total, and percent complete, read together.
    pub fn progress(&self) -> Progress {
        self.shared.snapshot()
    }

    /// Percent complete (0 to 100, never decreasing), measured in bytes to copy.
    pub fn percent_complete(&self) -> u16 {
        self.progress().percent_complete
    }

    /// Bytes of merged sectors written so far.
    pub fn bytes_done(&self) -> u64 {
        self.progress().bytes_done
    }

    /// Bytes to write in all (0 until planning is done).
    pub fn bytes_total(&self) -> u64 {
        self.progress().bytes_total
    }

    /// The job's `ErrorCode`: [`ReturnCode::Completed`] (0) unless it ended in an error (or
    /// was cancelled: [`ReturnCode::Failed`]).
    pub fn error_code(&self) -> ReturnCode {
        self.error().map_or(ReturnCode::Completed, |e| e.0)
    }

    /// The job's `ErrorDescription`, when it ended in an error or was cancelled.
    pub fn error_description(&self) -> Option<String> {
        self.error().map(|e| e.1)
    }

    fn error(&self) -> Option<(ReturnCode, String)> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ask the merge to stop. It stops between two units, commits what it wrote, and ends in
    /// state Terminated with [`Error::Cancelled`]; running the same merge again finishes it.
    /// A job that already finished is not affected.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    /// True once the job reached a final state.
    pub fn is_finished(&self) -> bool {
        self.state().is_finished()
    }

    /// Wait for the job to end and return its report or its error. The result is handed out
    /// once: a later call returns [`Error::InvalidState`] (the state, error code and
    /// description stay readable).
    pub fn wait(&self) -> Result<MergeReport> {
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else {
            return Err(Error::InvalidState(
                "the result of this merge job was already taken by an earlier wait()".into(),
            ));
        };
        match handle.join() {
            Ok(res) => res,
            Err(_) => {
                let e = Error::InvalidState("the merge thread panicked".into());
                *self
                    .shared
                    .error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some((ReturnCode::Failed, e.to_string()));
                self.shared
                    .state
                    .store(JobState::Exception.value(), Ordering::SeqCst);
                Err(e)
            }
        }
    }
}
