//! What the three Stagehand daemons (`stagehand-nbd`, `stagehand-agent`, `coord`)
//! share, so that each does not write it again:
//!
//! - [`secret`]: tokens that never reach a log or a `Debug` print;
//! - [`auth`]: bearer-token checking, secure by default (`--insecure-no-auth` to opt out);
//! - [`api_error`]: the `{"error": {"code", "message"}}` answer;
//! - [`tls`]: rustls configuration from `--tls-cert/--tls-key/--tls-ca`;
//! - [`http`]: serving an API over HTTP or HTTPS until shutdown;
//! - [`pki`]: a throwaway CA and node certificates for demos and tests;
//! - [`paths`]: confinement of request-supplied paths to configured roots;
//! - [`logging`]: the `tracing` set-up (colour only on a terminal);
//! - [`report`]: the one line a binary prints when it stops on an error.

pub mod api_error;
pub mod auth;
pub mod http;
pub mod logging;
pub mod paths;
pub mod pki;
pub mod report;
pub mod secret;
pub mod tls;
