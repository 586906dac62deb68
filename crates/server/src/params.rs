//! Reading request bodies the way the API's own examples write them: numbers as strings or numbers, `"yes"`/`"no"`
//! or booleans, `null` (or an empty string) for absent, unknown fields ignored.

use serde_json::{Map, Value};

use crate::responses::ApiError;

/// A parsed JSON object body.
#[derive(Debug, Clone, Default)]
pub struct Body(pub Map<String, Value>);

impl Body {
    /// Parses `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            Ok(_) => Err(ApiError::message("the request body must be a JSON object")),
            Err(e) => Err(ApiError::message(format!(
                "the request body is not valid JSON ({e}); send Content-Type: application/json with a JSON object"
            ))),
        }
    }

    /// The value of the first of `names` that is present and not null / empty string, with the name found.
    pub fn get<'a>(&'a self, names: &[&'a str]) -> Option<(&'a str, &'a Value)> {
        names.iter().find_map(|name| match self.0.get(*name) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(v) => Some((*name, v)),
        })
    }

    /// A text field; numbers and booleans are taken as their JSON text.
    pub fn string(&self, names: &[&str]) -> Result<Option<String>, ApiError> {
        match self.get(names) {
            None => Ok(None),
            Some((_, Value::String(s))) => Ok(Some(s.clone())),
            Some((_, v @ (Value::Number(_) | Value::Bool(_)))) => Ok(Some(v.to_string())),
            Some((name, _)) => Err(ApiError::field(name, "must be a string")),
        }
    }

    /// A whole-number field (`5`, `"5"`, `5.0`).
    pub fn integer(&self, names: &[&str]) -> Result<Option<i64>, ApiError> {
        let Some((name, value)) = self.get(names) else {
            return Ok(None);
        };
        let bad = || ApiError::field(name, format!("must be a whole number (got {value})"));
        let number = match value {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().and_then(whole)),
            Value::String(s) => {
                let s = s.trim();
                s.parse::<i64>()
                    .ok()
                    .or_else(|| s.parse::<f64>().ok().and_then(whole))
            }
            _ => None,
        };
        number.map(Some).ok_or_else(bad)
    }

    /// A non-negative whole number that fits u64 (seeds go up to 2^64 - 1).
    pub fn unsigned(&self, names: &[&str]) -> Result<Option<u64>, ApiError> {
        let Some((name, value)) = self.get(names) else {
            return Ok(None);
        };
        let parsed = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            ApiError::field(name, format!("must be a whole number ≥ 0 (got {value})"))
        })
    }

    /// A decimal field (`7.5`, `"7.5"`).
    pub fn float(&self, names: &[&str]) -> Result<Option<f64>, ApiError> {
        let Some((name, value)) = self.get(names) else {
            return Ok(None);
        };
        let number = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match number {
            Some(n) if n.is_finite() => Ok(Some(n)),
            _ => Err(ApiError::field(
                name,
                format!("must be a number (got {value})"),
            )),
        }
    }

    /// A yes/no field: `"yes"`/`"no"`, `true`/`false`, `"true"`/`"false"`, `1`/`0`.
    pub fn flag(&self, names: &[&str]) -> Result<Option<bool>, ApiError> {
        let Some((name, value)) = self.get(names) else {
            return Ok(None);
        };
        let parsed = match value {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => match n.as_i64() {
                Some(1) => Some(true),
                Some(0) => Some(false),
                _ => None,
            },
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "yes" | "true" | "1" | "on" => Some(true),
                "no" | "false" | "0" | "off" | "none" => Some(false),
                _ => None,
            },
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            ApiError::field(name, format!("must be \"yes\" or \"no\" (got {value})"))
        })
    }

    /// Like [`Body::integer`] with a range check; the error names the range.
    pub fn integer_in(&self, names: &[&str], min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let v = self.integer(names)?;
        if let Some(n) = v {
            if !(min..=max).contains(&n) {
                return Err(ApiError::field(
                    self.name_of(names),
                    format!("must be between {min} and {max} (got {n})"),
                ));
            }
        }
        Ok(v)
    }

    /// Like [`Body::float`] with a range check; the error names the range.
    pub fn float_in(&self, names: &[&str], min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        let v = self.float(names)?;
        if let Some(n) = v {
            if !(min..=max).contains(&n) {
                return Err(ApiError::field(
                    self.name_of(names),
                    format!("must be between {min} and {max} (got {n})"),
                ));
            }
        }
        Ok(v)
    }

    /// The spelling of a field the body used (the first name when absent).
    pub fn name_of<'a>(&'a self, names: &[&'a str]) -> &'a str {
        self.get(names).map(|(n, _)| n).unwrap_or(names[0])
    }
}

fn whole(f: f64) -> Option<i64> {
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Body {
        Body::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn numbers_as_strings_or_numbers() {
        let b = body(json!({"w": "512", "h": 768, "g": "7.5", "s": 0.7, "f": 30.0, "bad": "abc"}));
        assert_eq!(b.integer(&["w"]).unwrap(), Some(512));
        assert_eq!(b.integer(&["h"]).unwrap(), Some(768));
        assert_eq!(b.integer(&["f"]).unwrap(), Some(30));
        assert_eq!(b.float(&["g"]).unwrap(), Some(7.5));
        assert_eq!(b.float(&["s"]).unwrap(), Some(0.7));
        let err = b.integer(&["bad"]).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
        assert_eq!(b.integer(&["missing"]).unwrap(), None);
    }

    #[test]
    fn flags_nulls_and_aliases() {
        let b = body(
            json!({"a": "yes", "b": false, "c": "NO", "d": null, "e": "", "steps": "20", "x": "maybe"}),
        );
        assert_eq!(b.flag(&["a"]).unwrap(), Some(true));
        assert_eq!(b.flag(&["b"]).unwrap(), Some(false));
        assert_eq!(b.flag(&["c"]).unwrap(), Some(false));
        assert_eq!(b.flag(&["d"]).unwrap(), None);
        assert_eq!(b.flag(&["e"]).unwrap(), None);
        assert!(b.flag(&["x"]).is_err());
        assert_eq!(
            b.integer(&["num_inference_steps", "steps"]).unwrap(),
            Some(20)
        );
    }

    #[test]
    fn ranges_name_the_field() {
        let b = body(json!({"width": "5000"}));
        let err = b.integer_in(&["width"], 8, 1024).unwrap_err();
        assert_eq!(err.field_name(), Some("width"));
        assert!(err.to_string().contains("1024"));
    }

    #[test]
    fn not_an_object() {
        assert!(Body::parse(b"[1,2]").is_err());
        assert!(Body::parse(b"{oops").is_err());
        assert!(Body::parse(b"").unwrap().0.is_empty());
    }
}
