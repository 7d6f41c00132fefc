//! The Lua scripts that change several keys at once. Each is the key functions generated
//! from [`crate::keys::SHAPES`], the shared prelude (`lua/prelude.lua`: the call's records,
//! state changes with batch counters, events) and a body, run as a function after which the
//! counters it changed are written.

use std::sync::LazyLock;

use redis::Script;

/// The source of a script whose body is `body`.
pub(crate) fn source(body: &str) -> String {
    format!(
        "local P = ARGV[1]\n{}{}\nlocal function main()\n{body}\nend\nlocal result = main()\nflush()\nreturn result\n",
        crate::keys::lua_functions(),
        include_str!("lua/prelude.lua"),
    )
}

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(&source(include_str!($file))));
    };
}

script!(ENQUEUE, "lua/enqueue.lua");
script!(BATCH_OPEN, "lua/batch_open.lua");
script!(BATCH_SEAL, "lua/batch_seal.lua");
script!(BATCH_RESUME, "lua/batch_resume.lua");
script!(START, "lua/start.lua");
script!(SETTLE, "lua/settle.lua");
script!(CHECKPOINT, "lua/checkpoint.lua");
script!(RENEW, "lua/renew.lua");
script!(PROMOTE, "lua/promote.lua");
script!(CANCEL, "lua/cancel.lua");
script!(REDRIVE, "lua/redrive.lua");
script!(RELEASE_MANY, "lua/release_many.lua");
script!(SLOT_ACQUIRE, "lua/slot_acquire.lua");
script!(SLOT_THROTTLE, "lua/slot_throttle.lua");
script!(SLOT_RELEASE, "lua/slot_release.lua");
script!(BUDGET_RESERVE, "lua/budget_reserve.lua");
script!(BUDGET_DAY, "lua/budget_day.lua");
script!(WEBHOOK_ATTEMPT, "lua/webhook_attempt.lua");
script!(RUN_BIND, "lua/run_bind.lua");
script!(RUN_CALLBACK, "lua/run_callback.lua");
script!(WAKE, "lua/wake.lua");
script!(GEN_TIME_RECORD, "lua/gen_time_record.lua");

/// Every script, for loading them all at connect time (avoids a NOSCRIPT round trip later).
pub(crate) fn all() -> [&'static Script; 22] {
    [
        &ENQUEUE,
        &BATCH_OPEN,
        &BATCH_SEAL,
        &BATCH_RESUME,
        &START,
        &SETTLE,
        &CHECKPOINT,
        &RENEW,
        &PROMOTE,
        &CANCEL,
        &REDRIVE,
        &RELEASE_MANY,
        &SLOT_ACQUIRE,
        &SLOT_THROTTLE,
        &SLOT_RELEASE,
        &BUDGET_RESERVE,
        &BUDGET_DAY,
        &WEBHOOK_ATTEMPT,
        &RUN_BIND,
        &RUN_CALLBACK,
        &WAKE,
        &GEN_TIME_RECORD,
    ]
}
