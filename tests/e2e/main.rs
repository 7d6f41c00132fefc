//! End-to-end tests: real processes against real services.

mod queue_processes;
