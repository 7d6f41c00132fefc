//! klingq core.
