//! The balancer's numbers (`--balancer`, on by default): one warm node runtime behind one
//! in-process executor, called in the same run three ways: direct, through the balancer (the
//! release binary as its own process) and through Debian's nginx configured as a plain
//! keep-alive reverse proxy. Added p50/p99 over direct and requests/s at 1 connection (the three
//! paths taking turns request by request: `paired.rs`) and at 64 (wrk, one path at a time), and
//! the balancer's RSS.

use std::path::PathBuf;
use std::process::{Child, Stdio};

use super::*;
use hearth_tests::builds::free_port;
use hearth_tests::executor::{Options, TempDir, TestExecutor, SECRET as EXECUTOR_SECRET};
use hearth_tests::runtime::fixture_dir;

/// A child process killed on drop.
pub(super) struct Process(Child);

impl Process {
    /// CPU time (user + system, ns) used by the process and its direct children (nginx's
    /// workers), from `/proc` at clock-tick resolution.
    pub(super) fn cpu_ns(&self) -> u64 {
        let (user, system) = self.cpu_split_ns();
        user + system
    }

    /// [`Process::cpu_ns`] as (user, system): what the proxy's own code costs apart from the
    /// kernel's work on its sockets.
    pub(super) fn cpu_split_ns(&self) -> (u64, u64) {
        let master = self.0.id();
        let ticks_ns = 1_000_000_000 / 100;
        let (mut user, mut system) = (0, 0);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return (0, 0);
        };
        for entry in entries.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised name: state ppid ... utime(14) stime(15).
            let Some(rest) = stat.rsplit_once(") ").map(|(_, rest)| rest) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pid: u32 = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let ppid: u32 = fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            if pid != master && ppid != master {
                continue;
            }
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            user += field(11) * ticks_ns;
            system += field(12) * ticks_ns;
        }
        (user, system)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its workers too.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Waits until `url` + `health` answers 200 (up to 10 s).
pub(super) async fn wait_up(url: &str, health: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(res) = client.get(format!("{url}{health}")).send().await {
            if res.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn balancer_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("bench has no folder")?
        .join("hearth-balancer");
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --release -p hearth-balancer",
            path.display()
        );
    }
    Ok(path)
}

fn start_balancer(executor: &str, port: u16) -> Result<Process> {
    let child = Command::new(balancer_binary()?)
        .env("HEARTH_BALANCER_LISTEN", format!("127.0.0.1:{port}"))
        .env("HEARTH_BALANCER_EXECUTORS", executor)
        .env("OPR_EXECUTOR_SECRET", EXECUTOR_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start hearth-balancer")?;
    Ok(Process(child))
}

/// The configuration of a plain keep-alive reverse proxy on `listen` in front of `upstream`
/// (`host:port`), its working files in `dir`.
pub(super) fn nginx_conf(dir: &str, upstream: &str, listen: &str) -> String {
    let d = dir;
    format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         client_max_body_size 64m;\n\
         upstream executor {{ server {upstream}; keepalive 256; }}\n\
         server {{\n    listen {listen};\n    location / {{\n\
               proxy_pass http://executor;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    )
}

/// Debian's nginx as a plain keep-alive reverse proxy on 127.0.0.1:`port` in front of `upstream`
/// (`host:port`).
pub(super) fn start_nginx(dir: &std::path::Path, upstream: &str, port: u16) -> Result<Process> {
    let conf = nginx_conf(
        &dir.display().to_string(),
        upstream,
        &format!("127.0.0.1:{port}"),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|n| Command::new(n).arg("-v").output().is_ok())
        .context("nginx is missing (apt-get install -y nginx)")?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start nginx")?;
    Ok(Process(child))
}

fn rss_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn load(url: String, connections: u32, duration: u64, lua: String) -> Result<Load> {
    // wrk blocks: off the runtime, which serves the in-process executor.
    tokio::task::spawn_blocking(move || wrk_with(&url, connections, duration, &lua)).await?
}

pub async fn run(args: &Args) -> Result<Value> {
    let executor = TestExecutor::start(Options::named("bench-balancer")).await?;
    let source = executor.stage_source(&fixture_dir("executor"), "fixture")?;
    let res = executor
        .post("/v1/runtimes/warm/executions")
        .header("accept", "application/json")
        .json(&json!({"image": runtime::NODE.image, "source": source, "entrypoint": "index.js"}))
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("warm-up execution failed: {}", res.text().await?);
    }
    let executor_port: u16 = executor
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("executor port")?;
    let dir = TempDir::new("hearth-bench-nginx")?;
    let (balancer_port, nginx_port) = (free_port()?, free_port()?);
    let balancer = start_balancer(&executor.url, balancer_port)?;
    let nginx = start_nginx(&dir.0, &format!("127.0.0.1:{executor_port}"), nginx_port)?;
    let balancer_url = format!("http://127.0.0.1:{balancer_port}");
    let nginx_url = format!("http://127.0.0.1:{nginx_port}");
    wait_up(&balancer_url, "/v1/health").await?;
    wait_up(&nginx_url, "/v1/health").await?;

    let lua = execution_lua(EXECUTOR_SECRET);
    let path = "/v1/runtimes/warm/executions";
    let paths = [
        ("direct", format!("{}{path}", executor.url)),
        ("balancer", format!("{balancer_url}{path}")),
        ("nginx", format!("{nginx_url}{path}")),
    ];
    for (_, url) in &paths {
        load(url.clone(), 8, 1, lua.clone()).await?;
    }
    let mut results = serde_json::Map::new();
    results.insert("rounds".into(), json!(args.balancer_rounds));
    let mut printed = Vec::new();
    for connections in [1u32, 64] {
        // Rounds of direct, balancer, nginx back to back; each figure is the median of its
        // rounds, so a slow spell of the host hits all three alike instead of one.
        // The proxies' CPU per request too: steadier than req/s on a host whose speed drifts.
        let mut rounds: Vec<Vec<Load>> = vec![Vec::new(); paths.len()];
        let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut user_us: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        // At one connection the paths take turns request by request (`paired.rs`), so each
        // figure is over the same moments of the host; each is taken over all rounds together.
        let mut pooled: Option<Vec<Load>> = None;
        if connections == 1 {
            let proxies = [None, Some(&balancer), Some(&nginx)];
            let before: Vec<_> = proxies
                .iter()
                .map(|p| p.map(Process::cpu_split_ns))
                .collect();
            let targets = paths
                .iter()
                .map(|(_, url)| paired::Target::execution(url, EXECUTOR_SECRET))
                .collect::<Result<Vec<_>>>()?;
            let (n, round) = (args.balancer_rounds, Duration::from_secs(args.duration * 3));
            let measured =
                tokio::task::spawn_blocking(move || paired::interleaved(&targets, n, round))
                    .await??;
            for (i, m) in measured.iter().enumerate() {
                if let (Some(proxy), Some((user, system))) = (proxies[i], before[i]) {
                    let (user_after, system_after) = proxy.cpu_split_ns();
                    let per_request = |ns: u64| ns as f64 / 1000.0 / m.samples.len() as f64;
                    cpu_us[i].push(per_request(user_after + system_after - user - system));
                    user_us[i].push(per_request(user_after - user));
                }
                rounds[i] = m.rounds.clone();
            }
            pooled = Some(measured.iter().map(|m| m.all).collect());
            let (line, compared, tail) = compare_one_connection(&paths, &measured);
            printed.push(line);
            results.insert("c1_tail".into(), tail);
            results.insert("c1_balancer_minus_nginx".into(), compared);
        }
        // At 64 connections, wrk on one path at a time.
        let wrk_rounds = if connections == 1 {
            0
        } else {
            args.balancer_rounds
        };
        for round in 0..wrk_rounds {
            // The two proxies take turns going first after direct, so neither always follows
            // the same path.
            let order: [usize; 3] = if round % 2 == 0 { [0, 1, 2] } else { [0, 2, 1] };
            for i in order {
                let url = &paths[i].1;
                let proxy = [None, Some(&balancer), Some(&nginx)][i];
                let before = proxy.map(Process::cpu_split_ns);
                let l = load(url.clone(), connections, args.duration, lua.clone()).await?;
                if let (Some(proxy), Some((user, system))) = (proxy, before) {
                    let requests = l.rps * args.duration as f64;
                    let (user_after, system_after) = proxy.cpu_split_ns();
                    let per_request = |ns: u64| ns as f64 / 1000.0 / requests;
                    cpu_us[i].push(per_request(user_after + system_after - user - system));
                    user_us[i].push(per_request(user_after - user));
                }
                rounds[i].push(l);
            }
        }
        let loads: Vec<(&str, Load, f64, f64)> = paths
            .iter()
            .zip(&rounds)
            .zip(cpu_us.iter().zip(&user_us))
            .enumerate()
            .map(|(i, (((name, _), r), (cpu, user)))| {
                let load = pooled.as_ref().map_or_else(|| median_load(r), |p| p[i]);
                (*name, load, median_of(cpu), median_of(user))
            })
            .collect();
        let direct = loads[0].1;
        let mut row = serde_json::Map::new();
        for ((name, l, cpu, user), r) in loads.iter().zip(&rounds) {
            let p99s: Vec<f64> = r.iter().map(|l| l.p99_ms).collect();
            let p50s: Vec<f64> = r.iter().map(|l| l.p50_ms).collect();
            let rps: Vec<f64> = r.iter().map(|l| l.rps).collect();
            row.insert(
                name.to_string(),
                json!({"p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "rps": l.rps,
                       "added_p50_ms": l.p50_ms - direct.p50_ms, "added_p99_ms": l.p99_ms - direct.p99_ms,
                       "cpu_us_per_request": cpu, "user_cpu_us_per_request": user,
                       "p99_ms_rounds": p99s, "p50_ms_rounds": p50s, "rps_rounds": rps}),
            );
        }
        for (name, l, cpu, user) in &loads[1..] {
            printed.push(format!(
                "balancer bench {connections:>2} conn ({}): {name:<8} added p50 {:+.3} ms p99 {:+.3} ms, {:.0} req/s, CPU {cpu:.0} µs/request ({user:.0} user) (direct p50 {:.3} ms p99 {:.3} ms, {:.0} req/s)",
                if connections == 1 { "interleaved" } else { "wrk" },
                l.p50_ms - direct.p50_ms,
                l.p99_ms - direct.p99_ms,
                l.rps,
                direct.p50_ms,
                direct.p99_ms,
                direct.rps
            ));
        }
        row.insert(
            "method".into(),
            json!(if connections == 1 {
                "interleaved request by request, figures over all rounds"
            } else {
                "wrk, one path at a time, medians of rounds"
            }),
        );
        results.insert(format!("c{connections}"), Value::Object(row));
    }
    let pid = balancer.0.id();
    let (rss, peak) = (rss_mb(pid, "VmRSS:"), rss_mb(pid, "VmHWM:"));
    for line in printed {
        println!("{line}");
    }
    println!("balancer RSS after the runs: {rss:.1} MB (peak {peak:.1} MB)");
    results.insert("balancer_rss_mb".into(), json!(rss));
    results.insert("balancer_peak_rss_mb".into(), json!(peak));
    drop(balancer);
    drop(executor);
    Ok(Value::Object(results))
}

/// At one connection (`paths`: direct, balancer, nginx, as `measured`): balancer − nginx for
/// p50, p99 and req/s with 95 % intervals (a difference whose interval holds zero is one these
/// samples cannot tell from none), as a printed line and JSON; and each path's mean, p99.9 and
/// max: beyond p99, what moves the mean and so requests/s.
fn compare_one_connection(
    paths: &[(&str, String)],
    measured: &[paired::Paired],
) -> (String, Value, Value) {
    let (nginx_samples, balancer_samples) = (&measured[2].samples, &measured[1].samples);
    let mut compared = serde_json::Map::new();
    let mut parts = Vec::new();
    for (name, statistic, unit) in [
        ("p50", paired::p50 as fn(&[f64]) -> f64, "ms"),
        ("p99", paired::p99, "ms"),
        ("rps", paired::rps, "req/s"),
    ] {
        let d = paired::Difference::of(nginx_samples, balancer_samples, statistic);
        let digits = if unit == "ms" { 3 } else { 0 };
        parts.push(format!(
            "{name} {:+.digits$} {unit} ({:+.digits$}..{:+.digits$})",
            d.estimate, d.low, d.high
        ));
        compared.insert(
            name.into(),
            json!({"estimate": d.estimate, "low": d.low, "high": d.high}),
        );
    }
    let line = format!(
        "balancer bench  1 conn: balancer − nginx (95 % interval): {}",
        parts.join("; ")
    );
    let mut tail = serde_json::Map::new();
    for ((name, _), m) in paths.iter().zip(measured) {
        let mean = m.samples.iter().sum::<f64>() / m.samples.len().max(1) as f64;
        let max = m.samples.iter().copied().fold(0.0, f64::max);
        tail.insert(
            name.to_string(),
            json!({"mean_ms": mean, "p999_ms": paired::percentile_of(&m.samples, 99.9), "max_ms": max}),
        );
    }
    (line, Value::Object(compared), Value::Object(tail))
}
