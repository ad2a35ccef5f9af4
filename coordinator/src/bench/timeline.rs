//! The SVG timeline of one sample: tokens committed over time by each strategy, and every draft
//! and verify forward on one lane per model.

use std::fmt::Write as _;

use amusd_shm::{EventKind, EventRecord, Role};
use amusd_spec::{Finish, Generation};

use crate::args::Strategy;
use crate::backend::Trace;

pub(super) const COLOR_AR_LINE: &str = "#4682B4";
pub(super) const COLOR_SD_LINE: &str = "#32CD32";
pub(super) const COLOR_AMUSD_LINE: &str = "#FF8C00";
pub(super) const COLOR_PREFILL: &str = "#7f7f7f";
pub(super) const COLOR_AR_STEP: &str = "#4682B4";
pub(super) const COLOR_ALL_ACCEPTED: &str = "#2ca02c";
pub(super) const COLOR_SOME_REJECTED: &str = "#ff7f0e";
pub(super) const COLOR_DRAFT_MATCHED: &str = "#2ca02c";
pub(super) const COLOR_DRAFT_REJECTED: &str = "#d62728";
pub(super) const COLOR_DRAFT_UNUSED: &str = "#c7c7c7";

/// A forward pass (or a worker event) on a lane, in ms since the request started.
pub(super) struct Mark {
    pub(super) t0: f64,
    pub(super) t1: f64,
    pub(super) color: &'static str,
    pub(super) title: String,
}

pub(super) struct Lane {
    pub(super) label: String,
    pub(super) marks: Vec<Mark>,
    /// Instants drawn as red ticks (amusd draft rollbacks).
    pub(super) ticks: Vec<(f64, String)>,
}

/// One strategy's part of the timeline.
pub(super) struct Plot {
    pub(super) strategy: Strategy,
    /// (ms, tokens committed so far).
    pub(super) committed: Vec<(f64, usize)>,
    pub(super) total_ms: f64,
    pub(super) lanes: Vec<Lane>,
}

pub(super) fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

pub(super) fn build_plot(strategy: Strategy, g: &Generation, trace: &Trace) -> Plot {
    let mut committed = Vec::new();
    let mut n = 0;
    for &(t, k) in &trace.commits {
        n += k;
        committed.push((ms(t), n));
    }
    let lanes = match strategy {
        Strategy::Ar => vec![Lane {
            label: "ar: verify model".into(),
            marks: trace
                .verify
                .iter()
                .enumerate()
                .map(|(i, s)| Mark {
                    t0: ms(s.t0),
                    t1: ms(s.t1),
                    color: if i == 0 { COLOR_PREFILL } else { COLOR_AR_STEP },
                    title: format!(
                        "{} {i}: {} tokens in, {:.1} ms",
                        if i == 0 { "prefill + step" } else { "step" },
                        s.n_in,
                        ms(s.t1 - s.t0)
                    ),
                })
                .collect(),
            ticks: Vec::new(),
        }],
        Strategy::Sd => sd_lanes(g, trace),
        Strategy::Amusd => amusd_lanes(g, trace),
    };
    let end = lanes
        .iter()
        .flat_map(|l| l.marks.iter().map(|m| m.t1))
        .chain(committed.last().map(|c| c.0))
        .fold(g.metrics.total_time * 1e3, f64::max);
    Plot {
        strategy,
        committed,
        total_ms: end,
        lanes,
    }
}

/// sd: the drafts between two verify forwards are that step's proposals; the first
/// `accepted_per_step[k]` of them were accepted.
pub(super) fn sd_lanes(g: &Generation, trace: &Trace) -> Vec<Lane> {
    let mut draft = Vec::new();
    let mut verify = Vec::new();
    let mut d = 0;
    for (k, v) in trace.verify.iter().enumerate() {
        let first = d;
        while d < trace.draft.len() && trace.draft[d].t1 <= v.t0 {
            d += 1;
        }
        let proposed = d - first;
        let accepted = g.metrics.accepted_per_step.get(k).copied().unwrap_or(0);
        for (j, s) in trace.draft[first..d].iter().enumerate() {
            let ok = j < accepted;
            draft.push(Mark {
                t0: ms(s.t0),
                t1: ms(s.t1),
                color: if ok {
                    COLOR_DRAFT_MATCHED
                } else {
                    COLOR_DRAFT_REJECTED
                },
                title: format!(
                    "draft {j} of step {k}: {}, {} tokens in, {:.1} ms",
                    if ok { "accepted" } else { "rejected" },
                    s.n_in,
                    ms(s.t1 - s.t0)
                ),
            });
        }
        verify.push(Mark {
            t0: ms(v.t0),
            t1: ms(v.t1),
            color: if k == 0 {
                COLOR_PREFILL
            } else if proposed == 0 {
                COLOR_AR_STEP
            } else if accepted == proposed {
                COLOR_ALL_ACCEPTED
            } else {
                COLOR_SOME_REJECTED
            },
            title: format!(
                "verify step {k}{}: {accepted}/{proposed} accepted, {} tokens in, {:.1} ms",
                if k == 0 { " (with prefill)" } else { "" },
                v.n_in,
                ms(v.t1 - v.t0)
            ),
        });
    }
    vec![
        Lane {
            label: "sd: draft model".into(),
            marks: draft,
            ticks: Vec::new(),
        },
        Lane {
            label: "sd: verify model".into(),
            marks: verify,
            ticks: Vec::new(),
        },
    ]
}

/// amusd: a drafted token is rejected when a later rollback discards its position, matched when it
/// survives within the committed tokens, unused when it lies past the end.
pub(super) fn amusd_lanes(g: &Generation, trace: &Trace) -> Vec<Lane> {
    let end = g.metrics.prompt_tokens + g.tokens.len() + usize::from(g.finish == Finish::Stop);
    // (event, position, rejected)
    let mut drafted: Vec<(&EventRecord, usize, bool)> = Vec::new();
    let mut ticks = Vec::new();
    let mut verify = Vec::new();
    for (role, e) in &trace.events {
        match (role, e.kind) {
            (Role::Draft, EventKind::DraftToken) => drafted.push((e, e.position as usize, false)),
            (Role::Draft, EventKind::Rollback) => {
                let from = e.position as usize;
                for d in drafted.iter_mut().filter(|d| d.1 >= from) {
                    d.2 = true;
                }
                ticks.push((
                    ms(e.t_start_us),
                    format!(
                        "rollback to position {from}, {} drafted tokens discarded",
                        e.count
                    ),
                ));
            }
            (Role::Verify, EventKind::VerifyStep | EventKind::ArStep) => {
                verify.push(verify_mark(e, verify.is_empty()));
            }
            _ => {}
        }
    }
    let draft = draft_marks(&drafted, end);
    let mut lanes = vec![
        Lane {
            label: "amusd: draft worker".into(),
            marks: draft,
            ticks,
        },
        Lane {
            label: "amusd: verify worker".into(),
            marks: verify,
            ticks: Vec::new(),
        },
    ];
    if trace.lost_events > 0 {
        lanes[0]
            .label
            .push_str(&format!(" ({} events lost)", trace.lost_events));
    }
    lanes
}

/// The draft worker's tokens: rolled back, matched, or drafted past the end.
fn draft_marks(drafted: &[(&EventRecord, usize, bool)], end: usize) -> Vec<Mark> {
    // A rolled-back position may be drafted again: only the rollbacks after a draft count for it,
    // which the in-order pass of `amusd_lanes` ensures (a later draft event starts un-rejected).
    drafted
        .iter()
        .map(|&(e, pos, rejected)| {
            let (color, what) = if rejected {
                (COLOR_DRAFT_REJECTED, "rolled back")
            } else if pos < end {
                (COLOR_DRAFT_MATCHED, "matched the committed token")
            } else {
                (COLOR_DRAFT_UNUSED, "past the end")
            };
            Mark {
                t0: ms(e.t_start_us),
                t1: ms(e.t_end_us),
                color,
                title: format!(
                    "draft at position {pos}: {what}, {:.1} ms",
                    ms(e.t_end_us.saturating_sub(e.t_start_us))
                ),
            }
        })
        .collect()
}

/// A verify worker step: the first one includes the prefill.
fn verify_mark(e: &EventRecord, first: bool) -> Mark {
    let (p, a) = (e.count, e.accepted);
    Mark {
        t0: ms(e.t_start_us),
        t1: ms(e.t_end_us),
        color: if first {
            COLOR_PREFILL
        } else if p == 0 {
            COLOR_AR_STEP
        } else if a == p {
            COLOR_ALL_ACCEPTED
        } else {
            COLOR_SOME_REJECTED
        },
        title: format!(
            "{} at position {}{}: {a}/{p} accepted, {:.1} ms",
            if p == 0 {
                "autoregressive step"
            } else {
                "verify step"
            },
            e.position,
            if first { " (with prefill)" } else { "" },
            ms(e.t_end_us.saturating_sub(e.t_start_us))
        ),
    }
}

pub(super) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
pub(super) fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-9);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * pow)
}

/// Where things go on the figure: the time axis is shared by the token panel and the lanes.
struct Frame {
    t_max: f64,
    n_max: f64,
    /// The plot's width, between the left labels and the right margin.
    pw: f64,
    lanes_top: f64,
    lanes_bottom: f64,
    height: f64,
}

const W: f64 = 1100.0;
const LEFT: f64 = 170.0;
const RIGHT: f64 = 150.0;
const A_TOP: f64 = 60.0;
const A_H: f64 = 200.0;
const LANE_H: f64 = 18.0;
const LANE_GAP: f64 = 10.0;

impl Frame {
    fn new(plots: &[Plot]) -> Self {
        let n_lanes: usize = plots.iter().map(|p| p.lanes.len()).sum();
        let lanes_top = A_TOP + A_H + 50.0;
        let lanes_bottom = lanes_top + n_lanes as f64 * (LANE_H + LANE_GAP);
        Self {
            t_max: plots.iter().map(|p| p.total_ms).fold(1.0, f64::max),
            n_max: plots
                .iter()
                .filter_map(|p| p.committed.last().map(|c| c.1))
                .max()
                .unwrap_or(1)
                .max(1) as f64,
            pw: W - LEFT - RIGHT,
            lanes_top,
            lanes_bottom,
            height: lanes_bottom + 90.0,
        }
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + t.clamp(0.0, self.t_max) / self.t_max * self.pw
    }

    fn y(&self, n: f64) -> f64 {
        A_TOP + A_H - n / self.n_max * A_H
    }
}

/// The timeline figure: committed tokens over time (as in the paper's token-generation comparison),
/// and below it one lane per model of each strategy with every forward pass, sharing the time axis.
pub(super) fn render_svg(title: &str, plots: &[Plot]) -> String {
    let f = Frame::new(plots);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" viewBox="0 0 {W} {}" font-family="sans-serif" font-size="12">"#,
        f.height, f.height
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" font-weight="bold" text-anchor="middle">Token generation timeline: {}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    time_axis(&mut s, &f);
    tokens_panel(&mut s, &f, plots);
    lanes_panel(&mut s, &f, plots);
    legend(&mut s, &f);
    s.push_str("</svg>\n");
    s
}

/// The time grid and axis, shared by both panels.
fn time_axis(s: &mut String, f: &Frame) {
    let step = tick_step(f.t_max, 8.0);
    let (unit, div) = if f.t_max >= 2000.0 {
        ("s", 1000.0)
    } else {
        ("ms", 1.0)
    };
    let lanes_bottom = f.lanes_bottom;
    let mut t = 0.0;
    while t <= f.t_max + 1e-9 {
        let xt = f.x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{A_TOP}" x2="{xt:.1}" y2="{lanes_bottom:.1}" stroke="#e0e0e0" stroke-dasharray="3,3"/>"##
        );
        let label = if div > 1.0 {
            format!("{}", t / div)
        } else {
            format!("{t}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{xt:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            lanes_bottom + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the request started ({unit})</text>"#,
        LEFT + f.pw / 2.0,
        lanes_bottom + 34.0
    );
}

/// Panel A: committed tokens over time.
fn tokens_panel(s: &mut String, f: &Frame, plots: &[Plot]) {
    let pw = f.pw;
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{A_TOP}" width="{pw}" height="{A_H}" fill="none" stroke="black"/>"#
    );
    let y_step = tick_step(f.n_max, 5.0).max(1.0);
    let mut n = 0.0;
    while n <= f.n_max + 1e-9 {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{n}</text>"#,
            LEFT - 6.0,
            f.y(n) + 4.0
        );
        n += y_step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">tokens committed</text>"#,
        LEFT - 45.0,
        A_TOP + A_H / 2.0,
        LEFT - 45.0,
        A_TOP + A_H / 2.0
    );
    // A legend in the panel's top-left corner rather than labels at the line ends: the lines end at
    // the same height whenever the outputs are identical, and their labels would overlap.
    for (i, p) in plots.iter().enumerate() {
        let color = match p.strategy {
            Strategy::Ar => COLOR_AR_LINE,
            Strategy::Sd => COLOR_SD_LINE,
            Strategy::Amusd => COLOR_AMUSD_LINE,
        };
        let mut d = format!("M{:.1},{:.1}", f.x(0.0), f.y(0.0));
        let mut last = 0;
        for &(t, n) in &p.committed {
            let _ = write!(d, " H{:.1} V{:.1}", f.x(t), f.y(n as f64));
            last = n;
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>"#
        );
        let end_t = p.committed.last().map_or(0.0, |c| c.0);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-weight="bold">{} ({last} tokens, {:.2} s)</text>"#,
            LEFT + 10.0,
            A_TOP + 18.0 + 16.0 * i as f64,
            p.strategy.name(),
            end_t / 1e3
        );
    }
}

/// Panel B: one lane per model.
fn lanes_panel(s: &mut String, f: &Frame, plots: &[Plot]) {
    let mut lane_y = f.lanes_top;
    for lane in plots.iter().flat_map(|p| &p.lanes) {
        draw_lane(s, f, lane, lane_y);
        lane_y += LANE_H + LANE_GAP;
    }
}

fn draw_lane(s: &mut String, f: &Frame, lane: &Lane, lane_y: f64) {
    let pw = f.pw;
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
        LEFT - 8.0,
        lane_y + LANE_H / 2.0 + 4.0,
        xml_escape(&lane.label)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{lane_y:.1}" width="{pw}" height="{LANE_H}" fill="#f7f7f7" stroke="#cccccc"/>"##
    );
    for m in &lane.marks {
        let x0 = f.x(m.t0);
        // Keep every forward visible, however short, with a hairline gap to its neighbour.
        let w = (f.x(m.t1) - x0 - 0.3).max(0.8);
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.2}" y="{:.1}" width="{w:.2}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
            lane_y + 2.0,
            LANE_H - 4.0,
            m.color,
            xml_escape(&m.title)
        );
    }
    for (t, what) in &lane.ticks {
        let xt = f.x(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.2}" y1="{:.1}" x2="{xt:.2}" y2="{:.1}" stroke="{COLOR_DRAFT_REJECTED}" stroke-width="1.5"><title>{}</title></line>"##,
            lane_y - 3.0,
            lane_y + LANE_H + 3.0,
            xml_escape(what)
        );
    }
}

fn legend(s: &mut String, f: &Frame) {
    let legend = [
        (COLOR_PREFILL, "first forward (with prefill)"),
        (COLOR_AR_STEP, "autoregressive step"),
        (COLOR_ALL_ACCEPTED, "verify: all accepted / draft: accepted"),
        (COLOR_SOME_REJECTED, "verify: some rejected"),
        (COLOR_DRAFT_REJECTED, "draft: rejected (tick: rollback)"),
        (COLOR_DRAFT_UNUSED, "draft: past the end"),
    ];
    let ly = f.lanes_bottom + 58.0;
    let mut lx = 20.0;
    for (color, label) in legend {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
            ly - 10.0,
            lx + 16.0
        );
        lx += 16.0 + 6.5 * label.len() as f64 + 14.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(1000.0, 8.0), 200.0);
        assert_eq!(tick_step(3500.0, 8.0), 500.0);
        assert_eq!(tick_step(10.0, 5.0), 2.0);
    }
}
