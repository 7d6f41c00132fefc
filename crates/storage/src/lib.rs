//! klingq-storage.
