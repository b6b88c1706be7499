using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace LoraSharp.Formats;

/// <summary>
/// The fields of PEFT's <c>adapter_config.json</c> that change the math (LoraConfig, LoHaConfig, LoKrConfig),
/// plus the whole JSON object so a written config keeps every field PEFT expects.
/// </summary>
public sealed class PeftAdapterConfig
{
    /// <summary>LORA, LOHA or LOKR.</summary>
    public string PeftType { get; init; } = "LORA";
    public int R { get; init; } = 8;
    /// <summary>lora_alpha (LoRA) or alpha (LoHa / LoKr).</summary>
    public double Alpha { get; init; } = 8;
    public bool UseRslora { get; init; }
    public bool UseDora { get; init; }
    public bool FanInFanOut { get; init; }
    public double Dropout { get; init; }
    public string Bias { get; init; } = "none";
    public IReadOnlyList<string> TargetModules { get; init; } = [];
    public string? TargetModulesRegex { get; init; }
    public IReadOnlyList<string> ModulesToSave { get; init; } = [];
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();
    public IReadOnlyDictionary<string, double> AlphaPattern { get; init; } = new Dictionary<string, double>();
    public string? BaseModelNameOrPath { get; init; }
    public string? TaskType { get; init; }

    /// <summary>The JSON as read (or as it will be written).</summary>
    public JsonObject Json { get; init; } = new();

    public static PeftAdapterConfig Read(string path)
    {
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new LoraSharpException($"expected a JSON object", path);
        }
        catch (JsonException e)
        {
            throw new LoraSharpException($"invalid JSON: {e.Message}", path);
        }
        return FromJson(json, path);
    }

    /// <summary>Parses a config object; <paramref name="source"/> names it in errors.</summary>
    public static PeftAdapterConfig FromJson(JsonObject json, string source)
    {
        string type = Str(json, "peft_type") ?? "LORA";
        if (type is not ("LORA" or "LOHA" or "LOKR"))
            throw new LoraSharpException($"peft_type '{type}' is not supported (expected LORA, LOHA or LOKR)", source, "peft_type");
        var target = json["target_modules"];
        return new PeftAdapterConfig
        {
            PeftType = type,
            R = Int(json, "r", source) ?? 8,
            Alpha = Num(json, type == "LORA" ? "lora_alpha" : "alpha", source) ?? 8,
            UseRslora = Bool(json, "use_rslora") ?? Bool(json, "rs_lora") ?? false,
            UseDora = Bool(json, "use_dora") ?? false,
            FanInFanOut = Bool(json, "fan_in_fan_out") ?? false,
            Dropout = Num(json, type == "LORA" ? "lora_dropout" : "module_dropout", source) ?? 0,
            Bias = Str(json, "bias") ?? "none",
            TargetModules = target is JsonArray arr ? arr.Select(n => n?.GetValue<string>() ?? "").ToList() : [],
            TargetModulesRegex = target is JsonValue v && v.TryGetValue<string>(out var s) ? s : null,
            ModulesToSave = json["modules_to_save"] is JsonArray m ? m.Select(n => n?.GetValue<string>() ?? "").ToList() : [],
            RankPattern = Pattern(json, "rank_pattern", source).ToDictionary(p => p.Key, p => (int)p.Value),
            AlphaPattern = Pattern(json, "alpha_pattern", source),
            BaseModelNameOrPath = Str(json, "base_model_name_or_path"),
            TaskType = Str(json, "task_type"),
            Json = json,
        };
    }

    /// <summary>PEFT's rule: a pattern key applies to a module when the module name ends with it at a '.' boundary (regex).</summary>
    static string? MatchPattern(IEnumerable<string> patterns, string modulePath)
        => patterns.FirstOrDefault(p => Regex.IsMatch(modulePath, $"^(.*\\.)?({p})$"));

    public int RankFor(string modulePath)
        => MatchPattern(RankPattern.Keys, modulePath) is { } key ? RankPattern[key] : R;

    public double AlphaFor(string modulePath)
        => MatchPattern(AlphaPattern.Keys, modulePath) is { } key ? AlphaPattern[key] : Alpha;

    static string? Str(JsonObject o, string key) => o[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    static bool? Bool(JsonObject o, string key) => o[key] is JsonValue v && v.TryGetValue<bool>(out var b) ? b : null;

    static double? Num(JsonObject o, string key, string source)
    {
        var node = o[key];
        if (node is null) return null;
        if (node is JsonValue v && v.TryGetValue<double>(out var d)) return d;
        throw new LoraSharpException($"'{key}' must be a number, got {node.ToJsonString()}", source, key);
    }

    static int? Int(JsonObject o, string key, string source)
    {
        var d = Num(o, key, source);
        if (d is null) return null;
        if (d != Math.Floor(d.Value) || d <= 0) throw new LoraSharpException($"'{key}' must be a positive integer, got {d}", source, key);
        return (int)d.Value;
    }

    static Dictionary<string, double> Pattern(JsonObject o, string key, string source)
    {
        var result = new Dictionary<string, double>(StringComparer.Ordinal);
        if (o[key] is not JsonObject map) return result;
        foreach (var (k, v) in map)
        {
            if (v is JsonValue jv && jv.TryGetValue<double>(out var d)) result[k] = d;
            else throw new LoraSharpException($"{key}['{k}'] must be a number", source, key);
        }
        return result;
    }
}
