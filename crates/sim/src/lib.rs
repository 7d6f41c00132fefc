//! klingq-sim.
