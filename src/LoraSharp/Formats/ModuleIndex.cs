using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Formats;

/// <summary>
/// The adaptable modules of a target model (Linear and Conv2d weights), by dotted path, with their weight
/// shapes; plus the names adapter files use for them. kohya names (<c>lora_unet_down_blocks_0_…</c>) are not
/// invertible — module names contain '_' — so they are looked up in a map made by mangling every real path
/// (and every alias path, e.g. the single-file ldm/SGM names of the same module), never by string repair.
/// Paths of composite SD models carry a component prefix: <c>unet.</c>, <c>text_encoder.</c>,
/// <c>text_encoder_2.</c>; LLM paths are the Hugging Face names (<c>model.layers.0.self_attn.q_proj</c>).
/// </summary>
public sealed class ModuleIndex
{
    /// <summary>kohya name prefix for each component prefix of a module path.</summary>
    public static readonly IReadOnlyList<(string PathPrefix, string KohyaPrefix)> KohyaPrefixMap =
    [
        ("unet.", "lora_unet_"), ("unet.", "lycoris_"),
        ("text_encoder.", "lora_te_"), ("text_encoder.", "lora_te1_"),
        ("text_encoder_2.", "lora_te2_"),
    ];

    readonly Dictionary<string, long[]> shapes;
    readonly Dictionary<string, string> byPath = new(StringComparer.Ordinal);
    readonly Dictionary<string, string?> byKohyaName = new(StringComparer.Ordinal);

    ModuleIndex(Dictionary<string, long[]> shapes, IEnumerable<KeyValuePair<string, string>> aliases)
    {
        this.shapes = shapes;
        foreach (var path in shapes.Keys) AddName(path, path);
        foreach (var (alias, path) in aliases)
        {
            if (!shapes.ContainsKey(path))
                throw new ArgumentException($"Alias '{alias}' points to '{path}', which is not a module of the index.");
            AddName(alias, path);
        }
    }

    void AddName(string name, string path)
    {
        byPath.TryAdd(name, path);
        foreach (var (pathPrefix, kohyaPrefix) in KohyaPrefixMap)
        {
            if (!name.StartsWith(pathPrefix, StringComparison.Ordinal)) continue;
            var mangled = kohyaPrefix + name[pathPrefix.Length..].Replace('.', '_');
            // Two different modules with one mangled name: ambiguous, resolve neither.
            if (byKohyaName.TryGetValue(mangled, out var existing) && existing != path) byKohyaName[mangled] = null;
            else byKohyaName[mangled] = path;
        }
    }

    /// <summary>Module paths of the index, in a stable order.</summary>
    public IReadOnlyCollection<string> Paths => shapes.Keys;

    /// <summary>The weight shape of a module ([out, in] for Linear, [out, in, kh, kw] for Conv2d).</summary>
    public long[] WeightShape(string path) => shapes[path];

    public bool Contains(string path) => shapes.ContainsKey(path);

    /// <summary>Builds the index from module paths and weight shapes; aliases map other names of a module to its path.</summary>
    public static ModuleIndex FromShapes(IEnumerable<KeyValuePair<string, long[]>> weightShapes,
        IEnumerable<KeyValuePair<string, string>>? aliases = null)
        => new(weightShapes.ToDictionary(p => p.Key, p => p.Value, StringComparer.Ordinal), aliases ?? []);

    /// <summary>Every Linear and Conv2d of a TorchSharp module tree, under an optional component prefix.</summary>
    public static ModuleIndex FromModule(nn.Module root, string prefix = "",
        IEnumerable<KeyValuePair<string, string>>? aliases = null)
        => FromShapes(AdaptableModules(root, prefix), aliases);

    /// <summary>The (path, weight shape) pairs of the Linear and Conv2d modules of a tree.</summary>
    public static IEnumerable<KeyValuePair<string, long[]>> AdaptableModules(nn.Module root, string prefix = "")
    {
        foreach (var (name, module) in root.named_modules())
        {
            Tensor? weight = module switch
            {
                TorchSharp.Modules.Linear l => l.weight,
                TorchSharp.Modules.Conv2d c => c.weight,
                _ => null,
            };
            if (weight is not null) yield return new(prefix + name, weight.shape);
        }
    }

    /// <summary>
    /// Module paths from a state dict's keys and shapes: every 2-D or 4-D "*.weight" is taken as a module
    /// (embeddings included; callers filter when needed).
    /// </summary>
    public static ModuleIndex FromStateDict(IEnumerable<KeyValuePair<string, long[]>> tensorShapes, string prefix = "",
        IEnumerable<KeyValuePair<string, string>>? aliases = null)
        => FromShapes(tensorShapes
            .Where(p => p.Key.EndsWith(".weight", StringComparison.Ordinal) && p.Value.Length is 2 or 4)
            .Select(p => new KeyValuePair<string, long[]>(prefix + p.Key[..^".weight".Length], p.Value)), aliases);

    /// <summary>Merges several indexes (e.g. unet, text encoders) into one.</summary>
    public static ModuleIndex Combine(params ModuleIndex[] parts)
    {
        var all = new Dictionary<string, long[]>(StringComparer.Ordinal);
        var aliases = new List<KeyValuePair<string, string>>();
        foreach (var part in parts)
        {
            foreach (var (path, shape) in part.shapes) all.TryAdd(path, shape);
            aliases.AddRange(part.byPath.Where(p => p.Key != p.Value));
        }
        return new ModuleIndex(all, aliases);
    }

    /// <summary>The module a parsed key adapts, or null when the model has no such module.</summary>
    public string? Resolve(AdapterKey key)
    {
        switch (key.Format)
        {
            case KeyFormat.Kohya:
                return byKohyaName.TryGetValue(key.ModuleName, out var p) ? p : null;
            case KeyFormat.Peft:
                return byPath.TryGetValue(key.ModuleName, out var q) ? q : null;
            default:
                if (byPath.TryGetValue(key.Component + key.ModuleName, out var r)) return r;
                // diffusers files without a component prefix adapt the UNet / transformer.
                if (key.Component.Length == 0 && byPath.TryGetValue("unet." + key.ModuleName, out var u)) return u;
                return null;
        }
    }

    /// <summary>True when the mangled kohya name matches two modules (the file cannot be mapped unambiguously).</summary>
    public bool IsAmbiguous(string kohyaName) => byKohyaName.TryGetValue(kohyaName, out var p) && p is null;

    /// <summary>The kohya name of a module path (first matching prefix), for writing kohya files.</summary>
    public static string? KohyaNameOf(string path)
    {
        foreach (var (pathPrefix, kohyaPrefix) in KohyaPrefixMap)
            if (path.StartsWith(pathPrefix, StringComparison.Ordinal))
                return kohyaPrefix + path[pathPrefix.Length..].Replace('.', '_');
        return null;
    }

    /// <summary>Known paths closest to a name (shared prefix length), for "did you mean" messages.</summary>
    public IEnumerable<string> Closest(string name, int count = 3)
        => byPath.Keys.Concat(byKohyaName.Keys)
            .OrderByDescending(candidate => CommonPrefix(candidate, name))
            .ThenBy(candidate => Math.Abs(candidate.Length - name.Length))
            .Take(count);

    static int CommonPrefix(string a, string b)
    {
        int n = Math.Min(a.Length, b.Length), i = 0;
        while (i < n && a[i] == b[i]) i++;
        return i;
    }
}
