//! The configuration tree: named nodes holding string values.
//!
//! Mirrors bhyve's `config.c` (an nvlist tree): keys are dot-separated paths,
//! every value is a string, `%(path)` in a value expands to another value
//! (`%%` is a literal `%` as bhyve_config(5) documents, and `\` escapes the
//! next character as bhyve's code does), and booleans accept true/on/yes/1 and
//! false/off/no/0. A path cannot be both a value and a node.

use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid config path \"{0}\"")]
    BadPath(String),
    #[error("config path \"{0}\" is a value, not a node")]
    NotANode(String),
    #[error("config path \"{0}\" is a node, not a value")]
    NotAValue(String),
    #[error("invalid boolean value \"{value}\" for \"{path}\"")]
    BadBool { path: String, value: String },
    #[error("invalid integer value \"{value}\" for \"{path}\"")]
    BadInteger { path: String, value: String },
    #[error("bad variable expansion in \"{path}\": {why}")]
    BadExpansion { path: String, why: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Value(String),
    Table(BTreeMap<String, Node>),
}

/// bhyve's configuration tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigTree {
    root: BTreeMap<String, Node>,
}

impl Default for ConfigTree {
    fn default() -> Self {
        Self::new()
    }
}

fn split(path: &str) -> Result<Vec<&str>, ConfigError> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::BadPath(path.to_string()));
    }
    Ok(parts)
}

/// Longest value `%(var)` expansion may produce.
pub const MAX_EXPANDED_LEN: usize = 1 << 20;

/// Parse a bhyve boolean (`true/on/yes/1`, `false/off/no/0`, any case).
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

impl ConfigTree {
    pub fn new() -> Self {
        Self {
            root: BTreeMap::new(),
        }
    }

    /// Set `path` to `value`, creating the nodes on the way.
    pub fn set(&mut self, path: &str, value: impl Into<String>) -> Result<(), ConfigError> {
        let parts = split(path)?;
        let (leaf, nodes) = parts.split_last().expect("split yields one part at least");
        let mut table = &mut self.root;
        for (i, part) in nodes.iter().enumerate() {
            let node = table
                .entry(part.to_string())
                .or_insert_with(|| Node::Table(BTreeMap::new()));
            table = match node {
                Node::Table(t) => t,
                Node::Value(_) => return Err(ConfigError::NotANode(parts[..=i].join("."))),
            };
        }
        if let Some(Node::Table(_)) = table.get(*leaf) {
            return Err(ConfigError::NotAValue(path.to_string()));
        }
        table.insert(leaf.to_string(), Node::Value(value.into()));
        Ok(())
    }

    /// Set `path` only if it has no value yet (bhyve's defaults).
    pub fn set_default(&mut self, path: &str, value: &str) -> Result<(), ConfigError> {
        if self.get_raw(path).is_none() {
            self.set(path, value)?;
        }
        Ok(())
    }

    pub fn set_bool(&mut self, path: &str, value: bool) -> Result<(), ConfigError> {
        self.set(path, if value { "true" } else { "false" })
    }

    fn lookup(&self, path: &str) -> Option<&Node> {
        let parts = split(path).ok()?;
        let (leaf, nodes) = parts.split_last()?;
        let mut table = &self.root;
        for part in nodes {
            match table.get(*part)? {
                Node::Table(t) => table = t,
                Node::Value(_) => return None,
            }
        }
        table.get(*leaf)
    }

    /// Remove a value or a whole node.
    pub fn remove(&mut self, path: &str) {
        let Ok(parts) = split(path) else { return };
        let (leaf, nodes) = parts.split_last().expect("non-empty");
        let mut table = &mut self.root;
        for part in nodes {
            match table.get_mut(*part) {
                Some(Node::Table(t)) => table = t,
                _ => return,
            }
        }
        table.remove(*leaf);
    }

    /// The value at `path` as written, without `%(var)` expansion.
    pub fn get_raw(&self, path: &str) -> Option<&str> {
        match self.lookup(path)? {
            Node::Value(v) => Some(v),
            Node::Table(_) => None,
        }
    }

    /// True if `path` is a node (has children).
    pub fn is_node(&self, path: &str) -> bool {
        matches!(self.lookup(path), Some(Node::Table(_)))
    }

    /// The value at `path` with `%(var)` references expanded (at most
    /// [`MAX_EXPANDED_LEN`] bytes).
    pub fn get(&self, path: &str) -> Result<Option<String>, ConfigError> {
        match self.get_raw(path) {
            None => Ok(None),
            Some(raw) => self.expand(path, raw, 0).map(Some),
        }
    }

    fn expand(&self, path: &str, raw: &str, depth: usize) -> Result<String, ConfigError> {
        let bad = |why: &str| ConfigError::BadExpansion {
            path: path.to_string(),
            why: why.to_string(),
        };
        if depth > 16 {
            return Err(bad("references nest too deep (a loop?)"));
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(pos) = rest.find(['%', '\\']) {
            out.push_str(&rest[..pos]);
            let escape = rest[pos..].starts_with('\\');
            rest = &rest[pos + 1..];
            if escape {
                // bhyve's config.c: a backslash takes the next character
                // literally; a trailing one is dropped.
                if let Some(c) = rest.chars().next() {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            } else if let Some(r) = rest.strip_prefix('%') {
                out.push('%');
                rest = r;
            } else if let Some(r) = rest.strip_prefix('(') {
                let end = r.find(')').ok_or_else(|| bad("missing ')'"))?;
                let var = &r[..end];
                let value = self
                    .get_raw(var)
                    .ok_or_else(|| bad(&format!("\"{var}\" is not set")))?;
                out.push_str(&self.expand(var, value, depth + 1)?);
                if out.len() > MAX_EXPANDED_LEN {
                    // Values naming others several times grow
                    // exponentially with the nesting (8 names, 12 deep:
                    // tens of gigabytes).
                    return Err(bad(&format!(
                        "the value expands to more than {MAX_EXPANDED_LEN} bytes (too long)"
                    )));
                }
                rest = &r[end + 1..];
            } else {
                out.push('%');
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// A boolean value; `None` when unset.
    pub fn get_bool(&self, path: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(path)? {
            None => Ok(None),
            Some(v) => parse_bool(&v).map(Some).ok_or(ConfigError::BadBool {
                path: path.to_string(),
                value: v,
            }),
        }
    }

    /// A boolean with a default for when it is unset.
    pub fn bool_or(&self, path: &str, default: bool) -> Result<bool, ConfigError> {
        Ok(self.get_bool(path)?.unwrap_or(default))
    }

    /// An integer in strtol(3) syntax (decimal, 0x hex, leading-0 octal).
    pub fn get_u64(&self, path: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(path)? {
            None => Ok(None),
            Some(v) => parse_c_integer(&v)
                .map(Some)
                .ok_or(ConfigError::BadInteger {
                    path: path.to_string(),
                    value: v,
                }),
        }
    }

    /// Names of the direct children of the node at `path` ("" for the root).
    pub fn children(&self, path: &str) -> Vec<String> {
        let table = if path.is_empty() {
            Some(&self.root)
        } else {
            match self.lookup(path) {
                Some(Node::Table(t)) => Some(t),
                _ => None,
            }
        };
        table
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every `(path, raw value)` pair, in tree order.
    pub fn entries(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, t: &BTreeMap<String, Node>, out: &mut Vec<(String, String)>) {
            for (k, n) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match n {
                    Node::Value(v) => out.push((path, v.clone())),
                    Node::Table(sub) => walk(&path, sub, out),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &self.root, &mut out);
        out
    }

    /// The whole tree as a `-k` file (`path=value` lines).
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (k, v) in self.entries() {
            let _ = writeln!(s, "{k}={v}");
        }
        s
    }
}

/// strtol(3)-style unsigned integer: `0x` hex, leading `0` octal, else decimal.
pub fn parse_c_integer(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_node_conflicts() {
        let mut t = ConfigTree::new();
        t.set("pci.0.3.0.device", "virtio-blk").unwrap();
        t.set("pci.0.3.0.path", "/d.img").unwrap();
        assert_eq!(
            t.get("pci.0.3.0.device").unwrap().as_deref(),
            Some("virtio-blk")
        );
        assert_eq!(t.children("pci.0.3.0"), vec!["device", "path"]);
        assert!(t.is_node("pci.0.3"));
        assert!(matches!(
            t.set("pci.0.3", "x"),
            Err(ConfigError::NotAValue(_))
        ));
        assert!(matches!(
            t.set("pci.0.3.0.path.x", "x"),
            Err(ConfigError::NotANode(_))
        ));
        assert!(matches!(t.set("a..b", "x"), Err(ConfigError::BadPath(_))));
    }

    #[test]
    fn expansion_and_escapes() {
        let mut t = ConfigTree::new();
        t.set("name", "vm0").unwrap();
        t.set("disk", "/vms/%(name)/disk.img").unwrap();
        t.set("pct", "100%%").unwrap();
        t.set("loop", "%(loop)").unwrap();
        t.set("esc", r"\%(name)\\x").unwrap();
        assert_eq!(t.get("esc").unwrap().unwrap(), r"%(name)\x");
        assert_eq!(t.get("disk").unwrap().unwrap(), "/vms/vm0/disk.img");
        assert_eq!(t.get("pct").unwrap().unwrap(), "100%");
        assert!(t.get("loop").is_err());
    }

    #[test]
    fn booleans_and_integers() {
        let mut t = ConfigTree::new();
        for (v, b) in [
            ("on", true),
            ("YES", true),
            ("1", true),
            ("off", false),
            ("no", false),
        ] {
            t.set("x", v).unwrap();
            assert_eq!(t.get_bool("x").unwrap(), Some(b));
        }
        t.set("x", "maybe").unwrap();
        assert!(t.get_bool("x").is_err());
        t.set("n", "0x10").unwrap();
        assert_eq!(t.get_u64("n").unwrap(), Some(16));
        t.set("n", "010").unwrap();
        assert_eq!(t.get_u64("n").unwrap(), Some(8));
    }

    #[test]
    fn dump_is_k_format() {
        let mut t = ConfigTree::new();
        t.set("memory.size", "256M").unwrap();
        t.set("name", "vm").unwrap();
        assert_eq!(t.dump(), "memory.size=256M\nname=vm\n");
    }
}
