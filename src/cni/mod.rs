//! The CNI protocol: environment, config, versions, result passthrough, errors.

pub mod error;
