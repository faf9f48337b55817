//! grub.cfg's language: GRUB's shell-like script, lexed and parsed into a
//! small tree that the interpreter walks.
//!
//! Words keep their quoting so expansion happens when a command runs, as
//! in GRUB: `$var`/`${var}` inside double quotes stays one argument, an
//! unquoted expansion is split on blanks. Keywords (`if`, `then`, `elif`,
//! `else`, `fi`, `for`, `while`, `until`, `do`, `done`, `function`,
//! `menuentry`, `submenu`) count only unquoted and in command position,
//! and `{`/`}` only as words of their own. Source text and nesting are
//! capped so a hostile grub.cfg cannot exhaust memory or the stack.

use crate::error::GrubError;
use std::rc::Rc;

/// Largest grub.cfg (or sourced file) we parse.
pub const MAX_SCRIPT_BYTES: usize = 4 << 20;
/// Deepest nesting of blocks.
const MAX_NESTING: usize = 64;

/// One piece of a word.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Literal text (quoted or not): never split.
    Lit(String),
    /// A variable reference; `quoted` when inside double quotes.
    Var { name: String, quoted: bool },
}

/// One shell word.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Word {
    pub parts: Vec<Part>,
    /// Whether any quoting or escaping was used (keywords must be bare).
    pub quoted: bool,
}

impl Word {
    /// The word's text when it is a bare literal (keyword candidates).
    pub fn bare(&self) -> Option<&str> {
        if self.quoted {
            return None;
        }
        match self.parts.as_slice() {
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }
}

/// A statement of the script.
#[derive(Debug, Clone)]
pub enum Stmt {
    Command(Vec<Word>),
    If {
        branches: Vec<(Vec<Stmt>, Vec<Stmt>)>,
        otherwise: Option<Vec<Stmt>>,
    },
    For {
        var: String,
        words: Vec<Word>,
        body: Vec<Stmt>,
    },
    While {
        until: bool,
        cond: Vec<Stmt>,
        body: Vec<Stmt>,
    },
    Function {
        name: String,
        body: Rc<Vec<Stmt>>,
    },
    Menu {
        submenu: bool,
        args: Vec<Word>,
        body: Rc<Vec<Stmt>>,
        /// The body's text, for the menu's `e` editor.
        source: Rc<str>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(Word),
    Sep,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Split source text into words and separators.
/// Where a token lies in the source: `[start, end)` in chars.
type Span = (usize, usize);

fn lex(src: &str) -> Result<(Vec<Tok>, Vec<Span>), GrubError> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    // Each token's [start, end) in chars, kept alongside `toks`.
    let mut spans: Vec<Span> = Vec::new();
    let mut i = 0;
    let n = chars.len();
    let syntax = |m: String| GrubError::Syntax(m);
    while i < n {
        let c = chars[i];
        if c == ' ' || c == '\t' || c == '\r' {
            i += 1;
            continue;
        }
        if c == '\\' && i + 1 < n && chars[i + 1] == '\n' {
            i += 2;
            continue;
        }
        if c == '\n' || c == ';' {
            toks.push(Tok::Sep);
            spans.push((i, i + 1));
            i += 1;
            continue;
        }
        if c == '#' {
            while i < n && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if (c == '{' || c == '}')
            && (i + 1 >= n || matches!(chars[i + 1], ' ' | '\t' | '\r' | '\n' | ';'))
        {
            toks.push(Tok::Word(Word {
                parts: vec![Part::Lit(c.to_string())],
                quoted: false,
            }));
            spans.push((i, i + 1));
            i += 1;
            continue;
        }
        // A word: runs until an unquoted blank or separator.
        let word_start = i;
        let mut w = Word::default();
        let mut lit = String::new();
        let flush = |lit: &mut String, w: &mut Word| {
            if !lit.is_empty() {
                w.parts.push(Part::Lit(std::mem::take(lit)));
            }
        };
        while i < n {
            let c = chars[i];
            match c {
                ' ' | '\t' | '\r' | '\n' | ';' => break,
                '\\' => {
                    w.quoted = true;
                    if i + 1 < n {
                        if chars[i + 1] != '\n' {
                            lit.push(chars[i + 1]);
                        }
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                '\'' => {
                    w.quoted = true;
                    let start = i + 1;
                    let end = (start..n)
                        .find(|&k| chars[k] == '\'')
                        .ok_or_else(|| syntax("unterminated single quote".into()))?;
                    lit.extend(&chars[start..end]);
                    i = end + 1;
                }
                '"' => {
                    w.quoted = true;
                    i += 1;
                    loop {
                        if i >= n {
                            return Err(syntax("unterminated double quote".into()));
                        }
                        let d = chars[i];
                        if d == '"' {
                            i += 1;
                            break;
                        }
                        if d == '\\' && i + 1 < n && matches!(chars[i + 1], '"' | '\\' | '$' | '\n')
                        {
                            if chars[i + 1] != '\n' {
                                lit.push(chars[i + 1]);
                            }
                            i += 2;
                            continue;
                        }
                        if d == '$' {
                            if let Some((name, next)) = var_ref(&chars, i) {
                                flush(&mut lit, &mut w);
                                w.parts.push(Part::Var { name, quoted: true });
                                i = next;
                                continue;
                            }
                        }
                        lit.push(d);
                        i += 1;
                    }
                }
                '$' => {
                    if let Some((name, next)) = var_ref(&chars, i) {
                        flush(&mut lit, &mut w);
                        w.parts.push(Part::Var {
                            name,
                            quoted: false,
                        });
                        i = next;
                    } else {
                        lit.push('$');
                        i += 1;
                    }
                }
                _ => {
                    lit.push(c);
                    i += 1;
                }
            }
        }
        flush(&mut lit, &mut w);
        if w.parts.is_empty() {
            // "" or '' : an empty argument.
            w.parts.push(Part::Lit(String::new()));
        }
        toks.push(Tok::Word(w));
        spans.push((word_start, i));
    }
    Ok((toks, spans))
}

/// `$name`, `${name}`, `$?`, `$#`, `$@`, `$*`, `$0`-`$9` at `chars[i]`.
fn var_ref(chars: &[char], i: usize) -> Option<(String, usize)> {
    let next = *chars.get(i + 1)?;
    if next == '{' {
        let end = (i + 2..chars.len()).find(|&k| chars[k] == '}')?;
        let name: String = chars[i + 2..end].iter().collect();
        if name.is_empty() {
            return None;
        }
        return Some((name, end + 1));
    }
    if matches!(next, '?' | '#' | '@' | '*') || next.is_ascii_digit() {
        return Some((next.to_string(), i + 2));
    }
    if is_name_char(next) {
        let end = (i + 1..chars.len())
            .find(|&k| !is_name_char(chars[k]))
            .unwrap_or(chars.len());
        return Some((chars[i + 1..end].iter().collect(), end));
    }
    None
}

struct Parser {
    toks: Vec<Tok>,
    spans: Vec<Span>,
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek_bare(&self) -> Option<&str> {
        match self.toks.get(self.pos) {
            Some(Tok::Word(w)) => w.bare(),
            _ => None,
        }
    }

    fn skip_seps(&mut self) {
        while matches!(self.toks.get(self.pos), Some(Tok::Sep)) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, kw: &str) -> Result<(), GrubError> {
        self.skip_seps();
        if self.peek_bare() == Some(kw) {
            self.pos += 1;
            Ok(())
        } else {
            Err(GrubError::Syntax(format!("`{kw}' expected")))
        }
    }

    /// Statements until one of `ends` in command position (left unread) or
    /// the end of input (an error when `ends` is not empty).
    fn list(&mut self, ends: &[&str]) -> Result<Vec<Stmt>, GrubError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(GrubError::Syntax("blocks nested too deeply".into()));
        }
        let mut out = Vec::new();
        loop {
            self.skip_seps();
            let Some(tok) = self.toks.get(self.pos) else {
                if ends.is_empty() {
                    break;
                }
                return Err(GrubError::Syntax(format!(
                    "unexpected end of file, `{}' expected",
                    ends[0]
                )));
            };
            if let Tok::Word(w) = tok {
                if let Some(b) = w.bare() {
                    if ends.contains(&b) {
                        break;
                    }
                }
            }
            out.push(self.statement(ends.contains(&"}"))?);
        }
        self.depth -= 1;
        Ok(out)
    }

    fn word(&mut self) -> Result<Word, GrubError> {
        match self.toks.get(self.pos) {
            Some(Tok::Word(w)) => {
                let w = w.clone();
                self.pos += 1;
                Ok(w)
            }
            _ => Err(GrubError::Syntax("a word expected".into())),
        }
    }

    fn block(&mut self) -> Result<Vec<Stmt>, GrubError> {
        self.expect("{")?;
        let body = self.list(&["}"])?;
        self.expect("}")?;
        Ok(body)
    }

    fn statement(&mut self, in_braces: bool) -> Result<Stmt, GrubError> {
        let kw = self.peek_bare().map(str::to_string);
        match kw.as_deref() {
            Some("if") => {
                self.pos += 1;
                let mut branches = Vec::new();
                let mut otherwise = None;
                loop {
                    let cond = self.list(&["then"])?;
                    self.expect("then")?;
                    let body = self.list(&["elif", "else", "fi"])?;
                    branches.push((cond, body));
                    match self.peek_bare() {
                        Some("elif") => self.pos += 1,
                        Some("else") => {
                            self.pos += 1;
                            otherwise = Some(self.list(&["fi"])?);
                            self.expect("fi")?;
                            break;
                        }
                        _ => {
                            self.expect("fi")?;
                            break;
                        }
                    }
                }
                Ok(Stmt::If {
                    branches,
                    otherwise,
                })
            }
            Some("for") => {
                self.pos += 1;
                let var = self
                    .word()?
                    .bare()
                    .map(str::to_string)
                    .ok_or_else(|| GrubError::Syntax("for: bad variable name".into()))?;
                self.expect("in")?;
                let mut words = Vec::new();
                while let Some(Tok::Word(w)) = self.toks.get(self.pos) {
                    words.push(w.clone());
                    self.pos += 1;
                }
                self.expect("do")?;
                let body = self.list(&["done"])?;
                self.expect("done")?;
                Ok(Stmt::For { var, words, body })
            }
            Some(k @ ("while" | "until")) => {
                let until = k == "until";
                self.pos += 1;
                let cond = self.list(&["do"])?;
                self.expect("do")?;
                let body = self.list(&["done"])?;
                self.expect("done")?;
                Ok(Stmt::While { until, cond, body })
            }
            Some("function") => {
                self.pos += 1;
                let name = self
                    .word()?
                    .bare()
                    .map(str::to_string)
                    .ok_or_else(|| GrubError::Syntax("function: bad name".into()))?;
                let body = self.block()?;
                Ok(Stmt::Function {
                    name,
                    body: Rc::new(body),
                })
            }
            Some(k @ ("menuentry" | "submenu")) => {
                let submenu = k == "submenu";
                self.pos += 1;
                let mut args = Vec::new();
                loop {
                    match self.toks.get(self.pos) {
                        Some(Tok::Word(w)) if w.bare() == Some("{") => break,
                        Some(Tok::Word(w)) => {
                            args.push(w.clone());
                            self.pos += 1;
                        }
                        Some(Tok::Sep) => self.pos += 1,
                        None => return Err(GrubError::Syntax(format!("{k}: `{{' expected"))),
                    }
                }
                self.skip_seps();
                let open = self.pos;
                let body = self.block()?;
                let close = self.pos - 1;
                let from = self.spans.get(open).map_or(0, |s| s.1);
                let to = self.spans.get(close).map_or(from, |s| s.0).max(from);
                let source: String = self.chars.get(from..to).unwrap_or(&[]).iter().collect();
                Ok(Stmt::Menu {
                    source: Rc::from(source.trim_matches('\n')),
                    submenu,
                    args,
                    body: Rc::new(body),
                })
            }
            _ => {
                let mut words = Vec::new();
                while let Some(Tok::Word(w)) = self.toks.get(self.pos) {
                    if in_braces && !words.is_empty() && w.bare() == Some("}") {
                        break;
                    }
                    words.push(w.clone());
                    self.pos += 1;
                }
                Ok(Stmt::Command(words))
            }
        }
    }
}

/// Parse a whole script.
pub fn parse(src: &str) -> Result<Vec<Stmt>, GrubError> {
    if src.len() > MAX_SCRIPT_BYTES {
        return Err(GrubError::Syntax(format!(
            "script larger than {MAX_SCRIPT_BYTES} bytes"
        )));
    }
    let (toks, spans) = lex(src)?;
    let mut p = Parser {
        toks,
        spans,
        chars: src.chars().collect(),
        pos: 0,
        depth: 0,
    };
    let stmts = p.list(&[])?;
    Ok(stmts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_vars() {
        let s = parse("echo 'a b' \"x $y z\" ${w}v \\$q # c\n").unwrap();
        let Stmt::Command(w) = &s[0] else { panic!() };
        assert_eq!(w.len(), 5);
        assert_eq!(w[1].parts, vec![Part::Lit("a b".into())]);
        assert_eq!(
            w[2].parts,
            vec![
                Part::Lit("x ".into()),
                Part::Var {
                    name: "y".into(),
                    quoted: true
                },
                Part::Lit(" z".into())
            ]
        );
        assert_eq!(
            w[3].parts,
            vec![
                Part::Var {
                    name: "w".into(),
                    quoted: false
                },
                Part::Lit("v".into())
            ]
        );
        assert_eq!(w[4].parts, vec![Part::Lit("$q".into())]);
    }

    #[test]
    fn blocks() {
        let s = parse(
            "if [ x$a = xy ]; then\n echo 1\nelif true; then echo 2; else echo 3\nfi\n\
             menuentry 'T' --class d {\n linux /v\n}\nfunction f { echo hi; }\n\
             submenu 'S' { menuentry 'in' { true } }",
        )
        .unwrap();
        assert_eq!(s.len(), 4);
        assert!(matches!(&s[0], Stmt::If { branches, otherwise: Some(_) } if branches.len() == 2));
        assert!(matches!(&s[3], Stmt::Menu { submenu: true, body, .. } if body.len() == 1));
        assert!(matches!(&s[1], Stmt::Menu { source, .. } if &**source == " linux /v"));
    }

    #[test]
    fn hostile_scripts_error() {
        assert!(parse("if true; then").is_err());
        assert!(parse("echo 'abc").is_err());
        assert!(parse("menuentry x { echo").is_err());
        assert!(parse(&"if true; then ".repeat(500)).is_err());
        assert!(parse("}").is_ok());
    }
}
