using System.Text;

namespace LoraSharp.Formats;

/// <summary>
/// What loading an adapter onto a model matched: keys used, keys that found no module (grouped by pattern),
/// the modules adapted, and the adaptable modules the adapter leaves untouched.
/// </summary>
public sealed class CoverageReport
{
    public required string FilePath { get; init; }
    public required int TotalKeys { get; init; }
    public required int MatchedKeys { get; init; }
    public required IReadOnlyList<string> TargetedModules { get; init; }
    public required IReadOnlyList<KeyGroup> UnmatchedKeys { get; init; }
    public required IReadOnlyList<KeyGroup> UntouchedModules { get; init; }

    /// <summary>Keys (or module paths) sharing one pattern (digits replaced by N), with a count and an example.</summary>
    public sealed record KeyGroup(string Pattern, int Count, string Example);

    public bool IsComplete => UnmatchedKeys.Count == 0;

    public int UnmatchedCount => UnmatchedKeys.Sum(g => g.Count);

    public static IReadOnlyList<KeyGroup> Group(IEnumerable<string> keys)
        => keys.GroupBy(AdapterKeyParser.Pattern)
            .Select(g => new KeyGroup(g.Key, g.Count(), g.First()))
            .OrderByDescending(g => g.Count).ThenBy(g => g.Pattern, StringComparer.Ordinal)
            .ToList();

    public string ToText(int maxGroups = 20)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"{FilePath}: {MatchedKeys}/{TotalKeys} keys matched, {TargetedModules.Count} modules adapted");
        if (UnmatchedKeys.Count > 0)
        {
            sb.AppendLine($"  unmatched keys ({UnmatchedCount}):");
            foreach (var g in UnmatchedKeys.Take(maxGroups)) sb.AppendLine($"    {g.Count,5} × {g.Pattern}   e.g. {g.Example}");
            if (UnmatchedKeys.Count > maxGroups) sb.AppendLine($"    … {UnmatchedKeys.Count - maxGroups} more patterns");
        }
        if (UntouchedModules.Count > 0)
        {
            sb.AppendLine($"  adaptable modules left untouched ({UntouchedModules.Sum(g => g.Count)}):");
            foreach (var g in UntouchedModules.Take(maxGroups)) sb.AppendLine($"    {g.Count,5} × {g.Pattern}");
            if (UntouchedModules.Count > maxGroups) sb.AppendLine($"    … {UntouchedModules.Count - maxGroups} more patterns");
        }
        return sb.ToString();
    }
}
