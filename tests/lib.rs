//! Workspace integration tests (see tests/*.rs).
