//! klingq-provider.
