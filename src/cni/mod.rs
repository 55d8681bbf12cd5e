//! The CNI protocol: environment, config, versions, result passthrough, errors.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;
