// The devpipe program's option parsing: each sub-command declares its options (name, type,
// range) once; parsing checks the command line against them and the usage text is made from
// them. One parser for every sub-command.
#pragma once

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "devpipe/error.h"

namespace devpipe::cli {

/// A command line the sub-command does not accept (unknown option, bad value, missing
/// argument). The program prints it with the command's name and exits with code 2.
class UsageError : public InvalidArgument {
 public:
  using InvalidArgument::InvalidArgument;
};

enum class OptionKind {
  Flag,        // --name, no value
  String,      // --name TEXT
  Int,         // --name N, an integer in [min, max]
  IntList,     // --name 8,32: comma-separated integers in [min, max]
  Choice,      // --name X, X one of `choices`
  ChoiceList,  // --name X,Y: comma-separated, each one of `choices`
};

/// One declared option of a sub-command.
struct Option {
  std::string name;  // without the leading "--"
  OptionKind kind = OptionKind::Flag;
  std::string value;  // placeholder in the usage text: "N", "DIR", "8,32"
  std::string help;   // the usage text's line
  long long min = 1;  // Int, IntList
  long long max = std::numeric_limits<long long>::max();
  std::vector<std::string> choices;  // Choice, ChoiceList
  /// IntList: words accepted as items besides the integers, which the command gives a meaning
  /// (read such a list with Args::get_all; get_ints refuses them). The parser's message for a
  /// bad item does not name them: the command may refuse them later (refuse_value).
  std::vector<std::string> words;
  std::string refused;  // non-empty: recognised but not accepted by this command; says why
  bool repeatable = false;  // may be given several times (Args::get_all)
};

/// Throws the UsageError the parser throws for a value that option `o` does not accept
/// ("option --NAME expects ..., got 'VALUE'"): for a value the parser let through that the
/// command refuses after all (an IntList word where the input gives it no meaning).
[[noreturn]] void refuse_value(const Option& o, const std::string& value);

/// A sub-command: its name, what it does, its positional arguments and its options.
struct Command {
  std::string name;         // "run"
  std::string summary;      // one line, for `devpipe help`
  std::string positionals;  // usage text of the positional arguments ("ARTIFACT_DIR"), or ""
  int min_positionals = 0;
  int max_positionals = 0;
  std::vector<Option> options;
  std::string notes;  // more usage text, printed after the options

  /// The usage text: synopsis, summary, the options with their help, the notes.
  std::string usage() const;
  /// The declared option `name`, or nullptr.
  const Option* find(const std::string& name) const;
};

/// The arguments after the sub-command's name, checked against its declared options.
class Args {
 public:
  /// Parses `argv` ("--name value", "--name=value", "--flag", positionals). When any argument
  /// is "--help" or "-h" nothing else is checked and help() is true. Throws UsageError naming
  /// the option and the value for an unknown or refused option, a missing or malformed value,
  /// an option given twice, or the wrong number of positionals.
  static Args parse(const Command& command, const std::vector<std::string>& argv);

  bool help() const { return help_; }
  bool has(const std::string& name) const;
  std::string get(const std::string& name, const std::string& fallback) const;
  long long get_int(const std::string& name, long long fallback) const;
  /// IntList: the integers given, or `fallback` when the option is absent.
  std::vector<long long> get_ints(const std::string& name,
                                  const std::vector<long long>& fallback = {}) const;
  /// ChoiceList (or String): the comma-separated items, or `fallback` when absent.
  std::vector<std::string> get_list(const std::string& name, const std::string& fallback) const;
  /// A repeatable option's values in command-line order (empty when absent).
  std::vector<std::string> get_all(const std::string& name) const;
  const std::vector<std::string>& positional() const { return positional_; }
  const Command& command() const { return *command_; }

 private:
  const Option& declared(const std::string& name, OptionKind a, OptionKind b) const;

  const Command* command_ = nullptr;
  bool help_ = false;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> repeated_;
  std::vector<std::string> positional_;
};

}  // namespace devpipe::cli
