//! `sightline gate`: the CI regression gate. It asks a collector's `/api/v1/compare` (the same
//! engine as the dashboard) with the bands of a `gate.toml`, prints the verdict as a table,
//! Markdown for a pull-request comment, JUnit (one testcase per BT) or JSON, and exits:
//! 0 pass, 1 fail, 2 warn (only with `--fail-on-warn`), 3 inconclusive, 4 error (collector
//! unreachable, unknown service or version, bad input).

use std::{fmt::Write, path::Path, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use figment::{
    providers::{Format as _, Serialized, Toml},
    Figment,
};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::Deserialize;
use sightline_compare::{BtResult, MetricResult, Settings, Verdict};

/// How the verdict is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Markdown,
    Junit,
    Json,
}

/// What to compare and how to report it (the command line's `sightline gate` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    #[arg(long)]
    pub service: String,
    /// The version running now (e.g. production's).
    #[arg(long)]
    pub baseline: String,
    /// The version under test.
    #[arg(long)]
    pub candidate: String,
    /// Start of the window: RFC 3339 or Unix milliseconds (default: 15 minutes ago).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the window (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// The collector's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8480")]
    pub url: String,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Exit 2 on a warning (a significant slowdown within its band).
    #[arg(long)]
    pub fail_on_warn: bool,
    /// Bands and settings (see gate.example.toml).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// The API's answer.
#[derive(Debug, Deserialize)]
pub struct Comparison {
    pub service: String,
    pub baseline: String,
    pub candidate: String,
    pub from: u64,
    pub to: u64,
    pub block_seconds: u32,
    pub verdict: Verdict,
    /// All BTs' mean latency, the candidate's at the baseline's traffic mix, as a ratio.
    #[serde(default)]
    pub reweighted_mean_ratio: Option<f64>,
    pub transactions: Vec<BtResult>,
}

/// The exit code for a verdict.
pub fn exit_code(verdict: Verdict, fail_on_warn: bool) -> u8 {
    match verdict {
        Verdict::Pass => 0,
        Verdict::Fail => 1,
        Verdict::Warn if fail_on_warn => 2,
        Verdict::Warn => 0,
        Verdict::Inconclusive => 3,
    }
}

/// Exit code for errors.
pub const ERROR_EXIT: u8 = 4;

/// Bands and settings from `gate.toml` over the defaults.
pub fn load_settings(path: Option<&Path>) -> anyhow::Result<Settings> {
    let mut figment = Figment::from(Serialized::defaults(Settings::default()));
    if let Some(path) = path {
        if !path.exists() {
            bail!("gate config {} does not exist", path.display());
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .extract::<Settings>()
        .map_err(|e| anyhow::anyhow!("invalid gate config: {e}"))
        .and_then(|settings| {
            settings
                .check()
                .map_err(|e| anyhow::anyhow!("invalid gate config: {e}"))?;
            Ok(settings)
        })
}

/// Runs the comparison; returns the report text (in `args.format`) and the exit code.
pub async fn run(args: &GateArgs) -> anyhow::Result<(String, u8)> {
    let settings = load_settings(args.config.as_deref())?;
    let comparison = fetch(args, &settings).await?;
    let text = match args.format {
        Format::Table => table(&comparison, &args.url),
        Format::Markdown => markdown(&comparison, &args.url),
        Format::Junit => junit(&comparison),
        Format::Json => json(&comparison, &args.url),
    };
    Ok((text, exit_code(comparison.verdict, args.fail_on_warn)))
}

async fn fetch(args: &GateArgs, settings: &Settings) -> anyhow::Result<Comparison> {
    // The serializer is not Send: built and dropped before the first await.
    let query = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("service", &args.service)
            .append_pair("baseline", &args.baseline)
            .append_pair("candidate", &args.candidate);
        if let Some(from) = &args.from {
            query.append_pair("from", from);
        }
        if let Some(to) = &args.to {
            query.append_pair("to", to);
        }
        query.finish()
    };
    let url = format!("{}/api/v1/compare?{query}", args.url.trim_end_matches('/'));
    let request = http::Request::post(&url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(settings)?)))
        .context("building the request")?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(120), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("the collector at {} did not answer within 120 s", args.url))?
        .map_err(|e| anyhow::anyhow!("cannot reach the collector at {}: {e}", args.url))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("the collector refused the comparison ({status}): {message}");
    }
    serde_json::from_slice(&body).context("the collector's answer is not a comparison")
}

/// The dashboard's view of this comparison.
pub fn dashboard_link(c: &Comparison, url: &str) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("service", &c.service)
        .append_pair("baseline", &c.baseline)
        .append_pair("candidate", &c.candidate)
        .append_pair("from", &c.from.to_string())
        .append_pair("to", &c.to.to_string());
    format!("{}/#/compare?{}", url.trim_end_matches('/'), query.finish())
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Warn => "warn",
        Verdict::Fail => "FAIL",
        Verdict::Inconclusive => "inconclusive",
    }
}

fn ratio(m: &Option<MetricResult>) -> String {
    m.as_ref()
        .map(|m| format!("{:+.0}%", (m.estimate - 1.0) * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn points(m: &Option<MetricResult>) -> String {
    m.as_ref()
        .map(|m| format!("{:+.2}pt", m.estimate * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn headline(c: &Comparison) -> String {
    let mix = c
        .reweighted_mean_ratio
        .map(|r| format!(", mean {:+.1}% at the baseline's traffic mix", (r - 1.0) * 100.0))
        .unwrap_or_default();
    format!(
        "{} {} vs {}: {} ({} BTs, {} s blocks{mix})",
        c.service,
        c.candidate,
        c.baseline,
        verdict_word(c.verdict),
        c.transactions.len(),
        c.block_seconds
    )
}

fn table(c: &Comparison, url: &str) -> String {
    let mut out = format!("{}\n", headline(c));
    let _ = writeln!(
        out,
        "{:<14} {:<28} {:>7} {:>7} {:>9}  reason",
        "verdict", "transaction", "p50", "p99", "errors"
    );
    for t in &c.transactions {
        let _ = writeln!(
            out,
            "{:<14} {:<28} {:>7} {:>7} {:>9}  {}",
            verdict_word(t.verdict),
            t.bt,
            ratio(&t.p50),
            ratio(&t.p99),
            points(&t.errors),
            t.reason
        );
    }
    let _ = writeln!(out, "{}", dashboard_link(c, url));
    out
}

fn markdown(c: &Comparison, url: &str) -> String {
    let icon = |v: Verdict| match v {
        Verdict::Pass => ":white_check_mark:",
        Verdict::Warn => ":warning:",
        Verdict::Fail => ":x:",
        Verdict::Inconclusive => ":grey_question:",
    };
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = format!("### {} Sightline gate: {}\n\n", icon(c.verdict), cell(&headline(c)));
    out.push_str("| | Transaction | p50 | p99 | Errors | Why |\n|---|---|---|---|---|---|\n");
    for t in &c.transactions {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            icon(t.verdict),
            cell(&t.bt),
            ratio(&t.p50),
            ratio(&t.p99),
            points(&t.errors),
            cell(&t.reason)
        );
    }
    let _ = writeln!(out, "\n[Open the comparison]({})", dashboard_link(c, url));
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn junit(c: &Comparison) -> String {
    let failures = c.transactions.iter().filter(|t| t.verdict == Verdict::Fail).count();
    let skipped = c
        .transactions
        .iter()
        .filter(|t| t.verdict == Verdict::Inconclusive)
        .count();
    let suite = format!("sightline gate {} {} vs {}", c.service, c.candidate, c.baseline);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\">",
        xml_escape(&suite),
        c.transactions.len()
    );
    for t in &c.transactions {
        let _ = write!(
            out,
            "  <testcase classname=\"{}\" name=\"{}\">",
            xml_escape(&c.service),
            xml_escape(&t.bt)
        );
        match t.verdict {
            Verdict::Fail => {
                let _ = write!(out, "<failure message=\"{}\"/>", xml_escape(&t.reason));
            }
            Verdict::Inconclusive => {
                let _ = write!(out, "<skipped message=\"{}\"/>", xml_escape(&t.reason));
            }
            Verdict::Warn | Verdict::Pass => {
                let _ = write!(
                    out,
                    "<system-out>{}: {}</system-out>",
                    verdict_word(t.verdict),
                    xml_escape(&t.reason)
                );
            }
        }
        out.push_str("</testcase>\n");
    }
    out.push_str("</testsuite>\n");
    out
}

fn json(c: &Comparison, url: &str) -> String {
    let value = serde_json::json!({
        "service": c.service,
        "baseline": c.baseline,
        "candidate": c.candidate,
        "from": c.from,
        "to": c.to,
        "block_seconds": c.block_seconds,
        "verdict": c.verdict,
        "reweighted_mean_ratio": c.reweighted_mean_ratio,
        "dashboard": dashboard_link(c, url),
        "transactions": c.transactions,
    });
    format!("{}\n", serde_json::to_string_pretty(&value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_gate_config_states_the_defaults_and_one_override() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../gate.example.toml"));
        let settings = load_settings(Some(path)).unwrap();
        let defaults = Settings::default();
        assert_eq!((settings.bands, settings.alpha), (defaults.bands, defaults.alpha));
        assert_eq!(settings.bt["Login"].p99, 0.30);
        assert_eq!(
            settings.bt["Login"].p50, defaults.bands.p50,
            "unset keys keep their default"
        );
    }

    #[test]
    fn exit_codes_follow_the_verdict() {
        assert_eq!(exit_code(Verdict::Pass, true), 0);
        assert_eq!(exit_code(Verdict::Fail, false), 1);
        assert_eq!(exit_code(Verdict::Warn, false), 0);
        assert_eq!(exit_code(Verdict::Warn, true), 2);
        assert_eq!(exit_code(Verdict::Inconclusive, false), 3);
    }
}
