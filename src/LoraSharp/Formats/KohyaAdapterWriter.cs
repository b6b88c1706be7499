using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Formats;

/// <summary>Options for writing the kohya / A1111 / LyCORIS layout.</summary>
public sealed class KohyaWriteOptions
{
    /// <summary>Save dtype (kohya --save_precision); default: keep each tensor's dtype.</summary>
    public ScalarType? SaveDType { get; init; }

    /// <summary>The kohya name of a module path when it is not the mangled path (e.g. SDXL's SGM UNet names).</summary>
    public Func<string, string?>? NameOf { get; init; }

    /// <summary>Metadata to add (ss_*, modelspec.*); hashes are computed and added.</summary>
    public IReadOnlyDictionary<string, string>? Metadata { get; init; }
}

/// <summary>
/// Writes adapters in the kohya layout A1111, ComfyUI, Civitai and kohya read: <c>&lt;lora_name&gt;.lora_down.weight</c>,
/// <c>.lora_up.weight</c>, <c>.alpha</c> (0-dim, always present), LyCORIS <c>hada_*</c> / <c>lokr_*</c>, <c>dora_scale</c>;
/// <c>ss_*</c> metadata and the <c>sshs_model_hash</c> / <c>sshs_legacy_hash</c> hashes. PEFT-convention weights are
/// converted so the file means the same under kohya rules (rsLoRA alpha stored as alpha·√r, LoKr with two full
/// factors scaled into w1, PEFT magnitude vectors as <c>dora_scale</c> [out, 1]).
/// </summary>
public static class KohyaAdapterWriter
{
    public static void Write(string path, AdapterWeights weights, KohyaWriteOptions? options = null)
    {
        options ??= new KohyaWriteOptions();
        bool sdxl = weights.Modules.Any(m => m.ModulePath.StartsWith("text_encoder_2.", StringComparison.Ordinal));
        using var scope = NewDisposeScope();
        var tensors = new List<KeyValuePair<string, Tensor>>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var m in weights.Modules)
        {
            var name = options.NameOf?.Invoke(m.ModulePath) ?? KohyaName(m.ModulePath, sdxl)
                ?? throw new LoraSharpException($"module '{m.ModulePath}' has no kohya name (kohya names exist for unet., text_encoder. and text_encoder_2. paths)", null, m.ModulePath);
            if (!names.Add(name)) throw new LoraSharpException($"two modules map to the kohya name '{name}'", null, m.ModulePath);
            foreach (var (suffix, tensor) in ModuleTensors(m))
                tensors.Add(new(name + "." + suffix, options.SaveDType is { } dt && tensor.dtype != dt ? tensor.to_type(dt) : tensor));
        }

        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (k, v) in DefaultMetadata(weights, sdxl)) metadata[k] = v;
        foreach (var (k, v) in weights.Metadata)
            if (k.StartsWith("ss_", StringComparison.Ordinal) || k.StartsWith("modelspec.", StringComparison.Ordinal)) metadata[k] = v;
        if (options.Metadata is not null) foreach (var (k, v) in options.Metadata) metadata[k] = v;
        metadata.Remove("sshs_model_hash");
        metadata.Remove("sshs_legacy_hash");
        WriteWithHashes(path, tensors, metadata);
    }

    /// <summary>
    /// Writes the file, then writes it again with sshs_model_hash (data-section SHA-256) and sshs_legacy_hash
    /// in the metadata; the data section does not change between the two writes.
    /// </summary>
    public static void WriteWithHashes(string path, IReadOnlyList<KeyValuePair<string, Tensor>> tensors, Dictionary<string, string> metadata)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
        var probe = Path.Combine(dir, $".{Path.GetFileName(path)}.{Environment.ProcessId}.hash.tmp");
        try
        {
            SafetensorsWriter.Write(probe, tensors, metadata);
            metadata["sshs_model_hash"] = AdapterHashes.DataSectionSha256(probe);
            metadata["sshs_legacy_hash"] = AdapterHashes.KohyaLegacyHash(probe, metadata);
        }
        finally
        {
            File.Delete(probe);
        }
        SafetensorsWriter.Write(path, tensors, metadata);
    }

    /// <summary>kohya name of a module path: lora_unet_ / lora_te_ (SDXL: lora_te1_) / lora_te2_ + path with '.' → '_'.</summary>
    public static string? KohyaName(string modulePath, bool sdxl)
    {
        if (sdxl && modulePath.StartsWith("text_encoder.", StringComparison.Ordinal))
            return "lora_te1_" + modulePath["text_encoder.".Length..].Replace('.', '_');
        return ModuleIndex.KohyaNameOf(modulePath);
    }

    /// <summary>The kohya-layout tensors (suffix, tensor) of one module.</summary>
    static IEnumerable<(string Suffix, Tensor Tensor)> ModuleTensors(ModuleAdapterWeights m)
    {
        var t = m.Tensors;
        var dtype = t.Values.First().dtype;
        var device = t.Values.First().device;
        Tensor Alpha(double value) => tensor(value, dtype: dtype, device: device);
        int r = AdapterScales.RankFor(m);
        switch (m.Algorithm)
        {
            case AdapterAlgorithm.LoRA:
                {
                    yield return ("lora_down.weight", t["lora_down"]);
                    yield return ("lora_up.weight", t["lora_up"]);
                    if (t.TryGetValue("lora_mid", out var mid)) yield return ("lora_mid.weight", mid);
                    // alpha such that alpha/r under kohya rules equals this module's scale.
                    yield return ("alpha", Alpha(AdapterScales.Scale(m) * r));
                    if (t.TryGetValue("dora_scale", out var ds)) yield return ("dora_scale", ds);
                    else if (t.TryGetValue("magnitude", out var mag))
                    {
                        var shape = new long[t["lora_up"].dim()];
                        Array.Fill(shape, 1L);
                        shape[0] = mag.shape[0];
                        yield return ("dora_scale", mag.reshape(shape));
                    }
                    break;
                }
            case AdapterAlgorithm.LoHa:
                foreach (var role in new[] { "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2" })
                    if (t.TryGetValue(role, out var x)) yield return (role, x);
                yield return ("alpha", Alpha(AdapterScales.Scale(m) * r));
                break;
            case AdapterAlgorithm.LoKr:
                {
                    double scale = AdapterScales.Scale(m);
                    bool decomposed = t.ContainsKey("lokr_w1_b") || t.ContainsKey("lokr_w2_b");
                    foreach (var role in new[] { "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2" })
                    {
                        if (!t.TryGetValue(role, out var x)) continue;
                        // Neither factor decomposed: kohya/LyCORIS use scale 1, so fold the scale into w1.
                        yield return (role, !decomposed && role == "lokr_w1" && scale != 1 ? x * scale : x);
                    }
                    yield return ("alpha", Alpha(decomposed ? scale * r : (m.Alpha ?? 1)));
                    break;
                }
            default:
                if (t.TryGetValue("diff", out var diff)) yield return ("diff", diff);
                if (t.TryGetValue("diff_b", out var diffB)) yield return ("diff_b", diffB);
                break;
        }
    }

    /// <summary>ss_* and modelspec keys kohya writes for a network, derived from the weights.</summary>
    static Dictionary<string, string> DefaultMetadata(AdapterWeights weights, bool sdxl)
    {
        var ranks = weights.Modules.Where(m => m.Algorithm != AdapterAlgorithm.Full).Select(AdapterScales.RankFor).ToList();
        var linear = weights.Modules.Where(m => !IsConvKxK(m)).ToList();
        var conv = weights.Modules.Where(IsConvKxK).ToList();
        string Mode(IEnumerable<double> values) => values.GroupBy(v => v).OrderByDescending(g => g.Count()).Select(g => Num(g.Key)).FirstOrDefault() ?? "1";
        bool lycoris = weights.Modules.Any(m => m.Algorithm != AdapterAlgorithm.LoRA);
        var args = new Dictionary<string, string>();
        if (lycoris)
        {
            args["algo"] = weights.Modules.Select(m => m.Algorithm).Distinct().Count() == 1
                ? weights.Modules[0].Algorithm switch { AdapterAlgorithm.LoHa => "loha", AdapterAlgorithm.LoKr => "lokr", AdapterAlgorithm.Full => "full", _ => "locon" }
                : "locon";
        }
        if (conv.Count > 0)
        {
            args["conv_dim"] = Mode(conv.Select(m => (double)AdapterScales.RankFor(m)));
            args["conv_alpha"] = Mode(conv.Select(m => AdapterScales.Scale(m) * AdapterScales.RankFor(m)));
        }
        return new Dictionary<string, string>
        {
            ["ss_network_module"] = lycoris ? "lycoris.kohya" : "networks.lora",
            ["ss_network_dim"] = Mode(linear.Select(m => (double)AdapterScales.RankFor(m)).DefaultIfEmpty(ranks.DefaultIfEmpty(1).First())),
            ["ss_network_alpha"] = Mode(linear.Select(m => AdapterScales.Scale(m) * AdapterScales.RankFor(m)).DefaultIfEmpty(1)),
            ["ss_network_args"] = args.Count == 0 ? "" : JsonSerializer.Serialize(args),
            ["ss_output_name"] = weights.Name,
            ["ss_base_model_version"] = sdxl ? "sdxl_base_v1-0" : "sd_v1",
            ["ss_v2"] = "False",
            ["modelspec.sai_model_spec"] = "1.0.1",
            ["modelspec.architecture"] = (sdxl ? "stable-diffusion-xl-v1-base" : "stable-diffusion-v1") + "/lora",
            ["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models",
            ["modelspec.title"] = weights.Name,
            ["modelspec.date"] = DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ss", CultureInfo.InvariantCulture),
        };
    }

    static bool IsConvKxK(ModuleAdapterWeights m)
        => m.Tensors.Values.Any(t => t.dim() == 4 && (t.shape[2] > 1 || t.shape[3] > 1));

    static string Num(double v) => v == Math.Floor(v) && Math.Abs(v) < 1e15 ? ((long)v).ToString(CultureInfo.InvariantCulture) + (v == 0 ? "" : "")
        : v.ToString("R", CultureInfo.InvariantCulture);
}
