using System.Text.RegularExpressions;

namespace LoraSharp.Adapters;

/// <summary>
/// Selects modules by their dotted <c>named_modules()</c> path. A path is selected when it matches any include
/// pattern and no exclude pattern. Pattern kinds: exact path; suffix on a dot boundary (PEFT
/// <c>target_modules</c>: "q_proj" matches "model.layers.0.self_attn.q_proj"); glob (<c>*</c> any run of characters,
/// <c>?</c> one character, whole path); regex (full match, as PEFT with a string target).
/// </summary>
public sealed class ModuleSelector
{
    readonly List<(string Kind, string Text, Func<string, bool> Match)> _include = [];
    readonly List<(string Kind, string Text, Func<string, bool> Match)> _exclude = [];

    public static ModuleSelector Exact(params string[] paths) => new ModuleSelector().IncludeExact(paths);
    public static ModuleSelector Suffix(params string[] names) => new ModuleSelector().IncludeSuffix(names);
    public static ModuleSelector Glob(params string[] patterns) => new ModuleSelector().IncludeGlob(patterns);
    public static ModuleSelector Regex(params string[] patterns) => new ModuleSelector().IncludeRegex(patterns);
    /// <summary>Every adaptable module.</summary>
    public static ModuleSelector All() => new ModuleSelector().IncludeGlob("*");

    public ModuleSelector IncludeExact(params string[] paths) => Add(_include, "exact", paths, ExactMatcher);
    public ModuleSelector IncludeSuffix(params string[] names) => Add(_include, "suffix", names, SuffixMatcher);
    public ModuleSelector IncludeGlob(params string[] patterns) => Add(_include, "glob", patterns, GlobMatcher);
    public ModuleSelector IncludeRegex(params string[] patterns) => Add(_include, "regex", patterns, RegexMatcher);
    public ModuleSelector ExcludeExact(params string[] paths) => Add(_exclude, "exact", paths, ExactMatcher);
    public ModuleSelector ExcludeSuffix(params string[] names) => Add(_exclude, "suffix", names, SuffixMatcher);
    public ModuleSelector ExcludeGlob(params string[] patterns) => Add(_exclude, "glob", patterns, GlobMatcher);
    public ModuleSelector ExcludeRegex(params string[] patterns) => Add(_exclude, "regex", patterns, RegexMatcher);

    public bool Matches(string path) => _include.Any(p => p.Match(path)) && !_exclude.Any(p => p.Match(path));

    public override string ToString() =>
        string.Join(" | ", _include.Select(p => $"{p.Kind}:{p.Text}")) + (_exclude.Count > 0 ? " minus " + string.Join(" | ", _exclude.Select(p => $"{p.Kind}:{p.Text}")) : "");

    ModuleSelector Add(List<(string, string, Func<string, bool>)> list, string kind, string[] items, Func<string, Func<string, bool>> make)
    {
        foreach (var item in items)
        {
            if (string.IsNullOrEmpty(item)) throw new ArgumentException($"Empty {kind} pattern.");
            list.Add((kind, item, make(item)));
        }
        return this;
    }

    static Func<string, bool> ExactMatcher(string p) => s => s == p;
    static Func<string, bool> SuffixMatcher(string p) => s => s == p || s.EndsWith("." + p, StringComparison.Ordinal);
    static Func<string, bool> GlobMatcher(string p)
    {
        var rx = new Regex("^" + System.Text.RegularExpressions.Regex.Escape(p).Replace(@"\*", ".*").Replace(@"\?", ".") + "$", RegexOptions.CultureInvariant);
        return s => rx.IsMatch(s);
    }
    static Func<string, bool> RegexMatcher(string p)
    {
        Regex rx;
        try { rx = new Regex("^(?:" + p + ")$", RegexOptions.CultureInvariant); }
        catch (ArgumentException e) { throw new ArgumentException($"Invalid module regex '{p}': {e.Message}", e); }
        return s => rx.IsMatch(s);
    }
}
