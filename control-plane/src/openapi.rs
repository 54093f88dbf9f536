//! The OpenAPI 3.1 description of the REST API, served at `/api/v1/openapi.json`.
//!
//! It is a checked-in document rather than generated, so it reads as the contract; the
//! tests check that it parses and that it names exactly the routes the router serves.

/// The document.
pub const DOCUMENT: &str = include_str!("openapi.json");
