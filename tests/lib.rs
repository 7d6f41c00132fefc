//! End-to-end tests of klingq: real processes against real Redis, SeaweedFS and the simulator.
//! The tests are in `e2e/`; `bin/` holds helper processes they start.
