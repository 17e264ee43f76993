//! The local sandbox: faithful stand-ins for the outside world, used by
//! `hermes demo`, the end-to-end tests and the benchmarks.

pub mod webhook_sender;
