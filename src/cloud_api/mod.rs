//! The Cloud API edge: [`request`] builds the body (pure), [`client`] is the one place that does
//! HTTP, [`classify`] decides what an answer means (pure). Its stand-in for tests is
//! [`crate::sandbox`].

pub mod classify;
pub mod client;
pub mod request;

pub use classify::{ApiFailure, FailureClass};
pub use client::{CloudApi, SendOk};
