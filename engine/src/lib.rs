//! # lowtide-engine
//!
//! The transfer engine shared by the Lowtide agent and server.
//!
//! - [`content`]: content ids (BLAKE3) and block tables that verify any block
//!   from any source.
//!



pub mod content;
