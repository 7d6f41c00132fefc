//! Integration tests: drive a real simulator over HTTP with reqwest on 127.0.0.1:0.

mod api;
mod billing;
mod callbacks;
mod common;
mod downloads;
mod faults;
mod sync;
mod validation;
