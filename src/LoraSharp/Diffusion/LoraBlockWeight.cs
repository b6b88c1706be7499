using System.Globalization;
using LoraSharp.Models.StableDiffusion;

namespace LoraSharp.Diffusion;

/// <summary>
/// LoRA Block Weight (hako-mikan/sd-webui-lora-block-weight): one weight per UNet block (and BASE = the text
/// encoders), multiplied into a LoRA's te/unet multiplier per module.
/// <list type="bullet">
/// <item>17 values (SD1.x/2.x LoRA): BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 … OUT11</item>
/// <item>26 values (SD1.x/2.x full, LyCORIS): BASE, IN00 … IN11, M00, OUT00 … OUT11</item>
/// <item>12 values (SDXL LoRA): BASE, IN04, IN05, IN07, IN08, M00, OUT00 … OUT05</item>
/// <item>20 values (SDXL full): BASE, IN00 … IN08, M00, OUT00 … OUT08</item>
/// </list>
/// As in the extension, a short vector is expanded to the 26 slots with 0 for the blocks it does not list (a 17-value
/// vector gives IN00, IN03, IN06, IN09–IN11 and OUT00–OUT02 weight 0), blocks are the ldm/SGM <c>input_blocks.N</c>,
/// <c>middle_block</c> and <c>output_blocks.N</c> of the module, every text-encoder module is BASE, and modules in no
/// block (<c>time_embed</c>, <c>out</c>, <c>label_emb</c>) keep weight 1. Values may be <c>R</c> (random in [0, 1]) or
/// <c>U</c> (random in [-0.5, 1.5]), rounded to 3 decimals like the extension (drawn from the caller's generator, so a
/// seeded generator makes them reproducible). Differences from the extension: a vector whose length fits no layout,
/// an unknown preset name or a layout of the other model family is an error instead of being ignored, and
/// <c>X</c> values (inherited weights) are not supported.
/// </summary>
public static class LoraBlockWeight
{
    public static IReadOnlyList<string> Blocks26 { get; } =
        ["BASE", .. Enumerable.Range(0, 12).Select(i => $"IN{i:00}"), "M00", .. Enumerable.Range(0, 12).Select(i => $"OUT{i:00}")];
    public static IReadOnlyList<string> Blocks17 { get; } =
        ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", .. Enumerable.Range(3, 9).Select(i => $"OUT{i:00}")];
    public static IReadOnlyList<string> Blocks12 { get; } =
        ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", .. Enumerable.Range(0, 6).Select(i => $"OUT{i:00}")];
    public static IReadOnlyList<string> Blocks20 { get; } =
        ["BASE", .. Enumerable.Range(0, 9).Select(i => $"IN{i:00}"), "M00", .. Enumerable.Range(0, 9).Select(i => $"OUT{i:00}")];

    /// <summary>The extension's built-in presets (its <c>DEF_WEIGHT_PRESET</c>; 17 values, SD1.x/2.x).</summary>
    public static IReadOnlyDictionary<string, string> DefaultPresets { get; } = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        ["NONE"] = "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
        ["ALL"] = "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        ["INS"] = "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
        ["IND"] = "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        ["INALL"] = "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
        ["MIDD"] = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        ["OUTD"] = "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        ["OUTS"] = "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        ["OUTALL"] = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
        ["ALL0.5"] = "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    };

    /// <summary>The block names of a vector of <paramref name="length"/> values (12, 17, 20 or 26).</summary>
    public static IReadOnlyList<string> BlockIds(int length) => length switch
    {
        12 => Blocks12,
        17 => Blocks17,
        20 => Blocks20,
        26 => Blocks26,
        _ => throw new LoraSharpException($"LoRA block weights need 12 or 20 values (SDXL) or 17 or 26 values (SD1.x/2.x), got {length}", key: "lbw"),
    };

    /// <summary>
    /// Reads presets in the extension's <c>lbwpresets.txt</c> format: one <c>NAME:w1,w2,…</c> per line; lines with
    /// '#', without ':' or whose value count fits no layout are skipped (as the extension does).
    /// </summary>
    public static Dictionary<string, string> ReadPresets(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("LoRA block weight preset file not found", path);
        var result = new Dictionary<string, string>(DefaultPresets, StringComparer.Ordinal);
        foreach (var line in File.ReadAllLines(path))
        {
            if (!line.Contains(':') || line.Contains('#')) continue;
            int commas = line.Count(c => c == ',');
            if (commas is not (11 or 16 or 19 or 25)) continue;
            var parts = line.Split(':');
            result[parts[0].Trim()] = parts[1].Trim();
        }
        return result;
    }

    /// <summary>
    /// Parses a preset name or a comma-separated vector into its values (12, 17, 20 or 26 of them).
    /// <c>R</c> and <c>U</c> draw from <paramref name="random"/> (a new unseeded generator when null).
    /// </summary>
    public static double[] Parse(string spec, IReadOnlyDictionary<string, string>? presets = null, Random? random = null)
    {
        presets ??= DefaultPresets;
        var text = spec.Trim();
        if (presets.TryGetValue(text, out var preset)) text = preset;
        else if (!text.Contains(','))
            throw new LoraSharpException($"unknown LoRA block weight preset '{spec}' (known: {string.Join(", ", presets.Keys)})", key: "lbw");
        var items = text.Split(',').Select(s => s.Trim()).ToArray();
        BlockIds(items.Length);
        var values = new double[items.Length];
        for (int i = 0; i < items.Length; i++)
        {
            var s = items[i];
            if (s == "R") values[i] = Math.Round((random ?? Random.Shared).NextDouble(), 3);
            else if (s == "U") values[i] = Math.Round(-0.5 + 2 * (random ?? Random.Shared).NextDouble(), 3);
            else if (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && double.IsFinite(v)) values[i] = v;
            else throw new LoraSharpException($"LoRA block weight '{s}' (position {i + 1} of '{spec}') is not a number, R or U", key: "lbw");
        }
        return values;
    }

    /// <summary>The extension's to26: each value placed at its block's slot of the 26-slot layout, other slots 0.</summary>
    public static double[] To26(IReadOnlyList<double> values)
    {
        var ids = BlockIds(values.Count);
        var result = new double[26];
        for (int i = 0; i < ids.Count; i++) result[Blocks26.IndexOf(ids[i])] = values[i];
        return result;
    }

    static int IndexOf(this IReadOnlyList<string> list, string item)
    {
        for (int i = 0; i < list.Count; i++) if (list[i] == item) return i;
        return -1;
    }

    /// <summary>
    /// The block of a model module path: <c>BASE</c> for the text encoders, <c>INnn</c> / <c>M00</c> / <c>OUTnn</c> for UNet
    /// modules in ldm/SGM <c>input_blocks.nn</c> / <c>middle_block</c> / <c>output_blocks.nn</c>, or null (weight 1).
    /// </summary>
    public static string? BlockOf(string modulePath, LdmKeyMap unetMap)
    {
        if (modulePath.StartsWith(StableDiffusionLoras.TextEncoderPrefix, StringComparison.Ordinal)
            || modulePath.StartsWith(StableDiffusionLoras.TextEncoder2Prefix, StringComparison.Ordinal))
            return "BASE";
        if (!modulePath.StartsWith(StableDiffusionLoras.UNetPrefix, StringComparison.Ordinal)) return null;
        var ldm = unetMap.ToLdm(modulePath[StableDiffusionLoras.UNetPrefix.Length..]);
        if (ldm is null) return null;
        var parts = ldm.Split('.');
        if (parts[0] == "middle_block") return "M00";
        if (parts.Length > 1 && int.TryParse(parts[1], NumberStyles.None, CultureInfo.InvariantCulture, out var n))
        {
            if (parts[0] == "input_blocks") return $"IN{n:00}";
            if (parts[0] == "output_blocks") return $"OUT{n:00}";
        }
        return null;
    }

    /// <summary>Checks that a vector's layout belongs to the model's family (12/20 for SDXL, 17/26 otherwise).</summary>
    public static void CheckFamily(int length, StableDiffusionFamily family)
    {
        bool sdxl = family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner;
        if (sdxl && length is not (12 or 20))
            throw new LoraSharpException($"SDXL LoRA block weights need 12 values (BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05) or 20 (BASE, IN00-IN08, M00, OUT00-OUT08), got {length}", key: "lbw");
        if (!sdxl && length is not (17 or 26))
            throw new LoraSharpException($"SD1.x/2.x LoRA block weights need 17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11) or 26 (BASE, IN00-IN11, M00, OUT00-OUT11), got {length}", key: "lbw");
    }

    /// <summary>
    /// The per-module weight function for <see cref="Adapters.AttachedAdapter.ModuleWeight"/>: the value of the
    /// module's block (after <see cref="To26"/>), 1 for modules in no block.
    /// </summary>
    public static Func<string, double> ModuleWeights(StableDiffusionModel model, IReadOnlyList<double> values)
    {
        CheckFamily(values.Count, model.Family);
        var w26 = To26(values);
        var map = LdmKeyMap.ForUNet(model.Config.Unet);
        var cache = new Dictionary<string, double>(StringComparer.Ordinal);
        return path =>
        {
            lock (cache)
            {
                if (cache.TryGetValue(path, out var v)) return v;
                var block = BlockOf(path, map);
                v = block is null ? 1.0 : w26[Blocks26.IndexOf(block)];
                cache[path] = v;
                return v;
            }
        };
    }
}
