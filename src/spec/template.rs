//! The template grammar of command lines, `--env` values and `--pidfile`:
//! `{fd}`, `{fd:NAME}`, `{generation}`, `{worker}`; `{{TOKEN}}` stands for a
//! literal `{TOKEN}`, and any other text in braces is left alone. What a
//! token stands for is `worker::handoff`'s business.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// One template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// `{fd}`
    OnlyFd,
    /// `{fd:NAME}`
    Fd(&'a [u8]),
    Generation,
    Worker,
}

impl<'a> Token<'a> {
    fn parse(inner: &'a [u8]) -> Option<Token<'a>> {
        match inner {
            b"fd" => Some(Token::OnlyFd),
            b"generation" => Some(Token::Generation),
            b"worker" => Some(Token::Worker),
            _ => inner.strip_prefix(b"fd:").map(Token::Fd),
        }
    }
}

/// True if `text` passes an fd by template (`{fd}` or `{fd:NAME}`).
pub fn has_fd_template(text: &OsStr) -> bool {
    let mut found = false;
    let _ = scan(text, |token| {
        found |= matches!(token, Token::OnlyFd | Token::Fd(_));
        Ok(String::new())
    });
    found
}

/// `text` with each template replaced by what `value` says.
pub fn scan(
    text: &OsStr,
    mut value: impl FnMut(Token<'_>) -> Result<String, String>,
) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'{' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let rest = &bytes[i..];
        // `{{TOKEN}}`: the token, literally.
        if let Some(inner) = rest.strip_prefix(b"{{") {
            if let Some(end) = find(inner, b"}}") {
                if Token::parse(&inner[..end]).is_some() {
                    out.push(b'{');
                    out.extend_from_slice(&inner[..end]);
                    out.push(b'}');
                    i += 2 + end + 2;
                    continue;
                }
            }
        }
        let Some(end) = find(&rest[1..], b"}") else {
            out.extend_from_slice(rest);
            break;
        };
        match Token::parse(&rest[1..1 + end]) {
            Some(token) => {
                out.extend_from_slice(value(token)?.as_bytes());
                i += end + 2;
            }
            None => {
                out.push(b'{');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
