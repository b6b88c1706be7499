using System.Text.Json;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>Reading diffusers / transformers <c>config.json</c> values: null and missing mean "default",
/// and fields that are "an int or a list per block" become arrays.</summary>
static class DiffusersJson
{
    /// <summary>The diffusers version written into configs (the layout matches diffusers 0.2x–0.40).</summary>
    public const string DiffusersVersion = "0.30.0";

    /// <summary>Indented JSON with keys in the given order, as diffusers writes its configs.</summary>
    public static string Write(IReadOnlyDictionary<string, object?> values) =>
        JsonSerializer.Serialize(values, new JsonSerializerOptions { WriteIndented = true }) + "\n";

    /// <summary>One number when every block has the same value, else the list (diffusers accepts both).</summary>
    public static object PerBlockValue(int[] values) => values.Distinct().Count() == 1 ? values[0] : values;

    public static JsonDocument Parse(string path)
    {
        if (!File.Exists(path))
            throw new LoraSharpException("config file not found", path);
        try
        {
            return JsonDocument.Parse(File.ReadAllText(path), new JsonDocumentOptions { AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip });
        }
        catch (JsonException e)
        {
            throw new LoraSharpException($"not valid JSON: {e.Message}", path, inner: e);
        }
    }

    static bool TryGet(JsonElement r, string name, out JsonElement value) =>
        r.TryGetProperty(name, out value) && value.ValueKind != JsonValueKind.Null;

    public static int Int(JsonElement r, string name, int fallback) =>
        TryGet(r, name, out var v) ? v.GetInt32() : fallback;

    public static int? IntOrNull(JsonElement r, string name) =>
        TryGet(r, name, out var v) ? v.GetInt32() : null;

    public static double Double(JsonElement r, string name, double fallback) =>
        TryGet(r, name, out var v) ? v.GetDouble() : fallback;

    public static bool Bool(JsonElement r, string name, bool fallback) =>
        TryGet(r, name, out var v) ? v.GetBoolean() : fallback;

    public static string String(JsonElement r, string name, string fallback) =>
        TryGet(r, name, out var v) ? v.GetString() ?? fallback : fallback;

    public static string? StringOrNull(JsonElement r, string name) =>
        TryGet(r, name, out var v) ? v.GetString() : null;

    public static string[] Strings(JsonElement r, string name, string[] fallback) =>
        TryGet(r, name, out var v) ? v.EnumerateArray().Select(e => e.GetString() ?? "").ToArray() : fallback;

    public static int[] Ints(JsonElement r, string name, int[] fallback) =>
        TryGet(r, name, out var v) ? v.EnumerateArray().Select(e => e.GetInt32()).ToArray() : fallback;

    /// <summary>An int applying to every block, or one value per block; null when missing.</summary>
    public static int[]? PerBlock(JsonElement r, string name, int blocks)
    {
        if (!TryGet(r, name, out var v)) return null;
        if (v.ValueKind == JsonValueKind.Number) return Enumerable.Repeat(v.GetInt32(), blocks).ToArray();
        return v.EnumerateArray().Select(e => e.GetInt32()).ToArray();
    }
}
