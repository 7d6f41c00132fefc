//! Test-only helpers shared by every crate's integration tests: real services on free loopback
//! ports (a private `redis-server`, SeaweedFS) and polling a condition with a deadline.

pub mod seaweed;
