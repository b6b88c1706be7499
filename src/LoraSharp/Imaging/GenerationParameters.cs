using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace LoraSharp.Imaging;

/// <summary>
/// A1111's "infotext": the prompt, the negative prompt and the generation settings, as stored in a PNG's
/// <c>parameters</c> text chunk:
/// <code>
/// &lt;prompt&gt;
/// Negative prompt: &lt;negative&gt;
/// Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: name, Lora hashes: "style: 0123456789ab", Version: LoraSharp
/// </code>
/// A setting value containing ',', ':' or a newline is written as a JSON string (A1111's quote()).
/// </summary>
public sealed partial record GenerationParameters(string Prompt, string NegativePrompt, IReadOnlyList<KeyValuePair<string, string>> Settings)
{
    /// <summary>The PNG text keyword A1111 uses.</summary>
    public const string PngKeyword = "parameters";

    /// <summary>A setting's value, or null.</summary>
    public string? Get(string key) => Settings.FirstOrDefault(kv => kv.Key == key).Value;

    /// <summary>The settings of a txt2img run, in A1111's order.</summary>
    public static GenerationParameters ForTxt2Img(
        string prompt, string negativePrompt, int steps, string sampler, double cfgScale, long seed, int width, int height,
        string? modelHash = null, string? modelName = null, IReadOnlyList<KeyValuePair<string, string>>? loraHashes = null,
        int? clipSkip = null, string version = "LoraSharp")
    {
        var s = new List<KeyValuePair<string, string>>
        {
            new("Steps", steps.ToString(CultureInfo.InvariantCulture)),
            new("Sampler", sampler),
            new("CFG scale", cfgScale.ToString("0.###", CultureInfo.InvariantCulture)),
            new("Seed", seed.ToString(CultureInfo.InvariantCulture)),
            new("Size", $"{width}x{height}"),
        };
        if (modelHash is not null) s.Add(new("Model hash", modelHash));
        if (modelName is not null) s.Add(new("Model", modelName));
        if (clipSkip is > 1) s.Add(new("Clip skip", clipSkip.Value.ToString(CultureInfo.InvariantCulture)));
        if (loraHashes is { Count: > 0 }) s.Add(new("Lora hashes", string.Join(", ", loraHashes.Select(kv => $"{kv.Key}: {kv.Value}"))));
        s.Add(new("Version", version));
        return new GenerationParameters(prompt, negativePrompt, s);
    }

    /// <summary>The infotext (A1111 create_infotext layout).</summary>
    public string ToInfotext()
    {
        var sb = new StringBuilder(Prompt);
        if (NegativePrompt.Length > 0) sb.Append("\nNegative prompt: ").Append(NegativePrompt);
        sb.Append('\n');
        sb.Append(string.Join(", ", Settings.Select(kv => kv.Key == kv.Value ? kv.Key : $"{kv.Key}: {Quote(kv.Value)}")));
        return sb.ToString();
    }

    public override string ToString() => ToInfotext();

    /// <summary>A1111 quote(): plain unless the value holds ',', ':' or a newline; then a JSON string (non-ASCII kept).</summary>
    public static string Quote(string value)
    {
        if (!value.Contains(',') && !value.Contains('\n') && !value.Contains(':')) return value;
        var sb = new StringBuilder("\"");
        foreach (var ch in value)
        {
            switch (ch)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (ch < 0x20) sb.Append("\\u").Append(((int)ch).ToString("x4", CultureInfo.InvariantCulture));
                    else sb.Append(ch);
                    break;
            }
        }
        return sb.Append('"').ToString();
    }

    [GeneratedRegex("""\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)""")]
    private static partial Regex Param();

    /// <summary>
    /// A1111 parse_generation_parameters: the last line holds the settings when it has at least 3 "key: value"
    /// pairs; lines before "Negative prompt:" are the prompt, the rest the negative prompt; quoted values are unquoted.
    /// </summary>
    public static GenerationParameters Parse(string infotext)
    {
        var lines = infotext.Trim().Split('\n').ToList();
        var last = lines[^1];
        lines.RemoveAt(lines.Count - 1);
        if (Param().Matches(last).Count < 3)
        {
            lines.Add(last);
            last = "";
        }
        var prompt = new StringBuilder();
        var negative = new StringBuilder();
        bool doneWithPrompt = false;
        foreach (var raw in lines)
        {
            var line = raw.Trim();
            if (line.StartsWith("Negative prompt:", StringComparison.Ordinal))
            {
                doneWithPrompt = true;
                line = line[16..].Trim();
            }
            var target = doneWithPrompt ? negative : prompt;
            if (target.Length > 0) target.Append('\n');
            target.Append(line);
        }
        var settings = new List<KeyValuePair<string, string>>();
        foreach (Match m in Param().Matches(last))
        {
            var key = m.Groups[1].Value;
            var value = m.Groups[2].Value;
            if (value.Length >= 2 && value[0] == '"' && value[^1] == '"')
            {
                try { value = JsonSerializer.Deserialize<string>(value) ?? value; }
                catch (JsonException) { /* A1111 keeps going on a bad value; so do we, keeping it quoted */ }
            }
            settings.Add(new(key, value));
        }
        return new GenerationParameters(prompt.ToString(), negative.ToString(), settings);
    }

    /// <summary>The parameters stored in a PNG file, or null when it has no "parameters" text.</summary>
    public static GenerationParameters? ReadFromPng(string path) =>
        PngText.Read(path).TryGetValue(PngKeyword, out var text) ? Parse(text) : null;
}
