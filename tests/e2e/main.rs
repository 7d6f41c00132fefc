//! End-to-end tests: real processes against real services.

mod pipeline;
mod queue_processes;
mod ssrf;
