//! Placeholder templates (`engine.argv` elements, SPEC §4): `{input_text}`,
//! `{output}`, `{output_name}`, `{id}`, `{prompt_audio}`, `{prompt_text}`.
//!
//! A template is parsed once, when the config is read, into literal pieces
//! and placeholders, and rendered in one pass: a value is copied in and never
//! scanned again, so task text such as `say {output}` reaches the engine as
//! it was typed. A `{name}` that is not a known placeholder is an error at
//! parse time (a typo like `{text}` would otherwise make the engine speak the
//! literal word). Braces that do not enclose a name (`{"a": 1}`, `{`) are
//! literal text.
//!
//! A leaf module: the config validates with it and the engines render with
//! it, so it imports neither.

use std::fmt;

/// A value a template can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    InputText,
    Output,
    OutputName,
    Id,
    PromptAudio,
    PromptText,
}

impl Var {
    pub const ALL: [Var; 6] = [
        Var::InputText,
        Var::Output,
        Var::OutputName,
        Var::Id,
        Var::PromptAudio,
        Var::PromptText,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Var::InputText => "input_text",
            Var::Output => "output",
            Var::OutputName => "output_name",
            Var::Id => "id",
            Var::PromptAudio => "prompt_audio",
            Var::PromptText => "prompt_text",
        }
    }

    fn from_name(s: &str) -> Option<Var> {
        Var::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Free text from whoever wrote the task line, which may start with `-`.
    /// (`output_name` may not, `output` and `prompt_audio` are absolute paths.)
    pub fn is_task_text(self) -> bool {
        matches!(self, Var::InputText | Var::PromptText | Var::Id)
    }
}

/// The known placeholders, for messages: `{input_text}, {output}, …`.
pub fn known() -> String {
    Var::ALL
        .iter()
        .map(|v| format!("{{{}}}", v.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(Var),
}

/// One parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// A `{name}` that is not a placeholder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placeholder {{{name}}}; known: {known}", known = known())]
pub struct UnknownPlaceholder {
    pub name: String,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, UnknownPlaceholder> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            lit.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if name_len > 0 && after[name_len..].starts_with('}') {
                let name = &after[..name_len];
                let var = Var::from_name(name).ok_or_else(|| UnknownPlaceholder {
                    name: name.to_string(),
                })?;
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Var(var));
                rest = &after[name_len + 1..];
            } else {
                lit.push('{');
                rest = after;
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template { pieces })
    }

    /// Fills the placeholders in one pass.
    pub fn render<'a>(&self, value: impl Fn(Var) -> &'a str) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => out.push_str(value(*v)),
            }
        }
        out
    }

    pub fn uses(&self, var: Var) -> bool {
        self.pieces.contains(&Piece::Var(var))
    }

    /// True when the template holds any placeholder.
    pub fn has_vars(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Var(_)))
    }

    /// True when the rendered value can start with task text (so a value
    /// like `-f/etc/shadow` would be read as an option).
    pub fn starts_with_task_text(&self) -> bool {
        matches!(self.pieces.first(), Some(Piece::Var(v)) if v.is_task_text())
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => f.write_str(s)?,
                Piece::Var(v) => write!(f, "{{{}}}", v.name())?,
            }
        }
        Ok(())
    }
}

/// Where an argv lets task text be read as an option: the index of each
/// element that starts with task text and comes before any `--`.
pub fn option_injection_points(argv: &[Template]) -> Vec<usize> {
    let end = argv
        .iter()
        .position(|t| t.pieces == [Piece::Lit("--".into())])
        .unwrap_or(argv.len());
    (1..end)
        .filter(|&i| argv[i].starts_with_task_text())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(v: Var) -> &'static str {
        match v {
            Var::InputText => "say {output} and {id}",
            Var::Output => "/out/.x.tmp.wav",
            Var::OutputName => "x",
            Var::Id => "{input_text}",
            Var::PromptAudio => "/voices/a.wav",
            Var::PromptText => "{{}}",
        }
    }

    #[test]
    fn values_are_never_scanned_again() {
        let t = Template::parse("text={input_text} id={id} p={prompt_text}").unwrap();
        assert_eq!(
            t.render(values),
            "text=say {output} and {id} id={input_text} p={{}}"
        );
    }

    #[test]
    fn unknown_placeholders_are_named() {
        let e = Template::parse("--text={text}").unwrap_err();
        assert_eq!(e.name, "text");
        let m = e.to_string();
        assert!(
            m.contains("{text}") && m.contains("{input_text}") && m.contains("{prompt_audio}"),
            "{m}"
        );
        assert!(Template::parse("{Output}").is_err(), "names are exact");
    }

    #[test]
    fn other_braces_are_literal() {
        for s in ["{", "}", "{}", "{\"a\": 1}", "a{b c}", "{{output}", "x{-}"] {
            let t = Template::parse(s).unwrap();
            assert_eq!(t.render(values), s.replace("{output}", "/out/.x.tmp.wav"));
        }
        let t = Template::parse("{{output}}").unwrap();
        assert_eq!(t.render(values), "{/out/.x.tmp.wav}");
    }

    #[test]
    fn injection_points() {
        let argv = |a: &[&str]| -> Vec<Template> {
            a.iter().map(|s| Template::parse(s).unwrap()).collect()
        };
        let bad = argv(&["espeak-ng", "-w", "{output}", "{input_text}"]);
        assert_eq!(option_injection_points(&bad), vec![3]);
        let good = argv(&["espeak-ng", "-w", "{output}", "--", "{input_text}"]);
        assert!(option_injection_points(&good).is_empty());
        let glued = argv(&["tts", "--text={input_text}", "{output}"]);
        assert!(option_injection_points(&glued).is_empty());
        let id = argv(&["tts", "{id}", "{output}"]);
        assert_eq!(option_injection_points(&id), vec![1]);
    }

    proptest! {
        #[test]
        fn display_round_trips(s in "[a-z{}_ ]{0,30}") {
            if let Ok(t) = Template::parse(&s) {
                prop_assert_eq!(Template::parse(&t.to_string()).unwrap(), t.clone());
                prop_assert_eq!(t.to_string(), s);
            }
        }
    }
}
