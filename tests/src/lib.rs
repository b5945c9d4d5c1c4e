//! Cross-crate integration tests live in `tests/tests/`; this crate has no library code.
