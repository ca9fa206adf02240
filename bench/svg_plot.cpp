// Latency box plots as a standalone SVG (see svg_plot.h).
#include "svg_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>

namespace devpipe::bench {

namespace {

constexpr const char* kPalette[] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759",
                                    "#b07aa1", "#76b7b2", "#edc948", "#9c755f"};
constexpr const char* kFont = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

std::string xml_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // drop control characters, which are not allowed in XML 1.0
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

/// Percentile with linear interpolation between order statistics (numpy's default).
double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.size() == 1) return sorted[0];
  const double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

/// A latency with about three significant digits: 1234, 123, 12.3, 1.23, 0.123, 0.0123.
std::string fmt_ms(double v) {
  char buf[32];
  const double a = std::fabs(v);
  if (a >= 100 || a == 0) std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (a >= 10) std::snprintf(buf, sizeof buf, "%.1f", v);
  else if (a >= 1) std::snprintf(buf, sizeof buf, "%.2f", v);
  else std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

/// A tick label for a tick step `step` (enough decimals to tell neighbouring ticks apart).
std::string fmt_tick(double v, double step) {
  int decimals = 0;
  if (step < 1) decimals = static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
  decimals = std::clamp(decimals, 0, 9);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, std::fabs(v) < step * 1e-6 ? 0.0 : v);
  return buf;
}

/// A "nice" step (1, 2, 2.5 or 5 times a power of ten) giving about `target` intervals.
double nice_step(double span, int target) {
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

/// Small deterministic jitter in [-1, 1] for sample `i` of series `s`.
double jitter(std::size_t s, std::size_t i) {
  std::uint32_t x = static_cast<std::uint32_t>(s * 7919u + i * 104729u + 1u);
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return static_cast<double>(x) / 4294967295.0 * 2.0 - 1.0;
}

struct Stats {
  std::vector<double> v;  // finite samples, in the given order
  double min = 0, p25 = 0, p50 = 0, p75 = 0, p90 = 0, p99 = 0, max = 0;
};

Stats stats_of(const std::vector<double>& samples) {
  Stats s;
  for (double x : samples)
    if (std::isfinite(x)) s.v.push_back(x);
  if (s.v.empty()) return s;
  std::vector<double> sorted = s.v;
  std::sort(sorted.begin(), sorted.end());
  s.min = sorted.front();
  s.max = sorted.back();
  s.p25 = percentile(sorted, 25);
  s.p50 = percentile(sorted, 50);
  s.p75 = percentile(sorted, 75);
  s.p90 = percentile(sorted, 90);
  s.p99 = percentile(sorted, 99);
  return s;
}

}  // namespace

namespace {

struct Series {
  std::string label;
  std::size_t color;  // palette index, shared by equal labels across panels
  Stats st;
  std::size_t index;  // position in the input (seeds the jitter)
};

struct Panel {
  std::string group;  // "" when the names carry no group
  std::vector<Series> series;
};

/// Panels: when every name reads "GROUP LABEL" (split at the first space) and there are at
/// least two groups, one panel per GROUP in order of first appearance; otherwise one panel
/// under the full names.
std::vector<Panel> make_panels(
    const std::vector<std::pair<std::string, std::vector<double>>>& in) {
  std::vector<std::string> groups;
  bool all_named = true;
  for (const auto& [name, samples] : in) {
    const auto sp = name.find(' ');
    if (sp == std::string::npos || sp == 0 || sp + 1 == name.size()) all_named = false;
    const std::string g = name.substr(0, sp);
    if (std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
  }
  const bool grouped = all_named && groups.size() >= 2;
  std::vector<Panel> panels;
  std::vector<std::string> labels;  // for colours
  for (std::size_t i = 0; i < in.size(); ++i) {
    const std::string& name = in[i].first;
    std::string group, label = name;
    const auto sp = name.find(' ');
    if (grouped) {
      group = name.substr(0, sp);
      label = name.substr(sp + 1);
    }
    auto c = std::find(labels.begin(), labels.end(), label);
    if (c == labels.end()) c = labels.insert(labels.end(), label);
    auto p = std::find_if(panels.begin(), panels.end(),
                          [&](const Panel& q) { return q.group == group; });
    if (p == panels.end()) p = panels.insert(panels.end(), Panel{group, {}});
    p->series.push_back(
        {label, static_cast<std::size_t>(c - labels.begin()), stats_of(in[i].second), i});
  }
  return panels;
}

/// A panel's axis: linear, or logarithmic when the samples span a factor of kLogSpan or more
/// (then the fast modes' boxes stay visible beside the slow ones). `ticks` are the gridlines.
struct Axis {
  double lo, hi;
  bool log;
  std::vector<std::pair<double, std::string>> ticks;  // value, label
  /// The position of `ms` in [0, 1] along the axis.
  double frac(double ms) const {
    if (!log) return (ms - lo) / (hi - lo);
    return (std::log10(std::max(ms, lo)) - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
  }
};

constexpr double kLogSpan = 5.0;

/// A linear axis with "nice" ticks covering the samples of `series`: from 0 unless every
/// sample sits far from it (then zoomed to the data); a log axis with 1-2-5 ticks (powers of
/// ten only beyond 4 decades) when every
/// sample is positive and the largest is kLogSpan times the smallest or more.
Axis make_axis(const std::vector<Series>& series) {
  double lo = INFINITY, hi = -INFINITY;
  for (const Series& s : series) {
    if (s.st.v.empty()) continue;
    lo = std::min(lo, s.st.min);
    hi = std::max(hi, s.st.max);
  }
  if (!(lo <= hi)) lo = 0, hi = 1;  // no samples at all
  if (lo > 0 && hi / lo >= kLogSpan) {
    // Decades widened to the 1-2-5 marks around the data.
    double a = std::pow(10.0, std::floor(std::log10(lo)));
    for (double m : {5.0, 2.0}) {
      if (a * m <= lo) {
        a *= m;
        break;
      }
    }
    double b = std::pow(10.0, std::ceil(std::log10(hi)));
    for (double m : {0.2, 0.5}) {
      if (b * m >= hi) {
        b *= m;
        break;
      }
    }
    Axis ax{a, b, true, {}};
    // 1-2-5 ticks over up to 4 decades; only the powers of ten over more (labels stay apart).
    const bool wide = std::log10(b / a) > 4.0001;
    const std::vector<double> marks = wide ? std::vector<double>{1.0} : std::vector<double>{1.0, 2.0, 5.0};
    for (double dec = std::pow(10.0, std::floor(std::log10(a))); dec <= b * 1.0001; dec *= 10) {
      for (double m : marks) {
        const double v = dec * m;
        if (v >= a * 0.9999 && v <= b * 1.0001) ax.ticks.emplace_back(v, fmt_tick(v, v));
      }
    }
    return ax;
  }
  double a = lo > 0.5 * hi ? lo : std::min(0.0, lo);
  double b = hi;
  if (b - a <= 0) {
    const double pad = b != 0 ? std::fabs(b) * 0.1 : 1.0;
    a -= pad;
    b += pad;
    if (lo >= 0) a = std::max(a, 0.0);
  }
  const double step = nice_step(b - a, 6);
  a = std::floor(a / step + 1e-9) * step;
  b = std::ceil(b / step - 1e-9) * step;
  if (b <= a) b = a + step;
  Axis ax{a, b, false, {}};
  const int n_ticks = static_cast<int>(std::llround((b - a) / step));
  for (int t = 0; t <= n_ticks; ++t) ax.ticks.emplace_back(a + step * t, fmt_tick(a + step * t, step));
  return ax;
}

}  // namespace

std::string latency_svg(const std::string& title,
                        const std::vector<std::pair<std::string, std::vector<double>>>&
                            samples_ms_by_series) {
  const std::vector<Panel> panels = make_panels(samples_ms_by_series);
  std::size_t longest_label = 8;
  for (const Panel& p : panels)
    for (const Series& s : p.series) longest_label = std::max(longest_label, s.label.size());

  // Layout (px).
  const double width = 960;
  const double label_w = std::clamp(static_cast<double>(longest_label) * 7.6 + 24, 150.0, 340.0);
  const double left = label_w + 16, right = width - 36;
  const double row_h = 52, axis_h = 44;
  const bool headers = panels.size() > 1 || (panels.size() == 1 && !panels[0].group.empty());
  const double header_h = headers ? 30 : 8;
  double height = 70 + 56;  // title block + legend
  for (const Panel& p : panels)
    height += header_h + row_h * static_cast<double>(std::max<std::size_t>(p.series.size(), 1)) +
              axis_h;
  if (panels.empty()) height += header_h + row_h + axis_h;

  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(2);
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
    << "\" viewBox=\"0 0 " << width << " " << height << "\" " << kFont << ">\n"
    << "<title>" << xml_escape(title) << "</title>\n"
    << "<rect x=\"0\" y=\"0\" width=\"" << width << "\" height=\"" << height
    << "\" fill=\"#ffffff\"/>\n";

  // Title and subtitle.
  o << "<text x=\"" << width / 2 << "\" y=\"32\" text-anchor=\"middle\" font-size=\"19\" "
    << "font-weight=\"bold\" fill=\"#222\">" << xml_escape(title) << "</text>\n"
    << "<text x=\"" << width / 2 << "\" y=\"53\" text-anchor=\"middle\" font-size=\"12\" "
    << "fill=\"#666\">latency per iteration in milliseconds, lower is better"
    << (panels.size() > 1 ? "; each panel has its own axis" : "")
    << " (logarithmic where a panel's samples span a factor of " << static_cast<int>(kLogSpan) << " or more)</text>\n";

  double y = 70;
  const std::vector<Panel> fallback{Panel{"", {}}};
  for (const Panel& panel : panels.empty() ? fallback : panels) {
    const Axis ax = make_axis(panel.series);
    auto X = [&](double ms) { return left + ax.frac(ms) * (right - left); };
    if (headers) {
      o << "<text x=\"16\" y=\"" << y + 20 << "\" font-size=\"14\" font-weight=\"bold\" "
        << "fill=\"#333\">" << xml_escape(panel.group) << "</text>\n"
        << "<line x1=\"16\" y1=\"" << y + 26 << "\" x2=\"" << width - 16 << "\" y2=\"" << y + 26
        << "\" stroke=\"#c8ccd2\" stroke-width=\"1\"/>\n";
    }
    const double top = y + header_h;
    const std::size_t n_rows = std::max<std::size_t>(panel.series.size(), 1);
    const double axis_y = top + row_h * static_cast<double>(n_rows);

    // Alternating row bands, then grid lines and ticks.
    for (std::size_t r = 1; r < panel.series.size(); r += 2)
      o << "<rect x=\"8\" y=\"" << top + row_h * static_cast<double>(r) << "\" width=\""
        << width - 16 << "\" height=\"" << row_h << "\" fill=\"#f6f7f9\"/>\n";
    for (const auto& [v, tick_label] : ax.ticks) {
      const double x = X(v);
      o << "<line x1=\"" << x << "\" y1=\"" << top << "\" x2=\"" << x << "\" y2=\"" << axis_y
        << "\" stroke=\"#e1e4e8\" stroke-width=\"1\"/>\n"
        << "<line x1=\"" << x << "\" y1=\"" << axis_y << "\" x2=\"" << x << "\" y2=\""
        << axis_y + 5 << "\" stroke=\"#555\" stroke-width=\"1\"/>\n"
        << "<text x=\"" << x << "\" y=\"" << axis_y + 19 << "\" text-anchor=\"middle\" "
        << "font-size=\"11\" fill=\"#444\">" << tick_label << "</text>\n";
    }
    o << "<line x1=\"" << left << "\" y1=\"" << axis_y << "\" x2=\"" << right << "\" y2=\""
      << axis_y << "\" stroke=\"#555\" stroke-width=\"1\"/>\n"
      << "<text x=\"" << right + 6 << "\" y=\"" << axis_y + 4
      << "\" font-size=\"11\" fill=\"#444\">" << (ax.log ? "ms (log)" : "ms") << "</text>\n";

    // One box plot per series.
    for (std::size_t r = 0; r < panel.series.size(); ++r) {
      const Series& se = panel.series[r];
      const Stats& st = se.st;
      const char* color = kPalette[se.color % (sizeof kPalette / sizeof kPalette[0])];
      const double cy = top + row_h * (static_cast<double>(r) + 0.5);
      const double box_h = 22;

      o << "<g>\n<title>" << xml_escape(panel.group.empty() ? se.label
                                                              : panel.group + " " + se.label);
      if (!st.v.empty()) {
        o << ": n=" << st.v.size() << ", min " << fmt_ms(st.min) << ", p25 " << fmt_ms(st.p25)
          << ", p50 " << fmt_ms(st.p50) << ", p75 " << fmt_ms(st.p75) << ", p90 "
          << fmt_ms(st.p90) << ", p99 " << fmt_ms(st.p99) << ", max " << fmt_ms(st.max)
          << " ms";
      }
      o << "</title>\n";
      // Label: name, and p50 under it.
      o << "<text x=\"" << label_w << "\" y=\"" << cy - 3 << "\" text-anchor=\"end\" "
        << "font-size=\"13\" font-weight=\"bold\" fill=\"#222\">" << xml_escape(se.label)
        << "</text>\n";
      if (st.v.empty()) {
        o << "<text x=\"" << label_w << "\" y=\"" << cy + 13 << "\" text-anchor=\"end\" "
          << "font-size=\"11\" fill=\"#999\">no samples</text>\n</g>\n";
        continue;
      }
      o << "<text x=\"" << label_w << "\" y=\"" << cy + 13 << "\" text-anchor=\"end\" "
        << "font-size=\"11\" fill=\"#555\">p50 <tspan font-weight=\"bold\" fill=\"" << color
        << "\">" << fmt_ms(st.p50) << " ms</tspan>  (n=" << st.v.size() << ")</text>\n";

      // Whisker min..p99 with end caps.
      const double xmin = X(st.min), xp99 = X(st.p99);
      o << "<line x1=\"" << xmin << "\" y1=\"" << cy << "\" x2=\"" << xp99 << "\" y2=\"" << cy
        << "\" stroke=\"" << color << "\" stroke-width=\"1.5\"/>\n";
      for (double x : {xmin, xp99})
        o << "<line x1=\"" << x << "\" y1=\"" << cy - 7 << "\" x2=\"" << x << "\" y2=\""
          << cy + 7 << "\" stroke=\"" << color << "\" stroke-width=\"1.5\"/>\n";
      // Box p25..p75 (at least 1.5 px wide so a tight distribution stays visible).
      double bx0 = X(st.p25), bx1 = X(st.p75);
      if (bx1 - bx0 < 1.5) {
        const double mid = (bx0 + bx1) / 2;
        bx0 = mid - 0.75;
        bx1 = mid + 0.75;
      }
      o << "<rect x=\"" << bx0 << "\" y=\"" << cy - box_h / 2 << "\" width=\"" << bx1 - bx0
        << "\" height=\"" << box_h << "\" fill=\"" << color
        << "\" fill-opacity=\"0.28\" stroke=\"" << color << "\" stroke-width=\"1.5\" rx=\"2\"/>\n";
      // Samples: faint dots, jittered vertically.
      for (std::size_t i = 0; i < st.v.size(); ++i)
        o << "<circle cx=\"" << X(st.v[i]) << "\" cy=\""
          << cy + jitter(se.index, i) * (box_h / 2 + 3)
          << "\" r=\"2.2\" fill=\"#333\" fill-opacity=\"0.28\"/>\n";
      // Median line and p90 diamond.
      const double xm = X(st.p50);
      o << "<line x1=\"" << xm << "\" y1=\"" << cy - box_h / 2 - 2 << "\" x2=\"" << xm
        << "\" y2=\"" << cy + box_h / 2 + 2 << "\" stroke=\"#111\" stroke-width=\"2.5\"/>\n";
      const double x90 = X(st.p90), d = 4.5;
      o << "<path d=\"M" << x90 << "," << cy - d << " L" << x90 + d << "," << cy << " L" << x90
        << "," << cy + d << " L" << x90 - d << "," << cy << " Z\" fill=\"#fff\" stroke=\"#111\" "
        << "stroke-width=\"1.3\"/>\n";
      // Max beyond p99: a small open circle, so outliers are not hidden behind the whisker.
      if (st.max > st.p99)
        o << "<circle cx=\"" << X(st.max) << "\" cy=\"" << cy << "\" r=\"3\" fill=\"none\" "
          << "stroke=\"" << color << "\" stroke-width=\"1.2\"/>\n";
      o << "</g>\n";
    }
    y = axis_y + axis_h;
  }

  // Legend.
  const double ly = y + 28;
  double lx = left;
  o << "<g font-size=\"11\" fill=\"#444\">\n"
    << "<rect x=\"" << lx << "\" y=\"" << ly - 8 << "\" width=\"22\" height=\"12\" fill=\"#888\" "
    << "fill-opacity=\"0.28\" stroke=\"#888\"/>\n"
    << "<line x1=\"" << lx + 11 << "\" y1=\"" << ly - 10 << "\" x2=\"" << lx + 11 << "\" y2=\""
    << ly + 6 << "\" stroke=\"#111\" stroke-width=\"2.5\"/>\n"
    << "<text x=\"" << lx + 28 << "\" y=\"" << ly + 2 << "\">p25–p75, median</text>\n";
  lx += 140;
  o << "<line x1=\"" << lx << "\" y1=\"" << ly - 2 << "\" x2=\"" << lx + 24 << "\" y2=\""
    << ly - 2 << "\" stroke=\"#888\" stroke-width=\"1.5\"/>\n"
    << "<line x1=\"" << lx << "\" y1=\"" << ly - 8 << "\" x2=\"" << lx << "\" y2=\"" << ly + 4
    << "\" stroke=\"#888\" stroke-width=\"1.5\"/>\n"
    << "<line x1=\"" << lx + 24 << "\" y1=\"" << ly - 8 << "\" x2=\"" << lx + 24 << "\" y2=\""
    << ly + 4 << "\" stroke=\"#888\" stroke-width=\"1.5\"/>\n"
    << "<text x=\"" << lx + 30 << "\" y=\"" << ly + 2 << "\">min–p99</text>\n";
  lx += 100;
  o << "<path d=\"M" << lx + 5 << "," << ly - 6.5 << " L" << lx + 9.5 << "," << ly - 2 << " L"
    << lx + 5 << "," << ly + 2.5 << " L" << lx + 0.5 << "," << ly - 2 << " Z\" fill=\"#fff\" "
    << "stroke=\"#111\" stroke-width=\"1.3\"/>\n"
    << "<text x=\"" << lx + 15 << "\" y=\"" << ly + 2 << "\">p90</text>\n";
  lx += 55;
  o << "<circle cx=\"" << lx + 4 << "\" cy=\"" << ly - 2 << "\" r=\"3\" fill=\"none\" "
    << "stroke=\"#888\" stroke-width=\"1.2\"/>\n"
    << "<text x=\"" << lx + 12 << "\" y=\"" << ly + 2 << "\">max (above p99)</text>\n";
  lx += 115;
  o << "<circle cx=\"" << lx + 4 << "\" cy=\"" << ly - 2 << "\" r=\"2.2\" fill=\"#333\" "
    << "fill-opacity=\"0.4\"/>\n"
    << "<text x=\"" << lx + 12 << "\" y=\"" << ly + 2 << "\">one sample</text>\n"
    << "</g>\n";

  o << "</svg>\n";
  return o.str();
}

}  // namespace devpipe::bench
