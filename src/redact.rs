//! What may appear in records and logs: URLs without their secrets.
//!
//! A `callback_url` often carries a token (`?token=…`, `https://user:pass@…`).
//! The full URL lives only where delivery needs it (the webhook outbox, a
//! 0600 file); everything a person or another program reads — the record
//! logs, `webhooks.jsonl`, the log — gets the URL without query string,
//! fragment and user info. A leaf module: records and webhooks both use it.

use std::borrow::Cow;

/// The URL without query, fragment and user info.
pub fn url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        // Not a URL we can parse: keep the scheme and host part only.
        Err(_) => strip_by_hand(u),
    }
}

fn strip_by_hand(u: &str) -> String {
    let cut = u.find(['?', '#']).unwrap_or(u.len());
    let u = &u[..cut];
    match (u.find("://"), u.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &u[..s + 3], &u[at + 1..]),
        _ => u.to_string(),
    }
}

/// `text` with every `http://` or `https://` URL in it redacted, for text we
/// cannot parse (the `raw` of a line that is not valid JSON). A URL ends at
/// white space, a quote, `<`, `>` or a backslash.
pub fn urls_in(text: &str) -> Cow<'_, str> {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("http://") && !lower.contains("https://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &lower[i..];
        let at = [rest.find("http://"), rest.find("https://")]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = at else {
            out.push_str(&text[i..]);
            break;
        };
        out.push_str(&text[i..i + at]);
        let start = i + at;
        let len = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '\\'))
            .unwrap_or(text.len() - start);
        out.push_str(&strip_by_hand(&text[start..start + len]));
        i = start + len;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            url("https://u:p@h.example/cb?token=abc#x"),
            "https://h.example/cb"
        );
        assert_eq!(
            url("http://h.example:8080/a/b"),
            "http://h.example:8080/a/b"
        );
        assert_eq!(url("not a url?token=abc"), "not a url");
    }

    #[test]
    fn urls_in_text_are_redacted() {
        let raw = r#"{"callback_url":"https://u:pw@h/cb?token=SECRET","input_txt":"x"} see HTTP://h/?k=SECRET2 end"#;
        let out = urls_in(raw);
        assert!(!out.contains("SECRET") && !out.contains("pw"), "{out}");
        assert!(out.contains(r#""callback_url":"https://h/cb""#), "{out}");
        assert!(out.ends_with("HTTP://h/ end"), "{out}");
        assert!(matches!(urls_in("no urls"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn no_query_survives(host in "[a-z]{1,10}", secret in "[A-Za-z0-9]{8,20}", pre in "\\PC{0,20}") {
            let text = format!("{pre} https://{host}/p?token={secret} ");
            let out = urls_in(&text);
            let leaked = out.contains(&format!("token={secret}"));
            prop_assert!(!leaked);
        }
    }
}
