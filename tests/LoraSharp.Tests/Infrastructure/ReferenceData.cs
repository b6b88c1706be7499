namespace LoraSharp.Tests.Infrastructure;

/// <summary>
/// Locates the reference vectors made by the Python tools. The folder comes from LORASHARP_REFERENCE_DIR,
/// else ../shared/reference relative to the repository root. Tests that use it are data-driven over the
/// manifests found there.
/// </summary>
public static class ReferenceData
{
    public static string Root { get; } = FindRoot();

    public static string RepoRoot { get; } = FindRepoRoot();

    static string FindRoot()
    {
        var fromEnv = Environment.GetEnvironmentVariable("LORASHARP_REFERENCE_DIR");
        if (!string.IsNullOrWhiteSpace(fromEnv))
            return Path.GetFullPath(fromEnv);
        return Path.GetFullPath(Path.Combine(FindRepoRoot(), "..", "shared", "reference"));
    }

    static string FindRepoRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoraSharp.sln")))
            dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("Cannot find LoraSharp.sln above " + AppContext.BaseDirectory);
    }

    /// <summary>
    /// Parses a JSON file written by Python's json module, which may contain the non-standard literals
    /// NaN, Infinity and -Infinity (as strings here).
    /// </summary>
    public static System.Text.Json.Nodes.JsonNode ReadJson(params string[] parts)
    {
        var text = File.ReadAllText(PathOf(parts));
        text = System.Text.RegularExpressions.Regex.Replace(text, @"(?<=[:\[,]\s*)(-?Infinity|NaN)(?=\s*[,\]}])", "\"$1\"");
        return System.Text.Json.Nodes.JsonNode.Parse(text)!;
    }

    /// <summary>A path inside the reference folder; fails the test clearly when it is missing.</summary>
    public static string PathOf(params string[] parts)
    {
        var path = Path.Combine([Root, .. parts]);
        if (!File.Exists(path) && !Directory.Exists(path))
            throw new FileNotFoundException($"Reference data missing: {path} (set LORASHARP_REFERENCE_DIR)");
        return path;
    }
}
