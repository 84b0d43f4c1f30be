//! `loss.png`: training loss and validation loss per step, drawn from `metrics.jsonl`.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// A TTF for the labels: `MAMBA_BURN_FONT`, else a common system font. Without one the plot is
/// drawn without text.
fn font() -> Option<Vec<u8>> {
    let mut candidates: Vec<std::path::PathBuf> = std::env::var_os("MAMBA_BURN_FONT")
        .map(Into::into)
        .into_iter()
        .collect();
    for dir in [
        "/usr/share/fonts/truetype/dejavu",
        "/usr/share/fonts/truetype",
        "/usr/share/fonts/TTF",
        "/Library/Fonts",
        "C:\\Windows\\Fonts",
    ] {
        for name in [
            "DejaVuSans.ttf",
            "Arial.ttf",
            "arial.ttf",
            "LiberationSans-Regular.ttf",
        ] {
            candidates.push(Path::new(dir).join(name));
        }
    }
    candidates.into_iter().find_map(|p| std::fs::read(p).ok())
}

pub fn plot_metrics(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    let all: Vec<&(f64, f64)> = train.iter().chain(&val).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut x1: f64 = 1.0;
    for (x, y) in &all {
        y0 = y0.min(*y);
        y1 = y1.max(*y);
        x1 = x1.max(*x);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let with_text = match font() {
        Some(bytes) => {
            let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok()
        }
        None => false,
    };
    let tmp = png.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(55);
        if with_text {
            builder.caption(
                "loss (train: blue, validation: red); perplexity = exp(loss)",
                ("sans-serif", 18),
            );
        }
        let mut chart = builder.build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))?;
        let mut mesh = chart.configure_mesh();
        if with_text {
            mesh.x_desc("step").y_desc("loss");
        } else {
            mesh.disable_x_mesh()
                .disable_y_mesh()
                .x_labels(0)
                .y_labels(0);
        }
        mesh.draw()?;
        chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))?;
        chart.draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?;
        chart.draw_series(val.iter().map(|p| Circle::new(*p, 3, RED.filled())))?;
        root.present()?;
    }
    std::fs::rename(&tmp, png).with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}
