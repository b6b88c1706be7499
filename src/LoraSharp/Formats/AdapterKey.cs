namespace LoraSharp.Formats;

/// <summary>How one tensor key of an adapter file names its module and role.</summary>
public enum KeyFormat
{
    /// <summary>kohya / A1111 / LyCORIS: <c>lora_unet_down_blocks_0_…_to_q.lora_down.weight</c> (mangled name).</summary>
    Kohya,
    /// <summary>PEFT (LLM): <c>base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight</c>.</summary>
    Peft,
    /// <summary>diffusers with the PEFT backend: <c>unet.down_blocks.0.….to_q.lora_A.weight</c>.</summary>
    DiffusersPeft,
    /// <summary>older diffusers: <c>unet.….to_q.lora.down.weight</c>, <c>….processor.to_q_lora.down.weight</c>,
    /// text encoder <c>….q_proj.lora_linear_layer.down.weight</c>.</summary>
    DiffusersLegacy,
}

/// <summary>
/// One parsed tensor key: the module it adapts as the file names it (a kohya mangled name or a dotted path,
/// without the file's component prefix), the component prefix, and the canonical role
/// (lora_down, lora_up, alpha, hada_w1_a, …, see <see cref="Adapters.ModuleAdapterWeights"/>).
/// </summary>
public sealed record AdapterKey(string FileKey, KeyFormat Format, string Component, string ModuleName, string Role)
{
    /// <summary>The module as one string without a target model: the kohya name, the PEFT path, or component + path.</summary>
    public string GroupName => Format is KeyFormat.Kohya or KeyFormat.Peft ? ModuleName : Component + ModuleName;
}

/// <summary>Parses adapter tensor keys of every common layout. Pure string work; no guessing of module paths.</summary>
public static class AdapterKeyParser
{
    /// <summary>kohya / LyCORIS suffixes after the first '.', mapped to canonical roles.</summary>
    static readonly Dictionary<string, string> KohyaSuffixes = new(StringComparer.Ordinal)
    {
        ["lora_down.weight"] = "lora_down", ["lora_up.weight"] = "lora_up", ["lora_mid.weight"] = "lora_mid",
        ["alpha"] = "alpha", ["dora_scale"] = "dora_scale",
        ["hada_w1_a"] = "hada_w1_a", ["hada_w1_b"] = "hada_w1_b", ["hada_w2_a"] = "hada_w2_a", ["hada_w2_b"] = "hada_w2_b",
        ["hada_t1"] = "hada_t1", ["hada_t2"] = "hada_t2",
        ["lokr_w1"] = "lokr_w1", ["lokr_w1_a"] = "lokr_w1_a", ["lokr_w1_b"] = "lokr_w1_b",
        ["lokr_w2"] = "lokr_w2", ["lokr_w2_a"] = "lokr_w2_a", ["lokr_w2_b"] = "lokr_w2_b", ["lokr_t2"] = "lokr_t2",
        ["diff"] = "diff", ["diff_b"] = "diff_b",
    };

    /// <summary>Dotted-path suffixes (PEFT and diffusers), longest first so ".lora.down.weight" wins over ".weight".</summary>
    static readonly (string Suffix, string Role, bool Legacy)[] PathSuffixes =
    [
        (".lora_linear_layer.down.weight", "lora_down", true), (".lora_linear_layer.up.weight", "lora_up", true),
        (".lora_magnitude_vector.weight", "magnitude", false), (".lora_magnitude_vector", "magnitude", false),
        (".lora.down.weight", "lora_down", true), (".lora.up.weight", "lora_up", true),
        ("_lora.down.weight", "lora_down", true), ("_lora.up.weight", "lora_up", true),
        (".lora_A.weight", "lora_down", false), (".lora_B.weight", "lora_up", false),
        (".hada_w1_a", "hada_w1_a", false), (".hada_w1_b", "hada_w1_b", false),
        (".hada_w2_a", "hada_w2_a", false), (".hada_w2_b", "hada_w2_b", false),
        (".hada_t1", "hada_t1", false), (".hada_t2", "hada_t2", false),
        (".lokr_w1", "lokr_w1", false), (".lokr_w1_a", "lokr_w1_a", false), (".lokr_w1_b", "lokr_w1_b", false),
        (".lokr_w2", "lokr_w2", false), (".lokr_w2_a", "lokr_w2_a", false), (".lokr_w2_b", "lokr_w2_b", false),
        (".lokr_t2", "lokr_t2", false),
        (".alpha", "alpha", false),
    ];

    /// <summary>Component prefixes of diffusers files (SD, SDXL, DiT pipelines).</summary>
    public static readonly string[] DiffusersComponents = ["unet.", "text_encoder.", "text_encoder_2.", "transformer."];

    public const string PeftPrefix = "base_model.model.";

    /// <summary>kohya name prefixes: lora_unet_, lora_te_, lora_te1_, lora_te2_, and LyCORIS' standalone lycoris_.</summary>
    public static readonly string[] KohyaPrefixes = ["lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lycoris_"];

    /// <summary>Parses a key; null when it matches no known layout (the caller reports it).</summary>
    public static AdapterKey? Parse(string key)
    {
        // kohya: a mangled name without dots, then a known suffix.
        int dot = key.IndexOf('.');
        if (dot > 0)
        {
            var name = key[..dot];
            var prefix = KohyaPrefixes.FirstOrDefault(p => name.StartsWith(p, StringComparison.Ordinal));
            if (prefix is not null && KohyaSuffixes.TryGetValue(key[(dot + 1)..], out var kohyaRole))
                return new AdapterKey(key, KeyFormat.Kohya, prefix, name, kohyaRole);
        }

        foreach (var (suffix, role, legacy) in PathSuffixes)
        {
            if (!key.EndsWith(suffix, StringComparison.Ordinal)) continue;
            var path = key[..^suffix.Length];
            if (path.Length == 0) return null;
            if (path.StartsWith(PeftPrefix, StringComparison.Ordinal))
                return new AdapterKey(key, KeyFormat.Peft, PeftPrefix, path[PeftPrefix.Length..], role);
            var component = DiffusersComponents.FirstOrDefault(c => path.StartsWith(c, StringComparison.Ordinal)) ?? "";
            path = path[component.Length..];
            if (legacy) path = RepairLegacyProcessorPath(path);
            return new AdapterKey(key, legacy ? KeyFormat.DiffusersLegacy : KeyFormat.DiffusersPeft, component, path, role);
        }
        return null;
    }

    /// <summary>
    /// Older diffusers attention processors store <c>attn1.processor.to_q_lora.down.weight</c> for the module
    /// <c>attn1.to_q</c> (and <c>to_out_lora</c> for <c>to_out.0</c>); the suffix "_lora.down.weight" is already cut.
    /// </summary>
    static string RepairLegacyProcessorPath(string path)
    {
        const string marker = ".processor.";
        int at = path.LastIndexOf(marker, StringComparison.Ordinal);
        if (at < 0) return path;
        var head = path[..at];
        var proc = path[(at + marker.Length)..];
        if (proc == "to_out") proc = "to_out.0";
        return head + "." + proc;
    }

    /// <summary>A key with every run of digits replaced by N: groups unmatched keys in reports.</summary>
    public static string Pattern(string key) => System.Text.RegularExpressions.Regex.Replace(key, "[0-9]+", "N");
}
