//! Real-world edges for `hermes-pipeline`: the Postgres batch writer and
//! claim producer, SQS, the SP-API client, webhook signature schemes,
//! delivery providers and a local sandbox.
pub mod postgres;
pub mod sandbox;
pub mod webhook;
