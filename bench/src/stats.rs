//! Measurements: every number the suite reports is a median over runs, kept
//! with its spread (min/max, p10/p90), its unit and a sentence saying what
//! was measured and how.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Linear-interpolated percentile (`p` in 0..=100) of unsorted samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// Stable identifier, unique in its section (used to compute ratios).
    pub id: String,
    /// What the row is, for people.
    pub label: String,
    pub unit: String,
    /// "ok", or "not measured: <why>", or "error: <what>".
    pub status: String,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub p10: Option<f64>,
    pub p90: Option<f64>,
    pub runs: usize,
    pub samples: Vec<f64>,
    pub method: String,
    /// Derived or companion numbers (ratios, offered rate, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
    /// Free-form parameters (sizes, frame names, tools).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

impl Measurement {
    pub fn from_samples(
        id: &str,
        label: &str,
        unit: &str,
        samples: Vec<f64>,
        method: &str,
    ) -> Self {
        let mut m = Self::empty(id, label, unit, method, "ok");
        if samples.is_empty() {
            m.status = "error: no samples".into();
            return m;
        }
        m.median = Some(percentile(&samples, 50.0));
        m.min = Some(samples.iter().copied().fold(f64::INFINITY, f64::min));
        m.max = Some(samples.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        m.p10 = Some(percentile(&samples, 10.0));
        m.p90 = Some(percentile(&samples, 90.0));
        m.runs = samples.len();
        m.samples = samples;
        m
    }

    pub fn not_measured(id: &str, label: &str, unit: &str, why: &str, method: &str) -> Self {
        Self::empty(id, label, unit, method, &format!("not measured: {why}"))
    }

    pub fn error(id: &str, label: &str, unit: &str, what: &str, method: &str) -> Self {
        Self::empty(id, label, unit, method, &format!("error: {what}"))
    }

    fn empty(id: &str, label: &str, unit: &str, method: &str, status: &str) -> Self {
        Self {
            id: id.into(),
            label: label.into(),
            unit: unit.into(),
            status: status.into(),
            median: None,
            min: None,
            max: None,
            p10: None,
            p90: None,
            runs: 0,
            samples: Vec::new(),
            method: method.into(),
            extra: BTreeMap::new(),
            params: BTreeMap::new(),
        }
    }

    pub fn ok(&self) -> bool {
        self.status == "ok"
    }

    pub fn param(mut self, k: &str, v: impl Into<serde_json::Value>) -> Self {
        self.params.insert(k.into(), v.into());
        self
    }

    pub fn with_extra(mut self, k: &str, v: f64) -> Self {
        self.extra.insert(k.into(), v);
        self
    }
}

/// One section of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    pub key: String,
    pub title: String,
    /// What the section measures and how, in prose.
    pub method: String,
    pub measurements: Vec<Measurement>,
    /// Section-level facts (list sizes, tool versions, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, serde_json::Value>,
    pub seconds: f64,
}

impl Section {
    pub fn new(key: &str, title: &str, method: &str) -> Self {
        Self {
            key: key.into(),
            title: title.into(),
            method: method.into(),
            measurements: Vec::new(),
            facts: BTreeMap::new(),
            seconds: 0.0,
        }
    }

    pub fn get(&self, id: &str) -> Option<&Measurement> {
        self.measurements.iter().find(|m| m.id == id)
    }

    pub fn push(&mut self, m: Measurement) {
        self.measurements.push(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&s, 50.0), 3.0);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 100.0), 5.0);
        assert!((percentile(&s, 10.0) - 1.4).abs() < 1e-9);
    }
}
