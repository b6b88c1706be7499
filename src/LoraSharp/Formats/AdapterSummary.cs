using LoraSharp.Adapters;

namespace LoraSharp.Formats;

/// <summary>What <c>lorasharp inspect</c> shows of an adapter: layout, algorithms, ranks, alphas, scales, modules, metadata, hashes, base.</summary>
public sealed class AdapterSummary
{
    public sealed record Module(string Name, AdapterAlgorithm Algorithm, int Rank, double? Alpha, double Scale, string Shapes, bool Dora);

    public required string Path { get; init; }
    public required IReadOnlyList<string> Layouts { get; init; }
    public required IReadOnlyList<Module> Modules { get; init; }
    public required BaseModelGuess Base { get; init; }
    public required IReadOnlyDictionary<string, string> Metadata { get; init; }
    public required IReadOnlyDictionary<string, string> Hashes { get; init; }
    public PeftAdapterConfig? PeftConfig { get; init; }

    /// <summary>Counts of (algorithm, rank, alpha) combinations, most common first.</summary>
    public IEnumerable<(AdapterAlgorithm Algorithm, int Rank, double? Alpha, double Scale, int Count)> Groups
        => Modules.GroupBy(m => (m.Algorithm, m.Rank, m.Alpha, m.Scale))
            .OrderByDescending(g => g.Count())
            .Select(g => (g.Key.Algorithm, g.Key.Rank, g.Key.Alpha, g.Key.Scale, g.Count()));

    /// <summary>Reads an adapter file or PEFT folder (without a base model: modules keep the file's names).</summary>
    public static AdapterSummary Read(string path)
    {
        var (tensorFile, _) = AdapterFile.Locate(path);
        using var result = AdapterFile.Read(path, null, new AdapterReadOptions { Lenient = true });
        if (result.Weights.Modules.Count == 0)
            throw new LoraSharpException("no adapter keys (lora_down/lora_A/hada_/lokr_…) in this file", tensorFile);
        var modules = result.Weights.Modules.Select(m => new Module(
            m.ModulePath, m.Algorithm, AdapterScales.RankFor(m), m.Alpha, AdapterScales.Scale(m),
            string.Join(" ", m.Tensors.OrderBy(t => t.Key, StringComparer.Ordinal).Select(t => $"{t.Key}[{string.Join("×", t.Value.shape)}]")),
            m.Has("magnitude") || m.Has("dora_scale"))).ToList();
        var hashes = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["sha256"] = AdapterHashes.FileSha256(tensorFile),
        };
        if (tensorFile.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            hashes["addnet (sshs_model_hash)"] = AdapterHashes.DataSectionSha256(tensorFile);
            hashes["A1111 short hash"] = hashes["addnet (sshs_model_hash)"][..12];
        }
        hashes["Civitai AutoV2"] = hashes["sha256"][..10].ToUpperInvariant();
        hashes["legacy"] = AdapterHashes.LegacyHash(tensorFile);
        return new AdapterSummary
        {
            Path = path,
            Layouts = result.KeyFormats.Select(f => f.ToString()).Order().ToList(),
            Modules = modules,
            Base = result.Base,
            Metadata = result.Weights.Metadata,
            Hashes = hashes,
            PeftConfig = result.PeftConfig,
        };
    }
}
