//! The HTTP layer: router, JSON errors, request metrics, operations
//! endpoints and the shared state.

pub mod error;
pub mod metrics;
pub mod ops;
pub mod router;
pub mod serve;
pub mod state;

pub use error::ApiError;
pub use router::router;
pub use state::{AppState, Shared};
