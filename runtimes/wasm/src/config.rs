//! Command-line and environment settings of the binary (clap derive, an `env` on every field),
//! turned into a [`server::Config`] once in `main`, or by a pool member's specialisation from
//! the environment it is handed ([`Args::from_env`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches};

use crate::server::{self, Config};

#[derive(Debug, clap::Parser)]
#[command(
    about = "Hearth Wasm runtime server (`precompile FILE...` compiles modules ahead of time)"
)]
pub struct Args {
    #[arg(long, env = "OPEN_RUNTIMES_SECRET", default_value = "")]
    pub secret: String,
    #[arg(long, env = "OPEN_RUNTIMES_ENV", default_value = "production")]
    pub mode: String,
    #[arg(long, env = "OPEN_RUNTIMES_HEADERS", default_value = "{}")]
    pub headers: String,
    #[arg(long, env = "OPEN_RUNTIMES_ENTRYPOINT", default_value = "")]
    pub entrypoint: String,
    /// Megabytes per instance; empty or absent: 512.
    #[arg(long, env = "OPEN_RUNTIMES_MEMORY", default_value = "")]
    pub memory: String,
    #[arg(long, env = "INTERNAL_RUNTIME_KEY", default_value = "")]
    pub v2_key: String,
    #[arg(long, env = "INTERNAL_RUNTIME_ENTRYPOINT", default_value = "")]
    pub v2_entrypoint: String,
    #[arg(long, env = "HEARTH_WASM_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: String,
    /// Also serve on this Unix socket (runtimes/socket.md); empty: TCP only.
    #[arg(long, env = "OPEN_RUNTIMES_SOCKET", default_value = "")]
    pub socket: String,
    #[arg(long, env = "HEARTH_WASM_MAX_INSTANCES", default_value_t = 256)]
    pub max_instances: u32,
    #[arg(
        long,
        env = "HEARTH_WASM_FUNCTION_DIR",
        default_value = "/usr/local/server/src/function"
    )]
    pub function_dir: PathBuf,
    #[arg(long, env = "HEARTH_WASM_LOGS_DIR", default_value = "/mnt/logs")]
    pub logs_dir: PathBuf,
    #[arg(
        long,
        env = "HEARTH_WASM_TIMINGS_FILE",
        default_value = "/mnt/telemetry/timings.txt"
    )]
    pub timings_file: PathBuf,
    /// `precompile FILE...`: write FILE.cwasm for each module and exit.
    #[arg(trailing_var_arg = true)]
    pub command: Vec<String>,
}

impl Args {
    /// The settings a fresh start would read from the environment `env`, read from `env` alone
    /// (never from the process environment): each field whose `env` name is in `env` is passed
    /// as its flag, the others take their defaults.
    pub fn from_env(env: &[(String, String)]) -> Result<Args, clap::Error> {
        let values: HashMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let command = Args::command();
        let mut argv = vec![OsString::from(command.get_name())];
        for arg in command.get_arguments() {
            let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            if let Some(value) = name.to_str().and_then(|name| values.get(name)) {
                argv.push(OsString::from(format!("--{long}={value}")));
            }
        }
        let matches = command
            .mut_args(|arg| arg.env(None::<&'static str>))
            .try_get_matches_from(argv)?;
        Args::from_arg_matches(&matches)
    }

    /// The server's configuration; `guest_env` is what every guest sees (the process env).
    pub fn into_config(self, guest_env: Vec<(String, String)>) -> Config {
        // v2 mode takes its entrypoint from INTERNAL_RUNTIME_ENTRYPOINT when given.
        let entry = if !self.v2_key.is_empty() && !self.v2_entrypoint.is_empty() {
            &self.v2_entrypoint
        } else {
            &self.entrypoint
        };
        let mut config = Config::new(entry);
        config.secret = self.secret;
        config.development = self.mode == "development";
        config.enforced_headers = server::parse_enforced_headers(&self.headers);
        config.v2_key = self.v2_key;
        config.guest_env = guest_env.into();
        config.max_instances = self.max_instances;
        config.function_dir = self.function_dir;
        config.logs_dir = self.logs_dir;
        config.timings_file = self.timings_file;
        if let Ok(mb) = self.memory.trim().parse::<usize>() {
            config.memory_limit = mb.max(1) << 20;
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_given_environment_only() {
        let env: Vec<(String, String)> = [
            ("OPEN_RUNTIMES_SECRET", "s"),
            ("OPEN_RUNTIMES_ENTRYPOINT", "main.wasm"),
            ("OPEN_RUNTIMES_MEMORY", "64"),
            ("OPEN_RUNTIMES_HEADERS", r#"{"X-A":1}"#),
            ("HEARTH_WASM_MAX_INSTANCES", "8"),
            ("UNRELATED", "--not-a-flag"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = Args::from_env(&env).unwrap().into_config(env.clone());
        assert_eq!(config.secret, "s");
        assert_eq!(config.entrypoint, "main.wasm");
        assert_eq!(config.memory_limit, 64 << 20);
        assert_eq!(config.enforced_headers, vec![("x-a".into(), "1".into())]);
        assert_eq!(config.max_instances, 8);
        assert_eq!(&config.guest_env[..], &env[..]);
        // Absent variables take the defaults, whatever this process's environment holds.
        let config = Args::from_env(&[]).unwrap().into_config(Vec::new());
        assert_eq!(config.secret, "");
        assert_eq!(config.memory_limit, 512 << 20);
        assert!(Args::from_env(&[("HEARTH_WASM_MAX_INSTANCES".into(), "x".into())]).is_err());
    }
}
