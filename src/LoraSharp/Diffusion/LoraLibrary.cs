using LoraSharp.IO;

namespace LoraSharp.Diffusion;

/// <summary>A LoRA file found in a <see cref="LoraLibrary"/>: its name (file stem), full path and path relative to the root.</summary>
public sealed record LoraEntry(string Name, string FullPath, string RelativePath, string? Alias = null);

/// <summary>
/// The LoRA folder of A1111 (default <c>models/Lora</c>): every .safetensors/.pt/.ckpt below the root, found
/// recursively; subfolders are only categories, a LoRA is named by its file stem (or, when aliases are read, by its
/// <c>ss_output_name</c> metadata). Names are never paths: a name with a path separator, "..", a drive or a rooted
/// path is refused, and a file whose real path (after symbolic links) leaves the root is not listed, so resolving
/// a prompt's names can never read outside the folder.
/// </summary>
public sealed class LoraLibrary
{
    public const string DefaultFolder = "models/Lora";
    public static IReadOnlyList<string> Extensions { get; } = [".safetensors", ".pt", ".ckpt"];

    readonly Dictionary<string, List<LoraEntry>> _byName = new(StringComparer.Ordinal);
    readonly Dictionary<string, List<LoraEntry>> _byAlias = new(StringComparer.Ordinal);

    /// <summary>The root as given, made absolute.</summary>
    public string Root { get; }

    /// <summary>All LoRA files, ordered by relative path.</summary>
    public IReadOnlyList<LoraEntry> Entries { get; }

    /// <summary>Files skipped during the scan (link leaving the root, unreadable metadata) with the reason.</summary>
    public IReadOnlyList<(string Path, string Reason)> Skipped { get; }

    LoraLibrary(string root, List<LoraEntry> entries, List<(string, string)> skipped)
    {
        Root = root;
        Entries = entries;
        Skipped = skipped;
        foreach (var e in entries)
        {
            Add(_byName, e.Name, e);
            if (e.Alias is { Length: > 0 } alias && alias != e.Name) Add(_byAlias, alias, e);
        }
    }

    static void Add(Dictionary<string, List<LoraEntry>> map, string key, LoraEntry e)
    {
        if (!map.TryGetValue(key, out var list)) map[key] = list = [];
        list.Add(e);
    }

    /// <summary>Scans <paramref name="root"/> recursively.</summary>
    /// <param name="readAliases">Also read each .safetensors header for <c>ss_output_name</c> (A1111's alias).</param>
    public static LoraLibrary Open(string root = DefaultFolder, bool readAliases = false)
    {
        var fullRoot = Path.GetFullPath(root);
        if (!Directory.Exists(fullRoot))
            throw new LoraSharpException("LoRA folder not found", fullRoot);
        var realRoot = RealPath(fullRoot);

        var entries = new List<LoraEntry>();
        var skipped = new List<(string, string)>();
        var options = new EnumerationOptions { RecurseSubdirectories = true, IgnoreInaccessible = true, AttributesToSkip = FileAttributes.None, MatchCasing = MatchCasing.CaseInsensitive };
        foreach (var path in Directory.EnumerateFiles(fullRoot, "*", options))
        {
            var ext = Path.GetExtension(path);
            if (!Extensions.Contains(ext, StringComparer.OrdinalIgnoreCase)) continue;
            string real;
            try { real = RealPath(path); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                skipped.Add((path, $"cannot resolve links: {e.Message}"));
                continue;
            }
            if (!IsUnder(real, realRoot))
            {
                skipped.Add((path, $"resolves to {real}, outside {realRoot}"));
                continue;
            }
            string? alias = null;
            if (readAliases && ext.Equals(".safetensors", StringComparison.OrdinalIgnoreCase))
            {
                try
                {
                    using var file = SafetensorsFile.Open(real);
                    file.Metadata.TryGetValue("ss_output_name", out alias);
                }
                catch (Exception e) when (e is LoraSharpException or IOException or UnauthorizedAccessException)
                {
                    skipped.Add((path, $"unreadable header: {e.Message}"));
                    continue;
                }
            }
            entries.Add(new LoraEntry(Path.GetFileNameWithoutExtension(path), real, Path.GetRelativePath(fullRoot, path), alias));
        }
        entries.Sort((a, b) => string.CompareOrdinal(a.RelativePath, b.RelativePath));
        return new LoraLibrary(fullRoot, entries, skipped);
    }

    /// <summary>Why a name is not acceptable as a LoRA name, or null if it is.</summary>
    public static string? ValidateName(string name)
    {
        if (string.IsNullOrWhiteSpace(name)) return "the name is empty";
        if (name.IndexOfAny(['/', '\\']) >= 0) return "a LoRA name may not contain a path separator (use the file name without folder)";
        if (name.Contains("..", StringComparison.Ordinal)) return "a LoRA name may not contain '..'";
        if (Path.IsPathRooted(name) || name.Contains(':')) return "a LoRA name may not be a rooted path or contain a drive";
        if (name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 || name.Any(char.IsControl)) return "a LoRA name may not contain control or invalid file-name characters";
        return null;
    }

    /// <summary>Finds a LoRA by file stem (exact, then case-insensitive if unique), then by alias.</summary>
    /// <exception cref="LoraSharpException">The name is refused, missing (with close matches) or ambiguous (with the candidates).</exception>
    public LoraEntry Resolve(string name)
    {
        if (TryResolve(name, out var entry, out var error)) return entry!;
        throw new LoraSharpException(error!, Root, name);
    }

    public bool TryResolve(string name, out LoraEntry? entry, out string? error)
    {
        entry = null;
        if (ValidateName(name) is { } invalid)
        {
            error = $"LoRA name '{name}' refused: {invalid}";
            return false;
        }
        var candidates = _byName.GetValueOrDefault(name)
            ?? SingleCaseInsensitive(_byName, name)
            ?? _byAlias.GetValueOrDefault(name)
            ?? SingleCaseInsensitive(_byAlias, name);
        if (candidates is null)
        {
            var close = ClosestNames(name, 5);
            error = $"LoRA '{name}' not found in {Root} ({Entries.Count} files)" + (close.Count > 0 ? $"; did you mean: {string.Join(", ", close)}?" : "");
            return false;
        }
        if (candidates.Count > 1)
        {
            error = $"LoRA name '{name}' is ambiguous: {string.Join(", ", candidates.Select(c => c.RelativePath))}; rename one of the files";
            return false;
        }
        entry = candidates[0];
        error = null;
        return true;
    }

    static List<LoraEntry>? SingleCaseInsensitive(Dictionary<string, List<LoraEntry>> map, string name)
    {
        var keys = map.Keys.Where(k => string.Equals(k, name, StringComparison.OrdinalIgnoreCase)).ToList();
        return keys.Count == 1 ? map[keys[0]] : keys.Count > 1 ? keys.SelectMany(k => map[k]).ToList() : null;
    }

    /// <summary>Known names (stems and aliases) nearest to <paramref name="name"/> by edit distance, or containing it.</summary>
    public IReadOnlyList<string> ClosestNames(string name, int count)
    {
        var lower = name.ToLowerInvariant();
        return _byName.Keys.Concat(_byAlias.Keys).Distinct()
            .Select(k => (Key: k, Distance: EditDistance.Levenshtein(lower, k.ToLowerInvariant())))
            .Where(x => x.Distance <= Math.Max(3, name.Length / 2) || x.Key.Contains(name, StringComparison.OrdinalIgnoreCase) || name.Contains(x.Key, StringComparison.OrdinalIgnoreCase))
            .OrderBy(x => x.Distance).ThenBy(x => x.Key, StringComparer.Ordinal)
            .Take(count).Select(x => x.Key).ToList();
    }

    static bool IsUnder(string path, string root)
    {
        var cmp = OperatingSystem.IsWindows() || OperatingSystem.IsMacOS() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        var r = Path.TrimEndingDirectorySeparator(root) + Path.DirectorySeparatorChar;
        return path.StartsWith(r, cmp);
    }

    /// <summary>The path with every symbolic link (in any component) resolved.</summary>
    internal static string RealPath(string path, int depth = 0)
    {
        if (depth > 40) throw new IOException($"too many levels of symbolic links: {path}");
        var full = Path.GetFullPath(path);
        var root = Path.GetPathRoot(full) ?? "";
        var current = root;
        foreach (var part in full[root.Length..].Split([Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar], StringSplitOptions.RemoveEmptyEntries))
        {
            var next = Path.Combine(current, part);
            FileSystemInfo info = Directory.Exists(next) ? new DirectoryInfo(next) : new FileInfo(next);
            if (info.LinkTarget is not null)
            {
                var target = info.ResolveLinkTarget(returnFinalTarget: true)
                    ?? throw new IOException($"cannot resolve symbolic link {next}");
                next = RealPath(target.FullName, depth + 1);
            }
            current = next;
        }
        return current;
    }
}
