//! Checks real API responses against docs/api/openapi.json: every field a
//! response carries must be described (an object's undocumented field is an
//! error unless its schema allows more), with the documented type.
//!
//! Covers the part of OpenAPI 3.0 the document uses: `$ref`, `type`,
//! `properties`, `required`, `additionalProperties`, `items`, `enum`,
//! `nullable`, `oneOf`, `allOf` (of objects), `minimum`, `maximum`.

use serde_json::Value;

pub const OPENAPI: &str = include_str!("../../../../docs/api/openapi.json");

pub struct Doc(Value);

impl Doc {
    pub fn load() -> Doc {
        Doc(serde_json::from_str(OPENAPI).expect("openapi.json is JSON"))
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let mut s = schema;
        while let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let path = r.strip_prefix("#/").expect("local $ref");
            s = path.split('/').fold(&self.0, |v, k| &v[k]);
            assert!(!s.is_null(), "dangling $ref {r}");
        }
        s
    }

    /// The schema of the JSON body `method path` answers with `status`.
    pub fn response_schema(&self, method: &str, path: &str, status: u16) -> &Value {
        let op = &self.0["paths"][path][method.to_lowercase()];
        assert!(!op.is_null(), "{method} {path} is not in openapi.json");
        let responses = &op["responses"];
        let r = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| panic!("{method} {path}: no response {status} or default"));
        let schema = &r["content"]["application/json"]["schema"];
        assert!(
            !schema.is_null(),
            "{method} {path} {status}: no application/json schema"
        );
        schema
    }

    /// Panics, listing every mismatch, unless `body` fits the documented
    /// response of `method path` with `status`.
    pub fn check(&self, method: &str, path: &str, status: u16, body: &Value) {
        let schema = self.response_schema(method, path, status);
        let mut errs = Vec::new();
        self.validate(schema, body, "$", &mut errs);
        assert!(
            errs.is_empty(),
            "{method} {path} ({status}) does not match openapi.json:\n  {}\nbody: {}",
            errs.join("\n  "),
            serde_json::to_string(body).unwrap_or_default()
        );
    }

    /// An `allOf` of object schemas as one object schema (properties and
    /// required fields of all parts), so no part calls another's fields
    /// undescribed.
    fn merged(&self, parts: &[Value]) -> Value {
        let mut props = serde_json::Map::new();
        let mut required = Vec::new();
        for p in parts {
            let p = self.resolve(p);
            if let Some(o) = p.get("properties").and_then(Value::as_object) {
                props.extend(o.clone());
            }
            if let Some(r) = p.get("required").and_then(Value::as_array) {
                required.extend(r.iter().cloned());
            }
        }
        serde_json::json!({"type": "object", "properties": props, "required": required})
    }

    fn validate(&self, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let s = self.resolve(schema);
        if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
            let m = self.merged(parts);
            return self.validate(&m, v, at, errs);
        }
        if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
            return;
        }
        if let Some(options) = s.get("oneOf").and_then(Value::as_array) {
            let fits = options.iter().any(|o| {
                let mut e = Vec::new();
                self.validate(o, v, at, &mut e);
                e.is_empty()
            });
            if !fits {
                errs.push(format!("{at}: fits none of oneOf"));
            }
            return;
        }
        let ty = s.get("type").and_then(Value::as_str).or_else(|| {
            (s.get("properties").is_some() || s.get("additionalProperties").is_some())
                .then_some("object")
        });
        match ty {
            None => {}
            Some("object") => {
                let Some(obj) = v.as_object() else {
                    errs.push(format!("{at}: expected an object, got {v}"));
                    return;
                };
                let props = s.get("properties").and_then(Value::as_object);
                for (k, val) in obj {
                    let here = format!("{at}.{k}");
                    match props.and_then(|p| p.get(k)) {
                        Some(p) => self.validate(p, val, &here, errs),
                        None => match s.get("additionalProperties") {
                            Some(Value::Bool(true)) => {}
                            Some(extra @ Value::Object(_)) => {
                                self.validate(extra, val, &here, errs)
                            }
                            _ => errs.push(format!("{here}: not described")),
                        },
                    }
                }
                for r in s
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let k = r.as_str().expect("required names");
                    if !obj.contains_key(k) {
                        errs.push(format!("{at}: required field {k} missing"));
                    }
                }
            }
            Some("array") => {
                let Some(items) = v.as_array() else {
                    errs.push(format!("{at}: expected an array, got {v}"));
                    return;
                };
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.validate(item, x, &format!("{at}[{i}]"), errs);
                    }
                }
            }
            Some("string") => {
                let Some(text) = v.as_str() else {
                    errs.push(format!("{at}: expected a string, got {v}"));
                    return;
                };
                if let Some(allowed) = s.get("enum").and_then(Value::as_array)
                    && !allowed.iter().any(|a| a == text)
                {
                    errs.push(format!("{at}: {text:?} is not one of {allowed:?}"));
                }
            }
            Some("integer") => match v
                .as_i64()
                .map(|x| x as f64)
                .or_else(|| v.as_u64().map(|x| x as f64))
            {
                Some(n) => {
                    if s.get("minimum")
                        .and_then(Value::as_f64)
                        .is_some_and(|m| n < m)
                    {
                        errs.push(format!("{at}: {n} is below the minimum"));
                    }
                    if s.get("maximum")
                        .and_then(Value::as_f64)
                        .is_some_and(|m| n > m)
                    {
                        errs.push(format!("{at}: {n} is above the maximum"));
                    }
                }
                None => errs.push(format!("{at}: expected an integer, got {v}")),
            },
            Some("number") if !v.is_number() => {
                errs.push(format!("{at}: expected a number, got {v}"));
            }
            Some("boolean") if !v.is_boolean() => {
                errs.push(format!("{at}: expected a boolean, got {v}"));
            }
            Some("number" | "boolean") => {}
            Some(other) => errs.push(format!("{at}: unknown schema type {other}")),
        }
    }
}
