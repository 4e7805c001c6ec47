//! Rules for Envoy's rate-limit protocol: which key, unit and limit a descriptor is counted against.
//!
//! A rule has a domain and a pattern of descriptor entries, matched in order and in full: each entry's key
//! must be equal, and its value equal or, in the pattern, absent (a wildcard). Of the rules that match, the
//! most specific wins: the most exact values, then the name (so the answer never depends on load order).
//! Its key template names the key: `{entry key}` is replaced by that entry's value, `{domain}` by the domain.

use std::fmt;

use super::{InvalidArgument, KeyId, LimitName, LimitSpec, Unit};

/// Most entries in a rule's pattern and in a descriptor.
pub const MAX_PATTERN_ENTRIES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PatternEntry {
    pub key: String,
    /// `None`: any value.
    pub value: Option<String>,
}

/// A validated key template: literal text and `{placeholders}` naming pattern keys or `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate(String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Slot(&'a str),
}

fn pieces(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(Piece::Text(&rest[..open]));
        }
        let close = rest[open..].find('}').ok_or("a { has no closing }")? + open;
        let slot = &rest[open + 1..close];
        if slot.is_empty() || slot.contains('{') {
            return Err("placeholders are {name}, with a non-empty name".into());
        }
        out.push(Piece::Slot(slot));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err("a } has no opening {".into());
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

impl KeyTemplate {
    pub fn parse(template: impl Into<String>, pattern: &[PatternEntry]) -> Result<Self, InvalidArgument> {
        let template = template.into();
        let bad = |reason: String| InvalidArgument::new("key_template", reason);
        if template.is_empty() {
            return Err(bad("must not be empty".into()));
        }
        for piece in pieces(&template).map_err(bad)? {
            if let Piece::Slot(name) = piece
                && name != "domain"
                && !pattern.iter().any(|e| e.key == name)
            {
                return Err(bad(format!("{{{name}}} names no entry of the pattern (nor the domain)")));
            }
        }
        Ok(Self(template))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key for a matched descriptor.
    pub fn render(&self, domain: &str, entries: &[(String, String)]) -> Result<KeyId, InvalidArgument> {
        let mut key = String::new();
        for piece in pieces(&self.0).unwrap_or_default() {
            match piece {
                Piece::Text(t) => key.push_str(t),
                Piece::Slot("domain") => key.push_str(domain),
                Piece::Slot(name) => {
                    key.push_str(entries.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str()))
                }
            }
        }
        KeyId::parse(key)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One rule, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique; also what metrics are labelled with.
    pub name: LimitName,
    pub domain: String,
    pub pattern: Vec<PatternEntry>,
    pub key_template: KeyTemplate,
    pub unit: Unit,
    /// The rate limit of the key counted: its own or its plan's of this name, else `default`.
    pub limit_name: LimitName,
    /// Used when the key has no rate limit of that name. A rate limit (burst set) named `limit_name`.
    pub default: Option<LimitSpec>,
    /// Count and report, never deny.
    pub shadow: bool,
}

fn check_text(field: &'static str, value: &str) -> Result<(), InvalidArgument> {
    if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(field, "must be 1 to 128 bytes without control characters"));
    }
    Ok(())
}

impl Rule {
    pub fn check(self) -> Result<Self, InvalidArgument> {
        check_text("domain", &self.domain)?;
        if self.pattern.is_empty() || self.pattern.len() > MAX_PATTERN_ENTRIES {
            return Err(InvalidArgument::new("pattern", format!("needs 1 to {MAX_PATTERN_ENTRIES} entries")));
        }
        for (i, e) in self.pattern.iter().enumerate() {
            check_text("key", &e.key).map_err(|e| e.within(&format!("pattern[{i}]")))?;
            if let Some(v) = &e.value {
                check_text("value", v).map_err(|e| e.within(&format!("pattern[{i}]")))?;
            }
        }
        if let Some(d) = &self.default
            && (!d.is_rate() || d.amount.is_none() || d.name != self.limit_name)
        {
            return Err(InvalidArgument::new(
                "default",
                "must be a rate limit (amount and burst) named limit_name",
            ));
        }
        Ok(self)
    }

    pub fn matches(&self, domain: &str, entries: &[(String, String)]) -> bool {
        self.domain == domain
            && self.pattern.len() == entries.len()
            && self
                .pattern
                .iter()
                .zip(entries)
                .all(|(p, (k, v))| p.key == *k && p.value.as_ref().is_none_or(|pv| pv == v))
    }

    /// As the audit trail records it.
    pub fn audit_json(&self) -> serde_json::Value {
        serde_json::json!({
            "domain": self.domain,
            "pattern": self.pattern,
            "key_template": self.key_template.as_str(),
            "unit": self.unit.as_str(),
            "limit_name": self.limit_name.as_str(),
            "default": self.default.as_ref().map(LimitSpec::audit_json),
            "shadow": self.shadow,
        })
    }

    fn exact_values(&self) -> usize {
        self.pattern.iter().filter(|e| e.value.is_some()).count()
    }
}

/// The rule a descriptor is counted under: the most specific that matches.
pub fn select<'a>(rules: &'a [Rule], domain: &str, entries: &[(String, String)]) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.matches(domain, entries))
        .max_by(|a, b| a.exact_values().cmp(&b.exact_values()).then_with(|| b.name.cmp(&a.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: Option<&str>) -> PatternEntry {
        PatternEntry { key: key.into(), value: value.map(Into::into) }
    }

    fn rule(name: &str, pattern: Vec<PatternEntry>, template: &str) -> Rule {
        Rule {
            name: LimitName::parse(name).unwrap(),
            domain: "edge".into(),
            key_template: KeyTemplate::parse(template, &pattern).unwrap(),
            pattern,
            unit: Unit::parse("requests").unwrap(),
            limit_name: LimitName::parse("api").unwrap(),
            default: None,
            shadow: false,
        }
        .check()
        .unwrap()
    }

    fn desc(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_most_specific_matching_rule_wins_and_names_the_key() {
        let rules = vec![
            rule("any-key", vec![entry("api_key", None)], "{domain}/{api_key}"),
            rule("vip", vec![entry("api_key", Some("vip-1"))], "vip"),
            rule("path", vec![entry("api_key", None), entry("path", Some("/pay"))], "{api_key}{path}"),
        ];
        let pick = |d: &[(&str, &str)]| select(&rules, "edge", &desc(d)).map(|r| r.name.to_string());
        assert_eq!(pick(&[("api_key", "k1")]).as_deref(), Some("any-key"));
        assert_eq!(pick(&[("api_key", "vip-1")]).as_deref(), Some("vip"));
        assert_eq!(pick(&[("api_key", "k1"), ("path", "/pay")]).as_deref(), Some("path"));
        assert_eq!(pick(&[("api_key", "k1"), ("path", "/other")]), None, "entries match in full");
        assert_eq!(pick(&[("path", "/pay"), ("api_key", "k1")]), None, "and in order");
        assert!(select(&rules, "other-domain", &desc(&[("api_key", "k1")])).is_none());
        let key =
            rules[2].key_template.render("edge", &desc(&[("api_key", "k1"), ("path", "/pay")])).unwrap();
        assert_eq!(key.as_str(), "k1/pay");
        assert_eq!(
            rules[0].key_template.render("edge", &desc(&[("api_key", "k")])).unwrap().as_str(),
            "edge/k"
        );
    }

    #[test]
    fn templates_name_only_pattern_keys() {
        let pattern = vec![entry("api_key", None)];
        assert!(KeyTemplate::parse("{api_key}", &pattern).is_ok());
        assert_eq!(KeyTemplate::parse("{user}", &pattern).unwrap_err().field, "key_template");
        assert!(KeyTemplate::parse("{api_key", &pattern).is_err());
        assert!(KeyTemplate::parse("api_key}", &pattern).is_err());
        assert!(KeyTemplate::parse("{}", &pattern).is_err());
        assert!(KeyTemplate::parse("", &pattern).is_err());
    }
}
