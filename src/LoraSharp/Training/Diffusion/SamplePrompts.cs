using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraSharp.Training.Diffusion;

/// <summary>One sample-image request of a kohya prompt file.</summary>
public sealed record SamplePrompt(string Prompt, string NegativePrompt, int Width, int Height, int Steps, double CfgScale, long? Seed, string? Sampler, int Line);

/// <summary>
/// kohya's sample prompt file. <c>.txt</c>: one prompt per line, options after " --": <c>--n</c> negative prompt,
/// <c>--w</c>/<c>--h</c> size (rounded down to a multiple of 8, at least 64), <c>--s</c> steps (1..1000), <c>--l</c> CFG
/// scale, <c>--d</c> seed, <c>--ss</c> sampler; empty lines and lines starting with <c>#</c> are skipped.
/// <c>.json</c>: a list whose items are such lines or objects; <c>.toml</c>: a <c>[prompt]</c> table of defaults and
/// <c>[[prompt.subset]]</c> items. Object keys (kohya's): <c>prompt</c>, <c>negative_prompt</c>, <c>width</c>,
/// <c>height</c>, <c>sample_steps</c>, <c>scale</c>, <c>seed</c>, <c>sample_sampler</c> (<c>controlnet_image</c> is
/// ignored). Defaults: 512×512, 30 steps, CFG 7.5.
/// </summary>
public static partial class SamplePromptFile
{
    [GeneratedRegex(@"^(n|w|h|s|l|d|ss|cn|g)\s+(.+)$", RegexOptions.CultureInvariant | RegexOptions.Singleline)]
    private static partial Regex Arg();

    static readonly HashSet<string> ObjectKeys = new(StringComparer.Ordinal)
    {
        "prompt", "negative_prompt", "width", "height", "sample_steps", "scale", "seed", "sample_sampler", "controlnet_image",
    };

    public static List<SamplePrompt> Read(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("sample prompt file not found", path, "sample_prompts");
        return Path.GetExtension(path).ToLowerInvariant() switch
        {
            ".json" => ParseJson(File.ReadAllText(path), path),
            ".toml" => ParseToml(File.ReadAllText(path), path),
            _ => Parse(File.ReadAllLines(path), path),
        };
    }

    /// <summary>A JSON list of prompt lines and/or objects with kohya's keys.</summary>
    public static List<SamplePrompt> ParseJson(string text, string source = "prompts.json")
    {
        System.Text.Json.Nodes.JsonNode? root;
        try { root = System.Text.Json.Nodes.JsonNode.Parse(text); }
        catch (System.Text.Json.JsonException e) { throw new LoraSharpException($"not valid JSON: {e.Message}", source, "sample_prompts", e); }
        if (root is not System.Text.Json.Nodes.JsonArray items) throw new LoraSharpException("expected a JSON list of prompts", source, "sample_prompts");
        var list = new List<SamplePrompt>();
        for (int i = 0; i < items.Count; i++)
        {
            var item = items[i];
            if (item is System.Text.Json.Nodes.JsonValue v && v.TryGetValue<string>(out var line))
                list.AddRange(Parse([line], source).Select(p => p with { Line = i + 1 }));
            else if (item is System.Text.Json.Nodes.JsonObject o)
                list.Add(FromObject(o.ToDictionary(kv => kv.Key, kv => (object?)(kv.Value is System.Text.Json.Nodes.JsonValue jv ? JsonScalar(jv) : kv.Value?.ToJsonString())), i + 1, source));
            else throw new LoraSharpException($"item {i + 1} is neither a prompt line nor an object", source, "sample_prompts");
        }
        return list;
    }

    static object? JsonScalar(System.Text.Json.Nodes.JsonValue v) =>
        v.TryGetValue<string>(out var s) ? s : v.TryGetValue<long>(out var l) ? l : v.TryGetValue<double>(out var d) ? d : v.TryGetValue<bool>(out var b) ? b : null;

    /// <summary>kohya's TOML layout: <c>[prompt]</c> defaults merged into each <c>[[prompt.subset]]</c>.</summary>
    public static List<SamplePrompt> ParseToml(string text, string source = "prompts.toml")
    {
        Tomlyn.Model.TomlTable root;
        try { root = Tomlyn.TomlSerializer.Deserialize<Tomlyn.Model.TomlTable>(text)!; }
        catch (Tomlyn.TomlException e) { throw new LoraSharpException($"not valid TOML: {e.Message}", source, "sample_prompts", e); }
        if (!root.TryGetValue("prompt", out var p) || p is not Tomlyn.Model.TomlTable prompt)
            throw new LoraSharpException("expected a [prompt] table", source, "prompt");
        if (!prompt.TryGetValue("subset", out var s) || s is not Tomlyn.Model.TomlTableArray subsets || subsets.Count == 0)
            throw new LoraSharpException("expected [[prompt.subset]] items", source, "prompt.subset");
        var defaults = prompt.Where(kv => kv.Key != "subset").ToDictionary(kv => kv.Key, kv => (object?)kv.Value);
        return subsets.Select((sub, i) =>
        {
            var merged = new Dictionary<string, object?>(defaults);
            foreach (var (k, v) in sub) merged[k] = v;
            return FromObject(merged, i + 1, source);
        }).ToList();
    }

    static SamplePrompt FromObject(IReadOnlyDictionary<string, object?> o, int index, string source)
    {
        foreach (var key in o.Keys)
            if (!ObjectKeys.Contains(key))
                throw new LoraSharpException($"prompt {index}: unknown key (expected {string.Join(", ", ObjectKeys)})", source, key);
        T Get<T>(string key, T fallback, Func<object, T> convert)
        {
            if (!o.TryGetValue(key, out var v) || v is null) return fallback;
            try { return convert(v); }
            catch (Exception e) when (e is FormatException or InvalidCastException or OverflowException)
            {
                throw new LoraSharpException($"prompt {index}: '{v}' has the wrong type for {key}", source, key, e);
            }
        }
        int Int(object v) => Convert.ToInt32(v, CultureInfo.InvariantCulture);
        string Str(object v) => v as string ?? throw new FormatException("expected a string");
        var text = Get("prompt", "", Str);
        if (text.Length == 0) throw new LoraSharpException($"prompt {index}: no prompt text", source, "prompt");
        return new SamplePrompt(text, Get("negative_prompt", "", Str),
            Math.Max(64, Get("width", 512, Int) / 8 * 8), Math.Max(64, Get("height", 512, Int) / 8 * 8),
            Math.Clamp(Get("sample_steps", 30, Int), 1, 1000), Get("scale", 7.5, v => Convert.ToDouble(v, CultureInfo.InvariantCulture)),
            Get<long?>("seed", null, v => Convert.ToInt64(v, CultureInfo.InvariantCulture)), Get<string?>("sample_sampler", null, Str), index);
    }

    public static List<SamplePrompt> Parse(IEnumerable<string> lines, string source = "prompts")
    {
        var list = new List<SamplePrompt>();
        int lineNo = 0;
        foreach (var raw in lines)
        {
            lineNo++;
            var line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            var parts = (" " + line).Split(" --");
            string prompt = parts[0].Trim();
            string negative = "";
            int w = 512, h = 512, steps = 30;
            double cfg = 7.5;
            long? seed = null;
            string? sampler = null;
            foreach (var part in parts.Skip(1))
            {
                var m = Arg().Match(part.Trim());
                if (!m.Success) throw new LoraSharpException($"line {lineNo}: unknown prompt option '--{part.Trim()}' (expected --n, --w, --h, --s, --l, --d, --ss)", source);
                string v = m.Groups[2].Value.Trim();
                try
                {
                    switch (m.Groups[1].Value)
                    {
                        case "n": negative = v; break;
                        case "w": w = Math.Max(64, ParseInt(v) / 8 * 8); break;
                        case "h": h = Math.Max(64, ParseInt(v) / 8 * 8); break;
                        case "s": steps = Math.Clamp(ParseInt(v), 1, 1000); break;
                        case "l": cfg = double.Parse(v, NumberStyles.Float, CultureInfo.InvariantCulture); break;
                        case "d": seed = long.Parse(v, NumberStyles.Integer, CultureInfo.InvariantCulture); break;
                        case "ss": sampler = v; break;
                        default: break; // --cn (ControlNet image) and --g (Flux guidance) do not apply here
                    }
                }
                catch (FormatException)
                {
                    throw new LoraSharpException($"line {lineNo}: option --{m.Groups[1].Value} expects a number, got '{v}'", source);
                }
            }
            list.Add(new SamplePrompt(prompt, negative, w, h, steps, cfg, seed, sampler, lineNo));
        }
        return list;
    }

    /// <summary>
    /// The txt2img sampler for a kohya sampler name (<c>sample_sampler</c>, <c>--ss</c>): kohya's <c>k_euler</c>,
    /// <c>k_euler_a</c> and <c>dpmsolver++</c> (diffusers' DPMSolverMultistep = DPM++ 2M) map to the project's samplers;
    /// other names go to <see cref="Diffusion.Samplers.Create"/> as they are (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, A1111 names).
    /// </summary>
    public static string SamplerName(string kohyaName) => kohyaName.Trim().ToLowerInvariant() switch
    {
        "k_euler" => "euler",
        "k_euler_a" => "euler_a",
        "dpmsolver++" => "dpmpp_2m",
        _ => kohyaName,
    };

    static int ParseInt(string v) => int.Parse(v, NumberStyles.Integer, CultureInfo.InvariantCulture);
}
