//! End-to-end test package.
