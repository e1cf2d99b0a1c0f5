//! How the binaries (stagehand-nbd, stagehand-agent, coord) say why they stopped.

use std::error::Error;

/// An error and its causes on one line, `outer: cause: root`, for a daemon's or a
/// command's last words on stderr. Many errors already print their source in their
/// own message ("cannot open x: No such file or directory"); a cause whose text the
/// line already ends with is not repeated.
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {path}: {source}")]
    struct Open {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("configuration")]
    struct Outer(#[source] Open);

    #[test]
    fn causes_are_chained_once() {
        let root = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = root.to_string();
        let e = Outer(Open {
            path: "/x.img".into(),
            source: root,
        });
        assert_eq!(
            error_line(&e),
            format!("configuration: cannot open /x.img: {text}")
        );
    }

    #[test]
    fn a_cause_not_in_the_message_is_added() {
        #[derive(Debug, thiserror::Error)]
        #[error("bad export")]
        struct Bad(#[source] std::fmt::Error);
        assert_eq!(
            error_line(&Bad(std::fmt::Error)),
            format!("bad export: {}", std::fmt::Error)
        );
    }
}
