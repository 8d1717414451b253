//! A reconciliation report as people and tools read it: a table, CSV, JSON, or an SVG chart.

use chrono::NaiveDate;
use std::io::Write;

use super::{DayLine, Report};

fn dollars(cents: i64) -> String {
    cmb_domain::values::Cents(cents).to_string()
}

/// The report as a table (for people), CSV or JSON (for tools).
pub fn write_report(out: &mut dyn Write, report: &Report, format: &str) -> std::io::Result<()> {
    match format {
        "json" => {
            serde_json::to_writer(&mut *out, report)?;
            writeln!(out)
        }
        "csv" => {
            let mut w = csv::Writer::from_writer(&mut *out);
            w.write_record([
                "call_id",
                "user_id",
                "day",
                "outcome",
                "answered_secs",
                "price_cents",
                "charged_cents",
                "refunded_cents",
                "disputed_cents",
                "revenue_cents",
                "cost_cents",
                "margin_cents",
            ])?;
            for c in &report.calls {
                w.write_record([
                    c.call_id.clone(),
                    c.user_id.clone(),
                    c.day.map(|d| d.to_string()).unwrap_or_default(),
                    c.outcome.clone().unwrap_or_default(),
                    c.answered_secs.to_string(),
                    c.price_cents.unwrap_or(0).to_string(),
                    c.charged_cents.unwrap_or(0).to_string(),
                    c.refunded_cents.to_string(),
                    c.disputed_cents.to_string(),
                    c.revenue_cents.to_string(),
                    c.total_cost_cents.to_string(),
                    c.margin_cents.to_string(),
                ])?;
            }
            w.flush()
        }
        _ => {
            writeln!(
                out,
                "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}",
                "call", "outcome", "revenue", "cost", "margin"
            )?;
            for c in &report.calls {
                writeln!(
                    out,
                    "{:<36}  {:<10}  {:>9}  {:>9}  {:>9}",
                    c.call_id,
                    c.outcome.clone().unwrap_or_else(|| "-".into()),
                    dollars(c.revenue_cents),
                    dollars(c.total_cost_cents),
                    dollars(c.margin_cents)
                )?;
            }
            writeln!(out, "\nper provider:")?;
            for (p, cents) in &report.per_provider {
                writeln!(out, "  {p:<12} {:>10}", dollars(*cents))?;
            }
            writeln!(out, "per day:")?;
            for (d, line) in &report.per_day {
                let cost: i64 = line.cost_cents.values().sum();
                writeln!(
                    out,
                    "  {d}  revenue {:>10}  cost {:>10}",
                    dollars(line.revenue_cents),
                    dollars(cost)
                )?;
            }
            writeln!(
                out,
                "\ntotal: {} calls, revenue {}, cost {}, margin {}",
                report.totals.calls,
                dollars(report.totals.revenue_cents),
                dollars(report.totals.cost_cents),
                dollars(report.totals.margin_cents)
            )?;
            writeln!(out, "anomalies: {}", report.anomalies.len())?;
            for a in &report.anomalies {
                writeln!(out, "  {:<32} {} {}", a.kind, a.call_id, a.detail)?;
            }
            Ok(())
        }
    }
}

/// An SVG chart: cost per day stacked by provider, revenue per day as a line.
pub fn chart_svg(report: &Report) -> String {
    let days: Vec<(&NaiveDate, &DayLine)> = report.per_day.iter().collect();
    let providers: Vec<String> = report.per_provider.keys().cloned().collect();
    let colours = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
    ];
    let max = days
        .iter()
        .map(|(_, d)| d.revenue_cents.max(d.cost_cents.values().sum()))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (w, h, left, bottom) = (900.0, 400.0, 70.0, 40.0);
    let bw = ((w - left - 20.0) / days.len().max(1) as f64).max(2.0);
    let y = |cents: f64| h - bottom - (cents / max) * (h - bottom - 20.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    svg.push_str(&format!(
        r#"<text x="{left}" y="14">cost per day by provider (bars), revenue (line); max {}</text>"#,
        dollars(max as i64)
    ));
    let mut points = Vec::new();
    for (i, (day, line)) in days.iter().enumerate() {
        let x = left + i as f64 * bw;
        let mut acc = 0.0;
        for (p, provider) in providers.iter().enumerate() {
            let c = *line.cost_cents.get(provider).unwrap_or(&0) as f64;
            if c > 0.0 {
                svg.push_str(&format!(
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{day} {provider} {}</title></rect>"#,
                    y(acc + c), bw * 0.8, y(acc) - y(acc + c), colours[p % colours.len()], dollars(c as i64)
                ));
            }
            acc += c;
        }
        points.push(format!(
            "{:.1},{:.1}",
            x + bw * 0.4,
            y(line.revenue_cents as f64)
        ));
    }
    svg.push_str(&format!(
        r##"<polyline points="{}" fill="none" stroke="#222" stroke-width="2"/>"##,
        points.join(" ")
    ));
    for (p, provider) in providers.iter().enumerate() {
        svg.push_str(&format!(
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{provider}</text>"#,
            left + p as f64 * 110.0, h - 15.0, colours[p % colours.len()], left + p as f64 * 110.0 + 14.0, h - 6.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
