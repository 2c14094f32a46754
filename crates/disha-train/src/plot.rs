//! Loss curves as PNG charts (`plotters`, bitmap backend). Text is drawn with a DejaVu Sans
//! subset compiled into the binary, so charts render the same on machines without fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::TrainError;

/// DejaVu Sans, printable ASCII only (14 KB; license in `assets/fonts/`).
const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-subset.ttf");

/// One curve: a label and `(step, value)` points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points in step order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series of per-step values, smoothed with a trailing mean over `window` steps (1: raw).
    pub fn smoothed(label: impl Into<String>, values: &[(usize, f64)], window: usize) -> Self {
        let window = window.max(1);
        let points = values
            .iter()
            .enumerate()
            .map(|(i, &(step, _))| {
                let from = (i + 1).saturating_sub(window);
                let span = &values[from..=i];
                let mean = span.iter().map(|&(_, v)| v).sum::<f64>() / span.len() as f64;
                (step as f64, mean)
            })
            .collect();
        Self {
            label: label.into(),
            points,
        }
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the bundled font parses"));
    });
}

/// The colors of successive series.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// A drawing error, as text (plotters' errors are generic over the backend).
type DrawResult = Result<(), String>;

/// Renders `draw` on a white `size` canvas into the PNG file `path`, atomically (a temporary
/// file in the same directory, then renamed), with the bundled font registered.
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> DrawResult,
) -> Result<(), TrainError> {
    register_font();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".chart-")
        .suffix(".png")
        .tempfile_in(dir)
        .map_err(|e| TrainError::io(dir, e))?;
    {
        let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| e.to_string()))
            .map_err(|e| {
                TrainError::io(
                    path,
                    std::io::Error::other(format!("drawing the chart: {e}")),
                )
            })?;
    }
    tmp.persist(path)
        .map_err(|e| TrainError::io(path, e.error))?;
    Ok(())
}

/// Draws `series` (loss against optimizer step) into the PNG file `path`, written atomically
/// (a temporary file in the same directory, then renamed).
///
/// # Errors
/// No point to draw, or I/O / encoding errors (naming `path`).
pub fn loss_chart(path: &Path, title: &str, series: &[Series]) -> Result<(), TrainError> {
    let fail = |message: String| TrainError::io(path, std::io::Error::other(message));
    let points = || series.iter().flat_map(|s| s.points.iter());
    let finite: Vec<&(f64, f64)> = points().filter(|p| p.1.is_finite()).collect();
    if finite.is_empty() {
        return Err(fail("no finite loss to plot".into()));
    }
    let x_max = finite.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_min = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    write_png(path, (900, 540), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, (y_min - pad).max(0.0)..y_max + pad)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("training loss")
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| e.to_string())?;
        for (s, color) in series.iter().zip(COLORS.iter().cycle()) {
            let points = s.points.iter().copied().filter(|p| p.1.is_finite());
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// One group of bars: a label on the x axis and one value per series (`NaN`: no bar).
#[derive(Clone, Debug, PartialEq)]
pub struct BarGroup {
    /// Text under the group.
    pub label: String,
    /// One value per series, in series order.
    pub values: Vec<f64>,
}

/// Draws grouped bars (one colour per entry of `series`, one group per entry of `groups`) into
/// the PNG file `path`, written atomically like [`loss_chart`].
///
/// # Errors
/// No finite value to draw, or I/O / encoding errors (naming `path`).
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[&str],
    groups: &[BarGroup],
) -> Result<(), TrainError> {
    let fail = |message: String| TrainError::io(path, std::io::Error::other(message));
    let y_max = groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if !y_max.is_finite() {
        return Err(fail("no finite value to plot".into()));
    }
    let width = (160 + 90 * groups.len() as u32).max(600);
    write_png(path, (width, 540), |root| {
        let n = groups.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(64)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..n as f64, 0.0..y_max * 1.15)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let k = x.floor() as usize;
                match (x - x.floor() - 0.5).abs() < 1e-6 {
                    true => labels.get(k).cloned().unwrap_or_default(),
                    false => String::new(),
                }
            })
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        let width = 0.8 / series.len().max(1) as f64;
        for (k, (name, color)) in series.iter().zip(COLORS.iter().cycle()).enumerate() {
            let bars = groups.iter().enumerate().filter_map(|(g, group)| {
                let v = *group.values.get(k)?;
                let x0 = g as f64 + 0.1 + k as f64 * width;
                v.is_finite()
                    .then(|| Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], color.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean_and_charts_are_pngs() {
        let s = Series::smoothed("a", &[(1, 4.0), (2, 2.0), (3, 0.0)], 2);
        assert_eq!(s.points, vec![(1.0, 4.0), (2.0, 3.0), (3.0, 1.0)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let other = Series::smoothed("b", &[(1, 3.0), (2, 2.5), (3, f64::NAN)], 1);
        loss_chart(&path, "test", &[s, other]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // 900 x 540 in the IHDR chunk.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 540);
        // Only the temp-free result is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let none = Series::smoothed("c", &[(1, f64::NAN)], 1);
        assert!(loss_chart(&path, "t", &[none]).is_err());
    }

    #[test]
    fn bar_charts_are_pngs_sized_by_group_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.png");
        let groups: Vec<BarGroup> = (0..8)
            .map(|k| BarGroup {
                label: format!("m{k}"),
                values: vec![k as f64 + 1.0, if k == 3 { f64::NAN } else { 2.0 }],
            })
            .collect();
        bar_chart(&path, "t", "s / step", &["a", "b"], &groups).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // 160 + 90 per group wide, 540 high.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 880);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 540);
        let empty = [BarGroup {
            label: "x".into(),
            values: vec![f64::NAN],
        }];
        assert!(bar_chart(&path, "t", "s", &["a"], &empty).is_err());
    }
}
