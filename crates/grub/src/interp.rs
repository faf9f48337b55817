//! The grub.cfg interpreter: variables, conditions, functions, menu
//! entries, and the commands a Linux boot needs.
//!
//! GRUB's model is kept: a failing command prints `error: ...` and sets
//! `$?` while the script goes on; `menuentry`/`submenu` only record
//! entries; `linux`/`initrd` read the files at once (as GRUB loads them
//! into memory), and `boot` (or the end of a chosen entry with a kernel
//! loaded) ends with the selection. Steps and call depth are capped so a
//! hostile config (`function f { f; }`, `while true`) ends with an error.

use crate::console::Console;
use crate::devices::Devices;
use crate::envblk::EnvBlock;
use crate::error::GrubError;
use crate::fs::Filesystem;
use crate::script::{parse, Part, Stmt, Word};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// Most statements one session may run.
const MAX_STEPS: u64 = 1_000_000;
/// Deepest nesting of function calls, `source` and `configfile`.
const MAX_CALL_DEPTH: usize = 32;
/// Most bytes word expansion may produce in one session: a loop that
/// grows a variable (`set a=${a}a`) costs quadratic time in its length,
/// so the work, not only the statement count, needs a bound.
const MAX_EXPANDED_BYTES: u64 = 16 << 20;
/// Largest total of initrds.
const MAX_INITRD_TOTAL: u64 = 2 << 30;

/// One entry of a menu.
#[derive(Debug, Clone)]
pub struct MenuItem {
    pub title: String,
    pub id: Option<String>,
    pub submenu: bool,
    pub args: Vec<String>,
    pub body: Rc<Vec<Stmt>>,
    /// The body as written, for the `e` editor.
    pub source: Rc<str>,
}

/// What `linux` and `initrd` loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub kernel_path: String,
    pub kernel: Vec<u8>,
    /// `linux`'s arguments after the path, as written.
    pub args: Vec<String>,
    pub initrd_paths: Vec<String>,
    /// The initrds, each padded to 4 bytes, in order (GRUB's layout).
    pub initrd: Vec<u8>,
}

/// Why execution stopped early.
pub(crate) enum Ctl {
    Boot,
    Return(i32),
    Fatal(GrubError),
}

type Flow = Result<i32, Ctl>;

/// Interpreter state for one grub-bhyve session.
pub struct Interp<'a> {
    pub(crate) devices: &'a Devices,
    pub(crate) console: &'a mut dyn Console,
    pub(crate) vars: BTreeMap<String, String>,
    functions: HashMap<String, Rc<Vec<Stmt>>>,
    /// Entries recorded by the script run last (the current menu).
    pub menu: Vec<MenuItem>,
    /// Set by `configfile`: the menu was replaced by another file's.
    pub(crate) menu_replaced: bool,
    positional: Vec<String>,
    pub loaded: Option<Loaded>,
    steps: u64,
    /// Bytes word expansion has produced so far.
    expanded: u64,
    depth: usize,
    status: i32,
    /// A key read ahead while decoding an escape sequence.
    pub(crate) pending_key: Option<u8>,
}

const BUILTINS: &[(&str, &str)] = &[
    ("[", "EXPRESSION ]  Evaluate an expression."),
    (
        "blscfg",
        "Add menu entries from Boot Loader Specification snippets.",
    ),
    ("boot", "Boot the loaded kernel."),
    ("cat", "FILE  Show the contents of a file."),
    ("clear", "Clear the screen."),
    ("configfile", "FILE  Load another config file."),
    ("echo", "[-e|-n] STRING  Display a line of text."),
    ("export", "ENVVAR  Export a variable."),
    ("false", "Do nothing, unsuccessfully."),
    ("help", "[PATTERN ...]  Show a help message."),
    ("initrd", "FILE...  Load initrd."),
    ("initrd16", "FILE...  Load initrd (alias)."),
    ("initrdefi", "FILE...  Load initrd (alias)."),
    ("insmod", "MODULE  Insert a module."),
    ("linux", "FILE [ARGS...]  Load Linux."),
    ("linux16", "FILE [ARGS...]  Load Linux (alias)."),
    ("linuxefi", "FILE [ARGS...]  Load Linux (alias)."),
    (
        "load_env",
        "[-f FILE] [VAR...]  Load variables from the environment block.",
    ),
    ("ls", "[-l|-h|-a] [FILE ...]  List devices and files."),
    ("return", "[N]  Return from a function."),
    (
        "save_env",
        "[-f FILE] VAR...  Save variables to the environment block file.",
    ),
    (
        "search",
        "[-f|-l|-u] [--set[=VAR]] [--no-floppy] [--hint=DEV] NAME  Search devices.",
    ),
    ("set", "[NAME=VALUE ...]  Set an environment variable."),
    ("source", "FILE  Run a script in this context."),
    ("test", "EXPRESSION  Evaluate an expression."),
    ("true", "Do nothing, successfully."),
    ("unset", "NAME...  Remove an environment variable."),
];

/// Commands that only matter on graphical or firmware consoles: accepted
/// and ignored, successfully, so distribution configs run on through.
const IGNORED: &[&str] = &[
    "load_video",
    "terminal_input",
    "terminal_output",
    "terminal",
    "serial",
    "font",
    "gfxmode",
    "gfxterm",
    "background_image",
    "background_color",
    "set_background_color",
    "play",
    "rmmod",
    "recordfail",
    "grub_platform",
];

/// Quote one argument the way GRUB builds a Linux command line.
fn quote_arg(a: &str) -> String {
    let escaped: String = a
        .chars()
        .flat_map(|c| {
            if c == '"' || c == '\\' {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect();
    if a.contains([' ', '\t']) {
        format!("\"{escaped}\"")
    } else {
        escaped
    }
}

/// The command line grub-bhyve hands Linux: `console=ttyS0 ` first unless
/// `-n` was given or an argument already starts with it, then
/// `BOOT_IMAGE=<path>` and the arguments.
pub fn linux_cmdline(kernel_path: &str, args: &[String], insert_console: bool) -> String {
    let mut s = String::new();
    if insert_console && !args.iter().any(|a| a.starts_with("console=ttyS0")) {
        s.push_str("console=ttyS0 ");
    }
    s.push_str("BOOT_IMAGE=");
    s.push_str(&quote_arg(kernel_path));
    for a in args {
        s.push(' ');
        s.push_str(&quote_arg(a));
    }
    s
}

fn is_var_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl<'a> Interp<'a> {
    pub fn new(devices: &'a Devices, console: &'a mut dyn Console) -> Interp<'a> {
        let mut vars = BTreeMap::new();
        for (k, v) in [
            ("grub_platform", "emu"),
            ("grub_cpu", "x86_64"),
            ("pager", ""),
            ("feature_menuentry_id", "y"),
            ("feature_menuentry_options", "y"),
            ("feature_platform_search_hint", "y"),
            ("feature_timeout_style", "y"),
            ("feature_all_video_module", "y"),
            ("feature_default_font_path", "y"),
            ("feature_200_final", "y"),
            ("feature_nativedisk_cmd", "y"),
            ("menuentry_id_option", "--id"),
        ] {
            vars.insert(k.to_string(), v.to_string());
        }
        Interp {
            devices,
            console,
            vars,
            functions: HashMap::new(),
            menu: Vec::new(),
            menu_replaced: false,
            positional: Vec::new(),
            loaded: None,
            steps: 0,
            expanded: 0,
            depth: 0,
            status: 0,
            pending_key: None,
        }
    }

    /// A variable's value (empty when unset).
    pub fn var(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_default()
    }

    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.insert(name.to_string(), value.to_string());
    }

    pub(crate) fn say(&mut self, s: &str) -> Result<(), Ctl> {
        self.console
            .write_bytes(s.as_bytes())
            .map_err(|e| Ctl::Fatal(GrubError::Console(e)))
    }

    fn fail(&mut self, msg: impl std::fmt::Display) -> Flow {
        self.say(&format!("error: {msg}.\n"))?;
        Ok(1)
    }

    // ------------------------------------------------------------ expansion

    fn lookup(&self, name: &str) -> String {
        match name {
            "?" => self.status.to_string(),
            "#" => self.positional.len().to_string(),
            "@" | "*" => self.positional.join(" "),
            n if n.chars().all(|c| c.is_ascii_digit()) => {
                let i: usize = n.parse().unwrap_or(0);
                if i == 0 {
                    "grub".to_string()
                } else {
                    self.positional.get(i - 1).cloned().unwrap_or_default()
                }
            }
            n => self.var(n),
        }
    }

    /// Expand words into fields, charging the bytes to the session's budget.
    fn expand(&mut self, words: &[Word]) -> Result<Vec<String>, Ctl> {
        let out = self.expand_words(words);
        self.expanded += out.iter().map(|f| f.len() as u64 + 1).sum::<u64>();
        if self.expanded > MAX_EXPANDED_BYTES {
            return Err(Ctl::Fatal(GrubError::Command(format!(
                "the script expanded more than {MAX_EXPANDED_BYTES} bytes of words; giving up"
            ))));
        }
        Ok(out)
    }

    fn expand_words(&self, words: &[Word]) -> Vec<String> {
        let mut out = Vec::new();
        for w in words {
            let mut fields: Vec<String> = vec![String::new()];
            let mut any_literal = w.quoted;
            for p in &w.parts {
                match p {
                    Part::Lit(s) => {
                        any_literal = true;
                        if let Some(f) = fields.last_mut() {
                            f.push_str(s);
                        }
                    }
                    Part::Var { name, quoted: true } => {
                        let v = self.lookup(name);
                        if let Some(f) = fields.last_mut() {
                            f.push_str(&v);
                        }
                    }
                    Part::Var {
                        name,
                        quoted: false,
                    } => {
                        let v = self.lookup(name);
                        let starts_blank = v.starts_with([' ', '\t', '\n']);
                        let ends_blank = v.ends_with([' ', '\t', '\n']);
                        let pieces: Vec<&str> = v
                            .split([' ', '\t', '\n'])
                            .filter(|s| !s.is_empty())
                            .collect();
                        if starts_blank && fields.last().is_some_and(|f| !f.is_empty()) {
                            fields.push(String::new());
                        }
                        for (i, piece) in pieces.iter().enumerate() {
                            if i > 0 {
                                fields.push(String::new());
                            }
                            if let Some(f) = fields.last_mut() {
                                f.push_str(piece);
                            }
                        }
                        if ends_blank && !pieces.is_empty() {
                            fields.push(String::new());
                        }
                    }
                }
            }
            if !any_literal {
                fields.retain(|f| !f.is_empty());
            } else if fields.len() > 1 && fields.last().is_some_and(|f| f.is_empty()) {
                fields.pop();
            }
            out.extend(fields);
        }
        out
    }

    // ------------------------------------------------------------ execution

    /// Run a script's source text in this context.
    pub fn run_source(&mut self, text: &str) -> Result<(), GrubError> {
        match self.source_text(text) {
            Ok(_) | Err(Ctl::Return(_)) => Ok(()),
            Err(Ctl::Boot) => Ok(()),
            Err(Ctl::Fatal(e)) => Err(e),
        }
    }

    /// Run a script; `Ctl::Boot` comes out when it asked to boot.
    pub(crate) fn source_text(&mut self, text: &str) -> Flow {
        let stmts = match parse(text) {
            Ok(s) => s,
            Err(e) => return self.fail(e),
        };
        self.exec_list(&stmts)
    }

    pub(crate) fn exec_list(&mut self, stmts: &[Stmt]) -> Flow {
        let mut status = 0;
        for s in stmts {
            status = self.exec(s)?;
            self.status = status;
        }
        Ok(status)
    }

    /// Run a menu entry's body with its arguments as `$1...`.
    pub(crate) fn exec_entry(&mut self, item: &MenuItem) -> Flow {
        let saved = std::mem::replace(&mut self.positional, item.args.clone());
        let r = self.exec_list(&item.body);
        self.positional = saved;
        match r {
            Err(Ctl::Return(n)) => Ok(n),
            other => other,
        }
    }

    fn tick(&mut self) -> Result<(), Ctl> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(Ctl::Fatal(GrubError::Command(format!(
                "the script ran more than {MAX_STEPS} statements; giving up"
            ))));
        }
        Ok(())
    }

    fn exec(&mut self, stmt: &Stmt) -> Flow {
        self.tick()?;
        match stmt {
            Stmt::Command(words) => {
                let argv = self.expand(words)?;
                if argv.is_empty() {
                    return Ok(0);
                }
                self.command(&argv)
            }
            Stmt::If {
                branches,
                otherwise,
            } => {
                for (cond, body) in branches {
                    let c = self.exec_list(cond)?;
                    self.status = c;
                    if c == 0 {
                        return self.exec_list(body);
                    }
                }
                match otherwise {
                    Some(body) => self.exec_list(body),
                    None => Ok(0),
                }
            }
            Stmt::For { var, words, body } => {
                let items = self.expand(words)?;
                let mut st = 0;
                for it in items {
                    self.set_var(var, &it);
                    st = self.exec_list(body)?;
                }
                Ok(st)
            }
            Stmt::While { until, cond, body } => {
                let mut st = 0;
                loop {
                    self.tick()?;
                    let c = self.exec_list(cond)?;
                    if (c == 0) == *until {
                        break;
                    }
                    st = self.exec_list(body)?;
                }
                Ok(st)
            }
            Stmt::Function { name, body } => {
                self.functions.insert(name.clone(), body.clone());
                Ok(0)
            }
            Stmt::Menu {
                submenu,
                args,
                body,
                source,
            } => {
                let argv = self.expand(args)?;
                self.add_menu_item(*submenu, &argv, body.clone(), source.clone())
            }
        }
    }

    fn add_menu_item(
        &mut self,
        submenu: bool,
        argv: &[String],
        body: Rc<Vec<Stmt>>,
        source: Rc<str>,
    ) -> Flow {
        let mut title = None;
        let mut id = None;
        let mut rest = Vec::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            i += 1;
            let takes_value = ["--class", "--users", "--hotkey", "--id", "--source"];
            if let Some((k, v)) = a.split_once('=') {
                if takes_value.contains(&k) {
                    if k == "--id" {
                        id = Some(v.to_string());
                    }
                    continue;
                }
            }
            if takes_value.contains(&a.as_str()) {
                if a == "--id" {
                    id = argv.get(i).cloned();
                }
                i += 1;
                continue;
            }
            if a == "--unrestricted" {
                continue;
            }
            if title.is_none() {
                title = Some(a.clone());
            } else {
                rest.push(a.clone());
            }
        }
        let Some(title) = title else {
            return self.fail("menuentry: title expected");
        };
        self.menu.push(MenuItem {
            title,
            id,
            submenu,
            args: rest,
            body,
            source,
        });
        Ok(0)
    }

    fn call_function(&mut self, body: Rc<Vec<Stmt>>, args: &[String]) -> Flow {
        if self.depth >= MAX_CALL_DEPTH {
            return self.fail(format!("calls nested deeper than {MAX_CALL_DEPTH}"));
        }
        self.depth += 1;
        let saved = std::mem::replace(&mut self.positional, args.to_vec());
        let r = self.exec_list(&body);
        self.positional = saved;
        self.depth -= 1;
        match r {
            Err(Ctl::Return(n)) => Ok(n),
            other => other,
        }
    }

    // ------------------------------------------------------------ files

    /// Split `(dev)/path` or `/path` (on `$root`) into device and path.
    pub(crate) fn resolve(&self, path: &str) -> Result<(String, String), GrubError> {
        if let Some(rest) = path.strip_prefix('(') {
            let (dev, p) = rest
                .split_once(')')
                .ok_or_else(|| GrubError::BadPath(path.to_string()))?;
            return Ok((dev.to_string(), p.to_string()));
        }
        let root = self.var("root");
        let root = root
            .trim_start_matches('(')
            .trim_end_matches(')')
            .to_string();
        if root.is_empty() {
            return Err(GrubError::Command("no server is specified".to_string()));
        }
        Ok((root, path.to_string()))
    }

    fn open_fs(&self, path: &str) -> Result<(Rc<dyn Filesystem>, String), GrubError> {
        let (dev, p) = self.resolve(path)?;
        Ok((self.devices.fs(&dev)?, p))
    }

    /// Read a file by GRUB path.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let (fs, p) = self.open_fs(path)?;
        if p.is_empty() {
            return Err(GrubError::BadPath(path.to_string()));
        }
        fs.read(&p).map_err(|e| match e {
            GrubError::NotFound(_) => GrubError::NotFound(path.to_string()),
            other => other,
        })
    }

    fn path_test(&self, path: &str, want_dir: Option<bool>) -> bool {
        let Ok((fs, p)) = self.open_fs(path) else {
            return false;
        };
        if fs.is_dir(&p) {
            return want_dir != Some(false);
        }
        want_dir != Some(true) && {
            // A file exists when its parent lists it.
            let (parent, name) = match p.trim_end_matches('/').rsplit_once('/') {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => (String::new(), p.clone()),
            };
            fs.ls(&parent)
                .is_ok_and(|l| l.iter().any(|e| e.name == name && !e.is_dir))
        }
    }

    // ------------------------------------------------------------ commands

    pub(crate) fn command(&mut self, argv: &[String]) -> Flow {
        let name = argv[0].as_str();
        let args = &argv[1..];
        if args.is_empty() {
            if let Some((k, v)) = name.split_once('=') {
                if is_var_name(k) {
                    self.set_var(k, v);
                    return Ok(0);
                }
            }
        }
        if name == "!" {
            // `! cmd` inverts the status, as in GRUB's script.
            let bangs = argv.iter().take_while(|a| *a == "!").count();
            let rest = &argv[bangs..];
            let st = if rest.is_empty() {
                0
            } else {
                self.command(rest)?
            };
            let odd = bangs & 1 == 1;
            return Ok(i32::from((st == 0) == odd));
        }
        if let Some(body) = self.functions.get(name).cloned() {
            return self.call_function(body, args);
        }
        match name {
            "set" => self.cmd_set(args),
            "unset" => {
                for a in args {
                    self.vars.remove(a);
                }
                Ok(0)
            }
            "export" | "insmod" => Ok(0),
            "echo" => self.cmd_echo(args),
            "true" => Ok(0),
            "false" => Ok(1),
            "test" => Ok(self.test(args)),
            "[" => {
                if args.last().map(String::as_str) != Some("]") {
                    return self.fail("`]' expected");
                }
                Ok(self.test(&args[..args.len() - 1]))
            }
            "return" => Err(Ctl::Return(
                args.first()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(self.status),
            )),
            "linux" | "linux16" | "linuxefi" => self.cmd_linux(args),
            "initrd" | "initrd16" | "initrdefi" => self.cmd_initrd(args),
            "boot" => {
                if self.loaded.is_some() {
                    Err(Ctl::Boot)
                } else {
                    self.fail("you need to load the kernel first")
                }
            }
            "search" | "search.file" | "search.fs_label" | "search.fs_uuid" => {
                self.cmd_search(name, args)
            }
            "ls" => self.cmd_ls(args),
            "cat" => self.cmd_cat(args),
            "source" | "." => self.cmd_source(args, false),
            "configfile" => self.cmd_source(args, true),
            "load_env" => self.cmd_load_env(args),
            "blscfg" => self.cmd_blscfg(),
            "save_env" => self.cmd_save_env(args),
            "loadfont" => Ok(1),
            "clear" => {
                self.say("\x1b[H\x1b[2J")?;
                Ok(0)
            }
            "help" => self.cmd_help(args),
            n if IGNORED.contains(&n) => Ok(0),
            n => self.fail(format!("can't find command `{n}'")),
        }
    }

    fn cmd_set(&mut self, args: &[String]) -> Flow {
        if args.is_empty() {
            let listing: String = self
                .vars
                .iter()
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect();
            self.say(&listing)?;
            return Ok(0);
        }
        for a in args {
            match a.split_once('=') {
                Some((k, v)) if is_var_name(k) => self.set_var(k, v),
                None if is_var_name(a) => self.set_var(a, ""),
                _ => return self.fail(format!("invalid variable name `{a}'")),
            }
        }
        Ok(0)
    }

    fn cmd_echo(&mut self, args: &[String]) -> Flow {
        let mut newline = true;
        let mut escapes = false;
        let mut i = 0;
        while let Some(a) = args.get(i) {
            match a.as_str() {
                "-n" => newline = false,
                "-e" => escapes = true,
                "-ne" | "-en" => {
                    newline = false;
                    escapes = true;
                }
                _ => break,
            }
            i += 1;
        }
        let mut s = args[i..].join(" ");
        if escapes {
            s = s
                .replace("\\n", "\n")
                .replace("\\t", "\t")
                .replace("\\\\", "\\");
        }
        if newline {
            s.push('\n');
        }
        self.say(&s)?;
        Ok(0)
    }

    fn test(&self, args: &[String]) -> i32 {
        i32::from(!self.test_expr(args))
    }

    fn test_expr(&self, args: &[String]) -> bool {
        if let Some(pos) = args.iter().position(|a| a == "-o") {
            return self.test_expr(&args[..pos]) || self.test_expr(&args[pos + 1..]);
        }
        if let Some(pos) = args.iter().position(|a| a == "-a") {
            return self.test_expr(&args[..pos]) && self.test_expr(&args[pos + 1..]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match a.as_slice() {
            [] => false,
            ["!", rest @ ..] => !self.test_expr(&args[args.len() - rest.len()..]),
            [s] => !s.is_empty(),
            ["-n", s] => !s.is_empty(),
            ["-z", s] => s.is_empty(),
            ["-f", p] => self.path_test(p, Some(false)),
            ["-d", p] => self.path_test(p, Some(true)),
            ["-e", p] => self.path_test(p, None),
            ["-s", p] => self.read_file(p).is_ok_and(|d| !d.is_empty()),
            [l, op, r] => {
                let num = |s: &str| s.trim().parse::<i64>().unwrap_or(0);
                match *op {
                    "=" | "==" => l == r,
                    "!=" => l != r,
                    "<" => l < r,
                    ">" => l > r,
                    "-eq" => num(l) == num(r),
                    "-ne" => num(l) != num(r),
                    "-lt" => num(l) < num(r),
                    "-le" => num(l) <= num(r),
                    "-gt" => num(l) > num(r),
                    "-ge" => num(l) >= num(r),
                    _ => false,
                }
            }
            _ => false,
        }
    }

    fn cmd_linux(&mut self, args: &[String]) -> Flow {
        let Some(path) = args.first() else {
            return self.fail("filename expected");
        };
        // A new kernel drops what was loaded before, initrds included.
        self.loaded = None;
        match self.read_file(path) {
            Ok(kernel) => {
                if let Err(e) = crate::kernel::check(path, &kernel) {
                    return self.fail(e);
                }
                self.loaded = Some(Loaded {
                    kernel_path: path.clone(),
                    kernel,
                    args: args[1..].to_vec(),
                    initrd_paths: Vec::new(),
                    initrd: Vec::new(),
                });
                Ok(0)
            }
            Err(e) => self.fail(e),
        }
    }

    fn cmd_initrd(&mut self, args: &[String]) -> Flow {
        if args.is_empty() {
            return self.fail("filename expected");
        }
        if self.loaded.is_none() {
            return self.fail("you need to load the kernel first");
        }
        let mut data = Vec::new();
        for p in args {
            match self.read_file(p) {
                Ok(d) => {
                    data.extend_from_slice(&d);
                    data.resize(data.len().div_ceil(4) * 4, 0);
                    if data.len() as u64 > MAX_INITRD_TOTAL {
                        return self.fail(format!(
                            "the initrds are larger than {MAX_INITRD_TOTAL} bytes"
                        ));
                    }
                }
                Err(e) => return self.fail(e),
            }
        }
        if let Some(l) = self.loaded.as_mut() {
            l.initrd = data;
            l.initrd_paths = args.to_vec();
        }
        Ok(0)
    }

    fn cmd_search(&mut self, name: &str, args: &[String]) -> Flow {
        #[derive(PartialEq, Clone, Copy)]
        enum Kind {
            File,
            Label,
            Uuid,
        }
        let mut kind = match name {
            "search.fs_label" => Kind::Label,
            "search.fs_uuid" => Kind::Uuid,
            _ => Kind::File,
        };
        let mut set_var: Option<String> = None;
        let mut hints: Vec<String> = Vec::new();
        let mut positional: Vec<String> = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            i += 1;
            match a {
                "-f" | "--file" => kind = Kind::File,
                "-l" | "--label" => kind = Kind::Label,
                "-u" | "--fs-uuid" => kind = Kind::Uuid,
                "-n" | "--no-floppy" | "--efidisk-only" => {}
                "-s" | "--set" => set_var = Some("root".to_string()),
                "-h" | "--hint" => {
                    if let Some(h) = args.get(i) {
                        hints.push(h.clone());
                        i += 1;
                    }
                }
                _ if a.starts_with("--set=") => set_var = Some(a["--set=".len()..].to_string()),
                _ if a.starts_with("--hint") => {
                    if let Some((_, v)) = a.split_once('=') {
                        hints.push(v.to_string());
                    } else if let Some(h) = args.get(i) {
                        hints.push(h.clone());
                        i += 1;
                    }
                }
                _ if a.starts_with('-') && a.len() > 1 => {
                    return self.fail(format!("search: unknown option `{a}'"));
                }
                _ => positional.push(a.to_string()),
            }
        }
        // NAME [VARIABLE [HINT...]], as GRUB's search and search.* take them.
        let mut positional = positional.into_iter();
        let Some(key) = positional.next() else {
            return self.fail("one argument expected");
        };
        if let Some(v) = positional.next() {
            set_var = Some(v);
        }
        hints.extend(positional);
        let mut order: Vec<String> = Vec::new();
        for h in hints {
            let h = h.trim_start_matches('(').trim_end_matches(')').to_string();
            if !order.contains(&h) {
                order.push(h);
            }
        }
        for d in self.devices.names() {
            if d != "host" && !order.contains(&d) {
                order.push(d);
            }
        }
        let mut found = Vec::new();
        for dev in order {
            let Ok(fs) = self.devices.fs(&dev) else {
                continue;
            };
            let hit = match kind {
                Kind::File => self.path_test(&format!("({dev}){key}"), None),
                Kind::Label => fs.label().is_some_and(|l| l == key),
                Kind::Uuid => fs.uuid().is_some_and(|u| u.eq_ignore_ascii_case(&key)),
            };
            if hit {
                found.push(dev);
                if set_var.is_some() {
                    break;
                }
            }
        }
        if found.is_empty() {
            return self.fail(format!("no such device: {key}"));
        }
        match set_var {
            Some(v) => self.set_var(&v, &found[0]),
            None => {
                let line = found.join(" ");
                self.say(&format!("{line}\n"))?;
            }
        }
        Ok(0)
    }

    fn cmd_ls(&mut self, args: &[String]) -> Flow {
        let mut long = false;
        let mut human = false;
        let mut paths = Vec::new();
        for a in args {
            match a.as_str() {
                "-l" | "--long" => long = true,
                "-h" | "--human-readable" => human = true,
                "-a" | "--all" => {}
                "-lh" | "-hl" => {
                    long = true;
                    human = true;
                }
                _ => paths.push(a.clone()),
            }
        }
        if paths.is_empty() {
            let line: String = self
                .devices
                .names()
                .iter()
                .map(|n| format!("({n}) "))
                .collect();
            self.say(&format!("{line}\n"))?;
            return Ok(0);
        }
        let mut status = 0;
        for p in paths {
            status = self.ls_one(&p, long, human)?;
        }
        Ok(status)
    }

    fn ls_one(&mut self, path: &str, long: bool, human: bool) -> Flow {
        let (dev, p) = match self.resolve(path) {
            Ok(x) => x,
            Err(e) => return self.fail(e),
        };
        if path.starts_with('(') && p.is_empty() {
            let info = match self.devices.info(&dev) {
                Ok(i) => i,
                Err(e) => return self.fail(e),
            };
            let mut s = if info.partition.is_some() {
                format!("\tPartition {}: ", info.name)
            } else {
                format!("Device {}: ", info.name)
            };
            match info.fs_kind {
                Some(k) => s.push_str(&format!("Filesystem type {k}")),
                None => s.push_str("No known filesystem detected"),
            }
            if let Some(l) = info.label {
                s.push_str(&format!(" - Label `{l}'"));
            }
            if let Some(u) = info.uuid {
                s.push_str(&format!(" - UUID {u}"));
            }
            match info.partition {
                Some((start, len)) => s.push_str(&format!(
                    " - Partition start at {}KiB - Total size {}KiB",
                    start / 1024,
                    len / 1024
                )),
                None if info.name != "host" => s.push_str(&format!(
                    " - Sector size 512B - Total size {}KiB",
                    info.size / 1024
                )),
                None => {}
            }
            self.say(&format!("{s}\n"))?;
            return Ok(0);
        }
        let fs = match self.devices.fs(&dev) {
            Ok(f) => f,
            Err(e) => return self.fail(e),
        };
        let entries = if fs.is_dir(&p) {
            match fs.ls(&p) {
                Ok(e) => e,
                Err(e) => return self.fail(e),
            }
        } else {
            let (parent, name) = match p.trim_end_matches('/').rsplit_once('/') {
                Some((a, b)) => (a.to_string(), b.to_string()),
                None => (String::new(), p.clone()),
            };
            match fs
                .ls(&parent)
                .map(|l| l.into_iter().filter(|e| e.name == name).collect::<Vec<_>>())
            {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => return self.fail(GrubError::NotFound(path.to_string())),
                Err(e) => return self.fail(e),
            }
        };
        let mut out = String::new();
        for e in entries {
            if long {
                let size = if e.is_dir {
                    "DIR".to_string()
                } else if human {
                    human_size(e.size)
                } else {
                    e.size.to_string()
                };
                out.push_str(&format!(
                    "{size:<12} {}{}\n",
                    e.name,
                    if e.is_dir { "/" } else { "" }
                ));
            } else {
                out.push_str(&format!("{}{} ", e.name, if e.is_dir { "/" } else { "" }));
            }
        }
        if !long {
            out.push('\n');
        }
        self.say(&out)?;
        Ok(0)
    }

    fn cmd_cat(&mut self, args: &[String]) -> Flow {
        let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
            return self.fail("filename expected");
        };
        match self.read_file(path) {
            Ok(d) => {
                let text = String::from_utf8_lossy(&d).replace('\n', "\r\n");
                self.console
                    .write_bytes(text.as_bytes())
                    .map_err(|e| Ctl::Fatal(GrubError::Console(e)))?;
                self.say("\n")?;
                Ok(0)
            }
            Err(e) => self.fail(e),
        }
    }

    /// Read a config file as text (capped like every script).
    pub(crate) fn read_script(&self, path: &str) -> Result<String, GrubError> {
        let d = self.read_file(path)?;
        if d.len() > crate::script::MAX_SCRIPT_BYTES {
            return Err(GrubError::TooLarge(
                path.to_string(),
                d.len() as u64,
                crate::script::MAX_SCRIPT_BYTES as u64,
            ));
        }
        Ok(String::from_utf8_lossy(&d).into_owned())
    }

    fn cmd_source(&mut self, args: &[String], new_menu: bool) -> Flow {
        let Some(path) = args.first() else {
            return self.fail("filename expected");
        };
        let text = match self.read_script(path) {
            Ok(t) => t,
            Err(e) => return self.fail(e),
        };
        if self.depth >= MAX_CALL_DEPTH {
            return self.fail(format!("config files nested deeper than {MAX_CALL_DEPTH}"));
        }
        if new_menu {
            self.menu.clear();
            self.menu_replaced = true;
        }
        self.depth += 1;
        let r = self.source_text(&text);
        self.depth -= 1;
        match r {
            Err(Ctl::Return(n)) => Ok(n),
            other => other,
        }
    }

    fn cmd_load_env(&mut self, args: &[String]) -> Flow {
        let mut file = None;
        let mut wanted = Vec::new();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "-f" | "--file" => {
                    file = args.get(i + 1).cloned();
                    i += 1;
                }
                "-s" | "--skip-sig" => {}
                a => wanted.push(a.to_string()),
            }
            i += 1;
        }
        let file = file.unwrap_or_else(|| format!("{}/grubenv", self.var("prefix")));
        let data = match self.read_file(&file) {
            Ok(d) => d,
            Err(e) => return self.fail(e),
        };
        let Some(block) = EnvBlock::open(data) else {
            return self.fail("invalid environment block");
        };
        for (k, v) in block.vars() {
            if wanted.is_empty() || wanted.contains(&k) {
                self.set_var(&k, &v);
            }
        }
        Ok(0)
    }

    /// GRUB's `save_env [-f FILE] VAR...`: each variable set in the block
    /// (or removed when unset), and the file's blocks rewritten in place
    /// on its disk. Nothing is written when any step fails.
    fn cmd_save_env(&mut self, args: &[String]) -> Flow {
        let mut file = None;
        let mut names = Vec::new();
        let mut i = 0;
        while i < args.len() {
            match args[i].as_str() {
                "-f" | "--file" => {
                    file = args.get(i + 1).cloned();
                    i += 1;
                }
                a => names.push(a.to_string()),
            }
            i += 1;
        }
        if names.is_empty() {
            return self.fail("no variable is specified");
        }
        let file = file.unwrap_or_else(|| format!("{}/grubenv", self.var("prefix")));
        let (dev, path) = match self.resolve(&file) {
            Ok(x) => x,
            Err(e) => return self.fail(e),
        };
        let old = match self.read_file(&file) {
            Ok(d) => d,
            Err(e) => return self.fail(e),
        };
        let Some(mut block) = EnvBlock::open(old.clone()) else {
            return self.fail("invalid environment block");
        };
        for name in &names {
            match self.vars.get(name) {
                Some(value) => {
                    if !block.set(name, value) {
                        return self.fail("environment block too small");
                    }
                }
                None => block.delete(name),
            }
        }
        match self
            .devices
            .rewrite_in_place(&dev, &path, &old, block.as_bytes())
        {
            Ok(()) => Ok(0),
            Err(e) => self.fail(e),
        }
    }

    /// Fedora/RHEL's `blscfg`: one menu entry per
    /// `loader/entries/*.conf` snippet (Boot Loader Specification), newest
    /// version first. Paths in a snippet are relative to the boot
    /// filesystem, so they get `/boot` when the snippets were found under
    /// `/boot` (no separate boot partition).
    fn cmd_blscfg(&mut self) -> Flow {
        const MAX_SNIPPETS: usize = 256;
        const MAX_SNIPPET_BYTES: usize = 64 << 10;
        let custom = self.var("blsdir");
        let mut candidates = Vec::new();
        if !custom.is_empty() {
            candidates.push((custom, String::new()));
        }
        candidates.push(("/loader/entries".to_string(), String::new()));
        candidates.push(("/boot/loader/entries".to_string(), "/boot".to_string()));
        let mut found = None;
        for (dir, prefix) in candidates {
            let Ok((fs, p)) = self.open_fs(&dir) else {
                continue;
            };
            if let Ok(list) = fs.ls(&p) {
                found = Some((dir, prefix, list));
                break;
            }
        }
        let Some((dir, prefix, list)) = found else {
            return self.fail("blscfg: no loader/entries directory");
        };
        let mut names: Vec<String> = list
            .into_iter()
            .filter(|e| !e.is_dir && e.name.ends_with(".conf"))
            .map(|e| e.name)
            .take(MAX_SNIPPETS)
            .collect();
        names.sort_by(|a, b| version_cmp(b, a));
        for name in names {
            let path = format!("{dir}/{name}");
            let text = match self.read_file(&path) {
                Ok(d) if d.len() <= MAX_SNIPPET_BYTES => String::from_utf8_lossy(&d).into_owned(),
                Ok(_) => {
                    self.say(&format!("error: {path}: snippet too large.\n"))?;
                    continue;
                }
                Err(e) => {
                    self.say(&format!("error: {e}.\n"))?;
                    continue;
                }
            };
            let mut title = None;
            let mut linux = None;
            let mut options = Vec::new();
            let mut initrds = Vec::new();
            for line in text.lines() {
                let line = line.trim();
                let (key, value) = line.split_once([' ', '\t']).unwrap_or((line, ""));
                let value = value.trim().to_string();
                match key {
                    "title" => title = Some(value),
                    "linux" => linux = Some(value),
                    "options" => options.push(value),
                    "initrd" => initrds.push(value),
                    _ => {}
                }
            }
            let Some(linux) = linux else { continue };
            let id = name.trim_end_matches(".conf").to_string();
            let mut body = format!(
                "load_video\nset gfxpayload=keep\ninsmod gzio\nlinux {prefix}{linux} {}\n",
                options.join(" ")
            );
            if !initrds.is_empty() {
                let list: Vec<String> = initrds.iter().map(|i| format!("{prefix}{i}")).collect();
                body.push_str(&format!("initrd {}\n", list.join(" ")));
            }
            match parse(&body) {
                Ok(stmts) => self.menu.push(MenuItem {
                    title: title.unwrap_or_else(|| id.clone()),
                    id: Some(id),
                    submenu: false,
                    args: Vec::new(),
                    body: Rc::new(stmts),
                    source: Rc::from(body.as_str()),
                }),
                Err(e) => self.say(&format!("error: {path}: {e}.\n"))?,
            }
        }
        Ok(0)
    }

    fn cmd_help(&mut self, args: &[String]) -> Flow {
        let mut out = String::new();
        for (name, text) in BUILTINS {
            if args.is_empty() || args.iter().any(|a| name.starts_with(a.as_str())) {
                out.push_str(&format!("{name} {text}\n"));
            }
        }
        self.say(&out)?;
        Ok(0)
    }
}

/// Compare version-like names the way rpm orders them, closely enough for
/// kernel snippets: digit runs numerically, other runs as text.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    for (x, y) in runs(a).iter().zip(runs(b).iter()) {
        let ord = match (x.0, y.0) {
            (true, true) => {
                let (p, q) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                p.len().cmp(&q.len()).then_with(|| p.cmp(q))
            }
            _ => x.1.cmp(y.1),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    runs(a).len().cmp(&runs(b).len())
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_like_rpm() {
        use std::cmp::Ordering::*;
        assert_eq!(
            version_cmp("a-6.10.3-200.fc40.conf", "a-6.9.7-100.fc40.conf"),
            Greater
        );
        assert_eq!(version_cmp("a-6.9.conf", "a-6.9.conf"), Equal);
        assert_eq!(version_cmp("a-0-rescue.conf", "a-6.1.conf"), Less);
    }

    #[test]
    fn grub_bhyve_command_line() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            linux_cmdline("/boot/vmlinuz", &a(&["root=/dev/sda1", "ro"]), true),
            "console=ttyS0 BOOT_IMAGE=/boot/vmlinuz root=/dev/sda1 ro"
        );
        assert_eq!(
            linux_cmdline("/v", &a(&["console=ttyS0,115200"]), true),
            "BOOT_IMAGE=/v console=ttyS0,115200"
        );
        assert_eq!(
            linux_cmdline("/v", &a(&["a b", "q\""]), false),
            "BOOT_IMAGE=/v \"a b\" q\\\""
        );
    }
}
