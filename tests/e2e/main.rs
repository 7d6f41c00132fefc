//! End-to-end tests: real processes against real services.

mod callbacks;
mod failover;
mod pipeline;
mod queue_processes;
mod ssrf;
mod tenants;
