//! What the API's OpenAPI document says about each operation, and which
//! operation a request is.
//!
//! An operation's protection comes from its extensions:
//! `x-idempotency: required | optional | off`, or `x-side-effects:
//! transactional`, which means required. Without either, `POST` and `PATCH`
//! are optional (protected when the client sends a key) and every other
//! method passes through.
//!
//! Paths are matched as OpenAPI means them: relative to the path of the
//! document's `servers` (`/v1` for `https://api.example.com/v1`), segment by
//! segment, a template variable (`{id}`, or part of a segment as in
//! `{name}.json`) standing for one non-empty segment, and a concrete path
//! chosen before a templated one (`/orders/mine` before `/orders/{id}`).

use std::{borrow::Cow, collections::HashMap, fmt, path::Path, sync::Arc};

use http::Method;
use percent_encoding::percent_decode_str;
use serde_json::Value;

/// What the gateway does with requests for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// A request without `Idempotency-Key` is rejected with 400 and never
    /// reaches the upstream.
    Required,
    /// Protected when the request carries a key, passed through when not.
    Optional,
    /// Passed through; a key is forwarded but not acted on.
    Off,
}

impl Protection {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "required" => Some(Protection::Required),
            "optional" => Some(Protection::Optional),
            "off" => Some(Protection::Off),
            _ => None,
        }
    }

    /// The protection of an operation the document leaves unmarked.
    pub fn default_for(method: &Method) -> Self {
        if method == Method::POST || method == Method::PATCH {
            Protection::Optional
        } else {
            Protection::Off
        }
    }

    /// `required`, `optional` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Required => "required",
            Protection::Optional => "optional",
            Protection::Off => "off",
        }
    }
}

/// Which operation of the document a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matched {
    /// A described operation: its path template (with the servers' prefix)
    /// and protection.
    Operation {
        /// The template, as the document writes it, prefix included.
        template: Arc<str>,
        /// What to do with it.
        protection: Protection,
    },
    /// A described path, but not with this method.
    UndescribedMethod {
        /// The path's template.
        template: Arc<str>,
        /// The methods the document describes for it, for `Allow`.
        allow: Arc<str>,
        /// What an unmarked operation with the method would get
        /// ([`Protection::default_for`]).
        default: Protection,
    },
    /// A path the document does not describe.
    UnknownPath,
}

/// Why a document cannot be used.
#[derive(Debug)]
pub struct SpecError(String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

fn error(message: impl Into<String>) -> SpecError {
    SpecError(message.into())
}

/// The operations of one OpenAPI document, ready to match requests.
#[derive(Debug, Clone)]
pub struct Api {
    /// The servers' path prefixes, without a trailing slash (`""` for none).
    prefixes: Vec<String>,
    /// The same, normalised into segments once, for matching.
    prefix_segments: Vec<Vec<String>>,
    /// Most specific first.
    routes: Vec<Route>,
    /// Whether literal text is compared case-sensitively (by default it is
    /// not: Express and ASP.NET Core route `/Orders` to `/orders`).
    case_sensitive: bool,
}

#[derive(Debug, Clone)]
struct Route {
    template: Arc<str>,
    /// The template under each of the servers' prefixes, in their order.
    prefixed: Vec<Arc<str>>,
    segments: Vec<Segment>,
    operations: Vec<(Method, Protection)>,
    allow: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    /// Literal text and variables; at least one variable.
    Pattern(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Part {
    Text(String),
    Variable,
}

const METHODS: [(&str, Method); 8] = [
    ("get", Method::GET),
    ("put", Method::PUT),
    ("post", Method::POST),
    ("delete", Method::DELETE),
    ("options", Method::OPTIONS),
    ("head", Method::HEAD),
    ("patch", Method::PATCH),
    ("trace", Method::TRACE),
];

impl Api {
    /// Reads and parses the document at `path` (YAML or JSON, by content).
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
        Api::parse(&text).map_err(|e| error(format!("{}: {e}", path.display())))
    }

    /// Parses a document (YAML or JSON: JSON is YAML).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let doc: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| error(format!("not valid JSON: {e}")))?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| error(format!("not valid YAML: {e}")))?
        };
        Api::from_document(&doc)
    }

    /// The operations of an already parsed document.
    pub fn from_document(doc: &Value) -> Result<Self, SpecError> {
        let version = match doc.get("openapi") {
            Some(Value::String(v)) => v.as_str(),
            Some(_) => return Err(error("`openapi` must be a string such as \"3.1.0\"")),
            None if doc.get("swagger").is_some() => {
                return Err(error(
                    "a Swagger 2.0 document: convert it to OpenAPI 3.0 or 3.1",
                ));
            }
            None => return Err(error("no `openapi` field: not an OpenAPI 3 document")),
        };
        if !(version.starts_with("3.0") || version.starts_with("3.1")) {
            return Err(error(format!(
                "OpenAPI {version} is not supported: use 3.0 or 3.1"
            )));
        }
        let prefixes = server_prefixes(doc)?;
        let paths = match doc.get("paths") {
            Some(Value::Object(paths)) => paths,
            Some(_) => return Err(error("`paths` must be a map")),
            None => return Err(error("no `paths`: the document describes no operation")),
        };
        let mut routes = Vec::with_capacity(paths.len());
        let mut shapes: HashMap<Vec<Segment>, Arc<str>> = HashMap::new();
        for (template, item) in paths {
            if template.starts_with("x-") {
                continue;
            }
            let segments = parse_template(template)?;
            let item = resolve(doc, item, template)?;
            let Value::Object(item) = item else {
                return Err(error(format!("path {template}: must be a map")));
            };
            let mut operations = Vec::new();
            for (name, method) in &METHODS {
                let Some(operation) = item.get(*name) else {
                    continue;
                };
                let protection = operation_protection(operation, method)
                    .map_err(|e| error(format!("{} {template}: {e}", method.as_str())))?;
                operations.push((method.clone(), protection));
            }
            let template: Arc<str> = Arc::from(template.as_str());
            if let Some(other) = shapes.insert(segments.clone(), template.clone()) {
                return Err(error(format!(
                    "paths {other} and {template} are the same template with different variable names"
                )));
            }
            let allow: Vec<&str> = operations.iter().map(|(m, _)| m.as_str()).collect();
            let prefixed = prefixes
                .iter()
                .map(|prefix| {
                    if prefix.is_empty() {
                        template.clone()
                    } else {
                        Arc::from(format!("{prefix}{template}"))
                    }
                })
                .collect();
            routes.push(Route {
                template,
                prefixed,
                segments,
                allow: Arc::from(allow.join(", ")),
                operations,
            });
        }
        routes.sort_by(|a, b| {
            let rank = |r: &Route| r.segments.iter().map(Segment::rank).collect::<Vec<_>>();
            rank(a)
                .cmp(&rank(b))
                .then_with(|| a.template.cmp(&b.template))
        });
        let prefix_segments = prefixes
            .iter()
            .map(|p| normalize(p).into_iter().map(|s| s.into_owned()).collect())
            .collect();
        Ok(Api {
            prefixes,
            prefix_segments,
            routes,
            case_sensitive: true,
        }
        .with_case_sensitive_paths(false))
    }

    /// Compares the literal text of paths case-sensitively (`true`) or not
    /// (`false`, the default).
    #[must_use]
    pub fn with_case_sensitive_paths(mut self, case_sensitive: bool) -> Self {
        if self.case_sensitive == case_sensitive {
            return self;
        }
        self.case_sensitive = case_sensitive;
        let fold = |text: &str| {
            if case_sensitive {
                text.to_owned()
            } else {
                text.to_lowercase()
            }
        };
        self.prefix_segments = self
            .prefixes
            .iter()
            .map(|p| normalize(p).iter().map(|s| fold(s)).collect())
            .collect();
        for route in &mut self.routes {
            route.segments = parse_template(&route.template)
                .expect("parsed once already")
                .into_iter()
                .map(|segment| segment.folded(&fold))
                .collect();
        }
        self
    }

    /// The operation `method` on `path` (the request's path, still
    /// percent-encoded) is, read as [`route::canonical`](crate::route::canonical)
    /// reads it; a path it refuses matches nothing.
    pub fn match_request(&self, method: &Method, path: &str) -> Matched {
        match crate::route::canonical_path(path) {
            Ok(path) => self.decide(method, &[], &path.segments),
            Err(_) => Matched::UnknownPath,
        }
    }

    /// The operation a request is, reading it every way an upstream might:
    /// as `method` and as each override, and as the path, the path without
    /// its `;` parameters, without a format suffix (`.json`) on its last
    /// segment, and without both. Of the operations found, the strictest
    /// protection wins (`required`, then `optional`, then `off`); on a tie,
    /// the plain reading. `UnknownPath` only when no reading matches.
    pub fn decide<'s>(
        &self,
        method: &Method,
        overrides: &[Method],
        segments: &'s [crate::route::PathSegment],
    ) -> Matched {
        // Borrowed unless lower-casing changes something.
        let fold = |text: &'s str| -> Cow<'s, str> {
            if self.case_sensitive
                || text
                    .bytes()
                    .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
            {
                Cow::Borrowed(text)
            } else {
                Cow::Owned(text.to_lowercase())
            }
        };
        let plain: Vec<Cow<'_, str>> = segments.iter().map(|s| fold(&s.decoded)).collect();
        let mut readings = vec![plain];
        if segments.iter().any(|s| s.params_at.is_some()) {
            let bare = segments.iter().map(|s| fold(s.without_params())).collect();
            readings.push(bare);
        }
        for i in 0..readings.len() {
            if let Some(stripped) = without_suffix(&readings[i]) {
                readings.push(stripped);
            }
        }
        let mut best: Option<(u8, Matched)> = None;
        for method in std::iter::once(method).chain(overrides) {
            for reading in &readings {
                let matched = self.match_segments(method, reading);
                let rank = matched.rank();
                if best.as_ref().is_none_or(|(top, _)| rank > *top) {
                    best = Some((rank, matched));
                }
            }
        }
        best.map_or(Matched::UnknownPath, |(_, matched)| matched)
    }

    fn match_segments(&self, method: &Method, segments: &[Cow<'_, str>]) -> Matched {
        for (at, prefix_segments) in self.prefix_segments.iter().enumerate() {
            let starts = segments.len() >= prefix_segments.len()
                && segments
                    .iter()
                    .zip(prefix_segments)
                    .all(|(s, p)| **s == **p);
            if !starts {
                continue;
            }
            let rest = &segments[prefix_segments.len()..];
            for route in &self.routes {
                if route.matches(rest) {
                    return route.operation(at, method);
                }
            }
        }
        Matched::UnknownPath
    }

    /// Every described operation, for the summary printed at start:
    /// method, template and protection.
    pub fn operations(&self) -> impl Iterator<Item = (&Method, &str, Protection)> {
        self.routes.iter().flat_map(|route| {
            route
                .operations
                .iter()
                .map(|(method, protection)| (method, &*route.template, *protection))
        })
    }

    /// The servers' path prefixes the templates are relative to.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

/// `segments` with a format suffix (`.json`) taken off the last one, if it
/// has one and something is left before it.
fn without_suffix<'s>(segments: &[Cow<'s, str>]) -> Option<Vec<Cow<'s, str>>> {
    let last = segments.last()?;
    let dot = last
        .rfind('.')
        .filter(|at| *at > 0 && *at + 1 < last.len())?;
    let mut stripped = segments.to_vec();
    let end = stripped.len() - 1;
    stripped[end].to_mut().truncate(dot);
    Some(stripped)
}

impl Matched {
    /// How strictly the gateway must treat a request matched so.
    fn rank(&self) -> u8 {
        let protection = match self {
            Matched::Operation { protection, .. } => *protection,
            Matched::UndescribedMethod { default, .. } => *default,
            Matched::UnknownPath => return 0,
        };
        match protection {
            Protection::Off => 1,
            Protection::Optional => 2,
            Protection::Required => 3,
        }
    }
}

impl Route {
    fn matches(&self, segments: &[Cow<'_, str>]) -> bool {
        self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(pattern, segment)| pattern.matches(segment))
    }

    fn operation(&self, prefix: usize, method: &Method) -> Matched {
        let template = self.prefixed[prefix].clone();
        // HEAD is answered like GET where only GET is described.
        let found = self
            .operations
            .iter()
            .find(|(m, _)| m == method)
            .or_else(|| {
                (method == Method::HEAD)
                    .then(|| self.operations.iter().find(|(m, _)| m == Method::GET))
                    .flatten()
            });
        match found {
            Some((_, protection)) => Matched::Operation {
                template,
                protection: *protection,
            },
            None => Matched::UndescribedMethod {
                template,
                allow: self.allow.clone(),
                default: Protection::default_for(method),
            },
        }
    }
}

impl Segment {
    /// Concrete before partly templated before wholly templated.
    fn rank(&self) -> u8 {
        match self {
            Segment::Literal(_) => 0,
            Segment::Pattern(parts) if parts.len() > 1 => 1,
            Segment::Pattern(_) => 2,
        }
    }

    fn matches(&self, segment: &str) -> bool {
        match self {
            Segment::Literal(text) => text == segment,
            Segment::Pattern(parts) => !segment.is_empty() && match_parts(parts, segment),
        }
    }

    /// The segment with its literal text passed through `fold`.
    fn folded(self, fold: &dyn Fn(&str) -> String) -> Self {
        match self {
            Segment::Literal(text) => Segment::Literal(fold(&text)),
            Segment::Pattern(parts) => Segment::Pattern(
                parts
                    .into_iter()
                    .map(|part| match part {
                        Part::Text(text) => Part::Text(fold(&text)),
                        Part::Variable => Part::Variable,
                    })
                    .collect(),
            ),
        }
    }
}

/// A servers' prefix as segments: each percent-decoded, empty segments and
/// `.` dropped, `..` taking the previous segment away.
fn normalize(path: &str) -> Vec<std::borrow::Cow<'_, str>> {
    let mut segments = Vec::new();
    for raw in path.split('/') {
        let segment = percent_decode_str(raw).decode_utf8_lossy();
        match &*segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    segments
}

/// Whether `text` is `parts`, each variable standing for one or more
/// characters, in time linear in the text: literal text and variables
/// alternate, so the first literal must be a prefix, the last a suffix,
/// and each one between is taken at its leftmost place after at least one
/// character (which leaves the most room for the rest, so no other choice
/// can match where that one does not).
fn match_parts(parts: &[Part], text: &str) -> bool {
    let mut parts = parts;
    let mut rest = text;
    if let Some((Part::Text(first), after)) = parts.split_first() {
        let Some(tail) = rest.strip_prefix(first.as_str()) else {
            return false;
        };
        rest = tail;
        parts = after;
    }
    if let Some((Part::Text(last), before)) = parts.split_last() {
        let Some(head) = rest.strip_suffix(last.as_str()) else {
            return false;
        };
        rest = head;
        parts = before;
    }
    // Left: variable, (text, variable)*; or nothing for a pattern that was
    // a single text (never built: a pattern has a variable).
    for part in parts {
        match part {
            Part::Variable => {
                let mut chars = rest.chars();
                if chars.next().is_none() {
                    return false;
                }
                rest = chars.as_str();
            }
            Part::Text(literal) => match rest.find(literal.as_str()) {
                Some(at) => rest = &rest[at + literal.len()..],
                None => return false,
            },
        }
    }
    true
}

fn parse_template(template: &str) -> Result<Vec<Segment>, SpecError> {
    let Some(rest) = template.strip_prefix('/') else {
        return Err(error(format!("path {template:?}: must start with `/`")));
    };
    if template.contains('?') || template.contains('#') {
        return Err(error(format!(
            "path {template:?}: a path has no query or fragment"
        )));
    }
    rest.split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| parse_segment(segment, template))
        .collect()
}

fn parse_segment(segment: &str, template: &str) -> Result<Segment, SpecError> {
    if !segment.contains(['{', '}']) {
        return Ok(Segment::Literal(segment.to_owned()));
    }
    let mut parts = Vec::new();
    let mut rest = segment;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let Some(end) = rest.find('}') else {
                    return Err(error(format!("path {template}: `{{` without `}}`")));
                };
                let name = &rest[1..end];
                if name.is_empty() || name.contains('{') {
                    return Err(error(format!(
                        "path {template}: a variable needs a name, as in `{{id}}`"
                    )));
                }
                if parts.last() == Some(&Part::Variable) {
                    return Err(error(format!(
                        "path {template}: two variables with nothing between them cannot be told apart"
                    )));
                }
                parts.push(Part::Variable);
                rest = &rest[end + 1..];
            }
            found => {
                let end = found.unwrap_or(rest.len());
                let text = &rest[..end];
                if text.contains('}') {
                    return Err(error(format!("path {template}: `}}` without `{{`")));
                }
                parts.push(Part::Text(text.to_owned()));
                rest = &rest[end..];
            }
        }
    }
    Ok(Segment::Pattern(parts))
}

/// A path item, following a local `$ref` (`#/components/pathItems/...`).
fn resolve<'a>(doc: &'a Value, item: &'a Value, template: &str) -> Result<&'a Value, SpecError> {
    let mut item = item;
    for _ in 0..8 {
        let Some(reference) = item.get("$ref") else {
            return Ok(item);
        };
        let Some(pointer) = reference.as_str().and_then(|r| r.strip_prefix('#')) else {
            return Err(error(format!(
                "path {template}: only references within the document (`#/...`) are followed"
            )));
        };
        item = doc.pointer(pointer).ok_or_else(|| {
            error(format!(
                "path {template}: reference {reference} names nothing"
            ))
        })?;
    }
    Err(error(format!(
        "path {template}: references go round in a loop"
    )))
}

fn operation_protection(operation: &Value, method: &Method) -> Result<Protection, String> {
    let Value::Object(operation) = operation else {
        return Err("an operation must be a map".into());
    };
    let stated =
        match operation.get("x-idempotency") {
            None => None,
            Some(Value::String(value)) => Some(Protection::parse(value).ok_or_else(|| {
                format!("x-idempotency is {value:?}: use required, optional or off")
            })?),
            Some(other) => {
                return Err(format!(
                    "x-idempotency is {other}: use required, optional or off"
                ));
            }
        };
    let transactional = match operation.get("x-side-effects") {
        None => false,
        Some(Value::String(value)) => value == "transactional",
        Some(other) => return Err(format!("x-side-effects is {other}: expected a string")),
    };
    match (stated, transactional) {
        (Some(protection), false) => Ok(protection),
        (Some(Protection::Required) | None, true) => Ok(Protection::Required),
        (Some(protection), true) => Err(format!(
            "x-idempotency: {} contradicts x-side-effects: transactional, which means required",
            protection.as_str()
        )),
        (None, false) => Ok(Protection::default_for(method)),
    }
}

/// The path of every server URL (`""` when the document has none, or only
/// `/`): `https://api.example.com/v1` and `/v1` both give `/v1`; variables
/// take their defaults.
fn server_prefixes(doc: &Value) -> Result<Vec<String>, SpecError> {
    let Some(servers) = doc.get("servers") else {
        return Ok(vec![String::new()]);
    };
    let Value::Array(servers) = servers else {
        return Err(error("`servers` must be a list"));
    };
    let mut prefixes = Vec::new();
    for server in servers {
        let Some(url) = server.get("url").and_then(Value::as_str) else {
            return Err(error("every server needs a `url`"));
        };
        let mut url = url.to_owned();
        if let Some(Value::Object(variables)) = server.get("variables") {
            for (name, variable) in variables {
                let Some(default) = variable.get("default").and_then(Value::as_str) else {
                    return Err(error(format!(
                        "server {url}: variable {name} has no default"
                    )));
                };
                url = url.replace(&format!("{{{name}}}"), default);
            }
        }
        if url.contains('{') {
            return Err(error(format!(
                "server {url}: a variable without a definition"
            )));
        }
        let path = match url.find("://") {
            Some(scheme) => {
                let after = &url[scheme + 3..];
                after.find('/').map_or("", |at| &after[at..])
            }
            None => url.as_str(),
        };
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if !path.is_empty() && !path.starts_with('/') {
            return Err(error(format!(
                "server {url}: a relative URL other than a path is not supported"
            )));
        }
        if !prefixes.iter().any(|p| p == path) {
            prefixes.push(path.to_owned());
        }
    }
    if prefixes.is_empty() {
        prefixes.push(String::new());
    }
    // The longest first, so `/v1/admin` is tried before `/v1`.
    prefixes.sort_by_key(|p| std::cmp::Reverse(p.len()));
    Ok(prefixes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DOC: &str = r#"
openapi: 3.1.0
info: { title: Clinic, version: "1" }
servers:
  - url: https://clinic.example/{base}
    variables: { base: { default: api } }
paths:
  /appointments:
    get: {}
    post:
      x-side-effects: transactional
  /appointments/{id}:
    patch: {}
    delete:
      x-idempotency: required
  /appointments/mine:
    post:
      x-idempotency: "off"
  /reports/{name}.pdf:
    get: {}
    put:
      x-idempotency: optional
"#;

    fn op(api: &Api, method: Method, path: &str) -> Matched {
        api.match_request(&method, path)
    }

    fn protected(template: &str, protection: Protection) -> Matched {
        Matched::Operation {
            template: Arc::from(template),
            protection,
        }
    }

    #[test]
    fn operations_take_their_protection_from_the_document_or_the_method() {
        let api = Api::parse(DOC).unwrap();
        assert_eq!(
            op(&api, Method::POST, "/api/appointments"),
            protected("/api/appointments", Protection::Required)
        );
        assert_eq!(
            op(&api, Method::GET, "/api/appointments"),
            protected("/api/appointments", Protection::Off)
        );
        assert_eq!(
            op(&api, Method::PATCH, "/api/appointments/42"),
            protected("/api/appointments/{id}", Protection::Optional)
        );
        assert_eq!(
            op(&api, Method::DELETE, "/api/appointments/42"),
            protected("/api/appointments/{id}", Protection::Required)
        );
        assert_eq!(
            op(&api, Method::HEAD, "/api/appointments"),
            protected("/api/appointments", Protection::Off)
        );
    }

    #[test]
    fn a_concrete_path_wins_over_a_template() {
        let api = Api::parse(DOC).unwrap();
        assert_eq!(
            op(&api, Method::POST, "/api/appointments/mine"),
            protected("/api/appointments/mine", Protection::Off)
        );
        // The concrete path is the request's path item: a method it lacks
        // is not borrowed from the template.
        assert!(matches!(
            op(&api, Method::PATCH, "/api/appointments/mine"),
            Matched::UndescribedMethod { .. }
        ));
    }

    #[test]
    fn variables_stand_for_one_non_empty_segment_or_part_of_one() {
        let api = Api::parse(DOC).unwrap();
        assert_eq!(
            op(&api, Method::PUT, "/api/reports/june.pdf"),
            protected("/api/reports/{name}.pdf", Protection::Optional)
        );
        for path in [
            "/api/reports/.pdf",
            "/api/reports/june.txt",
            "/api/appointments/1/2",
            "/appointments",
            "/apiappointments",
            "/api",
        ] {
            assert_eq!(op(&api, Method::POST, path), Matched::UnknownPath, "{path}");
        }
        // Spellings a server routes to the same place match the same.
        for path in [
            "/api/appointments/",
            "//api//appointments",
            "/api/./appointments",
            "/api/x/../appointments",
        ] {
            assert_eq!(
                op(&api, Method::POST, path),
                protected("/api/appointments", Protection::Required),
                "{path}"
            );
        }
        // Percent-encoded request paths are decoded before comparing.
        assert_eq!(
            op(&api, Method::POST, "/api/appoint%6Dents"),
            protected("/api/appointments", Protection::Required)
        );
        // An encoded `/` is refused before matching (see `route`).
        assert_eq!(
            op(&api, Method::PATCH, "/api/appointments/a%2Fb"),
            Matched::UnknownPath
        );
    }

    /// The spellings upstream frameworks route to a protected operation:
    /// every one is that operation.
    #[test]
    fn every_spelling_of_a_protected_operation_is_that_operation() {
        let api = Api::parse(DOC).unwrap();
        let decide = |method: &str, path: &str, overrides: &[&str]| {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let uri: http::Uri = path.parse().unwrap();
            let mut headers = http::HeaderMap::new();
            for value in overrides {
                headers.append("x-http-method-override", value.parse().unwrap());
            }
            let c = crate::route::canonical(&method, &uri, &headers).unwrap();
            api.decide(&c.method, &c.overrides, &c.path.segments)
        };
        let book = protected("/api/appointments", Protection::Required);
        let cancel = protected("/api/appointments/{id}", Protection::Required);
        for (method, path) in [
            ("post", "/api/appointments"),
            ("Post", "/api/appointments"),
            ("POST", "/api/Appointments"),
            ("POST", "/API/APPOINTMENTS/"),
            ("POST", "/api/appointments;jsessionid=1"),
            ("POST", "/api/appointments.json"),
            ("POST", "/api/appointments.json;v=1"),
            ("POST", "/api/./appointments;v=1"),
            ("POST", "/api/%61ppointments"),
            ("POST", "/../api/appointments"),
            ("POST", "/%2e%2e/api/appointments"),
        ] {
            assert_eq!(decide(method, path, &[]), book, "{method} {path}");
        }
        for (method, path, overrides) in [
            ("delete", "/api/appointments/42", &[][..]),
            ("DELETE", "/api/Appointments/42;x=1", &[]),
            ("DELETE", "/api/appointments/42.json", &[]),
            ("POST", "/api/appointments/42", &["DELETE"]),
            ("POST", "/api/appointments/42", &["delete"]),
            ("POST", "/api/appointments/42?_method=DELETE", &[]),
            ("GET", "/api/appointments/42?_method=delete", &[]),
        ] {
            assert_eq!(
                decide(method, path, overrides),
                cancel,
                "{method} {path} {overrides:?}"
            );
        }
        // A literal that is described wins for the plain reading, and the
        // strictest reading wins over it only when stricter.
        assert_eq!(
            decide("PUT", "/api/reports/june.pdf", &[]),
            protected("/api/reports/{name}.pdf", Protection::Optional)
        );
        assert_eq!(
            decide("GET", "/api/appointments.json", &[]),
            protected("/api/appointments", Protection::Off)
        );
    }

    #[test]
    fn paths_can_be_matched_case_sensitively() {
        let api = Api::parse(DOC).unwrap().with_case_sensitive_paths(true);
        assert_eq!(
            op(&api, Method::POST, "/api/Appointments"),
            Matched::UnknownPath
        );
        assert_eq!(
            op(&api, Method::POST, "/api/appointments"),
            protected("/api/appointments", Protection::Required)
        );
        let api = api.with_case_sensitive_paths(false);
        assert_eq!(
            op(&api, Method::POST, "/API/Appointments"),
            protected("/api/appointments", Protection::Required)
        );
    }

    /// Templates with several variables in one segment match in linear
    /// time: a backtracking matcher takes hours on these.
    #[test]
    fn many_variables_in_one_segment_match_in_linear_time() {
        let api = Api::parse(
            "openapi: 3.1.0\npaths:\n  /reports/{a}-{b}-{c}.pdf:\n    post: { x-idempotency: required }\n  /r/{year}-{month}.pdf:\n    post: {}\n",
        )
        .unwrap();
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let long = "-".repeat(64 * 1024);
            let miss = format!("/reports/{long}x");
            let hit = format!("/reports/{long}.pdf");
            let other = format!("/r/{}", "-".repeat(64 * 1024));
            let results = (
                api.match_request(&Method::POST, &miss),
                api.match_request(&Method::POST, &hit),
                api.match_request(&Method::POST, &other),
                api.match_request(&Method::POST, "/reports/2026-12-01.pdf"),
                api.match_request(&Method::POST, "/reports/2026--01.pdf"),
            );
            let _ = done.send(results);
        });
        let (miss, hit, other, plain, empty) = wait
            .recv_timeout(Duration::from_secs(60))
            .expect("matching a long segment did not finish");
        assert_eq!(miss, Matched::UnknownPath);
        assert_eq!(
            hit,
            protected("/reports/{a}-{b}-{c}.pdf", Protection::Required)
        );
        assert_eq!(other, Matched::UnknownPath);
        assert_eq!(
            plain,
            protected("/reports/{a}-{b}-{c}.pdf", Protection::Required)
        );
        // `2026--01` has no split into three non-empty variables.
        assert_eq!(empty, Matched::UnknownPath);
    }

    #[test]
    fn json_documents_and_documents_without_servers() {
        let api = Api::parse(
            r#"{"openapi":"3.0.3","paths":{"/pay":{"post":{"x-idempotency":"required"}}}}"#,
        )
        .unwrap();
        assert_eq!(
            op(&api, Method::POST, "/pay"),
            protected("/pay", Protection::Required)
        );
        assert_eq!(api.prefixes(), [String::new()]);
    }

    #[test]
    fn path_item_references_are_followed() {
        let api = Api::parse(
            r##"
openapi: 3.1.0
paths:
  /pay:
    $ref: "#/components/pathItems/pay"
components:
  pathItems:
    pay:
      post: { x-idempotency: required }
"##,
        )
        .unwrap();
        assert_eq!(
            op(&api, Method::POST, "/pay"),
            protected("/pay", Protection::Required)
        );
    }

    #[test]
    fn bad_documents_are_named() {
        let cases = [
            ("swagger: '2.0'\npaths: {}", "Swagger 2.0"),
            (
                "openapi: 2.5.0\npaths: {}",
                "OpenAPI 2.5.0 is not supported",
            ),
            ("openapi: 3.1.0", "no `paths`"),
            ("openapi: 3.1.0\npaths: []", "`paths` must be a map"),
            (
                "openapi: 3.1.0\npaths:\n  /a:\n    post: { x-idempotency: always }",
                "POST /a: x-idempotency is \"always\"",
            ),
            (
                "openapi: 3.1.0\npaths:\n  /a:\n    post: { x-idempotency: optional, x-side-effects: transactional }",
                "contradicts",
            ),
            (
                "openapi: 3.1.0\npaths:\n  /a/{x}: {}\n  /a/{y}: {}",
                "same template",
            ),
            ("openapi: 3.1.0\npaths:\n  a: {}", "must start with `/`"),
            ("openapi: 3.1.0\npaths:\n  /a/{x: {}", "without `}`"),
            (
                "openapi: 3.1.0\npaths:\n  /a/{x}{y}: {}",
                "cannot be told apart",
            ),
            (
                "openapi: 3.1.0\npaths:\n  /a:\n    $ref: other.yaml#/a",
                "only references within",
            ),
            (
                "openapi: 3.1.0\nservers:\n  - url: /{v}\npaths: {}",
                "without a definition",
            ),
            ("openapi: [3", "not valid YAML"),
            ("{\"openapi\": ", "not valid JSON"),
        ];
        for (doc, expected) in cases {
            let err = Api::parse(doc).expect_err(doc).to_string();
            assert!(err.contains(expected), "{doc:?}: {err}");
        }
    }
}
