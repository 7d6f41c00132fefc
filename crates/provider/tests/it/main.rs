//! Client tests against the real simulator (`klingq-sim`) over HTTP: one test per fault class,
//! asserting outcomes and the exact numbers of provider calls and ledger charges.

mod capture;
mod common;
mod create;
mod poll;
mod secrets;
mod sync;
