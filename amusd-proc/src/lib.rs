//! The operating-system side of amusd's processes: binding a process to its device, and the
//! worker processes' main loop around the algorithm of `amusd-spec` (attaching to the region,
//! loading the model with a heartbeat, following the coordinator's life, reporting errors).

pub mod bind;
pub mod worker;

pub use amusd_spec::lookup::NgramRange;
/// The fingerprint of a verify model for a split prefill.
pub use amusd_spec::split::fingerprint as split_fingerprint;
pub use amusd_spec::worker::{
    DraftOptions, VerifyOptions, DEFAULT_MAX_LOOKAHEAD, DEFAULT_MAX_VERIFY_BATCH,
};
pub use worker::{
    constraints_for, worker_exit, worker_main, RoleOptions, WorkerConfig, WorkerFailure,
};
