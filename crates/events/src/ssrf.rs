//! The SSRF guard: webhook URLs come from users, so every address a delivery connects to must
//! be publicly routable unless an operator allow-listed it (`webhooks.allow_cidrs`).
//!
//! The guard lives in `klingq-ssrf` (video downloads use it too) and is re-exported here. A
//! delivery checks its URL with [`check_url`] before sending (IP literals, scheme) and its
//! client resolves through [`GuardedResolver`]; the client follows no redirects and uses no
//! proxy, so nothing else picks a destination.

pub use klingq_ssrf::{
    AddressPolicy, GuardedResolver, Refused, check_parsed, check_url, find_refusal,
    non_public_reason,
};
