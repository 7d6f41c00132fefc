//! SeaweedFS for tests (filled in by the storage work).
