#include "options.h"

#include <algorithm>
#include <charconv>
#include <optional>
#include <sstream>

namespace devpipe::cli {
namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> items;
  std::string::size_type start = 0;
  while (true) {
    auto comma = s.find(',', start);
    items.push_back(
        s.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) return items;
    start = comma + 1;
  }
}

std::optional<long long> parse_integer(const std::string& s, long long min, long long max) {
  long long v = 0;
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, v);
  if (s.empty() || ec != std::errc() || p != end || v < min || v > max) return std::nullopt;
  return v;
}

std::string range_text(const Option& o) {
  constexpr long long kNone = std::numeric_limits<long long>::max();
  if (o.max != kNone) return " in [" + std::to_string(o.min) + ", " + std::to_string(o.max) + "]";
  return " >= " + std::to_string(o.min);
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

bool is_choice(const Option& o, const std::string& v) {
  return std::find(o.choices.begin(), o.choices.end(), v) != o.choices.end();
}

// What option `o` expects, for the parser's messages ("an integer in [1, 8]").
std::string expectation(const Option& o) {
  switch (o.kind) {
    case OptionKind::Flag:
      return "no value";
    case OptionKind::String:
      return "a non-empty value";
    case OptionKind::Int:
      return "an integer" + range_text(o);
    case OptionKind::IntList:
      return o.min == 1 && o.max == std::numeric_limits<long long>::max()
                 ? "comma-separated positive integers"
                 : "comma-separated integers" + range_text(o);
    case OptionKind::Choice:
      return "one of " + joined(o.choices);
    case OptionKind::ChoiceList:
      return "a comma-separated list of " + joined(o.choices);
  }
  return "";
}

bool is_word(const Option& o, const std::string& item) {
  return std::find(o.words.begin(), o.words.end(), item) != o.words.end();
}

// Throws UsageError unless `value` fits the option's kind and range.
void check_value(const Option& o, const std::string& value) {
  switch (o.kind) {
    case OptionKind::Flag:
      return;
    case OptionKind::String:
      if (value.empty()) refuse_value(o, value);
      return;
    case OptionKind::Int:
      if (!parse_integer(value, o.min, o.max)) refuse_value(o, value);
      return;
    case OptionKind::IntList:
      for (const auto& item : split_commas(value)) {
        if (!parse_integer(item, o.min, o.max) && !is_word(o, item)) refuse_value(o, value);
      }
      return;
    case OptionKind::Choice:
      if (!is_choice(o, value)) refuse_value(o, value);
      return;
    case OptionKind::ChoiceList:
      for (const auto& item : split_commas(value)) {
        if (!is_choice(o, item)) refuse_value(o, value);
      }
      return;
  }
}

}  // namespace

void refuse_value(const Option& o, const std::string& value) {
  throw UsageError("option --" + o.name + " expects " + expectation(o) + ", got '" + value + "'");
}

const Option* Command::find(const std::string& option) const {
  for (const auto& o : options) {
    if (o.name == option) return &o;
  }
  return nullptr;
}

std::string Command::usage() const {
  std::ostringstream s;
  s << "usage: devpipe " << name << (options.empty() ? "" : " [options]")
    << (positionals.empty() ? "" : " " + positionals) << "\n  " << summary << "\n\noptions:\n";
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& o : options) {
    if (!o.refused.empty()) continue;
    std::string help = o.help;
    if (o.kind == OptionKind::Choice || o.kind == OptionKind::ChoiceList) {
      help += (help.empty() ? "" : " ") + std::string("(") + joined(o.choices) + ")";
    }
    rows.emplace_back("--" + o.name + (o.value.empty() ? "" : " " + o.value), help);
  }
  rows.emplace_back("-h, --help", "print this usage and exit");
  std::size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.first.size());
  for (const auto& [left, help] : rows) {
    s << "  " << left << std::string(width - left.size() + 2, ' ') << help << "\n";
  }
  if (!notes.empty()) s << "\n" << notes << (notes.back() == '\n' ? "" : "\n");
  return s.str();
}

Args Args::parse(const Command& command, const std::vector<std::string>& argv) {
  Args a;
  a.command_ = &command;
  if (std::any_of(argv.begin(), argv.end(),
                  [](const std::string& s) { return s == "--help" || s == "-h"; })) {
    a.help_ = true;
    return a;
  }
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (arg.size() < 2 || arg[0] != '-') {
      a.positional_.push_back(arg);
      continue;
    }
    if (arg.rfind("--", 0) != 0) throw UsageError("unknown option " + arg);
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    }
    const Option* o = command.find(name);
    if (!o) throw UsageError("unknown option --" + name);
    if (!o->refused.empty())
      throw UsageError("option --" + name + " is not accepted: " + o->refused);
    if (a.values_.count(name) && !o->repeatable) throw UsageError("option --" + name + " is given twice");
    if (o->kind == OptionKind::Flag) {
      if (value) throw UsageError("option --" + name + " takes no value, got '" + arg + "'");
      value = "";
    } else if (!value) {
      if (i + 1 >= argv.size()) throw UsageError("option --" + name + " needs a value");
      if (argv[i + 1].rfind("--", 0) == 0) {
        throw UsageError("option --" + name + " needs a value, got option " + argv[i + 1]);
      }
      value = argv[++i];
    }
    check_value(*o, *value);
    a.values_[name] = *value;
    if (o->repeatable) a.repeated_[name].push_back(*value);
  }
  auto n = static_cast<int>(a.positional_.size());
  if (n > command.max_positionals) {
    throw UsageError("unexpected argument '" +
                     a.positional_[static_cast<std::size_t>(command.max_positionals)] + "'");
  }
  if (n < command.min_positionals) throw UsageError("missing argument " + command.positionals);
  return a;
}

const Option& Args::declared(const std::string& name, OptionKind a, OptionKind b) const {
  const Option* o = command_->find(name);
  if (!o || (o->kind != a && o->kind != b)) {
    throw InvalidArgument("devpipe " + command_->name + " reads option --" + name +
                          " that it does not declare with that type");
  }
  return *o;
}

bool Args::has(const std::string& name) const {
  if (!command_->find(name)) {
    throw InvalidArgument("devpipe " + command_->name + " reads option --" + name +
                          " that it does not declare");
  }
  return values_.count(name) != 0;
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  declared(name, OptionKind::String, OptionKind::Choice);
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

long long Args::get_int(const std::string& name, long long fallback) const {
  const Option& o = declared(name, OptionKind::Int, OptionKind::Int);
  auto it = values_.find(name);
  return it == values_.end() ? fallback : *parse_integer(it->second, o.min, o.max);
}

std::vector<long long> Args::get_ints(const std::string& name,
                                      const std::vector<long long>& fallback) const {
  const Option& o = declared(name, OptionKind::IntList, OptionKind::IntList);
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  std::vector<long long> out;
  for (const auto& item : split_commas(it->second)) {
    const auto v = parse_integer(item, o.min, o.max);
    if (!v) {  // one of the option's words
      throw InvalidArgument("devpipe " + command_->name + " reads option --" + name +
                            " as integers, but its item '" + item +
                            "' is one of the words it accepts (read it with get_all)");
    }
    out.push_back(*v);
  }
  return out;
}

std::vector<std::string> Args::get_all(const std::string& name) const {
  if (!command_->find(name)) {
    throw InvalidArgument("devpipe " + command_->name + " reads option --" + name + " that it does not declare");
  }
  auto it = repeated_.find(name);
  return it == repeated_.end() ? std::vector<std::string>{} : it->second;
}

std::vector<std::string> Args::get_list(const std::string& name,
                                        const std::string& fallback) const {
  declared(name, OptionKind::ChoiceList, OptionKind::String);
  auto it = values_.find(name);
  return split_commas(it == values_.end() ? fallback : it->second);
}

}  // namespace devpipe::cli
