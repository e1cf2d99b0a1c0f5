//! coord: the Stagehand coordinator. Empty until its issue (see README.md).
