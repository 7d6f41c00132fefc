//! klingq-queue.
