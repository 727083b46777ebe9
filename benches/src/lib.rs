//! Shared helpers for Lowtide benchmark harnesses.
