//! klingq-events integration tests: one binary, with Redis at 127.0.0.1:6379 (or
//! `KLINGQ_TEST_REDIS_URL`) and real HTTP receivers on loopback.

mod delivery;
mod schema;
mod support;
