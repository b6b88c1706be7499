using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraSharp.Adapters;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Formats;

/// <summary>Options for writing PEFT layouts.</summary>
public sealed class PeftWriteOptions
{
    public string? BaseModelNameOrPath { get; init; }

    /// <summary>PEFT task_type, e.g. CAUSAL_LM (null for custom models).</summary>
    public string? TaskType { get; init; }

    public ScalarType? SaveDType { get; init; }
}

/// <summary>
/// Writes PEFT adapters: a folder with <c>adapter_config.json</c> (every field PEFT writes, sorted, indent 2) and
/// <c>adapter_model.safetensors</c> (<c>base_model.model.&lt;path&gt;.lora_A.weight</c>, <c>lora_B.weight</c>,
/// <c>lora_magnitude_vector</c>; LoHa <c>hada_*</c>; LoKr <c>lokr_*</c>), and diffusers LoRA files
/// (<c>unet.&lt;path&gt;.lora_A.weight</c>, config in the <c>lora_adapter_metadata</c> metadata).
/// One config holds one r and alpha; modules that differ get rank_pattern / alpha_pattern entries.
/// </summary>
public static class PeftAdapterWriter
{
    public static void WritePeftFolder(string folder, AdapterWeights weights, PeftWriteOptions? options = null)
    {
        options ??= new PeftWriteOptions();
        var type = PeftTypeOf(weights, "the PEFT layout");
        var (config, tensors) = Build(weights, type, AdapterKeyParser.PeftPrefix, options.SaveDType, "");
        config["base_model_name_or_path"] = options.BaseModelNameOrPath;
        config["task_type"] = options.TaskType;
        Directory.CreateDirectory(folder);
        SafetensorsWriter.Write(Path.Combine(folder, "adapter_model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        AtomicFile.WriteAllText(Path.Combine(folder, AdapterFile.PeftConfigName), Serialize(config));
    }

    /// <summary>A diffusers LoRA file (what <c>save_lora_weights</c> writes with the PEFT backend). LoRA and DoRA only.</summary>
    public static void WriteDiffusersFile(string path, AdapterWeights weights, ScalarType? saveDType = null)
    {
        var type = PeftTypeOf(weights, "the diffusers layout");
        if (type != "LORA")
            throw new LoraSharpException($"the diffusers layout cannot hold {type} modules (only LoRA); convert to kohya instead", path);
        var metadata = new JsonObject();
        var tensors = new List<KeyValuePair<string, Tensor>>();
        using var scope = NewDisposeScope();
        foreach (var component in weights.Modules.Select(m => ComponentOf(m.ModulePath)).Distinct(StringComparer.Ordinal).OrderBy(c => c, StringComparer.Ordinal))
        {
            if (component.Length == 0)
                throw new LoraSharpException($"the diffusers layout needs module paths under unet., text_encoder. or text_encoder_2.", path);
            var part = new AdapterWeights { Name = weights.Name, Modules = weights.Modules.Where(m => ComponentOf(m.ModulePath) == component).ToList() };
            var (config, partTensors) = Build(part, type, "", saveDType, component);
            foreach (var (k, v) in config) metadata[component + k] = v?.DeepClone();
            tensors.AddRange(partTensors);
        }
        SafetensorsWriter.Write(path, tensors, new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["lora_adapter_metadata"] = metadata.ToJsonString(new JsonSerializerOptions { WriteIndented = true }),
        });
    }

    static string ComponentOf(string path) => AdapterKeyParser.DiffusersComponents.FirstOrDefault(c => path.StartsWith(c, StringComparison.Ordinal)) ?? "";

    static string PeftTypeOf(AdapterWeights weights, string layout)
    {
        var algorithms = weights.Modules.Select(m => m.Algorithm).Distinct().ToList();
        if (algorithms.Count != 1)
            throw new LoraSharpException($"{layout} holds one algorithm per adapter; this one mixes {string.Join(", ", algorithms)}", null);
        return algorithms[0] switch
        {
            AdapterAlgorithm.LoRA => "LORA",
            AdapterAlgorithm.LoHa => "LOHA",
            AdapterAlgorithm.LoKr => "LOKR",
            _ => throw new LoraSharpException($"{layout} cannot hold full weight differences (diff)", null),
        };
    }

    /// <summary>Config and tensors; module paths are written relative to <paramref name="component"/>.</summary>
    static (JsonObject Config, List<KeyValuePair<string, Tensor>> Tensors) Build(AdapterWeights weights, string type, string keyPrefix,
        ScalarType? saveDType, string component)
    {
        var tensors = new List<KeyValuePair<string, Tensor>>();
        var ranks = new Dictionary<string, int>(StringComparer.Ordinal);
        var alphas = new Dictionary<string, double>(StringComparer.Ordinal);
        bool rs = weights.Modules.All(m => m.RsLora);
        bool dora = weights.Modules.Any(m => m.Has("magnitude") || m.Has("dora_scale"));
        foreach (var m in weights.Modules)
        {
            var path = m.ModulePath[component.Length..];
            var t = m.Tensors;
            if (t.Keys.Any(k => k is "lora_mid" or "hada_t1" or "lokr_t2") && type == "LORA")
                throw new LoraSharpException($"module '{m.ModulePath}': PEFT has no Tucker (lora_mid) LoRA", null, m.ModulePath);
            Tensor Cast(Tensor x) => saveDType is { } dt && x.dtype != dt ? x.to_type(dt) : x;
            void Add(string suffix, Tensor x) => tensors.Add(new(keyPrefix + component + path + suffix, Cast(x)));
            int r = AdapterScales.RankFor(m);
            double scale = AdapterScales.Scale(m);
            switch (m.Algorithm)
            {
                case AdapterAlgorithm.LoRA:
                    Add(".lora_A.weight", t["lora_down"]);
                    Add(".lora_B.weight", t["lora_up"]);
                    if (t.TryGetValue("magnitude", out var mag)) Add(".lora_magnitude_vector", mag);
                    else if (t.TryGetValue("dora_scale", out var ds))
                    {
                        if (ds.shape[0] != t["lora_up"].shape[0])
                            throw new LoraSharpException($"module '{m.ModulePath}': dora_scale on the input axis has no PEFT equivalent", null, m.ModulePath);
                        Add(".lora_magnitude_vector", ds.reshape(ds.shape[0]));
                    }
                    break;
                case AdapterAlgorithm.LoHa:
                    foreach (var role in new[] { "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2" })
                        if (t.TryGetValue(role, out var x)) Add("." + role, x);
                    break;
                case AdapterAlgorithm.LoKr:
                    foreach (var role in new[] { "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2" })
                        if (t.TryGetValue(role, out var x)) Add("." + role, x);
                    if (r == 0) r = 1; // two full factors: PEFT still divides by r; r = 1 keeps alpha = scale.
                    break;
            }
            ranks[path] = r;
            // alpha that gives the same scale under PEFT's rule (rsLoRA: alpha/√r when all modules use it).
            alphas[path] = rs ? scale * Math.Sqrt(r) : scale * r;
        }

        int commonR = ranks.Values.GroupBy(v => v).OrderByDescending(g => g.Count()).ThenBy(g => g.Key).First().Key;
        double commonAlpha = alphas.Values.GroupBy(v => v).OrderByDescending(g => g.Count()).ThenBy(g => g.Key).First().Key;
        var rankPattern = new JsonObject();
        var alphaPattern = new JsonObject();
        foreach (var (path, r) in ranks.OrderBy(p => p.Key, StringComparer.Ordinal))
        {
            if (r != commonR) rankPattern[Regex.Escape(path)] = r;
            if (Math.Abs(alphas[path] - commonAlpha) > 1e-9 * Math.Max(1, Math.Abs(commonAlpha))) alphaPattern[Regex.Escape(path)] = Number(alphas[path]);
        }
        var targets = new JsonArray(ranks.Keys.Select(p => p[(p.LastIndexOf('.') + 1)..]).Distinct().Order(StringComparer.Ordinal)
            .Select(n => (JsonNode?)JsonValue.Create(n)).ToArray());
        var config = type switch
        {
            "LORA" => LoraConfigTemplate(),
            "LOHA" => LycorisConfigTemplate("LOHA"),
            _ => LycorisConfigTemplate("LOKR"),
        };
        config["r"] = commonR;
        config[type == "LORA" ? "lora_alpha" : "alpha"] = Number(commonAlpha);
        config["rank_pattern"] = rankPattern;
        config["alpha_pattern"] = alphaPattern;
        config["target_modules"] = targets;
        if (type == "LORA")
        {
            config["use_rslora"] = rs;
            config["use_dora"] = dora;
        }
        return (config, tensors);
    }

    static JsonNode Number(double v) => v == Math.Floor(v) && Math.Abs(v) < 1 << 30 ? JsonValue.Create((int)v) : JsonValue.Create(v);

    /// <summary>The fields PEFT's LoraConfig.save_pretrained writes, with their defaults.</summary>
    static JsonObject LoraConfigTemplate() => new()
    {
        ["alpha_pattern"] = new JsonObject(), ["auto_mapping"] = null, ["base_model_name_or_path"] = null, ["bias"] = "none",
        ["corda_config"] = null, ["eva_config"] = null, ["exclude_modules"] = null, ["fan_in_fan_out"] = false,
        ["inference_mode"] = true, ["init_lora_weights"] = true, ["layer_replication"] = null, ["layers_pattern"] = null,
        ["layers_to_transform"] = null, ["loftq_config"] = new JsonObject(), ["lora_alpha"] = 8, ["lora_bias"] = false,
        ["lora_dropout"] = 0.0, ["megatron_config"] = null, ["megatron_core"] = "megatron.core", ["modules_to_save"] = null,
        ["peft_type"] = "LORA", ["r"] = 8, ["rank_pattern"] = new JsonObject(), ["revision"] = null, ["target_modules"] = new JsonArray(),
        ["task_type"] = null, ["trainable_token_indices"] = null, ["use_dora"] = false, ["use_rslora"] = false,
    };

    static JsonObject LycorisConfigTemplate(string type) => new()
    {
        ["alpha"] = 8, ["alpha_pattern"] = new JsonObject(), ["auto_mapping"] = null, ["base_model_name_or_path"] = null,
        ["exclude_modules"] = null, ["inference_mode"] = true, ["init_weights"] = true, ["layers_pattern"] = null,
        ["layers_to_transform"] = null, ["module_dropout"] = 0.0, ["modules_to_save"] = null, ["peft_type"] = type, ["r"] = 8,
        ["rank_dropout"] = 0.0, ["rank_pattern"] = new JsonObject(), ["revision"] = null, ["target_modules"] = new JsonArray(),
        ["task_type"] = null, ["use_effective_conv2d"] = false,
    };

    /// <summary>JSON as PEFT writes it: sorted keys, indent 2.</summary>
    static string Serialize(JsonObject config)
    {
        var sorted = new JsonObject();
        foreach (var (k, v) in config.OrderBy(p => p.Key, StringComparer.Ordinal)) sorted[k] = v?.DeepClone();
        return sorted.ToJsonString(new JsonSerializerOptions { WriteIndented = true, IndentSize = 2 });
    }
}
