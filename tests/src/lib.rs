//! Helpers shared by the workspace integration tests (process spawning, ports, peers).
