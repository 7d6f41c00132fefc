//! End-to-end tests: real processes against real services.

mod failover;
mod pipeline;
mod queue_processes;
mod ssrf;
