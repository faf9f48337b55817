//! getopt(3) as FreeBSD's libc implements it, which is what bhyve(8) uses.
//!
//! Hand-written because the behaviour users rely on is libc's, not that of a
//! Rust argument crate: flags bundle (`-AHPw`), an option's argument may be
//! attached (`-s0,hostbridge`) or the next word (even one starting with `-`),
//! parsing stops at the first non-option word or after `--` (no GNU-style
//! permutation), and an unknown flag or a missing argument is reported as
//! `bhyve: illegal option -- z` / `bhyve: option requires an argument -- c`.

/// One result of walking argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    /// A flag without an argument.
    Flag(char),
    /// An option with its argument.
    WithArg(char, String),
    /// An unknown option or one missing its argument; the text is getopt's
    /// own diagnostic line.
    Error(String),
}

/// Walks `args` (argv without the program name) the way getopt(3) does.
pub struct Getopt<'a> {
    args: &'a [String],
    spec: &'a str,
    progname: &'a str,
    /// Index of the word being looked at.
    index: usize,
    /// Byte offset inside the current word of the next flag character
    /// (0 when a new word has to be started).
    offset: usize,
}

impl<'a> Getopt<'a> {
    /// `spec` is a getopt(3) option string such as `"ab:c"`.
    pub fn new(args: &'a [String], spec: &'a str, progname: &'a str) -> Self {
        Self {
            args,
            spec,
            progname,
            index: 0,
            offset: 0,
        }
    }

    /// The words left once option parsing has stopped (the operands).
    pub fn operands(&self) -> &'a [String] {
        let start = if self.offset > 0 {
            self.index + 1
        } else {
            self.index
        };
        self.args.get(start..).unwrap_or(&[])
    }

    /// What `c` is in the spec: `None` if unknown, `Some(true)` if it takes
    /// an argument.
    fn lookup(&self, c: char) -> Option<bool> {
        if c == ':' {
            return None;
        }
        let pos = self.spec.find(c)?;
        Some(self.spec[pos + c.len_utf8()..].starts_with(':'))
    }
}

impl Iterator for Getopt<'_> {
    type Item = Opt;

    fn next(&mut self) -> Option<Opt> {
        if self.offset == 0 {
            let word = self.args.get(self.index)?;
            if word == "--" {
                self.index += 1;
                return None;
            }
            if !word.starts_with('-') || word.len() == 1 {
                return None;
            }
            self.offset = 1;
        }
        let word = &self.args[self.index];
        let c = word[self.offset..].chars().next()?;
        self.offset += c.len_utf8();
        let at_end = self.offset >= word.len();
        match self.lookup(c) {
            None => {
                if at_end {
                    self.index += 1;
                    self.offset = 0;
                }
                Some(Opt::Error(format!(
                    "{}: illegal option -- {c}",
                    self.progname
                )))
            }
            Some(false) => {
                if at_end {
                    self.index += 1;
                    self.offset = 0;
                }
                Some(Opt::Flag(c))
            }
            Some(true) => {
                let attached = (!at_end).then(|| word[self.offset..].to_string());
                self.index += 1;
                self.offset = 0;
                if let Some(arg) = attached {
                    return Some(Opt::WithArg(c, arg));
                }
                match self.args.get(self.index) {
                    Some(arg) => {
                        self.index += 1;
                        Some(Opt::WithArg(c, arg.clone()))
                    }
                    None => Some(Opt::Error(format!(
                        "{}: option requires an argument -- {c}",
                        self.progname
                    ))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(words: &[&str]) -> (Vec<Opt>, Vec<String>) {
        let args: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        let mut g = Getopt::new(&args, "aHPws:c:", "bhyve");
        let opts: Vec<Opt> = g.by_ref().collect();
        (opts, g.operands().to_vec())
    }

    #[test]
    fn bundles_and_attached_arguments() {
        let (opts, rest) = run(&["-AHPw"]);
        assert_eq!(opts[0], Opt::Error("bhyve: illegal option -- A".into()));
        assert_eq!(
            &opts[1..],
            &[Opt::Flag('H'), Opt::Flag('P'), Opt::Flag('w')]
        );
        assert!(rest.is_empty());
        let (opts, rest) = run(&["-Hs0,hostbridge", "-c", "-2", "vm"]);
        assert_eq!(
            opts,
            vec![
                Opt::Flag('H'),
                Opt::WithArg('s', "0,hostbridge".into()),
                Opt::WithArg('c', "-2".into())
            ]
        );
        assert_eq!(rest, vec!["vm"]);
    }

    #[test]
    fn stops_at_operands_and_double_dash() {
        let (opts, rest) = run(&["-H", "vm", "-w"]);
        assert_eq!(opts, vec![Opt::Flag('H')]);
        assert_eq!(rest, vec!["vm", "-w"]);
        let (opts, rest) = run(&["-H", "--", "-w"]);
        assert_eq!(opts, vec![Opt::Flag('H')]);
        assert_eq!(rest, vec!["-w"]);
        let (_, rest) = run(&["-", "x"]);
        assert_eq!(rest, vec!["-", "x"]);
    }

    #[test]
    fn missing_argument() {
        let (opts, _) = run(&["-H", "-s"]);
        assert_eq!(
            opts[1],
            Opt::Error("bhyve: option requires an argument -- s".into())
        );
    }
}
