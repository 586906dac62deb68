//! Reading a `scheduler_config.json` the way diffusers' `ConfigMixin.from_config` does.
//!
//! Every scheduler class asks for the keys its constructor takes, each with the class's own default. A key
//! present in the file wins over the default; a key that is missing or `null` takes the default; keys the class
//! does not take (`_class_name`, `_diffusers_version`, `skip_prk_steps` for Euler, …) are never looked at.
//! Keys listed in the file's `_use_default_values` were defaults when the file was saved, so (as in diffusers)
//! they are dropped and the reading class's own default applies. A value of the wrong type is an error that
//! names the class and the key.

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// The model label used in errors about a scheduler config (the engine does not know the model id here).
const CONFIG_LABEL: &str = "scheduler config";

/// One scheduler class's view of a config file.
#[derive(Debug, Clone)]
pub struct ConfigReader {
    class: &'static str,
    values: Map<String, Value>,
}

impl ConfigReader {
    /// A reader for `class` over `config`, which must be a JSON object (or `null`, read as `{}`).
    pub fn new(class: &'static str, config: &Value) -> Result<Self> {
        let mut values = match config {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            other => {
                return Err(EngineError::model(
                    CONFIG_LABEL,
                    format!(
                        "{class}: the config must be a JSON object, got {}",
                        kind(other)
                    ),
                ))
            }
        };
        if let Some(Value::Array(defaults)) = values.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                values.remove(key);
            }
        }
        Ok(ConfigReader { class, values })
    }

    /// The diffusers class name this reader serves (used in messages).
    pub fn class(&self) -> &'static str {
        self.class
    }

    /// The value of `key`, or `None` when it is missing or `null`.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    /// An error about `key` of this class's config.
    pub fn error(&self, key: &str, message: impl std::fmt::Display) -> EngineError {
        EngineError::model(CONFIG_LABEL, format!("{}: `{key}` {message}", self.class))
    }

    /// The error for an option diffusers has but this engine does not implement.
    pub fn unsupported(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::Unsupported(format!("{} with {what}", self.class))
    }

    /// A number.
    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A number whose default is `None`.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("is not a usable number: {n}"))),
            Some(other) => Err(self.error(key, format!("must be a number, got {}", kind(other)))),
        }
    }

    /// A whole number (a JSON float with no fractional part is accepted, as Python would).
    pub fn i64(&self, key: &str, default: i64) -> Result<i64> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                if let Some(v) = n.as_i64() {
                    Ok(v)
                } else {
                    match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                        _ => Err(self.error(key, format!("must be a whole number, got {n}"))),
                    }
                }
            }
            Some(other) => {
                Err(self.error(key, format!("must be a whole number, got {}", kind(other))))
            }
        }
    }

    /// A whole number that must be at least `min`.
    pub fn usize_at_least(&self, key: &str, default: usize, min: usize) -> Result<usize> {
        let v = self.i64(key, default as i64)?;
        if v < min as i64 {
            return Err(self.error(key, format!("must be at least {min}, got {v}")));
        }
        Ok(v as usize)
    }

    /// A flag (JSON `true`/`false`; 0 and 1 are accepted as Python's truthiness would).
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Ok(false),
            Some(Value::Number(n)) if n.as_f64() == Some(1.0) => Ok(true),
            Some(other) => {
                Err(self.error(key, format!("must be true or false, got {}", kind(other))))
            }
        }
    }

    /// A string.
    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.raw(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.error(key, format!("must be a string, got {}", kind(other)))),
        }
    }

    /// A string that must be one of `choices` (pairs of spelling and value).
    pub fn choice<T: Copy>(&self, key: &str, default: T, choices: &[(&str, T)]) -> Result<T> {
        let Some(raw) = self.raw(key) else {
            return Ok(default);
        };
        let Value::String(s) = raw else {
            return Err(self.error(key, format!("must be a string, got {}", kind(raw))));
        };
        choices
            .iter()
            .find(|(name, _)| name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.error(
                    key,
                    format!("is {s:?}; expected one of {}", names.join(", ")),
                )
            })
    }

    /// A list of numbers whose default is `None`.
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        self.error(key, format!("must hold numbers only, got {}", kind(v)))
                    })
                })
                .collect::<Result<Vec<f64>>>()
                .map(Some),
            Some(other) => Err(self.error(
                key,
                format!("must be a list of numbers, got {}", kind(other)),
            )),
        }
    }

    /// Rejects `key` when it holds `true`: an option diffusers has that this engine does not implement.
    pub fn reject_true(&self, key: &str, default: bool) -> Result<()> {
        if self.bool(key, default)? {
            return Err(self.unsupported(format_args!("`{key}: true`")));
        }
        Ok(())
    }
}

/// A short description of a JSON value for error messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// What the model predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise that was added (`epsilon`).
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (`v_prediction`).
    VPrediction,
    /// The clean sample itself (`sample`).
    Sample,
}

impl PredictionType {
    /// Reads `prediction_type`; `allowed` lists the spellings the class accepts (diffusers rejects the others).
    pub fn read(cfg: &ConfigReader, allowed: &[(&str, PredictionType)]) -> Result<Self> {
        cfg.choice("prediction_type", PredictionType::Epsilon, allowed)
    }
}

/// All three prediction types, as DDIM and Euler accept them.
pub const ALL_PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
    ("sample", PredictionType::Sample),
];

/// The prediction types of schedulers that cannot take a `sample` prediction (PNDM, Euler ancestral).
pub const NOISE_PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
];

/// How inference timesteps are spread over the training ones (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// Multiples of `num_train_timesteps / steps` from 0, plus `steps_offset`.
    Leading,
    /// Evenly from 0 to `num_train_timesteps - 1`, both ends included.
    Linspace,
    /// Multiples of `num_train_timesteps / steps` counted down from the end, minus 1.
    Trailing,
}

impl TimestepSpacing {
    /// Reads `timestep_spacing` with the class's `default`.
    pub fn read(cfg: &ConfigReader, default: TimestepSpacing) -> Result<Self> {
        cfg.choice(
            "timestep_spacing",
            default,
            &[
                ("leading", TimestepSpacing::Leading),
                ("linspace", TimestepSpacing::Linspace),
                ("trailing", TimestepSpacing::Trailing),
            ],
        )
    }
}

/// The beta schedule family (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (Stable Diffusion's schedule).
    ScaledLinear,
    /// The Glide / improved-DDPM cosine schedule.
    SquaredCosCapV2,
}

/// The keys that define the training noise schedule, shared by all DDPM-family schedulers.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`.
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: explicit betas that replace the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `rescale_betas_zero_snr` (only for classes that take it).
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    /// The defaults of DDIM, DDPM, PNDM, Euler and most other diffusers schedulers.
    pub const DIFFUSERS_DEFAULT: BetaConfig = BetaConfig {
        num_train_timesteps: 1000,
        beta_start: 0.0001,
        beta_end: 0.02,
        beta_schedule: BetaSchedule::Linear,
        trained_betas: None,
        rescale_betas_zero_snr: false,
    };

    /// Reads the schedule keys over `defaults`; `has_rescale` says whether the class takes
    /// `rescale_betas_zero_snr` (classes that do not simply ignore the key, as diffusers does).
    pub fn read(cfg: &ConfigReader, defaults: &BetaConfig, has_rescale: bool) -> Result<Self> {
        let num_train_timesteps =
            cfg.usize_at_least("num_train_timesteps", defaults.num_train_timesteps, 2)?;
        let trained_betas = cfg.opt_f64_list("trained_betas")?;
        if let Some(betas) = &trained_betas {
            if betas.len() != num_train_timesteps {
                return Err(cfg.error(
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {num_train_timesteps}",
                        betas.len()
                    ),
                ));
            }
        }
        Ok(BetaConfig {
            num_train_timesteps,
            beta_start: cfg.f64("beta_start", defaults.beta_start)?,
            beta_end: cfg.f64("beta_end", defaults.beta_end)?,
            beta_schedule: cfg.choice(
                "beta_schedule",
                defaults.beta_schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
                ],
            )?,
            trained_betas,
            rescale_betas_zero_snr: has_rescale
                && cfg.bool("rescale_betas_zero_snr", defaults.rescale_betas_zero_snr)?,
        })
    }
}
