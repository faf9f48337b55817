//! The menu and the `grub>` prompt on the console.
//!
//! A plain-text rendition of GRUB's menu (VT100 sequences only, since the
//! console is a serial line or pseudo-terminal): arrow keys or ^P/^N move,
//! Enter boots, `c` opens the prompt, `e` edits an entry's commands
//! (Ctrl-X boots the edited text), Esc leaves a submenu, and the
//! `timeout` variable counts down to the `default` entry (`0` boots at
//! once; unset or negative waits). A chosen entry that loads a kernel
//! boots; one that fails shows its errors, waits for a key and returns to
//! the menu with the countdown off, so a broken default cannot loop.

use crate::error::GrubError;
use crate::interp::{Ctl, Interp, MenuItem};
use crate::script::parse;
use std::rc::Rc;
use std::time::Duration;

/// How a session ended: with something to boot.
pub(crate) enum Outcome {
    Boot(Option<String>),
}

enum Choice {
    Entry(usize),
    Edit(usize),
    CommandLine,
    Back,
}

const ESC: u8 = 0x1b;
const MAX_LINE: usize = 4096;
const MAX_MENU_DEPTH: usize = 16;

fn console_err(e: std::io::Error) -> GrubError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        GrubError::ConsoleClosed
    } else {
        GrubError::Console(e)
    }
}

fn booted(item: &MenuItem) -> Outcome {
    Outcome::Boot(Some(item.title.clone()))
}

impl Interp<'_> {
    fn put(&mut self, s: &str) -> Result<(), GrubError> {
        self.console.write_bytes(s.as_bytes()).map_err(console_err)
    }

    fn key(&mut self, timeout: Option<Duration>) -> Result<Option<u8>, GrubError> {
        if let Some(k) = self.pending_key.take() {
            return Ok(Some(k));
        }
        match self.console.read_byte(timeout) {
            // Input gone (stdin is /dev/null under systemd or in a script):
            // no key will come, so a countdown runs out as on a silent
            // terminal; only an endless wait has to give up.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && timeout.is_some() => {
                std::thread::sleep(timeout.unwrap_or_default());
                Ok(None)
            }
            other => other.map_err(console_err),
        }
    }

    /// Index of the default entry among `items` for one level of `default`.
    fn default_index(&self, items: &[MenuItem], spec: &str) -> usize {
        let spec = if spec == "saved" {
            self.var("saved_entry")
        } else {
            spec.to_string()
        };
        let first = spec.split('>').next().unwrap_or("").trim().to_string();
        if let Ok(n) = first.parse::<usize>() {
            if n < items.len() {
                return n;
            }
            return 0;
        }
        items
            .iter()
            .position(|i| i.id.as_deref() == Some(first.as_str()) || i.title == first)
            .unwrap_or(0)
    }

    fn draw_menu(&mut self, items: &[MenuItem], selected: usize) -> Result<(), GrubError> {
        let mut s = String::from(
            "\x1b[H\x1b[2J\n                 GNU GRUB  version 2.06 (rhyve grub-bhyve)\n\n",
        );
        s.push_str(&format!(" +{}+\n", "-".repeat(76)));
        for (i, it) in items.iter().enumerate() {
            let mut title: String = it
                .title
                .chars()
                .filter(|c| !c.is_control())
                .take(72)
                .collect();
            if it.submenu {
                title.push('>');
            }
            let mark = if i == selected { '*' } else { ' ' };
            let (on, off) = if i == selected {
                ("\x1b[7m", "\x1b[0m")
            } else {
                ("", "")
            };
            s.push_str(&format!(" |{on}{mark}{title:<75}{off}|\n"));
        }
        s.push_str(&format!(" +{}+\n", "-".repeat(76)));
        s.push_str(
            "      Use the ^ and v keys to select which entry is highlighted.\n      \
             Press enter to boot the selected OS, `c' for a command-line.\n",
        );
        self.put(&s)
    }

    /// Show a menu until something is chosen.
    fn choose(
        &mut self,
        items: &[MenuItem],
        default: usize,
        mut timeout: Option<u64>,
        nested: bool,
    ) -> Result<Choice, GrubError> {
        let mut selected = default.min(items.len().saturating_sub(1));
        if timeout == Some(0) {
            return Ok(Choice::Entry(selected));
        }
        // timeout_style=hidden/countdown: wait without the menu; a key shows it.
        let style = self.var("timeout_style");
        if let (Some(secs), "hidden" | "countdown", false) = (timeout, style.as_str(), nested) {
            for left in (1..=secs).rev() {
                if style == "countdown" {
                    self.put(&format!(
                        "\r   Press any key for the menu; booting in {left}s. \x1b[K"
                    ))?;
                }
                if self.key(Some(Duration::from_secs(1)))?.is_some() {
                    self.vars.remove("timeout");
                    timeout = None;
                    break;
                }
            }
            if timeout.is_some() {
                return Ok(Choice::Entry(selected));
            }
        }
        self.draw_menu(items, selected)?;
        loop {
            let key = match timeout {
                Some(left) => {
                    self.put(&format!(
                        "\r   The highlighted entry will be executed automatically in {left}s. \x1b[K"
                    ))?;
                    match self.key(Some(Duration::from_secs(1)))? {
                        None => {
                            if left <= 1 {
                                self.put("\n")?;
                                return Ok(Choice::Entry(selected));
                            }
                            timeout = Some(left - 1);
                            continue;
                        }
                        Some(k) => {
                            // GRUB drops the timeout for good once a key is
                            // pressed, so submenus do not count down again.
                            self.vars.remove("timeout");
                            timeout = None;
                            self.put("\r\x1b[K")?;
                            k
                        }
                    }
                }
                None => match self.key(None)? {
                    Some(k) => k,
                    None => continue,
                },
            };
            let moved = match key {
                b'\r' | b'\n' => return Ok(Choice::Entry(selected)),
                b'c' => return Ok(Choice::CommandLine),
                b'e' if !items[selected].submenu => return Ok(Choice::Edit(selected)),
                0x10 => Some(selected.saturating_sub(1)),
                0x0e => Some((selected + 1).min(items.len() - 1)),
                ESC => match self.escape()? {
                    Some(b'A') => Some(selected.saturating_sub(1)),
                    Some(b'B') => Some((selected + 1).min(items.len() - 1)),
                    Some(b'H') | Some(b'5') => Some(0),
                    Some(b'F') | Some(b'6') => Some(items.len() - 1),
                    None if nested => return Ok(Choice::Back),
                    _ => None,
                },
                _ => None,
            };
            if let Some(m) = moved {
                if m != selected {
                    selected = m;
                    self.draw_menu(items, selected)?;
                }
            }
        }
    }

    /// After an ESC: the final byte of a cursor sequence, `None` for a
    /// lone ESC.
    fn escape(&mut self) -> Result<Option<u8>, GrubError> {
        let short = Some(Duration::from_millis(100));
        match self.key(short)? {
            Some(b'[') | Some(b'O') => {}
            Some(other) => {
                // A lone ESC followed at once by another key.
                self.pending_key = Some(other);
                return Ok(None);
            }
            None => return Ok(None),
        }
        let Some(k) = self.key(short)? else {
            return Ok(Some(0));
        };
        if k.is_ascii_digit() {
            // ESC [ 5 ~ and friends: eat the tilde.
            let _ = self.key(short)?;
        }
        Ok(Some(k))
    }

    fn timeout_value(&self) -> Option<u64> {
        let t = self.var("timeout");
        let t = t.trim();
        match t.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n as u64),
            _ => None,
        }
    }

    /// Run the menu in `self.menu` (and submenus) until something boots.
    /// `Ok(None)`: Esc left this (nested) menu.
    pub(crate) fn menu_loop(
        &mut self,
        depth: usize,
        default_path: &[String],
    ) -> Result<Option<Outcome>, GrubError> {
        if depth > MAX_MENU_DEPTH {
            return Err(GrubError::Command("submenus nested too deeply".to_string()));
        }
        let items = self.menu.clone();
        let mut use_timeout = true;
        loop {
            if items.is_empty() {
                return self.prompt(false, depth);
            }
            let spec = default_path.first().cloned().unwrap_or_else(|| {
                let d = self.var("default");
                if d == "saved" {
                    self.var("saved_entry")
                } else {
                    d
                }
            });
            let default = self.default_index(&items, &spec);
            let timeout = if use_timeout {
                self.timeout_value()
            } else {
                None
            };
            let choice = self.choose(&items, default, timeout, depth > 0)?;
            let idx = match choice {
                Choice::Back => return Ok(None),
                Choice::CommandLine => match self.prompt(true, depth)? {
                    Some(o) => return Ok(Some(o)),
                    None => {
                        use_timeout = false;
                        continue;
                    }
                },
                Choice::Entry(i) => i,
                Choice::Edit(i) => {
                    if let Some(edited) = self.edit(&items[i])? {
                        if let Some(o) = self.boot_entry(&edited, depth)? {
                            return Ok(Some(o));
                        }
                    }
                    use_timeout = false;
                    continue;
                }
            };
            let item = items[idx].clone();
            if item.submenu {
                let saved = std::mem::take(&mut self.menu);
                match self.exec_entry(&item) {
                    Err(Ctl::Fatal(e)) => return Err(e),
                    Err(Ctl::Boot) => return Ok(Some(booted(&item))),
                    _ => {}
                }
                // The submenu's own default comes from the rest of "a>b".
                let rest: Vec<String> = if default_path.is_empty() {
                    spec.split('>').skip(1).map(str::to_string).collect()
                } else {
                    default_path[1..].to_vec()
                };
                let rest = if idx == default { rest } else { Vec::new() };
                let r = self.menu_loop(depth + 1, &rest);
                self.menu = saved;
                match r? {
                    Some(o) => return Ok(Some(o)),
                    None => {
                        use_timeout = false;
                        continue;
                    }
                }
            }
            if let Some(o) = self.boot_entry(&item, depth)? {
                return Ok(Some(o));
            }
            use_timeout = false;
        }
    }

    /// Run a chosen entry; `None` when it did not boot (its errors shown).
    fn boot_entry(&mut self, item: &MenuItem, depth: usize) -> Result<Option<Outcome>, GrubError> {
        self.menu_replaced = false;
        self.loaded = None;
        self.put(&format!("  Booting `{}'\n\n", item.title))?;
        match self.exec_entry(item) {
            Err(Ctl::Fatal(e)) => Err(e),
            Err(Ctl::Boot) => Ok(Some(booted(item))),
            _ if self.loaded.is_some() => Ok(Some(booted(item))),
            _ if self.menu_replaced => self.menu_loop(depth + 1, &[]),
            _ => {
                self.put("\nPress any key to continue...")?;
                self.key(None)?;
                Ok(None)
            }
        }
    }

    fn draw_editor(
        &mut self,
        lines: &[Vec<char>],
        row: usize,
        col: usize,
    ) -> Result<(), GrubError> {
        let mut s = String::from(
            "\x1b[H\x1b[2J\n                 GNU GRUB  version 2.06 (rhyve grub-bhyve)\n\n",
        );
        s.push_str(&format!(" +{}+\n", "-".repeat(76)));
        for (r, line) in lines.iter().enumerate() {
            s.push_str(" |");
            for (c, ch) in line.iter().enumerate() {
                let ch = if ch.is_control() { ' ' } else { *ch };
                if r == row && c == col {
                    s.push_str(&format!("\x1b[7m{ch}\x1b[0m"));
                } else {
                    s.push(ch);
                }
            }
            if r == row && col >= line.len() {
                s.push_str("\x1b[7m \x1b[0m");
            }
            s.push('\n');
        }
        s.push_str(&format!(" +{}+\n", "-".repeat(76)));
        s.push_str(
            "      Minimum Emacs-like screen editing is supported. Press Ctrl-x\n      \
             to boot, Esc to discard edits and return to the GRUB menu.\n",
        );
        self.put(&s)
    }

    /// GRUB's entry editor (`e` in the menu): the entry's commands as
    /// text; Ctrl-X boots the edited text, Esc goes back unchanged.
    fn edit(&mut self, item: &MenuItem) -> Result<Option<MenuItem>, GrubError> {
        const MAX_EDIT_LINES: usize = 1000;
        let mut lines: Vec<Vec<char>> = item
            .source
            .lines()
            .take(MAX_EDIT_LINES)
            .map(|l| l.chars().take(MAX_LINE).collect())
            .collect();
        if lines.is_empty() {
            lines.push(Vec::new());
        }
        let (mut row, mut col) = (0usize, 0usize);
        loop {
            row = row.min(lines.len() - 1);
            col = col.min(lines[row].len());
            self.draw_editor(&lines, row, col)?;
            let Some(k) = self.key(None)? else { continue };
            match k {
                0x18 => {
                    let text: String = lines
                        .iter()
                        .map(|l| l.iter().collect::<String>())
                        .collect::<Vec<_>>()
                        .join("\n");
                    match parse(&text) {
                        Ok(stmts) => {
                            return Ok(Some(MenuItem {
                                body: Rc::new(stmts),
                                source: Rc::from(text.as_str()),
                                ..item.clone()
                            }))
                        }
                        Err(e) => {
                            self.put(&format!("\nerror: {e}.\nPress any key to continue..."))?;
                            self.key(None)?;
                        }
                    }
                }
                ESC => match self.escape()? {
                    None => return Ok(None),
                    Some(b'A') => row = row.saturating_sub(1),
                    Some(b'B') => row += 1,
                    Some(b'C') => col += 1,
                    Some(b'D') => col = col.saturating_sub(1),
                    Some(b'H') => col = 0,
                    Some(b'F') => col = usize::MAX,
                    _ => {}
                },
                0x10 => row = row.saturating_sub(1),
                0x0e => row += 1,
                0x02 => col = col.saturating_sub(1),
                0x06 => col += 1,
                0x01 => col = 0,
                0x05 => col = usize::MAX,
                0x0b => lines[row].truncate(col),
                b'\r' | b'\n' if lines.len() < MAX_EDIT_LINES => {
                    let rest = lines[row].split_off(col);
                    lines.insert(row + 1, rest);
                    row += 1;
                    col = 0;
                }
                0x7f | 0x08 => {
                    if col > 0 {
                        lines[row].remove(col - 1);
                        col -= 1;
                    } else if row > 0 {
                        let cur = lines.remove(row);
                        row -= 1;
                        col = lines[row].len();
                        lines[row].extend(cur);
                    }
                }
                0x20..=0x7e if lines[row].len() < MAX_LINE => {
                    lines[row].insert(col, k as char);
                    col += 1;
                }
                _ => {}
            }
        }
    }

    /// The `grub>` prompt. With `from_menu`, Esc returns `Ok(None)` to it.
    pub(crate) fn prompt(
        &mut self,
        from_menu: bool,
        depth: usize,
    ) -> Result<Option<Outcome>, GrubError> {
        self.put(
            "\n                 Minimal BASH-like line editing is supported.\n     \
             Type `help' for a list of commands.",
        )?;
        if from_menu {
            self.put(" ESC at any time exits.")?;
        }
        self.put("\n\n")?;
        loop {
            self.put("grub> ")?;
            let mut line: Vec<u8> = Vec::new();
            loop {
                let Some(k) = self.key(None)? else { continue };
                match k {
                    b'\r' | b'\n' => {
                        self.put("\n")?;
                        break;
                    }
                    0x7f | 0x08 if line.pop().is_some() => self.put("\x08 \x08")?,
                    ESC => {
                        let seq = self.escape()?;
                        if seq.is_none() && from_menu {
                            return Ok(None);
                        }
                    }
                    0x15 => {
                        for _ in 0..line.len() {
                            self.put("\x08 \x08")?;
                        }
                        line.clear();
                    }
                    k if k >= 0x20 && line.len() < MAX_LINE => {
                        line.push(k);
                        self.console.write_bytes(&[k]).map_err(console_err)?;
                    }
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            self.menu_replaced = false;
            let before = self.menu.len();
            match self.source_text(&text) {
                Err(Ctl::Boot) => return Ok(Some(Outcome::Boot(None))),
                Err(Ctl::Fatal(e)) => return Err(e),
                _ => {}
            }
            if self.menu_replaced && !self.menu.is_empty()
                || (!from_menu && before == 0 && !self.menu.is_empty())
            {
                if let Some(o) = self.menu_loop(depth + 1, &[])? {
                    return Ok(Some(o));
                }
            }
        }
    }
}
