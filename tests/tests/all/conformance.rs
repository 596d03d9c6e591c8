//! The runtime conformance suite (`shared/spec/conformance.md`), one piece of code for every
//! runtime image. Needs Docker and the images from `make images`.
//!
//! Per image it builds the fixture with the image's own `helpers/build.sh`, starts the servers
//! the checklist names (A: secret + enforced headers + env; B: empty secret, development mode;
//! plus broken entrypoints and a v2 server), runs every case and prints one line per case.
//! The test fails if any case fails; no case is skipped.
//!
//! Each image runs the suite twice: with fresh runtimes (the archive in `/mnt/code`) and with
//! pooled ones (`runtimes/pool-protocol.md`: a pool member specialised with the archive and the
//! env a fresh container would have had; the v2 server stays fresh, v2 is never pooled). The
//! `pool_protocol_*` tests check the specialise step itself.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bollard::Docker;
use hearth_tests::docker::connect;
use hearth_tests::runtime::{
    self, fixture_dir, specialise_body, PoolMember, RuntimeImage, Server, ServerOptions,
};
use md5::{Digest, Md5};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-key";
const V2_KEY: &str = "v2-secret-key";
const ENFORCED: &str =
    r#"{"x-custom":"value","X-CUSTOM-UPPERCASE":"Value2","x-open-runtimes-custom":248}"#;
const NATIVE_NOTICE: &str =
    "Native logs detected. Use context.log() or context.error() for better experience.";
const TRUNCATED: &str = "... Log truncated due to size limit (8000 characters)";
const TIMEOUT_HEADER_MESSAGE: &str =
    r#"Header "x-open-runtimes-timeout" must be an integer greater than 0."#;

#[tokio::test]
async fn conformance_node() -> Result<()> {
    run_suite(runtime::NODE, Mode::Fresh).await
}

#[tokio::test]
async fn conformance_python() -> Result<()> {
    run_suite(runtime::PYTHON, Mode::Fresh).await
}

#[tokio::test]
async fn conformance_wasm() -> Result<()> {
    run_suite(runtime::WASM, Mode::Fresh).await
}

#[tokio::test]
async fn conformance_node_pooled() -> Result<()> {
    run_suite(runtime::NODE, Mode::Pooled).await
}

#[tokio::test]
async fn conformance_python_pooled() -> Result<()> {
    run_suite(runtime::PYTHON, Mode::Pooled).await
}

#[tokio::test]
async fn conformance_wasm_pooled() -> Result<()> {
    run_suite(runtime::WASM, Mode::Pooled).await
}

#[tokio::test]
async fn pool_protocol_node() -> Result<()> {
    pool_protocol(runtime::NODE).await
}

#[tokio::test]
async fn pool_protocol_python() -> Result<()> {
    pool_protocol(runtime::PYTHON).await
}

/// How the suite's v5 servers get their function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The archive in `/mnt/code`, the env on the container.
    Fresh,
    /// A pool member specialised with the archive and that env.
    Pooled,
}

impl Mode {
    async fn start(
        self,
        docker: &Docker,
        rt: RuntimeImage,
        archive: &[u8],
        options: &ServerOptions,
    ) -> Result<Server> {
        match self {
            Self::Fresh => Server::start(docker, rt.image, archive, options).await,
            Self::Pooled => Server::start_pooled(docker, rt.image, archive, options).await,
        }
    }
}

/// Everything the cases need: the servers of one image and an HTTP client.
struct Ctx {
    rt: RuntimeImage,
    /// Secret `test-secret-key`, enforced headers, `CUSTOM_ENV_VAR`.
    a: Server,
    /// Empty secret, `OPEN_RUNTIMES_ENV=development`.
    b: Server,
    no_export: Server,
    missing: Server,
    syntax: Server,
    v2: Server,
    client: reqwest::Client,
}

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;
type Case = for<'a> fn(&'a Ctx) -> CaseFuture<'a>;

macro_rules! cases {
    ($($name:literal => $f:ident),* $(,)?) => {
        &[$(($name, |ctx| Box::pin($f(ctx)))),*]
    };
}

/// Every case of the checklist, plus the bad-input cases of the runtime images issue.
const CASES: &[(&str, Case)] = cases![
    "wrong secret" => wrong_secret,
    "no secret header" => no_secret_header,
    "empty server secret" => empty_server_secret,
    "health" => health,
    "timings" => timings,
    "start log" => start_log,
    "build tools" => build_tools,
    "plaintext" => plaintext,
    "json" => json_response,
    "content type" => content_type,
    "redirect" => redirect,
    "empty" => empty,
    "no response" => no_response,
    "double response" => double_response,
    "headers" => headers,
    "status" => status,
    "exception" => exception,
    "error handling" => error_handling,
    "method" => method,
    "url" => url,
    "request headers" => request_headers,
    "text body" => text_body,
    "json body" => json_body,
    "binary body" => binary_body,
    "env" => env,
    "logs" => logs,
    "dependency" => dependency,
    "invalid json" => invalid_json,
    "timeout" => timeout,
    "never returns" => never_returns,
    "deprecated send" => deprecated_send,
    "binary response" => binary_response,
    "large body" => large_body,
    "enforced headers" => enforced_headers,
    "spread logs" => spread_logs,
    "no export" => no_export,
    "dev log files" => dev_log_files,
    "v2 invocation" => v2_invocation,
    "missing entrypoint" => missing_entrypoint,
    "syntax error" => syntax_error,
    "concurrent requests" => concurrent_requests,
    "head request" => head_request,
];

async fn run_suite(rt: RuntimeImage, mode: Mode) -> Result<()> {
    let ctx = setup(rt, mode).await?;
    let mut failures = Vec::new();
    let label = match mode {
        Mode::Fresh => rt.image.to_string(),
        Mode::Pooled => format!("{} (pooled)", rt.image),
    };
    let mut lines = vec![format!("conformance {label}")];
    for (name, case) in CASES {
        let started = Instant::now();
        let outcome = case(&ctx).await;
        let ms = started.elapsed().as_millis();
        match outcome {
            Ok(()) => lines.push(format!("  ok    {name} ({ms} ms)")),
            Err(err) => {
                lines.push(format!("  FAIL  {name} ({ms} ms): {err:#}"));
                failures.push(*name);
            }
        }
    }
    lines.push(format!(
        "{label}: {} passed, {} failed, 0 skipped",
        CASES.len() - failures.len(),
        failures.len()
    ));
    println!("{}", lines.join("\n"));
    if !failures.is_empty() {
        bail!("{label}: failed cases: {}", failures.join(", "));
    }
    Ok(())
}

async fn setup(rt: RuntimeImage, mode: Mode) -> Result<Ctx> {
    let docker = connect().await?;
    let source = fixture_dir(rt.name);
    let v2_source = fixture_dir(&format!("{}-v2", rt.name));
    // One build without a recorded entrypoint serves every server that names its own; the
    // no-export build records its entrypoint, which must win at start.
    let (neutral, recorded, v2) = tokio::try_join!(
        runtime::build(&docker, rt.image, &source, "", rt.install),
        runtime::build(&docker, rt.image, &source, rt.no_export, rt.install),
        runtime::build(&docker, rt.image, &v2_source, rt.v2_entry, ""),
    )
    .context("failed to build the fixtures")?;

    let a_opts = ServerOptions::default()
        .env("OPEN_RUNTIMES_ENTRYPOINT", rt.entry)
        .env("OPEN_RUNTIMES_SECRET", SECRET)
        .env("OPEN_RUNTIMES_HEADERS", ENFORCED)
        .env("CUSTOM_ENV_VAR", "customValue");
    let b_opts = ServerOptions::default()
        .env("OPEN_RUNTIMES_ENTRYPOINT", rt.entry)
        .env("OPEN_RUNTIMES_SECRET", "")
        .env("OPEN_RUNTIMES_ENV", "development");
    let with_entry = |entry: &str| {
        ServerOptions::default()
            .env("OPEN_RUNTIMES_ENTRYPOINT", entry)
            .env("OPEN_RUNTIMES_SECRET", SECRET)
    };
    let v2_opts = ServerOptions {
        default_cmd: true,
        ..ServerOptions::default()
    }
    .env("INTERNAL_RUNTIME_KEY", V2_KEY)
    .env("INTERNAL_RUNTIME_ENTRYPOINT", rt.v2_entry);
    // The recorded entrypoint must beat the one in the environment.
    let no_export_opts = with_entry(rt.entry);
    let missing_opts = with_entry(&format!("missing-{}", rt.entry));
    let syntax_opts = with_entry(rt.syntax_error);

    let (a, b, no_export, missing, syntax, v2) = tokio::try_join!(
        mode.start(&docker, rt, &neutral.archive, &a_opts),
        mode.start(&docker, rt, &neutral.archive, &b_opts),
        mode.start(&docker, rt, &recorded.archive, &no_export_opts),
        mode.start(&docker, rt, &neutral.archive, &missing_opts),
        mode.start(&docker, rt, &neutral.archive, &syntax_opts),
        Server::start(&docker, rt.image, &v2.archive, &v2_opts),
    )
    .context("failed to start the servers")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    Ok(Ctx {
        rt,
        a,
        b,
        no_export,
        missing,
        syntax,
        v2,
        client,
    })
}

// ---- request helpers ----------------------------------------------------------------------

impl Ctx {
    /// A request to server A carrying the right secret and the action.
    fn call(&self, action: &str) -> RequestBuilder {
        self.call_on(&self.a, Method::POST, action)
            .header("x-open-runtimes-secret", SECRET)
    }

    fn call_on(&self, server: &Server, method: Method, action: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}/", server.url))
            .header("x-action", action)
    }
}

fn header(res: &Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn log_id(res: &Response) -> String {
    header(res, "x-open-runtimes-log-id")
}

async fn expect(res: Response, status: u16, body: &str) -> Result<()> {
    let got = res.status().as_u16();
    let text = res.text().await?;
    ensure!(
        got == status && text == body,
        "expected {status} {body:?}, got {got} {:?}",
        cut(&text)
    );
    Ok(())
}

async fn json_of(res: Response) -> Result<Value> {
    let status = res.status().as_u16();
    let text = res.text().await?;
    ensure!(status == 200, "expected 200, got {status} {:?}", cut(&text));
    serde_json::from_str(&text).with_context(|| format!("not JSON: {:?}", cut(&text)))
}

fn cut(text: &str) -> String {
    text.chars().take(300).collect()
}

/// The log files of the request that produced `res` on `server`.
async fn logs_of(server: &Server, res: &Response) -> Result<(String, String)> {
    let id = log_id(res);
    ensure!(!id.is_empty(), "response has no x-open-runtimes-log-id");
    server.log_files(&id).await
}

fn md5_hex(bytes: &[u8]) -> String {
    let digest = Md5::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- base cases ---------------------------------------------------------------------------

async fn wrong_secret(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call_on(&ctx.a, Method::POST, "plaintextResponse")
        .header("x-open-runtimes-secret", "wrong-secret")
        .send()
        .await?;
    unauthorized(res).await
}

async fn no_secret_header(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call_on(&ctx.a, Method::POST, "plaintextResponse")
        .send()
        .await?;
    unauthorized(res).await
}

async fn unauthorized(res: Response) -> Result<()> {
    let status = res.status().as_u16();
    let text = res.text().await?;
    ensure!(status == 500 || status == 401, "status {status}");
    ensure!(text.contains("Unauthorized"), "body {text:?}");
    Ok(())
}

async fn empty_server_secret(ctx: &Ctx) -> Result<()> {
    for secret in [None, Some("anything"), Some("")] {
        let mut req = ctx.call_on(&ctx.b, Method::POST, "plaintextResponse");
        if let Some(secret) = secret {
            req = req.header("x-open-runtimes-secret", secret);
        }
        expect(req.send().await?, 200, "Hello World 👋").await?;
    }
    Ok(())
}

async fn health(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .client
        .get(format!("{}/__opr/health", ctx.a.url))
        .send()
        .await?;
    expect(res, 200, "OK").await
}

async fn timings(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .client
        .get(format!("{}/__opr/timings", ctx.a.url))
        .send()
        .await?;
    ensure!(res.status() == 200, "status {}", res.status());
    let content_type = header(&res, "content-type");
    ensure!(
        content_type.starts_with("text/plain"),
        "content-type {content_type}"
    );
    let text = res.text().await?;
    let lines: Vec<_> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "no timings");
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("line {line:?} is not key=value"))?;
        ensure!(!key.is_empty(), "empty key in {line:?}");
        value
            .trim()
            .parse::<f64>()
            .with_context(|| format!("value of {line:?} is not a number of seconds"))?;
    }
    Ok(())
}

async fn start_log(ctx: &Ctx) -> Result<()> {
    let output = ctx.a.container.output().await?;
    ensure!(
        output.contains("HTTP server successfully started!"),
        "container output: {output:?}"
    );
    Ok(())
}

async fn build_tools(ctx: &Ctx) -> Result<()> {
    for tool in [
        &["script", "--help"][..],
        &["bash", "--version"],
        &["tar", "--version"],
        &["gzip", "--version"],
    ] {
        let (code, _, err) = ctx.a.container.exec(tool).await?;
        ensure!(code == 0, "{tool:?} exited {code}: {err}");
    }
    Ok(())
}

// ---- serverless cases ---------------------------------------------------------------------

async fn plaintext(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("plaintextResponse").send().await?;
    let content_type = header(&res, "content-type");
    ensure!(
        content_type == "text/plain; charset=utf-8",
        "content-type {content_type}"
    );
    expect(res, 200, "Hello World 👋").await
}

async fn json_response(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("jsonResponse").send().await?;
    let content_type = header(&res, "content-type");
    ensure!(
        content_type == "application/json; charset=utf-8",
        "content-type {content_type}"
    );
    expect(
        res,
        200,
        r#"{"json":true,"message":"Developers are awesome."}"#,
    )
    .await
}

async fn content_type(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("customCharsetResponse").send().await?;
    let got = header(&res, "content-type");
    ensure!(
        got == "text/plain; charset=iso-8859-1",
        "custom charset: {got}"
    );
    let res = ctx.call("uppercaseCharsetResponse").send().await?;
    let got = header(&res, "content-type");
    ensure!(got == "text/plain; charset=utf-8", "uppercase: {got}");
    let res = ctx.call("multipartResponse").send().await?;
    let got = header(&res, "content-type");
    ensure!(
        got == "multipart/form-data; boundary=12345",
        "multipart: {got}"
    );
    let body = res.text().await?;
    ensure!(
        body.contains("Why just have one part?") && body.contains("When you can have two!"),
        "multipart body {body:?}"
    );
    Ok(())
}

async fn redirect(ctx: &Ctx) -> Result<()> {
    // reqwest follows redirects by default; this client must not.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let res = client
        .post(format!("{}/", ctx.a.url))
        .header("x-action", "redirectResponse")
        .header("x-open-runtimes-secret", SECRET)
        .send()
        .await?;
    let location = header(&res, "location");
    ensure!(location == "https://github.com/", "location {location:?}");
    expect(res, 301, "").await
}

async fn empty(ctx: &Ctx) -> Result<()> {
    expect(ctx.call("emptyResponse").send().await?, 204, "").await
}

async fn no_response(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("noResponse").send().await?;
    let (_, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(
        errors.contains("Return statement missing."),
        "errors: {errors:?}"
    );
    Ok(())
}

async fn double_response(ctx: &Ctx) -> Result<()> {
    expect(
        ctx.call("doubleResponse").send().await?,
        200,
        "This should be returned.",
    )
    .await
}

async fn headers(ctx: &Ctx) -> Result<()> {
    let cookie = "cookie=value; cookie2=value2; cookie3=value=3; cookie4=val:ue4; cookie5=value5";
    let res = ctx
        .call("headersResponse")
        .header("x-open-runtimes-custom-in-header", "123")
        .header("cookie", cookie)
        .send()
        .await?;
    ensure!(res.status() == 200, "status {}", res.status());
    ensure!(
        header(&res, "first-header") == "first-value",
        "first-header"
    );
    let second = header(&res, "second-header");
    ensure!(
        second == "missing",
        "x-open-runtimes-* reached the function: {second}"
    );
    let got_cookie = header(&res, "cookie");
    ensure!(got_cookie == cookie, "cookies changed: {got_cookie:?}");
    for name in res.headers().keys() {
        let name = name.as_str();
        ensure!(
            !name.starts_with("x-open-runtimes-") || name == "x-open-runtimes-log-id",
            "outgoing {name} not stripped"
        );
    }
    Ok(())
}

async fn status(ctx: &Ctx) -> Result<()> {
    expect(ctx.call("statusResponse").send().await?, 404, "FAIL").await
}

async fn exception(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("anUnknownAction").send().await?;
    let (_, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(errors.contains("Unknown action"), "errors: {errors:?}");
    ensure!(
        errors.contains(ctx.rt.entry),
        "errors do not name {}: {errors:?}",
        ctx.rt.entry
    );
    Ok(())
}

async fn error_handling(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("errorTest").send().await?;
    let (logs, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(logs.contains("Before error..."), "logs: {logs:?}");
    ensure!(errors.contains("Error!"), "errors: {errors:?}");
    Ok(())
}

async fn method(ctx: &Ctx) -> Result<()> {
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let res = ctx
            .call_on(
                &ctx.a,
                Method::from_bytes(method.as_bytes())?,
                "requestMethod",
            )
            .header("x-open-runtimes-secret", SECRET)
            .send()
            .await?;
        expect(res, 200, method).await?;
    }
    Ok(())
}

async fn url(ctx: &Ctx) -> Result<()> {
    struct UrlCase {
        host: &'static str,
        proto: Option<&'static str>,
        path: &'static str,
        want: Value,
    }
    let cases = [
        UrlCase {
            host: "localhost:3000",
            proto: None,
            path: "/",
            want: json!({"scheme": "http", "host": "localhost", "port": 3000, "path": "/",
                "queryString": "", "query": {}, "url": "http://localhost:3000/"}),
        },
        UrlCase {
            host: "www.mydomain.com",
            proto: Some("https"),
            path: "/path/to/page?a=1&b=&c==d&h",
            want: json!({"scheme": "https", "host": "www.mydomain.com", "port": 443,
                "path": "/path/to/page", "queryString": "a=1&b=&c==d&h",
                "query": {"a": "1", "b": "", "c": "=d", "h": ""},
                "url": "https://www.mydomain.com/path/to/page?a=1&b=&c==d&h"}),
        },
        UrlCase {
            host: "www.mydomain.com:80",
            proto: None,
            path: "/?key=value",
            want: json!({"scheme": "http", "host": "www.mydomain.com", "port": 80, "path": "/",
                "queryString": "key=value", "query": {"key": "value"},
                "url": "http://www.mydomain.com/?key=value"}),
        },
        UrlCase {
            host: "www.mydomain.com:8080",
            proto: Some("https"),
            path: "/a/b",
            want: json!({"scheme": "https", "host": "www.mydomain.com", "port": 8080,
                "path": "/a/b", "queryString": "", "query": {},
                "url": "https://www.mydomain.com:8080/a/b"}),
        },
    ];
    for case in cases {
        let mut req = ctx
            .client
            .get(format!("{}{}", ctx.a.url, case.path))
            .header("x-action", "requestUrl")
            .header("x-open-runtimes-secret", SECRET)
            .header("host", case.host);
        if let Some(proto) = case.proto {
            req = req.header("x-forwarded-proto", proto);
        }
        let got = json_of(req.send().await?).await?;
        ensure!(
            got == case.want,
            "host {} path {}: got {got}, want {}",
            case.host,
            case.path,
            case.want
        );
    }
    Ok(())
}

async fn request_headers(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call("requestHeaders")
        .header("X-Custom-Header", "Some Value")
        .header("x-open-runtimes-hidden", "secret-value")
        .send()
        .await?;
    let got = json_of(res).await?;
    let map = got.as_object().context("headers are not an object")?;
    ensure!(
        map.get("x-custom-header") == Some(&json!("Some Value")),
        "x-custom-header: {got}"
    );
    ensure!(
        map.get("x-action") == Some(&json!("requestHeaders")),
        "x-action: {got}"
    );
    for (name, value) in map {
        ensure!(name == &name.to_lowercase(), "{name} not lower-cased");
        if name.starts_with("x-open-runtimes-") {
            // Only the enforced header of server A may carry the prefix.
            ensure!(
                name == "x-open-runtimes-custom" && value == &json!("248"),
                "{name} visible to the function"
            );
        }
    }
    // Server B enforces nothing: no x-open-runtimes-* at all.
    let res = ctx
        .call_on(&ctx.b, Method::GET, "requestHeaders")
        .header("x-open-runtimes-hidden", "secret-value")
        .send()
        .await?;
    let got = json_of(res).await?;
    let map = got.as_object().context("headers are not an object")?;
    ensure!(
        map.keys().all(|k| !k.starts_with("x-open-runtimes-")),
        "x-open-runtimes-* visible on server B: {got}"
    );
    Ok(())
}

async fn text_body(ctx: &Ctx) -> Result<()> {
    let body = "Hello 👋 <b>text</b> {\"not\": \"parsed\"}";
    for content_type in [
        "text/plain",
        "text/html",
        "application/xml",
        "application/json",
        "application/x-www-form-urlencoded",
        "application/octet-stream",
    ] {
        let res = ctx
            .call("requestBodyText")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        expect(res, 200, body).await.context(content_type)?;
    }
    expect(ctx.call("requestBodyText").send().await?, 200, "").await?;
    let res = ctx
        .call("requestBodyTextAuto")
        .header("content-type", "text/plain")
        .body("auto text")
        .send()
        .await?;
    expect(res, 200, "auto text").await
}

async fn json_body(ctx: &Ctx) -> Result<()> {
    let body =
        json!({"key1": "OK", "key2": "👋", "key3": [1, 2.5, true, null], "key4": {"n": "v"}});
    for (action, content_type) in [
        ("requestBodyJson", "application/json"),
        ("requestBodyJson", "APPLICATION/JSON; charset=utf-8"),
        ("requestBodyJson", "text/plain"),
        ("requestBodyJsonAuto", "application/json"),
    ] {
        let res = ctx
            .call(action)
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await?;
        let got = json_of(res)
            .await
            .with_context(|| format!("{action} {content_type}"))?;
        ensure!(got == body, "{action} {content_type}: got {got}");
    }
    // An empty JSON body reads as `{}` through `body`.
    let res = ctx
        .call("requestBodyJsonAuto")
        .header("content-type", "application/json")
        .send()
        .await?;
    let got = json_of(res).await.context("empty body")?;
    ensure!(got == json!({}), "empty body gave {got}");
    Ok(())
}

async fn binary_body(ctx: &Ctx) -> Result<()> {
    let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let res = ctx
        .call("requestBodyBinary")
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await?;
    ensure!(res.status() == 200, "status {}", res.status());
    let got = res.bytes().await?;
    ensure!(
        got.as_ref() == body.as_slice(),
        "bytes differ ({} back)",
        got.len()
    );
    Ok(())
}

async fn env(ctx: &Ctx) -> Result<()> {
    let got = json_of(ctx.call("envVars").send().await?).await?;
    ensure!(
        got == json!({"var": "customValue", "emptyVar": null}),
        "got {got}"
    );
    Ok(())
}

async fn logs(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("logs").send().await?;
    let id = log_id(&res);
    ensure!(id.len() == 20, "log id {id:?} is not 20 characters");
    ensure!(res.status() == 200, "status {}", res.status());
    let (logs, errors) = ctx.a.log_files(&id).await?;
    let long_a = format!("{}{TRUNCATED}", "A".repeat(8000));
    for want in [
        NATIVE_NOTICE,
        "Native log",
        "Debug log",
        "Log+With+Plus+Symbol",
        "42",
        "4.2",
        "true",
        r#"{"objectKey":"objectValue"}"#,
        r#"["arrayValue"]"#,
        long_a.as_str(),
    ] {
        ensure!(
            logs.lines().any(|l| l == want),
            "logs lack the line {:?}: {:?}",
            cut(want),
            cut(&logs)
        );
    }
    ensure!(
        !logs.contains(&"A".repeat(8001)),
        "logs not cut at 8000 characters"
    );
    ensure!(!logs.contains("Error log"), "error() went to the logs file");
    let long_b = format!("{}{TRUNCATED}", "B".repeat(8000));
    ensure!(
        errors.lines().any(|l| l == "Error log"),
        "errors: {:?}",
        cut(&errors)
    );
    ensure!(
        errors.lines().any(|l| l == long_b),
        "errors not cut at 8000 characters"
    );

    let second = ctx.call("logs").send().await?;
    let second_id = log_id(&second);
    ensure!(
        second_id.len() == 20 && second_id != id,
        "second id {second_id:?}"
    );

    let before = ctx.a.log_dir().await?;
    let res = ctx
        .call("logs")
        .header("x-open-runtimes-logging", "disabled")
        .send()
        .await?;
    ensure!(res.status() == 200, "disabled: status {}", res.status());
    ensure!(
        log_id(&res).is_empty(),
        "disabled logging returned id {:?}",
        log_id(&res)
    );
    let after = ctx.a.log_dir().await?;
    ensure!(
        before == after,
        "disabled logging wrote files: {before:?} -> {after:?}"
    );

    let res = ctx
        .call("logs")
        .header("x-open-runtimes-log-id", "customLogId123")
        .send()
        .await?;
    ensure!(log_id(&res) == "customLogId123", "custom id not echoed");
    let (logs, _) = ctx.a.log_files("customLogId123").await?;
    ensure!(
        logs.contains("Debug log"),
        "custom id file: {:?}",
        cut(&logs)
    );
    Ok(())
}

async fn dependency(ctx: &Ctx) -> Result<()> {
    let got = json_of(ctx.call("library").send().await?).await?;
    ensure!(
        got == json!({"message": "Hello from a local package"}),
        "got {got}"
    );
    Ok(())
}

async fn invalid_json(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call("invalidJson")
        .header("content-type", "application/json")
        .body(r#"{"invalid": "#)
        .send()
        .await?;
    let (_, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(
        errors.to_lowercase().contains("json"),
        "errors do not mention JSON: {errors:?}"
    );
    let res = ctx
        .call("invalidJson")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await?;
    expect(res, 200, "{}").await
}

async fn timeout(ctx: &Ctx) -> Result<()> {
    let started = Instant::now();
    let res = ctx
        .call("timeout")
        .header("x-open-runtimes-timeout", "1")
        .send()
        .await?;
    let took = started.elapsed();
    let (logs, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(
        took < Duration::from_millis(2500),
        "timed out after {took:?}"
    );
    ensure!(
        errors.contains("Execution timed out."),
        "errors: {errors:?}"
    );
    ensure!(logs.contains("Timeout start."), "logs: {logs:?}");

    let res = ctx
        .call("timeout")
        .header("x-open-runtimes-timeout", "5")
        .send()
        .await?;
    expect(res, 200, "Successful response.").await?;

    for bad in ["abcd", "0", "-1", "1.5"] {
        let res = ctx
            .call("plaintextResponse")
            .header("x-open-runtimes-timeout", bad)
            .send()
            .await?;
        expect(res, 500, TIMEOUT_HEADER_MESSAGE)
            .await
            .with_context(|| format!("timeout header {bad:?}"))?;
    }
    Ok(())
}

/// A function that never settles is cut off at the timeout and the server keeps serving.
async fn never_returns(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call("neverReturns")
        .header("x-open-runtimes-timeout", "1")
        .send()
        .await?;
    let (_, errors) = logs_of(&ctx.a, &res).await?;
    expect(res, 500, "").await?;
    ensure!(
        errors.contains("Execution timed out."),
        "errors: {errors:?}"
    );
    expect(
        ctx.call("plaintextResponse").send().await?,
        200,
        "Hello World 👋",
    )
    .await
}

async fn deprecated_send(ctx: &Ctx) -> Result<()> {
    for (content_type, body) in [
        ("text/plain", "Hello deprecated"),
        ("application/json", r#"{"key":"value"}"#),
        ("application/x-unknown", "raw ✓"),
    ] {
        let res = ctx
            .call("deprecatedMethods")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?;
        expect(res, 200, body).await.context(content_type)?;
    }
    expect(
        ctx.call("deprecatedMethodsUntypedBody").send().await?,
        200,
        "50",
    )
    .await
}

async fn binary_response(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("binaryResponse").send().await?;
    ensure!(res.status() == 200, "status {}", res.status());
    let got = res.bytes().await?;
    ensure!(got.as_ref() == [0u8, 10, 255], "got {got:?}");
    Ok(())
}

async fn large_body(ctx: &Ctx) -> Result<()> {
    let body: Vec<u8> = (0..17_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let want = md5_hex(&body);
    let res = ctx.call("binaryResponseLarge").body(body).send().await?;
    ensure!(header(&res, "x-method") == "POST", "x-method");
    expect(res, 200, &want).await.context("17 MB body")?;

    let too_big = vec![7u8; 23_000_000];
    match ctx.call("binaryResponseLarge").body(too_big).send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            ensure!(status == 413 || status == 500, "23 MB body gave {status}");
        }
        // A server may close the connection as soon as it has answered 413.
        Err(err) if err.is_request() || err.is_body() => {}
        Err(err) => return Err(err).context("23 MB body"),
    }

    let res = ctx
        .call_on(&ctx.a, Method::GET, "binaryResponseLarge")
        .header("x-open-runtimes-secret", SECRET)
        .send()
        .await?;
    ensure!(header(&res, "x-method") == "GET", "x-method of GET");
    expect(res, 200, &md5_hex(b"")).await.context("empty GET")
}

async fn enforced_headers(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call("enforcedHeaders")
        .header("x-custom", "client")
        .header("x-custom-uppercase", "client")
        .header("x-open-runtimes-custom", "client")
        .send()
        .await?;
    let got = json_of(res).await?;
    ensure!(
        got == json!({"x-custom": "value", "x-custom-uppercase": "Value2",
            "x-open-runtimes-custom": "248"}),
        "got {got}"
    );
    Ok(())
}

async fn spread_logs(ctx: &Ctx) -> Result<()> {
    let res = ctx.call("spreadOperatorLogs").send().await?;
    let (logs, _) = logs_of(&ctx.a, &res).await?;
    expect(res, 200, "OK").await?;
    ensure!(
        logs.lines().any(|l| l == "engine: open-runtimes"),
        "logs: {logs:?}"
    );
    Ok(())
}

/// A load failure: 503 with an empty body and the reason in the errors log.
async fn expect_unavailable(ctx: &Ctx, server: &Server, reason: &str) -> Result<()> {
    for _ in 0..2 {
        let res = ctx
            .call_on(server, Method::POST, "plaintextResponse")
            .header("x-open-runtimes-secret", SECRET)
            .send()
            .await?;
        let (_, errors) = logs_of(server, &res).await?;
        expect(res, 503, "").await?;
        ensure!(!errors.trim().is_empty(), "errors log is empty");
        ensure!(errors.contains(reason), "errors: {:?}", cut(&errors));
    }
    Ok(())
}

async fn no_export(ctx: &Ctx) -> Result<()> {
    expect_unavailable(ctx, &ctx.no_export, "Function signature invalid").await
}

async fn missing_entrypoint(ctx: &Ctx) -> Result<()> {
    expect_unavailable(ctx, &ctx.missing, "does not exist").await
}

async fn syntax_error(ctx: &Ctx) -> Result<()> {
    expect_unavailable(ctx, &ctx.syntax, ctx.rt.syntax_error).await
}

async fn dev_log_files(ctx: &Ctx) -> Result<()> {
    let res = ctx.call_on(&ctx.b, Method::POST, "logs").send().await?;
    ensure!(log_id(&res) == "dev", "development id {:?}", log_id(&res));
    let (logs, errors) = ctx.b.log_files("dev").await?;
    ensure!(logs.contains("Debug log"), "dev_logs.log: {:?}", cut(&logs));
    ensure!(
        errors.contains("Error log"),
        "dev_errors.log: {:?}",
        cut(&errors)
    );

    let before = ctx.b.log_dir().await?;
    let res = ctx
        .call_on(&ctx.b, Method::POST, "logs")
        .header("x-open-runtimes-logging", "disabled")
        .send()
        .await?;
    ensure!(res.status() == 200, "status {}", res.status());
    let after = ctx.b.log_dir().await?;
    ensure!(before == after, "disabled wrote: {before:?} -> {after:?}");
    // Appending is fine, but the content must not have grown either.
    let (logs_after, _) = ctx.b.log_files("dev").await?;
    ensure!(
        logs_after == logs,
        "disabled logging appended to dev_logs.log"
    );

    let res = ctx
        .call_on(&ctx.b, Method::POST, "logs")
        .header("x-open-runtimes-log-id", "myDevLogId")
        .send()
        .await?;
    ensure!(log_id(&res) == "myDevLogId", "custom id {:?}", log_id(&res));
    let (logs, _) = ctx.b.log_files("myDevLogId").await?;
    ensure!(
        logs.contains("Debug log"),
        "custom id file: {:?}",
        cut(&logs)
    );
    Ok(())
}

async fn v2_invocation(ctx: &Ctx) -> Result<()> {
    for key in ["variables", "env"] {
        let payload = json!({
            key: {"test-variable": "variable-value"},
            "payload": "payload-value",
            "headers": {"x-test-header": "header-value"},
        });
        let res = ctx
            .client
            .post(format!("{}/", ctx.v2.url))
            .header("x-internal-challenge", V2_KEY)
            .json(&payload)
            .send()
            .await?;
        let got = json_of(res).await.with_context(|| format!("with {key}"))?;
        ensure!(
            got["response"]
                == json!({"payload": "payload-value", "variable": "variable-value",
                    "header": "header-value"}),
            "with {key}: {got}"
        );
        let stdout = got["stdout"].as_str().unwrap_or_default();
        let stderr = got["stderr"].as_str().unwrap_or_default();
        ensure!(stdout.contains("v2 log"), "stdout {stdout:?}");
        ensure!(stderr.contains("v2 error"), "stderr {stderr:?}");
    }
    let res = ctx
        .client
        .post(format!("{}/", ctx.v2.url))
        .header("x-internal-challenge", "wrong")
        .json(&json!({"payload": ""}))
        .send()
        .await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    ensure!(
        status == 500 && text.contains("Unauthorized"),
        "wrong challenge gave {status} {text:?}"
    );
    Ok(())
}

/// Requests are served concurrently: two 1 s calls finish together (Python's sync `main` too).
async fn concurrent_requests(ctx: &Ctx) -> Result<()> {
    let started = Instant::now();
    let (one, two) = tokio::join!(ctx.call("slow").send(), ctx.call("slow").send());
    expect(one?, 200, "slow").await?;
    expect(two?, 200, "slow").await?;
    let took = started.elapsed();
    ensure!(
        took < Duration::from_millis(1800),
        "two concurrent 1 s calls took {took:?}"
    );
    Ok(())
}

async fn head_request(ctx: &Ctx) -> Result<()> {
    let res = ctx
        .call_on(&ctx.a, Method::HEAD, "plaintextResponse")
        .header("x-open-runtimes-secret", SECRET)
        .send()
        .await?;
    expect(res, 200, "").await
}

// ---- the pool protocol itself ---------------------------------------------------------------

const NOT_SPECIALISED: &str = r#"{"message":"Runtime is not specialised yet."}"#;

/// `runtimes/pool-protocol.md` on one image: what a pool member answers before and after its
/// function arrives, the refused secrets and bodies, and that a pooled function sees the
/// environment a fresh one sees, without the pool secret.
async fn pool_protocol(rt: RuntimeImage) -> Result<()> {
    let docker = connect().await?;
    let built = runtime::build(&docker, rt.image, &fixture_dir(rt.name), "", rt.install)
        .await
        .context("failed to build the fixture")?;
    let options = ServerOptions::default()
        .env("OPEN_RUNTIMES_ENTRYPOINT", rt.entry)
        .env("OPEN_RUNTIMES_SECRET", SECRET)
        .env("CUSTOM_ENV_VAR", "customValue");
    let none = ServerOptions::default();
    // One member goes through the whole protocol, each other one is refused one body.
    let (member, bad_json, bad_base64, bad_archive, fresh) = tokio::try_join!(
        PoolMember::start(&docker, rt.image, &none),
        PoolMember::start(&docker, rt.image, &none),
        PoolMember::start(&docker, rt.image, &none),
        PoolMember::start(&docker, rt.image, &none),
        Server::start(&docker, rt.image, &built.archive, &options),
    )
    .context("failed to start the runtimes")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = member.server.url.clone();
    let body = specialise_body(&options.env, &built.archive).to_string();

    // Before its function: the health check answers, everything else is 503.
    let res = client.get(format!("{url}/__opr/health")).send().await?;
    expect(res, 200, "OK").await.context("health")?;
    for (method, path) in [
        (Method::POST, "/"),
        (Method::GET, "/__opr/timings"),
        (Method::GET, runtime::SPECIALISE_PATH),
    ] {
        let res = client
            .request(method.clone(), format!("{url}{path}"))
            .header("x-action", "plaintextResponse")
            .header("x-open-runtimes-secret", SECRET)
            .send()
            .await?;
        expect(res, 503, NOT_SPECIALISED)
            .await
            .with_context(|| format!("{method} {path} before specialisation"))?;
    }

    // A missing or wrong pool secret changes nothing.
    for secret in [None, Some(""), Some("wrong")] {
        let res = member.post(secret, body.clone()).await?;
        expect_message(res, 401)
            .await
            .with_context(|| format!("pool secret {secret:?}"))?;
    }
    let started = Instant::now();
    let res = member.post(Some(&member.secret), body.clone()).await?;
    let took = started.elapsed();
    expect(res, 200, r#"{"specialised":true}"#)
        .await
        .context("specialise")?;
    println!(
        "pool protocol {}: specialised in {took:?} ({} bytes of code)",
        rt.image,
        built.archive.len()
    );
    let res = member.post(Some(&member.secret), body.clone()).await?;
    expect_message(res, 409)
        .await
        .context("second specialise")?;

    // Now it is the function's runtime.
    let res = client
        .post(format!("{url}/"))
        .header("x-action", "plaintextResponse")
        .header("x-open-runtimes-secret", SECRET)
        .send()
        .await?;
    expect(res, 200, "Hello World 👋")
        .await
        .context("function")?;
    let timings = client
        .get(format!("{url}/__opr/timings"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(timings.starts_with("extract="), "timings {timings:?}");

    let pooled = process_env(&client, &member.server).await?;
    let seen = pooled.to_string();
    ensure!(
        !seen.contains(&member.secret) && !seen.contains("OPEN_RUNTIMES_POOL_SECRET"),
        "the pool secret is visible to the function: {}",
        cut(&seen)
    );
    let fresh = process_env(&client, &fresh).await?;
    let (pooled_env, fresh_env) = (
        without_hostname(&pooled["env"]),
        without_hostname(&fresh["env"]),
    );
    ensure!(
        pooled_env == fresh_env,
        "the function's environment differs: pooled {pooled_env}, fresh {fresh_env}"
    );
    // Python: the module search path of the function, venv first.
    ensure!(
        pooled["path"] == fresh["path"],
        "sys.path differs: pooled {}, fresh {}",
        pooled["path"],
        fresh["path"]
    );

    // Refused bodies: 400, and the member is of no use afterwards (the executor removes it).
    let refused = [
        (&bad_json, "{not json".to_string(), "bad JSON"),
        (
            &bad_base64,
            json!({"env": {}, "code": "!!! not base64 !!!"}).to_string(),
            "bad base64",
        ),
        (
            &bad_archive,
            json!({"env": {}, "code": runtime::base64(b"not a tar archive, just text")})
                .to_string(),
            "not an archive",
        ),
    ];
    for (member, bad, what) in refused {
        let res = member.post(Some(&member.secret), bad).await?;
        expect_message(res, 400).await.context(what)?;
        let res = member.post(Some(&member.secret), body.clone()).await?;
        expect_message(res, 409)
            .await
            .with_context(|| format!("specialise after {what}"))?;
    }
    Ok(())
}

/// A JSON reply `{"message": "..."}` with `status`.
async fn expect_message(res: Response, status: u16) -> Result<()> {
    let got = res.status().as_u16();
    let text = res.text().await?;
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string));
    ensure!(
        got == status && message.is_some_and(|m| !m.is_empty()),
        "expected {status} with a JSON message, got {got} {:?}",
        cut(&text)
    );
    Ok(())
}

/// What the fixture's `processEnv` action reports: its env, /proc/self/environ, a child's env.
async fn process_env(client: &reqwest::Client, server: &Server) -> Result<Value> {
    let res = client
        .post(format!("{}/", server.url))
        .header("x-action", "processEnv")
        .header("x-open-runtimes-secret", SECRET)
        .send()
        .await?;
    json_of(res).await.context("processEnv")
}

/// The env object without `HOSTNAME`, the one variable that differs between containers.
fn without_hostname(env: &Value) -> Value {
    let mut env = env.clone();
    if let Some(map) = env.as_object_mut() {
        map.remove("HOSTNAME");
    }
    env
}
